"""Fused video attention: softmax(q k^T * scale) v, non-causal, optional fused 3D RoPE and key lengths.

Layout q (B, Sq, H, D), k and v (B, Sk, H, D) -> out (B, Sq, H, D); lse (B, H, Sq) float32 is
``log sum_j exp(scale * q.k_j)`` over the valid keys j < k_lengths[b] (natural log).

Forward (FlashAttention-2). One program per (BLOCK_M queries, batch*head). The q tile is loaded once;
the kernel walks BLOCK_N key tiles. Online softmax in base 2 with log2(e) folded into the scale
c = scale * log2(e) > 0: m' = max(m, c rowmax(q.k)), p = 2^(c q.k - m') (one FMA per score),
l' = l 2^(m - m') + rowsum p, acc' = acc 2^(m - m') + p v; out = acc / l, lse = ln2 (m + log2 l).
Full key tiles run unmasked; only the ragged last tile (Sk or k_lengths not a multiple of BLOCK_N)
is masked. With fused RoPE (``fuse_rope=True``) q is rotated in registers in the prologue and each k
tile as it is loaded, so rotated q/k never touch memory; by default RoPE is one kernels.rope pass
first (see FUSE_ROPE). On Hopper the full tiles of the inner loops can come through TMA tensor descriptors
of the (B*S, H*D) matrix instead of pointer loads (see TMA; with "auto" the autotuner picks per shape).

Backward (FA2, P recomputed from lse). delta_i = rowsum(dO_i * O_i). With P = exp(scale q k^T - lse):
dV = P^T dO, dP = dO V^T, dS = P (dP - delta), dQ = scale dS K, dK = scale dS^T Q. One kernel per key
tile accumulates dK, dV over all query tiles; a separate kernel per query tile accumulates dQ over key
tiles, so there are no atomics and gradients are bitwise reproducible. With RoPE the products use the
rotated q/k and the inverse rotation R^T is applied to dQ, dK in the epilogue (gradients w.r.t. the
unrotated inputs).

RoPE pairs are interleaved (kernels/rope.py): out[2i] = x[2i] c_i - x[2i+1] s_i,
out[2i+1] = x[2i+1] c_i + x[2i] s_i. In-kernel the tile is split into even/odd channels in registers
(reshape (BLOCK, D/2, 2) + split), rotated in fp32 with (BLOCK, D/2) rows of the tables, joined back,
and rounded to the input dtype, exactly as rope-then-attention would.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import no_double_backward
from kernels.rope import apply_rope, apply_rope_reference, tables_need_grad

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None

BACKENDS = ("triton", "sdpa", "flash_attn", "te", "torch")
HEAD_DIMS = (16, 32, 64, 128)  # the kernels' tile widths; other head dims up to 128 are zero-padded
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634
# Default of attention(fuse_rope=): RoPE inside the kernels vs one apply_rope pass before them. On an H200
# (bench/results/20261126T123749_*) the separate pass stays within 5% of no RoPE at all, while the fused
# kernels (correct: tests/test_attention.py GPU cases) run at 0.61-0.66x of the plain kernel fwd and
# 0.48-0.50x fwd+bwd (rotating every k tile in every query tile's loop, and again in both backward
# kernels, costs more than the one pass it saves), so the separate pass is the default.
FUSE_ROPE = False
# Tile loads of the kernels' inner loops (k/v tiles in the forward and dQ kernels, q/dO tiles in the dK/dV
# kernel): "off" pointer loads; "on" tensor descriptors (TMA, the Hopper bulk copy engine: no per-element
# address math or predicates, loads issued asynchronously into shared memory; sm_90+); "auto" autotunes
# over both on sm_90+ and uses pointer loads elsewhere. Ragged last tiles always use masked pointer
# loads. Under TRITON_INTERPRET=1 "auto" means "off" (one config) and "on" runs the TMA path. "auto" is the
# default since the H100 run at 23ee8ee (bench/results/20261126_nvidia-h100.md): forward 1.05-1.11x the
# pointer loads at the LTX-2 / Wan / HY shapes (540 / 550 / 572 TFLOP/s), forward+backward within -3%..+2%.
TMA = "auto"
_TMA_FAILED = False  # set when "auto" could not build the TMA configs (warned once, pointer loads after)
# Sizes that vary from video to video are not specialised on (divisibility by 16), so one compiled binary
# per tile config serves every sequence length; the autotuner keys on coarse length buckets.
_NO_SPECIALIZE = ["Sq", "Sk", "H", "Q_BUCKET", "K_BUCKET"]


# fmt: off
@triton.jit
def _rotate(x, offs_s, row_ok, COS, SIN, BLOCK: tl.constexpr, D: tl.constexpr, SIGN: tl.constexpr,
        MASKED: tl.constexpr):
    """R(SIGN * angle) x for a (BLOCK, D) tile, fp32 out, with s' = SIGN * sin:
    x'[2i] = x[2i] c - x[2i+1] s', x'[2i+1] = x[2i] s' + x[2i+1] c.
    cos/sin are read as (BLOCK, D/2) fp32 rows of the tables; the channel pairs are split in registers.
    """
    t_off = offs_s[:, None] * (D // 2) + tl.arange(0, D // 2)[None, :]
    if MASKED:
        c = tl.load(COS + t_off, mask=row_ok[:, None], other=0.0)
        s = tl.load(SIN + t_off, mask=row_ok[:, None], other=0.0) * SIGN
    else:
        c = tl.load(COS + t_off)
        s = tl.load(SIN + t_off) * SIGN
    xe, xo = tl.split(tl.reshape(x.to(tl.float32), (BLOCK, D // 2, 2)))  # (BLOCK, D) -> 2 x (BLOCK, D/2)
    return tl.reshape(tl.join(xe * c - xo * s, xe * s + xo * c), (BLOCK, D))  # -> (BLOCK, D)


@triton.jit
def _rows_at(base, start, offs_s, offs_d, stride_s, BLOCK: tl.constexpr, I64: tl.constexpr):
    """base (a pointer or an int64 offset) + the offsets of rows offs_s = start + arange(BLOCK), channels
    offs_d, of a (S, stride_s) slab. int32 unless I64, which the launcher sets where S * stride_s passes 2^31
    in one sample (~420k tokens at H*D = 5120): then the tile's first row costs one int64 multiply per tile,
    and the rows within it (BLOCK * stride_s, small) stay int32."""
    if I64:
        rows = tl.arange(0, BLOCK)
        return base + tl.cast(start, tl.int64) * stride_s + rows[:, None] * stride_s + offs_d[None, :]
    return base + offs_s[:, None] * stride_s + offs_d[None, :]


@triton.jit
def _load_tile(base, desc, desc_row, desc_col, start, offs_s, offs_d, row_ok, COS, SIN, stride_s,
        BLOCK: tl.constexpr, D: tl.constexpr, ROPE: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr,
        I64: tl.constexpr):
    """Rows offs_s = start + arange(BLOCK) of a (S, stride_s) slab, all D channels, optionally RoPE-rotated
    (input dtype out). A full tile (MASKED off) with TMA on comes through the tensor descriptor ``desc`` of the
    (B*S, H*D) matrix instead, as the block at (desc_row, desc_col) (the Hopper bulk copy engine, no address
    math; int32 coordinates: B*S rows fit)."""
    ptrs = _rows_at(base, start, offs_s, offs_d, stride_s, BLOCK, I64)
    if MASKED:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if TMA:
            x = desc.load([desc_row, desc_col])
        else:
            x = tl.load(ptrs)
    if ROPE:
        x = _rotate(x, offs_s, row_ok, COS, SIN, BLOCK, D, 1.0, MASKED).to(x.dtype)
    return x


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, K, V, KD, VD, row0, col, COS, SIN, start_n, n_end, stride_s, qk_scale,
        D: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr, MASKED: tl.constexpr,
        PRECISION: tl.constexpr, TMA: tl.constexpr, I64: tl.constexpr):
    """One key tile of the online softmax (base 2): returns the updated (acc, m, l)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k_ok = offs_n < n_end
    k = _load_tile(K, KD, row0 + start_n, col, start_n, offs_n, offs_d, k_ok, COS, SIN, stride_s, BLOCK_N, D, ROPE,
        MASKED, TMA, I64)
    v = _load_tile(V, VD, row0 + start_n, col, start_n, offs_n, offs_d, k_ok, COS, SIN, stride_s, BLOCK_N, D,
        False, MASKED, TMA, I64)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N), unscaled
    if MASKED:
        qk = tl.where(k_ok[None, :], qk, float("-inf"))
    # scale > 0, so max(qk * scale) = max(qk) * scale, and the exponent is one FMA per element
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.exp2(tl.fma(qk, qk_scale, -m_new[:, None]))
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)  # accumulates in place
    return acc, m_new, l_i


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_fwd(Q, K, V, KD, VD, O, LSE, COS, SIN, KLEN, Sq, Sk, H, qk_scale, Q_BUCKET, K_BUCKET,
        D: tl.constexpr, ROPE: tl.constexpr, HAS_KLEN: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr, I64: tl.constexpr = False):
    """out = softmax(scale q k^T) v for BLOCK_M queries of one (batch, head); lse alongside."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    stride_s = H * D
    q_base = Q + (b.to(tl.int64) * Sq * H + h) * D
    k_base = K + (b.to(tl.int64) * Sk * H + h) * D
    v_base = V + (b.to(tl.int64) * Sk * H + h) * D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q_ok = offs_m < Sq
    q = _load_tile(q_base, Q, 0, 0, pid_m * BLOCK_M, offs_m, offs_d, q_ok, COS, SIN, stride_s, BLOCK_M, D, ROPE,
        True, False, I64)
    n_end = Sk
    if HAS_KLEN:
        n_end = tl.minimum(tl.maximum(tl.load(KLEN + b), 0), Sk)
    n_full = (n_end // BLOCK_N) * BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    row0, col = b * Sk, h * D  # this (batch, head)'s slab in the (B*Sk, H*D) descriptors
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, KD, VD, row0, col, COS, SIN, start_n, n_end,
            stride_s, qk_scale, D, BLOCK_N, ROPE, False, PRECISION, TMA, I64)
    if n_full < n_end:
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, KD, VD, row0, col, COS, SIN, n_full, n_end,
            stride_s, qk_scale, D, BLOCK_N, ROPE, True, PRECISION, TMA, I64)
    empty = l_i == 0.0  # no valid key: out = 0, lse = -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_base = O + (b.to(tl.int64) * Sq * H + h) * D
    o_ptrs = _rows_at(o_base, pid_m * BLOCK_M, offs_m, offs_d, stride_s, BLOCK_M, I64)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=q_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * Sq + offs_m, lse, mask=q_ok)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, Sq, H, D: tl.constexpr, BLOCK_M: tl.constexpr, I64: tl.constexpr = False):
    """delta_i = sum_d dO_id O_id, fp32, stored (B, H, Sq)."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    ok = offs_m < Sq
    off = _rows_at((b.to(tl.int64) * Sq * H + h) * D, pid_m * BLOCK_M, offs_m, offs_d, H * D, BLOCK_M, I64)
    o = tl.load(O + off, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * Sq + offs_m, tl.sum(o * do, 1), mask=ok)


