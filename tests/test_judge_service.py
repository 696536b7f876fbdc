"""AsyncJudge semantics (batching, backpressure, cache, drain/cancel, backend failures) and the
thread facade JudgeService, with a real HTTP backend (OpenAIJudge -> loopback fault server) where
timing does not matter and a plain in-test Judge where the test must control when answers arrive."""

import asyncio
import threading
import time

import numpy as np
import pytest

from engine.judge import AsyncJudge, JudgeRequest, JudgeService, OpenAIJudge, Verdict
from tests.judge_servers import FaultServer, expected_score


def _req(i: int, fault: str | None = None) -> JudgeRequest:
    img = np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return JudgeRequest(
        f"[Agent]: push block {i}" + (f" fault={fault}" if fault else ""), "task", frames=[img]
    )


class GatedJudge:
    """Answers score = index / 1000 from the task text, only after ``gate`` is set; records batches."""

    def __init__(self, gate: asyncio.Event | None = None, fail_on: int | None = None) -> None:
        self.gate, self.fail_on, self.batches = gate, fail_on, []

    async def score(self, requests):
        self.batches.append(len(requests))
        if self.gate is not None:
            await self.gate.wait()
        ids = [int(r.task.split()[3]) for r in requests]
        if self.fail_on in ids:
            raise RuntimeError("backend bug")
        return [Verdict(i / 1000, "ok", f"Score: {i / 1000}", 0.0) for i in ids]


def test_batches_form_under_load_and_cache_hits():
    async def run():
        gate = asyncio.Event()
        backend = GatedJudge(gate)
        judge = AsyncJudge(backend, max_batch=8, max_wait_ms=1000, max_concurrency=1)
        futs = [await judge.submit(_req(i)) for i in range(20)]
        dup = await judge.submit(_req(3))  # in flight: shares the first one's verdict
        await asyncio.sleep(0.05)
        gate.set()
        out = await asyncio.gather(*futs, dup)
        again = await (await judge.submit(_req(5)))  # finished: served from the cache
        await judge.aclose()
        return backend, out, again, judge.metrics()

    backend, out, again, m = asyncio.run(run())
    assert [v.score for v in out[:20]] == [i / 1000 for i in range(20)] and out[20].score == 0.003
    assert again.score == 0.005 and m["cache_hits"] == 2
    assert backend.batches == [8, 8, 4] and m["batch_size_hist"] == {4: 1, 8: 2}
    assert m["statuses"] == {"ok": 22}


def test_backpressure_submit_waits_when_queue_full():
    async def run():
        gate = asyncio.Event()
        judge = AsyncJudge(
            GatedJudge(gate), max_batch=2, max_wait_ms=0, max_concurrency=1, max_queue=3, cache=False
        )
        futs = [await judge.submit(_req(i)) for i in range(5)]  # 2 in the running batch, 3 queued
        blocked = asyncio.ensure_future(judge.submit(_req(5)))
        await asyncio.sleep(0.1)
        assert not blocked.done() and judge.metrics()["queue_depth"] == 3
        gate.set()
        futs.append(await asyncio.wait_for(blocked, 5))
        out = await asyncio.gather(*futs)
        await judge.aclose()
        return out

    assert [v.score for v in asyncio.run(run())] == [i / 1000 for i in range(6)]


def test_close_without_drain_cancels_explicitly_and_backend_errors_are_contained():
    async def run():
        judge = AsyncJudge(GatedJudge(asyncio.Event()), max_batch=4, max_wait_ms=0, max_concurrency=1)
        futs = [await judge.submit(_req(i)) for i in range(10)]
        await asyncio.sleep(0.05)
        await judge.aclose(drain=False)
        with pytest.raises(RuntimeError, match="closed"):
            await judge.submit(_req(99))
        failing = AsyncJudge(GatedJudge(fail_on=2), max_batch=4, max_wait_ms=200)
        fails = [await failing.submit(_req(i)) for i in range(4)]
        await failing.aclose()
        return [f.result() for f in futs], [await f for f in fails], judge.metrics()

    cancelled, failed, m = asyncio.run(run())
    assert [v.status for v in cancelled] == ["cancelled"] * 10 and m["statuses"] == {"cancelled": 10}
    assert [v.status for v in failed] == ["error"] * 4 and "backend bug" in failed[0].raw


