"""Propose tasks: scene images -> tasks.jsonl rows {id, image, task, solution, meta}.

    python recipes/propose.py --config recipes/configs/wmsd_toy.toml          # toy scenes, oracle proposer
    python recipes/propose.py --config C.toml --data.manifest images.jsonl    # rows {"image": path}

Images come from ``data.manifest`` (JSONL rows with an ``image`` path, relative to ``data.root`` or
the manifest's folder), or, when it is empty, from ``world.num_scenes`` toy scenes drawn from
``world.seed`` (rendered into <run>/images/). The proposer is the judge's VLM backend (the oracle on
the toy world) and writes ``distill.pairs_per_image`` (task, solution) pairs per image. Rows are
appended per chunk of images; a rerun skips images that already have rows (resume). Runs on rank 0
only under torchrun.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from engine.config import JobConfig, config_main, save_config  # noqa: E402
from engine.log import get_logger, progress, rank  # noqa: E402
from recipes.common import append_jsonl, build_proposer, load_image, read_jsonl, run_dir, save_image  # noqa: E402

log = get_logger("propose")
CHUNK = 16


def toy_scene_images(seed: int, n: int, folder: Path) -> list[tuple[str, Path]]:
    """``n`` toy scenes from ``seed`` rendered as first-frame PNGs into ``folder``: (image id, path)."""
    from engine.world.scene import random_scene, render_one

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        scene = random_scene(rng)
        path = folder / f"scene{seed}_{i:05d}.png"
        if not path.is_file():
            save_image(render_one(scene, None)[0], path)
        out.append((path.stem, path))
    return out


def manifest_images(manifest: str, root: str) -> list[tuple[str, Path]]:
    """Image rows of a JSONL manifest -> (image id, absolute path)."""
    base = Path(root) if root else Path(manifest).parent
    out = []
    for i, row in enumerate(read_jsonl(manifest)):
        if "image" not in row:
            raise ValueError(f"{manifest}: row {i + 1} has no 'image' field; expected {{\"image\": path}}")
        path = Path(row["image"]) if Path(row["image"]).is_absolute() else base / row["image"]
        out.append((str(row.get("id", path.stem)), path))
    return out


def propose(proposer, images: list[tuple[str, Path]], out: Path, n: int) -> int:
    """Propose ``n`` pairs per image into ``out`` (appending; images with rows are skipped). -> rows written."""
    done = {r["meta"]["image_id"] for r in read_jsonl(out)} if out.is_file() else set()
    todo = [(i, p) for i, p in images if i not in done]
    if done:
        log.info("resuming: %d of %d images already proposed", len(images) - len(todo), len(images))
    written, empty = 0, []
    chunks = [todo[s : s + CHUNK] for s in range(0, len(todo), CHUNK)]
    for chunk in progress(chunks, desc="propose", total=len(chunks)):
        pairs = asyncio.run(proposer.propose([load_image(str(p)) for _, p in chunk], n))
        rows = []
        for (image_id, path), image_pairs in zip(chunk, pairs):
            if not image_pairs:
                empty.append(str(path))
            rel = path.relative_to(out.parent) if path.is_relative_to(out.parent) else path
            for j, pair in enumerate(image_pairs):
                rows.append({"id": f"{image_id}-p{j}", "image": str(rel), "task": pair.task,
                             "solution": pair.solution, "meta": {"image_id": image_id}})  # fmt: skip
        append_jsonl(out, rows)
        written += len(rows)
    if empty:  # one line, not one per image: scenes with nothing to do are normal on the toy world
        log.warning(
            "%d of %d images got no valid pair from the proposer (e.g. %s)", len(empty), len(todo), empty[0]
        )
    return written


def run(cfg: JobConfig) -> Path:
    """Write <run>/tasks.jsonl (or ``distill.tasks``); returns its path."""
    out_dir = run_dir(cfg)
    out = Path(cfg.distill.tasks) if cfg.distill.tasks else out_dir / "tasks.jsonl"
    if rank() != 0:
        return out
    save_config(cfg, out_dir)
    if cfg.data.manifest:
        images = manifest_images(cfg.data.manifest, cfg.data.root)
    else:
        images = toy_scene_images(cfg.world.seed, cfg.world.num_scenes, out_dir / "images")
    n = propose(build_proposer(cfg), images, out, cfg.distill.pairs_per_image)
    log.info("proposed %d new pairs for %d images -> %s", n, len(images), out)
    return out


def main(argv: list[str] | None = None) -> None:
    run(config_main(JobConfig, argv, description=__doc__))


if __name__ == "__main__":
    main()
