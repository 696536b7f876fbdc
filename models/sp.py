"""Ulysses sequence parallelism for the video DiTs (``parallel.cp`` > 1).

A video of S tokens is split into ``size`` contiguous chunks, one per rank of the sequence-parallel group;
everything per token (linears, norms, adaLN, cross-attention to the replicated text) runs on the local
chunk. Self-attention needs every token: an all-to-all turns q, k, v from (B, S/P, H, D) (this rank's
tokens, all heads) into (B, S, H/P, D) (all tokens, this rank's heads), attention runs on the full
sequence with the full RoPE tables, and a second all-to-all brings the output back to (B, S/P, H, D). The
model's output is all-gathered along the sequence, so every rank of the group returns the whole velocity.

Gradients: the collectives are torch's autograd-aware functional collectives (the backward of an
all-to-all is the reverse all-to-all, of the all-gather a reduce-scatter). Every rank of a group computes
the same loss from the gathered output, so each rank's parameter gradient holds P times its tokens' share;
FSDP's reduce over the (data parallel x cp) mesh divides by dp * P, which leaves the data-parallel mean
of the full-sequence gradient (engine/parallel.py shards over that flattened mesh).

Communication per self-attention layer and rank: four all-to-alls (q, k, v, output) of B S dim / P
elements each; the attention FLOPs split P ways.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


@dataclass(frozen=True)
class SequenceParallel:
    """The sequence-parallel group a model shards its tokens over (``model.set_sequence_parallel``)."""

    group: dist.ProcessGroup

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def check(self, seq_len: int, heads: int, what: str) -> None:
        """Ulysses needs the tokens and the heads to split evenly over the group."""
        if seq_len % self.size or heads % self.size:
            raise ValueError(
                f"{what}: sequence parallelism over parallel.cp = {self.size} ranks needs the token count "
                f"({seq_len}) and the attention heads ({heads}) divisible by {self.size}"
            )

    def local(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous chunk of ``t`` along ``dim`` (tokens; heads with ``dim=2``)."""
        n = t.shape[dim] // self.size
        return t.narrow(dim, self.rank * n, n)

    def gather(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's chunk along ``dim``, concatenated in rank order (autograd: reduce-scatter back)."""
        # all_gather_tensor_autograd: torch 2.11 (the GPU image's) has no all_gather_single_autograd
        out = funcol.all_gather_tensor_autograd(t.contiguous(), dim, self.group)
        return funcol.wait_tensor(out) if isinstance(out, funcol.AsyncCollectiveTensor) else out

    def _all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        """Chunk p of dim 0 goes to rank p; chunk p of the result came from rank p."""
        out = funcol.all_to_all_single_autograd(t.contiguous(), None, None, self.group)
        return funcol.wait_tensor(out) if isinstance(out, funcol.AsyncCollectiveTensor) else out

    def seq_to_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, S/P, H, D) this rank's tokens -> (B, S, H/P, D) this rank's heads."""
        B, s, H, D = t.shape
        P = self.size
        t = t.reshape(B, s, P, H // P, D).permute(2, 0, 1, 3, 4)  # (P: head chunk, B, s, H/P, D)
        t = self._all_to_all(t)  # (P: token chunk from rank p, B, s, H/P, D)
        return t.permute(1, 0, 2, 3, 4).reshape(B, P * s, H // P, D)

    def heads_to_seq(self, t: torch.Tensor) -> torch.Tensor:
        """(B, S, H/P, D) this rank's heads -> (B, S/P, H, D) this rank's tokens (inverse of seq_to_heads)."""
        B, S, h, D = t.shape
        P = self.size
        t = t.reshape(B, P, S // P, h, D).permute(1, 0, 2, 3, 4)  # (P: token chunk, B, S/P, h, D)
        t = self._all_to_all(t)  # (P: head chunk from rank p, B, S/P, h, D)
        return t.permute(1, 2, 0, 3, 4).reshape(B, S // P, P * h, D)
