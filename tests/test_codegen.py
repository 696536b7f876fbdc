"""What the attention kernels compile to for Hopper (sm_90), checked without a GPU (bench/codegen.py): the
Triton compiler runs in a subprocess without the interpreter. These pin properties the GPU numbers depend on
and that a harmless-looking edit can lose: software-pipelined tile loads, the forward's p v product running
asynchronously (in-place accumulation), shared memory within the SM, no register spills in the forward."""

import json

import pytest

_PROBE = """
import json, sys
try:
    from triton.backends.compiler import GPUTarget  # noqa: F401
    from triton.compiler import ASTSource  # noqa: F401
except ImportError as e:
    print("no ahead-of-time compile API:", e)
    sys.exit(3)
from bench.codegen import analyze, compile_attention, configs
rows = []
for kernel, rope, tma, *cfg in json.loads(sys.argv[1]):
    config = tuple(cfg[0]) if cfg else configs(kernel, rope)[0]
    try:
        k = compile_attention(kernel, config, tma=tma, rope=rope, has_klen=True)
    except TypeError as e:
        print("ASTSource API differs:", e)
        sys.exit(3)
    rows.append(dict(kernel=kernel, rope=rope, tma=tma, **analyze(k, config[2])))
print(json.dumps(rows))
"""


def _compile(run, cases) -> list[dict]:
    r = run("-c", _PROBE, json.dumps(cases))
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def plain(without_interpreter):
    """The first (deterministic) config of each kernel, pointer loads."""
    kernels = ("fwd", "dkdv", "dq", "fp8_fwd", "fp8_dkdv", "fp8_dq")
    return _compile(without_interpreter, [[k, False, False] for k in kernels])


def test_tile_loads_are_pipelined_and_fit_the_sm(plain):
    for row in plain:
        assert row["pipelined"] > 0, row  # async global->shared copies: loads overlap the previous tile
        assert row["smem_kb"] <= 227, row


def test_only_the_products_the_softmax_reads_wait(plain):
    """Per kernel, (wgmma products in the loop, those waited for at once): the forward's q k^T waits (the
    softmax reads it), its p v accumulates in place and runs on; the backward's dK/dV kernel waits for
    q k^T and dO v^T, not dV / dK; the dQ kernel for its two score products, not dQ. The FP8 kernels alike
    (their P V and dV accumulate in place)."""
    got = {r["kernel"]: (r["dots"], r["sync"]) for r in plain}
    assert got["fwd"] == (2, 1) and got["dkdv"] == (4, 2) and got["dq"] == (3, 2), got
    assert got["fp8_fwd"] == (2, 1) and got["fp8_dkdv"] == (4, 2) and got["fp8_dq"] == (3, 2), got


@pytest.mark.parametrize("kernel", ["fwd", "fp8_fwd"])
def test_forward_has_no_spills(plain, kernel):
    fwd = next(r for r in plain if r["kernel"] == kernel)
    if fwd["regs"] is None:
        pytest.skip("no cuobjdump bundled with this Triton")
    assert fwd["spill"] == 0, fwd


def test_tma_and_rope_variants_compile_for_hopper(without_interpreter):
    """The TMA variants of every kernel, with and without fused RoPE, compiled
    (not run) for sm_90: the interpreter accepts descriptor code that the GPU compiler may reject."""
    import kernels.attention as A

    cases = [[k, rope, True] for k, rope in [key for key in A._TILES if len(key) == 2]]
    for row in _compile(without_interpreter, cases):
        assert row["smem_kb"] <= 227 and row["pipelined"] > 0, row


def test_register_capped_configs_fit_two_programs_per_sm(without_interpreter):
    """The autotune configs with a maxnreg (a 5th element) exist to put two 8-warp programs on an SM, so one's
    softmax runs under the other's wgmma: at 128 registers per thread and <= 113 KB of shared memory each,
    with TMA loads and with pointer loads, and only a few spilled registers (not the kilobytes an uncapped
    config's spills would mean)."""
    import kernels.attention as A

    capped = [
        [k, False, tma, c]
        for k in ("fwd", "dq")
        for c in A._TILES[(k, False)][0]
        if len(c) == 5
        for tma in (True, False)
    ]
    assert capped, "no register-capped config"
    rows = _compile(without_interpreter, capped)
    if rows[0]["regs"] is None:
        pytest.skip("no cuobjdump bundled with this Triton")
    for case, row in zip(capped, rows):
        assert row["regs"] <= case[3][4] and row["per_sm"] == 2, (case, row)
        assert row["spill"] <= 128, (case, row)  # measured 8-88 bytes (Triton 3.6 / 3.9)


def test_fp8_forward_is_not_issue_bound_by_multiplies(plain):
    """bench/codegen's static model of the FP8 forward's loop: the score scale and the 448 of E4M3(448 P) ride
    in the exponent's FMA, so issuing the softmax's instructions takes about as long as its exponentials on
    the special-function unit (1.06x: the row sums' fp32 adds; scaling s and P by separate multiplies made it
    1.3x). The row sums stay fp32 adds: in Hopper's FP8 wgmma, which accumulates in ~22 bits, a row sum
    carried across key tiles lost 1.6% of accuracy on an H100 (test_only_the_products_the_softmax_reads_wait
    counts the loop's two products)."""
    row = next(r for r in plain if r["kernel"] == "fp8_fwd")
    if row.get("issue") is None:
        pytest.skip("no cuobjdump bundled with this Triton")
    assert 0 < row["tc"] < 1 and row["mma"] > 0, row
    assert row["issue"] <= 1.1 * row["mufu"], row