@triton.jit
def _dkdv_tile(dk, dv, k, v, Q, DO, QD, DOD, row0, col, LSE, DELTA, COS, SIN, start_m, Sq, stride_s, qk_scale,
        D: tl.constexpr, BLOCK_M: tl.constexpr, ROPE: tl.constexpr, MASKED: tl.constexpr,
        PRECISION: tl.constexpr, TMA: tl.constexpr, I64: tl.constexpr):
    """One query tile into dK, dV of a key tile (transposed: rows are keys): dV += P^T dO, dK += dS^T Q."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q_ok = offs_m < Sq
    q = _load_tile(Q, QD, row0 + start_m, col, start_m, offs_m, offs_d, q_ok, COS, SIN, stride_s, BLOCK_M, D, ROPE,
        MASKED, TMA, I64)
    do = _load_tile(DO, DOD, row0 + start_m, col, start_m, offs_m, offs_d, q_ok, COS, SIN, stride_s, BLOCK_M, D,
        False, MASKED, TMA, I64)
    if MASKED:
        lse = tl.load(LSE + offs_m, mask=q_ok, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=q_ok, other=0.0)
    else:
        lse = tl.load(LSE + offs_m)
        delta = tl.load(DELTA + offs_m)
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M), unscaled
    p_t = tl.exp2(tl.fma(s_t, qk_scale, -(lse * 1.4426950408889634)[None, :]))
    if MASKED:
        p_t = tl.where(q_ok[None, :], p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dkdv(Q, K, V, DO, QD, DOD, LSE, DELTA, DK, DV, COS, SIN, KLEN, Sq, Sk, H, scale, qk_scale,
        Q_BUCKET, K_BUCKET, D: tl.constexpr, ROPE: tl.constexpr, HAS_KLEN: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr, I64: tl.constexpr = False):
    """dK, dV of BLOCK_N keys of one (batch, head), looping over all query tiles."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    stride_s = H * D
    q_off = (b.to(tl.int64) * Sq * H + h) * D
    k_off = (b.to(tl.int64) * Sk * H + h) * D
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    n_end = Sk
    if HAS_KLEN:
        n_end = tl.minimum(tl.maximum(tl.load(KLEN + b), 0), Sk)
    k_ok = offs_n < n_end
    n0 = pid_n * BLOCK_N
    k = _load_tile(K + k_off, K, 0, 0, n0, offs_n, offs_d, k_ok, COS, SIN, stride_s, BLOCK_N, D, ROPE, True, False,
        I64)
    v = _load_tile(V + k_off, V, 0, 0, n0, offs_n, offs_d, k_ok, COS, SIN, stride_s, BLOCK_N, D, False, True, False,
        I64)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    m_hi = tl.where(pid_n * BLOCK_N < n_end, Sq, 0)  # a tile of only masked keys gets zero grads
    m_full = (m_hi // BLOCK_M) * BLOCK_M
    lse_ptr, delta_ptr = LSE + bh.to(tl.int64) * Sq, DELTA + bh.to(tl.int64) * Sq
    row0, col = b * Sq, h * D  # this (batch, head)'s slab in the (B*Sq, H*D) descriptors
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, Q + q_off, DO + q_off, QD, DOD, row0, col, lse_ptr, delta_ptr, COS, SIN,
            start_m, Sq, stride_s, qk_scale, D, BLOCK_M, ROPE, False, PRECISION, TMA, I64)
    if m_full < m_hi:
        dk, dv = _dkdv_tile(dk, dv, k, v, Q + q_off, DO + q_off, QD, DOD, row0, col, lse_ptr, delta_ptr, COS, SIN,
            m_full, Sq, stride_s, qk_scale, D, BLOCK_M, ROPE, True, PRECISION, False, I64)
    dk = tl.where(k_ok[:, None], dk * scale, 0.0)  # rows are independent: masked keys get exactly 0
    dv = tl.where(k_ok[:, None], dv, 0.0)
    if ROPE:
        dk = _rotate(dk, offs_n, k_ok, COS, SIN, BLOCK_N, D, -1.0, True)
    ptrs = _rows_at(k_off, n0, offs_n, offs_d, stride_s, BLOCK_N, I64)
    st_ok = (offs_n < Sk)[:, None]
    tl.store(DK + ptrs, dk.to(DK.dtype.element_ty), mask=st_ok)
    tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=st_ok)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, K, V, KD, VD, row0, col, COS, SIN, start_n, n_end, stride_s, qk_scale,
        D: tl.constexpr, BLOCK_N: tl.constexpr, ROPE: tl.constexpr, MASKED: tl.constexpr,
        PRECISION: tl.constexpr, TMA: tl.constexpr, I64: tl.constexpr):
    """One key tile into dQ: P = 2^(s - lse log2 e), dS = P (dO V^T - delta), dQ += dS K."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k_ok = offs_n < n_end
    k = _load_tile(K, KD, row0 + start_n, col, start_n, offs_n, offs_d, k_ok, COS, SIN, stride_s, BLOCK_N, D, ROPE,
        MASKED, TMA, I64)
    v = _load_tile(V, VD, row0 + start_n, col, start_n, offs_n, offs_d, k_ok, COS, SIN, stride_s, BLOCK_N, D,
        False, MASKED, TMA, I64)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N), unscaled
    p = tl.exp2(tl.fma(s, qk_scale, -lse2[:, None]))
    if MASKED:
        p = tl.where(k_ok[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dq(Q, K, V, DO, KD, VD, LSE, DELTA, DQ, COS, SIN, KLEN, Sq, Sk, H, scale, qk_scale, Q_BUCKET,
        K_BUCKET, D: tl.constexpr, ROPE: tl.constexpr, HAS_KLEN: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr, I64: tl.constexpr = False):
    """dQ of BLOCK_M queries of one (batch, head), looping over the valid key tiles."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    stride_s = H * D
    q_off = (b.to(tl.int64) * Sq * H + h) * D
    k_off = (b.to(tl.int64) * Sk * H + h) * D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q_ok = offs_m < Sq
    m0 = pid_m * BLOCK_M
    q = _load_tile(Q + q_off, Q, 0, 0, m0, offs_m, offs_d, q_ok, COS, SIN, stride_s, BLOCK_M, D, ROPE, True, False,
        I64)
    do = _load_tile(DO + q_off, DO, 0, 0, m0, offs_m, offs_d, q_ok, COS, SIN, stride_s, BLOCK_M, D, False, True,
        False, I64)
    lse2 = tl.load(LSE + bh.to(tl.int64) * Sq + offs_m, mask=q_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * Sq + offs_m, mask=q_ok, other=0.0)
    n_end = Sk
    if HAS_KLEN:
        n_end = tl.minimum(tl.maximum(tl.load(KLEN + b), 0), Sk)
    n_full = (n_end // BLOCK_N) * BLOCK_N
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    row0, col = b * Sk, h * D  # this (batch, head)'s slab in the (B*Sk, H*D) descriptors
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, K + k_off, V + k_off, KD, VD, row0, col, COS, SIN, start_n, n_end,
            stride_s, qk_scale, D, BLOCK_N, ROPE, False, PRECISION, TMA, I64)
    if n_full < n_end:
        dq = _dq_tile(dq, q, do, lse2, delta, K + k_off, V + k_off, KD, VD, row0, col, COS, SIN, n_full, n_end,
            stride_s, qk_scale, D, BLOCK_N, ROPE, True, PRECISION, TMA, I64)
    dq = dq * scale
    if ROPE:
        dq = _rotate(dq, offs_m, q_ok, COS, SIN, BLOCK_M, D, -1.0, True)
    tl.store(_rows_at(DQ + q_off, m0, offs_m, offs_d, stride_s, BLOCK_M, I64), dq.to(DQ.dtype.element_ty),
        mask=q_ok[:, None])
