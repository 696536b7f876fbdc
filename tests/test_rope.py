"""3D RoPE: tables against diffusers' Wan and HunyuanVideo-1.5 embeddings, the Triton apply against
diffusers' apply_rotary_emb and autograd of the torch reference."""

import pytest
import torch

from kernels.rope import apply_rope, apply_rope_reference, rope_3d_tables


@pytest.mark.parametrize("grid,head_dim", [((3, 4, 5), 128), ((2, 3, 7), 64), ((1, 1, 1), 12)])
def test_tables_match_diffusers_wan(grid, head_dim):
    WanRotaryPosEmbed = pytest.importorskip("diffusers.models.transformers.transformer_wan").WanRotaryPosEmbed
    T, H, W = grid
    wan = WanRotaryPosEmbed(head_dim, patch_size=(1, 2, 2), max_seq_len=64)
    latents = torch.zeros(1, 4, T, 2 * H, 2 * W)  # patch 2x2 in h, w -> grid (T, H, W)
    ref_cos, ref_sin = wan(latents)  # (1, S, 1, D), each angle repeated for its channel pair
    cos, sin = rope_3d_tables(grid, head_dim)
    assert cos.shape == (T * H * W, head_dim // 2) and cos.dtype == torch.float32
    torch.testing.assert_close(cos, ref_cos[0, :, 0, 0::2].float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin[0, :, 0, 1::2].float(), rtol=0, atol=1e-6)


def test_tables_match_diffusers_hunyuan15():
    hy15 = pytest.importorskip("diffusers.models.transformers.transformer_hunyuan_video15")
    grid, axes = (3, 4, 5), (16, 56, 56)
    hy = hy15.HunyuanVideo15RotaryPosEmbed(patch_size=1, patch_size_t=1, rope_dim=list(axes), theta=256.0)
    ref_cos, ref_sin = hy(torch.zeros(1, 4, *grid))  # (S, D) repeat-interleaved
    cos, sin = rope_3d_tables(grid, sum(axes), theta=256.0, axes_dims=axes)
    torch.testing.assert_close(cos, ref_cos[:, 0::2].float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin[:, 0::2].float(), rtol=0, atol=1e-6)


def test_start_needs_three_offsets():
    """A start of two offsets gave a (2, 6) table for a (3, 1, 1) grid (zip dropped the w axis), silently."""
    with pytest.raises(ValueError, match="start: expected three offsets"):
        rope_3d_tables((3, 1, 1), 12, start=(1, 2))
    with pytest.raises(ValueError, match="start: expected three offsets"):
        rope_3d_tables((3, 1, 1), 12, start=(1, 2, 0, 0))


def test_start_offsets_the_positions():
    full_cos, full_sin = rope_3d_tables((5, 2, 3), 32)
    cos, sin = rope_3d_tables((3, 2, 3), 32, start=(2, 0, 0))
    torch.testing.assert_close(cos, full_cos[2 * 6 :], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, full_sin[2 * 6 :], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,grid", [((2, 60, 3, 64), (3, 4, 5)), ((1, 7, 2, 12), (7, 1, 1))])
def test_apply_matches_diffusers_and_grad(dtype, shape, grid, device):
    apply_rotary_emb = pytest.importorskip("diffusers.models.embeddings").apply_rotary_emb
    cos, sin = (t.to(device) for t in rope_3d_tables(grid, shape[-1]))
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    y = apply_rope(x, cos, sin)
    freqs = (cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1))  # (S, D/2) -> (S, D)
    ref = apply_rotary_emb(x.detach(), freqs, use_real=True, use_real_unbind_dim=-1, sequence_dim=1)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-3)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gr,) = torch.autograd.grad(apply_rope_reference(x, cos, sin), x, g)
    torch.testing.assert_close(gx, gr, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-3)


def test_rotation_preserves_norm_and_inverts(device):
    cos, sin = (t.to(device) for t in rope_3d_tables((2, 3, 4), 32))
    x = torch.randn(1, 24, 2, 32, device=device)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(apply_rope(y, cos, -sin), x, rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    cos, sin = rope_3d_tables((2, 2, 2), 16)
    with pytest.raises(ValueError, match="axes_dims"):
        rope_3d_tables((2, 2, 2), 16, axes_dims=(4, 4, 4))
    with pytest.raises(ValueError, match="grid"):
        rope_3d_tables((2, 0, 2), 16)
    with pytest.raises(ValueError, match="cos: expected shape"):
        apply_rope(torch.randn(1, 9, 1, 16), cos, sin)
    with pytest.raises(ValueError, match="x: expected"):
        apply_rope(torch.randn(8, 16), cos, sin)
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        apply_rope(torch.randn(1, 8, 1, 16, dtype=torch.float64), cos, sin)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_apply_long(dtype):
    cos, sin = rope_3d_tables((21, 30, 52), 128, device="cuda")
    x = torch.randn(1, 32760, 12, 128, device="cuda", dtype=dtype, requires_grad=True)
    y = apply_rope(x, cos, sin)
    ref = apply_rope_reference(x, cos, sin)
    torch.testing.assert_close(y, ref)  # same fp32 math, one rounding (FMA contraction may differ by 1 ulp)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gr,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, gr, rtol=1e-2, atol=1e-2)


def test_cpu_without_interpreter_runs_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cos, sin = rope_3d_tables((2, 3, 4), 32)
    x = torch.randn(2, 24, 3, 32, requires_grad=True)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y, apply_rope_reference(x, cos, sin), rtol=0, atol=0)
    y.sum().backward()  # differentiable through the reference
    assert x.grad is not None and x.grad.shape == x.shape


