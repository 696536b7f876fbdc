"""Building blocks shared by the video DiT families (Wan, HunyuanVideo-1.5, ...).

Plain ``nn.Module``s with no parallelism inside: FSDP, activation checkpointing and compile are
applied from engine/parallel.py. Attention goes through ``kernels.attention`` (backend chosen per
module by the ``backend`` attribute), adaLN through ``kernels.adaln``.

Precision. Timestep sinusoids, LayerNorm/RMSNorm statistics, the adaLN modulation and gated residual
adds are computed in fp32 whatever the parameter dtype (as diffusers does for Wan); matmuls run in
the input's dtype.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.adaln import adaln_modulate, gated_residual
from kernels.attention import attention
from models.adapter import KeyMap, load_safetensors, read_config, to_ours, to_theirs
from models.sp import SequenceParallel

__all__ = [
    "MLP",
    "CrossAttention",
    "DiffusersInterop",
    "JointAttention",
    "LayerNormFP32",
    "SelfAttention",
    "TimestepEmbedder",
    "adaln",
    "gated_add",
    "patchify",
    "timestep_embedding",
    "unpatchify",
]

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def _kernel_backend(backend: str, x: torch.Tensor) -> str:
    """ "auto" -> "triton" on CUDA tensors, "torch" elsewhere (Triton runs only interpreted on CPU)."""
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    return backend


def timestep_embedding(
    t: torch.Tensor,
    dim: int,
    *,
    max_period: float = 10000.0,
    flip_sin_to_cos: bool = True,
    shift: float = 0.0,
) -> torch.Tensor:
    """Sinusoidal embedding of timesteps t (N,) -> (N, dim) float32.

    f_j = max_period^(-j / (dim/2 - shift)); emb = [cos(t f), sin(t f)] (flip_sin_to_cos) or [sin, cos];
    an odd ``dim`` gets one zero column at the end.
    """
    if t.dim() != 1:
        raise ValueError(f"t: expected a 1-D tensor of timesteps, got shape {tuple(t.shape)}")
    half = dim // 2
    exponent = (
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift)
    )
    angle = t.float()[:, None] * torch.exp(exponent)[None, :]  # (N, half)
    parts = (angle.cos(), angle.sin()) if flip_sin_to_cos else (angle.sin(), angle.cos())
    emb = torch.cat(parts, dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedder(nn.Module):
    """MLP on the sinusoid: linear_2(act(linear_1(emb))). Input is cast to the weights' dtype."""

    def __init__(self, freq_dim: int, dim: int, *, act: str = "silu", out_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, out_dim or dim)
        self.act = ACTIVATIONS[act]

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        emb = emb.to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(emb)))


class MLP(nn.Module):
    """fc2(act(fc1(x))): the DiT feed-forward, and the text/image condition projections."""

    def __init__(
        self, dim: int, hidden: int, out_dim: int | None = None, *, act: str = "gelu_tanh", bias=True
    ):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act: expected one of {sorted(ACTIVATIONS)}, got {act!r}")
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, out_dim or dim, bias=bias)
        self.act_name = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(ACTIVATIONS[self.act_name](self.fc1(x)))


