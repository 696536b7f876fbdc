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

import functools
import os

import torch
import triton
import triton.language as tl

from kernels import no_double_backward

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


@triton.jit
def _row_stats(x, cols_ok, D, eps, RMS: tl.constexpr):
    """x (R, BLOCK_D) fp32 rows, zero past D -> (mean (R,), rstd (R,)); mean is 0 for RMS."""
    if RMS:
        var = tl.sum(x * x, axis=1) / D
        mean = tl.zeros_like(var)
    else:
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(cols_ok[None, :], x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / D
    return mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _adaln_fwd_kernel(
    x_ptr,
    scale_ptr,
    shift_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    S,
    D,
    rows_per_prog,
    eps,
    RMS: tl.constexpr,
    PER_TOKEN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """y = xhat * (1 + scale) + shift for rows [j*rows_per_prog, ...) of sample b; saves mean, rstd."""
    j = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cols_ok = cols < D
    if not PER_TOKEN:
        sc = 1.0 + tl.load(scale_ptr + b * D + cols, mask=cols_ok, other=0.0).to(tl.float32)
        sh = tl.load(shift_ptr + b * D + cols, mask=cols_ok, other=0.0).to(tl.float32)
    r0 = j * rows_per_prog
    r_end = tl.minimum(r0 + rows_per_prog, S)
    for r in range(r0, r_end, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        ok = (rows < r_end)[:, None] & cols_ok[None, :]
        grow = b.to(tl.int64) * S + rows  # global row index
        offs = grow[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        mean, rstd = _row_stats(x, cols_ok, D, eps, RMS)
        xhat = (x - mean[:, None]) * rstd[:, None]
        if PER_TOKEN:
            y = xhat * (1.0 + tl.load(scale_ptr + offs, mask=ok, other=0.0).to(tl.float32))
            y += tl.load(shift_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        else:
            y = xhat * sc[None, :] + sh[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)
        tl.store(mean_ptr + grow, mean, mask=rows < r_end)
        tl.store(rstd_ptr + grow, rstd, mask=rows < r_end)


@triton.jit
def _adaln_bwd_kernel(
    x_ptr,
    scale_ptr,
    dy_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,
    dscale_ptr,
    dshift_ptr,
    S,
    D,
    rows_per_prog,
    n_progs,
    RMS: tl.constexpr,
    PER_TOKEN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dx per row; dscale = dy * xhat, dshift = dy per row (PER_TOKEN) or fp32 partial sums over this
    program's rows written to (B, n_progs, D)."""
    j = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cols_ok = cols < D
    if not PER_TOKEN:
        sc = 1.0 + tl.load(scale_ptr + b * D + cols, mask=cols_ok, other=0.0).to(tl.float32)
        acc_sc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        acc_sh = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    r0 = j * rows_per_prog
    r_end = tl.minimum(r0 + rows_per_prog, S)
    for r in range(r0, r_end, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        ok = (rows < r_end)[:, None] & cols_ok[None, :]
        grow = b.to(tl.int64) * S + rows
        offs = grow[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + grow, mask=rows < r_end, other=0.0)
        rstd = tl.load(rstd_ptr + grow, mask=rows < r_end, other=0.0)
        xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        if PER_TOKEN:
            dxhat = dy * (1.0 + tl.load(scale_ptr + offs, mask=ok, other=0.0).to(tl.float32))
            tl.store(dscale_ptr + offs, (dy * xhat).to(dscale_ptr.dtype.element_ty), mask=ok)
            tl.store(dshift_ptr + offs, dy.to(dshift_ptr.dtype.element_ty), mask=ok)
        else:
            dxhat = dy * sc[None, :]
            acc_sc += dy * xhat
            acc_sh += dy
        c2 = tl.sum(dxhat * xhat, axis=1) / D
        if RMS:
            dx = (dxhat - xhat * c2[:, None]) * rstd[:, None]
        else:
            c1 = tl.sum(dxhat, axis=1) / D
            dx = (dxhat - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    if not PER_TOKEN:
        poffs = (b * n_progs + j).to(tl.int64) * D + cols
        tl.store(dscale_ptr + poffs, tl.sum(acc_sc, axis=0), mask=cols_ok)
        tl.store(dshift_ptr + poffs, tl.sum(acc_sh, axis=0), mask=cols_ok)


@triton.jit
def _gated_fwd_kernel(
    x_ptr,
    y_ptr,
    gate_ptr,
    out_ptr,
    S,
    D,
    rows_per_prog,
    PER_TOKEN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out = x + gate * y (fp32 math)."""
    j = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cols_ok = cols < D
    if not PER_TOKEN:
        g = tl.load(gate_ptr + b * D + cols, mask=cols_ok, other=0.0).to(tl.float32)[None, :]
    r0 = j * rows_per_prog
    r_end = tl.minimum(r0 + rows_per_prog, S)
    for r in range(r0, r_end, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        ok = (rows < r_end)[:, None] & cols_ok[None, :]
        offs = (b.to(tl.int64) * S + rows)[:, None] * D + cols[None, :]
        if PER_TOKEN:
            g = tl.load(gate_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (x + g * y).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gated_bwd_kernel(
    dout_ptr,
    y_ptr,
    gate_ptr,
    dy_ptr,
    dgate_ptr,
    S,
    D,
    rows_per_prog,
    n_progs,
    PER_TOKEN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dy = dout * gate; dgate = dout * y per row (PER_TOKEN) or fp32 partial sums (B, n_progs, D)."""
    j = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    cols_ok = cols < D
    if not PER_TOKEN:
        g = tl.load(gate_ptr + b * D + cols, mask=cols_ok, other=0.0).to(tl.float32)[None, :]
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    r0 = j * rows_per_prog
    r_end = tl.minimum(r0 + rows_per_prog, S)
    for r in range(r0, r_end, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        ok = (rows < r_end)[:, None] & cols_ok[None, :]
        offs = (b.to(tl.int64) * S + rows)[:, None] * D + cols[None, :]
        do = tl.load(dout_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if PER_TOKEN:
            g = tl.load(gate_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            tl.store(dgate_ptr + offs, (do * y).to(dgate_ptr.dtype.element_ty), mask=ok)
        else:
            acc += do * y
        tl.store(dy_ptr + offs, (do * g).to(dy_ptr.dtype.element_ty), mask=ok)
    if not PER_TOKEN:
        poffs = (b * n_progs + j).to(tl.int64) * D + cols
        tl.store(dgate_ptr + poffs, tl.sum(acc, axis=0), mask=cols_ok)


# Launch tuning (measured on H200, bench/gpu_elementwise.py): elements per row tile, programs per SM
# for the forward and backward passes, warps per program.
TUNING = {"tile": 4096, "fwd_progs_per_sm": 16, "bwd_progs_per_sm": 4, "warps": 8}


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _launch_geometry(x: torch.Tensor, backward: bool) -> tuple[int, int, int, int]:
    """-> (BLOCK_R, BLOCK_D, rows_per_prog, n_progs) for the (n_progs, B) grid over x (B, S, D)."""
    B, S, D = x.shape
    tile_elems = TUNING["tile"]
    progs_per_sm = TUNING["bwd_progs_per_sm" if backward else "fwd_progs_per_sm"]
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_R = max(1, min(tile_elems // BLOCK_D, triton.next_power_of_2(S)))
    target = progs_per_sm * (_num_sms(x.device.index or 0) if x.is_cuda else 2)
    n_tiles = triton.cdiv(S, BLOCK_R)
    tiles_per_prog = triton.cdiv(n_tiles, max(1, min(n_tiles, target // B)))
    rows_per_prog = tiles_per_prog * BLOCK_R
    return BLOCK_R, BLOCK_D, rows_per_prog, triton.cdiv(S, rows_per_prog)


def _warps(BLOCK_R: int, BLOCK_D: int) -> int:
    return TUNING["warps"] if BLOCK_R * BLOCK_D >= TUNING["tile"] else 4


def _per_token(x: torch.Tensor, mod: torch.Tensor) -> bool:
    """Modulation (scale, shift, gate) per token (B, S, D) rather than per sample (B, 1, D)."""
    return mod.shape[1] == x.shape[1] and x.shape[1] > 1


def _mod_grad(mod: torch.Tensor, dtype: torch.dtype, per_token: bool, n_progs: int) -> torch.Tensor:
    """The backward kernels' output for a modulation's gradient: the gradient itself (per token), or fp32
    partial sums (B, n_progs, D), one per program, that :func:`_sum_partials` reduces."""
    if per_token:
        return torch.empty(mod.shape, device=mod.device, dtype=dtype)
    return torch.empty((mod.shape[0], n_progs, mod.shape[2]), device=mod.device, dtype=torch.float32)


def _sum_partials(grad: torch.Tensor, dtype: torch.dtype, per_token: bool) -> torch.Tensor:
    """(B, n_progs, D) partial sums -> (B, 1, D) in ``dtype``: a fixed-order sum, deterministic."""
    return grad if per_token else grad.sum(1, keepdim=True).to(dtype)


def _launch(kernel, geom: tuple[int, int, int, int], B: int, *args, **meta) -> None:
    """kernel on the (n_progs, B) grid of ``geom`` (from :func:`_launch_geometry`) with its tile sizes."""
    BLOCK_R, BLOCK_D, _, n_progs = geom
    kernel[(n_progs, B)](*args, **meta, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=_warps(BLOCK_R, BLOCK_D))


# The launches as torch custom ops (opaque to torch.compile: no graph break; inductor fuses around them);
# register_autograd pairs each forward op with its backward op (unlike a torch.autograd.Function, this
# traces with one tensor passed as several inputs, e.g. scale and shift).
@torch.library.custom_op("wmsd::adaln_fwd", mutates_args=())
def _adaln_fwd_op(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, rms: bool, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, scale, shift contiguous -> (y, mean, rstd); mean/rstd (B*S,) fp32 for the backward."""
    B, S, D = x.shape
    per_token = _per_token(x, scale)
    geom = _launch_geometry(x, backward=False)
    rpp = geom[2]
    y = torch.empty_like(x)
    mean = torch.empty((B * S,), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    _launch(
        _adaln_fwd_kernel, geom, B, x, scale, shift, y, mean, rstd, S, D, rpp, eps, RMS=rms, PER_TOKEN=per_token
    )  # fmt: skip
    return y, mean, rstd


@_adaln_fwd_op.register_fake
def _(x, scale, shift, rms, eps):
    B, S, _ = x.shape
    stats = x.new_empty((B * S,), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("wmsd::adaln_bwd", mutates_args=())
def _adaln_bwd_op(
    x: torch.Tensor,
    scale: torch.Tensor,
    dy: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    rms: bool,
    shift_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx, dscale, dshift) with dscale/dshift shaped like scale (dshift in shift's dtype)."""
    B, S, D = x.shape
    per_token = _per_token(x, scale)
    geom = _launch_geometry(x, backward=True)
    rpp, n_progs = geom[2:]
    dx = torch.empty_like(x)
    dscale = _mod_grad(scale, scale.dtype, per_token, n_progs)
    dshift = _mod_grad(scale, shift_dtype, per_token, n_progs)
    _launch(
        _adaln_bwd_kernel, geom, B, x, scale, dy, mean, rstd, dx, dscale, dshift, S, D, rpp, n_progs,
        RMS=rms, PER_TOKEN=per_token,
    )  # fmt: skip
    return dx, _sum_partials(dscale, scale.dtype, per_token), _sum_partials(dshift, shift_dtype, per_token)


@_adaln_bwd_op.register_fake
def _(x, scale, dy, mean, rstd, rms, shift_dtype):
    return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(scale, dtype=shift_dtype)


def _adaln_setup(ctx, inputs, output) -> None:
    x, scale, shift, rms, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.rms, ctx.shift_dtype = rms, shift.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _adaln_backward(ctx, dy, _dmean, _drstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dscale, dshift = _adaln_bwd_op(x, scale, dy.contiguous(), mean, rstd, ctx.rms, ctx.shift_dtype)
    return dx, dscale, dshift, None, None


_adaln_fwd_op.register_autograd(_adaln_backward, setup_context=_adaln_setup)


@torch.library.custom_op("wmsd::gated_fwd", mutates_args=())
def _gated_fwd_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate * y; x, y, gate contiguous."""
    B, S, D = x.shape
    per_token = _per_token(x, gate)
    geom = _launch_geometry(x, backward=False)
    out = torch.empty_like(x)
    _launch(_gated_fwd_kernel, geom, B, x, y, gate, out, S, D, geom[2], PER_TOKEN=per_token)
    return out


@_gated_fwd_op.register_fake
def _(x, y, gate):
    return torch.empty_like(x)


@torch.library.custom_op("wmsd::gated_bwd", mutates_args=())
def _gated_bwd_op(
    dout: torch.Tensor, y: torch.Tensor, gate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dy, dgate); dx is dout itself."""
    B, S, D = y.shape
    per_token = _per_token(y, gate)
    geom = _launch_geometry(y, backward=True)
    rpp, n_progs = geom[2:]
    dy = torch.empty_like(y)
    dgate = _mod_grad(gate, gate.dtype, per_token, n_progs)
    _launch(_gated_bwd_kernel, geom, B, dout, y, gate, dy, dgate, S, D, rpp, n_progs, PER_TOKEN=per_token)
    return dy, _sum_partials(dgate, gate.dtype, per_token)


@_gated_bwd_op.register_fake
def _(dout, y, gate):
    return torch.empty_like(y), torch.empty_like(gate)


def _gated_setup(ctx, inputs, output) -> None:
    x, y, gate = inputs
    ctx.save_for_backward(y, gate)
    ctx.x_dtype = x.dtype


def _gated_backward(ctx, dout):
    y, gate = ctx.saved_tensors
    dout = dout.contiguous()
    dy, dgate = _gated_bwd_op(dout, y, gate)
    return dout.to(ctx.x_dtype), dy, dgate


_gated_fwd_op.register_autograd(_gated_backward, setup_context=_gated_setup)


no_double_backward(_adaln_bwd_op, "adaln_modulate backend 'triton'", "use backend='torch'")
no_double_backward(_gated_bwd_op, "gated_residual backend 'triton'", "use backend='torch'")


def _use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors (or anywhere under TRITON_INTERPRET=1), never for float64."""
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend={backend!r}: expected 'triton' or 'torch'")
    where = tensors[0].is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return backend == "triton" and where and all(t.dtype != torch.float64 for t in tensors)


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

    backend: "triton" (fused kernels, autograd) or "torch" (the reference). float64 runs the reference.
    """
    _check_adaln(x, scale, shift, norm)
    # an empty x has no rows to launch over (the launch geometry would divide by zero): the reference
    if not _use_triton(backend, x, scale, shift) or x.numel() == 0:
        return adaln_modulate_reference(x, scale, shift, norm=norm, eps=eps)
    y, _, _ = _adaln_fwd_op(x.contiguous(), scale.contiguous(), shift.contiguous(), norm == "rms", float(eps))
    return y


def gated_residual(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, backend: str = "triton"
) -> torch.Tensor:
    """``x + gate * y``; x, y (B, S, D), gate (B, 1, D) or (B, S, D). backend: "triton" or "torch"."""
    _check_gated(x, y, gate)
    # an empty x has no rows to launch over (the launch geometry would divide by zero): the reference
    if not _use_triton(backend, x, y, gate) or x.numel() == 0:
        return gated_residual_reference(x, y, gate)
    return _gated_fwd_op(x.contiguous(), y.contiguous(), gate.contiguous())
