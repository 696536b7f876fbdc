"""Smoke tests of the WMSD recipes through their CLIs (subprocess), at tiny sizes on the toy world.

Checks are against independent things: the oracle's parse of the proposed tasks, the files the
recipes must write (read back with PyAV / safetensors), the trainer's step counter after a real
SIGKILL and resume, and diffusers' own Wan model for the parameter count of the real config.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = ["--world.num_scenes", "3", "--distill.pairs_per_image", "2", "--train.batch_size", "2",
        "--flow.num_steps", "2", "--train.warmup_steps", "0", "--train.log_every", "1",
        "--eval.num_items", "3", "--eval.write_videos", "1", "--eval.batch_size", "4"]  # fmt: skip


def cli(recipe: str, out: Path, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "recipes" / f"{recipe}.py"), "--run.out_dir", str(out), "--run.name", name,
           *TINY, *args]  # fmt: skip
    env = {**os.environ, "WMSD_PROGRESS": "0"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"{recipe} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def proposed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    cli("propose", out, "base")
    return out


def test_propose_writes_oracle_valid_tasks_and_resumes(proposed):
    from engine.world.oracle import parse_task

    rows = [json.loads(line) for line in (proposed / "base" / "tasks.jsonl").read_text().splitlines()]
    assert len(rows) >= 3 and len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        parse_task(r["task"])  # raises unless the task is a well-formed toy task
        assert (proposed / "base" / r["image"]).is_file()
        assert "slides it" in r["solution"]
    p = cli("propose", proposed, "base")
    assert "already proposed" in p.stderr
    assert len((proposed / "base" / "tasks.jsonl").read_text().splitlines()) == len(rows)


def test_propose_resume_after_a_torn_write_equals_the_full_run(proposed, tmp_path):
    """A crash mid-write leaves the first image's first row and half of its second: the resumed file holds
    exactly the uninterrupted run's rows (the torn line is cut, not glued to the next row; the image cut
    short is proposed again whole), and every line parses."""
    full = (proposed / "base" / "tasks.jsonl").read_text()
    lines = full.splitlines(keepends=True)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "tasks.jsonl").write_text(lines[0] + lines[1][: len(lines[1]) // 2])
    p = cli("propose", tmp_path, "r")
    assert "torn last line" in p.stderr and "only part of their rows" in p.stderr
    got = [json.loads(line) for line in (tmp_path / "r" / "tasks.jsonl").read_text().splitlines()]
    assert sorted(got, key=lambda r: r["id"]) == sorted(map(json.loads, lines), key=lambda r: r["id"])


def test_propose_rerun_with_another_pairs_per_image_is_refused(tmp_path):
    """A task file proposed with 1 pair per image, rerun asking for 2: it said every image was done and kept 1
    (a fresh run writes 2); now an error naming both counts, the file untouched."""
    from engine.world.oracle import OracleProposer
    from recipes.propose import propose, toy_scene_images

    images, out = toy_scene_images(0, 4, tmp_path / "images"), tmp_path / "tasks.jsonl"
    assert propose(OracleProposer(), images, out, 1) > 0
    before = out.read_text()
    with pytest.raises(ValueError, match="pairs_per_image = 1, this run asks for 2"):
        propose(OracleProposer(), images, out, 2)
    assert out.read_text() == before
    assert propose(OracleProposer(), images, out, 1) == 0  # the same count resumes as before


def test_propose_refuses_two_images_with_one_id(tmp_path):
    """Manifest images without an 'id' are keyed by file name: two folders holding 0001.png would share
    rows and resume state, so that is an error naming both files."""
    import numpy as np

    from recipes.common import save_image

    for cam in ("cam1", "cam2"):
        (tmp_path / cam).mkdir()
        save_image(np.zeros((8, 8, 3), np.uint8), tmp_path / cam / "0001.png")
    (tmp_path / "m.jsonl").write_text('{"image": "cam1/0001.png"}\n{"image": "cam2/0001.png"}\n')
    p = cli("propose", tmp_path, "dup", "--data.manifest", str(tmp_path / "m.jsonl"), check=False)
    assert p.returncode != 0 and "rows 1 and 2 have the same image id '0001'" in p.stderr


def test_distill_on_policy_trains_and_exports(proposed):
    from safetensors.torch import load_file

    tasks = str(proposed / "base" / "tasks.jsonl")
    cli("distill", proposed, "onp", "--distill.tasks", tasks, "--train.steps", "2", "--train.lr", "1e-3")
    run = proposed / "onp"
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logs[-1]["step"] == 2 and logs[-1]["distill_mse"] >= 0
    assert (run / "config.toml").is_file()
    trained = load_file(str(run / "model.safetensors"))
    assert trained and all(torch.isfinite(v).all() for v in trained.values())


def test_distill_resumes_after_sigkill(proposed):
    tasks = str(proposed / "base" / "tasks.jsonl")
    args = [
        "--distill.tasks",
        tasks,
        "--train.steps",
        "4",
        "--checkpoint.interval",
        "1",
        "--checkpoint.keep_last",
        "4",
    ]
    cmd = [sys.executable, str(REPO / "recipes" / "distill.py"), "--run.out_dir", str(proposed), "--run.name",
           "kill", *TINY, *args]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    ckpts = proposed / "kill" / "checkpoints"
    deadline = time.time() + 240
    while (
        time.time() < deadline and not (ckpts.is_dir() and any(ckpts.glob("step_*"))) and proc.poll() is None
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (proposed / "kill" / "model.safetensors").is_file(), "killed before the end: no export yet"
    p = cli("distill", proposed, "kill", *args)
    assert "resumed at step" in p.stderr
    logs = [json.loads(line) for line in (proposed / "kill" / "metrics.jsonl").read_text().splitlines()]
    assert logs[-1]["step"] == 4


def test_rl_logs_rewards_and_judge_wait(proposed):
    tasks = str(proposed / "base" / "tasks.jsonl")
    cli("rl", proposed, "rl", "--distill.tasks", tasks, "--rl.steps", "2", "--rl.group_size", "2", "--flow.num_steps", "3",
        "--rl.train_timesteps", "1")  # fmt: skip
    logs = [json.loads(line) for line in (proposed / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert logs[-1]["step"] == 2
    for entry in logs:
        assert 0.0 <= entry["judge_wait_frac"] <= 1.0
        assert 0.0 <= entry["reward_mean"] <= 1.0
        assert entry["clip_frac"] in (0.0, 0.5, 1.0)  # 2 rows per step
    # The first group is sampled by the very policy being updated: the recomputed log-probs equal the
    # rollout's, so the importance ratio is 1 (a deterministic step in the mix would blow it up).
    first = next(e for e in logs if e["step"] == 1)
    assert abs(first["approx_kl"]) < 1e-3 and first["clip_frac"] == 0.0


def test_rl_rollouts_run_at_the_training_precision(proposed):
    """A bf16 run on one process (autocast, no FSDP): the rollouts and the Demonstrator's targets run under
    the trainer's autocast too, so the first step's recomputed log-probs equal the rollout's even summed
    over a video (logprob_reduction "sum": an fp32 rollout put the log-ratio outside the 1e-3 clip)."""
    tasks = str(proposed / "base" / "tasks.jsonl")
    cli("rl", proposed, "rl_bf16", "--distill.tasks", tasks, "--rl.steps", "1", "--rl.group_size", "2",
        "--flow.num_steps", "3", "--rl.train_timesteps", "1", "--precision.param_dtype", "bfloat16",
        "--rl.logprob_reduction", "sum")  # fmt: skip
    logs = [json.loads(line) for line in (proposed / "rl_bf16" / "metrics.jsonl").read_text().splitlines()]
    first = next(e for e in logs if e["step"] == 1)
    assert first["clip_frac"] == 0.0 and abs(first["approx_kl"]) < 1e-7, first


def test_rl_samples_and_rescores_with_the_evaluated_cfg(proposed):
    """With flow.guidance != 1 the RL group is the policy evaluate.py samples: CFG v = v_u + g (v_c - v_u) with
    the empty text as uncond. Each trained row's log pi_old is the Gaussian log-density of its stored step under
    that guided velocity, written out here from Flow-GRPO's SDE step (sd3_sde_with_logprob), and the loss
    re-scores the row with the same guidance (ratio 1 before any update). Unguided rollouts (guidance ignored)
    were off by 0.01-0.05 nats per element."""
    import math

    from engine.config import load_config
    from recipes.common import build_judge, build_kit, load_items, prepare_teacher
    from recipes.rl import GroupBatches, rl_loss_fn

    g, sigma = 4.0, 0.7
    cfg = load_config(argv=["--run.out_dir", str(proposed), "--run.name", "rl_cfg", "--flow.guidance", str(g),
                            "--flow.num_steps", "4", "--flow.shift", "3.0", "--flow.sde_sigma", str(sigma),
                            "--rl.group_size", "2", "--rl.train_timesteps", "2", "--rl.prefetch", "false"])  # fmt: skip
    kit = build_kit(cfg)
    table = kit.encode_items(load_items(proposed / "base" / "tasks.jsonl"))
    model, teacher = kit.load_denoiser(""), prepare_teacher(kit.load_denoiser(""), cfg)
    with build_judge(cfg) as judge:
        micro = GroupBatches(cfg, kit, table, teacher, judge).next(0, model)
    empty = kit.encode_text([""])
    for mb in micro:
        x, x_next, t, t_next = (mb[k].double() for k in ("x", "x_next", "t", "t_next"))
        n = len(x)
        uncond = {**{k: v.expand(n, *v.shape[1:]) for k, v in empty.items()},
                  **{k: v for k, v in mb["cond"].items() if k.startswith("image")}}  # fmt: skip
        with torch.no_grad():
            v_c = model.predict_velocity(mb["x"], mb["t"], mb["cond"]).double()
            v_u = model.predict_velocity(mb["x"], mb["t"], uncond).double()
        v = v_u + g * (v_c - v_u)
        bt = [c.view(-1, *[1] * (x.dim() - 1)) for c in (t, t_next)]
        std = sigma * torch.sqrt(bt[0] / (1 - bt[0]))
        dt = bt[1] - bt[0]
        mean = x * (1 + std**2 / (2 * bt[0]) * dt) + v * (1 + std**2 * (1 - bt[0]) / (2 * bt[0])) * dt
        s = std * torch.sqrt(-dt)
        logp = (
            (-((x_next - mean) ** 2) / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi))
            .flatten(1)
            .sum(1)
        )
        per_elem = (mb["logp_old"].double() - logp).abs() / x[0].numel()
        assert per_elem.max() < 1e-4, per_elem
        _, logs = rl_loss_fn(cfg)(model, mb)
        assert logs["clip_frac"] == 0.0 and logs["approx_kl"] < 1e-9, logs


def test_rl_counts_judge_fallbacks_across_a_resume(proposed):
    """A judge that never answers (connection refused): every verdict falls back, the run finishes, and a
    resumed run reports the whole run's fallbacks (the count restarted at 0)."""
    tasks = str(proposed / "base" / "tasks.jsonl")
    args = ["--distill.tasks", tasks, "--rl.group_size", "2", "--flow.num_steps", "3", "--rl.train_timesteps", "1",
            "--judge.backend", "openai", "--judge.base_url", "http://127.0.0.1:9/v1", "--judge.model", "none",
            "--judge.max_retries", "0", "--judge.timeout_s", "2", "--checkpoint.interval", "1"]  # fmt: skip
    first = cli("rl", proposed, "rlfb", *args, "--rl.steps", "1")
    again = cli("rl", proposed, "rlfb", *args, "--rl.steps", "2")
    per_step = 2 * 2  # prompts_per_step 1 x group 2 x questions 2
    assert f"judge fallbacks {per_step}," in first.stderr
    assert "resumed at step 1" in again.stderr and f"judge fallbacks {2 * per_step}," in again.stderr


