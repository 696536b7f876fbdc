"""Latent cache written by several processes at once (every rank of a torchrun precompute runs the writer on
the same cache_dir): none crashes, and the index lists every shard with the checksum of the file on disk."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("av", reason="PyAV writes the test videos")

ROOT = Path(__file__).resolve().parents[1]

WRITER = """
import sys, time, torch
from engine.data import VideoDataset
from engine.data.cache import LatentCacheWriter

class PoolVAE:  # a fixed linear map as the VAE; slow enough that the writers overlap
    calls = 0

    def encode(self, video):
        PoolVAE.calls += 1
        time.sleep(0.01)
        return torch.nn.functional.avg_pool3d(video, (1, 4, 4))

class Text:
    def cond(self, texts):
        emb = torch.stack([torch.full((3, 2), float(len(t))) for t in texts])
        return {"text": emb, "text_lengths": torch.full((len(texts),), 3)}

ds = VideoDataset(sys.argv[1], num_frames=2, height=16, width=16, decoder="pyav")
LatentCacheWriter(sys.argv[2], vae=PoolVAE(), text_encoder=Text(), text_fields=("caption",), shard_size=1,
                  batch_size=1).write(ds)
print("ENCODE CALLS", PoolVAE.calls)
"""


def test_concurrent_writers_of_one_cache_finish_with_a_consistent_index(tmp_path):
    """Three writer processes, one cache folder: before, they shared the temporary names 'shard-k.partial' and
    'index.json.tmp' (one renamed the other's file away: FileNotFoundError) and each wrote its own in-memory
    index over the others'. A dead writer's temporary file is removed. The writers share the work: each shard is
    encoded once (before, every writer encoded nearly every shard, 3x the work), one claimed by another machine's
    writer that does not finish it too."""
    from engine.data import VideoDataset
    from engine.data.cache import LatentCacheDataset
    from engine.data.synthetic import write_video

    rows = []
    for i in range(12):
        write_video(tmp_path / f"v{i}.webm", ident=i, num_frames=2, height=16, width=16)
        rows.append(json.dumps({"video": f"v{i}.webm", "caption": f"c{i}"}))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(rows))
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    out = tmp_path / "cache"
    out.mkdir()
    from engine.data.cache import _tmp_name

    dead = _tmp_name(out / "shard-00003.safetensors", ".partial")  # this machine's, of a process that is gone
    dead = dead.with_name(dead.name.replace(f".{os.getpid()}-", ".999999999-"))
    dead.write_bytes(b"left by a writer that died")
    elsewhere = out / "shard-00004.safetensors.other-node.4242-1.partial"  # a live writer on another machine
    elsewhere.write_bytes(b"being written")
    claimed_elsewhere = out / "claims" / "shard-00005.safetensors.other-node.4242-1.claim"  # never finished
    claimed_elsewhere.parent.mkdir()
    claimed_elsewhere.touch()
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(manifest), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for _ in range(3)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(log[-2000:] for log in logs)
    assert list(out.glob("*.partial")) == [elsewhere] and not list(out.glob("*.tmp"))
    assert list(out.glob("**/*.claim")) == [claimed_elsewhere]
    calls = [int(log.split("ENCODE CALLS ")[1].split()[0]) for log in logs]
    assert sum(calls) == 12 * 2, calls  # 12 shards of one row: the clip and its first frame
    cache = LatentCacheDataset(out)  # verifies every shard's sha256 against the index
    items = list(cache)
    assert cache.skipped == [] and sorted(it["index"] for it in items) == list(range(12))
    ds = VideoDataset(manifest, num_frames=2, height=16, width=16, decoder="pyav")
    for it in items:
        src = ds[it["index"]]
        assert it["caption"] == src["caption"]
        torch.testing.assert_close(
            it["latent"], torch.nn.functional.avg_pool3d(src["video"][None], (1, 4, 4))[0]
        )


class _Interrupted(RuntimeError):
    pass


class _PoolVAE:
    """A fixed linear map as the VAE; raises at call ``stop`` (a crash mid-cache)."""

    def __init__(self, stop: int = 0):
        self.calls, self.stop = 0, stop

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.stop:
            raise _Interrupted
        return torch.nn.functional.avg_pool3d(video, (1, 4, 4))


def test_resume_with_another_dtype_is_refused(tmp_path):
    """A cache interrupted after its first shard, resumed with dtype=bfloat16: before, the run went on and the
    cache held float32 and bfloat16 latents side by side; now it is refused like any other changed setting, and
    resuming with the same dtype still finishes the cache."""
    from engine.data import VideoDataset
    from engine.data.cache import LatentCacheDataset, LatentCacheWriter
    from engine.data.synthetic import write_video

    rows = []
    for i in range(4):
        write_video(tmp_path / f"v{i}.webm", ident=i, num_frames=2, height=16, width=16)
        rows.append(json.dumps({"video": f"v{i}.webm", "caption": f"c{i}"}))
    (tmp_path / "m.jsonl").write_text("\n".join(rows))
    ds = VideoDataset(tmp_path / "m.jsonl", num_frames=2, height=16, width=16, decoder="pyav")
    out = tmp_path / "cache"

    def writer(vae, dtype=None):
        return LatentCacheWriter(out, vae=vae, shard_size=2, batch_size=2, first_frame=False, dtype=dtype)

    with pytest.raises(_Interrupted):
        writer(_PoolVAE(stop=2)).write(ds)  # shard 0 done, dies in shard 1
    with pytest.raises(ValueError, match="fingerprint"):
        writer(_PoolVAE(), torch.bfloat16).write(ds)
    writer(_PoolVAE()).write(ds)
    assert {it["latent"].dtype for it in LatentCacheDataset(out)} == {torch.float32}
    out2 = tmp_path / "cache_bf16"
    LatentCacheWriter(out2, vae=_PoolVAE(), shard_size=2, first_frame=False, dtype=torch.bfloat16).write(ds)
    assert {it["latent"].dtype for it in LatentCacheDataset(out2)} == {torch.bfloat16}


def test_rerun_re_encodes_the_shards_whose_source_files_changed(tmp_path):
    """A video replaced in place (re-encoded, repaired) and a missing one added after the cache was written: the
    writer run again re-encodes the shards of those rows, and only those (before, every shard counted as done:
    the cache kept the old clip's latents and left the added file out)."""
    from engine.data import VideoDataset
    from engine.data.cache import LatentCacheDataset, LatentCacheWriter
    from engine.data.synthetic import write_video

    for i in range(6):
        if i != 5:
            write_video(tmp_path / f"v{i}.webm", ident=i, num_frames=2, height=16, width=16)
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({"video": f"v{i}.webm"}) for i in range(6)))
    out = tmp_path / "cache"

    def write() -> None:  # a new run: a new dataset, as precompute makes
        ds = VideoDataset(tmp_path / "m.jsonl", num_frames=2, height=16, width=16, decoder="pyav")
        LatentCacheWriter(out, vae=_PoolVAE(), shard_size=2, batch_size=2, first_frame=False).write(ds)

    write()
    assert sorted(it["index"] for it in LatentCacheDataset(out)) == [0, 1, 2, 3, 4]  # v5 missing
    kept = (out / "shard-00001.safetensors").stat()
    write_video(tmp_path / "v1.webm", ident=20, num_frames=2, height=16, width=16)  # replaced in place
    write_video(tmp_path / "v5.webm", ident=5, num_frames=2, height=16, width=16)  # added
    write()
    items = {it["index"]: it["latent"] for it in LatentCacheDataset(out)}
    assert sorted(items) == list(range(6))
    ds = VideoDataset(tmp_path / "m.jsonl", num_frames=2, height=16, width=16, decoder="pyav")
    for i, latent in items.items():
        torch.testing.assert_close(latent, torch.nn.functional.avg_pool3d(ds[i]["video"][None], (1, 4, 4))[0])
    again = (out / "shard-00001.safetensors").stat()
    assert (again.st_ino, again.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)  # rows 2, 3: unchanged


