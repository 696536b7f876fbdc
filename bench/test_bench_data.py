"""CPU microbenchmark (pytest-benchmark): VP9 decode frames/s, DALI CPU vs PyAV, same files and frames.

    pytest bench/test_bench_data.py --benchmark-only

Eight 128x128 x 32-frame VP9 WebM files written with PyAV; each round decodes every frame of every
file. DALI runs them as one batch (its intended use); PyAV decodes file by file with the same
RGB conversion the dataset uses. ``extra_info["frames_per_s"]`` holds the throughput.
"""

from __future__ import annotations

import pytest

from engine.data.decode import DaliDecoder, PyAVDecoder, dali_available
from engine.data.synthetic import write_video

N_FILES, N_FRAMES, SIZE = 8, 32, 128


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_video")
    return [
        write_video(d / f"v{i}.webm", ident=i, num_frames=N_FRAMES, height=SIZE, width=SIZE)
        for i in range(N_FILES)
    ]


def _run(benchmark, decoder, files):
    items = [(f, list(range(N_FRAMES))) for f in files]
    out = benchmark(decoder.decode_batch, items)
    assert all(not isinstance(o, Exception) and o.shape == (N_FRAMES, SIZE, SIZE, 3) for o in out), out
    benchmark.extra_info["frames_per_s"] = N_FILES * N_FRAMES / benchmark.stats.stats.median


@pytest.mark.benchmark(group="decode-vp9-128px")
def test_decode_pyav(benchmark, files):
    _run(benchmark, PyAVDecoder(), files)


@pytest.mark.benchmark(group="decode-vp9-128px")
def test_decode_dali_cpu(benchmark, files):
    if dali_available():
        pytest.skip(f"DALI CPU decoder unavailable: {dali_available()}")
    _run(benchmark, DaliDecoder("cpu", num_threads=2), files)
