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
