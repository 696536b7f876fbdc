"""Profile N training steps of the model a config names, with a plain flow-matching loss.

    python -m bench.profile --config recipes/configs/wmsd_toy.toml [--steps 8] [--section.key value ...]

Builds ``models.build_model(model.family, model.flavour)``, trains it with the engine's Trainer on
random latents of ``profile.latent_shape`` (frames, height, width) and random text embeddings of
``profile.text_len`` tokens (``predict_velocity(x_t, t, {"text": (B, L, D)})``; Wan pads them to its
``text_len``, 512 for the real sizes, as its pipeline does, and the FLOPs count what runs), profiles the steps
after the first (warm-up/compile) one, and prints:

- the step: tokens/s, achieved TFLOP/s (3 x the model's forward FLOPs) and MFU vs the device peak;
- the top ops by self device time (CPU time on CPU) with, where torch.profiler counts their FLOPs
  (matmuls, convolutions), achieved TFLOP/s and the fraction of the device's dense peak: a roofline
  note (near peak = compute-bound; far below with FLOPs known = too small / badly shaped; no FLOPs =
  memory- or launch-bound element-wise and communication work);
- where the Chrome trace was written (open in Perfetto / chrome://tracing).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from engine.config import ConfigError, JobConfig, build_config, load_toml, overrides_to_dict
from engine.flow import flow_matching_loss
from engine.metrics import device_peak_flops
from engine.trainer import Trainer


class RandomLatents:
    """Batches of random latents and text embeddings, sized by the config (profiling only).

    Reads the model family's config fields ``in_channels``, ``out_channels``, ``text_dim``,
    ``patch`` and its ``flops_context(cond)`` / ``flops_per_token`` (the models/ API).
    """

    def __init__(self, model: torch.nn.Module, cfg: JobConfig, device: torch.device):
        mc = model.cfg
        F, h, w = cfg.profile.latent_shape
        self.shape = (cfg.train.batch_size, mc.out_channels, F, h, w)
        self.text_shape = (cfg.train.batch_size, cfg.profile.text_len, mc.text_dim)
        self.i2v = mc.in_channels == 2 * mc.out_channels + 4
        self.device, self.grad_accum = device, cfg.train.grad_accum
        patch = math.prod(mc.patch)
        self.tokens = cfg.train.batch_size * F * h * w // patch
        seq = F * h * w // patch
        cond = {"text": torch.empty(self.text_shape, device="meta")}
        if self.i2v:
            cond["image_latent"] = torch.empty(1, device="meta")
        # what predict_velocity runs on this cond (Wan pads the text to its text_len): the models/ API
        self.fwd_flops = model.flops_per_token(seq, **model.flops_context(cond)) * self.tokens

    def next(self, step: int, model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
        out = []
        for _ in range(self.grad_accum):
            mb = {"x0": torch.randn(self.shape, device=self.device),
                  "text": torch.randn(self.text_shape, device=self.device)}  # fmt: skip
            if self.i2v:
                mb["image_latent"] = torch.randn(self.shape[:2] + (1,) + self.shape[3:], device=self.device)
            out.append(mb)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        pass


def build(cfg: JobConfig) -> torch.nn.Module:
    """The config's model (``model.pretrained`` weights, else random init) with its attention backend."""
    from models import build_model, model_classes

    if cfg.model.pretrained:
        model = model_classes(cfg.model.family)[0].from_pretrained(cfg.model.pretrained)
        model.set_attention_backend(cfg.model.attention)
        return model
    return build_model(cfg.model.family, cfg.model.flavour, attention_backend=cfg.model.attention)


def profile_training(cfg: JobConfig, steps: int, run_dir: str | Path) -> dict[str, Any]:
    """Train ``steps`` steps under torch.profiler (1 warm-up step); returns summary + op table."""
    if steps < 2:
        raise ValueError(f"--steps {steps}: expected >= 2 (one warm-up step, then profiled steps)")
    cfg.profile.enabled, cfg.profile.wait, cfg.profile.warmup, cfg.profile.active = True, 0, 1, steps - 1
    cfg.profile.trace_dir = cfg.profile.trace_dir or str(Path(run_dir) / "trace")
    cfg.checkpoint.enabled = cfg.checkpoint.export_safetensors = False
    cfg.train.steps, cfg.train.log_every = steps, steps
    model = build(cfg)
    batches: RandomLatents | None = None

    def loss_fn(m: torch.nn.Module, mb: dict[str, torch.Tensor]):
        cond = {k: v for k, v in mb.items() if k != "x0"}
        loss, logs = flow_matching_loss(m.predict_velocity, mb["x0"], cond, shift=cfg.flow.shift)
        return loss, {**logs, "num_tokens": batches.tokens, "num_flops": batches.fwd_flops}

    trainer = Trainer(cfg, model, loss_fn, _Lazy(lambda: batches), run_dir=run_dir)
    batches = RandomLatents(trainer.unwrapped, cfg, trainer.dist.device)
    logs = trainer.fit()
    prof = trainer.profiler.prof
    peak = device_peak_flops(trainer.dist.device, "fp8" if cfg.precision.fp8 != "none" else "bf16")
    return {
        "logs": logs,
        "ops": top_ops(prof, cfg.profile.top_k, peak),
        "traces": trainer.profiler.traces,
        "device": str(trainer.dist.device),
        "peak_flops": peak,
    }


