"""The training loop: one Trainer for distillation, RL and SFT recipes.

    trainer = Trainer(cfg, model, loss_fn, batches, run_dir=run_dir, extra_state=None)
    logs = trainer.fit()                  # runs until cfg.train.steps; returns the last logs (floats)
    # or, one step at a time (a recipe that interleaves rollouts, judging, evaluation):
    while trainer.step < cfg.train.steps:
        logs = trainer.train_step()
    trainer.close()                       # final checkpoint + export, flush metrics
    with trainer.ema_weights():           # the EMA weights swapped into trainer.model (if train.ema_decay > 0)
        evaluate(trainer.model)

Contracts:

- ``loss_fn(model, micro_batch) -> (loss, logs)``: a scalar loss tensor and a dict of scalars (floats
  or 0-d tensors, averaged over micro-batches and logging steps). Logs ``num_tokens`` and
  ``num_flops`` (forward FLOPs of the micro-batch) are popped and used for tokens/s and MFU. The
  recipe's loss_fn owns any frozen teacher/judge; the model passed in
  is the trainer's wrapped model.
- ``batches.next(step, model) -> list[micro_batch]`` gives one optimizer step's micro-batches (grad
  accumulation = the list's length). It receives the current model because on-policy distillation
  and RL roll out the policy to make the batch. ``batches.state_dict()`` / ``load_state_dict()`` make
  the data position resume exactly (saved per rank).
- Resuming on another layout: model, optimizer, EMA and step are resharded by DCP (FSDP2, HSDP or
  ``parallel.fsdp = false``, any mix); the per-rank state (data position, RNG) needs the saved world size and
  data-parallel layout (``parallel.cp``): another one is refused at start with one line naming both. A
  state the checkpoint lacks (EMA switched on at resume) is refused the same way.
- ``extra_state``: more Stateful objects to checkpoint with DCP (e.g. a judge's running stats).
- Profiling: the step is split into ``forward`` / ``backward`` / ``optimizer`` spans; a recipe marks
  its own phases with ``engine.profile.span("rollout")`` or ``span("judge_wait")`` (torch.profiler +
  NVTX). ``profile.enabled`` records a window of steps to ``<run>/trace``.
- The NaN guard costs one host sync per step (every rank must agree to skip an update).
- SIGINT / SIGTERM while training: every rank stops after the same step (agreed in the NaN guard's
  all-reduce), commits a pending async save, on SIGTERM (preemption) also saves that step, and exits
  (status 128 + signal, :class:`TrainingInterrupted`) with one line naming the checkpoint to resume from;
  a second signal stops at once. A resume drops metrics rows (JSONL, TensorBoard) past its checkpoint.
- Metrics rows: every ``train.log_every`` steps and at every checkpoint step (a save's time is not step time).
- Under torchrun the trainer creates the process group (or takes ``dist_info=`` from
  ``engine.dist.init_distributed``); a script's ``__main__`` ends with ``engine.dist.end_process()`` (as the
  recipes do), or calls ``engine.dist.shutdown()`` if it goes on without a process group.

The trainer owns: placement, FP8 conversion, AC / compile / FSDP2 (engine/parallel.py), AdamW over the
trainable parameters (fused on CUDA), the LR schedule (linear warmup, then constant or cosine to
``min_lr_ratio``), gradient clipping, EMA, the NaN/inf guard (a non-finite loss or gradient norm skips
the update, is logged and counted; ``max_bad_steps`` in a row raise :class:`NonFiniteLossError`),
per-rank seeding (``run.seed + data-parallel rank``: the ranks of a sequence-parallel group draw alike),
checkpoints (engine/checkpoint.py), metrics and profiling.

Every rank must build the model with the same weights; with several ranks the trainer also broadcasts
rank 0's parameters before sharding, so a per-rank seed before building does no harm. A model built on
the meta device (``model.meta_init``) is parallelised first and then materialised shard by shard
(``engine.parallel.materialize``): its weights are read by rank 0 only when the recipe named them with
``engine.parallel.defer_weights``, else randomly initialised (``reset_parameters`` / ``init_weights``).
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.distributed.fsdp import FSDPModule

from engine.checkpoint import CheckpointManager, ModelState, RNGState, export_safetensors
from engine.config import JobConfig, save_config
from engine.dist import DistInfo, collective, end_process, init_distributed, new_group
from engine.log import get_logger, progress
from engine.metrics import MetricsLogger, device_peak_flops, model_flops_per_token
from engine.parallel import is_meta, materialize, parallelize
from engine.precision import (
    apply_attention_precision,
    apply_fp8,
    attention_precision_problem,
    autocast,
    fp8_context,
)
from engine.profile import Profiler, span

log = get_logger("trainer")

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, Any]]]


class Batches(Protocol):
    def next(self, step: int, model: nn.Module) -> list[Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


class TrainingInterrupted(SystemExit):
    """SIGINT / SIGTERM stopped training after a step (exit status 128 + the signal's number)."""


# SIGINT / SIGTERM while a trainer trains: the first is acted on after the current step, by every rank at the
# same step (agreed in the NaN guard's all-reduce); a second one gets the original handler (stops at once). A
# signal the process was started to ignore stays ignored.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_ORIG_HANDLERS: dict[int, Any] = {}
_DEFAULT_HANDLERS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
_ACTIVE: weakref.ref | None = None


def _on_signal(signum: int, frame: Any) -> None:
    trainer = _ACTIVE() if _ACTIVE is not None else None
    if trainer is None or trainer._closed or trainer._stop_signal:
        _restore_signal_handlers()
        if signal.getsignal(signum) is _on_signal:  # nothing to give back: raising again would come back here
            signal.signal(signum, _DEFAULT_HANDLERS[signum])
        signal.raise_signal(signum)
        return
    trainer._stop_signal = signum
    log.warning(
        "%s received: stopping after this step, once its checkpoint is committed (send it again to stop now)",
        signal.Signals(signum).name,
    )


def _restore_signal_handlers() -> None:
    global _ACTIVE
    for s, h in _ORIG_HANDLERS.items():
        signal.signal(s, h)
    _ORIG_HANDLERS.clear()
    _ACTIVE = None


def lr_at(step: int, *, lr: float, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """LR for optimizer step ``step`` (0-based).

    warmup: lr * (step + 1) / warmup for step < warmup (the peak lr at its last step, warmup - 1); then
    "constant": lr, or "cosine": lr * (r + (1 - r) * (1 + cos(pi * p)) / 2), r = min_ratio, decaying from the
    peak step s0 = max(warmup, 1) - 1 to the last step total - 1: p = (step - s0) / (total - 1 - s0), clamped
    to 1 (the last step gets lr * r; with warmup 0, step 0 gets lr).
    """
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"train.lr_schedule {schedule!r}: expected 'constant' or 'cosine'")
    peak = max(warmup, 1) - 1  # the step that had the peak lr
    p = min(1.0, (step - peak) / max(1, total - 1 - peak))
    return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p)))


