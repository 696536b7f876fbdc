"""VideoDataset on less common inputs a real dataset holds: 16-bit and 32-bit images."""

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
