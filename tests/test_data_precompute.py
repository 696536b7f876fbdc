"""recipes/precompute.py end to end on the toy world's encoders: cache = encoders applied directly."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("av", reason="PyAV writes the test videos")

from engine.config import JobConfig, build_config
from engine.data import VideoDataset
from engine.data.cache import LatentCacheDataset
from engine.data.synthetic import write_video
from engine.world import latent as toy_latent

ASSETS = Path(__file__).resolve().parents[1] / "engine" / "world" / "assets"


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
    # the sizes the shards were made at
    assert index["fingerprint"]["buckets"] == [list(b) for b in ds.buckets]
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


def tiny_model(tmp_path, seed: int = 0) -> tuple[Path, list[str]]:
    """A tiny diffusers-format Wan encoder folder (VAE with 2x frame compression, UMT5, CLIP), a one-video
    manifest, and the precompute arguments for them."""
    from tests.test_encoders import tiny_clip, tiny_tokenizer, tiny_umt5, tiny_vae

    torch.manual_seed(seed)
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
    return model, args


def test_precompute_refuses_to_resume_with_another_encoder_dtype(tmp_path):
    """The real encoders run in precision.param_dtype: a cache resumed in bf16 after an fp32 start mixed text
    embeddings 2e-2 apart (tiny UMT5) in one cache; that is now a fingerprint mismatch."""
    from recipes.precompute import main

    _, args = tiny_model(tmp_path)
    main(args)
    with pytest.raises(ValueError, match="param_dtype"):
        main(args + ["--precision.param_dtype", "bfloat16"])


def test_precompute_refuses_a_cache_made_with_other_weights_at_the_same_path(tmp_path):
    """model.pretrained was fingerprinted by its path: a text encoder retrained and saved into the same folder
    resumed the cache, which kept the old weights' embeddings. The encoders' files (path, size, mtime) are now
    in the fingerprint; a fresh cache shows the new weights do embed the text differently."""
    from engine.data.cache import LatentCacheDataset
    from recipes.precompute import main
    from tests.test_encoders import tiny_umt5

    model, args = tiny_model(tmp_path)
    main(args)
    old = next(iter(LatentCacheDataset(tmp_path / "cache")))["task_emb"]
    torch.manual_seed(1)
    tiny_umt5().save_pretrained(model / "text_encoder")  # other weights, same path
    with pytest.raises(ValueError, match="fingerprint"):
        main(args)
    new_args = [*args, "--data.cache_dir", str(tmp_path / "cache2")]
    main(new_args)
    new = next(iter(LatentCacheDataset(tmp_path / "cache2")))["task_emb"]
    assert new.shape == old.shape and not torch.allclose(new, old)  # the reused cache was stale


def test_precompute_toy_refuses_a_cache_made_with_another_text_encoder(manifest, tmp_path):
    """The toy world's text encoder (world.demonstrator's text_encoder.safetensors) was not in the fingerprint
    at all: another Demonstrator's, or new weights in the same folder, resumed the old cache."""
    import shutil

    from safetensors.torch import save_file

    from engine.world.text import ToyTextEncoder
    from recipes.precompute import main

    demo = tmp_path / "demo"
    shutil.copytree(ASSETS, demo)
    args = ["--data.manifest", str(manifest), "--data.cache_dir", str(tmp_path / "cache"), "--data.decoder", "pyav",
            "--run.device", "cpu", "--world.demonstrator", str(demo)]  # fmt: skip
    main(args)
    cfg = json.loads((demo / "demonstrator.json").read_text())["text_encoder_config"]
    torch.manual_seed(5)
    save_file(ToyTextEncoder(**cfg).state_dict(), str(demo / "text_encoder.safetensors"))
    with pytest.raises(ValueError, match="fingerprint"):
        main(args)


def _bad_inputs(tmp: Path, manifest: Path, model_args: list[str]) -> list[tuple[list[str], str]]:
    cache = ["--data.cache_dir", str(tmp / "cache")]
    toy = ["--data.manifest", str(manifest), *cache, "--run.device", "cpu"]
    return [
        (["--data.manifest", str(manifest)], "data.cache_dir is empty"),
        # the encoders were loaded before the manifest was read (FileNotFoundError traceback)
        (["--data.manifest", str(tmp / "none.jsonl"), *cache], f"data.manifest: '{tmp / 'none.jsonl'}' does not"),
        ([*toy, "--data.root", str(tmp / "nowhere")], "data.root: folder"),
        (["--data.manifest", str(tmp), *cache], f"data.manifest: '{tmp}' is a folder"),
        ([*toy, "--data.shard_size", "0"], "config key 'data.shard_size': expected >= 1, got 0"),
        ([*toy, "--data.height", "0"], "config key 'data.height': expected >= 1, got 0"),
        # a negative count of decoding processes was accepted and ignored
        ([*toy, "--data.num_workers", "-1"], "config key 'data.num_workers': expected >= 0"),
        # the toy world never reads model.pretrained: it was silently ignored
        ([*toy, "--model.pretrained", str(tmp)], "model.pretrained: "),
        ([*toy, "--world.demonstrator", str(tmp)], "world.demonstrator: "),
        ([*toy, "--model.flavour", "1.3B"], "model.pretrained: '' is not a folder"),
        ([*model_args, "--model.family", "hunyuan"], "model.family 'hunyuan': expected one of"),
        # the VAE (2x frame compression) refused 4 frames only once the encoders were loaded
        ([*model_args, "--data.num_frames", "4"], "data.num_frames = 4: this VAE needs 1 + k * 2 frames"),
    ]  # fmt: skip


