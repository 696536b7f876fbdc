"""ResumableSampler: deterministic sharding across ranks and exact resume (no repeats, no gaps)."""

import json
from collections import Counter

import pytest
import torch

from engine.data import BatchLoader, ResumableSampler, SkipItem, VideoDataset
from engine.data.synthetic import write_video


def _epoch(n, ws, **kw):
    return [list(ResumableSampler(n, rank=r, world_size=ws, **kw)) for r in range(ws)]


@pytest.mark.parametrize("n,ws,drop_last", [(10, 2, False), (11, 2, False), (11, 2, True), (7, 3, False)])
def test_ranks_partition_an_epoch(n, ws, drop_last):
    parts = _epoch(n, ws, seed=3, drop_last=drop_last)
    assert len({len(p) for p in parts}) == 1  # equal counts per rank keep collectives in step
    counts = Counter(i for p in parts for i in p)
    if drop_last:
        assert len(counts) == (n // ws) * ws and set(counts.values()) == {1}
    else:
        assert set(counts) == set(range(n)) and sum(counts.values()) == -(-n // ws) * ws
    assert parts == _epoch(n, ws, seed=3, drop_last=drop_last)  # deterministic
    assert parts != _epoch(n, ws, seed=4, drop_last=drop_last)


def test_epochs_reshuffle_and_advance_automatically():
    s = ResumableSampler(20, seed=0)
    e0, e1 = list(s), list(s)
    assert sorted(e0) == sorted(e1) == list(range(20)) and e0 != e1
    assert s.state_dict()["epoch"] == 2 and s.state_dict()["consumed"] == 0
    assert list(ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def _run(samplers, stop_after=None):
    """Take items in lock-step from every rank; stop after ``stop_after`` per rank."""
    out = [[] for _ in samplers]
    its = [iter(s) for s in samplers]
    k = 0
    while stop_after is None or k < stop_after:
        try:
            for r, it in enumerate(its):
                out[r].append(next(it))
        except StopIteration:
            break
        k += 1
    return out


def test_resume_mid_epoch_two_ranks_and_a_new_world_size():
    full = _run([ResumableSampler(13, rank=r, world_size=2, seed=9) for r in range(2)])
    first = [ResumableSampler(13, rank=r, world_size=2, seed=9) for r in range(2)]
    head = _run(first, stop_after=3)
    states = [json.loads(json.dumps(s.state_dict())) for s in first]  # survives a checkpoint round trip
    second = [ResumableSampler(13, rank=r, world_size=2, seed=9) for r in range(2)]
    for s, st in zip(second, states):
        s.load_state_dict(st)
    tail = _run(second)
    assert [h + t for h, t in zip(head, tail)] == full
    # Same global position, one rank instead of two: the rest of the epoch, each index once.
    solo = ResumableSampler(13, rank=0, world_size=1, seed=9)
    solo.load_state_dict(states[0])
    rest = list(solo)
    assert sorted(rest + head[0] + head[1]) == list(range(13))
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(13, seed=1).load_state_dict(states[0])
    bad = ResumableSampler(13, rank=0, world_size=4, seed=9)
    with pytest.raises(ValueError, match="not a multiple of world_size 4"):
        bad.load_state_dict(states[0])


def test_dataset_resume_two_ranks_repeats_and_skips_nothing(tmp_path):
    """Two ranks iterate a dataset with a bad file, checkpoint mid-epoch, and resume in fresh objects."""
    pytest.importorskip("av", reason="PyAV writes the test videos")
    rows = []
    for i in range(7):
        write_video(tmp_path / f"v{i}.webm", ident=i, num_frames=4, height=16, width=16)
        rows.append({"video": f"v{i}.webm", "caption": f"c{i}"})
    (tmp_path / "v3.webm").write_bytes(b"")  # one bad file, skipped on whichever rank gets it
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))

    def make(rank):
        ds = VideoDataset(tmp_path / "m.jsonl", num_frames=2, height=16, width=16, decoder="pyav")
        return ds, ResumableSampler(len(ds), rank=rank, world_size=2, seed=5)

    def captions(ds, sampler, n=None):
        out = []
        for item in ds.iterate(sampler):
            out.append(item["caption"])
            if n is not None and len(out) == n:
                break
        return out

    full = [captions(*make(r)) for r in range(2)]
    resumed = []
    for r in range(2):
        ds, s = make(r)
        head = captions(ds, s, n=2)
        state = s.state_dict()
        ds2, s2 = make(r)
        s2.load_state_dict(state)
        resumed.append(head + captions(ds2, s2))
    assert resumed == full
    got = sorted(c for part in full for c in part)
    assert "c3" not in got and set(got) == {f"c{i}" for i in range(7) if i != 3}


def test_batch_loader_resume_is_exact_with_prefetch_and_buckets(tmp_path):
    """Threads decode ahead and aspect buckets hold items back; a checkpoint taken between batches
    still resumes so that every index of the epoch is handed out exactly once per rank."""
    pytest.importorskip("av", reason="PyAV writes the test videos")
    rows = []
    for i in range(10):
        wide = i % 3 == 0
        write_video(tmp_path / f"v{i}.webm", ident=i, num_frames=3, height=16, width=32 if wide else 16)
        rows.append({"video": f"v{i}.webm", "caption": f"c{i}"})
    (tmp_path / "v4.webm").write_bytes(b"not a video")
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))

    def make(rank):
        ds = VideoDataset(tmp_path / "m.jsonl", num_frames=2, height=16, width=16, aspect_buckets=True,
                          bucket_multiple=8, decoder="pyav")  # fmt: skip
        s = ResumableSampler(len(ds), rank=rank, world_size=2, seed=2)
        return BatchLoader(ds, s, batch_size=2, num_threads=2, prefetch=3)

    def indices(batches):
        return [i for b in batches for i in b["index"]]

    seen = []
    for rank in range(2):
        full = indices(make(rank))
        seen += full
        loader = make(rank)
        it = iter(loader)
        head = [next(it)]
        state = json.loads(json.dumps(loader.state_dict()))
        it.close()
        assert state["pending"]  # items were decoded ahead / held in a bucket: the case under test
        resumed = make(rank)
        resumed.load_state_dict(state)
        tail = list(resumed)
        for b in head + tail:
            assert b["video"].shape[0] == len(b["index"]) and len({tuple(v.shape) for v in b["video"]}) == 1
            assert b["caption"] == [f"c{i}" for i in b["index"]]
        assert sorted(indices(head) + indices(tail)) == sorted(full)
    assert sorted(seen) == [i for i in range(10) if i != 4]  # 10 items, 2 ranks: no padding; v4 is bad


