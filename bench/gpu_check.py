"""Run every GPU benchmark module, each in its own subprocess with a time limit, into one JSON.

    python -m bench.gpu_check [--quick] [--out DIR] [--only attention,models] [--timeout 90]

A module is ``bench/gpu_<area>.py`` with ``run(quick: bool) -> list[record]`` (bench.common.record).
A module that crashes or runs past its limit becomes an "error" record; the others still run. The
result file is named by date and device (bench.common.write_results) and also printed as a table.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import environment, out_dir, record, write_results

MODULES = ["attention", "attention_fp8", "elementwise", "models", "models_hunyuan", "trainer", "data"]


def _run_one(area: str, quick: bool, timeout_s: float, tmp: Path) -> list[dict]:
    out = tmp / f"{area}.json"
    cmd = [sys.executable, "-m", "bench.gpu_check", "--_child", area, "--_json", str(out)] + (
        ["--quick"] if quick else []
    )
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [
            record(f"{area}.module", "-", "-", "error", 0.0, message=f"timed out after {timeout_s:.0f} s")
        ]
    took = time.time() - t0
    (tmp / f"{area}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout)[-1500:]
        return [record(f"{area}.module", "-", "-", "error", 0.0, message=f"exit {proc.returncode}: {tail}")]
    recs = json.loads(out.read_text())
    recs.append(record(f"{area}.module", "-", "-", "wall_s", took, higher_is_better=False))
    return recs


def _child(area: str, quick: bool, json_path: str) -> int:
    mod = importlib.import_module(f"bench.gpu_{area}")
    recs = mod.run(quick=quick)
    Path(json_path).write_text(json.dumps(recs))
    return 0


def print_table(records: list[dict]) -> None:
    for r in records:
        ratio = f"{r['ratio']:.2f}x vs {r['baseline']}" if r.get("ratio") else ""
        msg = r["extra"].get("message", "") if r["metric"] == "error" else ""
        print(
            f"{r['name']:<30} {r['case']:<24} {r['provider']:<16} {r['metric']:<9} {r['value']:>10.4g} {ratio} {msg[:200]}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape per benchmark")
    ap.add_argument("--out", default=None, help="result folder (default $OUT, else bench/results)")
    ap.add_argument(
        "--only", default="", help="comma-separated areas (default: all of " + ",".join(MODULES) + ")"
    )
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per module")
    ap.add_argument("--work", default="", help="folder for per-module JSON and logs (default OUT/modules)")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        return _child(args._child, args.quick, args._json)
    areas = [a for a in (args.only.split(",") if args.only else MODULES) if a]
    out = Path(args.out) if args.out else out_dir()
    tmp = Path(args.work) if args.work else out / "modules"
    tmp.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    for area in areas:
        if not (Path(__file__).parent / f"gpu_{area}.py").exists():
            records.append(record(f"{area}.module", "-", "-", "error", 0.0, message="module not present"))
            continue
        print(f"== bench.gpu_{area}", flush=True)
        records.extend(_run_one(area, args.quick, args.timeout, tmp))
    path = write_results(records, out, tag="gpu_check", env=environment())
    print_table(json.loads(path.read_text())["records"])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
