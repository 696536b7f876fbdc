"""HunyuanVideo-1.5 video DiT (the WMSD paper's backbone), weight-compatible with diffusers'
HunyuanVideo15Transformer3DModel.

Math. Video tokens x (B, S, dim) from the patchified latent [x_t, first-frame latent, mask] (I2V:
in_channels = 2C + 1). Context tokens c = [image tokens (SigLIP, 729), ByT5 glyph tokens, refined
Qwen2.5-VL text tokens], each plus a learned condition-type vector, valid tokens first. temb =
TimestepMLP(sinusoid(t)) [+ TimestepMLP_r(sinusoid(t_r)) for MeanFlow]. Per dual-stream block, with
(b1, s1, g1, b2, s2, g2) = Linear(silu(temb)) separately for x and for c:
    x', c' = JointAttn(LN(x) * (1 + s1) + b1, LN(c) * (1 + s1c) + b1c)    # per-head QK RMSNorm,
    x = x + g1 * x';  c = c + g1c * c'                                       # 3D RoPE on x only
    x = x + g2 * FFN(LN(x) * (1 + s2) + b2);  c likewise with its own FFN    # GELU(tanh) MLPs
Head: LN(x) * (1 + s) + b with (s, b) = Linear(silu(temb)), a Linear, unpatchify.
Text refiner (on the Qwen tokens only, before the blocks): temb_r = TimestepMLP(sinusoid(t)) +
SiLU-MLP(masked mean of the text); x = Linear(text); per block x = x + g1 * SelfAttn(LN(x)),
x = x + g2 * SiLU-MLP(LN(x)), (g1, g2) = Linear(silu(temb_r)); affine LayerNorms, no QK norm.

Masks. diffusers builds dense (S + L)^2 boolean masks. Here every stream is reordered valid-first (a
stable sort: attention without positions on the context is permutation-equivariant, so the valid
tokens' results are unchanged), trimmed to the longest valid length in the batch, and attention gets
key lengths (``k_lengths``) — or none at all when every sample has the same count (B = 1), which
lets SDPA use its flash/cuDNN kernels. Padding tokens' own outputs differ from diffusers' (they are
never read). Image tokens are masked out per sample when that sample's image embedding is all zero
(T2V); diffusers decides once for the whole batch — the same for any batch that does not mix both.

Layout differences from diffusers (the adapter converts both ways, bit-exactly): the patch embedding
is one Linear on patchified tokens instead of a Conv3d; q, k, v projections are fused (``qkv``) for
the video, the context and the refiner streams.

Precision: sinusoids, RoPE tables, norm statistics, modulation vectors and gated residual sums in
fp32 (kernels.adaln); ``keep_fp32`` modules stay fp32 under :meth:`HunyuanVideo15Model.cast`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from kernels.rope import rope_3d_tables
from models.adapter import KeyMap, config_from_diffusers, config_to_diffusers, preset_config
from models.layers import (
    MLP,
    DiffusersInterop,
    JointAttention,
    LayerNormFP32,
    SelfAttention,
    TimestepEmbedder,
    adaln,
    floating_to,
    gated_add,
    patchify,
    timestep_embedding,
    unpatchify,
)
from models.sp import SequenceParallel
from models.wan import WanImageEmbedding

FREQ_DIM = 256  # timestep sinusoid size (diffusers' Timesteps(256))
GLYPH_HIDDEN = 2048  # hidden size of the ByT5 projection (fixed in diffusers)
IMAGE_TOKENS = 729  # SigLIP so400m/14 at 384px: 27 x 27 patch tokens
REFINER_MLP_RATIO = 4.0  # the text refiner's FFN width / dim: fixed in diffusers, not the config's mlp_ratio

# Fields of diffusers' HunyuanVideo15Transformer3DModel config (same names and defaults).
_DIFFUSERS_FIELDS = (
    "in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "num_layers",
    "num_refiner_layers", "mlp_ratio", "patch_size", "patch_size_t", "qk_norm", "text_embed_dim",
    "text_embed_2_dim", "image_embed_dim", "rope_theta", "rope_axes_dim", "target_size", "task_type",
    "use_meanflow",
)  # fmt: skip


@dataclass
class HunyuanVideo15Config:
    """HunyuanVideo-1.5 DiT hyper-parameters: the diffusers config fields plus our backend switches."""

    in_channels: int = 65  # [x_t (32), first-frame latent (32), mask (1)]
    out_channels: int = 32
    num_attention_heads: int = 16
    attention_head_dim: int = 128
    num_layers: int = 54
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 1  # spatial patch (h = w)
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"  # per-head RMSNorm on q and k
    text_embed_dim: int = 3584  # Qwen2.5-VL-7B hidden size
    text_embed_2_dim: int = 1472  # ByT5-small (glyph) hidden size
    image_embed_dim: int = 1152  # SigLIP so400m hidden size
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, int, int] = (16, 56, 56)  # RoPE channels per axis (t, h, w)
    target_size: int = 640  # pixel bucket size of the pipeline (kept for diffusers)
    task_type: str = "i2v"  # kept for diffusers; the architecture is the same for t2v
    use_meanflow: bool = False  # second timestep embedder for timestep_r (MeanFlow SR models)
    attention_backend: str = "sdpa"  # kernels.attention backend: triton | sdpa | flash_attn | te | torch
    norm_backend: str = "auto"  # kernels.adaln backend: auto (triton on CUDA) | triton | torch

    def __post_init__(self):
        self.rope_axes_dim = tuple(int(d) for d in self.rope_axes_dim)
        if len(self.rope_axes_dim) != 3 or sum(self.rope_axes_dim) != self.attention_head_dim:
            raise ValueError(
                f"rope_axes_dim: expected 3 sizes summing to attention_head_dim={self.attention_head_dim}, "
                f"got {self.rope_axes_dim}"
            )
        if self.qk_norm != "rms_norm":
            raise ValueError(
                f"qk_norm: expected 'rms_norm' (the only one HunyuanVideo-1.5 uses), got {self.qk_norm!r}"
            )

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def patch(self) -> tuple[int, int, int]:
        """(t, h, w) patch, the same property every family's config has."""
        return (self.patch_size_t, self.patch_size, self.patch_size)

    @property
    def text_dim(self) -> int:
        """Width of cond["text"], the same property every family's config has (Wan: its field)."""
        return self.text_embed_dim

    @property
    def ffn_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @property
    def refiner_ffn_dim(self) -> int:
        return int(self.dim * REFINER_MLP_RATIO)

    @classmethod
    def flavour(cls, name: str, **overrides: Any) -> HunyuanVideo15Config:
        """A named size preset (see ``FLAVOURS``) with field overrides."""
        return preset_config(cls, FLAVOURS, name, overrides, family="HunyuanVideo-1.5")

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any], **overrides: Any) -> HunyuanVideo15Config:
        """From a diffusers config.json dict (unknown ``_``-prefixed keys are ignored)."""
        return config_from_diffusers(cls, _DIFFUSERS_FIELDS, config, overrides)

    def to_diffusers_config(self) -> dict[str, Any]:
        return config_to_diffusers(self, _DIFFUSERS_FIELDS)


