"""Frozen encoders around the DiTs: video VAE, text encoder, image encoder; one small interface.

    vae.encode(video (B, 3, T, H, W) in [-1, 1]) -> latents (B, C, T', H', W'), normalised
    vae.decode(latents) -> video (B, 3, T, H, W) in about [-1, 1]
    text.encode(list[str]) -> (emb (B, L, D), lengths (B,)), zero past each length, L fixed
    image.encode(images (B, 3, H, W) in [-1, 1]) -> tokens (B, N, D)

Implemented with diffusers / transformers modules (never trust_remote_code, local folders only).
``load_encoders(family, path)`` reads a diffusers pipeline folder (``vae/``, ``text_encoder/``,
``tokenizer/``, ``image_encoder/``, ``image_processor/``); families register a loader in
``ENCODER_FAMILIES``. Wan: AutoencoderKLWan (latents normalised as (z - mean) / std with the VAE
config's latents_mean/std), UMT5 (pad to a fixed 512 tokens, embeddings zeroed past each prompt's
length, as Wan's pipeline does), CLIP ViT-H/14 (penultimate hidden states, 257 tokens).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ENCODER_FAMILIES",
    "Encoders",
    "ImageEncoder",
    "TextEncoder",
    "VideoVAE",
    "WanVAE",
    "load_encoders",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VideoVAE(nn.Module):
    """Interface: normalised latents in, pixels in [-1, 1] out. Subclasses wrap one VAE family."""

    latent_channels: int
    temporal_compression: int  # T' = 1 + (T - 1) // temporal_compression
    spatial_compression: int  # H' = H // spatial_compression

    def encode(
        self, video: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _check_video(video: torch.Tensor, temporal: int) -> None:
    if video.dim() != 5 or video.shape[1] != 3:
        raise ValueError(f"video: expected (B, 3, T, H, W) in [-1, 1], got shape {tuple(video.shape)}")
    if (video.shape[2] - 1) % temporal:
        raise ValueError(f"video: T={video.shape[2]} frames; expected 1 + {temporal} k (causal VAE)")


class WanVAE(VideoVAE):
    """diffusers ``AutoencoderKLWan``; latents z_norm = (z - latents_mean) / latents_std per channel."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        c = vae.config
        self.latent_channels = c.z_dim
        # From the architecture (the config's scale_factor_* fields are not set by every checkpoint).
        self.temporal_compression = 2 ** sum(c.temperal_downsample)
        self.spatial_compression = 2 ** len(c.temperal_downsample) * (c.patch_size or 1)
        self.register_buffer("mean", torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(c.latents_std).view(1, -1, 1, 1, 1), persistent=False)
        if self.mean.shape[1] != c.z_dim or self.std.shape[1] != c.z_dim:
            raise ValueError(f"VAE config: latents_mean/std need z_dim={c.z_dim} entries")

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32) -> WanVAE:
        from diffusers import AutoencoderKLWan

        return cls(AutoencoderKLWan.from_pretrained(str(path), torch_dtype=dtype, use_safetensors=True))

    @torch.no_grad()
    def encode(
        self, video: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """video (B, 3, T, H, W) in [-1, 1] -> (z - mean) / std, z the posterior mode (or a sample)."""
        _check_video(video, self.temporal_compression)
        dist = self.vae.encode(video.to(self.vae.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return (z.float() - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, T', H', W') -> video (B, 3, T, H, W), clamped to [-1, 1]."""
        if latents.dim() != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents: expected (B, {self.latent_channels}, T, H, W), got {tuple(latents.shape)}"
            )
        z = latents.float() * self.std + self.mean
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)


class TextEncoder(nn.Module):
    """Tokenizer + encoder (UMT5 for Wan): padded to ``max_length`` tokens, embeddings zeroed past length."""

    def __init__(self, tokenizer, model: nn.Module, *, max_length: int = 512):
        super().__init__()
        self.tokenizer, self.model, self.max_length = (
            tokenizer,
            model.eval().requires_grad_(False),
            max_length,
        )
        self.dim = model.config.d_model

    @classmethod
    def from_pretrained(
        cls,
        model_path: str | Path,
        tokenizer_path: str | Path,
        *,
        max_length: int = 512,
        dtype: torch.dtype = torch.float32,
    ) -> TextEncoder:
        from transformers import AutoTokenizer, UMT5EncoderModel

        tok = AutoTokenizer.from_pretrained(str(tokenizer_path), trust_remote_code=False)
        model = UMT5EncoderModel.from_pretrained(str(model_path), torch_dtype=dtype, use_safetensors=True)
        return cls(tok, model, max_length=max_length)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> emb (B, max_length, D) float32 with rows >= lengths[b] zero, lengths (B,) int64."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts: expected a list of strings")
        texts = [" ".join(t.split()) for t in texts]  # whitespace clean-up as Wan's prompt_clean
        batch = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        lengths = mask.gt(0).sum(dim=1).long()
        emb = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # (B, L, D)
        valid = torch.arange(emb.shape[1], device=device)[None, :] < lengths[:, None]  # (B, L)
        return emb * valid[..., None], lengths


class ImageEncoder(nn.Module):
    """CLIP vision tower: resize + normalise, then the penultimate layer's hidden states (Wan I2V)."""

    def __init__(
        self, model: nn.Module, *, mean=CLIP_MEAN, std=CLIP_STD, size: int | None = None, layer: int = -2
    ):
        super().__init__()
        self.model, self.layer = model.eval().requires_grad_(False), layer
        self.size = size or model.config.image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.dim = model.config.hidden_size

    @classmethod
    def from_pretrained(
        cls,
        model_path: str | Path,
        processor_path: str | Path | None = None,
        *,
        dtype: torch.dtype = torch.float32,
    ) -> ImageEncoder:
        from transformers import CLIPVisionModel

        model = CLIPVisionModel.from_pretrained(str(model_path), torch_dtype=dtype, use_safetensors=True)
        kw = {}
        cfg_file = Path(processor_path) / "preprocessor_config.json" if processor_path else None
        if cfg_file is not None and cfg_file.is_file():
            pc = json.loads(cfg_file.read_text())
            crop = pc.get("crop_size", pc.get("size"))
            size = crop.get("height", crop.get("shortest_edge")) if isinstance(crop, dict) else crop
            kw = dict(mean=pc.get("image_mean", CLIP_MEAN), std=pc.get("image_std", CLIP_STD), size=size)
        return cls(model, **kw)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> tokens (B, 1 + patches, hidden) float32."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std  # [-1, 1] -> CLIP's normalised pixels
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=x.to(dtype), output_hidden_states=True)
        return out.hidden_states[self.layer].float()


