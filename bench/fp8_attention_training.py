"""Loss curves of a small Wan DiT trained with FP8 attention (kernels.attention_fp8; default backward, and
with all five backward products in FP8) vs the same model with attention in the model's dtype.

- CPU (``main``): fp32 model, FP8 by the pure-torch emulation of the kernel's scheme (attention backend
  "torch"), 256 tokens per sample, head dim 64.
- GPU (``run``, the gpu_check module ``fp8_training``): bf16 model, our Triton kernels (bf16 and FP8),
  head dim 128, 2,048 tokens per sample: the FP8 kernel itself in a training run, issue 13's check.

Task: rectified-flow velocity regression on a fixed synthetic set of smooth latent videos, x_t = (1-t) x0 +
t n, target n - x0. The noise level of the comparison: the first run repeated with another data-order seed.

    python -m bench.fp8_attention_training [--steps 150]   # CPU table
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

# the two settings: (Wan "debug" overrides, the attention backend among them; latent (C, T, H, W); model dtype)
CPU_SETUP = (
    dict(attention_head_dim=64, num_layers=3, attention_backend="torch"),
    (4, 4, 16, 16),
    torch.float32,
)
GPU_SETUP = (
    dict(attention_head_dim=128, num_attention_heads=4, num_layers=4, ffn_dim=1024, text_dim=64,
         in_channels=16, out_channels=16, attention_backend="triton"),
    (16, 8, 32, 32),  # 8 x 16 x 16 = 2,048 tokens per sample after the (1, 2, 2) patches
    torch.bfloat16,
)  # fmt: skip


def _data(n: int, shape: tuple[int, ...], text_dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n smooth latent videos (n, C, T, H, W) (noise upsampled 2x in h, w) and text contexts (n, 8, text_dim)."""
    g = torch.Generator().manual_seed(seed)
    C, T, H, W = shape
    x = torch.randn(n, C, T, H // 2, W // 2, generator=g)
    x = torch.nn.functional.interpolate(x, size=(T, H, W), mode="trilinear")  # smooth in (t, h, w)
    return x / x.std(), torch.randn(n, 8, text_dim, generator=g)


def train(
    precision: str,
    steps: int,
    *,
    order_seed: int = 0,
    lr: float = 2e-3,
    all_fp8_bwd: bool = False,
    setup: tuple = CPU_SETUP,
    device: str = "cpu",
) -> list[float]:
    """Per-step losses of one run; precision "bf16" (attention in the model's dtype) or "fp8"."""
    overrides, shape, dtype = setup
    torch.manual_seed(0)  # same init for every run
    cfg = WanConfig.flavour("debug", **overrides)
    model = WanModel(cfg).to(device=device, dtype=dtype)
    apply_attention_precision(model, ModelConfig(attention_precision=precision, fp8_attention_skip_blocks=[]))
    data, ctx = (t.to(device=device, dtype=dtype) for t in _data(64, shape, cfg.text_dim))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(order_seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(data), (4,), generator=g)
        x0, c = data[idx.to(device)], ctx[idx.to(device)]
        t = torch.rand(4, generator=g).to(device=device, dtype=dtype)
        n = torch.randn(x0.shape, generator=g).to(device=device, dtype=dtype)
        xt = (1 - t)[:, None, None, None, None] * x0 + t[:, None, None, None, None] * n
        with fp8_backward_products(dp=True, dqdk=True) if all_fp8_bwd else contextlib.nullcontext():
            loss = (model(xt, t * 1000, c) - (n - x0)).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _smooth(xs: list[float], w: int = 10) -> list[float]:
    return [sum(xs[max(0, i - w + 1) : i + 1]) / len(xs[max(0, i - w + 1) : i + 1]) for i in range(len(xs))]


def run(quick: bool = False) -> list[dict]:
    """gpu_check module ``fp8_training``: the GPU setting's runs (bf16 kernel, the same with another data
    order, FP8 kernel, FP8 with all five backward products in FP8), one record each: the mean loss of the
    last 20 steps (ratio vs bf16), with the smoothed curve at ten points in ``extra``."""
    from bench.common import error_record, record

    if not torch.cuda.is_available():
        return [record("fp8_training.module", "-", "-", "error", 0.0, message="no CUDA device")]
    steps = 60 if quick else 200
    case = "wan-debug-d128-2048tok"
    runs = {
        "bf16": dict(precision="bf16"),
        "bf16_other_order": dict(precision="bf16", order_seed=1),
        "fp8": dict(precision="fp8"),
        "fp8_all": dict(precision="fp8", all_fp8_bwd=True),
    }
    recs = []
    for name, kw in runs.items():
        t0 = time.time()
        try:
            losses = train(steps=steps, setup=GPU_SETUP, device="cuda", **kw)
        except Exception as e:  # a failing run is a record, never a crash
            recs.append(error_record("fp8_training.loss", case, name, e))
            continue
        curve = _smooth(losses)
        points = sorted({*range(0, steps, max(1, steps // 10)), steps - 1})
        recs.append(
            record(
                "fp8_training.loss", case, name, "loss_last20", sum(losses[-20:]) / 20,
                baseline=None if name == "bf16" else "bf16", higher_is_better=False, steps=steps,
                seconds=time.time() - t0, curve={p + 1: round(curve[p], 4) for p in points},
            )
        )  # fmt: skip
    return recs


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
