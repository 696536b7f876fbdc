"""FP8 video attention with a backward pass: softmax(scale q k^T) v with e4m3 operands, fp32 accumulation.

Same layout and contract as kernels.attention: q (B, Sq, H, D), k and v (B, Sk, H, D) -> out (B, Sq, H, D)
in the input dtype; lse (B, H, Sq) float32 (natural log), optional k_lengths and 3D RoPE.

Quantisation (the pre-pass; the same scheme in the kernel path and the emulation).
E4M3 = float8 e4m3fn, max 448, 3 mantissa bits, round-to-nearest-even, saturating.
- K is smoothed first: k' = k - mean_j k_j (per batch, head, channel, over the valid keys). Softmax is
  invariant to the per-query constant q.mean(k) this removes, so the forward is unchanged in exact
  arithmetic, and the channel offsets of post-RMSNorm keys no longer eat the e4m3 range.
- q and k' are then rotated by the orthonormal Hadamard matrix H (D x D): q H (k' H)^T = q k'^T, and a
  channel outlier (post-norm q/k gains of ~10x in a few channels) is spread over all D channels. e4m3's
  error is relative per element, so the logit error is ~ eps sqrt(sum_c q_c^2 k_c^2): with outliers that
  sum is dominated by the outlier channels, after H it is ~|q|^2 |k|^2 / D (measured: 2-4x less error).
- Per block of QUANT_BLOCK = 128 tokens of one (batch, head): s_x = amax|x_blk| / 448 (1 where the block is
  all zero), x8 = E4M3(clamp(x / s_x, +-448)). Sequences are zero-padded to a multiple of 128.
- V is also stored transposed, (B, H, D, S), so the PV product reads a K-major operand.
- Kernel path: one fused Triton kernel per tensor (:func:`quantize_blocks_fused`; q, k, v and the
  backward's dO), one program per (block, b h): one read of x in its dtype, minus the K mean (computed by
  :func:`key_mean` in torch), times H (one tensor-core dot of x by the +-1 matrix, exact products and fp32
  sums, the mean subtracted after it in the rotated basis), block amax, scale, the e4m3 cast, one write of
  x8 and the scale. The emulation keeps the pure-torch :func:`quantize_blocks` (after
  :func:`smooth_keys` and an fp32 matmul by H). The two differ only in the rotation's fp32 summation
  order: scales to ~1 ulp, and an occasional e4m3 rounding tie one step apart (without the rotation they
  are bit-identical).
Forward (FA2 online softmax, base 2), per query tile i and key tile j (BLOCK_N = QUANT_BLOCK):
    s = (q8_i k8_j^T) * (s_q,i * s_k,j * scale * log2 e)          # fp32 accumulate
    m' = max(m, rowmax s); p = 2^(s - m'); l' = l 2^(m - m') + rowsum p  # l from fp32 p, fp32 adds
    w_j = max(s_v,j, 2^-80 max_{t <= j} s_v,t)                      # V unit of tile j (clamped)
    acc' = acc 2^(m - m') + (E4M3(448 p) v8_j) * (w_j / 448)        # P: fixed scale 448 (p <= 1)
    out = acc / l; lse = ln2 (m + log2 l)
  P is quantised relative to the running max m', exactly as in the kernel; the emulation replays the
  same key tiling so that it is bit-for-bit the same scheme. The kernel keeps acc in units of w_j / 448,
  so that the product accumulates in place (one wgmma onto the rescaled accumulator, async on Hopper):
  a' = E4M3(448 p) v8_j + a 2^(m - m') (w_{j-1} / w_j), out = a w_last / (448 l). The clamp bounds
  w_{j-1} / w_j by 2^80, so |a| <= 448^2 Sk 2^80 stays finite in fp32; w_j != s_v,j only for a V block
  whose amax is below 2^-80 of an earlier block's (its contribution is then overstated, negligibly).
  The kernels form 448 p directly, 2^(raw c - (m' - log2 448)) with raw = q8 k8^T and c = s_q s_k scale
  log2 e (one FMA per element; the forward keeps l as 448 l): the same numbers up to fp32 rounding, and
  ~20% fewer instructions per tile in the forward than scaling s and p by separate multiplies (the
  forward's softmax is bound by instruction issue on Hopper, not by the tensor cores: bench/codegen.py).
Backward (P recomputed from lse with the same q8, k8): P = 2^(s - lse log2 e), delta = rowsum(dO o).
    dV = E4M3(448 P r)^T dO8 * (s_ref / 448)   FP8: dO quantised per 128-query block (as V, fused kernel)
      r = clamp(s_dO / s_ref, 2^-80, 1) per query block, s_ref = amax |dO| / 448 per (b, h) (the largest
      nonzero block's scale): the dO block scale rides in P's exponent (P r <= 1, so 448 P r fits e4m3),
      and dV accumulates in place in one unit without the per-tile rescale the forward's acc needs (64
      multiplies per thread and tile fewer); the cost is that P r's e4m3 subnormal range starts 1 / r
      higher in a block with r < 1, an absolute error floor the same for every block (the largest block's)
    dP = dO V^T                               bf16 by default; FP8 (dO8 v8) with bwd_fp8_dp=True, which the
                                              models' path (attention(precision="fp8")) sets by default
                                              (fp8_backward_products)
    dS = P (dP - delta)
    dQ = scale dS (K - mean K), dK = scale dS^T Q      bf16 by default; with bwd_fp8_dqdk=True FP8:
    dQ = scale (FP8(dS) k8) H^T, dK = scale (FP8(dS)^T q8) H^T
  FP8(dS) (ds_format e4m3 or e5m2, :func:`quantize_groups`): one dynamic scale per row of G = block/2
  entries along the product's reduction dim (keys for dQ, queries for dK; the dQ kernel's BLOCK_N and the
  dK/dV kernel's BLOCK_M are G, so a group is one tile row): a = max(amax, 1e-30), FP8(clamp(dS fmax / a))
  times a / fmax. The other operands are the forward's q8, k8 (smoothed, Hadamard-rotated, e4m3 per 128
  tokens), read through transposed copies (B, H, D, S) so that both FP8 operands are K-major; the kernels
  write the rotated dQ, dK in fp32 and the launcher multiplies by H^T = H (symmetric, orthonormal).
  Measured: the error this adds comes from the e4m3 q8/k8 operands, not from dS (docs/FP8_ATTENTION.md).
  The gradients treat the quantisation as the identity (straight-through); with K smoothing dK is exact
  since sum_j dS_ij = 0. The bf16 dQ, dK use the unquantised q, k (RoPE-rotated, not Hadamard-rotated),
  and dQ the smoothed keys, dS (K - mean K) = dS K - rowsum(dS) mean K: the true rowsum is 0, the FP8
  one is not, and with a large key offset that term was most of dQ's error (measured: 9.7% -> 6.7%).
  K - mean K is formed in fp32 and rounded to the input dtype once per backward (:func:`smoothed_keys_lp`),
  and the dQ kernel multiplies dS by it (no per-tile row sum of dS: ~100 fewer instructions per tile).
Kernels: one forward kernel, one dK/dV kernel (per key tile, loops over query tiles), one dQ kernel (per
query tile), no atomics. Under TRITON_INTERPRET=1 (CPU) float8 is not available: the quantised operands
travel in float16 (every e4m3 and e5m2 value is exact in fp16) and the in-kernel P and dS rounding is an
exact bit-level rounding (_round_fp8), so the CPU tests compare the same kernel against the emulation.
Fallback: head dims other than 64/128, fp32/fp64 inputs on CUDA, a GPU without FP8 (sm < 8.9), or a sample
whose (S + 128) * H * D elements pass the kernels' int32 offsets (2^31) run the bf16 kernel with a one-time
warning.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import no_double_backward
from kernels.attention import _attn_bwd_delta, _bucket, _slab_i64, fp32_math
from kernels.rope import apply_rope, apply_rope_reference

E4M3_MAX = 448.0
QUANT_BLOCK = 128
FP8_HEAD_DIMS = (64, 128)
_LOG2E = 1.4426950408889634
# log2(E4M3_MAX): 2^(x + LOG2_448) = 448 2^x, the quantised P's scale carried in the exponent (kernels)
LOG2_448 = tl.constexpr(8.807354922057604)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BWD_MATMULS = ("dv", "dp", "dqdk")  # backward products that can run in FP8 (kernel and emulation)
# dS formats (torch dtype, largest finite value): e4m3 (3 mantissa bits) or e5m2 (2 bits, wider range)
FP8_FORMATS = {"e4m3": (torch.float8_e4m3fn, E4M3_MAX), "e5m2": (torch.float8_e5m2, 57344.0)}
_DS_TINY = 1e-30  # floor of a dS group's amax (an all-zero group: any finite scale gives zeros)
# the forward's P V accumulator unit >= this times the largest V scale so far, and the dK/dV kernel's dO block
# ratio r >= this (kernels and emulation)
_UNIT_CLAMP = tl.constexpr(2.0**-80)


@triton.jit
def _round_fp8(x, E5M2: tl.constexpr):
    """Interpreter only: fp32 x with |x| <= the format's max -> nearest e4m3 (or e5m2) value, ties to even.

    Normals (|x| >= 2^-6, e5m2 2^-14): keep 3 (2) mantissa bits of the fp32 pattern, round-half-even.
    Subnormals: multiples of 2^-9 (2^-16), rounded with the 2^23 magic-number trick.
    """
    ax = tl.abs(x)
    bits = ax.to(tl.int32, bitcast=True)
    if E5M2:
        normal = ((bits + 0xFFFFF + ((bits >> 21) & 1)) & -2097152).to(tl.float32, bitcast=True)
        r = tl.where(ax >= 6.103515625e-05, normal, ((ax * 65536.0 + 8388608.0) - 8388608.0) / 65536.0)
    else:
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        r = tl.where(ax >= 0.015625, normal, ((ax * 512.0 + 8388608.0) - 8388608.0) / 512.0)
    return tl.where(x < 0, -r, r)


@triton.jit
def _e4m3_p448(p448, P_DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """E4M3 of 448 p given already scaled (0 <= p448 <= 448, saturating), in the operand dtype."""
    if EMULATE:
        return _round_fp8(tl.minimum(p448, 448.0), False).to(P_DTYPE)
    return p448.to(P_DTYPE)


@triton.jit
def _quant_ds(ds, E5M2: tl.constexpr, EMULATE: tl.constexpr):
    """dS (R, G) -> (FP8(clamp(ds * fmax / a, +-fmax)), a / fmax) with a = max(rowmax |ds|, 1e-30): one
    scale per row of G entries, G the product's reduction dim (quantize_groups does the same in torch)."""
    if E5M2:
        fmax = 57344.0
    else:
        fmax = 448.0
    a = tl.maximum(tl.max(tl.abs(ds), 1), 1e-30)
    y = ds * tl.div_rn(tl.full(a.shape, fmax, tl.float32), a)[:, None]
    y = tl.minimum(tl.maximum(y, -fmax), fmax)
    if EMULATE:
        y8 = _round_fp8(y, E5M2).to(tl.float16)
    elif E5M2:
        y8 = y.to(tl.float8e5)
    else:
        y8 = y.to(tl.float8e4nv)
    return y8, a / fmax


