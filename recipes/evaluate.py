"""Evaluate: held-out (image, task) pairs -> videos -> judge -> Task / Agent / Consistency / Avg with CIs.

    python recipes/evaluate.py --config recipes/configs/wmsd_toy.toml --eval.executors '["onpolicy=runs/x/model.safetensors"]'

Conditions: with ``eval.baselines`` the Demonstrator prompted with the task and with the proposer's
solution (the costly two-model pipeline), then every ``name=weights`` Executor of ``eval.executors``
prompted with the task. All conditions use the same items and the same initial noise per item and
seed (engine.evaluation.item_noise), so differences are paired. Items: the first ``eval.num_items`` rows
of ``eval.tasks`` (a task file; a warning says when rows are left out), or ``eval.num_items`` held-out toy
scenes. Sampling: flow.num_steps, flow.shift, flow.guidance (ODE).

Writes into <run>/eval/: ``partial/<condition>/items<a>-<b>.npz``, the per-item scores of each
finished chunk of ``eval.batch_size`` items (atomic rename; a rerun reuses finished chunks made with the
same items, seeds, sampling, judge and its prompts' version, prompt, weights file, precision.param_dtype
and Demonstrator -- a fingerprint saved with them -- and holding no failed judge call (NaN), and scores
the others again, so an interruption costs at most one chunk per rank), one ``<condition>.npz`` of
per-item scores per finished condition (reused on the same terms), ``videos/<condition>/item<NNNN>.mp4``
+ a contact-sheet PNG for the first ``eval.write_videos`` items (first seed), ``results.json`` (means,
CIs, paired tests against the Demonstrator + task) and ``results.md`` (the table).

Under ``torchrun --nproc_per_node N`` every rank holds its own copy of the model (with
``model.meta_init`` only rank 0 reads the weights, which are broadcast: recipes.common.load_for_sampling)
and scores the chunks k = rank, rank + N, ...; a chunk is one sampler batch with the noise of (seed,
item index), so the scores do not depend on N. Rank 0 gathers the scores (torch.distributed
gather_object) and writes every output above except the partial chunk files, which each rank writes for
its own chunks (so resume across restarts needs <run>/eval on a file system all ranks share, as training
checkpoints do).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine.config import ConfigError, JobConfig, config_main, save_config  # noqa: E402
from engine.dist import barrier, broadcast_from_main, end_process, gather_to_main, shard_of  # noqa: E402
from engine.evaluation import (  # noqa: E402
    EvalItem,
    SamplingConfig,
    VideoPipeline,
    evaluate,
    generate,
    paired_test,
    summarize,
)
from engine.log import get_logger, progress  # noqa: E402
from recipes.common import (  # noqa: E402
    BatchedJudge,
    Kit,
    build_kit,
    check_judge,
    check_model,
    check_run,
    check_tasks,
    check_weights_fit,
    demonstrator_id,
    dist_info,
    files_id,
    fit_images,
    judge_id,
    load_for_sampling,
    load_image,
    load_items,
    run_dir,
    sampling_velocity,
)

log = get_logger("evaluate")
COLUMNS = ("task", "agent", "consistency", "avg")
BASELINE = "demonstrator+task"


def eval_items(cfg: JobConfig) -> list[EvalItem]:
    """The first ``eval.num_items`` rows of ``eval.tasks``, or as many held-out toy scenes (disjoint from the
    training scenes' seed stream)."""
    for key, value in (("num_items", cfg.eval.num_items), ("batch_size", cfg.eval.batch_size)):
        if value < 1:
            raise ValueError(f"eval.{key} = {value}: expected a positive number of items")
    if not 0 < cfg.eval.ci < 1:
        raise ValueError(f"eval.ci = {cfg.eval.ci}: expected a confidence level between 0 and 1, e.g. 0.95")
    if cfg.eval.tasks:
        rows = load_items(cfg.eval.tasks)
        if len(rows) > cfg.eval.num_items:
            log.warning("eval.tasks '%s' has %d rows; evaluating the first eval.num_items = %d",
                        cfg.eval.tasks, len(rows), cfg.eval.num_items)  # fmt: skip
        images = [load_image(it.image) for it in rows[: cfg.eval.num_items]]
        # the sampler stacks a batch's images: several sizes (a real task file's) failed there, after the model
        # loaded; they are fitted to data.height x data.width as the model's kit fits them for its VAE
        if len({im.shape for im in images}) > 1 and not (
            cfg.model.family == "wan" and cfg.model.flavour == "toy"
        ):
            images = [fit_images(im[None], cfg.data.height, cfg.data.width, crop=cfg.model.family == "hunyuan15")[0]
                      for im in images]  # fmt: skip
        return [EvalItem(im, it.task, it.solution, {"id": it.id}) for im, it in zip(images, rows)]
    from engine.world.demonstrator import eval_items as toy_items

    return toy_items(cfg.eval.num_items, cfg.world.seed)


def conditions(cfg: JobConfig) -> list[tuple[str, str, str]]:
    """(name, weights, prompt) per condition; weights "" = the Demonstrator."""
    out = [(BASELINE, "", "task"), ("demonstrator+solution", "", "solution")] if cfg.eval.baselines else []
    for spec in cfg.eval.executors:
        name, sep, weights = spec.partition("=")
        if not sep or not name or not weights:
            raise ValueError(f"eval.executors entry {spec!r}: expected 'name=path/to/model.safetensors'")
        # the name is a file name in <run>/eval (<name>.npz, partial/<name>/) and a row of the table
        if "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError(
                f"eval.executors entry {spec!r}: the name {name!r} must be a plain file name (no '/', '\\', '.', '..')"
            )
        if name in [c[0] for c in out]:
            raise ValueError(f"eval.executors entry {spec!r}: the name {name!r} is already taken; expected "
                             f"distinct names (taken: {', '.join(c[0] for c in out)})")  # fmt: skip
        out.append((name, weights, "task"))
    if not out:
        raise ValueError("nothing to evaluate: eval.baselines is false and eval.executors is empty")
    return out


