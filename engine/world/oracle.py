"""The toy world's oracle: reads blocks and the agent from frames; an honest judge and a proposer.

Reading (:func:`read_frame`): each pixel is assigned to the nearest palette colour (background,
the block colours, the agent's white) when within ``MATCH_DIST`` in RGB, else counted as unknown.
A block colour is present when it covers >= ``MIN_BLOCK_PIXELS`` pixels; its position is the
centroid of those pixels. Only frames, the task text and (optionally) the conditioning image are used: the judge never sees
the scene description, the solution or the intended move.

Questions (binary scores; "reward" is their mean):
- task        the last frame has the target block in the reference block's column (centroids within
              ``COLUMN_TOL`` px horizontally) and on the named side of it (under/above).
- agent       in every frame after the first, the agent's grip is on the target block (centroid
              within ``GRIP_TOL`` px); the target moves at most one cell + 2 px per frame (no teleport)
              and moves at least half a cell overall (the agent does something).
- consistency every frame shows the same block colours as frame 0 with pixel counts within
              ``COUNT_RATIO`` of frame 0's; blocks other than the target move <= ``STILL_TOL`` px;
              the target stays on its row (vertical drift <= ``STILL_TOL``); unknown pixels <= 3%;
              and when the request's ``meta["image"]`` holds the conditioning image, frame 0 shows
              that scene (same colours, every block within ``STILL_TOL`` px).
The thresholds are fixed from the renderer's geometry (6 px blocks, 8 px cells), never fitted to
model outputs.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from dataclasses import dataclass

import numpy as np

from engine.judge.base import JudgeRequest, Verdict
from engine.propose import TaskPair
from engine.world.scene import (
    AGENT_RGB,
    BACKGROUND_RGB,
    BLOCK,
    CELL,
    COLOURS,
    GRID,
    SIZE,
    Scene,
    task_pairs,
)

MATCH_DIST = 90.0
MIN_BLOCK_PIXELS = 12
MIN_AGENT_PIXELS = 2
COLUMN_TOL = 2.0
GRIP_TOL = 2.5
STILL_TOL = 1.5
COUNT_RATIO = (0.6, 1.4)
MAX_UNKNOWN = 0.03
_PALETTE_NAMES = ("background", *COLOURS, "agent")
_PALETTE = np.array([BACKGROUND_RGB, *COLOURS.values(), AGENT_RGB], dtype=np.float32)
_TASK = re.compile(r"put the (\w+) block (under|above) the (\w+) block")


@dataclass
class FrameReading:
    """Block colour -> (cx, cy, pixel count); the agent's grip (cx, cy, count) or None; unknown pixels."""

    blocks: dict[str, tuple[float, float, int]]
    agent: tuple[float, float, int] | None
    unknown: int


