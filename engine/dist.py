"""Distributed setup from the torchrun environment: process group, DeviceMesh, timeouts, shutdown.

One process per device. ``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
without them (a plain ``python`` run) the job is single-process and no process group is created, so
every engine component also works without torch.distributed.

Mesh layout (torchtitan's HSDP naming), outermost first::

    world = dp_replicate x dp_shard x cp
    dp_replicate: parameters replicated, gradients all-reduced across these groups (HSDP outer dim)
    dp_shard:     parameters sharded (FSDP2) inside a group
    cp:           sequence parallel (Ulysses, models/sp.py): ranks in one cp group see the same batch
                  and each runs a chunk of every sample's tokens

The backend is gloo on CPU and nccl on CUDA. Every collective has ``timeout_s``; a hang turns into a
:class:`DistTimeoutError` that names the collective and the timeout instead of a silent stall. A torchrun
worker ends with :func:`end_process` (the recipes' ``__main__`` does).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from engine.config import ParallelConfig
from engine.log import get_logger

log = get_logger("dist")


class DistTimeoutError(RuntimeError):
    """A collective did not finish within the configured timeout (a peer died or hung)."""


@dataclass
class DistInfo:
    """Where this process sits: global rank, world size, local rank, its device and the mesh."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: DeviceMesh | None = None
    timeout_s: float | None = None  # parallel.timeout_s, given to every group the mesh builds

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()

    # The sub-meshes below are derived from ``mesh`` once (cached): a mesh never changes, and slicing one
    # builds a new DeviceMesh, which the trainer and the recipes' per-step draws would otherwise repeat.

    @cached_property
    def dp_mesh(self) -> DeviceMesh | None:
        """The (dp_replicate, dp_shard) sub-mesh FSDP2 shards over (1-D when dp_replicate == 1)."""
        if self.mesh is None:
            return None
        names = self.mesh.mesh_dim_names or ()
        if "dp_replicate" in names and self.mesh["dp_replicate"].size() > 1:
            return self.mesh["dp_replicate", "dp_shard"]
        return self.mesh["dp_shard"]

    @cached_property
    def cp_mesh(self) -> DeviceMesh | None:
        """The sequence-parallel ("cp") sub-mesh when ``parallel.cp`` > 1: its ranks share a batch and each
        runs a chunk of every sample's tokens (Ulysses, models/sp.py); None otherwise."""
        if self.mesh is None or self.mesh["cp"].size() == 1:
            return None
        return self.mesh["cp"]

    @property
    def cp_size(self) -> int:
        """``parallel.cp``: how many ranks share each sample's tokens (1 without sequence parallelism)."""
        return 1 if self.cp_mesh is None else self.cp_mesh.size()

    @cached_property
    def fsdp_mesh(self) -> DeviceMesh | None:
        """The mesh FSDP2 shards parameters over and reduces gradients across: :attr:`dp_mesh`, with the cp
        ranks folded into the shard dimension when ``parallel.cp`` > 1 (their gradients are partial sums
        over tokens, which the reduction must add up; torchtitan's dp_shard_cp). Every rank must ask for it
        at the same point the first time: building it creates process groups."""
        if self.cp_mesh is None:
            return self.dp_mesh
        rep, shard, cp = self.mesh.shape
        if rep == 1:
            return set_group_timeouts(self.mesh["dp_shard", "cp"]._flatten("dp_shard_cp"), self.timeout_s)
        # a 2-D mesh of its own (slicing a flattened dim from the root mesh is deprecated)
        ranks = self.mesh.mesh.reshape(rep, shard * cp)
        mesh = DeviceMesh(self.device.type, ranks, mesh_dim_names=("dp_replicate", "dp_shard_cp"))
        return set_group_timeouts(mesh, self.timeout_s)

    @property
    def dp_rank(self) -> int:
        """Index of this rank's data shard (ranks in one cp group share a batch)."""
        if self.mesh is None:
            return 0
        return self.dp_mesh.get_local_rank() if self.dp_mesh.ndim == 1 else self._flat_dp_rank()

    @property
    def dp_size(self) -> int:
        return 1 if self.mesh is None else self.dp_mesh.size()

    def _flat_dp_rank(self) -> int:
        rep, shard = self.mesh["dp_replicate"], self.mesh["dp_shard"]
        return rep.get_local_rank() * shard.size() + shard.get_local_rank()


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> cuda:<local_rank> when CUDA is available, else cpu."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"run.device {device!r}: expected 'auto', 'cpu' or 'cuda'")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device 'cuda' was asked for but torch.cuda.is_available() is False")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def mesh_shape(world_size: int, dp_replicate: int, dp_shard: int, cp: int) -> tuple[int, int, int]:
    """Resolve ``dp_shard = -1`` and check ``dp_replicate * dp_shard * cp == world_size``."""
    for name, v in (("dp_replicate", dp_replicate), ("cp", cp)):
        if v < 1:
            raise ValueError(f"parallel.{name} = {v}: expected >= 1")
    if dp_shard == -1:
        if world_size % (dp_replicate * cp):
            raise ValueError(
                f"world size {world_size} is not divisible by parallel.dp_replicate * parallel.cp = "
                f"{dp_replicate} * {cp}"
            )
        dp_shard = world_size // (dp_replicate * cp)
    if dp_shard < 1 or dp_replicate * dp_shard * cp != world_size:
        raise ValueError(
            f"parallel.dp_replicate * dp_shard * cp = {dp_replicate} * {dp_shard} * {cp} must equal the "
            f"world size {world_size}"
        )
    return dp_replicate, dp_shard, cp