FLAVOURS: dict[str, dict[str, Any]] = {
    # Tiny, for unit tests: 4 latent channels (in = 2 * 4 + 1).
    "debug": dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                  num_refiner_layers=2, text_embed_dim=24, text_embed_2_dim=20, image_embed_dim=12,
                  rope_axes_dim=(4, 6, 6)),
    "i2v-480p": dict(),  # hunyuanvideo-community/HunyuanVideo-1.5-480p_i2v: 8.3B, 54 blocks, dim 2048
    "t2v-480p": dict(task_type="t2v"),  # same architecture; the pipeline feeds zero image conditions
}  # fmt: skip


def _valid_first(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable reorder of tokens (B, L, D) so each row's valid tokens (mask (B, L) bool) come first, in
    order; padding is zeroed. -> (tokens (B, L, D), valid counts (B,) int64)."""
    order = torch.sort((~mask).to(torch.int32), dim=1, stable=True).indices  # (B, L)
    tokens = tokens.gather(1, order.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    n = mask.sum(dim=1)
    valid = torch.arange(mask.shape[1], device=mask.device)[None, :] < n[:, None]  # (B, L)
    return torch.where(valid.unsqueeze(-1), tokens, 0.0).to(tokens.dtype), n


def _trim(n: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """Longest valid length of a batch (at least 1) and the key lengths to mask with (None when every
    sample has the same count: no mask needed). One host sync."""
    lo, hi = (int(v) for v in torch.stack([n.min(), n.max()]).tolist())
    return max(hi, 1), (None if lo == hi else n)


class GlyphProjection(nn.Module):
    """ByT5 glyph tokens (B, L, in) -> (B, L, dim): LN -> Linear -> GELU -> Linear -> GELU -> Linear."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.norm = LayerNormFP32(in_dim, eps=1e-5)
        self.fc1 = nn.Linear(in_dim, GLYPH_HIDDEN)
        self.fc2 = nn.Linear(GLYPH_HIDDEN, GLYPH_HIDDEN)
        self.fc3 = nn.Linear(GLYPH_HIDDEN, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(tokens).to(self.fc1.weight.dtype)
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(h)))))


