"""VideoDataset on less common inputs a real dataset holds: 16-bit and 32-bit images, phone videos with a display
rotation, a manifest with a byte-order mark."""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av", reason="the dataset's decoders import PyAV")

from engine.data import VideoDataset  # noqa: E402


def _manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_16_bit_grey_image_keeps_its_levels_and_32_bit_ones_are_skipped(tmp_path):
    """A 16-bit greyscale PNG (a scan, a depth map, a medical frame) gives the picture its 8-bit version gives
    (before, PIL's convert('RGB') clipped its samples at 255: every pixel above 255 / 65535 came out white); float
    and 32-bit integer images, whose range is unknown, are skipped naming the mode (before: black / white)."""
    from PIL import Image

    grey16 = np.linspace(0, 65535, 24 * 32).reshape(24, 32).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    Image.fromarray((grey16 >> 8).astype(np.uint8)).save(tmp_path / "g8.png")  # what an 8-bit export holds
    Image.fromarray(grey16.astype(np.float32) / 65535).save(tmp_path / "f32.tif")
    Image.fromarray(grey16.astype(np.int32) * 1000).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    rows = [{"image": n, "caption": n} for n in ("g16.png", "g8.png", "f32.tif", "i32.tif")]
    ds = VideoDataset(
        _manifest(tmp_path / "m.jsonl", rows), num_frames=1, height=24, width=32, decoder="pyav"
    )
    items = {it["caption"]: it["video"] for it in ds}
    assert sorted(items) == ["g16.png", "g8.png"]
    v16, v8 = ((items["g16.png"] + 1) * 127.5).round(), ((items["g8.png"] + 1) * 127.5).round()
    assert v16.shape == (3, 1, 24, 32) and (v16 - v8).abs().max().item() <= 1
    assert (v16[0] == v16[1]).all() and (v16[0] == v16[2]).all()
    reasons = dict(ds.skipped)
    assert "image mode 'F'" in reasons[str(tmp_path / "f32.tif")]
    assert "image mode 'I'" in reasons[str(tmp_path / "i32.tif")]


def _encode(path: Path, frames: np.ndarray, codec: str, rotation: int = 0) -> Path:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=8)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "yuv420p"
        s.options = {"crf": "10", "b": "0", "cpu-used": "8"} if "vpx" in codec else {"crf": "10"}
        if rotation:
            s.set_display_rotation(rotation)
        for f in frames:
            for pk in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    return path