@pytest.mark.dist
def test_rl_with_sequence_parallel_judges_each_video_once(proposed):
    """parallel.cp = 2 on 2 gloo ranks: both ranks roll out the same videos; only the group's first rank
    sends them to the judge (a real loopback server counts the requests; each rank sent its own copy
    before) and both train on the rewards it broadcasts."""
    from tests.judge_servers import FaultServer

    tasks = str(proposed / "base" / "tasks.jsonl")
    env = {**os.environ, "WMSD_PROGRESS": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with FaultServer() as server:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "recipes" / "rl.py"), "--run.out_dir", str(proposed), "--run.name", "rlcp", *TINY,
               "--distill.tasks", tasks, "--rl.group_size", "2", "--flow.num_steps", "3",
               "--rl.train_timesteps", "1", "--rl.steps", "2", "--parallel.cp", "2", "--judge.backend", "openai",
               "--judge.base_url", server.url, "--judge.model", "m"]  # fmt: skip
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rl done at step 2" in p.stderr and "judge fallbacks 0," in p.stderr
    assert server.requests == 2 * 2 * 2  # steps x group x reward questions, once


def test_demonstrate_resumes_after_the_task_file_grows_or_a_file_is_lost(proposed, tmp_path):
    """A task file that gained a row in front, rerun into the same folder: the earlier demonstrations keep
    their latents (a new chunk file overwrote one the index still pointed into). A latents file lost after a
    crash: its rows are made again instead of the index pointing at nothing."""
    from recipes.demonstrate import read_demos

    lines = (proposed / "base" / "tasks.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "v1.jsonl").write_text("".join(lines[1:]))
    (tmp_path / "v2.jsonl").write_text("".join(lines))
    (tmp_path / "images").symlink_to(proposed / "base" / "images")
    demos = tmp_path / "demos"
    args = ["--distill.demos", str(demos), "--eval.batch_size", "4", "--eval.write_videos", "0"]
    cli("demonstrate", tmp_path, "d", *args, "--distill.tasks", str(tmp_path / "v1.jsonl"))
    before_lat, before_ids, _, _ = read_demos(demos, None)
    cli("demonstrate", tmp_path, "d", *args, "--distill.tasks", str(tmp_path / "v2.jsonl"))
    lat, ids, _, _ = read_demos(demos, None)
    assert len(ids) == len(lines) and set(before_ids) < set(ids)
    for i, item in enumerate(before_ids):
        assert torch.equal(lat[ids.index(item)], before_lat[i]), item
    first_file = json.loads((demos / "index.jsonl").read_text().splitlines()[0])["file"]
    (demos / first_file).unlink()
    p = cli("demonstrate", tmp_path, "d", *args, "--distill.tasks", str(tmp_path / "v2.jsonl"))
    assert "missing latents files" in p.stderr
    lat2, ids2, _, _ = read_demos(demos, None)
    assert sorted(ids2) == sorted(ids)


def test_demonstrate_rerun_with_other_sampling_makes_the_demonstrations_again(proposed, tmp_path):
    """A rerun into the same folder with another flow.num_steps: it kept the old latents ("0 new demonstrations")
    under a config.toml that named the new value; now they are made again, equal to a fresh run's, one row per
    demonstration."""
    from recipes.demonstrate import read_demos

    tasks = str(proposed / "base" / "tasks.jsonl")

    def demonstrate(name: str, folder: str, steps: int):
        return cli("demonstrate", tmp_path, name, "--distill.tasks", tasks, "--eval.batch_size", "4",
                   "--eval.write_videos", "0", "--distill.demos", str(tmp_path / folder), "--flow.num_steps",
                   str(steps))  # fmt: skip

    demonstrate("d", "demos", 2)
    old, _, _, _ = read_demos(tmp_path / "demos", None)
    p = demonstrate("d", "demos", 3)
    assert "made with other settings" in p.stderr
    demonstrate("f", "fresh", 3)
    lat, ids, _, _ = read_demos(tmp_path / "demos", None)
    ref, ref_ids, _, _ = read_demos(tmp_path / "fresh", None)
    assert sorted(ids) == sorted(ref_ids) and len(ids) == len(set(ids)) == old.shape[0]
    assert not torch.equal(lat[ids.index(ref_ids[0])], old[0])
    for i, item in enumerate(ref_ids):
        assert torch.equal(lat[ids.index(item)], ref[i]), item


def test_evaluate_writes_table_videos_and_skips_finished(proposed):
    import av

    cli("evaluate", proposed, "ev")
    ev = proposed / "ev" / "eval"
    res = json.loads((ev / "results.json").read_text())
    assert set(res["conditions"]) == {"demonstrator+task", "demonstrator+solution"}
    for entry in res["conditions"].values():
        s = entry["summary"]["avg"]
        assert 0.0 <= s["lo"] <= s["mean"] <= s["hi"] <= 1.0
    with av.open(str(ev / "videos" / "demonstrator+task" / "item0000.mp4")) as f:
        frames = list(f.decode(video=0))
    from engine.world.scene import NUM_FRAMES, SIZE

    assert len(frames) == NUM_FRAMES and frames[0].width == SIZE
    assert (ev / "videos" / "demonstrator+task" / "item0000.png").is_file()
    assert "| demonstrator+task |" in (ev / "results.md").read_text()
    p = cli("evaluate", proposed, "ev")
    assert p.stderr.count("already evaluated") == 2
    # other items: the saved scores are stale, scored again (they were reused, and an Executor then failed)
    p = cli("evaluate", proposed, "ev", "--eval.num_items", "5",
            "--eval.executors", '["copy=engine/world/assets/demonstrator.safetensors"]')  # fmt: skip
    assert "already evaluated" not in p.stderr and p.stderr.count("made with other settings") >= 2
    res = json.loads((ev / "results.json").read_text())
    assert res["n_items"] == 5 and set(res["conditions"]) == {
        "demonstrator+task",
        "demonstrator+solution",
        "copy",
    }


def test_bad_inputs_fail_with_clear_messages(proposed, tmp_path):
    p = cli("evaluate", proposed, "bad", "--eval.executors", '["no-equals-sign"]', check=False)
    assert p.returncode != 0 and "expected 'name=path/to/model.safetensors'" in p.stderr
    p = cli("distill", proposed, "bad", "--distill.tasks", str(tmp_path / "none.jsonl"), check=False)
    assert p.returncode != 0 and "none.jsonl' does not exist" in p.stderr
    p = cli("distill", proposed, "bad", "--distill.modes", "x", check=False)
    assert p.returncode == 2 and "unknown config key 'distill.modes'" in p.stderr


def test_pipeline_stops_on_a_small_gap_and_says_why(tmp_path):
    """An impossible min_gap: the pipeline must stop after the gap check, print the baseline table and
    name the measured gap, and train nothing."""
    cmd = [sys.executable, str(REPO / "recipes" / "pipeline.py"), "--run.out_dir", str(tmp_path), "--run.name",
           "p", *TINY, "--distill.min_gap", "1.5", "--flow.num_steps", "3", "--rl.train_timesteps", "1"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode != 0
    assert "STOP: the Demonstrator's gap" in p.stderr and "below distill.min_gap = 1.5" in p.stderr
    assert "| demonstrator+solution |" in p.stdout
    assert not (tmp_path / "p" / "onpolicy").exists()
    assert json.loads((tmp_path / "p" / "results.json").read_text())["gap"]["passed"] is False


@pytest.mark.parametrize("config", ["wan21_i2v_14b_480p.toml", "wmsd_toy.toml"])
def test_shipped_configs_build_on_meta_and_match_diffusers(config):
    diffusers = pytest.importorskip("diffusers")
    from engine.config import load_config
    from recipes.common import build_denoiser

    cfg = load_config(
        argv=["--config", str(REPO / "recipes" / "configs" / config), "--model.meta_init", "true"]
    )
    overrides = {} if cfg.model.flavour != "toy" else {"in_channels": 28, "out_channels": 12, "text_dim": 64}
    ours = build_denoiser(cfg, **overrides)
    assert all(p.is_meta for p in ours.parameters())
    with torch.device("meta"):
        theirs = diffusers.WanTransformer3DModel(**ours.cfg.to_diffusers_config())
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(ours) == count(theirs)


@pytest.mark.slow
def test_pipeline_end_to_end_tiny(tmp_path):
    """The main job at tiny sizes: every stage runs and the table names every condition."""
    args = ["--train.steps", "2", "--rl.steps", "2", "--rl.group_size", "2", "--rl.train_timesteps", "1", "--flow.num_steps", "3",
            "--distill.min_gap", "0"]  # fmt: skip
    cmd = [sys.executable, str(REPO / "recipes" / "pipeline.py"), "--run.out_dir", str(tmp_path), "--run.name",
           "p", *TINY, *args]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "p" / "results.json").read_text())
    assert {"demonstrator+task", "demonstrator+solution", "onpolicy", "sft", "rl"} <= set(res["conditions"])
    assert "off-policy SFT" in res["verdict"] and "| onpolicy |" in p.stdout
    from engine.config import load_toml

    saved = load_toml(tmp_path / "p" / "config.toml")  # the pipeline's own config, not a stage's
    assert saved["run"]["name"] == "p" and saved["train"]["steps"] == 2 and saved["distill"]["tasks"] == ""
    # a rerun changing only how it logs reuses every stage; one changing what a stage trains stops there
    again = subprocess.run(
        [*cmd, "--train.log_every", "5"], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "onpolicy: already trained" in again.stderr and "rl: already trained" in again.stderr
    other = subprocess.run(
        [*cmd, "--train.steps", "3"], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert other.returncode != 0 and "STOP: stage 'onpolicy'" in other.stderr, other.stderr[-3000:]
    assert "train.steps: 2 -> 3" in other.stderr


def test_gap_closed_lines_say_na_for_an_executor_without_scores():
    """An Executor with no item scored under all three conditions has a NaN gap share: the table says n/a
    (formatting it crashed the pipeline after every stage had finished)."""
    from engine.config import JobConfig
    from recipes.pipeline import gap_closed_lines

    nan = float("nan")
    res = {"conditions": {"rl": {"gap_closed": {"mean": nan, "lo": nan, "hi": nan}},
                          "onpolicy": {"gap_closed": {"mean": 0.47, "lo": 0.42, "hi": 0.51}}}}  # fmt: skip
    text = gap_closed_lines(res, JobConfig())
    assert "- rl: n/a [n/a, n/a]" in text and "- onpolicy: 47% [42%, 51%]" in text


def zero_demonstrator(folder: Path) -> Path:
    """A copy of the shipped toy Demonstrator with zero weights (the same video for any prompt: no gap)."""
    from safetensors.torch import load_file, save_file

    folder.mkdir()
    for f in (REPO / "engine" / "world" / "assets").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    sd = load_file(folder / "demonstrator.safetensors")
    save_file({k: torch.zeros_like(v) for k, v in sd.items()}, folder / "demonstrator.safetensors")
    return folder


def test_evaluate_scores_again_when_the_demonstrator_changes(proposed, tmp_path):
    """Scores saved with one Demonstrator are not reused for another (the fingerprint named only the
    Executor's weights file, so a run folder kept the first Demonstrator's baseline table)."""
    other = zero_demonstrator(tmp_path / "demonstrator")
    cli("evaluate", proposed, "swap")
    p = cli("evaluate", proposed, "swap", "--world.demonstrator", str(other))
    assert "already evaluated" not in p.stderr and "made with other settings" in p.stderr
    cli("evaluate", proposed, "fresh", "--world.demonstrator", str(other))
    swapped, fresh = (
        json.loads((proposed / n / "eval" / "results.json").read_text()) for n in ("swap", "fresh")
    )
    assert swapped["conditions"] == fresh["conditions"]


def test_evaluate_fingerprint_covers_the_prompt_text_and_image():
    """A task file whose solutions (or images) changed under the same ids and tasks gives the solution
    condition a new fingerprint (only id and task were hashed: the old solution's scores were reused)."""
    import dataclasses

    import numpy as np

    from engine.config import JobConfig
    from engine.evaluation import EvalItem
    from recipes.evaluate import fingerprint

    cfg = JobConfig()
    image = np.zeros((8, 8, 3), np.uint8)
    items = [EvalItem(image, "put red left", "slide red one cell left", {"id": "a"})]
    other_solution = [dataclasses.replace(items[0], solution="put red left")]
    other_image = [dataclasses.replace(items[0], image=image + 1)]
    fp = fingerprint(cfg, items, "", "solution")
    assert fingerprint(cfg, other_solution, "", "solution") != fp
    assert fingerprint(cfg, other_image, "", "solution") != fp
    # the task prompt does not read the solution
    assert fingerprint(cfg, other_solution, "", "task") == fingerprint(cfg, items, "", "task")


def test_evaluate_fingerprint_covers_the_judge_prompts_and_the_sampling_precision(monkeypatch):
    """Scores made under another judge prompt version or another precision.param_dtype (the dtype the
    sampler's forwards run in) are not reused: neither was in the fingerprint, so a rerun with
    --precision.param_dtype bfloat16 reported the float32 run's saved scores as 'already evaluated'."""
    import dataclasses

    import numpy as np

    import engine.judge.base
    from engine.config import JobConfig
    from engine.evaluation import EvalItem
    from recipes.evaluate import fingerprint

    cfg = JobConfig()
    items = [EvalItem(np.zeros((8, 8, 3), np.uint8), "put red left", "slide red one cell left", {"id": "a"})]
    fp = fingerprint(cfg, items, "", "task")
    bf16 = dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, param_dtype="bfloat16"))
    assert fingerprint(bf16, items, "", "task") != fp
    monkeypatch.setattr(engine.judge.base, "PROMPT_VERSION", "wmsd-judge-v2")
    assert fingerprint(cfg, items, "", "task") != fp


