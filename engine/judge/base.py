"""The judge interface: requests, verdicts, the Judge protocol, versioned prompts and answer parsing.

A judge looks at frames of a generated video and answers one question about a task:

    "task"        is the task solved by the end of the video?
    "agent"       does the agent perform it (no teleport, no scene change doing the work)?
    "consistency" are scene identity and physics preserved?
    "reward"      one overall score for RL (solved, by the agent, consistently)

Every backend answers with a :class:`Verdict`: a score in [0, 1] or None, a status that says why
not, the raw text and the latency. ``score`` never raises for a bad answer: parse failures,
timeouts and HTTP errors are statuses, counted by :class:`engine.judge.AsyncJudge`; the caller decides
what a failed verdict counts for (RL: left out of its group, or ``judge.fallback_score`` with
``rl.failed_rollouts = "fallback"``; evaluation: NaN, scored again on a rerun). A parse never guesses:
text that does not match one of the accepted answer forms is a ``parse_error``, not a score.

Prompts are versioned by :data:`PROMPT_VERSION`, which is part of every cache key: change a
template, bump the version.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

PROMPT_VERSION = "wmsd-judge-v1"
QUESTIONS = ("task", "agent", "consistency", "reward")
# "rejected": the backend refused the input itself (an image its processor cannot take), the same on every
# attempt; "error": any other failure, which a retry may not repeat
STATUSES = (
    "ok",
    "parse_error",
    "rejected",
    "timeout",
    "http_error",
    "connection_error",
    "cancelled",
    "error",
)

_ANSWER_FORMAT = (
    "Look at the frames in order. Answer on the last line exactly as 'Score: <number between 0 and 1>', "
    "where 1 means certainly yes and 0 means certainly no."
)
PROMPTS = {
    "task": 'These are frames of a video, in time order. The task was: "{task}". '
    "Is the task fully accomplished by the end of the video? " + _ANSWER_FORMAT,
    "agent": 'These are frames of a video, in time order. The task was: "{task}". '
    "Is the task carried out by the agent's own physical actions, without objects teleporting, appearing, "
    "or the scene changing by itself? " + _ANSWER_FORMAT,
    "consistency": 'These are frames of a video, in time order. The task was: "{task}". '
    "Does the video keep the identity of the scene and its objects, with plausible physics and no "
    "sudden changes of layout, colour or shape? " + _ANSWER_FORMAT,
    "reward": 'These are frames of a video, in time order. The task was: "{task}". '
    "Rate how well the video shows the agent accomplishing the task while keeping the scene consistent. "
    + _ANSWER_FORMAT,
}


@dataclass(eq=False)
class JudgeRequest:
    """One question about one video: ``frames`` (HxWx3 uint8, time order) or a ``video`` file path.

    ``meta`` is free-form and reaches the backend unchanged (the toy world's oracle reads the scene
    from it); it is not part of the cache key.
    """

    task: str
    question: str
    frames: list[np.ndarray] | None = None
    video: str | None = None
    meta: dict | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.task, str) or not self.task.strip():
            raise ValueError(f"JudgeRequest.task: expected a non-empty string, got {self.task!r}")
        if self.question not in QUESTIONS:
            raise ValueError(f"JudgeRequest.question: {self.question!r} is not one of {QUESTIONS}")
        if self.frames is None and self.video is None:
            raise ValueError("JudgeRequest: give frames (list of HxWx3 uint8) or video (a file path)")
        if self.frames is not None:
            if len(self.frames) == 0:
                raise ValueError("JudgeRequest.frames: expected at least one frame, got an empty list")
            for i, f in enumerate(self.frames):
                ok = isinstance(f, np.ndarray) and f.dtype == np.uint8 and f.ndim == 3 and f.shape[2] == 3
                # an empty one (0 x W) passed, then failed its whole batch's PNG encoding in OpenAIChat
                if not ok or not f.size:
                    desc = f"{type(f).__name__} {getattr(f, 'dtype', '')} {getattr(f, 'shape', '')}"
                    raise ValueError(f"JudgeRequest.frames[{i}]: expected an HxWx3 uint8 array, got {desc}")


@dataclass
class Verdict:
    """A judge's answer: ``score`` in [0, 1] when ``status == "ok"``, else None."""

    score: float | None
    status: str
    raw: str
    latency_s: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def reward(self, fallback: float) -> float:
        """The score, or ``fallback`` when the judge did not give one (the caller counts those)."""
        return self.score if self.score is not None else fallback