@triton.jit
def _fwd_step(
    acc,
    m_i,
    l_i,
    w,
    w_max,
    q,
    sq,
    k_ptr,
    v_ptr,
    SK,
    SV,
    start_n,
    n_end,
    D: tl.constexpr,
    EMULATE: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    V_T: tl.constexpr,
):
    """One key tile of the online softmax: s = q8 k8^T s_q s_k, P448 = 448 2^(s - m'), l' = l 2^(m - m') +
    rowsum P448 (l in units of 1/448, fp32 adds), w' = max(s_v, max s_v 2^-80), acc' = E4M3(P448) v8 + acc
    2^(m - m') w / w' (in place: acc in units of w / 448, module doc). The score scale s_q s_k and the 448 ride
    in the exponent's one FMA per element (raw * c - (m' - log2 448)) instead of two multiplies per element.
    The row sums stay off the tensor cores: Hopper's FP8 wgmma accumulates in ~22 bits (13 mantissa bits,
    SageAttention2), and a row sum carried across key tiles in it drops the small P's (an H100 at 3f3fc34:
    out error 5.4% -> 5.6%, every gradient worse; docs/FP8_ATTENTION.md)."""
    t = start_n // BLOCK_N
    k = tl.load(k_ptr + start_n * D)
    c = sq * tl.load(SK + t)  # > 0: max(raw * c) = max(raw) * c
    raw = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N) fp32: s = raw * c
    if MASKED:
        raw = tl.where((start_n + tl.arange(0, BLOCK_N) < n_end)[None, :], raw, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(raw, 1) * c)
    p448 = tl.exp2(tl.fma(raw, c, -(m_new - LOG2_448)[:, None]))
    alpha = tl.exp2(m_i - m_new)
    sv = tl.load(SV + t)
    w_max = tl.maximum(w_max, sv)
    w_new = tl.maximum(sv, w_max * _UNIT_CLAMP)  # w / w_new <= 2^80
    fac = alpha * (w / w_new)
    if V_T:
        vt = tl.load(v_ptr + start_n)  # (D, BLOCK_N): keys contiguous, a K-major operand for p v
        acc = tl.dot(_e4m3_p448(p448, vt.dtype, EMULATE), tl.trans(vt), acc * fac[:, None])
    else:
        v = tl.load(v_ptr + start_n * D)  # (BLOCK_N, D): channels contiguous
        acc = tl.dot(_e4m3_p448(p448, v.dtype, EMULATE), v, acc * fac[:, None])
    l_i = l_i * alpha + tl.sum(p448, 1)
    return acc, m_new, l_i, w_new, w_max


@triton.jit
def _fp8_fwd(
    Q8,
    K8,
    V8T,
    SQ,
    SK,
    SV,
    O,
    LSE,
    KLEN,
    Sq,
    Sk,
    SQP,
    SKP,
    H,
    qk_scale,
    Q_BUCKET,
    K_BUCKET,
    D: tl.constexpr,
    QBLK: tl.constexpr,
    HAS_KLEN: tl.constexpr,
    EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    V_T: tl.constexpr = True,
):
    """out = softmax(s) v for BLOCK_M queries of one (b, h); s = q8 k8^T s_q s_k scale log2e (module doc).

    Q8, K8 (B, H, S_pad, D) and V8T (B, H, D, S_pad; with V_T=False: V8 (B, H, S_pad, D)) are padded:
    loads need no masks, only the last key tile's scores are masked. BLOCK_N == QUANT_BLOCK, so s_k, s_v
    are one scalar per key tile.
    """
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(Q8 + (bh.to(tl.int64) * SQP + offs_m[:, None]) * D + offs_d[None, :])
    sq = tl.load(SQ + bh * (SQP // QBLK) + (pid_m * BLOCK_M) // QBLK) * qk_scale
    k_ptr = K8 + bh.to(tl.int64) * SKP * D + offs_n[:, None] * D + offs_d[None, :]  # (BLOCK_N, D)
    if V_T:
        v_ptr = V8T + bh.to(tl.int64) * D * SKP + offs_d[:, None] * SKP + offs_n[None, :]  # (D, BLOCK_N)
    else:
        v_ptr = V8T + bh.to(tl.int64) * SKP * D + offs_n[:, None] * D + offs_d[None, :]  # (BLOCK_N, D)
    s_base = bh * (SKP // BLOCK_N)
    n_end = Sk
    if HAS_KLEN:
        n_end = tl.minimum(tl.maximum(tl.load(KLEN + b), 0), Sk)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # 448 l
    acc = tl.zeros([BLOCK_M, D], tl.float32)  # in units of w / 448 (module doc)
    w = tl.full([], 0.0, tl.float32)  # the current tile's V unit (first tile: acc 0 rescaled by 0 / w)
    w_max = tl.full([], 0.0, tl.float32)  # running max of s_v
    n_full = (n_end // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i, w, w_max = _fwd_step(
            acc,
            m_i,
            l_i,
            w,
            w_max,
            q,
            sq,
            k_ptr,
            v_ptr,
            SK + s_base,
            SV + s_base,
            start_n,
            n_end,
            D,
            EMULATE,
            False,
            BLOCK_N,
            V_T,
        )
    if n_full < n_end:
        acc, m_i, l_i, w, w_max = _fwd_step(
            acc,
            m_i,
            l_i,
            w,
            w_max,
            q,
            sq,
            k_ptr,
            v_ptr,
            SK + s_base,
            SV + s_base,
            n_full,
            n_end,
            D,
            EMULATE,
            True,
            BLOCK_N,
            V_T,
        )
    empty = l_i == 0.0  # no valid key: out = 0, lse = -inf (l_i is 448 l)
    out = acc * (w / tl.where(empty, 1.0, l_i))[:, None]
    lse = tl.where(
        empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i)) - LOG2_448) * 0.6931471805599453
    )
    q_ok = offs_m < Sq
    o_ptrs = O + (b.to(tl.int64) * Sq * H + h) * D + offs_m[:, None] * (H * D) + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=q_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * Sq + offs_m, lse, mask=q_ok)


