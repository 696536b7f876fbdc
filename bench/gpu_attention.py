"""Attention TFLOP/s at video DiT shapes, bf16: our Triton kernel (no RoPE; RoPE as one apply_rope pass
before it, the default; RoPE fused into it; with the module setting kernels.attention.TMA at its default,
and as "triton[tma=off]" (pointer loads only)) vs SDPA flash, SDPA cuDNN and flash_attn (when importable).
Forward FLOPs 4 * B * H * S^2 * D; forward+backward counted as 3.5x that. Also apply_rope GB/s, and the
tile configs the autotuner chose (record "attention.configs").

    python -m bench.gpu_attention [--quick]
"""

from __future__ import annotations

import json
import time

import torch

from bench.common import bench_fn, error_record, record

# name -> (B, S, H, D, rope grid (T, H, W) with T*H*W = S)
SHAPES = {
    "ltx2-512p-121f": (1, 6144, 32, 128, (16, 16, 24)),
    "wan1.3b-480p-81f": (1, 32760, 12, 128, (21, 30, 52)),
    "hy1.5-480p-121f": (1, 49290, 16, 128, (31, 30, 53)),
}


def _providers(rope, quick: bool, tma: str):
    """name -> (fn(q, k, v) -> out, baseline name); flash_attn only when importable. tma: the module's TMA
    setting, which every Triton provider runs with but triton[tma=off]."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import kernels.attention as attention_module
    from kernels.attention import attention

    def modes(fn, tma_mode=tma):  # for the call and the backward that follows it
        def run(q, k, v):
            attention_module.TMA = tma_mode
            return fn(q, k, v)

        return run

    def sdpa(backend, use_rope):
        def fn(q, k, v):
            with sdpa_kernel(backend):
                return attention(q, k, v, rope=rope if use_rope else None, backend="sdpa")

        return fn

    provs = {
        "sdpa_flash": (sdpa(SDPBackend.FLASH_ATTENTION, False), None),
        "sdpa_cudnn": (sdpa(SDPBackend.CUDNN_ATTENTION, False), "sdpa_flash"),
        "triton": (modes(lambda q, k, v: attention(q, k, v)), "sdpa_flash"),
        "triton[tma=off]": (modes(lambda q, k, v: attention(q, k, v), tma_mode="off"), "sdpa_flash"),
        "sdpa_flash+rope": (sdpa(SDPBackend.FLASH_ATTENTION, True), None),
        "triton+rope": (
            modes(lambda q, k, v: attention(q, k, v, rope=rope, fuse_rope=False)),
            "sdpa_flash+rope",
        ),
        "triton+rope_fused": (
            modes(lambda q, k, v: attention(q, k, v, rope=rope, fuse_rope=True)),
            "sdpa_flash+rope",
        ),
    }
    if quick:  # the opt-in fused-RoPE kernels cost their own compiles
        del provs["triton+rope_fused"]
    try:
        import flash_attn  # noqa: F401

        provs["flash_attn"] = (lambda q, k, v: attention(q, k, v, backend="flash_attn"), "sdpa_flash")
    except ImportError:
        pass
    return provs


def bench_providers(name: str, case: str, shape, providers, modes=("fwd", "fwd_bwd")) -> list[dict]:
    """TFLOP/s records ``{name}.{mode}`` of every provider of ``providers(rope)`` (name -> (fn(q, k, v),
    baseline name)) on bf16 q, k, v of ``shape``; a failing provider is an error record."""
    from kernels.rope import rope_3d_tables

    B, S, H, D, grid = shape
    fwd_flops = 4.0 * B * H * S * S * D
    q, k, v = (
        torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    g = torch.randn_like(q)
    rope = rope_3d_tables(grid, D, device="cuda")
    recs = []
    for prov, (fn, base) in providers(rope).items():
        for mode in modes:
            rec_name = f"{name}.{mode}"
            try:
                if mode == "fwd":
                    with torch.no_grad():
                        sec = bench_fn(lambda fn=fn: fn(q, k, v))
                    flops = fwd_flops
                else:
                    sec = bench_fn(lambda fn=fn: torch.autograd.grad(fn(q, k, v), (q, k, v), g))
                    flops = 3.5 * fwd_flops
                recs.append(
                    record(rec_name, case, prov, "tflops", flops / sec / 1e12, baseline=base, ms=sec * 1e3)
                )
            except Exception as e:  # a failing provider is a record, never a crash
                recs.append(error_record(rec_name, case, prov, e))
            torch.cuda.empty_cache()
    return recs


def _bench_rope(case: str, shape) -> list[dict]:
    """apply_rope GB/s (x read + y written) on q of the shape: Triton kernel vs the eager torch reference."""
    from kernels.rope import apply_rope, apply_rope_reference, rope_3d_tables

    B, S, H, D, grid = shape
    x = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)
    cos, sin = rope_3d_tables(grid, D, device="cuda")
    recs = []
    for prov, fn in (("triton", apply_rope), ("torch_eager", apply_rope_reference)):
        try:
            sec = bench_fn(lambda fn=fn: fn(x, cos, sin))
            gbps = 2 * x.numel() * x.element_size() / sec / 1e9
            recs.append(record("rope.apply", case, prov, "gbps", gbps, baseline="torch_eager", ms=sec * 1e3))
        except Exception as e:
            recs.append(error_record("rope.apply", case, prov, e))
    return recs


def run(quick: bool = False) -> list[dict]:
    """Records for every (shape, provider, fwd | fwd_bwd); quick: the LTX-2 shape, no fused-RoPE provider."""
    if not torch.cuda.is_available():
        return [record("attention.module", "-", "-", "error", 0.0, message="no CUDA device")]
    import kernels.attention as attention_module

    tma = attention_module.TMA
    recs = []
    cases = ["ltx2-512p-121f"] if quick else list(SHAPES)
    t0 = time.time()
    for case in cases:
        try:
            recs += _bench_rope(case, SHAPES[case])
            recs += bench_providers(
                "attention", case, SHAPES[case], lambda rope: _providers(rope, quick, tma)
            )
        except Exception as e:
            recs.append(error_record("attention.case", case, "-", e))
        finally:
            attention_module.TMA = tma
        torch.cuda.empty_cache()
    configs = attention_module.tuned_configs()
    recs.append(record("attention.configs", "-", "triton", "count", float(len(configs)), configs=configs))
    recs.append(record("attention.module", "-", "-", "wall_s", time.time() - t0, higher_is_better=False))
    return recs


if __name__ == "__main__":
    from bench.common import add_ratios, module_args

    args = module_args(__doc__)

    print(json.dumps(add_ratios(run(quick=args.quick)), indent=1))
