"""The Proposer: a VLM looks at one scene image and writes N (task, solution) pairs for it.

The VLM is asked for blocks of the form

    [Agent]: <short imperative task>
    Description: <solution: 40-90 words, step by step, what happens in the video>

:func:`parse_proposals` keeps only complete, valid blocks: the task is kept with its ``[Agent]: ``
prefix (the Executor's prompt), the solution is the text after ``Description:`` (the Demonstrator's
prompt). Word bounds are parameters (the paper's 40-90 for real VLMs; the toy world writes shorter
solutions). An answer in JSON (objects of task and description strings) is read as the same blocks.
Duplicated tasks are dropped, and so is the last block of an answer cut at max_new_tokens.
:class:`ChatProposer` asks again for images that are still short of N pairs, up to ``max_attempts``
rounds, then gives up on them and counts them: a half-parsed pair is never returned.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from engine.judge.chat import ChatBackend, ChatItem
from engine.log import get_logger

PROPOSER_PROMPT_VERSION = "wmsd-propose-v1"
PROPOSER_PROMPT = (
    "You see one image of a scene with an agent in it. Propose {n} different tasks the agent could carry "
    "out in this scene, each achievable in a few seconds of video. For each task write exactly two lines:\n"
    "[Agent]: <the task as a short imperative sentence, {task_min}-{task_max} words>\n"
    "Description: <{min_words}-{max_words} words describing, step by step, what happens in the video "
    "as the agent carries out the task; mention the objects by their appearance and position>\n"
    "Write nothing else."
)

log = get_logger("propose")


@dataclass(frozen=True)
class TaskPair:
    """A short task (``"[Agent]: ..."``) and the detailed solution that demonstrates it."""

    task: str
    solution: str


@dataclass
class ProposeStats:
    """Counts over one :meth:`Proposer.propose` call."""

    requests: int = 0  # VLM calls made
    failed_calls: int = 0  # calls that returned no text (timeout, HTTP error, ...)
    rejected_blocks: int = 0  # task/description blocks that failed validation
    duplicates: int = 0  # valid pairs dropped as duplicates of an earlier task for the image
    short_images: int = 0  # images that ended with fewer than n pairs
    reasons: dict[str, int] = field(default_factory=dict)  # rejection reason -> count


@runtime_checkable
class Proposer(Protocol):
    """Writes ``n`` task/solution pairs per image (fewer when the VLM fails repeatedly; counted)."""

    async def propose(self, images: list[np.ndarray], n: int) -> list[list[TaskPair]]: ...


# emphasis may close before the colon ("**[Agent]**:", "**Description**:"), as it may after it
_AGENT = re.compile(r"\[\s*agent\s*\][*_`]*\s*:", re.IGNORECASE)
_DESC = re.compile(r"\bdescription[*_`]*\s*:", re.IGNORECASE)
_LIST_MARK = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*")
# a line that is only a list marker or an item heading ("2.", "(2)", "#2", "-", "Task 2:", "Task 2 -", "1) Task:",
# "**Proposal 3**", "### Task 4")
_HEADING = re.compile(
    r"^\s*[-*\u2022#]*\s*(?:(?:\(?\d+[.):-]|#\d+)\s*)?"
    r"(?:(?:task|item|proposal|example|pair)\s*#?\s*\d*\s*[:.)-]?)?\s*\**\s*$",
    re.IGNORECASE,
)


def _words(s: str) -> int:
    return len(s.split())


def _clean(s: str) -> str:
    """Without the markdown some VLMs add: emphasis (*, `, and _ that is not inside a word: red_block stays)
    and heading marks (a leading #)."""
    s = re.sub(r"[*`]+", "", s)
    s = re.sub(r"(?<![^\W_])_+|_+(?![^\W_])", "", s)  # any script's letters: tasse_à_café stays
    s = re.sub(r"^\s*#+", "", s)
    return " ".join(s.split()).strip().strip('"').strip()


def _validate(task: str, solution: str, bounds: tuple[int, int, int, int]) -> str | None:
    """None when valid, else the rejection reason."""
    task_min, task_max, min_words, max_words = bounds
    if not task:
        return "empty_task"
    if not solution:
        return "missing_description"
    if task.endswith("?"):
        return "task_is_question"
    if not task_min <= _words(task) <= task_max:
        return "task_length"
    if not min_words <= _words(solution) <= max_words:
        return "solution_length"
    if _AGENT.search(solution):
        return "nested_agent_tag"
    if _DESC.search(solution):  # the next item, written without its [Agent] tag, ran into this solution
        return "merged_blocks"
    return None


