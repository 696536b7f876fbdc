"""A deterministic, resumable, distributed index sampler.

Each epoch has one global order (a permutation seeded by ``seed + epoch``, or ``range(n)``). Rank r of
W takes ``order[r::W]``: with ``drop_last`` the order is cut to a multiple of W, otherwise it is
padded with its own first indices (as torch's DistributedSampler does) so that every rank yields the
same count. The state is ``{epoch, consumed}`` where ``consumed`` counts global samples taken this
epoch (positions x W); resuming continues from there, also with a different world size when the
ranks' positions line up. Exhausting an epoch moves the sampler to the start of the next one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


class ResumableSampler:
    """Indices for one rank; ``state_dict()`` / ``load_state_dict()`` store epoch and position."""

    def __init__(
        self,
        num_items: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ):
        if num_items < 1:
            raise ValueError(f"ResumableSampler num_items: expected >= 1, got {num_items}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"ResumableSampler rank/world_size: expected 0 <= rank < world_size, got {rank}/{world_size}"
            )
        if drop_last and num_items < world_size:
            raise ValueError(
                f"ResumableSampler: drop_last with {num_items} items < world_size {world_size} yields nothing"
            )
        self.num_items, self.rank, self.world_size = num_items, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0
        self._base = 0  # global samples consumed before the current run of positions
        self.position = 0  # samples this rank has handed out since _base

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_items, generator=g).tolist()

    def _rank_indices(self) -> list[int]:
        order = self._order()
        w = self.world_size
        total = (len(order) // w) * w if self.drop_last else -(-len(order) // w) * w
        while len(order) < total:
            order = order + order[: total - len(order)]  # pad by wrapping around
        return order[self._base + self.rank : total : w]

    def __len__(self) -> int:
        """Samples this rank yields in a full epoch."""
        n = self.num_items // self.world_size if self.drop_last else -(-self.num_items // self.world_size)
        return n

    def __iter__(self) -> Iterator[int]:
        """The rest of the current epoch; at its end the sampler moves to the next epoch."""
        indices = self._rank_indices()
        while self.position < len(indices):
            i = indices[self.position]
            self.position += 1  # counted as consumed once handed out: a checkpoint taken now resumes after it
            yield i
        self.set_epoch(self.epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        self.epoch, self._base, self.position = int(epoch), 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "consumed": self._base + self.position * self.world_size,
            "num_items": self.num_items,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``'s epoch and position. The item count, seed and shuffle must match."""
        for key in ("num_items", "seed", "shuffle"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"ResumableSampler state: {key}={state.get(key)!r} but this sampler has {getattr(self, key)!r}"
                )
        consumed = int(state["consumed"])
        if consumed % self.world_size:
            raise ValueError(
                f"ResumableSampler state: {consumed} samples consumed is not a multiple of world_size "
                f"{self.world_size}; resume with the old world size {state.get('world_size')}"
            )
        self.epoch, self._base, self.position = int(state["epoch"]), consumed, 0