# fmt: on


def _set_blocks(nargs: dict) -> None:
    """Autotune pre-hook: each tensor descriptor's block is the config's tile (rows) x D."""
    tiles = {"KD": "BLOCK_N", "VD": "BLOCK_N", "QD": "BLOCK_M", "DOD": "BLOCK_M"}
    for name, tile in tiles.items():
        if TensorDescriptor is not None and isinstance(nargs.get(name), TensorDescriptor):
            nargs[name].block_shape = [nargs[tile], nargs["D"]]


def _configs(gpu: list[tuple[int, ...]], interp: tuple[int, int], tma: bool) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]) tuples -> Configs with TMA loads on or off; one
    config under the interpreter."""
    hook = _set_blocks if tma else None
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": interp[0], "BLOCK_N": interp[1], "TMA": tma}, pre_hook=hook)]
    return [
        triton.Config(
            {"BLOCK_M": m, "BLOCK_N": n, "TMA": tma},
            num_warps=w,
            num_stages=s,
            maxnreg=reg[0] if reg else None,
            pre_hook=hook,
        )
        for m, n, w, s, *reg in gpu
    ]


# Hopper-sized tiles per (kernel, fused RoPE); the first of each list is the fixed config used with
# deterministic=True (and the one measured on an H200). The lists are short because every config is a
# compile (seconds each) on first use; the others were kept for few register spills on sm_90 (ptxas -v,
# Triton 3.6 and 3.9): the dK/dV kernel holds k, v, dK and dV tiles for the whole query loop, and with
# RoPE the rotated operand also passes through registers, so fewer stages fit. Each tile is tried with
# plain pointer loads and with TMA loads (see TMA).
_TILES = {
    # (128, 64, 8, 4) is back: without it the Wan-1.3B forward fell from 499 to 464 TFLOP/s on an H200
    # (the other shapes moved < 3%), so the autotuner had likely picked it there (to confirm on a GPU).
    # Two programs per SM, so that one's softmax can run under the other's wgmma (within one program Triton
    # waits for q k^T before the softmax): (64, 64, 8, 2) uncapped (118-128 registers, 80 KB, no spills), and
    # (128, 64, 8, 2, 128) capped at 128 registers (a 5th element is maxnreg; 96 KB, a few spilled registers:
    # 8-56 bytes in Triton 3.6, up to 88 in 3.9; tests/test_codegen.py); the same for dQ's
    # (64, 64, 8, 2, 128). Not measured on a GPU yet: the autotuner takes them only where faster. They
    # replace the 4-warp configs (128, 32, 4, 3), (64, 64, 4, 2) and dQ's (64, 64, 4, 2), also two per SM,
    # which the H100 run at 23ee8ee never chose at the LTX-2, Wan or HY shapes (attention.configs).
    ("fwd", False): (
        [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 8, 2), (128, 64, 8, 2, 128)],
        (64, 32),
    ),
    ("fwd", True): ([(128, 64, 8, 2), (128, 64, 8, 3)], (64, 32)),
    # (32, 64, 4, 3) dK/dV: two programs per SM without spills (not chosen on the H100 either; 8-warp dK/dV
    # configs capped at 128 registers to fit two per SM spill 240-840 bytes)
    ("dkdv", False): ([(64, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 3)], (32, 64)),
    ("dkdv", True): ([(64, 64, 8, 3)], (32, 64)),
    ("dq", False): ([(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 2, 128)], (64, 32)),
    ("dq", True): ([(64, 64, 8, 3), (128, 32, 8, 3)], (64, 32)),
}
# fp32 inputs on a GPU (debugging, tests) take twice the shared memory per tile: one small config each,
# pointer loads only.
for _kernel, _tiles in (("fwd", (64, 32)), ("dkdv", (32, 64)), ("dq", (64, 32))):
    for _rope in (False, True):
        _TILES[(_kernel, _rope, "fp32")] = ([(*_tiles, 4, 2)], _tiles)
_TUNE_KEY = ["Q_BUCKET", "K_BUCKET", "D", "ROPE", "HAS_KLEN"]
_RAW = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}
_TUNED: dict = {}  # (kernel, rope[, "fp32"], mode) -> autotuner, built on first use


def _config_list(key: tuple, mode: str) -> list[triton.Config]:
    """The configs of a (kernel, rope[, fp32]) key for a TMA mode: "off" pointer loads, "on" TMA loads,
    "auto" both (pointer configs first, so the deterministic config is the pointer one)."""
    gpu, interp = _TILES[key]
    configs = []
    if mode in ("off", "auto"):
        configs += _configs(gpu, interp, False)
    if mode in ("on", "auto") and not (_INTERPRET and configs):
        configs += _configs(gpu, interp, True)
    return configs


def _tuned(key: tuple, mode: str):
    if (key, mode) not in _TUNED:
        _TUNED[(key, mode)] = triton.autotune(_config_list(key, mode), key=_TUNE_KEY)(_RAW[key[0]])
    return _TUNED[(key, mode)]


def tuned_configs() -> dict[str, str]:
    """The config each autotuned attention kernel chose, per tuning key (for benchmark records)."""
    out = {}
    for (key, mode), tuner in _TUNED.items():
        name = "/".join(map(str, key)) + f"/{mode}"
        if len(tuner.configs) == 1:  # nothing to tune: the autotuner keeps no cache
            out[name] = str(tuner.configs[0])
        for tkey, cfg in tuner.cache.items():
            out[f"{name} {tkey}"] = str(cfg)
    return out


def _bucket(n: int) -> int:
    """Autotune key for a sequence length: next power of two, capped (long videos share one tuning)."""
    return min(triton.next_power_of_2(n), 16384)


def _tma_mode(q: torch.Tensor) -> str:
    """Resolve TMA for these inputs: "off", "on" or "auto" (see TMA)."""
    if TMA not in ("auto", "on", "off"):
        raise ValueError(f"kernels.attention.TMA: expected 'auto', 'on' or 'off', got {TMA!r}")
    if TMA == "off" or q.dtype == torch.float32:
        return "off"
    if _INTERPRET:
        return "on" if (TMA == "on" and TensorDescriptor is not None) else "off"
    major, minor = torch.cuda.get_device_capability(q.device)
    supported = TensorDescriptor is not None and major >= 9
    if TMA == "on" and not supported:
        raise ValueError(
            "kernels.attention.TMA = 'on' needs a Hopper-or-newer GPU (sm_90+) and a Triton with "
            f"triton.tools.tensor_descriptor; this device is sm_{major}{minor}"
        )
    if TMA == "auto" and (not supported or _TMA_FAILED):
        return "off"
    return TMA


def _desc(t: torch.Tensor):
    """Tensor descriptor of a contiguous (B, S, H, D) tensor as the (B*S, H*D) matrix; the block shape is set
    per launch (_set_blocks). Rows of one (batch, head) are at (b*S + s, h*D)."""
    B, S, H, D = t.shape
    return TensorDescriptor(t, [B * S, H * D], [H * D, 1], [16, D])


def _launch(
    kernel: str, tile: str, n: int, bh: int, args: tuple, meta: dict, deterministic: bool, mode: str
) -> None:
    """Grid (ceil(n / tile), B*H); autotuned, or the fixed first config when deterministic."""
    key = (kernel, meta["ROPE"]) + (("fp32",) if meta["PRECISION"] == "ieee" else ())
    if deterministic:
        c = _config_list(key, mode)[0]
        if c.pre_hook is not None:  # the TMA configs' descriptor block shapes
            c.pre_hook(dict(zip(_RAW[kernel].arg_names, args), **meta, **c.kwargs))
        grid = (triton.cdiv(n, c.kwargs[tile]), bh)
        _RAW[kernel][grid](*args, **meta, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
    else:
        _tuned(key, mode)[lambda m: (triton.cdiv(n, m[tile]), bh)](*args, **meta)


def _run_modes(launch, q: torch.Tensor, *tensors: torch.Tensor) -> None:
    """launch(mode) with the resolved TMA mode (pointer loads for this call where a tensor's address is not
    16-byte aligned, as TMA needs: a view into a larger buffer); if "auto" fails (a Triton that cannot
    build the TMA configs), warn once and go on with pointer loads for the rest of the process."""
    global _TMA_FAILED
    mode = _tma_mode(q)
    if mode != "off" and any(t.data_ptr() % 16 for t in (q, *tensors)):
        mode = "off"
    if mode != "auto":
        return launch(mode)
    try:
        return launch(mode)
    except Exception as e:  # compile-time failure of a TMA config
        _TMA_FAILED = True
        warnings.warn(
            f"kernels.attention: the TMA configs failed ({type(e).__name__}: {e}); using pointer loads",
            stacklevel=3,
        )
        return launch("off")


def _check_triton(q: torch.Tensor) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            f"q, k, v: backend 'triton' takes float16/bfloat16/float32, got {q.dtype} "
            "(use backend='torch' for float64)"
        )
    if q.shape[-1] > HEAD_DIMS[-1]:
        raise ValueError(f"q: backend 'triton' takes head dim <= {HEAD_DIMS[-1]}, got {q.shape[-1]}")
    if q.device.type != "cuda" and not (_INTERPRET and q.device.type == "cpu"):
        raise ValueError(
            f"q: backend 'triton' needs CUDA tensors (or CPU with TRITON_INTERPRET=1 set before "
            f"import), got device {q.device}"
        )
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:  # the interpreter computes bf16 wrongly
        raise ValueError(
            "q: backend 'triton' on CPU (TRITON_INTERPRET=1) takes float16/float32: Triton's interpreter "
            "gives wrong results in bfloat16; use backend='torch' or 'sdpa' for bf16 on the CPU"
        )


def _slab_i64(S: int, H: int, D: int) -> bool:
    """True where a (B, S, H, D) tensor's per-sample tile offsets, up to (S + a tile) * H * D, pass int32."""
    return (S + 256) * H * D >= 2**31


