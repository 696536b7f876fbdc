"""Serve a judge backend as an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    python -m engine.judge.serve --backend transformers --model PATH --host 127.0.0.1 --port 8000
    python -m engine.judge.serve --backend oracle --host 127.0.0.1 --port 8000

A small HTTP/1.1 server on asyncio streams (keep-alive, Content-Length bodies; no chunked uploads),
enough for :class:`engine.judge.openai.OpenAIChat`, vLLM-style clients and curl. Concurrent requests
are batched through one :class:`engine.judge.service.AsyncJudge`:

- ``transformers``: any chat (images + prompt) goes to the local VLM; the reply is its text.
- ``oracle``: the toy world's oracle (``engine.world.oracle.OracleJudge``) only understands the
  judge's own prompts (engine.judge.base.PROMPTS of this PROMPT_VERSION); the task and question are
  read back from the prompt and the reply is ``Score: <x>``. Other prompts get HTTP 400.

A verdict no retry can change (a parse_error: e.g. the oracle given one frame; "rejected": the VLM's processor
refused the image) is HTTP 422, which clients do not retry; a temporary failure (timeout, backend error) is
HTTP 502.

Images must be ``data:`` URLs (base64). Routes: POST /v1/chat/completions, GET /v1/models, GET /health.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import time

import numpy as np

from engine.judge.base import PROMPTS, Judge, JudgeRequest, Verdict
from engine.judge.chat import ChatBackend, ChatItem
from engine.judge.service import AsyncJudge
from engine.log import get_logger

log = get_logger("judge.serve")

MAX_BODY = 64 << 20
MAX_TOKENS = 4096
EOF_POLL_S = 0.05  # how often a request in flight checks that its client is still connected


class BadRequest(ValueError):
    """A client error: answered with HTTP 400 and the message."""


class BodyTooLarge(BadRequest):
    """A body over MAX_BODY: answered 400 unread, then ``pending`` bytes of it are read and dropped."""

    def __init__(self, message: str, pending: int) -> None:
        super().__init__(message)
        self.pending = pending


class Unanswerable(RuntimeError):
    """A verdict that no retry can change (the oracle cannot read the video, an unparsable answer): HTTP 422
    with the reason, which clients do not retry (a 502 was retried judge.max_retries times, each failing)."""


# verdict statuses that are the same on every attempt; the others (timeout, error, cancelled) are 502
PERMANENT = {"parse_error", "rejected"}


def decode_image(url: str) -> np.ndarray:
    """A ``data:image/...;base64,`` URL -> HxWx3 uint8."""
    from PIL import Image

    # a url that is not a string (a number, null) is a client error too, not a crash of the handler
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise BadRequest(f"image_url must be a base64 data: URL, got {str(url)[:40]!r}")
    try:
        raw = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
        return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
    # a bomb (a header claiming 10^10 pixels) is no ValueError/OSError: it crashed the connection's handler
    except (ValueError, OSError, EOFError, Image.DecompressionBombError) as e:
        raise BadRequest(f"image_url: undecodable image ({e})") from e


def parse_chat_request(body: dict) -> ChatItem:
    """The last user message of a chat completion request as a :class:`ChatItem`."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got a JSON {type(body).__name__}")
    # the reply is one JSON completion: a streaming client found no event in it (an empty answer, no error)
    if body.get("stream") or body.get("n", 1) not in (1, None):
        raise BadRequest("'stream': true and 'n' > 1 are not supported; ask for one completion, not streamed")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty list")
    user = [m for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
    if not user:
        raise BadRequest("no message with role 'user'")
    content = user[-1].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise BadRequest("message 'content' must be a string or a list of parts")
    images, texts = [], []
    for p in parts:
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text":
            texts.append(str(p.get("text", "")))
        elif kind == "image_url":
            url = p.get("image_url")
            images.append(decode_image(url.get("url", "") if isinstance(url, dict) else str(url)))
        else:
            raise BadRequest(f"unsupported content part type {kind!r} (expected 'text' or 'image_url')")
    # the first of the two keys that is set (an explicit null means unset, as in the OpenAI API)
    max_tokens = next(
        (body[k] for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None), 64
    )
    # a JSON true is a Python int; it is no token count
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_TOKENS:
        raise BadRequest(f"max_tokens must be an integer in [1, {MAX_TOKENS}], got {max_tokens!r}")
    return ChatItem(images, "\n".join(texts), max_tokens)


class ChatAsJudge:
    """Runs raw chat items through AsyncJudge's batching: the item rides in ``request.meta``."""

    def __init__(self, chat: ChatBackend) -> None:
        self.chat = chat

    async def score(self, requests: list[JudgeRequest]) -> list[Verdict]:
        results = await self.chat.chat([r.meta["chat"] for r in requests])
        for req, res in zip(requests, results):  # answered as finish_reason "length"
            req.meta["truncated"] = res.truncated
        return [Verdict(None, r.status, r.text, r.latency_s) for r in results]


def judge_request_from_prompt(item: ChatItem) -> JudgeRequest:
    """Invert :data:`engine.judge.base.PROMPTS`: recover (task, question) from a judge prompt."""
    for question, template in PROMPTS.items():
        head, tail = template.split("{task}")
        p = item.prompt
        if p.startswith(head) and p.endswith(tail) and len(p) > len(head) + len(tail):
            return JudgeRequest(p[len(head) : len(p) - len(tail)], question, frames=item.images)
    raise BadRequest("the oracle answers only the judge's own prompts (engine.judge.base.PROMPTS)")


class JudgeServer:
    """The HTTP front end; ``mode`` "chat" (raw VLM text) or "judge" ("Score: x" from a Judge)."""

    def __init__(
        self,
        backend,
        *,
        mode: str,
        model_name: str,
        max_batch: int = 8,
        max_wait_ms: float = 20.0,
        max_concurrency: int = 1,
    ) -> None:
        if mode not in ("chat", "judge"):
            raise ValueError(f"JudgeServer: mode {mode!r} is not 'chat' or 'judge'")
        self.mode, self.model_name = mode, model_name
        inner: Judge = ChatAsJudge(backend) if mode == "chat" else backend
        self.judge = AsyncJudge(
            inner,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            max_concurrency=max_concurrency,
            cache=mode == "judge",
        )
        self._server: asyncio.base_events.Server | None = None
        # open connections, keep-alive ones idle between requests included (aclose closes them), and
        # their handler tasks (aclose waits for them)
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task] = set()
        self._count = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen; returns the bound port (``port=0`` picks a free one)."""
        self._server = await asyncio.start_server(self._connection, host, port, limit=1 << 16)
        return self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        """Stop listening and close every open connection (idle keep-alive ones too: from Python 3.12 on,
        ``wait_closed`` waits for them, and a client that keeps its pool open would hang the shutdown)."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
        # before waiting for the handlers: one awaiting a verdict returned only when the backend answered
        # (aclose hung 5 s)
        await self.judge.aclose(drain=False)
        if self._server is not None:
            await self._server.wait_closed()
            # the handlers see their connection closed and return; waiting for them leaves no task for the
            # event loop's shutdown to cancel (Python 3.11 logs such a cancelled stream handler as an error)
            if self._handlers:
                await asyncio.wait(list(self._handlers), timeout=5.0)

    def _request(self, body: dict) -> JudgeRequest:
        """The JudgeRequest a chat completion body asks for; BadRequest (HTTP 400) for any invalid one."""
        item = parse_chat_request(body)
        if self.mode == "chat":
            if not item.images or not item.prompt.strip():
                raise BadRequest("a chat request needs at least one image and a non-empty text part")
            return JudgeRequest(item.prompt, "reward", frames=item.images, meta={"chat": item})
        try:
            return judge_request_from_prompt(item)
        except ValueError as e:  # JudgeRequest's own validation (e.g. a judge prompt without an image)
            raise BadRequest(str(e)) from e

    async def _answer(self, body: dict) -> tuple[str, str]:
        """(the reply, its finish_reason)."""
        request = self._request(body)
        verdict: Verdict = await (await self.judge.submit(request))
        if verdict.status in PERMANENT:
            raise Unanswerable(f"backend answered {verdict.status}: {verdict.raw[:200]}")
        if verdict.status != "ok":
            raise RuntimeError(f"backend answered {verdict.status}: {verdict.raw[:200]}")
        if self.mode == "judge":
            return f"Score: {verdict.score:.4f}", "stop"
        # a reply cut at max_tokens said "stop": clients read it as a whole answer
        return verdict.raw, "length" if request.meta.get("truncated") else "stop"

    def _completion(self, text: str, finish_reason: str = "stop") -> dict:
        self._count += 1
        return {
            "id": f"chatcmpl-{self._count}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish_reason,
                }
            ],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }

    async def _route(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        if method == "GET" and path in ("/health", "/v1/health"):
            return 200, {
                "status": "ok",
                **{k: v for k, v in self.judge.metrics().items() if k != "batch_size_hist"},
            }
        if method == "GET" and path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": self.model_name, "object": "model"}]}
        if method != "POST" or path != "/v1/chat/completions":
            return 404, {"error": {"message": f"no route {method} {path}"}}
        try:
            return 200, self._completion(*await self._answer(json.loads(body)))
        except (BadRequest, json.JSONDecodeError, UnicodeDecodeError) as e:
            return 400, {"error": {"message": str(e), "type": "invalid_request_error"}}
        except Unanswerable as e:
            return 422, {"error": {"message": str(e), "type": "unanswerable"}}
        except RuntimeError as e:
            return 502, {"error": {"message": str(e), "type": "backend_error"}}

    async def _route_while_connected(
        self, reader: asyncio.StreamReader, method: str, path: str, body: bytes
    ) -> tuple[int, dict] | None:
        """The route's answer, or None once the client has closed its connection (a client that timed out):
        its request is cancelled, so the judge drops it if not yet started instead of judging it for nobody."""
        route = asyncio.ensure_future(self._route(method, path, body))
        try:
            # waited on first: a quick answer (health) still reaches a client that half-closed after sending
            while not (await asyncio.wait({route}, timeout=EOF_POLL_S))[0]:
                if reader.at_eof():
                    return None
            return route.result()
        finally:
            route.cancel()

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[str, str, dict, bytes] | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = (lines[0].split(" ") + ["", ""])[:3]
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        if headers.get("transfer-encoding", "identity").lower() != "identity":
            # its body would stay in the stream and be read as the next request
            raise BadRequest("chunked request bodies are not supported: send the body with a Content-Length")
        n = int(headers.get("content-length", "0") or 0)
        expect = headers.get("expect", "").lower() == "100-continue"
        if n > MAX_BODY or n < 0:
            # a client told to wait for "100 Continue" sends no body
            raise BodyTooLarge(f"body of {n} bytes exceeds {MAX_BODY}", 0 if expect else max(n, 0))
        if n and expect:
            # curl sends this for large bodies and waits 1 s for the 100 before sending the body
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        body = await reader.readexactly(n) if n else b""
        return method, path.split("?")[0], headers, body

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            while True:
                try:
                    req = await self._read_request(reader, writer)
                except (BadRequest, ValueError) as e:
                    await _write(writer, 400, {"error": {"message": str(e)}}, close=True)
                    if isinstance(e, BodyTooLarge):
                        await _discard(reader, e.pending)
                    return
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if req is None:
                    return
                method, path, headers, body = req
                answer = await self._route_while_connected(reader, method, path, body)
                if answer is None:  # the client left: nobody to answer
                    return
                status, payload = answer
                close = headers.get("connection", "").lower() == "close"
                await _write(writer, status, payload, close=close)
                if close:
                    return
        except ConnectionError:
            return
        finally:
            self._writers.discard(writer)
            self._handlers.discard(task)
            writer.close()


async def _discard(reader: asyncio.StreamReader, n: int, limit_s: float = 30.0) -> None:
    """Read and drop up to ``n`` bytes (at most ``limit_s`` s): closing with a body still arriving reset the
    connection, and the client lost the answer (a ReadError it retried, sending the whole body again)."""
    try:
        async with asyncio.timeout(limit_s):
            while n > 0 and (chunk := await reader.read(min(n, 1 << 20))):
                n -= len(chunk)
    except (TimeoutError, ConnectionError):
        pass


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 422: "Unprocessable Content", 502: "Bad Gateway"}


