"""Where a training step's time goes: GPU time per kind of kernel, the models benchmark's step against the
trainer's, bf16 and FP8.

On an H200 the trainer's bf16 step (fp32 master weights under bf16 autocast, flow-matching loss, clipping, NaN
guard, fused AdamW) ran 7-9% slower than bench.gpu_models' step of the same model and input (bf16 weights,
plain AdamW), and its FP8 step gained 1.16-1.27x where FP8 attention alone is 1.6x: the totals cannot say
which kernels take the rest. This module runs two steps of each variant under torch.profiler (after warm-up
steps that compile and autotune) and sums the GPU time of their kernels by kind:

    attention   cuDNN / flash / our attention kernels (forward, backward, delta)
    gemm        cuBLAS / CUTLASS matrix products (TE's FP8 GEMMs too)
    optimizer   fused AdamW, multi-tensor (foreach) kernels: clipping's norms and scaling
    fp8_cast    Transformer Engine's casts and transposes to FP8, amax
    inductor    kernels torch.compile generated (triton_poi / triton_red / triton_per)
    ours        our other Triton kernels (adaLN, RoPE, QK-norm; names start with "_")
    copy        copies, casts between float types, concatenations, fills
    reduce      torch reductions (norms, means, amax)
    elementwise the rest of torch's elementwise kernels
    other       anything else

Records ``step_profile.ms`` per (case, variant:kind), plus ``variant:gpu`` (the kernels' sum), ``variant:wall``
(the step's wall time, timed without the profiler) and ``variant:idle`` (wall less gpu: the GPU waiting on the
host). No ratios: bench.gpu_models and bench.gpu_trainer time the totals against their baselines.

    python -m bench.gpu_step_profile [--quick]    # GPU: prints the records as JSON; quick: the first two
"""

from __future__ import annotations

import json
import tempfile
import time

import torch

from bench.common import error_record, module_budget, record

NAME = "step_profile.ms"
CASE = "wan1.3b-4blk-480p81f"
# first match wins (lower-case substrings of the kernel's name)
KINDS = (
    ("attention", ("fmha", "flash", "sdpa", "_attn_", "_fp8_fwd", "_fp8_bwd", "attention")),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "cublas")),
    ("inductor", ("triton_poi", "triton_red", "triton_per", "triton_tem")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("fp8_cast", ("cast_transpose", "quantize", "amax", "fp8")),
    ("copy", ("copy", "catarray", "cat_", "fill")),
    ("reduce", ("reduce",)),
    ("elementwise", ("elementwise",)),
)
# variant: None (bench.gpu_models' bf16 step) or the trainer's (precision.fp8, parallel.compile, FP8
# self-attention backend or None); cheapest first
VARIANTS = {"models_bf16": None, "trainer_bf16": ("none", False, None), "trainer_fp8_te+te_attn": ("te", False, "te"),
            "trainer_bf16+compile": ("none", True, None)}  # fmt: skip


def kernel_kind(name: str) -> str:
    """The kind of a GPU kernel by its name (module doc)."""
    low = name.lower()
    for kind, keys in KINDS:
        if any(key in low for key in keys):
            return kind
    return "ours" if name.startswith("_") else "other"


def _models_step():
    """bench.gpu_models' training step of the Wan case with our model on cuDNN attention (bf16 weights)."""
    from bench.gpu_models import _train_step_fn, cases

    case = cases()[0]
    step = _train_step_fn(case.build_ours("sdpa"), case.inputs(), False)
    return step, None


def _step(spec: tuple[str, bool, str | None] | None):
    """(step(), a folder to clean up or None) of a VARIANTS entry."""
    if spec is None:
        return _models_step()
    from bench.gpu_trainer import build_trainer

    d = tempfile.TemporaryDirectory()
    tr, _, _ = build_trainer(*spec[:2], d.name, spec[2])
    return tr.train_step, d


def profile_step(step, warmup: int = 2, iters: int = 2) -> dict[str, float]:
    """GPU milliseconds per step by kind, "gpu" (their sum), "wall" and "idle" (module doc)."""
    from bench.gpu_attention_profile import group_times

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / iters * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    times = group_times(prof.events(), iters, group=kernel_kind)
    gpu = times.pop("total")
    return {**times, "gpu": gpu, "wall": wall, "idle": wall - gpu}


def run(quick: bool = False) -> list[dict]:
    if not torch.cuda.is_available():
        return [record(NAME, "-", "-", "error", 0.0, message="needs a CUDA device")]
    import importlib.util

    budget, t0 = module_budget(70.0, reserve=20.0), time.perf_counter()
    recs: list[dict] = []
    for variant, spec in list(VARIANTS.items())[: 2 if quick else None]:
        if spec and "te" in (spec[0], spec[2]) and importlib.util.find_spec("transformer_engine") is None:
            recs.append(
                record(NAME, CASE, variant, "error", 0.0, message="skipped: needs Transformer Engine")
            )
            continue
        if time.perf_counter() - t0 > budget * (0.6 if spec and spec[1] else 0.85):
            recs.append(record(NAME, CASE, variant, "error", 0.0, message="skipped: time budget"))
            continue
        tmp = None
        try:
            step, tmp = _step(spec)
            times = profile_step(step)
        except Exception as e:  # a variant that fails becomes a record, not a crash
            recs.append(error_record(NAME, CASE, variant, e))
            times = {}
        finally:
            if tmp is not None:
                tmp.cleanup()
            step = None
            torch.cuda.empty_cache()
            torch._dynamo.reset()
        for kind, ms in sorted(times.items()):
            recs.append(record(NAME, CASE, f"{variant}:{kind}", "ms", ms, higher_is_better=False))
    return recs


if __name__ == "__main__":
    from bench.common import module_args

    args = module_args(__doc__)
    print(json.dumps(run(quick=args.quick), indent=1))