def test_drain_finishes_http_work_and_failures_are_not_cached():
    async def run(srv):
        judge = AsyncJudge(
            OpenAIJudge(srv.url, "m", timeout_s=10, max_retries=0, num_frames=1, parse_retries=0),
            max_batch=4,
            max_wait_ms=5,
        )
        reqs = [_req(i) for i in range(10)] + [_req(50, "malformed")]
        await asyncio.gather(*[await judge.submit(r) for r in reqs])
        seen = srv.requests
        again = [await judge.submit(_req(0)), await judge.submit(_req(50, "malformed"))]
        futs = [await judge.submit(r) for r in reqs[1:4]] + again
        await judge.aclose(drain=True)  # returns only when every request is answered
        assert all(f.done() for f in futs)
        return reqs, [f.result() for f in futs], seen

    with FaultServer() as srv:
        reqs, out, seen = asyncio.run(run(srv))
    assert seen == 11 and srv.requests == 12  # only the failed request is asked again
    for r, v in zip(reqs[1:4] + reqs[:1], out[:4]):
        assert v.score == pytest.approx(expected_score(r.frames[0]), abs=1e-4)
    assert out[4].status == "parse_error"


def test_judge_service_from_a_synchronous_loop():
    with FaultServer() as srv:
        service = JudgeService(
            OpenAIJudge(srv.url, "m", timeout_s=10, num_frames=1), max_batch=8, max_wait_ms=5
        )
        handles = []
        t0 = time.perf_counter()
        for step in range(4):  # the "trainer": submits and moves on
            handles.append(service.submit_many([_req(100 * step + i) for i in range(8)]))
        submit_s = time.perf_counter() - t0
        results = [h.result(timeout=30) for h in handles]
        assert all(h.done() for h in handles)
        m = service.metrics()
        service.close()
    assert submit_s < 5.0 and threading.active_count() >= 1
    for step, res in enumerate(results):
        assert [v.score for v in res] == pytest.approx(
            [expected_score(_req(100 * step + i).frames[0]) for i in range(8)], abs=1e-4
        )
    assert m["answered"] == 32 and m["caller_waits"] == 4 and m["caller_wait_s"] >= 0
    with pytest.raises(RuntimeError, match="closed"):
        service.submit_many([_req(0)])


def test_judge_service_result_timeout_and_cancel_on_close():
    service = JudgeService(_SlowJudge(), max_batch=2, max_wait_ms=0)
    h = service.submit_many([_req(i) for i in range(4)])
    with pytest.raises(TimeoutError):
        h.result(timeout=0.05)
    service.close(drain=False)
    assert [v.status for v in h.result(timeout=5)] == ["cancelled"] * 4


class _SlowJudge:
    async def score(self, requests):
        await asyncio.sleep(30)
        return [Verdict(1.0, "ok", "", 0.0) for _ in requests]


def test_drain_answers_submitters_that_were_waiting_for_queue_space():
    """aclose() (drain) while 19 submitters wait on a full one-slot queue: every one of them is queued,
    judged and answered (the queue emptying once did not end the drain while they still held requests)."""

    async def run():
        judge = AsyncJudge(
            GatedJudge(), max_batch=1, max_wait_ms=0, max_concurrency=8, max_queue=1, cache=False
        )
        subs = [asyncio.create_task(judge.submit(_req(i))) for i in range(20)]
        await asyncio.sleep(0)
        await judge.aclose()
        verdicts = await asyncio.wait_for(asyncio.gather(*[await s for s in subs]), 5)
        return verdicts, judge.metrics()

    verdicts, m = asyncio.run(run())
    assert [v.score for v in verdicts] == [i / 1000 for i in range(20)] and m["statuses"] == {"ok": 20}


def test_close_without_drain_answers_a_batch_that_had_not_started():
    """aclose(drain=False) right after the dispatcher made a batch task that has not run yet: its request
    is answered "cancelled" (the task's own handling never ran)."""

    async def run():
        judge = AsyncJudge(GatedJudge(), max_batch=1, max_wait_ms=0)
        fut = await judge.submit(_req(1))
        await asyncio.sleep(0)  # the dispatcher forms the batch and creates its task
        await judge.aclose(drain=False)
        return await asyncio.wait_for(fut, 5)

    assert asyncio.run(run()).status == "cancelled"


def test_a_caller_that_gives_up_leaves_the_request_to_the_others():
    """Two callers of one request; the first stops waiting (wait_for cancels its future): the second still
    gets the judge's answer. A submit abandoned while waiting for queue space leaves nothing behind: the same
    request submitted later is judged."""

    async def run():
        gate = asyncio.Event()
        judge = AsyncJudge(GatedJudge(gate), max_batch=4, max_wait_ms=0, max_concurrency=1, max_queue=1)
        f1 = await judge.submit(_req(7))
        f2 = await judge.submit(_req(7))  # follows the first
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(f1, 0.05)
        await asyncio.sleep(0.01)
        f3 = await judge.submit(_req(8))  # fills the queue (the batch of 7 holds the one slot)
        with pytest.raises(TimeoutError):  # gives up waiting for queue space
            await asyncio.wait_for(judge.submit(_req(9)), 0.05)
        gate.set()
        second, third = await asyncio.wait_for(asyncio.gather(f2, f3), 5)
        again = await asyncio.wait_for(await judge.submit(_req(9)), 5)
        await judge.aclose()
        return second, third, again

    second, third, again = asyncio.run(run())
    assert (second.status, second.score) == ("ok", 0.007) and third.score == 0.008
    assert (again.status, again.score) == ("ok", 0.009)


