"""Trainer: LR schedule, EMA, NaN/inf guard, gradient accumulation, trainable-only optimizer, metrics."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
from tiny import SeededBatches, TinyDiT, flow_loss  # noqa: E402

from engine.config import JobConfig  # noqa: E402
from engine.trainer import EMA, NonFiniteLossError, Trainer, lr_at  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _cfg(steps: int = 4, **train) -> JobConfig:
    cfg = JobConfig()
    cfg.run.device = "cpu"
    cfg.checkpoint.enabled = False
    cfg.checkpoint.export_safetensors = False
    cfg.train.steps, cfg.train.lr, cfg.train.log_every = steps, 1e-2, 2
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def _cosine_reference(lr: float, warmup: int, total: int, r: float) -> list[float]:
    """Independent construction: a linear ramp to lr over the warmup steps, then a half cosine sampled at
    evenly spaced angles from the peak (warmup's last step, or step 0 without warmup) to pi at step total - 1."""
    ramp = [lr * (i + 1) / warmup for i in range(min(warmup, total))]
    if warmup >= total:
        return ramp
    angles = np.linspace(0.0, np.pi, total - warmup + 1)[1:] if warmup else np.linspace(0.0, np.pi, total)
    return ramp + [lr * (r + (1 - r) * (1 + math.cos(a)) / 2) for a in angles]


@pytest.mark.parametrize("warmup,total", [(4, 14), (0, 10), (0, 2), (3, 4), (1, 3), (5, 5), (7, 5), (0, 1)])
def test_lr_schedule_analytic(warmup, total):
    """Cosine: peak at warmup's last step, decays after it, the last step (total - 1) gets exactly lr * r.
    It had the peak twice (steps warmup - 1 and warmup) and never reached lr * r (p < 1 at the last step)."""
    kw = dict(lr=2.0, warmup=warmup, total=total, schedule="cosine", min_ratio=0.1)
    got = [lr_at(s, **kw) for s in range(total)]
    assert got == pytest.approx(_cosine_reference(2.0, warmup, total, 0.1), rel=1e-12, abs=0)
    if warmup:
        assert got[: min(warmup, total)] == [2.0 * (i + 1) / warmup for i in range(min(warmup, total))]
    if warmup < total:
        peak = max(warmup, 1) - 1
        assert got[peak] == 2.0
        assert all(a > b for a, b in zip(got[peak:], got[peak + 1 :], strict=False))  # no second peak
        if total - 1 > peak:
            assert got[-1] == 2.0 * 0.1  # exactly the floor
    assert lr_at(total + 50, **kw) == pytest.approx(0.2)  # past the run: stays at the floor


def test_constant_schedule_is_warmup_then_flat():
    kw = dict(lr=2.0, warmup=10, total=20, schedule="constant", min_ratio=0.1)
    assert [lr_at(s, **kw) for s in range(20)] == [2.0 * (s + 1) / 10 for s in range(10)] + [2.0] * 10
    assert lr_at(7, lr=2.0, warmup=0, total=10, schedule="constant", min_ratio=0.1) == 2.0
    with pytest.raises(ValueError, match="lr_schedule 'linear'"):
        lr_at(5, lr=1.0, warmup=0, total=10, schedule="linear", min_ratio=0.0)


@pytest.mark.parametrize("warmup,steps", [(2, 6), (0, 4), (3, 4)])
def test_trainer_applies_the_schedule_to_the_optimizer(tmp_path, warmup, steps):
    """The LR each optimizer.step() actually read (a step pre-hook) follows the reference schedule."""
    cfg = _cfg(steps, warmup_steps=warmup, lr_schedule="cosine", min_lr_ratio=0.1)
    tr = Trainer(cfg, TinyDiT(), flow_loss, SeededBatches(), run_dir=tmp_path)
    used: list[float] = []
    tr.optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    logged = [float(tr.train_step()["lr"]) for _ in range(steps)]
    expect = _cosine_reference(1e-2, warmup, steps, 0.1)
    assert used == pytest.approx(expect, rel=1e-12) and logged == pytest.approx(expect, rel=1e-12)
    assert used[-1] == pytest.approx(1e-3, rel=1e-12)  # the last optimizer step at lr * min_lr_ratio


def test_fp8_attention_needs_the_triton_backend(tmp_path):
    cfg = _cfg()
    cfg.model.attention_precision = "fp8"  # with the default backend, sdpa, it would silently run bf16
    with pytest.raises(
        ValueError, match="needs model.attention 'triton', got 'sdpa'.*fp8_attention_backend te"
    ):
        Trainer(cfg, TinyDiT(), flow_loss, SeededBatches(), run_dir=tmp_path)


def test_fp8_attention_through_te_takes_any_backend():
    """model.fp8_attention_backend "te" (cuDNN's FP8 attention, a kernel of its own) runs beside any
    model.attention; "triton" is the triton backend's FP8 mode and needs it."""
    from engine.config import ModelConfig
    from engine.precision import attention_precision_problem

    for attention in ("sdpa", "triton", "flash_attn", "te"):
        m = ModelConfig(attention=attention, attention_precision="fp8", fp8_attention_backend="te")
        assert attention_precision_problem(m) is None
        m.fp8_attention_backend = "triton"
        assert (attention_precision_problem(m) is None) == (attention == "triton")
        m.attention_precision = "bf16"
        assert attention_precision_problem(m) is None
    # TE linears + activation checkpointing: TE's checkpoint restores FP8 scales per TE module in forward order,
    # and backend "te" shares one among the layers: refused, naming the three keys
    m = ModelConfig(attention_precision="fp8", fp8_attention_backend="te")
    for linears, ac in (
        ("te", "full"),
        ("te", "selective"),
        ("te", "none"),
        ("torchao", "full"),
        ("none", "full"),
    ):
        why = attention_precision_problem(m, linears, ac)
        assert (why is None) == (linears != "te" or ac == "none"), (linears, ac)
    why = attention_precision_problem(m, "te", "full")
    assert all(key in why for key in ("fp8_attention_backend", "precision.fp8", "activation_checkpointing"))


def test_ema_analytic():
    p = torch.nn.Parameter(torch.zeros(3))
    m = torch.nn.Module()
    m.p = p
    ema = EMA(m, decay=0.5)
    values = [4.0, 8.0, 0.0]
    expect = 0.0
    for v in values:
        with torch.no_grad():
            p.fill_(v)
        ema.update()
        expect = 0.5 * expect + 0.5 * v
        assert torch.allclose(ema.shadow["p"], torch.full((3,), expect))
    with ema.swapped_in():
        assert torch.allclose(p, torch.full((3,), expect))
    assert torch.all(p == 0.0)  # restored
    with pytest.raises(ValueError, match="ema_decay"):
        EMA(m, decay=1.5)


def test_negative_ema_decay_is_rejected_not_ignored(tmp_path):
    """Only 0 disables EMA (train.ema_decay's doc); -0.999 (a sign typo) silently trained without one."""
    with pytest.raises(ValueError, match=r"train.ema_decay -0.999: expected 0 < decay < 1"):
        Trainer(_cfg(ema_decay=-0.999), TinyDiT(), flow_loss, SeededBatches(), run_dir=tmp_path)


def test_ema_resumes_under_another_activation_checkpointing(tmp_path):
    """AC wraps each block (a '_checkpoint_wrapped_module.' in parameter names): the EMA is keyed as the
    model's state dict, so a run resumes with AC switched on (it failed: missing key 'ema.blocks.0._checkpoint...')."""
    cfg = _cfg(2, ema_decay=0.5)
    cfg.checkpoint.enabled, cfg.checkpoint.interval = True, 1
    first = Trainer(cfg, TinyDiT(), flow_loss, SeededBatches(), run_dir=tmp_path)
    first.fit()
    for mode in ("full", "selective"):
        cfg.parallel.activation_checkpointing = mode
        resumed = Trainer(cfg, TinyDiT(), flow_loss, SeededBatches(), run_dir=tmp_path)
        assert resumed.step == 2 and resumed.ema.shadow.keys() == first.ema.shadow.keys()
        for k, v in first.ema.shadow.items():
            assert torch.equal(resumed.ema.shadow[k], v), (mode, k)


class Poisoned:
    """Wraps the flow loss; a NaN loss, or a finite loss with NaN gradients, on chosen steps."""

    def __init__(self, nan_loss=(), nan_grad=()):
        self.nan_loss, self.nan_grad, self.calls = set(nan_loss), set(nan_grad), 0

    def __call__(self, model, mb):
        step, self.calls = self.calls, self.calls + 1
        loss, logs = flow_loss(model, mb)
        if step in self.nan_loss:
            loss = loss * float("nan")
        if step in self.nan_grad:  # sqrt(|w - w|) is 0 forward; its gradient is inf * 0 = NaN
            w = model.out.weight
            loss = loss + (w - w.detach()).abs().sum().sqrt()
        return loss, logs


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    loss_fn = Poisoned(nan_loss={1}, nan_grad={3})
    tr = Trainer(_cfg(5, max_bad_steps=2), TinyDiT(), loss_fn, SeededBatches(), run_dir=tmp_path)
    for s in range(5):
        before = _snapshot(tr.model)
        tr.train_step()
        changed = any(not torch.equal(before[k], v) for k, v in tr.model.state_dict().items())
        assert changed == (s not in (1, 3)), f"step {s}"
    assert tr.skipped_steps == 2 and tr.step == 5
    tr.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_steps"] == 2
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_logged_means_leave_skipped_steps_out(tmp_path):
    """A skipped step logs no loss: the logged loss of an interval is the mean over its good steps only (it
    was divided by every step of the interval); a loss_fn log that is not a scalar is an error naming it."""
    cfg = _cfg(2, max_bad_steps=2, log_every=2)
    good = []

    def loss_fn(model, mb):
        loss, logs = Poisoned(nan_loss={0})(model, mb) if not good else flow_loss(model, mb)
        good.append(loss.item())
        return loss, logs

    tr = Trainer(cfg, TinyDiT(), loss_fn, SeededBatches(), run_dir=tmp_path)
    tr.fit()
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["skipped_steps"] == 1 and math.isnan(good[0])
    assert row["loss"] == pytest.approx(good[1], rel=1e-6)

    def vector_log(model, mb):
        loss, logs = flow_loss(model, mb)
        return loss, {**logs, "t_per_sample": torch.rand(3)}

    tr = Trainer(_cfg(1), TinyDiT(), vector_log, SeededBatches(), run_dir=tmp_path / "v")
    with pytest.raises(ValueError, match="'t_per_sample' must be a scalar"):
        tr.train_step()


def test_consecutive_non_finite_steps_stop_with_clear_error(tmp_path):
    tr = Trainer(
        _cfg(10, max_bad_steps=3), TinyDiT(), Poisoned(nan_loss={2, 3, 4}), SeededBatches(), run_dir=tmp_path
    )
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps .*max_bad_steps = 3"):
        tr.fit()
    assert tr.step == 4 and tr.skipped_steps == 3


def test_stopping_on_non_finite_steps_writes_the_interval_first(tmp_path):
    """The stop raised before the metrics were flushed: with log_every 5, a run whose loss became NaN at step 8
    wrote only the step-5 row (skipped_steps 0); the good steps 6-7 and the skips were lost."""
    losses = []

    def loss_fn(model, mb):
        loss, logs = flow_loss(model, mb)
        losses.append(loss.item())
        return (loss * float("nan") if len(losses) > 7 else loss), logs

    cfg = _cfg(20, max_bad_steps=2, log_every=5)
    tr = Trainer(cfg, TinyDiT(), loss_fn, SeededBatches(), run_dir=tmp_path)
    with pytest.raises(NonFiniteLossError):
        tr.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 8] and rows[-1]["skipped_steps"] == 2
    assert rows[-1]["loss"] == pytest.approx(sum(losses[5:7]) / 2, rel=1e-6)  # the good steps 6 and 7


