"""bench/carry_pieces.sh: files split into carry-sized folders come back byte for byte, checksummed."""

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "carry_pieces.sh"


def _sh(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


def test_split_put_join_round_trip_and_corruption(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    files = {"a.whl": 2_500_000, "b.whl": 700_000, "c.whl": 1_200_000}
    for name, size in files.items():
        (src / name).write_bytes(os.urandom(size))
    env = {**os.environ, "PIECE_MB": "1", "PIECES_STORE": str(tmp_path / "store")}
    res = _sh("split", str(tmp_path / "pieces"), *(str(src / n) for n in files), env=env)
    assert res.returncode == 0, res.stderr
    folders = sorted((tmp_path / "pieces").iterdir(), key=lambda p: int(p.name))
    assert len(folders) >= 5  # 4.4 MB in folders of at most 1 MiB
    for f in folders:
        assert sum(p.stat().st_size for p in f.iterdir()) <= 2**20
        assert _sh("put", str(f), env=env).returncode == 0
    res = _sh("join", str(tmp_path / "out"), env=env)
    assert res.returncode == 0, res.stderr
    for name in files:
        assert (tmp_path / "out" / name).read_bytes() == (src / name).read_bytes()
    piece = sorted((tmp_path / "store").glob("bundle.part.*"))[1]
    data = piece.read_bytes()
    # one byte changed in transit (b"x" changed nothing where the byte was "x" already: 1 run in 256)
    piece.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
    res = _sh("join", str(tmp_path / "out2"), env=env)
    assert res.returncode == 1 and "checksum mismatch" in res.stderr


def test_join_before_the_last_piece_is_a_clear_error(tmp_path):
    env = {**os.environ, "PIECES_STORE": str(tmp_path / "empty")}
    res = _sh("join", str(tmp_path / "out"), env=env)
    assert res.returncode == 2 and "SHA256SUMS not there yet" in res.stderr
