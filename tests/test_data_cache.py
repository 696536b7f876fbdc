"""Latent cache: equals direct encoding with a tiny diffusers Wan VAE and transformers UMT5; resumes
after an interruption; a corrupt shard is detected, skipped, quarantined and repaired by a rerun."""

import functools
import json
from pathlib import Path

import pytest
import torch

from engine.data import BatchLoader, ResumableSampler, VideoDataset
from engine.data.cache import LatentCacheDataset, LatentCacheWriter, collate_latents, sha256_file
from engine.data.synthetic import write_image, write_video

pytest.importorskip("av", reason="PyAV writes the test videos")
AutoencoderKLWan = pytest.importorskip("diffusers").AutoencoderKLWan
transformers = pytest.importorskip("transformers")
UMT5Config, UMT5EncoderModel = transformers.UMT5Config, transformers.UMT5EncoderModel

FIELDS = ("task", "solution")
pytestmark = pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN:UserWarning")


class WanVAE:
    """diffusers AutoencoderKLWan behind the cache's VideoEncoder protocol (posterior mode)."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.model = AutoencoderKLWan(
            base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True]
        )
        self.model.eval()
        self.calls = 0

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        # oneDNN's conv3d costs ~1.5 s per call at these toy shapes; the native kernel takes ~0.1 s.
        with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
            return self.model.encode(video).latent_dist.mode()


class UMT5Text:
    """transformers UMT5 encoder with a byte-level tokenizer (no download), as a TextEncoder."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        cfg = UMT5Config(vocab_size=260, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
        self.model = UMT5EncoderModel(cfg).eval()

    def cond(self, texts: list[str]) -> dict[str, torch.Tensor]:
        emb, lengths = self.encode(texts)
        return {"text": emb, "text_lengths": lengths}

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [list(t.encode())[:24] + [1] for t in texts]
        lengths = torch.tensor([len(i) for i in ids])
        batch = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
        for b, row in enumerate(ids):
            batch[b, : len(row)] = torch.tensor(row) + 3
        mask = (torch.arange(batch.shape[1])[None] < lengths[:, None]).long()
        with torch.no_grad():
            return self.model(input_ids=batch, attention_mask=mask).last_hidden_state, lengths


class Interrupted(RuntimeError):
    pass