@runtime_checkable
class Judge(Protocol):
    """A batch scorer. Returns one Verdict per request, same order; never raises for a bad answer."""

    async def score(self, requests: list[JudgeRequest]) -> list[Verdict]: ...


def build_prompt(request: JudgeRequest) -> str:
    """The question text for ``request`` under :data:`PROMPT_VERSION`."""
    return PROMPTS[request.question].format(task=request.task.strip())


# ---------------------------------------------------------------------------------------------
# Answer parsing. Accepted forms, tried in order (the first match decides):
#   JSON object with "score" (number) or "answer" ("yes"/"no"), possibly inside a ```json fence
#   "Score: 0.8" / "score = 80%" / "Score: 4/5" / "Score: 3 out of 4"   (the last such line wins)
#   the whole answer is a number ("0.75", "75%", "3/4") or starts with yes/no ("Yes.", "No, the ...")
# Anything else is a parse_error; so is a number outside [0, 1] (a percentage outside [0, 100]), and so is
# a score line whose number goes on in a form not read here ("0,8", "1e-2") or names another scale ("Score:
# 1 (on a scale of 5)"): a misread score would be a made-up reward.
# ---------------------------------------------------------------------------------------------

_NUM = r"([-+]?\d+(?:\.\d+)?)\s*(%|/\s*\d+(?:\.\d+)?|out\s+of\s+\d+(?:\.\d+)?)?"
_NUM_END = r"(?![.,]?\d|[eE][-+]?\d)"  # the number does not go on (decimal comma, exponent)
_SCORE_LINE = re.compile(
    r"\bscore\s*[:=]\s*\**\s*" + _NUM + _NUM_END + r"(?![^\n]*\b(?:out\s+of|scale\s+(?:of|from))\s+\d)",
    re.IGNORECASE,
)
# where a score line with a number starts, read or not: an earlier line must not stand in for an unread last one
_SCORE_HEAD = re.compile(r"\bscore\s*[:=]\s*\**\s*[-+]?\d", re.IGNORECASE)
_BARE_NUM = re.compile(r"^\s*" + _NUM + r"\s*\.?\s*$", re.IGNORECASE)
# the answer word alone: not the start of "Yes/No: no", "yes or no? no", "no-one", "yes-ish"
_YES_NO = re.compile(
    r"^\W*(?:answer\s*[:=]\s*)?\**\s*(yes|no)\b(?!-\w|\s*(?:/|\bor\b)\s*(?:yes|no)\b)", re.IGNORECASE
)
_JSON = re.compile(r"\{[^{}]*\}", re.DOTALL)


def _to_unit(value: str, suffix: str | None) -> float | None:
    x = float(value)
    if suffix and suffix.startswith("%"):
        x /= 100.0
    elif suffix:
        denom = float(suffix.lstrip("/").split()[-1])  # "/ 5" or "out of 5"
        if denom <= 0:
            return None
        x /= denom
    return x if math.isfinite(x) and 0.0 <= x <= 1.0 else None


def _parse_json(text: str) -> tuple[bool, float | None]:
    """(found a JSON object with a known key, score or None)."""
    for m in _JSON.finditer(text):
        try:
            obj = json.loads(m.group(0))
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict):
            continue
        for key in ("score", "reward", "rating"):
            if key in obj:
                v = obj[key]
                ok = isinstance(v, int | float) and not isinstance(v, bool)
                return True, (float(v) if ok and 0.0 <= v <= 1.0 else None)
        if "answer" in obj:
            a = str(obj["answer"]).strip().lower()
            return True, {"yes": 1.0, "no": 0.0}.get(a)
    return False, None