def build_mesh(device: torch.device, world_size: int, pcfg: ParallelConfig) -> DeviceMesh:
    """A 3-D DeviceMesh ("dp_replicate", "dp_shard", "cp") over all ranks, every group with parallel.timeout_s."""
    shape = mesh_shape(world_size, pcfg.dp_replicate, pcfg.dp_shard, pcfg.cp)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=("dp_replicate", "dp_shard", "cp"))
    return set_group_timeouts(mesh, pcfg.timeout_s)


def set_group_timeouts(mesh: DeviceMesh, timeout_s: float | None) -> DeviceMesh:
    """Give every process group of ``mesh`` the timeout ``timeout_s``: a mesh dimension that does not span
    all ranks gets a group of its own, which torch creates with the backend's default timeout (30 min for
    gloo, 10 for nccl), not the world group's."""
    if timeout_s is not None:
        from torch.distributed.distributed_c10d import _set_pg_timeout

        for name in mesh.mesh_dim_names or range(mesh.ndim):
            _set_pg_timeout(datetime.timedelta(seconds=timeout_s), mesh.get_group(name))
    return mesh


_CACHE: dict[tuple, DistInfo] = {}
_STARTED = False  # this process created a process group (end_process then skips finalisation)
_TIMEOUT_S: float | None = None  # parallel.timeout_s of that group (new_group gives it to groups made later)


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of process ``pid`` from /proc/<pid>/stat ("Z": exited, not yet reaped);
    None when it is gone or there is no /proc. The command name before them may hold spaces and ")"."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def _die_with_launcher() -> None:
    """Under torchrun (Linux): this worker gets SIGKILL when its torchrun dies. torchrun starts each worker in
    a session of its own, so a torchrun killed with SIGKILL (it cannot forward that) left the workers training
    and writing checkpoints into the run folder, beside the resumed run."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    launcher = os.getppid()
    # torchrun died before the call: this process was re-parented (to init, or to a subreaper)
    if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0 and os.getppid() != launcher:  # 1: PR_SET_PDEATHSIG
        os.kill(os.getpid(), signal.SIGKILL)


def init_distributed(pcfg: ParallelConfig, device: str = "auto") -> DistInfo:
    """Read the torchrun environment, create the process group (gloo/nccl) and the mesh.

    Single-process runs (no WORLD_SIZE, or WORLD_SIZE=1) get a DistInfo without a mesh. Calls with the
    same mesh shape and device return the same DistInfo (a mesh creates process groups: build it once).
    Under torchrun the process is also killed when its torchrun dies (:func:`_die_with_launcher`).
    """
    _die_with_launcher()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size == 1:
        return DistInfo(device=dev)
    key = (dev, mesh_shape(world_size, pcfg.dp_replicate, pcfg.dp_shard, pcfg.cp))
    if dist.is_initialized() and key in _CACHE:
        return _CACHE[key]
    global _STARTED, _TIMEOUT_S
    # barrier() and new_group() use it too when the script made the process group itself
    _TIMEOUT_S = pcfg.timeout_s
    if not dist.is_initialized():
        _STARTED = True
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=pcfg.timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    mesh = build_mesh(dev, world_size, pcfg)
    log.info("distributed: world %d, mesh %s %s", world_size, mesh.mesh_dim_names, tuple(mesh.shape))
    _CACHE[key] = DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, mesh=mesh,
                           timeout_s=pcfg.timeout_s)  # fmt: skip
    return _CACHE[key]


_TIMEOUT_MARKERS = ("timed out", "timeout", "deadline", "failed to pass monitoredbarrier")


@contextlib.contextmanager
def collective(what: str, timeout_s: float | None = None) -> Iterator[None]:
    """Turn a collective's timeout into a :class:`DistTimeoutError` that says what hung."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        if any(m in str(e).lower() for m in _TIMEOUT_MARKERS):
            after = f" after {timeout_s:g} s" if timeout_s else ""
            raise DistTimeoutError(
                f"collective '{what}' timed out{after} on rank {dist.get_rank() if dist.is_initialized() else 0}"
                " (a peer process died or is stuck; raise parallel.timeout_s if the step is just slow): "
                f"{e}"
            ) from e
        raise


