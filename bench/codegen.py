"""What the attention kernels compile to on Hopper, without a GPU: registers, spills, shared memory, programs
per SM, whether the tile loads are software-pipelined, which tensor-core products run asynchronously, and how
many special-function exponentials a program issues.

    python -m bench.codegen                      # every autotune config of the bf16 kernels, sm_90
    python -m bench.codegen --kernel fwd --tma
    python -m bench.codegen --kernel fp8_fwd,fp8_dkdv,fp8_dq
    python -m bench.codegen --json out.json
    python -m bench.codegen --compare out.json     # after an edit: what got worse (exit 1 if anything)
    python -m bench.codegen --predict              # the model's fwd+bwd cycles per bf16 / FP8 variant

Triton compiles for a target it is told (``GPUTarget("cuda", 90, 32)``) with its own ptxas, so this runs on
the CPU-only machines; pointers are specialised as 16-byte aligned as at run time (without that hint Triton
does not pipeline the pointer loads). Columns:

- ``regs`` / ``spill``: registers per thread and local-memory bytes (cuobjdump -res-usage of the cubin).
- ``smem``: shared memory per program (KB); ``per_sm``: programs that fit one SM by registers (64K) and
  shared memory (227 KB usable, 1 KB reserved per program).
- ``pipelined``: asynchronous global-to-shared copies (cp.async or TMA) in the TTGIR: 0 means each tile is
  loaded and waited for in its own iteration.
- ``dots`` / ``sync``: wgmma products in the main loop, and how many of them are followed at once by a
  ``warp_group_dot_wait {pendings = 0}`` (the warpgroup stalls until the product is done). Triton lets a
  product run on only if its result is used solely as the next product's accumulator, so the q k^T product,
  whose scores the softmax reads, is always synchronous: within a warpgroup the softmax never overlaps a
  wgmma (FlashAttention-3's in-warpgroup pipelining cannot be written in Triton); only other warpgroups or
  programs on the SM can fill the tensor cores meanwhile.
- ``ex2``: MUFU.EX2 instructions in the SASS (per thread, whole kernel: loop body plus the masked tail).
- A static cost model of one iteration of the main loop (the shortest SASS span from a backward branch
  to its target that holds wgmma instructions, HGMMA / QGMMA), per program, in cycles of one SM sub-partition
  (a scheduler issues one warp instruction per cycle; a warpgroup's wgmma uses the tensor cores of all
  four): ``ins`` SASS instructions per warp; ``mma`` tensor-core cycles (M*N*K*2 per warpgroup and wgmma,
  all warpgroups, at 4,096 dense bf16/fp16 (HGMMA) or 8,192 FP8 (QGMMA) FLOP per cycle per SM); ``issue`` = ins * warps / 4;
  ``mufu`` = MUFU instructions * 8 * warps / 4 (16 results per cycle per SM); ``tc`` = mma / (mma +
  max(issue, mufu)): the tensor cores' share of a tile when the scalar work does not overlap the
  program's own products (as above); a second program on the SM (``per_sm`` >= 2) can fill the gap:
  ``tc2`` = mma / max(mma, issue, mufu), the share if the programs on an SM overlapped perfectly (one's
  softmax under the other's products; an upper bound, only for configs with ``per_sm`` >= 2).
  Which of issue and mufu is larger says what bounds the softmax: the issue slots (fewer instructions
  help) or the special-function unit.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

SM_REGS, SM_SMEM, SMEM_RESERVED = 65536, 227 * 1024, 1024


_FP8_OPERANDS = ("Q8", "K8", "V8", "V8T", "Q8T", "K8T", "DO8", "DO8T")
_FP8_SCALES = ("SQ", "SK", "SV", "SDO", "SDOREF", "DVEXP", "DVU")  # the FP8 kernels' per-block scale vectors
_FP32_POINTERS = ("LSE", "DELTA", "COS", "SIN") + _FP8_SCALES
_SIZES = ("Sq", "Sk", "H", "Q_BUCKET", "K_BUCKET", "SQP", "SKP")


def _signature(fn, tiles: dict[str, int], tma: bool, dtype: str) -> dict[str, str]:
    """Triton types of the attention kernels' arguments (kernels.attention / attention_fp8 naming)."""
    sig = {}
    for a in fn.arg_names:
        if a in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            sig[a] = f"*{dtype}"
        elif a in _FP8_OPERANDS:
            sig[a] = "*fp8e4nv"
        elif a in ("KD", "VD", "QD", "DOD"):
            rows = tiles["BLOCK_N"] if a in ("KD", "VD") else tiles["BLOCK_M"]
            sig[a] = f"tensordesc<{dtype}[{rows},{tiles['D']}]>" if tma else f"*{dtype}"
        elif a in _FP32_POINTERS:
            sig[a] = "*fp32"
        elif a == "KLEN":
            sig[a] = "*i32"
        elif a in ("scale", "qk_scale"):
            sig[a] = "fp32"
        elif a in _SIZES:
            sig[a] = "i32"
        else:
            sig[a] = "constexpr"
    return sig


