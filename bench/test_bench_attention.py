"""CPU microbenchmark (pytest-benchmark): attention forward, tiny shape, Triton kernel (interpreted on CPU)
vs the torch reference and SDPA. Interpreter timings say nothing about GPU speed; this guards the call path
and catches gross slow-downs of the host code.

    pytest bench/test_bench_attention.py --benchmark-only
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels import triton (no CUDA here)

import pytest
import torch

from kernels.attention import attention
from kernels.rope import rope_3d_tables

B, S, H, D = 1, 96, 2, 32


@pytest.fixture(scope="module")
def qkv():
    torch.manual_seed(0)
    return [torch.randn(B, S, H, D) for _ in range(3)], rope_3d_tables((2, 6, 8), D)


@pytest.mark.benchmark(group="attention-fwd-cpu")
@pytest.mark.parametrize("backend", ["torch", "sdpa", "triton"])
@pytest.mark.parametrize("use_rope", [False, True])
def test_attention_fwd(benchmark, qkv, backend, use_rope):
    (q, k, v), rope = qkv
    if (
        backend == "triton"
        and torch.cuda.is_available() is False
        and os.environ.get("TRITON_INTERPRET") != "1"
    ):
        pytest.skip("triton needs CUDA or TRITON_INTERPRET=1")
    out = benchmark(attention, q, k, v, rope=rope if use_rope else None, backend=backend)
    ref = attention(q, k, v, rope=rope if use_rope else None, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["tokens_per_s"] = B * S / benchmark.stats.stats.median


def test_gpu_attention_fp8_providers_run_on_cpu():
    """bench/gpu_attention_fp8.py's providers (the FP8 kernel with each backward option) on a tiny fp32
    shape in the interpreter: forward and gradients finite and within the FP8 scheme's error of the
    reference (cuDNN needs CUDA and is left out)."""
    from bench.gpu_attention_fp8 import _bwd_providers, _providers

    torch.manual_seed(0)
    q, k, v, g = (torch.randn(1, 96, 2, 64) for _ in range(4))
    rope = rope_3d_tables((2, 6, 8), 64)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    ref = attention(*leaves, backend="torch")
    ref_grads = torch.autograd.grad(ref, leaves, g)
    provs = {**_providers(rope), **_bwd_providers(rope)}
    assert {"triton_fp8_dqdk", "triton_fp8_all"} <= set(provs)
    for name, (fn, _) in provs.items():
        if name == "sdpa_cudnn" or name.endswith("+rope"):
            continue
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, g)
        for a, b in zip((out, *grads), (ref, *ref_grads)):
            assert torch.isfinite(a).all() and ((a - b).norm() / b.norm()).item() < 0.15, name


def test_fp8_training_comparison_runs_on_cpu():
    """bench/fp8_attention_training.py's train() with the Triton kernels (interpreted, fp32, one block): the
    bf16-precision and FP8 runs start from the same weights and data, so their first losses differ only by
    the FP8 scheme's error; both train (finite losses). run() without CUDA is one error record."""
    from bench.fp8_attention_training import run, train

    setup = (
        dict(attention_head_dim=64, num_layers=1, attention_backend="triton"),
        (4, 2, 8, 8),
        torch.float32,
    )
    ref = train("bf16", 3, setup=setup)
    fp8 = train("fp8", 3, setup=setup)
    assert all(map(math.isfinite, ref + fp8)), (ref, fp8)
    assert abs(fp8[0] - ref[0]) < 0.05 * ref[0], (fp8[0], ref[0])
    if not torch.cuda.is_available():
        (rec,) = run(quick=True)
        assert rec["metric"] == "error" and "no CUDA" in rec["extra"]["message"]
