"""Profiler windows of the Trainer: where the window starts and how its traces are named across a resume."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
from tiny import SeededBatches, TinyDiT, flow_loss  # noqa: E402

from engine.config import JobConfig  # noqa: E402
from engine.trainer import Trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _cfg(steps: int, wait: int, warmup: int, active: int) -> JobConfig:
    cfg = JobConfig()
    cfg.run.device = "cpu"
    cfg.train.steps, cfg.train.log_every = steps, 100
    cfg.checkpoint.interval, cfg.checkpoint.export_safetensors = 3, False
    cfg.profile.enabled = True
    cfg.profile.wait, cfg.profile.warmup, cfg.profile.active = wait, warmup, active
    return cfg


def _events(path: Path) -> list[dict]:
    return [e for e in json.loads(path.read_text())["traceEvents"] if e.get("ph") == "X"]


def test_a_resumed_runs_trace_is_named_by_its_global_step(tmp_path):
    """The trace was named by the profiler's own step count since the Trainer was built: a run resumed at step 7
    recorded steps 10-11 into trace_4.json, overwriting the first run's trace of steps 3-4."""
    Trainer(_cfg(7, 1, 1, 2), TinyDiT(), flow_loss, SeededBatches(), run_dir=tmp_path).fit()
    first = tmp_path / "trace" / "trace_4.json"
    assert [p.name for p in (tmp_path / "trace").iterdir()] == [first.name]
    before = first.read_bytes()
    tr = Trainer(_cfg(11, 1, 1, 2), TinyDiT(), flow_loss, SeededBatches(), run_dir=tmp_path)
    assert tr.step == 7
    tr.fit()
    assert sorted(p.name for p in (tmp_path / "trace").iterdir()) == ["trace_11.json", "trace_4.json"]
    assert first.read_bytes() == before
    # two active steps recorded, each with its forward / backward / optimizer spans
    names = [e["name"] for e in _events(tmp_path / "trace" / "trace_11.json")]
    assert names.count("optimizer") == 2 and names.count("forward") == 2


def test_the_window_starts_at_the_first_training_step(tmp_path):
    """With profile.wait = warmup = 0 the first recorded step began when the Trainer was built: the trace held
    whatever the recipe ran before training (here 1 s and a marked range), as if it were step 1."""
    tr = Trainer(_cfg(2, 0, 0, 1), TinyDiT(), flow_loss, SeededBatches(), run_dir=tmp_path)
    time.sleep(1.0)
    with torch.profiler.record_function("recipe_setup"):
        torch.ones(3).sum()
    t0 = time.perf_counter()
    tr.train_step()
    step_s = time.perf_counter() - t0
    tr.fit()
    (trace,) = tr.profiler.traces
    assert trace.name == "trace_1.json"
    ev = _events(trace)
    assert "recipe_setup" not in {e["name"] for e in ev}
    span_s = (max(e["ts"] + e.get("dur", 0) for e in ev) - min(e["ts"] for e in ev)) / 1e6
    assert span_s <= step_s


def test_a_run_stopped_by_an_error_writes_the_steps_it_recorded(tmp_path):
    """A step that raised (here the NaN guard's stop, NonFiniteLossError) left the profiler open: the window's
    steps so far, the blow-up included, were never written (and the profiler kept recording). The error now
    ends the window and its steps are written."""
    from engine.trainer import NonFiniteLossError

    calls = []

    def nan_from_step_3(model, mb):
        loss, logs = flow_loss(model, mb)
        calls.append(1)
        return (loss * float("nan") if len(calls) >= 3 else loss), logs

    cfg = _cfg(10, 0, 0, 8)
    cfg.train.max_bad_steps = 2
    tr = Trainer(cfg, TinyDiT(), nan_from_step_3, SeededBatches(), run_dir=tmp_path)
    with pytest.raises(NonFiniteLossError):
        tr.fit()
    (trace,) = tr.profiler.traces
    names = [e["name"] for e in _events(trace)]
    assert names.count("forward") == 4  # steps 1-4: two good, the two that stopped the run
