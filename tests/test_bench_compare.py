"""bench.compare on real result files written by bench.common: table, planted regression, exit code."""

import json
import subprocess
import sys
from pathlib import Path

from bench.common import environment, record, write_results

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, sub, fwd_tflops, step_ms):
    recs = [
        record("attention.fwd", "wan", "triton", "tflops", fwd_tflops, baseline="sdpa_flash"),
        record("attention.fwd", "wan", "sdpa_flash", "tflops", 360.0),
        record("trainer.step", "toy", "bf16", "ms", step_ms, higher_is_better=False),
    ]
    return write_results(recs, tmp_path / sub, env=environment())


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "bench.compare", *map(str, args)], capture_output=True, text=True, cwd=ROOT
    )


def test_ratio_filled_against_same_run_baseline(tmp_path):
    path = _write(tmp_path, "a", 450.0, 10.0)
    recs = {(r["provider"], r["metric"]): r for r in json.loads(path.read_text())["records"]}
    assert abs(recs[("triton", "tflops")]["ratio"] - 450.0 / 360.0) < 1e-12


def test_no_regression_exits_zero(tmp_path):
    old, new = _write(tmp_path, "a", 450.0, 10.0), _write(tmp_path, "b", 460.0, 9.9)
    r = _run(old, new)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 regression(s)" in r.stdout and "attention.fwd" in r.stdout


def test_planted_regression_flagged(tmp_path):
    # throughput down 20% and step time up 30%: both are regressions
    old, new = _write(tmp_path, "a", 450.0, 10.0), _write(tmp_path, "b", 360.0, 13.0)
    r = _run(old, new, "--threshold", "0.05")
    assert r.returncode == 1
    assert r.stdout.count("REGRESSION") == 2
    assert "2 regression(s)" in r.stdout


def test_a_benchmark_that_fails_or_collapses_is_a_regression(tmp_path):
    """Measured before, an error record now (not a skip): flagged with its message; a throughput of 0 or NaN
    is flagged too. A "skipped: ..." record is not a failure."""
    from bench.common import error_record

    old = _write(tmp_path, "a", 450.0, 10.0)
    recs = [
        error_record("attention.fwd", "wan", "triton", RuntimeError("CUDA error: an illegal memory access")),
        record("attention.fwd", "wan", "sdpa_flash", "tflops", float("nan")),
        record("trainer.step", "toy", "bf16", "error", 0.0, message="skipped: time budget"),
    ]
    new = write_results(recs, tmp_path / "b", env=environment())
    r = _run(old, new)
    assert r.returncode == 1, r.stdout
    assert "2 regression(s)" in r.stdout and "illegal memory access" in r.stdout
    assert "only in old: trainer.step / toy / bf16 / ms" in r.stdout  # the skip is listed, not flagged


def test_time_metric_orientation(tmp_path):
    # step time DOWN is an improvement even though the value decreased
    old, new = _write(tmp_path, "a", 450.0, 10.0), _write(tmp_path, "b", 450.0, 5.0)
    r = _run(old, new)
    assert r.returncode == 0
    assert "2.000x" in r.stdout


