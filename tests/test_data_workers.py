"""VideoDataset and LatentCacheDataset in torch DataLoader worker processes started with spawn (what a run that
has initialised CUDA needs): the datasets pickle, and the workers give the items the main process gives."""

import functools
import json
import os

import pytest
import torch

pytest.importorskip("av", reason="PyAV writes the test videos")

from engine.data import VideoDataset  # noqa: E402


def test_datasets_in_spawned_dataloader_workers(tmp_path):
    """Before, both failed to pickle ('cannot pickle _thread.lock': the DALI decoder's and the cache's thread
    locks), so DataLoader(num_workers > 0) with spawn could not start."""
    from engine.data import VideoDataset
    from engine.data.cache import LatentCacheDataset, LatentCacheWriter, collate_latents
    from engine.data.synthetic import write_video

    rows = []
    for i in range(4):
        write_video(tmp_path / f"v{i}.webm", ident=i, num_frames=3, height=16, width=16)
        rows.append(json.dumps({"video": f"v{i}.webm", "caption": f"c{i}"}))
    (tmp_path / "m.jsonl").write_text("\n".join(rows))
    ds = VideoDataset(
        tmp_path / "m.jsonl", num_frames=2, height=16, width=16
    )  # "auto": DALI's CPU path first
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    got = {it["index"]: it for it in loader}
    assert sorted(got) == [0, 1, 2, 3]
    for i, it in got.items():
        ref = ds[i]
        assert it["caption"] == ref["caption"] and torch.equal(it["video"], ref["video"])

    class PoolVAE:
        def encode(self, video):
            return torch.nn.functional.avg_pool3d(video, (1, 4, 4))

    LatentCacheWriter(tmp_path / "cache", vae=PoolVAE(), shard_size=2, first_frame=False).write(ds)
    cache = LatentCacheDataset(tmp_path / "cache")
    loader = torch.utils.data.DataLoader(cache, batch_size=2, num_workers=1, multiprocessing_context="spawn",
                                         collate_fn=functools.partial(collate_latents, text_fields=()))  # fmt: skip
    batches = list(loader)
    assert [b["index"] for b in batches] == [[0, 1], [2, 3]]
    for b in batches:
        torch.testing.assert_close(b["latent"], torch.stack([cache[i]["latent"] for i in b["index"]]))


def test_dali_dataset_in_forked_workers_after_a_peek(tmp_path):
    """A clip read in the main process (a peek at ds[0]) builds a DALI pipeline; DataLoader workers forked after
    it decode with pipelines of their own (before, they ran the inherited one, whose threads did not survive the
    fork: every worker hung, forever without a DataLoader timeout)."""
    from engine.data import VideoDataset
    from engine.data.decode import dali_available
    from engine.data.synthetic import write_video

    if dali_available():
        pytest.skip(f"DALI CPU decoder unavailable: {dali_available()}")
    rows = []
    for i in range(4):
        write_video(tmp_path / f"v{i}.webm", ident=i, num_frames=3, height=16, width=16)
        rows.append(json.dumps({"video": f"v{i}.webm"}))
    (tmp_path / "m.jsonl").write_text("\n".join(rows))
    ds = VideoDataset(tmp_path / "m.jsonl", num_frames=2, height=16, width=16, decoder="dali_cpu")
    ref = {i: ds[i]["video"] for i in range(4)}
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork",
                                         timeout=60)  # fmt: skip
    got = {it["index"]: it["video"] for it in loader}
    assert sorted(got) == [0, 1, 2, 3] and all(torch.equal(got[i], ref[i]) for i in got)


class PidVideoDataset(VideoDataset):
    """A VideoDataset that notes which process read each row (the file ``<pids>/<row>``)."""

    def __init__(self, *args, pids, **kwargs):
        super().__init__(*args, **kwargs)
        self.pids = pids

    def __getitem__(self, i):
        (self.pids / str(i)).write_text(str(os.getpid()))
        return super().__getitem__(i)


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_cache_written_in_worker_processes_equals_the_in_process_one(tmp_path, monkeypatch, start):
    """LatentCacheWriter(num_workers=2) decodes each shard's rows in DataLoader worker processes (spawned where
    CUDA is in use, forked otherwise) and writes the cache num_workers=0 writes: the same shards, index and
    skipped rows (a damaged and a missing file) in the same order. Before, num_workers did not exist."""
    from engine.data.cache import LatentCacheDataset, LatentCacheWriter
    from engine.data.synthetic import write_video

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: start == "spawn")
    rows = []
    for i in range(4):
        write_video(tmp_path / f"v{i}.webm", ident=i, num_frames=3, height=16, width=16)
        rows.append(json.dumps({"video": f"v{i}.webm", "caption": f"c{i}"}))
    good = (tmp_path / "v1.webm").read_bytes()
    (tmp_path / "v1.webm").write_bytes(good[: len(good) // 3])  # damaged: cut short
    rows.append(json.dumps({"video": "missing.webm"}))
    (tmp_path / "m.jsonl").write_text("\n".join(rows))

    class PoolVAE:
        def encode(self, video):
            return torch.nn.functional.avg_pool3d(video, (1, 4, 4))

    out = {}
    for workers in (0, 2):
        d = tmp_path / f"w{workers}"
        (d / "pids").mkdir(parents=True)
        ds = PidVideoDataset(tmp_path / "m.jsonl", num_frames=2, height=16, width=16, decoder="pyav",
                             quarantine=d / "quarantine.jsonl", pids=d / "pids")  # fmt: skip
        index = LatentCacheWriter(d / "cache", vae=PoolVAE(), shard_size=3, num_workers=workers).write(ds)
        q = [json.loads(line) for line in (d / "quarantine.jsonl").read_text().splitlines()]
        pids = {int(p.name): int(p.read_text()) for p in (d / "pids").iterdir()}
        out[workers] = (
            index,
            ds.skipped,
            [(e["path"], e["reason"]) for e in q],
            pids,
            list(LatentCacheDataset(d / "cache")),
        )
    (index0, skipped0, q0, pids0, items0), (index2, skipped2, q2, pids2, items2) = out[0], out[2]
    assert sorted(pids0) == sorted(pids2) == [0, 1, 2, 3, 4]
    assert set(pids0.values()) == {os.getpid()} and os.getpid() not in pids2.values()
    assert index2 == index0 and len(index0["shards"]) == 2  # the shards' sha256 among them
    assert [it["index"] for it in items0] == [0, 2, 3]
    assert q2 == q0 and skipped2 == skipped0 == q0[-2:]  # the manifest's rows first, then the two files
    assert [p for p, _ in q0[-2:]] == [str(tmp_path / "v1.webm"), str(tmp_path / "missing.webm")]
    for a, b in zip(items0, items2):
        assert a.keys() == b.keys() and all(
            torch.equal(v, b[k]) if torch.is_tensor(v) else v == b[k] for k, v in a.items()
        )