class RefinerBlock(nn.Module):
    """Token-refiner block: gated self-attention and SiLU MLP on affine-LayerNormed text (module doc)."""

    def __init__(self, cfg: HunyuanVideo15Config):
        super().__init__()
        dim = cfg.dim
        self.norm_backend = cfg.norm_backend
        self.norm1 = LayerNormFP32(dim, eps=1e-6)
        self.attn = SelfAttention(dim, cfg.num_attention_heads, qk_norm=None, backend=cfg.attention_backend)
        self.norm2 = LayerNormFP32(dim, eps=1e-6)
        self.ffn = MLP(dim, cfg.refiner_ffn_dim, act="silu")
        self.gates = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """x (B, L, dim) valid-first; temb_act = silu(temb) (B, dim); lengths (B,) or None (all valid)."""
        gate1, gate2 = self.gates(temb_act).float().unsqueeze(1).chunk(2, dim=-1)  # 2 x (B, 1, dim)
        x = gated_add(x, self.attn(self.norm1(x), k_lengths=lengths), gate1, backend=self.norm_backend)
        return gated_add(x, self.ffn(self.norm2(x)), gate2, backend=self.norm_backend)


class TokenRefiner(nn.Module):
    """Qwen2.5-VL text (B, L, text_dim) -> refined tokens (B, L, dim), conditioned on t and the mean text."""

    def __init__(self, cfg: HunyuanVideo15Config):
        super().__init__()
        dim = cfg.dim
        self.time_embed = TimestepEmbedder(FREQ_DIM, dim)
        self.pool_embed = MLP(cfg.text_embed_dim, dim, dim, act="silu")
        self.proj_in = nn.Linear(cfg.text_embed_dim, dim)
        self.blocks = nn.ModuleList(RefinerBlock(cfg) for _ in range(cfg.num_refiner_layers))

    def forward(
        self, text: torch.Tensor, n: torch.Tensor, lengths: torch.Tensor | None, timestep: torch.Tensor
    ) -> torch.Tensor:
        """text (B, L, text_dim) valid-first with n (B,) valid tokens; lengths = n or None (all valid)."""
        valid = (torch.arange(text.shape[1], device=text.device)[None, :] < n[:, None]).float()  # (B, L)
        pooled = (text.float() * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
        temb = self.time_embed(timestep_embedding(timestep, FREQ_DIM))
        temb = temb + self.pool_embed(pooled.to(self.pool_embed.fc1.weight.dtype))  # (B, dim)
        x, temb_act = self.proj_in(text), F.silu(temb).to(text.dtype)
        for block in self.blocks:
            x = block(x, temb_act, lengths)
        return x


class HunyuanVideo15Block(nn.Module):
    """One dual-stream block (module doc). Plain module: FSDP/AC wrap it from outside."""

    def __init__(self, cfg: HunyuanVideo15Config):
        super().__init__()
        dim = cfg.dim
        self.norm_backend = cfg.norm_backend
        self.x_mod = nn.Linear(dim, 6 * dim)
        self.c_mod = nn.Linear(dim, 6 * dim)
        self.attn = JointAttention(dim, cfg.num_attention_heads, eps=1e-6, backend=cfg.attention_backend)
        self.x_ffn = MLP(dim, cfg.ffn_dim, act="gelu_tanh")
        self.c_ffn = MLP(dim, cfg.ffn_dim, act="gelu_tanh")

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        temb_act: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        k_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, dim), c (B, L, dim), temb_act = silu(temb) (B, dim), rope (S + L, D/2) tables,
        k_lengths (B,) = S + valid context tokens or None."""
        kw = dict(eps=1e-6, backend=self.norm_backend)
        mx = self.x_mod(temb_act).float().unsqueeze(1).chunk(6, dim=-1)  # 6 x (B, 1, dim): b1 s1 g1 b2 s2 g2
        mc = self.c_mod(temb_act).float().unsqueeze(1).chunk(6, dim=-1)
        ax, ac = self.attn(adaln(x, mx[1], mx[0], **kw), adaln(c, mc[1], mc[0], **kw), rope, k_lengths)
        x = gated_add(x, ax, mx[2], backend=self.norm_backend)
        c = gated_add(c, ac, mc[2], backend=self.norm_backend)
        x = gated_add(x, self.x_ffn(adaln(x, mx[4], mx[3], **kw)), mx[5], backend=self.norm_backend)
        c = gated_add(c, self.c_ffn(adaln(c, mc[4], mc[3], **kw)), mc[5], backend=self.norm_backend)
        return x, c


class HunyuanVideo15Head(nn.Module):
    """Final adaLN ((scale, shift) = Linear(silu(temb)), no affine) and the Linear to patch pixels."""

    def __init__(self, cfg: HunyuanVideo15Config):
        super().__init__()
        self.norm_backend = cfg.norm_backend
        self.mod = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch))

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        """x (B, S, dim), temb_act (B, dim) -> (B, S, out_channels * prod(patch)), features (c, pt, ph, pw)."""
        scale, shift = self.mod(temb_act).float().unsqueeze(1).chunk(2, dim=-1)  # 2 x (B, 1, dim)
        return self.proj(adaln(x, scale, shift, eps=1e-6, backend=self.norm_backend))


def _keymap(cfg: HunyuanVideo15Config) -> KeyMap:
    """Our keys -> diffusers' keys (module doc: fused projections, Linear patch embedding)."""
    b, tb = "blocks.{i}.", "transformer_blocks.{i}."
    r, tr = "text_refiner.blocks.{i}.", "context_embedder.token_refiner.refiner_blocks.{i}."
    ce = "context_embedder."
    rules = [
        ("patch_embed.", ("x_embedder.proj.",)),
        ("time_embed.", ("time_embed.timestep_embedder.",)),
        ("time_embed_r.", ("time_embed.timestep_embedder_r.",)),
        ("image_embed.norm1.", ("image_embedder.norm_in.",)),
        ("image_embed.ff.fc1.", ("image_embedder.linear_1.",)),
        ("image_embed.ff.fc2.", ("image_embedder.linear_2.",)),
        ("image_embed.norm2.", ("image_embedder.norm_out.",)),
        ("glyph_embed.norm.", ("context_embedder_2.norm.",)),
        ("glyph_embed.fc1.", ("context_embedder_2.linear_1.",)),
        ("glyph_embed.fc2.", ("context_embedder_2.linear_2.",)),
        ("glyph_embed.fc3.", ("context_embedder_2.linear_3.",)),
        ("text_refiner.time_embed.", (ce + "time_text_embed.timestep_embedder.",)),
        ("text_refiner.pool_embed.fc1.", (ce + "time_text_embed.text_embedder.linear_1.",)),
        ("text_refiner.pool_embed.fc2.", (ce + "time_text_embed.text_embedder.linear_2.",)),
        ("text_refiner.proj_in.", (ce + "proj_in.",)),
        (r + "attn.qkv.", (tr + "attn.to_q.", tr + "attn.to_k.", tr + "attn.to_v.")),
        (r + "attn.out.", (tr + "attn.to_out.0.",)),
        (r + "ffn.fc1.", (tr + "ff.net.0.proj.",)),
        (r + "ffn.fc2.", (tr + "ff.net.2.",)),
        (r + "gates.", (tr + "norm_out.linear.",)),
        (r, (tr,)),  # norm1, norm2
        (b + "x_mod.", (tb + "norm1.linear.",)),
        (b + "c_mod.", (tb + "norm1_context.linear.",)),
        (b + "attn.x.qkv.", (tb + "attn.to_q.", tb + "attn.to_k.", tb + "attn.to_v.")),
        (b + "attn.x.norm_q.", (tb + "attn.norm_q.",)),
        (b + "attn.x.norm_k.", (tb + "attn.norm_k.",)),
        (b + "attn.x.out.", (tb + "attn.to_out.0.",)),
        (b + "attn.c.qkv.", (tb + "attn.add_q_proj.", tb + "attn.add_k_proj.", tb + "attn.add_v_proj.")),
        (b + "attn.c.norm_q.", (tb + "attn.norm_added_q.",)),
        (b + "attn.c.norm_k.", (tb + "attn.norm_added_k.",)),
        (b + "attn.c.out.", (tb + "attn.to_add_out.",)),
        (b + "x_ffn.fc1.", (tb + "ff.net.0.proj.",)),
        (b + "x_ffn.fc2.", (tb + "ff.net.2.",)),
        (b + "c_ffn.fc1.", (tb + "ff_context.net.0.proj.",)),
        (b + "c_ffn.fc2.", (tb + "ff_context.net.2.",)),
        ("head.mod.", ("norm_out.linear.",)),
        ("head.proj.", ("proj_out.",)),
    ]
    return KeyMap(tuple(rules))