def test_evaluate_scores_again_what_the_judge_failed_to_score(tmp_path):
    """A run whose judge server was down saved NaN scores; the rerun with the server back up (same URL,
    same settings) reported them as 'already evaluated' and the table stayed NaN. Now it scores them again
    and matches a fresh run on the live server."""
    import numpy as np

    from recipes.evaluate import BASELINE
    from tests.judge_servers import FaultServer, free_port

    port = free_port()
    judge = ["--judge.backend", "openai", "--judge.model", "m", "--judge.base_url", f"http://127.0.0.1:{port}/v1",
             "--judge.max_retries", "0", "--judge.timeout_s", "5"]  # fmt: skip
    cli("evaluate", tmp_path, "down", *judge)
    down = json.loads((tmp_path / "down" / "eval" / "results.json").read_text())
    assert np.isnan(down["conditions"][BASELINE]["summary"]["avg"]["mean"])
    with FaultServer(port=port):
        p = cli("evaluate", tmp_path, "down", *judge)
        cli("evaluate", tmp_path, "fresh", *judge)
    assert "already evaluated" not in p.stderr and "did not score" in p.stderr
    again, fresh = (
        json.loads((tmp_path / n / "eval" / "results.json").read_text()) for n in ("down", "fresh")
    )
    assert again["conditions"] == fresh["conditions"]
    assert np.isfinite(again["conditions"][BASELINE]["summary"]["avg"]["mean"])


def test_evaluate_executor_names_are_distinct_file_names():
    """Two Executors with one name wrote the same <name>.npz: the table kept one row and the other's scores
    were lost; a name with '/' crashed at the final write, after every condition had been scored."""
    from engine.config import JobConfig
    from recipes.evaluate import conditions

    cfg = JobConfig()
    cfg.eval.executors = ["a=x.safetensors", "b=y.safetensors"]
    assert [c[0] for c in conditions(cfg)] == ["demonstrator+task", "demonstrator+solution", "a", "b"]
    for specs, needle in ((["a=x.safetensors", "a=y.safetensors"], "'a' is already taken"),
                          (["demonstrator+task=x.safetensors"], "'demonstrator\\+task' is already taken"),
                          (["x/y=x.safetensors"], "plain file name"), ([".=x.safetensors"], "plain file name")):  # fmt: skip
        cfg.eval.executors = specs
        with pytest.raises(ValueError, match=needle):
            conditions(cfg)


@pytest.mark.parametrize("key", ["num_items", "batch_size"])
@pytest.mark.parametrize("value", [0, -1])
def test_evaluate_refuses_a_non_positive_item_count(key, value):
    """eval.num_items -1 silently dropped the task file's last item (a slice [:-1]), 0 crashed with
    KeyError: 0 after loading the model; eval.batch_size 0 crashed in range()."""
    from engine.config import load_config
    from recipes.evaluate import eval_items

    cfg = load_config(argv=[f"--eval.{key}", str(value)])
    with pytest.raises(ValueError, match=f"eval.{key} = {value}: expected a positive"):
        eval_items(cfg)


@pytest.mark.slow
def test_pipeline_without_a_gap_reports_na_when_let_through(tmp_path):
    """A Demonstrator without a gap (zero weights: the same video for task and solution) let through by
    --distill.min_gap 0, as --help offers: every stage runs and the table says n/a for the share of the gap
    closed (gap_closed raised at the very end and no results were written)."""
    other = zero_demonstrator(tmp_path / "demonstrator")
    args = ["--train.steps", "2", "--rl.steps", "2", "--rl.group_size", "2", "--rl.train_timesteps", "1",
            "--flow.num_steps", "3", "--distill.min_gap", "0", "--world.demonstrator", str(other)]  # fmt: skip
    cmd = [sys.executable, str(REPO / "recipes" / "pipeline.py"), "--run.out_dir", str(tmp_path), "--run.name",
           "p", *TINY, *args]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "p" / "results.json").read_text())
    assert res["gap"]["diff"] == 0.0 and res["gap"]["passed"] is True
    assert "- onpolicy: n/a [n/a, n/a]" in (tmp_path / "p" / "results.md").read_text()


@pytest.mark.parametrize("config", ["wan21_i2v_14b_480p.toml", "hunyuan15_i2v_480p.toml"])
def test_real_config_without_pretrained_names_the_key(config):
    """The shipped real-model configs leave model.pretrained empty (set it on the command line); a run that
    forgets it failed with "FileNotFoundError: .: missing sub-folders" (the current folder)."""
    from engine.config import load_config
    from recipes.common import build_kit

    cfg = load_config(argv=["--config", str(REPO / "recipes" / "configs" / config), "--run.device", "cpu"])
    with pytest.raises(ValueError, match="model.pretrained is empty"):
        build_kit(cfg)


@pytest.mark.parametrize("ci", ["95", "0", "1.0"])
def test_evaluate_refuses_a_confidence_level_outside_0_1(ci):
    """eval.ci 95 (a percentage) crashed with numpy's "Quantiles must be in the range [0, 1]" once every
    condition had been scored."""
    from engine.config import load_config
    from recipes.evaluate import eval_items

    with pytest.raises(ValueError, match="eval.ci = .*: expected a confidence level between 0 and 1"):
        eval_items(load_config(argv=["--eval.ci", ci]))