MEASURE = """
import json, resource, sys, torch
from pathlib import Path
from engine.data import VideoDataset
from engine.data.cache import LatentCacheWriter

class PoolVAE:
    def encode(self, video):
        return torch.nn.functional.avg_pool3d(video, (1, 8, 8))

d = Path(sys.argv[1])
ds = VideoDataset(d / "m.jsonl", num_frames=17, height=256, width=256, decoder="pyav")
ds[0]  # imports, buffers, thread pools
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
LatentCacheWriter(d / "cache", vae=PoolVAE(), shard_size=32, batch_size=2).write(ds)
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
print("RESULT " + json.dumps({"grew": grew}), flush=True)
"""


def test_writer_memory_does_not_grow_with_the_shard(tmp_path):
    """A shard of 32 clips encoded 2 at a time: before, the writer held every clip of the shard (float32) until
    it was complete (64 x 81 frames of 480 x 832, the default shard_size at Wan's size, is 25 GB); now only the
    clips waiting for a batch of their shape."""
    from engine.data.cache import LatentCacheDataset
    from engine.data.synthetic import write_video

    for i in range(32):
        write_video(tmp_path / f"v{i}.mkv", codec="mjpeg", pix_fmt="yuvj420p", num_frames=17, height=256,
                    width=256, ident=i % 27)  # fmt: skip
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({"video": f"v{i}.mkv"}) for i in range(32)))
    (tmp_path / "measure.py").write_text(MEASURE)
    # glibc maps a real clip (> 32 MB) on its own and unmaps it when freed; with a fixed threshold these small
    # clips are too (else its heap keeps freed clips' pages, split by the small latents that stay)
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    p = subprocess.run([sys.executable, str(tmp_path / "measure.py"), str(tmp_path)], capture_output=True,
                       text=True, timeout=300, env=env)  # fmt: skip
    assert p.returncode == 0 and "RESULT " in p.stdout, (p.stdout + p.stderr)[-3000:]
    clip = 3 * 17 * 256 * 256 * 4  # one float32 clip
    grew = json.loads(p.stdout.split("RESULT ", 1)[1].splitlines()[0])["grew"]
    assert grew < 16 * clip, f"peak grew by {grew / clip:.1f} clips"
    assert sorted(it["index"] for it in LatentCacheDataset(tmp_path / "cache")) == list(range(32))


