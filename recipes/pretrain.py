"""Pretrain the toy world's Demonstrator: a toy Wan I2V DiT + the toy text encoder, trained jointly by
rectified flow on solution-captioned toy videos (random moves), with ``world.caption_dropout`` of the
captions dropped (for CFG; default 10%) and, with ``train.ema_decay`` > 0, an EMA copy for sampling. Runs on
engine.trainer (checkpoints, resume, metrics).

    python recipes/pretrain.py --config recipes/configs/toy_pretrain.toml [--section.key value ...]
    torchrun --nproc-per-node 2 recipes/pretrain.py --config ...          # also fine

``--world.time_budget_s`` stops training after that many wall-clock seconds (the last checkpoint and
the export are still written; under torchrun the ranks decide together and stop at the same step). At
the end the EMA weights (the trained weights without EMA) are exported to ``<run>/demonstrator/``:

    demonstrator.safetensors   the DiT in diffusers' WanTransformer3DModel key layout
    text_encoder.safetensors   the toy text encoder (engine.world.text.ToyTextEncoder)
    demonstrator.json          configs, command, seed, commit, steps, the probe (engine.world.probe) and
                               the measured gap with CIs

Copy that folder's files into engine/world/assets/ to ship them; :func:`load_demonstrator` loads them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import flow  # noqa: E402
from engine.config import ConfigError, JobConfig, config_main  # noqa: E402
from engine.dist import any_rank, end_process  # noqa: E402
from engine.log import get_logger, progress  # noqa: E402
from engine.world import latent as toy_latent  # noqa: E402
from engine.world.demonstrator import ToyDemonstrator, eval_items, toy_pipeline  # noqa: E402
from engine.world.scene import SEED_TAG_PRETRAIN, random_moves, random_scene, render, solution_text  # noqa: E402
from engine.world.text import ToyTextEncoder, tokenize  # noqa: E402
from recipes.common import work_logs  # noqa: E402

log = get_logger("pretrain")
ASSETS = Path(__file__).resolve().parents[1] / "engine" / "world" / "assets"


# ---------------------------------------------------------------------------------------------
# Model: DiT + text encoder in one module (one optimizer, one EMA, one checkpoint).
# ---------------------------------------------------------------------------------------------


def build_dit(flavour: str = "toy") -> nn.Module:
    """The toy Wan DiT on the toy latent (12 channels): in = 2 * 12 + 4, out = 12, text_dim 64."""
    from models.wan import WanConfig, WanModel

    C = toy_latent.LATENT_CHANNELS
    # The reference attention/RoPE/norm paths (plain torch): at the toy's 256 tokens they cost little,
    # and they run the same on CPU (no Triton driver there) and on any GPU.
    cfg = WanConfig.flavour(flavour, in_channels=2 * C + 4, out_channels=C, text_dim=64, text_len=None,
                            attention_backend="torch", norm_backend="torch")  # fmt: skip
    return WanModel(cfg)


def build_demonstrator(flavour: str = "toy", text_layers: int = 1) -> ToyDemonstrator:
    """A fresh toy Demonstrator: the toy DiT and a text encoder with ``text_layers`` layers."""
    return ToyDemonstrator(build_dit(flavour), ToyTextEncoder(dim=64, layers=text_layers))


# ---------------------------------------------------------------------------------------------
# Data: random scenes and random moves, rendered on the fly; batch k is a function of (seed, k).
# ---------------------------------------------------------------------------------------------


class ToyVideoBatches:
    """``next(step)`` -> ``grad_accum`` micro-batches of solution-captioned videos, a pure function of
    (seed, data-parallel rank, step, micro index): resuming at a step reproduces the data, the t and the
    noise exactly (on the same device type)."""

    def __init__(self, batch_size: int, grad_accum: int, seed: int, device: torch.device, drop: float = 0.1,
                 t_sampling: str = "logit_normal", shift: float = 1.0):  # fmt: skip
        # 1.5 dropped every caption (an unconditional Demonstrator), a negative value none, both silently
        if not 0.0 <= drop <= 1.0:
            raise ValueError(f"world.caption_dropout = {drop}; expected a fraction in [0, 1]")
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.device, self.drop = torch.device(device), drop
        self.t_sampling, self.shift = t_sampling, shift
        self.rank = 0  # data differs per data-parallel rank: the stream is (tag, seed, dp rank, step, micro)

    def micro_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        """One micro-batch: x0 (B, 12, 4, 16, 16), image_latent, token ids, t (B,), noise."""
        rng = np.random.default_rng([SEED_TAG_PRETRAIN, self.seed, self.rank, step, micro])
        scenes = [random_scene(rng) for _ in range(self.batch_size)]
        moves = [random_moves(s, rng) for s in scenes]
        texts = [solution_text(s, m) if rng.random() >= self.drop else "" for s, m in zip(scenes, moves)]
        video = render(scenes, moves, device=self.device)  # (B, T, H, W, 3) uint8
        x0 = toy_latent.encode(video)  # (B, C, T, h, w)
        dev = self.device
        g = torch.Generator(device=dev).manual_seed(
            int(rng.integers(2**62))
        )  # t and noise drawn on the device
        t = flow.sample_timesteps(self.batch_size, self.t_sampling, shift=self.shift, generator=g, device=dev)
        noise = torch.randn(x0.shape, generator=g, device=dev)
        ids, _ = tokenize(texts)
        return {"x0": x0, "image_latent": x0[:, :, :1], "ids": ids.to(dev), "t": t, "noise": noise}

    def next(self, step: int, model: nn.Module) -> list[dict[str, torch.Tensor]]:
        return [self.micro_batch(step, i) for i in range(self.grad_accum)]

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = int(state_dict["seed"])


def pretrain_loss(model: nn.Module, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Flow matching of v(x_t | solution, first frame) to eps - x0; the text encoder trains with the DiT."""
    m = model.module if hasattr(model, "module") else model
    text = m.text(mb["ids"])
    cond = {"text": text, "text_lengths": torch.full_like(mb["ids"][:, 0], text.shape[1]),
            "image_latent": mb["image_latent"]}  # fmt: skip
    loss, logs = flow.flow_matching_loss(m.predict_velocity, mb["x0"], cond, t=mb["t"], noise=mb["noise"])
    return loss, {**logs, **work_logs(m.dit, mb["x0"], cond)}


