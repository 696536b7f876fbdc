"""Distributed setup and parallelism: FSDP2 / HSDP / plain DP on 2 gloo processes vs one process,
collective timeouts, mesh shapes, activation checkpointing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
from tiny import SeededBatches, TinyDiT, flow_loss  # noqa: E402

from engine.config import JobConfig, build_config, overrides_to_dict  # noqa: E402
from engine.dist import mesh_shape, proc_stat  # noqa: E402
from engine.parallel import apply_ac, model_blocks  # noqa: E402
from engine.trainer import Trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
SCRIPT = ROOT / "tests" / "dist_scripts" / "train_tiny.py"
COMMON = (
    "--train.steps 5 --train.lr 3e-3 --train.grad_accum 2 --train.batch_size 2 --train.log_every 5 "
    "--train.ema_decay 0.5 --checkpoint.interval 0"
).split()


def _torchrun(run_dir: Path, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = TORCHRUN_2
    cmd = [*launcher, str(SCRIPT), "--run-dir", str(run_dir), *COMMON, *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _reference(run_dir: Path) -> tuple[list[float], dict[str, dict[str, torch.Tensor]]]:
    """The same training in one process on the global batch (both ranks' samples)."""
    torch.set_num_threads(1)
    cfg = build_config(JobConfig, None, overrides_to_dict(JobConfig, COMMON))
    cfg.run.device = "cpu"
    torch.manual_seed(0)
    batches = SeededBatches(batch=2, grad_accum=2, world=2, all_ranks=True)
    tr = Trainer(cfg, TinyDiT(), flow_loss, batches, run_dir=run_dir)
    losses = [tr.train_step()["loss"].item() for _ in range(cfg.train.steps)]
    tr.close()
    return losses, {f: load_file(run_dir / f) for f in ("model.safetensors", "ema.safetensors")}


@pytest.mark.dist
def test_two_process_training_matches_single_process(tmp_path):
    """FSDP2 (1x2 mesh), HSDP (2x1), plain DP (gradient all-reduce) and FSDP2 with an async DCP save every
    step, stopped at step 3 then resumed from its sharded checkpoint, on 2 gloo ranks with half of every batch each,
    train like one process on the whole batch (losses, weights, EMA); then a skipped barrier times out."""
    names = ["fsdp", "hsdp", "ddp", "fsdp_resume"]
    proc = _torchrun(tmp_path, ["--variants", ",".join(names), "--timeout-check"])
    ref_losses, ref = _reference(tmp_path / "ref")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-4000:]
    assert ref_losses[-1] < ref_losses[0]
    for name in names:
        res = json.loads((tmp_path / name / "out.json").read_text())
        losses = [res["losses"][str(s)] for s in range(1, 6)]
        assert res["start"] == (3 if name == "fsdp_resume" else 0)
        assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), name
        for file, ref_weights in ref.items():
            weights = load_file(tmp_path / name / file)
            assert weights.keys() == ref_weights.keys()
            for k, w in ref_weights.items():
                err = (weights[k] - w).abs().max().item()
                assert err < 1e-5, f"{name} {file}: {k} differs by {err}"
    row = json.loads((tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 5 and row["loss"] == pytest.approx(sum(ref_losses) / 5, rel=1e-5)  # rank mean
    err = (tmp_path / "timeout.txt").read_text()
    assert "collective 'test barrier' timed out after 2 s" in err and "Rank 1" in err


def test_mesh_shape_resolves_and_rejects():
    assert mesh_shape(8, 2, -1, 1) == (2, 4, 1)
    assert mesh_shape(4, 1, -1, 2) == (1, 2, 2)
    with pytest.raises(ValueError, match="dp_replicate \\* dp_shard \\* cp"):
        mesh_shape(8, 2, 3, 1)
    with pytest.raises(ValueError, match="not divisible"):
        mesh_shape(6, 4, -1, 1)
    with pytest.raises(ValueError, match="parallel.cp"):
        mesh_shape(2, 1, -1, 0)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_gradients(mode):
    torch.manual_seed(0)
    ref = TinyDiT()
    ac = TinyDiT()
    ac.load_state_dict(ref.state_dict())
    apply_ac(ac, mode)
    assert all(type(b).__name__ == "CheckpointWrapper" for b in model_blocks(ac))
    mb = SeededBatches().next(0, ref)[0]
    for m in (ref, ac):
        flow_loss(m, mb)[0].backward()
    assert ac.state_dict().keys() == ref.state_dict().keys()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    for n, p in ac.named_parameters():
        torch.testing.assert_close(p.grad, grads[n.replace("_checkpoint_wrapped_module.", "")])


def test_model_without_blocks_is_rejected():
    with pytest.raises(TypeError, match="no 'blocks' nn.ModuleList"):
        apply_ac(torch.nn.Linear(2, 2), "full")
    with pytest.raises(ValueError, match="activation_checkpointing 'half'"):
        apply_ac(TinyDiT(), "half")


END_SCRIPT = """
import sys, torch
from torch.distributed.fsdp import fully_shard
from engine.config import ParallelConfig
from engine.dist import end_process, init_distributed
from engine.log import get_logger

info = init_distributed(ParallelConfig(), "cpu")
model = torch.nn.Linear(8, 8)
if info.distributed:
    fully_shard(model, mesh=info.dp_mesh)
model(torch.randn(2, 8)).sum().backward()
full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
print(f"rank {info.rank} printed {sum(v.numel() for v in full.values())}")  # block-buffered: stdout is a pipe
get_logger("test").info("rank %d logged", info.rank)
end_process()
print("end_process returned")
"""


@pytest.mark.dist
@pytest.mark.parametrize("nproc", [1, 2])
def test_end_process_flushes_and_exits(tmp_path, nproc):
    """engine.dist.end_process, the recipes' last call: under torchrun (2 gloo ranks, FSDP2 collectives just
    before) every rank exits 0 with its buffered stdout (and rank 0 its log lines) written (it skips interpreter
    finalisation with os._exit, so it must flush first); a plain run (no process group) returns and exits as
    usual. (The abort it prevents -- a gloo worker thread releasing a collective's tensors during
    finalisation -- is a race seen about once in 50 loaded runs: not reproducible on demand.)"""
    script = tmp_path / "end.py"
    script.write_text(END_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe: block-buffered
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    # --no-python: the workers run `python end.py` (torchrun's default adds -u, which would hide a missing flush)
    launcher = [*TORCHRUN_2, "--no-python"]
    cmd = [*launcher, sys.executable, str(script)] if nproc == 2 else [sys.executable, str(script)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    for rank in range(nproc):
        assert f"rank {rank} printed 72" in p.stdout, out[-3000:]
    assert "rank 0 logged" in out, out[-3000:]  # engine.log writes INFO on rank 0 only
    assert ("end_process returned" in p.stdout) == (nproc == 1), out[-3000:]


def _two_ranks(tmp_path: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    """``code`` as a script under torchrun on 2 gloo ranks (the repo importable), with ``args``."""
    script = tmp_path / "script.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [*TORCHRUN_2, str(script), *args], env=env, capture_output=True, text=True, timeout=120
    )


TIMEOUT_SCRIPT = """
import sys, time
import torch, torch.distributed as dist
from engine.config import ParallelConfig
from engine.dist import DistTimeoutError, collective, end_process, init_distributed

pc = ParallelConfig(dp_shard=1, cp=2, timeout_s=3)  # dp_replicate and dp_shard: groups of one rank each
info = init_distributed(pc, "cpu")
timeouts = {name: info.mesh.get_group(name)._get_backend(torch.device("cpu")).options._timeout.total_seconds()
            for name in info.mesh.mesh_dim_names}
fsdp = info.fsdp_mesh.get_group()._get_backend(torch.device("cpu")).options._timeout.total_seconds()
if info.rank == 0:
    print("timeouts", timeouts, "fsdp", fsdp, flush=True)
    t0 = time.time()
    try:  # rank 1 joins 12 s late: parallel.timeout_s (3 s) must end the wait, not the backend's 30 min
        with collective("cp all_reduce", pc.timeout_s):
            dist.all_reduce(torch.ones(1), group=info.cp_mesh.get_group())
        print("returned after", round(time.time() - t0), "s", flush=True)
    except DistTimeoutError:
        print("timed out after", round(time.time() - t0), "s", flush=True)
else:
    time.sleep(12)
    try:
        dist.all_reduce(torch.ones(1), group=info.cp_mesh.get_group())
    except Exception:
        pass
end_process()
"""


@pytest.mark.dist
def test_every_mesh_group_gets_the_configured_timeout(tmp_path):
    """Mesh dimensions that do not span all ranks get process groups of their own, which torch creates with
    the backend's default timeout (30 min on gloo): each gets parallel.timeout_s, so a stuck peer in one of
    them is a clear timeout after it (2 gloo ranks, cp = 2)."""
    p = _two_ranks(tmp_path, TIMEOUT_SCRIPT)
    out = p.stdout
    assert "timeouts {'dp_replicate': 3.0, 'dp_shard': 3.0, 'cp': 3.0} fsdp 3.0" in out, (
        out + p.stderr[-2000:]
    )
    assert "timed out after 3 s" in out or "timed out after 4 s" in out, out


FLOAT_LOGS_SCRIPT = """
import json, sys
import torch
from engine.config import ParallelConfig
from engine.dist import end_process, init_distributed
from engine.metrics import MetricsLogger

info = init_distributed(ParallelConfig(), "cpu")
m = MetricsLogger(sys.argv[1], device=torch.device("cpu"), is_main=info.is_main, tensorboard=False)
for step in range(2):  # a Python float (the RL recipe's rewards) and a tensor, different per rank
    m.update({"reward": float(info.rank + step), "loss": torch.tensor(10.0 * info.rank)})
row = m.flush(2)
if info.is_main:
    print(json.dumps(row), flush=True)
end_process()
"""


@pytest.mark.dist
def test_float_logs_are_averaged_over_ranks_like_tensor_logs(tmp_path):
    """MetricsLogger averages every scalar over ranks: Python floats too (they were rank 0's alone)."""
    p = _two_ranks(tmp_path, FLOAT_LOGS_SCRIPT, str(tmp_path / "run"))
    row = json.loads(p.stdout.strip().splitlines()[-1])
    assert row["reward"] == pytest.approx(1.0) and row["loss"] == pytest.approx(5.0)  # (0+1+1+2)/4, (0+10)/2


FSDP_TIMESTEP_SCRIPT = """
import copy, sys
import torch
sys.path.insert(0, "tests/dist_scripts")
import models
from engine.config import ParallelConfig
from engine.dist import end_process, init_distributed
from engine.parallel import apply_fsdp
from sequence_parallel import cases, inputs

torch.set_num_threads(1)
info = init_distributed(ParallelConfig(dp_shard=2), "cpu")
for name, family, call, x in cases():
    torch.manual_seed(3)
    model = models.build_model(family, "debug")
    ref = copy.deepcopy(model).to(torch.bfloat16)  # the unsharded model held in bf16
    apply_fsdp(model, info.fsdp_mesh, param_dtype=torch.bfloat16)
    with torch.no_grad():
        diff = (call(model, x).float() - call(ref, x).float()).abs().max()
        if info.rank == 0:  # one writer: two ranks' lines can interleave
            print(name, "max_abs_diff", float(diff), flush=True)
        if name == "wan.t" and info.rank == 0:  # what the test can see: the same model at t rounded to bf16 differs
            w = inputs()
            rounded = ref(x, w["t"].bfloat16().float(), w["text"]).float() - ref(x, w["t"], w["text"]).float()
            print(name, "rounded_t_diff", float(rounded.abs().max()), flush=True)
end_process()
"""


def test_fsdp_bf16_keeps_the_timestep_in_fp32(tmp_path):
    """Under FSDP2 with bf16 parameters, the root module's forward inputs are not cast to bf16 (the models cast
    latents and context themselves, models/layers.py): the timestep reaches the sinusoidal embedding in fp32,
    as in one process and in diffusers' pipelines. Casting it rounded t = 0.99 to steps of 2^-8 (t * 1000 to
    steps of 4), a coarser grid than a shifted sampler's last steps."""
    p = _two_ranks(tmp_path, FSDP_TIMESTEP_SCRIPT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rows = [line.split() for line in p.stdout.splitlines() if "_diff" in line]
    assert len(rows) == 4, p.stdout  # three cases + the rounded-t check
    for name, what, diff in rows:
        assert (float(diff) > 0) if what == "rounded_t_diff" else (float(diff) == 0.0), (name, what, diff)


FSDP_UNUSED_WARNING_SCRIPT = """
import torch
import engine.parallel as parallel
from engine.config import ParallelConfig
from engine.dist import end_process, init_distributed

parallel.FSDP_ZEROS_UNUSED_GRADS = False  # as on a torch whose FSDP2 lacks set_reduce_scatter_unused_params
info = init_distributed(ParallelConfig(dp_shard=2), "cpu")
for _ in range(2):  # two models, as the Executor and the Demonstrator
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
    parallel.apply_fsdp(model, info.fsdp_mesh, param_dtype=torch.float32)
end_process()
"""


def test_fsdp_without_unused_grads_warns_once_per_run(tmp_path):
    """apply_fsdp's warning about a torch without set_reduce_scatter_unused_params came once per rank and
    per model (2 x world lines per run); now once, from rank 0."""
    p = _two_ranks(tmp_path, FSDP_UNUSED_WARNING_SCRIPT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert (p.stdout + p.stderr).count("has no set_reduce_scatter_unused_params") == 1, p.stderr[-3000:]


CHECKPOINT_TIMEOUT_SCRIPT = """
import os, sys, time
import torch
from engine.checkpoint import CheckpointManager, ModelState
from engine.config import CheckpointConfig, ParallelConfig
from engine.dist import barrier, init_distributed

info = init_distributed(ParallelConfig(timeout_s=3), "cpu")
ck = CheckpointManager(CheckpointConfig(), sys.argv[1], {"model": ModelState(torch.nn.Linear(4, 4))})
if info.rank == 1:  # the save's first barrier, then stuck (12 s) before DCP's collectives
    barrier("checkpoint mkdir")
    time.sleep(12)
    os._exit(0)
t0 = time.time()
try:
    ck.save(1)
    print("save returned after", round(time.time() - t0), "s", flush=True)
except RuntimeError as e:
    print("save failed after", round(time.time() - t0), "s:", str(e)[:200], flush=True)
os._exit(0)
"""


@pytest.mark.dist
def test_checkpoint_group_gets_the_configured_timeout(tmp_path):
    """The checkpoint manager's own gloo group (DCP's collectives) has parallel.timeout_s: a peer stuck inside
    a save ends rank 0's save after about 3 s. It had the backend's default, 30 min: rank 0 waited until the
    peer process exited."""
    p = _two_ranks(tmp_path, CHECKPOINT_TIMEOUT_SCRIPT, str(tmp_path / "ck"))
    line = next((x for x in p.stdout.splitlines() if x.startswith("save ")), p.stdout + p.stderr[-2000:])
    assert line.startswith("save failed after"), line
    assert int(line.split()[3]) <= 8 and "Timed out" in line, line


BARRIER_DEFAULT_TIMEOUT_SCRIPT = """
import os, sys, time
import torch.distributed as dist
from engine.config import ParallelConfig
from engine.dist import DistTimeoutError, barrier, init_distributed

if sys.argv[1:] == ["own-group"]:  # the script makes the process group itself (gloo's default timeout, 30 min)
    dist.init_process_group("gloo")
info = init_distributed(ParallelConfig(timeout_s=3), "cpu")
if info.rank == 1:  # 12 s late
    time.sleep(12)
t0 = time.time()
try:
    barrier("checkpoint commit")  # no timeout_s, as the checkpoint manager and the recipes call it
    print(f"rank {info.rank}: returned after {time.time() - t0:.0f} s", flush=True)
except DistTimeoutError as e:
    print(f"rank {info.rank}: timed out after {time.time() - t0:.0f} s: {e}", flush=True)
except RuntimeError:
    pass
os._exit(0)
"""


@pytest.mark.dist
@pytest.mark.parametrize("group", ["engine", "own-group"])
def test_barrier_without_a_timeout_uses_the_configured_one(tmp_path, group):
    """engine.dist.barrier() without timeout_s times out after parallel.timeout_s (3 s) with a message naming
    it: gloo's monitored_barrier given no timeout waits the backend's default, 30 min, so rank 0 waited for a
    late peer (12 s here) or a stuck one (30 min). With a process group the script made before
    init_distributed, the barrier (and the checkpoint manager's group) still had the 30 min default."""
    p = _two_ranks(tmp_path, BARRIER_DEFAULT_TIMEOUT_SCRIPT, group)
    line = next((x for x in p.stdout.splitlines() if x.startswith("rank 0:")), p.stdout + p.stderr[-2000:])
    assert line.startswith("rank 0: timed out after"), line
    assert int(line.split()[5]) <= 6 and "collective 'checkpoint commit' timed out after 3 s" in line, line


EMA_EVAL_SCRIPT = """
import sys, torch
sys.path.insert(0, "tests/dist_scripts")
from tiny import SeededBatches, TinyDiT, flow_loss
from engine.checkpoint import full_state_dict
from engine.config import JobConfig, build_config, overrides_to_dict
from engine.dist import end_process, init_distributed
from engine.trainer import Trainer

torch.set_num_threads(1)
args = "--train.lr 1e-2 --train.batch_size 2 --train.ema_decay 0.5 --checkpoint.enabled false --run.device cpu"
cfg = build_config(JobConfig, None, overrides_to_dict(JobConfig, args.split()))
info = init_distributed(cfg.parallel, "cpu")
g = torch.Generator().manual_seed(5)
x, t = torch.randn(2, 8, 16, generator=g), torch.rand(2, generator=g)

def plain(sd):  # an unsharded TinyDiT holding sd
    m = TinyDiT()
    m.load_state_dict(sd)
    return m

def err(model, sd):  # the FSDP model's output vs the plain model's with the weights sd
    with torch.no_grad():
        return (model.predict_velocity(x, t, {}) - plain(sd).predict_velocity(x, t, {})).abs().max().item()

final = {}
for order in ("none", "weights_first", "ema_first"):  # the evaluations between steps 2 and 3
    torch.manual_seed(0)
    batches = SeededBatches(batch=2, rank=info.dp_rank, world=info.dp_size)
    tr = Trainer(cfg, TinyDiT(), flow_loss, batches, run_dir=f"{sys.argv[1]}/{order}", dist_info=info)
    tr.train_step()
    tr.train_step()
    # gathered first: a state_dict call reshards the model (and would hide what the forwards leave gathered)
    weights = full_state_dict(tr.model)
    ema = {k: v.full_tensor() for k, v in tr.ema.state_dict().items()}
    errs = []
    if order == "weights_first":
        errs.append(err(tr.model, weights))
    if order != "none":
        with tr.ema_weights():
            errs.append(err(tr.model, ema))
    if order == "ema_first":
        errs.append(err(tr.model, weights))
    tr.train_step()
    final[order] = full_state_dict(tr.model)
    if errs:
        diff = max((final[order][k] - final["none"][k]).abs().max().item() for k in final["none"])
        # one write (torchrun's workers are unbuffered: print's arguments would be written one by one)
        sys.stdout.write(f"rank {info.rank} {order} errors {' '.join(map(str, errs))} trained {diff} end\\n")
        sys.stdout.flush()
end_process()
"""


@pytest.mark.dist
def test_fsdp_forward_after_ema_swap_uses_the_swapped_weights(tmp_path):
    """FSDP2 on 2 gloo ranks: a no-grad forward leaves the root's and the last block's parameters gathered
    (not resharded after forward), and the next forward reused them: after ``with trainer.ema_weights():``
    the training model ran with part of the EMA weights (and trained from them), and an EMA evaluation after
    one of the training weights ran with part of those. Every forward now matches an unsharded model holding
    the weights it should use, and training after an evaluation is training without one."""
    p = _two_ranks(tmp_path, EMA_EVAL_SCRIPT, str(tmp_path))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    for rank in range(2):  # the two ranks' lines can run together in the one pipe: found by regex
        for order in ("weights_first", "ema_first"):
            (errs,) = re.findall(rf"rank {rank} {order} errors (.*?) end", p.stdout)
            # two forwards, each vs the plain model, then the weights after one more step vs a run without them
            assert [float(e) for e in errs.split() if e != "trained"] == pytest.approx([0.0] * 3, abs=1e-6), (
                order,
                errs,
            )


EXPORT_SCRIPT = """
import os, sys, torch
sys.path.insert(0, "tests/dist_scripts")
from safetensors.torch import load_file
from tiny import SeededBatches, TinyDiT, flow_loss
from engine.config import JobConfig, build_config, overrides_to_dict
from engine.dist import end_process, init_distributed
from engine.trainer import Trainer

torch.set_num_threads(1)
args = "--train.batch_size 2 --train.ema_decay 0.5 --checkpoint.enabled false --run.device cpu"
cfg = build_config(JobConfig, None, overrides_to_dict(JobConfig, args.split()))
info = init_distributed(cfg.parallel, "cpu")
seen = []
for i in range(3):
    run = f"{sys.argv[1]}/{i}"
    batches = SeededBatches(batch=2, rank=info.dp_rank, world=info.dp_size)
    tr = Trainer(cfg, TinyDiT(dim=128), flow_loss, batches, run_dir=run, dist_info=info)
    tr.train_step()
    ema = {k: v.full_tensor() for k, v in tr.ema.state_dict().items()}
    tr.close()
    if not os.path.isfile(f"{run}/ema.safetensors"):
        seen.append("missing")
    else:
        got = load_file(f"{run}/ema.safetensors")
        seen.append("same" if all(torch.equal(got[k], v) for k, v in ema.items()) else "differs")
from engine.checkpoint import full_state_dict
kept, full = len(full_state_dict(tr.model, rank0_only=True)), len(full_state_dict(tr.model))
sys.stdout.write(f"rank {info.rank} after close: {' '.join(seen)} end kept {kept} of {full}\\n")
sys.stdout.flush()
end_process()
"""


@pytest.mark.dist
def test_every_rank_finds_the_export_after_close(tmp_path):
    """Trainer.close() under FSDP2 on 2 gloo ranks: rank 0 writes the safetensors export after the gathers, and
    rank 1 returned as soon as its part of the gathers was done, before the file existed (a next stage reading
    it there found no file, or an earlier run's); every rank now returns once the file is written."""
    p = _two_ranks(tmp_path, EXPORT_SCRIPT, str(tmp_path))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    for rank in range(2):
        assert re.findall(rf"rank {rank} after close: (.*?) end", p.stdout) == ["same same same"], p.stdout
    # the export's gathered copy lives on rank 0 only (it was one full host copy per rank)
    (kept0, full0), (kept1, full1) = (
        re.search(rf"rank {r} .* kept (\d+) of (\d+)", p.stdout).groups() for r in (0, 1)
    )
    assert kept0 == full0 == full1 != "0" and kept1 == "0", p.stdout


@pytest.mark.dist
@pytest.mark.parametrize("variant", ["ddp", "fsdp"])
def test_parameters_unused_on_some_ranks_train_like_one_process(tmp_path, variant):
    """A conditioning branch used on one rank only (dist_scripts/unused_branch.py) had no grad there. Plain DP
    (parallel.fsdp = false) skipped its all-reduces on that rank only, FSDP2 left it out of that rank's
    reduce-scatter: either way the ranks' collectives mismatched and gloo aborted. Now the missing grad counts
    as zero (plain DP keeps None for a branch no rank used, as one process does): both ranks end identical and
    equal to one process trained on the whole batch with the branch masked to the same samples. FSDP2 needs a
    torch whose FSDP2 can reduce-scatter the missing gradient as zeros (2.13 can, the GPU image's 2.11 cannot:
    rank 1 aborted there; engine.parallel warns)."""
    from unused_branch import VARIANTS, BranchLoss, CondDiT, make_cfg

    from engine.parallel import FSDP_ZEROS_UNUSED_GRADS

    if variant == "fsdp" and not FSDP_ZEROS_UNUSED_GRADS:
        pytest.skip(f"torch {torch.__version__}: FSDP2 has no set_reduce_scatter_unused_params")
    script = ROOT / "tests" / "dist_scripts" / "unused_branch.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [*TORCHRUN_2, str(script), "--run-dir", str(tmp_path), "--variants", variant]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    torch.manual_seed(0)
    batches = SeededBatches(batch=2, world=2, all_ranks=True)
    use = VARIANTS[variant][1]
    trainer = Trainer(
        make_cfg(variant), CondDiT(), BranchLoss(use, (0, 1)), batches, run_dir=tmp_path / f"ref_{variant}"
    )
    trainer.fit()
    ref = {k: p.detach() for k, p in trainer.model.named_parameters()}
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]
    torch.manual_seed(0)
    init = CondDiT()  # the weights every run started from
    assert not torch.equal(ref["cond.weight"], init.cond.weight)  # the branch trained
    r0, r1 = (torch.load(tmp_path / variant / f"rank{r}.pt") for r in (0, 1))
    for k, w in ref.items():
        assert torch.equal(r0[k], r1[k]), f"{variant}: ranks differ at {k}"
        err = (r0[k] - w).abs().max().item()
        assert err < 1e-5, f"{variant}: {k} differs from the single-process run by {err}"


UNEVEN_MICRO_SCRIPT = """
import sys, time
import torch
sys.path.insert(0, "tests/dist_scripts")
from tiny import SeededBatches, TinyDiT, flow_loss
from engine.config import JobConfig, build_config, overrides_to_dict
from engine.dist import end_process, init_distributed
from engine.trainer import Trainer

torch.set_num_threads(1)
args = "--run.device cpu --train.batch_size 2 --checkpoint.enabled false --parallel.timeout_s 20 " + sys.argv[2]
cfg = build_config(JobConfig, None, overrides_to_dict(JobConfig, args.split()))
info = init_distributed(cfg.parallel, "cpu")


class Uneven(SeededBatches):  # rank 0 gets a third micro-batch at step 2
    def next(self, step, model):
        out = super().next(step, model)
        return out + out[:1] if self.rank == 0 and step == 1 else out


tr = Trainer(cfg, TinyDiT(), flow_loss, Uneven(batch=2, grad_accum=2, rank=info.dp_rank, world=info.dp_size),
             run_dir=sys.argv[1], dist_info=info)
t0 = time.time()
try:
    for _ in range(2):
        tr.train_step()
    sys.stdout.write(f"rank {info.rank}: trained {tr.step} steps end\\n")
except Exception as e:
    sys.stdout.write(f"rank {info.rank}: {type(e).__name__} after {time.time() - t0:.0f} s: {e} end\\n")
sys.stdout.flush()
end_process()
"""


@pytest.mark.dist
def test_ranks_with_unequal_micro_batch_counts_fail_at_once_under_fsdp(tmp_path):
    """batches.next() gave rank 0 three micro-batches and rank 1 two: under FSDP2 the third forward's gathers had
    no partner, and both ranks hung until parallel.timeout_s (600 s by default), then failed with gloo's bare
    'Timed out waiting ... for recv'. Both ranks now stop at that step with an error naming the counts. Plain DP
    (one all-reduce after the micro-batches) trains on as before."""
    p = _two_ranks(tmp_path, UNEVEN_MICRO_SCRIPT, str(tmp_path / "fsdp"), "")
    for rank, n in ((0, 3), (1, 2)):
        (line,) = re.findall(rf"rank {rank}: (.*?) end", p.stdout, re.S) or [p.stdout + p.stderr[-2000:]]
        assert line.startswith("ValueError after"), line
        assert int(line.split()[2]) < 10, line
        want = f"step 2: batches.next() gave {n} micro-batches on rank {rank}, 2 to 3 across the ranks"
        assert want in line, line
    p = _two_ranks(tmp_path, UNEVEN_MICRO_SCRIPT, str(tmp_path / "ddp"), "--parallel.fsdp false")
    for rank in range(2):
        assert f"rank {rank}: trained 2 steps end" in p.stdout, p.stdout + p.stderr[-2000:]


METRICS_TIMEOUT_SCRIPT = """
import os, sys, time
import torch
from engine.config import ParallelConfig
from engine.dist import DistTimeoutError, init_distributed
from engine.metrics import MetricsLogger

info = init_distributed(ParallelConfig(timeout_s=3), "cpu")
logger = MetricsLogger(sys.argv[1] + f"/r{info.rank}", device=torch.device("cpu"), is_main=False)
logger.update({"loss": torch.tensor(1.0)}, 4, 0.0)
if info.rank == 1:  # a peer stuck before its logging step (past rank 0's 3 s timeout)
    time.sleep(6)
t0 = time.time()
try:
    logger.flush(1)
    print(f"rank {info.rank}: returned", flush=True)
except DistTimeoutError as e:
    print(f"rank {info.rank}: timed out after {time.time() - t0:.0f} s: {e}", flush=True)
except RuntimeError as e:
    print(f"rank {info.rank}: bare error: {e}", flush=True)
os._exit(0)
"""


@pytest.mark.dist
def test_a_stuck_peer_at_a_logging_step_is_a_named_timeout(tmp_path):
    """The metrics all-reduce of a logging step was not wrapped: a peer stuck there surfaced as gloo's bare
    'Timed out waiting ... for recv'; it is now a DistTimeoutError naming the metrics all-reduce."""
    p = _two_ranks(tmp_path, METRICS_TIMEOUT_SCRIPT, str(tmp_path))
    line = next((x for x in p.stdout.splitlines() if x.startswith("rank 0:")), p.stdout + p.stderr[-2000:])
    assert line.startswith("rank 0: timed out after") and "metrics all-reduce" in line, line


ORPHAN_SCRIPT = """
import os, sys, time
import torch, torch.distributed as dist
from pathlib import Path
from engine.config import ParallelConfig
from engine.dist import init_distributed

info = init_distributed(ParallelConfig(), "cpu")
Path(sys.argv[1], f"pid{info.rank}").write_text(str(os.getpid()))
for _ in range(600):  # training steps: a collective every 0.1 s, for a minute
    dist.all_reduce(torch.ones(1))
    time.sleep(0.1)
"""


@pytest.mark.dist
def test_workers_die_with_a_sigkilled_torchrun(tmp_path):
    """SIGKILL to torchrun (a scheduler's hard kill): torchrun starts each worker in a session of its own and
    cannot forward SIGKILL, so its workers went on training (and saving into the run folder, beside the
    resumed run) with no launcher; now each worker dies with its torchrun."""
    import signal
    import time

    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([*TORCHRUN_2, str(script), str(tmp_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    pids, deadline = [], time.time() + 60
    while time.time() < deadline and len(pids) < 2:
        pids = [int(p.read_text()) for p in tmp_path.glob("pid*") if p.read_text()]
        time.sleep(0.1)
    assert len(pids) == 2, "the workers did not start"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    def alive(pid: int) -> bool:
        stat = proc_stat(pid)
        return stat is not None and stat[0] != "Z"

    deadline = time.time() + 10
    while time.time() < deadline and any(map(alive, pids)):
        time.sleep(0.1)
    left = [p for p in pids if alive(p)]
    for p in left:  # do not leave them running
        os.kill(p, signal.SIGKILL)
    assert not left, f"workers {left} still running 10 s after torchrun was killed"


def test_proc_stat_reads_state_and_parent_past_a_command_name_with_parens(tmp_path):
    """engine.dist.proc_stat: this process's parent is os.getppid(); a child whose command name holds ") Z 1"
    (the fields after the name were split at the first ")") reads as its own state and parent; a pid that
    does not exist is None."""
    assert proc_stat(os.getpid()) == ("R", os.getppid())
    exe = tmp_path / "x) Z 1 ("
    exe.symlink_to(sys.executable)
    child = subprocess.Popen([str(exe), "-c", "import time; time.sleep(30)"])
    try:
        state, parent = proc_stat(child.pid)
        assert state in "RSD" and parent == os.getpid(), (state, parent)
        assert ") Z 1 (" in Path(f"/proc/{child.pid}/stat").read_text()  # the name really holds them
    finally:
        child.kill()
        child.wait()
    assert proc_stat(child.pid) is None
