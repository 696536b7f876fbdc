"""recipes/pipeline.py's training stages (`trained`) rerun by a user: what stops a stage and what does not."""

import json

import pytest

from engine.config import load_config

TINY = ["--world.num_scenes", "2", "--distill.pairs_per_image", "1", "--train.batch_size", "1",
        "--flow.num_steps", "3", "--distill.steps_per_rollout", "1", "--train.steps", "1",
        "--run.device", "cpu", "--rl.group_size", "2", "--rl.train_timesteps", "1"]  # fmt: skip


def _cfg(tmp_path, *extra):
    return load_config(argv=["--run.out_dir", str(tmp_path), "--run.name", "p", *TINY, *extra])


def test_rl_and_judge_settings_do_not_stop_the_distillation_stages(tmp_path):
    """The distillation stages' fingerprints held every section, so a rerun changing only RL settings (rl.steps,
    judge.fallback_score, which distill never reads) stopped at 'onpolicy' ("trained with other settings"): RL
    could not be rerun without training the Executor again. Such a rerun now reuses the stage; a change that
    distillation reads still stops it."""
    from recipes import distill, propose
    from recipes.pipeline import stage, trained

    cfg = _cfg(tmp_path)
    out = tmp_path / "p"
    propose.run(stage(cfg, out, "propose"))
    tasks = out / "tasks.jsonl"
    first = trained(cfg, out, "onpolicy", distill.run, [tasks], distill={"mode": "on_policy"})
    assert first.is_file()
    before = first.stat().st_mtime_ns
    rl_only = _cfg(tmp_path, "--rl.steps", "7", "--rl.beta_d", "0.5", "--judge.fallback_score", "0.5")
    again = trained(rl_only, out, "onpolicy", distill.run, [tasks], distill={"mode": "on_policy"})
    assert again == first and first.stat().st_mtime_ns == before  # reused, not trained again
    record = json.loads((out / "onpolicy" / "stage.json").read_text())
    assert "train.steps" in record["config"]
    with pytest.raises(SystemExit, match=r"STOP: stage 'onpolicy'.*train\.lr"):
        trained(_cfg(tmp_path, "--train.lr", "1e-3"), out, "onpolicy", distill.run, [tasks],
                distill={"mode": "on_policy"})  # fmt: skip


@pytest.mark.parametrize("args, key", [(["--distill.mode", "off_policy"], "distill.mode"),
                                       (["--eval.baselines", "false"], "eval.baselines")])  # fmt: skip
def test_settings_the_pipeline_makes_for_its_stages_are_refused(tmp_path, args, key):
    """distill.mode and eval.baselines were accepted and silently ignored: every stage sets its own mode (on-policy,
    then SFT and filtered SFT) and both baselines (the gap check compares them). They are now one-line errors,
    exit status 2, before anything is proposed or sampled."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(repo / "recipes" / "pipeline.py"), "--run.out_dir", str(tmp_path), "--run.name", "p",
           *TINY, *args]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=repo)
    assert p.returncode == 2 and f"error: {key}: the pipeline sets it" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())
