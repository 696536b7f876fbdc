"""recipes/pretrain.py: deterministic data, a short run that resumes identically, the shipped weights."""

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import JobConfig, build_config  # noqa: E402
from engine.world import latent  # noqa: E402
from engine.world.demonstrator import eval_items  # noqa: E402
from recipes import pretrain  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "engine" / "world" / "assets"


def _cfg(steps: int, out: Path) -> JobConfig:
    return build_config(
        JobConfig,
        {
            "run": {"out_dir": str(out), "name": "p", "device": "cpu", "seed": 3},
            "model": {"flavour": "debug"},
            "train": {"steps": steps, "batch_size": 2, "lr": 1e-3, "ema_decay": 0.9, "log_every": 1},
            "checkpoint": {"interval": 1, "keep_last": 1, "export_safetensors": False},
            "world": {"text_layers": 0},
        },
    )


def test_batches_are_a_function_of_the_step():
    b = pretrain.ToyVideoBatches(16, 1, seed=1, device=torch.device("cpu"))
    x, y, z = b.micro_batch(5, 0), b.micro_batch(5, 0), b.micro_batch(6, 0)
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(x["x0"], z["x0"])
    assert x["x0"].shape == (16, 12, 4, 16, 16) and torch.equal(x["image_latent"], x["x0"][:, :, :1])
    video = latent.decode(x["x0"])
    assert video.shape == (16, 4, 32, 32, 3) and not torch.equal(video[:, 0], video[:, -1])  # a block moved


def test_pretraining_draws_no_held_out_or_proposed_scene(tmp_path):
    """With run.seed == world.seed, rank 7 of 8 pretrained on the held-out eval scenes ([s, 7, i] and
    [s, 7, i, 0] seed the same SeedSequence) and rank 0 on the propose stage's scenes ([s] and [s, 0, 0, 0]):
    no pretraining first frame may equal an eval image or a proposed image."""
    from recipes.common import load_image
    from recipes.propose import toy_scene_images

    seed = 1234  # the default world.seed, also taken as run.seed
    held_out = {it.image.tobytes() for it in eval_items(8, seed)}
    proposed = {load_image(str(p)).tobytes() for _, p in toy_scene_images(seed, 8, tmp_path)}
    assert len(held_out) > 1 and len(proposed) > 1
    b = pretrain.ToyVideoBatches(8, 1, seed=seed, device=torch.device("cpu"))
    seen = set()
    for rank in range(8):
        b.rank = rank
        for step in range(4):
            frames = latent.decode(b.micro_batch(step, 0)["x0"])[:, 0].numpy()
            seen |= {f.tobytes() for f in frames}
    # 256 draws of 36,864 possible scenes: by chance about 0.06 would meet the 16 others; the shared streams
    # met on 5 of the 8 held-out and on all 8 proposed ones
    assert (len(seen & held_out), len(seen & proposed)) == (0, 0)


