"""OpenAIJudge and AsyncJudge against real loopback servers: every fault gets a clear, counted outcome;
a 1,000-request load test; our own serve (tiny random Qwen2.5-VL, and a judge-mode chain)."""

import asyncio
import gc
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

from engine.judge import AsyncJudge, JudgeRequest, OpenAIJudge, TransformersVLM
from engine.judge.chat import ChatItem
from engine.judge.openai import OpenAIChat
from engine.judge.serve import JudgeServer, build_backend
from engine.judge.tiny import build_tiny_qwen25vl
from tests.judge_servers import FaultServer, expected_score, free_port

TIMEOUT = 0.4


def _req(fault: str | None, seed: int, question: str = "task") -> JudgeRequest:
    img = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    task = f"[Agent]: push block {seed}" + (f" fault={fault}" if fault else "")
    return JudgeRequest(task, question, frames=[img])


def _judge(url: str, **kw) -> OpenAIJudge:
    kw = {"timeout_s": TIMEOUT, "max_retries": 2, "backoff_s": 0.01, "num_frames": 1, **kw}
    return OpenAIJudge(url, "fault-model", **kw)


# fault -> (status, attempts the server sees per request: retries 2, parse retries 1)
CASES = {
    None: ("ok", 1),
    "json": ("ok", 1),
    "yes": ("ok", 1),
    "500once": ("ok", 2),
    "malformed": ("parse_error", 2),
    "empty": ("parse_error", 2),
    "outofrange": ("parse_error", 2),
    "500": ("http_error", 3),
    "badbody": ("http_error", 3),
    "badgzip": ("http_error", 3),  # an undecodable body fails its item, not the batch
    "drop": ("connection_error", 3),
}


def test_slow_server_times_out_after_retries():
    with FaultServer(slow_s=2.0) as srv:
        judge = _judge(srv.url)
        t0 = time.perf_counter()
        (v,) = asyncio.run(judge.score([_req("slow", 0)]))
        elapsed = time.perf_counter() - t0
    assert v.status == "timeout" and v.score is None and judge.chat.retries == 2
    assert 3 * TIMEOUT <= elapsed < 3 * TIMEOUT + 1.5  # cut by the client each time, not awaited


def test_a_429_retry_waits_the_servers_retry_after():
    # backoff 0.01 s: retrying at once spent all three attempts on 429s before the 1 s had passed
    with FaultServer(retry_after_s=1) as srv:
        judge = _judge(srv.url, timeout_s=5.0, parse_retries=0)
        t0 = time.perf_counter()
        (v,) = asyncio.run(judge.score([_req("ratelimit", 7)]))
        elapsed = time.perf_counter() - t0
    assert v.status == "ok" and v.score == pytest.approx(expected_score(_req(None, 7).frames[0]), abs=1e-4)
    assert srv.requests == 2 and 1.0 <= elapsed < 3.0


def test_bad_client_settings_are_one_line_errors():
    # max_connections=0 made every request wait for a pool slot forever
    for kw in ({"max_connections": 0}, {"timeout_s": float("nan")}, {"backoff_s": -1.0}):
        with pytest.raises(ValueError, match="OpenAIChat: need"):
            OpenAIChat("http://127.0.0.1:1/v1", "m", **kw)


def test_bad_judge_settings_are_one_line_errors():
    # parse_retries=-1 sent nothing to the server and returned None in place of every Verdict
    with pytest.raises(ValueError, match="VLMJudge: need parse_retries >= 0"):
        _judge("http://127.0.0.1:1/v1", parse_retries=-1)


def test_waiting_for_a_pooled_connection_does_not_count_against_the_deadline():
    """12 requests over 2 connections to a server that answers each in 0.3 s, deadline 1 s: every one is
    answered (the wait for a free connection counted against the deadline: 8 timed out, 6 never sent)."""
    reqs = [_req("slow", i) for i in range(12)]

    async def run(srv):
        judge = _judge(srv.url, timeout_s=1.0, max_retries=0, max_connections=2, parse_retries=0)
        try:
            return await judge.score(reqs)
        finally:  # a judge dropped inside its loop is closed by GC, which asyncio.run's shutdown cuts short
            await judge.aclose()

    with FaultServer(slow_s=0.3) as srv:
        out = asyncio.run(run(srv))
        assert srv.requests == 12 and srv.max_in_flight <= 2
    for r, v in zip(reqs, out):
        assert v.ok and v.score == pytest.approx(expected_score(r.frames[0]), abs=1e-4), v


