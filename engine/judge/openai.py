"""OpenAI-compatible ``/v1/chat/completions`` client (vLLM, SGLang, our engine.judge.serve, hosted APIs).

One HTTP request per item over a pooled ``httpx.AsyncClient``; the server does the batching. Each
request has a total deadline (``timeout_s``, from when it gets one of the ``max_connections``) and is
retried ``max_retries`` times on timeouts, connection errors, 408/429/5xx and malformed response bodies, with exponential backoff and jitter, waiting at least an answer's Retry-After (capped at ``timeout_s``).
Other 4xx answers are not retried. Images travel as base64 PNG data URLs.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import os
import random
import time
from collections.abc import AsyncGenerator

import httpx
import numpy as np

from engine.judge.chat import ChatItem, ChatResult
from engine.judge.vlm import VLMJudge
from engine.log import get_logger

log = get_logger("judge.openai")

_RETRY_HTTP = {408, 429, 500, 502, 503, 504}


def png_data_url(image: np.ndarray) -> str:
    """An HxWx3 uint8 image as a ``data:image/png;base64,...`` URL."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def chat_payload(model: str, item: ChatItem, *, temperature: float = 0.0) -> dict:
    """The JSON body of one chat completion request: images first, then the prompt."""
    content = [{"type": "image_url", "image_url": {"url": png_data_url(im)}} for im in item.images]
    content.append({"type": "text", "text": item.prompt})
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": item.max_new_tokens,
        "temperature": temperature,
    }


def _message_text(body: dict) -> str:
    """The assistant text of a chat completion body; raises KeyError/TypeError/IndexError if malformed."""
    content = body["choices"][0]["message"]["content"]
    if content is None:
        return ""
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise TypeError(f"message content is {type(content).__name__}, expected a string")
    return content


def _retry_after_s(value: str | None) -> float:
    """Seconds of a Retry-After header (delta-seconds or HTTP date); 0 when absent or unreadable."""
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return 0.0