def _meta(q, k, rope, k_lengths) -> dict:
    return dict(
        D=q.shape[-1],
        ROPE=rope is not None,
        HAS_KLEN=k_lengths is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        I64=_slab_i64(max(q.shape[1], k.shape[1]), q.shape[2], q.shape[3]),
    )


def _pointers(q, cos, sin, k_lengths) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cos, sin, k_lengths with q standing in for absent ones: pointers the kernels never read when
    ROPE / HAS_KLEN are off."""
    return (q if cos is None else cos), (q if sin is None else sin), (q if k_lengths is None else k_lengths)


def _int32_lengths(k_lengths: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Key lengths as the kernels read them: contiguous int32 on q's device (None stays None)."""
    if k_lengths is None:
        return None
    # Clamped into int32 first (the kernels clamp to [0, Sk] themselves): a plain cast wrapped lengths past
    # 2^31 (2^32 + 3 read as 3 keys, not all of them, unlike the torch and sdpa backends)
    k_lengths = k_lengths.to(device=device, dtype=torch.int64).clamp(0, torch.iinfo(torch.int32).max)
    return k_lengths.to(torch.int32).contiguous()


def _attention_fwd(q, k, v, cos, sin, k_lengths, scale, deterministic):
    """Launch the forward; q, k, v contiguous (B, S, H, D). Returns out (B, Sq, H, D), lse (B, H, Sq)."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty((B, H, Sq), device=q.device, dtype=torch.float32)
    meta = _meta(q, k, cos, k_lengths)
    cos, sin, klen = _pointers(q, cos, sin, k_lengths)
    tail = (out, lse, cos, sin, klen, Sq, Sk, H, scale * _LOG2E, _bucket(Sq), _bucket(Sk))

    def launch(mode):
        kd, vd = (k, v) if mode == "off" else (_desc(k), _desc(v))
        _launch("fwd", "BLOCK_M", Sq, B * H, (q, k, v, kd, vd) + tail, meta, deterministic, mode)

    _run_modes(launch, q, k, v)
    return out, lse


def _attention_bwd(do, q, k, v, out, lse, dlse, cos, sin, k_lengths, scale, deterministic):
    """delta = rowsum(dO * O) - dlse, then the dK/dV kernel and the dQ kernel (no atomics)."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    delta = torch.empty_like(lse)
    _attn_bwd_delta[(triton.cdiv(Sq, 64), B * H)](
        out, do, delta, Sq, H, D=D, BLOCK_M=64, I64=_slab_i64(Sq, H, D)
    )
    # d lse_i / d s_ij = P_ij, so lse's gradient joins dS = P (dP - delta) as delta - dlse
    if dlse is not None:
        delta -= dlse
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    meta = _meta(q, k, cos, k_lengths)
    cos, sin, klen = _pointers(q, cos, sin, k_lengths)
    tail = (Sq, Sk, H, scale, scale * _LOG2E, _bucket(Sq), _bucket(Sk))
    dq = torch.empty_like(q)

    def launch(mode):
        qd, dod, kd, vd = (q, do, k, v) if mode == "off" else tuple(map(_desc, (q, do, k, v)))
        args = (q, k, v, do, qd, dod, lse, delta, dk, dv, cos, sin, klen) + tail
        _launch("dkdv", "BLOCK_N", Sk, B * H, args, meta, deterministic, mode)
        args = (q, k, v, do, kd, vd, lse, delta, dq, cos, sin, klen) + tail
        _launch("dq", "BLOCK_M", Sq, B * H, args, meta, deterministic, mode)

    _run_modes(launch, q, k, v, do)
    return dq, dk, dv


