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

MEASURE = """
import json, resource, sys
from pathlib import Path
from engine.data import VideoDataset
ds = VideoDataset(Path(sys.argv[1]) / "m.jsonl", num_frames=33, height=240, width=416, decoder="pyav")
ds[1]  # a small clip first: imports, buffers, thread pools
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
v = ds[0]["video"]
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
print("RESULT " + json.dumps({"grew": grew, "shape": list(v.shape)}), flush=True)
"""


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