def test_every_fault_has_a_counted_outcome():
    with FaultServer() as srv:
        judge = _judge(srv.url, timeout_s=10.0)  # generous: only the injected faults may fail here
        reqs = [_req(f, i) for i, f in enumerate(CASES)]
        verdicts = asyncio.run(judge.score(reqs))
    for (fault, (status, attempts)), r, v in zip(CASES.items(), reqs, verdicts):
        assert v.status == status, (fault, v)
        assert srv.attempts[" ".join([build_text(r)])] == attempts, fault
        if status == "ok":
            want = 1.0 if fault == "yes" else expected_score(r.frames[0])
            assert v.score == pytest.approx(want, abs=1e-4), fault
            assert v.score != 0 or fault != "none"
        else:
            assert v.score is None and (v.raw or fault == "empty")  # the reason is kept
    assert judge.parse_retried == 3 and judge.chat.retries == 2 * 4 + 1


def test_an_answer_cut_at_max_tokens_inside_its_score_is_no_score():
    """A reply stopped at max_tokens (finish_reason "length", as vLLM sends it) inside its score line, "...Score: 0"
    of "Score: 0.5", read as 0.0: a made-up reward. It is now a parse_error; a reply cut after a whole score line
    still reads, and ChatResult.truncated says which replies were cut."""
    reqs = [_req("cut", 1), _req("cutafter", 2), _req(None, 3)]
    with FaultServer() as srv:
        judge = _judge(srv.url, timeout_s=5.0)
        out = asyncio.run(judge.score(reqs))
        chat = asyncio.run(judge.chat.chat([judge._item(r) for r in reqs]))
    assert [c.truncated for c in chat] == [True, True, False]
    assert (
        out[0].status == "parse_error"
        and out[0].raw.endswith("Score: 0")
        and expected_score(reqs[0].frames[0]) > 0.1
    )
    for r, v in zip(reqs[1:], out[1:]):
        assert v.ok and v.score == pytest.approx(expected_score(r.frames[0]), abs=1e-4)


def build_text(r: JudgeRequest) -> str:
    from engine.judge import build_prompt

    return build_prompt(r)


def test_a_prompt_that_cannot_be_sent_fails_only_its_own_request():
    """A task holding a lone surrogate (a JSON task file may escape one: "\\udc80") cannot be encoded as UTF-8;
    httpx's UnicodeEncodeError raised out of OpenAIChat.chat, so every request batched with it failed ("error")
    as well. Only that request fails now; the others get the server's answers."""
    import json

    reqs = [_req(None, i) for i in range(3)]
    reqs.insert(
        1, JudgeRequest(json.loads('"[Agent]: push the \\udc80 block"'), "task", frames=reqs[0].frames)
    )
    with FaultServer() as srv:
        out = asyncio.run(_judge(srv.url, timeout_s=5.0).score(reqs))
    assert out[1].status == "error" and "UnicodeEncodeError" in out[1].raw
    for r, v in zip(reqs[:1] + reqs[2:], out[:1] + out[2:]):
        assert v.ok and v.score == pytest.approx(expected_score(r.frames[0]), abs=1e-4)


def test_connection_refused_and_server_dying_mid_batch():
    judge = _judge(f"http://127.0.0.1:{free_port()}/v1")
    vs = asyncio.run(judge.score([_req(None, i) for i in range(3)]))
    assert [v.status for v in vs] == ["connection_error"] * 3

    async def run(srv):
        judge = _judge(srv.url, timeout_s=5.0)
        task = asyncio.ensure_future(judge.score([_req("slow", i) for i in range(6)]))
        while srv.in_flight < 6:  # every request reached the server
            await asyncio.sleep(0.01)
        srv.kill()
        return await task

    with FaultServer(slow_s=3.0) as srv:
        t0 = time.perf_counter()
        vs = asyncio.run(run(srv))
    assert [v.status for v in vs] == ["connection_error"] * 6 and time.perf_counter() - t0 < 2.5


