"""Propose tasks: scene images -> tasks.jsonl rows {id, image, task, solution, meta}.

    python recipes/propose.py --config recipes/configs/wmsd_toy.toml          # toy scenes, oracle proposer
    python recipes/propose.py --config C.toml --data.manifest images.jsonl    # rows {"image": path}

Images come from ``data.manifest`` (JSONL rows with an ``image`` path, relative to ``data.root`` or
the manifest's folder), or, when it is empty, from ``world.num_scenes`` toy scenes drawn from
``world.seed`` (rendered into <run>/images/). The proposer is the judge's VLM backend (the oracle on
the toy world) and writes ``distill.pairs_per_image`` (task, solution) pairs per image. Rows are
appended per chunk of images; a rerun skips images that already have rows (resume). Under
``torchrun --nproc_per_node N`` the chunks are dealt round-robin to the ranks, and rank 0 gathers each
round's rows (torch.distributed gather_object) and appends them in chunk order: the same rows as one
process. The images must be readable by every rank (a shared file system).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from engine.config import ConfigError, JobConfig, config_main, save_config  # noqa: E402
from engine.dist import barrier, broadcast_from_main, end_process, gather_to_main  # noqa: E402
from engine.log import get_logger, progress  # noqa: E402
from recipes.common import (  # noqa: E402
    _as_config_error,
    append_jsonl,
    build_proposer,
    check_judge,
    check_run,
    dist_info,
    image_problem,
    load_image,
    read_jsonl,
    rewrite_jsonl,
    run_dir,
    tasks_path,
)

log = get_logger("propose")
CHUNK = 16


def toy_scene_images(seed: int, n: int, folder: Path) -> list[tuple[str, Path]]:
    """``n`` toy scenes from ``seed`` rendered as first-frame PNGs into ``folder``: (image id, path)."""
    from engine.world.scene import SEED_TAG_PROPOSE, random_scene, render_one

    rng = np.random.default_rng([SEED_TAG_PROPOSE, seed])
    out = []
    for i in range(n):
        scene = random_scene(rng)
        path = folder / f"scene{seed}_{i:05d}.png"
        image = render_one(scene, None)[0]
        # a run killed mid-save left an empty or cut PNG that every resume failed to read: rewrite it, atomically
        if not _same_image(path, image):
            from PIL import Image

            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            Image.fromarray(image).save(tmp, format="PNG")
            os.replace(tmp, path)
        out.append((path.stem, path))
    return out


def _same_image(path: Path, image: np.ndarray) -> bool:
    """``path`` is a readable image equal to ``image``."""
    try:
        return path.is_file() and np.array_equal(load_image(str(path)), image)
    except OSError:  # PIL's UnidentifiedImageError and a truncated file are OSErrors
        return False


def manifest_images(manifest: str, root: str) -> list[tuple[str, Path]]:
    """Image rows of a JSONL manifest -> (image id, absolute path)."""
    if not Path(manifest).is_file():
        raise FileNotFoundError(
            f"data.manifest '{manifest}' does not exist (expected a JSONL file of {{\"image\": path}} rows)"
        )
    base = Path(root) if root else Path(manifest).parent
    out, first_row = [], {}
    for i, row in enumerate(read_jsonl(manifest)):
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise ValueError(f"{manifest}: row {i + 1} has no 'image' field; expected {{\"image\": path}}")
        path = Path(row["image"]) if Path(row["image"]).is_absolute() else base / row["image"]
        # a null or empty id (a spreadsheet's blank cell) is none: it was the id "None" (or ""), shared by such rows
        image_id = path.stem if row.get("id") is None or row.get("id") == "" else str(row["id"])
        # rows and resume are keyed by it: one image's rows would pass for another's
        if image_id in first_row:
            j = first_row[image_id]
            raise ValueError(
                f"{manifest}: rows {j + 1} and {i + 1} have the same image id {image_id!r} ({out[j][1]}, {path}); "
                "give each row a unique 'id' field (without one, the id is the file name without its extension)"
            )
        first_row[image_id] = i
        out.append((image_id, path))
    return out


def propose_chunk(
    proposer, chunk: list[tuple[str, Path]], folder: Path, n: int
) -> tuple[list[dict], list[str]]:
    """Rows for one chunk of images (paths relative to ``folder`` when inside it), and the images that
    got no pair."""
    if not chunk:  # a rank without a chunk in the last round
        return [], []
    pairs = asyncio.run(proposer.propose([load_image(str(p)) for _, p in chunk], n))
    rows, empty = [], []
    # absolute first: a path relative to the working directory would be read against the task file's folder
    folder = Path(os.path.abspath(folder))
    for (image_id, path), image_pairs in zip(chunk, pairs):
        if not image_pairs:
            empty.append(str(path))
        path = Path(os.path.abspath(path))
        rel = path.relative_to(folder) if path.is_relative_to(folder) else path
        # "pairs": how many rows make this image complete (resume); "asked": the n they were proposed for
        for j, pair in enumerate(image_pairs):
            rows.append({"id": f"{image_id}-p{j}", "image": str(rel), "task": pair.task, "solution": pair.solution,
                         "meta": {"image_id": image_id, "pairs": len(image_pairs), "asked": n}})  # fmt: skip
    return rows, empty


def check_asked(out: Path, rows: list[dict], n: int | None) -> None:
    """Rows of ``out`` proposed for another number of pairs per image than ``n``: a ValueError naming both;
    so is a row propose did not write (no meta.image_id to resume by; a KeyError before)."""
    for i, r in enumerate(rows):
        if not (isinstance(r, dict) and isinstance(r.get("meta"), dict) and "image_id" in r["meta"]):
            raise ValueError(f"{out}: row {i + 1} has no meta.image_id: not a task file recipes/propose.py wrote "
                             "(it resumes by image); write to another task file (distill.tasks) or run folder")  # fmt: skip
    # rows written before "asked" was stored cannot be checked
    asked = sorted({r["meta"]["asked"] for r in rows if r["meta"].get("asked") not in (None, n)})
    if n is not None and asked:
        raise ValueError(
            f"{out}: its rows were proposed with distill.pairs_per_image = {', '.join(map(str, asked))}, this "
            f"run asks for {n}; rerun with that value, or write to another task file (distill.tasks) or run folder"
        )


def complete_images(out: Path, n: int | None = None) -> set[str]:
    """Ids of the images whose rows are all in ``out``. Rows of an image cut short by a crash mid-write are
    removed (the file is rewritten without them, atomically), so that the image is proposed again whole. Rows
    proposed for another number of pairs per image than ``n`` are an error (a rerun with another
    distill.pairs_per_image kept the old count and said every image was done)."""
    if not out.is_file():
        return set()
    rows = read_jsonl(out)
    check_asked(out, rows, n)
    count = Counter(r["meta"]["image_id"] for r in rows)
    short = {
        r["meta"]["image_id"]
        for r in rows
        if r["meta"].get("pairs", count[r["meta"]["image_id"]]) != count[r["meta"]["image_id"]]
    }
    if short:
        log.warning("%s: %d image(s) with only part of their rows (interrupted write); proposing them again",
                    out, len(short))  # fmt: skip
        rewrite_jsonl(out, (r for r in rows if r["meta"]["image_id"] not in short))
    return set(count) - short


def propose(
    proposer, images: list[tuple[str, Path]], out: Path, n: int, rank: int = 0, world_size: int = 1
) -> int:
    """Propose ``n`` pairs per image into ``out`` (appending; images with rows are skipped). -> rows written.

    With several ranks, round t gives chunk t * world + rank to each rank; rank 0 gathers the round's
    rows and appends them in chunk order (the file a single process would write, up to resume points).
    Every rank must pass the same ``images`` and see the same ``out``; rank 0 decides what is left."""
    done = complete_images(out, n) if rank == 0 else set()
    todo = broadcast_from_main([(i, p) for i, p in images if i not in done], "propose: images left")
    if done:
        log.info("resuming: %d of %d images already proposed", len(images) - len(todo), len(images))
    written, empty = 0, []
    chunks = [todo[s : s + CHUNK] for s in range(0, len(todo), CHUNK)]
    rounds = [chunks[t : t + world_size] for t in range(0, len(chunks), world_size)]
    for chunk_round in progress(rounds, desc="propose", total=len(rounds)):
        mine = chunk_round[rank] if rank < len(chunk_round) else []
        gathered = gather_to_main(propose_chunk(proposer, mine, out.parent, n), "propose: gather rows")
        if gathered is None:
            continue
        rows = [row for rank_rows, _ in gathered for row in rank_rows]
        empty += [path for _, rank_empty in gathered for path in rank_empty]
        append_jsonl(out, rows)
        written += len(rows)
    if empty:  # one line, not one per image: scenes with nothing to do are normal on the toy world
        # why: an endpoint that was down and answers the VLM wrote that all failed validation looked the same
        stats = getattr(proposer, "stats", None)
        who = f"rank {rank}'s proposer" if world_size > 1 else "proposer"
        why = (f"; {who}: {stats.requests} calls, failed (no answer) {stats.failed_calls}, rejected blocks "
               f"{stats.reasons or 0}" if stats is not None else "")  # fmt: skip
        log.warning(
            "%d of %d images got no valid pair from the proposer (e.g. %s)%s",
            len(empty),
            len(todo),
            empty[0],
            why,
        )
    return written


def check_manifest(cfg: JobConfig) -> None:
    """``data.manifest`` (when set) parses, its ids are unique and every image exists: each failed with a
    traceback in run."""
    m = cfg.data.manifest
    if not m:
        return
    if not Path(m).is_file():
        raise ConfigError(f"data.manifest: '{m}' does not exist (expected a JSONL of images)")
    for image_id, path in _as_config_error("data.manifest", manifest_images, m, cfg.data.root):
        if why := image_problem(path):
            raise ConfigError(f"data.manifest: '{m}' image {image_id!r}: {why}")


def validate(cfg: JobConfig) -> None:
    """The inputs, checked before the proposer is built: a ConfigError naming the key."""
    check_run(cfg)
    check_judge(cfg)
    check_manifest(cfg)
    # a malformed task file to resume, or one of another pairs_per_image, failed with a traceback in run
    out = tasks_path(cfg)
    if out.is_dir():
        raise ConfigError(f"distill.tasks: '{out}' is a folder; expected the path of a JSONL task file")
    if out.is_file():
        rows = _as_config_error("distill.tasks", read_jsonl, out)
        _as_config_error("distill.tasks", check_asked, out, rows, cfg.distill.pairs_per_image)
    # 0 (or fewer) wrote an empty task file and exited 0
    sizes = [("distill.pairs_per_image", cfg.distill.pairs_per_image)]
    if not cfg.data.manifest:
        sizes.append(("world.num_scenes", cfg.world.num_scenes))
    for key, v in sizes:
        if v < 1:
            raise ConfigError(f"config key '{key}': expected >= 1, got {v}")


def run(cfg: JobConfig) -> Path:
    """Write <run>/tasks.jsonl (or ``distill.tasks``); returns its path (once rank 0 has written it)."""
    out_dir = run_dir(cfg)
    out = tasks_path(cfg)
    info = dist_info(cfg)
    images = None
    if info.is_main:
        save_config(cfg, out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)  # a distill.tasks in a new folder failed after a chunk
        if cfg.data.manifest:
            images = manifest_images(cfg.data.manifest, cfg.data.root)
        else:
            images = toy_scene_images(cfg.world.seed, cfg.world.num_scenes, out_dir / "images")
    images = broadcast_from_main(images, "propose: image list")
    n = propose(build_proposer(cfg), images, out, cfg.distill.pairs_per_image, info.rank, info.world_size)
    if info.is_main:
        log.info("proposed %d new pairs for %d images -> %s", n, len(images), out)
    barrier("propose: tasks written")
    return out


def main(argv: list[str] | None = None) -> None:
    run(config_main(JobConfig, argv, description=__doc__, validate=validate))


if __name__ == "__main__":
    main()
    end_process()  # a torchrun worker leaves without interpreter finalisation (see engine.dist)
