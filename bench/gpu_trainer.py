"""Trainer step throughput on a Wan-1.3B block stack: bf16 vs FP8 (TE, torchao; FP8 attention through TE),
eager vs compile.

The engine's own training step (Trainer.train_step: autocast/FP8 forward, backward, grad clipping,
NaN guard, fused AdamW on fp32 master weights) on WanModel "1.3B" with 4 of its 30 blocks, one
480p x 81f video (latent 16 x 21 x 60 x 104 -> 32,760 tokens, not a multiple of 16) and 512 text
tokens. Records tokens/s (ratio vs bf16 eager) and MFU = 3 x forward FLOPs / time / 989 TFLOP/s
(the bf16 dense peak, for every case, so the FP8 rows compare on one scale).

    python -m bench.gpu_trainer [--quick]     # quick: bf16 eager only
    GPU_TRAINER_CASES=bf16+compile,fp8_te+compile python -m bench.gpu_trainer   # bf16 eager + these
    GPU_TRAINER_CASES=te_attn,fp8_te+te_attn python -m bench.gpu_trainer      # with FP8 attention through TE

Cases run in order until a time budget is spent; a case that fails or does not fit the budget
becomes an "error" record with the reason. ``GPU_TRAINER_CASES`` (comma-separated provider names) picks
the cases after the bf16 eager baseline, which always runs.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from typing import Any

import torch

from bench.common import add_ratios, module_budget, record

NAME, CASE = "trainer.step", "wan1.3b-4blk-480p81f"
LATENT, TEXT_LEN, LAYERS, FLAVOUR, DEVICE = (16, 21, 60, 104), 512, 4, "1.3B", "cuda"
PEAK_BF16 = 989e12
# (provider, precision.fp8, parallel.compile, FP8 self-attention: model.fp8_attention_backend or None), most
# wanted first: Transformer Engine's linears, then with cuDNN's FP8 attention through TE (te_attn: issue 8's
# FP8 step goal needs the attention, ~70% of the step; H200: 1.14-1.27x bf16 eager), then torchao, compiled
# before eager (Float8Linear in eager mode: 0.70x bf16 on an H200, 0.66x on an H100), and torchao's linears
# with TE's FP8 attention (untimed: inductor may fuse torchao's casts into the code around them, where TE's
# linears cast in kernels of their own). Without TE its cases fail at once.
CASES = [("bf16", "none", False, None), ("bf16+compile", "none", True, None), ("fp8_te+compile", "te", True, None),
         ("fp8_te", "te", False, None), ("te_attn", "none", False, "te"), ("fp8_te+te_attn", "te", False, "te"),
         ("fp8_te+te_attn+compile", "te", True, "te"), ("fp8_torchao+compile", "torchao", True, None),
         ("fp8_torchao+te_attn+compile", "torchao", True, "te"), ("fp8_torchao", "torchao", False, None)]  # fmt: skip


def selected_cases(quick: bool, only: str = "") -> list[tuple[str, str, bool, str | None]]:
    """The bf16 eager baseline, then every case (quick: none) or the providers named in ``only``."""
    if quick:
        return CASES[:1]
    if not only:
        return CASES
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = sorted(set(names) - {c[0] for c in CASES})
    if unknown:
        raise ValueError(f"GPU_TRAINER_CASES: unknown {unknown}; expected names from {[c[0] for c in CASES]}")
    return CASES[:1] + [c for c in CASES[1:] if c[0] in names]


def _job(fp8: str, compile_: bool, run_dir: str, attn_fp8: str | None = None):
    from engine.config import JobConfig

    cfg = JobConfig()
    if attn_fp8 is not None:  # the model's attention stays sdpa (cuDNN) outside the FP8 self-attention
        cfg.model.attention_precision, cfg.model.fp8_attention_backend = "fp8", attn_fp8
    cfg.run.device = DEVICE
    cfg.run.out_dir = run_dir
    cfg.checkpoint.enabled = cfg.checkpoint.export_safetensors = False
    cfg.train.steps, cfg.train.log_every, cfg.train.lr = 1000, 1000, 1e-5
    cfg.precision.param_dtype, cfg.precision.fp8 = "bfloat16", fp8
    cfg.parallel.compile = compile_
    return cfg


class _Batches:
    """One fixed random latent video + text (the benchmark measures compute, not data)."""

    def __init__(self, text_dim: int):
        g = torch.Generator(DEVICE).manual_seed(0)
        self.mb = {"x0": torch.randn(1, *LATENT, device=DEVICE, generator=g),
                   "text": torch.randn(1, TEXT_LEN, text_dim, device=DEVICE, generator=g)}  # fmt: skip

    def next(self, step: int, model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
        return [self.mb]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        pass


def build_trainer(fp8: str, compile_: bool, run_dir: str, attn_fp8: str | None = None):
    """(Trainer, tokens per step, forward FLOPs per step) of a case on WanModel "1.3B" with LAYERS blocks, the
    fixed input of :class:`_Batches` and the flow-matching loss (bench.gpu_step_profile profiles it too)."""
    from engine.flow import flow_matching_loss
    from engine.trainer import Trainer
    from models import build_model

    torch.manual_seed(0)
    model = build_model("wan", FLAVOUR, num_layers=LAYERS, attention_backend="sdpa")
    F, H, W = LATENT[1:]
    tokens = F * (H // 2) * (W // 2)
    fwd_flops = model.flops_per_token(tokens, TEXT_LEN) * tokens

    def loss_fn(m, mb):
        loss, logs = flow_matching_loss(m.predict_velocity, mb["x0"], {"text": mb["text"]})
        return loss, {"num_tokens": tokens}

    job = _job(fp8, compile_, run_dir, attn_fp8)
    return Trainer(job, model, loss_fn, _Batches(model.cfg.text_dim), run_dir=run_dir), tokens, fwd_flops


def _measure(
    fp8: str, compile_: bool, warmup: int, iters: int, attn_fp8: str | None = None
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        tr, tokens, fwd_flops = build_trainer(fp8, compile_, d, attn_fp8)
        for _ in range(warmup):
            tr.train_step()
        _sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            tr.train_step()
        _sync()
        dt = (time.perf_counter() - t0) / iters
        skipped = tr.skipped_steps
        del tr
    return {"step_s": dt, "tokens_per_s": tokens / dt, "mfu": 3 * fwd_flops / dt / PEAK_BF16,
            "tflops": 3 * fwd_flops / dt / 1e12, "skipped": skipped, "tokens": tokens}  # fmt: skip


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _cleanup() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    torch.cuda.reset_peak_memory_stats()


def run(quick: bool = False) -> list[dict]:
    """Records for each case (tokens/s, mfu, peak memory), or an error record per failed case."""
    # before the CUDA check: a misspelt case fails a CPU rehearsal, not only the GPU run
    cases = selected_cases(quick, os.environ.get("GPU_TRAINER_CASES", ""))
    if not torch.cuda.is_available():
        return [record(NAME, CASE, "-", "error", 0.0, message="needs a CUDA device")]
    # gpu_check gives a module 90 s by default; a raised GPU_MODULE_TIMEOUT raises the budget with it
    budget, t_start = (18.0 if quick else module_budget(70.0, reserve=20.0)), time.perf_counter()
    recs: list[dict] = []
    for provider, fp8, compile_, attn_fp8 in cases:
        elapsed = time.perf_counter() - t_start
        if elapsed > budget * (0.65 if compile_ else 0.85):
            recs.append(
                record(
                    NAME, CASE, provider, "error", 0.0, message=f"skipped: time budget ({elapsed:.0f} s used)"
                )
            )
            continue
        try:
            m = _measure(fp8, compile_, warmup=3 if compile_ else 2, iters=3, attn_fp8=attn_fp8)
        except Exception as e:  # a backend that is missing or fails becomes a record, not a crash
            recs.append(record(NAME, CASE, provider, "error", 0.0, message=f"{type(e).__name__}: {e}"[:1500]))
            _cleanup()
            continue
        mem = torch.cuda.max_memory_allocated() / 2**30
        extra = dict(
            step_s=m["step_s"], tflops=m["tflops"], tokens=m["tokens"], skipped=m["skipped"], peak_mem_gb=mem
        )
        recs.append(record(NAME, CASE, provider, "tokens_per_s", m["tokens_per_s"], baseline="bf16", **extra))
        recs.append(record(NAME, CASE, provider, "mfu", m["mfu"], baseline="bf16"))
        _cleanup()
    return add_ratios(recs)


if __name__ == "__main__":
    from bench.common import module_args

    args = module_args(__doc__)
    print(json.dumps(run(quick=args.quick), indent=1))
