"""Where the attention time goes: GPU time per kernel group of one forward+backward, bf16 and FP8.

The H100 run at 3f3fc34 timed the FP8 attention at 1.00x our bf16 kernel in the forward and 0.90x in
forward+backward, against a static model that predicted 1.2-1.5x; its totals could not say whether the
FP8 kernels themselves or the passes around them (the quantising pre-pass, dO's quantisation and
transposed copies, the K mean, the smoothed keys, torch's pads and copies) take the time. This module
runs one forward+backward of each variant under torch.profiler (after a warm-up that autotunes) and sums
the GPU time of its kernels by group:

    prepass   kernels.attention_fp8._quant_blocks_kernel (q, k, v, dO)
    forward   the attention forward kernel (bf16 or FP8)
    dkdv, dq  the backward kernels
    delta     rowsum(dO * O)
    rope      kernels.rope (where RoPE is applied)
    torch     every other kernel (means, pads, transposed copies, casts, fills)

Records ``attention_profile.ms`` per (shape, variant:group), plus ``variant:total``; no ratios (the
attention modules time the totals with their baselines).

    python -m bench.gpu_attention_profile [--quick]     # GPU: prints the records as JSON
"""

from __future__ import annotations

import json
from collections import defaultdict

import torch

from bench.common import error_record, record
from bench.gpu_attention import SHAPES

NAME = "attention_profile.ms"
# first match wins: Triton kernels appear in the profiler under their function names
GROUPS = (
    ("_quant_blocks_kernel", "prepass"),
    ("_fwd", "forward"),
    ("dkdv", "dkdv"),
    ("_dq", "dq"),
    ("delta", "delta"),
    ("rope", "rope"),
)


def kernel_group(kernel_name: str) -> str:
    """The group of a GPU kernel by its name (module doc); anything unnamed there is "torch"."""
    for key, group in GROUPS:
        if key in kernel_name:
            return group
    return "torch"


def group_times(events, iters: int, group=kernel_group) -> dict[str, float]:
    """Milliseconds per call of each group (``group(kernel name)``), from torch.profiler events (only the GPU
    kernels count), and their sum as "total"."""
    from torch.autograd import DeviceType

    out: dict[str, float] = defaultdict(float)
    for e in events:
        if e.device_type == DeviceType.CUDA:
            out[group(e.name)] += e.time_range.elapsed_us() / 1000.0 / iters
    out["total"] = sum(out.values())
    return dict(out)


def _variants() -> dict:
    from kernels.attention import attention
    from kernels.attention_fp8 import fp8_backward_products

    def bf16(q, k, v):
        return attention(q, k, v)

    def fp8(q, k, v):  # dV only in FP8 in the backward
        with fp8_backward_products(dp=False):
            return attention(q, k, v, precision="fp8")

    def fp8_dp(q, k, v):  # the models' default: dV and dP
        return attention(q, k, v, precision="fp8")

    return {"triton_bf16": bf16, "triton_fp8": fp8, "triton_fp8_dp": fp8_dp}


def profile(fn, q, k, v, do, iters: int = 3) -> dict[str, float]:
    def step():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(do)

    step()  # warm-up: compiles and autotunes outside the window
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    return group_times(prof.events(), iters)


def run(quick: bool = False) -> list[dict]:
    if not torch.cuda.is_available():
        return [record(NAME, "-", "-", "error", 0.0, message="needs a CUDA device")]
    recs: list[dict] = []
    cases = ["ltx2-512p-121f"] if quick else list(SHAPES)
    for case in cases:
        B, S, H, D, _grid = SHAPES[case]
        q, k, v, do = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        for variant, fn in _variants().items():
            try:
                times = profile(fn, q, k, v, do)
            except Exception as e:  # a variant that fails becomes a record, not a crash
                recs.append(error_record(NAME, case, variant, e))
                continue
            for group, ms in sorted(times.items()):
                recs.append(record(NAME, case, f"{variant}:{group}", "ms", ms, higher_is_better=False))
        del q, k, v, do
        torch.cuda.empty_cache()
    return recs


if __name__ == "__main__":
    from bench.common import module_args

    args = module_args(__doc__)
    print(json.dumps(run(quick=args.quick), indent=1))
