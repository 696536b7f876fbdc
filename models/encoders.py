"""Frozen encoders around the DiTs: video VAE, text encoder, image encoder; one small interface.

    vae.encode(video (B, 3, T, H, W) in [-1, 1]) -> latents (B, C, T', H', W'), normalised
    vae.decode(latents) -> video (B, 3, T, H, W) in about [-1, 1]
    text.encode(list[str]) -> (emb (B, L, D), lengths (B,)), zero past each length, L fixed
    text.cond(list[str]) -> the DiT's text cond entries {"text", "text_lengths"[, "text_2", "text_2_lengths"]}
    image.encode(images (B, 3, H, W) in [-1, 1]) -> tokens (B, N, D)

Implemented with diffusers / transformers modules (never trust_remote_code, local folders only).
``load_encoders(family, path)`` reads a diffusers pipeline folder (``vae/``, ``text_encoder/``,
``tokenizer/``, ``image_encoder/``, ``image_processor/``); families register a loader in
``ENCODER_FAMILIES``. Wan: AutoencoderKLWan (latents normalised as (z - mean) / std with the VAE
config's latents_mean/std), UMT5 (pad to a fixed 512 tokens, embeddings zeroed past each prompt's
length, as Wan's pipeline does), CLIP ViT-H/14 (penultimate hidden states, 257 tokens).
"""

from __future__ import annotations

import html
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ENCODER_FAMILIES",
    "Encoders",
    "HunyuanVideo15TextEncoder",
    "HunyuanVideo15VAE",
    "ImageEncoder",
    "SiglipImageEncoder",
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
    def encode_i2v_condition(
        self, image: torch.Tensor, num_frames: int, last_image: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Wan2.1 I2V's condition latent, as WanImageToVideoPipeline builds it: the video [image, then
        ``num_frames - 1`` zero (grey) frames] through the VAE, normalised -> (B, C, T', H', W'). Its frames
        after the first are not zero: the causal VAE carries the image into them. FLF2V (``last_image``, the
        same shape): [image, ``num_frames - 2`` zero frames, last_image]."""
        for name, x in (("image", image), ("last_image", last_image)):
            if x is not None and (x.dim() != 4 or x.shape[1] != 3 or x.shape != image.shape):
                raise ValueError(f"{name}: expected (B, 3, H, W) in [-1, 1], got {tuple(x.shape)}")
        frames = [image.unsqueeze(2)]
        frames.append(
            image.new_zeros(image.shape[0], 3, num_frames - 1 - (last_image is not None), *image.shape[2:])
        )
        if last_image is not None:
            frames.append(last_image.unsqueeze(2).to(image.dtype))
        return self.encode(torch.cat(frames, dim=2))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, T', H', W') -> video (B, 3, T, H, W), clamped to [-1, 1]."""
        if latents.dim() != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents: expected (B, {self.latent_channels}, T, H, W), got {tuple(latents.shape)}"
            )
        z = latents.float() * self.std + self.mean
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)


