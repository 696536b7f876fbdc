"""torch.compile over our kernels: the Triton kernels are torch custom ops (wmsd::*), so a compiled block
is one graph (fullgraph=True: a graph break is an error) and trains like the eager one.

On the CPU the kernels run under Triton's interpreter inside the ops (dynamo only sees the ops' fake
implementations); AOTAutograd's graphs run without Inductor's codegen (backend "aot_eager"), as in
tests/test_meta_init.py, so this checks the capture, not generated code.
"""

from __future__ import annotations

import copy

import pytest
import torch

from engine.parallel import apply_compile
from kernels.adaln import adaln_modulate, gated_residual
from kernels.attention import attention
from kernels.rope import apply_rope, rope_3d_tables
from models.hunyuan15 import HunyuanVideo15Config, HunyuanVideo15Model
from models.wan import WanConfig, WanModel
from tests.test_hunyuan15 import inputs as hy_inputs


def _explain(fn, *args):
    return torch._dynamo.explain(fn)(*args)


def test_kernels_trace_as_single_ops():
    """attention (RoPE, key lengths), apply_rope, adaLN and the gated residual: one graph, no break, and
    the graph calls the custom ops."""
    q = torch.randn(2, 40, 2, 32, requires_grad=True)
    rope = rope_3d_tables((2, 4, 5), 32)
    kl = torch.tensor([40, 17])
    x = torch.randn(2, 16, 32, requires_grad=True)
    s = torch.randn(2, 1, 32, requires_grad=True)

    def fn(q, x, s):
        a = attention(q, q, q, rope=rope, k_lengths=kl) + apply_rope(q, *rope)
        y = adaln_modulate(x, s, s, backend="triton")
        return a.sum() + gated_residual(x, y, s, backend="triton").sum()

    e = _explain(fn, q, x, s)
    assert (e.graph_count, e.graph_break_count) == (1, 0), [str(b.reason) for b in e.break_reasons]
    code = "\n".join(g.code for g in e.graphs)
    for op in ("attention_fwd", "rope", "adaln_fwd", "gated_fwd"):
        assert f"wmsd.{op}" in code, op


def test_compiled_kernels_match_eager():
    """Outputs and gradients of the compiled function equal the eager ones (same kernels underneath)."""
    q, k, v = (torch.randn(2, 33, 2, 32, requires_grad=True) for _ in range(3))
    kl = torch.tensor([33, 9])

    def fn(q, k, v):
        return attention(q, k, v, k_lengths=kl)

    g = torch.randn(2, 33, 2, 32)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = (compiled(q, k, v), *torch.autograd.grad(compiled(q, k, v), (q, k, v), g))
    want = (fn(q, k, v), *torch.autograd.grad(fn(q, k, v), (q, k, v), g))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _train_step(model, args, kwargs):
    out = model(*args, **kwargs)
    loss = out.float().pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["wan", "hunyuan15"])
def test_compiled_blocks_are_one_graph_and_train_like_eager(family):
    """engine.parallel.apply_compile with fullgraph=True on a debug-size model whose attention and norms
    run our Triton kernels: compiles (any graph break would raise), same loss and gradients as eager."""
    torch.manual_seed(0)
    if family == "wan":
        cfg = WanConfig.flavour("debug", attention_backend="triton", norm_backend="triton")
        eager = WanModel(cfg)
        args, kwargs = (torch.randn(2, 4, 3, 6, 10), torch.tensor([3.0, 870.0]), torch.randn(2, 7, 24)), {}
    else:
        cfg = HunyuanVideo15Config.flavour("debug", attention_backend="triton", norm_backend="triton")
        eager = HunyuanVideo15Model(cfg)
        args, kwargs = hy_inputs(latent=(2, 2, 4))
    with torch.no_grad():
        for p in eager.parameters():  # some weights are zero-initialised: make every path matter
            p.normal_(0, 0.2)
    compiled = apply_compile(copy.deepcopy(eager), fullgraph=True, backend="aot_eager")
    loss_e, grads_e = _train_step(eager, args, kwargs)
    loss_c, grads_c = _train_step(compiled, args, kwargs)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    # a parameter whose output is unused (the last HY block's context stream) gets no gradient in eager
    # and a zero one from the compiled graph
    assert grads_e.keys() <= grads_c.keys()
    for name in grads_c:
        want = grads_e.get(name, torch.zeros_like(grads_c[name]))
        torch.testing.assert_close(grads_c[name], want, rtol=1e-4, atol=1e-6, msg=name)


