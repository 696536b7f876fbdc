"""Wan2.1 / Wan2.2 video DiT (T2V, I2V, TI2V), weight-compatible with diffusers' WanTransformer3DModel.

Math (per block, x (B, S, dim) video tokens, c the projected text, m = table + time_proj(silu(temb))):
    x = x + g1 * SelfAttn(LN(x) * (1 + s1) + b1; 3D RoPE)        # adaLN-modulated, gated
    x = x + CrossAttn(LN_affine(x), c [, image tokens])            # ungated
    x = x + g2 * FFN(LN(x) * (1 + s2) + b2)                         # GELU(tanh) MLP
with (b1, s1, g1, b2, s2, g2) = m split in six; m is (B, 1, 6, dim) for one timestep per sample or
(B, S, 6, dim) for per-token timesteps (Wan2.2 TI2V). The head is LN(x) * (1 + s) + b, a Linear,
and unpatchify.

Layout differences from diffusers (the adapter below converts both ways, bit-exactly): the patch
embedding is one Linear on patchified tokens instead of a Conv3d (same weights, reshaped); the
self-attention q, k, v projections are one fused Linear (``qkv``), the cross-attention k, v and the
image k, v are fused pairs (``kv``, ``added_kv``). Fewer, larger GEMMs.

Precision (what stays fp32, deliberately, as diffusers does): the timestep sinusoid, the RoPE
tables, every LayerNorm/RMSNorm statistic, the adaLN modulation vectors (table + projection), and
the gated residual sums are computed in fp32 and cast back to the stream dtype once. The parameters
named in ``WanModel.keep_fp32`` (time embedder, modulation tables, affine norms) stay fp32 under
:meth:`WanModel.cast`; everything else follows the compute dtype (bf16 on GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from kernels.rope import rope_3d_tables
from models.adapter import KeyMap, config_from_diffusers, config_to_diffusers, preset_config
from models.layers import (
    MLP,
    CrossAttention,
    DiffusersInterop,
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

# Fields of diffusers' WanTransformer3DModel config (same names and defaults).
_DIFFUSERS_FIELDS = (
    "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
    "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps", "image_dim",
    "added_kv_proj_dim", "rope_max_seq_len", "pos_embed_seq_len",
)  # fmt: skip


@dataclass
class WanConfig:
    """Wan DiT hyper-parameters: the diffusers config fields plus our backend switches."""

    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w) patch of the latent video
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16  # 2C + 4 for Wan2.1 I2V (x_t, frame mask, first-frame latent)
    out_channels: int = 16
    text_dim: int = 4096  # UMT5-XXL hidden size
    freq_dim: int = 256  # timestep sinusoid size
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True  # affine LayerNorm before cross-attention
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None  # CLIP image-token size (1280) for Wan2.1 I2V, else None
    added_kv_proj_dim: int | None = None  # image k/v input size (= dim) for I2V
    rope_max_seq_len: int = 1024  # kept for diffusers; our RoPE tables have no length limit
    pos_embed_seq_len: int | None = None  # FLF2V: learned position embedding of 2 x 257 image tokens
    attention_backend: str = "sdpa"  # kernels.attention backend: triton | sdpa | flash_attn | te | torch
    norm_backend: str = "auto"  # kernels.adaln backend: auto (triton on CUDA) | triton | torch
    theta: float = field(default=10000.0)  # RoPE base
    # predict_velocity's text: zero-padded to this many tokens, all attended to, as WanPipeline (and the original
    # Wan, which was trained so) feeds it; None: only each prompt's valid tokens (cond["text_lengths"]), as the
    # toy world's models were trained. Not a diffusers config field.
    text_len: int | None = 512

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size: expected 3 ints (t, h, w), got {self.patch_size}")
        if self.attention_head_dim % 2:
            raise ValueError(f"attention_head_dim: expected an even size, got {self.attention_head_dim}")
        if self.qk_norm not in ("rms_norm_across_heads", None):
            raise ValueError(f"qk_norm: expected 'rms_norm_across_heads' or None, got {self.qk_norm!r}")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError(
                f"image_dim={self.image_dim}, added_kv_proj_dim={self.added_kv_proj_dim}: expected both set "
                "(I2V) or both None"
            )

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def patch(self) -> tuple[int, int, int]:
        """(t, h, w) patch, the same property every family's config has."""
        return self.patch_size

    @classmethod
    def flavour(cls, name: str, **overrides: Any) -> WanConfig:
        """A named size preset (see ``FLAVOURS``) with field overrides."""
        return preset_config(cls, FLAVOURS, name, overrides, family="Wan")

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any], **overrides: Any) -> WanConfig:
        """From a diffusers config.json dict (unknown ``_``-prefixed keys are ignored)."""
        return config_from_diffusers(cls, _DIFFUSERS_FIELDS, config, overrides)

    def to_diffusers_config(self) -> dict[str, Any]:
        return config_to_diffusers(self, _DIFFUSERS_FIELDS)


