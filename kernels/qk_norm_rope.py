"""Fused QK RMSNorm + interleaved 3D RoPE for q and k (CUDA kernel in csrc/qk_norm_rope.cu).

q, k (B, S, H, D), D even. RMSNorm with a weight, over one of:
    norm_over="head": each head's D features,  weight (D,)       (HunyuanVideo, LTX)
    norm_over="all":  all H * D features of a token, weight (H*D,) (Wan's norm_q / norm_k)
        y = x * rsqrt(mean(x^2) + eps) * w
then RoPE with the tables cos, sin (S, D/2) of kernels/rope.py, pairs (2i, 2i+1) rotated by angle i:
        out[2i]   = y[2i] cos_i - y[2i+1] sin_i
        out[2i+1] = y[2i] sin_i + y[2i+1] cos_i
All math in fp32, one cast to q's dtype at the end. backend="cuda" runs one launch for q and k;
it works in place when ``inplace=True`` (else on copies). backend="torch" is the reference.
"""

from __future__ import annotations

import torch

_NORM_OVER = ("head", "all")


def _check(q, k, wq, wk, cos, sin, norm_over: str) -> None:
    if norm_over not in _NORM_OVER:
        raise ValueError(f"norm_over={norm_over!r}: expected one of {_NORM_OVER}")
    if q.dim() != 4 or q.shape[-1] % 2:
        raise ValueError(f"q: expected shape (B, S, H, D) with D even, got {tuple(q.shape)}")
    if k.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"k: expected shape ({q.shape[0]}, {q.shape[1]}, H_k, {q.shape[-1]}), got {tuple(k.shape)}"
        )
    S, D = q.shape[1], q.shape[-1]
    for name, w, x in (("wq", wq, q), ("wk", wk, k)):
        want = D if norm_over == "head" else x.shape[2] * D
        if w.dim() != 1 or w.shape[0] != want:
            raise ValueError(
                f"{name}: expected shape ({want},) for norm_over={norm_over!r}, got {tuple(w.shape)}"
            )
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (S, D // 2):
            raise ValueError(f"{name}: expected shape ({S}, {D // 2}) = (S, D/2), got {tuple(t.shape)}")
    for name, t in (("k", k), ("wq", wq), ("wk", wk), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device}, expected q's device {q.device}")


_MAX_HEADS = 1024  # kMaxHeads of csrc/qk_norm_rope.cu


def _cuda_operands(q, k, inplace: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q, k) for kernels._C to update in place (contiguous copies unless inplace), or None where it would
    refuse them and the reference runs: q and k of two dtypes, no or more than 1024 heads, 2^31 tokens, or
    (inplace) a head dim that is not contiguous (a plain clone kept such strides, refused too)."""
    if k.dtype != q.dtype:
        return None
    if q.numel() or k.numel():  # both empty: the wrapper returns them without a launch
        if not (0 < q.shape[2] <= _MAX_HEADS and 0 < k.shape[2] <= _MAX_HEADS):
            return None
        if q.shape[0] * q.shape[1] > 0x7FFFFFFF:
            return None
    if not inplace:
        return q.clone(memory_format=torch.contiguous_format), k.clone(memory_format=torch.contiguous_format)
    return (q, k) if q.stride(-1) == 1 and k.stride(-1) == 1 else None


def _norm_rope_one(x, w, cos, sin, eps: float, norm_over: str) -> torch.Tensor:
    B, S, H, D = x.shape
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(ct)
    if norm_over == "all":
        xf = xf.reshape(B, S, H * D)  # (B, S, H, D) -> (B, S, H*D)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.to(ct)
    y = y.reshape(B, S, H, D // 2, 2)  # -> pairs (2i, 2i+1)
    c = cos.to(ct).view(1, S, 1, D // 2)
    s = sin.to(ct).view(1, S, 1, D // 2)
    y0, y1 = y[..., 0], y[..., 1]
    out = torch.stack((y0 * c - y1 * s, y0 * s + y1 * c), dim=-1)  # (B, S, H, D/2, 2)
    return out.reshape(B, S, H, D).to(x.dtype)


def qk_norm_rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    eps: float = 1e-6,
    norm_over: str = "head",
    backend: str = "torch",
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure torch (module doc): returns (rope(rmsnorm(q) * wq), rope(rmsnorm(k) * wk)), new tensors."""
    _check(q, k, wq, wk, cos, sin, norm_over)
    return _norm_rope_one(q, wq, cos, sin, eps, norm_over), _norm_rope_one(k, wk, cos, sin, eps, norm_over)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    eps: float = 1e-6,
    norm_over: str = "head",
    backend: str = "cuda",
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused QK RMSNorm + 3D RoPE (module doc) -> (q_out, k_out).

    backend "cuda" uses kernels._C when built and q is on a CUDA device, else the torch reference; with
    autograd recording (an input requires grad) the reference, which has a backward (the kernel has none:
    its in-place result would pass q's and k's gradients through unchanged and give wq, wk none).
    inplace=True overwrites q and k (cuda backend; the torch backend copies the result back).
    """
    _check(q, k, wq, wk, cos, sin, norm_over)
    if backend not in ("cuda", "torch"):
        raise ValueError(f"backend={backend!r}: expected 'cuda' or 'torch'")
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, wq, wk, cos, sin))
    kernel_dtype = q.dtype in (torch.float32, torch.float16, torch.bfloat16)
    if backend == "cuda" and not grad and q.is_cuda and kernel_dtype:
        from kernels import cuda as _cuda

        operands = _cuda_operands(q, k, inplace) if _cuda.available(q.device) else None
        if operands is not None:
            return _cuda.qk_norm_rope_(*operands, wq, wk, cos, sin, eps=eps, norm_over=norm_over)
    qo, ko = qk_norm_rope_reference(q, k, wq, wk, cos, sin, eps=eps, norm_over=norm_over)
    if inplace:
        q.copy_(qo)
        k.copy_(ko)
        return q, k
    return qo, ko
