"""Demonstrate: the Demonstrator's videos for the proposed tasks (off-policy baseline data, inspection).

    python recipes/demonstrate.py --config recipes/configs/wmsd_toy.toml

For every item of the task file (``distill.tasks``, "" = <run>/tasks.jsonl) and each of
``distill.demos_per_task`` seeds, the Demonstrator samples a video from (I, solution) (ODE,
flow.num_steps), the judge scores it against the task (Task / Agent / Consistency), and the latent
is stored. Output in <run>/demos/ (or ``distill.demos``): ``latents/*.safetensors`` (one file per
chunk), ``index.jsonl`` (one row per demonstration: id, item_id, file, row, scores), and mp4 +
contact sheet for the first ``eval.write_videos`` demonstrations. A rerun skips demonstrations
already in the index (resume). Runs on rank 0 only under torchrun.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine import flow  # noqa: E402
from engine.config import JobConfig, config_main, save_config  # noqa: E402
from engine.evaluation import item_noise, score_videos  # noqa: E402
from engine.log import get_logger, progress, rank  # noqa: E402
from recipes.common import (  # noqa: E402
    append_jsonl,
    build_judge_backend,
    build_kit,
    finished_ids,
    load_items,
    read_jsonl,
    run_dir,
    save_image,
)

log = get_logger("demonstrate")


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
    rows = read_jsonl(index)
    kept = [r for r in rows if threshold is None or (r["scores"].get("task") or 0.0) >= threshold]
    files: dict[str, torch.Tensor] = {}
    latents = []
    for r in kept:
        if r["file"] not in files:
            files[r["file"]] = load_file(str(folder / r["file"]))["latents"]
        latents.append(files[r["file"]][r["row"]])
    stacked = torch.stack(latents) if latents else torch.empty(0)
    return stacked, [r["item_id"] for r in kept], len(kept), len(rows)


def demonstrate(cfg: JobConfig, out: Path) -> int:
    """Sample, judge and store the missing demonstrations; returns how many were written."""
    from safetensors.torch import save_file

    items = load_items(Path(cfg.distill.tasks) if cfg.distill.tasks else run_dir(cfg) / "tasks.jsonl")
    index = out / "index.jsonl"
    done = finished_ids(index)
    todo = [(j, i) for j in range(cfg.distill.demos_per_task) for i in range(len(items))
            if f"{items[i].id}#{j}" not in done]  # fmt: skip
    if not todo:
        return 0
    kit, judge = build_kit(cfg), build_judge_backend(cfg)
    table = kit.encode_items(items)
    model = kit.load_denoiser("").eval()
    B, written = cfg.eval.batch_size, len(done)
    chunks = [todo[s : s + B] for s in range(0, len(todo), B)]
    for chunk in progress(chunks, desc="demonstrate", total=len(chunks)):
        idx = [i for _, i in chunk]
        noise = torch.stack([item_noise(kit.latent_shape, cfg.run.seed + j, i) for j, i in chunk]).to(
            kit.device
        )
        uncond = table.cond(idx, "empty") if cfg.flow.guidance != 1.0 else None
        x0 = flow.sample(model.predict_velocity, noise, table.cond(idx, "solution"), num_steps=cfg.flow.num_steps,
                         shift=cfg.flow.shift, guidance=cfg.flow.guidance, uncond=uncond).x0  # fmt: skip
        videos = kit.decode(x0).numpy()
        scores = asyncio.run(score_videos(judge, videos, [items[i].task for i in idx]))
        name = f"latents/chunk{chunk[0][0]}_{chunk[0][1]:06d}.safetensors"
        (out / "latents").mkdir(parents=True, exist_ok=True)
        save_file({"latents": x0.float().cpu().contiguous()}, str(out / name))
        rows = [{"id": f"{items[i].id}#{j}", "item_id": items[i].id, "file": name, "row": r,
                 "scores": {q: (None if np.isnan(v[r]) else float(v[r])) for q, v in scores.items()}}
                for r, (j, i) in enumerate(chunk)]  # fmt: skip
        append_jsonl(index, rows)
        for r, video in enumerate(videos):
            if written + r < cfg.eval.write_videos:
                write_mp4(video, out / "videos" / f"demo{written + r:04d}.mp4", kit.fps)
                contact_sheet(video, out / "videos" / f"demo{written + r:04d}.png")
        written += len(chunk)
    return len(todo)


def run(cfg: JobConfig) -> Path:
    """Write the demonstrations folder; returns its path."""
    out = Path(cfg.distill.demos) if cfg.distill.demos else run_dir(cfg) / "demos"
    if rank() != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    n = demonstrate(cfg, out)
    rows = read_jsonl(out / "index.jsonl")
    ok = sum(1 for r in rows if (r["scores"].get("task") or 0.0) >= cfg.distill.filter_threshold)
    log.info("%d new demonstrations; %d of %d solve their task (Task >= %.2f)", n, ok, len(rows),
             cfg.distill.filter_threshold)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    run(config_main(JobConfig, argv, description=__doc__))


if __name__ == "__main__":
    main()