def _prompt_clean(text: str) -> str:
    """Wan pipelines' prompt_clean: ftfy's fix_text where installed, HTML entities unescaped twice ("&amp;amp;"
    -> "&"), whitespace runs collapsed. Without the unescape, "&amp;" reached the tokenizer as five characters."""
    if importlib.util.find_spec("ftfy") is not None:
        import ftfy

        text = ftfy.fix_text(text)
    return " ".join(html.unescape(html.unescape(text)).split())


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
        texts = [_prompt_clean(t) for t in texts]
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

    def cond(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The text entries of the DiT's cond dict: {"text": emb, "text_lengths": lengths}."""
        emb, lengths = self.encode(texts)
        return {"text": emb, "text_lengths": lengths}


def _preprocessor_config(processor_path: str | Path | None) -> dict | None:
    """The preprocessor_config.json of a processor folder, or None (no folder given, or no such file)."""
    cfg_file = Path(processor_path) / "preprocessor_config.json" if processor_path else None
    if cfg_file is not None and cfg_file.is_file():
        return json.loads(cfg_file.read_text())
    return None


class ImageEncoder(nn.Module):
    """CLIP vision tower: resize + normalise, then the penultimate layer's hidden states (Wan I2V).

    Preprocessing as the pipeline's image processor: with ``shortest_edge`` (CLIPImageProcessor's
    ``size.shortest_edge`` and ``do_center_crop``) the short side is resized to it and the centre
    ``size`` x ``size`` is cropped; without, the frame is resized to ``size`` x ``size``. Bicubic with
    antialiasing (PIL's resampling, which the processors use)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        size: int | None = None,
        layer: int = -2,
        shortest_edge: int | None = None,
    ):
        super().__init__()
        self.model, self.layer = model.eval().requires_grad_(False), layer
        self.size = size or model.config.image_size
        self.shortest_edge = shortest_edge
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
        pc = _preprocessor_config(processor_path)
        if pc is not None:
            # absent keys take CLIPImageProcessor's defaults (crop 224, shortest edge 224, centre crop on)
            crop = pc.get("crop_size", {"height": 224, "width": 224})
            size = crop.get("height", crop.get("shortest_edge")) if isinstance(crop, dict) else crop
            kw = dict(mean=pc.get("image_mean", CLIP_MEAN), std=pc.get("image_std", CLIP_STD), size=size)
            resize = pc.get("size", {"shortest_edge": 224})
            if isinstance(resize, int):  # an older config's int: the short side, as the processor reads it
                resize = {"shortest_edge": resize}
            if pc.get("do_center_crop", True) and isinstance(resize, dict) and "shortest_edge" in resize:
                kw["shortest_edge"] = resize["shortest_edge"]
        return cls(model, **kw)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> (B, 3, size, size) normalised pixels in the tower's dtype."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        h = w = self.size
        # short side to shortest_edge (the long one rounded down, as the processor), then the centre crop
        if self.shortest_edge:
            H, W, e = *images.shape[-2:], self.shortest_edge
            # e * long / short as the processor rounds it (long * (e / short) fell a pixel short: a square
            # 49 x 49 frame gave 32 x 31 and a 32 x 1 crop)
            h, w = (e, int(e * W / H)) if H <= W else (int(e * H / W), e)
        x = F.interpolate(images.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        top, left = (h - self.size) // 2, (w - self.size) // 2  # 0, 0 without shortest_edge: no crop
        x = x[:, :, top : top + self.size, left : left + self.size]
        x = x.clamp(-1.0, 1.0)  # bicubic overshoot, which the processors' uint8 images cannot hold
        x = ((x + 1) / 2 - self.mean) / self.std  # [-1, 1] -> the tower's normalised pixels
        return x.to(next(self.model.parameters()).dtype)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> tokens (B, 1 + patches, hidden) float32."""
        out = self.model(pixel_values=self.pixel_values(images), output_hidden_states=True)
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


# ---- HunyuanVideo-1.5: its VAE, Qwen2.5-VL text (+ ByT5 glyph) encoders, SigLIP image encoder ----

# The pipeline's string, continuation-line spaces included: the tokens (and crop_start) depend on it.
HY15_SYSTEM_MESSAGE = "You are a helpful assistant. Describe the video by detailing the following aspects: \
        1. The main content and theme of the video. \
        2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects. \
        3. Actions, events, behaviors temporal relationships, physical movement changes of the objects. \
        4. background environment, light, style and atmosphere. \
        5. camera angles, movements, and transitions used in the video."


class HunyuanVideo15VAE(VideoVAE):
    """diffusers ``AutoencoderKLHunyuanVideo15``; latents z_norm = z * scaling_factor (the pipeline's).

    Encodes and decodes one sample at a time: diffusers' (0.42) attention blocks pass a (B, S, S) causal
    mask to SDPA with (B, 1, S, C) queries, which fails for B > 1 (the original HunyuanVideo-1.5 VAE
    unsqueezes it to (B, 1, S, S); huggingface/diffusers#13133). Samples do not interact in the VAE, so
    this is what a working batched call computes."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        c = vae.config
        self.latent_channels = c.latent_channels
        self.temporal_compression = c.temporal_compression_ratio
        self.spatial_compression = c.spatial_compression_ratio
        self.scale = float(c.scaling_factor)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32) -> HunyuanVideo15VAE:
        from diffusers import AutoencoderKLHunyuanVideo15

        return cls(
            AutoencoderKLHunyuanVideo15.from_pretrained(str(path), torch_dtype=dtype, use_safetensors=True)
        )

    @torch.no_grad()
    def encode(
        self, video: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """video (B, 3, T, H, W) in [-1, 1] -> z * scaling_factor, z the posterior mode (or a sample)."""
        _check_video(video, self.temporal_compression)
        z = []
        for v in video.to(self.vae.dtype).split(1):  # one sample at a time (class doc)
            dist = self.vae.encode(v).latent_dist
            z.append(dist.sample(generator) if sample else dist.mode())
        return torch.cat(z).float() * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, T', H', W') -> video (B, 3, T, H, W), clamped to [-1, 1]."""
        if latents.dim() != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latents: expected (B, {self.latent_channels}, T, H, W), got {tuple(latents.shape)}"
            )
        z = (latents.float() / self.scale).to(self.vae.dtype)
        video = torch.cat([self.vae.decode(v).sample for v in z.split(1)])  # one sample at a time (class doc)
        return video.float().clamp(-1, 1)