def test_fp8_attention_compiles_as_one_graph():
    """precision="fp8" (pre-pass + FP8 kernels, fp16 carriers under the interpreter): one graph, and the
    compiled outputs and gradients equal the eager ones."""
    q, k, v = (torch.randn(1, 96, 2, 64, dtype=torch.float16, requires_grad=True) for _ in range(3))
    kl = torch.tensor([70])

    def fn(q, k, v):
        return attention(q, k, v, k_lengths=kl, precision="fp8")

    e = _explain(fn, q, k, v)
    assert (e.graph_count, e.graph_break_count) == (1, 0), [str(b.reason) for b in e.break_reasons]
    assert "wmsd.attention_fp8_fwd" in "\n".join(g.code for g in e.graphs)
    g = torch.randn(1, 96, 2, 64, dtype=torch.float16)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = (compiled(q, k, v), *torch.autograd.grad(compiled(q, k, v), (q, k, v), g))
    want = (fn(q, k, v), *torch.autograd.grad(fn(q, k, v), (q, k, v), g))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend,op", [("triton", "wmsd.attention_"), ("sdpa", "_scaled_dot_product_")])
@pytest.mark.parametrize("mode,recomputed", [("selective", False), ("full", True)])
def test_selective_ac_keeps_our_attention(mode, recomputed, backend, op):
    """Selective activation checkpointing saves the output of our attention op and of SDPA (on CPU its
    _scaled_dot_product_flash_attention_for_cpu, which selective AC used to recompute): the backward of a
    checkpointed Wan block runs the attention forward again only under full AC."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from engine.parallel import apply_ac

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = WanModel(WanConfig.flavour("debug", attention_backend=backend, norm_backend="triton"))
    apply_ac(model, mode)
    out = model(torch.randn(1, 4, 2, 4, 6), torch.tensor([500.0]), torch.randn(1, 7, 24))
    with Ops() as ops:
        out.float().pow(2).mean().backward()
    forwards = [n for n in ops.names if op in n and "backward" not in n and "bwd" not in n]
    assert bool(forwards) == recomputed, forwards
    assert any(op in n and ("backward" in n or "bwd" in n) for n in ops.names)


def _opcheck_cases():
    """(op, args) pairs covering each custom op's input kinds (None tables/lengths, per-token modulation)."""
    import kernels.adaln  # noqa: F401  (registers the ops)
    import kernels.attention_fp8  # noqa: F401

    ops = torch.ops.wmsd
    q, k, v = (torch.randn(2, 40, 2, 32, requires_grad=True) for _ in range(3))
    cos, sin = rope_3d_tables((2, 4, 5), 32)
    kl = torch.tensor([40, 17], dtype=torch.int32)
    x = torch.randn(2, 16, 32, requires_grad=True)
    per_sample = torch.randn(2, 1, 32, requires_grad=True)
    per_token = torch.randn(2, 16, 32, requires_grad=True)
    h = torch.randn(1, 128, 2, 64, dtype=torch.float16, requires_grad=True)
    return [
        (ops.attention_fwd, (q, k, v, None, None, None, 0.2, False)),
        (ops.attention_fwd, (q, k, v, cos, sin, kl, 0.2, True)),
        (ops.rope, (q, cos, sin, 1.0)),
        (ops.adaln_fwd, (x, per_sample, per_sample.detach().clone().requires_grad_(), False, 1e-6)),
        (ops.adaln_fwd, (x, per_token, per_token.detach().clone().requires_grad_(), True, 1e-6)),
        (ops.gated_fwd, (x, x.detach().clone().requires_grad_(), per_sample)),
        (ops.attention_fp8_fwd, (h, h.detach().clone(), h.detach().clone(), None, 0.125, 64, False, None)),
    ]


@pytest.mark.parametrize("case", range(7))
def test_custom_ops_pass_opcheck(case):
    """torch.library.opcheck: schema, fake implementation (shapes, dtypes, strides) and registered autograd
    agree with the real kernels (run under the interpreter)."""
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_gpu_inductor_compiled_blocks_match_eager(backend):
    """On the GPU with Inductor's code generation: a debug-size fp32 Wan whose blocks are compiled with
    fullgraph=True (our attention / adaLN / gated residual as custom ops inside) gives the eager loss and
    gradients (Inductor may reorder fp32 sums: 1e-3)."""
    torch.manual_seed(0)
    cfg = WanConfig.flavour("debug", attention_backend=backend, norm_backend="triton")
    eager = WanModel(cfg).cuda()
    with torch.no_grad():
        for p in eager.parameters():
            p.normal_(0, 0.2)
    compiled = apply_compile(copy.deepcopy(eager), fullgraph=True)
    args = (
        torch.randn(2, 4, 3, 6, 10).cuda(),
        torch.tensor([3.0, 870.0]).cuda(),
        torch.randn(2, 7, 24).cuda(),
    )
    loss_e, grads_e = _train_step(eager, args, {})
    loss_c, grads_c = _train_step(compiled, args, {})
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-3, atol=1e-5)
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-3, atol=1e-4, msg=name)
