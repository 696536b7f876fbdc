"""adaln_modulate / gated_residual: Triton forward and every gradient vs an fp64 reference, with the
same-dtype torch computation's error as the yardstick; the reference itself checked by gradcheck."""

import pytest
import torch

from kernels.adaln import adaln_modulate, adaln_modulate_reference, gated_residual, gated_residual_reference

# (B, S, D): odd S and D, D not a power of two; (1, 300, 96) gives programs of several row tiles
SHAPES = [(2, 7, 48), (3, 37, 20), (1, 300, 96)]


def _max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref).abs().max().item()


def _same_dtype_torch_adaln(x, scale, shift, norm, eps):
    """What a plain same-dtype torch user computes (no fp32 upcast): the error yardstick."""
    if norm == "layer":
        xh = torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps)
    else:
        xh = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return xh * (1 + scale.to(x.dtype)) + shift.to(x.dtype)


def _grads(fn, inputs, dout):
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, dout)
    return [out.detach(), *grads]


def _assert_within_2x(ours, same_dtype, ref, dtype, what):
    floor = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    for name, a, b, r in zip(what, ours, same_dtype, ref):
        err, base = _max_err(a, r), _max_err(b, r)
        scale = 1 + r.abs().max().item()
        assert err <= 2 * base + floor * scale, f"{name}: error {err:.3g} vs same-dtype torch {base:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("shape", SHAPES)
def test_adaln_forward_and_grads(shape, norm, per_token, dtype, device):
    B, S, D = shape
    eps = 1e-6
    mod_shape = (B, S, D) if per_token else (B, 1, D)
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype)
    scale, shift = (
        (0.5 * torch.randn(mod_shape, device=device)).to(dtype),
        torch.randn(mod_shape, device=device).to(dtype),
    )
    dout = torch.randn(shape, device=device).to(dtype)
    ins = [x, scale, shift]
    ours = _grads(lambda *a: adaln_modulate(*a, norm=norm, eps=eps, backend="triton"), ins, dout)
    ref = _grads(
        lambda *a: adaln_modulate_reference(*a, norm=norm, eps=eps), [t.double() for t in ins], dout.double()
    )
    same = _grads(lambda *a: _same_dtype_torch_adaln(*a, norm, eps), ins, dout)
    assert ours[0].dtype == dtype and all(g.dtype == dtype for g in ours[1:])
    _assert_within_2x(ours, same, ref, dtype, ["y", "dx", "dscale", "dshift"])


def test_adaln_bf16_activations_fp32_modulation_like_wan(device):
    """x in low precision, scale/shift fp32 (diffusers Wan): fp32 math, one rounding to x.dtype."""
    x = torch.randn(2, 9, 40, device=device).to(torch.float16)
    scale, shift = torch.randn(2, 1, 40, device=device), torch.randn(2, 1, 40, device=device)
    ln = torch.nn.LayerNorm(40, elementwise_affine=False, eps=1e-6)
    want = (ln(x.float()) * (1 + scale) + shift).type_as(x)  # diffusers' expression
    got = adaln_modulate(x, scale, shift, backend="triton")
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)
    scale.requires_grad_(True)
    adaln_modulate(x, scale, shift).float().sum().backward()
    assert scale.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_residual_forward_and_grads(shape, per_token, dtype, device):
    B, S, D = shape
    x, y, dout = (torch.randn(shape, device=device).to(dtype) for _ in range(3))
    gate = torch.randn((B, S, D) if per_token else (B, 1, D), device=device).to(dtype)
    ours = _grads(lambda *a: gated_residual(*a, backend="triton"), [x, y, gate], dout)
    ref = _grads(gated_residual_reference, [x.double(), y.double(), gate.double()], dout.double())
    same = _grads(lambda a, b, g: a + g * b, [x, y, gate], dout)
    _assert_within_2x(ours, same, ref, dtype, ["out", "dx", "dy", "dgate"])


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("per_token", [False, True])
def test_references_pass_gradcheck(norm, per_token):
    B, S, D = 2, 3, 5
    mod = (B, S, D) if per_token else (B, 1, D)
    ins = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((B, S, D), mod, mod)]
    assert torch.autograd.gradcheck(lambda *a: adaln_modulate_reference(*a, norm=norm, eps=1e-3), ins)
    g_ins = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((B, S, D), (B, S, D), mod)]
    assert torch.autograd.gradcheck(gated_residual_reference, g_ins)


@pytest.mark.parametrize("shape", [(2, 0, 8), (0, 3, 8), (2, 3, 0)])
def test_empty_inputs_give_empty_outputs_and_grads(shape, device):
    """No tokens (or samples, or features): the Triton path raised ZeroDivisionError in its launch geometry."""
    B, S, D = shape
    x = torch.randn(shape, device=device, requires_grad=True)
    y = torch.randn(shape, device=device, requires_grad=True)
    mod = [torch.randn(B, 1, D, device=device, requires_grad=True) for _ in range(3)]
    out = adaln_modulate(x, mod[0], mod[1], backend="triton")
    res = gated_residual(x, y, mod[2], backend="triton")
    assert out.shape == res.shape == shape and out.dtype == res.dtype == torch.float32
    # sums over no elements: every gradient is zero (the modulation's too)
    grads = torch.autograd.grad(out.sum() + res.sum(), [x, y, *mod], allow_unused=True)
    for g, t in zip(grads, [x, y, *mod]):
        assert g is None or (g.shape == t.shape and not g.any())


def test_bad_inputs():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"scale: expected shape \(2, 1, 4\) or \(2, 3, 4\)"):
        adaln_modulate(x, torch.randn(2, 2, 4), torch.randn(2, 2, 4))
    with pytest.raises(ValueError, match="norm='group'"):
        adaln_modulate(x, torch.randn(2, 1, 4), torch.randn(2, 1, 4), norm="group")
    with pytest.raises(ValueError, match=r"x: expected shape \(B, S, D\)"):
        adaln_modulate(x[0], torch.randn(2, 1, 4), torch.randn(2, 1, 4))
    with pytest.raises(ValueError, match=r"gate: expected shape"):
        gated_residual(x, x, torch.randn(2, 1, 5))
    with pytest.raises(ValueError, match="backend="):
        gated_residual(x, x, torch.randn(2, 1, 4), backend="cuda")


def test_double_backward_is_a_clear_error(device):
    """A second derivative through the Triton ops failed with torch's "no autograd formula was registered"
    for an internal op; it now names the function and the torch backend."""
    x = torch.randn(1, 3, 8, device=device, requires_grad=True)
    mod = torch.randn(1, 1, 8, device=device)
    calls = {
        "adaln_modulate": lambda x: adaln_modulate(x, mod, mod),
        "gated_residual": lambda x: gated_residual(x.detach(), x, mod),
    }
    for name, fn in calls.items():
        (g,) = torch.autograd.grad(fn(x).pow(2).sum(), x, create_graph=True)
        with pytest.raises(
            RuntimeError, match=f"{name} backend 'triton': no double backward.*backend='torch'"
        ):
            torch.autograd.grad(g.sum(), x)