def configs(kernel: str, rope: bool = False) -> list[tuple[int, ...]]:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages[, maxnreg]) configs the autotuner tries for a kernel: kernels.attention's
    "fwd", "dkdv", "dq", or kernels.attention_fp8's "fp8_fwd", "fp8_dkdv", "fp8_dq" (128-token
    quantisation blocks)."""
    if kernel.startswith("fp8_"):
        import kernels.attention_fp8 as F8

        return [
            (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            for c in F8.tile_configs(kernel[4:], F8.QUANT_BLOCK)
        ]
    import kernels.attention as A

    return list(A._TILES[(kernel, rope)][0])


def compile_attention(kernel: str, config: tuple[int, ...], *, tma: bool = False,
                      rope: bool = False, has_klen: bool = False, d: int = 128, dtype: str = "bf16",
                      capability: int = 90, fp8_dp: bool = False, fp8_ds: bool = False):  # fmt: skip
    """Compile one attention kernel (a name of :func:`configs`) at a (BLOCK_M, BLOCK_N, num_warps,
    num_stages) config for an sm_<capability> target; returns Triton's CompiledKernel. The FP8 kernels
    take no TMA or RoPE (RoPE runs before their pre-pass) and their default products (bf16 dP, dQ, dK)
    unless ``fp8_dp`` (dP in FP8, bwd_fp8_dp) or ``fp8_ds`` (dQ, dK with an e4m3 dS, bwd_fp8_dqdk)."""
    bm, bn, warps, stages, *reg = config
    consts = dict(D=d, HAS_KLEN=has_klen, BLOCK_M=bm, BLOCK_N=bn)
    if kernel.startswith("fp8_"):
        import kernels.attention_fp8 as F8

        fn = F8._KERNELS[kernel[4:]]
        consts.update(QBLK=F8.QUANT_BLOCK, EMULATE=False, FP8_DP=fp8_dp, FP8_DS=fp8_ds, DS_E5M2=False)
    else:
        import kernels.attention as A

        fn = A._RAW[kernel]
        consts.update(ROPE=rope, PRECISION="tf32", TMA=tma)
    consts = {c: v for c, v in consts.items() if c in fn.arg_names}
    sig = _signature(fn, dict(BLOCK_M=bm, BLOCK_N=bn, D=d), tma, dtype)
    for name, param in inspect.signature(fn.fn).parameters.items():  # constexprs left at their defaults
        if sig[name] == "constexpr" and name not in consts and param.default is not inspect.Parameter.empty:
            consts[name] = param.default
    if missing := [a for a in fn.arg_names if sig[a] == "constexpr" and a not in consts]:
        raise ValueError(f"bench.codegen: no value for the constexpr arguments {missing} of {kernel}")
    # as the launcher specialises 16-byte aligned pointers (and the padded lengths SQP, SKP)
    aligned = [a for a in fn.arg_names if sig[a].startswith("*") or a in ("SQP", "SKP")]
    return compile_kernel(
        fn, sig, consts, num_warps=warps, num_stages=stages, capability=capability, aligned=aligned,
        maxnreg=reg[0] if reg else None,
    )  # fmt: skip


def compile_kernel(fn, signature: dict[str, str], constexprs: dict, *, num_warps: int, num_stages: int,
                   capability: int = 90, aligned=(), maxnreg: int | None = None):  # fmt: skip
    """Compile a @triton.jit function for an sm_<capability> target without a GPU: ``signature`` maps every
    argument to a Triton type ("*bf16", "i32", "constexpr", ...), ``constexprs`` gives the constexpr values,
    ``aligned`` names the arguments specialised as multiples of 16 (pointers 16-byte aligned), as at run time;
    ``maxnreg`` caps the registers per thread (a Config's maxnreg).
    Raises ImportError where this Triton has no ahead-of-time compile API."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    src = ASTSource(
        fn=fn,
        signature={a: signature[a] for a in names},  # in argument order
        constexprs={(names.index(c),): v for c, v in constexprs.items()},
        attrs={(names.index(a),): [["tt.divisibility", 16]] for a in aligned},
    )
    target = GPUTarget("cuda", capability, 32)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return triton.compile(src, target=target, options=options)


