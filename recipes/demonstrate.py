"""Demonstrate: the Demonstrator's videos for the proposed tasks (off-policy baseline data, inspection).

    python recipes/demonstrate.py --config recipes/configs/wmsd_toy.toml

For every item of the task file (``distill.tasks``, "" = <run>/tasks.jsonl) and each of
``distill.demos_per_task`` seeds, the Demonstrator samples a video from (I, solution) (ODE,
flow.num_steps), the judge scores it against the task (Task / Agent / Consistency), and the latent
is stored. Output in <run>/demos/ (or ``distill.demos``): ``latents/*.safetensors`` (one file per
chunk), ``index.jsonl`` (one row per demonstration: id, item_id, file, row, scores, fingerprint), and mp4 +
contact sheet for the first ``eval.write_videos`` demonstrations. A rerun skips demonstrations
already in the index (resume), unless they were made with other settings (the row's fingerprint) or hold
a failed judge call (a null score).
Under ``torchrun --nproc_per_node N`` the chunks of ``eval.batch_size`` demonstrations are dealt
round-robin to the ranks (noise per (run.seed + j, item), as in one process); rank 0 gathers each round (torch.distributed gather_object) and writes the files above in chunk order.
Every rank holds a full copy of the Demonstrator (recipes.common.load_for_sampling; with
``model.meta_init`` rank 0 alone reads its weights, which are broadcast).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine import flow  # noqa: E402
from engine.config import ConfigError, JobConfig, config_main, save_config  # noqa: E402
from engine.dist import barrier, broadcast_from_main, end_process, gather_to_main  # noqa: E402
from engine.evaluation import item_noise, score_videos  # noqa: E402
from engine.log import get_logger, progress  # noqa: E402
from recipes.common import (  # noqa: E402
    BatchedJudge,
    _as_config_error,
    append_jsonl,
    build_kit,
    check_judge,
    check_model,
    check_run,
    check_tasks,
    demonstrator_id,
    dist_info,
    judge_id,
    load_for_sampling,
    load_items,
    read_jsonl,
    rewrite_jsonl,
    run_path,
    sampling_velocity,
    save_image,
    tasks_path,
)

log = get_logger("demonstrate")
DEMOS_INDEX = "demonstrations index"


def write_mp4(video: np.ndarray, path: Path, fps: int) -> None:
    """uint8 (T, H, W, 3) -> H.264 mp4 (PyAV); sides padded to even sizes as yuv420p needs."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    T, H, W, _ = video.shape
    pad = ((0, 0), (0, H % 2), (0, W % 2), (0, 0))
    video = np.pad(video, pad, mode="edge")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = video.shape[2], video.shape[1], "yuv420p"
        for frame in video:
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def contact_sheet(video: np.ndarray, path: Path, scale: int = 0) -> None:
    """All frames side by side in one PNG (small frames upscaled to >= 128 px, nearest neighbour)."""
    T, H, W, _ = video.shape
    s = scale or max(1, 128 // H)
    frames = [np.kron(f, np.ones((s, s, 1), dtype=np.uint8)) for f in video]
    gap = np.full((H * s, 2, 3), 128, dtype=np.uint8)
    row = [frames[0]]
    for f in frames[1:]:
        row += [gap, f]
    save_image(np.concatenate(row, axis=1), path)


def read_demos(folder: Path, threshold: float | None) -> tuple[torch.Tensor, list[str], int, int]:
    """Stored demonstrations -> (latents (M, C, T, h, w), item ids, kept M, total); with a threshold only
    those whose judged Task score is >= it."""
    from safetensors.torch import load_file

    index = folder / "index.jsonl"
    rows = read_jsonl(index, DEMOS_INDEX, "recipes/demonstrate.py")
    kept = [r for r in rows if threshold is None or (r["scores"].get("task") or 0.0) >= threshold]
    files: dict[str, torch.Tensor] = {}
    latents = []
    for r in kept:
        if r["file"] not in files:
            files[r["file"]] = load_file(str(folder / r["file"]))["latents"]
        latents.append(files[r["file"]][r["row"]])
    stacked = torch.stack(latents) if latents else torch.empty(0)
    return stacked, [r["item_id"] for r in kept], len(kept), len(rows)


def demonstrate_chunk(kit, model, table, judge, items, cfg: JobConfig, chunk: list[tuple[int, int]],
                      first: int) -> dict:  # fmt: skip
    """Sample and judge one chunk of (seed offset j, item index i): its latents, scores and the videos
    of its demonstrations numbered (``first`` + row) below ``eval.write_videos``."""
    if not chunk:  # a rank without a chunk in the last round
        return {"chunk": chunk}
    idx = [i for _, i in chunk]
    noise = torch.stack([item_noise(kit.latent_shape, cfg.run.seed + j, i) for j, i in chunk]).to(kit.device)
    uncond = table.cond(idx, "empty") if cfg.flow.guidance != 1.0 else None
    x0 = flow.sample(sampling_velocity(cfg, model), noise, table.cond(idx, "solution"), num_steps=cfg.flow.num_steps,
                     shift=cfg.flow.shift, guidance=cfg.flow.guidance, uncond=uncond).x0  # fmt: skip
    videos = kit.decode(x0).numpy()
    scores = asyncio.run(score_videos(judge, videos, [items[i].task for i in idx]))
    keep = {first + r: v for r, v in enumerate(videos) if first + r < cfg.eval.write_videos}
    return {"chunk": chunk, "latents": x0.float().cpu().contiguous(), "scores": scores, "videos": keep}


def demo_fingerprints(cfg: JobConfig, items) -> dict[str, str]:
    """Demonstration id -> what its latents and scores depend on (the item's texts and image, run.seed, the
    sampling settings, precision, the Demonstrator and the judge), stored in its index row: a rerun with other
    settings makes it again instead of keeping the old one under the new config.toml."""
    f = cfg.flow
    settings = json.dumps({
        "seed": cfg.run.seed, "sampling": [f.num_steps, f.shift, f.guidance], "precision": cfg.precision.param_dtype,
        "model": demonstrator_id(cfg), "judge": judge_id(cfg),
    }, sort_keys=True)  # fmt: skip
    out = {}
    for it in items:
        # the image by name and size, not its absolute path: a moved run folder keeps its demonstrations
        image = Path(it.image)
        size = image.stat().st_size if image.is_file() else None
        key = f"{settings}|{it.task}|{it.solution}|{image.name}|{size}"
        h = hashlib.sha256(key.encode()).hexdigest()[:16]
        out.update({f"{it.id}#{k}": h for k in range(cfg.distill.demos_per_task)})
    return out


def write_chunk(out: Path, items, part: dict, fps: int, fingerprints: dict[str, str] | None = None) -> None:
    """Rank 0: one chunk's latents file, its videos, then its index rows."""
    from safetensors.torch import save_file

    chunk, scores = part["chunk"], part["scores"]
    # named by the first demonstration's id (not its position: a task file that gained rows shifts those), and
    # never over an existing file, whose rows the index may still reference
    stem = re.sub(r"[^\w.-]", "_", f"chunk{chunk[0][0]}_{items[chunk[0][1]].id}")
    name, n = f"latents/{stem}.safetensors", 1
    while (out / name).exists():
        name, n = f"latents/{stem}~{n}.safetensors", n + 1
    (out / "latents").mkdir(parents=True, exist_ok=True)
    save_file({"latents": part["latents"]}, str(out / name))
    # the videos before the index rows: a row marks its demonstration done, so a crash in between lost its videos
    for k, video in part["videos"].items():
        write_mp4(video, out / "videos" / f"demo{k:04d}.mp4", fps)
        contact_sheet(video, out / "videos" / f"demo{k:04d}.png")
    rows = [{"id": f"{items[i].id}#{j}", "item_id": items[i].id, "file": name, "row": r,
             "scores": {q: (None if np.isnan(v[r]) else float(v[r])) for q, v in scores.items()},
             "fingerprint": (fingerprints or {}).get(f"{items[i].id}#{j}")}
            for r, (j, i) in enumerate(chunk)]  # fmt: skip
    append_jsonl(out / "index.jsonl", rows)


def finished_demos(out: Path, fingerprints: dict[str, str] | None = None) -> set[str]:
    """Ids of the demonstrations in ``out/index.jsonl`` whose latents file is there. Rows whose file is
    missing (lost, or never synced before a crash) are removed from the index (rewritten atomically), so that
    those demonstrations are made again and the index never points at nothing. So are rows made with other
    settings than ``fingerprints`` (:func:`demo_fingerprints`) gives for their id, rows with a failed
    judge call (a None score), and rows whose id ``fingerprints`` does not list (a task no longer in the task
    file, a seed beyond distill.demos_per_task)."""
    index = out / "index.jsonl"
    if not index.is_file():
        return set()
    rows = read_jsonl(index, DEMOS_INDEX)
    missing = {r["file"] for r in rows if not (out / r["file"]).is_file()}
    fps = fingerprints or {}
    # rows without a fingerprint (written before it was stored) cannot be checked: kept
    stale = [r for r in rows if r.get("fingerprint") and r["id"] in fps and r["fingerprint"] != fps[r["id"]]]
    if missing:
        log.warning("%s: %d row(s) point at missing latents files (%s); making them again", index,
                    sum(r["file"] in missing for r in rows), sorted(missing)[0])  # fmt: skip
    if stale:
        log.warning("%s: %d row(s) made with other settings (task text, seed, sampling, precision, Demonstrator "
                    "or judge); making them again", index, len(stale))  # fmt: skip
    # a task file that lost rows (or a smaller distill.demos_per_task): their demonstrations stayed in the
    # index, and off-policy distill failed on them after loading the models
    extra = [r for r in rows if fingerprints is not None and r["id"] not in fps]
    if extra:
        log.warning("%s: %d row(s) of tasks not in the task file or beyond distill.demos_per_task; dropping "
                    "them from the index", index, len(extra))  # fmt: skip
    # a failed judge call (None) was kept for good: a rerun with the judge back said "0 new demonstrations", and
    # filtered SFT counted them as failures
    dropped = {r["id"] for r in extra}
    unjudged = [r for r in rows if any(v is None for v in r["scores"].values()) and r not in stale
                and r["id"] not in dropped]  # fmt: skip
    if unjudged:
        log.warning("%s: %d row(s) the judge did not score; making them again", index, len(unjudged))
    stale += unjudged + extra
    if missing or stale:
        drop = {r["id"] for r in stale}
        rows = [r for r in rows if r["file"] not in missing and r["id"] not in drop]
        rewrite_jsonl(index, rows)
    return {r["id"] for r in rows}


def demonstrate(cfg: JobConfig, out: Path) -> int:
    """Sample, judge and store the missing demonstrations; returns how many were written.

    With several ranks, round t gives chunk t * world + rank to each rank; rank 0 gathers the round's
    latents, scores and videos and writes them in chunk order (the files a single process writes)."""
    info = dist_info(cfg)
    items = load_items(tasks_path(cfg))
    fingerprints = demo_fingerprints(cfg, items)
    done = broadcast_from_main(
        finished_demos(out, fingerprints) if info.is_main else None, "demonstrate: done"
    )
    todo = [(j, i) for j in range(cfg.distill.demos_per_task) for i in range(len(items))
            if f"{items[i].id}#{j}" not in done]  # fmt: skip
    if not todo:
        return 0
    kit, judge = build_kit(cfg), BatchedJudge(cfg)
    table = kit.encode_items(items)
    model = load_for_sampling(kit, cfg, "")
    B, W = cfg.eval.batch_size, info.world_size
    chunks = [todo[s : s + B] for s in range(0, len(todo), B)]
    for t in progress(range(0, len(chunks), W), desc="demonstrate", total=-(-len(chunks) // W)):
        k = t + info.rank
        mine = chunks[k] if k < len(chunks) else []
        with torch.no_grad():
            part = demonstrate_chunk(kit, model, table, judge, items, cfg, mine, len(done) + k * B)
        gathered = gather_to_main(part, "demonstrate: gather chunk")
        for p in gathered or []:
            if p["chunk"]:
                write_chunk(out, items, p, kit.fps, fingerprints)
    return len(todo)


def validate(cfg: JobConfig) -> None:
    """The inputs, checked before any model is loaded: a ConfigError naming the key."""
    check_run(cfg)
    check_model(cfg)
    check_judge(cfg)
    check_tasks(tasks_path(cfg), "distill.tasks")
    # 0 made nothing and then failed reading the index it never wrote (a traceback about a "task file")
    if cfg.distill.demos_per_task < 1:
        raise ConfigError(
            f"config key 'distill.demos_per_task': expected >= 1, got {cfg.distill.demos_per_task}"
        )
    # a file there, or an index that is not one, failed with a traceback in run
    out = demos_path(cfg)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"distill.demos: '{out}' is not a folder")
    if (out / "index.jsonl").is_file():
        rows = _as_config_error("distill.demos", read_jsonl, out / "index.jsonl", DEMOS_INDEX)
        for i, r in enumerate(rows):
            if not (isinstance(r, dict) and {"id", "file", "scores"} <= r.keys()):
                raise ConfigError(f"distill.demos: '{out / 'index.jsonl'}' row {i + 1} is not a row of a "
                                  "demonstrations index (id, item_id, file, row, scores)")  # fmt: skip


def demos_path(cfg: JobConfig) -> Path:
    """``distill.demos`` or ``<run>/demos`` (not created)."""
    return Path(cfg.distill.demos) if cfg.distill.demos else run_path(cfg) / "demos"


def run(cfg: JobConfig) -> Path:
    """Write the demonstrations folder; returns its path (once rank 0 has written it)."""
    out = demos_path(cfg)
    if dist_info(cfg).is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out)
    n = demonstrate(cfg, out)
    if dist_info(cfg).is_main:
        rows = read_jsonl(out / "index.jsonl", DEMOS_INDEX, "recipes/demonstrate.py")
        ok = sum(1 for r in rows if (r["scores"].get("task") or 0.0) >= cfg.distill.filter_threshold)
        log.info("%d new demonstrations; %d of %d solve their task (Task >= %.2f)", n, ok, len(rows),
                 cfg.distill.filter_threshold)  # fmt: skip
    barrier("demonstrate: demonstrations written")
    return out


def main(argv: list[str] | None = None) -> None:
    run(config_main(JobConfig, argv, description=__doc__, validate=validate))


if __name__ == "__main__":
    main()
    end_process()  # a torchrun worker leaves without interpreter finalisation (see engine.dist)