def validate(cfg: JobConfig) -> None:
    """The inputs, checked before any model is loaded or video sampled: a ConfigError naming the key."""
    check_run(cfg)
    check_model(cfg)
    check_judge(cfg)
    check_eval_settings(cfg)
    try:
        conds = conditions(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # a missing or wrong-shape Executor file was found only when its turn came, after the baselines had been sampled
    for name, weights, _ in conds:
        check_weights_fit(cfg, weights, f"eval.executors entry {name!r}")


def check_eval_settings(cfg: JobConfig) -> None:
    """The eval section's sizes, CI level, seeds and task file (also the pipeline's gap check and final
    evaluation): a model other than the toy needs a task file."""
    # these failed with tracebacks (seeds after loading the model); write_videos -1 wrote all items but one
    for key, value, least in (
        ("num_items", cfg.eval.num_items, 1),
        ("write_videos", cfg.eval.write_videos, 0),
    ):
        if value < least:
            raise ConfigError(f"eval.{key} = {value}: expected >= {least}")
    if not 0 < cfg.eval.ci < 1:
        raise ConfigError(f"eval.ci = {cfg.eval.ci}: expected a confidence level between 0 and 1, e.g. 0.95")
    if not cfg.eval.seeds:
        raise ConfigError("eval.seeds is empty; expected at least one noise seed, e.g. [0]")
    if cfg.eval.tasks:
        rows = check_tasks(cfg.eval.tasks, "eval.tasks")
        if cfg.model.family == "wan" and cfg.model.flavour == "toy":
            _check_toy_images(rows[: cfg.eval.num_items], cfg.eval.tasks)
    # the default items are the toy world's scenes: a real model was evaluated on 64 x 64 toy renders
    elif not (cfg.model.family == "wan" and cfg.model.flavour == "toy"):
        raise ConfigError(f"eval.tasks is empty: without a task file the items are the toy world's held-out scenes, "
                          f"not images for model {cfg.model.family!r} / {cfg.model.flavour!r}; set --eval.tasks to a "
                          "held-out task file (recipes/propose.py on held-out images)")  # fmt: skip


def _check_toy_images(rows: list, path: str) -> None:
    """The toy model takes its world's SIZE x SIZE scenes (its images are not fitted): another size failed after
    the model loaded (mixed sizes in numpy's stack, one other size in the sampler's latent shape)."""
    from PIL import Image

    from engine.world.scene import SIZE

    for row in rows:
        with Image.open(row.image) as im:
            if im.size != (SIZE, SIZE):
                raise ConfigError(f"eval.tasks: '{path}' row {row.id!r}: image '{row.image}' is {im.size[0]} x "
                                  f"{im.size[1]}; the toy model takes its world's {SIZE} x {SIZE} scenes")  # fmt: skip


def pipeline_for(kit: Kit, model: torch.nn.Module, cfg: JobConfig) -> VideoPipeline:
    """The evaluation pipeline of a kit's model: the same cond entries as training (image latent, image
    tokens where the family has them, every text entry), forwards in the trainer's precision."""

    def encode_image(images) -> dict[str, torch.Tensor]:
        return kit.encode_image_cond(np.asarray(images.cpu() if isinstance(images, torch.Tensor) else images))

    return VideoPipeline(sampling_velocity(cfg, model), kit.encode_text, encode_image, kit.decode,
                         kit.latent_shape, kit.device)  # fmt: skip


def sampling_of(cfg: JobConfig) -> SamplingConfig:
    return SamplingConfig(num_steps=cfg.flow.num_steps, shift=cfg.flow.shift, guidance=cfg.flow.guidance,
                          batch_size=cfg.eval.batch_size)  # fmt: skip


def write_videos(
    pipe: VideoPipeline, items: list[EvalItem], prompt: str, cfg: JobConfig, folder: Path, fps: int
):
    """mp4 (PyAV) + contact sheet (PNG) for the first ``eval.write_videos`` items, first seed."""
    from recipes.demonstrate import contact_sheet, write_mp4

    first = items[: cfg.eval.write_videos]
    if not first:
        return
    texts = [getattr(it, prompt) for it in first]
    videos = generate(pipe, np.stack([it.image for it in first]), texts, seed=cfg.eval.seeds[0],
                      sampling=sampling_of(cfg))  # fmt: skip
    for i, video in enumerate(videos):
        write_mp4(video, folder / f"item{i:04d}.mp4", fps)
        contact_sheet(video, folder / f"item{i:04d}.png")


def fingerprint(cfg: JobConfig, items: list[EvalItem], weights: str, prompt: str) -> str:
    """What a condition's scores depend on (items with their prompt text and image, seeds, sampling, judge
    and its prompts' version, prompt, the weights file as written, precision.param_dtype, and the Demonstrator
    and encoders the kit loads: model.family / flavour / pretrained, world.demonstrator): saved scores with
    another fingerprint are scored again."""
    # each item's id, task, the text the model is prompted with, and its image
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.meta.get('id', '')}|{it.task}|{getattr(it, prompt)}\n".encode())
        h.update(np.ascontiguousarray(it.image).tobytes())
    return json.dumps({
        "items": h.hexdigest(), "n": len(items), "seeds": list(cfg.eval.seeds),
        "sampling": dataclasses.asdict(sampling_of(cfg)), "prompt": prompt, "world_seed": cfg.world.seed,
        "judge": judge_id(cfg),
        # the sampler's forwards run in this dtype (load_for_sampling, sampling_velocity)
        "precision": cfg.precision.param_dtype,
        "weights": files_id(weights) if weights else "",
        "model": demonstrator_id(cfg),
    }, sort_keys=True)  # fmt: skip