def _main_loop(ttgir: str) -> list[str]:
    """The lines of the kernel's first scf.for body (the full-tile loop)."""
    lines = ttgir.splitlines()
    for i, line in enumerate(lines):
        if " scf.for " in line:
            indent = len(line) - len(line.lstrip())
            body = []
            for inner in lines[i + 1 :]:
                if inner.strip().startswith("scf.yield") and len(inner) - len(inner.lstrip()) == indent + 2:
                    return body
                body.append(inner)
            return body
    return []


def _tool(name: str) -> str | None:
    from triton import knobs

    try:
        return getattr(knobs.nvidia, name).path
    except Exception:  # noqa: BLE001 - a Triton without the bundled binary
        return None


def analyze(compiled, num_warps: int) -> dict:
    """The columns of the module docstring for one CompiledKernel."""
    ttgir = compiled.asm["ttgir"]
    loop = _main_loop(ttgir)
    dots = [i for i, line in enumerate(loop) if "ttng.warp_group_dot " in line]
    sync = sum(
        1
        for i in dots
        if i + 1 < len(loop) and "warp_group_dot_wait" in loop[i + 1] and "pendings = 0" in loop[i + 1]
    )
    out = dict(
        smem_kb=compiled.metadata.shared / 1024,
        pipelined=len(re.findall(r"async_copy_global_to_local|async_tma_copy_global_to_local", ttgir)),
        dots=len(dots),
        sync=sync,
        regs=None,
        spill=None,
        ex2=None,
        per_sm=None,
    )
    cuobjdump = _tool("cuobjdump")
    if cuobjdump and "cubin" in compiled.asm:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            # resource usage (REG: ... LOCAL: ...) and the SASS, in one dump
            sass = subprocess.run(
                [cuobjdump, "-res-usage", "-sass", f.name], capture_output=True, text=True
            ).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", sass)
        if m:
            out["regs"], out["spill"] = int(m.group(1)), int(m.group(2)) + int(m.group(3))
            by_regs = SM_REGS // (out["regs"] * 32 * num_warps)
            by_smem = SM_SMEM // (compiled.metadata.shared + SMEM_RESERVED)
            out["per_sm"] = min(by_regs, by_smem)
        out["ex2"] = sass.count("MUFU.EX2")
        out.update(_loop_model(sass, num_warps))
        if out.get("mma") and out["per_sm"] and out["per_sm"] >= 2:
            out["tc2"] = out["mma"] / max(out["mma"], out["issue"], out["mufu"])
    return out


_SASS_LINE = re.compile(r"\s+/\*([0-9a-f]{4,6})\*/\s+(.*?)\s*;")
_GMMA = re.compile(r"([HQ])GMMA\.(\d+)x(\d+)x(\d+)")  # HGMMA: bf16/fp16 operands, QGMMA: FP8


