"""A damaged or truncated VP9 WebM is quarantined, whichever decoder takes it. FFmpeg's VP9 decoder (PyAV's and
DALI's) conceals damage: garbage inside a frame's data gave wrong frames with no error and no corrupt flag, and a
truncated file gave its first frames as if it were a shorter video."""

import json

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV writes and damages the test videos")

from engine.data import VideoDataset  # noqa: E402
from engine.data.decode import DecodeError, check_vp9, dali_available  # noqa: E402
from engine.data.synthetic import make_frames  # noqa: E402

N, GOP, BAD = 24, 8, 10  # keyframes at 0, 8, 16; frame 10's packet is damaged


def write_vp9(path):
    with av.open(str(path), "w") as c:
        s = c.add_stream("libvpx-vp9", rate=8)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        s.options = {"g": str(GOP), "crf": "18", "b": "0", "cpu-used": "8"}
        for f in make_frames(N, 64, 64):
            for pk in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    return path


def ffmpeg_frames(path):
    """Every frame as FFmpeg's own VP9 decoder gives it (no error: it conceals), with the corrupt flags."""
    with av.open(str(path)) as c:
        frames = list(c.decode(video=0))
    return np.stack([f.to_ndarray(format="rgb24") for f in frames]), [f.is_corrupt for f in frames]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("damaged")
    good = write_vp9(d / "good.webm")
    data = good.read_bytes()
    with av.open(str(good)) as c:
        pkts = [(p.pos, p.size, p.is_keyframe) for p in c.demux(video=0) if p.size > 0]
    assert [k for k, (_, _, key) in enumerate(pkts) if key] == [0, 8, 16]
    pos, size, _ = pkts[BAD]
    damaged = bytearray(data)
    damaged[pos + size // 4 : pos + 3 * size // 4] = (
        np.random.default_rng(0).integers(0, 256, size // 2, dtype=np.uint8).tobytes()
    )
    (d / "damaged.webm").write_bytes(bytes(damaged))
    (d / "truncated.webm").write_bytes(data[: pkts[20][0] + pkts[20][1] // 2])  # cut inside frame 20
    return d


def test_the_damage_is_real_and_ffmpeg_conceals_it(files):
    ref, _ = ffmpeg_frames(files / "good.webm")
    got, corrupt = ffmpeg_frames(files / "damaged.webm")
    assert len(got) == N and not any(corrupt)
    diff = np.abs(got.astype(int) - ref).reshape(N, -1).max(1)
    assert (diff[:BAD] == 0).all() and (diff[BAD : GOP * 2] > 20).all() and (diff[GOP * 2 :] == 0).all(), diff
    with av.open(str(files / "truncated.webm")) as c:  # 20 frames of 24, read without an error
        assert sum(1 for _ in c.decode(video=0)) == 20


def test_check_vp9_covers_the_frames_a_clip_depends_on(files):
    for idx in ([0, 5], [16, 19], list(range(N))):
        check_vp9(files / "good.webm", idx)
    check_vp9(files / "damaged.webm", [0, 9])  # before the damage
    check_vp9(files / "damaged.webm", [16, 23])  # from the next keyframe: its frames are intact (above)
    for idx in ([8, 12], [12, 13], [3, 17]):  # from keyframe 0 or 8 through frame 10
        with pytest.raises(DecodeError, match=f"damaged.webm.*frame {BAD}"):
            check_vp9(files / "damaged.webm", idx)


@pytest.mark.parametrize("decoder", ["pyav", "dali_cpu"])
def test_damaged_and_truncated_vp9_are_quarantined(files, tmp_path, decoder):
    if decoder == "dali_cpu" and dali_available():
        pytest.skip(f"DALI CPU decoder unavailable: {dali_available()}")
    names = ["good.webm", "damaged.webm", "truncated.webm"]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"video": str(files / n)}) for n in names) + "\n")
    ds = VideoDataset(manifest, num_frames=16, height=64, width=64, decoder=decoder,
                      quarantine=tmp_path / "q.jsonl")  # fmt: skip
    items = list(ds)
    assert [it["path"] for it in items] == [str(files / "good.webm")]
    # the valid file's clip: the encoder's frames 0..15
    src = torch.from_numpy(make_frames(16, 64, 64)).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert (items[0]["video"] - src).abs().mean() < 0.02
    reasons = dict(ds.skipped)
    assert "frame 10" in reasons[str(files / "damaged.webm")], reasons
    assert "truncated" in reasons[str(files / "truncated.webm")], reasons
    logged = [json.loads(line)["path"] for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert logged == [str(files / "damaged.webm"), str(files / "truncated.webm")]


@pytest.mark.parametrize("movflags", ["", "faststart", "frag_keyframe+empty_moov"])
def test_a_truncated_mp4_is_refused_and_an_intact_one_is_not(tmp_path, movflags):
    # a faststart copy cut short kept its index (moov first) and gave its first frames as a shorter video
    from engine.data.decode import probe

    good = tmp_path / "good.mp4"
    with av.open(str(good), "w", options={"movflags": movflags} if movflags else {}) as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        for f in make_frames(16, 64, 64):
            for pk in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    data = good.read_bytes()
    assert probe(good).num_frames == 16
    padded = tmp_path / "padded.mp4"  # a few stray bytes after the last box are not a cut
    padded.write_bytes(data + b"\0\0\0")
    assert probe(padded).num_frames == 16
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.7)])
    with pytest.raises(DecodeError, match="cut.mp4': truncated file"):
        probe(cut)