def test_two_concurrent_acloses_close_the_pool_once():
    """Two aclose() at once (AsyncJudge closed twice, as JudgeService.close does when its drain times out):
    the second found the pool's generator still closing and raised RuntimeError; both now return and the
    server sees its connection closed."""

    async def run(srv):
        judge = _judge(srv.url)
        await judge.score([_req(None, 1)])
        return await asyncio.gather(judge.aclose(), judge.aclose(), return_exceptions=True)

    with FaultServer() as srv:
        assert asyncio.run(run(srv)) == [None, None]
        deadline = time.monotonic() + 5.0
        while srv.open_connections() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv.open_connections() == 0


def test_client_closes_with_its_event_loop():
    """The judge used from successive asyncio.run() loops closes each loop's connection pool as the loop
    ends (the client was dropped open on a loop change: the server kept the connection until GC, whose
    transport finalizer warned 'unclosed transport'), and aclose from another loop leaves none open."""

    def server_closed_all(srv) -> bool:
        deadline = time.monotonic() + 5.0
        while srv.open_connections() and time.monotonic() < deadline:
            time.sleep(0.01)
        return srv.open_connections() == 0

    gc.collect()  # what earlier tests left to GC warns now, not inside this test's record
    with FaultServer() as srv, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        judge = _judge(srv.url, timeout_s=5.0)
        for i in range(3):
            (v,) = asyncio.run(judge.score([_req(None, i)]))
            assert v.ok and srv.requests == i + 1
            assert server_closed_all(srv), f"loop {i}: {srv.open_connections()} connection(s) left open"
        asyncio.run(judge.score([_req(None, 3)]))
        asyncio.run(judge.aclose())  # another loop: the pool closed with its own loop already
        assert server_closed_all(srv)
        vs = asyncio.run(judge.score([_req(None, i) for i in range(4, 6)]))  # aclose leaves it usable
        assert [v.status for v in vs] == ["ok", "ok"]
        gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not unclosed, unclosed


