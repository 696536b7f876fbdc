"""Batches from a dataset and a ResumableSampler, decoded ahead in threads, with an exact resume state.

Decoding runs ``prefetch`` items ahead of the consumer in a thread pool (PyAV and DALI release the
GIL while decoding). Prefetching moves the sampler past items the trainer has not seen yet, so the
state is the sampler's state *plus* the indices already drawn but not yet handed out in a batch
(``pending``: prefetched items and items waiting in a half-full bucket). Resuming decodes the pending
indices first, then continues the sampler: every index is handed out exactly once per epoch (a state saved
mid-epoch resumes with its world size only: the other ranks' pending indices are in their states). Prefetching
can also run the sampler to the end of its epoch (it then moves itself to the next) while items of the old
epoch are still pending: the state records that (``epoch_drawn``), and a resumed pass ends after those items,
as the uninterrupted one did, instead of bucketing them with the next epoch's. Each pass tells the dataset
its epoch (``dataset.set_epoch``, where it has one: VideoDataset's random clip starts are seeded by it).
With the default collate, a dataset's ``compact_item`` (VideoDataset's: the clip as uint8, rounded after the
resize) is what waits in a bucket; collate_videos scales it to float32 [-1, 1] when the batch is handed out.

Ranks of a distributed run (the sampler's world_size > 1 under torch.distributed) take the same number of
batches per pass: skipped files and shape buckets make the counts differ (one rank's pass ended a step early and
its next epoch's steps paired with the others' last ones), so before each batch the ranks agree (one all-reduce)
that every rank has one; when one has none, every rank ends the pass there, dropping the rest of its epoch.

    loader = BatchLoader(dataset, sampler, batch_size=8)
    for batch in loader:                  # one epoch; batch["video"] (B, 3, T, H, W), text as lists
        ...
        ckpt["data"] = loader.state_dict()
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain
from typing import Any

import torch

from engine.data.dataset import SkipItem, collate_videos
from engine.data.sampler import ResumableSampler
from engine.log import get_logger

log = get_logger("data")


def _distributed(world_size: int) -> bool:
    import torch.distributed as dist

    return world_size > 1 and dist.is_available() and dist.is_initialized()


_CPU_GROUP: dict = {}  # default group -> a gloo group beside it where it is device-only (NCCL), made once


def _every_rank_has(has: bool) -> bool:
    """Whether every rank of the default process group has a batch (one all-reduce of a CPU flag: through NCCL it
    would wait for the GPU's queued work, the step the batch is fetched beside)."""
    import torch.distributed as dist

    group = None
    if "gloo" not in dist.get_backend():  # NCCL (or another device-only backend)
        world = dist.group.WORLD
        if world not in _CPU_GROUP:
            _CPU_GROUP.clear()  # of a destroyed default group
            _CPU_GROUP[world] = dist.new_group(backend="gloo")  # by every rank: they all iterate the loader
        group = _CPU_GROUP[world]
    flag = torch.tensor([int(has)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


class BatchLoader:
    """Shape-bucketed batches of ``dataset[i]`` for the sampler's indices; see the module docstring.

    ``dataset[i]`` returns a dict with ``key`` (a tensor whose shape picks the bucket), or
    raises SkipItem (VideoDataset and LatentCacheDataset do). For the latent cache use
    ``key="latent", collate=functools.partial(collate_latents, text_fields=...)``.
    """

    def __init__(
        self,
        dataset: Any,
        sampler: ResumableSampler,
        *,
        batch_size: int,
        num_threads: int = 2,
        prefetch: int = 8,
        drop_last: bool = False,
        key: str = "video",
        collate: Callable[[list[dict[str, Any]]], dict[str, Any]] = collate_videos,
    ):
        if batch_size < 1 or num_threads < 1 or prefetch < 1:
            raise ValueError(f"BatchLoader: batch_size, num_threads, prefetch must be >= 1, got "
                             f"{batch_size}, {num_threads}, {prefetch}")  # fmt: skip
        self.dataset, self.sampler = dataset, sampler
        self.batch_size, self.num_threads, self.prefetch = batch_size, num_threads, prefetch
        self.drop_last = drop_last
        self.key, self.collate = key, collate
        self._pending: list[int] = []  # drawn from the sampler, not yet handed out
        self._epoch_drawn = False  # this pass drew its epoch to the end: the sampler is on the next one

    def state_dict(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler.state_dict(),
            "pending": list(self._pending),
            "epoch_drawn": self._epoch_drawn,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``. Another world size only between passes: mid-epoch, the other ranks' pending
        items are in their own states (a smaller world would skip them, a larger one repeat these)."""
        saved = state["sampler"].get("world_size", self.sampler.world_size)
        # drawn to the end with nothing pending (saved at the epoch's last batch): the sampler is at the next epoch
        if saved != self.sampler.world_size and state["pending"]:
            raise ValueError(
                f"BatchLoader state: saved mid-epoch by world_size {saved} ({len(state['pending'])} items of this "
                f"rank drawn, not yet handed out), this loader has world_size {self.sampler.world_size}: resume "
                f"with world_size {saved}"
            )
        self.sampler.load_state_dict(state["sampler"])
        self._pending = [int(i) for i in state["pending"]]
        self._epoch_drawn = bool(state.get("epoch_drawn", False))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch (the pending indices of a resumed state first)."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.sampler.epoch - 1 if self._epoch_drawn else self.sampler.epoch)
        if not _distributed(self.sampler.world_size):
            yield from self._batches()
            return
        batches = self._batches()
        try:
            while True:
                batch = next(batches, None)
                if not _every_rank_has(batch is not None):
                    break
                yield batch
            if batch is not None:  # another rank's pass is over: end this one too, as if its epoch were drawn
                batches.close()
                log.info("BatchLoader: another rank's pass is over; this rank drops a batch and %d more items "
                         "of the epoch so that every rank takes the same number of batches", len(self._pending))  # fmt: skip
                self._pending.clear()
                if not self._epoch_drawn:
                    self.sampler.set_epoch(self.sampler.epoch + 1)
                self._epoch_drawn = False
        finally:
            batches.close()

    def _batches(self) -> Iterator[dict[str, Any]]:
        # a pass over a whole epoch (not the rest of a resumed one) that gives no batch is an error
        whole_epoch = (
            not self._pending and not self._epoch_drawn and self.sampler.state_dict()["consumed"] == 0
        )
        source = chain(list(self._pending), () if self._epoch_drawn else self._draw())
        queue: deque[tuple[int, Future]] = deque()
        buckets: dict[tuple[int, ...], list[tuple[int, dict[str, Any]]]] = {}  # shape -> (index, item)
        tried = skipped = handed = 0
        # uint8 videos while they wait in a bucket (float32 ones took 4x: buckets x batch_size x clip)
        compact = self.collate is collate_videos and hasattr(self.dataset, "compact_item")
        get = self.dataset.compact_item if compact else self.dataset.__getitem__
        with ThreadPoolExecutor(self.num_threads, thread_name_prefix="decode") as pool:
            while True:
                while len(queue) < self.prefetch and (i := next(source, None)) is not None:
                    queue.append((i, pool.submit(get, i)))
                if not queue:
                    break
                i, fut = queue.popleft()
                tried += 1
                try:
                    item = fut.result()
                except SkipItem:
                    self._pending.remove(i)
                    skipped += 1
                    continue
                shape = tuple(item[self.key].shape)
                group = buckets.setdefault(shape, [])
                group.append((i, item))
                if len(group) == self.batch_size:
                    handed += len(group)
                    yield self._hand_out(buckets.pop(shape))
            for group in list(buckets.values()):
                if not self.drop_last:
                    handed += len(group)
                    yield self._hand_out(group)
                else:
                    for i, _ in group:
                        self._pending.remove(i)
        self._epoch_drawn = False  # the pass is over: the next one starts the sampler's (next) epoch
        # only a pass over a whole epoch says the data is unusable: the rest of a resumed epoch may hold just
        # a few items that are bad or that drop_last leaves out of a short bucket
        if whole_epoch and tried and not handed:
            if skipped == tried:
                seen = getattr(self.dataset, "skipped", None)  # (path, reason) of each (VideoDataset, cache)
                raise RuntimeError(f"BatchLoader: all {tried} items of this pass were skipped"
                                   + (f" ({len(seen)} in the quarantine; first: {seen[:3]})" if seen else ""))  # fmt: skip
            raise RuntimeError(
                f"BatchLoader: an epoch of {tried} items ({skipped} skipped) gave no batch: with drop_last, "
                f"every shape bucket held fewer than batch_size {self.batch_size} items"
            )

    def _draw(self) -> Iterator[int]:
        for i in self.sampler:
            self._pending.append(i)
            yield i
        self._epoch_drawn = True

    def _hand_out(self, group: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        for i, _ in group:
            self._pending.remove(i)
        return self.collate([item for _, item in group])
