"""A Judge over any chat backend: sample frames, build the versioned prompt, parse the answer."""

from __future__ import annotations

import asyncio
import time

from engine.judge.base import JudgeRequest, Verdict, build_prompt, parse_answer, request_frames
from engine.judge.chat import ChatBackend, ChatItem, ChatResult


class VLMJudge:
    """:class:`engine.judge.base.Judge` for a VLM reached through a :class:`ChatBackend`.

    ``num_frames`` frames (evenly spaced) are shown, as separate images or one grid (``layout``).
    A request whose video cannot be read gets status "error" with the reason in ``raw``. Answers that
    do not parse are asked again up to ``parse_retries`` times (counted in ``parse_retried``); after
    that they stay "parse_error".
    """

    def __init__(
        self,
        chat: ChatBackend,
        *,
        num_frames: int = 4,
        layout: str = "separate",
        max_new_tokens: int = 32,
        parse_retries: int = 1,
    ) -> None:
        if layout not in ("separate", "grid"):
            raise ValueError(f"VLMJudge: layout {layout!r} is not 'separate' or 'grid'")
        if num_frames < 1:
            raise ValueError(f"VLMJudge: num_frames must be >= 1, got {num_frames}")
        # parse_retries -1 asked nothing and returned None for every request
        if parse_retries < 0 or max_new_tokens < 1:
            raise ValueError(
                f"VLMJudge: need parse_retries >= 0 and max_new_tokens >= 1, got {parse_retries}, {max_new_tokens}"
            )
        self.chat = chat
        self.num_frames = num_frames
        self.layout = layout
        self.max_new_tokens = max_new_tokens
        self.parse_retries = parse_retries
        self.parse_retried = 0

    def _item(self, request: JudgeRequest) -> ChatItem:
        frames = request_frames(request, self.num_frames, layout=self.layout)
        return ChatItem(frames, build_prompt(request), self.max_new_tokens)

    async def score(self, requests: list[JudgeRequest]) -> list[Verdict]:
        """One Verdict per request, same order; failures are statuses, never exceptions."""
        t0 = time.perf_counter()
        verdicts: list[Verdict | None] = [None] * len(requests)
        items, where = [], []
        for i, r in enumerate(requests):
            try:
                # Video decoding blocks; keep the event loop free for other batches.
                item = self._item(r) if r.video is None else await asyncio.to_thread(self._item, r)
            except (OSError, ValueError) as e:
                verdicts[i] = Verdict(None, "error", f"{type(e).__name__}: {e}", time.perf_counter() - t0)
                continue
            items.append(item)
            where.append(i)
        for attempt in range(self.parse_retries + 1):
            if not items:
                break
            if attempt:
                self.parse_retried += len(items)
            results = await self.chat.chat(items)
            if len(results) != len(items):  # a chat backend bug: zip would leave the last requests None
                msg = f"chat backend returned {len(results)} results for {len(items)} items"
                results = [ChatResult(msg, "error", 0.0)] * len(items)
            retry_items, retry_where = [], []
            for item, i, res in zip(items, where, results):
                score, status = parse_answer(res.text) if res.status == "ok" else (None, res.status)
                # cut at max_new_tokens where more text would change the reading ("Score: 0." of "Score: 0.75"
                # read 0.0): no answer, not a made-up score
                if status == "ok" and res.truncated and parse_answer(res.text + "5") != (score, status):
                    score, status = None, "parse_error"
                verdicts[i] = Verdict(score, status, res.text, time.perf_counter() - t0)
                if status == "parse_error":
                    retry_items.append(item)
                    retry_where.append(i)
            items, where = retry_items, retry_where
        return verdicts  # type: ignore[return-value]
