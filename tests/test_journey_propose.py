"""recipes/propose.py as a user meets it: a proposer endpoint that is down, or a VLM whose every answer
fails validation, is told apart in the run's warning (over real loopback servers)."""

import logging

import numpy as np

from engine.propose import OpenAIProposer
from recipes.common import save_image
from recipes.propose import propose
from tests.judge_servers import FaultServer, free_port


def _images(tmp_path, n):
    out = []
    for i in range(n):
        path = tmp_path / f"im{i}.png"
        save_image(np.full((16, 16, 3), 20 * (i + 1), dtype=np.uint8), path)
        out.append((path.stem, path))
    return out


def _warnings(fn):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("wmsd.propose")
    logger.addHandler(handler)
    try:
        fn()
    finally:
        logger.removeHandler(handler)
    return [r.getMessage() for r in records if r.levelno == logging.WARNING]


def test_propose_says_why_no_image_got_a_pair(tmp_path):
    images = _images(tmp_path, 2)
    dead = OpenAIProposer(
        f"http://127.0.0.1:{free_port()}/v1", "m", timeout_s=5, max_retries=0, max_attempts=1
    )
    msgs = _warnings(lambda: propose(dead, images, tmp_path / "dead.jsonl", 2))
    assert any("2 of 2 images" in m and "failed (no answer) 2" in m for m in msgs), msgs
    with FaultServer() as srv:  # answers, but its 15-word solutions fail the default 40-90 word bound
        strict = OpenAIProposer(srv.url, "m", timeout_s=10, max_attempts=1)
        msgs = _warnings(lambda: propose(strict, images, tmp_path / "strict.jsonl", 2))
    assert any("failed (no answer) 0" in m and "solution_length" in m for m in msgs), msgs


def test_zero_sizes_are_refused_not_an_empty_task_file(tmp_path):
    """propose with distill.pairs_per_image 0 or world.num_scenes 0 wrote an empty task file and exited 0 (0
    pairs read as "no valid pair" for every image); demonstrate with distill.demos_per_task 0 made nothing,
    then failed with a traceback about a missing "task file". Each is now a one-line error."""
    import subprocess
    import sys
    from pathlib import Path

    from engine.config import load_config
    from recipes import propose as propose_recipe

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    base = ["--run.out_dir", str(tmp_path), "--run.device", "cpu", "--world.num_scenes", "2"]
    for recipe, key in (("propose", "distill.pairs_per_image"), ("propose", "world.num_scenes")):
        cmd = [sys.executable, str(recipes / f"{recipe}.py"), *base, "--run.name", "z", f"--{key}", "0"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and f"'{key}': expected >= 1" in r.stderr, r.stderr[-2000:]
        assert not (tmp_path / "z" / "tasks.jsonl").exists()
    propose_recipe.run(load_config(argv=[*base, "--run.name", "d", "--distill.pairs_per_image", "1"]))
    cmd = [
        sys.executable,
        str(recipes / "demonstrate.py"),
        *base,
        "--run.name",
        "d",
        "--distill.demos_per_task",
        "0",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "'distill.demos_per_task': expected >= 1" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_resume_after_a_kill_mid_image_save_equals_the_full_run(tmp_path):
    """A run killed while rendering the toy scenes leaves an empty PNG (open() made it, PIL's buffered bytes never
    reached it; seen with SIGKILL in a real subprocess) or a cut one: every resume failed to read it. The rerun now
    writes it again and its task file equals an uninterrupted run's."""
    import shutil

    from engine.config import load_config
    from engine.world.scene import SEED_TAG_PROPOSE, random_scene, render_one
    from recipes import propose as propose_recipe
    from recipes.common import load_image

    base = ["--run.out_dir", str(tmp_path), "--run.device", "cpu", "--world.num_scenes", "6"]
    propose_recipe.run(load_config(argv=[*base, "--run.name", "full"]))
    full = tmp_path / "full"
    shutil.copytree(full / "images", tmp_path / "killed" / "images")
    pngs = sorted((tmp_path / "killed" / "images").glob("*.png"))
    pngs[4].write_bytes(b"")  # what the kill left
    pngs[5].write_bytes(pngs[5].read_bytes()[:40])
    propose_recipe.run(load_config(argv=[*base, "--run.name", "killed"]))
    assert (tmp_path / "killed" / "tasks.jsonl").read_bytes() == (full / "tasks.jsonl").read_bytes()
    rng = np.random.default_rng([SEED_TAG_PROPOSE, 1234])
    for path in pngs:  # the renderer's images, and no temporary file left beside them
        assert np.array_equal(load_image(str(path)), render_one(random_scene(rng), None)[0])
    assert sorted(p.name for p in (tmp_path / "killed" / "images").iterdir()) == [p.name for p in pngs]


def test_manifest_rows_with_a_null_or_empty_id_are_keyed_by_their_file(tmp_path):
    """A manifest row with "id": null (a blank cell exported from a table) got the image id "None" ("" for an
    empty one): two such rows were refused as one id, and one wrote rows "None-p0". Such a row is keyed by its
    file name, as a row without an id is; an id of 0 is still an id."""
    import json

    from recipes.propose import manifest_images

    images = _images(tmp_path, 4)
    ids = [None, "", None, 0]
    rows = [{"image": p.name, "id": i} for (_, p), i in zip(images, ids)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = manifest_images(str(tmp_path / "m.jsonl"), "")
    assert got == [("im0", images[0][1]), ("im1", images[1][1]), ("im2", images[2][1]), ("0", images[3][1])]