class LayerNormFP32(nn.LayerNorm):
    """LayerNorm computed in fp32 (input, weight and bias upcast), output in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm whose weight is cast to the input's dtype: under bf16 autocast an fp32 weight beside a bf16
    input made torch.rms_norm take its unfused composite path in training (a weight that requires grad; torch
    warns "Mismatch dtype between input and weight ... Cannot dispatch to fused implementation"): about ten
    kernels over q or k forward and backward instead of one each. The fused kernel normalises in fp32 either
    way; the weight is rounded to bf16 as under FSDP2's bf16 parameters. Same state dict as nn.RMSNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight is None or self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return F.rms_norm(x, self.normalized_shape, w, self.eps)


def _qk_norm(kind: str | None, dim: int, heads: int, eps: float) -> tuple[nn.Module, nn.Module]:
    """RMSNorm for q and k: "across_heads" normalises all H*D features of a token (Wan), "per_head" each
    head's D features (HunyuanVideo), None is the identity."""
    if kind == "across_heads":
        return RMSNorm(dim, eps=eps), RMSNorm(dim, eps=eps)
    if kind == "per_head":
        return RMSNorm(dim // heads, eps=eps), RMSNorm(dim // heads, eps=eps)
    if kind is None:
        return nn.Identity(), nn.Identity()
    raise ValueError(f"qk_norm: expected 'across_heads', 'per_head' or None, got {kind!r}")


def _norm_heads(norm: nn.Module, x: torch.Tensor, heads: int, per_head: bool) -> torch.Tensor:
    """(B, S, H*D) -> normalised (B, S, H, D)."""
    if per_head:
        return norm(x.unflatten(-1, (heads, -1)))  # (B, S, H*D) -> (B, S, H, D)
    return norm(x).unflatten(-1, (heads, -1))


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection, QK RMSNorm and RoPE fused into the kernel.

    q, k, v = split(x W_qkv + b); q, k = rmsnorm(q), rmsnorm(k); o = softmax(rope(q) rope(k)^T / sqrt(D)) v;
    out = o W_o + b_o. x (B, S, dim), rope = (cos, sin) tables (S, D/2) or None.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        qk_norm: str | None = "across_heads",
        eps: float = 1e-6,
        bias: bool = True,
        backend: str = "sdpa",
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.heads, self.backend, self.per_head = heads, backend, qk_norm == "per_head"
        self.attention_precision = "bf16"  # or "fp8" (engine.precision.apply_attention_precision sets it)
        self.fp8_backend: str | None = None  # "fp8" on another backend ("te"; the same setter), None: own
        self.sequence_parallel: SequenceParallel | None = None  # Ulysses (models/sp.py), set by the model
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.norm_q, self.norm_k = _qk_norm(qk_norm, dim, heads, eps)
        self.out = nn.Linear(dim, dim, bias=bias)

    def attention_backend(self) -> str:
        """The backend this module's attention runs on: ``fp8_backend`` in FP8 where one is set, else its own."""
        return (self.attention_precision == "fp8" and self.fp8_backend) or self.backend

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, S, dim) -> normalised q, k and v, each (B, S, H, D) (joint attention reuses this)."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x (B, S, dim)
        q = _norm_heads(self.norm_q, q, self.heads, self.per_head)  # (B, S, H, D)
        k = _norm_heads(self.norm_k, k, self.heads, self.per_head)
        return q, k, v.unflatten(-1, (self.heads, -1))  # v: (B, S, dim) -> (B, S, H, D)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        k_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """k_lengths: optional (B,) valid-token counts; keys at or past them are masked out."""
        q, k, v = self.project(x)
        sp = self.sequence_parallel
        if sp is not None:  # x holds this rank's tokens: attend over all of them with this rank's heads
            q, k, v = sp.seq_to_heads(q), sp.seq_to_heads(k), sp.seq_to_heads(v)
        prec, backend = self.attention_precision, self.attention_backend()
        o = attention(q, k, v, rope=rope, k_lengths=k_lengths, backend=backend, precision=prec)
        if sp is not None:
            o = sp.heads_to_seq(o)
        return self.out(o.flatten(2))  # (B, S, H, D) -> (B, S, dim)


