"""The one primitive VLM backends share: images + a prompt in, text (or a failure status) out.

Judges (engine/judge/vlm.py) and proposers (engine/propose.py) are both prompt + parse layers over a
:class:`ChatBackend`, so a loaded model or an HTTP client serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class ChatItem:
    """One conversation turn: images (HxWx3 uint8) followed by a user prompt."""

    images: list[np.ndarray]
    prompt: str
    max_new_tokens: int = 64


@dataclass
class ChatResult:
    """The model's text and status ("ok" or a failure status of engine.judge.base.STATUSES); ``truncated``:
    the model was stopped at max_new_tokens, so the text may end mid-answer."""

    text: str
    status: str
    latency_s: float
    truncated: bool = False


@runtime_checkable
class ChatBackend(Protocol):
    """Answers a batch of chat items, same order; never raises for a failed item."""

    async def chat(self, items: list[ChatItem]) -> list[ChatResult]: ...
