"""What every WMSD recipe shares: the run folder, task files, and the place that wires models/ into engine/
for the recipes that train and sample (precompute and pretrain import their models/ pieces themselves) —
building the denoiser (Demonstrator / Executor), the text encoder, the latent map, the judge and the
proposer from a :class:`engine.config.JobConfig`.

A :class:`Kit` holds the model-specific pieces a recipe needs:

    kit = build_kit(cfg)                       # text encoder, latent map, how to load a denoiser
    table = kit.encode_items(items)            # encode once: image latents, task and solution texts
    cond = table.cond(idx, "task")             # {"text", "text_lengths", "image_latent", ...} rows idx
    model = kit.load_denoiser(path)            # "" = the Demonstrator; meta=True for the Trainer / teacher
    model = load_for_sampling(kit, cfg, path)  # evaluate / demonstrate: frozen, meta_init honoured
    videos = kit.decode(latents)               # uint8 (B, T, H, W, 3) for the judge and mp4 files

Task files are JSONL rows ``{"id", "image", "task", "solution", "meta"}`` (image relative to the
file's folder). Recipes resume where an interrupted run stopped: propose and demonstrate append rows and
skip what is complete (propose an image with all its rows, demonstrate a demonstration whose latents file
is there), evaluate reuses chunk scores saved with the same settings (a fingerprint) that hold no failed
judge call.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.config import ConfigError, JobConfig
from engine.log import get_logger

REPO = Path(__file__).resolve().parents[1]
TOY_CONFIG = REPO / "recipes" / "configs" / "wmsd_toy.toml"
TOY_ASSETS = REPO / "engine" / "world" / "assets"

log = get_logger("recipes")


# ---------------------------------------------------------------------------------------------
# Run folder, devices, JSONL task files
# ---------------------------------------------------------------------------------------------


def run_path(cfg: JobConfig) -> Path:
    """``<run.out_dir>/<run.name>``, not created (what a recipe's validate may name)."""
    return Path(cfg.run.out_dir) / cfg.run.name


def run_dir(cfg: JobConfig) -> Path:
    """``<run.out_dir>/<run.name>``, created."""
    path = run_path(cfg)
    path.mkdir(parents=True, exist_ok=True)
    return path


def dist_info(cfg: JobConfig):
    """This process's :class:`engine.dist.DistInfo` (process group + mesh under torchrun)."""
    from engine.dist import init_distributed

    return init_distributed(cfg.parallel, cfg.run.device)


def device_of(cfg: JobConfig) -> torch.device:
    """The configured device; "auto" = this rank's CUDA device when there is one, else CPU."""
    return dist_info(cfg).device


def step_generator(cfg: JobConfig, step: int, salt: int = 0) -> torch.Generator:
    """A CPU generator seeded by (run.seed, step, data-parallel rank, salt): a step's draws do not depend on
    history, so a resumed run draws what the uninterrupted run would have; the ranks of a sequence-parallel
    group (``parallel.cp``) draw the same batch."""
    rank = dist_info(cfg).dp_rank
    seed = ((cfg.run.seed * 1_000_003 + step) * 4099 + rank) * 31 + salt
    # salt 31 was the next rank's salt 0 (grad_accum >= 32 drew equal micro-batches on two ranks), rank 4099 the
    # next step's rank 0: those draw from a hash instead (the others keep their draws)
    if not 0 <= salt < 31 or rank >= 4099:
        key = f"{cfg.run.seed}/{step}/{rank}/{salt}".encode()
        seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little")
    # torch takes seeds in [-2**63, 2**64): a run.seed above ~7e7 (a timestamp, 2**31 - 1) overflowed at the
    # first step; the seeds in that range keep their draws
    return torch.Generator().manual_seed(seed if -(2**63) <= seed < 2**64 else seed % 2**64)


def split_micro(batch: dict, n: int) -> list[dict]:
    """Split a batch dict (tensors and nested cond dicts, batch-first) into ``n`` micro-batches."""
    size = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
    if n < 1 or size % n:
        raise ValueError(
            f"batch of {size} rows cannot be split into train.grad_accum={n} equal micro-batches"
        )

    def part(v, i):
        if isinstance(v, dict):
            return {k: part(x, i) for k, x in v.items()}
        return v.chunk(n)[i] if isinstance(v, torch.Tensor) else v

    return [{k: part(v, i) for k, v in batch.items()} for i in range(n)]


def work_logs(model: nn.Module, x: torch.Tensor, cond: dict) -> dict[str, float]:
    """``num_tokens`` and ``num_flops`` (forward) of a batch x (B, C, F, h, w) with the context in ``cond``
    (text, image tokens when present, HunyuanVideo-1.5's glyph tokens): the trainer pops them for tokens/s
    and MFU (engine/trainer.py's loss contract)."""
    pt, ph, pw = model.cfg.patch
    B, _, F, h, w = x.shape
    seq = (F // pt) * (h // ph) * (w // pw)
    ctx = model.flops_context(cond)  # the context predict_velocity runs (padded, trimmed, per-token times)
    return {"num_tokens": B * seq, "num_flops": B * seq * float(model.flops_per_token(seq, **ctx))}


def prepare_teacher(model: nn.Module, cfg: JobConfig) -> nn.Module:
    """The frozen Demonstrator placed like the trainer places the Executor: same device, FP8 backends (linears
    and, with model.attention_precision "fp8", attention, in the same blocks), activation checkpointing off (no
    backward), FSDP2 over the same mesh (its forward all-gathers); a meta-built one
    (``kit.load_denoiser("", meta=True)``) is materialised after sharding, as the trainer does."""
    import dataclasses

    from engine.parallel import is_meta, materialize, parallelize
    from engine.precision import apply_attention_precision, apply_fp8

    info = dist_info(cfg)
    meta = is_meta(frozen(model))  # model.meta_init: shard first, then materialise (rank 0 reads)
    if not meta:
        model.to(info.device)
    apply_fp8(model, cfg.precision)
    # the teacher's forward ran bf16 attention beside an FP8 Executor
    if cfg.model.attention_precision == "fp8":
        apply_attention_precision(model, cfg.model)
    pcfg = dataclasses.replace(cfg.parallel, activation_checkpointing="none")
    model = parallelize(model, pcfg, cfg.precision, info.fsdp_mesh, info.cp_mesh)
    if meta:
        materialize(model, info.device, seed=cfg.run.seed, timeout_s=cfg.parallel.timeout_s)
    return model


def load_for_sampling(kit: Kit, cfg: JobConfig, weights: str) -> nn.Module:
    """The frozen denoiser of the sampling-only recipes (evaluate, demonstrate): ``weights`` ("" = the
    Demonstrator) as a full copy on every rank. Those recipes deal chunks to ranks that sample them
    independently, so the model is not sharded (an FSDP forward is a collective every rank would have to
    join in lockstep). With ``model.meta_init`` it takes the trainer's path, ``kit.load_denoiser(weights,
    meta=True)`` then ``engine.parallel.materialize``: built on the meta device, the files read by rank 0
    alone and the values broadcast: the plain load's values, in the fp32 the meta build keeps (the same
    tensors as the plain load for fp32 files; tested on 2 gloo ranks in tests/test_meta_init.py).
    Either way the parameters are then held in ``precision.param_dtype`` (bf16 halves a 14B model's copy
    to 28 GB; the files' own dtype does not matter), and :func:`sampling_velocity` runs the forwards under
    the matching autocast."""
    from engine.parallel import DTYPES, is_meta, materialize

    model = kit.load_denoiser(weights, meta=cfg.model.meta_init)
    if is_meta(model):
        materialize(model, kit.device, seed=cfg.run.seed, timeout_s=cfg.parallel.timeout_s)
    return frozen(model.to(DTYPES[cfg.precision.param_dtype]))


def sampling_velocity(cfg: JobConfig, model: nn.Module) -> Callable:
    """``model.predict_velocity`` run under the trainer's autocast policy (:func:`model_autocast`), fp32
    out: what the sampling-only recipes call, so a model held in bf16 (``precision.param_dtype``) takes
    the fp32 latents the sampler keeps."""

    def v_fn(x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        with model_autocast(cfg, model):
            return model.predict_velocity(x_t, t, cond).float()

    return v_fn


def model_autocast(cfg: JobConfig, model: nn.Module):
    """The trainer's autocast policy for forwards outside its step (rollouts, teacher targets)."""
    from torch.distributed.fsdp import FSDPModule

    from engine.precision import autocast

    return autocast(device_of(cfg), cfg.precision, isinstance(model, FSDPModule))


def read_jsonl(path: str | Path, what: str = "JSONL file", made_by: str = "") -> list[dict]:
    """Rows of a JSONL file; a missing file is an error that names it as ``what`` and the recipe that makes
    it (``made_by``; every file was called a task file of recipes/propose.py, a demonstrations index too).
    A torn last line (a run killed mid-write: no newline at its end) is dropped with a warning."""
    p = Path(path)
    if not p.is_file():
        hint = f" (run {made_by} first?)" if made_by else ""
        raise FileNotFoundError(f"{what} '{p}' does not exist{hint}")
    rows = []
    # a byte-order mark (Windows editors, spreadsheet exports) made the first row invalid JSON
    text = p.read_text(encoding="utf-8-sig")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # a torn write ends without its newline: a bad last line that has one is the file's own mistake
            if i == len(lines) - 1 and not text.endswith("\n"):
                log.warning("%s: dropping a torn last line (interrupted write)", p)
                continue
            raise ValueError(f"{p}:{i + 1}: not valid JSON: {line[:80]!r}") from None
    return rows


def append_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Append rows (one line each) in one write, flushed and synced to disk. A torn last line that a killed
    run left (no newline at its end; :func:`read_jsonl` drops it) is cut off first: the new rows would be
    glued onto it, and that line, no longer the last, would make the file unreadable."""
    p = Path(path)
    if p.is_file() and p.stat().st_size:
        with open(p, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.seek(0)
                data = f.read()
                f.truncate(data.rfind(b"\n") + 1)
                log.warning("%s: cut a torn last line (interrupted write) before appending", p)
    with open(p, "a") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())


def rewrite_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Replace ``path`` by exactly ``rows`` (one line each), atomically: a crash leaves the old file or the
    new one (resume drops rows this way: an image cut short, a demonstration whose latents are lost)."""
    p = Path(path)
    tmp = p.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(p)


def finished_ids(path: str | Path) -> set[str]:
    """Ids of the rows already written to ``path`` (empty when it does not exist)."""
    return {r["id"] for r in read_jsonl(path)} if Path(path).is_file() else set()


@dataclass
class Item:
    """One (image, task, solution) prompt. ``image`` is an absolute path after :func:`load_items`."""

    id: str
    image: str
    task: str
    solution: str
    meta: dict = field(default_factory=dict)


def load_items(path: str | Path) -> list[Item]:
    """A task file -> items, with image paths resolved against the file's folder; checks the fields."""
    p = Path(path)
    items, first_row = [], {}
    for i, row in enumerate(read_jsonl(p, "task file", "recipes/propose.py")):
        if not isinstance(row, dict):  # a list or a string row failed with an AttributeError
            raise ValueError(f"{p}: row {i + 1} is not a JSON object; expected id, image, task, solution")
        # an id of 0 is an id ("not row.get(k)" called it missing); an empty text is still missing
        missing = [k for k in ("id", "image", "task", "solution") if row.get(k) is None or row.get(k) == ""]
        if missing:
            raise ValueError(f"{p}: row {i + 1} lacks {missing}; expected id, image, task, solution")
        not_text = [k for k in ("image", "task", "solution") if not isinstance(row[k], str)]
        if not_text or not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
            raise ValueError(f"{p}: row {i + 1}: {not_text or ['id']} not text; expected id, image, task, solution "
                             "strings")  # fmt: skip
        # rows are keyed by id (demonstrations, resume): off-policy SFT paired one's videos with the other's prompt
        if row["id"] in first_row:
            raise ValueError(f"{p}: rows {first_row[row['id']] + 1} and {i + 1} have the same id {row['id']!r}; "
                             "expected unique ids")  # fmt: skip
        first_row[row["id"]] = i
        image = Path(row["image"])
        items.append(Item(row["id"], str(image if image.is_absolute() else p.parent / image), row["task"],
                          row["solution"], row.get("meta", {})))  # fmt: skip
    if not items:
        raise ValueError(f"task file '{p}' has no rows")
    return items


def load_image(path: str) -> np.ndarray:
    """An image file -> HxWx3 uint8."""
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"image '{path}' does not exist")
    return np.asarray(Image.open(path).convert("RGB"))


def save_image(array: np.ndarray, path: str | Path) -> None:
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# ---------------------------------------------------------------------------------------------
# Encoded prompts
# ---------------------------------------------------------------------------------------------


@dataclass
class PromptTable:
    """Encoded items, on one device: image latents (N, C, 1, h, w), and per prompt text ("task",
    "solution", and "empty", the unconditional prompt, one row) the kit's ``encode_text`` dict: "text"
    (N, L, D) + "text_lengths" (N,), plus any family-specific entries (HunyuanVideo-1.5: "text_2"
    (N, L2, D2) ByT5 glyph states + "text_2_lengths")."""

    items: list[Item]
    # "image_latent" (N, C, 1, h, w) [+ "image_tokens" (N, 257, D)] [+ "image_condition" (N, C, T, h, w)]
    image: dict[str, torch.Tensor]
    texts: dict[str, dict[str, torch.Tensor]]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def text_len(self) -> int:
        return int(self.texts["task"]["text"].shape[1])

    def cond(self, idx: torch.Tensor | list[int], which: str) -> dict[str, torch.Tensor]:
        """The cond dict of rows ``idx`` with the ``which`` text ("task" | "solution" | "empty")."""
        if which not in self.texts:
            raise ValueError(f"prompt text {which!r}: expected one of {sorted(self.texts)}")
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.image["image_latent"].device)
        if which == "empty":
            text = {k: v.expand(len(idx), *v.shape[1:]) for k, v in self.texts[which].items()}
        else:
            text = {k: v[idx] for k, v in self.texts[which].items()}
        return {**text, **{k: v[idx] for k, v in self.image.items()}}


def _cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate batch-first tensors; sequences (B, L, D) are zero-padded to the longest L first."""
    if parts[0].dim() < 3:
        return torch.cat(parts)
    L = max(p.shape[1] for p in parts)
    return torch.cat([nn.functional.pad(p, (0, 0, 0, L - p.shape[1])) for p in parts])


# ---------------------------------------------------------------------------------------------
# The kit: model-specific pieces behind one interface
# ---------------------------------------------------------------------------------------------


@dataclass
class Kit:
    """Model-specific pieces: see the module docstring."""

    device: torch.device
    latent_shape: tuple[int, int, int, int]  # (C, T, h, w) of one video latent
    fps: int
    encode_text: Callable[[list[str]], dict[str, torch.Tensor]]
    encode_images: Callable[[np.ndarray], torch.Tensor]  # uint8 (B, H, W, 3) -> (B, C, 1, h, w)
    encode_image_tokens: Callable[[np.ndarray], torch.Tensor] | None  # uint8 -> (B, N, D) (Wan2.1 I2V CLIP)
    decode: Callable[[torch.Tensor], torch.Tensor]  # latent (B, C, T, h, w) -> uint8 (B, T, H, W, 3)
    # (weights path ("" = the Demonstrator), meta=False) -> module; meta=True: on the meta device, weights
    # deferred to engine.parallel.materialize (rank 0 reads them), for the Trainer or prepare_teacher only
    load_denoiser: Callable[..., nn.Module]
    # uint8 (B, H, W, 3) -> the whole video's condition latent (B, C, T, h, w) (Wan2.1 I2V: the image and
    # zero frames through the VAE, as its pipeline builds it), or None where the family has none
    encode_image_condition: Callable[[np.ndarray], torch.Tensor] | None = None

    @torch.no_grad()
    def encode_image_cond(self, pixels: np.ndarray) -> dict[str, torch.Tensor]:
        """The image entries of the cond dict for uint8 (B, H, W, 3) scene images: "image_latent"
        (B, C, 1, h, w), plus "image_tokens" (B, N, D) for families with an image encoder."""
        out = {"image_latent": self.encode_images(pixels)}
        if self.encode_image_tokens is not None:
            out["image_tokens"] = self.encode_image_tokens(pixels)
        if self.encode_image_condition is not None:
            out["image_condition"] = self.encode_image_condition(pixels)
        return out

    @torch.no_grad()
    def encode_items(self, items: list[Item], batch: int = 64) -> PromptTable:
        """Encode every item's image, task and solution once (the cache the training loops index)."""
        image, texts = {}, {"task": [], "solution": []}
        for s in range(0, len(items), batch):
            chunk = items[s : s + batch]
            pixels = [load_image(it.image) for it in chunk]
            # images of several sizes (a real manifest's) cannot be stacked: each is encoded alone then
            same = len({p.shape for p in pixels}) == 1
            for px in [np.stack(pixels)] if same else [p[None] for p in pixels]:
                for k, v in self.encode_image_cond(px).items():
                    image.setdefault(k, []).append(v)
            for which in texts:
                texts[which].append(self.encode_text([getattr(it, which) for it in chunk]))
        packed = {
            which: {k: _cat_rows([p[k] for p in parts]) for k in parts[0]} for which, parts in texts.items()
        }
        packed["empty"] = self.encode_text([""])
        return PromptTable(items, {k: torch.cat(v) for k, v in image.items()}, packed)

    def noise(self, n: int, seed: int) -> torch.Tensor:
        """(n, C, T, h, w) standard normal noise from ``seed`` (CPU generator: the same on every device)."""
        g = torch.Generator().manual_seed(seed)
        return torch.randn((n, *self.latent_shape), generator=g).to(self.device)


def build_kit(cfg: JobConfig) -> Kit:
    """The kit for ``cfg.model`` (the toy world for flavour "toy", else a diffusers-format model)."""
    if cfg.model.family == "wan" and cfg.model.flavour == "toy":
        return _toy_kit(cfg)
    return _pretrained_kit(cfg)


def frozen(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the Demonstrator and the text encoder."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _toy_kit(cfg: JobConfig) -> Kit:
    import copy

    from engine.world import latent as toy_latent
    from engine.world.scene import NUM_FRAMES, SIZE

    device = device_of(cfg)
    demo = load_toy_demonstrator(cfg)
    text_encoder = frozen(demo.text).to(device)
    h = SIZE // toy_latent.FACTOR

    def encode_images(images: np.ndarray) -> torch.Tensor:
        return toy_latent.image_latent(torch.from_numpy(np.ascontiguousarray(images))).to(device)

    def load_denoiser(weights: str, meta: bool = False) -> nn.Module:
        # meta is ignored: the toy Demonstrator is small and already in memory
        model = copy.deepcopy(demo.dit)
        if weights:
            load_weights(model, weights)
        return model.to(device).train()

    return Kit(
        device=device,
        latent_shape=(toy_latent.LATENT_CHANNELS, NUM_FRAMES, h, h),
        fps=4,
        encode_text=text_encoder.cond,
        encode_images=encode_images,
        encode_image_tokens=None,
        decode=lambda z: toy_latent.decode(z.float().cpu()),
        load_denoiser=load_denoiser,
    )


# Frame rate of written videos when data.fps is 0 ("native"): Wan2.1 generates 16 fps, HunyuanVideo-1.5
# 24 fps (Wan2.2 TI2V-5B is also 24: set data.fps = 24 for it).
NATIVE_FPS = {"wan": 16, "hunyuan15": 24}


def _pretrained_kit(cfg: JobConfig) -> Kit:
    """Real models: ``model.pretrained`` is a diffusers pipeline folder (transformer/, vae/,
    text_encoder/, tokenizer/ [, image_encoder/, image_processor/]); videos are data.num_frames x
    data.height x data.width; scene images are resized to that size."""
    from engine.parallel import DTYPES
    from models.encoders import load_encoders

    _require_pretrained(cfg)
    device = device_of(cfg)
    enc = load_encoders(cfg.model.family, cfg.model.pretrained, dtype=DTYPES[cfg.precision.param_dtype])
    for m in (enc.vae, enc.text, enc.image):
        if m is not None:
            frozen(m).to(device)
    vae, d = enc.vae, cfg.data
    shape = (vae.latent_channels, 1 + (d.num_frames - 1) // vae.temporal_compression,
             d.height // vae.spatial_compression, d.width // vae.spatial_compression)  # fmt: skip

    crop = cfg.model.family == "hunyuan15"  # its pipeline keeps the aspect ratio and crops; Wan's stretches

    def as_unit(images: np.ndarray) -> torch.Tensor:  # uint8 (B, H, W, 3) -> (B, 3, H, W) in [-1, 1]
        x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        return x.permute(0, 3, 1, 2).float() / 127.5 - 1

    def pixels(images: np.ndarray) -> torch.Tensor:
        """The first frame as the pipeline makes it, at data's size, in [-1, 1]."""
        return as_unit(fit_images(images, d.height, d.width, crop=crop))

    # the image tower's input: Wan's pipeline gives CLIP the image as it came (its processor resizes and crops);
    # HunyuanVideo's gives SigLIP the first frame it made
    tower_input = pixels if crop else as_unit

    if cfg.model.family == "hunyuan15" and not enc.text.has_glyph:  # its ByT5 glyph encoder
        log.warning("%s: no text_encoder_2/ (ByT5): quoted text in prompts gets no glyph tokens, unlike "
                    "the diffusers pipeline", cfg.model.pretrained)  # fmt: skip

    def decode(z: torch.Tensor) -> torch.Tensor:
        video = vae.decode(z.float())  # (B, 3, T, H, W) in about [-1, 1]
        return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()

    return Kit(
        device=device,
        latent_shape=shape,
        fps=int(cfg.data.fps) or NATIVE_FPS.get(cfg.model.family, 16),
        encode_text=enc.text.cond,
        encode_images=lambda images: vae.encode(pixels(images).unsqueeze(2)),
        encode_image_tokens=(lambda images: enc.image.encode(tower_input(images)))
        if enc.image is not None
        else None,
        decode=decode,
        load_denoiser=lambda weights, meta=False: (
            load_pretrained_denoiser(cfg, weights, meta=meta)
            if meta
            else load_pretrained_denoiser(cfg, weights).to(device)
        ),
        encode_image_condition=(lambda images: vae.encode_i2v_condition(pixels(images), d.num_frames))
        if _is_wan21_i2v(cfg, vae.latent_channels)
        else None,
    )


def _require_pretrained(cfg: JobConfig) -> None:
    """A real model needs ``model.pretrained``: an error naming the key when it is empty."""
    if not cfg.model.pretrained:
        raise ValueError(
            f"model.pretrained is empty: model {cfg.model.family!r} / {cfg.model.flavour!r} (not the toy world's "
            "'wan' / 'toy') needs its diffusers pipeline folder, e.g. --model.pretrained /data/<model>-Diffusers"
        )


def _is_wan21_i2v(cfg: JobConfig, latent_channels: int) -> bool:
    """A Wan2.1 I2V transformer (in_channels = 2C + 4) in ``model.pretrained``: its pipeline conditions on the
    VAE encoding of the whole [image, zero frames] video."""
    from models.adapter import read_config

    folder = Path(cfg.model.pretrained) / "transformer"
    if cfg.model.family != "wan" or not folder.is_dir():
        return False
    return read_config(folder).get("in_channels") == 2 * latent_channels + 4


def fit_images(images: np.ndarray, height: int, width: int, *, crop: bool) -> np.ndarray:
    """uint8 (B, H, W, 3) -> (B, height, width, 3) as the pipelines' image processors resize a first frame
    (PIL Lanczos on uint8): stretched to the size (Wan), or, with ``crop`` (HunyuanVideo-1.5), scaled with its
    aspect ratio kept until it covers the size (sides rounded down) and the centre cut out."""
    from PIL import Image

    out = []
    for img in np.asarray(images):
        H, W = img.shape[:2]
        if (H, W) == (height, width):
            out.append(img)
            continue
        pil = Image.fromarray(np.ascontiguousarray(img))
        if not crop:
            out.append(np.asarray(pil.resize((width, height), Image.LANCZOS)))
            continue
        wider = width / height > W / H  # the target is wider than the image: width decides the scale
        sw, sh = (width, H * width // W) if wider else (W * height // H, height)
        scaled = np.asarray(pil.resize((sw, sh), Image.LANCZOS))
        top, left = sh // 2 - height // 2, sw // 2 - width // 2
        out.append(scaled[top : top + height, left : left + width])
    return np.stack(out)


def build_denoiser(cfg: JobConfig, **overrides) -> nn.Module:
    """The configured DiT with random weights (on the meta device when ``model.meta_init``: no memory,
    for checking that a config builds)."""
    import models

    device = "meta" if cfg.model.meta_init else None
    return models.build_model(cfg.model.family, cfg.model.flavour, device=device,
                              attention_backend=cfg.model.attention, **overrides)  # fmt: skip


def load_pretrained_denoiser(cfg: JobConfig, weights: str, *, meta: bool = False) -> nn.Module:
    """The DiT from ``model.pretrained`` (a diffusers-format folder); ``weights`` = one of our exports
    (engine.checkpoint.export_safetensors) loaded on top, e.g. a distilled Executor. ``meta``: built on
    the meta device from config.json alone, the reading of both deferred to rank 0 at materialisation
    (engine.parallel.defer_weights). Either way its parameters are fp32 whatever dtype the files hold (the
    trainer's master weights; the sampling recipes cast to ``precision.param_dtype`` themselves)."""
    import models
    from engine.parallel import defer_weights

    _require_pretrained(cfg)
    model_cls, _ = models.model_classes(cfg.model.family)
    if meta:
        model = model_cls.meta_from_pretrained(cfg.model.pretrained)
        return defer_weights(model, lambda: load_pretrained_denoiser(cfg, weights).state_dict())
    # fp32 as the meta build: a bf16 folder gave bf16 master weights (AdamW's updates rounded away)
    model = model_cls.from_pretrained(cfg.model.pretrained, dtype=torch.float32)
    if weights:
        load_weights(model, weights)
    return model


def load_weights(model: nn.Module, path: str) -> nn.Module:
    """Load a safetensors file written by engine.checkpoint.export_safetensors (our keys, or the
    family's diffusers layout) into ``model``; a file that does not fit is an error naming the keys."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"weights '{path}' do not exist")
    sd = load_file(path)
    ours = set(model.state_dict())
    if set(sd) == ours:
        model.load_state_dict(sd)
        return model
    if hasattr(model, "to_diffusers_state_dict") and set(sd) == set(model.to_diffusers_state_dict()):
        model.load_diffusers_state_dict(sd)
        return model
    missing, extra = sorted(ours - set(sd))[:3], sorted(set(sd) - ours)[:3]
    raise ValueError(f"weights '{path}' do not fit the model: missing {missing}, unexpected {extra}")


# ---------------------------------------------------------------------------------------------
# Up-front checks of a recipe's inputs (engine.config.config_main's ``validate``): a user's mistake is a
# one-line ConfigError naming the key, before models are loaded or anything is sampled
# ---------------------------------------------------------------------------------------------


def _as_config_error(key: str, fn: Callable, *args):
    """``fn(*args)``; a missing or malformed input it reports (OSError, ValueError, RuntimeError) becomes a
    ConfigError naming ``key``."""
    try:
        return fn(*args)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{key}: {e}") from None


def check_tasks(path: str | Path, key: str) -> list[Item]:
    """The task file a recipe reads: it exists, every row parses and has its fields, every image exists and
    opens as an image."""
    items = _as_config_error(key, load_items, path)
    seen = set()
    for it in items:
        if it.image not in seen and (why := image_problem(it.image)):
            raise ConfigError(f"{key}: '{path}' row {it.id!r}: {why}")
        seen.add(it.image)
    return items


def image_problem(path: str | Path) -> str | None:
    """Why ``path`` is not an image :func:`load_image` can read (None if it is); the header only: a video or
    another non-image file failed once the models were loaded."""
    from PIL import Image

    if not Path(path).is_file():
        return f"image '{path}' does not exist"
    try:
        with Image.open(path):
            return None
    except (OSError, ValueError) as e:
        return f"'{path}' is not a readable image ({e})"


def check_weights(path: str, key: str) -> None:
    """A weights file a recipe loads later (an Executor's init, an evaluated Executor) exists."""
    if path and not Path(path).is_file():
        raise ConfigError(f"{key}: weights file '{path}' does not exist (expected a .safetensors export)")


def _denoiser_on_meta(cfg: JobConfig) -> nn.Module:
    """The denoiser ``kit.load_denoiser`` builds, on the meta device (no weights read): the toy Demonstrator's
    DiT from its demonstrator.json (or the random one's config), else model.pretrained's transformer."""
    import models

    if cfg.model.family == "wan" and cfg.model.flavour == "toy":
        from models.wan import WanConfig, WanModel
        from recipes.pretrain import build_dit

        meta_path = Path(cfg.world.demonstrator or TOY_ASSETS) / "demonstrator.json"
        with torch.device("meta"):
            if not meta_path.is_file():
                return build_dit("toy")
            dit_cfg = json.loads(meta_path.read_text())["dit_config"]
            return WanModel(WanConfig.from_diffusers_config(dit_cfg, text_len=None))
    model_cls, _ = models.model_classes(cfg.model.family)
    return model_cls.meta_from_pretrained(cfg.model.pretrained)


def check_weights_fit(cfg: JobConfig, path: str, key: str) -> None:
    """A weights file loaded into the denoiser later (:func:`load_weights`) exists and has its keys and
    shapes (the file's header against the model built on the meta device): a checkpoint of another model
    config failed only once the prompts were encoded and the models loaded."""
    from safetensors import safe_open

    check_weights(path, key)
    if not path:
        return
    try:
        with safe_open(path, framework="pt") as f:
            have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for a file that is not one
        raise ConfigError(f"{key}: weights file '{path}' is not a readable .safetensors file ({e})") from None
    model = _as_config_error("model", _denoiser_on_meta, cfg)
    layouts = [{k: tuple(v.shape) for k, v in model.state_dict().items()}]
    if hasattr(model, "to_diffusers_state_dict"):  # load_weights takes either layout
        layouts.append({k: tuple(v.shape) for k, v in model.to_diffusers_state_dict().items()})
    what = f"the model ({cfg.model.family} / {cfg.model.flavour})"
    fits = [want for want in layouts if set(want) == set(have)]
    if not fits:
        want = max(layouts, key=lambda w: len(set(w) & set(have)))
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        parts = [
            f"{len(v)} keys {n}, e.g. {v[:3]}" for n, v in (("missing", missing), ("unexpected", extra)) if v
        ]
        raise ConfigError(f"{key}: weights '{path}' do not fit {what}: {'; '.join(parts)}")
    # exact shapes in either layout: the diffusers layout's are those to_ours converts (a patch embedding of
    # another patch shape has the same size, and passed here only to fail at load)
    want = fits[0]
    bad = [k for k in sorted(want) if want[k] != have[k]]
    if bad:
        shown = "; ".join(f"{k}: file {list(have[k])}, model {list(want[k])}" for k in bad[:3])
        raise ConfigError(f"{key}: weights '{path}' do not fit {what}: {len(bad)} of {len(want)} tensors have "
                          f"another shape ({shown}); a checkpoint of another model config?")  # fmt: skip


def check_model(cfg: JobConfig) -> None:
    """What :func:`build_kit` reads: the toy Demonstrator's folder, or the diffusers pipeline folder."""
    if cfg.model.family == "wan" and cfg.model.flavour == "toy":
        # the toy kit never reads model.pretrained: a path there was silently ignored
        if cfg.model.pretrained:
            raise ConfigError(f"model.pretrained: '{cfg.model.pretrained}' is not read by the toy world (model 'wan' / "
                              "'toy'); its Demonstrator comes from world.demonstrator (a recipes/pretrain.py export)")  # fmt: skip
        if cfg.world.demonstrator:
            check_demonstrator_folder(cfg.world.demonstrator, "world.demonstrator")
        return
    import models

    # an unknown family failed with a traceback when the encoders were built
    _as_config_error("model.family", models.model_classes, cfg.model.family)
    _as_config_error("model.pretrained", _require_pretrained, cfg)
    folder = Path(cfg.model.pretrained)
    if not folder.is_dir():
        raise ConfigError(f"model.pretrained: folder '{folder}' does not exist")
    missing = [d for d in ("transformer", "vae", "text_encoder", "tokenizer") if not (folder / d).is_dir()]
    if missing:
        raise ConfigError(f"model.pretrained: '{folder}' lacks the sub-folders {missing} (expected a diffusers "
                          "pipeline folder: transformer/, vae/, text_encoder/, tokenizer/, ...)")  # fmt: skip


def check_training_precision(cfg: JobConfig) -> None:
    """The FP8 settings the trainer and prepare_teacher refused with a traceback once the models were loaded."""
    from engine.precision import attention_precision_problem

    m = cfg.model
    if why := attention_precision_problem(m, cfg.precision.fp8, cfg.parallel.activation_checkpointing):
        raise ConfigError(why)
    toy = m.family == "wan" and m.flavour == "toy"  # the toy kit never builds on the meta device
    if cfg.precision.fp8 == "te" and m.meta_init and not toy:
        raise ConfigError("precision.fp8 = 'te' with model.meta_init = true is not supported (a TE Linear's FP8 "
                          "state is not in the weights rank 0 reads); set --model.meta_init false, or "
                          "--precision.fp8 torchao")  # fmt: skip
    import importlib.util

    module, pip = {
        "te": ("transformer_engine", "'transformer-engine[pytorch]'"),
        "torchao": ("torchao", "torchao"),
    }.get(cfg.precision.fp8, (None, None))
    if module and importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"precision.fp8 = {cfg.precision.fp8!r}: {module} is not installed (pip install {pip})"
        )
    if m.attention_precision == "fp8" and m.fp8_attention_backend == "te":
        if importlib.util.find_spec("transformer_engine") is None:
            raise ConfigError("model.fp8_attention_backend = 'te': transformer_engine is not installed "
                              "(pip install 'transformer-engine[pytorch]')")  # fmt: skip


def check_demonstrator_folder(folder: str | Path, key: str) -> None:
    """An exported toy Demonstrator folder holds the weight files recipes.pretrain.load_demonstrator reads (a
    folder with its demonstrator.json alone failed with a FileNotFoundError traceback)."""
    missing = [f for f in DEMONSTRATOR_FILES if not (Path(folder) / f).is_file()]
    if missing:
        raise ConfigError(f"{key}: '{folder}' lacks {missing} (an exported Demonstrator folder holds "
                          f"{', '.join(DEMONSTRATOR_FILES)}: recipes/pretrain.py's <run>/demonstrator)")  # fmt: skip


DEMONSTRATOR_FILES = ("demonstrator.json", "demonstrator.safetensors", "text_encoder.safetensors")


def check_judge(cfg: JobConfig) -> None:
    """The judge / proposer backend's settings (its endpoint is not contacted here)."""
    j = cfg.judge
    # the judge service refused these when built (evaluate, demonstrate: after a chunk had been sampled)
    if j.max_batch < 1 or j.max_concurrency < 1 or j.max_wait_ms < 0:
        raise ConfigError(f"judge.max_batch = {j.max_batch}, judge.max_concurrency = {j.max_concurrency}, "
                          f"judge.max_wait_ms = {j.max_wait_ms}: expected >= 1, >= 1, >= 0")  # fmt: skip
    if j.backend != "oracle" and not j.model:
        raise ConfigError(f"judge.model: the {j.backend} backend needs a model name or path, got ''")
    if j.backend == "openai" and not j.base_url:
        raise ConfigError(
            "judge.base_url: the openai backend needs an endpoint, e.g. http://127.0.0.1:8000/v1"
        )
    if j.backend == "transformers" and (why := _transformers_folder_problem(j.model)):
        # transformers' OSError traceback came once the recipe's models were loaded
        raise ConfigError(f"judge.model: {why}")
    # the VLM judges refused these when built: after the models were loaded
    if j.backend != "oracle" and j.num_frames < 1:
        raise ConfigError(
            f"judge.num_frames = {j.num_frames}: expected >= 1 frame shown to the {j.backend} judge"
        )
    if j.backend == "openai" and (j.timeout_s <= 0 or j.max_retries < 0):
        raise ConfigError(f"judge.timeout_s = {j.timeout_s}, judge.max_retries = {j.max_retries}: the openai backend "
                          "needs timeout_s > 0 and max_retries >= 0")  # fmt: skip


def _transformers_folder_problem(name: str) -> str | None:
    """Why ``name`` is not a transformers model folder (None if it is, or if it can only be a hub id)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(name).expanduser()
    if not path.exists():
        try:
            validate_repo_id(name)
            return None  # a hub id, e.g. Qwen/Qwen2.5-VL-7B-Instruct
        except HFValidationError:
            return f"folder '{name}' does not exist"
    if not path.is_dir():
        return f"'{name}' is not a folder (expected a transformers model folder with config.json)"
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")  # fmt: skip
    if not (path / "config.json").is_file() or not any((path / w).is_file() for w in weights):
        return (
            f"'{name}' is not a transformers model folder (config.json and {weights[0]} or a sharded index)"
        )
    return None


def check_run(cfg: JobConfig) -> None:
    """Device and run folder (not created here; a path that cannot be a writable folder fails now)."""
    from engine.dist import mesh_shape, resolve_device

    # this rank's GPU, as init_distributed picks it (resolve_device selects it)
    _as_config_error("run.device", resolve_device, cfg.run.device, int(os.environ.get("LOCAL_RANK", "0")))

    # train.batch_size 0 failed inside the model ("cannot reshape tensor of 0 elements"), flow.num_steps 0
    # with a traceback from the sampler
    for key, v in (("train.batch_size", cfg.train.batch_size), ("train.grad_accum", cfg.train.grad_accum),
                   ("flow.num_steps", cfg.flow.num_steps), ("eval.batch_size", cfg.eval.batch_size)):  # fmt: skip
        if v < 1:
            raise ConfigError(f"config key '{key}': expected >= 1, got {v}")
    # the sampler (or pretrain's timestep draw) refused it at its first call, after the models were loaded
    if cfg.flow.shift <= 0:
        raise ConfigError(f"flow.shift = {cfg.flow.shift}: expected > 0 (1 = no timestep shift)")

    # a single process skipped the mesh check: parallel.cp = 3 ran silently without sequence parallelism
    p, world = cfg.parallel, int(os.environ.get("WORLD_SIZE", "1"))
    _as_config_error("parallel", mesh_shape, world, p.dp_replicate, p.dp_shard, p.cp)
    # the folder is not created here: a run refused by a later check left an empty run folder behind
    check_writable_folder(run_path(cfg), "run.out_dir", "run folder")


def check_writable_folder(folder: Path, key: str, what: str) -> None:
    """``folder`` is a writable folder or can be created as one (the nearest existing folder above it is
    writable); nothing is created."""
    base = folder
    while not (base.exists() or base.is_symlink()) and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise ConfigError(f"{key}: {what} '{folder}' cannot be created: '{base}' is not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        where = what if base == folder else f"{what} '{folder}' cannot be created: folder"
        raise ConfigError(f"{key}: {where} '{base}' is not writable")


def files_id(path: str | Path) -> list | str:
    """A file as (path, size, mtime); a folder as that of every .safetensors file under it; else the text:
    the fingerprint entry of weights that a rerun may find rewritten."""
    p = Path(path)
    if p.is_file():
        return [str(p), p.stat().st_size, p.stat().st_mtime_ns]
    if p.is_dir():
        return [files_id(f) for f in sorted(p.rglob("*.safetensors"))]
    return str(path)


def demonstrator_id(cfg: JobConfig) -> list:
    """The Demonstrator and encoders :func:`build_kit` loads, as a fingerprint entry: model.family / flavour
    and the files of model.pretrained (the toy world: of world.demonstrator, or the shipped assets)."""
    toy = cfg.model.family == "wan" and cfg.model.flavour == "toy"
    base = (cfg.world.demonstrator or TOY_ASSETS) if toy else cfg.model.pretrained
    return [cfg.model.family, cfg.model.flavour, files_id(base) if base else ""]


def safetensors_digest(path: str | Path, span: int = 4096) -> str:
    """sha256 of a .safetensors file's header (names, dtypes, shapes) and the first and last ``span`` bytes of
    every tensor: a retrained model of the same shapes differs in them, at a few MB read for a 7B model."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(n)
        h.update(header)
        tensors = [v for k, v in json.loads(header).items() if k != "__metadata__"]
        for a, b in sorted(t["data_offsets"] for t in tensors):
            for start in sorted({a, max(a, b - span)}):
                f.seek(8 + n + start)
                h.update(f.read(min(span, b - start)))
    return h.hexdigest()


def weights_id(path: str) -> list | str:
    """A local model folder as (name, size, :func:`safetensors_digest`) of each .safetensors file under it
    (other weight files as :func:`files_id`); else the text (a hub or served model name)."""
    p = Path(path)
    if not p.is_dir():
        return str(path)
    entries = []
    for f in sorted(p.rglob("*")):
        if f.suffix == ".safetensors":
            try:
                digest = safetensors_digest(f)
            except (OSError, ValueError, KeyError, TypeError):  # not a readable safetensors file
                digest = files_id(f)
            entries.append([str(f.relative_to(p)), f.stat().st_size, digest])
        elif f.suffix in (".bin", ".pt", ".pth") and f.is_file():
            entries.append(files_id(f))
    return entries


def judge_id(cfg: JobConfig) -> list:
    """The judge's settings that change its scores, with its prompts' version, as a fingerprint entry; a local
    transformers judge with its weights (its folder's path alone reused a retrained judge's stale scores)."""
    from engine.judge import base as judge_base

    j = cfg.judge
    entry = [j.backend, j.model, j.base_url, j.num_frames, j.frame_layout, judge_base.PROMPT_VERSION]
    return entry + [weights_id(j.model)] if j.backend == "transformers" else entry


def tasks_path(cfg: JobConfig) -> Path:
    """The task file propose writes and distill, demonstrate and rl read: ``distill.tasks`` or
    ``<run>/tasks.jsonl`` (the run folder not created: validate reads this path)."""
    return Path(cfg.distill.tasks) if cfg.distill.tasks else run_path(cfg) / "tasks.jsonl"


# ---------------------------------------------------------------------------------------------
# Judge and proposer (one VLM backend serves both: cfg.judge)
# ---------------------------------------------------------------------------------------------


def build_judge_backend(cfg: JobConfig):
    """The :class:`engine.judge.Judge` of ``cfg.judge.backend``: the toy world's oracle, an
    OpenAI-compatible endpoint (vLLM / SGLang / a hosted API), or a local transformers VLM."""
    j = cfg.judge
    if j.backend == "oracle":
        from engine.world.oracle import OracleJudge

        return OracleJudge()
    if not j.model:
        raise ValueError(f"judge.model: the {j.backend} judge needs a model name or path, got ''")
    if j.backend == "openai":
        from engine.judge import OpenAIJudge

        if not j.base_url:
            raise ValueError(
                "judge.base_url: the openai judge needs an endpoint, e.g. http://127.0.0.1:8000/v1"
            )
        # a connection for every request of the judge.max_concurrency batches (the client's 16 were shared by
        # 4 batches of 16); backoff_s and parse_retries as judge_batch_s counts them
        return OpenAIJudge(j.base_url, j.model, timeout_s=j.timeout_s, max_retries=j.max_retries,
                           api_key_env=j.api_key_env, num_frames=j.num_frames, layout=j.frame_layout,
                           max_connections=j.max_batch * j.max_concurrency, backoff_s=_BACKOFF_S, parse_retries=1)  # fmt: skip
    from engine.judge import TransformersJudge

    # on the run's device (run.device cpu kept it off a GPU; under torchrun each rank's own GPU, not cuda:0)
    return TransformersJudge(j.model, device=str(device_of(cfg)), max_batch=j.max_batch, num_frames=j.num_frames,
                             layout=j.frame_layout)  # fmt: skip


_BACKOFF_S = 0.25  # the openai judge's first retry back-off (x 0.5-1.5 jitter, doubling per retry)


def judge_batch_s(cfg: JobConfig) -> float:
    """The longest one judge batch may take. An openai request has its own deadline per attempt (from when it
    gets a connection), bounded back-offs between its attempts, and one parse retry: every attempt, every
    back-off (at most 1.5 x _BACKOFF_S x 2**a, or a Retry-After capped at timeout_s), twice. Others: timeout_s
    per attempt."""
    j = cfg.judge
    attempts = j.timeout_s * (j.max_retries + 1)
    if j.backend != "openai":
        return attempts
    return 2 * (attempts + sum(max(1.5 * _BACKOFF_S * 2**a, j.timeout_s) for a in range(j.max_retries)))


def judge_batch_timeout_s(cfg: JobConfig) -> float | None:
    """The service's batch timeout: none for the openai judge, which bounds each request itself (a batch
    timeout counted waits for a connection and back-offs, and dropped the answers already in); else
    timeout_s per attempt."""
    return None if cfg.judge.backend == "openai" else judge_batch_s(cfg)


def build_judge(cfg: JobConfig):
    """A :class:`engine.judge.JudgeService` (batching, concurrency, cache) over the configured backend."""
    from engine.judge import JudgeService

    j = cfg.judge
    return JudgeService(build_judge_backend(cfg), max_batch=j.max_batch, max_wait_ms=j.max_wait_ms,
                        max_concurrency=j.max_concurrency, batch_timeout_s=judge_batch_timeout_s(cfg))  # fmt: skip


class BatchedJudge:
    """The configured backend behind an :class:`engine.judge.AsyncJudge` for each ``score`` call: evaluate and
    demonstrate called the backend directly, so judge.max_batch, max_wait_ms and max_concurrency did not apply
    (an openai judge sent a whole chunk's requests at once, up to its pool of 16, whatever the settings).
    One AsyncJudge per call: those recipes run each chunk on its own event loop (asyncio.run)."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg, self.backend = cfg, build_judge_backend(cfg)

    async def score(self, requests: list) -> list:
        import asyncio

        from engine.judge import AsyncJudge

        j = self.cfg.judge
        judge = AsyncJudge(self.backend, max_batch=j.max_batch, max_wait_ms=j.max_wait_ms, cache=False,
                           max_concurrency=j.max_concurrency, batch_timeout_s=judge_batch_timeout_s(self.cfg))  # fmt: skip
        try:
            futures = [await judge.submit(r) for r in requests]
            return list(await asyncio.gather(*futures))
        finally:
            await judge.aclose()


def build_proposer(cfg: JobConfig):
    """The :class:`engine.propose.Proposer` on the judge's VLM backend (the oracle on the toy world)."""
    j = cfg.judge
    if j.backend == "oracle":
        from engine.world.oracle import OracleProposer

        return OracleProposer(seed=cfg.run.seed)
    if not j.model:
        raise ValueError(f"judge.model: the {j.backend} proposer needs a model name or path, got ''")
    from engine.propose import ChatProposer

    if j.backend == "openai":
        from engine.judge import OpenAIChat

        chat = OpenAIChat(j.base_url, j.model, timeout_s=j.timeout_s, max_retries=j.max_retries,
                          api_key_env=j.api_key_env, temperature=0.7)  # fmt: skip
    else:
        from engine.judge import TransformersVLM

        chat = TransformersVLM(j.model, device=str(device_of(cfg)), max_batch=j.max_batch)
    return ChatProposer(chat)


def judge_requests(videos: torch.Tensor, items: list[Item], questions: list[str]) -> list:
    """One :class:`engine.judge.JudgeRequest` per (video, question), video-major: uint8 (B, T, H, W, 3)."""
    from engine.judge import JudgeRequest

    frames = videos.cpu().numpy()
    return [JudgeRequest(it.task, q, frames=list(frames[b]), meta=it.meta)
            for b, it in enumerate(items) for q in questions]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The toy world's Demonstrator
# ---------------------------------------------------------------------------------------------


def load_toy_demonstrator(cfg: JobConfig) -> nn.Module:
    """The shipped toy Demonstrator (``.dit`` and ``.text``) from ``world.demonstrator`` ("" = the
    shipped assets). When none has been shipped yet, a randomly initialised one (seeded by run.seed)
    is used and a warning says so: every number it produces is then only a plumbing check."""
    from recipes.pretrain import build_demonstrator, load_demonstrator

    folder = Path(cfg.world.demonstrator) if cfg.world.demonstrator else TOY_ASSETS
    if (folder / "demonstrator.json").is_file():
        model, meta = load_demonstrator(folder)
        trained = meta.get("train", {}).get("shift", 1.0)  # exports before the key existed trained at 1.0
        if cfg.flow.shift != trained:
            log.warning("flow.shift = %g but the Demonstrator in %s was trained with timestep shift %g: "
                        "its samples are best at that shift", cfg.flow.shift, folder, trained)  # fmt: skip
        return model
    if cfg.world.demonstrator:
        raise FileNotFoundError(f"world.demonstrator '{folder}': no demonstrator.json in it")
    log.warning("no shipped Demonstrator in %s: using a RANDOMLY INITIALISED one (plumbing only)", folder)
    torch.manual_seed(cfg.run.seed)
    return build_demonstrator("toy", cfg.world.text_layers)


def ensure_repo_on_path() -> None:
    """Recipes run as ``python recipes/x.py``: make ``recipes.*`` importable."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