def _valid_first(emb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable reorder so each row's valid tokens come first (any padding side) and zero the rest:
    HunyuanVideo-1.5 uses no positions on text, so this leaves the model's output unchanged."""
    mask = mask.bool()
    order = torch.sort((~mask).to(torch.int32), dim=1, stable=True).indices  # (B, L)
    emb = emb.gather(1, order.unsqueeze(-1).expand(-1, -1, emb.shape[-1]))
    lengths = mask.sum(dim=1).long()
    valid = torch.arange(emb.shape[1], device=emb.device)[None, :] < lengths[:, None]
    return emb * valid[..., None], lengths


class HunyuanVideo15TextEncoder(nn.Module):
    """Qwen2.5-VL (text model) as HunyuanVideo-1.5 uses it: the chat template with the pipeline's system
    message, padded to ``max_length + crop_start`` tokens, hidden states of layer -(skip + 1), the first
    ``crop_start`` (template) tokens dropped. Optional ByT5 glyph encoder for quoted text in prompts
    (``encode_glyph``). ``encode`` returns (emb (B, max_length, D) valid-first and zero past lengths,
    lengths (B,)) like every TextEncoder."""

    def __init__(
        self,
        tokenizer,
        model: nn.Module,
        *,
        max_length: int = 1000,
        crop_start: int = 108,
        skip_layers: int = 2,
        system_message: str = HY15_SYSTEM_MESSAGE,
        glyph_tokenizer=None,
        glyph_model: nn.Module | None = None,
        glyph_max_length: int = 256,
    ):
        super().__init__()
        self.tokenizer, self.model = tokenizer, model.eval().requires_grad_(False)
        self.max_length, self.crop_start, self.skip_layers = max_length, crop_start, skip_layers
        self.system_message = system_message
        self.dim = model.config.hidden_size
        self.glyph_tokenizer, self.glyph_max_length = glyph_tokenizer, glyph_max_length
        self.glyph_model = None if glyph_model is None else glyph_model.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: torch.dtype = torch.float32
    ) -> HunyuanVideo15TextEncoder:
        """From a pipeline folder: text_encoder/ + tokenizer/ (Qwen2.5-VL), text_encoder_2/ + tokenizer_2/ (ByT5)."""
        from transformers import AutoTokenizer, Qwen2_5_VLTextModel, T5EncoderModel

        path = Path(path)
        tok = AutoTokenizer.from_pretrained(str(path / "tokenizer"), trust_remote_code=False)
        model = Qwen2_5_VLTextModel.from_pretrained(
            str(path / "text_encoder"), torch_dtype=dtype, use_safetensors=True
        )
        kw = {}
        if (path / "text_encoder_2").is_dir():
            kw = dict(
                glyph_tokenizer=AutoTokenizer.from_pretrained(
                    str(path / "tokenizer_2"), trust_remote_code=False
                ),
                glyph_model=T5EncoderModel.from_pretrained(
                    str(path / "text_encoder_2"), torch_dtype=dtype, use_safetensors=True
                ),
            )
        return cls(tok, model, **kw)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> emb (B, max_length, D) float32, valid tokens first, zero past lengths; lengths (B,)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts: expected a list of strings")
        chats = [
            [{"role": "system", "content": self.system_message}, {"role": "user", "content": t or " "}]
            for t in texts
        ]
        batch = self.tokenizer.apply_chat_template(
            chats,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            padding="max_length",
            max_length=self.max_length + self.crop_start,
            truncation=True,
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        emb = out.hidden_states[-(self.skip_layers + 1)][:, self.crop_start :].float()
        return _valid_first(emb, mask[:, self.crop_start :])

    def cond(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The text entries of the DiT's cond dict: "text" / "text_lengths" (Qwen2.5-VL), and with the glyph
        encoder loaded "text_2" / "text_2_lengths" for every prompt, as HunyuanVideo15(ImageToVideo)
        Pipeline.encode_prompt feeds encoder_hidden_states_2: zero length (all masked) for a prompt without
        quoted text, so cond and uncond keep the same keys."""
        emb, lengths = self.encode(texts)
        out = {"text": emb, "text_lengths": lengths}
        if self.has_glyph:
            out["text_2"], out["text_2_lengths"] = self.encode_glyph(texts)
        return out

    @property
    def has_glyph(self) -> bool:
        """Whether the ByT5 glyph encoder is loaded (``encode_glyph`` works)."""
        return self.glyph_model is not None

    @torch.no_grad()
    def encode_glyph(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """ByT5 states of each prompt's quoted text ('Text "a". Text "b". '), (B, glyph_max_length, D)
        and lengths (B,); zero length for prompts without quotes (as the pipeline does)."""
        if self.glyph_model is None:
            raise ValueError("encode_glyph: no ByT5 glyph encoder loaded (text_encoder_2/ missing)")
        device = next(self.glyph_model.parameters()).device
        L, D = self.glyph_max_length, self.glyph_model.config.d_model
        emb, lengths = torch.zeros(len(texts), L, D, device=device), torch.zeros(len(texts), dtype=torch.long)
        for i, text in enumerate(texts):
            quoted = list(dict.fromkeys(a or b for a, b in re.findall(r"\"(.*?)\"|“(.*?)”", text)))
            if not quoted:
                continue
            glyph = ". ".join(f'Text "{q}"' for q in quoted) + ". "
            tok = self.glyph_tokenizer(glyph, padding="max_length", max_length=L, truncation=True,
                                       add_special_tokens=True, return_tensors="pt").to(device)  # fmt: skip
            out = self.glyph_model(input_ids=tok.input_ids, attention_mask=tok.attention_mask.float())[0]
            e, n = _valid_first(out.float(), tok.attention_mask)
            emb[i], lengths[i] = e[0], n[0]
        return emb, lengths.to(device)


class SiglipImageEncoder(ImageEncoder):
    """SigLIP vision tower (HunyuanVideo-1.5 I2V): resize + normalise, the last hidden state (post-LN)."""

    @classmethod
    def from_pretrained(
        cls,
        model_path: str | Path,
        processor_path: str | Path | None = None,
        *,
        dtype: torch.dtype = torch.float32,
    ) -> SiglipImageEncoder:
        from transformers import SiglipVisionModel

        model = SiglipVisionModel.from_pretrained(str(model_path), torch_dtype=dtype, use_safetensors=True)
        kw = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        pc = _preprocessor_config(processor_path)
        if pc is not None:
            size = pc.get("size", {"height": 224, "width": 224})  # SiglipImageProcessor's default
            kw = dict(mean=pc.get("image_mean", kw["mean"]), std=pc.get("image_std", kw["std"]),
                      size=size.get("height") if isinstance(size, dict) else size)  # fmt: skip
        return cls(model, **kw)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> tokens (B, patches, hidden) float32 (729 for so400m/384)."""
        return self.model(pixel_values=self.pixel_values(images)).last_hidden_state.float()


def _load_hunyuan15(path: Path, dtype: torch.dtype) -> Encoders:
    image = None
    if (path / "image_encoder").is_dir():
        image = SiglipImageEncoder.from_pretrained(
            path / "image_encoder", path / "feature_extractor", dtype=dtype
        )
    return Encoders(
        vae=HunyuanVideo15VAE.from_pretrained(path / "vae", dtype=torch.float32),
        text=HunyuanVideo15TextEncoder.from_pretrained(path, dtype=dtype),
        image=image,
    )


ENCODER_FAMILIES: dict[str, Callable[[Path, torch.dtype], Encoders]] = {
    "wan": _load_wan,
    "hunyuan15": _load_hunyuan15,
}


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
