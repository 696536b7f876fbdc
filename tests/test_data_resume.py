"""VideoDataset.iterate(sampler) across epochs and resumes: a resumed epoch whose rest is a bad file ends as the
uninterrupted one did, and random clip starts follow the sampler's epoch."""

import json

import pytest

pytest.importorskip("av", reason="PyAV writes the test videos")


def test_resumed_rest_of_epoch_with_only_a_bad_file_ends_quietly(tmp_path):
    """Before, the resumed pass raised 'all 1 items of this pass were skipped' (a training resumed from the
    checkpoint crashed where the uninterrupted one went on); a whole epoch of bad files still raises."""
    from engine.data import ResumableSampler, VideoDataset
    from engine.data.synthetic import write_video

    rows = []
    for i in range(6):
        write_video(tmp_path / f"v{i}.webm", ident=i, num_frames=2, height=16, width=16)
        rows.append(json.dumps({"video": f"v{i}.webm", "caption": f"c{i}"}))
    (tmp_path / "m.jsonl").write_text("\n".join(rows))
    last = list(ResumableSampler(6, seed=0))[-1]
    (tmp_path / f"v{last}.webm").write_bytes(b"not a video")

    def make():
        ds = VideoDataset(tmp_path / "m.jsonl", num_frames=2, height=16, width=16, decoder="pyav")
        return ds, ResumableSampler(len(ds), seed=0)

    ds, s = make()
    full = [[it["caption"] for it in ds.iterate(s)] for _ in range(2)]  # two uninterrupted epochs
    ds, s = make()
    head = []
    for it in ds.iterate(s):
        head.append(it["caption"])
        if len(head) == 5:
            break
    state = json.loads(json.dumps(s.state_dict()))
    assert state["epoch"] == 0 and state["consumed"] == 5  # only the bad file is left of epoch 0
    ds, s = make()
    s.load_state_dict(state)
    assert head + [it["caption"] for it in ds.iterate(s)] == full[0]
    assert [it["caption"] for it in ds.iterate(s)] == full[1]
    for i in range(6):
        (tmp_path / f"v{i}.webm").write_bytes(b"")
    ds, s = make()
    with pytest.raises(RuntimeError, match="all 6 items of this pass were skipped"):
        list(ds.iterate(s))


def _grey_video(path, n: int = 30) -> None:
    """Frame k is flat grey 8k (lossless H.264): a clip's frames name themselves."""
    import av
    import numpy as np

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width = s.height = 16
        s.pix_fmt = "yuv420p"
        s.options = {"crf": "0", "preset": "ultrafast"}
        for k in range(n):
            for pk in s.encode(
                av.VideoFrame.from_ndarray(np.full((16, 16, 3), 8 * k, np.uint8), format="rgb24")
            ):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)


def test_random_clip_starts_follow_the_samplers_epoch(tmp_path):
    """clip_start='random' through ds.iterate(sampler): each epoch draws new starts, as BatchLoader's passes do,
    and a resumed epoch draws the uninterrupted one's (before, iterate left the dataset at epoch 0: every epoch
    trained the same clips of every video)."""
    from engine.data import BatchLoader, ResumableSampler, VideoDataset

    for v in range(6):
        _grey_video(tmp_path / f"g{v}.mkv")
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({"video": f"g{v}.mkv"}) for v in range(6)))

    def make():
        ds = VideoDataset(tmp_path / "m.jsonl", num_frames=4, height=16, width=16, clip_start="random",
                          decoder="pyav")  # fmt: skip
        return ds, ResumableSampler(6, seed=1)

    def frames(item) -> list[int]:
        return [round((g + 1) * 127.5 / 8) for g in item["video"][0, :, 8, 8].tolist()]

    ds, s = make()
    epochs = [{it["index"]: frames(it) for it in ds.iterate(s)} for _ in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(6))
        assert all(f == list(range(f[0], f[0] + 4)) and 0 <= f[0] <= 26 for f in e.values())
    assert epochs[0] != epochs[1] != epochs[2]
    ds, s = make()
    loader = BatchLoader(ds, s, batch_size=1, num_threads=1)
    assert [{b["index"][0]: frames({"video": b["video"][0]}) for b in loader} for _ in range(3)] == epochs
    ds, s = make()
    list(ds.iterate(s))
    head = {}
    for it in ds.iterate(s):
        head[it["index"]] = frames(it)
        if len(head) == 2:
            break
    ds, s2 = make()
    s2.load_state_dict(s.state_dict())  # mid-epoch 1, in a new process
    assert {**head, **{it["index"]: frames(it) for it in ds.iterate(s2)}} == epochs[1]
