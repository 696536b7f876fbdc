"""Encode a video/image dataset once: VAE latents (clip + first frame) and text embeddings, sharded.

    python recipes/precompute.py --config C.toml --data.manifest data.jsonl --data.cache_dir cache/

Reads ``data.manifest`` with :class:`engine.data.VideoDataset` (decoder, frames, fps, size and
buckets from the ``data`` section), encodes with the configured model's encoders (the toy world's
exact latent map and text encoder for ``model.flavour = "toy"``, else ``models.encoders`` from the
diffusers folder ``model.pretrained``), and writes ``data.cache_dir`` (layout in engine/data/cache.py).
Rerunning resumes: finished shards are kept, an interrupted or corrupt one is encoded again. Files
and rows that cannot be used are listed in ``<cache_dir>/quarantine.jsonl``. A training script of your
own reads the cache with :class:`engine.data.cache.LatentCacheDataset` (batched by
:class:`engine.data.BatchLoader`), without loading any encoder. The WMSD recipes do not read it:
distill and rl train on-policy from scene images and tasks, off-policy SFT reads demonstrate's latents.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python recipes/precompute.py` from anywhere
    sys.path.insert(0, str(REPO))

from engine.config import ConfigError, JobConfig, config_main, save_config  # noqa: E402
from engine.data import VideoDataset  # noqa: E402
from engine.data.cache import LatentCacheWriter, sha256_file  # noqa: E402
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


def _is_toy(cfg: JobConfig) -> bool:
    return cfg.model.family == "wan" and cfg.model.flavour == "toy"


# the sub-folders of model.pretrained that models.encoders.load_encoders reads (the DiT's transformer/ is not)
ENCODER_FOLDERS = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def encoders_id(cfg: JobConfig) -> list:
    """The encoders' files as a fingerprint entry (recipes.common.files_id: path, size, mtime): weights
    replaced at the same path make another cache. The toy world: its text encoder's file (the random one
    drawn from run.seed when none is shipped)."""
    from recipes.common import TOY_ASSETS, files_id

    if _is_toy(cfg):
        f = Path(cfg.world.demonstrator or TOY_ASSETS) / "text_encoder.safetensors"
        return ["toy", files_id(f) if f.is_file() else f"random text encoder, run.seed {cfg.run.seed}"]
    base = Path(cfg.model.pretrained)
    files = sorted(
        f for d in ENCODER_FOLDERS if (base / d).is_dir() for f in (base / d).rglob("*") if f.is_file()
    )
    return [cfg.model.family, str(base), [files_id(f) for f in files]]


def _vae_temporal_compression(folder: Path) -> int | None:
    """The VAE's frame compression from vae/config.json, as models.encoders computes it (None: unknown)."""
    import json

    try:
        c = json.loads((folder / "vae" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if "temperal_downsample" in c:  # diffusers' spelling (Wan)
        return 2 ** sum(bool(x) for x in c["temperal_downsample"])
    return c.get("temporal_compression_ratio")


def validate(cfg: JobConfig) -> None:
    """The inputs, checked before any encoder is loaded: a ConfigError naming the key."""
    from engine.dist import resolve_device
    from recipes.common import check_model, check_writable_folder

    d = cfg.data
    for key, value, what in (
        ("data.manifest", d.manifest, "JSONL"),
        ("data.cache_dir", d.cache_dir, "output folder"),
    ):
        if not value:
            raise ConfigError(f"{key} is empty; set --{key} ({what})")
    if Path(d.manifest).is_dir():
        raise ConfigError(f"data.manifest: '{d.manifest}' is a folder; expected a JSONL manifest file")
    if not Path(d.manifest).is_file():
        raise ConfigError(f"data.manifest: '{d.manifest}' does not exist (expected a JSONL manifest)")
    if d.root and not Path(d.root).is_dir():
        raise ConfigError(f"data.root: folder '{d.root}' does not exist")
    if Path(d.cache_dir).exists() and not Path(d.cache_dir).is_dir():
        raise ConfigError(f"data.cache_dir: '{d.cache_dir}' is not a folder")
    # one under a file, or in a folder it cannot write to, failed with a traceback once the encoders were loaded
    check_writable_folder(Path(d.cache_dir), "data.cache_dir", "cache folder")
    sizes = (("data.num_frames", d.num_frames), ("data.height", d.height), ("data.width", d.width),
             ("data.shard_size", d.shard_size), ("data.encode_batch", d.encode_batch),
             ("data.bucket_multiple", d.bucket_multiple))  # fmt: skip
    for key, v in sizes:
        if v < 1:
            raise ConfigError(f"config key '{key}': expected >= 1, got {v}")
    if d.num_workers < 0:
        raise ConfigError(f"config key 'data.num_workers': expected >= 0 (0 = decode in this process), got "
                          f"{d.num_workers}")  # fmt: skip
    if d.fps < 0 or d.max_upscale <= 0:
        raise ConfigError(f"data.fps = {d.fps}, data.max_upscale = {d.max_upscale}: expected fps >= 0 (0 = native), "
                          "max_upscale > 0")  # fmt: skip
    try:
        resolve_device(cfg.run.device)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"run.device: {e}") from None
    if _is_toy(cfg):
        check_model(cfg)
        return
    from models.encoders import ENCODER_FAMILIES

    if cfg.model.family not in ENCODER_FAMILIES:
        raise ConfigError(f"model.family {cfg.model.family!r}: expected one of {sorted(ENCODER_FAMILIES)}")
    folder = Path(cfg.model.pretrained)
    if not cfg.model.pretrained or not folder.is_dir():
        raise ConfigError(f"model.pretrained: {cfg.model.pretrained!r} is not a folder; expected a diffusers pipeline "
                          "folder with vae/, text_encoder/, tokenizer/ (or model.flavour toy)")  # fmt: skip
    missing = [s for s in ENCODER_FOLDERS[:3] if not (folder / s).is_dir()]
    if missing:
        raise ConfigError(f"model.pretrained: '{folder}' lacks the sub-folders {missing}")
    tc = _vae_temporal_compression(folder)
    if tc and (d.num_frames - 1) % tc:
        raise ConfigError(f"data.num_frames = {d.num_frames}: this VAE needs 1 + k * {tc} frames")


def changed_settings(cache: Path, fingerprint: dict, shard_size: int) -> list[str]:
    """The fingerprint keys (and shard_size) in which an existing cache's index.json differs from this run
    (LatentCacheWriter refuses to resume such a cache); [] for a new or unreadable one (the writer reports it)."""
    import json

    try:
        index = json.loads((cache / "index.json").read_text())
    except (OSError, ValueError):
        return []
    old = index.get("fingerprint") or {}
    changed = [k for k in fingerprint if old.get(k) != json.loads(json.dumps(fingerprint[k]))]
    return changed + (["shard_size"] if index.get("shard_size") != shard_size else [])


def main(argv: list[str] | None = None) -> dict:
    from engine.dist import resolve_device

    cfg = config_main(JobConfig, argv, description=__doc__, validate=validate)
    d = cfg.data
    device = resolve_device(cfg.run.device)  # "cuda" without a GPU fell back to the CPU without a word
    cache = Path(d.cache_dir)
    # the manifest is read and an existing cache compared before the encoders load: a manifest without a
    # usable row and a cache of other settings failed with a traceback only after that
    try:
        ds = VideoDataset.from_config(d, quarantine=cache / "quarantine.jsonl", seed=cfg.run.seed)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(str(e)) from None
    # every setting that changes what a shard holds: resuming with another value must not mix two caches
    fingerprint = {
        "manifest": str(Path(d.manifest).resolve()), "root": str(Path(d.root).resolve()) if d.root else "",
        "manifest_sha256": sha256_file(d.manifest),  # captions edited in place kept their old embeddings
        "num_frames": d.num_frames, "height": d.height, "width": d.width, "fps": d.fps,
        "aspect_buckets": d.aspect_buckets, "bucket_multiple": d.bucket_multiple, "max_upscale": d.max_upscale,
        "buckets": [list(b) for b in ds.buckets],  # the sizes themselves: make_buckets may change between versions
        "clip_start": d.clip_start, "seed": cfg.run.seed if d.clip_start == "random" else None,
        "model": encoders_id(cfg),  # by the files' identity: new weights at the same path are another cache
        # the encoders run in it (the toy world's exact maps do not)
        "param_dtype": None if _is_toy(cfg) else cfg.precision.param_dtype,
    }  # fmt: skip
    changed = changed_settings(cache, {"text_fields": list(d.text_fields), **fingerprint}, d.shard_size)
    if changed:
        raise ConfigError(f"data.cache_dir: '{cache}' holds a cache made with other settings (fingerprint keys that "
                          f"differ: {', '.join(changed)}); use another data.cache_dir or delete this one")  # fmt: skip
    vae, text = build_encoders(cfg, device)
    tc = vae.temporal_compression
    if (d.num_frames - 1) % tc:
        raise SystemExit(f"error: data.num_frames {d.num_frames}: this VAE needs 1 + k * {tc} frames")
    writer = LatentCacheWriter(
        cache, vae=vae, text_encoder=text, text_fields=d.text_fields, shard_size=d.shard_size,
        batch_size=d.encode_batch, fingerprint=fingerprint, num_workers=d.num_workers,
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
    try:
        main()
    except ConfigError as e:  # what main finds in the manifest and the cache: one line, as validate's errors
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    end_process()  # a torchrun worker leaves without interpreter finalisation (see engine.dist)