def _load_scores(path: Path, expected: str) -> dict[str, np.ndarray] | None:
    """The scores saved at ``path`` if they were made with fingerprint ``expected`` and hold no failed judge
    call (NaN), else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as f:
            saved = dict(f)
    # a file cut short (a crash before its bytes reached the disk) failed every rerun with a traceback
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        log.warning("%s: unreadable (%s: %s); scoring again", path.name, type(e).__name__, e)
        return None
    if str(saved.pop("fingerprint", "")) != expected:
        log.info(
            "%s: made with other settings (items, seeds, sampling, judge, precision, weights or Demonstrator); "
            "scoring again",
            path.name,
        )
        return None
    # NaN: a judge call that failed (timeout, server down, parse error); reusing it made the failure
    # permanent (a rerun with the judge back up reported the NaN scores as "already evaluated")
    if any(np.isnan(v).any() for v in saved.values()):
        log.info("%s: has items the judge did not score; scoring again", path.name)
        return None
    return saved


def _save_scores(path: Path, scores: dict[str, np.ndarray], fp: str) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **scores, fingerprint=np.array(fp))
    tmp.replace(path)


def chunk_ranges(n: int, size: int) -> list[range]:
    """Items in chunks of ``size`` (= eval.batch_size: a chunk is one sampler batch, so a chunk scored
    alone, on any rank, gives the scores the whole list would)."""
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def score_chunks(pipe: VideoPipeline, judge, items: list[EvalItem], cfg: JobConfig, prompt: str,
                 chunks: list[range], folder: Path, fp: str) -> dict[int, dict[str, np.ndarray]]:  # fmt: skip
    """Scores of the given chunks (chunk start -> question -> (S, n)); each finished chunk is saved as
    ``folder/items<start>-<stop>.npz`` (atomic rename) and read back instead of recomputed on a rerun made
    with the same settings (fingerprint ``fp``)."""
    folder.mkdir(parents=True, exist_ok=True)
    out, reused = {}, 0
    # the bar over conditions alone stood still for a whole condition (hours at real sizes)
    for r in progress(chunks, desc=f"  {folder.name}: chunks", total=len(chunks), leave=False):
        path = folder / f"items{r.start:06d}-{r.stop:06d}.npz"
        saved = _load_scores(path, fp)
        if saved is not None:
            out[r.start], reused = saved, reused + 1
            continue
        out[r.start] = evaluate(pipe, items[r.start : r.stop], judge, prompt=prompt, seeds=tuple(cfg.eval.seeds),
                                sampling=sampling_of(cfg), start=r.start)  # fmt: skip
        _save_scores(path, out[r.start], fp)
    if reused:
        log.info("%s: %d of %d chunks already scored (resume)", folder.name, reused, len(chunks))
    return out


def evaluate_condition(kit: Kit, judge, items, cfg: JobConfig, name: str, weights: str, prompt: str,
                       out: Path) -> dict[str, np.ndarray] | None:  # fmt: skip
    """Scores of one condition (question -> (S, N)) on rank 0, None on the others. Every rank scores its
    share of the chunks (round-robin); rank 0 gathers them, writes ``<name>.npz`` and the videos."""
    info = dist_info(cfg)
    chunks = chunk_ranges(len(items), cfg.eval.batch_size)
    mine = [chunks[k] for k in shard_of(len(chunks), info.rank, info.world_size)]
    model = load_for_sampling(kit, cfg, weights)
    pipe = pipeline_for(kit, model, cfg)
    fp = fingerprint(cfg, items, weights, prompt)
    with torch.no_grad():
        scored = score_chunks(pipe, judge, items, cfg, prompt, mine, out / "partial" / name, fp)
        gathered = gather_to_main(scored, f"evaluate {name}: gather scores")
        if gathered is None:
            return None
        parts = {start: s for rank_scores in gathered for start, s in rank_scores.items()}
        scores = {q: np.concatenate([parts[r.start][q] for r in chunks], axis=-1) for q in parts[0]}
        write_videos(pipe, items, prompt, cfg, out / "videos" / name, kit.fps)
    _save_scores(out / f"{name}.npz", scores, fp)
    return scores


def results(all_scores: dict[str, dict[str, np.ndarray]], cfg: JobConfig) -> dict:
    """Means + CIs per condition, and paired tests of each condition against the baseline."""
    out = {"n_items": None, "seeds": cfg.eval.seeds, "ci": cfg.eval.ci, "conditions": {}}
    base = all_scores.get(BASELINE)
    for name, scores in all_scores.items():
        entry = {"summary": summarize(scores, cfg.eval.ci)}
        if base is not None and name != BASELINE:
            entry["vs_" + BASELINE] = {q: vars(paired_test(scores[q], base[q], cfg.eval.ci)) for q in COLUMNS}
        out["conditions"][name] = entry
        out["n_items"] = int(scores["avg"].shape[-1])
    return out


def markdown_table(res: dict) -> str:
    """Condition rows x Task/Agent/Consistency/Avg, ``mean [lo, hi]``."""
    head = f"| condition | {' | '.join(c.capitalize() for c in COLUMNS)} |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, entry in res["conditions"].items():
        cells = [
            f"{s['mean']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}]" for s in (entry["summary"][c] for c in COLUMNS)
        ]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return (
        "\n".join(lines)
        + f"\n\n{res['n_items']} items x {len(res['seeds'])} seed(s), {res['ci']:.0%} bootstrap CIs.\n"
    )


def run(cfg: JobConfig, *, out: Path | None = None) -> dict:
    """Evaluate every condition; returns the results dict (also written as results.json / results.md) on
    rank 0, {} on the other ranks (which return once rank 0 has written everything)."""
    out = out or run_dir(cfg) / "eval"
    info = dist_info(cfg)
    conds = conditions(cfg)
    items = eval_items(cfg)
    finished, saved = None, {}
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out)
        for name, weights, prompt in conds:  # scores saved by an earlier run with the same settings
            scores = _load_scores(out / f"{name}.npz", fingerprint(cfg, items, weights, prompt))
            if scores is not None:
                saved[name] = scores
        finished = list(saved)
    finished = broadcast_from_main(finished, "evaluate: finished conditions")
    kit, judge = build_kit(cfg), BatchedJudge(cfg)
    all_scores = {}
    for name, weights, prompt in progress(conds, desc="evaluate", total=len(conds)):
        if name in finished:
            log.info("%s: already evaluated (%s)", name, out / f"{name}.npz")
            all_scores[name] = saved.get(name)
        else:
            all_scores[name] = evaluate_condition(kit, judge, items, cfg, name, weights, prompt, out)
    res = {}
    if info.is_main:
        res = results(all_scores, cfg)
        (out / "results.json").write_text(json.dumps(res, indent=1))
        (out / "results.md").write_text(markdown_table(res))
        log.info("evaluation (%d items):\n%s", len(items), markdown_table(res))
    barrier("evaluate: results written")
    return res


def main(argv: list[str] | None = None) -> None:
    run(config_main(JobConfig, argv, description=__doc__, validate=validate))


if __name__ == "__main__":
    main()
    end_process()  # a torchrun worker leaves without interpreter finalisation (see engine.dist)