def test_a_cache_whose_index_is_cut_short_fails_naming_the_file(tmp_path):
    """index.json cut short (an interrupted copy of the cache folder): the reader and a writer resuming it raise an
    error naming that file (before, a bare JSONDecodeError 'Expecting ... line 9 column 3')."""
    import re

    from engine.data import VideoDataset
    from engine.data.cache import LatentCacheDataset, LatentCacheWriter
    from engine.data.synthetic import write_video

    for i in range(2):
        write_video(tmp_path / f"v{i}.webm", ident=i, num_frames=2, height=16, width=16)
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({"video": f"v{i}.webm"}) for i in range(2)))
    ds = VideoDataset(tmp_path / "m.jsonl", num_frames=2, height=16, width=16, decoder="pyav")
    out = tmp_path / "cache"
    LatentCacheWriter(out, vae=_PoolVAE(), shard_size=1, first_frame=False).write(ds)
    index = out / "index.json"
    index.write_text(index.read_text()[:100])
    with pytest.raises(ValueError, match=re.escape(f"cache index '{index}' is unreadable")):
        LatentCacheDataset(out)
    with pytest.raises(ValueError, match=re.escape(f"cache index '{index}' is unreadable")):
        LatentCacheWriter(out, vae=_PoolVAE(), shard_size=1, first_frame=False).write(ds)


SLOW_WRITER = """
import sys, time, torch
from engine.data import VideoDataset
from engine.data.cache import LatentCacheWriter

class SlowVAE:
    def encode(self, video):
        time.sleep(float(sys.argv[3]))
        return torch.nn.functional.avg_pool3d(video, (1, 4, 4))

ds = VideoDataset(sys.argv[1], num_frames=2, height=16, width=16, decoder="pyav")
LatentCacheWriter(sys.argv[2], vae=SlowVAE(), shard_size=1, batch_size=1, first_frame=False).write(ds)
"""


def test_a_writer_killed_mid_shard_leaves_its_shard_to_the_others(tmp_path):
    """Two writers; one is killed (SIGKILL) while it encodes a shard it claimed: the other encodes that shard too,
    removes the dead writer's claim and finishes the cache."""
    import signal
    import time

    from engine.data.cache import LatentCacheDataset
    from engine.data.synthetic import write_video

    for i in range(6):
        write_video(tmp_path / f"v{i}.webm", ident=i, num_frames=2, height=16, width=16)
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({"video": f"v{i}.webm"}) for i in range(6)))
    (tmp_path / "writer.py").write_text(SLOW_WRITER)
    out = tmp_path / "cache"
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}

    def start(delay: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(tmp_path / "writer.py"), str(tmp_path / "m.jsonl"), str(out),
                                 delay], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip

    def wait_for(cond, what: str) -> None:
        deadline = time.monotonic() + 120
        while not cond():
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    doomed = start("60")  # never finishes its first shard
    wait_for(lambda: list(out.glob(f"claims/*.{doomed.pid}-*.claim")), "the first writer's claim")
    other = start("0.05")
    wait_for(lambda: list(out.glob(f"claims/*.{other.pid}-*.claim")), "the second writer's claim")
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    log = other.communicate(timeout=300)[0]
    assert other.returncode == 0, log[-3000:]
    cache = LatentCacheDataset(out)
    assert sorted(it["index"] for it in cache) == list(range(6)) and cache.skipped == []
    assert not list(out.glob("**/*.claim"))


def test_a_writer_that_died_but_was_not_reaped_counts_as_dead(tmp_path):
    """A writer that crashed while its parent had not reaped it yet (a zombie) answers signal 0 like a live one:
    its claims and temporary files were kept, and its shards waited for a writer that would never come back."""
    import time

    from engine.data.cache import _host, _writer_alive
    from engine.dist import proc_stat

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 60
    while proc_stat(dead.pid)[0] != "Z":  # exited, not reaped (no wait() yet)
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)
    try:
        assert _writer_alive(tmp_path / f"shard-00000.{_host()}.{dead.pid}-0.claim") is False
        assert _writer_alive(tmp_path / f"shard-00000.{_host()}.{os.getpid()}-0.claim") is True
    finally:
        dead.wait()
