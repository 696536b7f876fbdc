"""CPU microbenchmark (pytest-benchmark): judged items/s, batched vs one at a time, same backend and inputs.

    pytest bench/test_bench_judge.py --benchmark-only

Two paths: a tiny random Qwen2.5-VL on CPU (TransformersJudge: one batched generate vs a generate
per item), and HTTP (AsyncJudge -> OpenAIJudge -> a loopback server: batched concurrent requests vs
one awaited request at a time). ``extra_info["items_per_s"]`` holds the throughput.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.judge_servers

from engine.judge import AsyncJudge, JudgeRequest, OpenAIJudge, TransformersJudge  # noqa: E402
from engine.judge.tiny import build_tiny_qwen25vl  # noqa: E402
from tests.judge_servers import FaultServer  # noqa: E402

N_VLM, N_HTTP = 16, 128


def _reqs(n: int, size: int) -> list[JudgeRequest]:
    rng = np.random.default_rng(0)
    return [
        JudgeRequest(
            f"[Agent]: push block {i}", "task", frames=[rng.integers(0, 256, (size, size, 3), dtype=np.uint8)]
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = build_tiny_qwen25vl(tmp_path_factory.mktemp("tiny"))
    yield TransformersJudge(str(path), device="cpu", max_batch=N_VLM, num_frames=1, max_new_tokens=8)
    torch.set_num_threads(threads)


def _vlm(judge: TransformersJudge, reqs: list[JudgeRequest], batched: bool):
    if batched:
        return asyncio.run(judge.score(reqs))
    return [asyncio.run(judge.score([r]))[0] for r in reqs]


@pytest.mark.benchmark(group="judge-tiny-qwen25vl-cpu")
@pytest.mark.parametrize("mode", ["batched", "one_at_a_time"])
def test_bench_judge_transformers(benchmark, tiny_judge, mode):
    reqs = _reqs(N_VLM, 56)
    out = benchmark.pedantic(_vlm, args=(tiny_judge, reqs, mode == "batched"), rounds=3, warmup_rounds=1)
    assert len(out) == N_VLM
    benchmark.extra_info["items_per_s"] = N_VLM / benchmark.stats.stats.median


async def _http(url: str, reqs: list[JudgeRequest], batched: bool):
    backend = OpenAIJudge(url, "m", timeout_s=30, num_frames=1, max_connections=32)
    if not batched:
        out = [(await backend.score([r]))[0] for r in reqs]
        await backend.aclose()
        return out
    judge = AsyncJudge(backend, max_batch=32, max_wait_ms=2, max_concurrency=4, cache=False)
    futs = [await judge.submit(r) for r in reqs]
    out = await asyncio.gather(*futs)
    await judge.aclose()
    return out


@pytest.mark.benchmark(group="judge-http-loopback")
@pytest.mark.parametrize("mode", ["batched", "one_at_a_time"])
def test_bench_judge_http(benchmark, mode):
    reqs = _reqs(N_HTTP, 32)
    with FaultServer() as srv:
        out = benchmark.pedantic(
            lambda: asyncio.run(_http(srv.url, reqs, mode == "batched")), rounds=3, warmup_rounds=1
        )
    assert sum(v.ok for v in out) == N_HTTP
    benchmark.extra_info["items_per_s"] = N_HTTP / benchmark.stats.stats.median