_T2V_1_3B = dict(num_attention_heads=12, ffn_dim=8960, num_layers=30)
_T2V_14B = dict(num_attention_heads=40, ffn_dim=13824, num_layers=40)
FLAVOURS: dict[str, dict[str, Any]] = {
    # Tiny, for unit tests.
    "debug": dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2, text_dim=24,
                  freq_dim=32, in_channels=4, out_channels=4),
    # The toy world's Demonstrator/Executor: Wan2.1-I2V layout on 4 latent channels (in = 2*4 + 4).
    # Override in_channels/out_channels for other latents (T2V/TI2V: in == out).
    "toy": dict(num_attention_heads=4, attention_head_dim=32, ffn_dim=512, num_layers=4, text_dim=64,
                freq_dim=64, in_channels=12, out_channels=4, text_len=None),
    "1.3B": dict(**_T2V_1_3B),  # Wan2.1-T2V-1.3B
    "14B": dict(**_T2V_14B),  # Wan2.1-T2V-14B
    "i2v-14B-480p": dict(**_T2V_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120),
    "ti2v-5B": dict(num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48),
}  # fmt: skip


class WanImageEmbedding(nn.Module):
    """CLIP image tokens (B, 257, image_dim) -> (B, 257, dim): LN -> GELU MLP -> LN (LNs in fp32)."""

    def __init__(self, image_dim: int, dim: int, pos_embed_seq_len: int | None = None):
        super().__init__()
        self.norm1 = LayerNormFP32(image_dim, eps=1e-5)
        self.ff = MLP(image_dim, image_dim, dim, act="gelu")
        self.norm2 = LayerNormFP32(dim, eps=1e-5)
        self.pos_embed = None
        if pos_embed_seq_len is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, pos_embed_seq_len, image_dim))

    def reset_parameters(self) -> None:
        """This module's own parameter (the submodules reset theirs): the FLF2V position table, zeros."""
        if self.pos_embed is not None:
            nn.init.zeros_(self.pos_embed)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:  # FLF2V: first- and last-frame tokens side by side
            B, L, D = tokens.shape
            tokens = tokens.reshape(-1, 2 * L, D) + self.pos_embed  # (2B', L, D) -> (B', 2L, D)
        h = self.norm1(tokens)
        return self.norm2(self.ff(h.to(self.ff.fc1.weight.dtype)))


@torch.no_grad()
def _init_modulation(table: nn.Parameter) -> None:
    """The adaLN table ~ N(0, 1) / sqrt(dim): the same draws as ``torch.randn(...) / dim**0.5``."""
    table.normal_().div_(table.shape[-1] ** 0.5)


