"""VideoDataset: a JSONL manifest of videos/images with text, decoded into fixed-size clips.

Manifest rows are JSON objects ``{"video" | "image": path, "caption" | "task" | "solution": str, ...}``;
paths are relative to ``root`` (default: the manifest's folder). Iterating yields

    {"video": float32 (3, T, H, W) in [-1, 1], "path": str, "index": int, <the row's other fields>}

An image yields a one-frame video. A file or row that cannot give a clean clip (malformed row,
missing/zero-length/non-video/truncated/corrupt file, too few frames, unexpected resolution or pixel
format) is skipped with a warning naming it and the reason, added to ``dataset.skipped`` and the
quarantine JSONL, and not retried in later epochs. Each item is built from one row only, so its text
always belongs to its video. An iteration in which every item was skipped raises RuntimeError.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.data.decode import (
    SUPPORTED_PIX_FMTS,
    DecodeError,
    Decoder,
    build_decoders,
    check_vp9,
    probe,
)
from engine.data.quarantine import Quarantine
from engine.data.transforms import (
    frame_indices,
    make_buckets,
    max_start,
    nearest_bucket,
    resize_crop,
    resize_crop_normalize,
)
from engine.log import get_logger

log = get_logger("data")

TEXT_FIELDS = ("caption", "task", "solution")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})


class SkipItem(Exception):
    """An item that cannot be used; the message is the reason recorded in the quarantine."""


def iterate_skipping(
    get: Callable[[int], dict[str, Any]], indices: Iterable[int], all_skipped: Callable[[int], str]
) -> Iterator[dict[str, Any]]:
    """``get(i)`` for each index, leaving out items that raise :class:`SkipItem`; a pass over a whole epoch that
    tried items and yielded none raises RuntimeError(all_skipped(number tried)). The rest of a resumed epoch (a
    sampler whose state has consumed items) may hold only bad items, as the uninterrupted pass's end did."""
    state = getattr(indices, "state_dict", None)
    whole = not callable(state) or not state().get("consumed", 0)
    tried = yielded = 0
    for i in indices:
        tried += 1
        try:
            item = get(i)
        except SkipItem:
            continue
        yielded += 1
        yield item
    if whole and tried and not yielded:
        raise RuntimeError(all_skipped(tried))