class EMA:
    """Exponential moving average of the trainable parameters: ema <- decay * ema + (1 - decay) * p.

    Kept in fp32, sharded like the parameters under FSDP2 (DTensor copies). Stateful for DCP, keyed by
    the parameters' names without activation checkpointing's wrapper prefix (as the model's own state
    dict), so a run resumes with another ``parallel.activation_checkpointing``.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay {decay}: expected 0 < decay < 1 (0 disables EMA)")
        self.decay = decay
        self.model = model
        self.params = {
            n.replace(_CHECKPOINT_PREFIX, ""): p for n, p in model.named_parameters() if p.requires_grad
        }
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the model (restored on exit)."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        self._reshard()
        for n, p in self.params.items():
            p.copy_(self.shadow[n])
        try:
            yield
        finally:
            self._reshard()
            for n, p in self.params.items():
                p.copy_(saved[n])

    def _reshard(self) -> None:
        """Free FSDP2's unsharded parameters: a no-grad forward leaves the root's and the last block's
        gathered (not resharded after forward), and the next forward would reuse them, not the swapped shards."""
        for m in self.model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def state_dict(self) -> dict[str, Any]:
        return dict(self.shadow)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for n, t in self.shadow.items():
            t.copy_(sd[n])


class TrainState:
    """Step and NaN-guard counters (global, saved with DCP)."""

    def __init__(self):
        self.step, self.skipped, self.bad_in_row = 0, 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": torch.tensor(self.step),
            "skipped": torch.tensor(self.skipped),
            "bad_in_row": torch.tensor(self.bad_in_row),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step, self.skipped, self.bad_in_row = (int(sd[k]) for k in ("step", "skipped", "bad_in_row"))


class _RankState:
    """Per-rank state: RNG streams and the data position."""

    def __init__(self, batches: Batches):
        self.batches, self.rng = batches, RNGState()

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.state_dict(), "batches": self.batches.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.rng.load_state_dict(sd["rng"])
        self.batches.load_state_dict(sd["batches"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, cfg: JobConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the parameters with requires_grad (fused on CUDA)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=True); nothing to optimize")
    t = cfg.train
    if len(t.betas) != 2:
        raise ValueError(f"train.betas {t.betas}: expected two values [beta1, beta2]")
    return torch.optim.AdamW(
        params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, fused=device.type == "cuda"
    )


class Trainer:
    """See the module docstring for the API."""

    def __init__(
        self,
        cfg: JobConfig,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Batches,
        *,
        run_dir: str | Path,
        extra_state: dict[str, Any] | None = None,
        dist_info: DistInfo | None = None,
    ):
        self.cfg, self.loss_fn, self.batches = cfg, loss_fn, batches
        self.run_dir = Path(run_dir)
        self.dist = dist_info or init_distributed(cfg.parallel, cfg.run.device)
        seed_everything(cfg.run.seed + self.dist.dp_rank)  # the ranks of a cp group draw alike
        self.unwrapped = model
        self.model = self._build_model(model)
        self.optimizer = build_optimizer(self.model, cfg, self.dist.device)
        # only 0 disables EMA: EMA() rejects a negative decay instead of it silently meaning "off"
        self.ema = EMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay != 0 else None
        self.state = TrainState()
        # FSDP's gathers and sequence parallelism's all-to-alls run in every forward: the ranks must agree on
        # the micro-batch count (a gloo group of its own: no device sync, apart from DCP's async collectives)
        lockstep = self.dist.distributed and (self.sharded or self.dist.cp_size > 1)
        self._count_pg = new_group(backend="gloo") if lockstep else None
        self._build_components(extra_state or {})
        self._last_logs: dict[str, float] = {}
        self._closed, self._stepped = False, False
        self._stop_signal = 0  # a SIGINT / SIGTERM received while training (this rank)
        self._resume()

    # ---- build steps ----------------------------------------------------------------------------
    def _build_model(self, model: nn.Module) -> nn.Module:
        meta = is_meta(model)  # built on the meta device: sharded first, then materialised (engine.parallel)
        if not meta:
            model.to(self.dist.device)
        if self.dist.distributed and not meta:
            with collective("broadcast initial parameters", self.cfg.parallel.timeout_s):
                for t in list(model.parameters()) + list(model.buffers()):
                    dist.broadcast(t.data, src=0)
        apply_fp8(model, self.cfg.precision)
        if self.cfg.precision.fp8 == "torchao" and not self.cfg.parallel.compile:
            log.warning(
                "precision.fp8 = 'torchao' without parallel.compile: torchao's Float8Linear is slow in eager "
                "mode (measured 0.70x of the bf16 step on an H200 and 0.66x on an H100, bench/results/); "
                "set --parallel.compile true"
            )
        if self.cfg.model.attention_precision == "fp8":
            c = self.cfg
            if why := attention_precision_problem(
                c.model, c.precision.fp8, c.parallel.activation_checkpointing
            ):
                raise ValueError(why)
            apply_attention_precision(model, self.cfg.model)
        d = self.dist
        model = parallelize(model, self.cfg.parallel, self.cfg.precision, d.fsdp_mesh, d.cp_mesh)
        if meta:
            materialize(
                model, self.dist.device, seed=self.cfg.run.seed, timeout_s=self.cfg.parallel.timeout_s
            )
        self.sharded = isinstance(model, FSDPModule)
        return model

    def _build_components(self, extra_state: dict[str, Any]) -> None:
        cfg, d = self.cfg, self.dist
        if d.is_main:
            save_config(cfg, self.run_dir)
        states: dict[str, Any] = {
            "model": ModelState(self.model),
            "optim": ModelState(self.model, self.optimizer),
            "train": self.state,
            **extra_state,
        }
        if self.ema is not None:
            states["ema"] = self.ema
        # rank r's data shard and RNG are those of data-parallel rank r // cp: a resume keeps the layout
        layout = {"ranks": d.world_size, "data-parallel ranks": d.dp_size, "parallel.cp": d.cp_size}
        self.checkpointer = CheckpointManager(
            cfg.checkpoint, self.run_dir / "checkpoints", states, {"rank": _RankState(self.batches)}, layout
        )
        peak = device_peak_flops(d.device, "fp8" if cfg.precision.fp8 != "none" else "bf16")
        self.metrics = MetricsLogger(
            self.run_dir,
            device=d.device,
            is_main=d.is_main,
            log_every=cfg.train.log_every,
            flops_per_token=model_flops_per_token(self.unwrapped),
            peak_flops=peak,
        )
        trace_dir = cfg.profile.trace_dir or str(self.run_dir / "trace")
        # entered at the first step: its first window step is a training step, not construction + resume
        self.profiler = Profiler(cfg.profile, trace_dir, is_main=d.is_main)

    def _resume(self) -> None:
        step = self.checkpointer.maybe_resume()
        if step:
            log.info("resumed at step %d", self.state.step)
        if step and self.cfg.checkpoint.enabled and self.cfg.checkpoint.resume:
            self.metrics.drop_after(step)  # rows past the checkpoint are trained (and logged) again
        else:  # a new run from step 1 (no checkpoint to resume): an earlier run's rows set aside, not deleted
            self.metrics.set_aside()

    # ---- public API -----------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Optimizer steps taken so far (skipped non-finite steps count: they consume data)."""
        return self.state.step

    @property
    def skipped_steps(self) -> int:
        return self.state.skipped

    def ema_weights(self) -> contextlib.AbstractContextManager:
        """Context in which ``trainer.model`` holds the EMA weights (requires train.ema_decay > 0)."""
        if self.ema is None:
            raise RuntimeError("no EMA: set train.ema_decay > 0 to keep one")
        return self.ema.swapped_in()

    def current_lr(self) -> float:
        t = self.cfg.train
        return lr_at(
            self.state.step,
            lr=t.lr,
            warmup=t.warmup_steps,
            total=t.steps,
            schedule=t.lr_schedule,
            min_ratio=t.min_lr_ratio,
        )

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``batches.next(step, model)``; returns this step's logs (tensors)."""
        # the first logged interval is timed from here, not from construction (a resume's checkpoint load)
        if not self._stepped:
            self.metrics.restart_clock()
            self.profiler.start(self.state.step)
            self._stepped = True
        self._install_signal_handlers()  # again after a step that raised (which gave them back)
        try:
            return self._step()
        except BaseException:
            # no step follows an error: a SIGINT after it must interrupt, not wait for the end of a step; the
            # profiler window ends here, so the steps it recorded (the failing one included) are written
            self._uninstall_signal_handlers()
            self.profiler.__exit__(None, None, None)
            raise

    def _step(self) -> dict[str, Any]:
        micro = self.batches.next(self.state.step, self.model)
        if not isinstance(micro, list | tuple) or not micro:
            raise ValueError(
                f"batches.next() must return a non-empty list of micro-batches, got {type(micro)}"
            )
        if self._count_pg is not None:
            self._check_micro_count(len(micro))
        loss_sum, logs, work = self._forward_backward(list(micro))
        gnorm = self._clip_grad_norm()
        ok, stop = self._finite(loss_sum, gnorm)
        lr = self.current_lr()
        if ok:
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            with span("optimizer"):
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.update()
            self.state.bad_in_row = 0
        else:
            self._on_bad_step(loss_sum, gnorm)
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        logs.update(loss=loss_sum.detach(), grad_norm=gnorm.detach(), lr=lr)
        self._after_step(logs if ok else {"lr": lr}, *work)
        if stop:
            self._stop(stop)
        return logs

    def fit(self) -> dict[str, float]:
        """Train until ``train.steps``; save the final checkpoint and export; returns the last logs."""
        steps = range(self.state.step, self.cfg.train.steps)
        for _ in progress(steps, desc="train", total=len(steps)):
            self.train_step()
        self.close()
        return self._last_logs

    def close(self) -> None:
        """Flush metrics, stop the profiler, write the final checkpoint and the safetensors export.

        Called by :meth:`fit`; a recipe that drives :meth:`train_step` itself calls it once at the end
        (a second call does nothing).
        """
        if self._closed:
            return
        self._closed = True
        self._uninstall_signal_handlers()
        self.profiler.__exit__(None, None, None)
        self._last_logs = self.metrics.flush(self.state.step, self._counters()) or self._last_logs
        self.metrics.close()
        ck = self.cfg.checkpoint
        if ck.enabled and self.state.step > 0:
            self.checkpointer.wait()  # a pending async save of this very step counts (no second save of it)
            done = self.checkpointer.latest()
            if done is None or done[0] != self.state.step:
                self.checkpointer.maybe_save(self.state.step, last=True)
            self.checkpointer.wait()
        if ck.export_safetensors and self.state.step > 0:
            export_safetensors(self.model, self.run_dir / "model.safetensors")
            if self.ema is not None:
                with self.ema_weights():
                    export_safetensors(self.model, self.run_dir / "ema.safetensors")
        if self._stop_signal:  # received after the last step: everything is saved now
            self._exit_interrupted(self._stop_signal)

    # ---- SIGINT / SIGTERM -----------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        global _ACTIVE
        if threading.current_thread() is not threading.main_thread():
            return
        if not _ORIG_HANDLERS:
            for s in _STOP_SIGNALS:
                # a process started with the signal ignored (a background job of a shell script: SIGINT; nohup)
                # keeps it ignored: a Ctrl-C meant for the foreground stopped the training
                if signal.getsignal(s) is signal.SIG_IGN:
                    continue
                prev = signal.signal(s, _on_signal)
                # never _on_signal itself: given back, it would leave the signal with no handler to reach
                _ORIG_HANDLERS[s] = _DEFAULT_HANDLERS[s] if prev is _on_signal else prev
        _ACTIVE = weakref.ref(self)

    def _uninstall_signal_handlers(self) -> None:
        if _ACTIVE is not None and _ACTIVE() is self:
            _restore_signal_handlers()

    def _stop(self, signum: int) -> None:
        """Every rank, after the same step: commit the pending async save; on SIGTERM (preemption) also save
        this step (synchronously: a SIGKILL during it keeps the previous checkpoint); then exit."""
        self._closed = True
        self._uninstall_signal_handlers()
        self.checkpointer.wait()
        self.profiler.__exit__(None, None, None)
        # the row first: a kill right after the save below would leave a checkpoint past the last row
        self._last_logs = self.metrics.flush(self.state.step, self._counters()) or self._last_logs
        self.metrics.close()
        if signum == signal.SIGTERM and self.state.step > 0:
            done = self.checkpointer.latest()
            if done is None or done[0] != self.state.step:
                self.checkpointer.maybe_save(self.state.step, last=True)
        self._exit_interrupted(signum)

    def _exit_interrupted(self, signum: int) -> None:
        done = self.checkpointer.latest() if self.cfg.checkpoint.enabled else None
        where = (
            f"resume from checkpoint step {done[0]} ({done[1]})" if done else "no checkpoint to resume from"
        )
        if self.dist.is_main:
            log.warning(
                "%s: training stopped at step %d; %s", signal.Signals(signum).name, self.state.step, where
            )
        end_process(128 + signum)  # under torchrun (see engine.dist.end_process)
        raise TrainingInterrupted(128 + signum)

    # ---- step internals -------------------------------------------------------------------------
    def _forward_backward(self, micro: list[Any]) -> tuple[torch.Tensor, dict[str, Any], tuple[int, float]]:
        n = len(micro)
        loss_sum = torch.zeros((), device=self.dist.device)
        logs: dict[str, Any] = {}
        tokens, flops = 0, 0.0
        for i, mb in enumerate(micro):
            if self.sharded:  # reduce-scatter gradients only on the last micro-step
                self.model.set_requires_gradient_sync(i == n - 1)
            with (
                span("forward"),
                fp8_context(self.cfg.precision, dist.group.WORLD if self.dist.distributed else None),
                autocast(self.dist.device, self.cfg.precision, self.sharded),
            ):
                loss, mlogs = self.loss_fn(self.model, mb)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(f"loss_fn must return a scalar tensor as its loss, got {loss!r:.80}")
            with span("backward"):
                (loss / n).backward()
            loss_sum += loss.detach().float() / n
            mlogs = dict(mlogs)
            tokens += int(mlogs.pop("num_tokens", 0))
            flops += float(mlogs.pop("num_flops", 0.0))
            for k, v in mlogs.items():
                v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
                logs[k] = logs.get(k, 0.0) + v / n
        if not self.sharded and self.dist.distributed:
            self._all_reduce_grads()
        return loss_sum, logs, (tokens, flops)

    def _check_micro_count(self, n: int) -> None:
        """Every rank raises when the ranks' micro-batch counts differ (it was a hang until parallel.timeout_s)."""
        counts = torch.tensor([n, -n])
        with collective("micro-batch count all-reduce", self.cfg.parallel.timeout_s):
            dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=self._count_pg)
        hi, lo = int(counts[0]), -int(counts[1])
        if hi != lo:
            raise ValueError(
                f"step {self.state.step + 1}: batches.next() gave {n} micro-batches on rank {self.dist.rank}, "
                f"{lo} to {hi} across the ranks: with FSDP or parallel.cp > 1 every rank must run as many "
                "micro-batches (each forward gathers parameters or exchanges tokens with the other ranks)"
            )

    def _all_reduce_grads(self) -> None:
        """Data parallel without FSDP (parallel.fsdp = false): average gradients over all ranks.

        A parameter that got no gradient on some rank (a branch that rank's batch did not use) counts as a zero
        gradient there, so every rank runs the same all-reduces; one that no rank used keeps None (as one
        process on the whole batch would)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        with collective("gradient all-reduce", self.cfg.parallel.timeout_s):
            used = torch.tensor(
                [p.grad is not None for p in params], dtype=torch.uint8, device=self.dist.device
            )
            dist.all_reduce(used, op=dist.ReduceOp.MAX)
            for p, u in zip(params, used.tolist(), strict=True):
                if u:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)

    def _clip_grad_norm(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.dist.device)
        max_norm = self.cfg.train.max_grad_norm if self.cfg.train.max_grad_norm > 0 else float("inf")
        with collective("grad-norm reduce", self.cfg.parallel.timeout_s):
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
        return norm

    def _finite(self, loss_sum: torch.Tensor, gnorm: torch.Tensor) -> tuple[bool, int]:
        """One host sync per step: every rank must agree to skip (the loss is per rank), and to stop after
        this step on a signal (the highest signal number of any rank: SIGTERM wins over SIGINT)."""
        bad = (~torch.isfinite(loss_sum) | ~torch.isfinite(gnorm)).float().reshape(1)
        flags = torch.cat([bad, bad.new_tensor([float(self._stop_signal)])])
        if self.dist.distributed:
            with collective("NaN-guard all-reduce", self.cfg.parallel.timeout_s):
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad_v, stop = flags.tolist()
        return bad_v == 0.0, int(stop)

    def _on_bad_step(self, loss_sum: torch.Tensor, gnorm: torch.Tensor) -> None:
        self.state.skipped += 1
        self.state.bad_in_row += 1
        limit = self.cfg.train.max_bad_steps
        log.warning(
            "step %d: non-finite loss %s / grad norm %s; update skipped (%d in a row, %d total)",
            self.state.step,
            loss_sum.item(),
            gnorm.item(),
            self.state.bad_in_row,
            self.state.skipped,
        )
        if self.state.bad_in_row >= limit:
            # the interval so far is written first: its good steps (the blow-up's run-up) and the skip count
            self._last_logs = self.metrics.flush(self.state.step, self._counters()) or self._last_logs
            # a pending async save holds the last good step: commit it, the checkpoint to resume from
            self.checkpointer.wait()
            raise NonFiniteLossError(
                f"{self.state.bad_in_row} consecutive steps (up to step {self.state.step}) had a non-finite loss "
                f"or gradient norm (train.max_bad_steps = {limit}); stopping. Lower train.lr, check the data, "
                "or resume from the last checkpoint."
            )

    def _counters(self) -> dict[str, float]:
        return {"skipped_steps": float(self.state.skipped)}

    def _after_step(self, logs: dict[str, Any], tokens: int, flops: float) -> None:
        cp = self.dist.cp_size  # per device: its share of the tokens
        self.metrics.update(logs, tokens // cp, flops / cp)
        # a checkpoint step ends a row too: a resume there drops only rows of steps it trains again
        if self.metrics.should_log(self.state.step) or self.checkpointer.due(self.state.step):
            self._last_logs = self.metrics.flush(self.state.step, self._counters())
        self.profiler.step()
        if self.checkpointer.due(self.state.step):
            self.checkpointer.maybe_save(self.state.step)
            self.metrics.restart_clock()  # the save is not step time: the next row's tokens/s and MFU leave it out