def test_stopping_on_non_finite_steps_commits_a_pending_async_save(tmp_path):
    """With async saves, the checkpoint of the last good step is still pending when the NaN stop comes: it was
    left as .tmp_step_* (written, never committed) and deleted by the next save, so resuming, as the error
    advises, restarted from step 0. It is now committed and the run resumes from it, as it was then."""
    from engine.checkpoint import complete_checkpoints

    cfg = _cfg(10, max_bad_steps=2)
    cfg.checkpoint.enabled, cfg.checkpoint.async_save, cfg.checkpoint.interval = True, True, 2
    tr = Trainer(cfg, TinyDiT(), Poisoned(nan_loss={2, 3}), SeededBatches(), run_dir=tmp_path)
    tr.train_step()
    tr.train_step()
    good = {k: v.clone() for k, v in tr.model.state_dict().items()}
    with pytest.raises(NonFiniteLossError):
        tr.fit()
    assert [s for s, _ in complete_checkpoints(tmp_path / "checkpoints")] == [2]
    resumed = Trainer(cfg, TinyDiT(), flow_loss, SeededBatches(), run_dir=tmp_path)
    assert resumed.step == 2 and resumed.batches.position == 2
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, good[k]), k


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    """2 micro-batches of 2 == 1 batch of 4 with the same samples (mean loss over equal halves)."""

    class Halves(SeededBatches):
        def next(self, step, model):
            (big,) = super().next(step, model)
            return [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]

    torch.manual_seed(0)
    a = Trainer(_cfg(3, lr=1e-3), TinyDiT(), flow_loss, SeededBatches(), run_dir=tmp_path / "a")
    torch.manual_seed(0)
    b = Trainer(_cfg(3, lr=1e-3), TinyDiT(), flow_loss, Halves(), run_dir=tmp_path / "b")
    for _ in range(3):
        la, lb = a.train_step()["loss"], b.train_step()["loss"]
        torch.testing.assert_close(la, lb)
    for (n, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        # Adam divides by sqrt(v): near-zero gradient entries amplify fp32 rounding up to ~lr * 1e-3
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-5, msg=n)


