"""The toy Demonstrator as one module, its evaluation pipeline, and the held-out benchmark items.

:class:`ToyDemonstrator` holds any DiT with ``predict_velocity(x_t, t, cond)`` (recipes build a
``models.wan.WanModel``) and the toy text encoder, trained jointly (one optimizer, one EMA, one
checkpoint). :func:`toy_pipeline` wraps it into an :class:`engine.evaluation.VideoPipeline` over the
toy latent map. :func:`eval_items` draws held-out scenes and one (task, solution) pair each.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from engine.evaluation import EvalItem, VideoPipeline
from engine.world import latent as toy_latent
from engine.world.scene import GRID, NUM_FRAMES, SEED_TAG_EVAL, SIZE, random_scene, render_one, task_pairs
from engine.world.text import ToyTextEncoder


class ToyDemonstrator(nn.Module):
    """``dit`` (a DiT with ``predict_velocity``) + ``text`` (:class:`ToyTextEncoder`)."""

    def __init__(self, dit: nn.Module, text: ToyTextEncoder):
        super().__init__()
        self.dit, self.text = dit, text

    def predict_velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """v(x_t, t | cond) with cond already encoded ({"text", "text_lengths", "image_latent"})."""
        return self.dit.predict_velocity(x_t, t, cond)

    def cond(self, texts: list[str], image_latent: torch.Tensor) -> dict:
        """Texts + first-frame latents (B, 12, 1, 16, 16) -> the cond dict of :func:`engine.flow.sample`."""
        return {**self.text.cond(texts), "image_latent": image_latent}


def toy_pipeline(model: ToyDemonstrator, device: torch.device | str | None = None) -> VideoPipeline:
    """The evaluation pipeline of a toy model: text encoder, exact latent map, toy latent shape."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    h = SIZE // toy_latent.FACTOR
    return VideoPipeline(
        v_fn=model.predict_velocity,
        encode_text=model.text.cond,
        encode_image=lambda images: {"image_latent": toy_latent.image_latent(images)},
        decode=toy_latent.decode,
        latent_shape=(toy_latent.LATENT_CHANNELS, NUM_FRAMES, h, h),
        device=device,
    )


def eval_items(n: int, seed: int) -> list[EvalItem]:
    """``n`` held-out items: a fresh scene from ``default_rng([SEED_TAG_EVAL, seed, i])`` (disjoint from
    pretraining's and proposing's streams, which start with their own tags) and one of its task pairs,
    uniformly."""
    items = []
    i = 0
    while len(items) < n:
        rng = np.random.default_rng([SEED_TAG_EVAL, seed, i])
        i += 1
        scene = random_scene(rng)
        pairs = task_pairs(scene)
        if not pairs:
            continue
        task, solution, move = pairs[int(rng.integers(len(pairs)))]
        image = render_one(scene, None)[0]
        items.append(EvalItem(image, task, solution, {"scene": scene, "move": move, "grid": GRID}))
    return items