class OpenAIChat:
    """:class:`engine.judge.chat.ChatBackend` over an OpenAI-compatible endpoint.

    ``base_url`` ends in ``/v1`` (as for the OpenAI SDK), e.g. ``http://127.0.0.1:8000/v1``. The API key
    is read from the environment variable ``api_key_env`` at construction (none: no auth header).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        timeout_s: float = 60.0,
        max_retries: int = 2,
        api_key_env: str = "OPENAI_API_KEY",
        max_connections: int = 16,
        backoff_s: float = 0.25,
        temperature: float = 0.0,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"OpenAIChat: base_url {base_url!r} must start with http:// or https://")
        # max_connections 0 left every request waiting for a slot forever; a NaN passes "x <= 0"
        if not timeout_s > 0 or max_retries < 0 or max_connections < 1 or not backoff_s >= 0:
            raise ValueError(
                "OpenAIChat: need timeout_s > 0, max_retries >= 0, max_connections >= 1 and backoff_s >= 0, "
                f"got {timeout_s}, {max_retries}, {max_connections}, {backoff_s}"
            )
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.temperature = temperature
        self.max_connections = max_connections
        key = os.environ.get(api_key_env, "")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._life: AsyncGenerator[httpx.AsyncClient, None] | None = None
        self._slots: asyncio.Semaphore | None = None
        self.retries = 0  # retried attempts, over the client's life

    async def _get_client(self) -> httpx.AsyncClient:
        # A client's connections belong to the loop that opened them: one client per loop, closed by the
        # loop's shutdown_asyncgens (asyncio.run calls it before closing the loop) if not by aclose. A
        # client whose loop had ended was dropped open (its sockets leaked until GC). A judge dropped
        # inside its loop without aclose is closed by GC, which asyncio.run's shutdown may cut short.
        loop = asyncio.get_running_loop()
        if self._client is None or self._client.is_closed or self._loop is not loop:
            limits = httpx.Limits(
                max_connections=self.max_connections, max_keepalive_connections=self.max_connections
            )
            client = httpx.AsyncClient(headers=self._headers, limits=limits, timeout=self.timeout_s)
            self._life = self._client_life(client)
            self._client, self._loop = await anext(self._life), loop
            # requests wait here for a connection, before their deadline starts: waiting in the pool
            # counted against timeout_s, so a batch larger than the pool timed out requests never sent
            self._slots = asyncio.Semaphore(self.max_connections)
        return self._client

    @staticmethod
    async def _client_life(client: httpx.AsyncClient) -> AsyncGenerator[httpx.AsyncClient, None]:
        """Yields ``client``; closes it when closed (by aclose, or by its loop's shutdown_asyncgens)."""
        try:
            yield client
        finally:
            await client.aclose()

    async def aclose(self) -> None:
        """Close the connection pool of the current loop's client (another loop's closes with that loop)."""
        # taken before awaiting: a second aclose meanwhile (AsyncJudge closed twice) finds nothing to close
        # (it called aclose on the generator still closing: RuntimeError, generator already running)
        life, loop = self._life, self._loop
        self._client = self._loop = self._life = None
        if life is not None and loop is asyncio.get_running_loop():
            await life.aclose()

    async def chat(self, items: list[ChatItem]) -> list[ChatResult]:
        """Answer all items concurrently (bounded by the pool); same order; never raises per item."""
        client = await self._get_client()
        payloads = await asyncio.to_thread(
            lambda: [chat_payload(self.model, it, temperature=self.temperature) for it in items]
        )
        return list(await asyncio.gather(*(self._one(client, p) for p in payloads)))

    async def _attempt(self, client: httpx.AsyncClient, payload: dict) -> tuple[str, str, bool, float, bool]:
        """(status, text, retryable, the answer's Retry-After in s or 0, cut at max_tokens) of one HTTP attempt."""
        try:
            async with self._slots, asyncio.timeout(self.timeout_s):
                resp = await client.post(self.url, json=payload)
        except (TimeoutError, httpx.TimeoutException):
            return "timeout", f"no answer within {self.timeout_s}s", True, 0.0, False
        except httpx.TransportError as e:
            return "connection_error", f"{type(e).__name__}: {e}", True, 0.0, False
        except httpx.HTTPError as e:  # e.g. a body that does not decode (DecodingError): this item fails
            return "http_error", f"{type(e).__name__}: {e}", True, 0.0, False
        # a payload JSON cannot carry (a lone surrogate in the prompt) raised out of chat: its whole batch failed
        except ValueError as e:
            return "error", f"request not sent ({type(e).__name__}: {e})", False, 0.0, False
        if resp.status_code != 200:
            return (
                "http_error",
                f"HTTP {resp.status_code}: {resp.text[:200]}",
                resp.status_code in _RETRY_HTTP,
                _retry_after_s(resp.headers.get("retry-after")),
                False,
            )
        try:
            body = resp.json()
            # finish_reason "length": stopped at max_tokens, the text may end mid-answer
            return "ok", _message_text(body), False, 0.0, body["choices"][0].get("finish_reason") == "length"
        except (ValueError, KeyError, IndexError, TypeError) as e:
            return (
                "http_error",
                f"malformed response body ({type(e).__name__}: {e}): {resp.text[:200]}",
                True,
                0.0,
                False,
            )

    async def _one(self, client: httpx.AsyncClient, payload: dict) -> ChatResult:
        t0 = time.perf_counter()
        for attempt in range(self.max_retries + 1):
            status, text, retryable, retry_after, cut = await self._attempt(client, payload)
            if status == "ok" or not retryable or attempt == self.max_retries:
                break
            self.retries += 1
            # Exponential backoff with full jitter spreads retries of a failed batch apart; a 429/503's
            # Retry-After (capped at timeout_s) is a floor: retrying earlier spent every retry on 429s.
            delay = self.backoff_s * (2**attempt) * (0.5 + random.random())
            await asyncio.sleep(max(delay, min(retry_after, self.timeout_s)))
        if status != "ok":
            log.debug("chat request failed after %d attempts: %s %s", attempt + 1, status, text[:120])
        return ChatResult(text, status, time.perf_counter() - t0, cut)


class OpenAIJudge(VLMJudge):
    """A judge served over an OpenAI-compatible endpoint (see :class:`OpenAIChat` for the arguments)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        timeout_s: float = 60.0,
        max_retries: int = 2,
        api_key_env: str = "OPENAI_API_KEY",
        num_frames: int = 4,
        layout: str = "separate",
        max_connections: int = 16,
        backoff_s: float = 0.25,
        parse_retries: int = 1,
    ) -> None:
        chat = OpenAIChat(
            base_url,
            model,
            timeout_s=timeout_s,
            max_retries=max_retries,
            api_key_env=api_key_env,
            max_connections=max_connections,
            backoff_s=backoff_s,
        )
        super().__init__(chat, num_frames=num_frames, layout=layout, parse_retries=parse_retries)

    async def aclose(self) -> None:
        await self.chat.aclose()
