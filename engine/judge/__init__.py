"""VLM judging: the Judge protocol, the AsyncJudge batching service and its backends.

Light names import eagerly; backends that pull heavy libraries (transformers, httpx) load on first
use, so ``import engine.judge`` stays cheap for the toy world.
"""

from engine.judge.base import (
    PROMPT_VERSION,
    PROMPTS,
    QUESTIONS,
    STATUSES,
    Judge,
    JudgeRequest,
    Verdict,
    build_prompt,
    cache_key,
    even_indices,
    make_grid,
    parse_answer,
    request_frames,
    sample_frames,
)
from engine.judge.chat import ChatBackend, ChatItem, ChatResult

_LAZY = {
    "AsyncJudge": "engine.judge.service",
    "JudgeService": "engine.judge.service",
    "JudgeHandle": "engine.judge.service",
    "JudgeMetrics": "engine.judge.service",
    "VLMJudge": "engine.judge.vlm",
    "OpenAIChat": "engine.judge.openai",
    "OpenAIJudge": "engine.judge.openai",
    "TransformersVLM": "engine.judge.transformers_vlm",
    "TransformersJudge": "engine.judge.transformers_vlm",
}

__all__ = [
    "PROMPT_VERSION",
    "PROMPTS",
    "QUESTIONS",
    "STATUSES",
    "Judge",
    "JudgeRequest",
    "Verdict",
    "build_prompt",
    "cache_key",
    "even_indices",
    "make_grid",
    "parse_answer",
    "request_frames",
    "sample_frames",
    "ChatBackend",
    "ChatItem",
    "ChatResult",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine.judge' has no attribute {name!r}")
