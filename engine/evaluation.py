"""Evaluation core: generate videos for (image, text) items with the flow sampler, score them with a
judge, summarise with confidence intervals, compare two conditions on the same items and noise, and
the Demonstrator gap check that guards every WMSD run.

Model-agnostic: a :class:`VideoPipeline` bundles the velocity function with the encoders of the
model family (text -> cond, first-frame image -> latent, latent -> uint8 frames). Noise is a pure
function of (seed, item index), so two conditions evaluated with the same seeds are paired.

Statistics (all over items, and over seeds when several are given):
- :func:`mean_ci`: percentile bootstrap of the mean, resampling items (and seeds) with replacement.
- :func:`wilson_interval`: the Wilson score interval of a binomial proportion k / n.
- :func:`paired_test`: per-item differences d_i = mean_s a[s, i] - mean_s b[s, i] over the seeds s judged
  in both conditions; a bootstrap CI of mean(d) and an exact two-sided sign test on the non-zero d_i
  (p = P(|Bin(m, 1/2) - m/2| >= observed)).
- :func:`gap_check`: Demonstrator with the solution vs with the task on the same items and noise;
  raises :class:`GapTooSmallError` when the Avg gap is below ``min_gap`` (config ``distill.min_gap``).
"""

from __future__ import annotations

import asyncio
import math
import statistics
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from engine import flow
from engine.judge.base import JudgeRequest
from engine.log import get_logger

log = get_logger("evaluation")
QUESTIONS = ("task", "agent", "consistency")


class GapTooSmallError(RuntimeError):
    """The Demonstrator's solution-vs-task gap is below ``distill.min_gap``: distillation has nothing to teach."""


class NoGapError(ValueError):
    """:func:`gap_closed` of a Demonstrator whose solution does not beat its task (no gap to close)."""


@dataclass
class VideoPipeline:
    """How to turn (first-frame images, texts) into videos for one model.

    encode_text(texts) -> {"text", "text_lengths", ...}; encode_image(uint8 (B, H, W, 3)) -> the image
    entries of the cond dict: {"image_latent": (B, C, 1, h, w)} plus, for models that also attend to image
    tokens (Wan2.1 I2V's CLIP, HunyuanVideo-1.5's SigLIP), {"image_tokens": (B, N, D)};
    decode(latent (B, C, T, h, w)) -> uint8 (B, T, H, W, 3); latent_shape = (C, T, h, w).
    """

    v_fn: flow.VelocityFn
    encode_text: Callable[[list[str]], dict]
    encode_image: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    decode: Callable[[torch.Tensor], torch.Tensor]
    latent_shape: tuple[int, int, int, int]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class EvalItem:
    """One benchmark item: the scene image (H, W, 3 uint8), the task, its solution, free metadata."""

    image: np.ndarray
    task: str
    solution: str
    meta: dict = field(default_factory=dict)


@dataclass
class SamplingConfig:
    """Sampler settings for evaluation: Euler steps, timestep shift, CFG scale, SDE sigma, batch."""

    num_steps: int = 8
    shift: float = 1.0
    guidance: float = 1.0
    sigma: float = 0.0
    batch_size: int = 64


