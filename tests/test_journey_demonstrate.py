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
