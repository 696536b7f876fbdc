"""Fused video attention: the Triton kernel (TRITON_INTERPRET=1 on CPU) against an fp64 torch reference,
the reference against torch SDPA and gradcheck, RoPE fusion, key lengths, determinism, bad inputs.

Tolerance rule (flash-attention's): the kernel's error vs the fp64 reference is at most 2x the error of
a plain same-dtype torch implementation, plus a small floor for fp32 round-off."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from kernels.attention import attention, attention_reference
from kernels.rope import apply_rope_reference, rope_3d_tables

# (B, Sq, Sk, H, D, rope grid or None, k_lengths or None)
CASES = [
    (1, 1, 1, 1, 16, None, None),
    (1, 17, 17, 2, 64, (1, 1, 17), None),
    (2, 17, 40, 2, 32, None, [40, 3]),
    (2, 65, 65, 1, 128, (5, 13, 1), [65, 30]),
    (1, 255, 255, 1, 16, (3, 5, 17), None),
    (1, 100, 255, 1, 64, None, None),
]


def _make(B, Sq, Sk, H, D, grid, k_lengths, dtype, device):
    q = torch.randn(B, Sq, H, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Sk, H, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Sk, H, D, device=device, dtype=dtype, requires_grad=True)
    rope = None if grid is None else tuple(t.to(device) for t in rope_3d_tables(grid, D))
    kl = None if k_lengths is None else torch.tensor(k_lengths, device=device)
    return q, k, v, rope, kl


def _same_dtype_attention(q, k, v, *, k_lengths=None, rope=None):
    """Every op in the input dtype (q k^T, softmax, p v): the error budget a kernel is held to."""
    if rope is not None:
        q, k = apply_rope_reference(q, *rope), apply_rope_reference(k, *rope)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, S, H, D) -> (B, H, S, D)
    s = qh @ kh.transpose(-1, -2) * q.shape[-1] ** -0.5
    if k_lengths is not None:
        valid = torch.arange(k.shape[1], device=q.device)[None, :] < k_lengths[:, None]
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    return (s.softmax(-1).nan_to_num(0.0) @ vh).transpose(1, 2)  # (B, H, Sq, D) -> (B, Sq, H, D)


def _outputs_and_grads(fn, q, k, v, g, **kw):
    out = fn(q, k, v, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), g))


def _assert_within_budget(ours, same_dtype, exact, floor, what):
    err = (ours.double() - exact).abs().max().item()
    budget = 2 * (same_dtype.double() - exact).abs().max().item() + floor
    assert err <= budget, f"{what}: kernel error {err:.3g} > budget {budget:.3g}"


def _assert_triton_matches_reference(case, dtype, device, fuse_rope):
    """Output and gradients of the Triton kernels on a CASES entry: input dtype and shape, and within the
    error budget against the fp64 reference."""
    q, k, v, rope, kl = _make(*case, dtype, device)
    g = torch.randn_like(q)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    exact = _outputs_and_grads(attention_reference, q64, k64, v64, g.double(), k_lengths=kl, rope=rope)
    kw = dict(k_lengths=kl, rope=rope, fuse_rope=fuse_rope)
    ours = _outputs_and_grads(attention, q, k, v, g, **kw)
    plain = _outputs_and_grads(_same_dtype_attention, q, k, v, g, k_lengths=kl, rope=rope)
    floor = 2e-5 if dtype == torch.float32 else 2e-3
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), ours, plain, exact):
        assert a.dtype == dtype and a.shape == c.shape
        _assert_within_budget(a, b, c, floor * max(1.0, c.abs().max().item()), name)


@pytest.mark.parametrize("fuse_rope", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "x".join(str(x) for x in c[:5]) + ("-rope" if c[5] else "")
)
def test_triton_matches_reference(case, dtype, fuse_rope, device):
    """Output and gradients within the error budget; RoPE fused in the kernels or as a pre-pass."""
    _assert_triton_matches_reference(case, dtype, device, fuse_rope)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_prepass_matches_fused(dtype, device):
    q, k, v, rope, kl = _make(2, 40, 40, 2, 64, (2, 4, 5), [40, 17], dtype, device)
    g = torch.randn_like(q)
    fused = _outputs_and_grads(attention, q, k, v, g, k_lengths=kl, rope=rope, fuse_rope=True)
    prepass = _outputs_and_grads(attention, q, k, v, g, k_lengths=kl, rope=rope, fuse_rope=False)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for a, b in zip(fused, prepass):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_lse_and_empty_rows(device):
    q, k, v, rope, _ = _make(2, 33, 33, 2, 32, (3, 11, 1), None, torch.float32, device)
    kl = torch.tensor([0, 20], device=device)
    out, lse = attention(q, k, v, k_lengths=kl, rope=rope, return_lse=True)
    ref_out, ref_lse = attention_reference(q, k, v, k_lengths=kl, rope=rope, return_lse=True)
    assert lse.shape == (2, 2, 33) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)  # -inf where no key is valid
    assert torch.isneginf(lse[0]).all() and (out[0] == 0).all()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(torch.isfinite(gr).all() for gr in grads)
    assert (grads[1][1, 20:] == 0).all() and (grads[2][1, 20:] == 0).all()  # masked keys: no gradient


@pytest.mark.parametrize("flag", [True, False])
def test_deterministic_grads_bitwise(flag, device):
    q, k, v, rope, kl = _make(2, 40, 40, 2, 32, (2, 4, 5), [40, 23], torch.float16, device)
    g = torch.randn_like(q)
    runs = [
        _outputs_and_grads(attention, q, k, v, g, k_lengths=kl, rope=rope, deterministic=flag, fuse_rope=True)
        for _ in range(2)
    ]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("D,grid", [(24, (1, 3, 7)), (8, None), (7, None), (96, (3, 7, 1))])
def test_head_dims_padded_to_a_tile(D, grid, device):
    q, k, v, rope, kl = _make(2, 21, 21, 2, D, grid, [21, 9], torch.float32, device)
    g = torch.randn_like(q)
    ours = _outputs_and_grads(attention, q, k, v, g, k_lengths=kl, rope=rope, fuse_rope=True)
    ref = _outputs_and_grads(attention_reference, q, k, v, g, k_lengths=kl, rope=rope)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs(device):
    qt = torch.randn(1, 2, 24, 32, device=device)  # (B, H, S, D)
    q = qt.transpose(1, 2)  # a (B, S, H, D) view with non-unit strides
    torch.testing.assert_close(attention(q, q, q), attention_reference(q, q, q), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_mask,use_rope", [(False, False), (True, True)])
def test_reference_matches_sdpa(use_mask, use_rope):
    q, k, v, rope, kl = _make(
        2, 24, 24, 3, 16, (2, 3, 4) if use_rope else None, [24, 7] if use_mask else None, torch.float64, "cpu"
    )
    ref = attention_reference(q, k, v, k_lengths=kl, rope=rope, scale=0.3)
    if rope is not None:
        q, k = apply_rope_reference(q, *rope), apply_rope_reference(k, *rope)
    mask = None if kl is None else (torch.arange(24)[None, :] < kl[:, None])[:, None, None, :]
    sdpa = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=0.3
    ).transpose(1, 2)
    torch.testing.assert_close(ref, sdpa, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attention(q, k, v, k_lengths=kl, scale=0.3, backend="sdpa"), sdpa)


def test_reference_gradcheck():
    q, k, v, rope, kl = _make(2, 5, 6, 1, 4, None, [6, 2], torch.float64, "cpu")
    assert torch.autograd.gradcheck(lambda a, b, c: attention_reference(a, b, c, k_lengths=kl), (q, k, v))
    q, k, v, rope, _ = _make(1, 6, 6, 2, 4, (1, 2, 3), None, torch.float64, "cpu")
    assert torch.autograd.gradcheck(lambda a, b, c: attention_reference(a, b, c, rope=rope), (q, k, v))


def test_bad_inputs(device):
    q = torch.randn(1, 8, 2, 32, device=device)
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        attention(q.double(), q.double(), q.double())
    wide = torch.randn(1, 8, 1, 160, device=device)
    with pytest.raises(ValueError, match="head dim <= 128"):
        attention(wide, wide, wide)
    with pytest.raises(ValueError, match="even head dim"):
        attention(q[..., :7], q[..., :7], q[..., :7], rope=rope_3d_tables((1, 2, 4), 6))
    with pytest.raises(ValueError, match="same B, H and D"):
        attention(q, q[:, :, :1], q[:, :, :1])
    with pytest.raises(ValueError, match="k, v: expected equal shapes"):
        attention(q, q, q[:, :4])
    with pytest.raises(ValueError, match="Sq == Sk"):
        attention(q, q[:, :4], q[:, :4], rope=rope_3d_tables((1, 1, 8), 32))
    with pytest.raises(ValueError, match="rope: expected cos/sin"):
        attention(q, q, q, rope=rope_3d_tables((1, 1, 7), 32))
    with pytest.raises(ValueError, match="k_lengths"):
        attention(q, q, q, k_lengths=torch.tensor([3.0]))
    with pytest.raises(ValueError, match="backend"):
        attention(q, q, q, backend="xformers")
    with pytest.raises(ValueError, match="scale: expected a positive"):
        attention(q, q, q, scale=0.0)
    with pytest.raises(ValueError, match="return_lse"):
        attention(q, q, q, backend="sdpa", return_lse=True)
    with pytest.raises(ValueError, match="one dtype"):
        attention(q, q.half(), q.half())
    if q.device.type == "cpu":  # the interpreter's bf16 is wrong: refused, not a silent wrong answer
        with pytest.raises(ValueError, match="interpreter gives wrong results in bfloat16"):
            attention(q.bfloat16(), q.bfloat16(), q.bfloat16())


@pytest.mark.parametrize(
    "case",
    [CASES[2], CASES[3], CASES[5]],
    ids=lambda c: "x".join(str(x) for x in c[:5]) + ("-rope" if c[5] else ""),
)
def test_tma_loads_match_pointer_loads(case, device, monkeypatch):
    """TMA = "on" (tensor-descriptor loads of the full tiles; batch > 1, ragged tiles, key lengths, fused
    RoPE) gives the pointer-load kernels' results. Under the interpreter the two paths compute the same
    arithmetic, so they agree bitwise; on a GPU the instruction order may differ (gpu test below)."""
    import kernels.attention as attention_module

    if device != "cpu":
        pytest.skip("bitwise agreement holds under the interpreter; see test_gpu_tma_matches_pointer_loads")
    q, k, v, rope, kl = _make(*case, torch.float16, device)
    g = torch.randn_like(q)
    kw = dict(k_lengths=kl, rope=rope, fuse_rope=True)
    monkeypatch.setattr(attention_module, "TMA", "off")
    pointer = _outputs_and_grads(attention, q, k, v, g, **kw)
    monkeypatch.setattr(attention_module, "TMA", "on")
    tma = _outputs_and_grads(attention, q, k, v, g, **kw)
    used = [
        cfg for (key, mode), tuner in attention_module._TUNED.items() if mode == "on" for cfg in tuner.configs
    ]
    assert used and all(c.kwargs["TMA"] for c in used)  # the descriptor path really ran
    assert any(
        name.endswith("/on") and "TMA: True" in cfg for name, cfg in attention_module.tuned_configs().items()
    )
    for a, b in zip(tma, pointer):
        assert torch.equal(a, b)


def test_tma_on_misaligned_views_takes_pointer_loads(device, monkeypatch):
    """TMA needs 16-byte aligned addresses: with contiguous views that start 2 bytes into a buffer the call
    runs with pointer loads (same results), not a descriptor error; aligned tensors get the TMA mode."""
    import kernels.attention as attention_module

    if device != "cpu":
        pytest.skip("checked under the interpreter")
    monkeypatch.setattr(attention_module, "TMA", "on")
    B, S, H, D = 1, 64, 2, 32
    n = B * S * H * D
    buf = torch.randn(3 * n + 1, dtype=torch.float16)
    q, k, v = (buf[1 + i * n :][:n].view(B, S, H, D) for i in range(3))
    assert q.is_contiguous() and q.data_ptr() % 16 == 2
    modes: list[str] = []
    attention_module._run_modes(modes.append, q, k, v)
    attention_module._run_modes(modes.append, q.clone(), k.clone(), v.clone())
    assert modes == ["off", "on"]
    torch.testing.assert_close(attention(q, k, v), attention_reference(q, k, v), rtol=2e-3, atol=2e-3)


def test_bad_tma_setting(monkeypatch):
    import kernels.attention as attention_module

    monkeypatch.setattr(attention_module, "TMA", "yes")
    q = torch.randn(1, 8, 2, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="kernels.attention.TMA: expected 'auto', 'on' or 'off'"):
        attention(q, q, q)


def test_flash_attn_missing_is_a_clear_error():
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        q = torch.randn(1, 8, 2, 32)
        with pytest.raises(RuntimeError, match="flash_attn"):
            attention(q, q, q, backend="flash_attn")
    else:
        pytest.skip("flash_attn is installed")


def test_te_refuses_key_lengths_naming_what_takes_them():
    """Backend "te" takes no k_lengths: bf16 refuses them naming what does; in FP8 (a model's FP8 blocks, where
    one batch of texts of different lengths among many must not stop a run) such a call runs sdpa in bf16
    after a one-time warning."""
    import kernels.attention_fp8

    q, lengths = torch.randn(2, 8, 2, 32), torch.tensor([8, 5])
    with pytest.raises(ValueError, match="k_lengths is not supported .* use backend 'triton' or 'sdpa'"):
        attention(q, q, q, backend="te", k_lengths=lengths)
    kernels.attention_fp8._WARNED.clear()
    q = q.bfloat16()
    with pytest.warns(UserWarning, match="backend 'te' takes no k_lengths"):
        got = attention(q, q, q, backend="te", k_lengths=lengths, precision="fp8")
    torch.testing.assert_close(got, attention(q, q, q, backend="sdpa", k_lengths=lengths), rtol=0, atol=0)


def test_te_unusable_is_a_clear_error():
    from kernels.te_loader import import_te

    try:
        import_te()
    except (ImportError, RuntimeError, OSError):
        q = torch.randn(1, 8, 2, 32)
        with pytest.raises(RuntimeError, match="backend 'te'"):
            attention(q, q, q, backend="te")
        # its FP8 mode: the same error in bf16; in fp32 (which it does not take) after a warning naming it
        with pytest.raises(RuntimeError, match="backend 'te'"):
            attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), backend="te", precision="fp8")
        import kernels.attention_fp8

        kernels.attention_fp8._WARNED.clear()
        with pytest.warns(UserWarning, match="backend 'te' takes FP8 attention in bf16 or fp16"):
            with pytest.raises(RuntimeError, match="backend 'te'"):
                attention(q, q, q, backend="te", precision="fp8")
    else:
        pytest.skip("transformer_engine is usable here")


@pytest.mark.parametrize("d", [8, 24])
def test_te_fp8_head_dims_it_cannot_take(d):
    """Backend "te"'s FP8 pre-pass multiplies by the Hadamard matrix on tensor cores: a head dim below 16 or
    not a power of two is a clear error named by attention_te_fp8 (before TE loads), and through
    attention(precision="fp8") a one-time warning naming it, after which TE's bf16 path runs (here, without
    TE, to its clear error)."""
    import kernels.attention_fp8
    from kernels.attention import attention_te_fp8

    q = torch.randn(1, 8, 2, d, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=f"power of two >= 16, got {d}"):
        attention_te_fp8(q, q, q)
    if importlib.util.find_spec("transformer_engine") is not None:
        return  # TE's bf16 path at these head dims: cuDNN's to take or refuse, not this test's
    kernels.attention_fp8._WARNED.clear()
    with pytest.warns(UserWarning, match=f"head dim {d}: backend 'te' in FP8 takes a power of two >= 16"):
        with pytest.raises(RuntimeError, match="backend 'te'"):  # no TE here: the bf16 path's own error
            attention(q, q, q, backend="te", precision="fp8")


def _attention_backward_parts(q, k, v, g, scale):
    """fp64 O, dP, dS by hand and dQ, dK, dV by autograd of the reference, (B, S, H, D) layout."""
    q, k, v, g = (t.double().transpose(1, 2) for t in (q, k, v, g))  # (B, H, S, D)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    p = torch.softmax(scale * leaves[0] @ leaves[1].transpose(-1, -2), dim=-1)
    o = p @ leaves[2]
    dq, dk, dv = torch.autograd.grad(o, leaves, g)
    dp = g @ v.transpose(-1, -2)
    ds = p.detach() * (dp - (g * o.detach()).sum(-1, keepdim=True))
    return o.detach(), dp, ds, (dq, dk, dv)


@pytest.mark.parametrize("case", ["random", "peaked", "uniform", "one_key_takes_all"])
def test_te_fp8_backward_bounds_hold(case):
    """kernels.attention.te_fp8_backward_bounds, from which backend "te"'s FP8 mode sets the scales of dP/dS
    and dQ/dK/dV before cuDNN computes them (a value above its scale's bound saturates): the bounds hold on
    attention that is random, peaked, uniform, and where every query takes one key with the same dO (there
    dV's term, Sq max|dO|, is reached within 2x: the factor Sq is needed). |O| <= max|v| too (O's scale)."""
    from kernels.attention import te_fp8_backward_bounds

    torch.manual_seed(0)
    B, S, H, D, scale = 1, 96, 2, 32, 32**-0.5
    q, k, v, g = (torch.randn(B, S, H, D, dtype=torch.float64) for _ in range(4))
    if case == "peaked":
        q, k = 6 * q, 6 * k
    elif case == "uniform":
        q = torch.zeros_like(q)
    elif case == "one_key_takes_all":
        k[:, 1:] = -k[:, :1]  # every other key points away from key 0 ...
        q = 40 * k[:, :1].expand_as(q)  # ... and every query points at it
        g = g[:, :1].expand_as(g)  # one output gradient for all
        v = 1e-4 * v  # small values: dP, dS and so dQ, dK are small, dV = Sq dO is the largest gradient
    o, dp, ds, grads = _attention_backward_parts(q, k, v, g, scale)

    def row_max(x):
        return torch.linalg.vector_norm(x, dim=-1).amax()

    b_ds, b_dqkv = te_fp8_backward_bounds(g.abs().amax(), row_max(g), row_max(v), q.abs().amax(), k.abs().amax(),
                                          scale, S)  # fmt: skip
    assert o.abs().amax() <= v.abs().amax() * (1 + 1e-12)
    assert dp.abs().amax() <= b_ds and ds.abs().amax() <= b_ds
    top = max(t.abs().amax() for t in grads)
    assert top <= b_dqkv * (1 + 1e-9), (case, float(top), float(b_dqkv))  # reached exactly in the last case
    if case == "one_key_takes_all":  # the bound (its dV term, Sq max|dO|, here) is reached within 2x
        assert grads[2].abs().amax() > 0.5 * b_dqkv


# ----------------------------------------------------------------------------------------- GPU (bf16)
GPU_CASES = [
    (1, 4096, 4096, 2, 128, (16, 16, 16), None),
    (2, 4100, 4100, 2, 64, None, [4100, 1234]),
    (1, 32760, 32760, 1, 128, (21, 30, 52), None),
    (1, 1000, 3000, 2, 128, None, None),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case,fuse_rope",
    [(c, fuse) for c in GPU_CASES for fuse in ((False, True) if c[5] else (False,))],  # fuse_rope needs rope
    ids=lambda x: (
        (f"S{x[1]}x{x[2]}-D{x[4]}" + ("-rope" if x[5] else ""))
        if isinstance(x, tuple)
        else ("rope_fused" if x else "rope_apart")
    ),
)
def test_gpu_bf16_long(case, fuse_rope):
    q, k, v, rope, kl = _make(*case, torch.bfloat16, "cuda")
    g = torch.randn_like(q)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    exact = _outputs_and_grads(attention_reference, q32, k32, v32, g.float(), k_lengths=kl, rope=rope)
    ours = _outputs_and_grads(
        attention, q, k, v, g, k_lengths=kl, rope=rope, deterministic=True, fuse_rope=fuse_rope
    )
    plain = _outputs_and_grads(attention, q, k, v, g, k_lengths=kl, rope=rope, backend="sdpa")
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), ours, plain, exact):
        _assert_within_budget(a, b, c, 1e-3 * max(1.0, c.abs().max().item()), name)
    with torch.no_grad():
        _, lse = attention(q, k, v, k_lengths=kl, rope=rope, fuse_rope=fuse_rope, return_lse=True)
        _, ref_lse = attention_reference(q32, k32, v32, k_lengths=kl, rope=rope, return_lse=True)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=5e-2)  # rotated q/k rounded to bf16 in ours only


@pytest.mark.gpu
@pytest.mark.parametrize("fuse_rope", [True, False])
def test_gpu_autotuned_matches_deterministic(fuse_rope):
    q, k, v, rope, kl = _make(2, 2048, 2048, 4, 128, (8, 16, 16), [2048, 999], torch.bfloat16, "cuda")
    g = torch.randn_like(q)
    kw = dict(k_lengths=kl, rope=rope, fuse_rope=fuse_rope)
    fixed = _outputs_and_grads(attention, q, k, v, g, deterministic=True, **kw)
    tuned = _outputs_and_grads(attention, q, k, v, g, **kw)
    for a, b in zip(fixed, tuned):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    again = _outputs_and_grads(attention, q, k, v, g, deterministic=True, **kw)
    assert all(torch.equal(a, b) for a, b in zip(fixed, again))


@pytest.mark.gpu
@pytest.mark.parametrize("fuse_rope", [False, True])
def test_gpu_tma_matches_pointer_loads(fuse_rope, monkeypatch):
    """TMA = "on" vs "off" in bf16 at a long ragged shape with key lengths (deterministic tiles)."""
    import kernels.attention as attention_module

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA loads need sm_90+")
    q, k, v, rope, kl = _make(2, 4100, 4100, 2, 128, (41, 10, 10), [4100, 1234], torch.bfloat16, "cuda")
    g = torch.randn_like(q)
    kw = dict(k_lengths=kl, rope=rope, fuse_rope=fuse_rope, deterministic=True)
    monkeypatch.setattr(attention_module, "TMA", "off")
    pointer = _outputs_and_grads(attention, q, k, v, g, **kw)
    monkeypatch.setattr(attention_module, "TMA", "on")
    tma = _outputs_and_grads(attention, q, k, v, g, **kw)
    for a, b in zip(tma, pointer):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    monkeypatch.setattr(attention_module, "TMA", "auto")  # autotuned over pointer and TMA configs
    auto = _outputs_and_grads(attention, q, k, v, g, **dict(kw, deterministic=False))
    for a, b in zip(auto, pointer):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    assert not attention_module._TMA_FAILED, "the TMA configs failed to build"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash_attn", "te"])
def test_gpu_optional_backends_match_reference(backend):
    """flash_attn and Transformer Engine (DotProductAttention), where installed: bf16 output and gradients,
    RoPE applied first, within twice SDPA's error against the fp32 reference."""
    module = {"flash_attn": "flash_attn", "te": "transformer_engine.pytorch"}[backend]
    try:
        if backend == "te":
            # as the backend loads it, against torch's cuDNN: a plain import failed on the GPU image's
            # older system cuDNN once torch had run cuDNN, and the test skipped
            from kernels.te_loader import import_te

            import_te()
        else:
            importlib.import_module(module)
    except (ImportError, RuntimeError, OSError) as e:
        pytest.skip(f"{module} is not usable here: {e}")
    q, k, v, rope, _ = _make(2, 1200, 1200, 4, 128, (12, 10, 10), None, torch.bfloat16, "cuda")
    g = torch.randn_like(q)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    exact = _outputs_and_grads(attention_reference, q32, k32, v32, g.float(), rope=rope)
    got = _outputs_and_grads(attention, q, k, v, g, rope=rope, backend=backend)
    plain = _outputs_and_grads(attention, q, k, v, g, rope=rope, backend="sdpa")
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), got, plain, exact):
        assert a.dtype == torch.bfloat16 and a.shape == c.shape
        _assert_within_budget(a, b, c, 1e-3 * max(1.0, c.abs().max().item()), f"{backend} {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("fuse_rope", [True, False])
def test_gpu_fp32_head_dim_128(fuse_rope):
    q, k, v, rope, kl = _make(2, 300, 300, 2, 128, (3, 10, 10), [300, 77], torch.float32, "cuda")
    g = torch.randn_like(q)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    exact = _outputs_and_grads(attention_reference, q64, k64, v64, g.double(), k_lengths=kl, rope=rope)
    ours = _outputs_and_grads(attention, q, k, v, g, k_lengths=kl, rope=rope, fuse_rope=fuse_rope)
    plain = _outputs_and_grads(_same_dtype_attention, q, k, v, g, k_lengths=kl, rope=rope)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), ours, plain, exact):
        _assert_within_budget(a, b, c, 2e-5 * max(1.0, c.abs().max().item()), name)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    import kernels.attention as attention_module

    monkeypatch.setattr(attention_module, "_INTERPRET", False)
    q = torch.randn(1, 8, 2, 32)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        attention(q, q, q)


