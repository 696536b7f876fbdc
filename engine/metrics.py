"""Training metrics: step time, tokens/s, MFU, peak memory; JSONL + TensorBoard; progress on rank 0.

Scalars stay on the device between logging steps (a ``.item()`` per step would sync the GPU every
step); at a logging step they are averaged over the interval and over ranks (one all-reduce; the loss's
logs must have the same keys on every rank) and moved to the host in one go. tokens/s, TFLOP/s and
MFU are per rank (per device).

    MFU = achieved FLOP/s / device peak,  achieved = 3 * forward FLOPs / s   (fwd + 2x bwd)

Forward FLOPs come from the loss's ``num_flops`` log when it gives one (exact for variable video
lengths; e.g. ``model.flops_per_token(seq_len, text_len) * tokens``), else from ``flops_per_token``:
a ``model.flops_per_token`` number or zero-argument method. Peaks are dense bf16 / fp8 tensor-core
figures per device; on CPU MFU is None.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from engine.checkpoint import move_aside
from engine.dist import collective
from engine.log import get_logger

log = get_logger("metrics")

# Dense peak FLOP/s per device (no sparsity), by a substring of torch.cuda.get_device_name(), the first
# that matches (so the PCIe and NVL parts come before the SXM one they share a name with).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200 NVL": {"bf16": 835e12, "fp8": 1671e12},
    "H200": {"bf16": 989e12, "fp8": 1979e12},
    "H100 PCIe": {"bf16": 756e12, "fp8": 1513e12},
    "H100 NVL": {"bf16": 835e12, "fp8": 1671e12},
    "H100": {"bf16": 989e12, "fp8": 1979e12},
    "GB200": {"bf16": 2500e12, "fp8": 5000e12},
    "B200": {"bf16": 2250e12, "fp8": 4500e12},
    "A100": {"bf16": 312e12, "fp8": 312e12},
    "L40S": {"bf16": 362e12, "fp8": 733e12},
}


def device_peak_flops(device: torch.device, precision: str = "bf16") -> float | None:
    """Peak dense FLOP/s of ``device`` for ``precision`` ("bf16" | "fp8"); None on CPU / unknown GPUs."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_FLOPS.items():
        if key in name:
            return peaks[precision]
    return None


def model_flops_per_token(model: nn.Module) -> float | None:
    """Forward FLOPs per token from ``model.flops_per_token`` (attribute or zero-arg method), else None."""
    f = getattr(model, "flops_per_token", None)
    if f is None:
        return None
    if callable(f):
        try:
            return float(f())
        except TypeError:  # needs the sequence shape: the loss must log num_flops instead
            return None
    return float(f)


def mfu(tokens_per_s: float, flops_per_token: float | None, peak: float | None) -> float | None:
    """Model FLOPs utilisation of a training step (forward + backward = 3x forward)."""
    if not flops_per_token or not peak:
        return None
    return 3.0 * flops_per_token * tokens_per_s / peak


def achieved_tflops(forward_flops: float, seconds: float) -> float:
    """Training TFLOP/s from forward FLOPs (x3 for forward + backward)."""
    return 3.0 * forward_flops / seconds / 1e12