def parse_manifest_line(line: str, root: Path) -> dict[str, Any]:
    """One manifest line -> ``{"kind", "path", "fields"}``; raises SkipItem naming what is wrong."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise SkipItem(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise SkipItem(f"expected a JSON object, got {type(row).__name__}")
    kinds = [k for k in ("video", "image") if k in row]
    if len(kinds) != 1:
        raise SkipItem(f"expected exactly one of 'video' or 'image', got {kinds or 'neither'}")
    kind = kinds[0]
    if not isinstance(row[kind], str) or not row[kind]:
        raise SkipItem(f"'{kind}' must be a non-empty path string, got {row[kind]!r}")
    fields = {k: v for k, v in row.items() if k != kind}
    for k in TEXT_FIELDS:
        if k in fields and not isinstance(fields[k], str):
            raise SkipItem(f"text field '{k}' must be a string, got {type(fields[k]).__name__}")
    bad = [k for k in ("video", "path", "index") if k in fields]
    if bad:
        raise SkipItem(f"reserved key(s) {bad} in row")
    return {"kind": kind, "path": (root / row[kind]).resolve(), "fields": fields}


def read_manifest(manifest: str | Path, root: str | Path | None, quarantine: Quarantine) -> list[dict]:
    """Parse every line of ``manifest``; bad rows go to ``quarantine`` as ``<manifest>:<line>``."""
    m = Path(manifest)
    if m.is_dir():
        found = sorted(q.name for q in m.glob("*.jsonl"))[:3]
        raise IsADirectoryError(
            f"manifest '{m}' is a folder; expected a JSONL file (one JSON object per line, "
            f'{{"video" | "image": path, "caption": text}})'
            + (f"; JSONL files in it: {found}" if found else "")
        )
    if not m.is_file():
        raise FileNotFoundError(f"manifest '{m}' does not exist (expected a JSONL file)")
    base = Path(root) if root else m.parent
    rows = []
    # JSON is UTF-8; a byte-order mark (Windows editors, spreadsheet exports) is not part of the first row
    for lineno, line in enumerate(m.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(parse_manifest_line(line, base))
        except SkipItem as e:
            quarantine.add(f"{m}:{lineno}", str(e))
    if not rows:
        raise RuntimeError(
            f"manifest '{m}': no usable rows ({len(quarantine)} skipped; see the warnings above)"
        )
    return rows


class VideoDataset:
    """Map-style and iterable dataset of clips from a JSONL manifest (see the module docstring).

    ``decoder``: "auto" | "dali" | "dali_cpu" | "pyav"; ``fps``: target frame rate (0 = native);
    ``aspect_buckets``: equal-area aspect-ratio buckets instead of one ``(height, width)``;
    ``clip_start``: "first" or "random" (seeded by ``seed``, epoch and index); ``max_upscale``: skip
    videos that would have to be enlarged more than this.
    """

    def __init__(
        self,
        manifest: str | Path,
        *,
        num_frames: int,
        height: int,
        width: int,
        decoder: str = "auto",
        fps: float = 0.0,
        root: str | Path | None = None,
        aspect_buckets: bool = False,
        bucket_multiple: int = 16,
        clip_start: str = "first",
        max_upscale: float = 4.0,
        quarantine: str | Path | None = None,
        seed: int = 0,
    ):
        if num_frames < 1 or height < 1 or width < 1:
            raise ValueError(
                f"VideoDataset: num_frames/height/width must be >= 1, got {num_frames}/{height}/{width}"
            )
        if clip_start not in ("first", "random"):
            raise ValueError(f"VideoDataset clip_start: expected 'first' or 'random', got {clip_start!r}")
        self.manifest = Path(manifest)
        self.num_frames, self.fps, self.clip_start, self.seed = num_frames, fps, clip_start, seed
        self.max_upscale = max_upscale
        self.buckets = make_buckets(height, width, multiple=bucket_multiple, aspect=aspect_buckets)
        self.quarantine = Quarantine(quarantine)
        self.decoders: list[Decoder] = build_decoders(decoder)
        self.decoder_choice = decoder
        self.rows = read_manifest(self.manifest, root, self.quarantine)
        self.epoch = 0
        self._bad: set[int] = set()
        self._announced: set[tuple[str, str]] = set()

    @classmethod
    def from_config(cls, data: Any, *, quarantine: str | Path | None = None, seed: int = 0) -> VideoDataset:
        """Build from a ``DataConfig`` section (engine.config)."""
        return cls(
            data.manifest,
            num_frames=data.num_frames,
            height=data.height,
            width=data.width,
            decoder=data.decoder,
            fps=data.fps,
            root=data.root or None,
            aspect_buckets=data.aspect_buckets,
            bucket_multiple=data.bucket_multiple,
            clip_start=data.clip_start,
            max_upscale=data.max_upscale,
            quarantine=data.quarantine or quarantine,
            seed=seed,
        )

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of every row or file skipped so far."""
        return self.quarantine.entries

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Item ``i``; raises SkipItem (already quarantined) when it cannot be used."""
        return self._item(i, compact=False)

    def compact_item(self, i: int) -> dict[str, Any]:
        """Item ``i`` with ``video`` uint8 ``(3, T, H, W)``, the resized clip rounded (a quarter of float32's
        memory): what BatchLoader holds while a bucket fills; collate_videos scales it to [-1, 1]."""
        return self._item(i, compact=True)

    def _item(self, i: int, compact: bool) -> dict[str, Any]:
        row = self.rows[i]
        if i in self._bad:
            raise SkipItem("quarantined earlier")
        try:
            frames, aspect = (
                (self._load_image(row["path"]), 1.0)
                if row["kind"] == "image"
                else self._load_video(i, row["path"])
            )
            video = (resize_crop if compact else resize_crop_normalize)(
                frames, *self._bucket_for(row["path"], frames, aspect), pixel_aspect=aspect
            )
        except (SkipItem, DecodeError) as e:
            self._bad.add(i)
            self.quarantine.add(row["path"], str(e))
            raise SkipItem(str(e)) from None
        return {"video": video, "path": str(row["path"]), "index": i, **row["fields"]}

    def iterate(self, indices: Iterable[int]) -> Iterator[dict[str, Any]]:
        """Items for ``indices`` (e.g. a ResumableSampler, whose epoch seeds the random clip starts), skipping
        bad ones."""
        if isinstance(getattr(indices, "epoch", None), int):
            self.set_epoch(indices.epoch)
        return iterate_skipping(
            self.__getitem__,
            indices,
            lambda tried: (
                f"VideoDataset '{self.manifest}': all {tried} items of this pass were skipped "
                f"({len(self.skipped)} in the quarantine; first: {self.skipped[:3]})"
            ),
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.iterate(range(len(self)))

    # --- loading ------------------------------------------------------------------------------

    def _bucket_for(self, path: Path, frames: torch.Tensor, pixel_aspect: float = 1.0) -> tuple[int, int]:
        h, w = int(frames.shape[1]), int(frames.shape[2])
        bh, bw = nearest_bucket(h, w * pixel_aspect, self.buckets)  # the shape a player shows
        scale = max(bh / h, bw / (w * pixel_aspect))
        if scale > self.max_upscale:
            raise SkipItem(
                f"resolution {w}x{h} too small for bucket {bw}x{bh} (needs {scale:.2f}x upscale > max_upscale "
                f"{self.max_upscale})"
            )
        return bh, bw

    def _load_image(self, path: Path) -> torch.Tensor:
        from PIL import Image, ImageOps, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                # upright as a viewer shows it: phones store pixels in sensor order plus an EXIF orientation
                # (diffusers' load_image applies it too)
                im = ImageOps.exif_transpose(im)
                # 16-bit grey: convert("RGB") clips it (all but black is white)
                if im.mode.startswith("I;16"):
                    grey = np.rint(np.asarray(im).astype(np.float32) / 257).astype(np.uint8)
                    arr = np.repeat(grey[..., None], 3, axis=-1)
                elif im.mode in ("I", "F"):  # 32-bit int / float samples: no known range to scale from
                    raise SkipItem(f"image mode '{im.mode}' (32-bit samples) not supported")
                else:
                    arr = np.asarray(im.convert("RGB"))
        except (FileNotFoundError, UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise SkipItem(f"image cannot be read ({type(e).__name__}: {e})") from None
        frame = torch.from_numpy(arr.copy())[None]  # (H, W, 3) -> (1, H, W, 3)
        return frame.to(self.decoders[0].device)

    def _start(self, i: int, latest: int) -> int:
        if self.clip_start == "first" or latest <= 0:
            return 0
        return random.Random(f"{self.seed}/{self.epoch}/{i}").randint(0, latest)

    def _load_video(self, i: int, path: Path) -> tuple[torch.Tensor, float]:
        """The clip's frames (T, H, W, 3) upright, and the width / height of their pixels."""
        info = probe(path)
        if info.pix_fmt not in SUPPORTED_PIX_FMTS:
            raise SkipItem(
                f"pixel format '{info.pix_fmt}' not supported (expected one of {sorted(SUPPORTED_PIX_FMTS)})"
            )
        if info.width < 2 or info.height < 2:
            raise SkipItem(f"unexpected resolution {info.width}x{info.height}")
        ts = info.timestamps or None  # sampled by time when the frame rate varies
        latest = max_start(info.num_frames, info.fps, self.num_frames, self.fps, ts)
        try:
            idx = frame_indices(
                info.num_frames, info.fps, self.num_frames, self.fps, self._start(i, latest), ts
            )
        except ValueError as e:
            raise SkipItem(f"too few frames: {e}") from None
        if info.codec == "vp9":
            check_vp9(path, idx)  # damage that FFmpeg's decoder (PyAV's, DALI's) would conceal
        frames = self._decode(path, info.codec, idx)
        # upright as a player shows it (ffmpeg's autorotate): frames (T, H, W, 3) turned counterclockwise; a
        # quarter turn makes a pixel's width its height
        aspect = 1.0 / info.pixel_aspect if info.rotation % 180 else info.pixel_aspect
        return (torch.rot90(frames, info.rotation // 90, dims=(1, 2)) if info.rotation else frames), aspect

    def _decode(self, path: Path, codec: str, idx: list[int]) -> torch.Tensor:
        usable = [d for d in self.decoders if d.supports(codec)]
        if not usable:
            raise SkipItem(f"codec '{codec}' not supported by decoder '{self.decoder_choice}'")
        errors = []
        for dec in usable:
            out = dec.decode_batch([(path, idx)])[0]
            if isinstance(out, DecodeError):
                errors.append(f"{dec.name}: {out}")
                continue
            if (dec.name, codec) not in self._announced:
                self._announced.add((dec.name, codec))
                log.info("decoder '%s' for %s videos (decoder=%s)", dec.name, codec, self.decoder_choice)
            if out.shape[0] != len(idx):
                raise SkipItem(f"decoder '{dec.name}' returned {out.shape[0]} frames (expected {len(idx)})")
            return out.to(self.decoders[0].device)  # one device for every item, whichever backend decoded it
        raise SkipItem("; ".join(errors))


def collate_videos(group: list[dict[str, Any]]) -> dict[str, Any]:
    """Items of one shape -> ``video`` stacked (B, 3, T, H, W) float32 (uint8 videos scaled to [-1, 1]), every
    other key as a list."""
    keys = set().union(*(g.keys() for g in group)) - {"video"}
    out = {k: [g.get(k) for g in group] for k in sorted(keys)}
    video = torch.stack([g["video"] for g in group])  # B x (3, T, H, W) -> (B, 3, T, H, W)
    out["video"] = video.float().div_(127.5).sub_(1.0) if video.dtype == torch.uint8 else video
    return out


def bucket_batches(
    items: Iterable[dict[str, Any]], batch_size: int, *, drop_last: bool = False
) -> Iterator[dict[str, Any]]:
    """Group items by video shape into batches of :func:`collate_videos` (no prefetch, no state)."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    pending: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for item in items:
        group = pending.setdefault(tuple(item["video"].shape), [])
        group.append(item)
        if len(group) == batch_size:
            yield collate_videos(pending.pop(tuple(item["video"].shape)))
    if not drop_last:
        for group in pending.values():
            yield collate_videos(group)