def _windows(S, H, D, w, dtype, device):
    """x (1, S, H, D) and tables (S, D/2) with only the first and last w tokens filled (the rest unwritten:
    untouched pages cost no memory); the angles are random."""
    x = torch.empty(1, S, H, D, device=device, dtype=dtype)
    cos, sin = (torch.empty(S, D // 2, device=device) for _ in range(2))
    for rows in (slice(0, w), slice(S - w, S)):
        x[:, rows] = torch.randn(1, w, H, D, device=device).to(dtype)
        ang = torch.rand(w, D // 2, device=device) * 6.3
        cos[rows], sin[rows] = ang.cos(), ang.sin()
    return x, cos, sin


@pytest.mark.huge
def test_sample_past_2_31_elements(device):
    """One sample of 2^31+ elements (S * H * D; 4 GB fp16): the kernel's offsets (s * H + h) * D ran in int32
    within the sample and wrapped, so the last tokens were read and written out of bounds. The first and
    last tokens against the reference. The kernel launched as apply_rope does, with 2^13-token tiles (few
    interpreter programs; the same offset arithmetic)."""
    import triton

    from kernels.rope import _rope_kernel

    if device != "cpu":  # its 2^13-token tiles had not compiled for an H200 after 140 s (2026-11-28)
        pytest.skip("CPU interpreter version; on a GPU: test_gpu_apply_past_2_31_elements")
    S, H, D, w, block_s = 2**21 + 2**13, 8, 128, 2**13, 2**13
    assert S * H * D > 2**31
    x, cos, sin = _windows(S, H, D, w, torch.float16, device)
    y = torch.empty_like(x)
    grid = (triton.cdiv(S, block_s), 1)
    _rope_kernel[grid](x, y, cos, sin, S, H, D // 2, 1.0, BLOCK_S=block_s, BLOCK_P=D // 2, num_warps=8)
    for rows in (slice(0, w), slice(S - w, S)):
        want = apply_rope_reference(x[:, rows], cos[rows], sin[rows])
        torch.testing.assert_close(y[:, rows], want, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_gpu_apply_past_2_31_elements():
    """apply_rope itself (its own tiles) on one sample of 2^31+ elements, bf16, forward and backward."""
    S, H, D, w = 2**31 // (16 * 128) + 4096, 16, 128, 4096
    x, cos, sin = _windows(S, H, D, w, torch.bfloat16, "cuda")
    x.requires_grad_()
    y = apply_rope(x, cos, sin)
    (gx,) = torch.autograd.grad(y, x, y.detach())  # R^T R y = y: the gradient is x's rotation undone
    for rows in (slice(0, w), slice(S - w, S)):
        torch.testing.assert_close(y[:, rows], apply_rope_reference(x[:, rows], cos[rows], sin[rows]))
        torch.testing.assert_close(gx[:, rows], x[:, rows].detach(), rtol=2e-2, atol=2e-2)


def test_tables_that_require_grad_get_their_gradient(device):
    """The Triton op gave cos/sin no gradient (None) while x's was right: tables requiring grad now get
    the gradient of the rotation formula written out here (float64 autograd)."""
    cos, sin = (t.to(device) for t in rope_3d_tables((1, 2, 3), 6))
    x, w = torch.randn(2, 6, 3, 6, device=device), torch.randn(2, 6, 3, 6, device=device)

    def formula(x, c, s):
        xe, xo = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, S, H, D/2) each
        c, s = c[:, None], s[:, None]
        return torch.stack((xe * c - xo * s, xe * s + xo * c), -1).flatten(-2)

    def table_grads(fn, dtype):
        c, s = (t.to(dtype, copy=True).requires_grad_(True) for t in (cos, sin))
        (fn(x.to(dtype), c, s) * w.to(dtype)).sum().backward()
        return c.grad, s.grad

    for got, want in zip(table_grads(apply_rope, torch.float32), table_grads(formula, torch.float64)):
        assert got is not None
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_tables_of_head_dim_zero_are_a_clear_error():
    """head_dim 0 failed in the tables' final reshape with torch's 'cannot reshape tensor of 0 elements'."""
    for axes in (None, (0, 0, 0)):
        with pytest.raises(ValueError, match=r"head_dim=0: expected an even size >= 2"):
            rope_3d_tables((2, 2, 2), 0, axes_dims=axes)


def test_head_dim_zero_is_a_clear_error(device):
    """D = 0 failed in the launch with ZeroDivisionError."""
    x = torch.randn(2, 3, 4, 0, device=device)
    for fn in (apply_rope, apply_rope_reference):
        with pytest.raises(ValueError, match=r"x: expected \(B, S, H, D\) with even D >= 2"):
            fn(x, torch.ones(3, 0, device=device), torch.ones(3, 0, device=device))