def test_evaluate_says_when_it_leaves_task_rows_out(proposed):
    """--help said the items are eval.tasks' rows, but only the first eval.num_items are evaluated: a
    benchmark longer than 256 rows was cut without a word. Now a warning names both numbers."""
    import logging

    from engine.config import load_config
    from recipes.evaluate import eval_items

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    tasks = proposed / "base" / "tasks.jsonl"
    n = len(tasks.read_text().splitlines())
    keep, logger = Keep(), logging.getLogger("wmsd.evaluate")
    logger.addHandler(keep)
    try:
        items = eval_items(load_config(argv=["--eval.tasks", str(tasks), "--eval.num_items", "2"]))
        assert len(items) == 2
        assert any(f"has {n} rows; evaluating the first eval.num_items = 2" in line for line in keep.lines)
        keep.lines.clear()
        assert len(eval_items(load_config(argv=["--eval.tasks", str(tasks)]))) == n and not keep.lines
    finally:
        logger.removeHandler(keep)


def test_propose_image_paths_resolve_from_the_task_file(tmp_path, monkeypatch):
    """A manifest and run folder given relative to the working directory: the task file's image paths are
    read against the task file's folder (load_items), so they must point at the images from there (they
    were stored relative to the working directory: runs/r/imgs/s0.png, which does not exist)."""
    import numpy as np

    from engine.world.oracle import OracleProposer
    from engine.world.scene import random_scene, render_one
    from recipes.common import load_items, save_image
    from recipes.propose import manifest_images, propose

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for i in range(3):
        save_image(render_one(random_scene(rng), None)[0], Path("imgs") / f"s{i}.png")
    Path("imgs/m.jsonl").write_text("".join(f'{{"image": "s{i}.png"}}\n' for i in range(3)))
    out = Path("runs/r/tasks.jsonl")
    out.parent.mkdir(parents=True)
    assert propose(OracleProposer(seed=0), manifest_images("imgs/m.jsonl", ""), out, 2) > 0
    for it in load_items(out):
        assert Path(it.image).is_file(), it.image


def test_proposer_without_a_model_names_the_key():
    """judge.backend transformers with judge.model empty: the proposer says so (it raised transformers'
    'OSError: Repo id must use alphanumeric chars ...: ''' from the empty path), as the judge does."""
    from engine.config import JobConfig, build_config
    from recipes.common import build_proposer

    cfg = build_config(JobConfig)
    cfg.judge.backend = "transformers"
    with pytest.raises(ValueError, match="judge.model"):
        build_proposer(cfg)


def _user_error_cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(recipe, arguments, what the one-line error must say) for a user's typical input mistakes."""
    import numpy as np

    from recipes.common import save_image

    (tmp / "bad.jsonl").write_text('not json\n{"id": "a"}\n')
    (tmp / "fields.jsonl").write_text('{"id": "a", "image": "x.png"}\n')
    (tmp / "afile").write_text("")
    save_image(np.zeros((64, 64, 3), np.uint8), tmp / "x.png")
    (tmp / "good.jsonl").write_text('{"id": "a", "image": "x.png", "task": "t", "solution": "s"}\n')
    good = ["--distill.tasks", str(tmp / "good.jsonl")]
    return [
        ("distill", ["--distill.tasks", str(tmp / "none.jsonl")], "error: distill.tasks: task file"),
        ("distill", ["--distill.tasks", str(tmp / "bad.jsonl")], "error: distill.tasks: " + str(tmp / "bad.jsonl:1")),
        ("rl", ["--distill.tasks", str(tmp / "fields.jsonl")], "row 1 lacks ['task', 'solution']"),
        ("rl", [*good, "--rl.init", str(tmp / "none.safetensors")], "error: rl.init: weights file"),
        ("rl", [*good, "--judge.backend", "openai", "--judge.model", "m"], "error: judge.base_url:"),
        ("demonstrate", ["--model.flavour", "1.3B", "--model.pretrained", str(tmp / "none")],
         "error: model.pretrained: folder"),
        ("evaluate", ["--eval.executors", '["x"]'], "eval.executors entry 'x': expected 'name="),
        ("distill", ["--run.out_dir", str(tmp / "afile")], "error: run.out_dir:"),
        # rl's own settings: refused by GroupBatches / the judge's requests after the encoding and model loads
        ("rl", good, "error: flow.num_steps = 2: rl needs >= 3"),
        ("rl", [*good, "--flow.num_steps", "3", "--rl.train_timesteps", "2"], "error: rl.train_timesteps = 2"),
        ("rl", [*good, "--flow.num_steps", "3", "--rl.train_timesteps", "1", "--rl.reward_questions", '["tsak"]'],
         "error: rl.reward_questions = ['tsak']"),
        ("rl", [*good, "--flow.num_steps", "3", "--rl.train_timesteps", "1", "--judge.max_batch", "0"],
         "error: judge.max_batch = 0"),
    ]  # fmt: skip


def test_user_input_errors_are_one_line_before_any_work(tmp_path):
    """A missing or malformed task file, weights file, judge endpoint, pretrained folder, executor spec or
    run folder printed a Python traceback (raised while the models were being built); each recipe's
    validate now reports it as one line naming the key, exit status 2."""
    for recipe, args, needle in _user_error_cases(tmp_path):
        p = cli(recipe, tmp_path / "runs", "u", *args, check=False)
        assert p.returncode == 2 and "Traceback" not in p.stderr, (recipe, args, p.stderr[-2000:])
        assert needle in p.stderr, (recipe, args, p.stderr[-2000:])


def test_evaluate_checks_executor_files_before_the_baselines(tmp_path):
    """An eval.executors file that does not exist failed only when its condition's turn came, after both
    baselines had been sampled and judged (hours at real sizes); validate now names it up front."""
    from engine.config import ConfigError, load_config
    from recipes.evaluate import validate

    cfg = load_config(
        argv=["--run.out_dir", str(tmp_path), "--eval.executors", f'["a={tmp_path}/none.safetensors"]']
    )
    with pytest.raises(
        ConfigError, match="eval.executors entry 'a': weights file .*none.safetensors' does not exist"
    ):
        validate(cfg)


def test_sequence_parallel_degree_that_does_not_fit_one_process_is_refused(tmp_path):
    """parallel.cp = 3 in a single process was accepted and the run trained without sequence parallelism
    (the mesh check ran only under torchrun); validate now refuses it, naming parallel.cp."""
    from engine.config import ConfigError, load_config
    from recipes.common import check_run

    cfg = load_config(argv=["--run.out_dir", str(tmp_path), "--parallel.cp", "3"])
    with pytest.raises(
        ConfigError, match="world size 1 is not divisible by parallel.dp_replicate \\* parallel.cp"
    ):
        check_run(cfg)


@pytest.mark.parametrize("key", ["train.batch_size", "flow.num_steps", "eval.batch_size"])
def test_sizes_below_one_are_refused_up_front(tmp_path, key):
    """train.batch_size 0 trained into "cannot reshape tensor of 0 elements" inside the model; flow.num_steps 0
    failed with a traceback from the sampler; validate now names the key."""
    from engine.config import ConfigError, load_config
    from recipes.common import check_run

    cfg = load_config(argv=["--run.out_dir", str(tmp_path), f"--{key}", "0"])
    with pytest.raises(ConfigError, match=f"config key '{key}': expected >= 1, got 0"):
        check_run(cfg)


def test_toy_world_refuses_a_model_pretrained_it_would_ignore(tmp_path):
    """evaluate --model.pretrained /some/folder on the toy world ran to the end with the shipped Demonstrator,
    the folder silently ignored; validate now says which key the toy world reads instead."""
    from engine.config import ConfigError, load_config
    from recipes.common import check_model

    cfg = load_config(argv=["--model.pretrained", str(tmp_path)])
    with pytest.raises(
        ConfigError, match="model.pretrained: .* is not read by the toy world.*world.demonstrator"
    ):
        check_model(cfg)


@pytest.mark.parametrize("layout", ["ours", "diffusers"])
def test_rl_init_of_another_model_config_is_refused_before_any_work(proposed, tmp_path, layout):
    """--rl.init with the weights of another model config (text_dim 32, not the toy Demonstrator's 64) failed
    with a size-mismatch traceback from load_state_dict after the prompts had been encoded; validate now
    reads the file's header and names the file and a tensor whose shape differs, with both shapes."""
    from safetensors.torch import save_file

    from models.wan import WanConfig, WanModel
    from recipes.pretrain import load_demonstrator

    other = WanModel(WanConfig.flavour("toy", in_channels=28, out_channels=12, text_dim=32, text_len=None))
    shipped = load_demonstrator()[0].dit
    sd, ref = ((other.state_dict(), shipped.state_dict()) if layout == "ours"
               else (other.to_diffusers_state_dict(), shipped.to_diffusers_state_dict()))  # fmt: skip
    bad = sorted(k for k in ref if ref[k].shape != sd[k].shape)
    assert bad and set(sd) == set(ref)
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    tasks = str(proposed / "base" / "tasks.jsonl")
    p = cli("rl", tmp_path, "r", "--distill.tasks", tasks, "--flow.num_steps", "3", "--rl.group_size", "2",
            "--rl.train_timesteps", "1", "--train.steps", "1", "--rl.init", str(path), check=False)  # fmt: skip
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert f"error: rl.init: weights '{path}' do not fit" in p.stderr, p.stderr[-3000:]
    k = bad[0]
    assert f"{k}: file {list(sd[k].shape)}, model {list(ref[k].shape)}" in p.stderr, p.stderr[-3000:]
    assert not (tmp_path / "r").exists()  # nothing encoded, trained or written, no run folder left


def test_rl_init_with_other_keys_is_refused_before_any_work(proposed, tmp_path):
    """--rl.init naming the toy text encoder's file (not a DiT) is refused up front, naming the missing keys."""
    from engine.world.text import ToyTextEncoder  # noqa: F401  (the file below is its weights)

    path = REPO / "engine" / "world" / "assets" / "text_encoder.safetensors"
    tasks = str(proposed / "base" / "tasks.jsonl")
    p = cli("rl", tmp_path, "r", "--distill.tasks", tasks, "--flow.num_steps", "3", "--rl.group_size", "2",
            "--rl.train_timesteps", "1", "--rl.init", str(path), check=False)  # fmt: skip
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert f"error: rl.init: weights '{path}' do not fit" in p.stderr and "keys missing" in p.stderr
    assert not (tmp_path / "r").exists()