def test_only_trainable_parameters_are_optimized(tmp_path):
    model = TinyDiT()
    model.blocks[0].requires_grad_(False)
    frozen = _snapshot(model.blocks[0])
    tr = Trainer(_cfg(2), model, flow_loss, SeededBatches(), run_dir=tmp_path)
    n_opt = sum(p.numel() for g in tr.optimizer.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters() if p.requires_grad)
    tr.fit()
    assert all(torch.equal(v, frozen[k]) for k, v in model.blocks[0].state_dict().items())


def test_fit_lowers_loss_and_writes_metrics(tmp_path):
    cfg = _cfg(12, lr=3e-3)
    cfg.train.log_every = 4
    tr = Trainer(cfg, TinyDiT(), flow_loss, SeededBatches(), run_dir=tmp_path)
    tr.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8, 12]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[0]["tokens_per_s"] > 0 and "mfu" not in rows[0]  # CPU: no peak, no MFU
    assert (tmp_path / "config.toml").is_file()
    if importlib.util.find_spec("tensorboard"):
        assert any((tmp_path / "tb").glob("events.out.tfevents.*"))


def _two_runs_in_one_folder(tmp_path, cfgs) -> list[list[dict]]:
    """Two 4-step runs (rows at steps 2, 4) one after the other in ``tmp_path``: each run's metrics.jsonl rows;
    the second run's rows are its own and the first run's are moved aside whole."""
    runs = []
    for cfg in cfgs:
        Trainer(cfg, TinyDiT(), flow_loss, SeededBatches(), run_dir=tmp_path).fit()
        runs.append([json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()])
    assert [r["step"] for r in runs[1]] == [2, 4] and runs[1] != runs[0]
    (aside,) = tmp_path.glob("metrics.before-*.jsonl")
    assert [json.loads(line) for line in aside.read_text().splitlines()] == runs[0]
    return runs