def peak_memory_gb(device: torch.device) -> float | None:
    """Peak allocated memory (GiB) since the last reset (MetricsLogger resets it at every logged row)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Average logged scalars over ranks (one collective per logging step; every rank logs the same keys)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        with collective("metrics all-reduce (logged scalars)"):  # a timeout names it, not gloo's bare recv
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


class MetricsLogger:
    """Collects per-step scalars; every ``log_every`` steps writes a JSONL row and TensorBoard scalars."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        device: torch.device,
        is_main: bool = True,
        log_every: int = 10,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        tensorboard: bool = True,
    ):
        self.device, self.is_main, self.log_every = device, is_main, max(1, log_every)
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.path = Path(run_dir) / "metrics.jsonl"
        self._sums: dict[str, torch.Tensor | float] = {}
        self._counts: dict[str, int] = {}  # steps that logged each scalar (a skipped step logs only lr)
        self._count, self._tokens, self._flops = 0, 0, 0.0
        self._t0 = time.perf_counter()
        self._run_dir, self._purge_step = Path(run_dir), None
        self._earlier_tb = any((self._run_dir / "tb").glob("events.*"))  # before this run's writer adds one
        self._tb = self._open_tensorboard() if (tensorboard and is_main) else None
        if is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def _open_tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self._run_dir / "tb"), purge_step=self._purge_step)

    def drop_after(self, step: int) -> None:
        """A run resumed at ``step``: drop the rows of later steps (written before a crash, trained again now)
        from metrics.jsonl (rewritten to a temp file, then renamed) and from TensorBoard (purge_step)."""
        if not self.is_main:
            return
        if self._tb is not None:  # TensorBoard hides the earlier events from purge_step on
            self._tb.close()
            self._purge_step = step + 1
            self._tb = self._open_tensorboard()
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):  # a row torn by the crash
                pass
        if len(kept) == len(lines):
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        log.info("metrics: dropped %d rows after step %d (resumed there)", len(lines) - len(kept), step)

    def set_aside(self) -> None:
        """A run that does not resume: an earlier run's metrics.jsonl and tb/ events in this folder are renamed
        to ``*.before-<time>`` (its rows kept, not mixed with the new run's steps from 1 again)."""
        earlier = [(self.path, "metrics.before-{}.jsonl")] if self.path.is_file() else []
        earlier += [(self._run_dir / "tb", "tb.before-{}")] if self._earlier_tb else []
        if not self.is_main or not earlier:
            return
        if self._tb is not None:
            self._tb.close()
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for old, name in earlier:
            target = move_aside(old, name.format(stamp))
            log.warning(
                "metrics: an earlier run's %s in %s was moved to %s", old.name, self._run_dir, target.name
            )
        self._earlier_tb = False
        if self._tb is not None:
            self._purge_step = None
            self._tb = self._open_tensorboard()

    def restart_clock(self) -> None:
        """Start the current interval's clock now: the trainer calls it before its first step, so that the
        first row's step time, tokens/s and MFU leave out what ran before (model build, checkpoint load)."""
        self._t0 = time.perf_counter()

    def update(self, scalars: dict[str, torch.Tensor | float], tokens: int = 0, flops: float = 0.0) -> None:
        """Add one step's scalars (device tensors are summed on the device, no sync), tokens, forward FLOPs."""
        for k, v in scalars.items():
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    raise ValueError(
                        f"metrics: the log '{k}' must be a scalar, got a tensor of shape {tuple(v.shape)}"
                    )
                v = v.detach().float().reshape(())
            else:
                v = float(v)
            self._sums[k] = self._sums[k] + v if k in self._sums else v
            self._counts[k] = self._counts.get(k, 0) + 1
        self._count += 1
        self._tokens += tokens
        self._flops += flops if flops else (self.flops_per_token or 0.0) * tokens

    def should_log(self, step: int) -> bool:
        return step % self.log_every == 0

    def flush(self, step: int, counters: dict[str, float] | None = None) -> dict[str, float]:
        """Average the interval's scalars, add throughput, write them; returns the row."""
        if self._count == 0:
            return {}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - self._t0
        keys = list(self._sums)
        # every scalar, a device tensor or a Python float (the RL recipe's rewards, clip_frac), is averaged
        # over ranks in one collective, in float64 (float32 logged lr 1e-4 as 9.9999997e-05)
        vals = [
            torch.as_tensor(self._sums[k], dtype=torch.float64, device=self.device).reshape(()) for k in keys
        ]
        host = _mean_over_ranks(torch.stack(vals)).cpu().tolist() if vals else []
        row: dict[str, float] = {"step": step}
        for k, v in zip(keys, host):
            row[k] = v / self._counts[k]
        row["step_time_s"] = dt / self._count
        row["tokens_per_s"] = self._tokens / dt if dt > 0 else 0.0
        if self._flops and dt > 0:
            row["tflops"] = achieved_tflops(self._flops, dt)
            if self.peak_flops:
                row["mfu"] = row["tflops"] * 1e12 / self.peak_flops
        mem = peak_memory_gb(self.device)
        if mem is not None:  # the interval's own peak: a one-off spike (evaluation, rollouts) shows once
            row["peak_mem_gb"] = mem
            torch.cuda.reset_peak_memory_stats(self.device)
        row.update(counters or {})
        self._write(step, row)
        self._sums, self._counts, self._count, self._tokens, self._flops = {}, {}, 0, 0, 0.0
        self._t0 = time.perf_counter()
        return row

    def _write(self, step: int, row: dict[str, float]) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        shown = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step")
        log.info("step %d | %s", step, shown)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
