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
