"""recipes.common.step_generator on real ranks: every (rank, step, micro-batch) draws its own batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import json, sys, torch
from engine.config import load_config
from recipes.common import dist_info, step_generator
cfg = load_config(argv=["--run.device", "cpu", "--parallel.fsdp", "false"])
rank = dist_info(cfg).dp_rank
draws = {f"{rank}/{step}/{salt}": torch.randn(4, generator=step_generator(cfg, step, salt)).tolist()
         for step in (0, 1) for salt in range(40)}
open(sys.argv[1] + f"/rank{rank}.json", "w").write(json.dumps(draws))
"""


@pytest.mark.dist
def test_micro_batches_past_the_31st_differ_between_ranks(tmp_path):
    """The seed was ((seed * 1_000_003 + step) * 4099 + rank) * 31 + salt, so micro-batch 31 (salt = the micro
    index in distill) of rank r drew exactly rank r + 1's micro-batch 0: with train.grad_accum >= 32 on two
    data-parallel ranks (2 gloo processes here), both trained on the same prompts and noise. Every draw of
    every rank, step and micro-batch now differs from every other."""
    (tmp_path / "s.py").write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "s.py"), str(tmp_path)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    draws = {
        **json.loads((tmp_path / "rank0.json").read_text()),
        **json.loads((tmp_path / "rank1.json").read_text()),
    }
    assert len(draws) == 2 * 2 * 40
    seen: dict[tuple, str] = {}
    for key, values in draws.items():
        assert tuple(values) not in seen, f"{key} draws what {seen[tuple(values)]} draws"
        seen[tuple(values)] = key
