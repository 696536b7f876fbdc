"""VideoDataset and LatentCacheDataset in torch DataLoader worker processes started with spawn (what a run that
has initialised CUDA needs): the datasets pickle, and the workers give the items the main process gives."""

import functools
import json

import pytest
import torch

pytest.importorskip("av", reason="PyAV writes the test videos")


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
