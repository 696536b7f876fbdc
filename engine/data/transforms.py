"""Frame sampling, aspect-ratio buckets, resize + centre crop, normalisation.

Buckets (the choice, documented): every bucket has about the target area ``height * width`` so
each sample costs about the same number of latent tokens (flat step time and memory), with sides
rounded to a multiple of ``multiple`` (16 = VAE stride 8 x patch 2, what Wan/HunyuanVideo need).
The aspect ratios are the common video/photo ones, portrait to landscape; the target ``(height, width)``
and its transpose (when multiples of ``multiple``) take the place of the buckets nearest their shape, so a
clip already at the training size (Wan's 480 x 832, whose 16:9 bucket is 480 x 848) is used as it is. A clip goes to the bucket
with the nearest log aspect ratio, is resized to cover it (aspect preserved) and centre-cropped, so
at most a thin border is lost and nothing is stretched. With bucketing off there is one bucket,
``(height, width)``, and every clip is cover-resized and centre-cropped to it.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

BUCKET_RATIOS = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9, 2.0)  # width / height


def variable_rate(timestamps: Sequence[float] | None) -> bool:
    """Whether frame presentation times (seconds, sorted) are unevenly spaced: a frame interval more than 25%
    off the median one (a variable-frame-rate file: phones, screen recordings, concatenated clips)."""
    if not timestamps or len(timestamps) < 3:
        return False
    d = _intervals(timestamps)
    med = d[len(d) // 2]
    return med > 0 and max(abs(d[0] - med), abs(d[-1] - med)) > 0.25 * med


def _intervals(timestamps: Sequence[float]) -> list[float]:
    """The frame intervals of sorted presentation times, sorted (their median: ``d[len(d) // 2]``)."""
    return sorted(b - a for a, b in zip(timestamps, timestamps[1:]))


def frame_indices(
    available: int,
    src_fps: float,
    num_frames: int,
    target_fps: float = 0.0,
    start: int = 0,
    timestamps: Sequence[float] | None = None,
) -> list[int]:
    """Indices of ``num_frames`` frames starting at ``start``, spaced to play at ``target_fps``.

    step = src_fps / target_fps source frames per output frame (1 when either fps is 0, i.e.
    native rate); index_k = round(start + k * step). A variable-frame-rate video (``timestamps``, the
    frames' presentation times, with :func:`variable_rate`) is sampled by time instead: index_k is the frame
    whose time is nearest to t_start + k / target_fps. Raises ValueError when the clip is too short.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames: expected >= 1, got {num_frames}")
    need = max_start(available, src_fps, num_frames, target_fps, timestamps)
    if _by_time(available, target_fps, timestamps):
        if need < 0:
            raise ValueError(
                f"only {timestamps[-1] - timestamps[0]:.3g} s of video (expected >= {(num_frames - 1) / target_fps:.3g} "
                f"s for {num_frames} frames at {target_fps:g} fps)"
            )
        if not 0 <= start <= need:
            raise ValueError(f"start frame {start}: expected 0..{need}")
        return [_nearest(timestamps, timestamps[start] + k / target_fps) for k in range(num_frames)]
    step = src_fps / target_fps if target_fps > 0 and src_fps > 0 else 1.0
    if need < 0:
        span = math.floor((num_frames - 1) * step + 0.5) + 1
        raise ValueError(
            f"only {available} frames (expected >= {span} for {num_frames} frames at step {step:.3g})"
        )
    if not 0 <= start <= need:
        raise ValueError(f"start frame {start}: expected 0..{need}")
    return [int(math.floor(start + k * step + 0.5)) for k in range(num_frames)]


def max_start(
    available: int,
    src_fps: float,
    num_frames: int,
    target_fps: float = 0.0,
    timestamps: Sequence[float] | None = None,
) -> int:
    """Largest start frame that still fits the clip; negative when the video is too short."""
    if _by_time(available, target_fps, timestamps):
        d = _intervals(timestamps)
        tol = d[len(d) // 2] / 2  # the last sample may land up to half a frame past the last frame's time
        latest = timestamps[-1] + tol - (num_frames - 1) / target_fps
        return bisect.bisect_right(timestamps, latest) - 1
    step = src_fps / target_fps if target_fps > 0 and src_fps > 0 else 1.0
    last = math.floor((num_frames - 1) * step + 0.5)
    return available - 1 - last


def _by_time(available: int, target_fps: float, timestamps: Sequence[float] | None) -> bool:
    return (
        target_fps > 0
        and timestamps is not None
        and len(timestamps) == available
        and variable_rate(timestamps)
    )


def _nearest(timestamps: Sequence[float], t: float) -> int:
    j = bisect.bisect_left(timestamps, t)
    if j == 0:
        return 0
    if j == len(timestamps):
        return len(timestamps) - 1
    return j if timestamps[j] - t < t - timestamps[j - 1] else j - 1


def make_buckets(
    height: int, width: int, *, multiple: int = 16, aspect: bool = True
) -> list[tuple[int, int]]:
    """Resolution buckets ``(h, w)`` of about ``height * width`` pixels; one bucket when not ``aspect``."""
    if height < 1 or width < 1 or multiple < 1:
        raise ValueError(f"buckets: height, width, multiple must be >= 1, got {height}, {width}, {multiple}")
    if not aspect:
        return [(height, width)]
    area = height * width
    buckets = set()
    for r in BUCKET_RATIOS:
        h = max(multiple, round(math.sqrt(area / r) / multiple) * multiple)
        w = max(multiple, round(math.sqrt(area * r) / multiple) * multiple)
        buckets.add((h, w))
    if height % multiple == 0 and width % multiple == 0:
        # the nearest ratio bucket, not the target itself (which a near-square target's transpose is nearest to)
        ratio_buckets = sorted(buckets)
        for hw in sorted({(height, width), (width, height)}):
            if min(BUCKET_RATIOS) <= hw[1] / hw[0] <= max(BUCKET_RATIOS):
                buckets.discard(nearest_bucket(*hw, ratio_buckets))
        buckets |= {(height, width), (width, height)}
    return sorted(buckets, key=lambda hw: hw[1] / hw[0])


def nearest_bucket(h: int, w: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest to ``w / h`` in log space."""
    target = math.log(w / h)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - target))