def _is_heading(line: str) -> bool:
    """A short line that _HEADING matches: its runs of spaces backtracked without end (400 spaces took 8 s, a
    thousand hung the proposer), so spaces are collapsed and a heading is short."""
    line = " ".join(line.split())
    return len(line) <= 40 and _HEADING.match(line) is not None


def _description(text: str) -> str:
    """The description paragraph of one block: up to its first blank line (what follows is the next item's
    heading or the VLM's closing chatter), without trailing lines that are only the next item's list marker or
    heading ("2.", "Task 2:"), which end up in this block because it runs to the next [Agent] tag."""
    lines = re.split(r"\n[ \t]*\n", text.strip(), maxsplit=1)[0].splitlines()
    while len(lines) > 1 and _is_heading(lines[-1]):
        lines.pop()
    return "\n".join(lines)


def _json_blocks(text: str) -> str | None:
    """An answer written as JSON (optionally in a code fence) in the two-line text form: an object's task /
    "[Agent]" and description / solution strings, a string as it is. None when the answer is not JSON (its
    quotes and keys ended up in the task and solution: 'push it left", "solution":')."""
    s = text.strip()
    if m := re.fullmatch(r"```[A-Za-z]*\s*(.*?)\s*```", s, re.DOTALL):
        s = m.group(1)
    if s[:1] not in ("[", "{"):
        return None
    try:
        data = json.loads(s)
    except ValueError:
        return None
    blocks: list[str] = []

    def walk(v) -> None:
        if isinstance(v, str):
            blocks.append(v)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            fields = {k.strip().strip("[]:").strip().lower(): x for k, x in v.items() if isinstance(x, str)}
            task = fields.get("task", fields.get("agent"))
            desc = fields.get("description", fields.get("solution"))
            if task is None and desc is None:
                for x in v.values():
                    walk(x)
            else:
                task = _AGENT.sub("", task or "", count=1).strip()
                desc = _DESC.sub("", desc or "", count=1).strip()
                blocks.append(f"[Agent]: {task}\nDescription: {desc}")

    walk(data)
    return "\n\n".join(blocks)


def parse_proposals(
    text: str, *, min_words: int = 40, max_words: int = 90, task_min_words: int = 2, task_max_words: int = 20
) -> tuple[list[TaskPair], dict[str, int]]:
    """Parse a proposer answer into valid pairs (in order) and a count of rejection reasons."""
    reasons: dict[str, int] = {}
    pairs: list[TaskPair] = []
    text = _json_blocks(text or "") or text or ""
    starts = [m for m in _AGENT.finditer(text)]
    if not starts:
        reasons["no_agent_tag"] = 1
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
        block = text[m.end() : end]
        d = _DESC.search(block)
        task_text = block[: d.start()] if d else block
        task = _clean(_LIST_MARK.sub("", task_text.strip().splitlines()[0] if task_text.strip() else ""))
        solution = _clean(_LIST_MARK.sub("", _description(block[d.end() :]))) if d else ""
        reason = _validate(task, solution, (task_min_words, task_max_words, min_words, max_words))
        if reason:
            reasons[reason] = reasons.get(reason, 0) + 1
            continue
        pairs.append(TaskPair(task=f"[Agent]: {task}", solution=solution))
    return pairs, reasons


def task_key(task: str) -> str:
    """Normalised task text for de-duplication (case, punctuation and spacing ignored)."""
    return " ".join(re.sub(r"[^\w\s]", " ", _AGENT.sub("", task).lower()).split())


