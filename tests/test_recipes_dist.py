"""The work recipes under torchrun (2 gloo processes) and evaluate's per-chunk resume after a SIGKILL,
through their CLIs at tiny sizes on the toy world. The reference is always the same recipe run as one
plain process: sharding and resuming must not change a single score or row."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# 4 chunks of 2 items per condition, two conditions (the Demonstrator baselines); 20 sampler steps
# make a chunk take ~0.3 s, long enough to kill the run between two chunks.
EVAL = [
    "--flow.num_steps",
    "20",
    "--eval.num_items",
    "8",
    "--eval.batch_size",
    "2",
    "--eval.write_videos",
    "1",
]
PROPOSE = ["--world.num_scenes", "40", "--distill.pairs_per_image", "2"]  # 3 chunks of 16 images
CONDITIONS = ("demonstrator+task", "demonstrator+solution")


def command(recipe: str, out: Path, name: str, args: list[str], nproc: int = 1) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return [
        *launcher,
        str(REPO / "recipes" / f"{recipe}.py"),
        "--run.out_dir",
        str(out),
        "--run.name",
        name,
        *args,
    ]


def env() -> dict[str, str]:
    return {**os.environ, "WMSD_PROGRESS": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def cli(recipe: str, out: Path, name: str, args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    cmd = command(recipe, out, name, args, nproc)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300, cwd=REPO)
    if p.returncode != 0:
        raise AssertionError(f"{recipe} x{nproc} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def scores(ev: Path) -> dict[str, dict[str, np.ndarray]]:
    return {c: dict(np.load(ev / f"{c}.npz")) for c in CONDITIONS}


def assert_same_scores(a: Path, b: Path) -> None:
    sa, sb = scores(a), scores(b)
    for c in CONDITIONS:
        assert sa[c].keys() == sb[c].keys()
        for q in sa[c]:
            np.testing.assert_array_equal(sa[c][q], sb[c][q], err_msg=f"{c}/{q}")
    assert json.loads((a / "results.json").read_text()) == json.loads((b / "results.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """evaluate as one plain process: the scores every other run must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    cli("evaluate", out, "one", EVAL)
    return out / "one" / "eval"


@pytest.mark.dist
def test_evaluate_on_two_ranks_gives_the_single_process_scores(reference, tmp_path):
    cli("evaluate", tmp_path, "two", EVAL, nproc=2)
    ev = tmp_path / "two" / "eval"
    assert_same_scores(reference, ev)
    assert (ev / "videos" / "demonstrator+task" / "item0000.mp4").is_file()
    assert "| demonstrator+solution |" in (ev / "results.md").read_text()
    # Each rank scored its own chunks (round-robin: rank 0 items 0-1 and 4-5, rank 1 items 2-3 and 6-7).
    assert len(list((ev / "partial" / "demonstrator+task").glob("items*.npz"))) == 4


@pytest.mark.dist
def test_propose_on_two_ranks_writes_the_single_process_rows(tmp_path):
    cli("propose", tmp_path, "one", PROPOSE)
    cli("propose", tmp_path, "two", PROPOSE, nproc=2)
    rows = {n: (tmp_path / n / "tasks.jsonl").read_text().splitlines() for n in ("one", "two")}
    assert len(rows["one"]) >= 40
    assert rows["two"] == rows["one"]  # the same rows, in the same (chunk) order


def test_evaluate_resumes_mid_condition_after_sigkill(reference, tmp_path):
    """Kill evaluate after its first chunk file; the rerun reuses every finished chunk (unchanged mtime,
    logged) and ends with the uninterrupted run's scores."""
    partial = tmp_path / "k" / "eval" / "partial" / CONDITIONS[0]
    proc = subprocess.Popen(command("evaluate", tmp_path, "k", EVAL), env=env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120

    def done_chunks():  # finished chunk files only: a chunk is written as items*.tmp.npz, then renamed
        return [p for p in partial.glob("items*.npz") if not p.name.endswith(".tmp.npz")]

    while time.time() < deadline and proc.poll() is None and not done_chunks():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in done_chunks()}
    assert 1 <= len(finished) < 4, (
        f"expected a kill inside the first condition, found chunks {sorted(finished)}"
    )
    assert not (tmp_path / "k" / "eval" / f"{CONDITIONS[0]}.npz").exists()
    time.sleep(0.05)  # a rewritten file would get a later mtime
    p = cli("evaluate", tmp_path, "k", EVAL)
    assert f"{CONDITIONS[0]}: {len(finished)} of 4 chunks already scored (resume)" in p.stderr
    assert {n: (partial / n).stat().st_mtime_ns for n in finished} == finished
    assert_same_scores(reference, tmp_path / "k" / "eval")