def _loop_model(sass: str, num_warps: int) -> dict:
    """The static per-iteration model of the module docstring from the main loop of the SASS."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in map(_SASS_LINE.match, sass.splitlines()) if m]
    index = {addr: i for i, (addr, _) in enumerate(ins)}
    best = None
    for i, (addr, text) in enumerate(ins):
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr and int(target.group(1), 16) in index:
            body = [t for _, t in ins[index[int(target.group(1), 16)] : i + 1]]
            # the innermost loop with tensor-core work (a TMA kernel's mbarrier retry branch also jumps back
            # over the whole kernel)
            if any("GMMA" in t for t in body) and (best is None or len(body) < len(best)):
                best = body
    if not best:
        return {}
    flops = 0
    for text in best:
        m = _GMMA.search(text)
        if m:
            rate = 8192 if m.group(1) == "Q" else 4096
            flops += int(m.group(2)) * int(m.group(3)) * int(m.group(4)) * 2 / rate
    mma = flops * num_warps / 4
    issue = len(best) * num_warps / 4
    mufu = sum(bool(re.match(r"(@!?U?P\w+\s+)?MUFU", t)) for t in best) * 8 * num_warps / 4
    return dict(
        ins=len(best), mma=mma, issue=issue, mufu=mufu, tc=mma / (mma + max(issue, mufu)) if mma else None
    )


def report(kernels: list[str], *, tma: bool, rope: bool) -> list[dict]:
    rows = []
    for kernel in kernels:
        for config in configs(kernel, rope):
            row = dict(kernel=kernel, config=list(config), tma=tma, rope=rope)
            try:
                row.update(analyze(compile_attention(kernel, config, tma=tma, rope=rope), config[2]))
            except Exception as e:  # noqa: BLE001 - one config that does not build is a row, not the end
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
    return rows


# The kernels one forward + backward runs, per variant: (kernel, dP in FP8, dQ/dK in FP8). The FP8 variants
# share the forward.
VARIANTS = {
    "bf16, split backward (default)": (("fwd", False, False), ("dkdv", False, False), ("dq", False, False)),
    "fp8, split backward (default: dV fp8)": (
        ("fp8_fwd", False, False), ("fp8_dkdv", False, False), ("fp8_dq", False, False)),
    "fp8 + bwd_fp8_dp, split": (("fp8_fwd", False, False), ("fp8_dkdv", True, False), ("fp8_dq", True, False)),
    "fp8 + bwd_fp8_dqdk (e4m3 dS), split": (
        ("fp8_fwd", False, False), ("fp8_dkdv", False, True), ("fp8_dq", False, True)),
    "fp8, both options, split": (("fp8_fwd", False, False), ("fp8_dkdv", True, True), ("fp8_dq", True, True)),
}  # fmt: skip
PREDICT_BLOCK = 128  # the (query, key) block of work the prediction counts cycles for


def predict(variants: dict = VARIANTS) -> list[dict]:
    """bench.codegen's static model per variant: cycles per SM for one PREDICT_BLOCK x PREDICT_BLOCK block of
    (query, key) work at head dim 128, each kernel at its first config (pointer loads):
    per tile, tensor-core cycles plus the larger of issue and special-function cycles (no overlap between
    programs), times the tiles that cover the block. Rows: variant, forward, backward, fwd_bwd and mma (the
    tensor-core cycles alone), ratio = the first variant's fwd_bwd / this one's."""
    cache, rows = {}, []
    for name, kernels in variants.items():
        row = dict(variant=name, forward=0.0, backward=0.0, mma=0.0)
        for kernel, dp, ds in kernels:
            key = (kernel, dp, ds)
            if key not in cache:
                config = configs(kernel)[0]
                r = analyze(compile_attention(kernel, config, fp8_dp=dp, fp8_ds=ds), config[2])
                tiles = PREDICT_BLOCK * PREDICT_BLOCK / (config[0] * config[1])
                cache[key] = (tiles * (r["mma"] + max(r["issue"], r["mufu"])), tiles * r["mma"])
            cycles, mma = cache[key]
            row["forward" if kernel.endswith("fwd") else "backward"] += cycles
            row["mma"] += mma
        row["fwd_bwd"] = row["forward"] + row["backward"]
        rows.append(row)
    for row in rows:
        row["ratio"] = rows[0]["fwd_bwd"] / row["fwd_bwd"]
    return rows


def _cell(c: str, v) -> str:
    if c == "config":
        return f"{str(tuple(v)):>14}"
    if v is None:
        v = "-"
    elif c in ("tc", "tc2"):
        v = f"{v:.2f}"
    elif isinstance(v, float):
        v = f"{v:.0f}"
    return f"{v:>9}"


def _row_key(r: dict) -> tuple:
    return (r["kernel"], tuple(r["config"]), r["tma"], r["rope"])


def compare(old: list[dict], new: list[dict], tolerance: float = 0.02) -> list[str]:
    """Regressions of the rows of ``new`` against the same (kernel, config, variant) rows of ``old``: a build
    that failed, more spill bytes, fewer programs per SM, unpipelined loads, more synchronous products, fewer
    tensor-core products in the main loop, or the model's tensor-core share ``tc`` down by more than
    ``tolerance`` (relative). One line each."""
    # rows an older bench.codegen wrote with --split-exp (a variant since removed) match nothing
    before = {_row_key(r): r for r in old if not r.get("split_exp")}
    out = []
    for r in new:
        o = before.get(_row_key(r))
        if o is None or "error" in o:
            continue
        name = f"{r['kernel']} {tuple(r['config'])}"
        if "error" in r:
            out.append(f"{name}: no longer builds ({r['error']})")
            continue
        for col, worse in (("spill", 1), ("per_sm", -1), ("sync", 1), ("pipelined", -1), ("dots", -1)):
            if r.get(col) is not None and o.get(col) is not None and (r[col] - o[col]) * worse > 0:
                out.append(f"{name}: {col} {o[col]} -> {r[col]}")
        if r.get("tc") and o.get("tc") and r["tc"] < o["tc"] * (1 - tolerance):
            out.append(f"{name}: tc {o['tc']:.3f} -> {r['tc']:.3f} (ins {o.get('ins')} -> {r.get('ins')})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument(
        "--kernel",
        default="fwd,dkdv,dq",
        help="comma list of fwd, dkdv, dq (bf16) and fp8_fwd, fp8_dkdv, fp8_dq (FP8 attention)",
    )
    ap.add_argument("--tma", action="store_true", help="TMA tensor-descriptor loads (kernels.attention.TMA)")
    ap.add_argument("--rope", action="store_true", help="the fused-RoPE variants")
    ap.add_argument(
        "--predict",
        action="store_true",
        help="the static model's cycles per 128 x 128 block of work for each bf16 / FP8 backward variant\n"
        "(forward, backward, fwd+bwd, ratio vs the bf16 split backward; ignores --kernel)",
    )
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument(
        "--compare",
        metavar="OLD_JSON",
        help="rows written by an earlier --json: list regressions (spills, programs per SM, pipelining,\n"
        "synchronous products, the model's tensor-core share down > 2%%) and exit 1 if there are any",
    )
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    if args.predict and args.compare:
        ap.error("--compare reads the per-config rows of --json, not --predict's")
    if args.predict:
        rows = predict()
        print(f"{'variant':<40} {'forward':>8} {'backward':>9} {'fwd_bwd':>8} {'mma':>7} {'ratio':>6}")
        for r in rows:
            print(f"{r['variant']:<40} {r['forward']:>8.0f} {r['backward']:>9.0f} {r['fwd_bwd']:>8.0f} "
                  f"{r['mma']:>7.0f} {r['ratio']:>5.2f}x")  # fmt: skip
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    kernels = [k for k in args.kernel.split(",") if k]
    if args.rope:  # the FP8 kernels have no fused-RoPE variant
        kernels = [k for k in kernels if not k.startswith("fp8_")]
    rows = report(kernels, tma=args.tma, rope=args.rope)
    cols = ["kernel", "config", "regs", "spill", "smem_kb", "per_sm", "pipelined", "dots", "sync", "ex2", "ins", "mma",
            "issue", "mufu", "tc", "tc2"]  # fmt: skip
    print(" ".join(f"{c:>14}" if c == "config" else f"{c:>9}" for c in cols))
    for r in rows:
        if "error" in r:
            print(f"{r['kernel']:>9} {str(tuple(r['config'])):>14} error: {r['error']}")
            continue
        print(" ".join(_cell(c, r["kernel"] if c == "kernel" else r.get(c)) for c in cols))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.compare:
        with open(args.compare) as f:
            regressions = compare(json.load(f), rows)
        print(
            "\n".join(["regressions:", *regressions])
            if regressions
            else "no regressions against " + args.compare
        )
        return 1 if regressions else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
