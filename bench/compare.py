"""Compare two benchmark result files, or plot one benchmark's history.

    python -m bench.compare OLD.json NEW.json [--threshold 0.05]
    python -m bench.compare --plot attention.fwd --case wan1.3b-480p bench/results/*.json -o hist.png

For every (name, case, provider, metric) present in both files it prints OLD, NEW and NEW/OLD oriented
so that > 1 is better (throughput up or time down). A benchmark that got worse by more than the
threshold is flagged REGRESSION and the exit code is 1; so is one whose new value is 0 or not a number,
and one measured in OLD that fails in NEW (an error record for its case and provider, with its message;
a "skipped: ..." record is not a failure), or whose whole module failed in NEW (bench.gpu_check's
"<module>.module" error record: the module crashed or timed out before measuring it). Other records only in
one file, and failures in NEW with nothing measured in OLD to compare, are listed; informational metrics (a
count of autotuner configs) are not compared. Results from different devices are compared only with --allow-device-mismatch (their ratios
mean little).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path
from typing import Any

Key = tuple[str, str, str, str]


def load_results(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise SystemExit(f"error: results file '{p}' does not exist") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: results file '{p}' is not valid JSON: {e}") from None
    if not isinstance(data, dict) or "records" not in data or "env" not in data:
        raise SystemExit(f"error: results file '{p}' has no 'env' and 'records' (not a bench result)")
    return data


def _index(records: list[dict]) -> dict[Key, dict]:
    """Records by key; a key repeated in one file (a module's own wall_s and gpu_check's, peak_matmul of two
    modules) keeps every record, paired in file order: the second's metric is "<metric>#2", and so on."""
    out: dict[Key, dict] = {}
    seen: dict[Key, int] = {}
    for r in records:
        if r["metric"] == "error":
            continue
        key = (r["name"], r["case"], r["provider"], r["metric"])
        seen[key] = n = seen.get(key, 0) + 1
        out[key if n == 1 else (*key[:3], f"{key[3]}#{n}")] = r
    return out


# metrics that describe a run rather than measure it (how many autotuner configs it chose): not compared
INFORMATIONAL = {"count"}


def _failures(records: list[dict]) -> dict[tuple[str, str, str], str]:
    """(name, case, provider) -> message of the error records that are failures (not "skipped: ...")."""
    out = {}
    for r in records:
        extra = r.get("extra") or {}
        message = str(extra.get("message", ""))
        if r["metric"] == "error" and not message.startswith("skipped:") and not extra.get("skipped"):
            out[(r["name"], r["case"], r["provider"])] = message or "error"
    return out


def compare(old: dict, new: dict, threshold: float) -> tuple[list[dict], list[Key], list[Key]]:
    """Rows of (key, old, new, change) where change > 1 means better; plus keys only in old / new. A new
    value of 0 or NaN (where the old one was a positive number; for a lower-is-better metric NaN, or any value
    where the old one was 0) and a benchmark that fails in ``new`` are regressions (change 0; ``new`` None and
    ``error`` its message for a failure)."""
    a, b = _index(old["records"]), _index(new["records"])
    failed = _failures(new["records"])
    rows = []
    for key in sorted(a.keys() & b.keys()):
        ra, rb = a[key], b[key]
        va, vb = ra["value"], rb["value"]
        if rb["metric"] in INFORMATIONAL:
            continue
        if rb.get("higher_is_better", True):
            if not (va > 0 and math.isfinite(va)):
                continue  # no baseline to compare with
            # collapsed to 0 or not a number
            change = vb / va if vb > 0 and math.isfinite(vb) else 0.0
        else:
            # lower is better (ms, wall_s, memory, error rates): 0 is the best value, not a missing one
            if not (va >= 0 and math.isfinite(va)):
                continue
            if not (vb >= 0 and math.isfinite(vb)):
                change = 0.0
            elif vb == 0:
                change = 1.0 if va == 0 else math.inf
            else:
                change = va / vb
        rows.append(
            {"key": key, "old": ra["value"], "new": rb["value"], "change": change,
             "regression": change < 1.0 - threshold}
        )  # fmt: skip
    # modules that failed as a whole in new (bench.gpu_check: "<area>.module" / - / -): what they measured in
    # old is missing from new because of the failure
    failed_modules = {k[0][: -len(".module")]: m for k, m in failed.items() if k[0].endswith(".module")}
    only_old = []
    for key in sorted(a.keys() - b.keys()):
        message = failed.get(key[:3])
        if message is None:
            area = key[0].split(".", 1)[0]
            if area in failed_modules:
                message = f"module {area} failed: {failed_modules[area]}"
        if message is None:
            only_old.append(key)
        else:  # measured before, fails now
            rows.append({"key": key, "old": a[key]["value"], "new": None, "change": 0.0, "regression": True,
                         "error": message})  # fmt: skip
    return rows, only_old, sorted(b.keys() - a.keys())


