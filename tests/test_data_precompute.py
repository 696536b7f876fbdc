"""recipes/precompute.py end to end on the toy world's encoders: cache = encoders applied directly."""

import json

import pytest
import torch

pytest.importorskip("av", reason="PyAV writes the test videos")

from engine.config import JobConfig, build_config
from engine.data import VideoDataset
from engine.data.cache import LatentCacheDataset
from engine.data.synthetic import write_video
from engine.world import latent as toy_latent


@pytest.fixture
def manifest(tmp_path):
    rows = []
    for i in range(3):
        write_video(tmp_path / f"v{i}.webm", ident=i, num_frames=6, height=32, width=32)
        rows.append(
            {"video": f"v{i}.webm", "task": f"[Agent]: push block {i}", "solution": f"Description: step {i}"}
        )
    rows.append({"video": "missing.webm", "task": "lost"})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return tmp_path / "m.jsonl"


def test_precompute_toy_cache_matches_direct_encoding(manifest, tmp_path):
    from recipes.common import load_toy_demonstrator
    from recipes.precompute import main

    cache = tmp_path / "cache"
    args = ["--data.manifest", str(manifest), "--data.cache_dir", str(cache), "--data.num_frames", "4",
            "--data.shard_size", "2", "--data.decoder", "pyav", "--run.device", "cpu"]  # fmt: skip
    index = main(args)
    assert len(index["shards"]) == 2 and (cache / "config.toml").is_file()
    assert "missing.webm" in (cache / "quarantine.jsonl").read_text()
    items = list(LatentCacheDataset(cache))
    assert [it["index"] for it in items] == [0, 1, 2]
    ds = VideoDataset(manifest, num_frames=4, height=32, width=32, decoder="pyav")
    text = load_toy_demonstrator(build_config(JobConfig)).text.eval()
    for it in items:
        clip = ds[it["index"]]["video"]  # (3, T, H, W) in [-1, 1]
        pixels = ((clip + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)[None]  # -> (1, T, H, W, 3)
        torch.testing.assert_close(it["latent"], toy_latent.encode(pixels)[0])
        torch.testing.assert_close(it["first_frame_latent"], toy_latent.encode(pixels[:, :1])[0])
        with torch.no_grad():
            ref = text.cond([it["task"]])
        torch.testing.assert_close(it["task_emb"], ref["text"][0, : int(ref["text_lengths"][0])])
        assert it["task"] == f"[Agent]: push block {it['index']}"
    before = {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*")}
    main(args)  # a rerun finds every shard complete and rewrites none
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*")} == before
    for changed in (
        ["--data.bucket_multiple", "8"],
        ["--data.max_upscale", "2"],
        ["--data.clip_start", "random"],
    ):
        with pytest.raises(ValueError, match="fingerprint"):  # would mix clips made two ways in one cache
            main(args + changed)


def test_precompute_rejects_missing_settings(manifest, tmp_path):
    from recipes.precompute import main

    with pytest.raises(SystemExit, match="data.cache_dir"):
        main(["--data.manifest", str(manifest)])


def test_precompute_refuses_to_resume_with_another_encoder_dtype(tmp_path):
    """The real encoders run in precision.param_dtype: a cache resumed in bf16 after an fp32 start mixed text
    embeddings 2e-2 apart (tiny UMT5) in one cache; that is now a fingerprint mismatch."""
    from recipes.precompute import main
    from tests.test_encoders import tiny_clip, tiny_tokenizer, tiny_umt5, tiny_vae

    model = tmp_path / "model"
    tiny_vae().save_pretrained(model / "vae")
    tiny_tokenizer().save_pretrained(model / "tokenizer")
    tiny_umt5().save_pretrained(model / "text_encoder")
    tiny_clip().save_pretrained(model / "image_encoder")
    write_video(tmp_path / "v0.webm", ident=0, num_frames=6, height=16, width=16)
    (tmp_path / "m.jsonl").write_text(json.dumps({"video": "v0.webm", "task": "the blue block"}) + "\n")
    args = ["--model.family", "wan", "--model.flavour", "t2v_1.3b", "--model.pretrained", str(model),
            "--data.manifest", str(tmp_path / "m.jsonl"), "--data.cache_dir", str(tmp_path / "cache"),
            "--data.num_frames", "5", "--data.height", "16", "--data.width", "16", "--data.decoder", "pyav",
            "--run.device", "cpu", "--data.text_fields", '["task"]']  # fmt: skip
    main(args)
    with pytest.raises(ValueError, match="param_dtype"):
        main(args + ["--precision.param_dtype", "bfloat16"])