def test_a_run_that_does_not_resume_sets_the_earlier_metrics_aside(tmp_path):
    """A second run in the same folder without resuming (checkpoints off here) appended its steps 1.. to the
    first run's rows, each step twice in metrics.jsonl and TensorBoard; the earlier rows are now moved aside."""
    cfgs = [_cfg(4, lr=lr) for lr in (3e-3, 1e-2)]
    for cfg in cfgs:
        cfg.train.log_every = 2
    _two_runs_in_one_folder(tmp_path, cfgs)
    if importlib.util.find_spec("tensorboard"):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(tmp_path / "tb"))
        acc.Reload()
        assert [e.step for e in acc.Scalars("loss")] == [2, 4]
        assert len(list(tmp_path.glob("tb.before-*"))) == 1


def test_a_run_with_no_checkpoint_to_resume_keeps_the_earlier_metrics(tmp_path):
    """A run with checkpoints (resume on) in a folder whose earlier run saved none: finding nothing to resume, it
    dropped every row of the earlier run from metrics.jsonl and purged its TensorBoard steps; they are moved aside."""
    cfgs = [_cfg(4, lr=lr) for lr in (1e-2, 3e-3)]
    cfgs[0].checkpoint.enabled, cfgs[1].checkpoint.enabled = False, True
    runs = _two_runs_in_one_folder(tmp_path, cfgs)
    if importlib.util.find_spec("tensorboard"):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        (tb_aside,) = tmp_path.glob("tb.before-*")
        acc = EventAccumulator(str(tb_aside))
        acc.Reload()
        assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in runs[0]], rel=1e-6)