class HunyuanVideo15Model(DiffusersInterop, nn.Module):
    """The HunyuanVideo-1.5 DiT. ``forward`` mirrors diffusers' (same keywords and layout);
    ``predict_velocity`` is the model-agnostic entry point used by the engine and recipes. ``blocks`` are
    the 54 dual-stream blocks (what FSDP/AC wrap); the 2-block text refiner stays with the root."""

    config_cls = HunyuanVideo15Config
    keep_fp32 = ("time_embed", "time_embed_r", "norm", "norm1", "norm2")
    # Linears an FP8 backend must leave in bf16: the blocks' modulation, fed one row per sample (its FP8
    # casts would cost more than its matmul saves; MEASURED.md's torchao pitfall)
    fp8_skip = ("x_mod", "c_mod")

    def __init__(self, cfg: HunyuanVideo15Config):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embed = nn.Linear(cfg.in_channels * math.prod(cfg.patch), dim)
        self.time_embed = TimestepEmbedder(FREQ_DIM, dim)
        self.time_embed_r = TimestepEmbedder(FREQ_DIM, dim) if cfg.use_meanflow else None
        self.text_refiner = TokenRefiner(cfg)
        self.glyph_embed = GlyphProjection(cfg.text_embed_2_dim, dim)
        self.image_embed = WanImageEmbedding(cfg.image_embed_dim, dim)  # same math: LN -> GELU MLP -> LN
        self.cond_type_embed = nn.Embedding(3, dim)  # added to text (0), glyph (1), image (2) tokens
        self.blocks = nn.ModuleList(HunyuanVideo15Block(cfg) for _ in range(cfg.num_layers))
        self.head = HunyuanVideo15Head(cfg)
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sequence_parallel: SequenceParallel | None = None

    def set_sequence_parallel(self, group: dist.ProcessGroup | None) -> None:
        """Ulysses sequence parallelism over ``group`` (models/sp.py; engine.parallel.apply_sp calls it): each
        rank runs its chunk of the video tokens through the dual-stream blocks (the context stream, short,
        is computed whole on every rank) and returns the whole velocity. The text refiner is not split."""
        self.sequence_parallel = None if group is None else SequenceParallel(group)
        for block in self.blocks:
            block.attn.x.sequence_parallel = self.sequence_parallel

    def keymap(self) -> KeyMap:
        return _keymap(self.cfg)

    def their_shapes(self) -> dict[str, tuple[int, ...]]:
        cfg = self.cfg
        return {"x_embedder.proj.weight": (cfg.dim, cfg.in_channels, *cfg.patch)}

    # ---- forward ------------------------------------------------------------------------------

    def rope_tables(
        self, grid: tuple[int, int, int], context_len: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (S + context_len, head_dim/2) fp32: the video grid's 3D RoPE (cached per grid and
        device), then identity rows (cos 1, sin 0) for the context tokens, which HunyuanVideo leaves
        unrotated."""
        key = (tuple(grid), str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_3d_tables(
                grid,
                self.cfg.attention_head_dim,
                theta=self.cfg.rope_theta,
                axes_dims=self.cfg.rope_axes_dim,
                device=device,
            )
        cos, sin = self._rope_cache[key]
        pad = (0, 0, 0, context_len)
        return F.pad(cos, pad, value=1.0), F.pad(sin, pad, value=0.0)

    def embed_time(self, timestep: torch.Tensor, timestep_r: torch.Tensor | None, batch: int) -> torch.Tensor:
        """timestep (B,) float in [0, 1000] (and timestep_r for MeanFlow) -> temb (B, dim)."""
        for name, t in (("timestep", timestep), ("timestep_r", timestep_r)):
            if t is not None and tuple(t.shape) != (batch,):
                raise ValueError(f"{name}: expected shape ({batch},), got {tuple(t.shape)}")
        temb = self.time_embed(timestep_embedding(timestep, FREQ_DIM))
        if timestep_r is not None:
            if self.time_embed_r is None:
                raise ValueError("timestep_r: this model has no MeanFlow embedder (use_meanflow=False)")
            temb = temb + self.time_embed_r(timestep_embedding(timestep_r, FREQ_DIM))
        return temb

    def embed_context(
        self,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        glyph: torch.Tensor | None,
        glyph_mask: torch.Tensor | None,
        image: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Context tokens (B, L, dim), valid first and trimmed, and their key lengths (None: all valid)."""
        B, emb = text.shape[0], self.cond_type_embed.weight
        text, n = _valid_first(text, self._mask(text_mask, text, "encoder_attention_mask"))
        L, lengths = _trim(n)
        parts = [self.text_refiner(text[:, :L], n, lengths, timestep) + emb[0]]
        masks = [torch.arange(L, device=text.device)[None, :] < n[:, None]]
        if glyph is not None:
            parts.insert(0, self.glyph_embed(glyph) + emb[1])
            masks.insert(0, self._mask(glyph_mask, glyph, "encoder_attention_mask_2"))
        if image is not None:
            parts.insert(0, self.image_embed(image) + emb[2])
            shown = image.flatten(1).ne(0).any(dim=1)  # (B,): all-zero image embeddings mean T2V
            masks.insert(0, shown[:, None].expand(B, image.shape[1]))
        tokens, n = _valid_first(torch.cat(parts, dim=1), torch.cat(masks, dim=1))
        L, lengths = _trim(n)
        return tokens[:, :L], lengths

    @staticmethod
    def _mask(mask: torch.Tensor | None, tokens: torch.Tensor, name: str) -> torch.Tensor:
        if mask is None:
            return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        if tuple(mask.shape) != tuple(tokens.shape[:2]):
            raise ValueError(f"{name}: expected shape {tuple(tokens.shape[:2])}, got {tuple(mask.shape)}")
        return mask.bool()

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        timestep_r: torch.Tensor | None = None,
        encoder_hidden_states_2: torch.Tensor | None = None,
        encoder_attention_mask_2: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity (B, out_channels, F, H, W) for latents (B, in_channels, F, H, W).

        timestep (B,) float in diffusers' [0, 1000] scale; encoder_hidden_states: Qwen2.5-VL text
        (B, L, text_embed_dim) with encoder_attention_mask (B, L) (None: all valid);
        encoder_hidden_states_2: ByT5 glyph tokens (B, L2, text_embed_2_dim) with their mask (None: no
        glyph tokens); image_embeds: SigLIP tokens (B, 729, image_embed_dim) (None or all zero: T2V).
        """
        cfg = self.cfg
        if hidden_states.dim() != 5 or hidden_states.shape[1] != cfg.in_channels:
            raise ValueError(
                f"hidden_states: expected (B, {cfg.in_channels}, F, H, W), got {tuple(hidden_states.shape)}"
            )
        self._check_context(
            encoder_hidden_states, encoder_hidden_states_2, image_embeds, hidden_states.shape[0]
        )
        B, _, Fr, H, W = hidden_states.shape
        # latents and context in the weights' dtype (bf16 under FSDP2, which leaves the inputs as given): the
        # timesteps reach their sinusoids in fp32, as in diffusers
        hidden_states, encoder_hidden_states, encoder_hidden_states_2, image_embeds = floating_to(
            self.patch_embed.weight.dtype,
            hidden_states,
            encoder_hidden_states,
            encoder_hidden_states_2,
            image_embeds,
        )
        pt, ph, pw = cfg.patch
        grid = (Fr // pt, H // ph, W // pw)
        x = self.patch_embed(patchify(hidden_states, cfg.patch))  # (B, S, dim)
        temb_act = F.silu(self.embed_time(timestep, timestep_r, B)).to(x.dtype)  # (B, dim)
        c, lengths = self.embed_context(
            timestep,
            encoder_hidden_states,
            encoder_attention_mask,
            encoder_hidden_states_2,
            encoder_attention_mask_2,
            image_embeds,
        )
        rope = self.rope_tables(grid, c.shape[1], hidden_states.device)
        k_lengths = None if lengths is None else x.shape[1] + lengths  # the whole video's S
        sp = self.sequence_parallel
        if sp is not None:  # this rank's chunk of the video tokens
            sp.check(x.shape[1], cfg.num_attention_heads, f"HunyuanVideo15Model, token grid {grid}")
            x = sp.local(x)
        for block in self.blocks:
            x, c = block(x, c, temb_act, rope, k_lengths)
        out = self.head(x, temb_act)  # (B, S, C_out * pt * ph * pw)
        if sp is not None:
            out = sp.gather(out)
        return unpatchify(out, grid, cfg.patch, cfg.out_channels, channels_first=True)

    def _check_context(self, text, glyph, image, batch: int) -> None:
        cfg = self.cfg
        for name, t, d in (
            ("encoder_hidden_states", text, cfg.text_embed_dim),
            ("encoder_hidden_states_2", glyph, cfg.text_embed_2_dim),
            ("image_embeds", image, cfg.image_embed_dim),
        ):
            if t is not None and (t.dim() != 3 or t.shape[0] != batch or t.shape[2] != d):
                raise ValueError(f"{name}: expected ({batch}, L, {d}), got {tuple(t.shape)}")

    # ---- the engine's entry point -------------------------------------------------------------

    def predict_velocity(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Velocity v(x_t, t | cond) for x_t (B, C, F, h, w), t (B,) in [0, 1] (timestep = 1000 t).

        cond: "text" (B, L, text_embed_dim) Qwen2.5-VL states, optional "text_lengths" (B,) (valid
        tokens first); "image_latent" (B, C, 1, h, w) the first frame's latent (I2V; absent: T2V);
        "image_tokens" (B, 729, image_embed_dim) SigLIP tokens (absent: none, as T2V's zero image);
        HunyuanVideo-specific, optional: "text_2" (B, L2, text_embed_2_dim) ByT5 glyph states with
        "text_2_lengths" (B,) (absent: no quoted text in the prompt, as the pipeline encodes it).
        The input is [x_t, first-frame latent on frame 0 and zeros after, a 1-channel mask that is 1 on
        frame 0] as HunyuanVideo15ImageToVideoPipeline builds it; T2V passes zeros for both.
        """
        cfg = self.cfg
        if "text" not in cond:
            raise ValueError(
                f"cond: expected a 'text' entry (B, L, {cfg.text_embed_dim}), got keys {sorted(cond)}"
            )
        # the pipeline passes timestep_r (the next step's time) to these; our samplers do not
        if cfg.use_meanflow:
            raise ValueError(
                "HunyuanVideo-1.5 with use_meanflow = true needs timestep_r (the next sampling time) in every call, "
                "which predict_velocity does not take; use a checkpoint with use_meanflow = false"
            )
        B, C, Fr, h, w = x_t.shape
        if cfg.in_channels != 2 * C + 1:
            raise ValueError(f"x_t: {C} channels; this model takes 2C + 1 = {cfg.in_channels} input channels")
        if t.shape != (B,):
            raise ValueError(f"t: expected shape ({B},) (one time per sample), got {tuple(t.shape)}")
        image = cond.get("image_latent")
        cond_latent, mask = torch.zeros_like(x_t), torch.zeros_like(x_t[:, :1])
        if image is not None:
            if tuple(image.shape) != (B, C, 1, h, w):
                raise ValueError(
                    f"cond['image_latent']: expected {(B, C, 1, h, w)}, got {tuple(image.shape)}"
                )
            cond_latent[:, :, :1] = image.to(x_t.dtype)
            mask[:, :, 0] = 1.0
        x_in = torch.cat([x_t, cond_latent, mask], dim=1)  # (B, 2C + 1, F, h, w)
        text, glyph = cond["text"], cond.get("text_2")
        return self(
            x_in,
            1000.0 * t.float(),
            text,
            _lengths_mask(cond.get("text_lengths"), text),
            encoder_hidden_states_2=glyph,
            encoder_attention_mask_2=None
            if glyph is None
            else _lengths_mask(cond.get("text_2_lengths"), glyph),
            image_embeds=cond.get("image_tokens"),
        )

    # ---- utilities ----------------------------------------------------------------------------

    def flops_context(self, cond: dict[str, torch.Tensor], t: torch.Tensor | None = None) -> dict[str, Any]:
        """:meth:`flops_per_token`'s context arguments for what :meth:`predict_velocity` runs on ``cond``: the
        refiner's text trimmed to the longest valid text, the glyph and image projections on all their tokens,
        and the blocks' context trimmed as the model trims it: the longest per-sample count of valid text,
        glyph and shown image tokens (an all-zero image embedding, T2V, is masked out). ``t`` is taken as
        WanModel.flops_context takes it; unused (one time per sample)."""
        text, glyph, image = cond["text"], cond.get("text_2"), cond.get("image_tokens")
        B = text.shape[0]

        def counts(x, n) -> torch.Tensor:  # (B,) valid tokens per sample
            if x is None:
                return torch.zeros(B, dtype=torch.long)
            return torch.full((B,), x.shape[1]) if n is None else n.long().cpu().clamp(0, x.shape[1])

        shown = torch.zeros(B, dtype=torch.long)
        if image is not None:
            shown = image.flatten(1).ne(0).any(dim=1).long().cpu() * image.shape[1]
        n = counts(text, cond.get("text_lengths")) + counts(glyph, cond.get("text_2_lengths")) + shown
        return {
            "text_len": max(int(counts(text, cond.get("text_lengths")).max()), 1),
            "glyph_len": 0 if glyph is None else glyph.shape[1],
            "image_len": 0 if image is None else image.shape[1],
            "context_len": max(int(n.max()), 1),
        }

    def flops_per_token(
        self,
        seq_len: int,
        text_len: int,
        *,
        glyph_len: int = 0,
        image_len: int = IMAGE_TOKENS,
        context_len: int | None = None,
    ) -> float:
        """Forward matmul FLOPs per video token (2 per multiply-add; training ~ 3x this): text_len Qwen tokens
        through the refiner, glyph_len ByT5 tokens and image_len SigLIP tokens through their projections,
        context_len context tokens in the blocks (default text_len + glyph_len + image_len: all valid; fewer
        where the model trims padding or T2V's zero image tokens, see :meth:`flops_context`).

        Per token of the joint sequence (S video + Lc = context_len tokens), per block:
        8 d^2 (qkv, out) + 4 d f (FFN) + 4 (S + Lc) d (QK^T, PV). Per sample: modulation 24 d^2 per
        block, time and head embeddings, the text refiner on text_len tokens, the glyph and image
        projections. Video tokens also pay the patch embedding and the head.
        """
        c, d, f, S = self.cfg, self.cfg.dim, self.cfg.ffn_dim, seq_len
        Lc = text_len + glyph_len + image_len if context_len is None else context_len
        p, fr = math.prod(self.cfg.patch), self.cfg.refiner_ffn_dim
        per_joint_token = c.num_layers * (8 * d * d + 4 * d * f + 4 * (S + Lc) * d)
        per_token = per_joint_token + 2 * c.in_channels * p * d + 2 * d * c.out_channels * p
        time = 2 * d * (FREQ_DIM + d)
        per_sample = time * (2 if c.use_meanflow else 1) + c.num_layers * 24 * d * d + 4 * d * d
        refiner = text_len * (
            2 * c.text_embed_dim * d + (8 * d * d + 4 * d * fr + 4 * text_len * d) * c.num_refiner_layers
        )
        refiner += time + 2 * d * (c.text_embed_dim + d) + c.num_refiner_layers * 4 * d * d
        glyph = glyph_len * 2 * GLYPH_HIDDEN * (c.text_embed_2_dim + GLYPH_HIDDEN + d)
        image = image_len * 2 * c.image_embed_dim * (c.image_embed_dim + d)
        per_sample += Lc * per_joint_token + refiner + glyph + image
        return per_token + per_sample / S


def _lengths_mask(lengths: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor | None:
    """(B,) valid counts -> (B, L) bool mask of the first lengths[b] tokens (None: all valid)."""
    if lengths is None:
        return None
    if tuple(lengths.shape) != (tokens.shape[0],):
        raise ValueError(f"text lengths: expected shape ({tokens.shape[0]},), got {tuple(lengths.shape)}")
    return torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths.to(tokens.device)[:, None]