# The launches as torch custom ops (opaque to torch.compile: a compiled model keeps them whole, with no graph
# break, and inductor fuses the code around them). register_autograd pairs them for autograd (it, unlike a
# torch.autograd.Function, traces with one tensor passed as several inputs, e.g. attention(x, x, x)).
@torch.library.custom_op("wmsd::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    k_lengths: torch.Tensor | None,
    scale: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k, v) contiguous (B, S, H, D) -> (out, lse)."""
    return _attention_fwd(q, k, v, cos, sin, k_lengths, scale, deterministic)


@_attention_fwd_op.register_fake
def _(q, k, v, cos, sin, k_lengths, scale, deterministic):
    B, Sq, H, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, Sq), dtype=torch.float32)


@torch.library.custom_op("wmsd::attention_bwd", mutates_args=())
def _attention_bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    k_lengths: torch.Tensor | None,
    scale: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dO contiguous (and lse's gradient, or None) -> (dq, dk, dv)."""
    return _attention_bwd(do, q, k, v, out, lse, dlse, cos, sin, k_lengths, scale, deterministic)


@_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, dlse, cos, sin, k_lengths, scale, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup(ctx, inputs, output) -> None:
    q, k, v, cos, sin, k_lengths, scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cos, sin, k_lengths)
    ctx.scale, ctx.deterministic = scale, deterministic
    # lse is differentiable (as in attention_reference; it was marked non-differentiable, and a loss using
    # out and lse silently lost lse's part); unused outputs' gradients come as None, not zeros
    ctx.set_materialize_grads(False)


def _attention_backward(ctx, do, dlse):
    q, k, v, out, lse, cos, sin, k_lengths = ctx.saved_tensors
    do = torch.zeros_like(out) if do is None else do.contiguous()
    dlse = None if dlse is None else dlse.float().contiguous()
    dq, dk, dv = _attention_bwd_op(
        do, q, k, v, out, lse, dlse, cos, sin, k_lengths, ctx.scale, ctx.deterministic
    )
    return dq, dk, dv, None, None, None, None, None


# autograd of the forward op: the backward op
_attention_fwd_op.register_autograd(_attention_backward, setup_context=_attention_setup)


no_double_backward(
    _attention_bwd_op, "attention backend 'triton'", "use backend='torch' for second derivatives"
)


