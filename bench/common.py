"""Shared benchmark plumbing: environment record, timing, result records, JSON output.

Every benchmark, CPU or GPU, produces records of one shape so that ``python -m bench.compare`` can
diff any two result files:

    {"name": "attention.fwd", "case": "wan1.3b-480p", "provider": "triton",
     "metric": "tflops", "value": 451.0, "higher_is_better": true,
     "baseline": "sdpa_flash", "ratio": 1.25, "extra": {...}}

``ratio`` is value / the baseline provider's value for the same (name, case), measured in the same
run; it is filled in by :func:`add_ratios`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def git_commit() -> str:
    """The checkout's short commit; $WMSD_COMMIT where the tree has no .git (a copy sent to a GPU machine)."""
    if os.environ.get("WMSD_COMMIT"):
        return os.environ["WMSD_COMMIT"]
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict[str, Any]:
    """Device, versions and commit, recorded into every results file."""
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.node(),
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "num_threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(
            device=p.name,
            sm=f"{p.major}.{p.minor}",
            num_sms=p.multi_processor_count,
            gpu_mem_gb=round(p.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
        from engine.data.decode import nvdec_available  # DALI's GPU video decoder needs it

        env["nvdec"] = nvdec_available() or "ok"
    return env


def device_slug(env: dict[str, Any]) -> str:
    return "".join(c if c.isalnum() else "-" for c in env["device"]).strip("-").lower()


def bench_fn(fn: Callable[[], Any], *, warmup: int = 3, rep: int = 10) -> float:
    """Median seconds per call. CUDA: triton.testing.do_bench (L2 flushed, events); CPU: perf_counter."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


# Set by bench.gpu_check in a module's process: every record is also appended there as a JSON line, so the
# records of a module killed at its time limit are kept.
JOURNAL: Path | None = None


def module_args(doc: str | None, argv: list[str] | None = None, **flags: str) -> argparse.Namespace:
    """Options of a gpu_<area> module run alone: --quick and ``flags`` (name: help). --help prints the
    module's docstring and an unknown option is an error; before, both ran the whole benchmark."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one shape per benchmark")
    for name, help_ in flags.items():
        ap.add_argument(f"--{name}", action="store_true", help=help_)
    return ap.parse_args(argv)


def module_budget(default: float, reserve: float) -> float:
    """Seconds a module may spend starting new cases: ``default``, or more where bench.gpu_check gave the
    module a longer limit ($GPU_MODULE_LIMIT_S, from GPU_MODULE_TIMEOUT) -- that limit less ``reserve`` (the
    last case's run and the teardown). Without it a raised GPU_MODULE_TIMEOUT bought nothing: the modules'
    own budgets were fixed."""
    try:
        limit = float(os.environ.get("GPU_MODULE_LIMIT_S", ""))
    except ValueError:
        return default
    return max(default, limit - reserve)


def record(
    name: str,
    case: str,
    provider: str,
    metric: str,
    value: float,
    *,
    higher_is_better: bool = True,
    baseline: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    rec = {
        "name": name,
        "case": case,
        "provider": provider,
        "metric": metric,
        "value": float(value),
        "higher_is_better": higher_is_better,
        "baseline": baseline,
        "ratio": None,
        "extra": extra,
    }
    if JOURNAL is not None:
        with open(JOURNAL, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
    return rec


def error_record(name: str, case: str, provider: str, e: BaseException) -> dict[str, Any]:
    """The record of a failed measurement: metric "error", the exception's type and message (800 chars)."""
    return record(name, case, provider, "error", 0.0, message=f"{type(e).__name__}: {e}"[:800])


def add_ratios(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill ``ratio`` = value / baseline's value (same name, case, metric), oriented so >1 is better."""
    index = {(r["name"], r["case"], r["metric"], r["provider"]): r for r in records}
    for r in records:
        base = index.get((r["name"], r["case"], r["metric"], r["baseline"])) if r["baseline"] else None
        if base and base["value"] > 0 and r["value"] > 0:
            ratio = r["value"] / base["value"]
            r["ratio"] = ratio if r["higher_is_better"] else 1.0 / ratio
    return records


def write_results(
    records: list[dict[str, Any]], out_dir: str | Path, *, tag: str = "", env: dict | None = None
) -> Path:
    """One JSON per run, named by date and device: ``<date>_<device>[_<tag>].json``."""
    env = env or environment()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = env["date"][:19].replace(":", "").replace("-", "")
    path = out / f"{stamp}_{device_slug(env)}{'_' + tag if tag else ''}.json"
    path.write_text(json.dumps({"env": env, "records": add_ratios(records)}, indent=1))
    return path


def out_dir() -> Path:
    """$OUT on the device machine, else bench/results."""
    return Path(os.environ.get("OUT") or Path(__file__).parent / "results")