def format_table(rows: list[dict]) -> str:
    head = f"{'benchmark':<34} {'case':<22} {'provider':<14} {'metric':<10} {'old':>11} {'new':>11} {'new/old':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        name, case, provider, metric = r["key"]
        flag = "  REGRESSION" if r["regression"] else ""
        new = f"{r['new']:>11.4g}" if r["new"] is not None else f"{'failed':>11}"
        line = f"{name:<34} {case:<22} {provider:<14} {metric:<10} {r['old']:>11.4g} {new} {r['change']:>7.3f}x{flag}"
        lines.append(line + (f": {r['error'][:200]}" if r.get("error") else ""))
    return "\n".join(lines)


def plot_history(paths: list[str], name: str, case: str | None, out: str) -> Path:
    """PNG of one benchmark's value over result files (sorted by date), one line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[str, float]]] = {}
    for p in paths:
        data = load_results(p)
        for r in data["records"]:
            if r["name"] == name and (case is None or r["case"] == case) and r["metric"] != "error":
                label = f"{r['provider']} ({r['metric']}, {data['env'].get('device', '?')})"
                series.setdefault(label, []).append((data["env"]["date"], r["value"]))
    if not series:
        raise SystemExit(f"error: no records named '{name}'" + (f" with case '{case}'" if case else ""))
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, pts in sorted(series.items()):
        pts.sort()
        # dates, not strings: a categorical axis orders the dates by first appearance over the series
        dates = [datetime.datetime.fromisoformat(d) for d, _ in pts]
        ax.plot(dates, [v for _, v in pts], marker="o", label=label)
    ax.set_title(f"{name}" + (f" [{case}]" if case else ""))
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="OLD.json NEW.json, or with --plot any number of result files")
    ap.add_argument("--threshold", type=float, default=0.05, help="regression threshold (0.05 = 5%% worse)")
    ap.add_argument("--allow-device-mismatch", action="store_true")
    ap.add_argument("--plot", metavar="NAME", help="plot the history of benchmark NAME instead")
    ap.add_argument("--case", help="with --plot: only this case")
    ap.add_argument("-o", "--output", default="bench_history.png", help="with --plot: PNG path")
    args = ap.parse_args(argv)
    if args.plot:
        print(plot_history(args.files, args.plot, args.case, args.output))
        return 0
    if len(args.files) != 2:
        ap.error("compare takes exactly two result files: OLD.json NEW.json")
    old, new = load_results(args.files[0]), load_results(args.files[1])
    dev_old, dev_new = old["env"].get("device"), new["env"].get("device")
    if dev_old != dev_new and not args.allow_device_mismatch:
        print(
            f"error: devices differ ('{dev_old}' vs '{dev_new}'); pass --allow-device-mismatch",
            file=sys.stderr,
        )
        return 2
    rows, only_old, only_new = compare(old, new, args.threshold)
    print(f"old: {args.files[0]} ({dev_old}, {old['env'].get('commit')})")
    print(f"new: {args.files[1]} ({dev_new}, {new['env'].get('commit')})")
    print(format_table(rows))
    for label, keys in (("only in old", only_old), ("only in new", only_new)):
        for k in keys:
            print(f"{label}: {' / '.join(k)}")
    # failures with no measurement in OLD to flag against (new benchmarks, or failing in both) are listed too
    flagged = {r["key"][:3] for r in rows if r.get("error")}
    for k, message in sorted(_failures(new["records"]).items()):
        if k not in flagged:
            print(f"failed in new: {' / '.join(k)}: {message[:200]}")
    n_reg = sum(r["regression"] for r in rows)
    print(f"{len(rows)} compared, {n_reg} regression(s) beyond {args.threshold:.0%}")
    return 1 if n_reg else 0


if __name__ == "__main__":
    sys.exit(main())