def _pipeline_error_cases(tmp: Path) -> list[tuple[list[str], str]]:
    """(arguments, the one-line error) for settings a pipeline stage refused only when its turn came."""
    from safetensors.torch import save_file

    from models.wan import WanConfig, WanModel

    other = WanModel(WanConfig.flavour("toy", in_channels=28, out_channels=12, text_dim=32, text_len=None))
    save_file(other.state_dict(), str(tmp / "other.safetensors"))
    ok = ["--flow.num_steps", "3", "--rl.train_timesteps", "1", "--distill.min_gap", "0"]
    return [
        # rl's GroupBatches: after propose, the gap check, on-policy distillation, demonstrations and both SFTs
        (["--distill.min_gap", "0"], "error: flow.num_steps = 2: rl needs >= 3"),
        ([*ok, "--rl.train_timesteps", "2"], "error: rl.train_timesteps = 2"),
        # on-policy distillation's batches, after propose and the gap check
        ([*ok, "--distill.steps_per_rollout", "4"], "error: distill.steps_per_rollout = 4: expected 1..flow.num_steps"),
        ([*ok, "--distill.init", str(tmp / "other.safetensors")], "error: distill.init: weights"),
        # the gap check's evaluation, after propose
        ([*ok, "--eval.ci", "95"], "error: eval.ci = 95.0: expected a confidence level"),
        ([*ok, "--eval.num_items", "0"], "error: eval.num_items = 0: expected >= 1"),
        # given to a stage the pipeline configures itself: silently ignored
        ([*ok, "--rl.init", str(tmp / "other.safetensors")], "error: rl.init = "),
        ([*ok, "--distill.tasks", str(tmp / "t.jsonl")], "error: distill.tasks = "),
        # no stage exported its Executor (the trainer exports after >= 1 step): rl found no onpolicy weights
        ([*ok, "--train.steps", "0"], "error: train.steps = 0: expected >= 1"),
        ([*ok, "--checkpoint.export_safetensors", "false"], "error: checkpoint.export_safetensors = false"),
    ]  # fmt: skip


def test_pipeline_refuses_bad_settings_before_its_first_stage(tmp_path):
    """The pipeline had no validate: a setting a later stage refuses (rl's flow.num_steps >= 3, distillation's
    steps_per_rollout, evaluation's ci) failed with a traceback after the stages before it had run (minutes
    on the toy world, hours at real sizes). Each is now one line naming the key, exit status 2, with nothing
    proposed, sampled or trained."""
    for args, needle in _pipeline_error_cases(tmp_path):
        out = tmp_path / "runs"
        cmd = [sys.executable, str(REPO / "recipes" / "pipeline.py"), "--run.out_dir", str(out), "--run.name", "p",
               *TINY, "--train.steps", "1", "--rl.group_size", "2", *args]  # fmt: skip
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert p.returncode == 2 and "Traceback" not in p.stderr, (args, p.stderr[-3000:])
        assert needle in p.stderr, (args, p.stderr[-3000:])
        assert not (out / "p").exists() or not any((out / "p").iterdir()), args


@pytest.mark.slow
def test_pipeline_stops_when_the_executor_start_weights_change_at_the_same_path(tmp_path):
    """A training stage's inputs listed only the task file (and rl's Executor): distill.init's weights, or the
    Demonstrator's, replaced at the same path reused every stage trained from the old ones ("already
    trained"). Their files' identity is now in <stage>/stage.json: the rerun stops and names the file."""
    from safetensors.torch import save_file

    from recipes.pretrain import load_demonstrator

    init = tmp_path / "init.safetensors"
    sd = {k: v.contiguous() for k, v in load_demonstrator()[0].dit.state_dict().items()}
    save_file(sd, str(init))
    args = ["--train.steps", "1", "--rl.steps", "1", "--rl.group_size", "2", "--rl.train_timesteps", "1",
            "--flow.num_steps", "3", "--distill.min_gap", "0", "--eval.write_videos", "0", "--distill.init", str(init)]  # fmt: skip
    cmd = [sys.executable, str(REPO / "recipes" / "pipeline.py"), "--run.out_dir", str(tmp_path), "--run.name",
           "p", *TINY, *args]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    save_file({k: v + 0.01 for k, v in sd.items()}, str(init))  # other weights, same path and size
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert again.returncode != 0 and "STOP: stage 'onpolicy'" in again.stderr, again.stderr[-3000:]
    assert f"{init} changed" in again.stderr


@pytest.mark.parametrize(
    "recipe, args",
    [
        ("rl", ["--rl.reward_questions", '["tsak"]']),
        ("evaluate", ["--eval.ci", "2"]),
        ("demonstrate", ["--distill.demos_per_task", "0"]),
        ("distill", []),  # no task file
        ("propose", ["--distill.pairs_per_image", "0"]),
        ("pretrain", ["--world.eval_scenes", "0"]),
    ],
)
def test_a_refused_run_leaves_no_run_folder(tmp_path, recipe, args):
    """check_run created <out_dir>/<name> before the recipe's later checks refused a setting: a typo left an
    empty run folder behind; now nothing is created until validation passes."""
    import importlib

    from engine.config import ConfigError, load_config

    validate = importlib.import_module(f"recipes.{recipe}").validate
    cfg = load_config(argv=["--run.out_dir", str(tmp_path / "runs" / "deep"), "--run.name", "x", *args])
    with pytest.raises(ConfigError):
        validate(cfg)
    assert list(tmp_path.iterdir()) == []


def test_a_run_folder_under_an_unwritable_folder_is_refused(tmp_path):
    """The run folder is no longer created by validate: the nearest existing folder above it is checked."""
    from engine.config import ConfigError, load_config
    from recipes.common import check_run

    (tmp_path / "ro").mkdir(mode=0o555)
    if os.access(tmp_path / "ro", os.W_OK):
        pytest.skip("this process may write to any folder (root)")
    cfg = load_config(argv=["--run.out_dir", str(tmp_path / "ro" / "sub"), "--run.name", "x"])
    with pytest.raises(
        ConfigError, match="run.out_dir: run folder .* cannot be created: folder .*ro' is not writable"
    ):
        check_run(cfg)


def _one_task_file(tmp: Path) -> Path:
    import numpy as np

    from recipes.common import save_image

    save_image(np.zeros((64, 64, 3), np.uint8), tmp / "x.png")
    (tmp / "tasks.jsonl").write_text('{"id": "a", "image": "x.png", "task": "t", "solution": "s"}\n')
    return tmp / "tasks.jsonl"


def test_rl_with_no_steps_is_refused_before_it_returns_an_export_that_is_not_there(tmp_path):
    """rl with rl.steps 0 (= train.steps) and train.steps 0 trained nothing, exported nothing and returned
    <run>/model.safetensors all the same; validate now refuses it, as the pipeline refuses train.steps 0."""
    from engine.config import ConfigError, load_config
    from recipes import rl

    base = ["--run.out_dir", str(tmp_path / "runs"), "--distill.tasks", str(_one_task_file(tmp_path)),
            "--flow.num_steps", "3", "--rl.train_timesteps", "1"]  # fmt: skip
    with pytest.raises(ConfigError, match="rl.steps = 0 and train.steps = 0: .* export no Executor"):
        rl.validate(load_config(argv=[*base, "--train.steps", "0"]))
    rl.validate(load_config(argv=[*base, "--train.steps", "0", "--rl.steps", "1"]))  # rl.steps decides
    assert not (tmp_path / "runs").exists()


def test_propose_refuses_a_bad_manifest_or_task_file_before_any_work(tmp_path):
    """A manifest row without an image, a manifest image that does not exist, and a task file to resume that
    was proposed with another distill.pairs_per_image each failed with a traceback in run (the last after
    the proposer was built); validate now names the key."""
    from engine.config import ConfigError, load_config
    from engine.world.oracle import OracleProposer
    from recipes import propose

    base = ["--run.out_dir", str(tmp_path / "runs"), "--run.name", "p"]
    (tmp_path / "noimg.jsonl").write_text('{"img": "x.png"}\n')
    (tmp_path / "strrow.jsonl").write_text('"image.png"\n')  # a TypeError (string indices) in run
    (tmp_path / "missing.jsonl").write_text('{"image": "gone.png"}\n')
    cases = [
        ("noimg.jsonl", "data.manifest: .*noimg.jsonl: row 1 has no 'image' field"),
        ("strrow.jsonl", "data.manifest: .*strrow.jsonl: row 1 has no 'image' field"),
        ("missing.jsonl", "data.manifest: .*missing.jsonl' image 'gone': .*gone.png' does not exist"),
    ]
    for name, needle in cases:
        with pytest.raises(ConfigError, match=needle):
            propose.validate(load_config(argv=[*base, "--data.manifest", str(tmp_path / name)]))
    tasks = tmp_path / "tasks.jsonl"
    propose.propose(OracleProposer(), propose.toy_scene_images(0, 2, tmp_path / "images"), tasks, 1)
    argv = [*base, "--distill.tasks", str(tasks), "--world.num_scenes", "2"]
    propose.validate(load_config(argv=[*argv, "--distill.pairs_per_image", "1"]))
    with pytest.raises(ConfigError, match="distill.tasks: .*pairs_per_image = 1, this run asks for 2"):
        propose.validate(load_config(argv=[*argv, "--distill.pairs_per_image", "2"]))
    with pytest.raises(ConfigError, match="distill.tasks: .* is a folder"):
        propose.validate(load_config(argv=[*base, "--distill.tasks", str(tmp_path)]))


def test_propose_writes_a_task_file_in_a_folder_that_does_not_exist_yet(tmp_path):
    """--distill.tasks new/sub/tasks.jsonl proposed the first chunk, then failed to open the file (its rows
    lost); the folder is now created."""
    from engine.config import load_config
    from recipes import propose

    tasks = tmp_path / "new" / "sub" / "tasks.jsonl"
    argv = ["--run.out_dir", str(tmp_path / "runs"), "--distill.tasks", str(tasks), "--world.num_scenes", "2",
            "--distill.pairs_per_image", "1"]  # fmt: skip
    propose.run(load_config(argv=argv))
    rows = [json.loads(line) for line in tasks.read_text().splitlines()]
    assert rows and all((tasks.parent / r["image"]).is_file() for r in rows)


