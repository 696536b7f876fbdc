"""Loss curves of a small Wan DiT trained with FP8 attention (the pure-torch emulation of the kernel's
scheme, kernels.attention_fp8; default backward, and with all five backward products in FP8) vs the same
model with fp32 attention, on CPU.

Task: rectified-flow velocity regression on a fixed synthetic set of smooth latent videos, x_t = (1-t) x0 +
t n, target n - x0. The noise level of the comparison: the fp32 run repeated with another data-order seed.

    python -m bench.fp8_attention_training [--steps 150]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from engine.config import ModelConfig
from engine.precision import apply_attention_precision
from kernels.attention_fp8 import fp8_backward_products
from models.wan import WanConfig, WanModel


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n smooth latent videos (n, 4, 4, 16, 16) and text contexts (n, 8, 24)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 4, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(x, size=(4, 16, 16), mode="trilinear")  # smooth in (t, h, w)
    return x / x.std(), torch.randn(n, 8, 24, generator=g)


def train(
    precision: str, steps: int, *, order_seed: int = 0, lr: float = 2e-3, all_fp8_bwd: bool = False
) -> list[float]:
    torch.manual_seed(0)  # same init for every run
    cfg = WanConfig.flavour("debug", attention_head_dim=64, num_layers=3, attention_backend="torch")
    model = WanModel(cfg)
    apply_attention_precision(model, ModelConfig(attention_precision=precision, fp8_attention_skip_blocks=[]))
    data, ctx = _data(64)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(order_seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(data), (4,), generator=g)
        x0, c = data[idx], ctx[idx]
        t = torch.rand(4, generator=g)
        n = torch.randn(x0.shape, generator=g)
        xt = (1 - t)[:, None, None, None, None] * x0 + t[:, None, None, None, None] * n
        with fp8_backward_products(dp=True, dqdk=True) if all_fp8_bwd else contextlib.nullcontext():
            loss = (model(xt, t * 1000, c) - (n - x0)).pow(2).mean()  # 256 tokens per sample
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _smooth(xs: list[float], w: int = 10) -> list[float]:
    return [sum(xs[max(0, i - w + 1) : i + 1]) / len(xs[max(0, i - w + 1) : i + 1]) for i in range(len(xs))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    t0 = time.time()
    runs = {
        "fp32 attention": train("bf16", args.steps),  # "bf16" = the model's dtype: fp32 on CPU
        "fp32 attention, other data order": train("bf16", args.steps, order_seed=1),
        "fp8 attention (emulated)": train("fp8", args.steps),
        "fp8 attention, dP and dQ/dK fp8 too": train("fp8", args.steps, all_fp8_bwd=True),
    }
    curves = {k: _smooth(v) for k, v in runs.items()}
    print("| step | " + " | ".join(curves) + " |")
    print("|---" * (len(curves) + 1) + "|")
    for s in list(range(0, args.steps, max(1, args.steps // 10))) + [args.steps - 1]:
        print(f"| {s + 1} | " + " | ".join(f"{c[s]:.4f}" for c in curves.values()) + " |")
    last = {k: sum(v[-20:]) / 20 for k, v in runs.items()}
    print("mean loss of the last 20 steps:", {k: round(v, 4) for k, v in last.items()})
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
