"""PyAV decodes a clip from the keyframe at or before its first frame (a seek), giving the frames a decode from the
start gives: H.264 with B-frames (closed and open GOPs, MP4 and Matroska), VP9, MJPEG, a first pts that is not 0,
an MP4 edit list, a variable frame rate."""

import fractions

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV writes and decodes the test videos")

from engine.data.decode import PyAVDecoder, frames_to_rgb, probe  # noqa: E402
from engine.data.synthetic import make_frames  # noqa: E402
from engine.data.transforms import frame_indices  # noqa: E402

N, GOP = 60, 12
X264 = {"preset": "medium", "bf": "3", "g": str(GOP), "crf": "20", "sc_threshold": "0"}
VFR_MS = [round(1000 * (k / 5 if k < 30 else 6 + (k - 30) / 30)) for k in range(N)]  # 5 fps, then 30 fps
FILES = {
    "h264_bframes.mp4": {"codec": "libx264", "opts": X264},
    "h264_open_gop.mp4": {"codec": "libx264", "opts": {**X264, "x264-params": "open-gop=1"}},
    "h264_pts_from_100.mp4": {"codec": "libx264", "opts": X264, "pts0": 100},
    "h264_pts_from_100.mkv": {"codec": "libx264", "opts": X264, "pts0": 100},
    "vp9.webm": {"codec": "libvpx-vp9", "opts": {"g": str(GOP), "crf": "30", "b": "0", "cpu-used": "8"}},
    "mjpeg.mkv": {"codec": "mjpeg", "opts": {}},
    "h264_vfr.mkv": {"codec": "libx264", "opts": X264, "times_ms": VFR_MS},
}


def write(path, codec, opts, pts0=0, times_ms=None):
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=24)
        s.width = s.height = 64
        s.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if times_ms:
            s.codec_context.time_base = fractions.Fraction(1, 1000)
        s.options = opts
        for k, f in enumerate(make_frames(N, 64, 64)):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            if times_ms:
                vf.pts, vf.time_base = times_ms[k], fractions.Fraction(1, 1000)
            elif pts0:
                vf.pts = pts0 + k
            for pk in s.encode(vf):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    return path


def cut_with_edit_list(src, dst, k0=16):
    """``src`` copied without re-encoding with its first k0 frames before time 0: an MP4 edit list drops them."""
    with av.open(str(src)) as i, av.open(str(dst), "w") as o:
        ist = i.streams.video[0]
        ost = o.add_stream_from_template(ist)
        shift = k0 * round(1 / (24 * ist.time_base))
        for pk in i.demux(ist):
            if pk.size:
                pk.pts, pk.dts, pk.stream = pk.pts - shift, pk.dts - shift, ost
                o.mux(pk)
    return dst


def from_start(path) -> torch.Tensor:
    """Every frame, decoded from the start in one pass (the reference)."""
    with av.open(str(path)) as c:
        return frames_to_rgb(list(c.decode(video=0)))


def keyframe_indices(path) -> list[int]:
    """Display-order indices of the keyframes (from the packets)."""
    with av.open(str(path)) as c:
        pkts = [(p.pts, p.is_keyframe) for p in c.demux(video=0) if p.size and not p.is_discard]
    shown = sorted(t for t, _ in pkts)
    return sorted(shown.index(t) for t, key in pkts if key)


@pytest.mark.parametrize("name", [*FILES, "h264_edit_list.mp4"])
def test_clips_decoded_after_a_seek_equal_a_decode_from_the_start(tmp_path, name):
    """Before, every clip was decoded from the file's start (a clip at the end of a long video cost the whole
    video); now from the keyframe before it, frame for frame as before: clips starting on a keyframe, just after
    it, just before the next, every start, and strided (fps resampled) clips."""
    if name == "h264_edit_list.mp4":
        path = cut_with_edit_list(write(tmp_path / "src.mp4", "libx264", X264), tmp_path / name)
    else:
        path = write(tmp_path / name, **FILES[name])
    ref = from_start(path)
    n = len(ref)
    assert n == probe(path).num_frames and all(not torch.equal(ref[k], ref[k + 1]) for k in range(n - 1))
    keys = keyframe_indices(path)
    assert len(keys) >= 3  # several GOPs, so later clips can seek
    dec = PyAVDecoder()
    starts = {s for k in keys for s in (k, k + 1, k - 1) if 0 <= s <= n - 4}
    clips = [list(range(s, s + 4)) for s in sorted(starts | set(range(0, n - 4, 5)))]
    clips += [[s, s + 2, s + 5] for s in range(0, n - 5, 7)] + [[n - 1], [n - 3, n - 2]]
    seeked = 0
    for idx in clips:
        got = dec.decode(path, idx)
        assert torch.equal(got, ref[idx]), (name, idx)
        seeked += dec._decode_from_keyframe(path, idx) is not None
    # clips past the first GOP and any open-GOP leading frames: all decoded after a seek
    late = [idx for idx in clips if min(idx) >= keys[1] + 3]
    assert seeked >= len(late) > 0


def test_avi_with_b_frames_gives_the_frames_a_decode_from_the_start_gives(tmp_path):
    """H.264 with B-frames in AVI, which stores no presentation times (packet pts follow the decode order): before,
    the seek matched decoded frames to indices by those pts and returned other frames of the GOP than asked (a
    clip from frame 21 on); such files are decoded from the start."""
    path = write(tmp_path / "h264_bframes.avi", "libx264", X264)
    with av.open(str(path)) as c:
        pts = [p.pts for p in c.demux(video=0) if p.size]
    assert pts == sorted(pts)  # the case under test: no reordering in the container's pts
    ref = from_start(path)
    n = len(ref)
    assert n == N and all(not torch.equal(ref[k], ref[k + 1]) for k in range(n - 1))
    dec = PyAVDecoder()
    for idx in [[s, s + 1, s + 2, s + 3] for s in range(0, n - 4, 3)] + [
        [s, s + 5] for s in range(0, n - 5, 7)
    ]:
        assert torch.equal(dec.decode(path, idx), ref[idx]), idx


def test_variable_frame_rate_clip_sampled_by_time_after_a_seek(tmp_path):
    """A clip at 10 fps from the 30 fps part of a variable-rate file (indices by presentation time) decodes to the
    frames a decode from the start gives."""
    path = write(tmp_path / "vfr.mkv", **FILES["h264_vfr.mkv"])
    info = probe(path)
    idx = frame_indices(info.num_frames, info.fps, 6, 10.0, start=40, timestamps=info.timestamps)
    assert idx == [40, 43, 46, 49, 52, 55]
    dec = PyAVDecoder()
    assert torch.equal(dec.decode(path, idx), from_start(path)[idx])
    assert dec._decode_from_keyframe(path, idx) is not None


def test_clip_past_the_end_fails_as_before(tmp_path):
    """A clip past the last frame fails as a decode from the start does (the seek falls back to it)."""
    from engine.data.decode import DecodeError

    path = write(tmp_path / "a.mp4", **FILES["h264_bframes.mp4"])
    with pytest.raises(DecodeError, match="decodable frames"):
        PyAVDecoder().decode(path, [N + 5])
    assert np.array_equal(PyAVDecoder().decode(path, [N - 1]).numpy(), from_start(path)[[N - 1]].numpy())
