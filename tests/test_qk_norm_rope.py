"""qk_norm_rope: the torch reference vs an independent formulation (F.rms_norm + complex rotation),
and the CUDA kernel vs the reference on GPU (in place, strided qkv views, GQA)."""

import pytest
import torch
import torch.nn.functional as F

from kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference


def _tables(S, D, device):
    theta = torch.rand(S, D // 2, device=device, dtype=torch.float64) * 6.28
    return theta.cos(), theta.sin()


def _independent(x, w, cos, sin, eps, norm_over):
    """RMSNorm by F.rms_norm, rotation of pairs (2i, 2i+1) as multiplication by exp(i theta)."""
    B, S, H, D = x.shape
    xd = x.double()
    if norm_over == "all":
        y = F.rms_norm(xd.reshape(B, S, H * D), (H * D,), w.double(), eps).reshape(B, S, H, D)
    else:
        y = F.rms_norm(xd, (D,), w.double(), eps)
    z = torch.view_as_complex(y.reshape(B, S, H, D // 2, 2).contiguous())
    rot = torch.complex(cos.double(), sin.double()).view(1, S, 1, D // 2)
    return torch.view_as_real(z * rot).reshape(B, S, H, D)


@pytest.mark.parametrize("norm_over", ["head", "all"])
@pytest.mark.parametrize("heads", [(3, 3), (4, 2)])
def test_reference_matches_independent_formulation(norm_over, heads):
    B, S, D = 2, 5, 12
    q, k = torch.randn(B, S, heads[0], D) * 3, torch.randn(B, S, heads[1], D)
    wq = torch.randn(D if norm_over == "head" else heads[0] * D)
    wk = torch.randn(D if norm_over == "head" else heads[1] * D)
    cos, sin = _tables(S, D, "cpu")
    qo, ko = qk_norm_rope_reference(q, k, wq, wk, cos.float(), sin.float(), eps=1e-6, norm_over=norm_over)
    torch.testing.assert_close(
        qo.double(), _independent(q, wq, cos, sin, 1e-6, norm_over), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        ko.double(), _independent(k, wk, cos, sin, 1e-6, norm_over), atol=1e-5, rtol=1e-5
    )


def test_cpu_fallback_and_inplace():
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    w = torch.rand(8) + 0.5
    cos, sin = (t.float() for t in _tables(4, 8, "cpu"))
    want = qk_norm_rope_reference(q, k, w, w, cos, sin)
    q2, k2 = q.clone(), k.clone()
    got = qk_norm_rope(q2, k2, w, w, cos, sin, backend="cuda", inplace=True)  # CPU: the torch path
    assert got[0] is q2 and got[1] is k2
    torch.testing.assert_close(q2, want[0])
    torch.testing.assert_close(k2, want[1])


def test_bad_inputs():
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    w, cos = torch.ones(8), torch.ones(4, 4)
    with pytest.raises(ValueError, match=r"wq: expected shape \(16,\)"):
        qk_norm_rope(q, k, w, w, cos, cos, norm_over="all")
    with pytest.raises(ValueError, match=r"cos: expected shape \(4, 4\)"):
        qk_norm_rope(q, k, w, w, torch.ones(4, 3), cos)
    with pytest.raises(ValueError, match="D even"):
        qk_norm_rope(torch.randn(1, 4, 2, 7), k, w, w, cos, cos)
    with pytest.raises(ValueError, match="norm_over="):
        qk_norm_rope(q, k, w, w, cos, cos, norm_over="token")


def _fused_qkv(B, S, H, D, dtype, device):
    qkv = torch.randn(B, S, 3, H, D, device=device).to(dtype)
    return qkv, qkv[:, :, 0], qkv[:, :, 1]  # strided views: token stride 3*H*D


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm_over", ["head", "all"])
def test_cuda_matches_reference_in_place_on_qkv_views(dtype, norm_over):
    from kernels import cuda

    assert cuda.available(), cuda.load_error()
    B, S, H, D = 2, 77, 12, 128
    qkv, q, k = _fused_qkv(B, S, H, D, dtype, "cuda")
    v_before = qkv[:, :, 2].clone()
    wq = torch.rand(D if norm_over == "head" else H * D, device="cuda") + 0.5
    wk = torch.rand_like(wq) + 0.5
    cos, sin = (t.float() for t in _tables(S, D, "cuda"))
    ref = qk_norm_rope_reference(q.double(), k.double(), wq, wk, cos, sin, norm_over=norm_over)
    same = qk_norm_rope_reference(q, k, wq, wk, cos, sin, norm_over=norm_over)  # fp32 math, one rounding
    qk_norm_rope(q, k, wq, wk, cos, sin, norm_over=norm_over, backend="cuda", inplace=True)
    for got, r, s in zip((q, k), ref, same):
        err, base = (got.double() - r).abs().max().item(), (s.double() - r).abs().max().item()
        assert err <= 2 * base + 1e-5, (err, base)
    torch.testing.assert_close(qkv[:, :, 2], v_before, atol=0, rtol=0)  # v untouched


@pytest.mark.gpu
def test_cuda_gqa_and_overlap_errors():
    from kernels import cuda

    B, S, D = 1, 9, 64
    q = torch.randn(B, S, 8, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, S, 2, D, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(D, device="cuda") + 0.5
    cos, sin = (t.float() for t in _tables(S, D, "cuda"))
    want = qk_norm_rope_reference(q, k, w, w, cos, sin)
    got = qk_norm_rope(q, k, w, w, cos, sin, backend="cuda")
    torch.testing.assert_close(got[0], want[0], atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(got[1], want[1], atol=2e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="overlap"):
        cuda.qk_norm_rope_(q, q[:, :, :2], w, w, cos, sin)
    with pytest.raises(ValueError, match="last .* dim must be contiguous"):
        # the same shape, channels strided (a transposed view would fail the shape check first)
        cuda.qk_norm_rope_(q.transpose(2, 3).contiguous().transpose(2, 3), k, w, w, cos, sin)


@pytest.mark.gpu
def test_cuda_backend_with_inputs_that_require_grad_gives_the_references_gradients():
    """The kernel writes a clone in place through raw pointers: autograd saw the clone only, so q's and k's
    gradients passed through unchanged and wq, wk got none. With grad recording the backend takes the
    reference (which has a backward)."""
    B, S, H, D = 2, 9, 4, 64
    cos, sin = (t.float() for t in _tables(S, D, "cuda"))
    leaves = [torch.randn(B, S, H, D, device="cuda", requires_grad=True) for _ in range(2)]
    leaves += [(torch.rand(D, device="cuda") + 0.5).requires_grad_() for _ in range(2)]
    grads = []
    for backend in ("cuda", "torch"):
        out = qk_norm_rope(*leaves, cos, sin, backend=backend)
        g = torch.autograd.grad(sum((o * o.detach().sin()).sum() for o in out), leaves)
        grads.append(g)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def _channels_strided(B, S, H, D, **kw):
    """(B, S, H, D) with the channel dim strided (stride H), dense: a clone keeps these strides."""
    return torch.randn(B, S, D, H, **kw).permute(0, 1, 3, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="calls the launcher with null pointers: no GPU only")
def test_cuda_backend_routes_what_the_kernel_refuses_to_the_reference():
    """qk_norm_rope(backend="cuda") raised where the reference runs: inplace=False cloned q keeping a
    strided channel dim (refused by the wrapper), more than 1024 heads (refused by the launcher), q and k
    of two dtypes. The operands it now picks, on fake CUDA tensors, against the extension's own checks."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kernels import cuda
    from kernels.qk_norm_rope import _cuda_operands

    mod, err = cuda._module()
    if mod is None:
        pytest.skip(err)
    w, tab = torch.ones(8), torch.ones(4, 4)
    for Hq, Hk in ((1024, 1), (1, 1024), (1025, 1), (1, 1025), (0, 2)):
        with FakeTensorMode():
            q, k = torch.empty(1, 4, Hq, 8, device="cuda"), torch.empty(1, 4, Hk, 8, device="cuda")
            takes = _cuda_operands(q, k, inplace=False) is not None
        args = (0,) * 6 + (1, 4, Hq, Hk, 8) + (0,) * 6 + (1e-6, False, 0, 0, 0)
        with pytest.raises(RuntimeError) as e:  # no GPU: a size it takes fails on the device only
            mod.qk_norm_rope(*args)
        assert ("need 0 < H" not in str(e.value)) == takes, (Hq, Hk, str(e.value))
    with FakeTensorMode():
        fake = dict(device="cuda")
        q, k = _channels_strided(1, 4, 2, 8, **fake), torch.empty(1, 4, 2, 8, **fake)
        wc, tabc = torch.ones(8, **fake), torch.ones(4, 4, **fake)
        with pytest.raises(ValueError, match="last .* dim must be contiguous"):
            cuda.qk_norm_rope_(q.clone(), k, wc, wc, tabc, tabc)  # the copy inplace=False made
        qc, kc = _cuda_operands(q, k, inplace=False)
        assert qc.is_contiguous() and kc.is_contiguous() and qc.shape == q.shape and qc is not q
        assert _cuda_operands(q, k, inplace=True) is None  # in place on q: the reference, copied back
        with pytest.raises(ValueError, match="k: dtype"):
            cuda.qk_norm_rope_(k, k.half(), wc, wc, tabc, tabc)
        assert _cuda_operands(k, k.half(), inplace=False) is None
    q, k = _channels_strided(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    want = qk_norm_rope_reference(q, k, w, w, tab, tab)
    got = qk_norm_rope(q, k, w, w, tab, tab, inplace=True)  # the path these take: reference, copied back
    assert got[0] is q and torch.equal(q, want[0]) and torch.equal(k, want[1])


@pytest.mark.gpu
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("case", ["channels_strided", "1100_heads", "two_dtypes"])
def test_cuda_backend_matches_reference_where_the_kernel_refuses(case, inplace):
    B, S, D = 1, 5, 16
    H = 1100 if case == "1100_heads" else 3
    q = _channels_strided(B, S, H, D, device="cuda") if case == "channels_strided" else None
    q = q if q is not None else torch.randn(B, S, H, D, device="cuda")
    k = torch.randn(B, S, 2, D, device="cuda", dtype=torch.float16 if case == "two_dtypes" else torch.float32)
    w = torch.rand(D, device="cuda") + 0.5
    cos, sin = (t.float() for t in _tables(S, D, "cuda"))
    want = qk_norm_rope_reference(q, k, w, w, cos, sin)
    got = qk_norm_rope(q, k, w, w, cos, sin, backend="cuda", inplace=inplace)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=2e-3, rtol=1e-3)
    if inplace:
        assert got[0] is q and got[1] is k
