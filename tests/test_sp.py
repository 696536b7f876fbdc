"""Ulysses sequence parallelism (parallel.cp): 2 gloo ranks splitting every sample's tokens vs one process
running the whole sequence (tests/dist_scripts/sequence_parallel.py), and the checks on bad shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import models
from engine.config import JobConfig, build_config, overrides_to_dict
from engine.trainer import Trainer
from models.sp import SequenceParallel

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
from meta_init import WanBatches, wan_flow_loss  # noqa: E402
from sequence_parallel import forward_and_grads  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "sequence_parallel.py"
TRAIN = "--train.steps 4 --train.batch_size 2 --train.grad_accum 2 --train.lr 3e-3 --checkpoint.interval 0".split()


VARIANTS = {  # name -> (ranks, overrides); the one-process reference always runs TRAIN
    "eager": (2, []),
    # per-block compile with selective AC: AOTAutograd graphs without Inductor's codegen (as test_meta_init.py)
    "compile_ac": (2, ["--parallel.compile", "true", "--parallel.activation_checkpointing", "selective"]),
    # HSDP 2 x cp 2: each replica group draws one of the reference's two micro-batches per step
    "hsdp": (4, ["--parallel.dp_replicate", "2", "--train.grad_accum", "1"]),
}


@pytest.mark.dist
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_sequence_parallel_matches_one_process(tmp_path, variant):
    """parallel.cp = 2 on 2 gloo ranks (each runs half of a sample's video tokens; all-to-all around
    self-attention, all-gather of the output): both ranks return the whole-sequence forward of one process,
    for Wan with per-sample and per-token timesteps and HunyuanVideo-1.5's joint attention with padded
    context (its context stream whole on every rank, attending with the rank's heads); the ranks' input and
    parameter gradients add up to twice the one-process gradients (every rank backpropagates the same
    loss); and Trainer training with cp = 2 (FSDP2 over the folded dp_shard x cp mesh) gives one process's
    losses and weights on the same batches, also with per-block compile and selective AC around the
    collectives, and on 4 ranks as HSDP 2 x cp 2 (FSDP over (dp_replicate, dp_shard x cp))."""
    nproc, overrides = VARIANTS[variant]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "TORCH_COMPILE_OVERRIDE_BACKENDS": ">=0:aot_eager",
    }
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = [*launcher, str(SCRIPT), "--out", str(tmp_path), "--parallel.cp", "2", *TRAIN, *overrides]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]

    want = forward_and_grads()  # one process, the whole sequence
    ranks = [
        load_file(tmp_path / f"forward_rank{r}.safetensors") for r in range(2)
    ]  # ranks 0, 1: one cp group
    assert ranks[0].keys() == want.keys()
    for k, w in want.items():
        if k.endswith(".out"):
            for got in ranks:
                torch.testing.assert_close(got[k], w, rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
        else:
            torch.testing.assert_close(
                ranks[0][k] + ranks[1][k], 2 * w, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}"
            )
    for r, got in enumerate(
        ranks
    ):  # Wan: rank r ran latent frame r's 4 of 8 tokens only: dx is zero elsewhere
        dx = got["wan.t.dx"]
        assert dx[:, :, r].abs().sum() > 0 and dx[:, :, 1 - r].abs().sum() == 0, r

    info = json.loads((tmp_path / "losses.json").read_text())
    dp = nproc // 2
    assert info["cp"] == 2 and info["sp"] == 2 and info["dp_size"] == dp, info
    assert info["fsdp_mesh"] == ([2] if dp == 1 else [2, 2]), info
    assert info["compiled"] == (2 if variant == "compile_ac" else 0), info
    cfg = build_config(JobConfig, None, overrides_to_dict(JobConfig, TRAIN))
    cfg.run.device = "cpu"
    torch.manual_seed(3)
    trainer = Trainer(cfg, models.build_model("wan", "debug"), wan_flow_loss, WanBatches(2, 2, 0, 1),
                      run_dir=tmp_path / "one")  # fmt: skip
    losses = [trainer.train_step()["loss"].item() for _ in range(cfg.train.steps)]
    final = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.close()
    assert losses == pytest.approx(info["losses"], rel=1e-4), (losses, info["losses"])
    got = load_file(tmp_path / "final.safetensors")
    assert got.keys() == final.keys()
    for k, w in final.items():
        torch.testing.assert_close(got[k], w, rtol=1e-4, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


def test_sequence_parallel_rejects_uneven_splits():
    """Tokens or heads that do not split over the cp ranks: an error naming both and the degree."""

    class FakeGroup(SequenceParallel):
        size = 3  # property override: no process group needed for the check
        rank = 0

    sp = FakeGroup(group=None)
    with pytest.raises(ValueError, match=r"token count \(8\) and the attention heads \(2\) divisible by 3"):
        sp.check(8, 2, "WanModel")
    sp.check(9, 3, "WanModel")  # divisible: no error


def test_apply_sp_refuses_a_model_without_it():
    """parallel.cp > 1 on a model family without set_sequence_parallel: a TypeError naming the setting."""
    from engine.parallel import apply_sp

    class Mesh:
        def size(self):
            return 2

    with pytest.raises(TypeError, match=r"parallel.cp = 2: Linear does not support sequence parallelism"):
        apply_sp(torch.nn.Linear(2, 2), Mesh())