def test_first_logged_interval_is_timed_from_the_first_step(tmp_path):
    """A resumed run's first row timed its steps from the Trainer's construction, so the checkpoint load (and
    whatever ran before the first step) counted as step time: step_time_s 0.61 s for 0.10 s steps, tokens/s and
    MFU 6x too low. The logged step time must fit in the wall time of the steps themselves."""
    cfg = _cfg(2)
    cfg.checkpoint.enabled, cfg.checkpoint.interval = True, 2
    Trainer(cfg, TinyDiT(), flow_loss, SeededBatches(), run_dir=tmp_path).fit()
    cfg.train.steps = 4
    tr = Trainer(cfg, TinyDiT(), flow_loss, SeededBatches(), run_dir=tmp_path)  # resumes at step 2
    assert tr.step == 2
    time.sleep(0.5)  # stands in for a long checkpoint load or a recipe's setup before training
    t0 = time.perf_counter()
    tr.train_step()
    tr.train_step()
    wall = time.perf_counter() - t0
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 4 and row["step_time_s"] * 2 <= wall
    assert row["tokens_per_s"] >= 2 * 4 * 8 / wall  # 2 steps of 4 x 8 tokens


def test_a_checkpoint_save_is_not_counted_as_step_time(tmp_path):
    """The row after a checkpoint timed its steps from the previous row, before the save: a save taking 0.5 s
    (here an extra state that is slow to gather the first time) counted as step time of the next row's steps,
    their tokens/s and MFU too low. The logged step time must fit in the wall time of the steps themselves."""

    class SlowOnce:  # e.g. a judge's statistics gathered from a service
        calls = 0

        def state_dict(self):
            self.calls += 1
            if self.calls == 1:
                time.sleep(0.5)
            return {"x": torch.zeros(1)}

        def load_state_dict(self, sd):
            pass

    cfg = _cfg(4)
    cfg.checkpoint.enabled, cfg.checkpoint.interval = True, 2
    slow = {"slow": SlowOnce()}
    tr = Trainer(cfg, TinyDiT(), flow_loss, SeededBatches(), run_dir=tmp_path, extra_state=slow)
    tr.train_step()
    tr.train_step()  # its save takes 0.5 s, after the row of steps 1-2
    t0 = time.perf_counter()
    tr.train_step()
    tr.train_step()
    wall = time.perf_counter() - t0
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 4 and row["step_time_s"] * 2 <= wall


