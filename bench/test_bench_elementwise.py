"""CPU microbenchmarks (pytest-benchmark) of the sampler step and adaLN: the torch reference vs the
kernel dispatch on a small shape (the kernels' speed is measured on GPU by bench/gpu_elementwise.py).

pytest bench/test_bench_elementwise.py --benchmark-only
"""

from __future__ import annotations

import torch

from kernels.adaln import adaln_modulate
from kernels.sampler import flow_step

SAMPLER_SHAPE = (2, 4, 3, 16, 16)
ADALN_SHAPE = (2, 256, 64)


def _sampler_inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(SAMPLER_SHAPE, generator=g) for _ in range(4)]


def test_bench_flow_step_sde_torch(benchmark):
    x, vc, vu, nz = _sampler_inputs()
    out, lp = benchmark(
        lambda: flow_step(x, vc, vu, guidance=4.0, t=0.8, t_next=0.7, sigma=0.7, noise=nz, backend="torch")
    )
    assert out.shape == x.shape and lp.shape == (2,) and torch.isfinite(lp).all()


def test_bench_flow_step_ode_torch(benchmark):
    x, vc, vu, _ = _sampler_inputs()
    out, lp = benchmark(lambda: flow_step(x, vc, vu, guidance=4.0, t=0.8, t_next=0.7, backend="torch"))
    assert lp is None
    torch.testing.assert_close(out, x - 0.1 * (vu + 4.0 * (vc - vu)), atol=1e-5, rtol=1e-5)


def test_bench_adaln_fwd_bwd_torch(benchmark):
    x = torch.randn(ADALN_SHAPE, requires_grad=True)
    scale, shift = torch.randn(2, 1, 64, requires_grad=True), torch.randn(2, 1, 64, requires_grad=True)

    def step():
        adaln_modulate(x, scale, shift, backend="torch").square().mean().backward()

    benchmark(step)
    assert x.grad is not None and torch.isfinite(scale.grad).all()
