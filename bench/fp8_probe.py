"""GPU probe of the FP8 attention forward: which part disagrees with the emulation, and which launch fixes it.

    python -m bench.fp8_probe [--out DIR]     # prints a table; writes fp8_probe.json under DIR ($OUT)

1. The two tl.dot patterns the forward kernel uses, alone, against torch on the same e4m3 values:
   q8 k8^T (both operands loaded) and E4M3(448 p) v8 (A converted in registers; B loaded as (D, N) and
   transposed, as the kernel does, or loaded as (N, D)), for num_warps 4 and 8.
2. The forward kernel (kernels.attention_fp8._fp8_fwd) against the torch emulation of the same scheme:
   with e4m3 operands at each (num_warps, num_stages), and with the exact fp16 carriers of the CPU
   interpreter path (EMULATE=True: in-kernel rounding, fp16 tensor cores), per 128-query tile; V read
   as (D, N) tiles transposed (V_T, the kernel's default) or as (N, D) tiles.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl


@triton.jit
def _dot_qk(A, B, C, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    a = tl.load(A + tl.arange(0, M)[:, None] * K + tl.arange(0, K)[None, :])
    b = tl.load(B + tl.arange(0, N)[:, None] * K + tl.arange(0, K)[None, :])
    tl.store(C + tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :], tl.dot(a, tl.trans(b)))


@triton.jit
def _dot_pv(P, V, C, M: tl.constexpr, N: tl.constexpr, D: tl.constexpr, V_DN: tl.constexpr):
    p = tl.load(P + tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :])  # fp32 in [0, 1]
    if V_DN:  # V stored (D, N): the kernel's layout, transposed in registers
        vt = tl.load(V + tl.arange(0, D)[:, None] * N + tl.arange(0, N)[None, :])
        c = tl.dot((p * 448.0).to(vt.dtype), tl.trans(vt))
    else:  # V stored (N, D)
        v = tl.load(V + tl.arange(0, N)[:, None] * D + tl.arange(0, D)[None, :])
        c = tl.dot((p * 448.0).to(v.dtype), v)
    tl.store(C + tl.arange(0, M)[:, None] * D + tl.arange(0, D)[None, :], c)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def dot_patterns() -> list[dict]:
    torch.manual_seed(0)
    M = N = D = 128
    e4 = torch.float8_e4m3fn
    rows = []
    a8, b8 = (torch.randn(M, D, device="cuda") * 30).to(e4), (torch.randn(N, D, device="cuda") * 30).to(e4)
    p = torch.rand(M, N, device="cuda")
    p8 = (p * 448).to(e4)
    v8 = (torch.randn(N, D, device="cuda") * 30).to(e4)
    ref_qk = a8.float() @ b8.float().T
    ref_pv = p8.float() @ v8.float()
    for w in (4, 8):
        c = torch.empty(M, N, device="cuda")
        _dot_qk[(1,)](a8, b8, c, M, N, D, num_warps=w)
        rows.append(dict(probe="dot q8 k8^T", num_warps=w, rel_err=_rel(c, ref_qk)))
        for v_dn in (True, False):
            c = torch.empty(M, D, device="cuda")
            vv = v8.T.contiguous() if v_dn else v8
            _dot_pv[(1,)](p, vv, c, M, N, D, v_dn, num_warps=w)
            rows.append(dict(probe=f"dot E4M3(448p) v8 ({'(D,N)^T' if v_dn else '(N,D)'})", num_warps=w,
                             rel_err=_rel(c, ref_pv)))  # fmt: skip
    return rows


def forward_launches(
    device: str = "cuda", shape: tuple[int, int, int, int] = (1, 1536, 2, 128)
) -> list[dict]:
    """Rows of the forward kernel vs the emulation. device "cpu" (the Triton interpreter): fp32 inputs and
    the fp16 carrier only (no float8 there), launch settings ignored."""
    from kernels import attention_fp8 as af

    torch.manual_seed(0)
    (B, S, H, D), block = shape, af.QUANT_BLOCK
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    q, k, v = (torch.randn(B, S, H, D, device=device, dtype=dtype) for _ in range(3))
    scale = D**-0.5
    rows = []
    carriers = ((torch.float8_e4m3fn, False), (torch.float16, True)) if cuda else ((torch.float16, True),)
    for carrier, emulate in carriers:
        quant = af._quantize_qkv(q, k, v, None, block, carrier)
        emu, emu_lse = af._fwd_emulated(quant, None, scale, S, S, block, torch.float32)
        q8, sq, k8, sk, v8, sv = quant
        v8t = v8.transpose(-1, -2).contiguous()
        SQP, SKP = q8.shape[2], k8.shape[2]
        launches = (
            ((8, 3, True), (8, 3, False), (4, 2, True), (4, 2, False), (8, 1, True))
            if not emulate
            else ((8, 3, True), (8, 3, False))
        )
        for w, st, v_t in launches:
            out = torch.empty(B, S, H, D, device=device, dtype=dtype)
            lse = torch.empty(B, H, S, device=device)
            try:
                af._fp8_fwd[(triton.cdiv(S, block), B * H)](
                    q8, k8, v8t if v_t else v8, sq, sk, sv, out, lse, q8, S, S, SQP, SKP, H, scale * af._LOG2E,
                    af._bucket(SQP), af._bucket(SKP), D=D, QBLK=block, HAS_KLEN=False, EMULATE=emulate, BLOCK_M=block, BLOCK_N=block,
                    V_T=v_t, num_warps=w, num_stages=st,
                )  # fmt: skip
                if cuda:
                    torch.cuda.synchronize()
            except Exception as e:  # a launch that does not compile is a row too
                rows.append(
                    dict(
                        probe=f"fwd kernel {carrier}", num_warps=w, num_stages=st, v_t=v_t, error=str(e)[:300]
                    )
                )
                continue
            tiles = [_rel(out[:, i : i + block], emu[:, i : i + block]) for i in range(0, S, block)]
            rows.append(dict(probe=f"fwd kernel {str(carrier).split('.')[-1]}", num_warps=w, num_stages=st, v_t=v_t,
                             rel_err=_rel(out, emu), lse_err=(lse - emu_lse).abs().max().item(),
                             tile_rel_err=[round(t, 4) for t in tiles]))  # fmt: skip
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("fp8_probe: needs a CUDA device")
        return 1
    rows = []
    for part in (dot_patterns, forward_launches):
        try:
            rows += part()
        except Exception as e:
            rows.append(dict(probe=part.__name__, error=f"{type(e).__name__}: {e}"[:500]))
    for r in rows:
        print(json.dumps(r))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fp8_probe.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