@pytest.mark.dist
def test_distill_with_sequence_parallel_matches_one_process(tmp_path):
    """On-policy distillation with parallel.cp = 2 on 2 ranks (Ulysses: the Executor's rollouts, its training
    forwards and the Demonstrator's targets each split every sample's tokens over the two ranks, which draw
    the same batch) logs one plain process's losses and exports its weights."""
    import torch
    from safetensors.torch import load_file

    tiny = ["--world.num_scenes", "3", "--distill.pairs_per_image", "2", "--train.batch_size", "2",
            "--flow.num_steps", "2", "--train.warmup_steps", "0", "--train.log_every", "1", "--run.device", "cpu"]  # fmt: skip
    cli("propose", tmp_path, "base", tiny)
    train = [
        *tiny,
        "--distill.tasks",
        str(tmp_path / "base" / "tasks.jsonl"),
        "--train.steps",
        "2",
        "--train.lr",
        "1e-3",
    ]
    p = cli("distill", tmp_path, "cp2", [*train, "--parallel.cp", "2"], nproc=2)
    assert "sequence parallel (Ulysses) over 2 ranks" in p.stderr
    cli("distill", tmp_path, "one", train)
    logs = {
        n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
        for n in ("cp2", "one")
    }
    assert [r["step"] for r in logs["cp2"]] == [1, 2]
    for a, b in zip(logs["cp2"], logs["one"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(
            b["grad_norm"], rel=1e-4
        )
    got, want = (load_file(tmp_path / n / "model.safetensors") for n in ("cp2", "one"))
    assert got.keys() == want.keys()
    for k in want:
        # Adam moves every weight by up to lr = 1e-3 a step: summation order alone leaves ~1.5e-5
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4)


@pytest.mark.dist
def test_distill_resumes_exactly_after_torchrun_is_sigkilled(tmp_path):
    """FSDP2 distillation on 2 ranks, checkpoint every 2 steps; SIGKILL to torchrun (a hard kill, as a
    scheduler's) right after the step-2 checkpoint, then the same command again: the resumed run writes the
    uninterrupted run's rows (every step once, the same losses) and a bit-identical model.safetensors. Before,
    the killed torchrun's workers (each in a session of its own) went on training beside the resumed run."""
    tiny = ["--world.num_scenes", "3", "--distill.pairs_per_image", "2", "--train.batch_size", "2",
            "--flow.num_steps", "2", "--train.warmup_steps", "0", "--train.log_every", "1", "--run.device", "cpu"]  # fmt: skip
    cli("propose", tmp_path, "base", tiny)
    train = [*tiny, "--distill.tasks", str(tmp_path / "base" / "tasks.jsonl"), "--train.steps", "8",
             "--train.lr", "1e-3", "--checkpoint.interval", "2"]  # fmt: skip
    cli("distill", tmp_path, "full", train, nproc=2)
    proc = subprocess.Popen(command("distill", tmp_path, "k", train, nproc=2), env=env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    marker = tmp_path / "k" / "checkpoints" / "step_00000002" / "COMPLETE"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not marker.exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists()
    p = cli("distill", tmp_path, "k", train, nproc=2)
    assert "resumed at step 2" in p.stderr
    rows = {
        n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
        for n in ("full", "k")
    }
    assert [r["step"] for r in rows["k"]] == list(range(1, 9))
    for a, b in zip(rows["k"], rows["full"]):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), a["step"]
    time.sleep(3)  # anything still training would rewrite the export
    assert (tmp_path / "k" / "model.safetensors").read_bytes() == (
        tmp_path / "full" / "model.safetensors"
    ).read_bytes()