def parse_answer(text: str) -> tuple[float | None, str]:
    """Parse a judge's answer into (score in [0, 1] or None, status "ok" | "parse_error")."""
    if not isinstance(text, str) or not text.strip():
        return None, "parse_error"
    found, score = _parse_json(text)
    if found:
        return (score, "ok") if score is not None else (None, "parse_error")
    heads = list(_SCORE_HEAD.finditer(text))
    if heads:
        m = _SCORE_LINE.match(text, heads[-1].start())
        score = _to_unit(m.group(1), m.group(2)) if m else None
        return (score, "ok") if score is not None else (None, "parse_error")
    m = _BARE_NUM.match(text)
    if m:
        score = _to_unit(m.group(1), m.group(2))
        return (score, "ok") if score is not None else (None, "parse_error")
    m = _YES_NO.match(text)
    if m:
        return (1.0 if m.group(1).lower() == "yes" else 0.0), "ok"
    return None, "parse_error"


# ---------------------------------------------------------------------------------------------
# Frames: sampling from video files, grids, hashing for the cache.
# ---------------------------------------------------------------------------------------------


def even_indices(total: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(total)``, first and last included (fewer if total < k)."""
    if total <= 0 or k <= 0:
        return []
    if k == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (k - 1)) for i in range(k)})


def make_grid(frames: list[np.ndarray], cols: int | None = None) -> np.ndarray:
    """Tile frames (all HxWx3 uint8 of one size) row-major into one image; empty cells are black."""
    if not frames:
        raise ValueError("make_grid: expected at least one frame")
    h, w, _ = frames[0].shape
    if any(f.shape != frames[0].shape for f in frames):
        raise ValueError(f"make_grid: frames differ in shape: {sorted({f.shape for f in frames})}")
    cols = cols or math.ceil(math.sqrt(len(frames)))
    rows = math.ceil(len(frames) / cols)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, f in enumerate(frames):
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = f
    return grid


def sample_frames(path: str, k: int, *, layout: str = "separate") -> list[np.ndarray]:
    """Decode ``k`` evenly spaced frames of a video file with PyAV, as HxWx3 uint8.

    layout "separate" returns k images; "grid" returns one image tiling them.
    """
    import av

    if layout not in ("separate", "grid"):
        raise ValueError(f"sample_frames: layout {layout!r} is not 'separate' or 'grid'")
    if k < 1:
        raise ValueError(f"sample_frames: k must be >= 1, got {k}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video {path!r}: no such file")
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError(f"video {path!r}: no video stream")
        # stream.frames is the container's metadata: 0 where it stores none (mkv, webm), and it can
        # disagree with what decodes (an mp4 edit list trims frames it still counts)
        claimed = container.streams.video[0].frames
        kept, total = _decode_kept(container, set(even_indices(claimed, k)))
    if total != claimed:
        # absent or wrong: the first pass counted the frames; decode again keeping the right ones
        with av.open(path) as container:
            kept, total = _decode_kept(container, set(even_indices(total, k)))
    if not kept:
        raise ValueError(f"video {path!r}: 0 decodable frames (expected >= 1)")
    return [make_grid(kept)] if layout == "grid" else kept


def _decode_kept(container: Any, wanted: set[int]) -> tuple[list[np.ndarray], int]:
    """The frames at ``wanted`` indices of the first video stream, as HxWx3 uint8, and how many decoded."""
    kept, total = [], 0
    for total, frame in enumerate(container.decode(container.streams.video[0]), 1):
        if total - 1 in wanted:
            kept.append(frame.to_ndarray(format="rgb24"))
    return kept, total


def request_frames(request: JudgeRequest, k: int, *, layout: str = "separate") -> list[np.ndarray]:
    """The images a VLM sees for ``request``: its frames (subsampled to k) or k frames of its video."""
    if request.frames is not None:
        frames = [request.frames[i] for i in even_indices(len(request.frames), k)]
        return [make_grid(frames)] if layout == "grid" else frames
    return sample_frames(request.video, k, layout=layout)


def content_hash(request: JudgeRequest) -> str:
    """A digest of what the judge sees: the frames' bytes and shapes, or the video file's bytes."""
    h = hashlib.blake2b(digest_size=16)
    if request.frames is not None:
        for f in request.frames:
            h.update(repr(f.shape).encode())
            h.update(np.ascontiguousarray(f).tobytes())
    else:
        with open(request.video, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def cache_key(request: JudgeRequest) -> tuple[str, str, str, str]:
    """(content hash, task, question, PROMPT_VERSION): equal keys get equal verdicts."""
    return content_hash(request), request.task, request.question, PROMPT_VERSION