@pytest.mark.parametrize("key, value", [("judge.max_batch", "0"), ("judge.max_concurrency", "0"),
                                        ("judge.max_wait_ms", "-1")])  # fmt: skip
def test_judge_settings_the_service_refuses_are_refused_up_front(tmp_path, key, value):
    """evaluate and demonstrate took judge.max_batch 0 (and the like), loaded the models, sampled the first
    chunk and then failed with the judge service's traceback; validate now names the key, for the values
    the service itself refuses."""
    import asyncio

    from engine.config import ConfigError, load_config
    from engine.judge import AsyncJudge
    from engine.world.oracle import OracleJudge
    from recipes import demonstrate, evaluate

    cfg = load_config(argv=["--run.out_dir", str(tmp_path / "runs"), f"--{key}", value,
                            "--distill.tasks", str(_one_task_file(tmp_path))])  # fmt: skip
    j = cfg.judge

    async def build():
        AsyncJudge(
            OracleJudge(), max_batch=j.max_batch, max_wait_ms=j.max_wait_ms, max_concurrency=j.max_concurrency
        )

    with pytest.raises(ValueError):  # the service's own refusal
        asyncio.run(build())
    for recipe in (evaluate, demonstrate):
        with pytest.raises(ConfigError, match=f"{key} = {value}"):
            recipe.validate(cfg)


def test_demonstrate_refuses_a_demos_path_that_is_not_a_demonstrations_folder(tmp_path):
    """distill.demos naming a file (FileExistsError), or a folder whose index.jsonl is not JSON or not a
    demonstrations index (KeyError 'file'), failed with a traceback in run; validate now names the key."""
    from engine.config import ConfigError, load_config
    from recipes import demonstrate

    base = ["--run.out_dir", str(tmp_path / "runs"), "--distill.tasks", str(_one_task_file(tmp_path))]
    (tmp_path / "afile").write_text("")
    (tmp_path / "d1").mkdir()
    (tmp_path / "d1" / "index.jsonl").write_text("garbage\n{}\n")
    (tmp_path / "d2").mkdir()
    (tmp_path / "d2" / "index.jsonl").write_text('{"id": "x"}\n')
    for demos, needle in (("afile", "is not a folder"), ("d1", "index.jsonl:1: not valid JSON"),
                          ("d2", "row 1 is not a row of a demonstrations index")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"distill.demos: .*{needle}"):
            demonstrate.validate(load_config(argv=[*base, "--distill.demos", str(tmp_path / demos)]))
    demonstrate.validate(load_config(argv=[*base, "--distill.demos", str(tmp_path / "new")]))


def test_a_task_file_with_a_repeated_id_is_refused(tmp_path):
    """Two task rows with one id (a hand-made task file): demonstrate wrote two demonstrations '<id>#0' and
    off-policy SFT trained both on the last row's prompt (items are looked up by id); validate now names
    both rows."""
    from engine.config import ConfigError, load_config
    from recipes import demonstrate, rl

    tasks = _one_task_file(tmp_path)
    tasks.write_text(tasks.read_text() + '{"id": "a", "image": "x.png", "task": "other", "solution": "s2"}\n')
    cfg = load_config(argv=["--run.out_dir", str(tmp_path / "runs"), "--distill.tasks", str(tasks)])
    for recipe in (demonstrate, rl):
        with pytest.raises(
            ConfigError, match="distill.tasks: .*tasks.jsonl: rows 1 and 2 have the same id 'a'"
        ):
            recipe.validate(cfg)