class ChatProposer:
    """A :class:`Proposer` over any :class:`ChatBackend` (a local VLM or an HTTP endpoint)."""

    def __init__(
        self,
        chat: ChatBackend,
        *,
        min_words: int = 40,
        max_words: int = 90,
        task_min_words: int = 2,
        task_max_words: int = 20,
        max_attempts: int = 3,
        max_new_tokens: int = 1024,
    ) -> None:
        if not 0 < min_words <= max_words:
            raise ValueError(f"ChatProposer: need 0 < min_words <= max_words, got {min_words}, {max_words}")
        if max_attempts < 1:
            raise ValueError(f"ChatProposer: max_attempts must be >= 1, got {max_attempts}")
        self.chat = chat
        self.bounds = dict(
            min_words=min_words,
            max_words=max_words,
            task_min_words=task_min_words,
            task_max_words=task_max_words,
        )
        self.max_attempts = max_attempts
        self.max_new_tokens = max_new_tokens
        self.stats = ProposeStats()

    def prompt(self, n: int) -> str:
        b = self.bounds
        return PROPOSER_PROMPT.format(
            n=n,
            task_min=b["task_min_words"],
            task_max=b["task_max_words"],
            min_words=b["min_words"],
            max_words=b["max_words"],
        )

    async def propose(self, images: list[np.ndarray], n: int) -> list[list[TaskPair]]:
        """``n`` pairs per image, same order as ``images``; statistics accumulate in ``self.stats``."""
        if n < 1:
            raise ValueError(f"propose: n must be >= 1, got {n}")
        for i, im in enumerate(images):
            if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
                raise ValueError(f"propose: images[{i}] must be an HxWx3 uint8 array")
        out: list[list[TaskPair]] = [[] for _ in images]
        seen: list[set[str]] = [set() for _ in images]
        t0 = time.perf_counter()
        for _ in range(self.max_attempts):
            todo = [i for i in range(len(images)) if len(out[i]) < n]
            if not todo:
                break
            items = [ChatItem([images[i]], self.prompt(n - len(out[i])), self.max_new_tokens) for i in todo]
            results = await self.chat.chat(items)
            self.stats.requests += len(items)
            for i, res in zip(todo, results):
                self._accept(res.text if res.status == "ok" else None, out[i], seen[i], n, res.truncated)
        self.stats.short_images += sum(len(o) < n for o in out)
        log.debug(
            "proposed %d pairs for %d images in %.2fs",
            sum(map(len, out)),
            len(images),
            time.perf_counter() - t0,
        )
        return out

    def _accept(
        self, text: str | None, pairs: list[TaskPair], seen: set[str], n: int, truncated: bool = False
    ) -> None:
        if text is None:
            self.stats.failed_calls += 1
            return
        tags = list(_AGENT.finditer(text))
        if truncated and tags:
            # stopped at max_new_tokens: the last block may end mid-description (a half solution passed the bounds)
            text = text[: tags[-1].start()]
            self.stats.rejected_blocks += 1
            self.stats.reasons["truncated"] = self.stats.reasons.get("truncated", 0) + 1
            if len(tags) == 1:
                return
        parsed, reasons = parse_proposals(text, **self.bounds)
        self.stats.rejected_blocks += sum(reasons.values())
        for r, c in reasons.items():
            self.stats.reasons[r] = self.stats.reasons.get(r, 0) + c
        for p in parsed:
            key = task_key(p.task)
            if key in seen:
                self.stats.duplicates += 1
                continue
            if len(pairs) < n:
                seen.add(key)
                pairs.append(p)


class TransformersProposer(ChatProposer):
    """A proposer on a local transformers VLM: a model folder, or a shared
    :class:`engine.judge.transformers_vlm.TransformersVLM`. Other keywords as :class:`ChatProposer`."""

    def __init__(self, model_or_path, *, device: str | None = None, max_batch: int = 8, **kwargs) -> None:
        from engine.judge.transformers_vlm import TransformersVLM

        vlm = (
            model_or_path
            if isinstance(model_or_path, TransformersVLM)
            else TransformersVLM(model_or_path, device=device, max_batch=max_batch)
        )
        super().__init__(vlm, **kwargs)


class OpenAIProposer(ChatProposer):
    """A proposer over an OpenAI-compatible endpoint; sampling (``temperature``) makes retries differ."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        timeout_s: float = 120.0,
        max_retries: int = 2,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.7,
        **kwargs,
    ) -> None:
        from engine.judge.openai import OpenAIChat

        chat = OpenAIChat(
            base_url,
            model,
            timeout_s=timeout_s,
            max_retries=max_retries,
            api_key_env=api_key_env,
            temperature=temperature,
        )
        super().__init__(chat, **kwargs)