def test_an_unreadable_video_is_an_error_verdict_not_an_exception(tmp_path):
    """With the cache on, a request whose video is missing cannot be keyed; it is judged uncached and the
    backend's "error" verdict comes back in its place, the other requests of the call unharmed."""
    from engine.judge.chat import ChatResult
    from engine.judge.vlm import VLMJudge

    class Chat:
        async def chat(self, items):
            return [ChatResult("Score: 0.7", "ok", 0.0) for _ in items]

    missing = JudgeRequest("[Agent]: push", "task", video=str(tmp_path / "missing.mp4"))
    service = JudgeService(VLMJudge(Chat()))
    try:
        good, bad = service.submit_many([_req(1), missing]).result(10)
    finally:
        service.close()
    assert (good.status, good.score) == ("ok", 0.7)
    assert bad.status == "error" and "missing.mp4" in bad.raw


def test_drain_answers_a_submit_still_hashing_its_video(tmp_path):
    """aclose() (drain) while a submit is still reading its video for the cache key (in a worker thread):
    the request is judged and answered, not queued behind a dispatcher that had already stopped. The video
    is a named pipe, so the test decides when its bytes arrive."""
    import os

    fifo = tmp_path / "video.mp4"
    os.mkfifo(fifo)

    class Any:
        async def score(self, requests):
            return [Verdict(0.5, "ok", "Score: 0.5", 0.0) for _ in requests]

    def feed():
        with open(fifo, "wb") as f:
            f.write(b"not really a video")

    async def run():
        judge = AsyncJudge(Any(), max_batch=4, max_wait_ms=0)
        sub = asyncio.create_task(judge.submit(JudgeRequest("[Agent]: push", "task", video=str(fifo))))
        await asyncio.sleep(0.05)  # the submit is blocked reading the pipe
        closing = asyncio.create_task(judge.aclose())
        await asyncio.sleep(0.05)
        await asyncio.to_thread(feed)
        await asyncio.wait_for(closing, 5)
        return await asyncio.wait_for(await asyncio.wait_for(sub, 5), 5)

    v = asyncio.run(run())
    assert (v.status, v.score) == ("ok", 0.5)


def test_a_drain_that_times_out_answers_every_handle():
    """close(timeout=...) while a loopback server is still answering slowly: close raises TimeoutError,
    and the handle's verdicts are "cancelled" (stopping the loop had left them unanswered forever); the
    server's answer for a request that was already finished is kept."""
    with FaultServer(slow_s=3.0) as srv:
        service = JudgeService(
            OpenAIJudge(srv.url, "m", timeout_s=30, max_retries=0, num_frames=1), max_batch=1, max_wait_ms=0
        )
        done = service.submit_many([_req(1)]).result(10)
        h = service.submit_many([_req(i, "slow") for i in range(2, 5)])
        t0 = time.perf_counter()
        with pytest.raises(TimeoutError):
            service.close(drain=True, timeout=0.3)
        assert time.perf_counter() - t0 < 2.5
        verdicts = h.result(timeout=5)
    assert done[0].score == pytest.approx(expected_score(_req(1).frames[0]), abs=1e-4)
    assert [v.status for v in verdicts] == ["cancelled"] * 3


def test_a_backend_that_answers_short_or_with_none_fails_its_batch_not_its_callers():
    """A chat backend that drops the last answer of a batch (VLMJudge left that request's verdict None),
    and a Judge that returns None in place of a Verdict: every request of the batch gets an "error" verdict
    (AsyncJudge's _resolve raised on the None and left the rest of the batch unanswered forever)."""
    from engine.judge.chat import ChatResult
    from engine.judge.vlm import VLMJudge

    class ShortChat:
        async def chat(self, items):
            return [ChatResult("Score: 0.5", "ok", 0.0) for _ in items[:-1]]

    class NoneJudge:
        async def score(self, requests):
            return [Verdict(0.5, "ok", "", 0.0)] + [None] * (len(requests) - 1)

    reqs = [_req(i) for i in range(3)]
    direct = asyncio.run(VLMJudge(ShortChat()).score(reqs))
    assert [v.status for v in direct] == ["error"] * 3 and "2 results for 3" in direct[2].raw

    async def run(backend):
        judge = AsyncJudge(backend, max_batch=3, max_wait_ms=1000, cache=False)
        futs = [await judge.submit(r) for r in reqs]
        out = await asyncio.wait_for(asyncio.gather(*futs), 5)
        await judge.aclose()
        return out

    assert [v.status for v in asyncio.run(run(VLMJudge(ShortChat())))] == ["error"] * 3
    out = asyncio.run(run(NoneJudge()))
    assert [v.status for v in out] == ["error"] * 3 and "NoneType" in out[0].raw