def item_noise(shape: tuple[int, ...], seed: int, index: int) -> torch.Tensor:
    """The initial noise of item ``index`` under ``seed``: identical for every condition and model."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randn(shape, generator=g)


def generate(pipe: VideoPipeline, images: np.ndarray, texts: list[str], *, seed: int,
             sampling: SamplingConfig, start: int = 0) -> np.ndarray:  # fmt: skip
    """Videos uint8 (N, T, H, W, 3) for N images (N, H, W, 3) and N texts, in batches.

    ``start``: the index of the first item in the whole item list, so that a slice of the items (one
    rank's share, one resumable chunk) gets the noise the whole list would give it. A slice that starts
    on a multiple of ``sampling.batch_size`` also gets the same batches, hence identical videos."""
    if len(images) != len(texts):
        raise ValueError(f"generate: {len(images)} images but {len(texts)} texts; expected equal counts")
    out = []
    for s in range(0, len(texts), sampling.batch_size):
        idx = range(s, min(s + sampling.batch_size, len(texts)))
        noise = torch.stack([item_noise(pipe.latent_shape, seed, start + i) for i in idx]).to(pipe.device)
        img = torch.as_tensor(np.asarray(images[idx.start : idx.stop])).to(pipe.device)
        with torch.no_grad():
            image = pipe.encode_image(img)
            if not isinstance(image, dict) or "image_latent" not in image:
                raise TypeError(f"VideoPipeline.encode_image: expected a dict with 'image_latent' (and optional "
                                f"'image_tokens'), got {type(image).__name__}")  # fmt: skip
            cond = {**pipe.encode_text([texts[i] for i in idx]), **image}
            uncond = None
            if sampling.guidance != 1.0:
                uncond = {**pipe.encode_text([""] * len(idx)), **image}
            g = torch.Generator(device=pipe.device).manual_seed(seed * 7919 + start + s)
            traj = flow.sample(pipe.v_fn, noise, cond, num_steps=sampling.num_steps, shift=sampling.shift,
                               guidance=sampling.guidance, uncond=uncond, sigma=sampling.sigma, generator=g)  # fmt: skip
            out.append(pipe.decode(traj.x0).cpu().numpy())
    return np.concatenate(out)


async def score_videos(judge, videos: np.ndarray, tasks: list[str],
                       questions: tuple[str, ...] = QUESTIONS) -> dict[str, np.ndarray]:  # fmt: skip
    """Judge every video on every question -> question -> (N,) scores (NaN where the judge failed)."""
    reqs = [
        JudgeRequest(task=t, question=q, frames=list(v)) for q in questions for v, t in zip(videos, tasks)
    ]
    verdicts = await judge.score(reqs)
    # a failed call became a silent NaN (a judge that was down or misconfigured gave a table of nan)
    failed = [v for v in verdicts if v.score is None]
    if failed:
        counts = Counter(v.status for v in failed)
        log.warning("judge: %d of %d calls gave no score (%s), scored NaN; first: %s", len(failed), len(verdicts),
                    ", ".join(f"{s} {c}" for s, c in counts.items()), str(failed[0].raw)[:300])  # fmt: skip
    n = len(tasks)
    scores = {}
    for j, q in enumerate(questions):
        vals = [v.score if v.score is not None else math.nan for v in verdicts[j * n : (j + 1) * n]]
        scores[q] = np.asarray(vals, dtype=np.float64)
    return scores


def with_avg(scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add "avg" = the mean over the task/agent/consistency scores present."""
    present = [scores[q] for q in QUESTIONS if q in scores]
    return {**scores, "avg": np.mean(present, axis=0)}


def evaluate(pipe: VideoPipeline, items: list[EvalItem], judge, *, prompt: str = "task",
             seeds: tuple[int, ...] = (0,), sampling: SamplingConfig | None = None,
             start: int = 0) -> dict[str, np.ndarray]:  # fmt: skip
    """Generate with each item's ``prompt`` text ("task" or "solution"), judge against its task.

    ``items`` may be a slice of a larger list beginning at index ``start`` (see :func:`generate`).
    Returns question -> scores (S, N) for S seeds and N items, plus "avg"."""
    if prompt not in ("task", "solution"):
        raise ValueError(f"prompt: expected 'task' or 'solution', got {prompt!r}")
    if not seeds:
        raise ValueError("evaluate: seeds (eval.seeds) is empty; expected at least one seed, e.g. [0]")
    sampling = sampling or SamplingConfig()
    images = np.stack([it.image for it in items])
    texts = [getattr(it, prompt) for it in items]
    tasks = [it.task for it in items]
    per_seed = []
    for seed in seeds:
        videos = generate(pipe, images, texts, seed=seed, sampling=sampling, start=start)
        per_seed.append(with_avg(asyncio.run(score_videos(judge, videos, tasks))))
    return {q: np.stack([s[q] for s in per_seed]) for q in per_seed[0]}


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def _as_2d(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"{name}: expected scores of shape (N,) or (seeds, N) with N > 0, got {x.shape}")
    return x


def _common_cells(*xs: np.ndarray) -> tuple[np.ndarray, ...]:
    """Same-shape (seeds, N) scores with every (seed, item) cell NaN (not judged) in one of them made NaN in
    all: an item's means are then over the same seeds (the same noise) in every condition."""
    gone = np.logical_or.reduce([np.isnan(x) for x in xs])
    return tuple(np.where(gone, np.nan, x) for x in xs)


def mean_ci(
    scores: np.ndarray, conf: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, lo, hi): percentile bootstrap over items, and over seeds when scores is (S, N), S > 1. NaN
    scores (failed judge calls) are left out of every mean, and so is a resample that drew only NaN."""
    x = _as_2d(scores, "scores")
    S, N = x.shape
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, S, (n_boot, S)) if S > 1 else np.zeros((n_boot, 1), dtype=int)
    cols = rng.integers(0, N, (n_boot, N))
    with warnings.catch_warnings():  # an all-NaN resample is a NaN mean, left out below
        warnings.simplefilter("ignore", RuntimeWarning)
        boots = np.array([np.nanmean(x[r][:, c]) for r, c in zip(rows, cols)])
        a = (1 - conf) / 2
        return float(np.nanmean(x)), float(np.nanquantile(boots, a)), float(np.nanquantile(boots, 1 - a))


def wilson_interval(k: int, n: int, conf: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval: expected 0 <= k <= n and n > 0, got k={k}, n={n}")
    z = statistics.NormalDist().inv_cdf(0.5 + conf / 2)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_test(d: np.ndarray) -> tuple[float, int, int]:
    """Exact two-sided sign test of per-item differences -> (p, #positive, #negative); zeros dropped."""
    pos, neg = int((d > 0).sum()), int((d < 0).sum())
    m = pos + neg
    if m == 0:
        return 1.0, 0, 0
    k = min(pos, neg)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2**m
    return min(1.0, 2 * tail), pos, neg


@dataclass
class PairedResult:
    """A paired comparison of two conditions on the same items (see :func:`paired_test`)."""

    diff: float  # mean over items of (a - b)
    lo: float
    hi: float
    p_sign: float  # exact two-sided sign test
    n_pos: int
    n_neg: int
    n: int


def paired_test(
    a: np.ndarray, b: np.ndarray, conf: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> PairedResult:
    """Compare condition a with b on the same items (and seeds): bootstrap CI of the mean difference
    over items, and a sign test on per-item differences (averaged over seeds first)."""
    a, b = _as_2d(a, "a"), _as_2d(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired_test: a {a.shape} and b {b.shape}: expected the same items and seeds")
    # pairs are (seed, item) cells: a cell judged in one condition only is left out of both
    a, b = _common_cells(a, b)
    with warnings.catch_warnings():  # an item every seed of which failed is NaN: left out
        warnings.simplefilter("ignore", RuntimeWarning)
        d = np.nanmean(a, axis=0) - np.nanmean(b, axis=0)  # (N,)
    d = d[np.isfinite(d)]
    if not len(d):  # no item has a score under both conditions: nothing to compare (reported as NaN)
        return PairedResult(math.nan, math.nan, math.nan, 1.0, 0, 0, 0)
    mean, lo, hi = mean_ci(d, conf, n_boot, seed)
    p, pos, neg = sign_test(d)
    return PairedResult(mean, lo, hi, p, pos, neg, len(d))


def gap_closed(
    executor: np.ndarray,
    task: np.ndarray,
    solution: np.ndarray,
    conf: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Fraction of the Demonstrator's gap the Executor closes, (E - T) / (S - T) of the means, with a
    paired percentile bootstrap (the same resampled items for all three) -> (fraction, lo, hi).

    ``executor``, ``task``, ``solution``: per-item scores (N,) or (seeds, N) of the Executor given the
    task, the Demonstrator given the task, and the Demonstrator given the solution, on the same items. An
    item without a score in one of them (every seed's judge call failed: NaN) is left out of all three.
    """
    e, t, s = (_as_2d(x, name) for x, name in
               ((executor, "executor"), (task, "task"), (solution, "solution")))  # fmt: skip
    if not e.shape[1] == t.shape[1] == s.shape[1]:
        raise ValueError(
            f"gap_closed: executor {e.shape}, task {t.shape}, solution {s.shape}: expected the same items"
        )
    if e.shape == t.shape == s.shape:
        # a (seed, item) cell judged in some conditions only is left out of all three
        e, t, s = _common_cells(e, t, s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        e, t, s = (np.nanmean(x, axis=0) for x in (e, t, s))
    ok = np.isfinite(e) & np.isfinite(t) & np.isfinite(s)
    if not ok.any():  # no item has a score under all three conditions (reported as NaN)
        return math.nan, math.nan, math.nan
    e, t, s = e[ok], t[ok], s[ok]
    gap = s.mean() - t.mean()
    if gap <= 0:
        raise NoGapError(f"gap_closed: the Demonstrator has no gap (solution - task = {gap:+.3f})")
    cols = np.random.default_rng(seed).integers(0, len(e), (n_boot, len(e)))
    num, den = e[cols].mean(1) - t[cols].mean(1), s[cols].mean(1) - t[cols].mean(1)
    boots = num[den > 0] / den[den > 0]
    a = (1 - conf) / 2
    return float((e.mean() - t.mean()) / gap), float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a))


def summarize(scores: dict[str, np.ndarray], conf: float = 0.95) -> dict[str, dict[str, float]]:
    """question -> {"mean", "lo", "hi"} (bootstrap) for every question in ``scores``."""
    out = {}
    for q, x in scores.items():
        m, lo, hi = mean_ci(x, conf)
        out[q] = {"mean": m, "lo": lo, "hi": hi}
    return out


# ---------------------------------------------------------------------------------------------
# The gap check
# ---------------------------------------------------------------------------------------------


def gap_check(pipe: VideoPipeline, items: list[EvalItem], judge, *, min_gap: float = 0.25,
              seeds: tuple[int, ...] = (0,), sampling: SamplingConfig | None = None,
              raise_if_small: bool = True, conf: float = 0.95) -> dict:  # fmt: skip
    """Demonstrator given the solution vs given the task, same items and noise.

    Returns {"solution": summary, "task": summary, "gap": {question: paired result}, "min_gap",
    "passed"}, intervals at confidence ``conf`` (config ``eval.ci``). Raises GapTooSmallError (with the
    numbers) when the Avg gap < min_gap and ``raise_if_small``."""
    if len(items) == 0:
        raise ValueError("gap_check: expected at least one item")
    sol = evaluate(pipe, items, judge, prompt="solution", seeds=seeds, sampling=sampling)
    task = evaluate(pipe, items, judge, prompt="task", seeds=seeds, sampling=sampling)
    gap = {q: vars(paired_test(sol[q], task[q], conf)) for q in sol}
    report = {"n_items": len(items), "seeds": list(seeds), "solution": summarize(sol, conf), "task": summarize(task, conf),
              "gap": gap, "min_gap": min_gap, "passed": gap["avg"]["diff"] >= min_gap}  # fmt: skip
    if raise_if_small and not report["passed"]:
        g = gap["avg"]
        raise GapTooSmallError(
            f"Demonstrator gap (solution - task, Avg) = {g['diff']:.3f} [{g['lo']:.3f}, {g['hi']:.3f}] on "
            f"{len(items)} paired items is below distill.min_gap = {min_gap}: the solution text does not "
            "carry what the task lacks for this Demonstrator, so distillation has nothing to teach. "
            "Pretrain the Demonstrator longer or check the task/solution pairs."
        )
    return report


def format_report(report: dict) -> str:
    """A small text table of a gap report."""
    lines = [f"{'':12s} {'solution':>22s} {'task':>22s} {'gap (paired)':>26s}"]
    for q in (*QUESTIONS, "avg"):
        s, t, g = report["solution"][q], report["task"][q], report["gap"][q]
        lines.append(
            f"{q:12s} {s['mean']:.3f} [{s['lo']:.3f},{s['hi']:.3f}] {t['mean']:.3f} [{t['lo']:.3f},{t['hi']:.3f}]"
            f"  {g['diff']:+.3f} [{g['lo']:+.3f},{g['hi']:+.3f}] p={g['p_sign']:.1e}"
        )
    return "\n".join(lines)
