"""CPU microbenchmark (pytest-benchmark): attention forward, tiny shape, Triton kernel (interpreted on CPU)
vs the torch reference and SDPA. Interpreter timings say nothing about GPU speed; this guards the call path
and catches gross slow-downs of the host code.

    pytest bench/test_bench_attention.py --benchmark-only
"""

from __future__ import annotations

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