def test_precompute_input_mistakes_are_one_line_errors(tmp_path):
    """precompute with data.cache_dir under a file, a manifest without one usable row, or an existing cache
    made with another data.height failed with a traceback once the encoders were loaded; each is now one
    line naming the input (the resumed cache with the same settings still works)."""
    import numpy as np

    from engine.config import ConfigError, load_config
    from recipes import precompute
    from recipes.common import save_image

    save_image(np.full((32, 32, 3), 90, np.uint8), tmp_path / "im.png")
    (tmp_path / "m.jsonl").write_text('{"image": "im.png", "caption": "a block"}\n')
    (tmp_path / "bad.jsonl").write_text("garbage\n")
    (tmp_path / "afile").write_text("")
    base = ["--data.manifest", str(tmp_path / "m.jsonl"), "--run.device", "cpu"]
    with pytest.raises(
        ConfigError, match="data.cache_dir: cache folder .* cannot be created: .*afile' is not a folder"
    ):
        precompute.validate(load_config(argv=[*base, "--data.cache_dir", str(tmp_path / "afile" / "c")]))
    bad = ["--data.manifest", str(tmp_path / "bad.jsonl"), "--data.cache_dir", str(tmp_path / "c0")]
    with pytest.raises(ConfigError, match="manifest .*bad.jsonl': no usable rows"):
        precompute.main([*bad, "--run.device", "cpu"])
    cache = ["--data.cache_dir", str(tmp_path / "c")]
    assert precompute.main([*base, *cache])["num_rows"] == 1
    assert precompute.main([*base, *cache])["num_rows"] == 1  # resumes
    with pytest.raises(ConfigError, match="data.cache_dir: .* other settings .*differ: height, buckets\\)"):
        precompute.main([*base, *cache, "--data.height", "64"])
    cmd = [sys.executable, str(REPO / "recipes" / "precompute.py"), *base, *cache, "--data.height", "64"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "error: data.cache_dir:" in p.stderr, (
        p.stderr[-2000:]
    )


@pytest.mark.parametrize("grad_accum, fits", [(3, False), (2, True)])
def test_rl_rows_that_do_not_split_into_grad_accum_are_refused_up_front(tmp_path, grad_accum, fits):
    """rl with 2 rows per step (1 prompt x 2 rollouts x 1 timestep) and train.grad_accum 3 encoded the
    prompts, loaded both models, rolled out and judged the first group, then failed in split_micro;
    validate now refuses what split_micro refuses."""
    from engine.config import ConfigError, load_config
    from recipes import rl
    from recipes.common import split_micro

    argv = ["--run.out_dir", str(tmp_path / "runs"), "--distill.tasks", str(_one_task_file(tmp_path)),
            "--flow.num_steps", "3", "--rl.train_timesteps", "1", "--rl.group_size", "2",
            "--rl.prompts_per_step", "1", "--train.grad_accum", str(grad_accum)]  # fmt: skip
    batch = {"x": torch.zeros(2, 3), "cond": {"text": torch.zeros(2, 4)}}
    if fits:
        assert len(split_micro(batch, grad_accum)) == grad_accum
        rl.validate(load_config(argv=argv))
        return
    with pytest.raises(ValueError, match="cannot be split"):
        split_micro(batch, grad_accum)
    with pytest.raises(ConfigError, match="train.grad_accum = 3: rl's 2 rows per step"):
        rl.validate(load_config(argv=argv))


def test_rl_group_of_one_rollout_is_refused(tmp_path):
    """rl.group_size 1 trained with every advantage 0 (group-relative: one rollout is its group's mean), so
    only the Demonstrator anchor trained while the logs showed rewards; validate now refuses it."""
    from engine.config import ConfigError, load_config
    from engine.losses import group_advantages
    from recipes import rl

    assert torch.equal(group_advantages(torch.tensor([0.1, 0.9, 0.4]), 1), torch.zeros(3))
    argv = ["--run.out_dir", str(tmp_path / "runs"), "--distill.tasks", str(_one_task_file(tmp_path)),
            "--flow.num_steps", "3", "--rl.train_timesteps", "1"]  # fmt: skip
    with pytest.raises(ConfigError, match="rl.group_size = 1: .*advantage 0"):
        rl.validate(load_config(argv=[*argv, "--rl.group_size", "1"]))
    rl.validate(load_config(argv=[*argv, "--rl.group_size", "2"]))


def test_a_task_row_that_is_not_an_object_of_strings_is_refused(tmp_path):
    """A task-file row that is a JSON list failed validate with an AttributeError traceback; a task given as
    a number passed validate and failed in the text encoder ('int' object has no attribute 'lower') after the
    models were loaded. Both are now one line naming the row."""
    from engine.config import ConfigError, load_config
    from recipes import rl

    tasks = _one_task_file(tmp_path)
    base = ["--run.out_dir", str(tmp_path / "runs"), "--distill.tasks", str(tasks), "--flow.num_steps", "3",
            "--rl.train_timesteps", "1"]  # fmt: skip
    for row, needle in (('["a", "b"]', "row 1 is not a JSON object"),
                        ('{"id": "a", "image": "x.png", "task": 5, "solution": "s"}', "row 1: \\['task'\\] not text")):  # fmt: skip
        tasks.write_text(row + "\n")
        with pytest.raises(ConfigError, match=f"distill.tasks: .*tasks.jsonl: {needle}"):
            rl.validate(load_config(argv=base))


def test_evaluate_of_a_real_model_without_a_task_file_is_refused(tmp_path):
    """evaluate with a diffusers model and no eval.tasks sampled and judged the toy world's held-out scenes
    (64 x 64 renders of blocks) with it, silently; validate now asks for the task file."""
    from engine.config import ConfigError, load_config
    from recipes import evaluate

    for d in ("transformer", "vae", "text_encoder", "tokenizer"):
        (tmp_path / "pipe" / d).mkdir(parents=True)
    argv = ["--run.out_dir", str(tmp_path / "runs"), "--model.flavour", "1.3B", "--model.pretrained",
            str(tmp_path / "pipe"), "--eval.num_items", "2"]  # fmt: skip
    cfg = load_config(argv=argv)
    assert all("scene" in it.meta for it in evaluate.eval_items(cfg))  # what it would have evaluated
    with pytest.raises(ConfigError, match="eval.tasks is empty: .*toy world's held-out scenes"):
        evaluate.validate(cfg)
    evaluate.validate(load_config(argv=[*argv, "--eval.tasks", str(_one_task_file(tmp_path))]))


def test_task_files_with_a_byte_order_mark_or_a_bad_last_row(tmp_path):
    """A task file saved with a byte-order mark (Windows editors, spreadsheet exports) had its first row
    read as a torn write ("has no rows" for one row); a hand-written file whose last row had a typo lost that
    row with only a warning (evaluate scored one item less). A BOM is now skipped (as json.loads of the
    utf-8-sig text), a bad last row that ends with its newline is an error, and a torn write (no newline at
    the end) is still dropped."""
    from recipes.common import load_items, read_jsonl

    tasks = _one_task_file(tmp_path)
    row = tasks.read_text()
    tasks.write_bytes(b"\xef\xbb\xbf" + row.encode())
    assert [it.id for it in load_items(tasks)] == [json.loads(row)["id"]]
    bad = row.replace('"id": "a"', '"id": "b"').replace("}", ",}")
    tasks.write_text(row + bad)
    with pytest.raises(ValueError, match="tasks.jsonl:2: not valid JSON"):
        read_jsonl(tasks)
    tasks.write_text(row + bad[:20])  # a run killed mid-write
    assert read_jsonl(tasks) == [json.loads(row)]


def test_a_demonstrator_folder_without_its_weights_is_refused_up_front(tmp_path):
    """world.demonstrator (evaluate, demonstrate, distill, rl) or pretrain's warm-start model.pretrained
    naming a folder with demonstrator.json but not the weight files passed validate, then failed with a
    FileNotFoundError traceback when loaded; validate now names the missing files."""
    import shutil

    from engine.config import ConfigError, load_config
    from recipes import evaluate, pretrain
    from recipes.common import TOY_ASSETS

    folder = tmp_path / "dm"
    folder.mkdir()
    shutil.copy(TOY_ASSETS / "demonstrator.json", folder)
    with pytest.raises(FileNotFoundError):  # what loading it does
        pretrain.load_demonstrator(folder)
    base = ["--run.out_dir", str(tmp_path / "runs")]
    for recipe, key in ((evaluate, "world.demonstrator"), (pretrain, "model.pretrained")):
        with pytest.raises(ConfigError, match=f"{key}: .*dm' lacks \\['demonstrator.safetensors'"):
            recipe.validate(load_config(argv=[*base, f"--{key}", str(folder)]))
    for f in ("demonstrator.safetensors", "text_encoder.safetensors"):
        shutil.copy(TOY_ASSETS / f, folder)
    evaluate.validate(load_config(argv=[*base, "--world.demonstrator", str(folder)]))


@pytest.mark.parametrize("key, value", [("rl.clip_range", "-0.1"), ("rl.beta_d", "-1"), ("rl.adv_eps", "0")])
def test_rl_loss_settings_that_fail_or_give_nan_are_refused_up_front(tmp_path, key, value):
    """rl.clip_range <= 0 and rl.beta_d < 0 are refused by the losses themselves, at the first update after the
    models loaded and a group was rolled out and judged; rl.adv_eps 0 makes the advantages of a group whose
    rewards are equal (common with a pass/fail judge) 0 / 0 = NaN. validate now names each key."""
    from engine.config import ConfigError, load_config
    from engine.losses import demonstrator_anchor_loss, group_advantages, grpo_policy_loss
    from recipes import rl

    argv = ["--run.out_dir", str(tmp_path / "runs"), "--distill.tasks", str(_one_task_file(tmp_path)),
            "--flow.num_steps", "3", "--rl.train_timesteps", "1", f"--{key}", value]  # fmt: skip
    cfg = load_config(argv=argv)
    r, z = cfg.rl, torch.zeros(2)
    if key == "rl.adv_eps":
        assert group_advantages(torch.ones(2), 2, r.adv_eps).isnan().all()
    else:
        with pytest.raises(ValueError):
            grpo_policy_loss(z, z, z, r.clip_range)
            demonstrator_anchor_loss(z, z, r.beta_d)
    with pytest.raises(ConfigError, match=f"{key} = "):
        rl.validate(cfg)


@pytest.mark.parametrize("key, value", [("judge.num_frames", "0"), ("judge.timeout_s", "0"),
                                        ("judge.max_retries", "-1")])  # fmt: skip
def test_openai_judge_settings_it_refuses_are_refused_up_front(tmp_path, key, value):
    """An openai judge with judge.num_frames 0, timeout_s 0 or max_retries -1 failed when built: rl after
    encoding the prompts and loading both models, evaluate and demonstrate after building the kit; validate
    now names the key, for the values the judge itself refuses."""
    from engine.config import ConfigError, load_config
    from engine.judge import OpenAIJudge
    from recipes import evaluate, rl

    cfg = load_config(argv=["--run.out_dir", str(tmp_path / "runs"), "--distill.tasks", str(_one_task_file(tmp_path)),
                            "--flow.num_steps", "3", "--rl.train_timesteps", "1", "--judge.backend", "openai",
                            "--judge.model", "m", "--judge.base_url", "http://127.0.0.1:9/v1", f"--{key}", value])  # fmt: skip
    j = cfg.judge
    with pytest.raises(ValueError):  # the judge's own refusal
        OpenAIJudge(
            j.base_url, j.model, timeout_s=j.timeout_s, max_retries=j.max_retries, num_frames=j.num_frames
        )
    for recipe in (rl, evaluate):
        with pytest.raises(ConfigError, match=f"{key} = {value}"):
            recipe.validate(cfg)


def test_an_unknown_model_family_is_refused_up_front(tmp_path):
    """model.family 'wan2' (a typo) with a pipeline folder passed validate and failed with a traceback when
    the encoders were built; validate now names the key and the families there are."""
    from engine.config import ConfigError, load_config
    from models.encoders import ENCODER_FAMILIES
    from recipes import rl

    assert "wan2" not in ENCODER_FAMILIES
    for d in ("transformer", "vae", "text_encoder", "tokenizer"):
        (tmp_path / "pipe" / d).mkdir(parents=True)
    argv = ["--run.out_dir", str(tmp_path / "runs"), "--distill.tasks", str(_one_task_file(tmp_path)),
            "--flow.num_steps", "3", "--rl.train_timesteps", "1", "--model.family", "wan2", "--model.flavour",
            "1.3B", "--model.pretrained", str(tmp_path / "pipe")]  # fmt: skip
    with pytest.raises(ConfigError, match="model.family: model family 'wan2': expected one of"):
        rl.validate(load_config(argv=argv))


def test_step_generator_takes_a_large_run_seed(tmp_path):
    """rl and distill with run.seed 2**31 - 1 (or a timestamp) failed at their first step with torch's
    "Overflow when unpacking long long" (the derived seed passed 2**64); such seeds now work, and a seed
    that worked draws what it drew before (torch seeded with the same formula)."""
    from engine.config import load_config
    from recipes.common import step_generator

    def draw(seed, step):
        cfg = load_config(
            argv=["--run.out_dir", str(tmp_path), "--run.seed", str(seed), "--run.device", "cpu"]
        )
        return torch.rand(4, generator=step_generator(cfg, step, salt=1))

    for seed in (0, 7, -3):
        want = torch.Generator().manual_seed(((seed * 1_000_003 + 5) * 4099) * 31 + 1)
        assert torch.equal(draw(seed, 5), torch.rand(4, generator=want))
    for seed in (2**31 - 1, 1_732_700_000):
        assert not torch.equal(draw(seed, 0), draw(seed, 1))


def test_a_task_or_manifest_image_that_is_not_an_image_is_refused_up_front(tmp_path):
    """A task row (or a propose manifest row) naming a file that is not an image (a video, a text file) passed
    validate and failed with PIL's UnidentifiedImageError once the models were loaded; validate now opens each
    image's header (what load_image does) and names the row."""
    from engine.config import ConfigError, load_config
    from recipes import propose, rl
    from recipes.common import load_image

    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not an image")
    with pytest.raises(OSError):  # what loading it does
        load_image(str(tmp_path / "clip.mp4"))
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"id": "a", "image": "clip.mp4", "task": "t", "solution": "s"}\n')
    argv = ["--run.out_dir", str(tmp_path / "runs"), "--distill.tasks", str(tasks), "--flow.num_steps", "3",
            "--rl.train_timesteps", "1"]  # fmt: skip
    with pytest.raises(ConfigError, match="distill.tasks: .* row 'a': .*clip.mp4' is not a readable image"):
        rl.validate(load_config(argv=argv))
    (tmp_path / "m.jsonl").write_text('{"image": "clip.mp4"}\n')
    with pytest.raises(
        ConfigError, match="data.manifest: .* image 'clip': .*clip.mp4' is not a readable image"
    ):
        propose.validate(load_config(argv=[*argv[:2], "--data.manifest", str(tmp_path / "m.jsonl")]))
    rl.validate(load_config(argv=[*argv[:2], *argv[4:], "--distill.tasks", str(_one_task_file(tmp_path))]))


@pytest.mark.parametrize("shift", ["0", "-2"])
def test_a_flow_shift_the_sampler_refuses_is_refused_up_front(tmp_path, shift):
    """flow.shift 0 passed validate and failed in the sampler's first call (after the models were loaded);
    check_run now refuses what engine.flow refuses, for every recipe that calls it."""
    from engine import flow
    from engine.config import ConfigError, load_config
    from recipes import evaluate, pretrain

    with pytest.raises(ValueError):
        flow.timestep_schedule(4, float(shift))
    for recipe in (evaluate, pretrain):
        with pytest.raises(ConfigError, match=f"flow.shift = {float(shift)}: expected > 0"):
            recipe.validate(
                load_config(argv=["--run.out_dir", str(tmp_path / "runs"), "--flow.shift", shift])
            )


def test_demonstrate_drops_the_rows_of_tasks_no_longer_in_the_task_file(tmp_path):
    """A task file that lost rows (or a smaller distill.demos_per_task): the resumed demonstrate kept their
    demonstrations in the index ("4 of 4 solve their task" for 2 tasks) and off-policy distill then failed on
    them ("demonstrations for items not in the task file") after loading the models. The index now holds
    exactly the current tasks x demos_per_task, as a fresh run writes it."""
    from engine.config import load_config
    from engine.world.oracle import OracleProposer
    from recipes import demonstrate, propose
    from recipes.common import load_items, read_jsonl

    tasks = tmp_path / "tasks.jsonl"
    propose.propose(OracleProposer(), propose.toy_scene_images(0, 2, tmp_path / "images"), tasks, 2)
    rows = tasks.read_text().splitlines()
    base = ["--run.out_dir", str(tmp_path / "runs"), "--distill.tasks", str(tasks), "--flow.num_steps", "2",
            "--eval.batch_size", "8", "--eval.write_videos", "0", "--run.device", "cpu"]  # fmt: skip
    demonstrate.run(load_config(argv=[*base, "--distill.demos_per_task", "2"]))
    tasks.write_text("\n".join(rows[:2]) + "\n")
    out = demonstrate.run(load_config(argv=[*base, "--distill.demos_per_task", "1"]))
    ids = sorted(r["id"] for r in read_jsonl(out / "index.jsonl"))
    assert ids == sorted(f"{it.id}#0" for it in load_items(tasks))
    latents, item_ids, kept, total = demonstrate.read_demos(out, None)
    assert total == 2 and len(latents) == 2 and set(item_ids) <= {it.id for it in load_items(tasks)}