def new_group(backend: str | None = None) -> dist.ProcessGroup:
    """A process group over all ranks with the world group's ``parallel.timeout_s``: torch gives a new group
    the backend's default timeout (30 min on gloo, 10 on nccl), so a stuck peer would hang that long."""
    timeout = None if _TIMEOUT_S is None else datetime.timedelta(seconds=_TIMEOUT_S)
    return dist.new_group(backend=backend, timeout=timeout)


def barrier(what: str = "barrier", timeout_s: float | None = None) -> None:
    """A barrier with a named, clear timeout error after ``timeout_s`` (default ``parallel.timeout_s``); a no-op
    without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    # gloo's monitored_barrier without a timeout waits the backend's default (30 min), not the group's
    timeout_s = timeout_s or _TIMEOUT_S
    kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    with collective(what, timeout_s):
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(**kwargs)
        else:
            dist.barrier()


def all_reduce_mean(t: torch.Tensor, what: str = "all_reduce") -> torch.Tensor:
    """Mean of ``t`` over all ranks (in place); identity without a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        with collective(what):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def any_rank(flag: bool, device: torch.device | None = None, what: str = "any_rank") -> bool:
    """Whether ``flag`` holds on any rank: a decision every rank must take alike although each measures it on
    its own (a wall-clock budget); ``flag`` without a process group. ``device``: the backend's (cuda for nccl)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([float(flag)], device=device)
    with collective(what):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shutdown() -> None:
    """Destroy the process group if one exists (safe to call twice)."""
    _CACHE.clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def end_process(code: int = 0) -> None:
    """End a torchrun worker after its work: destroy the process group, flush the logs and the standard
    streams, then leave with ``os._exit(code)``, skipping the interpreter's finalisation. A plain
    (single-process) run returns instead and exits as usual.

    Why: gloo runs collectives on its own worker threads, and FSDP2 / DTensor keep their process groups
    (and so those threads) alive after ``destroy_process_group``. A worker that drops the last reference to
    a collective's output tensor needs the GIL; if the main thread has begun finalising the interpreter by
    then, CPython ends the worker thread mid-destructor and the process aborts (``terminate called without
    an active exception``, SIGABRT, a failed torchrun job) although every result was written. Seen on 2 CPU
    ranks under load, with a core dump showing ``ProcessGroupGloo::runLoop`` -> ``~AsyncWork`` ->
    ``take_gil`` -> ``pthread_exit``. Call it last, from ``if __name__ == "__main__":`` only.
    """
    if not _STARTED:
        return
    shutdown()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def shard_of(n: int, rank: int, world_size: int) -> list[int]:
    """The indices ``rank, rank + world, ...`` of ``range(n)``: a deterministic, disjoint, near-even
    share of ``n`` work units (round-robin, so every rank gets about the same amount)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"shard_of: rank {rank} is outside world size {world_size}")
    return list(range(rank, n, world_size))


def gather_to_main(obj: object, what: str = "gather_object") -> list | None:
    """Every rank's picklable ``obj`` in rank order on rank 0, None on the others; ``[obj]`` without a
    process group. For small payloads (per-item scores, rows): it pickles through the backend."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    rank = dist.get_rank()
    out = [None] * dist.get_world_size() if rank == 0 else None
    with collective(what):
        dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: object, what: str = "broadcast_object") -> object:
    """Rank 0's picklable ``obj`` on every rank (a decision made once, e.g. what is left to do)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    with collective(what):
        dist.broadcast_object_list(box, src=0)
    return box[0]