def read_frame(frame: np.ndarray) -> FrameReading:
    """Segment one HxWx3 uint8 frame by nearest palette colour."""
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame: expected HxWx3, got shape {frame.shape}")
    d = np.linalg.norm(frame.astype(np.float32)[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (H, W, P)
    label = d.argmin(-1)
    label[d.min(-1) > MATCH_DIST] = -1
    ys, xs = np.mgrid[: frame.shape[0], : frame.shape[1]]
    found: dict[str, tuple[float, float, int]] = {}
    for p, name in enumerate(_PALETTE_NAMES[1:], start=1):
        m = label == p
        n = int(m.sum())
        if n:
            found[name] = (float(xs[m].mean()), float(ys[m].mean()), n)
    agent = found.pop("agent", None)
    if agent is not None and agent[2] < MIN_AGENT_PIXELS:
        agent = None
    blocks = {c: v for c, v in found.items() if v[2] >= MIN_BLOCK_PIXELS}
    return FrameReading(blocks, agent, int((label == -1).sum()))


def parse_task(task: str) -> tuple[str, str, str]:
    """``"[Agent]: put the red block under the blue block"`` -> ("red", "under", "blue")."""
    m = _TASK.search(task.lower())
    if not m or m.group(1) not in COLOURS or m.group(3) not in COLOURS or m.group(1) == m.group(3):
        raise ValueError(
            f"task {task!r}: expected '[Agent]: put the <colour> block under|above the <colour> block'"
        )
    return m.group(1), m.group(2), m.group(3)


def judge_task(readings: list[FrameReading], target: str, relation: str, ref: str) -> float:
    """1 when the last frame shows the target in the reference's column, on the named side."""
    last = readings[-1].blocks
    if target not in last or ref not in last:
        return 0.0
    (tx, ty, _), (rx, ry, _) = last[target], last[ref]
    side = ty > ry + CELL / 2 if relation == "under" else ty < ry - CELL / 2
    return float(abs(tx - rx) <= COLUMN_TOL and side)


def judge_agent(readings: list[FrameReading], target: str) -> float:
    """1 when the grip holds the target in every later frame and it slides without teleporting."""
    path = [r.blocks.get(target) for r in readings]
    if any(p is None for p in path):
        return 0.0
    for r, p in zip(readings[1:], path[1:]):
        if r.agent is None or np.hypot(r.agent[0] - p[0], r.agent[1] - p[1]) > GRIP_TOL:
            return 0.0
    steps = [np.hypot(b[0] - a[0], b[1] - a[1]) for a, b in zip(path, path[1:])]
    moved = abs(path[-1][0] - path[0][0])
    return float(max(steps) <= CELL + 2 and moved >= CELL / 2)


def _same_scene(a: FrameReading, b: FrameReading) -> bool:
    """The same block colours at the same places (<= STILL_TOL px)."""
    if set(a.blocks) != set(b.blocks):
        return False
    return all(
        np.hypot(x - b.blocks[c][0], y - b.blocks[c][1]) <= STILL_TOL for c, (x, y, _) in a.blocks.items()
    )


def judge_consistency(
    readings: list[FrameReading], target: str, reference: FrameReading | None = None
) -> float:
    """1 when the scene keeps its blocks, colours, bystander positions and (given) starting image."""
    first = readings[0].blocks
    if reference is not None and not _same_scene(reference, readings[0]):
        return 0.0  # the video does not start from the given scene image
    for r in readings:
        if set(r.blocks) != set(first):
            return 0.0
        if r.unknown > MAX_UNKNOWN * SIZE * SIZE:
            return 0.0
        for c, (x, y, n) in r.blocks.items():
            x0, y0, n0 = first[c]
            lo, hi = COUNT_RATIO
            if not lo * n0 <= n <= hi * n0:
                return 0.0
            drift = abs(y - y0) if c == target else np.hypot(x - x0, y - y0)
            if drift > STILL_TOL:
                return 0.0
    return 1.0


def judge_frames(frames: list[np.ndarray], task: str, image: np.ndarray | None = None) -> dict[str, float]:
    """All three scores and their mean for one video (frames in time order) and its task. With the
    conditioning ``image``, consistency also requires the video to start from that scene."""
    target, relation, ref = parse_task(task)
    # one frame failed deep in judge_agent with "max() arg is an empty sequence"
    if len(frames) < 2:
        raise ValueError(f"video: {len(frames)} frame(s); expected >= 2 (the scene, then the agent's move)")
    readings = [read_frame(f) for f in frames]
    reference = read_frame(image) if image is not None else None
    s = {
        "task": judge_task(readings, target, relation, ref),
        "agent": judge_agent(readings, target),
        "consistency": judge_consistency(readings, target, reference),
    }
    s["reward"] = (s["task"] + s["agent"] + s["consistency"]) / 3.0
    return s


class OracleJudge:
    """The :class:`engine.judge.base.Judge` protocol over :func:`judge_frames` (all frames are read)."""

    async def score(self, requests: list[JudgeRequest]) -> list[Verdict]:
        """One Verdict per request, same order; an unparsable task is a parse_error."""
        out = []
        for req in requests:
            t0 = time.perf_counter()
            try:
                frames = req.frames
                if frames is None:
                    from engine.judge.base import sample_frames

                    frames = sample_frames(req.video, 64)
                image = (req.meta or {}).get("image")
                s = judge_frames(frames, req.task, image)[req.question]
                out.append(Verdict(s, "ok", f"Score: {s}", time.perf_counter() - t0))
            except ValueError as e:  # an unparsable task or unreadable video is a status, not a crash
                out.append(Verdict(None, "parse_error", str(e), time.perf_counter() - t0))
        return out


def read_scene(image: np.ndarray) -> Scene:
    """Parse a still scene image into blocks on the grid (as a VLM would describe it)."""
    # cells are read at CELL pixels: a scene at another size (a 64x64 copy) read as wrong columns and rows
    if image.shape[:2] != (SIZE, SIZE):
        raise ValueError(f"image: shape {image.shape}; expected a {SIZE}x{SIZE} toy-world scene")
    r = read_frame(image)
    if not r.blocks:
        raise ValueError("image: no blocks found (expected a toy-world scene)")
    items = sorted(r.blocks.items(), key=lambda kv: kv[1][1])
    cols = tuple(int(np.clip(round((x - 1 - (BLOCK - 1) / 2) / CELL), 0, GRID - 1)) for _, (x, _, _) in items)
    rows = tuple(int(np.clip(round((y - 1 - (BLOCK - 1) / 2) / CELL), 0, GRID - 1)) for _, (_, y, _) in items)
    return Scene(tuple(c for c, _ in items), rows, cols)


class OracleProposer:
    """The :class:`engine.propose.Proposer` protocol: parses the image, writes valid (task, solution)
    pairs (every ordered block pair in different columns), shuffled by ``seed`` and the scene read from
    the image (so an image gets the same pairs whatever else shares the call); fewer than n when the
    scene has fewer."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    async def propose(self, images: list[np.ndarray], n: int) -> list[list[TaskPair]]:
        """Up to ``n`` (task, solution) pairs per scene image."""
        out = []
        for image in images:
            scene = read_scene(image)
            pairs = [TaskPair(task, sol) for task, sol, _ in task_pairs(scene)]
            # keyed by the scene, not the image's place in the call: resumed or re-batched runs agree
            key = f"{self.seed}/{scene.colours}/{scene.rows}/{scene.cols}".encode()
            random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little")).shuffle(pairs)
            out.append(pairs[:n])
        return out
