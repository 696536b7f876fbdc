"""One launch of each kernel whose speed goal is missed, for Nsight Compute (what limits it: issue #4/#5).

    ncu --profile-from-start off --nvtx --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section MemoryWorkloadAnalysis --section WarpStateStats \
        python -m bench.ncu_kernels > ncu.txt

(bench/gpu_check.sh runs it after the benchmarks when ncu is on the PATH.) Everything is compiled and run
once before cudaProfilerStart, so ncu sees exactly one launch per kernel and no autotuning: the attention
kernels at the Wan-1.3B 480p shape (S 32,760, H 12, D 128, bf16) with their fixed first tile config
(deterministic=True) with pointer loads and with TMA loads, and the CFG + Euler sampler step on Wan 480p
latents (batch 8) from Triton and from kernels._C, and a copy of one latent tensor. The cases run in that order, each in an NVTX range naming it (ncu --nvtx).
"""

from __future__ import annotations

import sys

import torch


def _cases():
    """name -> fn() launching the kernels of that case."""
    import kernels.attention as attention_module
    from kernels import cuda
    from kernels.attention import attention
    from kernels.sampler import flow_step

    B, S, H, D = 1, 32760, 12, 128
    q, k, v = (
        torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    g = torch.randn_like(q)

    def attn(tma: str):
        def run():
            attention_module.TMA = tma
            out = attention(q, k, v, deterministic=True)
            torch.autograd.grad(out, (q, k, v), g)

        return run

    x, vc, vu = (torch.randn(8, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cases = {
        "attention[tma=off]": attn("off"),
        "attention[tma=on]": attn("on"),
        "euler[triton]": lambda: flow_step(x, vc, vu, guidance=5.0, t=0.8, t_next=0.75, backend="triton"),
        "copy": lambda: x.clone(),
    }
    if cuda.available():
        cases["euler[cuda]"] = lambda: cuda.flow_step(x, vc, vu, guidance=5.0, t=0.8, t_next=0.75)
    return cases


def main() -> int:
    if not torch.cuda.is_available():
        print("bench.ncu_kernels: no CUDA device")
        return 1
    cases = _cases()
    ok = {}
    for name, fn in cases.items():  # compile and warm up outside the profile
        try:
            fn()
            ok[name] = fn
        except Exception as e:  # one failing case must not hide the others
            print(f"{name}: {type(e).__name__}: {e}"[:500])
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, fn in ok.items():
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled:", ", ".join(ok))
    return 0


if __name__ == "__main__":
    sys.exit(main())
