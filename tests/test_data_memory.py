"""Memory of one clip: decoding and resizing a full-resolution clip keeps a small multiple of its uint8 frames
(before, PyAV's YUV conversion and the resize made float32 copies of the whole clip: ~19x, 6.5 GB for 49 1080p
frames per loader thread, enough to get a training node's loader OOM-killed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("av", reason="PyAV writes and decodes the test videos")

ROOT = Path(__file__).resolve().parents[1]

# the process's own peak RSS: ru_maxrss starts at the parent's (pytest's) peak, which can hide the growth
PEAK = """
def peak():
    return next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM:"))
"""

MEASURE = (
    PEAK
    + """
import json, sys
from pathlib import Path
from engine.data import VideoDataset
ds = VideoDataset(Path(sys.argv[1]) / "m.jsonl", num_frames=33, height=240, width=416, decoder="pyav")
ds[1]  # a small clip first: imports, buffers, thread pools
base = peak()
v = ds[0]["video"]
grew = peak() - base
print("RESULT " + json.dumps({"grew": grew, "shape": list(v.shape)}), flush=True)
"""
)


def test_a_720p_clip_peaks_at_a_small_multiple_of_its_frames(tmp_path):
    from engine.data.synthetic import write_video

    write_video(
        tmp_path / "big.mkv", codec="mjpeg", pix_fmt="yuvj420p", num_frames=33, height=720, width=1280
    )
    write_video(
        tmp_path / "small.mkv", codec="mjpeg", pix_fmt="yuvj420p", num_frames=33, height=240, width=416
    )
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"video": "big.mkv"}) + "\n" + json.dumps({"video": "small.mkv"})
    )
    (tmp_path / "measure.py").write_text(MEASURE)
    p = subprocess.run([sys.executable, str(tmp_path / "measure.py"), str(tmp_path)], capture_output=True,
                       text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert p.returncode == 0 and "RESULT " in p.stdout, (p.stdout + p.stderr)[-3000:]
    got = json.loads(p.stdout.split("RESULT ", 1)[1].splitlines()[0])
    clip = 33 * 720 * 1280 * 3  # the decoded uint8 frames
    assert got["shape"] == [3, 33, 240, 416]
    assert got["grew"] < 5 * clip, f"peak grew {got['grew'] / clip:.1f}x the clip's uint8 frames"


@pytest.mark.parametrize(
    "size,out", [((37, 50, 70), (32, 48)), ((9, 20, 30), (48, 40)), ((17, 32, 48), (32, 48))]
)
def test_chunked_resize_equals_torch_on_the_whole_clip(size, out):
    """Down-, up- and no scaling of clips longer than a chunk, against one F.interpolate of the whole clip."""
    from engine.data.transforms import cover_scale, resize_crop_normalize

    t, h, w = size
    frames = torch.randint(
        0, 256, (t, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(t)
    )
    s = cover_scale(h, w, *out)
    rh, rw = max(out[0], round(h * s)), max(out[1], round(w * s))
    ref = frames.permute(0, 3, 1, 2).float()
    if (rh, rw) != (h, w):
        ref = F.interpolate(ref, size=(rh, rw), mode="bilinear", align_corners=False, antialias=s < 1)
    top, left = (rh - out[0]) // 2, (rw - out[1]) // 2
    ref = (ref[:, :, top : top + out[0], left : left + out[1]] / 127.5 - 1).clamp(-1, 1).permute(1, 0, 2, 3)
    got = resize_crop_normalize(frames, *out)
    assert got.shape == (3, t, *out) and got.is_contiguous()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


LOADER = (
    PEAK
    + """
import json, sys
from pathlib import Path
from engine.data import BatchLoader, ResumableSampler, VideoDataset
ds = VideoDataset(Path(sys.argv[1]) / "m.jsonl", num_frames=16, height=256, width=256, aspect_buckets=True,
                  decoder="pyav")
loader = BatchLoader(ds, ResumableSampler(len(ds), shuffle=False), batch_size=4, num_threads=2, prefetch=4)
ds[0]  # imports, buffers, thread pools
base = peak()
shapes = []
for b in loader:
    shapes.append(list(b["video"].shape))
    del b
grew = peak() - base
print("RESULT " + json.dumps({"grew": grew, "shapes": shapes}), flush=True)
"""
)


def test_batch_loader_buckets_hold_less_than_their_items_in_float32(tmp_path):
    """Five aspect buckets each wait with 3 of batch_size 4 items before any fills: the loader's peak stays under
    those 15 clips in float32 (before, they waited as float32 with the prefetched ones: 26 clips' worth)."""
    from engine.data.synthetic import write_video

    sizes = [(96, 48), (96, 72), (96, 96), (72, 96), (48, 96)]  # (h, w): buckets 368x176 .. 176x368
    for h, w in sizes:
        write_video(
            tmp_path / f"v{h}x{w}.mkv", codec="mjpeg", pix_fmt="yuvj420p", num_frames=16, height=h, width=w
        )
    rows = [json.dumps({"video": f"v{h}x{w}.mkv"}) for _ in range(4) for h, w in sizes]
    (tmp_path / "m.jsonl").write_text("\n".join(rows))
    (tmp_path / "loader.py").write_text(LOADER)
    p = subprocess.run([sys.executable, str(tmp_path / "loader.py"), str(tmp_path)], capture_output=True,
                       text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert p.returncode == 0 and "RESULT " in p.stdout, (p.stdout + p.stderr)[-3000:]
    got = json.loads(p.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert sorted(s[3] * s[4] for s in got["shapes"]) == sorted(
        [176 * 368] * 2 + [224 * 288] * 2 + [256 * 256]
    )
    assert all(s[:3] == [4, 3, 16] for s in got["shapes"]), got["shapes"]
    clip = 3 * 16 * 256 * 256 * 4  # one item in float32 (every bucket holds about 256 x 256 pixels)
    assert got["grew"] < 15 * clip, f"peak grew {got['grew'] / clip:.1f}x a float32 clip"


def test_batch_loader_batches_equal_the_dataset_items(tmp_path):
    """The loader's batches (clips held as uint8) against VideoDataset's float32 items: equal where no resize is
    needed, within the 8-bit rounding (0.5 / 127.5) where the clip was resized."""
    from engine.data import BatchLoader, ResumableSampler, VideoDataset
    from engine.data.synthetic import write_video

    write_video(tmp_path / "same.webm", num_frames=4, height=32, width=48)
    write_video(tmp_path / "scaled.webm", num_frames=4, height=40, width=56, ident=1)
    rows = [{"video": "same.webm"}, {"video": "scaled.webm"}] * 2
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = VideoDataset(tmp_path / "m.jsonl", num_frames=4, height=32, width=48, decoder="pyav")
    batches = list(BatchLoader(ds, ResumableSampler(4, shuffle=False), batch_size=2))
    assert [b["index"] for b in batches] == [[0, 1], [2, 3]]
    for b in batches:
        assert b["video"].dtype == torch.float32 and b["video"].shape == (2, 3, 4, 32, 48)
        same, scaled = ds[b["index"][0]]["video"], ds[b["index"][1]]["video"]
        assert torch.equal(b["video"][0], same)
        torch.testing.assert_close(b["video"][1], scaled, rtol=0, atol=0.5 / 127.5 + 1e-6)
        assert not torch.equal(b["video"][1], scaled)  # rounded: the case under test
