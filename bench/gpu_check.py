"""Run every GPU benchmark module, each in its own subprocess with a time limit, into one JSON.

    python -m bench.gpu_check [--quick] [--out DIR] [--only attention,models] [--timeout 90] [--budget 360]

A module is ``bench/gpu_<area>.py`` with ``run(quick: bool) -> list[record]`` (bench.common.record).
A module that crashes or runs past its limit becomes an "error" record and keeps the records it made
before (each record is journaled as it is made; a module that crashed after writing its results, e.g. in a
CUDA or DALI teardown, keeps all of them); the others still run. A module runs in its own process group,
killed whole at its end, so that workers it started (torch.compile's) do not outlive it. Each
module gets ``--timeout`` seconds, or less when the whole run's ``--budget`` has less left; a module
that cannot start in the budget is an "error" record ("skipped: budget spent"). The result file is
named by date and device (bench.common.write_results), rewritten after every module (so a run killed
from outside keeps what it measured), and printed as a table at the end.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.common import environment, out_dir, record, write_results

# the order they run in: the kernels first, the data module (slow to prepare, DALI-bound) last
MODULES = [
    "attention",
    "elementwise",
    "attention_fp8",
    "attention_profile",
    "fp8_training",
    "models",
    "models_hunyuan",
    "trainer",
    "step_profile",
    "data",
]
MIN_MODULE_S = 15.0  # a module is not started with less than this left of the budget


def _run_one(area: str, quick: bool, timeout_s: float, tmp: Path) -> list[dict]:
    out = tmp / f"{area}.json"
    cmd = [sys.executable, "-m", "bench.gpu_check", "--_child", area, "--_json", str(out)] + (
        ["--quick"] if quick else []
    )
    t0 = time.time()
    # the module's limit, for its own budget (bench.common.module_budget)
    env = {**os.environ, "GPU_MODULE_LIMIT_S": f"{timeout_s:.0f}"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        stdout, stderr = proc.communicate()
        (tmp / f"{area}.log").write_text(stdout + "\n--- stderr (timed out) ---\n" + stderr)
        kept = _journal(out)  # what the module measured before its limit
        return kept + [
            record(
                f"{area}.module", "-", "-", "error", 0.0,
                message=f"timed out after {timeout_s:.0f} s ({len(kept)} records kept)",
            )
        ]  # fmt: skip
    _kill_group(proc.pid)  # anything the module left running
    took = time.time() - t0
    (tmp / f"{area}.log").write_text(stdout + "\n--- stderr ---\n" + stderr)
    if proc.returncode != 0:
        kept = json.loads(out.read_text()) if out.exists() else _journal(out)
        tail = (stderr or stdout)[-1500:]
        message = f"exit {proc.returncode} ({len(kept)} records kept): {tail}"
        return kept + [record(f"{area}.module", "-", "-", "error", 0.0, message=message)]
    if not out.exists():
        return [record(f"{area}.module", "-", "-", "error", 0.0, message="exit 0 without its results file")]
    recs = json.loads(out.read_text())
    recs.append(record(f"{area}.module", "-", "-", "wall_s", took, higher_is_better=False))
    return recs


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _module_name(area: str) -> str:
    """An area is bench/gpu_<area>.py, or a dotted module path (a module outside bench/, e.g. in a test)."""
    return area if "." in area else f"bench.gpu_{area}"


def _present(area: str) -> bool:
    if "." in area:
        return importlib.util.find_spec(area.rsplit(".", 1)[0]) is not None
    return (Path(__file__).parent / f"gpu_{area}.py").exists()


def _journal(json_path: Path) -> list[dict]:
    """The records a module process appended to its journal (bench.common.JOURNAL) before it ended."""
    path = Path(f"{json_path}.journal")
    if not path.exists():
        return []
    recs = []
    for line in path.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written when the process was killed
            pass
    return recs


def _child(area: str, quick: bool, json_path: str) -> int:
    import bench.common

    bench.common.JOURNAL = Path(f"{json_path}.journal")
    bench.common.JOURNAL.unlink(missing_ok=True)
    mod = importlib.import_module(_module_name(area))
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
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per module at most")
    ap.add_argument(
        "--budget",
        type=float,
        default=float("inf"),
        help="seconds for all modules together (default: no limit)",
    )
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
    env, t0 = environment(), time.time()
    path = write_results(records, out, tag="gpu_check", env=env)  # rewritten after every module
    print(f"== {env['device']}, torch {env['torch']}, triton {env['triton']}, nvdec: {env.get('nvdec', '-')}")
    for area in areas:
        left = args.budget - (time.time() - t0)
        if not _present(area):
            records.append(record(f"{area}.module", "-", "-", "error", 0.0, message="module not present"))
        elif left < MIN_MODULE_S:
            msg = f"skipped: budget spent ({args.budget:.0f} s)"
            records.append(record(f"{area}.module", "-", "-", "error", 0.0, message=msg))
        else:
            print(f"== bench.gpu_{area} (limit {min(args.timeout, left):.0f} s)", flush=True)
            records.extend(_run_one(area, args.quick, min(args.timeout, left), tmp))
        path = write_results(records, out, tag="gpu_check", env=env)
    print_table(json.loads(path.read_text())["records"])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
