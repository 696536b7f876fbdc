"""Checkpointing on torch.distributed.checkpoint (DCP): sharded, atomic, async, resumable.

Layout of ``<run>/checkpoints``::

    step_00000100/            a complete checkpoint (only folders with COMPLETE count)
      .metadata, __*.distcp   DCP shards: model, optimizer, EMA, train state, extra states
      rank00000.pt ...        per-rank state: RNG (python, numpy, torch cpu/cuda) + data position
      COMPLETE                written last, by rank 0, after every rank has finished
    .tmp_step_00000150/       a save in progress (or killed mid-way: ignored, deleted on next save)

A save writes everything into ``.tmp_step_N``, then rank 0 writes ``COMPLETE`` and renames the folder
to ``step_N`` (rename is atomic on POSIX). A crash at any point leaves either the previous complete
checkpoint or the new one, never a half one (a step that already has a complete checkpoint keeps it).
``keep_last`` prunes the oldest complete checkpoints. A run that does not resume (``resume = false``)
first moves the folder's complete checkpoints of an earlier run aside, to ``checkpoints.before-<time>``:
pruning by step number would otherwise delete the new run's own checkpoints in favour of the old run's
later steps, and a later resume would load the old run.

``states`` is a dict of Stateful objects (``state_dict()`` / ``load_state_dict()``) saved with DCP;
``rank_states`` are Stateful objects whose state differs per rank (RNG, data-loader position) and go
to the per-rank file. Resuming: DCP reshards ``states`` to any world size and sharding; the per-rank files
need the world size that saved them and the ``layout`` given (the trainer's: ranks, data-parallel ranks,
``parallel.cp``), else the load refuses naming both, before DCP. A state the checkpoint does not hold is refused
by name, before DCP. Works with and without a process group. With several nodes the run folder must be
on a filesystem every rank sees (rank 0 commits the folder the others wrote into).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import time
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from engine.config import CheckpointConfig
from engine.dist import barrier, new_group
from engine.log import get_logger

log = get_logger("checkpoint")

MARKER = "COMPLETE"
_LAYOUT = "_layout"  # key of the per-rank files: the data-parallel layout that saved them
_STEP_RE = re.compile(r"^step_(\d+)$")


def _fsync_dir(path: Path) -> None:
    """Persist a rename in ``path`` (POSIX: the folder's own entry list needs its fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class ModelState:
    """Model (and optionally its optimizer) as a DCP Stateful; FSDP2-sharded or plain."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return get_model_state_dict(self.model)
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.optimizer is None:
            set_model_state_dict(self.model, state_dict)
        else:
            set_optimizer_state_dict(self.model, self.optimizer, state_dict)


class RNGState:
    """This rank's RNG streams: python, numpy, torch CPU and (when present) CUDA."""

    def state_dict(self) -> dict[str, Any]:
        sd = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            sd["cuda"] = torch.cuda.get_rng_state_all()
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        random.setstate(sd["python"])
        np.random.set_state(sd["numpy"])
        torch.set_rng_state(sd["torch"])
        if "cuda" in sd and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(sd["cuda"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _no_dist() -> bool:
    return not dist.is_initialized()


def _quiet_single_process() -> None:
    """DCP warns on every single-process save/load; that is a supported mode here. A filter for the process,
    not a catch_warnings block: an async save warns from DCP's upload thread after the call has returned (a
    block around the call let that one through on every save). Adding it again replaces the same filter."""
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def complete_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint under ``folder``, oldest first."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _describe(layout: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in layout.items())


class CheckpointManager:
    """Saves every ``cfg.interval`` steps, keeps the last ``cfg.keep_last``, resumes the newest."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        folder: str | Path,
        states: dict[str, Stateful],
        rank_states: dict[str, Stateful] | None = None,
        layout: dict[str, int] | None = None,
    ):
        self.cfg, self.folder = cfg, Path(folder)
        self.states, self.rank_states = states, rank_states or {}
        self.layout = dict(layout) if layout else None  # saved in the per-rank files, checked on load
        self._pending: tuple[Future, Path, Path] | None = None
        # DCP's own collectives (plan exchange, async finish) run on a group of their own: an async save
        # runs them on a background thread, and sharing training's group (gloo on CPU) would interleave them
        # with training's collectives in a different order per rank; on CUDA they also stay off the NCCL
        # stream, as DCP recommends for async saves.
        self._pg = new_group(backend="gloo") if dist.is_initialized() else None

    def _dcp_state(self) -> dict[str, Any]:
        return {k: s.state_dict() for k, s in self.states.items()}

    def save(self, step: int, *, force_sync: bool = False) -> Path:
        """Write checkpoint ``step`` (async when configured); returns its final path."""
        self.wait()
        tmp, final = self.folder / f".tmp_step_{step:08d}", self.folder / f"step_{step:08d}"
        if _rank() == 0:
            for stale in self.folder.glob(".tmp_step_*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=True)
        barrier("checkpoint mkdir")
        # fsync'd as DCP's own files are (sync_files): COMPLETE must never outlive a truncated file (power loss)
        with open(tmp / f"rank{_rank():05d}.pt", "wb") as f:
            per_rank = {k: s.state_dict() for k, s in self.rank_states.items()}
            if self.layout:
                per_rank[_LAYOUT] = self.layout
            torch.save(per_rank, f)
            f.flush()
            os.fsync(f.fileno())
        state = self._dcp_state()
        if self.cfg.async_save and not force_sync:
            _quiet_single_process()
            fut = dcp.async_save(state, checkpoint_id=str(tmp), no_dist=_no_dist(), process_group=self._pg)
            self._pending = (fut, tmp, final)
        else:
            _quiet_single_process()
            dcp.save(state, checkpoint_id=str(tmp), no_dist=_no_dist(), process_group=self._pg)
            self._commit(tmp, final)
        return final

    def wait(self) -> None:
        """Finish a pending async save (and commit it)."""
        if self._pending is not None:
            fut, tmp, final = self._pending
            self._pending = None
            fut.result()
            self._commit(tmp, final)

    def _commit(self, tmp: Path, final: Path) -> None:
        barrier("checkpoint write")
        if _rank() == 0:
            # this step is saved already: keep that (replacing it is not atomic)
            if (final / MARKER).is_file():
                shutil.rmtree(tmp, ignore_errors=True)
                log.info("checkpoint %s already complete; kept", final)
            else:
                with open(tmp / MARKER, "w") as f:
                    f.write("ok\n")
                    f.flush()
                    os.fsync(f.fileno())
                if final.exists():  # an incomplete leftover (not a checkpoint: no marker)
                    shutil.rmtree(final)
                os.rename(tmp, final)
                _fsync_dir(self.folder)
                log.info("checkpoint saved: %s", final)
            self._prune()
        barrier("checkpoint commit")

    def _prune(self) -> None:
        done = complete_checkpoints(self.folder)
        for _, path in done[: max(0, len(done) - self.cfg.keep_last)] if self.cfg.keep_last > 0 else []:
            shutil.rmtree(path, ignore_errors=True)

    def latest(self) -> tuple[int, Path] | None:
        done = complete_checkpoints(self.folder)
        return done[-1] if done else None

    def load(self, path: str | Path) -> None:
        """Restore every state from checkpoint folder ``path`` (must be complete)."""
        path = Path(path)
        if not (path / MARKER).is_file():
            raise FileNotFoundError(f"checkpoint '{path}' is not complete (no {MARKER} marker)")
        rank_file = path / f"rank{_rank():05d}.pt"
        if self.rank_states:
            # every rank decides alike, before DCP's collectives; a smaller world would drop the other ranks'
            # state silently: their data-loader position (items drawn, not yet trained, that no rank would
            # train this epoch) and their RNG streams
            world = dist.get_world_size() if dist.is_initialized() else 1
            saved = len(list(path.glob("rank[0-9][0-9][0-9][0-9][0-9].pt")))
            if saved != world:
                raise ValueError(
                    f"checkpoint '{path}' holds the per-rank state (data position, RNG) of {saved} ranks, this "
                    f"run has {world}: resume with {saved} ranks"
                )
            if not rank_file.is_file():
                raise FileNotFoundError(f"checkpoint '{path}' has no per-rank state for rank {_rank()}")
            per_rank = torch.load(rank_file, weights_only=False)
            # same world, other data-parallel layout (parallel.cp): rank r's file is not rank r's data shard
            saved_layout = per_rank.get(_LAYOUT)
            if saved_layout and self.layout and saved_layout != self.layout:
                raise ValueError(
                    f"checkpoint '{path}' was saved with the layout {_describe(saved_layout)}, this run has "
                    f"{_describe(self.layout)}: its per-rank state (data position, RNG) follows the data-parallel "
                    "layout; resume with the saved one"
                )
        state = self._dcp_state()
        # a state this run has that the checkpoint lacks (EMA switched on at resume): DCP's error names a tensor
        saved_keys = {
            k.split(".")[0] for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        }
        missing = [k for k, v in state.items() if v and k not in saved_keys]
        if missing:
            raise ValueError(
                f"checkpoint '{path}' has no {', '.join(map(repr, missing))} state (the run that saved it had "
                "none: for 'ema', train.ema_decay = 0); resume with the saved settings, or start a new run "
                "(checkpoint.resume = false)"
            )
        _quiet_single_process()
        dcp.load(state, checkpoint_id=str(path), no_dist=_no_dist(), process_group=self._pg)
        for k, s in self.states.items():
            s.load_state_dict(state[k])
        if self.rank_states:
            for k, s in self.rank_states.items():
                s.load_state_dict(per_rank[k])
        log.info("resumed from %s", path)

    def maybe_resume(self) -> int:
        """Load the newest complete checkpoint when ``cfg.resume``; returns its step (0 if none). A run that
        does not resume moves an earlier run's complete checkpoints aside first (module doc)."""
        if self.cfg.enabled and not self.cfg.resume:
            self._set_aside()
        found = self.latest() if self.cfg.resume and self.cfg.enabled else None
        if found is None:
            return 0
        self.load(found[1])
        return found[0]

    def _set_aside(self) -> None:
        if _rank() == 0 and complete_checkpoints(self.folder):
            aside = move_aside(self.folder, f"{self.folder.name}.before-{time.strftime('%Y%m%dT%H%M%S')}")
            log.warning(
                "checkpoint.resume = false: the checkpoints of an earlier run in %s were moved to %s",
                self.folder,
                aside,
            )
        barrier("checkpoint set aside")

    def due(self, step: int) -> bool:
        """Whether ``maybe_save(step)`` saves (every ``cfg.interval`` steps)."""
        return self.cfg.enabled and self.cfg.interval > 0 and step % self.cfg.interval == 0

    def maybe_save(self, step: int, *, last: bool = False) -> None:
        if (last and self.cfg.enabled) or self.due(step):
            self.save(step, force_sync=last)


def move_aside(path: Path, name: str) -> Path:
    """Rename ``path`` to its sibling ``name``, or ``name~1``, ``name~2``, ... (the first that is free)."""
    target, n = path.with_name(name), 0
    while target.exists():
        n += 1
        target = path.with_name(f"{name}~{n}")
    os.rename(path, target)
    return target


def full_state_dict(model: nn.Module, *, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """Unsharded CPU copy of the model's state dict (a collective under FSDP: call on every rank).

    If the model has ``to_diffusers_state_dict()`` that result is used (diffusers key layout).
    rank0_only: the other ranks join the gathers but keep nothing and get {} (one host copy per job, not
    one per rank: a 14B model in fp32 is 57 GB).
    """
    if hasattr(model, "to_diffusers_state_dict"):
        sd = model.to_diffusers_state_dict()
    else:
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))
    out = {}
    for k in sorted(sd):  # same order on every rank: full_tensor() is a collective
        v = sd[k]
        if isinstance(v, DTensor):
            v = v.full_tensor()
        if rank0_only and _rank() != 0:
            continue
        out[k] = v.detach().to("cpu", copy=True).contiguous()  # own storage: no aliasing of the model
    return out


def export_safetensors(model: nn.Module, path: str | Path) -> Path | None:
    """Write one consolidated safetensors file (rank 0); returns the path on rank 0, else None. Every rank
    returns once the file is written (the others read it next: a later stage's input)."""
    from safetensors.torch import save_file

    sd = full_state_dict(model, rank0_only=True)
    path = Path(path)
    if _rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(sd, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
        log.info("exported %d tensors to %s", len(sd), path)
    barrier("safetensors export")
    return path if _rank() == 0 else None
