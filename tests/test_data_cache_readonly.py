"""Training from a latent cache on a read-only file system (a shared dataset mount): a corrupt shard is skipped
with a warning, as on a writable one, though it can be neither moved to quarantine/ nor logged to the file."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("av", reason="PyAV writes the test videos")

ROOT = Path(__file__).resolve().parents[1]

READER = """
import json, sys
from engine.data.cache import LatentCacheDataset
ds = LatentCacheDataset(sys.argv[1])
print("RESULT " + json.dumps({"indices": [it["index"] for it in ds], "skipped": ds.skipped}), flush=True)
"""


def _read_only(folder: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """Run ``argv`` with ``folder`` bind-mounted read-only in a mount namespace of its own."""
    script = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["unshare", "--mount", "sh", "-c", script, "_", str(folder), *argv], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_corrupt_shard_of_a_read_only_cache_is_skipped(tmp_path):
    """Before, the reader crashed with OSError 'Read-only file system' writing quarantine.jsonl (and would have
    moving the shard), out of the loader, instead of skipping the shard's items."""
    from engine.data import VideoDataset
    from engine.data.cache import LatentCacheWriter
    from engine.data.synthetic import write_video

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) for a read-only mount")
    probe = _read_only(tmp_path, ["sh", "-c", f"! touch {tmp_path}/x"])
    if probe.returncode != 0:
        pytest.skip(f"cannot make a read-only mount here: {probe.stderr.strip()[:200]}")

    rows = []
    for i in range(6):
        write_video(tmp_path / f"v{i}.webm", ident=i, num_frames=2, height=16, width=16)
        rows.append(json.dumps({"video": f"v{i}.webm", "caption": f"c{i}"}))
    (tmp_path / "m.jsonl").write_text("\n".join(rows))
    ds = VideoDataset(tmp_path / "m.jsonl", num_frames=2, height=16, width=16, decoder="pyav")

    class PoolVAE:
        def encode(self, video):
            return torch.nn.functional.avg_pool3d(video, (1, 4, 4))

    out = tmp_path / "cache"
    LatentCacheWriter(out, vae=PoolVAE(), shard_size=2, first_frame=False).write(ds)
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-8:] = bytes(8)
    shard.write_bytes(bytes(data))
    (tmp_path / "reader.py").write_text(READER)
    p = _read_only(out, [sys.executable, str(tmp_path / "reader.py"), str(out)])
    assert p.returncode == 0 and "RESULT " in p.stdout, (p.stdout + p.stderr)[-3000:]
    got = json.loads(p.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert got["indices"] == [0, 1, 4, 5]  # rows 2 and 3 lived in shard 1
    assert [(path, "sha256 mismatch" in why) for path, why in got["skipped"]] == [(str(shard), True)]
    assert "not written" in p.stderr and "not moved" in p.stderr
    assert shard.is_file() and not (out / "quarantine.jsonl").exists()  # the read-only cache is untouched