def test_load_1000_requests_all_answered_explicitly():
    faults = [None] * 8 + ["malformed", "500once", "500", "json"]
    reqs = [
        _req(faults[i % len(faults)], i, question=("task", "agent", "consistency")[i % 3])
        for i in range(1000)
    ]

    async def run(srv):
        judge = AsyncJudge(
            _judge(srv.url, timeout_s=10.0, max_connections=32),
            max_batch=32,
            max_wait_ms=5,
            max_concurrency=4,
            max_queue=256,
        )
        futs = [await judge.submit(r) for r in reqs]
        out = await asyncio.gather(*futs)
        await judge.aclose()
        return out, judge.metrics()

    with FaultServer() as srv:
        verdicts, m = asyncio.run(asyncio.wait_for(run(srv), 60))
    assert len(verdicts) == 1000 and m["answered"] == 1000 and sum(m["statuses"].values()) == 1000
    for r, v in zip(reqs, verdicts):
        fault = r.task.split("fault=")[-1] if "fault=" in r.task else None
        assert v.status == CASES[fault][0], (fault, v)
        if v.ok:
            assert v.score == pytest.approx(expected_score(r.frames[0]), abs=1e-4)
    assert max(m["batch_size_hist"]) > 1 and m["mean_batch_size"] > 1.5, m
    assert m["max_queue_depth"] <= 256 and m["latency_p95_s"] >= m["latency_p50_s"] > 0
    assert srv.max_in_flight > 1


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    path = build_tiny_qwen25vl(tmp_path_factory.mktemp("tinyvlm"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 0.2M-parameter model: more threads only contend on a busy box
    yield str(path), TransformersVLM(str(path), device="cpu", max_batch=4)
    torch.set_num_threads(threads)


def _chat_items(n: int) -> list[ChatItem]:
    rng = np.random.default_rng(7)
    return [
        ChatItem(
            [rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)], f"the agent pushes the red block {i}", 5
        )
        for i in range(n)
    ]


async def _chat_through_serve(vlm, items):
    """``items`` sent by OpenAIChat to our serve in chat mode over ``vlm``: (the results, the server's judge
    metrics)."""
    server = JudgeServer(vlm, mode="chat", model_name="tiny", max_batch=4, max_wait_ms=30)
    port = await server.start()
    client = OpenAIChat(f"http://127.0.0.1:{port}/v1", "tiny", timeout_s=30, max_retries=0)
    out = await client.chat(items)
    await client.aclose()
    await server.aclose()
    return out, server.judge.metrics()


def test_serve_transformers_in_process_batches_and_matches_direct_generation(tiny_vlm):
    _, vlm = tiny_vlm
    items = _chat_items(6)
    direct = [vlm.generate([it])[0] for it in items]
    out, m = asyncio.run(_chat_through_serve(vlm, items))
    assert [r.status for r in out] == ["ok"] * 6
    assert [r.text for r in out] == direct  # PNG round trip is lossless; greedy decoding is repeatable
    assert max(m["batch_size_hist"]) > 1


def test_serve_says_finish_reason_length_for_an_answer_cut_at_max_tokens(tiny_vlm):
    """The served chat mode answered finish_reason "stop" to every reply, so a client could not tell an answer
    cut at max_tokens (which may end mid-score) from a whole one; such replies now say "length"."""
    _, vlm = tiny_vlm
    items = _chat_items(12)
    for it in items:
        it.max_new_tokens = 3
    direct = asyncio.run(vlm.chat(items))
    out, _ = asyncio.run(_chat_through_serve(vlm, items))
    assert [r.text for r in out] == [r.text for r in direct]
    cut = [r.truncated for r in direct]
    assert [r.truncated for r in out] == cut and True in cut and False in cut


def test_serve_judge_mode_chain_and_bad_requests():
    """client -> our serve (judge mode over OpenAIJudge) -> fault server: scores survive both hops."""

    async def run(srv):
        server = JudgeServer(_judge(srv.url), mode="judge", model_name="chain", max_batch=8)
        port = await server.start()
        client = _judge(f"http://127.0.0.1:{port}/v1", timeout_s=5.0)
        reqs = [_req(None, i) for i in range(5)] + [_req("500", 9)]
        out = await client.score(reqs)
        bad = await client.chat.chat([ChatItem([], "not a judge prompt", 4)])
        await server.aclose()
        return reqs, out, bad

    with FaultServer() as srv:
        reqs, out, bad = asyncio.run(run(srv))
    for r, v in zip(reqs[:5], out[:5]):
        assert v.ok and v.score == pytest.approx(expected_score(r.frames[0]), abs=1e-4)
    assert out[5].status == "http_error" and "502" in out[5].raw
    assert bad[0].status == "http_error" and "400" in bad[0].text


async def _post_to_judge_server(srv: FaultServer, send):
    """A judge-mode JudgeServer over ``srv`` on a free port: ``send(client, chat URL)``'s result, then close."""
    import httpx

    server = JudgeServer(_judge(srv.url), mode="judge", model_name="m")
    port = await server.start()
    try:
        async with httpx.AsyncClient() as c:
            return await send(c, f"http://127.0.0.1:{port}/v1/chat/completions")
    finally:
        await server.aclose()


def test_serve_answers_400_to_invalid_bodies():
    """Bodies that are not a chat request the server can judge get HTTP 400 with the reason (not a dropped
    connection, which a client would retry): a JSON list, a judge prompt without an image, an image_url
    whose url is not a string, a max_tokens of true."""
    import httpx

    from engine.judge import build_prompt

    prompt = build_prompt(JudgeRequest("[Agent]: push", "task", frames=[np.zeros((4, 4, 3), np.uint8)]))
    no_image = {"messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}]}

    # an image_url whose url is not a string crashed the connection's handler (no answer at all)
    odd_urls = [
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}}]}]}
        for u in (123, None)
    ]
    bool_tokens = {"max_tokens": True, "messages": [{"role": "user", "content": prompt}]}

    async def send(c: httpx.AsyncClient, url: str) -> list:
        return [await c.post(url, json=b) for b in ([1, 2], no_image, *odd_urls, bool_tokens)]

    with FaultServer() as srv:
        as_list, no_image, *odd, bool_tokens = asyncio.run(_post_to_judge_server(srv, send))
    assert as_list.status_code == 400 and "JSON object" in as_list.json()["error"]["message"]
    assert no_image.status_code == 400 and "frame" in no_image.json()["error"]["message"]
    for r in odd:
        assert r.status_code == 400 and "data: URL" in r.json()["error"]["message"]
    assert bool_tokens.status_code == 400 and "max_tokens" in bool_tokens.json()["error"]["message"]


