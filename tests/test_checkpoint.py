"""Checkpoints: SIGKILL mid-save then resume reproduces the uninterrupted run exactly; async saves;
incomplete folders ignored; keep_last; consolidated safetensors export in the model's own layout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
from tiny import SeededBatches, TinyDiT, flow_loss  # noqa: E402

from engine.checkpoint import MARKER, complete_checkpoints  # noqa: E402
from engine.config import JobConfig, build_config, overrides_to_dict  # noqa: E402
from engine.trainer import Trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "train_tiny.py"
ARGS = (
    "--rng-noise --train.steps 8 --train.lr 3e-3 --train.ema_decay 0.9 --train.lr_schedule cosine "
    "--train.warmup_steps 2 --train.grad_accum 2 --checkpoint.interval 2 --checkpoint.keep_last 2 "
    "--checkpoint.export_safetensors false"
).split()


def _sigint_as_in_a_foreground_run() -> None:
    """In the child before exec: SIGINT at its default, as a shell's foreground job has it (a test process started
    in the background ignores SIGINT, its children inherit that, and the trainer keeps an ignored signal ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run(run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(SCRIPT), "--run-dir", str(run_dir), *ARGS, *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_sigint_as_in_a_foreground_run)  # fmt: skip


def _uninterrupted(run_dir: Path, *extra: str) -> dict[int, float]:
    """The same job in this process (one thread, as the script): the reference losses per step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = build_config(JobConfig, None, overrides_to_dict(JobConfig, [*ARGS[1:], *extra]))
        cfg.run.device = "cpu"
        torch.manual_seed(0)
        batches = SeededBatches(batch=cfg.train.batch_size, grad_accum=2, rng_noise=True)
        tr = Trainer(cfg, TinyDiT(), flow_loss, batches, run_dir=run_dir)
        return {s + 1: tr.train_step()["loss"].item() for s in range(cfg.train.steps)}
    finally:
        torch.set_num_threads(threads)


def test_sigkill_during_save_then_resume_reproduces_losses(tmp_path):
    """Killed after the shards of checkpoint 6 are written but before its commit: the resumed run starts
    from step 4 and its losses (model, optimizer, EMA, schedule, data position, RNG) match exactly."""
    killed = tmp_path / "killed"
    proc = _run(killed, "--kill-at-save", "6")
    ref = _uninterrupted(tmp_path / "full")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    ckpts = killed / "checkpoints"
    assert [s for s, _ in complete_checkpoints(ckpts)] == [2, 4]
    half = ckpts / ".tmp_step_00000006"
    assert any(half.glob("*.distcp")) and not (half / MARKER).exists()  # shards written, never committed

    proc = _run(killed)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    res = json.loads((killed / "out.json").read_text())
    assert res["start"] == 4
    assert {int(k): v for k, v in res["losses"].items()} == {s: ref[s] for s in range(5, 9)}
    assert not half.exists()
    assert [s for s, _ in complete_checkpoints(ckpts)] == [6, 8]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_drops_the_metrics_rows_it_trains_again(tmp_path):
    """Killed while saving step 4, resumed from step 2: metrics.jsonl and TensorBoard hold each step once, steps
    3-4 with the resumed run's values (before, steps 3 and 4 appeared twice in both)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    proc = _run(run, "--kill-at-save", "4", "--train.log_every", "1")
    ref = _uninterrupted(tmp_path / "full")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    first = _rows(run / "metrics.jsonl")
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    proc = _run(run, "--train.log_every", "1")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert json.loads((run / "out.json").read_text())["start"] == 2
    rows = _rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[:2] == first[:2]
    assert [r["loss"] for r in rows] == pytest.approx([ref[s] for s in range(1, 9)], rel=1e-6)
    assert not list(run.glob("metrics.jsonl.*"))  # no temp file left
    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    tb = ea.Scalars("loss")
    assert [e.step for e in tb] == list(range(1, 9))
    assert [e.value for e in tb] == pytest.approx([ref[s] for s in range(1, 9)], rel=1e-6)