def test_cli_prints_and_writes_every_config(tmp_path, without_interpreter):
    """python -m bench.codegen --kernel dq --json F: one table row and one JSON row per autotune config."""
    pytest.importorskip("triton.backends.compiler", reason="no ahead-of-time compile API in this Triton")
    from bench.codegen import configs

    out = tmp_path / "dq.json"
    r = without_interpreter("-m", "bench.codegen", "--kernel", "dq", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [tuple(row["config"]) for row in rows] == configs("dq")
    assert all("error" not in row and row["pipelined"] > 0 for row in rows), rows
    table = [line for line in r.stdout.splitlines() if line.split()[:1] == ["dq"]]
    assert len(table) == len(rows), r.stdout
    bad = without_interpreter("-m", "bench.codegen", timeout=120, interpret=True)
    assert bad.returncode == 2 and "unset TRITON_INTERPRET" in bad.stderr


def test_compare_flags_what_got_worse():
    """bench.codegen --compare: a row of the same kernel, config and variant that spills more, fits fewer
    programs per SM, loses its pipelining, waits for more products, loses > 2% of the model's tensor-core
    share, or no longer builds is a regression; better or unmatched rows are not."""
    from bench.codegen import compare

    def row(config=(128, 64, 8, 3), **kw):
        base = dict(kernel="fwd", config=list(config), tma=False, rope=False, spill=0, per_sm=1, sync=1,
                    pipelined=6, tc=0.60, ins=360, dots=2)  # fmt: skip
        return dict(base, **kw)

    old = [row(), row((128, 32, 4, 3), per_sm=2), row((64, 64, 4, 2))]
    assert (
        compare(old, [row(tc=0.595, ins=362), row((128, 32, 4, 3), per_sm=2), row((1, 1, 1, 1), spill=9)])
        == []
    )
    got = compare(
        old,
        [row(spill=24, tc=0.55, ins=400), row((128, 32, 4, 3), per_sm=1, sync=2, pipelined=0),
         row((64, 64, 4, 2), error="CompilationError: ...")],
    )  # fmt: skip
    assert got == [
        "fwd (128, 64, 8, 3): spill 0 -> 24",
        "fwd (128, 64, 8, 3): tc 0.600 -> 0.550 (ins 360 -> 400)",
        "fwd (128, 32, 4, 3): per_sm 2 -> 1",
        "fwd (128, 32, 4, 3): sync 1 -> 2",
        "fwd (128, 32, 4, 3): pipelined 6 -> 0",
        "fwd (64, 64, 4, 2): no longer builds (CompilationError: ...)",
    ], got
    # a main loop that lost its tensor-core products (no wgmma, so no model share to compare) is a regression
    assert compare(old, [row(dots=0, tc=None, sync=0)]) == ["fwd (128, 64, 8, 3): dots 2 -> 0"]
    assert compare(old, [row(tma=True, spill=99)]) == []  # another variant: not the same row
    assert compare([row(split_exp=True)], [row(spill=99)]) == []  # an older JSON's removed --split-exp rows


# Per variant of bench.codegen.VARIANTS, the S^2 D products one (query, key) block runs in (bf16, FP8), from
# the algorithm (kernels/attention_fp8.py's module doc), not from the SASS: forward q k^T and p v; the split
# backward's dK/dV kernel recomputes q k^T and forms dV, dP, dK, its dQ kernel recomputes q k^T and dP and
# forms dQ. FP8: the scores and dV always, dP with bwd_fp8_dp, dQ and dK with bwd_fp8_dqdk.
_PRODUCTS = {
    "bf16, split backward (default)": (9, 0),
    "fp8, split backward (default: dV fp8)": (4, 5),
    "fp8 + bwd_fp8_dp, split": (2, 7),
    "fp8 + bwd_fp8_dqdk (e4m3 dS), split": (2, 7),
    "fp8, both options, split": (0, 9),
}


def test_predicted_tensor_core_work_matches_the_algorithm(tmp_path, without_interpreter):
    """bench.codegen --predict: the tensor-core cycles it reads off the SASS of each variant's kernels equal
    the product count of the algorithm, at 4,096 (bf16) and 8,192 (FP8) FLOP per cycle and SM, so every option
    puts exactly its products on the FP8 tensor cores; and the ratios are against the first (bf16 split) row."""
    pytest.importorskip("triton.backends.compiler", reason="no ahead-of-time compile API in this Triton")
    out = tmp_path / "predict.json"
    r = without_interpreter("-m", "bench.codegen", "--predict", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [row["variant"] for row in rows] == list(_PRODUCTS)
    assert len([line for line in r.stdout.splitlines() if line.endswith("x")]) == len(rows), r.stdout
    b = 128
    product = 2 * b * b * 128  # one S^2 D product of a b x b block at head dim 128, FLOP
    for row in rows:
        n_bf16, n_fp8 = _PRODUCTS[row["variant"]]
        assert row["mma"] == n_bf16 * product / 4096 + n_fp8 * product / 8192, row
        assert row["fwd_bwd"] == row["forward"] + row["backward"] > row["mma"], row
        assert row["ratio"] == pytest.approx(rows[0]["fwd_bwd"] / row["fwd_bwd"]), row