class _Lazy:
    """A Batches that forwards to one made after the Trainer placed the model (its device is known)."""

    def __init__(self, get):
        self.get = get

    def next(self, step, model):
        return self.get().next(step, model)

    def state_dict(self):
        return {}

    def load_state_dict(self, sd):
        pass


SPANS = {"forward", "backward", "optimizer", "judge_wait"}  # engine.profile.span names, not ops
_MARKERS = ("ProfilerStep", "Optimizer.", "Torch-Compiled Region", "## ")


def top_ops(prof: torch.profiler.profile, k: int, peak: float | None) -> list[dict[str, Any]]:
    """The k ops with the most self time (device time on CUDA), with achieved TFLOP/s where known."""
    events = prof.key_averages()
    cuda = any(getattr(e, "self_device_time_total", 0) > 0 for e in events)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events) or 1.0
    rows = []
    ops = [e for e in events if not (e.key.startswith(_MARKERS) or e.key in SPANS)]
    for e in sorted(ops, key=lambda e: getattr(e, key), reverse=True)[:k]:
        us = getattr(e, key)
        row = {"op": e.key, "calls": e.count, "ms": us / 1e3, "pct": 100.0 * us / total}
        if e.flops and us > 0:
            row["tflops"] = e.flops / (us * 1e-6) / 1e12
            row["pct_peak"] = 100.0 * row["tflops"] * 1e12 / peak if peak else None
        row["note"] = roofline_note(row)
        rows.append(row)
    return rows


def roofline_note(row: dict[str, Any]) -> str:
    if "tflops" not in row:
        return "no FLOP count: memory/launch/communication-bound"
    pct = row.get("pct_peak")
    if pct is None:
        return f"{row['tflops']:.3g} TFLOP/s (no device peak known)"
    return f"{pct:.0f}% of peak: " + ("compute-bound" if pct >= 50 else "below roofline (small/odd shapes?)")


def print_report(res: dict[str, Any]) -> None:
    logs = res["logs"]
    mfu = f", MFU {100 * logs['mfu']:.1f}%" if "mfu" in logs else ""
    tfl = f", {logs['tflops']:.3g} TFLOP/s" if "tflops" in logs else ""
    print(
        f"device {res['device']}: {logs.get('tokens_per_s', 0):.4g} tokens/s, step "
        f"{logs.get('step_time_s', 0) * 1e3:.1f} ms{tfl}{mfu}, loss {logs.get('loss', float('nan')):.4g}"
    )
    print(f"{'op':<60} {'calls':>6} {'ms':>9} {'%':>6}  roofline")
    for r in res["ops"]:
        print(f"{r['op'][:60]:<60} {r['calls']:>6} {r['ms']:>9.2f} {r['pct']:>5.1f}%  {r['note']}")
    for t in res["traces"]:
        print(f"chrome trace: {t}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="", help="TOML job config")
    ap.add_argument("--steps", type=int, default=6, help="training steps (the first is not profiled)")
    ap.add_argument("--run-dir", default="", help="where the trace goes (default: a temporary folder)")
    args, rest = ap.parse_known_args(argv)
    if args.steps < 2:  # a usage error, not profile_training's traceback
        ap.error(f"--steps {args.steps}: expected >= 2 (one warm-up step, then profiled steps)")
    try:
        cfg = build_config(JobConfig, load_toml(args.config) if args.config else {},
                           overrides_to_dict(JobConfig, rest))  # fmt: skip
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="wmsd_profile_")
    res = profile_training(cfg, args.steps, run_dir)
    print_report(res)
    return res


if __name__ == "__main__":
    main()