async def _write(writer: asyncio.StreamWriter, status: int, payload: dict, *, close: bool) -> None:
    data = json.dumps(payload).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: {'close' if close else 'keep-alive'}\r\n\r\n"
    )
    writer.write(head.encode() + data)
    await writer.drain()


def _check_device(device: str | None) -> None:
    """A --device torch cannot place the model on (a misspelt one, CUDA absent) was a traceback at load."""
    import torch

    if not device:
        return
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise SystemExit(f"serve: --device {device!r} is not a device: {e}") from None
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dev.type == "cuda" and (dev.index or 0) >= visible:
        raise SystemExit(f"serve: --device {device!r}: this machine has {visible} CUDA device(s)")


def build_backend(kind: str, model: str, *, device: str | None, max_batch: int):
    """(backend, mode) for ``--backend``; the oracle is imported lazily from engine.world."""
    if kind == "transformers":
        if not model:
            raise SystemExit("serve: --backend transformers needs --model PATH (a local Qwen2.5-VL folder)")
        from engine.judge.transformers_vlm import TransformersVLM

        # a missing or incomplete folder was a transformers traceback (a missing one read as a hub repo id)
        if not os.path.isdir(model):
            raise SystemExit(f"serve: --model {model!r} is not a folder (a local Qwen2.5-VL folder)")
        _check_device(device)
        try:
            return TransformersVLM(model, device=device, max_batch=max_batch), "chat"
        except OSError as e:
            raise SystemExit(f"serve: cannot load --model {model!r}: {e}") from None
    if kind == "oracle":
        try:
            from engine.world.oracle import OracleJudge
        except ImportError as e:
            raise SystemExit(
                f"serve: --backend oracle needs engine.world.oracle.OracleJudge, not importable: {e}"
            ) from e
        return OracleJudge(), "judge"
    raise SystemExit(f"serve: --backend {kind!r} is not 'transformers' or 'oracle'")