# ---------------------------------------------------------------------------------------------
# Export and load
# ---------------------------------------------------------------------------------------------


def _git_commit() -> str:
    """This repository's commit (not the working directory's: a run started elsewhere recorded another's)."""
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "HEAD"],
            text=True,
            stderr=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parents[1],
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dit_state_dict(dit: nn.Module) -> dict[str, torch.Tensor]:
    """The DiT's weights in diffusers' layout (WanModel's adapter), contiguous fp32 on CPU."""
    sd = dit.to_diffusers_state_dict() if hasattr(dit, "to_diffusers_state_dict") else dit.state_dict()
    return {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}


def export_demonstrator(model: ToyDemonstrator, out: Path, meta: dict) -> Path:
    """Write demonstrator.safetensors, text_encoder.safetensors and demonstrator.json into ``out``."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(dit_state_dict(model.dit), str(out / "demonstrator.safetensors"))
    text_sd = {k: v.detach().float().cpu().contiguous() for k, v in model.text.state_dict().items()}
    save_file(text_sd, str(out / "text_encoder.safetensors"))
    dit_cfg = model.dit.cfg.to_diffusers_config() if hasattr(model.dit, "cfg") else {}
    meta = {"dit_config": dit_cfg, "text_encoder_config": model.text.config, **meta}
    (out / "demonstrator.json").write_text(json.dumps(meta, indent=1, default=str))
    return out


def load_demonstrator(
    folder: str | Path = "", device: str | torch.device = "cpu"
) -> tuple[ToyDemonstrator, dict]:
    """Load a shipped Demonstrator (default engine/world/assets) -> (model in eval mode, its metadata)."""
    from safetensors.torch import load_file

    from models.wan import WanConfig, WanModel

    folder = Path(folder or ASSETS)
    meta_path = folder / "demonstrator.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"demonstrator folder {str(folder)!r}: no demonstrator.json (run recipes/pretrain.py)"
        )
    meta = json.loads(meta_path.read_text())
    # trained on each prompt's valid tokens (text_len None)
    dit = WanModel(WanConfig.from_diffusers_config(meta["dit_config"], text_len=None))
    sd = load_file(str(folder / "demonstrator.safetensors"))
    if hasattr(dit, "load_diffusers_state_dict"):
        dit.load_diffusers_state_dict(sd)
    else:
        dit.load_state_dict(sd)
    text = ToyTextEncoder(**meta["text_encoder_config"])
    text.load_state_dict(load_file(str(folder / "text_encoder.safetensors")))
    return ToyDemonstrator(dit, text).to(device).eval(), meta


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def warm_start_record(init_meta: dict) -> dict:
    """What a warm start continued from: the exported folder's command, commit, device, training and (for
    a chain of warm starts) its own warm start, so the shipped json holds every run that made the weights."""
    keep = ("command", "seed", "git_commit", "device", "torch", "train")
    return {k: init_meta[k] for k in keep if k in init_meta}


def train(cfg: JobConfig, run_dir: Path) -> tuple[ToyDemonstrator, Any, dict]:
    """Train under the time budget; returns (model with EMA weights swapped in by the caller, trainer, info)."""
    from engine.trainer import Trainer

    torch.manual_seed(cfg.run.seed)
    warm: dict = {}
    if cfg.model.pretrained:  # warm start from an exported Demonstrator folder (its configs win)
        model, init_meta = load_demonstrator(cfg.model.pretrained)
        model.train()
        warm = {"warm_start": warm_start_record(init_meta)}
        init_steps = int(
            init_meta.get("train", {}).get("total_steps", init_meta.get("train", {}).get("steps", 0))
        )
        log.info(
            "warm start from %s (text encoder layers: %d)", cfg.model.pretrained, model.text.config["layers"]
        )
    else:
        model, init_steps = build_demonstrator(cfg.model.flavour, cfg.world.text_layers), 0
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 weights, TF32 matmuls on GPU (no effect on CPU)
    batches = ToyVideoBatches(cfg.train.batch_size, cfg.train.grad_accum, cfg.run.seed, torch.device("cpu"),
                              cfg.world.caption_dropout, cfg.flow.t_sampling, cfg.flow.shift)  # fmt: skip
    trainer = Trainer(cfg, model, pretrain_loss, batches, run_dir=run_dir)
    batches.device = trainer.dist.device
    batches.rank = trainer.dist.dp_rank  # this rank's data shard (the ranks of a cp group share it)
    t0, start = time.perf_counter(), trainer.step
    budget = cfg.world.time_budget_s
    for _ in progress(range(trainer.step, cfg.train.steps), desc="pretrain", total=cfg.train.steps - start):
        # decided together: a rank stopping alone would meet the others' training collectives with its close()'s
        if budget > 0 and any_rank(time.perf_counter() - t0 > budget, trainer.dist.device, "time budget"):
            log.info("time budget of %.0f s reached at step %d", budget, trainer.step)
            break
        trainer.train_step()
    trainer.close()
    info = {
        "steps": trainer.step,
        "steps_this_run": trainer.step - start,
        "train_s": time.perf_counter() - t0,
        "total_steps": init_steps + trainer.step,  # including the warm start's steps
        **warm,
    }
    log.info(
        "trained %d steps (%d this run) in %.0f s", trainer.step, info["steps_this_run"], info["train_s"]
    )
    return model, trainer, info


def validate(cfg: JobConfig) -> None:
    """The settings, checked before training (the gap check after it used world.gap_batch, eval.seeds and
    world.gap_guidance only then): a ConfigError naming the key."""
    from models.wan import FLAVOURS
    from recipes.common import check_demonstrator_folder, check_run, check_training_precision

    if cfg.parallel.cp > 1:  # the Trainer failed with a TypeError traceback once the model was built
        raise ConfigError(f"parallel.cp = {cfg.parallel.cp}: the toy Demonstrator does not support sequence "
                          "parallelism; use parallel.cp 1 (data-parallel ranks scale it)")  # fmt: skip
    check_run(cfg)
    check_training_precision(cfg)  # FP8 settings the trainer refuses: one line before the data is built
    w = cfg.world
    if cfg.model.family != "wan" or cfg.model.flavour not in FLAVOURS:
        raise ConfigError(f"model.family / model.flavour = {cfg.model.family!r} / {cfg.model.flavour!r}: the toy "
                          f"Demonstrator is a Wan DiT; expected 'wan' and one of {sorted(FLAVOURS)}")  # fmt: skip
    if cfg.model.pretrained and not (Path(cfg.model.pretrained) / "demonstrator.json").is_file():
        raise ConfigError(f"model.pretrained: '{cfg.model.pretrained}' has no demonstrator.json (the warm start "
                          "is an exported Demonstrator folder, <run>/demonstrator)")  # fmt: skip
    if cfg.model.pretrained:
        check_demonstrator_folder(cfg.model.pretrained, "model.pretrained")
    if cfg.train.steps < 0:
        raise ConfigError(f"train.steps = {cfg.train.steps}: expected >= 0")
    if not 0.0 <= w.caption_dropout <= 1.0:
        raise ConfigError(f"world.caption_dropout = {w.caption_dropout}; expected a fraction in [0, 1]")
    if w.text_layers < 0:
        raise ConfigError(f"world.text_layers = {w.text_layers}; expected >= 0 (0 = embeddings only)")
    if w.time_budget_s < 0:
        raise ConfigError(f"world.time_budget_s = {w.time_budget_s}; expected >= 0 seconds (0 = no limit)")
    # the gap is measured at these scales once training is done
    if not w.gap_guidance:
        raise ConfigError("world.gap_guidance is empty; expected at least one CFG scale, e.g. [1.0]")
    # 0 held-out scenes trained the whole run, then failed in the probe with "not enough values to unpack"
    if w.eval_scenes < 1:
        raise ConfigError(
            f"world.eval_scenes = {w.eval_scenes}; expected >= 1 held-out scene for the gap check"
        )
    if w.gap_batch < 1:
        raise ConfigError(f"world.gap_batch = {w.gap_batch}; expected >= 1 video per sampling batch")
    if not cfg.eval.seeds:
        raise ConfigError("eval.seeds is empty; expected at least one noise seed for the gap check, e.g. [0]")
    if not 0 < cfg.eval.ci < 1:
        raise ConfigError(
            f"eval.ci = {cfg.eval.ci}: expected the gap check's confidence level between 0 and 1"
        )


def main(argv: list[str] | None = None) -> Path:
    """Train, export the EMA weights, measure the gap at each world.gap_guidance; returns the export folder."""
    cfg = config_main(JobConfig, argv, description=__doc__, validate=validate)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    model, trainer, info = train(cfg, run_dir)
    if int(os.environ.get("RANK", "0")) != 0:
        return run_dir
    meta = {
        # quoted: "--world.gap_guidance [1.0, 3.0]" was written unquoted, a command that no longer ran
        "command": "python recipes/pretrain.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "seed": cfg.run.seed,
        "git_commit": _git_commit(),
        # the device the run used (a run.device = cpu run on a GPU machine recorded the GPU)
        "device": torch.cuda.get_device_name(dev) if (dev := trainer.dist.device).type == "cuda" else dev.type,
        "torch": torch.__version__,
        "train": {"batch_size": cfg.train.batch_size, "lr": cfg.train.lr, "ema_decay": cfg.train.ema_decay,
                  "text_layers": model.text.config["layers"], "init": cfg.model.pretrained,
                  "caption_dropout": cfg.world.caption_dropout, "t_sampling": cfg.flow.t_sampling,
                  "shift": cfg.flow.shift, **info},
    }  # fmt: skip
    out = run_dir / "demonstrator"
    with trainer.ema_weights() if trainer.ema is not None else contextlib.nullcontext():
        model.eval()
        export_demonstrator(model, out, meta)  # weights first: a failing gap check must not lose them
        meta["probe"] = probe_demonstrator(model, cfg)
        meta["gap"] = {str(g): measure_gap(model, cfg, g) for g in cfg.world.gap_guidance}
        export_demonstrator(model, out, meta)
    g = meta["gap"][str(cfg.world.gap_guidance[0])]["gap"]["avg"]
    log.info("exported the Demonstrator to %s; Avg gap %.3f [%.3f, %.3f]", out, g["diff"], g["lo"], g["hi"])
    return out


def probe_demonstrator(model: ToyDemonstrator, cfg: JobConfig) -> dict:
    """engine.world.probe on the gap check's held-out items: per prompt and noise level, how often the
    one-step prediction puts the moved block in the right final column / direction."""
    from engine.world.probe import probe

    items = eval_items(cfg.world.eval_scenes, cfg.world.seed)
    report = {
        p: probe(model.predict_velocity, model.text.cond, items, prompt=p) for p in ("solution", "task")
    }
    lines = [f"{p:8s} t={t:.2f}: column {r['column']:.2f}, direction {r['direction']:.2f}"
             for p, rows in report.items() for t, r in rows.items()]  # fmt: skip
    log.info("what the Demonstrator's one-step prediction knows (engine.world.probe):\n%s", "\n".join(lines))
    return {p: {str(t): r for t, r in rows.items()} for p, rows in report.items()}


def measure_gap(model: ToyDemonstrator, cfg: JobConfig, guidance: float) -> dict:
    """The gap check (engine.evaluation) on world.eval_scenes held-out scenes, with the oracle judge."""
    from engine.evaluation import SamplingConfig, format_report, gap_check
    from engine.world.oracle import OracleJudge

    items = eval_items(cfg.world.eval_scenes, cfg.world.seed)
    sampling = SamplingConfig(cfg.flow.num_steps, cfg.flow.shift, guidance, 0.0, cfg.world.gap_batch)
    report = gap_check(toy_pipeline(model), items, OracleJudge(), min_gap=cfg.distill.min_gap,
                       seeds=tuple(cfg.eval.seeds), sampling=sampling, raise_if_small=False,
                       conf=cfg.eval.ci)  # fmt: skip
    report["sampling"], report["items_seed"] = vars(sampling), cfg.world.seed
    log.info(
        "Demonstrator gap, %d held-out scenes, CFG %.1f:\n%s", len(items), guidance, format_report(report)
    )
    return report


if __name__ == "__main__":
    main()
    end_process()  # a torchrun worker leaves without interpreter finalisation (see engine.dist)
