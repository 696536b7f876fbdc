"""Video data pipeline: decoders agree, clips are the right frames, bad inputs are skipped and logged.

Every video is encoded here with PyAV (VP9 in WebM/MKV, H.264 in MP4) from known frames
(engine.data.synthetic), then broken on purpose where a test needs a bad file.
"""

import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data import VideoDataset, bucket_batches
from engine.data.decode import (
    DaliDecoder,
    PyAVDecoder,
    build_decoders,
    dali_available,
    nvdec_available,
    probe,
    yuv_to_rgb,
)
from engine.data.synthetic import ident_color, make_frames, write_image, write_video
from engine.data.transforms import frame_indices, make_buckets, max_start, nearest_bucket

av = pytest.importorskip("av", reason="PyAV writes and reads every test video here")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.double() - b.double()) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """Good and bad media files, written once for the module."""
    d = tmp_path_factory.mktemp("media")
    for i in range(3):
        write_video(d / f"vp9_{i}.webm", ident=i)
    write_video(d / "vp9_3.mkv", ident=3)
    write_video(d / "h264_4.mp4", codec="libx264", ident=4)
    write_video(d / "fast_5.webm", ident=5, fps=24, num_frames=24)
    write_image(d / "img_6.png", ident=6)
    good = (d / "vp9_0.webm").read_bytes()
    (d / "truncated.webm").write_bytes(good[: len(good) // 3])
    corrupt = bytearray(good)
    corrupt[40:] = np.random.default_rng(1).integers(0, 256, len(good) - 40, dtype=np.uint8).tobytes()
    (d / "corrupt.webm").write_bytes(bytes(corrupt))
    (d / "empty.mp4").write_bytes(b"")
    (d / "frames.mp4").mkdir()  # a folder named like a video (before: 'file does not exist')
    (d / "notes.mp4").write_text("this is not a video\n" * 20)
    write_video(d / "short.webm", num_frames=2)
    write_video(d / "tenbit.mp4", codec="libx264", pix_fmt="yuv420p10le")
    write_video(d / "tiny.webm", height=8, width=8)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    # H.264 with garbage inside one frame's packet: FFmpeg conceals it and flags the frame corrupt
    h264 = write_video(d / "h264_ok.mkv", codec="libx264", num_frames=12, height=32, width=32)
    with av.open(str(h264)) as c:
        pos, size = [(p.pos, p.size) for p in c.demux(c.streams.video[0]) if p.size > 0][2]
    damaged = bytearray(h264.read_bytes())
    damaged[pos + size // 4 : pos + 3 * size // 4] = (
        np.random.default_rng(2).integers(0, 256, size // 2, dtype=np.uint8).tobytes()
    )
    (d / "damaged_h264.mkv").write_bytes(bytes(damaged))
    # a PNG whose header claims 40000 x 40000 pixels (PIL refuses it as a decompression bomb)
    png = bytearray(write_image(d / "small.png", height=32, width=32).read_bytes())
    png[16:24] = struct.pack(">II", 40000, 40000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    (d / "bomb.png").write_bytes(bytes(png))
    return d


def write_manifest(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = [("vp9_0.webm", 0), ("vp9_1.webm", 1), ("vp9_2.webm", 2), ("vp9_3.mkv", 3), ("h264_4.mp4", 4)]
BAD = {
    "truncated.webm": "",
    "corrupt.webm": "",
    "empty.mp4": "zero-length",
    "notes.mp4": "",
    "short.webm": "too few frames",
    "tenbit.mp4": "pixel format",
    "tiny.webm": "resolution",
    "missing.webm": "does not exist",
    "frames.mp4": "a folder, not a video file",
    "broken.png": "image",
    "damaged_h264.mkv": "frame 2 is corrupt",
    "bomb.png": "DecompressionBombError",
}


def test_dali_cpu_and_pyav_decode_vp9_to_the_same_frames(media):
    reason = dali_available()
    if reason:
        pytest.skip(f"DALI CPU decoder unavailable: {reason}")
    dali, pyav = DaliDecoder("cpu"), PyAVDecoder()
    for name in ("vp9_0.webm", "vp9_3.mkv", "fast_5.webm"):
        idx = [0, 3, 7, 8, 15]
        (d,) = dali.decode_batch([(media / name, idx)])
        assert not isinstance(d, Exception), f"DALI CPU failed on {name}: {d}"
        p = pyav.decode(media / name, idx)
        assert d.shape == p.shape == (5, 64, 64, 3) and d.dtype == p.dtype == torch.uint8
        assert psnr(d, p) >= 40.0, name
        # Both are the right frames: close to the encoder's input, and further from the wrong frames.
        src = torch.from_numpy(make_frames(24, 64, 64, int(name.split("_")[1][0])))
        assert psnr(p, src[idx]) > 28.0
        assert psnr(p, src[[i + 1 for i in idx]]) < psnr(p, src[idx]) - 3


@pytest.mark.parametrize(
    "codec,pix_fmt,height,width",
    [("libvpx-vp9", "yuv420p", 33, 49), ("mjpeg", "yuvj420p", 33, 49), ("libvpx-vp9", "yuv422p", 32, 48),
     ("mjpeg", "yuvj422p", 32, 48), ("libvpx-vp9", "yuv444p", 32, 48)],
)  # fmt: skip
def test_dali_cpu_and_pyav_agree_on_odd_sizes_and_other_subsamplings(tmp_path, codec, pix_fmt, height, width):
    """Odd-sized 4:2:0, 4:2:2 and 4:4:4 decode to the same RGB on both CPU backends (to 1/255): PyAV's
    frames go through DALI's conversion, chroma resized to the frame size (before, 37-42 dB apart, up to
    20/255, so a file's frames depended on which backend took it)."""
    if dali_available():
        pytest.skip(f"DALI CPU decoder unavailable: {dali_available()}")
    path = write_video(tmp_path / f"v.{'webm' if codec.startswith('libvpx') else 'mkv'}", codec=codec,
                       pix_fmt=pix_fmt, height=height, width=width, num_frames=4)  # fmt: skip
    assert probe(path).pix_fmt == pix_fmt
    (d,) = DaliDecoder("cpu").decode_batch([(path, [0, 3])])
    assert not isinstance(d, Exception), d
    p = PyAVDecoder().decode(path, [0, 3])
    assert d.shape == p.shape == (2, height, width, 3)
    assert (d.int() - p.int()).abs().max().item() <= 1


def test_chroma_resize_is_bilinear_with_centred_siting():
    """The chroma resampling against torch's bilinear interpolation (align_corners=False) for 2x, odd and
    1x sizes along either axis."""
    import torch.nn.functional as F

    from engine.data.decode import _resize_linear

    c = np.random.default_rng(0).uniform(0, 255, (3, 7, 5)).astype(np.float32)
    for h, w in ((14, 10), (13, 9), (7, 5), (7, 9)):
        ours = _resize_linear(_resize_linear(c, 1, h), 2, w)
        ref = F.interpolate(torch.from_numpy(c)[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        np.testing.assert_allclose(ours, ref.numpy(), rtol=0, atol=1e-3)


def test_nvdec_check_loads_the_library_or_says_how_to_get_it():
    assert nvdec_available("libc.so.6") is None  # a library that loads
    reason = nvdec_available("libnvcuvid_not_here.so.1")
    assert "libnvcuvid_not_here.so.1 does not load" in reason and "NVIDIA_DRIVER_CAPABILITIES" in reason


def test_dali_cpu_batch_isolates_a_bad_file(media):
    if dali_available():
        pytest.skip(f"DALI CPU decoder unavailable: {dali_available()}")
    out = DaliDecoder("cpu").decode_batch(
        [(media / "vp9_1.webm", [0, 1]), (media / "truncated.webm", [0, 15])]
    )
    assert isinstance(out[0], torch.Tensor) and out[0].shape == (2, 64, 64, 3)
    assert isinstance(out[1], Exception) and "truncated.webm" in str(out[1])


@pytest.mark.parametrize("decoder", ["pyav", "dali_cpu"])
def test_full_range_marked_yuv420p_is_read_as_full_range(tmp_path, decoder):
    """A yuv420p stream marked full range (color_range JPEG, as phones and current encoders write it; the
    yuvj formats are deprecated) decodes to its source greys on every backend (PyAV read it as limited range,
    stretching 30 / 128 / 225 to 15 / 129 / 242)."""
    if decoder == "dali_cpu" and dali_available():
        pytest.skip(f"DALI CPU decoder unavailable: {dali_available()}")
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, :16], rgb[:, 16:32], rgb[:, 32:] = 30, 128, 225
    path = tmp_path / "full.webm"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libvpx-vp9", rate=8)
        s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
        s.codec_context.color_range = 2
        s.options = {"crf": "4", "b": "0", "cpu-used": "8"}
        for _ in range(4):
            f = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            f.color_range = 2
            for pk in s.encode(f):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    v = VideoDataset(write_manifest(tmp_path / "m.jsonl", [{"video": str(path)}]), num_frames=2, height=32,
                     width=48, decoder=decoder)[0]["video"]  # fmt: skip
    got = [round((v[0, 0, 16, x].item() + 1) * 127.5) for x in (8, 24, 40)]
    assert all(abs(a - b) <= 3 for a, b in zip(got, [30, 128, 225])), got


def test_yuv420_conversion_is_bt601_limited_range():
    # Reference: the BT.601 coefficients as the standard tables give them (1.402, 0.344136, 0.714136,
    # 1.772), on flat chroma so that chroma upsampling cannot matter; FFmpeg's swscale within its
    # fixed-point error.
    rng = np.random.default_rng(0)
    y = rng.integers(16, 236, (32, 48), dtype=np.uint8)
    u = np.full((16, 24), 90, np.uint8)
    v = np.full((16, 24), 170, np.uint8)
    ours = yuv_to_rgb(torch.from_numpy(y), torch.from_numpy(u), torch.from_numpy(v)).int()
    yy = (y.astype(np.float64) - 16) * 255 / 219
    cb, cr = (90 - 128) * 255 / 224, (170 - 128) * 255 / 224
    ref = np.stack([yy + 1.402 * cr, yy - 0.344136 * cb - 0.714136 * cr, yy + 1.772 * cb], -1)
    ref = torch.from_numpy(np.clip(np.round(ref), 0, 255)).int()
    assert (ours - ref).abs().max().item() <= 1
    frame = av.VideoFrame(48, 32, "yuv420p")
    for plane, arr in zip(frame.planes, (y, u, v)):
        buf = np.zeros((arr.shape[0], plane.line_size), np.uint8)
        buf[:, : arr.shape[1]] = arr
        plane.update(buf.tobytes())
    assert (ours - torch.from_numpy(frame.to_ndarray(format="rgb24")).int()).abs().max().item() <= 3


def test_probe_reads_stream_parameters(media):
    info = probe(media / "fast_5.webm")
    assert (info.codec, info.width, info.height, info.num_frames) == ("vp9", 64, 64, 24)
    assert info.fps == pytest.approx(24.0)
    assert probe(media / "h264_4.mp4").codec == "h264"


def test_probe_names_the_format_not_the_decoder_pyav_picked(tmp_path):
    """AV1 (PyAV decodes it with libdav1d): probe said 'libdav1d', a name no backend lists, so decoder 'dali' (NVDEC,
    which takes AV1) skipped every AV1 file as an unsupported codec and 'auto' never gave one to NVDEC; it is
    'av1' now, the format's name, as FFmpeg's codec table spells it."""
    from engine.data.decode import DALI_GPU_CODECS

    encoders = [e for e in ("libsvtav1", "libaom-av1", "librav1e") if e in av.codecs_available]
    if not encoders:
        pytest.skip("PyAV has no AV1 encoder")
    path = write_video(tmp_path / "av1.mp4", codec=encoders[0], num_frames=4)
    with av.open(str(path)) as c:
        if c.streams.video[0].codec_context.name == "av1":
            pytest.skip("PyAV decodes AV1 with FFmpeg's own 'av1' decoder here (the case: another name)")
    info = probe(path)
    assert info.codec == "av1" and info.codec in DALI_GPU_CODECS and info.num_frames == 4


def test_frame_indices_at_target_fps():
    assert frame_indices(24, 24.0, 4, 8.0) == [0, 3, 6, 9]
    assert frame_indices(24, 24.0, 4, 8.0, start=14) == [14, 17, 20, 23]
    assert frame_indices(16, 8.0, 5, 0.0) == [0, 1, 2, 3, 4]
    assert frame_indices(10, 10.0, 4, 15.0) == [0, 1, 1, 2]  # upsampling the frame rate repeats frames
    with pytest.raises(ValueError, match="only 9 frames"):
        frame_indices(9, 24.0, 4, 8.0)
    # timestamps: a constant rate keeps the frame-count rule; a variable one samples by time
    cfr = [k / 24 for k in range(24)]
    assert frame_indices(24, 24.0, 4, 8.0, start=2, timestamps=cfr) == [2, 5, 8, 11]
    vfr = [k / 5 for k in range(10)] + [2 + k / 30 for k in range(30)]  # 5 fps for 2 s, then 30 fps for 1 s
    assert frame_indices(40, 13.3, 4, 5.0, timestamps=vfr) == [0, 1, 2, 3]
    assert frame_indices(40, 13.3, 4, 5.0, start=9, timestamps=vfr) == [9, 10, 16, 22]  # t = 1.8 + 0.2 k
    assert max_start(40, 13.3, 4, 5.0, timestamps=vfr) == 21  # t = 2 + 11 / 30, + 0.6 <= 2.967 + half a frame
    with pytest.raises(ValueError, match="s of video"):
        frame_indices(40, 13.3, 20, 5.0, timestamps=vfr)


def test_variable_frame_rate_video_plays_at_the_target_fps(tmp_path):
    """A clip asked for at 5 fps from a file at 5 fps then 30 fps (one stream, frame k's grey encodes k):
    its frames are 0.2 s apart in the file's own time (sampling by the average rate picked frames 1.2 s
    apart), and a constant-rate file is sampled as before."""
    import fractions

    times = [k / 5 for k in range(20)] + [4 + k / 30 for k in range(20)]
    path = tmp_path / "vfr.mkv"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        s.codec_context.time_base = fractions.Fraction(1, 1000)
        s.options = {"crf": "0", "preset": "ultrafast", "bf": "0"}
        for k, t in enumerate(times):
            f = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 4 * k, np.uint8), format="rgb24")
            f.pts, f.time_base = round(t * 1000), fractions.Fraction(1, 1000)
            for pk in s.encode(f):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    info = probe(path)
    assert info.num_frames == 40 and np.allclose(info.timestamps, times, atol=1e-3)
    m = write_manifest(tmp_path / "m.jsonl", [{"video": str(path)}])
    v = VideoDataset(m, num_frames=6, height=32, width=32, fps=5, decoder="pyav")[0]["video"]
    picked = ((v[0, :, 16, 16] + 1) * 127.5 / 4).round().int().tolist()
    assert [times[k] for k in picked] == pytest.approx([j / 5 for j in range(6)], abs=1e-6)
    assert probe(path_cfr := write_video(tmp_path / "cfr.webm", num_frames=24, fps=24)).timestamps
    assert VideoDataset(write_manifest(tmp_path / "c.jsonl", [{"video": str(path_cfr)}]), num_frames=4, height=64,
                        width=64, fps=8, decoder="pyav")[0]["video"].shape[1] == 4  # fmt: skip


def test_mp4_cut_with_stream_copy_counts_only_the_frames_its_edit_list_keeps(tmp_path):
    """An MP4 cut at frame 4 without re-encoding (packets from the keyframe before the cut, an edit list that
    starts at the cut; frame k's grey encodes k) plays 26 frames: probe counts those, not the 30 packets, so
    random clip starts stay inside the video and clips start at the cut (probe counted 30, and starts past 2
    failed to decode, quarantining the rows)."""
    src, cut, k0 = tmp_path / "src.mp4", tmp_path / "cut.mp4", 4
    with av.open(str(src), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        s.options = {"crf": "0", "preset": "ultrafast", "g": "10", "bf": "0"}
        for k in range(30):
            for pk in s.encode(
                av.VideoFrame.from_ndarray(np.full((32, 32, 3), 8 * k, np.uint8), format="rgb24")
            ):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    # stream copy with the first 4 frames before time 0: the MP4 muxer writes an edit list starting at frame 4
    with av.open(str(src)) as i, av.open(str(cut), "w") as o:
        ist = i.streams.video[0]
        ost = o.add_stream_from_template(ist)
        shift = k0 * round(1 / (10 * ist.time_base))
        for pk in i.demux(ist):
            if pk.size:
                pk.pts, pk.dts, pk.stream = pk.pts - shift, pk.dts - shift, ost
                o.mux(pk)
    with av.open(str(cut)) as c:
        decoded = sum(1 for _ in c.decode(video=0))
    info = probe(cut)
    assert decoded == 30 - k0 and info.num_frames == decoded and len(info.timestamps) == decoded
    assert info.timestamps[0] == 0.0
    m = write_manifest(tmp_path / "m.jsonl", [{"video": str(cut)}] * 8)
    ds = VideoDataset(m, num_frames=24, height=32, width=32, clip_start="random", decoder="pyav")
    items = list(ds)
    assert ds.skipped == [] and len(items) == 8
    for it in items:
        grey = ((it["video"][0, :, 16, 16] + 1) * 127.5 / 8).round().int().tolist()
        assert grey == list(range(grey[0], grey[0] + 24)) and k0 <= grey[0] <= 30 - 24


def test_buckets_keep_area_and_pick_nearest_aspect():
    buckets = make_buckets(32, 32, multiple=16, aspect=True)
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in buckets)
    assert all(0.5 <= h * w / 1024 <= 1.6 for h, w in buckets)
    assert nearest_bucket(720, 1280, buckets) == max(
        buckets, key=lambda b: (b[1] / b[0] <= 16 / 9, b[1] / b[0])
    )
    assert make_buckets(32, 48, aspect=False) == [(32, 48)]


def _assert_training_size_clip_is_decoded_as_is(tmp_path, h: int, w: int) -> None:
    """With aspect buckets, a clip at the training size h x w comes out as PyAV decodes it (no resize or crop)."""
    path = write_video(tmp_path / "v.mp4", codec="libx264", num_frames=2, height=h, width=w, quality=30)
    m = write_manifest(tmp_path / "m.jsonl", [{"video": str(path)}])
    v = VideoDataset(m, num_frames=2, height=h, width=w, aspect_buckets=True, decoder="pyav")[0]["video"]
    decoded = PyAVDecoder().decode(path, [0, 1])  # (T, H, W, 3)
    assert v.shape == (3, 2, h, w)
    assert torch.equal(v, decoded.permute(3, 0, 1, 2).float() / 127.5 - 1)


def test_the_training_size_is_a_bucket_and_a_clip_at_it_is_not_resampled(tmp_path):
    """Wan trains at 480 x 832 and 720 x 1280: with aspect buckets those sizes (and their portrait transposes) are
    buckets, and a clip already at 832 x 480 comes out as decoded (before, it went to the 16:9 bucket 480 x 848:
    upscaled 1.02x and cropped). 16:9 footage goes to the training size, and buckets stay multiples of 16."""
    for h, w in ((480, 832), (720, 1280)):
        buckets = make_buckets(h, w, multiple=16)
        assert {(h, w), (w, h)} <= set(buckets) and all(a % 16 == 0 and b % 16 == 0 for a, b in buckets)
        assert nearest_bucket(h, w, buckets) == (h, w) and nearest_bucket(w, h, buckets) == (w, h)
        assert nearest_bucket(1080, 1920, buckets) == (h, w)
        assert len(buckets) == len(make_buckets(h + 1, w, multiple=16))  # replaced the 16:9 / 9:16 ones
    _assert_training_size_clip_is_decoded_as_is(tmp_path, 480, 832)


def test_a_near_square_training_size_stays_a_bucket(tmp_path):
    """A training size near square (240 x 256, 480 x 512): its transpose took the place of the bucket nearest to it,
    the training size itself, so a clip at 256 x 240 went to the portrait bucket 240 x 256 (upscaled 1.07x and
    cropped). Both are buckets now, in place of the 1:1 one, and a clip at the training size comes out as decoded."""
    for h, w in ((240, 256), (480, 512), (512, 480)):
        buckets = make_buckets(h, w, multiple=16)
        assert {(h, w), (w, h)} <= set(buckets), (h, w, buckets)
        assert nearest_bucket(h, w, buckets) == (h, w) and nearest_bucket(w, h, buckets) == (w, h)
        assert len(buckets) == len(make_buckets(h + 1, w, multiple=16)) + 1  # both in place of the 1:1 bucket
    _assert_training_size_clip_is_decoded_as_is(tmp_path, 240, 256)


def test_dataset_yields_the_right_frames_and_text(media, tmp_path):
    m = write_manifest(
        tmp_path / "m.jsonl",
        [
            {"video": str(media / "fast_5.webm"), "task": "t5", "id": 5},
            {"image": str(media / "img_6.png"), "caption": "c6"},
        ],
    )
    ds = VideoDataset(m, num_frames=4, height=64, width=64, fps=8.0, decoder="pyav")
    items = list(ds)
    assert [it["index"] for it in items] == [0, 1] and ds.skipped == []
    v = items[0]["video"]
    assert v.shape == (3, 4, 64, 64) and v.dtype == torch.float32 and -1 <= v.min() and v.max() <= 1
    assert items[0]["task"] == "t5" and items[0]["id"] == 5
    # 24 fps source sampled at 8 fps = frames 0, 3, 6, 9 of the encoder's input.
    got = ((v.permute(1, 2, 3, 0) + 1) * 127.5).round()  # (3, T, H, W) -> (T, H, W, 3)
    src = torch.from_numpy(make_frames(24, 64, 64, 5))
    assert (
        psnr(got, src[[0, 3, 6, 9]]) > 28 and psnr(got, src[[0, 1, 2, 3]]) < psnr(got, src[[0, 3, 6, 9]]) - 3
    )
    img = items[1]["video"]
    assert img.shape == (3, 1, 64, 64) and items[1]["caption"] == "c6"
    assert (
        psnr(
            ((img[:, 0].permute(1, 2, 0) + 1) * 127.5).round(), torch.from_numpy(make_frames(1, 64, 64, 6)[0])
        )
        > 40
    )


def test_image_with_exif_orientation_is_read_upright(tmp_path):
    """A phone photo: pixels stored in sensor order (portrait) plus EXIF Orientation 6 (rotate 90 degrees clockwise
    to show). The dataset gives the landscape picture a viewer shows, as the same picture saved upright does
    (before, it came out sideways, in the portrait bucket)."""
    from PIL import Image

    shown = make_frames(1, 32, 64, 5)[0]  # (H, W, 3): 64 wide, ident colour top-left
    Image.fromarray(shown).save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90).save(
        tmp_path / "phone.jpg", exif=exif, quality=98
    )
    m = write_manifest(tmp_path / "m.jsonl", [{"image": "upright.png"}, {"image": "phone.jpg"}])
    ds = VideoDataset(
        m, num_frames=1, height=32, width=64, aspect_buckets=True, bucket_multiple=8, decoder="pyav"
    )
    upright, phone = ds[0]["video"], ds[1]["video"]
    assert phone.shape == upright.shape == (3, 1, 32, 64)
    assert _ident_of(phone) == 5 and psnr((phone + 1) * 127.5, (upright + 1) * 127.5) > 30


def test_resize_and_buckets_in_the_dataset(media, tmp_path):
    write_video(tmp_path / "wide.webm", height=32, width=64, ident=7)
    m = write_manifest(tmp_path / "m.jsonl", [{"video": "wide.webm"}, {"video": str(media / "vp9_0.webm")}])
    one = VideoDataset(m, num_frames=2, height=32, width=32, decoder="pyav")
    assert [tuple(it["video"].shape) for it in one] == [(3, 2, 32, 32)] * 2
    ds = VideoDataset(m, num_frames=2, height=64, width=64, aspect_buckets=True, decoder="pyav")
    shapes = [tuple(it["video"].shape[2:]) for it in ds]
    assert shapes == [nearest_bucket(32, 64, ds.buckets), (64, 64)]
    assert shapes[0][1] / shapes[0][0] == pytest.approx(2.0, rel=0.1)
    batches = list(bucket_batches(iter(ds), 2))
    assert sorted(b["video"].shape[0] for b in batches) == [1, 1]


def _ident_of(video: torch.Tensor) -> int:
    """Which synthetic video a clip came from, read from its top-left quarter's colour."""
    rgb = ((video[:, 0, :4, :4].mean((1, 2)) + 1) * 127.5).numpy()
    return min(range(27), key=lambda i: np.abs(ident_color(i).astype(float) - rgb).sum())


@pytest.mark.parametrize("decoder", ["auto", "pyav"])
def test_bad_inputs_are_skipped_counted_and_quarantined(media, tmp_path, decoder):
    rows: list = []
    for k, (name, ident) in enumerate(GOOD):
        rows.append({"video": str(media / name), "caption": f"video {ident}"})
        bad = list(BAD)[k % len(BAD) :: len(GOOD)]
        rows += [
            {"video": str(media / b), "caption": "bad"}
            if not b.endswith(".png")
            else {"image": str(media / b)}
            for b in bad
        ]
    rows += [
        "{not json",
        json.dumps(["a list"]),
        {"caption": "no media"},
        {"video": 3},
        {"video": "x.webm", "task": 7},
    ]
    q = tmp_path / "quarantine.jsonl"
    ds = VideoDataset(
        write_manifest(tmp_path / "m.jsonl", rows),
        num_frames=8,
        height=32,
        width=32,
        decoder=decoder,
        max_upscale=2.0,
        quarantine=q,
    )
    items = list(ds)
    assert len(items) == len(GOOD)
    for it in items:  # nothing mislabeled: the caption's number is the colour code in the frames
        assert it["caption"] == f"video {_ident_of(it['video'])}"
    skipped = dict(ds.skipped)
    assert len(ds.skipped) == len(BAD) + 5
    for name, why in BAD.items():
        assert why in skipped[str((media / name).resolve())], (name, skipped[str((media / name).resolve())])
    assert sum(":" in p and p.startswith(str(tmp_path)) for p in skipped) == 5
    logged = [json.loads(line) for line in q.read_text().splitlines()]
    assert [(e["path"], e["reason"]) for e in logged] == ds.skipped
    list(ds)  # a second epoch does not retry or re-log what was quarantined
    assert len(ds.skipped) == len(BAD) + 5


def test_explicit_decoder_that_cannot_take_a_codec_skips_with_the_reason(media, tmp_path):
    if dali_available():
        pytest.skip(f"DALI CPU decoder unavailable: {dali_available()}")
    m = write_manifest(
        tmp_path / "m.jsonl", [{"video": str(media / "h264_4.mp4")}, {"video": str(media / "vp9_1.webm")}]
    )
    ds = VideoDataset(m, num_frames=4, height=32, width=32, decoder="dali_cpu")
    assert [it["index"] for it in ds] == [1]
    assert "codec 'h264' not supported by decoder 'dali_cpu'" in ds.skipped[0][1]


def test_all_bad_stops_with_a_clear_error(media, tmp_path):
    m = write_manifest(tmp_path / "m.jsonl", [{"video": str(media / b)} for b in ("empty.mp4", "notes.mp4")])
    ds = VideoDataset(m, num_frames=4, height=32, width=32, decoder="pyav")
    with pytest.raises(RuntimeError, match="all 2 items of this pass were skipped"):
        list(ds)
    with pytest.raises(RuntimeError, match="no usable rows"):
        VideoDataset(write_manifest(tmp_path / "n.jsonl", ["{", "[]"]), num_frames=4, height=32, width=32)
    with pytest.raises(FileNotFoundError, match="manifest"):
        VideoDataset(tmp_path / "nope.jsonl", num_frames=4, height=32, width=32)
    # a folder given as the manifest (said "does not exist" before): says it is a folder and names its JSONL files
    with pytest.raises(
        IsADirectoryError, match=r"is a folder; expected a JSONL file.*\['m.jsonl', 'n.jsonl'\]"
    ):
        VideoDataset(tmp_path, num_frames=4, height=32, width=32)
    with pytest.raises(ValueError, match="decoder"):
        VideoDataset(m, num_frames=4, height=32, width=32, decoder="ffmpeg")


@pytest.mark.gpu
def test_dali_gpu_matches_pyav_on_h264(media):
    if dali_available() or nvdec_available():
        pytest.skip(f"DALI's GPU decoder unavailable: {dali_available() or nvdec_available()}")
    idx = [0, 5, 10, 15]
    (d,) = DaliDecoder("gpu").decode_batch([(media / "h264_4.mp4", idx)])
    assert not isinstance(d, Exception), d
    assert d.is_cuda and d.shape == (4, 64, 64, 3)
    assert psnr(d.cpu(), PyAVDecoder().decode(media / "h264_4.mp4", idx)) >= 35.0


def test_decoder_chains():
    """What each decoder choice tries, in order: NVDEC first where there is one, then DALI's CPU path (VP9
    files NVDEC refuses: an H100's takes VP9 from 128 x 128 only), then PyAV under "auto"."""
    if dali_available():
        pytest.skip(dali_available())
    gpu = torch.cuda.is_available() and nvdec_available() is None
    assert [d.name for d in build_decoders("auto")] == ["dali"] * gpu + ["dali_cpu", "pyav"]
    assert [d.name for d in build_decoders("dali_cpu")] == ["dali_cpu"]
    assert [d.name for d in build_decoders("pyav")] == ["pyav"]
    if gpu:
        assert [d.name for d in build_decoders("dali")] == ["dali", "dali_cpu"]
    else:
        with pytest.raises(RuntimeError, match="decoder 'dali'"):
            build_decoders("dali")


def test_building_decoders_does_not_fix_the_cuda_device(monkeypatch):
    """A dataset is often made before ``torch.cuda.set_device``: building its decoders must not read the current
    device (before, every rank's DALI GPU decoder took GPU 0 then). torch reports a GPU here; reading the device
    fails."""

    def no_device_yet():
        raise AssertionError("the CUDA device was read while building the decoders")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", no_device_yet)
    for choice in ("auto", "pyav") + (() if dali_available() else ("dali_cpu",)):
        assert build_decoders(choice)


@pytest.mark.gpu
def test_dali_gpu_decoder_takes_the_device_current_at_first_use(media, tmp_path):
    """A dataset made while GPU 0 was current, then ``set_device`` to another GPU (a rank's): its clips are
    decoded on that GPU (before, on GPU 0). With one GPU: the device is read at the first decode, not before."""
    if dali_available() or nvdec_available():
        pytest.skip(f"DALI's GPU decoder unavailable: {dali_available() or nvdec_available()}")
    m = write_manifest(tmp_path / "m.jsonl", [{"video": str(media / "h264_4.mp4")}])
    before = torch.cuda.current_device()
    try:
        torch.cuda.set_device(0)
        ds = VideoDataset(m, num_frames=4, height=32, width=32, decoder="dali")
        assert ds.decoders[0].name == "dali" and ds.decoders[0]._device_id is None
        rank_gpu = torch.cuda.device_count() - 1
        torch.cuda.set_device(rank_gpu)
        video = ds[0]["video"]
        assert video.device == torch.device("cuda", rank_gpu) == ds.decoders[0].device
        torch.cuda.set_device(0)
        assert ds[0]["video"].device == torch.device("cuda", rank_gpu)  # fixed from its first use on
    finally:
        torch.cuda.set_device(before)


@pytest.mark.gpu
def test_dataset_on_dali_gpu_yields_cuda_clips_matching_pyav(media, tmp_path):
    if dali_available() or nvdec_available():
        pytest.skip(f"DALI's GPU decoder unavailable: {dali_available() or nvdec_available()}")
    rows = [{"video": str(media / n), "caption": f"video {i}"} for n, i in GOOD] + [
        {"video": str(media / "corrupt.webm")}
    ]
    m = write_manifest(tmp_path / "m.jsonl", rows)
    gpu = list(VideoDataset(m, num_frames=8, height=32, width=32, decoder="dali"))
    cpu = list(VideoDataset(m, num_frames=8, height=32, width=32, decoder="pyav"))
    assert [it["caption"] for it in gpu] == [it["caption"] for it in cpu] == [f"video {i}" for _, i in GOOD]
    for g, c in zip(gpu, cpu):
        assert g["video"].is_cuda
        diff = ((g["video"].cpu() - c["video"]) * 127.5) ** 2
        assert 10 * math.log10(255.0**2 / max(diff.mean().item(), 1e-12)) >= 35.0