def test_key_lengths_outside_int32_are_clamped_not_wrapped(device):
    """Lengths past Sk mean every key and negative ones no key, also beyond int32: a plain int32 cast had
    read 2^32 + 3 as 3 keys and -2^32 + 2 as 2 keys (the torch and sdpa backends use all / none)."""
    q, k, v, _, _ = _make(3, 8, 8, 1, 16, None, None, torch.float32, device)
    kl = torch.tensor([2**32 + 3, 2**31 + 5, -(2**32) + 2], device=device)
    valid = torch.arange(8, device=device)[None, :] < kl[:, None]  # int64 compare: all, all, none
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * 0.25
    p = s.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1).nan_to_num(0.0)
    exact = torch.einsum("bhqk,bkhd->bqhd", p, v.double())
    torch.testing.assert_close(attention(q, k, v, k_lengths=kl).double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch", "sdpa"])
def test_infinite_scale_is_an_error(backend, device):
    """scale = inf passed the positivity check and gave NaN (triton, sdpa) or a meaningless output (torch)."""
    q = torch.randn(1, 8, 1, 16, device=device)
    with pytest.raises(ValueError, match="scale: expected a positive number"):
        attention(q, q, q, scale=float("inf"), backend=backend)
    with pytest.raises(ValueError, match="scale: expected a positive number"):
        attention(q, q, q, scale=torch.tensor(float("inf")), backend=backend)


@pytest.mark.parametrize("fuse_rope", [True, False])
def test_lse_gradient(fuse_rope, device):
    """A loss of out and lse: lse's gradient reaches q and k as in float64 autograd (the forward op had
    marked lse non-differentiable, so its part of the gradient was silently dropped)."""
    q, k, v, rope, kl = _make(2, 9, 9, 1, 24, (1, 1, 9), [9, 4], torch.float32, device)
    g, w = torch.randn_like(q), torch.randn(2, 1, 9, device=device)

    def exact(q, k, v):
        q, k = apply_rope_reference(q, *rope), apply_rope_reference(k, *rope)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * 24**-0.5
        valid = torch.arange(9, device=device)[None, :] < kl[:, None]
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v), torch.logsumexp(s, -1)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = exact(q64, k64, v64)
    want = torch.autograd.grad((out * g).sum() + (lse * w).sum(), (q64, k64, v64))
    out, lse = attention(q, k, v, k_lengths=kl, rope=rope, fuse_rope=fuse_rope, return_lse=True)
    got = torch.autograd.grad((out * g).sum() + (lse * w).sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    (dq,) = torch.autograd.grad(attention(q, k, v, return_lse=True)[1].sum(), (q,))  # lse alone
    assert torch.isfinite(dq).all()


def _big_sample(Sq, Sk, H, D, w, dtype, device):
    """q (1, Sq, H, D), k, v (1, Sk, H, D) with only the first and last w rows of each filled: the rest is left
    unwritten (torch.empty: untouched pages cost no memory until the kernel writes the outputs)."""
    q, k, v = (torch.empty(1, s, H, D, device=device, dtype=dtype) for s in (Sq, Sk, Sk))
    for t in (q, k, v):
        if t.shape[1] <= 2 * w:
            t.normal_()
        else:
            t[:, :w].normal_()
            t[:, -w:].normal_()
    return q, k, v


@pytest.mark.huge
def test_sample_past_2_31_elements(device, monkeypatch):
    """One sample whose q has 2^31+ elements (Sq * H * D; a 4 GB fp16 tensor): the tile offsets
    offs_m * (H * D) ran in int32 within the sample and wrapped past 2^31, so the last queries were read and
    written out of bounds. The kernel now takes the 64-bit tile offsets there; the first and last rows are
    checked against the reference on those rows (rows of attention are independent). Under the interpreter
    with 2^16-query tiles (few programs: the same offset arithmetic)."""
    import kernels.attention as attention_module

    if device != "cpu":
        pytest.skip("CPU interpreter version; on a GPU: test_gpu_sample_past_2_31_elements")
    gpu, _ = attention_module._TILES[("fwd", False)]
    monkeypatch.setitem(attention_module._TILES, ("fwd", False), (gpu, (2**16, 16)))
    Sq, Sk, H, D, w = 2**26 + 2**16, 16, 2, 16, 2**16
    assert Sq * H * D > 2**31
    q, k, v = _big_sample(Sq, Sk, H, D, w, torch.float16, device)
    out, lse = attention(q, k, v, deterministic=True, return_lse=True)
    for rows in (slice(0, w), slice(Sq - w, Sq)):
        want, want_lse = attention_reference(q[:, rows], k, v, return_lse=True)
        torch.testing.assert_close(out[:, rows], want, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(lse[:, :, rows], want_lse, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fuse_rope", [True, False])
@pytest.mark.parametrize("case", [CASES[2], CASES[3]], ids=["klen", "rope-klen"])
def test_64bit_offsets_path_matches_reference(case, fuse_rope, device, monkeypatch):
    """The kernels' 64-bit tile offsets (I64, taken where one sample passes 2^31 elements) in every load and
    store of the forward and the three backward kernels, forced on at a small size: the same results as the
    reference (the overflow itself: test_sample_past_2_31_elements and the GPU test)."""
    import kernels.attention as attention_module

    monkeypatch.setattr(attention_module, "_slab_i64", lambda S, H, D: True)
    _assert_triton_matches_reference(
        case, torch.float16 if device == "cpu" else torch.bfloat16, device, fuse_rope
    )


def _exact_head(q, k, v, g, scale):
    """out, dq, dk, dv of softmax(q k^T scale) v for one head, (S, D) fp32 each, the products written out."""
    p = ((q @ k.T) * scale).softmax(-1)
    o = p @ v
    ds = p * (g @ v.T - (g * o).sum(-1, keepdim=True))
    return o, ds @ k * scale, ds.T @ q * scale, p.T @ g


def test_exact_head_gives_autograds_gradients():
    """The written-out products test_gpu_sample_past_2_31_elements checks against: autograd's in fp64."""
    q, k, v = (torch.randn(s, 16, dtype=torch.float64, requires_grad=True) for s in (7, 11, 11))
    g = torch.randn(7, 16, dtype=torch.float64)
    o = ((q @ k.T) * 0.3).softmax(-1) @ v
    want = (o, *torch.autograd.grad(o, (q, k, v), g))
    for a, b in zip(_exact_head(q.detach(), k.detach(), v.detach(), g, 0.3), want):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.huge
@pytest.mark.parametrize("side", ["q", "kv"])
def test_gpu_sample_past_2_31_elements(side):
    """One sample with 2^31+ elements on the query side (Sq * H * D) or the key side (Sk * H * D), bf16 (4 GB
    per tensor): output and gradients against the products written out in fp32, head by head (no tensor of
    the reference passes 2^31 elements, unlike SDPA on the whole sample); ours wrapped int32 tile offsets
    there before the 64-bit path. A failure names the worst row and where the 2^31 rows begin."""
    H, D, big, small = 8, 128, 2**31 // (8 * 128) + 4096, 384
    Sq, Sk = (big, small) if side == "q" else (small, big)
    q, k, v = (torch.randn(1, s, H, D, device="cuda", dtype=torch.bfloat16) for s in (Sq, Sk, Sk))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    g = torch.randn_like(q)
    ours = dict(zip(("out", "dq", "dk", "dv"), _outputs_and_grads(attention, q, k, v, g)))
    past = 2**31 // (H * D)  # the first row whose elements lie past 2^31 in its sample
    for h in range(H):
        ref = _exact_head(*(t[0, :, h].detach().float() for t in (q, k, v, g)), D**-0.5)
        for (name, a), b in zip(ours.items(), ref):
            row_err = (a[0, :, h].float() - b).abs().amax(-1)
            worst = int(row_err.argmax())
            err, bound = row_err[worst].item(), 2e-2 * max(1.0, b.abs().max().item())
            assert err <= bound, (
                f"{name}, head {h}: max error {err:.3g} > {bound:.3g} at row {worst} of {len(row_err)} "
                f"(rows from {past} on lie past 2^31 elements; {int((row_err > bound).sum())} rows off)"
            )
        del ref


@pytest.mark.parametrize("fuse_rope", [False, True])
def test_rope_tables_that_require_grad_get_their_gradient(fuse_rope, device):
    """fuse_rope=True gave RoPE tables that require grad no gradient (None), silently: they now get float64
    autograd's through the rotation and softmax written out here."""
    q, k, v, rope, _ = _make(1, 6, 6, 2, 6, (1, 2, 3), None, torch.float32, device)
    g = torch.randn_like(q)

    def table_grads(fn, dtype):
        cos, sin = (t.to(dtype, copy=True).requires_grad_(True) for t in rope)
        out = fn(*(t.detach().to(dtype) for t in (q, k, v)), (cos, sin))
        return torch.autograd.grad((out * g.to(dtype)).sum(), (cos, sin), allow_unused=True)

    def exact(q, k, v, rope):
        q, k = apply_rope_reference(q, *rope), apply_rope_reference(k, *rope)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * 6**-0.5
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)

    got = table_grads(lambda q, k, v, rope: attention(q, k, v, rope=rope, fuse_rope=fuse_rope), torch.float32)
    for a, b in zip(got, table_grads(exact, torch.float64)):
        assert a is not None
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch", "sdpa"])
def test_key_lengths_and_rope_of_the_wrong_kind_are_clear_errors(backend, device):
    """k_lengths as a list failed with AttributeError and a bool tensor ran as lengths 0/1; rope as one
    tensor failed with "too many values to unpack": each is now a ValueError naming the argument."""
    q = torch.randn(2, 4, 1, 16, device=device)
    for bad in ([4, 2], torch.tensor([True, False], device=device)):
        with pytest.raises(ValueError, match=r"k_lengths: expected an int tensor of shape \(2,\)"):
            attention(q, q, q, k_lengths=bad, backend=backend)
    cos, _ = rope_3d_tables((1, 1, 4), 16, device=device)
    with pytest.raises(ValueError, match=r"rope: expected a pair \(cos, sin\)"):
        attention(q, q, q, rope=cos, backend=backend)
    with pytest.raises(ValueError, match=r"rope: expected a pair \(cos, sin\)"):
        attention(q, q, q, rope=(cos, None), backend=backend)


def test_double_backward_is_a_clear_error(device):
    """A second derivative through the triton backend failed with torch's "no autograd formula was
    registered" for an internal op; it now says what has no double backward and what to use. The torch
    backend's second derivative is float64 autograd's."""
    q = torch.randn(1, 3, 1, 16, device=device, requires_grad=True)
    k, v = torch.randn(1, 3, 1, 16, device=device), torch.randn(1, 3, 1, 16, device=device)
    for precision in ("bf16", "fp8"):  # fp8: head dim 16 runs the bf16 kernel after a warning
        out = attention(q, k, v, precision=precision)
        (g,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
        with pytest.raises(
            RuntimeError, match="attention backend 'triton': no double backward.*backend='torch'"
        ):
            torch.autograd.grad(g.sum(), q)
    (g,) = torch.autograd.grad(attention(q, k, v, backend="torch").pow(2).sum(), q, create_graph=True)
    (got,) = torch.autograd.grad(g.sum(), q)
    q64 = q.detach().double().requires_grad_(True)
    (g64,) = torch.autograd.grad(
        attention_reference(q64, k.double(), v.double()).pow(2).sum(), q64, create_graph=True
    )
    (want,) = torch.autograd.grad(g64.sum(), q64)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_reference_keeps_fp32_math_under_autocast(device):
    """Inside torch.autocast (bf16) the torch backend's matmuls ran in bf16 (error ~2e-2 where the triton
    backend's is ~5e-7): the reference now computes in fp32 as documented, like float64 math here."""
    q, k, v, rope, kl = _make(2, 5, 5, 2, 16, (1, 1, 5), [5, 3], torch.float32, device)
    q64, k64 = (apply_rope_reference(t.detach().double(), *rope) for t in (q, k))
    v64 = v.detach().double()
    s = torch.einsum("bqhd,bkhd->bhqk", q64, k64) * 16**-0.5
    s = s.masked_fill(
        ~(torch.arange(5, device=device)[None, :] < kl[:, None])[:, None, None, :], float("-inf")
    )
    want = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v64)
    with torch.autocast(device, dtype=torch.bfloat16):
        for backend in ("torch", "triton"):
            got = attention(q, k, v, k_lengths=kl, rope=rope, backend=backend)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch", "sdpa"])
def test_head_dim_zero_is_a_clear_error(backend, device):
    """D = 0 failed with ZeroDivisionError (the default scale D^-0.5, the tile sizes)."""
    x = torch.randn(2, 3, 2, 0, device=device)
    with pytest.raises(ValueError, match=r"q: expected a head dim D >= 1"):
        attention(x, x, x, backend=backend)