def _assert_rows_cover_each_step_once(metrics, ref: dict, last: int) -> None:
    """Each row's loss is the mean of the uninterrupted run's (ref) over the steps since the row before it, and
    the rows end at step ``last``: every step is in exactly one row."""
    prev = 0
    for row in _rows(metrics):
        steps = range(prev + 1, row["step"] + 1)
        assert row["loss"] == pytest.approx(sum(ref[s] for s in steps) / len(steps), rel=1e-6), row["step"]
        prev = row["step"]
    assert prev == last


def test_metrics_rows_cover_every_step_once_across_a_resume(tmp_path):
    """Rows every 4 steps, checkpoints every 6: killed while saving step 12, resumed from step 6. The dropped row
    of step 8 had held steps 5-8 and the resumed one held 7-8, so steps 5-6 were in no row; a checkpoint step now
    ends a row too, and each row is the mean of the steps since the row before it, those covering 1-12 once."""
    run = tmp_path / "run"
    extra = ["--train.steps", "12", "--train.log_every", "4", "--checkpoint.interval", "6"]
    proc = _run(run, "--kill-at-save", "12", *extra)
    ref = _uninterrupted(tmp_path / "full", *extra)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    proc = _run(run, *extra)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert json.loads((run / "out.json").read_text())["start"] == 6
    _assert_rows_cover_each_step_once(run / "metrics.jsonl", ref, 12)


def test_sigterm_writes_the_last_row_before_its_save(tmp_path):
    """SIGTERM during step 5 (rows every 4 steps): the run saved step 5, then wrote the row of step 5. Killed
    between the two (a preemption's grace period ending after the save), the resumed run started at step 5 with
    the rows of steps 1-4 only, and step 5 was in no row. The row is now written first."""
    run = tmp_path / "run"
    extra = ["--train.steps", "8", "--train.log_every", "4", "--checkpoint.interval", "100"]
    proc = _run(run, "--sigterm-at", "5", "--kill-after-commit", "5", *extra)
    ref = _uninterrupted(tmp_path / "full", *extra)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [5]
    proc = _run(run, *extra)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert json.loads((run / "out.json").read_text())["start"] == 5
    _assert_rows_cover_each_step_once(run / "metrics.jsonl", ref, 8)


SIGNAL_ARGS = ["--train.steps", "16", "--train.log_every", "1", "--checkpoint.async_save", "true"]


@pytest.mark.parametrize(("sig", "interval"), [(signal.SIGINT, "1"), (signal.SIGTERM, "3")])
def test_signal_commits_the_pending_save_and_resume_reproduces_losses(tmp_path, sig, interval):
    """SIGINT / SIGTERM mid-run with async saves: the run stops after the current step with one line naming the
    checkpoint to resume from, that checkpoint is the last trained step (SIGINT: the pending async save, committed;
    SIGTERM: saved then, whatever checkpoint.interval), and the resumed run's losses match the uninterrupted run.
    Before, SIGINT left a KeyboardInterrupt traceback and lost the pending save, SIGTERM killed the run."""
    import re
    import time

    run = tmp_path / "run"
    extra = [*SIGNAL_ARGS, "--checkpoint.interval", interval]
    proc = _run(run, *extra)
    ref = _uninterrupted(tmp_path / "full", *extra)
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    m = re.findall(rf"{sig.name}: training stopped at step (\d+); resume from checkpoint step (\d+) \(", out)
    assert len(m) == 1, out[-3000:]
    stopped, resume_at = int(m[0][0]), int(m[0][1])
    assert 2 <= stopped < 16 and resume_at == stopped
    assert _rows(metrics)[-1]["step"] == stopped
    assert complete_checkpoints(run / "checkpoints")[-1][0] == stopped

    proc = _run(run, *extra)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    res = json.loads((run / "out.json").read_text())
    assert res["start"] == stopped
    assert {int(k): v for k, v in res["losses"].items()} == {s: ref[s] for s in range(stopped + 1, 17)}
    assert [r["step"] for r in _rows(metrics)] == list(range(1, 17))