def test_serve_refuses_streaming_and_several_choices():
    """ "stream": true got one plain JSON completion (a streaming client reads server-sent events and found none:
    an empty answer, no error) and "n": 2 one choice; both are now refused with 400. A plain request is answered."""
    import httpx

    from engine.judge.openai import chat_payload

    r = _req(None, 5)
    body = chat_payload("m", ChatItem(r.frames, build_text(r)))

    async def send(c: httpx.AsyncClient, url: str) -> list:
        return [await c.post(url, json={**body, **extra}) for extra in ({"stream": True}, {"n": 2}, {"n": 1})]

    with FaultServer() as srv:
        streamed, two, plain = asyncio.run(_post_to_judge_server(srv, send))
    for refused in (streamed, two):
        assert refused.status_code == 400 and "not supported" in refused.json()["error"]["message"]
    content = plain.json()["choices"][0]["message"]["content"]
    assert plain.status_code == 200 and content == f"Score: {expected_score(r.frames[0]):.4f}"


def test_serve_answers_400_to_a_body_over_the_limit():
    """A body over MAX_BODY was refused unread and the connection closed while the body still arrived: the
    client got a connection reset (ReadError, which OpenAIChat retried, uploading the body again) instead of
    the answer. The answer now reaches it."""
    from engine.judge.serve import MAX_BODY

    body = b'{"messages": "' + b"x" * (MAX_BODY + (4 << 20)) + b'"}'

    async def send(c, url):
        return await c.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=60)

    with FaultServer() as srv:
        r = asyncio.run(_post_to_judge_server(srv, send))
    assert r.status_code == 400 and "exceeds" in r.json()["error"]["message"]


def test_serve_answers_400_to_a_decompression_bomb_image():
    """A PNG whose header claims 10^10 pixels raised PIL's DecompressionBombError (not a ValueError or
    OSError) in the connection's handler: the connection was cut without an answer, which clients retry."""
    import base64
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}

    async def send(c, url: str) -> list:
        return [await c.post(url, json=body), await c.get(url.replace("/v1/chat/completions", "/health"))]

    with FaultServer() as srv:
        bomb, health = asyncio.run(_post_to_judge_server(srv, send))
    assert bomb.status_code == 400 and "undecodable image" in bomb.json()["error"]["message"]
    assert health.status_code == 200


def test_serve_refuses_a_chunked_body_and_answers_the_next_request():
    """A chunked upload (httpx streaming a body) gets 400 saying so; it read as an empty body ('Expecting
    value') and its chunks stayed in the keep-alive stream: the next, valid request got 404 'no route 64'."""
    import httpx

    from engine.judge.openai import chat_payload

    body = chat_payload("m", ChatItem([np.zeros((8, 8, 3), np.uint8)], "not a judge prompt"))

    async def send(c: httpx.AsyncClient, url: str) -> list:
        data = httpx.Request("POST", url, json=body).read()

        async def chunks():
            yield data[:100]
            yield data[100:]

        return [await c.post(url, content=chunks()), await c.post(url, content=data)]

    with FaultServer() as srv:
        chunked, plain = asyncio.run(_post_to_judge_server(srv, send))
    assert chunked.status_code == 400 and "chunked" in chunked.json()["error"]["message"]
    assert plain.status_code == 400 and "judge's own prompts" in plain.json()["error"]["message"]


def test_serve_aclose_closes_idle_keep_alive_connections():
    """A client's idle keep-alive connection is closed by aclose, which returns promptly (from Python 3.12
    on, asyncio's wait_closed waits for open connections: a client pool kept open hung the shutdown)."""

    async def run(srv):
        server = JudgeServer(_judge(srv.url), mode="judge", model_name="idle")
        port = await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # a request, then the connection idles
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(
            next(ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length"))
        )
        await reader.readexactly(length)
        await asyncio.wait_for(server.aclose(), 10)
        eof = await asyncio.wait_for(reader.read(1), 10)  # the server closed its side
        writer.close()
        return head, eof

    with FaultServer() as srv:
        head, eof = asyncio.run(run(srv))
    assert head.startswith(b"HTTP/1.1 200") and eof == b""


def test_serve_answers_expect_100_continue():
    """curl sends "Expect: 100-continue" for large bodies (7.88: over 1 MiB, four frames) and holds them 1 s
    unless the server says 100 Continue first: the server never did, so each curl request waited 1 s."""

    async def run(srv: FaultServer):
        server = JudgeServer(_judge(srv.url), mode="judge", model_name="m")
        port = await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b"[1, 2]"
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        await writer.drain()
        try:
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5)
        except TimeoutError:
            interim = b""
        writer.write(body)  # as curl does after the 100 (or after its 1 s wait)
        await writer.drain()
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.close()
        await server.aclose()
        return interim, final

    with FaultServer() as srv:
        interim, final = asyncio.run(run(srv))
    assert interim.startswith(b"HTTP/1.1 100") and final.startswith(b"HTTP/1.1 400")