def test_propose_into_a_task_file_it_did_not_write_is_refused(tmp_path):
    """propose --distill.tasks naming a hand-written task file (rows without propose's meta) failed with
    KeyError: 'meta' (resume reads meta.image_id); validate now says it is not a task file propose wrote."""
    from engine.config import ConfigError, load_config
    from recipes import propose

    tasks = _one_task_file(tmp_path)
    argv = ["--run.out_dir", str(tmp_path / "runs"), "--distill.tasks", str(tasks), "--world.num_scenes", "2"]
    with pytest.raises(ConfigError, match="distill.tasks: .*tasks.jsonl: row 1 has no meta.image_id"):
        propose.validate(load_config(argv=argv))


@pytest.mark.filterwarnings("ignore:Mean of empty slice")  # the toy oracle cannot read these videos: NaN
def test_task_images_of_several_sizes_are_encoded_and_evaluated(tmp_path):
    """A real model's task file of images of several sizes (a real manifest) failed in Kit.encode_items
    (distill, rl, demonstrate) and in the evaluation sampler with numpy's "all input arrays must have the same
    shape", after the models were loaded. Each image is now encoded alone when the sizes differ (the rows
    equal those of task files with only same-sized images), and evaluate fits them to data.height x width."""
    import numpy as np
    from PIL import Image

    from engine.config import load_config
    from recipes import evaluate
    from recipes.common import build_kit, load_items
    from tests.test_meta_init import _wan_pipeline_folder

    _wan_pipeline_folder(tmp_path / "pipe")
    rng = np.random.default_rng(0)
    rows = []
    for i, size in enumerate([(16, 16), (24, 20), (16, 16)]):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(
            json.dumps({"id": f"s{i}", "image": f"{i}.png", "task": "move it", "solution": "slide it"})
        )
    for name, keep in (("mixed", [0, 1, 2]), ("same", [0, 2]), ("one", [1])):
        (tmp_path / f"{name}.jsonl").write_text("".join(rows[i] + "\n" for i in keep))
    argv = ["--model.family", "wan", "--model.flavour", "debug", "--model.pretrained", str(tmp_path / "pipe"),
            "--run.device", "cpu", "--run.out_dir", str(tmp_path), "--data.num_frames", "5", "--data.height", "16",
            "--data.width", "16", "--flow.num_steps", "2", "--eval.num_items", "3", "--eval.batch_size", "3",
            "--eval.write_videos", "0", "--eval.tasks", str(tmp_path / "mixed.jsonl")]  # fmt: skip
    cfg = load_config(argv=argv)
    kit = build_kit(cfg)
    table = {
        n: kit.encode_items(load_items(tmp_path / f"{n}.jsonl")).image["image_latent"]
        for n in ("mixed", "same", "one")
    }
    torch.testing.assert_close(table["mixed"][[0, 2]], table["same"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(table["mixed"][[1]], table["one"], rtol=1e-4, atol=1e-5)
    evaluate.validate(cfg)
    res = evaluate.run(cfg)
    assert res["n_items"] == 3


def test_distill_refuses_zero_steps_and_its_off_policy_check_creates_no_run_folder(tmp_path):
    """distill with train.steps 0 returned <run>/model.safetensors, never written; and its off-policy check
    of <run>/demos created the run folder before refusing it."""
    from engine.config import ConfigError, load_config
    from recipes import distill

    base = ["--run.out_dir", str(tmp_path / "runs"), "--distill.tasks", str(_one_task_file(tmp_path))]
    with pytest.raises(ConfigError, match="train.steps = 0: expected >= 1"):
        distill.validate(load_config(argv=[*base, "--train.steps", "0"]))
    with pytest.raises(ConfigError, match="distill.demos: .* holds no demonstrations"):
        distill.validate(load_config(argv=[*base, "--distill.mode", "off_policy"]))
    assert not (tmp_path / "runs").exists()
    distill.validate(load_config(argv=base))


def test_pipeline_refuses_a_bad_manifest_row_and_a_real_model_without_eval_tasks(tmp_path):
    """The pipeline checked only that data.manifest existed (a missing image failed with a traceback in the
    propose stage), and with a model other than the toy it ran its gap check and evaluation on the toy
    world's 64 x 64 scenes; standalone evaluate refused the latter, the pipeline now refuses both."""
    from engine.config import ConfigError, load_config
    from recipes import pipeline
    from recipes.common import TOY_CONFIG

    base = ["--config", str(TOY_CONFIG), "--run.out_dir", str(tmp_path / "runs")]
    m = tmp_path / "m.jsonl"
    m.write_text('{"id": "a", "image": "missing.png"}\n')
    with pytest.raises(ConfigError, match="data.manifest: .* image 'a'"):
        pipeline.validate(load_config(argv=[*base, "--data.manifest", str(m)]))
    for d in ("transformer", "vae", "text_encoder", "tokenizer"):
        (tmp_path / "pipe" / d).mkdir(parents=True)
    real = [*base, "--model.flavour", "1.3B", "--model.pretrained", str(tmp_path / "pipe")]
    with pytest.raises(ConfigError, match="eval.tasks is empty: .* not images for model 'wan' / '1.3B'"):
        pipeline.validate(load_config(argv=real))
    pipeline.validate(load_config(argv=base))
    assert not (tmp_path / "runs").exists()


def test_a_task_file_with_an_id_of_zero_loads(tmp_path):
    """An integer id 0 is an id: the check for missing fields called it missing ("row 1 lacks ['id']")."""
    from recipes.common import load_items

    rows = [{"id": 0, "image": "x.png", "task": "push", "solution": "push left"},
            {"id": 1, "image": "x.png", "task": "lift", "solution": "lift up"}]  # fmt: skip
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_items(path)
    assert [(it.id, it.task, it.solution) for it in items] == [
        (r["id"], r["task"], r["solution"]) for r in rows
    ]
    assert all(it.image == str(tmp_path / "x.png") for it in items)
    for bad in (
        {**rows[0], "id": ""},
        {**rows[0], "id": None},
        {k: v for k, v in rows[0].items() if k != "id"},
    ):
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=r"row 1 lacks \['id'\]"):
            load_items(path)


def test_evaluate_scores_again_when_a_local_judge_is_retrained_in_its_folder(tmp_path):
    """A transformers judge was fingerprinted by its folder's path: a judge retrained into the same folder
    (same names and shapes, other values) reused the old judge's scores. Its weights are fingerprinted now."""
    import numpy as np
    from safetensors.torch import save_file

    from engine.config import load_config
    from engine.evaluation import EvalItem
    from recipes.evaluate import fingerprint

    folder = tmp_path / "judge"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    cfg = load_config(argv=["--judge.backend", "transformers", "--judge.model", str(folder)])
    items = [EvalItem(np.zeros((8, 8, 3), np.uint8), "put red left", "slide red one cell left", {"id": "a"})]
    g = torch.Generator().manual_seed(0)
    weights = {
        "lm_head.weight": torch.randn(64, 32, generator=g),
        "embed.weight": torch.randn(4000, 8, generator=g),
    }
    save_file(weights, folder / "model.safetensors")
    fp = fingerprint(cfg, items, "", "task")
    save_file(
        {k: v.clone() for k, v in weights.items()}, folder / "model.safetensors"
    )  # rewritten, same values
    assert fingerprint(cfg, items, "", "task") == fp
    for name in weights:  # one tensor retrained (a partial fine-tune), at its start or its end
        for where in (0, -1):
            changed = {k: v.clone() for k, v in weights.items()}
            changed[name].view(-1)[where] += 1.0
            save_file(changed, folder / "model.safetensors")
            assert fingerprint(cfg, items, "", "task") != fp, (name, where)


def test_rl_judge_wait_frac_counts_the_update_in_the_step_time(tmp_path):
    """judge_wait_frac is the judge wait / step time: it divided by the time spent preparing the batch
    (rollout, targets, wait) and left out the trainer's update between two batches (3 s here, a sleep), so
    it overstated the judge's share. A real loopback judge answers in 2.5 s so that there is a wait."""
    import numpy as np

    from engine.config import load_config
    from recipes.common import build_judge, build_kit, load_items, prepare_teacher, save_image
    from recipes.rl import GroupBatches
    from tests.judge_servers import FaultServer

    rows = []
    for i in range(8):  # other images: the second step's videos are not the first's (the judge caches)
        save_image(np.full((32, 32, 3), 20 * i, np.uint8), tmp_path / f"{i}.png")
        rows.append({"id": str(i), "image": f"{i}.png", "task": "push the red block left fault=slow",
                     "solution": "the agent pushes the red block left"})  # fmt: skip
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with FaultServer(slow_s=2.5) as srv:
        cfg = load_config(argv=["--run.out_dir", str(tmp_path), "--flow.num_steps", "3", "--rl.group_size", "2",
                                "--rl.train_timesteps", "1", "--rl.prefetch", "false", "--rl.reward_questions",
                                '["task"]', "--judge.backend", "openai", "--judge.base_url", srv.url,
                                "--judge.model", "m", "--train.steps", "4"])  # fmt: skip
        kit = build_kit(cfg)
        table = kit.encode_items(load_items(tmp_path / "tasks.jsonl"))
        model, teacher = kit.load_denoiser(""), prepare_teacher(kit.load_denoiser(""), cfg)
        with build_judge(cfg) as judge:
            batches = GroupBatches(cfg, kit, table, teacher, judge)
            batches.next(0, model)
            t0 = time.perf_counter()
            time.sleep(3.0)  # the trainer's update of step 0
            logs = batches.next(1, model)[0]["logs"]
            step_time = time.perf_counter() - t0
    assert logs["judge_wait_s"] > 0.2, logs
    assert logs["judge_wait_frac"] == pytest.approx(logs["judge_wait_s"] / step_time, rel=0.02)
