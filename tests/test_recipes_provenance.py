"""What a recipe records about where its results come from."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_pretrain_records_this_repositorys_commit_from_any_working_directory(tmp_path):
    """recipes/pretrain.py wrote `git rev-parse HEAD` of the working directory into demonstrator.json: started
    from inside another git repository (a run folder kept under version control, say), the export named that
    repository's commit as the code that trained it. It now asks this repository, wherever the run starts."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(other)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    theirs = subprocess.check_output([*git, "rev-parse", "HEAD"], text=True).strip()
    ours = subprocess.check_output(["git", "-C", str(REPO), "rev-parse", "HEAD"], text=True).strip()
    assert ours != theirs
    code = "from recipes.pretrain import _git_commit; print(_git_commit())"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    got = subprocess.check_output([sys.executable, "-c", code], text=True, cwd=other, env=env).strip()
    assert got == ours


def test_pretrain_records_a_command_that_runs_again(tmp_path):
    """demonstrator.json's "command" joined the arguments with spaces: a value with a space in it (the TOML list
    "--world.gap_guidance '[1.0, 3.0]'", as docs/TOYWORLD.md's command has it) came out unquoted, and the command
    it recorded split it into two arguments. It is now quoted as a shell would need it: split again, the
    arguments give the run's own config."""
    import json
    import shlex

    from engine.config import load_config

    args = ["--config", str(REPO / "recipes" / "configs" / "toy_pretrain.toml"), "--run.out_dir", str(tmp_path),
            "--run.name", "p", "--train.steps", "0", "--world.eval_scenes", "1", "--world.gap_batch", "1",
            "--flow.num_steps", "1", "--run.device", "cpu", "--world.gap_guidance", "[1.0, 3.0]"]  # fmt: skip
    env = {**os.environ, "WMSD_PROGRESS": "0"}
    p = subprocess.run([sys.executable, str(REPO / "recipes" / "pretrain.py"), *args], capture_output=True,
                       text=True, timeout=600, env=env, cwd=REPO)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    command = json.loads((tmp_path / "p" / "demonstrator" / "demonstrator.json").read_text())["command"]
    words = shlex.split(command)
    assert words[:2] == ["python", "recipes/pretrain.py"] and words[2:] == args
    assert load_config(argv=words[2:]).world.gap_guidance == [1.0, 3.0]


def test_pretrain_records_the_device_the_run_used(tmp_path, monkeypatch):
    """demonstrator.json's "device" was the first GPU's name whenever CUDA was available, even for a run on
    run.device = cpu. Here CUDA reads as available (a GPU machine) and the run asks for the CPU: the record
    says cpu."""
    import json

    import torch

    from recipes import pretrain

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    argv = ["--run.out_dir", str(tmp_path), "--run.name", "p", "--run.device", "cpu", "--model.flavour", "debug",
            "--train.steps", "0", "--world.eval_scenes", "1", "--world.gap_batch", "1", "--flow.num_steps", "1"]  # fmt: skip
    out = pretrain.main(argv)
    assert json.loads((out / "demonstrator.json").read_text())["device"] == "cpu"
