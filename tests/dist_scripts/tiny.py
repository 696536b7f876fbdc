"""A tiny DiT-like model, a resumable batch source and a flow-matching loss for trainer tests.

Shared by tests/test_*.py (imported via sys.path) and the torchrun scripts in this folder. The model
has the one thing the engine needs: ``model.blocks`` (an nn.ModuleList).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class TinyBlock(nn.Module):
    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)  # a k bias has zero gradient: Adam would amplify noise
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim)
        )
        self.mod = nn.Linear(dim, 4 * dim)  # adaLN scale/shift from the timestep embedding

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        s1, b1, s2, b2 = self.mod(temb).unsqueeze(1).chunk(4, dim=-1)  # each (B, 1, D)
        h = self.norm1(x) * (1 + s1) + b1
        q, k, v = self.qkv(h).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (3,B,H,S,d)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(B, S, D))  # (B, H, S, d) -> (B, S, D)
        return x + self.mlp(self.norm2(x) * (1 + s2) + b2)


class TinyDiT(nn.Module):
    """x (B, S, C) noisy tokens, t (B,) in [0, 1] -> velocity (B, S, C)."""

    def __init__(self, channels: int = 16, dim: int = 32, depth: int = 2):
        super().__init__()
        self.inp = nn.Linear(channels, dim)
        self.temb = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(TinyBlock(dim) for _ in range(depth))
        self.out = nn.Linear(dim, channels)
        self.flops_per_token = 2 * sum(p.numel() for p in self.parameters() if p.dim() == 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._velocity(x, t)

    def predict_velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The engine's entry point (as models/ exposes); not via __call__, like a real model's method."""
        return self._velocity(x_t, t)

    def _velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.temb(t.view(-1, 1).to(x.dtype))
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h, temb)
        return self.out(h)


class SeededBatches:
    """Batch k is generated from seed (base + k): deterministic, independent of history, resumable.

    Data are a fixed low-rank 'dataset' so that the flow loss can go down; noise and t come from the
    batch's own generator.
    """

    def __init__(
        self,
        *,
        batch: int = 4,
        seq: int = 8,
        channels: int = 16,
        grad_accum: int = 1,
        base_seed: int = 1000,
        rank: int = 0,
        world: int = 1,
        all_ranks: bool = False,
        rng_noise: bool = False,
    ):
        self.batch, self.seq, self.channels, self.grad_accum = batch, seq, channels, grad_accum
        self.base_seed, self.rank, self.world = base_seed, rank, world
        self.all_ranks = all_ranks  # hand out every rank's samples at once (single-process reference)
        self.rng_noise = rng_noise  # leave the noise to the loss (drawn from the global torch RNG)
        self.position = 0  # micro-batches handed out so far (per rank)
        g = torch.Generator().manual_seed(7)
        self.basis = torch.randn(4, channels, generator=g)

    def _make(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.base_seed + index)
        coef = torch.randn(self.batch, self.seq, 4, generator=g)
        x0 = coef @ self.basis  # (B, S, 4) @ (4, C) -> (B, S, C)
        noise = torch.randn(x0.shape, generator=g)
        out = {"x0": x0, "t": torch.rand(self.batch, generator=g)}
        return out if self.rng_noise else {**out, "noise": noise}

    def global_batch(self, index: int) -> dict[str, torch.Tensor]:
        """All ranks' samples of micro-batch ``index`` concatenated (for single-process references)."""
        parts = [self._make(index * self.world + r) for r in range(self.world)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def next(self, step: int, model: nn.Module) -> list[dict[str, torch.Tensor]]:
        out = []
        for _ in range(self.grad_accum):
            i = self.position
            out.append(self.global_batch(i) if self.all_ranks else self._make(i * self.world + self.rank))
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, sd: dict) -> None:
        self.position = int(sd["position"])


def flow_loss(model: nn.Module, mb: dict[str, torch.Tensor]):
    """Rectified flow: x_t = (1 - t) x0 + t noise, target v = noise - x0, MSE."""
    dev = next(model.parameters()).device
    x0, t = mb["x0"].to(dev), mb["t"].to(dev)
    noise = mb["noise"].to(dev) if "noise" in mb else torch.randn_like(x0)
    tt = t.view(-1, 1, 1)
    xt = (1 - tt) * x0 + tt * noise
    v = model.predict_velocity(xt, t, {})
    loss = torch.nn.functional.mse_loss(v.float(), (noise - x0).float())
    return loss, {"num_tokens": x0.shape[0] * x0.shape[1], "v_norm": v.detach().float().pow(2).mean()}