def cover_scale(h: int, w: int, out_h: int, out_w: int) -> float:
    """Scale factor that makes an ``h x w`` frame cover ``out_h x out_w`` with aspect preserved."""
    return max(out_h / h, out_w / w)


def resize_crop_normalize(
    frames: torch.Tensor, out_h: int, out_w: int, *, chunk: int = 8, pixel_aspect: float = 1.0
) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` -> float32 ``(3, T, out_h, out_w)`` in [-1, 1]: cover-resize, centre crop.

    Downscaling uses antialiased bilinear filtering; x_out = x / 127.5 - 1. Frames go through in chunks of
    ``chunk``: float32 copies of a whole full-resolution clip took 4-8x its uint8 frames. ``pixel_aspect``: the
    width / height of a stored pixel; the frames are resized as shown, ``W * pixel_aspect`` wide.
    """
    out = torch.empty((3, len(frames), out_h, out_w), dtype=torch.float32, device=frames.device)
    for k, x in _resize_crop_chunks(frames, out_h, out_w, chunk, pixel_aspect):
        out[:, k : k + chunk] = (x / 127.5 - 1.0).clamp_(-1.0, 1.0).permute(1, 0, 2, 3)  # -> (3, t, h, w)
    return out


def resize_crop(
    frames: torch.Tensor, out_h: int, out_w: int, *, chunk: int = 8, pixel_aspect: float = 1.0
) -> torch.Tensor:
    """:func:`resize_crop_normalize`'s resize and crop, rounded to uint8 ``(3, T, out_h, out_w)`` (a quarter of
    float32's memory); ``x / 127.5 - 1`` of it is that function's output to within 0.5 / 127.5."""
    out = torch.empty((3, len(frames), out_h, out_w), dtype=torch.uint8, device=frames.device)
    for k, x in _resize_crop_chunks(frames, out_h, out_w, chunk, pixel_aspect):
        out[:, k : k + chunk] = x.round_().clamp_(0, 255).permute(1, 0, 2, 3)
    return out


def _resize_crop_chunks(frames: torch.Tensor, out_h: int, out_w: int, chunk: int, pixel_aspect: float = 1.0):
    """``(k, float32 (t, 3, out_h, out_w))`` for the frames from k: cover-resized (as shown: ``W * pixel_aspect``
    wide) and centre-cropped."""
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames: expected uint8 (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    t, h, w, _ = frames.shape
    s = cover_scale(h, w * pixel_aspect, out_h, out_w)
    rh, rw = max(out_h, round(h * s)), max(out_w, round(w * pixel_aspect * s))
    top, left = (rh - out_h) // 2, (rw - out_w) // 2
    for k in range(0, t, chunk):
        x = frames[k : k + chunk].permute(0, 3, 1, 2).float()  # (t, H, W, 3) -> (t, 3, H, W)
        if (rh, rw) != (h, w):
            aa = s * min(pixel_aspect, 1.0) < 1  # either side shrinks
            x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=aa)
        yield k, x[:, :, top : top + out_h, left : left + out_w]