@dataclass
class Encoders:
    """The encoders of one model family; ``image`` is None for text-to-video families."""

    vae: VideoVAE
    text: TextEncoder
    image: ImageEncoder | None = None


def _load_wan(path: Path, dtype: torch.dtype) -> Encoders:
    image = None
    if (path / "image_encoder").is_dir():
        image = ImageEncoder.from_pretrained(path / "image_encoder", path / "image_processor", dtype=dtype)
    return Encoders(
        vae=WanVAE.from_pretrained(path / "vae", dtype=torch.float32),  # Wan's VAE runs in fp32
        text=TextEncoder.from_pretrained(path / "text_encoder", path / "tokenizer", dtype=dtype),
        image=image,
    )


ENCODER_FAMILIES: dict[str, Callable[[Path, torch.dtype], Encoders]] = {"wan": _load_wan}


def load_encoders(family: str, path: str | Path, *, dtype: torch.dtype = torch.float32) -> Encoders:
    """Encoders of ``family`` from a local diffusers pipeline folder (vae/, text_encoder/, tokenizer/, ...)."""
    if family not in ENCODER_FAMILIES:
        raise ValueError(f"encoder family {family!r}: expected one of {sorted(ENCODER_FAMILIES)}")
    path = Path(path)
    missing = [d for d in ("vae", "text_encoder", "tokenizer") if not (path / d).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{path}: missing sub-folders {missing} (expected a diffusers pipeline folder)"
        )
    return ENCODER_FAMILIES[family](path, dtype)