def test_bad_service_settings_are_one_line_errors():
    # max_wait_ms NaN and batch_timeout_s 0 were accepted (the latter: every verdict a "timeout")
    for kw in ({"max_wait_ms": float("nan")}, {"batch_timeout_s": 0}, {"batch_timeout_s": float("nan")}):
        with pytest.raises(ValueError, match="AsyncJudge: "):
            AsyncJudge(GatedJudge(), **kw)


def test_a_service_with_bad_settings_leaves_no_thread_running():
    before = {t for t in threading.enumerate() if t.name == "judge-service"}
    with pytest.raises(ValueError, match="AsyncJudge: need max_batch"):
        JudgeService(GatedJudge(), max_batch=0)
    after = {t for t in threading.enumerate() if t.name == "judge-service" and t.is_alive()}
    assert after <= before


def test_submit_many_with_a_bad_request_queues_none_of_them():
    # the requests before the bad one were sent and judged, and no handle could read their verdicts
    with FaultServer() as srv:
        service = JudgeService(OpenAIJudge(srv.url, "m", num_frames=1, timeout_s=5.0), max_wait_ms=0)
        with pytest.raises(TypeError, match="JudgeRequest"):
            service.submit_many([_req(0), _req(1), "not a request"])
        service.close()
    assert srv.requests == 0 and service.metrics()["answered"] == 0


def test_the_cache_keeps_the_most_recently_used_verdicts_only():
    """The cache of "ok" verdicts never shrank: a long RL run judging new videos held every verdict (its
    raw answer included) for the whole run. It now keeps the cache_size most recently used."""

    async def run():
        backend = GatedJudge()
        judge = AsyncJudge(backend, max_batch=1, max_wait_ms=0, max_concurrency=1, cache_size=2)
        for i in (0, 1, 0, 2, 0, 1):  # 0 used again before 2 comes: 1 is the one dropped, not 0
            assert (await (await judge.submit(_req(i)))).score == i / 1000
        await judge.aclose()
        return backend, judge.metrics()

    backend, m = asyncio.run(run())
    assert len(backend.batches) == 4 and m["cache_hits"] == 2  # 0, 1, 2 judged, then 1 again; 0 served twice
    with pytest.raises(ValueError, match="cache_size must be >= 1"):
        AsyncJudge(GatedJudge(), cache_size=0)


def test_a_request_every_caller_gave_up_on_is_not_judged():
    """A queued request whose only caller stopped waiting was judged anyway: the backend worked through answers
    nobody read (a served client that timed out) while the requests behind it waited. It is now dropped when its
    batch forms; one with a caller still waiting is judged."""

    async def run():
        gate = asyncio.Event()
        backend = GatedJudge(gate)
        judge = AsyncJudge(backend, max_batch=4, max_wait_ms=0, max_concurrency=1)
        first = await judge.submit(_req(1))  # its batch holds the one slot until the gate opens
        await asyncio.sleep(0.01)
        alone, shared, kept = [await judge.submit(_req(i)) for i in (2, 3, 3)]
        for fut in (alone, shared):
            fut.cancel()
        gate.set()
        verdicts = await asyncio.wait_for(asyncio.gather(first, kept), 5)
        await judge.aclose()
        return backend, verdicts

    backend, (first, kept) = asyncio.run(run())
    assert first.score == 0.001 and kept.score == 0.003
    assert backend.batches == [1, 1]  # request 2 never reached the backend


def test_leaving_the_service_on_an_exception_does_not_wait_for_pending_verdicts():
    """``with JudgeService(...)`` left by an exception (ctrl-C in the trainer) drained the queue first: the
    exception surfaced only once a slow server had answered every pending request, which nobody would read.
    Pending work is now cancelled; a normal exit still drains."""
    with FaultServer(slow_s=4.0) as srv:
        t0 = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            with JudgeService(OpenAIJudge(srv.url, "m", timeout_s=30, num_frames=1), max_batch=4) as service:
                handle = service.submit_many([_req(i, "slow") for i in range(4)])
                while srv.in_flight == 0:
                    time.sleep(0.01)
                raise KeyboardInterrupt
        assert time.perf_counter() - t0 < 3.0
        assert [v.status for v in handle.result(timeout=5)] == ["cancelled"] * 4
        with JudgeService(OpenAIJudge(srv.url, "m", timeout_s=30, num_frames=1)) as service:
            handle = service.submit_many([_req(7)])
        assert handle.done() and handle.result()[0].ok
