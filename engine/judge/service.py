"""AsyncJudge: a batching service in front of any Judge backend; JudgeService: its thread facade.

    judge = AsyncJudge(OpenAIJudge(url, model), max_batch=16, max_wait_ms=50, max_concurrency=4)
    fut = await judge.submit(JudgeRequest(task, "task", frames=frames))   # awaits only if the queue is full
    verdict = await fut
    await judge.aclose()                                                 # drains pending work

Batching: a dispatcher takes a concurrency slot, waits for the first queued request, then gathers
more until ``max_batch`` requests or ``max_wait_ms`` have passed, and runs the batch as its own
task. With every slot busy the queue grows, so batches grow with load. Requests with equal
:func:`engine.judge.base.cache_key` share one verdict: finished "ok" verdicts are cached (the
``cache_size`` most recently used), and a
duplicate of a request still in flight waits on the first one (on the request's own future, so a caller
that cancels its future, e.g. by ``asyncio.wait_for``, cancels only its own wait; a request whose every
caller did so before its batch formed is not judged). A request whose key
cannot be made (an unreadable video) is judged uncached: its backend answers "error". Backend exceptions
and per-batch timeouts become "error"/"timeout" verdicts for that batch; nothing is dropped silently:
``aclose()`` also drains requests whose submitters were still waiting for queue space, and
``aclose(drain=False)`` answers "cancelled" to everything queued, batched or running.

The trainer is synchronous: :class:`JudgeService` runs an AsyncJudge on an event loop in a background
thread, ``submit_many`` returns a handle at once, and the trainer collects ``handle.result()`` steps
later; ``metrics()["caller_wait_s"]`` tells how long it ever had to wait.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from engine.judge.base import Judge, JudgeRequest, Verdict, cache_key
from engine.log import get_logger

log = get_logger("judge.service")


@dataclass
class _Entry:
    request: JudgeRequest
    future: asyncio.Future  # the request's own verdict (never handed out); callers' futures follow it
    key: tuple | None
    t_submit: float


def _cancelled(why: str = "judge closed without draining") -> Verdict:
    return Verdict(None, "cancelled", why, 0.0)


def _percentile(xs, q: float) -> float | None:
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else None


class AsyncJudge:
    """Queue + dynamic batching + bounded concurrency + cache + metrics around a :class:`Judge`."""

    def __init__(
        self,
        backend: Judge,
        *,
        max_batch: int = 16,
        max_wait_ms: float = 50.0,
        max_concurrency: int = 4,
        max_queue: int = 1024,
        cache: bool = True,
        batch_timeout_s: float | None = None,
        cache_size: int = 65536,
    ) -> None:
        if not hasattr(backend, "score"):
            raise TypeError(f"AsyncJudge: backend {type(backend).__name__} has no async score(requests)")
        # written "not x >= 0": a NaN passes "x < 0"
        if max_batch < 1 or max_concurrency < 1 or max_queue < 1 or not max_wait_ms >= 0:
            raise ValueError(
                f"AsyncJudge: need max_batch, max_concurrency, max_queue >= 1 and max_wait_ms >= 0; got "
                f"{max_batch}, {max_concurrency}, {max_queue}, {max_wait_ms}"
            )
        if cache_size < 1:
            raise ValueError(
                f"AsyncJudge: cache_size must be >= 1 (cache=False turns the cache off), got {cache_size}"
            )
        if batch_timeout_s is not None and not batch_timeout_s > 0:  # 0: every verdict a "timeout"
            raise ValueError(f"AsyncJudge: batch_timeout_s must be > 0 or None, got {batch_timeout_s}")
        self.backend = backend
        self.max_batch, self.max_wait_s = max_batch, max_wait_ms / 1e3
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.batch_timeout_s = batch_timeout_s
        self.use_cache = cache
        # least recently used first: a long RL run judges new videos for days (the cache held them all)
        self._cache: OrderedDict[tuple, Verdict] = OrderedDict()
        self.cache_size = cache_size
        self._inflight: dict[tuple, asyncio.Future] = {}
        self._callers: dict[asyncio.Future, list[asyncio.Future]] = {}  # request's future -> callers' futures
        self._queue: asyncio.Queue | None = None
        self._dispatcher: asyncio.Task | None = None
        self._batches: dict[asyncio.Task, list[_Entry]] = {}  # running batch tasks and their entries
        self._putting = 0  # submitters not yet queued (keying a video, or waiting for queue space)
        self._closed = False
        self._cancelling = False
        self._statuses: Counter = Counter()
        self._batch_sizes: Counter = Counter()
        self._latencies: deque = deque(maxlen=10_000)
        self._cache_hits = 0
        self._max_depth = 0

    # -- submission -------------------------------------------------------------------------

    def _start(self) -> None:
        if self._queue is None:
            self._queue = asyncio.Queue(maxsize=self.max_queue)
            self._sem = asyncio.Semaphore(self.max_concurrency)
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

    async def submit(self, request: JudgeRequest) -> asyncio.Future:
        """Queue ``request``; returns a future of its Verdict. Awaits while the queue is full."""
        if self._closed:
            raise RuntimeError("AsyncJudge.submit: the judge is closed")
        if not isinstance(request, JudgeRequest):
            raise TypeError(f"AsyncJudge.submit: expected a JudgeRequest, got {type(request).__name__}")
        self._start()
        # counted from here: a draining aclose() waits for a submit still hashing its video, which
        # would otherwise queue its request after the dispatcher had stopped (never answered)
        self._putting += 1
        try:
            fut = await self._submit(request)
        finally:
            self._putting -= 1
        if self._cancelling:
            self._cancel_queued()
        return fut

    async def _submit(self, request: JudgeRequest) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut, t0 = loop.create_future(), time.perf_counter()
        key = None
        if self.use_cache:
            try:
                key = (
                    cache_key(request)
                    if request.video is None
                    else await asyncio.to_thread(cache_key, request)
                )
            except Exception as e:  # noqa: BLE001 - an unreadable video: judged uncached, the backend says why
                log.debug(
                    "judge request not cacheable (%s: %s); judged without the cache", type(e).__name__, e
                )
            if key is not None and self._serve_from_cache(key, fut, t0):
                return fut
        inner = loop.create_future()
        await self._queue.put(_Entry(request, inner, key, t0))
        # registered once queued: a cancelled wait leaves none
        self._follow(inner, fut, t0)
        if key is not None and key not in self._inflight:
            self._inflight[key] = inner
        self._max_depth = max(self._max_depth, self._queue.qsize())
        return fut

    def _serve_from_cache(self, key: tuple, fut: asyncio.Future, t0: float) -> bool:
        if key in self._cache:
            self._cache_hits += 1
            self._cache.move_to_end(key)
            v = self._cache[key]
            self._finish(fut, Verdict(v.score, v.status, v.raw, 0.0), t0)
            return True
        primary = self._inflight.get(key)
        if primary is None:
            return False
        self._cache_hits += 1
        self._follow(primary, fut, t0)
        return True

    def _follow(self, inner: asyncio.Future, fut: asyncio.Future, t0: float) -> None:
        """Answer the caller's ``fut`` with the request's verdict when ``inner`` has it."""
        self._callers.setdefault(inner, []).append(fut)
        inner.add_done_callback(
            lambda p: self._finish(fut, p.result() if not p.cancelled() else _cancelled(), t0)
        )

    def _finish(self, fut: asyncio.Future, verdict: Verdict, t0: float) -> None:
        if fut.done():
            return
        self._statuses[verdict.status] += 1
        self._latencies.append(time.perf_counter() - t0)
        fut.set_result(verdict)

    # -- batching ---------------------------------------------------------------------------

    async def _collect(self, batch: list[_Entry]) -> list[_Entry]:
        batch.append(await self._queue.get())
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _dispatch(self) -> None:
        while True:
            await self._sem.acquire()
            batch: list[_Entry] = []
            try:
                await self._collect(batch)
            except asyncio.CancelledError:  # closing: entries held here must not vanish
                self._sem.release()
                for e in batch:
                    self._queue.task_done()
                    self._resolve(e, _cancelled())
                raise
            for _ in batch:
                self._queue.task_done()
            # every caller of a request stopped waiting (a served client that disconnected): judging it anyway
            # kept the backend busy with answers nobody reads, and timed out the requests queued behind it
            live = []
            for e in batch:
                callers = self._callers.get(e.future)
                if callers and all(f.cancelled() for f in callers):
                    self._resolve(e, _cancelled("every caller stopped waiting"))
                else:
                    live.append(e)
            batch = live
            if not batch:
                self._sem.release()
                continue
            self._batch_sizes[len(batch)] += 1
            task = asyncio.get_running_loop().create_task(self._run_batch(batch))
            self._batches[task] = batch
            task.add_done_callback(lambda t: self._batches.pop(t, None))

    async def _run_batch(self, batch: list[_Entry]) -> None:
        t0 = time.perf_counter()
        try:
            try:
                async with asyncio.timeout(self.batch_timeout_s):
                    verdicts = await self.backend.score([e.request for e in batch])
                if not isinstance(verdicts, list) or len(verdicts) != len(batch):
                    n = len(verdicts) if isinstance(verdicts, list) else type(verdicts).__name__
                    raise ValueError(f"backend returned {n} verdicts for {len(batch)} requests")
                # a non-Verdict (None) failed in _resolve below, leaving the rest of the batch unanswered
                bad = [type(v).__name__ for v in verdicts if not isinstance(v, Verdict)]
                if bad:
                    raise TypeError(f"backend returned {', '.join(sorted(set(bad)))} in place of Verdicts")
            except TimeoutError:
                msg = f"batch of {len(batch)} exceeded {self.batch_timeout_s}s"
                verdicts = [Verdict(None, "timeout", msg, time.perf_counter() - t0)] * len(batch)
            except asyncio.CancelledError:
                for e in batch:
                    self._resolve(e, _cancelled())
                raise
            except Exception as e:  # a backend bug must fail its batch, not the service
                log.warning(
                    "judge backend %s raised on a batch of %d: %r", type(self.backend).__name__, len(batch), e
                )
                verdicts = [
                    Verdict(None, "error", f"{type(e).__name__}: {e}", time.perf_counter() - t0)
                ] * len(batch)
            for e, v in zip(batch, verdicts):
                self._resolve(e, v)
        finally:
            self._sem.release()

    def _resolve(self, entry: _Entry, verdict: Verdict) -> None:
        if entry.future.done():  # answered already (aclose answers what a cancelled batch left)
            return
        if entry.key is not None:
            if verdict.status == "ok":
                self._cache[entry.key] = verdict
                self._cache.move_to_end(entry.key)
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            if self._inflight.get(entry.key) is entry.future:
                del self._inflight[entry.key]
        self._callers.pop(entry.future, None)
        entry.future.set_result(verdict)

    # -- shutdown and metrics -----------------------------------------------------------------

    def _cancel_queued(self) -> None:
        while self._queue is not None and not self._queue.empty():
            e = self._queue.get_nowait()
            self._queue.task_done()
            self._resolve(e, _cancelled())

    async def aclose(self, drain: bool = True) -> None:
        """Stop accepting requests; finish queued and running work (drain) or cancel it ("cancelled")."""
        self._closed = True
        if self._queue is None:
            return
        if drain:  # every queued entry handed to a batch, those of submitters still waiting for space too
            while True:
                await self._queue.join()
                if self._putting == 0 and self._queue.empty():
                    break
                # a submitter may be hashing its video in a thread: wait without spinning
                await asyncio.sleep(0.001)
        else:
            self._cancelling = True
            self._cancel_queued()
        self._dispatcher.cancel()
        batches = dict(self._batches)
        if not drain:
            for t in batches:
                t.cancel()
        await asyncio.gather(self._dispatcher, *batches, return_exceptions=True)
        for entries in batches.values():  # a batch cancelled before it started ran none of its own handling
            for e in entries:
                self._resolve(e, _cancelled())
        if hasattr(self.backend, "aclose"):
            await self.backend.aclose()

    def metrics(self) -> dict:
        """Queue depth, latency percentiles (s), batch size histogram, verdict counts per status."""
        sizes = self._batch_sizes
        n_batches = sum(sizes.values())
        return {
            "queue_depth": self._queue.qsize() if self._queue is not None else 0,
            "max_queue_depth": self._max_depth,
            "in_flight_batches": len(self._batches),
            "latency_p50_s": _percentile(self._latencies, 50),
            "latency_p95_s": _percentile(self._latencies, 95),
            "batches": n_batches,
            "batch_size_hist": dict(sorted(sizes.items())),
            "mean_batch_size": (sum(k * v for k, v in sizes.items()) / n_batches) if n_batches else 0.0,
            "statuses": dict(self._statuses),
            "cache_hits": self._cache_hits,
            "answered": sum(self._statuses.values()),
        }


class JudgeHandle:
    """The pending verdicts of one :meth:`JudgeService.submit_many` call."""

    def __init__(self, future: concurrent.futures.Future, service: JudgeService, n: int) -> None:
        self._future, self._service, self.n = future, service, n

    def done(self) -> bool:
        """True when every verdict is in (``result`` will not block)."""
        return self._future.done()

    def result(self, timeout: float | None = None) -> list[Verdict]:
        """The verdicts, same order as submitted; blocks up to ``timeout`` s (TimeoutError after)."""
        t0 = time.perf_counter()
        try:
            return self._future.result(timeout)
        finally:
            self._service._record_wait(time.perf_counter() - t0)


class JudgeService:
    """An :class:`AsyncJudge` on its own event loop thread, for synchronous callers (the trainer).

    ``submit_many`` returns as soon as the requests are queued (it blocks only while the queue is
    full: that is the backpressure); ``handle.result()`` collects the verdicts later.
    """

    def __init__(self, backend: Judge, **async_judge_kwargs) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="judge-service", daemon=True)
        self._thread.start()
        try:
            self.judge = self._call(self._make(backend, async_judge_kwargs))
        except BaseException:  # bad settings: the loop thread ran on forever behind the error
            self._stop_loop()
            raise
        self._waits: deque = deque(maxlen=10_000)
        self._wait_total = 0.0
        self._closed = False

    @staticmethod
    async def _make(backend: Judge, kwargs: dict) -> AsyncJudge:
        return AsyncJudge(backend, **kwargs)

    def _call(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _record_wait(self, seconds: float) -> None:
        self._waits.append(seconds)
        self._wait_total += seconds

    async def _enqueue(self, requests: list[JudgeRequest]) -> list[asyncio.Future]:
        return [await self.judge.submit(r) for r in requests]

    def submit_many(self, requests: list[JudgeRequest]) -> JudgeHandle:
        """Queue ``requests``; returns a handle to their verdicts."""
        if self._closed:
            raise RuntimeError("JudgeService.submit_many: the service is closed")
        requests = list(requests)
        # checked before any is queued: the ones before a bad one were judged with no handle to read them
        bad = [type(r).__name__ for r in requests if not isinstance(r, JudgeRequest)]
        if bad:
            raise TypeError(
                f"JudgeService.submit_many: expected JudgeRequests, got {', '.join(sorted(set(bad)))}"
            )
        futures = self._call(self._enqueue(requests))

        async def gather() -> list[Verdict]:
            return list(await asyncio.gather(*futures))

        return JudgeHandle(asyncio.run_coroutine_threadsafe(gather(), self._loop), self, len(futures))

    def metrics(self) -> dict:
        """AsyncJudge metrics plus how long callers blocked in ``handle.result``."""

        async def snap() -> dict:
            return self.judge.metrics()

        m = self._call(snap()) if not self._closed else self.judge.metrics()
        m.update(
            caller_wait_s=self._wait_total,
            caller_wait_p95_s=_percentile(self._waits, 95),
            caller_waits=len(self._waits),
        )
        return m

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Drain (or cancel) pending work, then stop the loop thread. A drain that does not finish within
        ``timeout`` s cancels what is left (those verdicts are "cancelled"), then raises TimeoutError."""
        if self._closed:
            return
        self._closed = True
        try:
            try:
                self._call(self.judge.aclose(drain=drain), timeout)
            except TimeoutError:
                # stopping the loop now would leave the handles of unfinished work unanswered forever
                self._call(self.judge.aclose(drain=False), 10.0)
                raise
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5.0)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> JudgeService:
        return self

    def __exit__(self, exc_type, *_) -> None:
        # leaving on an exception (ctrl-C in the trainer) waited for every pending verdict, which nobody reads
        self.close(drain=exc_type is None)