def test_resume_continues_identically(tmp_path):
    torch.manual_seed(0)
    straight, _, _ = pretrain.train(_cfg(3, tmp_path / "a"), tmp_path / "a" / "p")
    pretrain.train(_cfg(2, tmp_path / "b"), tmp_path / "b" / "p")  # "interrupted" after step 2
    resumed, trainer, info = pretrain.train(_cfg(3, tmp_path / "b"), tmp_path / "b" / "p")
    assert info["steps_this_run"] == 1 and trainer.step == 3
    for (k, p), (_, q) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q), k
    metrics = [json.loads(line) for line in (tmp_path / "b" / "p" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses and all(math.isfinite(x) for x in losses)


@pytest.mark.skipif(not (ASSETS / "demonstrator.json").is_file(), reason="no shipped Demonstrator")
def test_shipped_demonstrator_loads_and_runs():
    model, meta = pretrain.load_demonstrator()
    assert sum(p.numel() for p in model.parameters()) < 3e6
    gap = next(iter(meta["gap"].values()))  # the report at the first measured CFG scale
    assert gap["n_items"] >= 256 and "avg" in gap["gap"]
    items = eval_items(2, seed=0)
    img = latent.image_latent(torch.as_tensor(items[0].image)[None].expand(2, -1, -1, -1).contiguous())
    cond = model.cond([items[0].solution, items[0].task], img)
    with torch.no_grad():
        v = model.predict_velocity(torch.randn(2, 12, 4, 16, 16), torch.tensor([0.5, 0.5]), cond)
    assert v.shape == (2, 12, 4, 16, 16) and torch.isfinite(v).all()
    assert not torch.allclose(v[0], v[1])  # the text matters


@pytest.mark.slow
@pytest.mark.skipif(not (ASSETS / "demonstrator.json").is_file(), reason="no shipped Demonstrator")
def test_shipped_gap_reproduces_on_cpu():
    """The gap recorded in demonstrator.json (measured where the weights were trained) reproduces here."""
    from engine.evaluation import SamplingConfig, gap_check
    from engine.world.demonstrator import toy_pipeline
    from engine.world.oracle import OracleJudge

    model, meta = pretrain.load_demonstrator()
    guidance, recorded = next(iter(meta["gap"].items()))
    s = recorded["sampling"]
    items = eval_items(recorded["n_items"], seed=recorded.get("items_seed", 1234))  # 1234: the v0 export
    sampling = SamplingConfig(s["num_steps"], s["shift"], float(guidance), 0.0, 64)
    report = gap_check(toy_pipeline(model), items, OracleJudge(), min_gap=0.0, seeds=tuple(recorded["seeds"]),
                       sampling=sampling)  # fmt: skip
    assert report["gap"]["avg"]["diff"] == pytest.approx(recorded["gap"]["avg"]["diff"], abs=0.03)


@pytest.mark.dist
def test_pretrain_runs_under_torchrun_as_documented(tmp_path):
    """The module doc's `torchrun --nproc-per-node 2 recipes/pretrain.py --config toy_pretrain.toml`: two gloo
    ranks train and export (FSDP asked the toy Demonstrator, which pairs the DiT with its text encoder, for a
    block list it does not have)."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "WMSD_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "recipes/pretrain.py", "--config", "recipes/configs/toy_pretrain.toml", "--run.out_dir", str(tmp_path),
           "--run.name", "two", "--train.steps", "2", "--train.batch_size", "4", "--train.warmup_steps", "1",
           "--world.eval_scenes", "4", "--world.gap_batch", "4", "--checkpoint.interval", "1000"]  # fmt: skip
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "two" / "demonstrator" / "demonstrator.safetensors").is_file()


BAD_SETTINGS = [
    # world.gap_guidance = [] raised an IndexError at the very end, after the whole training run
    (["--world.gap_guidance", "[]"], "world.gap_guidance is empty"),
    # 0 held-out scenes trained the whole run, then the probe failed with "not enough values to unpack"
    (["--world.eval_scenes", "0"], "world.eval_scenes = 0"),
    # trained the whole run, then the gap check failed: "range() arg 3 must not be zero"
    (["--world.gap_batch", "0"], "world.gap_batch = 0"),
    # trained the whole run, then the gap check failed: "seeds (eval.seeds) is empty"
    (["--eval.seeds", "[]"], "eval.seeds is empty"),
    # trained nothing and exported the random initialisation as a Demonstrator, exit 0
    (["--train.steps", "-3"], "train.steps = -3: expected >= 0"),
    # trained a text encoder without layers (range(-1) is empty), without a word
    (["--world.text_layers", "-1"], "world.text_layers = -1"),
    (["--world.caption_dropout", "1.5"], "world.caption_dropout = 1.5"),
    # a FileNotFoundError traceback from load_demonstrator
    (
        ["--model.pretrained", "/nonexistent/demonstrator"],
        "model.pretrained: '/nonexistent/demonstrator' has no",
    ),
    # trained a Wan DiT whatever model.family said
    (["--model.family", "hunyuan15"], "model.family / model.flavour = 'hunyuan15' / 'debug'"),
    # the Trainer failed with a TypeError traceback (ToyDemonstrator has no sequence parallelism)
    (["--parallel.cp", "2"], "parallel.cp = 2: the toy Demonstrator does not support sequence parallelism"),
    # the Trainer's ValueError traceback once the data and model were built
    (["--model.attention_precision", "fp8"], "model.attention_precision 'fp8' runs our FP8 kernel"),
]


@pytest.mark.parametrize("args,needle", BAD_SETTINGS)
def test_bad_settings_fail_in_one_line_before_training(tmp_path, capsys, args, needle):
    """Each of these trained (the whole run, for some) before it failed, or passed silently; validate now
    refuses it up front with one line naming the key (exit status 2), and nothing is trained or written."""
    argv = ["--run.out_dir", str(tmp_path), "--run.device", "cpu", "--model.flavour", "debug", "--train.steps", "1",
            "--train.batch_size", "2", "--world.eval_scenes", "2", "--flow.num_steps", "2",
            "--world.text_layers", "0", *args]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        pretrain.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: {needle}" in err, err[-2000:]
    assert not (tmp_path / "wmsd").exists()  # no run folder: no checkpoint, metrics or export


BUDGET_SCRIPT = """
import sys, time
import torch
from pathlib import Path
from engine.config import JobConfig, build_config
from engine.dist import end_process, init_distributed
from recipes import pretrain

torch.set_num_threads(1)
cfg = build_config(JobConfig, {
    "run": {"out_dir": sys.argv[1], "name": "p", "device": "cpu", "seed": 3},
    "model": {"flavour": "debug"},
    "train": {"steps": 1000, "batch_size": 2, "lr": 1e-3, "log_every": 1000},
    "checkpoint": {"interval": 0, "export_safetensors": False},
    "world": {"text_layers": 0, "time_budget_s": 3.0},
    "parallel": {"fsdp": False, "timeout_s": 30},
})
info = init_distributed(cfg.parallel, "cpu")
if info.rank == 1:  # rank 1 reads three times the elapsed time: it passes the budget steps before rank 0
    real = time.perf_counter
    time.perf_counter = lambda: 3 * real()
_, trainer, _ = pretrain.train(cfg, Path(sys.argv[1]) / "p")
print(f"rank {info.rank} stopped at step {trainer.step}", flush=True)
end_process()
"""


@pytest.mark.dist
def test_time_budget_stops_every_rank_at_the_same_step(tmp_path):
    """world.time_budget_s under torchrun: each rank measures its own elapsed time, and a rank that stopped
    alone went into close() (checkpoint, metrics) while the others trained on, a collective mismatch (gloo:
    "Received data size doesn't match expected size", a hang on NCCL). With rank 1's clock running 3x fast,
    both ranks must stop at the same step."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "budget.py"
    script.write_text(BUDGET_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "WMSD_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path)]  # fmt: skip
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    # the two ranks print to one pipe: their lines may run together ("... step 9rank 1 stopped ...")
    steps = dict(re.findall(r"rank (\d+) stopped at step (\d+)", p.stdout))
    assert sorted(steps) == ["0", "1"] and steps["0"] == steps["1"] and int(steps["0"]) > 0, p.stdout


def test_caption_dropout_outside_0_1_is_refused():
    """world.caption_dropout = 1.5 dropped all 8 of 8 captions (an unconditional Demonstrator), -0.1 none;
    both trained without a word. 1.0 (every caption dropped) is legal: all ids are pad."""
    for drop in (1.5, -0.1):
        with pytest.raises(ValueError, match="world.caption_dropout"):
            pretrain.ToyVideoBatches(8, 1, seed=0, device=torch.device("cpu"), drop=drop)
    all_dropped = pretrain.ToyVideoBatches(8, 1, seed=0, device=torch.device("cpu"), drop=1.0)
    assert int(all_dropped.micro_batch(0, 0)["ids"].count_nonzero()) == 0
