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