async def _serve(args: argparse.Namespace) -> None:
    backend, mode = build_backend(args.backend, args.model, device=args.device, max_batch=args.max_batch)
    server = JudgeServer(
        backend,
        mode=mode,
        model_name=args.served_model_name or args.model or args.backend,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
    )
    try:
        port = await server.start(args.host, args.port)
    except OSError as e:  # a port in use, an unknown host: one line, not a traceback
        raise SystemExit(f"serve: cannot listen on {args.host}:{args.port}: {e}") from None
    print(f"serving {args.backend} on http://{args.host}:{port}/v1", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.aclose()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m engine.judge.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["transformers", "oracle"], required=True)
    p.add_argument("--model", default="", help="local model folder (transformers)")
    p.add_argument("--served-model-name", default="", help="the name /v1/models reports")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port (printed)")
    p.add_argument("--device", default=None)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=20.0)
    args = p.parse_args(argv)
    # checked here: an AsyncJudge's ValueError or bind's OverflowError was a traceback
    if args.max_batch < 1 or not args.max_wait_ms >= 0 or not 0 <= args.port <= 65535:
        p.error(
            f"need --max-batch >= 1, --max-wait-ms >= 0 and --port in [0, 65535]; got "
            f"{args.max_batch}, {args.max_wait_ms}, {args.port}"
        )
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
