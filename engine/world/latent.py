"""The toy world's "VAE": an exact, invertible latent map (no learned weights).

    x = video / 127.5 - 1                                  in [-1, 1], (B, 3, T, 32, 32)
    z = (pixel_unshuffle(x, 2) - SHIFT) / SCALE            (B, 12, T, 16, 16)

SHIFT and SCALE are the mean and std of x over rendered toy videos (measured once: -0.895, 0.378;
rounded), so z has roughly zero mean and unit variance as the flow's noise does. decode inverts it
and rounds to uint8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FACTOR = 2
SHIFT = -0.9
SCALE = 0.4
LATENT_CHANNELS = 3 * FACTOR * FACTOR  # 12


def encode(video: torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> latent float32 (B, 12, T, H/2, W/2)."""
    if video.dim() != 5 or video.shape[-1] != 3 or video.dtype != torch.uint8:
        raise ValueError(f"video: expected uint8 (B, T, H, W, 3), got {video.dtype} {tuple(video.shape)}")
    B, T, H, W, _ = video.shape
    x = video.float().div(127.5).sub(1.0)
    x = x.permute(0, 1, 4, 2, 3).reshape(B * T, 3, H, W)  # (B, T, H, W, 3) -> (B*T, 3, H, W)
    z = F.pixel_unshuffle(x, FACTOR)  # (B*T, 12, H/2, W/2)
    z = z.reshape(B, T, LATENT_CHANNELS, H // FACTOR, W // FACTOR).transpose(1, 2)  # -> (B, 12, T, h, w)
    return (z - SHIFT) / SCALE


def decode(z: torch.Tensor) -> torch.Tensor:
    """latent (B, 12, T, h, w) -> uint8 (B, T, 2h, 2w, 3) (clamped, rounded)."""
    if z.dim() != 5 or z.shape[1] != LATENT_CHANNELS:
        raise ValueError(f"latent: expected (B, {LATENT_CHANNELS}, T, h, w), got {tuple(z.shape)}")
    B, C, T, h, w = z.shape
    x = (z.float() * SCALE + SHIFT).transpose(1, 2).reshape(B * T, C, h, w)  # -> (B*T, 12, h, w)
    x = F.pixel_shuffle(x, FACTOR)  # (B*T, 3, 2h, 2w)
    x = x.reshape(B, T, 3, h * FACTOR, w * FACTOR).permute(0, 1, 3, 4, 2)  # -> (B, T, H, W, 3)
    return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def image_latent(video_or_image: torch.Tensor) -> torch.Tensor:
    """The first frame's latent (B, 12, 1, h, w) from uint8 (B, T, H, W, 3) or (B, H, W, 3)."""
    v = video_or_image if video_or_image.dim() == 5 else video_or_image.unsqueeze(1)
    return encode(v[:, :1])