def test_bad_batches_and_loss_are_reported(tmp_path):
    class Empty(SeededBatches):
        def next(self, step, model):
            return []

    tr = Trainer(_cfg(1), TinyDiT(), flow_loss, Empty(), run_dir=tmp_path)
    with pytest.raises(ValueError, match="non-empty list of micro-batches"):
        tr.train_step()
    vec_loss = lambda m, mb: (flow_loss(m, mb)[0].expand(3), {})
    tr = Trainer(_cfg(1), TinyDiT(), vec_loss, SeededBatches(), run_dir=tmp_path)
    with pytest.raises(ValueError, match="scalar tensor"):
        tr.train_step()


def test_sigint_after_a_step_that_raised_interrupts(tmp_path):
    """A step that raised (here in the loss) left the trainer's SIGINT handler installed, which only stops after a
    step, and none came: the next Ctrl-C (a notebook, a script's cleanup after the error) was logged and ignored.
    A step that raises gives the handlers back; the next step installs them again."""
    import signal

    from engine.trainer import TrainingInterrupted

    calls = []

    def loss_fn(model, mb):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("bad sample")
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)  # during the step after the error: stop after that step
        return flow_loss(model, mb)

    # Python's own handler, whatever this process started with: a test process started in the background of a
    # shell script ignores SIGINT, and this test failed in such runs unless an earlier test had reset it
    orig = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        tr = Trainer(_cfg(6), TinyDiT(), loss_fn, SeededBatches(), run_dir=tmp_path)
        tr.train_step()
        with pytest.raises(RuntimeError, match="bad sample"):
            tr.train_step()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        with pytest.raises(TrainingInterrupted) as stop:
            tr.train_step()
        assert stop.value.code == 128 + signal.SIGINT and tr.step == 2
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, orig)


def test_a_signal_the_process_ignores_stays_ignored(tmp_path):
    """A process started with SIGINT ignored (a background job of a shell script, nohup) kept training through a
    Ctrl-C meant for the foreground only until the trainer installed its handler, which made that Ctrl-C stop the
    run. An ignored signal stays ignored while the trainer trains; the other one is still handled."""
    import signal

    from engine import trainer as T

    seen = []

    def loss_fn(model, mb):
        seen.append((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))
        if len(seen) == 2:
            signal.raise_signal(signal.SIGINT)  # ignored: the step and the next ones run on
        return flow_loss(model, mb)

    orig = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        tr = Trainer(_cfg(3), TinyDiT(), loss_fn, SeededBatches(), run_dir=tmp_path)
        while tr.step < 3:
            tr.train_step()
        tr.close()
        assert seen == [(signal.SIG_IGN, T._on_signal)] * 3
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is not T._on_signal
    finally:
        signal.signal(signal.SIGINT, orig)


