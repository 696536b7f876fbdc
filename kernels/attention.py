"""Fused video attention: softmax(q k^T * scale) v, non-causal, optional fused 3D RoPE and key lengths.

Layout q (B, Sq, H, D), k and v (B, Sk, H, D) -> out (B, Sq, H, D); lse (B, H, Sq) float32 is
``log sum_j exp(scale * q.k_j)`` over the valid keys (natural log).

(The Triton kernels are being written; until they land, backend="triton" runs SDPA.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.rope import apply_rope, apply_rope_reference

BACKENDS = ("triton", "sdpa", "flash_attn", "te", "torch")


def _check_inputs(q, k, v, k_lengths, rope) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected (B, S, H, D), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k, v: expected equal shapes, got {tuple(k.shape)} and {tuple(v.shape)}")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: expected the same B, H and D")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: expected one device, got {q.device}, {k.device}, {v.device}")
    if k_lengths is not None:
        if k_lengths.shape != (q.shape[0],) or k_lengths.dtype.is_floating_point:
            raise ValueError(
                f"k_lengths: expected an int tensor of shape ({q.shape[0]},), got "
                f"{k_lengths.dtype} {tuple(k_lengths.shape)}"
            )
    if rope is not None:
        if q.shape[1] != k.shape[1]:
            raise ValueError(f"rope: needs self-attention (Sq == Sk), got Sq={q.shape[1]}, Sk={k.shape[1]}")
        cos, sin = rope
        want = (q.shape[1], q.shape[3] // 2)
        if tuple(cos.shape) != want or tuple(sin.shape) != want:
            raise ValueError(
                f"rope: expected cos/sin of shape (S, D/2) = {want}, got "
                f"{tuple(cos.shape)} and {tuple(sin.shape)}"
            )


def _key_mask(k_lengths: torch.Tensor, Sk: int) -> torch.Tensor:
    """(B,) lengths -> (B, 1, 1, Sk) boolean, True where a key is valid."""
    return (torch.arange(Sk, device=k_lengths.device)[None, :] < k_lengths[:, None])[:, None, None, :]


def attention_reference(q, k, v, *, scale=None, k_lengths=None, rope=None, return_lse=False):
    """Pure-torch attention, same math and signature; computes in fp32 (fp64 for fp64 inputs).

    out_i = sum_j softmax_j(scale * q_i.k_j) v_j over keys j < k_lengths[b]; rows with no valid key
    give out = 0 and lse = -inf.
    """
    _check_inputs(q, k, v, k_lengths, rope)
    if rope is not None:
        q, k = apply_rope_reference(q, *rope), apply_rope_reference(k, *rope)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh, kh, vh = (t.to(ct).transpose(1, 2) for t in (q, k, v))  # (B, S, H, D) -> (B, H, S, D)
    s = qh @ kh.transpose(-1, -2) * scale  # (B, H, Sq, Sk)
    if k_lengths is not None:
        s = s.masked_fill(~_key_mask(k_lengths, k.shape[1]), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Sq)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # rows with lse = -inf give 0
    out = (p @ vh).transpose(1, 2).to(q.dtype)  # (B, H, Sq, D) -> (B, Sq, H, D)
    return (out, lse.float()) if return_lse else out


def _sdpa(q, k, v, scale, k_lengths, rope):
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    mask = None if k_lengths is None else _key_mask(k_lengths, k.shape[1])
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )  # (B, H, Sq, D)
    return out.transpose(1, 2)  # (B, Sq, H, D)


def _flash_attn(q, k, v, scale, k_lengths, rope):
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:
        raise RuntimeError(
            "attention backend 'flash_attn': the flash_attn package is not importable "
            f"({e}); install the [gpu] extra or use backend='triton'"
        ) from e
    if k_lengths is not None:
        raise ValueError("attention backend 'flash_attn': k_lengths is not supported; use 'triton' or 'sdpa'")
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    return flash_attn_func(q, k, v, softmax_scale=scale)


_TE_MODULES: dict = {}


def _te(q, k, v, scale, k_lengths, rope):
    try:
        from transformer_engine.pytorch import DotProductAttention
    except (ImportError, RuntimeError, OSError) as e:
        raise RuntimeError(f"attention backend 'te': transformer_engine is not usable here ({e})") from e
    if k_lengths is not None:
        raise ValueError("attention backend 'te': k_lengths is not supported; use 'triton' or 'sdpa'")
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    H, D = q.shape[2], q.shape[3]
    key = (H, D, scale)
    if key not in _TE_MODULES:
        _TE_MODULES[key] = DotProductAttention(
            H, D, qkv_format="bshd", attn_mask_type="no_mask", softmax_scale=scale
        )
    out = _TE_MODULES[key](q, k, v)  # (B, S, H*D)
    return out.view(q.shape)  # (B, S, H*D) -> (B, S, H, D)


def attention(
    q, k, v, *, scale=None, k_lengths=None, rope=None, deterministic=False, return_lse=False, backend="triton"
):
    """softmax(rope(q) rope(k)^T * scale) v over keys j < k_lengths[b]; q (B, Sq, H, D) -> (B, Sq, H, D).

    scale defaults to D^-0.5. rope: None or (cos, sin) tables (S, D/2) from kernels.rope, applied to q
    and k (needs Sq == Sk). return_lse adds lse (B, H, Sq) float32 (triton and torch backends only).
    backend: "triton" (ours, fused RoPE), "sdpa", "flash_attn", "te", or "torch" (the reference).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    _check_inputs(q, k, v, k_lengths, rope)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "torch":
        return attention_reference(
            q, k, v, scale=scale, k_lengths=k_lengths, rope=rope, return_lse=return_lse
        )
    if return_lse:
        raise ValueError(f"return_lse: supported by backends 'triton' and 'torch', not {backend!r}")
    fn = {"triton": _sdpa, "sdpa": _sdpa, "flash_attn": _flash_attn, "te": _te}[backend]
    return fn(q, k, v, scale, k_lengths, rope)
