"""3D rotary position embedding (t, h, w) for video DiTs.

Tables. A token at grid position (t, h, w) gets, per axis a with d_a channels, the angles
``pos_a * theta^(-2j / d_a)`` for j < d_a / 2; the three axes' angles are concatenated (t, then h,
then w) into D/2 angles per token. Tokens are ordered t-major (t, then h, then w), as patchified
video latents are flattened. ``rope_3d_tables`` returns cos and sin of these angles, each (S, D/2)
float32.

Rotation. Interleaved pairs (the convention of diffusers' Wan and HunyuanVideo): channels (2i, 2i+1)
rotate by angle i::

    out[2i]   = x[2i] cos_i - x[2i+1] sin_i
    out[2i+1] = x[2i] sin_i + x[2i+1] cos_i

The rotation is orthogonal, so the backward pass is the rotation by -angle applied to the incoming
gradient. The Triton kernel does both (one pass over x, fp32 math, output in x's dtype); a program
covers a block of tokens for all heads, so each cos/sin row is read once per token, not once per head.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def _wan_axes_dims(head_dim: int) -> tuple[int, int, int]:
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_3d_tables(
    grid: tuple[int, int, int],
    head_dim: int,
    *,
    theta: float = 10000.0,
    axes_dims: tuple[int, int, int] | None = None,
    start: tuple[int, int, int] = (0, 0, 0),
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of a 3D RoPE over a (T, H, W) token grid, each (T*H*W, head_dim // 2) float32.

    ``axes_dims`` = channels per axis (t, h, w), each even, summing to ``head_dim``; default is Wan's split
    h = w = 2 * (head_dim // 6), t = the rest. ``start`` offsets the positions of each axis (e.g. for a
    chunk of a longer video). Angles are computed in float64 and rounded once to float32.
    """
    if len(grid) != 3 or any(int(n) < 1 for n in grid):
        raise ValueError(f"grid: expected three positive sizes (T, H, W), got {grid}")
    # zip() below would drop the axes past a short start silently: a table of the wrong row count
    if len(start) != 3:
        raise ValueError(f"start: expected three offsets (t, h, w), got {start}")
    # head_dim 0 failed in the final reshape with torch's "cannot reshape tensor of 0 elements"
    if head_dim < 2:
        raise ValueError(f"head_dim={head_dim}: expected an even size >= 2")
    axes_dims = _wan_axes_dims(head_dim) if axes_dims is None else tuple(axes_dims)
    if len(axes_dims) != 3 or sum(axes_dims) != head_dim or any(d % 2 or d < 0 for d in axes_dims):
        raise ValueError(
            f"axes_dims: expected three even sizes summing to head_dim={head_dim}, got {axes_dims}"
        )
    angles = []
    for axis, (n, d, s0) in enumerate(zip(grid, axes_dims, start)):
        pos = torch.arange(s0, s0 + n, dtype=torch.float64, device=device)
        freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)  # (d/2,)
        ang = torch.outer(pos, freqs)  # (n, d/2)
        shape = [1, 1, 1, d // 2]
        shape[axis] = n
        angles.append(ang.view(shape).expand(*grid, d // 2))
    ang = torch.cat(angles, dim=-1).reshape(-1, head_dim // 2)  # (T, H, W, D/2) -> (S, D/2)
    return ang.cos().float(), ang.sin().float()


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pure-torch interleaved rotation of x (B, S, H, D) by tables (S, D/2); x's dtype out."""
    _check(x, cos, sin)
    ct = torch.promote_types(x.dtype, torch.float32)  # fp32 math, fp64 for fp64 inputs
    x1, x2 = x.to(ct).unflatten(-1, (-1, 2)).unbind(-1)  # (B, S, H, D) -> 2 x (B, S, H, D/2)
    c, s = cos.to(ct)[None, :, None, :], sin.to(ct)[None, :, None, :]  # (S, D/2) -> (1, S, 1, D/2)
    out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)  # (B, S, H, D/2, 2)
    return out.flatten(-2).to(x.dtype)  # (B, S, H, D)


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    # D = 0 failed in the launch with ZeroDivisionError
    if x.dim() != 4 or x.shape[-1] % 2 or x.shape[-1] == 0:
        raise ValueError(f"x: expected (B, S, H, D) with even D >= 2, got shape {tuple(x.shape)}")
    want = (x.shape[1], x.shape[3] // 2)
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != want:
            raise ValueError(
                f"{name}: expected shape (S, D/2) = {want} for x {tuple(x.shape)}, got {tuple(t.shape)}"
            )
        if t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, expected x's device {x.device}")


# fmt: off
@triton.jit(do_not_specialize=["S", "H"])
def _rope_kernel(X, Y, COS, SIN, S, H, P: tl.constexpr, SIGN: tl.constexpr, BLOCK_S: tl.constexpr,
        BLOCK_P: tl.constexpr):
    """y = R(SIGN * angle) x for BLOCK_S tokens of one batch row, all heads.

    The (BLOCK_S, P) cos/sin rows are read once and reused for every head; each head's (BLOCK_S, 2P) tile
    is one contiguous load, split into even/odd channels in registers, rotated in fp32, joined, stored.
    """
    pid_s, b = tl.program_id(0), tl.program_id(1)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, 2 * BLOCK_P)
    s_ok = offs_s < S
    t_mask = s_ok[:, None] & (offs_p[None, :] < P)
    c = tl.load(COS + offs_s[:, None] * P + offs_p[None, :], mask=t_mask, other=0.0)
    sn = tl.load(SIN + offs_s[:, None] * P + offs_p[None, :], mask=t_mask, other=0.0) * SIGN
    x_mask = s_ok[:, None] & (offs_d[None, :] < 2 * P)
    # S * H * 2P can pass 2^31 in one sample: the tile's first token in int64, the tokens within it int32
    base = (b.to(tl.int64) * S + pid_s * BLOCK_S) * H * (2 * P)
    rows = tl.arange(0, BLOCK_S)
    for h in range(H):
        off = base + (rows[:, None] * H + h) * (2 * P) + offs_d[None, :]
        x = tl.load(X + off, mask=x_mask, other=0.0).to(tl.float32)
        xe, xo = tl.split(tl.reshape(x, (BLOCK_S, BLOCK_P, 2)))  # (BLOCK_S, 2P) -> 2 x (BLOCK_S, P)
        y = tl.reshape(tl.join(xe * c - xo * sn, xe * sn + xo * c), (BLOCK_S, 2 * BLOCK_P))
        tl.store(Y + off, y.to(Y.dtype.element_ty), mask=x_mask)
# fmt: on


def _rope_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    x = x.contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    B, S, H, D = x.shape
    y = torch.empty_like(x)
    block_p = triton.next_power_of_2(D // 2)
    block_s = max(1, min(16, 1024 // block_p))  # 16 tokens x 128 channels, 8 warps: ~56 registers on sm_90
    grid = (triton.cdiv(S, block_s), B)
    _rope_kernel[grid](x, y, cos, sin, S, H, D // 2, sign, BLOCK_S=block_s, BLOCK_P=block_p, num_warps=8)
    return y


# The launch as a torch custom op (opaque to torch.compile: no graph break); its backward (register_autograd)
# is the same op at -angle.
@torch.library.custom_op("wmsd::rope", mutates_args=())
def _rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    return _rope_launch(x, cos, sin, sign)


@_rope_op.register_fake
def _(x, cos, sin, sign):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _rope_setup(ctx, inputs, output) -> None:
    _, cos, sin, sign = inputs
    ctx.save_for_backward(cos, sin)
    ctx.sign = sign


def _rope_backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    return _rope_op(dy, cos, sin, -ctx.sign), None, None, None


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup)


def tables_need_grad(cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """True when autograd wants a gradient for a RoPE table (the Triton kernels treat them as constants)."""
    return torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE of x (B, S, H, D) with tables cos/sin (S, D/2) (Triton, differentiable in x).

    out[2i] = x[2i] cos_i - x[2i+1] sin_i ; out[2i+1] = x[2i] sin_i + x[2i+1] cos_i. The kernel takes the
    tables as constants: tables that require grad (grad mode on), and CPU tensors without
    TRITON_INTERPRET=1, run apply_rope_reference (differentiable in the tables too).
    """
    _check(x, cos, sin)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x: expected float16/bfloat16/float32, got {x.dtype}")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return apply_rope_reference(x, cos, sin)  # no compiled Triton off the GPU: the same math in torch
    if tables_need_grad(cos, sin):  # the custom op gave the tables no gradient, silently
        return apply_rope_reference(x, cos, sin)
    return _rope_op(x, cos, sin, 1.0)