class StopAfter(WanVAE):
    """The real VAE, but the process "dies" at the n-th call."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def encode(self, video):
        if self.calls + 1 >= self.n:
            raise Interrupted("simulated crash")
        return super().encode(video)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cachedata")
    rows = []
    for i in range(5):
        write_video(d / f"v{i}.webm", ident=i, num_frames=6, height=16, width=16)
        rows.append(
            {"video": f"v{i}.webm", "task": f"task {i}", "solution": f"the agent does step {i} then {i + 1}"}
        )
    write_image(d / "img.png", height=16, width=16, ident=7)
    rows.insert(2, {"image": "img.png", "task": "image task", "solution": "image solution"})
    rows.insert(4, {"video": "missing.webm", "task": "lost"})
    (d / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return d


def make_ds(d: Path, q: Path | None = None) -> VideoDataset:
    return VideoDataset(d / "m.jsonl", num_frames=5, height=16, width=16, decoder="pyav", quarantine=q)


def write(out: Path, d: Path, vae=None, text=None) -> dict:
    w = LatentCacheWriter(
        out,
        vae=vae or WanVAE(),
        text_encoder=text or UMT5Text(),
        text_fields=FIELDS,
        shard_size=2,
        batch_size=2,
        fingerprint={"h": 16},
    )
    return w.write(make_ds(d, out / "quarantine.jsonl"))


def test_cache_equals_direct_encoding(dataset_dir, tmp_path):
    out = tmp_path / "cache"
    index = write(out, dataset_dir)
    assert len(index["shards"]) == 4 and sum(s["items"] for s in index["shards"].values()) == 6
    cache = LatentCacheDataset(out)
    ds, vae, text = make_ds(dataset_dir), WanVAE(), UMT5Text()
    items = list(cache)
    assert [it["index"] for it in items] == [0, 1, 2, 3, 5, 6]  # row 4 (missing file) skipped
    for it in items:
        src = ds[it["index"]]
        assert it["task"] == src["task"] and it["path"] == src["path"]  # text stays with its video
        ref = vae.encode(src["video"][None])[0]
        torch.testing.assert_close(it["latent"], ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(
            it["first_frame_latent"], vae.encode(src["video"][None, :, :1])[0], atol=1e-5, rtol=1e-4
        )
        for f in FIELDS:
            emb, n = text.encode([src[f]])
            torch.testing.assert_close(it[f"{f}_emb"], emb[0, : int(n[0])], atol=1e-5, rtol=1e-4)
    assert items[2]["latent"].shape[1] == 1  # the image: one latent frame
    logged = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [e["path"].endswith("missing.webm") and "does not exist" in e["reason"] for e in logged] == [True]
    loader = BatchLoader(cache, ResumableSampler(len(cache), shuffle=False), batch_size=2, key="latent",
                         collate=functools.partial(collate_latents, text_fields=FIELDS))  # fmt: skip
    batches = list(loader)
    assert sorted(i for b in batches for i in b["index"]) == [0, 1, 2, 3, 5, 6]
    task_of = {it["index"]: it["task"] for it in items}
    assert all(b["task"] == [task_of[i] for i in b["index"]] for b in batches)
    batch = collate_latents([items[0], items[1]], FIELDS)
    assert batch["latent"].shape[0] == 2 and batch["task_emb"].shape[:2] == (
        2,
        int(batch["task_lengths"].max()),
    )
    assert (batch["task_emb"][0, int(batch["task_lengths"][0]) :] == 0).all()


def test_resume_after_interruption_and_half_written_shard(dataset_dir, tmp_path):
    ref_vae = WanVAE()
    ref = write(tmp_path / "ref", dataset_dir, vae=ref_vae)
    out = tmp_path / "cache"
    with pytest.raises(Interrupted):
        write(
            out, dataset_dir, vae=StopAfter(4)
        )  # shard 0 done (2 calls: clips + first frames), dies in shard 1
    index = json.loads((out / "index.json").read_text())
    assert list(index["shards"]) == ["shard-00000.safetensors"]
    (out / "shard-00001.safetensors").write_bytes(b"half a shard")  # renamed into place, index never updated
    first = (out / "shard-00000.safetensors").stat()
    vae = WanVAE()
    done = write(out, dataset_dir, vae=vae)
    assert (
        vae.calls == ref_vae.calls - 2
    )  # shard 0 (rows 0, 1: one clip batch, one first-frame batch) skipped
    again = (out / "shard-00000.safetensors").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert {k: v["sha256"] for k, v in done["shards"].items()} == {
        k: v["sha256"] for k, v in ref["shards"].items()
    }
    assert [it["index"] for it in LatentCacheDataset(out)] == [0, 1, 2, 3, 5, 6]


def test_corrupt_shard_is_skipped_quarantined_and_repaired(dataset_dir, tmp_path):
    out = tmp_path / "cache"
    write(out, dataset_dir)
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-20:] = bytes(20)
    shard.write_bytes(bytes(data))
    cache = LatentCacheDataset(out)
    assert [it["index"] for it in cache] == [0, 1, 5, 6]  # rows 2 and 3 lived in shard 1
    assert (
        len(cache.skipped) == 1
        and "sha256 mismatch" in cache.skipped[0][1]
        and "shard-00001" in cache.skipped[0][0]
    )
    assert (out / "quarantine" / "shard-00001.safetensors").exists() and not shard.exists()
    assert "sha256 mismatch" in (out / "quarantine.jsonl").read_text()
    write(out, dataset_dir)  # rerunning the writer rebuilds the quarantined shard
    assert [it["index"] for it in LatentCacheDataset(out)] == [0, 1, 2, 3, 5, 6]
    assert sha256_file(shard) == json.loads((out / "index.json").read_text())["shards"][shard.name]["sha256"]


def test_truncated_shard_without_verify_and_concurrent_readers(dataset_dir, tmp_path):
    """verify=False: a truncated shard (an interrupted copy) is still skipped and quarantined, from its
    unreadable header (safetensors' own error type, not an OSError), not raised into the loader; with verify, a
    corrupt shard that BatchLoader's threads reach at once is quarantined once."""
    out = tmp_path / "cache"
    write(out, dataset_dir)
    shard = out / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    cache = LatentCacheDataset(out, verify=False)
    assert [it["index"] for it in cache] == [0, 1, 5, 6]
    assert len(cache.skipped) == 1 and "unreadable shard" in cache.skipped[0][1]
    shard.write_bytes(data[:-20] + bytes(20))  # back in place, corrupt: only the checksum can tell
    (out / "quarantine.jsonl").unlink()
    cache = LatentCacheDataset(out)
    loader = BatchLoader(cache, ResumableSampler(len(cache), shuffle=False), batch_size=1, key="latent",
                         num_threads=4, prefetch=6, collate=functools.partial(collate_latents, text_fields=FIELDS))  # fmt: skip
    assert sorted(i for b in loader for i in b["index"]) == [0, 1, 5, 6]
    assert len(cache.skipped) == 1 and len((out / "quarantine.jsonl").read_text().splitlines()) == 1


def test_all_corrupt_and_mismatched_settings_fail_clearly(dataset_dir, tmp_path):
    out = tmp_path / "cache"
    write(out, dataset_dir)
    with pytest.raises(ValueError, match="shard_size"):
        LatentCacheWriter(out, vae=WanVAE(), shard_size=3, text_fields=FIELDS, fingerprint={"h": 16}).write(
            make_ds(dataset_dir)
        )
    for p in out.glob("shard-*.safetensors"):
        p.write_bytes(b"x" * 10)
    with pytest.raises(RuntimeError, match="all 6 items of this pass were skipped"):
        list(LatentCacheDataset(out))
    with pytest.raises(FileNotFoundError, match="precompute"):
        LatentCacheDataset(tmp_path / "nothing")


def test_collate_names_the_rows_without_a_requested_text(tmp_path):
    """A manifest row without a 'solution' is cached without its embedding (text_fields lists fields a row may
    lack); collating it for training with text_fields ('task', 'solution') names the row and the field (before, a
    bare KeyError 'solution_emb')."""
    d = tmp_path / "data"
    for i in range(2):
        write_video(d / f"v{i}.webm", ident=i, num_frames=6, height=16, width=16)
    rows = [{"video": "v0.webm", "task": "t0", "solution": "s0"}, {"video": "v1.webm", "task": "t1"}]
    (d / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    write(tmp_path / "cache", d)
    cache = LatentCacheDataset(tmp_path / "cache")
    assert "solution_emb" in cache[0] and "solution_emb" not in cache[1]
    assert collate_latents([cache[0]], text_fields=FIELDS)["solution_emb"].shape[0] == 1
    with pytest.raises(ValueError, match=r"rows \[1\] have no 'solution' embedding"):
        collate_latents([cache[0], cache[1]], text_fields=FIELDS)
