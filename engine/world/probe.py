"""What a toy Demonstrator knows at each noise level: where its one-step clean-video prediction puts the
moved block.

For a held-out item (scene, move) the true video x0 is rendered; at noise level t the model sees
``x_t = (1 - t) x0 + t eps`` and predicts ``x0_hat = x_t - t v(x_t, t | prompt, first frame)``. Decoded,
the last frame of x0_hat is read in the moved block's row: the column holding most pixels of the block's
colour is the predicted final column. At t = 1 the input is pure noise, so the prompt and the first
frame are all the model has: a solution-conditioned model that has learned the number and direction
words puts the block in the right column; as t falls the noisy input itself reveals the answer.

recipes/pretrain.py records :func:`probe` of every export in its demonstrator.json ("probe"); for any
exported folder::

    from engine.world.demonstrator import eval_items
    from engine.world.probe import probe
    from recipes.pretrain import load_demonstrator
    model, _ = load_demonstrator("engine/world/assets")
    probe(model.predict_velocity, model.text.cond, eval_items(256, 1234), prompt="solution")
"""

from __future__ import annotations

import numpy as np
import torch

from engine.world import latent as toy_latent
from engine.world.oracle import MATCH_DIST
from engine.world.scene import CELL, COLOURS, GRID, render

T_LEVELS = (1.0, 0.95, 0.9, 0.75, 0.5)


def final_columns(frames: torch.Tensor, colours: list[str], rows: list[int]) -> np.ndarray:
    """Last frames uint8 (B, H, W, 3) -> the column (0..GRID-1) with most pixels near each item's colour
    (RGB distance below the oracle's matching radius MATCH_DIST) in its row band; -1 where the band has
    no such pixel (the block is gone: no column predicted)."""
    out = []
    for frame, colour, row in zip(frames, colours, rows):
        near = (frame.float() - torch.tensor(COLOURS[colour]).float()).norm(dim=-1) < MATCH_DIST  # (H, W)
        band = near[row * CELL : (row + 1) * CELL]  # (CELL, W)
        counts = band.reshape(CELL, GRID, CELL).sum((0, 2))  # (GRID,) pixels per column
        out.append(int(counts.argmax()) if int(counts.max()) > 0 else -1)
    return np.asarray(out)


@torch.no_grad()
def probe(v_fn, encode_text, items, *, prompt: str = "solution", t_levels=T_LEVELS, seed: int = 0,
          batch_size: int = 64) -> dict[float, dict[str, float]]:  # fmt: skip
    """t -> {"column": share right, "direction": share right} of the one-step prediction x0_hat.

    ``v_fn(x_t, t, cond)`` is a velocity (``ToyDemonstrator.predict_velocity``), ``encode_text`` the
    text cond (``ToyTextEncoder.cond``); ``items`` are :func:`engine.world.demonstrator.eval_items`."""
    scenes = [it.meta["scene"] for it in items]
    moves = [it.meta["move"] for it in items]
    x0 = toy_latent.encode(render(scenes, moves))  # (N, C, T, h, w)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    colours = [s.colours[m.block] for s, m in zip(scenes, moves)]
    rows = [s.rows[m.block] for s, m in zip(scenes, moves)]
    start = np.asarray([s.cols[m.block] for s, m in zip(scenes, moves)])
    dx = np.asarray([m.dx for m in moves])
    texts = [getattr(it, prompt) for it in items]
    out = {}
    for t in t_levels:
        cols = []
        for s in range(0, len(items), batch_size):
            sl = slice(s, s + batch_size)
            x_t = (1 - t) * x0[sl] + t * noise[sl]
            cond = {**encode_text(texts[sl]), "image_latent": x0[sl, :, :1]}
            x0_hat = x_t - t * v_fn(x_t, torch.full((x_t.shape[0],), float(t)), cond).float()
            cols.append(final_columns(toy_latent.decode(x0_hat)[:, -1], colours[sl], rows[sl]))
        col = np.concatenate(cols)
        # a missing block (-1) predicts neither a column nor a direction
        found = col >= 0
        out[float(t)] = {
            "column": float(np.mean(found & (col == start + dx))),
            "direction": float(np.mean(found & (np.sign(col - start) == np.sign(dx)))),
        }
    return out
