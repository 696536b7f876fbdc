"""VideoDataset.iterate(sampler) resumed from a checkpoint near the end of an epoch whose last item is a bad file:
the resumed pass ends as the uninterrupted one did."""

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
