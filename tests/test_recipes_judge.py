"""The recipes' HTTP judge (recipes.common.build_judge / BatchedJudge) against the fault-injecting loopback
server of tests/judge_servers.py: answers checked against what that server computes from the frames."""

import asyncio
from collections import Counter

import numpy as np
import pytest

from engine.config import load_config
from engine.judge import JudgeRequest
from tests.judge_servers import FaultServer, expected_score


def _requests(n: int, fault) -> list[JudgeRequest]:
    frames = [np.full((16, 16, 3), 10 + i, np.uint8) for i in range(n)]
    return [JudgeRequest(f"push block {i} {fault(i)}", "task", frames=[f, f]) for i, f in enumerate(frames)]


def _cfg(url: str, *args: str, timeout_s: float = 2.0):
    return load_config(argv=["--judge.backend", "openai", "--judge.base_url", url, "--judge.model", "m",
                             "--judge.timeout_s", str(timeout_s), "--judge.max_retries", "0", "--judge.num_frames", "1",
                             *args])  # fmt: skip


def test_batches_that_wait_for_a_connection_are_not_timed_out():
    """3 batches of 8 requests answered in 1.5 s each, timeout_s 2.5: the HTTP client had 16 connections for the
    24 requests, so 8 waited 1.5 s for one and the batch timeout (timeout_s, counting that wait) failed whole
    batches the server answered. Now every request of judge.max_concurrency batches has a connection, and
    every verdict is the server's score."""
    from recipes.common import build_judge

    reqs = _requests(24, lambda i: "fault=slow")
    with FaultServer(slow_s=1.5) as srv:
        args = ["--judge.max_batch", "8", "--judge.max_concurrency", "3", "--judge.max_wait_ms", "200"]
        cfg = _cfg(srv.url, *args, timeout_s=2.5)
        with build_judge(cfg) as judge:
            verdicts = judge.submit_many(reqs).result(timeout=30)
        assert srv.max_in_flight == 24
    assert Counter(v.status for v in verdicts) == {"ok": 24}, [v.raw for v in verdicts]
    assert [v.score for v in verdicts] == pytest.approx([expected_score(r.frames[0]) for r in reqs])


def test_a_slow_request_does_not_take_its_batch_answers_with_it():
    """One request of a batch of 4 is not answered within timeout_s (the server sleeps 3 s): the batch timeout
    (timeout_s) fired first and answered all 4 "timeout", dropping the 3 answers already received. Now that
    request alone times out (the client's own deadline) and the others keep their scores."""
    from recipes.common import BatchedJudge

    reqs = _requests(4, lambda i: "fault=slow" if i == 0 else "")
    with FaultServer(slow_s=3.0) as srv:
        verdicts = asyncio.run(BatchedJudge(_cfg(srv.url, "--judge.max_batch", "4")).score(reqs))
    assert [v.status for v in verdicts] == ["timeout", "ok", "ok", "ok"], [v.raw for v in verdicts]
    assert [v.score for v in verdicts[1:]] == pytest.approx([expected_score(r.frames[0]) for r in reqs[1:]])


@pytest.mark.parametrize("build", ["build_judge_backend", "build_proposer"])
def test_a_local_judge_loads_on_the_runs_device(tmp_path, monkeypatch, build):
    """The local transformers judge / proposer took "cuda" whenever a GPU existed, whatever run.device said
    (--run.device cpu loaded it on the GPU; under torchrun every rank's on cuda:0). It now takes the run's
    device: here cpu on a machine that says it has a GPU (a load on "cuda" fails on this CPU torch)."""
    import torch

    import recipes.common as common
    from engine.judge.tiny import build_tiny_qwen25vl

    build_tiny_qwen25vl(tmp_path / "judge")
    cfg = load_config(argv=["--judge.backend", "transformers", "--judge.model", str(tmp_path / "judge"),
                            "--run.device", "cpu"])  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    built = getattr(common, build)(cfg)
    vlm = built.chat  # VLMJudge and ChatProposer both hold their TransformersVLM as .chat
    assert vlm.device == "cpu" and next(vlm.model.parameters()).device.type == "cpu"