def test_bad_file_is_clear(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{}")
    r = _run(p, p)
    assert r.returncode != 0 and "not a bench result" in r.stderr


def test_plot_history(tmp_path):
    a, b = _write(tmp_path, "a", 450.0, 10.0), _write(tmp_path, "b", 470.0, 10.0)
    out = tmp_path / "h.png"
    r = _run("--plot", "attention.fwd", "--case", "wan", a, b, "-o", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failure_without_old_measurement_is_listed(tmp_path):
    """A benchmark that fails in NEW and has nothing measured in OLD (new, or failing in both) is listed with
    its message, not dropped; it is no regression (exit 0)."""
    from bench.common import error_record

    old = _write(tmp_path, "a", 450.0, 10.0)
    recs = [
        record("attention.fwd", "wan", "triton", "tflops", 450.0, baseline="sdpa_flash"),
        record("attention.fwd", "wan", "sdpa_flash", "tflops", 360.0),
        record("trainer.step", "toy", "bf16", "ms", 10.0, higher_is_better=False),
        error_record("trainer.step", "toy", "fp8_te", ImportError("no transformer_engine")),
    ]
    new = write_results(recs, tmp_path / "b", env=environment())
    r = _run(old, new)
    assert r.returncode == 0, r.stdout
    assert "failed in new: trainer.step / toy / fp8_te: ImportError: no transformer_engine" in r.stdout


def test_lower_is_better_zero_is_a_value(tmp_path):
    """For a lower-is-better metric (an error rate) 0 is the best value: 0 -> 0.5 is a regression (it was
    skipped as 'no baseline', exit 0), 0.008 -> 0 an improvement (it was flagged as a collapse)."""

    def run(old_value, new_value):
        files = []
        for sub, v in (("a", old_value), ("b", new_value)):
            recs = [record("fp8.accuracy", "out", "bf16", "rel_err", v, higher_is_better=False)]
            files.append(write_results(recs, tmp_path / sub, env=environment()))
        return _run(*files)

    r = run(0.0, 0.5)
    assert r.returncode == 1 and "1 compared, 1 regression(s)" in r.stdout, r.stdout
    r = run(0.008, 0.0)
    assert r.returncode == 0 and "1 compared, 0 regression(s)" in r.stdout, r.stdout
    r = run(0.0, 0.0)
    assert r.returncode == 0 and "1.000x" in r.stdout, r.stdout
    r = run(0.010, 0.0125)  # 25% worse: new/old oriented 0.8
    assert r.returncode == 1 and "0.800x  REGRESSION" in r.stdout, r.stdout


def test_duplicated_records_are_all_compared(tmp_path):
    """The same (name, case, provider, metric) twice in a file (peak_matmul measured by two modules): each
    record is compared with its counterpart in file order; the last one alone hid a regression of the first."""
    files = []
    for sub, first in (("a", 800.0), ("b", 600.0)):
        recs = [
            record("models.peak_matmul", "bf16-8192", "torch", "tflops", first),
            record("models.peak_matmul", "bf16-8192", "torch", "tflops", 780.0),
        ]
        files.append(write_results(recs, tmp_path / sub, env=environment()))
    r = _run(*files)
    assert r.returncode == 1, r.stdout
    assert "0.750x  REGRESSION" in r.stdout and "2 compared, 1 regression(s)" in r.stdout, r.stdout


def test_plot_history_x_axis_in_date_order(tmp_path):
    """Providers measured on different dates: the x axis is in date order (string dates made a categorical
    axis ordered by first appearance, so the first series' dates came before earlier ones of the next)."""
    import matplotlib.pyplot as plt

    from bench.compare import plot_history

    # value = day of the month, so x order must give increasing values
    runs = {"2026-11-02": ["a", "b"], "2026-11-03": ["a"], "2026-11-01": ["b"]}
    paths = []
    for date, providers in runs.items():
        env = {**environment(), "date": f"{date}T12:00:00+00:00"}
        recs = [record("attention.fwd", "wan", p, "tflops", float(date[-2:])) for p in providers]
        paths.append(write_results(recs, tmp_path / date, env=env))
    plot_history([str(p) for p in paths], "attention.fwd", "wan", str(tmp_path / "h.png"))
    ax = plt.gcf().axes[0]
    # the plotted points in axis units (category index or date number), sorted along the x axis
    pts = sorted((float(x), float(y)) for line in ax.get_lines() for x, y in line.get_xydata())
    plt.close("all")
    assert [y for _, y in pts] == sorted(y for _, y in pts)


def test_informational_counts_are_not_regressions(tmp_path):
    """attention.configs records how many autotuner configs a run chose (metric "count"): fewer is no
    regression (an H100 pair of real files flagged 25 -> 22 configs as one, exit 1)."""
    env = environment()
    recs = [record("attention.configs", "-", "triton", "count", 25.0)]
    old = write_results(
        [*recs, record("attention.fwd", "wan", "triton", "tflops", 450.0)], tmp_path / "a", env=env
    )
    new = write_results(
        [
            record("attention.configs", "-", "triton", "count", 22.0),
            record("attention.fwd", "wan", "triton", "tflops", 451.0),
        ],
        tmp_path / "b",
        env=env,
    )
    r = _run(old, new)
    assert r.returncode == 0 and "0 regression(s)" in r.stdout, r.stdout + r.stderr
    assert "attention.configs" not in r.stdout


def test_a_module_that_failed_as_a_whole_flags_what_it_measured_before(tmp_path):
    """bench.gpu_check writes one "<area>.module" error record when a module crashes or times out before its
    first record: compare listed its benchmarks as "only in old" and exited 0. They are regressions now, with
    the module's message; another module's records (attention_fp8 beside attention) are not touched."""
    old_recs = [
        record("attention.fwd", "wan", "triton", "tflops", 450.0),
        record("attention.module", "-", "-", "wall_s", 60.0, higher_is_better=False),
        record("attention_fp8.fwd", "wan", "fp8", "tflops", 600.0),
    ]
    new_recs = [
        record("attention.module", "-", "-", "error", 0.0, message="exit -11 (0 records kept): segfault"),
        record("attention_fp8.fwd", "wan", "fp8", "tflops", 601.0),
    ]
    old = write_results(old_recs, tmp_path / "a", env=environment())
    new = write_results(new_recs, tmp_path / "b", env=environment())
    r = _run(old, new)
    assert r.returncode == 1, r.stdout
    assert "2 regression(s)" in r.stdout, r.stdout  # attention.fwd and the module's wall_s
    assert "module attention failed: exit -11" in r.stdout and "only in old" not in r.stdout
    skipped = write_results(
        [record("attention.module", "-", "-", "error", 0.0, message="skipped: budget spent (270 s)"),
         record("attention_fp8.fwd", "wan", "fp8", "tflops", 601.0)],
        tmp_path / "c", env=environment(),
    )  # fmt: skip
    r = _run(old, skipped)
    assert r.returncode == 0 and "only in old: attention.fwd / wan / triton / tflops" in r.stdout, r.stdout