def test_sigterm_under_torchrun_saves_the_same_step_on_every_rank(tmp_path):
    """SIGTERM to torchrun (it forwards it to both ranks, as on preemption): both ranks stop after the same step
    and save it (interval 4 would have kept an earlier one), and a resumed 2-rank run reproduces the
    uninterrupted 2-rank run's later losses."""
    import re
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    extra = [*ARGS, *SIGNAL_ARGS, "--checkpoint.interval", "4"]

    def start(run_dir: Path) -> subprocess.Popen:
        return subprocess.Popen([*torchrun, str(SCRIPT), "--run-dir", str(run_dir), *extra], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip

    ref = start(tmp_path / "full")
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out[-3000:]
    ref_losses = json.loads((tmp_path / "full" / "out.json").read_text())["losses"]
    run = tmp_path / "run"
    proc, metrics, deadline = start(run), run / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out[-3000:]  # torchrun reports the signal
    m = re.findall(r"SIGTERM: training stopped at step (\d+); resume from checkpoint step (\d+) \(", out)
    assert len(m) == 1 and m[0][0] == m[0][1], out[-3000:]
    stopped = int(m[0][0])
    assert 2 <= stopped < 16 and complete_checkpoints(run / "checkpoints")[-1][0] == stopped
    assert len(list((run / "checkpoints" / f"step_{stopped:08d}").glob("rank*.pt"))) == 2
    proc = start(run)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    res = json.loads((run / "out.json").read_text())
    assert res["start"] == stopped
    assert res["losses"] == {k: v for k, v in ref_losses.items() if int(k) > stopped}


def _cfg(steps: int, **ckpt) -> JobConfig:
    cfg = JobConfig()
    cfg.run.device = "cpu"
    cfg.train.steps, cfg.train.lr, cfg.train.ema_decay, cfg.train.log_every = steps, 3e-3, 0.8, 100
    cfg.checkpoint.interval = 2
    for k, v in ckpt.items():
        setattr(cfg.checkpoint, k, v)
    return cfg


def _train(
    cfg: JobConfig, run_dir: Path, model: torch.nn.Module | None = None
) -> tuple[Trainer, list[float]]:
    torch.manual_seed(0)
    tr = Trainer(cfg, model or TinyDiT(), flow_loss, SeededBatches(rng_noise=True), run_dir=run_dir)
    losses = []
    while tr.step < cfg.train.steps:
        losses.append(tr.train_step()["loss"].item())
    tr.close()
    return tr, losses


def test_async_save_resume_matches_uninterrupted(tmp_path):
    _, ref = _train(_cfg(6, export_safetensors=False), tmp_path / "ref")
    first, head = _train(_cfg(4, async_save=True, export_safetensors=False), tmp_path / "run")
    assert first.step == 4 and head == ref[:4]
    second, tail = _train(_cfg(6, async_save=True, export_safetensors=False), tmp_path / "run")
    assert second.batches.position == 6  # data position resumed (4) and advanced
    assert tail == ref[4:]
    with second.ema_weights():
        ema_after = {k: v.clone() for k, v in second.model.state_dict().items()}
    full, _ = _train(_cfg(6, export_safetensors=False), tmp_path / "ref2")
    with full.ema_weights():
        for k, v in full.model.state_dict().items():
            assert torch.equal(ema_after[k], v), k


def test_close_commits_a_pending_async_save_once(tmp_path, caplog):
    """An async save of the last step still pending at close() is committed, not written a second time (the
    second write replaced a complete checkpoint, which is not atomic)."""
    import logging

    with caplog.at_level(logging.INFO, logger="wmsd.checkpoint"):
        tr, _ = _train(_cfg(4, async_save=True, export_safetensors=False), tmp_path)
    saved = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checkpoint saved")]
    assert len(saved) == 2 and saved[-1].endswith("step_00000004"), saved  # steps 2 and 4, once each
    assert [s for s, _ in complete_checkpoints(tmp_path / "checkpoints")] == [2, 4]


def test_a_fresh_run_sets_an_earlier_runs_checkpoints_aside(tmp_path):
    """checkpoint.resume = false in a folder holding a longer earlier run: its checkpoints are moved aside
    (not pruned in favour of the old run's later steps), so the new run keeps its own and resumes from them."""
    _train(_cfg(8, export_safetensors=False), tmp_path)
    fresh = _cfg(4, export_safetensors=False)
    fresh.checkpoint.resume = False
    _train(fresh, tmp_path)
    assert [s for s, _ in complete_checkpoints(tmp_path / "checkpoints")] == [2, 4]
    (aside,) = tmp_path.glob("checkpoints.before-*")
    assert [s for s, _ in complete_checkpoints(aside)] == [6, 8]
    again, _ = _train(_cfg(4, export_safetensors=False), tmp_path)
    assert again.step == 4  # resumed from the new run's step 4, not the old run's 8


def test_incomplete_checkpoints_are_ignored_and_pruned(tmp_path):
    tr, _ = _train(_cfg(6, keep_last=2, export_safetensors=False), tmp_path)
    ck = tmp_path / "checkpoints"
    assert [s for s, _ in complete_checkpoints(ck)] == [4, 6]
    (ck / "step_00000010").mkdir()  # a folder without the marker (e.g. copied by hand, half-written)
    assert tr.checkpointer.latest()[0] == 6


class DiffusersNamedTiny(TinyDiT):
    """A model with its own export layout, like models/ exposes (``blocks.`` -> ``transformer_blocks.``)."""

    def to_diffusers_state_dict(self) -> dict[str, torch.Tensor]:
        return {k.replace("blocks.", "transformer_blocks."): v for k, v in self.state_dict().items()}


def test_export_uses_to_diffusers_state_dict(tmp_path):
    tr, _ = _train(_cfg(2, enabled=False), tmp_path, DiffusersNamedTiny())
    exported = load_file(tmp_path / "model.safetensors")
    expected = tr.unwrapped.to_diffusers_state_dict()
    assert exported.keys() == expected.keys() and any(k.startswith("transformer_blocks.") for k in exported)
    for k, v in expected.items():
        assert torch.equal(exported[k], v)
    ema = load_file(tmp_path / "ema.safetensors")
    assert not torch.equal(ema["out.weight"], exported["out.weight"])


SHRINK_SCRIPT = """
import sys, torch, torch.distributed as dist
from engine.checkpoint import CheckpointManager
from engine.config import CheckpointConfig
from engine.data import BatchLoader, ResumableSampler

class Items:
    def __len__(self): return 16
    def __getitem__(self, i): return {"video": torch.zeros(1), "index": i}

class Weights:
    def __init__(self): self.x = torch.ones(2)
    def state_dict(self): return {"x": self.x}
    def load_state_dict(self, sd): self.x.copy_(sd["x"])

dist.init_process_group("gloo")
rank = dist.get_rank()
loader = BatchLoader(Items(), ResumableSampler(16, rank=rank, world_size=2, seed=0), batch_size=2, num_threads=1,
                     prefetch=4, collate=lambda g: {"index": [x["index"] for x in g]})
it = iter(loader)
next(it)
CheckpointManager(CheckpointConfig(), sys.argv[1], {"w": Weights()}, {"data": loader}).save(1)
print(f"rank {rank} pending {loader.state_dict()['pending']}", flush=True)
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def two_rank_loader_checkpoint(tmp_path_factory) -> Path:
    """The checkpoints folder of SHRINK_SCRIPT under torchrun (2 gloo ranks), saved once for this module."""
    tmp_path = tmp_path_factory.mktemp("shrink")
    script = tmp_path / "save.py"
    script.write_text(SHRINK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    p = subprocess.run([*torchrun, str(script), str(tmp_path / "ck")], env=env, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert p.returncode == 0 and "rank 1 pending [" in p.stdout, (p.stdout + p.stderr)[-3000:]
    assert (
        "rank 1 pending []" not in p.stdout
    )  # rank 1 drew items ahead: the state a smaller world would drop
    return tmp_path / "ck"


def test_resume_on_fewer_ranks_refuses_instead_of_dropping_their_data_position(two_rank_loader_checkpoint):
    """A checkpoint of 2 gloo ranks, each with items drawn ahead and not yet trained, loaded by 1 process: it
    refuses, naming both world sizes (before, rank 0 resumed alone and rank 1's drawn items were never trained in
    that epoch, silently)."""
    from engine.checkpoint import CheckpointManager
    from engine.config import CheckpointConfig
    from engine.data import BatchLoader, ResumableSampler

    class Items:
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {"video": torch.zeros(1), "index": i}

    loader = BatchLoader(Items(), ResumableSampler(16, seed=0), batch_size=2)
    weights = {"x": torch.zeros(2)}

    class Weights:
        def state_dict(self):
            return weights

        def load_state_dict(self, sd):
            weights["x"].copy_(sd["x"])

    mgr = CheckpointManager(
        CheckpointConfig(), two_rank_loader_checkpoint, {"w": Weights()}, {"data": loader}
    )
    with pytest.raises(ValueError, match="state .* of 2 ranks, this run has 1"):
        mgr.load(mgr.latest()[1])


def test_loader_state_of_another_world_size_mid_epoch_refuses(two_rank_loader_checkpoint):
    """Rank 0's BatchLoader state of the 2-rank run, loaded into a 1-rank loader without the manager (a recipe's own
    checkpointing, torchtitan style): it refuses, naming both world sizes. Before, the resumed pass handed out 9 of
    the epoch's 16 items, the 2 ranks had 4: rank 1's 3 drawn items were never trained that epoch, silently."""
    from engine.data import BatchLoader, ResumableSampler

    class Items:
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {"video": torch.zeros(1), "index": i}

    (rank0,) = two_rank_loader_checkpoint.glob("step_*/rank00000.pt")
    state = torch.load(rank0, weights_only=False)["data"]
    assert state["pending"] and state["sampler"]["world_size"] == 2
    loader = BatchLoader(Items(), ResumableSampler(16, seed=0), batch_size=2, num_threads=1,
                         collate=lambda g: {"index": [x["index"] for x in g]})  # fmt: skip
    with pytest.raises(ValueError, match="saved mid-epoch by world_size 2 .* this loader has world_size 1"):
        loader.load_state_dict(state)
    # between passes (nothing drawn ahead) another world size resumes: the rest of the global order, once each
    between = {**state, "pending": [], "sampler": {**state["sampler"], "consumed": 0, "epoch": 1}}
    loader.load_state_dict(between)
    assert sorted(i for b in loader for i in b["index"]) == list(range(16))


def test_resume_under_another_cp_layout_refuses_instead_of_mixing_the_ranks_state(tmp_path):
    """Saved by 2 gloo ranks as 2 data-parallel ranks, resumed by the same 2 as one cp group (parallel.cp = 2): it
    refuses, naming both layouts. Before, each rank loaded its own file: the cp group's ranks got different RNG
    streams (a fresh cp run's draw alike) and data positions counted in another world (data seen again)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    script = ROOT / "tests" / "dist_scripts" / "layout_resume.py"
    p = subprocess.run([*torchrun, str(script), str(tmp_path), "--train.steps 2 --checkpoint.interval 2",
                        "--train.steps 3 --parallel.cp 2"], env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    for rank in range(2):
        first, resumed = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert first["start"] == 0
        assert "error" in resumed, resumed
        assert (
            "saved with the layout ranks 2, data-parallel ranks 2, parallel.cp 1, this run has ranks 2, "
            "data-parallel ranks 1, parallel.cp 2" in resumed["error"]
        ), resumed["error"]
    assert [s for s, _ in complete_checkpoints(tmp_path / "checkpoints")] == [2]


def test_resume_with_ema_switched_on_names_the_missing_state(tmp_path):
    """A checkpoint saved with train.ema_decay = 0, resumed with EMA: one clear error before loading (before, DCP's
    'Missing key in checkpoint state_dict: ema.inp.weight' from deep inside its load planner)."""
    no_ema = _cfg(2, export_safetensors=False)
    no_ema.train.ema_decay = 0
    _train(no_ema, tmp_path)
    with pytest.raises(ValueError, match="has no 'ema' state .*train.ema_decay = 0"):
        _train(_cfg(4, export_safetensors=False), tmp_path)
    again, _ = _train(no_ema, tmp_path)  # the saved settings still resume
    assert again.step == 2


def test_single_process_saves_and_resumes_without_dcp_warnings(tmp_path):
    """DCP warns "torch.distributed is disabled ..." on every single-process save and load, a mode we support:
    the sync calls were quieted, but an async save warns from DCP's upload thread after the call returned, so
    every async save printed it. Nothing is printed now, async or not, on save or resume."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _train(_cfg(4, async_save=True, export_safetensors=False), tmp_path)
        _, resumed = _train(_cfg(6, export_safetensors=False), tmp_path)  # from step 4; saves 6 synchronously
    dcp = [str(w.message) for w in seen if "torch.distributed is disabled" in str(w.message)]
    assert dcp == [], dcp
    assert len(resumed) == 2 and complete_checkpoints(tmp_path / "checkpoints")[-1][0] == 6