class WanBlock(nn.Module):
    """One Wan DiT block (module doc). Plain module: FSDP/AC wrap it from outside."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim, heads = cfg.dim, cfg.num_attention_heads
        qk = "across_heads"  # diffusers always builds Wan's q/k RMSNorm over all heads
        self.eps, self.norm_backend = cfg.eps, cfg.norm_backend
        self.self_attn = SelfAttention(dim, heads, qk_norm=qk, eps=cfg.eps, backend=cfg.attention_backend)
        self.norm2 = LayerNormFP32(dim, eps=cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(
            dim,
            heads,
            added_dim=cfg.added_kv_proj_dim,
            qk_norm=qk,
            eps=cfg.eps,
            backend=cfg.attention_backend,
        )
        self.ffn = MLP(dim, cfg.ffn_dim, act="gelu_tanh")
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """This module's own parameter (the submodules reset theirs): modulation ~ N(0, 1) / sqrt(dim)."""
        _init_modulation(self.modulation)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        mod: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        context_lengths: torch.Tensor | None = None,
        image_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, S, dim); context (B, L, dim); mod (B, 1 or S, 6, dim); rope tables (S, D/2)."""
        m = self.modulation.float().unsqueeze(0) + mod.float()  # (1, 1, 6, dim) + (B, St, 6, dim)
        shift1, scale1, gate1, shift2, scale2, gate2 = m.unbind(2)  # 6 x (B, St, dim)
        kw = dict(eps=self.eps, backend=self.norm_backend)
        h = adaln(x, scale1, shift1, **kw)
        x = gated_add(x, self.self_attn(h, rope), gate1, backend=self.norm_backend)
        x = x + self.cross_attn(self.norm2(x), context, context_lengths, image_context)
        h = adaln(x, scale2, shift2, **kw)
        return gated_add(x, self.ffn(h), gate2, backend=self.norm_backend)


class WanHead(nn.Module):
    """Final adaLN (shift, scale from temb + table) and the Linear to patch pixels."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.eps, self.norm_backend = cfg.eps, cfg.norm_backend
        self.proj = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.empty(1, 2, cfg.dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """This module's own parameter (proj resets its own): modulation ~ N(0, 1) / sqrt(dim)."""
        _init_modulation(self.modulation)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x (B, S, dim), temb (B, 1 or S, dim) -> (B, S, out_channels * prod(patch))."""
        m = self.modulation.float().unsqueeze(0) + temb.float().unsqueeze(2)  # (B, St, 2, dim)
        shift, scale = m.unbind(2)
        return self.proj(adaln(x, scale, shift, eps=self.eps, backend=self.norm_backend))


def pipeline_text(text: torch.Tensor, lengths: torch.Tensor | None, text_len: int) -> torch.Tensor:
    """Text states (B, L, D) as WanPipeline passes them: rows past ``lengths`` zero, zero-padded (or cut) to
    ``text_len`` rows."""
    B, L, _ = text.shape
    if lengths is not None:
        valid = torch.arange(L, device=text.device)[None, :] < lengths.to(text.device)[:, None]  # (B, L)
        text = text * valid[..., None].to(text.dtype)
    return F.pad(text, (0, 0, 0, text_len - L)) if L < text_len else text[:, :text_len]


def _keymap(cfg: WanConfig) -> KeyMap:
    """Our keys -> diffusers' keys (module doc: fused projections, Linear patch embedding)."""
    ce, b = "condition_embedder.", "blocks.{i}."
    rules = [
        ("patch_embed.", ("patch_embedding.",)),
        ("time_embed.", (ce + "time_embedder.",)),
        ("time_proj.", (ce + "time_proj.",)),
        ("text_embed.fc1.", (ce + "text_embedder.linear_1.",)),
        ("text_embed.fc2.", (ce + "text_embedder.linear_2.",)),
        ("image_embed.ff.fc1.", (ce + "image_embedder.ff.net.0.proj.",)),
        ("image_embed.ff.fc2.", (ce + "image_embedder.ff.net.2.",)),
        ("image_embed.", (ce + "image_embedder.",)),
        (b + "self_attn.qkv.", (b + "attn1.to_q.", b + "attn1.to_k.", b + "attn1.to_v.")),
        (b + "self_attn.out.", (b + "attn1.to_out.0.",)),
        (b + "self_attn.", (b + "attn1.",)),
        (b + "cross_attn.q.", (b + "attn2.to_q.",)),
        (b + "cross_attn.kv.", (b + "attn2.to_k.", b + "attn2.to_v.")),
        (b + "cross_attn.added_kv.", (b + "attn2.add_k_proj.", b + "attn2.add_v_proj.")),
        (b + "cross_attn.out.", (b + "attn2.to_out.0.",)),
        (b + "cross_attn.", (b + "attn2.",)),
        (b + "ffn.fc1.", (b + "ffn.net.0.proj.",)),
        (b + "ffn.fc2.", (b + "ffn.net.2.",)),
        (b + "modulation", (b + "scale_shift_table",)),
        ("head.proj.", ("proj_out.",)),
        ("head.modulation", ("scale_shift_table",)),
    ]
    return KeyMap(tuple(rules), ignore=(r"\.norm_added_q\.",))


class WanModel(DiffusersInterop, nn.Module):
    """The Wan DiT. ``forward`` mirrors diffusers' (same keywords and layout); ``predict_velocity`` is the
    model-agnostic entry point used by the engine and recipes."""

    config_cls = WanConfig
    keep_fp32 = ("time_embed", "modulation", "norm1", "norm2")  # module names that stay fp32 in cast()
    # Linears an FP8 backend must leave in bf16: fed one row per sample (time) or per-sample context
    # (text, image), or tiny (patch embedding, head). See MEASURED.md's torchao pitfall.
    fp8_skip = ("patch_embed", "time_embed", "time_proj", "text_embed", "image_embed", "head")

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embed = nn.Linear(cfg.in_channels * math.prod(cfg.patch_size), dim)
        self.time_embed = TimestepEmbedder(cfg.freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embed = MLP(cfg.text_dim, dim, dim, act="gelu_tanh")
        self.image_embed = None
        if cfg.image_dim is not None:
            self.image_embed = WanImageEmbedding(cfg.image_dim, dim, cfg.pos_embed_seq_len)
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = WanHead(cfg)
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sequence_parallel: SequenceParallel | None = None

    def set_sequence_parallel(self, group: dist.ProcessGroup | None) -> None:
        """Ulysses sequence parallelism over ``group`` (models/sp.py; engine.parallel.apply_sp calls it):
        each rank of the group runs its chunk of the video tokens and returns the whole velocity."""
        self.sequence_parallel = None if group is None else SequenceParallel(group)
        for block in self.blocks:
            block.self_attn.sequence_parallel = self.sequence_parallel

    # ---- forward ------------------------------------------------------------------------------

    def rope_tables(
        self, grid: tuple[int, int, int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (F'*H'*W', head_dim/2) fp32 for a token grid; cached per (grid, device)."""
        key = (tuple(grid), str(device))
        if key not in self._rope_cache:
            # never inference tensors, even when the first forward on this grid runs under inference_mode: a
            # later training forward saves them for backward
            with torch.inference_mode(False):
                self._rope_cache[key] = rope_3d_tables(
                    grid, self.cfg.attention_head_dim, theta=self.cfg.theta, device=device
                )
        return self._rope_cache[key]

    def _check_context(self, text, image, lengths, batch: int) -> None:
        """The conditioning inputs' shapes, each error naming the input (forward's keyword names)."""
        cfg = self.cfg
        if text.dim() != 3 or text.shape[0] != batch or text.shape[2] != cfg.text_dim:
            raise ValueError(
                f"encoder_hidden_states: expected ({batch}, L, {cfg.text_dim}), got {tuple(text.shape)}"
            )
        if image is not None:
            if cfg.image_dim is None:
                raise ValueError(
                    "encoder_hidden_states_image: this model has no image projection (image_dim is None)"
                )
            # FLF2V: the first and last frames' tokens, two rows per sample (one row per sample was paired
            # across samples by the position embedding's reshape)
            n = 2 * batch if cfg.pos_embed_seq_len else batch
            if image.dim() != 3 or image.shape[0] != n or image.shape[2] != cfg.image_dim:
                raise ValueError(
                    f"encoder_hidden_states_image: expected ({n}, N, {cfg.image_dim}), got {tuple(image.shape)}"
                    + (" (FLF2V: first and last frame per sample)" if cfg.pos_embed_seq_len else "")
                )
        if lengths is not None and (lengths.shape != (batch,) or lengths.dtype.is_floating_point):
            raise ValueError(
                f"encoder_lengths: expected an int tensor of shape ({batch},), got {lengths.dtype} {tuple(lengths.shape)}"
            )

    def embed_time(self, timestep: torch.Tensor, batch: int, seq_len: int, dtype: torch.dtype):
        """timestep (B,) or (B, S) in [0, 1000] -> temb (B, St, dim) and mod (B, St, 6, dim), St = 1 or S."""
        if timestep.shape not in ((batch,), (batch, seq_len)):
            raise ValueError(
                f"timestep: expected shape ({batch},) or ({batch}, {seq_len}) (per token), got {tuple(timestep.shape)}"
            )
        st = 1 if timestep.dim() == 1 else seq_len
        emb = timestep_embedding(timestep.flatten(), self.cfg.freq_dim)  # (B*St, freq_dim) fp32
        temb = self.time_embed(emb).to(dtype)  # (B*St, dim), in the text's dtype as diffusers does
        mod = self.time_proj(F.silu(temb))  # (B*St, 6*dim)
        return temb.view(batch, st, -1), mod.view(batch, st, 6, -1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        *,
        encoder_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity (B, out_channels, F, H, W) for latents (B, in_channels, F, H, W).

        timestep: (B,) or (B, F'*H'*W') per token, in diffusers' [0, 1000] scale. encoder_hidden_states:
        text (B, L, text_dim); encoder_hidden_states_image: CLIP tokens (B, 257, image_dim) for I2V;
        encoder_lengths: optional (B,) valid text-token counts (keys past them are masked out).
        """
        cfg = self.cfg
        if hidden_states.dim() != 5 or hidden_states.shape[1] != cfg.in_channels:
            raise ValueError(
                f"hidden_states: expected (B, {cfg.in_channels}, F, H, W), got {tuple(hidden_states.shape)}"
            )
        B, _, Fr, H, W = hidden_states.shape
        self._check_context(encoder_hidden_states, encoder_hidden_states_image, encoder_lengths, B)
        # latents and context in the weights' dtype (bf16 under FSDP2, which leaves the inputs as given): the
        # timestep reaches the sinusoid in fp32, as in diffusers
        hidden_states, encoder_hidden_states, encoder_hidden_states_image = floating_to(
            self.patch_embed.weight.dtype, hidden_states, encoder_hidden_states, encoder_hidden_states_image
        )
        grid = (Fr // cfg.patch_size[0], H // cfg.patch_size[1], W // cfg.patch_size[2])
        x = self.patch_embed(patchify(hidden_states, cfg.patch_size))  # (B, S, dim)
        temb, mod = self.embed_time(timestep, B, x.shape[1], encoder_hidden_states.dtype)
        context = self.text_embed(encoder_hidden_states)  # (B, L, dim)
        image_context = self._embed_image(encoder_hidden_states_image)
        rope = self.rope_tables(grid, hidden_states.device)  # the whole sequence's: attention sees all tokens
        sp = self.sequence_parallel
        if sp is not None:  # this rank's chunk of the tokens (and of per-token timesteps)
            sp.check(x.shape[1], cfg.num_attention_heads, f"WanModel, token grid {grid}")
            x = sp.local(x)
            if temb.shape[1] > 1:
                temb, mod = sp.local(temb), sp.local(mod)
        for block in self.blocks:
            x = block(x, context, mod, rope, encoder_lengths, image_context)
        out = self.head(x, temb)  # (B, S, pt*ph*pw*C_out)
        if sp is not None:
            out = sp.gather(out)
        return unpatchify(out, grid, cfg.patch_size, cfg.out_channels)

    def _embed_image(self, image_tokens: torch.Tensor | None) -> torch.Tensor | None:
        if image_tokens is None:
            return None
        if self.image_embed is None:
            raise ValueError(
                "encoder_hidden_states_image: this Wan model has no image embedder (image_dim=None)"
            )
        return self.image_embed(image_tokens)

    # ---- the engine's entry point -------------------------------------------------------------

    def predict_velocity(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Velocity v(x_t, t | cond) for x_t (B, C, F, h, w), t (B,) in [0, 1] or (B, F*h*w/prod(patch)).

        cond: "text" (B, L, text_dim); optional "text_lengths" (B,) (with ``cfg.text_len`` the text is zero-padded
        to that length past them and attended to whole, as WanPipeline does; without, keys past them are masked
        out); "image_latent" (B, C, 1, h, w) the
        first frame's latent (I2V); "image_tokens" (B, 257, image_dim) (FLF2V: (2B, 257, image_dim), each
        sample's first then last frame); "last_image_latent" (B, C, 1, h, w) FLF2V's last frame (I2V models: the
        mask also marks it, and the toy condition puts it on frame F-1). The image mode follows the config:
        in_channels == 2C + 4 is Wan2.1 I2V (input = [x_t, 4-channel frame-0 mask, condition]; the condition
        is cond["image_condition"] (B, C, F, h, w), the pipeline's VAE encoding of the image followed by zero
        frames (WanVAE.encode_i2v_condition), or without it the first-frame latent zero-padded over time, the
        toy world's convention); in_channels == C with an image latent is Wan2.2 TI2V (frame 0 of x_t is
        replaced by the latent and its tokens get timestep 0). In TI2V the returned frame-0 velocity is
        the exact one given the known clean frame, (x_t[:, :, 0] - latent) / t, so samplers keep frame 0.
        """
        cfg = self.cfg
        if "text" not in cond:
            raise ValueError(f"cond: expected a 'text' entry (B, L, {cfg.text_dim}), got keys {sorted(cond)}")
        B, C, Fr, h, w = x_t.shape
        image = cond.get("image_latent")
        if image is not None and tuple(image.shape) != (B, C, 1, h, w):
            raise ValueError(f"cond['image_latent']: expected {(B, C, 1, h, w)}, got {tuple(image.shape)}")
        # a bf16 t times 1000 rounds to a multiple of 2 or 4: half types go to fp32, fp32/fp64 stay as they are
        timestep = 1000.0 * (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t)
        ti2v = image is not None and cfg.in_channels == C
        last = cond.get("last_image_latent")  # FLF2V's last frame
        if last is not None and (
            cfg.in_channels != 2 * C + 4 or Fr < 2 or tuple(last.shape) != (B, C, 1, h, w)
        ):
            raise ValueError(
                f"cond['last_image_latent']: expected {(B, C, 1, h, w)} with F >= 2 for a Wan2.1 I2V model "
                f"(in_channels = 2C + 4 = {2 * C + 4}), got {tuple(last.shape)}, F={Fr}, in_channels={cfg.in_channels}"
            )
        if cfg.in_channels == 2 * C + 4:
            if image is None:
                raise ValueError("cond['image_latent']: required by this I2V model (in_channels = 2C + 4)")
            mask = x_t.new_zeros(B, 4, Fr, h, w)
            mask[:, :, 0] = 1.0  # (B, 4, F, h, w): 1 on the conditioning frame
            if last is not None:  # the pipeline's mask: the last pixel frame is the last of frame F-1's four
                mask[:, 3, -1] = 1.0
            condition = cond.get("image_condition")  # the pipeline's VAE of [image, zeros(, last)]
            if condition is None:  # the toy world's convention: the image latent, zero latents after it
                condition = F.pad(image, (0, 0, 0, 0, 0, Fr - 1))
                if last is not None:
                    condition = torch.cat([condition[:, :, :-1], last.to(condition.dtype)], dim=2)
            elif tuple(condition.shape) != (B, C, Fr, h, w):
                raise ValueError(
                    f"cond['image_condition']: expected {(B, C, Fr, h, w)}, got {tuple(condition.shape)}"
                )
            x_in = torch.cat([x_t, mask, condition.to(x_t.dtype)], dim=1)
        elif cfg.in_channels == C:
            x_in = x_t
            if ti2v:
                x_in, timestep = self._ti2v_inputs(x_t, image, timestep)
        else:
            raise ValueError(
                f"x_t: {C} channels fit neither T2V/TI2V (in_channels={cfg.in_channels}) nor I2V (2C + 4)"
            )
        text, lengths = cond["text"], cond.get("text_lengths")
        if cfg.text_len is not None:
            text, lengths = pipeline_text(text, lengths, cfg.text_len), None
        v = self(x_in, timestep, text, cond.get("image_tokens"), encoder_lengths=lengths)
        if ti2v:
            t0 = self._frame0_t(t, B, h, w)  # (B, 1, h, w)
            v0 = torch.where(t0 > 0, (x_t[:, :, 0] - image[:, :, 0]) / t0.clamp_min(1e-12), 0.0)
            v = torch.cat([v0.unsqueeze(2).to(v.dtype), v[:, :, 1:]], dim=2)
        return v

    def _ti2v_inputs(self, x_t, image, timestep):
        """Frame 0 := image latent; per-token timesteps with 0 on frame-0 tokens (Wan2.2 TI2V)."""
        pt, ph, pw = self.cfg.patch_size
        if pt != 1:
            raise ValueError(
                f"TI2V conditioning needs a temporal patch of 1, got patch_size {self.cfg.patch_size}"
            )
        B, _, Fr, h, w = x_t.shape
        x_in = torch.cat([image.to(x_t.dtype), x_t[:, :, 1:]], dim=2)
        n0, seq = (h // ph) * (w // pw), Fr * (h // ph) * (w // pw)
        timestep = timestep if timestep.dim() == 2 else timestep[:, None].expand(B, seq)
        timestep = torch.cat([torch.zeros_like(timestep[:, :n0]), timestep[:, n0:]], dim=1)  # (B, S)
        return x_in, timestep

    def _frame0_t(self, t: torch.Tensor, B: int, h: int, w: int) -> torch.Tensor:
        """t as (B, 1, h, w) on latent frame 0 (per-sample, or the frame-0 tokens upsampled)."""
        if t.dim() == 1:
            return t.view(B, 1, 1, 1).float()
        _, ph, pw = self.cfg.patch_size
        t0 = t[:, : (h // ph) * (w // pw)].view(B, 1, h // ph, w // pw).float()
        return t0.repeat_interleave(ph, dim=2).repeat_interleave(pw, dim=3)

    # ---- diffusers interop (load/export/from_pretrained/cast: DiffusersInterop) ----------------

    def keymap(self) -> KeyMap:
        return _keymap(self.cfg)

    def their_shapes(self) -> dict[str, tuple[int, ...]]:
        cfg = self.cfg
        return {"patch_embedding.weight": (cfg.dim, cfg.in_channels, *cfg.patch_size)}

    def flops_context(self, cond: dict[str, torch.Tensor], t: torch.Tensor | None = None) -> dict[str, Any]:
        """:meth:`flops_per_token`'s context arguments for what :meth:`predict_velocity` runs on ``cond`` (and
        ``t``): the text at ``cfg.text_len`` (it pads to it), the image tokens per sample (FLF2V's first and last
        frames' together), per-token timesteps for TI2V or a per-token ``t`` (B, S) (the time embedding then
        runs per token; without ``t`` only TI2V's are seen)."""
        cfg, text, tokens = self.cfg, cond["text"], cond.get("image_tokens")
        ti2v = "image_latent" in cond and cfg.in_channels == cfg.out_channels
        return {
            "text_len": cfg.text_len or text.shape[1],
            "image_len": 0 if tokens is None else tokens.shape[0] * tokens.shape[1] // text.shape[0],
            "per_token_timestep": ti2v or (t is not None and t.dim() == 2),
        }

    def flops_per_token(
        self, seq_len: int, text_len: int, *, image_len: int | None = None, per_token_timestep: bool = False
    ) -> float:
        """Forward matmul FLOPs per video token (2 per multiply-add; training ~ 3x this).

        Per block: 8 d^2 (qkv, out) + 4 S d (QK^T, PV) + 4 d^2 (cross q, out) + 4 L d + 4 d^2 L / S
        (text k, v) [+ image: 4 Li d + 4 d^2 Li / S] + 4 d f (FFN); plus patch embedding and head per
        token, and the per-sample embeddings (time, text, image) divided by S.
        """
        c, d, S, L = self.cfg, self.cfg.dim, seq_len, text_len
        Li = (257 if c.pos_embed_seq_len is None else c.pos_embed_seq_len) if image_len is None else image_len
        Li = Li if c.image_dim is not None else 0
        block = 8 * d * d + 4 * S * d + 4 * d * d + 4 * L * d + 4 * d * d * L / S + 4 * d * c.ffn_dim
        block += 4 * Li * d + 4 * d * d * Li / S
        p = math.prod(c.patch_size)
        per_token = c.num_layers * block + 2 * c.in_channels * p * d + 2 * d * c.out_channels * p
        time = 2 * d * (c.freq_dim + d + 6 * d)
        per_sample = L * 2 * d * (c.text_dim + d)
        if c.image_dim is not None:
            per_sample += Li * 2 * c.image_dim * (c.image_dim + d)
        per_token += time if per_token_timestep else 0
        per_sample += 0 if per_token_timestep else time
        return per_token + per_sample / S