def _pad_head_dim(q, k, v, cos, sin):
    """Zero-pad D up to the next kernel tile width: zero channels add nothing to q.k or to out, and padded
    RoPE pairs get cos 1, sin 0 (identity). Returns the padded tensors and tables."""
    D = q.shape[-1]
    Dp = next(d for d in HEAD_DIMS if d >= D)
    pad = (0, Dp - D)
    q, k, v = (F.pad(t, pad) for t in (q, k, v))  # (B, S, H, D) -> (B, S, H, Dp)
    if cos is not None:
        cos, sin = F.pad(cos, (0, pad[1] // 2), value=1.0), F.pad(sin, (0, pad[1] // 2))  # (S, Dp/2)
    return q, k, v, cos, sin


def _triton(q, k, v, scale, k_lengths, rope, deterministic, fuse_rope):
    _check_triton(q)
    cos = sin = None
    if rope is not None:
        cos, sin = (t.to(device=q.device, dtype=torch.float32).contiguous() for t in rope)
        # one rotation pass (kernels.rope), then the kernel without RoPE; also where the tables need a
        # gradient (the fused kernels take them as constants: it was silently None)
        if not fuse_rope or tables_need_grad(cos, sin):
            (q, k), cos, sin = _rotate_qk(q, k, (cos, sin)), None, None
    D = q.shape[-1]
    if D not in HEAD_DIMS:
        q, k, v, cos, sin = _pad_head_dim(q, k, v, cos, sin)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    k_lengths = _int32_lengths(k_lengths, q.device)
    out, lse = _attention_fwd_op(q, k, v, cos, sin, k_lengths, scale, deterministic)
    return out[..., :D], lse  # (B, Sq, H, Dp) -> (B, Sq, H, D)


def _check_inputs(q, k, v, k_lengths, rope) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected (B, S, H, D), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k, v: expected equal shapes, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[3] == 0:  # the default scale D^-0.5 and the kernels' tiles failed with ZeroDivisionError
        raise ValueError(f"q: expected a head dim D >= 1, got shape {tuple(q.shape)}")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: expected the same B, H and D")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: expected one device, got {q.device}, {k.device}, {v.device}")
    if k_lengths is not None:
        # a list failed with AttributeError; a bool tensor was read as lengths 0 / 1
        ok = isinstance(k_lengths, torch.Tensor)
        if (
            not ok
            or k_lengths.shape != (q.shape[0],)
            or k_lengths.dtype.is_floating_point
            or (k_lengths.dtype in (torch.bool, torch.complex64, torch.complex128))
        ):
            got = f"{k_lengths.dtype} {tuple(k_lengths.shape)}" if ok else type(k_lengths).__name__
            raise ValueError(f"k_lengths: expected an int tensor of shape ({q.shape[0]},), got {got}")
    if rope is not None:
        try:  # one tensor (S, D/2) or a complex freqs_cis failed with "too many values to unpack"
            cos, sin = rope
        except (TypeError, ValueError):
            cos = sin = None
        if not (isinstance(cos, torch.Tensor) and isinstance(sin, torch.Tensor)):
            raise ValueError(
                f"rope: expected a pair (cos, sin) of (S, D/2) tensors, got {type(rope).__name__}"
            )
        if q.shape[1] != k.shape[1]:
            raise ValueError(f"rope: needs self-attention (Sq == Sk), got Sq={q.shape[1]}, Sk={k.shape[1]}")
        if q.shape[3] % 2:
            raise ValueError(f"rope: needs an even head dim, got D={q.shape[3]}")
        want = (q.shape[1], q.shape[3] // 2)
        if tuple(cos.shape) != want or tuple(sin.shape) != want:
            raise ValueError(
                f"rope: expected cos/sin of shape (S, D/2) = {want}, got "
                f"{tuple(cos.shape)} and {tuple(sin.shape)}"
            )


def _key_mask(k_lengths: torch.Tensor, Sk: int) -> torch.Tensor:
    """(B,) lengths -> (B, 1, 1, Sk) boolean, True where a key is valid."""
    return (torch.arange(Sk, device=k_lengths.device)[None, :] < k_lengths[:, None])[:, None, None, :]


def fp32_math(device: torch.device):
    """Autocast off on device: the references' fp32 matmuls ran in bf16 inside an autocast region."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    k_lengths: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch attention, same math and signature; computes in fp32 (fp64 for fp64 inputs).

    out_i = sum_j softmax_j(scale * q_i.k_j) v_j over keys j < k_lengths[b]; rows with no valid key
    give out = 0 and lse = -inf.
    """
    _check_inputs(q, k, v, k_lengths, rope)
    with fp32_math(q.device):
        return _attention_reference(q, k, v, scale, k_lengths, rope, return_lse)


def _attention_reference(q, k, v, scale, k_lengths, rope, return_lse):
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


def _rotate_qk(q, k, rope):
    """RoPE on q and k before a non-fused backend: the Triton kernel on CUDA, the torch reference on CPU."""
    rot = apply_rope if q.is_cuda else apply_rope_reference
    return rot(q, *rope), rot(k, *rope)


def _sdpa(q, k, v, scale, k_lengths, rope):
    if rope is not None:
        q, k = _rotate_qk(q, k, rope)
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
        q, k = _rotate_qk(q, k, rope)
    return flash_attn_func(q, k, v, softmax_scale=scale)


_TE_MODULES: dict = {}  # (heads, head dim, scale, fp8) -> one DotProductAttention, shared by every call
# TE's HYBRID format: E4M3 forward (max 448), E5M2 gradients (max 57344)
_E4M3_MAX, _E5M2_MAX = torch.finfo(torch.float8_e4m3fn).max, torch.finfo(torch.float8_e5m2).max
TE_FP8_MARGIN = 2.0  # headroom over a bound that FP8-rounded operands may exceed slightly


def _te_module(H: int, D: int, scale: float, fp8: bool):
    from kernels.te_loader import import_te

    key = (H, D, scale, fp8)
    if key not in _TE_MODULES:
        te = import_te()
        # outside inference mode even under it: its FP8 scale buffers (never inference tensors) are updated
        # in place by every later call, a training step's too
        with torch.inference_mode(False):
            mod = te.DotProductAttention(
                H, D, qkv_format="bshd", attn_mask_type="no_mask", softmax_scale=scale
            )
            # its FP8 quantizers now, so that the first call finds the scales to set (_te_fp8); not by a
            # forward, which inside TE's checkpoint would leave a stale entry in its queue of saved scales
            if fp8:
                with _te_fp8_autocast():
                    mod.init_fp8_metadata(num_gemms=3)
        _TE_MODULES[key] = mod
    return _TE_MODULES[key]


def _te_fp8_autocast():
    from kernels.te_loader import te_autocast

    if "recipe" not in _TE_MODULES:
        from transformer_engine.common import recipe

        # Delayed scaling is the only FP8 recipe TE 2.20 runs fused (cuDNN) FP8 attention with on sm_90
        # (Float8CurrentScaling and MXFP8 need sm_100); _te_fp8 sets its scales itself, so no amax reduction
        # and the cheapest history (TE's update at an outermost grad-enabled autocast's exit still runs).
        # Nested in the trainer's own TE autocast (precision.fp8 "te"), this one applies inside.
        _TE_MODULES["recipe"] = recipe.DelayedScaling(
            fp8_dpa=True, reduce_amax=False, amax_history_len=1, amax_compute_algo="most_recent"
        )
    return te_autocast(_TE_MODULES["recipe"])


def _max_row_norm(x: torch.Tensor) -> torch.Tensor:  # x (B, S, H, D): max over (b, s, h) of |x[b, s, h, :]|
    return torch.linalg.vector_norm(
        x.detach(), dim=-1, dtype=torch.promote_types(x.dtype, torch.float32)
    ).amax()


def _te_fp8_prepare(q, k, v, scale: float):
    """(q', k', v', scale', c) with softmax(scale' q' k'^T) v' c = softmax(scale q k^T) v in exact arithmetic
    (in bf16 q', k' are rounded once), for FP8: k minus its mean over the keys (a constant per query row, which
    softmax ignores), then q and k times the +-1 Hadamard matrix over D with the scale times D
    (q H (k H)^T / D^2 = q k^T / D); v divided by c, the power of two nearest its largest row norm. Per-tensor
    E4M3 Q and K lose the logits' precision to outlier channels and to a key offset common to every key:
    emulated on the video activations (bench.gpu_attention_fp8.te_fp8_scheme_emulated), the output was 18% off
    without these and 6% with them. v at unit size keeps dV's share of the one scale cuDNN gives dQ, dK and dV
    (its bound Sq max|dO|) independent of v's size: emulated, the same errors with v 1000x or 1/1000 the size
    (before, dV was 13% off at 1000x against 9%)."""
    D = q.shape[-1]
    h = _hadamard_signs(D, q.dtype, q.device) / D  # +-2^-log2(D), exact; |x h| <= max|x|: no fp16 overflow
    k = k - k.mean(dim=1, keepdim=True)
    lo, hi, tiny = _pow2_range(v.dtype)  # c a power of two in v's normal range (fp16: 2^-14 .. 2^15)
    # round half up, as the kernel (:func:`_te_prepass_kernel`; torch.round takes half to even)
    c = torch.exp2(torch.floor(torch.log2(_max_row_norm(v).clamp_min(tiny)) + 0.5).clamp(lo, hi))
    return q @ h, k @ h, v / c.to(v.dtype), scale * D, c


@triton.jit
def _te_prepass_kernel(
    X,
    Y,
    MEANH,
    SIGNS,
    STATS,
    R,
    SH,
    H,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    MODE: tl.constexpr,
    SLOT: tl.constexpr,
    LO: tl.constexpr,
    HI: tl.constexpr,
    TINY: tl.constexpr,
):
    """Backend "te"'s FP8 pre-pass (:func:`_te_fp8_prepare`) on BLOCK rows of D channels of a contiguous
    (B, S, H, D) tensor (R = B*S*H rows; row r is head r % H of sample r // SH): MODE 0 (q) y = x SIGNS / D;
    1 (k) y = (x SIGNS - MEANH[b, h]) / D, MEANH = (key mean) SIGNS fp32 (B, H, D); 2 (v) y = x / c, c =
    2^clamp(round(log2 max(STATS[4], TINY)), LO, HI), also stored into STATS[5]; each stores y in x's dtype
    and max|y| into STATS[SLOT] (atomic max). MODE 3 stores no y: max|x| into STATS[SLOT], the largest row
    norm into STATS[SLOT + 1]. SIGNS is the +-1 Sylvester matrix in x's dtype: x times +-1 is exact, the dot
    accumulates in fp32. STATS: :class:`_TePrepass`."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = (rows < R)[:, None]
    offs_d = tl.arange(0, D)
    offs = rows.to(tl.int64)[:, None] * D + offs_d[None, :]
    x = tl.load(X + offs, mask=ok, other=0.0)
    if MODE == 3:
        xf = x.to(tl.float32)
        tl.atomic_max(STATS + SLOT, tl.max(tl.max(tl.abs(xf), 1), 0))
        tl.atomic_max(STATS + SLOT + 1, tl.max(tl.sqrt(tl.sum(xf * xf, 1)), 0))
    else:
        if MODE == 2:
            e = tl.minimum(tl.maximum(tl.floor(tl.log2(tl.maximum(tl.load(STATS + 4), TINY)) + 0.5), LO), HI)
            # 2^e from its exponent bits: exact (the GPU's exp2 is an approximation), e within fp32's normals
            c = ((e.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
            tl.store(STATS + 5, c)
            y = x.to(tl.float32) / c
        else:
            signs = tl.load(SIGNS + offs_d[:, None] * D + offs_d[None, :])
            if X.dtype.element_ty == tl.float32:
                y = tl.dot(x, signs, input_precision="ieee")
            else:
                y = tl.dot(x, signs, out_dtype=tl.float32)
            if MODE == 1:
                bh = (rows // SH) * H + rows % H
                y -= tl.load(MEANH + bh.to(tl.int64)[:, None] * D + offs_d[None, :], mask=ok, other=0.0)
            y = y / D
        y = y.to(Y.dtype.element_ty)
        tl.store(Y + offs, y, mask=ok)
        tl.atomic_max(STATS + SLOT, tl.max(tl.max(tl.abs(y.to(tl.float32)), 1), 0))


@triton.jit
def _te_fwd_scales_kernel(STATS, QKV, S, O, FMAX: tl.constexpr, MARGIN: tl.constexpr):
    """From :class:`_TePrepass`'s STATS: v''s largest row norm into STATS[6]; the scales of Q/K/V (one, from
    max|q'|, max|k'|, max|v'|), softmax P (FMAX: P <= 1) and O (from max|v'|: O is a convex combination of
    v''s rows) into QKV, S, O (:func:`_te_fp8`)."""
    vmax = tl.load(STATS + 2)
    amax = tl.maximum(tl.maximum(tl.load(STATS), tl.load(STATS + 1)), vmax)
    tl.store(STATS + 6, tl.load(STATS + 4) / tl.load(STATS + 5))
    tl.store(QKV, FMAX / tl.maximum(amax, 1e-30))
    tl.store(S, FMAX)
    tl.store(O, FMAX / tl.maximum(MARGIN * vmax, 1e-30))


@triton.jit
def _te_bwd_scales_kernel(STATS, GSTATS, DO, DP, DQKV, scale, Sq, FMAX: tl.constexpr, MARGIN: tl.constexpr):
    """From :class:`_TePrepass`'s STATS (completed by :func:`_te_fwd_scales_kernel`) and GSTATS [max|dO|, dO's
    largest row norm]: the scales of dO, dP/dS and dQ/dK/dV (one) from :func:`te_fp8_backward_bounds`'s
    bounds."""
    qmax, kmax, v_row = tl.load(STATS), tl.load(STATS + 1), tl.load(STATS + 6)
    g_max, g_row = tl.load(GSTATS), tl.load(GSTATS + 1)
    ds = 2 * g_row * v_row
    dqkv = tl.maximum(tl.maximum(scale * ds * kmax, Sq * scale * ds * qmax), Sq * g_max)
    tl.store(DO, FMAX / tl.maximum(g_max, 1e-30))
    tl.store(DP, FMAX / tl.maximum(MARGIN * ds, 1e-30))
    tl.store(DQKV, FMAX / tl.maximum(MARGIN * dqkv, 1e-30))


def _pow2_range(dtype: torch.dtype) -> tuple[float, float, float]:
    """(log2 of the smallest normal, floor log2 of the largest finite, smallest normal) of ``dtype``: the range
    of c, the power of two v is divided by (v / c exact, c finite)."""
    info = torch.finfo(dtype)
    return math.log2(info.tiny), float(math.floor(math.log2(info.max))), info.tiny


def _te_prepass(
    x: torch.Tensor, mode: int, stats: torch.Tensor, slot: int, meanh=None
) -> torch.Tensor | None:
    """One :func:`_te_prepass_kernel` launch over contiguous x (B, S, H, D); returns y (modes 0-2)."""
    B, S, H, D = x.shape
    y = torch.empty_like(x) if mode != 3 else None
    lo, hi, tiny = _pow2_range(x.dtype)
    block = 64 if D <= 128 else 32
    launch = {} if _INTERPRET else dict(num_warps=4, num_stages=1)
    _te_prepass_kernel[(triton.cdiv(B * S * H, block),)](
        x, x if y is None else y, stats if meanh is None else meanh, x if mode >= 2 else
        _hadamard_signs(D, x.dtype, x.device), stats, B * S * H, S * H, H, D=D, BLOCK=block, MODE=mode,
        SLOT=slot, LO=lo, HI=hi, TINY=tiny, **launch,
    )  # fmt: skip
    return y


def _hadamard_signs(
    D, dtype, device
):  # kernels.attention_fp8's (it imports this module: no top-level import)
    from kernels.attention_fp8 import hadamard_signs

    return hadamard_signs(D, dtype, device)


class _TePrepass(torch.autograd.Function):
    """:func:`_te_fp8_prepare` in four launches of :func:`_te_prepass_kernel` (the key mean and its rotation
    two more), filling ``stats`` (fp32, STATS_LEN zeros): [0] max|q'|, [1] max|k'|, [2] max|v'|, [3] max|v|,
    [4] v's largest row norm, [5] c; later [6] v''s largest row norm (:func:`_te_fwd_scales_kernel`).
    Backward: dq = dq' Hs / D, dk the same less its mean over the keys, dv = dv' / c (Hs is symmetric)."""

    STATS_LEN = 7

    @staticmethod
    def forward(ctx, q, k, v, stats):
        from kernels.attention_fp8 import key_mean

        q, k, v = (t.contiguous() for t in (q, k, v))
        D = q.shape[-1]
        meanh = (key_mean(k, None)[:, 0] @ _hadamard_signs(D, torch.float32, k.device)).contiguous()
        _te_prepass(v, 3, stats, 3)  # max|v|, v's largest row norm: c, before v / c
        outs = _te_prepass(q, 0, stats, 0), _te_prepass(k, 1, stats, 1, meanh), _te_prepass(v, 2, stats, 2)
        ctx.stats = stats
        return outs

    @staticmethod
    def backward(ctx, dq, dk, dv):
        D = dq.shape[-1]
        h = _hadamard_signs(D, dq.dtype, dq.device) / D
        dk = dk @ h
        return dq @ h, dk - dk.mean(dim=1, keepdim=True), dv / ctx.stats[5].to(dv.dtype), None


def te_fp8_backward_bounds(g_max, g_row, v_row, qmax, kmax, scale: float, Sq: int):
    """(bound on |dP| and |dS|, bound on |dQ|, |dK| and |dV|) of attention softmax(scale q k^T) v, from
    max|dO|, the largest row norm of dO and of v, max|q| and max|k| (post-RoPE) and the query count Sq
    (:func:`_te_fp8`; tested against autograd's gradients in tests/test_attention.py)."""
    ds = 2 * g_row * v_row
    dqkv = torch.maximum(torch.maximum(scale * ds * kmax, Sq * scale * ds * qmax), Sq * g_max)
    return ds, dqkv


def _te_fp8(q, k, v, scale):
    """cuDNN's FP8 attention through TE (DelayedScaling with fp8_dpa), every scale set from this call's
    tensors. TE's delayed scales come from amaxes seen before: they start at 1, move only at the exit of an
    outermost grad-enabled autocast (never in a no-grad sampler), the backward's only in a TE Linear's
    backward (never for attention alone), and one module shared by every layer would carry one layer's
    scales into the next; measured as TE leaves them (H200), out was 15% and dq 58% off. Here, before the
    forward: Q, K, V's (one scale) from their amax; softmax P's 448 (P <= 1); O's from max|v| (O is a convex
    combination of v's rows). TE keeps a copy of P's scale for the call's backward. Before this call's backward
    (a hook on the output, which runs just before it): dO's from its amax; dP's and dQ/dK/dV's (one scale)
    from bounds: |dP_ij|, |dS_ij| <= 2 |dO_i| max_j |v_j| (Cauchy-Schwarz, |dO_i . O_i| <= |dO_i| max |v_j|),
    |dQ| <= scale 2 max|dO_i| max|v_j| max|k|, |dK| <= Sq scale 2 max|dO_i| max|v_j| max|q|,
    |dV| <= Sq max|dO| (softmax columns sum to at most Sq). A bound loose by Sq (2^15 at Wan's 32,760 tokens)
    fits in E5M2's 30 binades of normal range unless dV is far smaller than dK (cuDNN gives dQ, dK, dV one
    scale; :func:`_te_fp8_prepare` brings v to unit size for that). All on the device, no host sync."""
    from transformer_engine.pytorch.cpp_extensions.fused_attn import (
        META_DO,
        META_DP,
        META_DQKV,
        META_O,
        META_QKV,
        META_S,
    )

    B, Sq, H, D = q.shape
    stats = torch.zeros(_TePrepass.STATS_LEN, device=q.device, dtype=torch.float32)
    q, k, v = _TePrepass.apply(q, k, v, stats)
    scale = scale * D  # q H (k H)^T = q k^T / D with H the +-1 matrix over D (_te_fp8_prepare)
    mod = _te_module(H, D, scale, True)
    fwd, bwd = mod.quantizers["scaling_fwd"], mod.quantizers["scaling_bwd"]  # views of TE's scale buffers
    with _te_fp8_autocast():
        _te_fwd_scales_kernel[(1,)](
            stats,
            fwd[META_QKV].scale,
            fwd[META_S].scale,
            fwd[META_O].scale,
            FMAX=_E4M3_MAX,
            MARGIN=TE_FP8_MARGIN,
        )
        out = mod(q, k, v)  # (B, S, H*D)
    if out.requires_grad:  # the hook keeps the stats (28 bytes) and shapes

        def set_backward_scales(grad):
            gstats = torch.zeros(2, device=grad.device, dtype=torch.float32)
            _te_prepass(grad.contiguous().view(B, Sq, H, D), 3, gstats, 0)
            _te_bwd_scales_kernel[(1,)](
                stats, gstats, bwd[META_DO].scale, bwd[META_DP].scale, bwd[META_DQKV].scale, scale, Sq,
                FMAX=_E5M2_MAX, MARGIN=TE_FP8_MARGIN,
            )  # fmt: skip
            return grad

        out.register_hook(set_backward_scales)
    return out.view(B, Sq, H, D) * stats[5]  # times c (a power of two: exact), v / c undone


@torch.compiler.disable  # TE's modules are graph breaks anyway: their making, the FP8 hook stay eager
def _te(q, k, v, scale, k_lengths, rope, fp8=False):
    if k_lengths is not None:
        fix = "model.fp8_attention_backend 'triton'" if fp8 else "backend 'triton' or 'sdpa'"
        raise ValueError(
            "attention backend 'te': k_lengths is not supported (keys padded per sample, e.g. texts of different "
            f"lengths in one batch); use {fix}"
        )
    try:
        from kernels.te_loader import import_te

        import_te()
    except (ImportError, RuntimeError, OSError) as e:
        raise RuntimeError(f"attention backend 'te': transformer_engine is not usable here ({e})") from e
    if rope is not None:
        q, k = _rotate_qk(q, k, rope)
    if not fp8:
        out = _te_module(q.shape[2], q.shape[3], scale, False)(q, k, v)  # (B, S, H*D)
        return out.view(q.shape)  # (B, S, H*D) -> (B, S, H, D)
    return _te_fp8(q, k, v, scale)


def attention_te_fp8(q, k, v, *, scale=None, k_lengths=None, rope=None, return_lse=False) -> torch.Tensor:
    """attention(backend="te", precision="fp8"): cuDNN's FP8 attention through Transformer Engine, after the
    exact transforms of our FP8 kernel's pre-pass (:func:`_te_fp8_prepare`), with every scale set from the
    call's tensors (:func:`_te_fp8`); q, k, v bf16 or fp16 (B, S, H, D), D a power of two."""
    _check_inputs(q, k, v, k_lengths, rope)
    if return_lse:
        raise ValueError("return_lse: supported by backends 'triton' and 'torch', not 'te'")
    D = q.shape[-1]
    if D < 16 or D & (D - 1):  # the pre-pass's Hadamard product runs on tensor cores (16-wide)
        raise ValueError(f"q: backend 'te' in FP8 takes a head dim that is a power of two >= 16, got {D}")
    scale = D**-0.5 if scale is None else float(scale)
    return _te(q, k, v, scale, k_lengths, rope, fp8=True)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    k_lengths: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    deterministic: bool = False,
    return_lse: bool = False,
    backend: str = "triton",
    fuse_rope: bool = FUSE_ROPE,
    precision: str = "bf16",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(rope(q) rope(k)^T * scale) v over keys j < k_lengths[b]; q (B, Sq, H, D) -> (B, Sq, H, D).

    scale defaults to D^-0.5. rope: None or (cos, sin) tables (S, D/2) from kernels.rope, applied to q
    and k (needs Sq == Sk). return_lse adds lse (B, H, Sq) float32 (triton and torch backends only).
    backend: "triton" (ours), "sdpa", "flash_attn", "te", or "torch" (the reference).
    triton only: fuse_rope rotates q/k inside the attention kernels instead of one apply_rope pass first;
    deterministic uses one fixed tile config (no autotuning), so results are bitwise reproducible across
    processes (the kernels never use atomics, so repeated calls in one process always are).
    precision: "bf16" (the input dtype), or "fp8" (kernels.attention_fp8: the FP8 kernel for "triton", its
    pure-torch emulation for "torch", cuDNN's FP8 attention through TE for "te"; "sdpa", "flash_attn" and
    unsupported inputs warn once and run bf16).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if precision not in ("bf16", "fp8"):
        raise ValueError(f"precision: expected 'bf16' or 'fp8', got {precision!r}")
    # > 0: the kernels' running max assumes it (the FP8 one too); finite: scale = inf passed and gave NaN
    # (triton, sdpa) or an arbitrary output (torch)
    if scale is not None and not 0 < float(scale) < float("inf"):
        raise ValueError(f"scale: expected a positive number (finite), got {scale}")
    if precision == "fp8":
        from kernels.attention_fp8 import attention_fp8_dispatch

        return attention_fp8_dispatch(
            q, k, v, scale=scale, k_lengths=k_lengths, rope=rope, return_lse=return_lse, backend=backend
        )
    _check_inputs(q, k, v, k_lengths, rope)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "torch":
        return attention_reference(
            q, k, v, scale=scale, k_lengths=k_lengths, rope=rope, return_lse=return_lse
        )
    if backend == "triton":
        out, lse = _triton(q, k, v, scale, k_lengths, rope, deterministic, fuse_rope)
        return (out, lse) if return_lse else out
    if return_lse:
        raise ValueError(f"return_lse: supported by backends 'triton' and 'torch', not {backend!r}")
    fn = {"sdpa": _sdpa, "flash_attn": _flash_attn, "te": _te}[backend]
    return fn(q, k, v, scale, k_lengths, rope)