class _Items:
    """Items whose bucket key is one shape; records the epoch each item was built in."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch, self.built = n, 0, []

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict:
        self.built.append((self.epoch, i))
        return {"video": torch.zeros(1), "index": i}


@pytest.mark.parametrize("drop_last", [False, True])
def test_batch_loader_resume_at_the_end_of_an_epoch_is_exact(drop_last):
    """Prefetching drew the whole epoch (the sampler moved itself to the next) before its last batches were
    handed out; a checkpoint taken then resumes with the same batches as the uninterrupted run, the next
    epoch's items in the next pass (before, they shared buckets with the old epoch's and an index could appear
    twice in one batch; with drop_last, items the uninterrupted run drops were trained). Each pass tells the
    dataset its epoch, the resumed old-epoch items included."""

    def make():
        ds = _Items(10)
        return ds, BatchLoader(ds, ResumableSampler(10, seed=0), batch_size=4, num_threads=1, prefetch=8,
                               drop_last=drop_last, collate=lambda g: {"index": [x["index"] for x in g]})  # fmt: skip

    ref_ds, ref = make()
    full = [[b["index"] for b in ref] for _ in range(2)]  # two uninterrupted epochs, one pass each
    assert {e for e, _ in ref_ds.built} == {0, 1}
    ds, loader = make()
    it = iter(loader)
    head = [next(it)["index"]]
    state = json.loads(json.dumps(loader.state_dict()))
    it.close()
    assert state["sampler"]["epoch"] == 1 and state["pending"]  # the case under test
    ds2, resumed = make()
    resumed.load_state_dict(state)
    rest = [b["index"] for b in resumed]
    assert head + rest == full[0] and {e for e, _ in ds2.built} == {0}  # the old epoch's items, as epoch 0
    ds2.built.clear()
    assert [b["index"] for b in resumed] == full[1] and {e for e, _ in ds2.built} == {1}


def test_batch_loader_state_at_an_epochs_last_batch_resumes_under_another_world_size():
    """A state saved right after an epoch's last batch (prefetching drew the epoch, nothing is pending) is between
    passes: a loader of another world size resumes it with the next epoch, the order a fresh loader of that world
    size gives (before, it refused as 'saved mid-epoch ... 0 items of this rank drawn')."""

    def make(ws):
        return BatchLoader(_Items(8), ResumableSampler(8, world_size=ws, seed=0), batch_size=2, num_threads=1,
                           prefetch=4, collate=_indices)  # fmt: skip

    loader = make(2)
    it = iter(loader)
    head = [next(it)["index"], next(it)["index"]]  # rank 0's 4 items: its whole epoch
    assert sorted(i for b in head for i in b) == sorted(ResumableSampler(8, world_size=2, seed=0))
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["pending"] == [] and state["epoch_drawn"] and state["sampler"]["epoch"] == 1
    resumed, fresh = make(1), make(1)
    resumed.load_state_dict(state)
    list(fresh)  # epoch 0
    assert [b["index"] for b in resumed] == []  # what was left of epoch 0
    assert [b["index"] for b in resumed] == [b["index"] for b in fresh]  # epoch 1 under world size 1


class _SomeBad(_Items):
    """_Items whose ``bad`` indices raise SkipItem."""

    def __init__(self, n: int, bad: set[int]) -> None:
        super().__init__(n)
        self.bad = bad

    def __getitem__(self, i: int) -> dict:
        if i in self.bad:
            raise SkipItem("bad")
        return super().__getitem__(i)


@pytest.mark.parametrize("drop_last", [False, True])
def test_batch_loader_resume_whose_rest_of_epoch_gives_no_batch(drop_last):
    """A checkpoint after an epoch's last full batch, when what is left of the epoch gives no batch (items bad, or
    fewer than batch_size with drop_last): the resumed pass ends empty, as the uninterrupted one did, and the next
    pass is the next epoch (before, the resumed pass raised 'all 2 items of this pass were skipped'). A whole epoch
    that gives no batch still raises, naming why."""
    ref = BatchLoader(_Items(10), ResumableSampler(10, seed=0), batch_size=4, prefetch=2, collate=_indices)
    epoch0 = [b["index"] for b in ref]
    bad = set() if drop_last else set(epoch0[-1])  # the epoch's last (partial) batch, when not dropped

    def make():
        return BatchLoader(_SomeBad(10, bad), ResumableSampler(10, seed=0), batch_size=4, num_threads=1,
                           prefetch=2, drop_last=drop_last, collate=_indices)  # fmt: skip

    loader = make()
    full = [[b["index"] for b in loader], [b["index"] for b in loader]]  # two uninterrupted epochs
    assert full[0] == epoch0[:2]
    loader = make()
    it = iter(loader)
    head = [next(it)["index"], next(it)["index"]]
    state = json.loads(json.dumps(loader.state_dict()))
    it.close()
    assert state["pending"] or state["sampler"]["consumed"] < 10  # the rest of epoch 0 is still to come
    resumed = make()
    resumed.load_state_dict(state)
    assert head + [b["index"] for b in resumed] == full[0]
    assert [b["index"] for b in resumed] == full[1]
    with pytest.raises(RuntimeError, match="all 10 items of this pass were skipped"):
        list(BatchLoader(_SomeBad(10, set(range(10))), ResumableSampler(10), batch_size=4, collate=_indices))
    with pytest.raises(RuntimeError, match="fewer than batch_size 11"):
        list(BatchLoader(_Items(10), ResumableSampler(10), batch_size=11, drop_last=True, collate=_indices))


def _indices(group: list[dict]) -> dict:
    return {"index": [x["index"] for x in group]}


def test_batch_loader_whose_every_item_is_skipped_names_the_files(tmp_path):
    """Every file of an epoch unusable: the error names them and why (before, only 'all 2 items of this pass were
    skipped', with nothing to say which files or why unless one read back through the log)."""
    write_video(tmp_path / "short.webm", num_frames=2, height=16, width=16)
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"video": "gone.webm"}) + "\n" + json.dumps({"video": "short.webm"})
    )
    ds = VideoDataset(tmp_path / "m.jsonl", num_frames=4, height=16, width=16, decoder="pyav")
    with pytest.raises(RuntimeError, match="all 2 items of this pass were skipped") as e:
        list(BatchLoader(ds, ResumableSampler(2, shuffle=False), batch_size=1, collate=_indices))
    assert "gone.webm" in str(e.value) and "does not exist" in str(e.value)
    assert "short.webm" in str(e.value) and "too few frames" in str(e.value)
