"""recipes/evaluate.py as a user meets it: progress inside a condition on long work."""

import numpy as np

from engine.config import load_config


def test_evaluation_shows_progress_within_a_condition(tmp_path, monkeypatch, capsys):
    """The only bar was over conditions: it stood still for a condition's whole sampling and judging (hours at
    real sizes). score_chunks now shows one over the condition's chunks; the scores are unchanged."""
    from engine.world.oracle import OracleJudge
    from recipes.common import build_kit, load_for_sampling
    from recipes.evaluate import chunk_ranges, eval_items, pipeline_for, score_chunks

    cfg = load_config(argv=["--run.out_dir", str(tmp_path), "--eval.num_items", "5", "--eval.batch_size", "2",
                            "--flow.num_steps", "2", "--run.device", "cpu"])  # fmt: skip
    kit = build_kit(cfg)
    pipe = pipeline_for(kit, load_for_sampling(kit, cfg, ""), cfg)
    items, chunks = eval_items(cfg), chunk_ranges(5, 2)
    monkeypatch.setenv("WMSD_PROGRESS", "1")
    shown = score_chunks(pipe, OracleJudge(), items, cfg, "solution", chunks, tmp_path / "cond", "fp")
    err = capsys.readouterr().err
    assert "cond: chunks" in err and "0/3" in err, err
    monkeypatch.setenv("WMSD_PROGRESS", "0")
    quiet = score_chunks(pipe, OracleJudge(), items, cfg, "solution", chunks, tmp_path / "again", "fp")
    for start in shown:
        for q in shown[start]:
            np.testing.assert_array_equal(shown[start][q], quiet[start][q])


def test_bad_eval_settings_are_one_line_errors(tmp_path):
    """eval.seeds [], eval.ci 1.5 and eval.num_items 0 failed with tracebacks (seeds only after loading the
    model), and eval.write_videos -1 wrote the videos of all items but the last; each is now refused."""
    import subprocess
    import sys
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "evaluate.py"
    base = [
        sys.executable,
        str(recipe),
        "--run.out_dir",
        str(tmp_path),
        "--eval.num_items",
        "2",
        "--run.device",
        "cpu",
    ]
    for key, value in (("seeds", "[]"), ("ci", "1.5"), ("num_items", "0"), ("write_videos", "-1")):
        r = subprocess.run(base + [f"--eval.{key}", value], capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and f"error: eval.{key}" in r.stderr and "Traceback" not in r.stderr, (
            r.stderr[-2000:]
        )
    assert not (tmp_path / "wmsd" / "eval" / "videos").exists()


def test_judge_concurrency_settings_bound_the_connections(tmp_path):
    """evaluate and demonstrate called the judge backend directly: judge.max_concurrency, max_batch and
    max_wait_ms had no effect, and an openai judge opened a connection per request of a chunk (up to 16) with
    --judge.max_concurrency 1. They now go through the batching service: at most max_concurrency batches of
    max_batch requests are in flight, counted by a real loopback server."""
    from recipes import demonstrate, evaluate, propose
    from tests.judge_servers import FaultServer

    class CountingServer(FaultServer):  # the most connections it ever held open at once
        def _track(self, conn, add):
            super()._track(conn, add)
            with self.lock:
                self.max_conns = max(getattr(self, "max_conns", 0), len(self._conns))

    base = ["--run.out_dir", str(tmp_path), "--flow.num_steps", "2", "--run.device", "cpu", "--eval.batch_size", "4",
            "--eval.write_videos", "0", "--world.num_scenes", "4", "--distill.pairs_per_image", "1"]  # fmt: skip
    propose.run(load_config(argv=base))
    judge = ["--judge.backend", "openai", "--judge.model", "m", "--judge.max_concurrency", "1",
             "--judge.max_batch", "2", "--judge.max_wait_ms", "5"]  # fmt: skip
    for recipe, extra in ((evaluate, ["--eval.num_items", "4", "--eval.baselines", "false",
                                      "--eval.executors", '["same=' + str(tmp_path / "dem.safetensors") + '"]']),
                          (demonstrate, [])):  # fmt: skip
        if recipe is evaluate:  # the Demonstrator's own weights as an Executor: one condition of 4 items
            from safetensors.torch import save_file

            from recipes.common import build_kit

            cfg0 = load_config(argv=base)
            save_file(build_kit(cfg0).load_denoiser("").state_dict(), str(tmp_path / "dem.safetensors"))
        with CountingServer() as srv:
            cfg = load_config(argv=base + judge + ["--judge.base_url", srv.url] + extra)
            recipe.run(cfg)
            assert srv.requests == 4 * 3, recipe.__name__  # 4 videos x 3 questions, all judged
            assert srv.max_in_flight <= 2 and srv.max_conns <= 2, (
                recipe.__name__,
                srv.max_in_flight,
                srv.max_conns,
            )


def test_a_chunk_file_cut_short_is_scored_again(tmp_path):
    """A chunk's score file cut short (a crash before its bytes reached the disk: the rename is not fsync'd) or
    left empty failed every rerun with a zipfile / EOF traceback; such a chunk is now scored again, giving the
    scores of a clean run."""
    from engine.world.oracle import OracleJudge
    from recipes.common import build_kit, load_for_sampling
    from recipes.evaluate import chunk_ranges, eval_items, pipeline_for, score_chunks

    cfg = load_config(argv=["--run.out_dir", str(tmp_path), "--eval.num_items", "4", "--eval.batch_size", "2",
                            "--flow.num_steps", "2", "--run.device", "cpu"])  # fmt: skip
    kit = build_kit(cfg)
    pipe = pipeline_for(kit, load_for_sampling(kit, cfg, ""), cfg)
    items, chunks, folder = eval_items(cfg), chunk_ranges(4, 2), tmp_path / "cond"
    clean = score_chunks(pipe, OracleJudge(), items, cfg, "solution", chunks, folder, "fp")
    first, second = sorted(folder.glob("items*.npz"))
    first.write_bytes(first.read_bytes()[:100])
    second.write_bytes(b"")
    again = score_chunks(pipe, OracleJudge(), items, cfg, "solution", chunks, folder, "fp")
    for start in clean:
        for q in clean[start]:
            np.testing.assert_array_equal(clean[start][q], again[start][q])
    assert first.stat().st_size > 100 and second.stat().st_size > 0  # written again


def test_a_toy_task_file_with_other_image_sizes_is_refused_up_front(tmp_path):
    """The toy model's task images are not fitted: an eval.tasks image of another size than the toy world's
    scenes failed after the model loaded (numpy's "all input arrays must have the same shape" for mixed sizes);
    validate now names the row and its size."""
    import json

    import pytest
    from PIL import Image

    from engine.config import ConfigError
    from engine.world.demonstrator import eval_items
    from recipes import evaluate

    rows = []
    for i, it in enumerate(eval_items(2, 5)):
        image = Image.fromarray(it.image)
        (image if i == 0 else image.resize((48, 48))).save(tmp_path / f"im{i}.png")
        rows.append({"id": f"s{i}", "image": f"im{i}.png", "task": it.task, "solution": it.solution})
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["--run.out_dir", str(tmp_path / "runs"), "--eval.tasks", str(tasks), "--run.device", "cpu"]
    with pytest.raises(ConfigError, match="row 's1': image .* is 48 x 48; the toy model takes .* 32 x 32"):
        evaluate.validate(load_config(argv=[*base, "--eval.num_items", "2"]))
    evaluate.validate(load_config(argv=[*base, "--eval.num_items", "1"]))  # the first row alone is evaluated
