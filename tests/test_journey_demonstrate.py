"""recipes/demonstrate.py as a user meets it: a judge endpoint down during the run, then back up."""

from engine.config import load_config
from tests.judge_servers import FaultServer, free_port


def test_demonstrations_the_judge_did_not_score_are_made_again(tmp_path):
    """With the judge down, every demonstration's scores are null. A rerun with it back up said "0 new
    demonstrations; 0 of N solve their task" and kept the nulls for good (filtered SFT then trained on
    nothing); it now makes and judges them again."""
    from recipes import demonstrate, propose
    from recipes.common import read_jsonl

    port = free_port()
    base = ["--run.out_dir", str(tmp_path), "--run.name", "d", "--world.num_scenes", "3", "--distill.pairs_per_image",
            "1", "--flow.num_steps", "2", "--eval.batch_size", "2", "--eval.write_videos", "0", "--run.device", "cpu"]  # fmt: skip
    propose.run(load_config(argv=base))
    cfg = load_config(argv=base + ["--judge.backend", "openai", "--judge.model", "m", "--judge.max_retries", "0",
                                   "--judge.timeout_s", "5", "--judge.base_url", f"http://127.0.0.1:{port}/v1"])  # fmt: skip
    out = demonstrate.run(cfg)
    rows = read_jsonl(out / "index.jsonl")
    assert rows and all(v is None for r in rows for v in r["scores"].values())
    with FaultServer(port=port) as srv:
        demonstrate.run(cfg)
        assert srv.requests == 3 * len(rows)  # every demonstration judged again on its three questions
    again = read_jsonl(out / "index.jsonl")
    assert sorted(r["id"] for r in again) == sorted(r["id"] for r in rows)
    assert all(isinstance(v, float) for r in again for v in r["scores"].values())


def test_a_missing_file_is_named_for_what_it_is(tmp_path):
    """Every missing JSONL file was reported as a "task file ... (run recipes/propose.py first?)", a missing
    demonstrations index too; each is now named for what it is and the recipe that writes it."""
    import pytest

    from recipes.common import load_items
    from recipes.demonstrate import read_demos

    with pytest.raises(FileNotFoundError) as e:
        read_demos(tmp_path, 0.5)
    assert str(e.value) == (
        f"demonstrations index '{tmp_path / 'index.jsonl'}' does not exist (run recipes/demonstrate.py first?)"
    )
    with pytest.raises(FileNotFoundError, match=r"task file .* \(run recipes/propose.py first\?\)"):
        load_items(tmp_path / "tasks.jsonl")


def test_a_run_that_dies_writing_videos_makes_them_on_the_rerun(tmp_path):
    """A demonstration's index row was appended before its mp4 and contact sheet were written: a run that died
    in between (here: a folder in the way of one contact sheet, a real failing process) left rows that the
    rerun skipped as done, so those videos were never written. The rows now follow the videos: the rerun makes
    that chunk again, and every video equals the uninterrupted run's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from recipes import propose
    from recipes.common import read_jsonl

    repo = Path(__file__).resolve().parents[1]
    base = ["--run.out_dir", str(tmp_path), "--world.num_scenes", "2", "--distill.pairs_per_image", "1",
            "--flow.num_steps", "2", "--eval.batch_size", "1", "--eval.write_videos", "2", "--run.device", "cpu",
            "--distill.tasks", str(tmp_path / "tasks.jsonl")]  # fmt: skip
    propose.run(load_config(argv=[*base, "--run.name", "p"]))

    def run(name):
        cmd = [sys.executable, str(repo / "recipes" / "demonstrate.py"), *base, "--run.name", name]
        env = {**os.environ, "WMSD_PROGRESS": "0"}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=repo)

    assert run("full").returncode == 0
    blocker = tmp_path / "cut" / "demos" / "videos" / "demo0001.png"
    blocker.mkdir(parents=True)
    assert run("cut").returncode != 0  # died writing the second chunk's contact sheet
    blocker.rmdir()
    r = run("cut")
    assert r.returncode == 0, r.stderr[-2000:]
    full, cut = tmp_path / "full" / "demos", tmp_path / "cut" / "demos"
    assert sorted(x["id"] for x in read_jsonl(cut / "index.jsonl")) == sorted(
        x["id"] for x in read_jsonl(full / "index.jsonl")
    )
    for k in range(2):
        for ext in ("mp4", "png"):
            assert (cut / "videos" / f"demo{k:04d}.{ext}").is_file(), f"demo{k:04d}.{ext}"
        a, b = (np.asarray(Image.open(d / "videos" / f"demo{k:04d}.png")) for d in (full, cut))
        assert np.array_equal(a, b)
