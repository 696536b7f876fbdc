"""MetricsLogger rows against values computed here: logged Python floats, tokens/s and training FLOP/s."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
from tiny import SeededBatches, TinyDiT, flow_loss  # noqa: E402

from engine.config import JobConfig  # noqa: E402
from engine.metrics import MetricsLogger  # noqa: E402
from engine.trainer import Trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_logged_lr_is_the_schedules_value_exactly(tmp_path):
    """The row's lr went through float32 on its way to the rank average: a warmup to 3e-4 logged
    9.999999747378752e-05, 0.00019999999494757503, 0.0003000000142492354 instead of 1e-4, 2e-4, 3e-4."""
    cfg = JobConfig()
    cfg.run.device = "cpu"
    cfg.train.steps, cfg.train.log_every, cfg.train.lr, cfg.train.warmup_steps = 4, 1, 3e-4, 3
    cfg.checkpoint.enabled = cfg.checkpoint.export_safetensors = False
    Trainer(cfg, TinyDiT(), flow_loss, SeededBatches(), run_dir=tmp_path).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == [3e-4 * 1 / 3, 3e-4 * 2 / 3, 3e-4, 3e-4]


def test_row_means_tokens_and_flops(tmp_path):
    """Python floats are averaged over the steps that logged them at full precision; tokens/s and TFLOP/s are
    the interval's tokens and 3x forward FLOPs over its wall time (step_time_s x steps)."""
    m = MetricsLogger(tmp_path, device=torch.device("cpu"), flops_per_token=1e6, tensorboard=False)
    rewards = [0.1, 0.7, 1e-9]
    for i, r in enumerate(rewards):
        m.update({"reward": r, "loss": torch.tensor(float(i))}, tokens=100 * (i + 1), flops=0.0 if i else 5e9)
    row = m.flush(3)
    # added in order, as the logger does (Python 3.12's sum() compensates: 0.26666666699999997 vs 0.266666667)
    assert row["reward"] == ((rewards[0] + rewards[1]) + rewards[2]) / 3 and row["loss"] == 1.0
    wall = row["step_time_s"] * 3
    assert row["tokens_per_s"] * wall == pytest.approx(600, rel=1e-12)
    # step 1 logged its own FLOPs; steps 2-3 fall back to flops_per_token x tokens
    assert row["tflops"] * 1e12 * wall == pytest.approx(3 * (5e9 + 1e6 * 500), rel=1e-12)