def test_precompute_bad_inputs_fail_in_one_line_before_any_work(manifest, tmp_path, capsys):
    """Each is refused up front by validate: one line naming the key, exit status 2, no cache written."""
    from recipes.precompute import main

    _, model_args = tiny_model(tmp_path / "m")
    cases = _bad_inputs(tmp_path, manifest, model_args)
    if not torch.cuda.is_available():  # "cuda" without a GPU fell back to the CPU without a word
        cases.append(([*model_args, "--run.device", "cuda"], "run.device: run.device 'cuda' was asked for"))
    for args, needle in cases:
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"error: {needle}" in err, (args, err[-2000:])
        assert not (tmp_path / "cache").exists() and not (tmp_path / "m" / "cache").exists(), args


def test_precompute_refuses_a_cache_made_from_an_edited_manifest(tmp_path):
    """The manifest was fingerprinted by its path: a caption corrected in place (same number of rows) resumed
    the cache, which kept serving the old caption and its embedding."""
    from engine.data.cache import LatentCacheDataset
    from recipes.precompute import main

    write_video(tmp_path / "v0.webm", ident=0, num_frames=6, height=32, width=32)
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"video": "v0.webm", "task": "push the red block"}) + "\n")
    args = ["--data.manifest", str(m), "--data.cache_dir", str(tmp_path / "cache"), "--data.decoder", "pyav",
            "--run.device", "cpu"]  # fmt: skip
    main(args)
    assert next(iter(LatentCacheDataset(tmp_path / "cache")))["task"] == "push the red block"
    m.write_text(json.dumps({"video": "v0.webm", "task": "push the blue block"}) + "\n")
    with pytest.raises(ValueError, match="fingerprint"):
        main(args)


def test_precompute_num_workers_decodes_in_worker_processes_into_the_same_cache(tmp_path, monkeypatch):
    """data.num_workers was accepted and read nowhere: every clip was decoded in the main process. With 2 the
    rows are decoded in DataLoader worker processes, and the cache (shards, index, skipped files) is the one
    num_workers = 0 writes; it is not in the fingerprint, so either resumes the other's cache."""
    import os

    from recipes.precompute import main

    rows = []
    for i in range(4):
        write_video(tmp_path / f"v{i}.webm", ident=i, num_frames=6, height=32, width=32)
        rows.append({"video": f"v{i}.webm", "task": f"push block {i}"})
    good = (tmp_path / "v2.webm").read_bytes()
    (tmp_path / "v2.webm").write_bytes(good[: len(good) // 3])  # damaged: cut short
    rows.append({"video": "missing.webm", "task": "lost"})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pids = tmp_path / "pids"
    pids.mkdir()
    read = VideoDataset.__getitem__

    def noting(self, i):  # which process read row i
        (pids / f"{i}.{os.getpid()}").touch()
        return read(self, i)

    monkeypatch.setattr(VideoDataset, "__getitem__", noting)
    base = ["--data.manifest", str(tmp_path / "m.jsonl"), "--data.num_frames", "4", "--data.shard_size", "3",
            "--data.decoder", "pyav", "--run.device", "cpu"]  # fmt: skip
    out = {}
    for workers in ("0", "2"):
        cache = tmp_path / f"cache{workers}"
        index = main([*base, "--data.cache_dir", str(cache), "--data.num_workers", workers])
        readers = {int(p.name.split(".")[1]) for p in pids.iterdir()}
        for p in pids.iterdir():
            p.unlink()
        q = [json.loads(line) for line in (cache / "quarantine.jsonl").read_text().splitlines()]
        out[workers] = index, [(e["path"], e["reason"]) for e in q], readers, list(LatentCacheDataset(cache))
    (index0, q0, readers0, items0), (index2, q2, readers2, items2) = out["0"], out["2"]
    assert readers0 == {os.getpid()} and os.getpid() not in readers2 and len(readers2) >= 2
    assert (
        index2 == index0 and len(index0["shards"]) == 2
    )  # the shards' sha256 and the fingerprint among them
    assert q2 == q0 and [p for p, _ in q0] == [str(tmp_path / "v2.webm"), str(tmp_path / "missing.webm")]
    assert [it["index"] for it in items0] == [0, 1, 3]
    for a, b in zip(items0, items2):
        assert a.keys() == b.keys() and all(
            torch.equal(v, b[k]) if torch.is_tensor(v) else v == b[k] for k, v in a.items()
        )
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache0").glob("shard-*")}
    main(
        [*base, "--data.cache_dir", str(tmp_path / "cache0"), "--data.num_workers", "2"]
    )  # resumes: all done
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache0").glob("shard-*")} == before