def test_serve_aclose_does_not_wait_for_a_request_in_flight():
    """aclose waited up to 5 s for the handler of a request whose backend was still busy (ctrl-C hung)."""
    import httpx

    from engine.judge import build_prompt
    from engine.judge.openai import chat_payload

    img = np.zeros((8, 8, 3), np.uint8)
    prompt = build_prompt(JudgeRequest("[Agent]: push fault=slow", "task", frames=[img]))
    body = chat_payload("m", ChatItem([img], prompt))

    async def run(srv: FaultServer) -> float:
        server = JudgeServer(_judge(srv.url, timeout_s=20.0), mode="judge", model_name="m")
        port = await server.start()
        async with httpx.AsyncClient(timeout=30) as c:
            post = asyncio.create_task(c.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body))
            while srv.in_flight == 0:  # the request reached the slow backend
                await asyncio.sleep(0.01)
            t0 = time.perf_counter()
            await server.aclose()
            elapsed = time.perf_counter() - t0
            await asyncio.gather(post, return_exceptions=True)  # cut: no answer
        return elapsed

    with FaultServer(slow_s=8.0) as srv:
        assert asyncio.run(run(srv)) < 2.0


def test_serve_drops_a_request_whose_client_left_before_it_was_judged():
    """A client that timed out (and closed its connection) while its request waited behind a slow one: the
    server still judged it, for nobody, keeping the backend busy with answers no one reads (under load every
    retry queued behind such work and timed out as well). It is now dropped; the slow one is answered."""

    async def run(srv: FaultServer):
        server = JudgeServer(_judge(srv.url, timeout_s=5.0), mode="judge", model_name="m", max_batch=1)
        port = await server.start()
        url = f"http://127.0.0.1:{port}/v1"
        patient, hasty = _judge(url, timeout_s=5.0, max_retries=0), _judge(url, max_retries=0)
        slow = asyncio.ensure_future(patient.score([_req("slow", 1)]))
        while srv.in_flight == 0:  # the slow request holds the server's one batch slot
            await asyncio.sleep(0.01)
        left = await hasty.score([_req(None, 2)])  # queued behind it; gives up after TIMEOUT s
        out = await asyncio.wait_for(slow, 10)
        await asyncio.sleep(0.2)
        for c in (patient, hasty, server):
            await c.aclose()
        return left[0], out[0]

    with FaultServer(slow_s=1.5) as srv:
        left, out = asyncio.run(run(srv))
        asked = list(srv.attempts)
    assert left.status == "timeout" and out.ok
    assert len(asked) == 1 and "fault=slow" in asked[0], asked  # the left request never reached the backend


def test_serve_cli_subprocess(tiny_vlm):
    path, _ = tiny_vlm
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WMSD_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine.judge.serve",
            "--backend",
            "transformers",
            "--model",
            path,
            "--port",
            "0",
            "--device",
            "cpu",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()  # "serving transformers on http://127.0.0.1:PORT/v1"
        assert "serving" in line, line
        client = OpenAIChat(line.split()[-1], "tiny", timeout_s=30, max_retries=0)
        out = asyncio.run(client.chat(_chat_items(2)))
        assert [r.status for r in out] == ["ok", "ok"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_serve_oracle_backend_is_clear_about_its_dependency():
    try:
        import engine.world.oracle  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="engine.world.oracle.OracleJudge"):
            build_backend("oracle", "", device=None, max_batch=4)
    else:
        backend, mode = build_backend("oracle", "", device=None, max_batch=4)
        assert mode == "judge" and hasattr(backend, "score")
    with pytest.raises(SystemExit, match="--model"):
        build_backend("transformers", "", device=None, max_batch=4)


def test_serve_a_bad_model_folder_is_a_one_line_error(tmp_path):
    # both were transformers tracebacks (a missing folder read as a hub repo id)
    with pytest.raises(SystemExit, match="is not a folder"):
        build_backend("transformers", str(tmp_path / "missing"), device="cpu", max_batch=4)
    with pytest.raises(SystemExit, match="cannot load --model"):
        build_backend("transformers", str(tmp_path), device="cpu", max_batch=4)


