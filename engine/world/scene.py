"""Procedural toy scenes, their texts, and a batched renderer (torch; CPU or GPU).

A scene is a 4 x 4 grid of 8-pixel cells (32 x 32 RGB, black background) holding ``NUM_BLOCKS`` = 3
blocks of distinct colours from :data:`COLOURS`, one block per row (three of the four rows), each
drawn as a 6 x 6 square inside its cell. A video has ``NUM_FRAMES`` = 4 frames: frame 0 is the scene
image; over frames 1..3 the agent holds one block -- drawn as a 2 x 2 white grip on the block's
centre -- and slides it horizontally along its row by ``dx`` cells, linearly
(frame k offset = round(k / 3 * 8 dx) pixels, so at most one cell per frame: no teleport).

Texts (the paper's forms; the toy's solutions are one sentence, not 40-90 words):

    task      "[Agent]: put the red block under the blue block"     ("above" when red's row is higher)
    solution  "the agent grabs the red block and slides it two cells to the right, then lets go."

The task names a goal relation (same column as the reference block, above or under it); the
solution spells out which block moves, which way and how far. The Demonstrator is pretrained only on
solution captions of random moves (:func:`random_moves`), so the task's relation words are foreign
to it: inferring the motion from the task needs the image (the reference block's column).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

GRID = 4
CELL = 8
SIZE = GRID * CELL  # 32 pixels
BLOCK = 6  # block side in pixels; drawn at offset 1 inside its cell
NUM_BLOCKS = 3
NUM_FRAMES = 4
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (235, 210, 40)}
COLOUR_NAMES = tuple(COLOURS)
AGENT_RGB = (255, 255, 255)
BACKGROUND_RGB = (0, 0, 0)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
WORD_NUMBERS = {w: n for n, w in NUMBER_WORDS.items()}
# Domain tags, the first word of every toy-scene stream's seed entropy. SeedSequence pads entropy with
# zeros ([s, 7, i] and [s, 7, i, 0] are one stream), so untagged streams met at some seed or rank count;
# with distinct first words no seed or rank can make two purposes draw the same scenes.
SEED_TAG_PRETRAIN = zlib.crc32(b"wmsd/toy-world/pretrain")
SEED_TAG_EVAL = zlib.crc32(b"wmsd/toy-world/eval")
SEED_TAG_PROPOSE = zlib.crc32(b"wmsd/toy-world/propose")


@dataclass(frozen=True)
class Scene:
    """Block colours (names), rows and columns, one entry per block; rows are distinct."""

    colours: tuple[str, ...]
    rows: tuple[int, ...]
    cols: tuple[int, ...]

    def __post_init__(self):
        # an invalid scene rendered silently: two blocks in one row were summed into a colour of no block
        n = len(self.colours)
        if len(self.rows) != n or len(self.cols) != n:
            raise ValueError(
                f"scene: {n} colours, {len(self.rows)} rows, {len(self.cols)} cols; expected one each per block"
            )
        unknown = [c for c in self.colours if c not in COLOURS]
        if unknown or len(set(self.colours)) != n:
            raise ValueError(f"scene colours {self.colours}: expected distinct names out of {COLOUR_NAMES}")
        if len(set(self.rows)) != n:
            raise ValueError(f"scene rows {self.rows}: expected one block per row (distinct rows)")
        if not all(0 <= v < GRID for v in (*self.rows, *self.cols)):
            raise ValueError(f"scene rows {self.rows}, cols {self.cols}: expected cells 0..{GRID - 1}")

    def index(self, colour: str) -> int:
        """The position of the block of ``colour`` in this scene."""
        if colour not in self.colours:
            raise ValueError(f"scene has no {colour!r} block; it has {self.colours}")
        return self.colours.index(colour)


@dataclass(frozen=True)
class Move:
    """The agent slides block ``block`` (an index into the scene) by ``dx`` cells (+ = right)."""

    block: int
    dx: int


def random_scene(rng: np.random.Generator) -> Scene:
    """Three distinct colours on three distinct rows, columns uniform."""
    colours = rng.choice(len(COLOURS), NUM_BLOCKS, replace=False)
    rows = rng.choice(GRID, NUM_BLOCKS, replace=False)
    cols = rng.integers(0, GRID, NUM_BLOCKS)
    return Scene(
        tuple(COLOUR_NAMES[c] for c in colours), tuple(int(r) for r in rows), tuple(int(c) for c in cols)
    )


def solution_text(scene: Scene, move: Move) -> str:
    """The detailed solution (the Demonstrator's prompt) describing ``move``."""
    if move.dx == 0 or abs(move.dx) >= GRID:
        raise ValueError(f"move.dx: expected 1..{GRID - 1} cells either way, got {move.dx}")
    n = abs(move.dx)
    side = "right" if move.dx > 0 else "left"
    cells = "cell" if n == 1 else "cells"
    return (
        f"the agent grabs the {scene.colours[move.block]} block and slides it "
        f"{NUMBER_WORDS[n]} {cells} to the {side}, then lets go."
    )


def task_text(scene: Scene, target: int, reference: int) -> str:
    """``[Agent]: put the <target> block under|above the <reference> block``."""
    # target == reference wrote "put the red block above the red block", which parse_task rejects
    if target == reference:
        raise ValueError(f"task_text: target and reference are the same block ({target})")
    relation = "under" if scene.rows[target] > scene.rows[reference] else "above"
    return f"[Agent]: put the {scene.colours[target]} block {relation} the {scene.colours[reference]} block"


def task_move(scene: Scene, target: int, reference: int) -> Move:
    """The move that solves the task: slide the target into the reference block's column."""
    return Move(target, scene.cols[reference] - scene.cols[target])


def task_pairs(scene: Scene) -> list[tuple[str, str, Move]]:
    """Every (task, solution, move) of the scene: ordered block pairs in different columns."""
    out = []
    # over the scene's own blocks: a scene read from an image with two blocks raised IndexError, with four
    # its fourth block was never paired
    n = len(scene.colours)
    for a in range(n):
        for b in range(n):
            if a != b and scene.cols[a] != scene.cols[b]:
                move = task_move(scene, a, b)
                out.append((task_text(scene, a, b), solution_text(scene, move), move))
    return out


def random_moves(scene: Scene, rng: np.random.Generator) -> Move:
    """A uniformly random legal move (any block, any displacement that stays on the grid)."""
    # over the scene's own blocks (NUM_BLOCKS raised IndexError on two, never moved a fourth); the same draws on 3
    block = int(rng.integers(len(scene.colours)))
    options = [d for d in range(-scene.cols[block], GRID - scene.cols[block]) if d != 0]
    return Move(block, int(rng.choice(options)))


# ---------------------------------------------------------------------------------------------
# Batched renderer
# ---------------------------------------------------------------------------------------------


def _scene_tensors(scenes: list[Scene], moves: list[Move | None], device) -> tuple[torch.Tensor, ...]:
    """-> colours (B, K, 3) float, rows (B, K), cols (B, K), mover (B,) (-1 none), dx (B,)."""
    rgb = torch.tensor([[COLOURS[c] for c in s.colours] for s in scenes], dtype=torch.float32, device=device)
    rows = torch.tensor([s.rows for s in scenes], device=device)
    cols = torch.tensor([s.cols for s in scenes], device=device)
    mover = torch.tensor([m.block if m else -1 for m in moves], device=device)
    dx = torch.tensor([m.dx if m else 0 for m in moves], device=device)
    return rgb, rows, cols, mover, dx


def render(
    scenes: list[Scene], moves: list[Move | None], *, device="cpu", frames: int = NUM_FRAMES
) -> torch.Tensor:
    """Videos as uint8 (B, T, H, W, 3). ``moves[i] = None`` renders a still scene (no agent)."""
    if len(scenes) != len(moves):
        raise ValueError(f"render: {len(scenes)} scenes but {len(moves)} moves; expected one move per scene")
    # an illegal move rendered silently: a block slid off the frame, or no block moved at all
    for i, (s, m) in enumerate(zip(scenes, moves)):
        if m is not None and not (0 <= m.block < len(s.colours) and 0 <= s.cols[m.block] + m.dx < GRID):
            raise ValueError(
                f"render: moves[{i}] = {m} is not legal in scene {s}: expected a block index "
                f"0..{len(s.colours) - 1} and an end column 0..{GRID - 1}"
            )
    rgb, rows, cols, mover, dx = _scene_tensors(scenes, moves, device)
    B, K = rows.shape
    k = torch.arange(frames, device=device)
    offset = torch.round(k[None, :] / max(frames - 1, 1) * (dx[:, None] * CELL).float())  # (B, T) pixels
    moving = torch.arange(K, device=device)[None, :] == mover[:, None]  # (B, K)
    x0 = cols[:, None, :] * CELL + 1 + offset[:, :, None] * moving[:, None, :]  # (B, T, K) left edge
    y0 = (rows * CELL + 1)[:, None, :].expand(B, frames, K)
    pix = torch.arange(SIZE, device=device)
    in_x = (pix[None, None, None, :] >= x0[..., None]) & (pix < x0[..., None] + BLOCK)  # (B, T, K, W)
    in_y = (pix[None, None, None, :] >= y0[..., None]) & (pix < y0[..., None] + BLOCK)  # (B, T, K, H)
    mask = (in_y[..., :, None] & in_x[..., None, :]).float()  # (B, T, K, H, W)
    video = torch.einsum("btkhw,bkc->bthwc", mask, rgb)  # blocks never overlap (one per row)
    # The agent's grip: the 2x2 centre of the moving block, in frames 1..T-1.
    gx = x0 + BLOCK // 2 - 1
    gy = y0 + BLOCK // 2 - 1
    g_x = (pix >= gx[..., None]) & (pix < gx[..., None] + 2)
    g_y = (pix >= gy[..., None]) & (pix < gy[..., None] + 2)
    grip = (g_y[..., :, None] & g_x[..., None, :]) & moving[:, None, :, None, None]
    grip = grip & (k > 0)[None, :, None, None, None]
    grip = grip.any(dim=2)[..., None]  # (B, T, H, W, 1)
    agent = torch.tensor(AGENT_RGB, dtype=torch.float32, device=device)
    video = torch.where(grip, agent, video)
    return video.round().clamp(0, 255).to(torch.uint8)


def render_one(scene: Scene, move: Move | None) -> np.ndarray:
    """One video as a numpy uint8 (T, H, W, 3)."""
    return render([scene], [move])[0].numpy()