@triton.jit
def _rows(base, offs, ok, stride, D: tl.constexpr, MASKED: tl.constexpr):
    """Rows offs of a (S, stride) slab, D channels (unpadded tensors: masked on the tail tile)."""
    ptrs = base + offs[:, None] * stride + tl.arange(0, D)[None, :]
    if MASKED:
        return tl.load(ptrs, mask=ok[:, None], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _dkdv_step(
    dk,
    dv,
    k8,
    sk,
    v,
    sv,
    Q,
    Q8,
    Q8T,
    SQ,
    DO,
    DO8,
    DO8T,
    SDO,
    DVEXP,
    DVU,
    LSE,
    DELTA,
    start_m,
    Sq,
    SQP,
    stride_s,
    qk_scale,
    D: tl.constexpr,
    QBLK: tl.constexpr,
    FP8_DP: tl.constexpr,
    FP8_DS: tl.constexpr,
    DS_E5M2: tl.constexpr,
    EMULATE: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """One query tile into a key tile's dK, dV (rows are keys): dV += E4M3(448 P r)^T dO8 with r = clamp(s_dO /
    s_ref, 2^-80, 1) carried in the exponent (dV in units of s_ref / 448, no rescale: module doc), dK += dS^T Q
    (FP8_DS: dS8^T q8, q8 Hadamard-rotated: the launcher rotates dK back)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q_ok = offs_m < Sq
    blk = start_m // QBLK
    sq = tl.load(SQ + blk)
    q8 = tl.load(Q8 + offs_m[:, None] * D + offs_d[None, :])  # padded: no mask
    raw = tl.dot(k8, tl.trans(q8))  # (BLOCK_N, BLOCK_M): s^T = raw * (s_k s_q scale log2 e)
    if MASKED:
        lse = tl.load(LSE + offs_m, mask=q_ok, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=q_ok, other=0.0)
    else:
        lse = tl.load(LSE + offs_m)
        delta = tl.load(DELTA + offs_m)
    # P448 = 448 P r: the score scale, the 448 of E4M3(448 P r) and the dO block's r in the exponent's one FMA
    # per element (r folded into P, not into dV: dV accumulates in place without a rescale per tile);
    # DVEXP = log2(448 r), DVU = 1 / (448 r) per dO block (dv_units); the column term log2(448 r) - lse log2 e
    col = tl.fma(lse, -1.4426950408889634, tl.load(DVEXP + blk))
    p448 = tl.exp2(tl.fma(raw, sk * sq * qk_scale, col[None, :]))
    if MASKED:
        p448 = tl.where(q_ok[None, :], p448, 0.0)
    do_t = tl.load(DO8T + offs_d[:, None] * SQP + offs_m[None, :])  # (D, BLOCK_M), queries contiguous
    dv = tl.dot(_e4m3_p448(p448, do_t.dtype, EMULATE), tl.trans(do_t), dv)
    u = tl.load(DVU + blk)  # p448 u = P
    if FP8_DP:
        do8 = tl.load(DO8 + offs_m[:, None] * D + offs_d[None, :])
        dp_t = tl.dot(v, tl.trans(do8))  # dP = dp_t s_v s_dO: the scales ride in the FMA below
        ds_t = p448 * tl.fma(dp_t, sv * tl.load(SDO + blk) * u, -(delta * u)[None, :])  # P (dP - delta)
    else:
        do = _rows(DO, offs_m, q_ok, stride_s, D, MASKED)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p448 * tl.fma(dp_t, u, -(delta * u)[None, :])  # P (dP - delta)
    if FP8_DS:  # one scale per key row and BLOCK_M queries (the reduction dim of dS^T Q)
        ds8, ds_scale = _quant_ds(ds_t, DS_E5M2, EMULATE)
        q8t = tl.load(Q8T + offs_d[:, None] * SQP + offs_m[None, :])  # (D, BLOCK_M): K-major operand
        dk += tl.dot(ds8, tl.trans(q8t)) * (ds_scale * sq)[:, None]
    else:
        q = _rows(Q, offs_m, q_ok, stride_s, D, MASKED)
        dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv


@triton.jit
def _fp8_bwd_dkdv(
    Q,
    V,
    DO,
    Q8,
    K8,
    V8,
    Q8T,
    DO8,
    DO8T,
    SQ,
    SK,
    SV,
    SDO,
    DVEXP,
    DVU,
    SDOREF,
    LSE,
    DELTA,
    DK,
    DV,
    KLEN,
    Sq,
    Sk,
    SQP,
    SKP,
    H,
    scale,
    qk_scale,
    Q_BUCKET,
    K_BUCKET,
    D: tl.constexpr,
    QBLK: tl.constexpr,
    HAS_KLEN: tl.constexpr,
    FP8_DP: tl.constexpr,
    FP8_DS: tl.constexpr,
    DS_E5M2: tl.constexpr,
    EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dK, dV of BLOCK_N keys of one (b, h) over all query tiles; BLOCK_N divides QUANT_BLOCK."""
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
    kblk = (pid_n * BLOCK_N) // QBLK
    nkb = SKP // QBLK
    k8 = tl.load(K8 + (bh.to(tl.int64) * SKP + offs_n[:, None]) * D + offs_d[None, :])
    sk = tl.load(SK + bh * nkb + kblk)
    sv = tl.load(SV + bh * nkb + kblk)
    if FP8_DP:
        v = tl.load(V8 + (bh.to(tl.int64) * SKP + offs_n[:, None]) * D + offs_d[None, :])
    else:
        v = _rows(V + k_off, offs_n, k_ok, stride_s, D, True)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)  # in units of s_ref / 448 (module doc)
    m_hi = tl.where(pid_n * BLOCK_N < n_end, Sq, 0)  # a tile of only masked keys gets zero grads
    m_full = (m_hi // BLOCK_M) * BLOCK_M
    nqb = SQP // QBLK
    row = bh.to(tl.int64) * SQP
    # LSE, DELTA (B, H, SQP): rows padded to the block, so that each tile's vectors are aligned copies (Triton 3.6
    # splits an unaligned one into 4-byte copies behind per-thread branches: ~80 more instructions per tile)
    lse_ptr, delta_ptr = LSE + bh.to(tl.int64) * SQP, DELTA + bh.to(tl.int64) * SQP
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _dkdv_step(
            dk, dv, k8, sk, v, sv, Q + q_off, Q8 + row * D, Q8T + row * D, SQ + bh * nqb, DO + q_off,
            DO8 + row * D, DO8T + row * D, SDO + bh * nqb, DVEXP + bh * nqb, DVU + bh * nqb, lse_ptr, delta_ptr,
            start_m, Sq, SQP, stride_s, qk_scale, D, QBLK, FP8_DP, FP8_DS, DS_E5M2, EMULATE, False, BLOCK_M,
        )  # fmt: skip
    if m_full < m_hi:
        dk, dv = _dkdv_step(
            dk, dv, k8, sk, v, sv, Q + q_off, Q8 + row * D, Q8T + row * D, SQ + bh * nqb, DO + q_off,
            DO8 + row * D, DO8T + row * D, SDO + bh * nqb, DVEXP + bh * nqb, DVU + bh * nqb, lse_ptr, delta_ptr,
            m_full, Sq, SQP, stride_s, qk_scale, D, QBLK, FP8_DP, FP8_DS, DS_E5M2, EMULATE, True, BLOCK_M,
        )  # fmt: skip
    dk = tl.where(k_ok[:, None], dk * scale, 0.0)  # masked keys get exactly 0
    dv = tl.where(k_ok[:, None], dv * (tl.load(SDOREF + bh) / 448.0), 0.0)
    ptrs = k_off + offs_n[:, None] * stride_s + offs_d[None, :]
    st_ok = (offs_n < Sk)[:, None]
    tl.store(DK + ptrs, dk.to(DK.dtype.element_ty), mask=st_ok)
    tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=st_ok)


@triton.jit
def _dq_step(
    dq,
    q8,
    sq,
    do,
    sdo,
    lse2,
    delta,
    K,
    V,
    K8,
    V8,
    K8T,
    SK,
    SV,
    start_n,
    n_end,
    stride_s,
    SKP,
    D: tl.constexpr,
    QBLK: tl.constexpr,
    FP8_DP: tl.constexpr,
    FP8_DS: tl.constexpr,
    DS_E5M2: tl.constexpr,
    EMULATE: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One key tile into dQ: P = 2^(s - lse log2 e), dS = P (dP - delta), dQ += dS K with K the smoothed keys
    in the input dtype (FP8_DS: dQ += dS8 k8, k8 smoothed and Hadamard-rotated: the launcher rotates dQ back)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k_ok = offs_n < n_end
    blk = start_n // QBLK
    sk = tl.load(SK + blk)
    k8 = tl.load(K8 + offs_n[:, None] * D + offs_d[None, :])
    raw = tl.dot(q8, tl.trans(k8))  # (BLOCK_M, BLOCK_N): s = raw * s_q s_k (scale log2 e in s_q)
    p = tl.exp2(tl.fma(raw, sq * sk, -lse2[:, None]))  # the scale in the exponent's one FMA per element
    if MASKED:
        p = tl.where(k_ok[None, :], p, 0.0)
    if FP8_DP:
        v8 = tl.load(V8 + offs_n[:, None] * D + offs_d[None, :])
        dp = tl.dot(do, tl.trans(v8))  # dP = dp s_dO s_v: the scales ride in the FMA below
        ds = p * tl.fma(dp, sdo * tl.load(SV + blk), -delta[:, None])
    else:
        dp = tl.dot(do, tl.trans(_rows(V, offs_n, k_ok, stride_s, D, MASKED)))
        ds = p * (dp - delta[:, None])
    if FP8_DS:  # one scale per query row and BLOCK_N keys (the reduction dim of dS K)
        ds8, ds_scale = _quant_ds(ds, DS_E5M2, EMULATE)
        k8t = tl.load(K8T + offs_d[:, None] * SKP + offs_n[None, :])  # (D, BLOCK_N): K-major operand
        dq += tl.dot(ds8, tl.trans(k8t)) * (ds_scale * sk)[:, None]
    else:
        k = _rows(K, offs_n, k_ok, stride_s, D, MASKED)
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _fp8_bwd_dq(
    Q,
    K,
    V,
    DO,
    Q8,
    K8,
    V8,
    K8T,
    DO8,
    SQ,
    SK,
    SV,
    SDO,
    LSE,
    DELTA,
    DQ,
    KLEN,
    Sq,
    Sk,
    SQP,
    SKP,
    H,
    scale,
    qk_scale,
    Q_BUCKET,
    K_BUCKET,
    D: tl.constexpr,
    QBLK: tl.constexpr,
    HAS_KLEN: tl.constexpr,
    FP8_DP: tl.constexpr,
    FP8_DS: tl.constexpr,
    DS_E5M2: tl.constexpr,
    EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dQ of BLOCK_M queries of one (b, h) over the valid key tiles; BLOCK_M, BLOCK_N divide QUANT_BLOCK."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    stride_s = H * D
    q_off = (b.to(tl.int64) * Sq * H + h) * D
    k_off = (b.to(tl.int64) * Sk * H + h) * D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q_ok = offs_m < Sq
    qblk = (pid_m * BLOCK_M) // QBLK
    nqb, nkb = SQP // QBLK, SKP // QBLK
    q8 = tl.load(Q8 + (bh.to(tl.int64) * SQP + offs_m[:, None]) * D + offs_d[None, :])
    sq = tl.load(SQ + bh * nqb + qblk) * qk_scale
    sdo = tl.load(SDO + bh * nqb + qblk)
    if FP8_DP:
        do = tl.load(DO8 + (bh.to(tl.int64) * SQP + offs_m[:, None]) * D + offs_d[None, :])
    else:
        do = _rows(DO + q_off, offs_m, q_ok, stride_s, D, True)
    lse2 = tl.load(LSE + bh.to(tl.int64) * SQP + offs_m, mask=q_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * SQP + offs_m, mask=q_ok, other=0.0)
    n_end = Sk
    if HAS_KLEN:
        n_end = tl.minimum(tl.maximum(tl.load(KLEN + b), 0), Sk)
    n_full = (n_end // BLOCK_N) * BLOCK_N
    kv8 = bh.to(tl.int64) * SKP * D
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_step(
            dq,
            q8,
            sq,
            do,
            sdo,
            lse2,
            delta,
            K + k_off,
            V + k_off,
            K8 + kv8,
            V8 + kv8,
            K8T + kv8,
            SK + bh * nkb,
            SV + bh * nkb,
            start_n,
            n_end,
            stride_s,
            SKP,
            D,
            QBLK,
            FP8_DP,
            FP8_DS,
            DS_E5M2,
            EMULATE,
            False,
            BLOCK_N,
        )
    if n_full < n_end:
        dq = _dq_step(
            dq,
            q8,
            sq,
            do,
            sdo,
            lse2,
            delta,
            K + k_off,
            V + k_off,
            K8 + kv8,
            V8 + kv8,
            K8T + kv8,
            SK + bh * nkb,
            SV + bh * nkb,
            n_full,
            n_end,
            stride_s,
            SKP,
            D,
            QBLK,
            FP8_DP,
            FP8_DS,
            DS_E5M2,
            EMULATE,
            True,
            BLOCK_N,
        )
    tl.store(
        DQ + q_off + offs_m[:, None] * stride_s + offs_d[None, :],
        (dq * scale).to(DQ.dtype.element_ty),
        mask=q_ok[:, None],
    )


# Tiles follow the quantisation block: the forward's BLOCK_N equals it (one s_k, s_v per key tile); dK/dV
# tiles are (block / 2 queries) x (block keys), dQ tiles (block queries) x (block / 2 keys), so that the
# FP8 dS groups (block / 2 entries along each product's reduction dim, as in quantize_groups) are whole
# tiles. TILE_DIVISORS: (block // BLOCK_M, block // BLOCK_N). At block 128: fwd 128 x 128, dkdv 64 x 128,
# dq 128 x 64. GPU_LAUNCH: the (num_warps, num_stages) candidates each kernel is autotuned over on first
# use per key (length buckets, head dim, flags: one compile per candidate); the first of each is the
# fixed setting the first H200 measurement ran (docs/FP8_ATTENTION.md), the others are not measured yet.
TILE_DIVISORS = {"fwd": (1, 1), "dkdv": (2, 1), "dq": (1, 2)}
GPU_LAUNCH = {
    "fwd": ((8, 3), (8, 2), (4, 3), (8, 4)),
    "dkdv": ((8, 2), (8, 3), (4, 2)),
    "dq": ((8, 2), (8, 3), (4, 2)),
}
# The forward also tries half-height query tiles (BLOCK_M = block / 2, one warpgroup per program; blocks of
# 128+): 213-241 registers and <= 104 KB of shared memory on sm_90 (python -m bench.codegen --kernel
# fp8_fwd), so two programs share an SM and one's softmax can run under the other's FP8 wgmma, which a
# program's own softmax cannot (Triton waits for q k^T before it)
FWD_HALF_TILES = ((4, 3), (4, 2))
# The dQ kernel alike: half-height query tiles (block / 2 x block / 2, 4 warps, 2 stages: 182 registers, 104 KB
# of shared memory, no spills on sm_90 in Triton 3.6, two programs per SM). dS's FP8 groups run along the
# keys, so they do not change; each half of a 128-query block reads that block's q and dO scales.
DQ_HALF_TILES = ((4, 2),)
_HALF_TILES = {"fwd": FWD_HALF_TILES, "dq": DQ_HALF_TILES}
# Autotune keys: the padded lengths in coarse buckets (kernels.attention._bucket: next power of two, capped),
# as the bf16 kernels do, so a new video length reuses a tuning instead of timing every config again
_TUNE_KEYS = {
    "fwd": ["Q_BUCKET", "K_BUCKET", "D", "HAS_KLEN"],
    "dkdv": ["Q_BUCKET", "K_BUCKET", "D", "HAS_KLEN", "FP8_DP", "FP8_DS", "DS_E5M2"],
    "dq": ["Q_BUCKET", "K_BUCKET", "D", "HAS_KLEN", "FP8_DP", "FP8_DS", "DS_E5M2"],
}


def _tiles(kernel: str, block: int) -> dict:
    dm, dn = TILE_DIVISORS[kernel]
    return dict(BLOCK_M=block // dm, BLOCK_N=block // dn)


_KERNELS = {"fwd": _fp8_fwd, "dkdv": _fp8_bwd_dkdv, "dq": _fp8_bwd_dq}


def tile_configs(kernel: str, block: int) -> list[triton.Config]:
    """The configs a kernel is autotuned over for a quantisation block: its tiles with each GPU_LAUNCH
    setting, and for the forward and dQ kernels the half-height tiles (FWD_HALF_TILES, DQ_HALF_TILES); the
    first is the fixed one."""
    t = _tiles(kernel, block)
    configs = [triton.Config(t, num_warps=w, num_stages=s) for w, s in GPU_LAUNCH[kernel]]
    if kernel in _HALF_TILES and block >= 128:
        half = dict(t, BLOCK_M=block // 2)
        configs += [triton.Config(half, num_warps=w, num_stages=s) for w, s in _HALF_TILES[kernel]]
    return configs


_TUNED: dict = {}  # (kernel, block) -> autotuner, built on first use


def _autotuned(kernel: str, block: int):
    """The kernel autotuned over tile_configs (its kernels only write their outputs, so re-runs are safe)."""
    if (kernel, block) not in _TUNED:
        _TUNED[(kernel, block)] = triton.autotune(tile_configs(kernel, block), key=_TUNE_KEYS[kernel])(
            _KERNELS[kernel]
        )
    return _TUNED[(kernel, block)]


def tuned_configs() -> dict[str, str]:
    """The config each autotuned FP8 kernel chose, per tuning key (for benchmark records)."""
    return {
        f"{kernel}/{block} {key}": str(cfg)
        for (kernel, block), t in _TUNED.items()
        for key, cfg in t.cache.items()
    }


_GRID_TILE = {"fwd": "BLOCK_M", "dkdv": "BLOCK_N", "dq": "BLOCK_M"}  # the tile that splits n over programs


def _run(kernel: str, n: int, bh: int, block: int, *args, **meta) -> None:
    """Launch an FP8 kernel on ceil(n / tile) x bh programs: autotuned on a GPU (tiles and launch settings);
    under the interpreter with the first config's tiles, no tuning."""
    tile = _GRID_TILE[kernel]
    if _INTERPRET:
        t = tile_configs(kernel, block)[0].kwargs
        _KERNELS[kernel][(triton.cdiv(n, t[tile]), bh)](*args, **meta, **t)
    else:
        _autotuned(kernel, block)[lambda m: (triton.cdiv(n, m[tile]), bh)](*args, **meta)


def _fp8_dtype(device: torch.device) -> torch.dtype:
    """Storage of the quantised operands: e4m3 on the GPU, an exact fp16 carrier in the interpreter."""
    return torch.float16 if device.type == "cpu" else torch.float8_e4m3fn


@triton.jit
def _e4m3_of(y, scale, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """E4M3(clamp(y / scale, +-448)) (an IEEE division, as torch's) in DTYPE: float8e4nv, or with
    EMULATE an fp16/fp32 carrier of the exactly rounded value."""
    y = tl.minimum(tl.maximum(tl.div_rn(y, scale), -448.0), 448.0)
    if EMULATE:
        y8 = _round_fp8(y, False).to(DTYPE)
    else:
        y8 = y.to(tl.float8e4nv)
    return y8


@triton.jit
def _quant_blocks_kernel(
    X,
    MEAN,
    SIGNS,
    X8,
    SCALE,
    S,
    H,
    stride_b,
    stride_s,
    stride_h,
    stride_d,
    SP,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_MEAN: tl.constexpr,
    ROTATE: tl.constexpr,
    INV_SQRT_D: tl.constexpr,
    EMULATE: tl.constexpr,
):
    """The fused pre-pass of BLOCK tokens of one (b, h): x (B, S, H, D) in its dtype, times H (ROTATE), minus
    MEAN (B, H, D) fp32 (HAS_MEAN), s = amax / 448 (1 if all zero), x8 = E4M3(clamp(x / s, +-448)) into X8
    (B, H, SP, D), s into SCALE (B, H, SP / BLOCK); rows past S are zeros.

    The rotation: SIGNS is the +-1 Sylvester matrix (D, D) in x's dtype and H = SIGNS / sqrt(D). A bf16 or
    fp16 x times +-1 is an exact product, so a tensor-core dot with fp32 accumulation gives x H to fp32
    rounding; an fp32 x takes an IEEE FMA dot (correct, not fast: the attention path never has one). The
    K mean is subtracted after the rotation, so the caller passes the rotated mean m H ((x - m) H = x H -
    m H). Two dots with the column halves of SIGNS keep shared memory under sm_89's 99 KB per block.
    (The first version rotated fp32 x - m with FMA dots: 14 KB of register spills per thread on sm_90 and
    ~11 ms of pre-pass at the LTX-2 shape on an H100; tests/test_attention_fp8.py's compile test now checks
    for spills.)
    """
    HALF: tl.constexpr = D // 2
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_s = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    ok = (offs_s < S)[:, None]
    src = X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    x = tl.load(
        src + offs_s.to(tl.int64)[:, None] * stride_s + offs_d.to(tl.int64)[None, :] * stride_d,
        mask=ok,
        other=0.0,
    )
    dst = X8 + (bh.to(tl.int64) * SP + offs_s[:, None]) * D
    if ROTATE:
        offs_h = tl.arange(0, HALF)
        h_ptrs = SIGNS + offs_d[:, None] * D + offs_h[None, :]
        if X.dtype.element_ty == tl.float32:
            y0 = tl.dot(x, tl.load(h_ptrs), input_precision="ieee")  # (BLOCK, HALF): columns [0, HALF)
            y1 = tl.dot(x, tl.load(h_ptrs + HALF), input_precision="ieee")  # columns [HALF, D)
        else:
            y0 = tl.dot(x, tl.load(h_ptrs), out_dtype=tl.float32)
            y1 = tl.dot(x, tl.load(h_ptrs + HALF), out_dtype=tl.float32)
        y0, y1 = y0 * INV_SQRT_D, y1 * INV_SQRT_D
        if HAS_MEAN:  # the padding rows stay zero
            y0 = tl.where(ok, y0 - tl.load(MEAN + bh * D + offs_h)[None, :], 0.0)
            y1 = tl.where(ok, y1 - tl.load(MEAN + bh * D + HALF + offs_h)[None, :], 0.0)
        amax = tl.maximum(tl.max(tl.max(tl.abs(y0), 1), 0), tl.max(tl.max(tl.abs(y1), 1), 0))
        scale = tl.where(amax > 0, tl.div_rn(amax, 448.0), 1.0)
        tl.store(dst + offs_h[None, :], _e4m3_of(y0, scale, X8.dtype.element_ty, EMULATE))
        tl.store(dst + HALF + offs_h[None, :], _e4m3_of(y1, scale, X8.dtype.element_ty, EMULATE))
    else:
        x = x.to(tl.float32)
        if HAS_MEAN:
            x = tl.where(ok, x - tl.load(MEAN + bh * D + offs_d)[None, :], 0.0)
        amax = tl.max(tl.max(tl.abs(x), 1), 0)
        scale = tl.where(amax > 0, tl.div_rn(amax, 448.0), 1.0)
        tl.store(dst + offs_d[None, :], _e4m3_of(x, scale, X8.dtype.element_ty, EMULATE))
    tl.store(SCALE + bh * (SP // BLOCK) + pid, scale)


# GPU num_warps of the fused pre-pass without / with the rotation (not tuned: no GPU measurement yet)
PREPASS_WARPS = {False: 4, True: 8}
_CARRIERS = (torch.float8_e4m3fn, torch.float16, torch.float32)


def quantize_blocks_fused(
    x: torch.Tensor,
    block: int = QUANT_BLOCK,
    *,
    carrier: torch.dtype = torch.float8_e4m3fn,
    mean: torch.Tensor | None = None,
    rotate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton pre-pass: :func:`quantize_blocks` of (x - mean) H in one read of x.

    x (B, S, H, D) bfloat16/float16/float32, any strides; mean None or (B, H, D) (per batch, head,
    channel; :func:`key_mean` gives it); rotate: times hadamard(D) (fp32). Returns (x8 (B, H, S_pad, D) in
    ``carrier``, scale (B, H, S_pad / block) fp32), as quantize_blocks. carrier float8_e4m3fn needs CUDA;
    float16/float32 hold the e4m3 values exactly (the interpreter; on CUDA, the emulation's operands).
    """
    if x.dim() != 4:
        raise ValueError(f"quantize_blocks_fused: x must be (B, S, H, D), got shape {tuple(x.shape)}")
    B, S, H, D = x.shape
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"quantize_blocks_fused: dtype {x.dtype} (expected bfloat16, float16 or float32)")
    if D < 16 or D & (D - 1):
        raise ValueError(f"quantize_blocks_fused: head dim must be a power of two >= 16, got {D}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"quantize_blocks_fused: block must be a power of two >= 16, got {block}")
    if carrier not in _CARRIERS:
        raise ValueError(f"quantize_blocks_fused: carrier must be one of {_CARRIERS}, got {carrier}")
    if carrier == torch.float8_e4m3fn and x.device.type != "cuda":
        raise ValueError("quantize_blocks_fused: a float8 carrier needs CUDA (the interpreter: float16)")
    if mean is not None:
        if tuple(mean.shape) != (B, H, D):
            raise ValueError(f"quantize_blocks_fused: mean must be {(B, H, D)}, got {tuple(mean.shape)}")
        mean = mean.to(device=x.device, dtype=torch.float32).contiguous()
    n = triton.cdiv(S, block)
    x8 = torch.empty(B, H, n * block, D, device=x.device, dtype=carrier)
    scale = torch.empty(B, H, n, device=x.device, dtype=torch.float32)
    if x8.numel() == 0:
        return x8, scale
    signs = scale  # unused stand-in when not rotating
    if rotate:
        signs = hadamard_signs(D, x.dtype, x.device)
        if mean is not None:  # (x - m) H = x H - m H: the kernel subtracts the rotated mean
            mean = (mean @ _hadamard_cached(D, x.device)).contiguous()
    launch = {} if _INTERPRET else dict(num_warps=PREPASS_WARPS[bool(rotate)], num_stages=1)
    _quant_blocks_kernel[(n, B * H)](
        x, scale if mean is None else mean, signs, x8, scale, S, H, *x.stride(), n * block,
        D=D, BLOCK=block, HAS_MEAN=mean is not None, ROTATE=bool(rotate), INV_SQRT_D=D**-0.5,
        EMULATE=carrier != torch.float8_e4m3fn, **launch,
    )  # fmt: skip
    return x8, scale


def quantize_blocks(
    x: torch.Tensor, block: int = QUANT_BLOCK, *, carrier: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, S, H, D) -> (x8 (B, H, S_pad, D) in ``carrier``, scale (B, H, S_pad / block) fp32).

    s = amax|x_blk| / 448 per block of ``block`` tokens of one (b, h) (1 for an all-zero block);
    x8 = E4M3(clamp(x / s, +-448)) (round to nearest even, saturating); S zero-padded to the block.
    A carrier other than e4m3 holds the e4m3 values exactly (fp16/fp32) for the CPU interpreter.
    """
    B, S, H, D = x.shape
    n = triton.cdiv(S, block)
    xf = F.pad(x.float().transpose(1, 2), (0, 0, 0, n * block - S))  # (B, S, H, D) -> (B, H, S_pad, D)
    xb = xf.view(B, H, n, block, D)
    amax = xb.abs().amax(dim=(-1, -2))  # (B, H, n)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    x8 = (xb / scale[..., None, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    # contiguous: with S a multiple of the block, F.pad pads nothing and keeps the (B, S, H, D) strides of
    # the transposed input, which the elementwise ops above preserve; the kernels read (B, H, S_pad, D) rows
    return x8.to(carrier).reshape(B, H, n * block, D).contiguous(), scale.contiguous()


def key_mean(k: torch.Tensor, k_lengths: torch.Tensor | None) -> torch.Tensor:
    """Mean of k (B, Sk, H, D) over the valid keys, fp32 (B, 1, H, D) (fp32 sums, no fp32 copy of k)."""
    if k_lengths is None:
        return k.mean(dim=1, keepdim=True, dtype=torch.float32)
    valid = torch.arange(k.shape[1], device=k.device)[None, :] < k_lengths[:, None]  # (B, Sk)
    n = valid.sum(1).clamp(min=1).float()[:, None, None, None]
    return k.masked_fill(~valid[:, :, None, None], 0).sum(1, keepdim=True, dtype=torch.float32) / n


def smoothed_keys_lp(k: torch.Tensor, kmean: torch.Tensor) -> torch.Tensor:
    """k (B, Sk, H, D) minus kmean (B, H, D) fp32, subtracted in fp32 and rounded to k's dtype, contiguous: the
    keys of the bf16 dQ product (kernel and emulation)."""
    return (k - kmean[:, None]).to(k.dtype).contiguous()  # bf16 - fp32 promotes: one fp32 pass, no k.float()


def smooth_keys(k: torch.Tensor, k_lengths: torch.Tensor | None) -> torch.Tensor:
    """k - mean over the valid keys (per batch, head, channel), fp32: softmax is invariant to it."""
    return k.float() - key_mean(k, k_lengths)


def hadamard(d: int, device=None) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix H_d / sqrt(d) (d a power of two), fp32."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"hadamard: d must be a power of two, got {d}")
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < d:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / d**0.5


@functools.lru_cache(maxsize=8)
def _hadamard_cached(d: int, device: torch.device) -> torch.Tensor:
    """hadamard(d), built once per (d, device) (read only; never an inference tensor, module doc of
    :func:`hadamard_signs`)."""
    with torch.inference_mode(False):
        return hadamard(d, device)


@functools.lru_cache(maxsize=8)
def hadamard_signs(d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """hadamard(d) * sqrt(d): the +-1 matrix in ``dtype`` (exact in any float format), for the pre-pass. Built
    outside inference mode even when the first call runs under it: a cached inference tensor could not be
    saved for a later training step's backward (backend "te"'s FP8 path multiplies q and k by it)."""
    with torch.inference_mode(False):
        return torch.sign(hadamard(d, device)).to(dtype).contiguous()


def _quantize_qkv(q, k, v, k_lengths, block, carrier, smooth_k=True, rotate=True, fused=False, kmean=None):
    """The pre-pass: (q8, s_q, k8, s_k, v8, s_v); K smoothed, then q and k rotated by H (module doc).

    fused: the Triton kernel (:func:`quantize_blocks_fused`, the kernel path), else pure torch (the
    emulation's reference). kmean: the K mean (B, H, D) when the caller has it already (the kernel path
    computes it once and keeps it for the backward)."""
    if fused:
        mean = None
        if smooth_k:
            mean = key_mean(k, k_lengths)[:, 0] if kmean is None else kmean  # (B, 1, H, D) -> (B, H, D)
        q8, sq = quantize_blocks_fused(q, block, carrier=carrier, rotate=rotate)
        k8, sk = quantize_blocks_fused(k, block, carrier=carrier, mean=mean, rotate=rotate)
        v8, sv = quantize_blocks_fused(v, block, carrier=carrier)
        return q8, sq, k8, sk, v8, sv
    kf = smooth_keys(k, k_lengths) if smooth_k else k.float()
    qf = q.float()
    if rotate:
        h = hadamard(q.shape[-1], q.device)
        qf, kf = qf @ h, kf @ h  # (B, S, H, D) @ (D, D): q'.k' = q.k, outlier channels spread over all D
    q8, sq = quantize_blocks(qf, block, carrier=carrier)
    k8, sk = quantize_blocks(kf, block, carrier=carrier)
    v8, sv = quantize_blocks(v, block, carrier=carrier)
    return q8, sq, k8, sk, v8, sv


def _e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float8_e4m3fn).float()


def _rep(scale: torch.Tensor, block: int, n: int) -> torch.Tensor:
    """(B, H, nblk) block scales -> (B, H, n) per-token scales."""
    return scale.repeat_interleave(block, dim=-1)[..., :n]


def _valid_keys(k_lengths, B, Sk, device) -> torch.Tensor:
    """(B, 1, 1, Sk) boolean, True for valid keys."""
    if k_lengths is None:
        return torch.ones(B, 1, 1, Sk, dtype=torch.bool, device=device)
    return (torch.arange(Sk, device=device)[None, :] < k_lengths[:, None])[:, None, None, :]


def _scores2(q8, sq, k8, sk, scale, Sq, Sk, block) -> torch.Tensor:
    """s = (q8 k8^T) s_q s_k scale log2(e), fp32 (B, H, Sq, Sk)."""
    raw = q8[:, :, :Sq].float() @ k8[:, :, :Sk].float().transpose(-1, -2)
    return raw * ((_rep(sq, block, Sq) * (scale * _LOG2E))[..., None] * _rep(sk, block, Sk)[..., None, :])


def dout_reference_scale(do: torch.Tensor) -> torch.Tensor:
    """The dV product's unit s_ref per (batch, head): amax |dO| / 448 over the sequence and channels, the
    largest of the dO block scales not counting all-zero blocks (1 where dO is all zero), (B, H) fp32."""
    amax = torch.linalg.vector_norm(do, ord=float("inf"), dim=(1, 3)).float()
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax)).contiguous()


def dv_units(sdo: torch.Tensor, sdo_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per dO block (B, H, nblk): r = clamp(s_dO / s_ref, 2^-80, 1) -> (log2(448 r), 1 / (448 r)), the dK/dV
    kernel's exponent offset and dS factor (module doc); sdo_ref (B, H) from :func:`dout_reference_scale`."""
    r448 = (sdo / sdo_ref[..., None]).clamp(_UNIT_CLAMP.value, 1.0) * E4M3_MAX
    return torch.log2(r448).contiguous(), (1.0 / r448).contiguous()


def _clamped_units(scale: torch.Tensor) -> torch.Tensor:
    """(B, H, nblk) block scales -> w = max(s, (running max of s) 2^-80), the forward kernel's accumulator
    units for the P V product (module doc)."""
    return torch.maximum(scale, torch.cummax(scale, -1).values * _UNIT_CLAMP.value)


def _fwd_emulated(quant, k_lengths, scale, Sq, Sk, block, dtype):
    """The kernel's forward in fp32 torch, replaying its key tiling (P is quantised at the running max)."""
    q8, sq, k8, sk, v8, sv = quant
    B, H = q8.shape[:2]
    wv = _clamped_units(sv)
    s2 = _scores2(q8, sq, k8, sk, scale, Sq, Sk, block)
    s2 = s2.masked_fill(~_valid_keys(k_lengths, B, Sk, s2.device), float("-inf"))
    m = torch.full((B, H, Sq), float("-inf"), device=s2.device)
    lsum = torch.zeros(B, H, Sq, device=s2.device)
    acc = torch.zeros(B, H, Sq, q8.shape[-1], device=s2.device)
    for t, j in enumerate(range(0, Sk, block)):
        s = s2[..., j : j + block]
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows with no key yet
        p = torch.exp2(s - m_safe[..., None])
        alpha = torch.exp2(m - m_safe)
        lsum = lsum * alpha + p.sum(-1)  # l from the fp32 P, as the kernel
        pv = _e4m3(p * E4M3_MAX) @ v8[:, :, j : j + s.shape[-1]].float()
        acc = acc * alpha[..., None] + pv * (wv[..., t] / E4M3_MAX)[..., None, None]
        m = m_new
    empty = lsum == 0
    out = acc / torch.where(empty, torch.ones_like(lsum), lsum)[..., None]
    lse = torch.where(empty, float("-inf"), (m + torch.log2(lsum.clamp(min=1e-38))) * math.log(2.0))
    return out.transpose(1, 2).to(dtype), lse  # (B, H, Sq, D) -> (B, Sq, H, D)


def quantize_groups(x: torch.Tensor, group: int, fmt: str = "e4m3") -> torch.Tensor:
    """Dequantised FP8 of x (..., N) with one dynamic scale per ``group`` consecutive entries of the last
    dim (N zero-padded to a multiple of it): a = max(amax, 1e-30), x8 = FP8(clamp(x * (fmax / a), +-fmax))
    (round to nearest even), returned as x8 * (a / fmax). The dS quantisation of the backward, with the
    kernels' exact operations (module doc)."""
    fmax = FP8_FORMATS[fmt][1]
    n = x.shape[-1]
    xg = F.pad(x.float(), (0, (-n) % group)).unflatten(-1, (-1, group))
    a = xg.abs().amax(-1, keepdim=True).clamp(min=_DS_TINY)
    x8 = (xg * (fmax / a)).clamp(-fmax, fmax).to(FP8_FORMATS[fmt][0]).float()
    return (x8 * (a / fmax)).flatten(-2)[..., :n]


def _bwd_emulated(
    do, q, k, v, out, lse, quant, k_lengths, scale, block, fp8, ds_format, smooth_k, rotate, dlse=None
):
    """The kernels' backward in fp32 torch: dV FP8 if "dv" in fp8; dP FP8 if "dp" in fp8; dQ = dS K and
    dK = dS^T Q FP8 if "dqdk" in fp8 (dS in ds_format per block/2 group, the rotated q8, k8, then H^T)."""
    q8, sq, k8, sk, v8, sv = quant
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    lo = lambda t: t.transpose(1, 2).float()  # noqa: E731  (B, S, H, D) -> (B, H, S, D) fp32
    s2 = _scores2(q8, sq, k8, sk, scale, Sq, Sk, block)
    p = torch.exp2(s2 - (lse * _LOG2E)[..., None])
    p = torch.where(_valid_keys(k_lengths, B, Sk, p.device), p, torch.zeros_like(p)).nan_to_num(0.0)
    delta = (lo(do) * lo(out)).sum(-1)  # (B, H, Sq)
    if dlse is not None:  # d lse_i / d s_ij = P_ij: lse's gradient joins dS = P (dP - delta) as delta - dlse
        delta = delta - dlse.float()
    do8, sdo = quantize_blocks(do, block, carrier=torch.float32)
    do_deq = do8[:, :, :Sq] * _rep(sdo, block, Sq)[..., None]
    if "dv" in fp8:  # P quantised times r = s_dO / s_ref per query block, as the dK/dV kernel does
        ref = dout_reference_scale(do)
        p8 = _e4m3(p * torch.exp2(_rep(dv_units(sdo, ref)[0], block, Sq))[..., None])  # 448 P r
        dv = p8.transpose(-1, -2) @ do8[:, :, :Sq] * (ref[..., None, None] / E4M3_MAX)
    else:
        dv = p.to(q.dtype).float().transpose(-1, -2) @ lo(do)
    if "dp" in fp8:
        dp = do_deq @ (v8[:, :, :Sk].float() * _rep(sv, block, Sk)[..., None]).transpose(-1, -2)
    else:
        dp = lo(do) @ lo(v).transpose(-1, -2)
    ds = p * (dp - delta[..., None])
    if "dqdk" in fp8:  # dS grouped along each product's reduction dim: keys for dQ, queries for dK
        g = block // 2
        k_deq = k8[:, :, :Sk].float() * _rep(sk, block, Sk)[..., None]  # smoothed, rotated, quantised
        q_deq = q8[:, :, :Sq].float() * _rep(sq, block, Sq)[..., None]
        dq = quantize_groups(ds, g, ds_format) @ k_deq * scale
        dk = quantize_groups(ds.transpose(-1, -2), g, ds_format) @ q_deq * scale
        if rotate:  # back from the Hadamard basis: H is symmetric and orthonormal, H^T = H = H^-1
            h = hadamard(D, q.device)
            dq, dk = dq @ h, dk @ h
    else:
        ds_lp = ds.to(q.dtype).float()
        ks = smoothed_keys_lp(k, key_mean(k, k_lengths)[:, 0]) if smooth_k else k  # as the kernel path
        dq = ds_lp @ lo(ks) * scale  # dS (K - mean K): rowsum dS is not exactly 0 here
        dk = ds_lp.transpose(-1, -2) @ lo(q) * scale
    return tuple(t.transpose(1, 2).to(q.dtype) for t in (dq, dk, dv))  # (B, H, S, D) -> (B, S, H, D)


class _EmulatedFP8Attention(torch.autograd.Function):
    """Pure-torch forward and backward of the FP8 scheme (rotated q, k in; module doc)."""

    @staticmethod
    def forward(ctx, q, k, v, k_lengths, scale, block, bwd_fp8, ds_format, smooth_k, rotate):
        with fp32_math(q.device):  # the scheme's fp32 products, also inside an autocast region
            quant = _quantize_qkv(q, k, v, k_lengths, block, torch.float32, smooth_k, rotate)
            out, lse = _fwd_emulated(quant, k_lengths, scale, q.shape[1], k.shape[1], block, q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, k_lengths, *quant)
        ctx.scale, ctx.block, ctx.bwd_fp8, ctx.ds_format = scale, block, bwd_fp8, ds_format
        ctx.smooth_k, ctx.rotate = smooth_k, rotate
        ctx.set_materialize_grads(False)  # lse is differentiable; an unused output's gradient is None
        return out, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, out, lse, k_lengths, *quant = ctx.saved_tensors
        do = torch.zeros_like(out) if do is None else do
        with fp32_math(q.device):
            grads = _bwd_emulated(
                do, q, k, v, out, lse, quant, k_lengths, ctx.scale, ctx.block, ctx.bwd_fp8, ctx.ds_format,
                ctx.smooth_k, ctx.rotate, dlse,
            )  # fmt: skip
        return (*grads, None, None, None, None, None, None, None)


def _fp8_fwd_launch(quant, k_lengths, scale, Sq, Sk, block, dtype):
    q8, sq, k8, sk, v8, sv = quant
    B, H, SQP, D = q8.shape
    SKP = k8.shape[2]
    out = torch.empty(B, Sq, H, D, device=q8.device, dtype=dtype)
    lse = torch.empty(B, H, Sq, device=q8.device, dtype=torch.float32)
    v8t = v8.transpose(-1, -2).contiguous()  # (B, H, D, S_pad): the K-major operand of p v
    klen = q8 if k_lengths is None else k_lengths
    _run(
        "fwd", Sq, B * H, block, q8, k8, v8t, sq, sk, sv, out, lse, klen, Sq, Sk, SQP, SKP, H, scale * _LOG2E,
        _bucket(SQP), _bucket(SKP),
        D=D, QBLK=block, HAS_KLEN=k_lengths is not None, EMULATE=_INTERPRET,
    )  # fmt: skip
    return out, lse


def _fp8_bwd_launch(
    do, q, k, v, out, lse, quant, kmean, k_lengths, scale, block, fp8_dp, ds_format, dlse=None
):
    """dq, dk, dv; ds_format None: dQ, dK from bf16 dS, else FP8 dS in that format times the rotated q8,
    k8 (written in fp32, then rotated back by H^T = H here). kmean: the forward's K mean (B, H, D) fp32."""
    q8, sq, k8, sk, v8, sv = quant
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    SQP, SKP = q8.shape[2], k8.shape[2]
    fp8_ds = ds_format is not None
    delta = torch.empty((B, H, Sq), device=q.device, dtype=torch.float32)  # rowsum(dO * O), one read of each
    _attn_bwd_delta[(triton.cdiv(Sq, 64), B * H)](
        out, do, delta, Sq, H, D=D, BLOCK_M=64, I64=_slab_i64(Sq, H, D)
    )
    if dlse is not None:  # lse's gradient joins dS = P (dP - delta) as delta - dlse
        delta -= dlse
    # (B, H, SQP) rows for the kernels (aligned per-tile vector loads; B H SQP floats, a small copy)
    lse_p, delta = F.pad(lse, (0, SQP - Sq)), F.pad(delta, (0, SQP - Sq))
    do8, sdo = quantize_blocks_fused(do, block, carrier=q8.dtype)
    sdo_ref = dout_reference_scale(do)
    dv_exp, dv_u = dv_units(sdo, sdo_ref)
    do8t = do8.transpose(-1, -2).contiguous()  # (B, H, D, Sq_pad): K-major operand of P^T dO
    if fp8_ds:  # (B, H, D, S_pad): K-major operands of dS^T q8 and dS k8; rotated grads in fp32
        q8t, k8t = q8.transpose(-1, -2).contiguous(), k8.transpose(-1, -2).contiguous()
        dq, dk = torch.empty(q.shape, device=q.device), torch.empty(k.shape, device=k.device)
    else:
        q8t, k8t = q8, k8  # unused stand-ins
        dq, dk = torch.empty_like(q), torch.empty_like(k)
    dv = torch.empty_like(v)
    klen = q if k_lengths is None else k_lengths
    meta = dict(
        D=D, QBLK=block, HAS_KLEN=k_lengths is not None, FP8_DP=fp8_dp, FP8_DS=fp8_ds,
        DS_E5M2=ds_format == "e5m2", EMULATE=_INTERPRET,
    )  # fmt: skip
    tail = (klen, Sq, Sk, SQP, SKP, H, scale, scale * _LOG2E, _bucket(SQP), _bucket(SKP))
    _run(
        "dkdv", Sk, B * H, block,
        q, v, do, q8, k8, v8, q8t, do8, do8t, sq, sk, sv, sdo, dv_exp, dv_u, sdo_ref, lse_p, delta, dk, dv, *tail,
        **meta,
    )  # fmt: skip
    # bf16 dQ = dS (K - mean K): the forward saw smoothed keys, and the FP8 dS's rows do not sum to 0 as the
    # true ones do, so dS K would carry rowsum(dS) mean K (measured: 9.7% -> 6.7% dq error without it). The
    # smoothed keys are rounded to the input dtype once here (one read and write of K), not per tile
    ks = k if fp8_ds else smoothed_keys_lp(k, kmean)  # FP8_DS reads k8t instead
    _run(
        "dq", Sq, B * H, block,
        q, ks, v, do, q8, k8, v8, k8t, do8, sq, sk, sv, sdo, lse_p, delta, dq, *tail, **meta,
    )  # fmt: skip
    if fp8_ds:  # back from the Hadamard basis: H is symmetric and orthonormal
        h = _hadamard_cached(D, q.device)
        dq, dk = (dq @ h).to(q.dtype), (dk @ h).to(k.dtype)
    return dq, dk, dv


# The pre-pass + kernels as torch custom ops (opaque to torch.compile: no graph break), as in
# kernels.attention; the forward op also returns what the backward op reads (K mean and quantised operands).
@torch.library.custom_op("wmsd::attention_fp8_fwd", mutates_args=())
def _fp8_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_lengths: torch.Tensor | None,
    scale: float,
    block: int,
    fp8_dp: bool,
    ds_format: str | None,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor,
]:  # fmt: skip
    """(rotated q, k, v) -> (out, lse, kmean, q8, s_q, k8, s_k, v8, s_v); fp8_dp and ds_format are the
    backward's settings (read by the autograd setup)."""
    kmean = key_mean(k, k_lengths)[:, 0].contiguous()  # (B, H, D) fp32, one reduction for fwd and bwd
    quant = _quantize_qkv(q, k, v, k_lengths, block, _fp8_dtype(q.device), fused=True, kmean=kmean)
    out, lse = _fp8_fwd_launch(quant, k_lengths, scale, q.shape[1], k.shape[1], block, q.dtype)
    return (out, lse, kmean, *quant)


@_fp8_fwd_op.register_fake
def _(q, k, v, k_lengths, scale, block, fp8_dp, ds_format):
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    carrier = _fp8_dtype(q.device)

    def quantised(S):  # (x8 (B, H, S_pad, D), scale (B, H, S_pad / block))
        n = -(-S // block)
        return q.new_empty((B, H, n * block, D), dtype=carrier), q.new_empty((B, H, n), dtype=torch.float32)

    lse = q.new_empty((B, H, Sq), dtype=torch.float32)
    kmean = q.new_empty((B, H, D), dtype=torch.float32)
    return (torch.empty_like(q), lse, kmean, *quantised(Sq), *quantised(Sk), *quantised(Sk))


@torch.library.custom_op("wmsd::attention_fp8_bwd", mutates_args=())
def _fp8_bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    quant: list[torch.Tensor],
    kmean: torch.Tensor,
    k_lengths: torch.Tensor | None,
    scale: float,
    block: int,
    fp8_dp: bool,
    ds_format: str | None,
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fp8_bwd_launch(
        do, q, k, v, out, lse, quant, kmean, k_lengths, scale, block, fp8_dp, ds_format, dlse
    )


@_fp8_bwd_op.register_fake
def _(do, q, k, v, out, lse, quant, kmean, k_lengths, scale, block, fp8_dp, ds_format, dlse=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fp8_setup(ctx, inputs, output) -> None:
    q, k, v, k_lengths, scale, block, fp8_dp, ds_format = inputs
    out, lse, kmean, *quant = output
    ctx.save_for_backward(q, k, v, out, lse, k_lengths, kmean, *quant)
    ctx.scale, ctx.block, ctx.fp8_dp, ctx.ds_format = scale, block, fp8_dp, ds_format
    ctx.mark_non_differentiable(kmean, *quant)  # lse is differentiable (it was not: its part was dropped)
    ctx.set_materialize_grads(False)


def _fp8_backward(ctx, do, dlse, *_):
    q, k, v, out, lse, k_lengths, kmean, *quant = ctx.saved_tensors
    do = torch.zeros_like(out) if do is None else do.contiguous()
    dlse = None if dlse is None else dlse.float().contiguous()
    grads = _fp8_bwd_op(
        do, q, k, v, out, lse, quant, kmean, k_lengths, ctx.scale, ctx.block, ctx.fp8_dp, ctx.ds_format, dlse
    )  # fmt: skip
    return (*grads, None, None, None, None, None)


_fp8_fwd_op.register_autograd(_fp8_backward, setup_context=_fp8_setup)
no_double_backward(_fp8_bwd_op, "attention_fp8", "use attention_fp8_emulated or backend='torch'")


_WARNED: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"attention precision 'fp8': {reason}; running the bf16 kernel instead", stacklevel=3)


def fp8_unsupported_reason(q: torch.Tensor, k: torch.Tensor | None = None) -> str | None:
    """Why the FP8 kernel cannot run on q (and k) (then the bf16 path runs), or None."""
    if q.shape[-1] not in FP8_HEAD_DIMS:
        return f"head dim {q.shape[-1]} is not one of {FP8_HEAD_DIMS}"
    # the FP8 kernels' row offsets within one sample are int32 (the bf16 kernels switch to int64 there)
    S = max(q.shape[1], q.shape[1] if k is None else k.shape[1])
    if q.dim() == 4 and _slab_i64(S + QUANT_BLOCK, q.shape[2], q.shape[3]):
        return f"a sample of {S} x {q.shape[2]} x {q.shape[3]} elements passes the FP8 kernels' int32 offsets"
    if q.device.type == "cuda":
        if q.dtype not in (torch.bfloat16, torch.float16):
            return f"dtype {q.dtype} (expected bfloat16 or float16)"
        if torch.cuda.get_device_capability(q.device) < (8, 9):
            return "this GPU has no FP8 tensor cores (needs sm_89 or newer)"
        return None
    if _INTERPRET and q.device.type == "cpu" and q.dtype in (torch.float32, torch.float16):
        return None
    return f"device {q.device} / dtype {q.dtype} (the FP8 kernel needs CUDA, or the CPU interpreter)"


def _check_ds_format(ds_format: str) -> None:
    if ds_format not in FP8_FORMATS:
        raise ValueError(f"ds_format: expected one of {tuple(FP8_FORMATS)}, got {ds_format!r}")


def _prepare(q, k, v, k_lengths, rope, rotate):
    from kernels.attention import _check_inputs, _int32_lengths

    _check_inputs(q, k, v, k_lengths, rope)
    if rope is not None:
        cos, sin = (t.to(device=q.device, dtype=torch.float32) for t in rope)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    return q.contiguous(), k.contiguous(), v.contiguous(), _int32_lengths(k_lengths, q.device)


def _lse_of_keys(lse: torch.Tensor, q: torch.Tensor, kmean: torch.Tensor, scale: float) -> torch.Tensor:
    """The scheme's lse is over the smoothed keys k - mean k: the keys' own lse adds scale q.mean k (returned
    lse was off by it: 9 nats at a key offset of 3). Differentiable in q only: the backward's dQ uses the
    smoothed keys (dS (K - mean K)) and this adds scale mean K dlse; its dK omits the mean's Jacobian,
    which this term's gradient through mean K would cancel."""
    with fp32_math(q.device):
        shift = torch.einsum("bqhd,bhd->bhq", q.float(), kmean.detach().float()) * scale  # (B, H, Sq)
    return torch.where(torch.isinf(lse), lse, lse + shift)  # rows with no valid key stay -inf, no gradient


def attention_fp8(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    k_lengths: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    return_lse: bool = False,
    bwd_fp8_dp: bool = False,
    bwd_fp8_dqdk: bool = False,
    ds_format: str = "e4m3",
    block: int = QUANT_BLOCK,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FP8 attention (Triton): same contract as kernels.attention.attention, output in q's dtype.

    Unsupported inputs (see :func:`fp8_unsupported_reason`) run the bf16 Triton kernel after a one-time
    warning. bwd_fp8_dp: also run dP = dO V^T in FP8; bwd_fp8_dqdk: also dQ = dS K and dK = dS^T Q, with
    dS in ds_format ("e4m3" or "e5m2"; emulation: bwd_fp8 "dqdk"). block: quantisation block (tests use
    small ones).
    """
    _check_ds_format(ds_format)
    reason = fp8_unsupported_reason(q, k)
    if reason is not None:
        from kernels.attention import attention

        _warn_once(reason)
        return attention(q, k, v, scale=scale, k_lengths=k_lengths, rope=rope, return_lse=return_lse)
    if block not in (32, 64, 128):
        raise ValueError(f"block: expected 32, 64 or 128, got {block}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # the kernels take max(raw * c) = max(raw) * c, true for c > 0 only; scale = inf gave NaN
    if not 0 < scale < float("inf"):
        raise ValueError(f"scale: expected a positive number (finite), got {scale}")
    q, k, v, k_lengths = _prepare(q, k, v, k_lengths, rope, apply_rope)
    ds = ds_format if bwd_fp8_dqdk else None
    out, lse, kmean, *_ = _fp8_fwd_op(q, k, v, k_lengths, scale, block, bwd_fp8_dp, ds)
    return (out, _lse_of_keys(lse, q, kmean, scale)) if return_lse else out


def attention_fp8_emulated(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    k_lengths: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    return_lse: bool = False,
    bwd_fp8: tuple[str, ...] = ("dv",),
    ds_format: str = "e4m3",
    block: int = QUANT_BLOCK,
    smooth_k: bool = True,
    rotate: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch emulation of exactly the kernel's quantisation (scales, rounding, saturation, tiling).

    Differentiable (custom backward with the kernel's scheme). bwd_fp8: which backward products run in
    FP8, a subset of BWD_MATMULS ("dv" = P^T dO, "dp" = dO V^T, "dqdk" = dS K and dS^T Q with dS in
    ``ds_format``, one dynamic scale per block/2 entries along each product's reduction dim); the
    kernel's bwd_fp8_dp / bwd_fp8_dqdk add "dp" / "dqdk" to its ("dv",). Runs on any device and head
    dim; the reference the kernel is tested against, and the CPU model of its accuracy. smooth_k=False /
    rotate=False skip the K mean subtraction / the Hadamard rotation (to measure what they buy; rotate
    needs a power-of-two head dim).
    """
    bad = sorted(set(bwd_fp8) - set(BWD_MATMULS))
    if bad:
        raise ValueError(f"bwd_fp8: unknown products {bad}; expected a subset of {BWD_MATMULS}")
    _check_ds_format(ds_format)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v, k_lengths = _prepare(q, k, v, k_lengths, rope, apply_rope_reference)
    out, lse = _EmulatedFP8Attention.apply(
        q, k, v, k_lengths, scale, block, tuple(bwd_fp8), ds_format, smooth_k, rotate
    )
    if return_lse and smooth_k:
        lse = _lse_of_keys(lse, q, key_mean(k.detach(), k_lengths)[:, 0], scale)
    return (out, lse) if return_lse else out


# The models' default (attention(precision="fp8")): dV and dP in FP8. Measured: fwd+bwd 1.12x the dV-only
# kernel at the LTX-2, Wan and HY1.5 shapes on an H200 (1.09x on an H100), dq error 6.0% -> 7.4%, and a
# 200-step GPU training run with all five products in FP8 within noise of bf16 (bench/results/20261127_*).
_DISPATCH_BWD = {"dp": True, "dqdk": False, "ds_format": "e4m3"}


@contextlib.contextmanager
def fp8_backward_products(*, dp: bool = True, dqdk: bool = False, ds_format: str = "e4m3") -> Iterator[None]:
    """Within it, attention(precision="fp8") (the models' FP8 self-attention) runs dP = dO V^T (dp) and
    dQ, dK (dqdk, dS in ds_format) in FP8 or bf16 in the backward, on both backends ("triton": bwd_fp8_dp /
    bwd_fp8_dqdk, "torch": the emulation's bwd_fp8). The choice is taken when the forward runs; outside,
    the default is dV and dP in FP8 (dp=False: dV only, the most accurate). Not thread-safe (one
    module-level setting)."""
    _check_ds_format(ds_format)
    old = dict(_DISPATCH_BWD)
    _DISPATCH_BWD.update(dp=bool(dp), dqdk=bool(dqdk), ds_format=ds_format)
    try:
        yield
    finally:
        _DISPATCH_BWD.update(old)


def attention_fp8_dispatch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    k_lengths: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    return_lse: bool = False,
    backend: str = "triton",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """kernels.attention.attention(precision="fp8"): "triton" -> :func:`attention_fp8`, "torch" -> the
    emulation, with the backward products of :func:`fp8_backward_products`; "te" -> cuDNN's FP8 attention
    through Transformer Engine (kernels.attention.attention_te_fp8; bf16/fp16 inputs and a head dim that is a
    power of two >= 16, else TE's bf16 path after a one-time warning; calls with k_lengths run sdpa in bf16 after a
    one-time warning); "sdpa" and "flash_attn" have no FP8 mode and run in their own precision after a
    one-time warning."""
    kw = dict(scale=scale, k_lengths=k_lengths, rope=rope, return_lse=return_lse)
    opts = _DISPATCH_BWD
    if backend == "triton":
        return attention_fp8(
            q, k, v, bwd_fp8_dp=opts["dp"], bwd_fp8_dqdk=opts["dqdk"], ds_format=opts["ds_format"], **kw
        )
    from kernels.attention import attention

    d = q.shape[-1]
    not_pow2 = d < 1 or d & (d - 1)  # the emulation's and backend "te"'s pre-pass rotate by a Hadamard matrix
    pow2_reason = f"head dim {d} is not a power of two (the FP8 scheme's Hadamard rotation needs one)"
    if backend == "torch":
        if not_pow2:
            _warn_once(pow2_reason)
            return attention(q, k, v, backend="torch", **kw)
        products = ("dv",) + (("dp",) if opts["dp"] else ()) + (("dqdk",) if opts["dqdk"] else ())
        return attention_fp8_emulated(q, k, v, bwd_fp8=products, ds_format=opts["ds_format"], **kw)

    if backend == "te":
        if k_lengths is not None:  # a batch of texts of different lengths (HunyuanVideo-1.5 pads then): one
            # such batch among many must not stop a run (under FSDP the other ranks would wait till the timeout)
            _warn_once(
                "backend 'te' takes no k_lengths (keys padded per sample): such calls run sdpa in bf16"
            )
            return attention(q, k, v, backend="sdpa", **kw)
        if q.dtype not in (torch.bfloat16, torch.float16):
            _warn_once(f"backend 'te' takes FP8 attention in bf16 or fp16, not dtype {q.dtype}")
        elif not_pow2 or d < 16:
            _warn_once(
                f"head dim {d}: backend 'te' in FP8 takes a power of two >= 16 (its pre-pass's Hadamard product)"
            )
        else:
            from kernels.attention import attention_te_fp8

            return attention_te_fp8(q, k, v, **kw)
        return attention(q, k, v, backend=backend, **kw)
    _warn_once(f"backend {backend!r} has no FP8 mode (use 'triton' or 'te', or 'torch' for the emulation)")
    return attention(q, k, v, backend=backend, **kw)