def test_serve_a_device_the_model_cannot_go_to_is_a_one_line_error(tiny_vlm):
    # a misspelt --device and a CUDA device this machine lacks were tracebacks from the model's .to()
    for device, why in (("gpu", "is not a device"), ("cuda:99", "CUDA device")):
        with pytest.raises(SystemExit, match=f"--device '{device}'.*{why}"):
            build_backend("transformers", tiny_vlm[0], device=device, max_batch=4)


def test_serve_cli_bad_settings_are_one_line_errors(capsys):
    import socket

    from engine.judge.serve import main

    for argv in (["--max-batch", "0"], ["--max-wait-ms", "nan"], ["--port", "70000"]):
        with pytest.raises(SystemExit) as e:
            main(["--backend", "oracle", *argv])
        assert e.value.code == 2 and "need --max-batch >= 1" in capsys.readouterr().err
    with socket.socket() as taken:  # a port in use: one line naming it, not an OSError traceback
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{port}"):
            main(["--backend", "oracle", "--port", str(port)])


def test_serve_reads_a_null_max_tokens_as_unset():
    """An explicit "max_tokens": null (some clients send every field) is unset, as in the OpenAI API: the
    other key or the default applies (it was a 400)."""
    from engine.judge.openai import chat_payload
    from engine.judge.serve import parse_chat_request

    body = chat_payload("m", ChatItem([np.zeros((8, 8, 3), np.uint8)], "hi"))
    body.pop("max_tokens", None)
    assert parse_chat_request({**body, "max_tokens": None, "max_completion_tokens": 20}).max_new_tokens == 20
    assert parse_chat_request({**body, "max_tokens": None}).max_new_tokens == 64
    assert parse_chat_request({**body, "max_tokens": 7, "max_completion_tokens": 20}).max_new_tokens == 7


def test_serve_answers_422_to_a_verdict_no_retry_can_change():
    """The oracle cannot judge a single frame (a parse_error, the same on every attempt): our serve answers
    422 with the oracle's reason and the client does not retry it (a 502 was retried max_retries times, with
    backoff, each attempt failing again); a temporary failure is still a 502 that is retried."""
    pytest.importorskip("engine.world.oracle")
    from engine.world.oracle import OracleJudge

    async def run():
        server = JudgeServer(OracleJudge(), mode="judge", model_name="oracle")
        port = await server.start()
        client = _judge(f"http://127.0.0.1:{port}/v1", timeout_s=5.0, max_retries=3, parse_retries=0)
        try:
            img = np.zeros((8, 8, 3), np.uint8)
            out = await client.score(
                [JudgeRequest("[Agent]: put the red block under the blue block", "task", frames=[img])]
            )
            return out, client.chat.retries, server.judge.metrics()["answered"]
        finally:
            await client.aclose()
            await server.aclose()

    out, retries, answered = asyncio.run(run())
    assert out[0].status == "http_error" and "HTTP 422" in out[0].raw, out[0].raw
    assert "parse_error" in out[0].raw and "1 frame(s)" in out[0].raw  # the oracle's reason passed through
    assert retries == 0 and answered == 1


def test_serve_answers_422_to_an_image_the_vlm_refuses(tiny_vlm):
    """Chat mode over a local VLM whose processor refuses an image (aspect ratio over 200): every attempt fails
    the same way, so the serve answers 422 and the client does not retry it (it was a 502, retried
    max_retries times); the good item sent beside it is answered."""
    _, vlm = tiny_vlm
    rng = np.random.default_rng(0)
    good = _chat_items(1)[0]
    bad = ChatItem([rng.integers(0, 256, (28, 6000, 3), dtype=np.uint8)], "the agent pushes the block", 5)

    async def run():
        server = JudgeServer(vlm, mode="chat", model_name="tiny", max_batch=4, max_wait_ms=30)
        port = await server.start()
        client = OpenAIChat(f"http://127.0.0.1:{port}/v1", "tiny", timeout_s=30, max_retries=3)
        try:
            return await client.chat([good, bad]), client.retries
        finally:
            await client.aclose()
            await server.aclose()

    (ok, refused), retries = asyncio.run(run())
    assert ok.status == "ok"
    assert refused.status == "http_error" and "HTTP 422" in refused.text and "aspect ratio" in refused.text
    assert retries == 0