@pytest.mark.parametrize(
    "suffix,codec,decoder",
    [(".mkv", "libvpx-vp9", "pyav"), (".mkv", "libvpx-vp9", "dali_cpu"), (".mp4", "libx264", "pyav")],
)
def test_phone_video_with_a_display_rotation_is_read_upright(tmp_path, suffix, codec, decoder):
    """A phone's portrait video: frames stored landscape plus a display matrix that turns them (-90, 90 or 180
    degrees, as players and ffmpeg show it). The dataset gives the clip a player shows, as the same frames
    encoded upright do, in the portrait bucket (before, sideways or upside down, in the landscape bucket)."""
    from engine.data.decode import dali_available, probe
    from engine.data.synthetic import make_frames

    if decoder == "dali_cpu" and dali_available():
        pytest.skip(f"DALI CPU decoder unavailable: {dali_available()}")
    shown = make_frames(4, 64, 32, ident=5)  # portrait, as a player shows it: 32 wide, 64 high
    _encode(tmp_path / f"upright{suffix}", shown, codec)
    rows = [{"video": f"upright{suffix}"}]
    for r in (-90, 90, 180):  # shown = stored turned counterclockwise by r
        stored = np.ascontiguousarray(np.rot90(shown, k=-r // 90, axes=(1, 2)))
        assert probe(_encode(tmp_path / f"r{r}{suffix}", stored, codec, rotation=r)).rotation % 360 == r % 360
        rows.append({"video": f"r{r}{suffix}"})
    ds = VideoDataset(_manifest(tmp_path / "m.jsonl", rows), num_frames=3, height=64, width=32,
                      aspect_buckets=True, bucket_multiple=8, decoder=decoder)  # fmt: skip
    ref, *turned = [it["video"] for it in ds]
    assert ds.skipped == [] and ref.shape == (3, 3, 64, 32)
    for r, v in zip((-90, 90, 180), turned):
        assert v.shape == ref.shape, r
        mse = (((v - ref) * 127.5) ** 2).mean().item()
        assert 10 * np.log10(255**2 / max(mse, 1e-9)) > 30, r


@pytest.mark.parametrize(
    "suffix,codec,decoder,rotation",
    [(".mkv", "mjpeg", "pyav", 0), (".mkv", "mjpeg", "dali_cpu", 0), (".mp4", "libx264", "pyav", 0),
     (".mp4", "libx264", "pyav", 90)],
)  # fmt: skip
def test_anamorphic_video_is_read_at_its_display_aspect(tmp_path, suffix, codec, decoder, rotation):
    """Non-square pixels (DV, DVD, broadcast): frames stored 32 x 32 with a sample aspect ratio of 2:1 show 64 x 32
    in a player. The dataset gives the clip of the same picture stored with square pixels, in the landscape bucket
    (before, the stored frames as if square: the 1:1 bucket, or a crop of the middle half); with a quarter turn
    the stretch is vertical."""
    import av

    from engine.data.decode import dali_available, probe
    from engine.data.synthetic import make_frames

    if decoder == "dali_cpu" and dali_available():
        pytest.skip(f"DALI CPU decoder unavailable: {dali_available()}")

    def encode(path: Path, frames: np.ndarray, sar: int = 1, rotation: int = 0) -> Path:
        with av.open(str(path), "w") as c:
            s = c.add_stream(codec, rate=8)
            s.height, s.width = frames.shape[1:3]
            s.pix_fmt = "yuvj444p" if codec == "mjpeg" else "yuv444p"
            s.options = {"q:v": "2"} if codec == "mjpeg" else {"crf": "4", "preset": "ultrafast"}
            if sar != 1:
                s.codec_context.sample_aspect_ratio = sar
            if rotation:
                s.set_display_rotation(rotation)
            for f in frames:
                for pk in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                    c.mux(pk)
            for pk in s.encode():
                c.mux(pk)
        return path

    shown = make_frames(4, 32, 64, ident=5).astype(np.uint16)  # as a player shows it: 64 wide, 32 high
    if rotation:  # shown portrait, 32 wide and 64 high: stored landscape, turned by the display matrix
        shown = np.ascontiguousarray(shown.transpose(0, 2, 1, 3))
    stored = np.rot90(shown, k=-rotation // 90, axes=(1, 2))  # 64 wide, 32 high
    squeezed = ((stored[:, :, 0::2] + stored[:, :, 1::2]) // 2).astype(np.uint8)  # 2:1 pixels, 32 x 32
    encode(tmp_path / f"square{suffix}", shown.astype(np.uint8))
    info = probe(encode(tmp_path / f"anamorphic{suffix}", squeezed, sar=2, rotation=rotation))
    assert (info.width, info.height, info.pixel_aspect, info.rotation % 360) == (32, 32, 2.0, rotation)
    rows = [{"video": f"square{suffix}"}, {"video": f"anamorphic{suffix}"}]
    h, w = shown.shape[1:3]
    for buckets in (False, True):
        ds = VideoDataset(_manifest(tmp_path / "m.jsonl", rows), num_frames=3, height=h, width=w,
                          aspect_buckets=buckets, bucket_multiple=8, decoder=decoder)  # fmt: skip
        ref, v = [it["video"] for it in ds]
        assert ds.skipped == [] and ref.shape == v.shape == (3, 3, h, w), buckets
        mse = (((v - ref) * 127.5) ** 2).mean().item()
        assert 10 * np.log10(255**2 / max(mse, 1e-9)) > 30, buckets


def test_manifest_saved_with_a_byte_order_mark_keeps_its_first_row(tmp_path):
    """A manifest written by a Windows editor or a spreadsheet export: UTF-8 with a byte-order mark, CRLF line
    ends, non-ASCII captions. Every row is read, the captions as written (before, the first row was skipped as
    'malformed JSON (Unexpected UTF-8 BOM)')."""
    from engine.data.synthetic import write_video

    captions = ["un café sur la table", "Straße, 東京"]
    rows = []
    for i, c in enumerate(captions):
        write_video(tmp_path / f"v{i}.webm", ident=i, num_frames=2, height=16, width=16)
        rows.append(json.dumps({"video": f"v{i}.webm", "caption": c}, ensure_ascii=False))
    (tmp_path / "m.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode("utf-8") + b"\r\n")
    ds = VideoDataset(tmp_path / "m.jsonl", num_frames=2, height=16, width=16, decoder="pyav")
    assert ds.skipped == [] and [it["caption"] for it in ds] == captions


def test_unreadable_video_is_skipped_naming_the_file(tmp_path):
    """A video the process may not read (mode 000: a dataset copied with another user's permissions) is skipped and
    quarantined with the reason, the other rows are used (before, the container size check's open raised
    PermissionError out of the dataset: the loader, and the training, stopped). Run in a child without the
    capabilities that let root read any file."""
    import os
    import shutil
    import subprocess
    import sys

    from engine.data.synthetic import write_video

    for name in ("locked.webm", "ok.webm"):
        write_video(tmp_path / name, num_frames=2, height=16, width=16)
    (tmp_path / "locked.webm").chmod(0)
    _manifest(tmp_path / "m.jsonl", [{"video": "locked.webm"}, {"video": "ok.webm"}])
    script = (
        "import json, sys\n"
        "from engine.data import VideoDataset\n"
        "try:\n"
        "    open(sys.argv[1] + '/locked.webm', 'rb')\n"
        "    sys.exit('the child can read the locked file')\n"
        "except PermissionError:\n"
        "    pass\n"
        "ds = VideoDataset(sys.argv[1] + '/m.jsonl', num_frames=2, height=16, width=16, decoder='pyav')\n"
        "print(json.dumps({'paths': [it['path'] for it in ds], 'skipped': ds.skipped}))\n"
    )
    cmd = [sys.executable, "-c", script, str(tmp_path)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a file unreadable")
        caps = "-dac_override,-dac_read_search"
        cmd = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}", *cmd]
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(root)})  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["paths"] == [str(tmp_path / "ok.webm")]
    [(path, reason)] = out["skipped"]
    assert path == str(tmp_path / "locked.webm") and "locked.webm" in reason and "Permission denied" in reason
