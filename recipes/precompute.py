"""Encode a video/image dataset once: VAE latents (clip + first frame) and text embeddings, sharded.

    python recipes/precompute.py --config C.toml --data.manifest data.jsonl --data.cache_dir cache/

Reads ``data.manifest`` with :class:`engine.data.VideoDataset` (decoder, frames, fps, size and
buckets from the ``data`` section), encodes with the configured model's encoders (the toy world's
exact latent map and text encoder for ``model.flavour = "toy"``, else ``models.encoders`` from the
diffusers folder ``model.pretrained``), and writes ``data.cache_dir`` (layout in engine/data/cache.py).
Rerunning resumes: finished shards are kept, an interrupted or corrupt one is encoded again. Files
and rows that cannot be used are listed in ``<cache_dir>/quarantine.jsonl``. Training then reads the
cache with :class:`engine.data.cache.LatentCacheDataset`, without loading any encoder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python recipes/precompute.py` from anywhere
    sys.path.insert(0, str(REPO))

from engine.config import JobConfig, config_main, save_config  # noqa: E402
from engine.data import VideoDataset  # noqa: E402
from engine.data.cache import LatentCacheWriter  # noqa: E402
from engine.dist import end_process  # noqa: E402
from engine.log import get_logger  # noqa: E402

log = get_logger("precompute")


class _ToyVAE:
    """The toy world's latent map behind the cache's VideoEncoder protocol."""

    temporal_compression = 1

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        from engine.world import latent

        pixels = ((video.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return latent.encode(pixels.permute(0, 2, 3, 4, 1))  # (B, 3, T, H, W) -> (B, T, H, W, 3)


class _OnDevice:
    """Runs a models.encoders VAE on ``device``; videos come from the CPU data pipeline."""

    def __init__(self, module, device: torch.device):
        self.module, self.device = module, device
        self.temporal_compression = getattr(module, "temporal_compression", 1)

    @torch.no_grad()
    def encode(self, x):
        return self.module.encode(x.to(self.device) if isinstance(x, torch.Tensor) else x)


def build_encoders(cfg: JobConfig, device: torch.device):
    """(vae, text_encoder) for ``cfg.model``, frozen, on ``device``."""
    if cfg.model.family == "wan" and cfg.model.flavour == "toy":
        from recipes.common import frozen, load_toy_demonstrator

        text = frozen(load_toy_demonstrator(cfg).text).to(device)
        return _ToyVAE(), text
    if not cfg.model.pretrained:
        raise SystemExit(
            "error: model.pretrained must name a diffusers pipeline folder (or use model.flavour toy)"
        )
    from engine.parallel import DTYPES
    from models.encoders import load_encoders

    enc = load_encoders(cfg.model.family, cfg.model.pretrained, dtype=DTYPES[cfg.precision.param_dtype])
    for m in (enc.vae, enc.text):
        m.eval().requires_grad_(False).to(device)
    return _OnDevice(enc.vae, device), enc.text  # the text encoder takes strings and runs on its own device


def main(argv: list[str] | None = None) -> dict:
    cfg = config_main(JobConfig, argv, description=__doc__)
    d = cfg.data
    if not d.manifest or not d.cache_dir:
        raise SystemExit("error: set --data.manifest (JSONL) and --data.cache_dir (output folder)")
    device = torch.device("cuda" if cfg.run.device != "cpu" and torch.cuda.is_available() else "cpu")
    vae, text = build_encoders(cfg, device)
    tc = vae.temporal_compression
    if (d.num_frames - 1) % tc:
        raise SystemExit(f"error: data.num_frames {d.num_frames}: this VAE needs 1 + k * {tc} frames")
    cache = Path(d.cache_dir)
    ds = VideoDataset.from_config(d, quarantine=cache / "quarantine.jsonl", seed=cfg.run.seed)
    # every setting that changes what a shard holds: resuming with another value must not mix two caches
    fingerprint = {
        "manifest": str(Path(d.manifest).resolve()), "root": str(Path(d.root).resolve()) if d.root else "",
        "num_frames": d.num_frames, "height": d.height, "width": d.width, "fps": d.fps,
        "aspect_buckets": d.aspect_buckets, "bucket_multiple": d.bucket_multiple, "max_upscale": d.max_upscale,
        "clip_start": d.clip_start, "seed": cfg.run.seed if d.clip_start == "random" else None,
        "model": f"{cfg.model.family}/{cfg.model.flavour}/{cfg.model.pretrained}",
        # the encoders run in it (the toy world's exact maps do not)
        "param_dtype": None if isinstance(vae, _ToyVAE) else cfg.precision.param_dtype,
    }  # fmt: skip
    writer = LatentCacheWriter(
        cache, vae=vae, text_encoder=text, text_fields=d.text_fields, shard_size=d.shard_size,
        batch_size=d.encode_batch, fingerprint=fingerprint,
    )  # fmt: skip
    save_config(cfg, cache)
    index = writer.write(ds)
    items = sum(s["items"] for s in index["shards"].values())
    log.info(
        "precompute: %d items in %d shards, %d skipped -> %s",
        items,
        len(index["shards"]),
        len(ds.skipped),
        cache,
    )
    return index


if __name__ == "__main__":
    main()
    end_process()  # a torchrun worker leaves without interpreter finalisation (see engine.dist)