def test_bench_profile_writes_trace_and_op_table(tmp_path):
    """python -m bench.profile on the Wan debug flavour: a Chrome trace, matmuls with FLOP counts."""
    pytest.importorskip("models.wan")
    from bench.profile import main

    res = main(
        [
            "--steps",
            "3",
            "--run-dir",
            str(tmp_path),
            "--model.flavour",
            "debug",
            "--train.batch_size",
            "1",
            "--profile.latent_shape",
            "[2, 4, 4]",
            "--profile.text_len",
            "8",
            "--run.device",
            "cpu",
        ]
    )
    (trace,) = res["traces"]
    events = json.loads(Path(trace).read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"forward", "backward", "optimizer"} <= names
    ops = {r["op"]: r for r in res["ops"]}
    assert ops and all(r["ms"] >= 0 for r in ops.values()) and "forward" not in ops
    assert any("tflops" in r for r in ops.values())  # torch.profiler counted some matmul FLOPs
    assert res["logs"]["tokens_per_s"] > 0 and res["logs"]["tflops"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("ac", ["none", "selective", "full"])
def test_cuda_bf16_training_reports_memory_and_mfu(tmp_path, ac):
    from engine.metrics import device_peak_flops

    cfg = _cfg(48, lr=3e-3)  # loss means over 16-step windows: 4 x 8 tokens a step are a noisy estimate
    cfg.run.device, cfg.precision.param_dtype, cfg.train.log_every = "cuda", "bfloat16", 16
    cfg.parallel.activation_checkpointing = ac
    tr = Trainer(cfg, TinyDiT(dim=256), flow_loss, SeededBatches(batch=16), run_dir=tmp_path)
    assert tr.optimizer.defaults["fused"]
    tr.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[0]["peak_mem_gb"] > 0
    if device_peak_flops(torch.device("cuda"), "bf16"):
        assert 0 < rows[-1]["mfu"] < 1


def test_peak_table_tells_the_h100_variants_apart(monkeypatch):
    """The PCIe and NVL H100s have lower peaks than the SXM part whose name they contain (MFU on a PCIe card
    was about 24% too low); so has the H200 NVL (NVIDIA's datasheet: 1,671 / 3,341 TFLOPS bf16 / fp8 with
    sparsity, half that dense; it took the SXM H200's 989 / 1979: MFU about 16% too low); and the GB200's
    GPU has higher ones than the B200 its name contains (5 / 10 PFLOPS with sparsity against 4.5 / 9)."""
    from engine.metrics import device_peak_flops

    for name, bf16, fp8 in (
        ("NVIDIA H100 PCIe", 756e12, 1513e12),
        ("NVIDIA H100 NVL", 835e12, 1671e12),
        ("NVIDIA H100 80GB HBM3", 989e12, 1979e12),
        ("NVIDIA H200 NVL", 835e12, 1671e12),
        ("NVIDIA H200", 989e12, 1979e12),
        ("NVIDIA GB200", 2500e12, 5000e12),
        ("NVIDIA B200", 2250e12, 4500e12),
    ):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert device_peak_flops(torch.device("cuda"), "bf16") == bf16, name
        assert device_peak_flops(torch.device("cuda"), "fp8") == fp8, name


def test_bench_profile_counts_the_flops_predict_velocity_runs():
    """bench.profile's FLOPs per batch = torch's FLOP counter on the model's predict_velocity for that batch
    (Wan pads the profile's text to its text_len: the count used the unpadded length, 4x low)."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.profile import RandomLatents
    from engine.config import JobConfig, build_config, overrides_to_dict
    from models import build_model

    cfg = build_config(JobConfig, None, overrides_to_dict(JobConfig, [
        "--model.flavour", "debug", "--train.batch_size", "1", "--profile.latent_shape", "[2, 4, 4]",
        "--profile.text_len", "8"]))  # fmt: skip
    model = build_model("wan", "debug", attention_backend="torch")
    batches = RandomLatents(model, cfg, torch.device("cpu"))
    (mb,) = batches.next(0, model)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.predict_velocity(mb["x0"], torch.tensor([0.5]), {"text": mb["text"]})
    assert abs(batches.fwd_flops / counter.get_total_flops() - 1) < 1e-6


def test_a_signal_with_no_handler_to_give_back_interrupts_instead_of_looping(tmp_path):
    """_on_signal with no trainer gives the handlers back and raises the signal again; where its own handler was
    all it had to give back (saved as the 'original' when a trainer installed over a trainer's handler), the signal
    came back to _on_signal, which raised it again: a RecursionError instead of a KeyboardInterrupt."""
    import signal

    from engine import trainer as T

    orig = signal.signal(signal.SIGINT, T._on_signal)  # the state a handler saved over itself left
    try:
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        tr = Trainer(_cfg(2), TinyDiT(), flow_loss, SeededBatches(), run_dir=tmp_path)
        signal.signal(signal.SIGINT, T._on_signal)
        tr.train_step()  # installs over _on_signal: what it keeps to give back is the default handler
        assert T._ORIG_HANDLERS[signal.SIGINT] is signal.default_int_handler
        tr.close()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, orig)