class CrossAttention(nn.Module):
    """Cross-attention to a context, plus an optional second (decoupled) context such as image tokens.

    o = attn(q, k_ctx, v_ctx; k_lengths=context_lengths) [+ attn(q, k_add, v_add)]; out = o W_o + b_o.
    q from x (B, S, dim); context (B, L, context_dim); added_context (B, L2, added_dim) or None.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        context_dim: int | None = None,
        added_dim: int | None = None,
        qk_norm: str | None = "across_heads",
        eps: float = 1e-6,
        bias: bool = True,
        backend: str = "sdpa",
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.heads, self.backend, self.per_head = heads, backend, qk_norm == "per_head"
        self.q = nn.Linear(dim, dim, bias=bias)
        self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=bias)
        self.norm_q, self.norm_k = _qk_norm(qk_norm, dim, heads, eps)
        self.out = nn.Linear(dim, dim, bias=bias)
        self.added_kv = None
        if added_dim is not None:
            self.added_kv = nn.Linear(added_dim, 2 * dim, bias=bias)
            self.norm_added_k = _qk_norm(qk_norm, dim, heads, eps)[1]

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        context_lengths: torch.Tensor | None = None,
        added_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q = _norm_heads(self.norm_q, self.q(x), self.heads, self.per_head)  # (B, S, H, D)
        k, v = self.kv(context).chunk(2, dim=-1)  # 2 x (B, L, dim)
        k = _norm_heads(self.norm_k, k, self.heads, self.per_head)
        o = attention(
            q, k, v.unflatten(-1, (self.heads, -1)), k_lengths=context_lengths, backend=self.backend
        )
        if added_context is not None:
            if self.added_kv is None:
                raise ValueError("added_context: this attention has no added key/value projection")
            ka, va = self.added_kv(added_context).chunk(2, dim=-1)  # 2 x (B, L2, dim)
            ka = _norm_heads(self.norm_added_k, ka, self.heads, self.per_head)
            o = o + attention(q, ka, va.unflatten(-1, (self.heads, -1)), backend=self.backend)
        return self.out(o.flatten(2))  # (B, S, H, D) -> (B, S, dim)


class JointAttention(nn.Module):
    """MM-DiT joint attention of two streams (HunyuanVideo): video tokens x and context tokens c get their
    own q/k/v projections, per-head QK RMSNorm and output projections, and attend over [x, c] together.

    RoPE rotates x's tokens only: the tables cover S video rows followed by identity rows (cos 1, sin 0) for
    the context, an exact no-op. k_lengths (B,) = S + valid context tokens (context is valid-first).
    """

    def __init__(self, dim: int, heads: int, *, eps: float = 1e-6, bias: bool = True, backend: str = "sdpa"):
        super().__init__()
        kw = dict(qk_norm="per_head", eps=eps, bias=bias, backend=backend)
        self.x, self.c = SelfAttention(dim, heads, **kw), SelfAttention(dim, heads, **kw)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        k_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, dim), c (B, L, dim); rope tables (S + L, D/2) -> (x out (B, S, dim), c out (B, L, dim))."""
        qx, kx, vx = self.x.project(x)  # 3 x (B, S, H, D)
        qc, kc, vc = self.c.project(c)  # 3 x (B, L, H, D)
        sp = self.x.sequence_parallel  # Ulysses: x holds this rank's video tokens, c all context tokens
        if sp is not None:  # all video tokens x this rank's heads; the context's same heads
            qx, kx, vx = sp.seq_to_heads(qx), sp.seq_to_heads(kx), sp.seq_to_heads(vx)
            qc, kc, vc = sp.local(qc, dim=2), sp.local(kc, dim=2), sp.local(vc, dim=2)
        S = qx.shape[1]
        q, k, v = (torch.cat(pair, dim=1) for pair in ((qx, qc), (kx, kc), (vx, vc)))  # (B, S + L, H, D)
        prec, backend = self.x.attention_precision, self.x.attention_backend()
        o = attention(q, k, v, rope=rope, k_lengths=k_lengths, backend=backend, precision=prec)
        ox, oc = o[:, :S], o[:, S:]  # (B, S + L, H, D) split back
        if sp is not None:  # video: back to this rank's tokens; context: every rank's heads
            ox, oc = sp.heads_to_seq(ox), sp.gather(oc, dim=2)
        return self.x.out(ox.flatten(2)), self.c.out(oc.flatten(2))


def adaln(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    norm: str = "layer",
    eps: float = 1e-6,
    backend: str = "auto",
) -> torch.Tensor:
    """norm(x) * (1 + scale) + shift in fp32, output in x's dtype (kernels.adaln; "auto" picks by device)."""
    return adaln_modulate(x, scale, shift, norm=norm, eps=eps, backend=_kernel_backend(backend, x))


def gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """x + gate * y in fp32, output in x's dtype (kernels.adaln; "auto" picks by device)."""
    return gated_residual(x, y, gate, backend=_kernel_backend(backend, x))


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, F, H, W) -> tokens (B, F'*H'*W', C*pt*ph*pw), t-major; features ordered (c, pt, ph, pw)
    like a Conv3d(kernel=stride=patch) weight, so that the patch embedding is one Linear."""
    B, C, Fr, H, W = x.shape
    pt, ph, pw = patch
    if Fr % pt or H % ph or W % pw:
        raise ValueError(f"x: (F, H, W) = {(Fr, H, W)} is not divisible by the patch size {tuple(patch)}")
    x = x.view(B, C, Fr // pt, pt, H // ph, ph, W // pw, pw)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # -> (B, F', H', W', C, pt, ph, pw)
    return x.reshape(B, (Fr // pt) * (H // ph) * (W // pw), C * pt * ph * pw)


def unpatchify(
    tokens: torch.Tensor,
    grid: tuple[int, int, int],
    patch: tuple[int, int, int],
    channels: int,
    *,
    channels_first: bool = False,
) -> torch.Tensor:
    """tokens (B, F'*H'*W', pt*ph*pw*C) with features ordered (pt, ph, pw, c) -> (B, C, F, H, W);
    channels_first: features ordered (c, pt, ph, pw) instead (HunyuanVideo's head)."""
    B = tokens.shape[0]
    (f, h, w), (pt, ph, pw) = grid, patch
    if channels_first:
        x = tokens.view(B, f, h, w, channels, pt, ph, pw)
        x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # -> (B, C, F', pt, H', ph, W', pw)
        return x.reshape(B, channels, f * pt, h * ph, w * pw)
    x = tokens.view(B, f, h, w, pt, ph, pw, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # -> (B, C, F', pt, H', ph, W', pw)
    return x.reshape(B, channels, f * pt, h * ph, w * pw)


def floating_to(dtype: torch.dtype, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Each floating-point tensor in ``dtype``; None and integer tensors as given."""
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


class DiffusersInterop:
    """Mixin: a model that is weight-compatible with a diffusers transformer.

    Subclasses set ``config_cls`` (with ``from_diffusers_config(dict, **overrides)``), keep their config
    in ``self.cfg``, and implement ``keymap()`` (our keys -> diffusers', see models/adapter.py) and
    ``their_shapes()`` (diffusers tensors whose shape differs from ours, e.g. a Conv3d patch embedding).
    ``keep_fp32`` names modules whose parameters :meth:`cast` leaves in fp32. ``forward`` casts the latents
    and context to its weights' dtype itself (:func:`floating_to`) and keeps the timestep and the RoPE tables
    in fp32, so engine.parallel.apply_fsdp turns FSDP2's cast of forward inputs off (``casts_own_inputs``).
    """

    config_cls: type
    keep_fp32: tuple[str, ...] = ()
    casts_own_inputs: bool = True

    def keymap(self) -> KeyMap:
        raise NotImplementedError

    def their_shapes(self) -> dict[str, tuple[int, ...]]:
        return {}

    def load_diffusers_state_dict(
        self, sd: dict[str, torch.Tensor], strict: bool = True, *, assign: bool = False
    ) -> None:
        """Load a diffusers state dict. strict: missing or unexpected keys raise
        :class:`models.adapter.StateDictKeyError` listing all of them."""
        shapes = {k: v.shape for k, v in self.state_dict().items()}
        ours = to_ours(
            sd,
            shapes,
            self.keymap(),
            strict=strict,
            their_shapes=self.their_shapes(),
            what=type(self).__name__,
        )
        self.load_state_dict(ours, strict=strict, assign=assign)

    def to_diffusers_state_dict(self) -> dict[str, torch.Tensor]:
        """Our state dict in diffusers' keys and shapes (exact inverse of load_diffusers_state_dict); the
        weights alone: modules' extra state (Transformer Engine's FP8 scaling) has no diffusers key."""
        sd = {k: v for k, v in self.state_dict().items() if not k.endswith("._extra_state")}
        return to_theirs(sd, self.keymap(), self.their_shapes())

    @classmethod
    def from_diffusers(cls, model: nn.Module, **overrides: Any):
        """Same config and weights as the diffusers module (dtype and device kept)."""
        cfg = cls.config_cls.from_diffusers_config(dict(model.config), **overrides)
        p = next(model.parameters())
        with torch.device("meta"):
            ours = cls(cfg)
        ours.load_diffusers_state_dict(
            {k: v.detach().clone() for k, v in model.state_dict().items()}, assign=True
        )
        return ours.to(p.device)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        **overrides: Any,
    ):
        """From a local diffusers folder (config.json + safetensors, sharded index supported; a pipeline
        folder's ``transformer/`` is used). dtype: cast with :meth:`cast` (keep_fp32 modules stay fp32);
        None is torch's default dtype whatever the folder's dtype, as diffusers' ``torch_dtype=None``."""
        path = cls.pretrained_folder(path)
        cfg = cls.config_cls.from_diffusers_config(read_config(path), **overrides)
        with torch.device("meta"):
            model = cls(cfg)
        model.load_diffusers_state_dict(load_safetensors(path, device=device), assign=True)
        # assign=True keeps the file's dtype: a bf16 folder left keep_fp32 modules in bf16
        return model.cast(dtype if dtype is not None else torch.get_default_dtype())

    @staticmethod
    def pretrained_folder(path: str | Path) -> Path:
        """The folder holding the transformer's config.json: ``path`` or a pipeline folder's ``transformer/``."""
        path = Path(path)
        return path / "transformer" if (path / "transformer" / "config.json").is_file() else path

    @classmethod
    def meta_from_pretrained(cls, path: str | Path, **overrides: Any):
        """The model of a local diffusers folder built on the meta device from its config.json alone
        (no weights read): for meta-device initialisation, where the engine loads the weights later."""
        cfg = cls.config_cls.from_diffusers_config(read_config(cls.pretrained_folder(path)), **overrides)
        with torch.device("meta"):
            return cls(cfg)

    def cast(self, dtype: torch.dtype):
        """Cast parameters to ``dtype`` except those under a module named in ``keep_fp32`` (kept fp32)."""
        for name, p in self.named_parameters():
            keep = any(part in self.keep_fp32 for part in name.split("."))
            p.data = p.data.to(torch.float32 if keep else dtype)
        return self

    def set_attention_backend(self, backend: str) -> None:
        """Switch every attention module's kernels.attention backend."""
        self.cfg.attention_backend = backend
        for m in self.modules():
            if isinstance(m, SelfAttention | CrossAttention):
                m.backend = backend

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
