"""Self-distillation of the Executor from the Demonstrator (WMSD stage 1), and its off-policy ablations.

    python recipes/distill.py --config recipes/configs/wmsd_toy.toml [--distill.mode off_policy]
    torchrun --nproc_per_node 8 recipes/distill.py --config recipes/configs/wan21_i2v_14b_480p.toml

on_policy (the method). Per optimizer step, for a batch of B prompts (I, task, solution) drawn from the
task file:
  1. Roll out the Executor from noise with its own prompt: ``x_1 ~ N(0, I)``, K Euler steps of
     ``v_θ(x | task, I)`` (flow.num_steps, flow.shift, flow.guidance), no gradient. States x_{t_k}.
  2. Pick ``distill.steps_per_rollout`` distinct states per rollout (uniformly among the K states
     before t = 0).
  3. Target: the frozen Demonstrator's velocity at the same state with the solution,
     ``v_φ(x_t | solution, I)``.
  4. Loss ``velocity_distill_loss(v_θ(x_t | task, I), v_φ, w(t))`` with w from distill.t_weighting.
  Both velocities are conditional (guidance 1): the student learns to act as the teacher does given
  the solution; CFG at sampling then applies to both alike.
off_policy (SFT ablation): flow-matching fine-tune of v_θ(· | task, I) on the Demonstrator's videos
  for (I, solution), sampled once by recipes/demonstrate.py; t from flow.t_sampling and flow.shift, the
  loss weighted by distill.t_weighting as on-policy's.
off_policy_filtered: the same on the demonstrations the judge scored as solving the task
  (Task score >= distill.filter_threshold).

distill.min_gap is not checked here: measuring the Demonstrator's gap is a full evaluation of both prompts
on held-out tasks, which recipes/pipeline.py runs before this stage and stops on.

The Executor starts from ``distill.init`` ("" = the Demonstrator). Teacher and student go through the
same placement, FP8 and FSDP as the trainer applies (engine.parallel). Every step's prompts, noise
and state choices are drawn from (run.seed, step, rank), so a resumed run continues exactly.
Output: <run>/model.safetensors (the Executor), metrics.jsonl, checkpoints/.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine import flow  # noqa: E402
from engine.config import ConfigError, JobConfig, config_main  # noqa: E402
from engine.dist import end_process  # noqa: E402
from engine.log import get_logger  # noqa: E402
from engine.losses import flow_matching_loss, timestep_weights, velocity_distill_loss  # noqa: E402
from recipes.common import (  # noqa: E402
    Kit,
    PromptTable,
    build_kit,
    check_model,
    check_run,
    check_tasks,
    check_training_precision,
    check_weights_fit,
    load_items,
    prepare_teacher,
    read_jsonl,
    run_dir,
    run_path,
    sampling_velocity,
    step_generator,
    tasks_path,
    work_logs,
)

log = get_logger("distill")


class OnPolicyBatches:
    """Executor rollouts + Demonstrator targets: one optimizer step's micro-batches per ``next``."""

    def __init__(self, cfg: JobConfig, kit: Kit, table: PromptTable, teacher: torch.nn.Module):
        if not 1 <= cfg.distill.steps_per_rollout <= cfg.flow.num_steps:
            raise ValueError(
                f"distill.steps_per_rollout={cfg.distill.steps_per_rollout}: expected 1..flow.num_steps "
                f"({cfg.flow.num_steps})"
            )
        self.cfg, self.kit, self.table, self.teacher = cfg, kit, table, teacher

    def next(self, step: int, model: torch.nn.Module) -> list[dict]:
        # train.batch_size is per micro-step (engine.config): grad_accum split it, shrinking the step's batch
        return [self.micro(step, i, model) for i in range(self.cfg.train.grad_accum)]

    @torch.no_grad()
    def micro(self, step: int, i: int, model: torch.nn.Module) -> dict:
        """Micro-batch ``i`` of ``step``: train.batch_size rollouts, steps_per_rollout states each."""
        cfg, B, K = self.cfg, self.cfg.train.batch_size, self.cfg.distill.steps_per_rollout
        g = step_generator(cfg, step, salt=i)
        idx = torch.randint(len(self.table), (B,), generator=g)
        cond = self.table.cond(idx, "task")
        uncond = self.table.cond(idx, "empty") if cfg.flow.guidance != 1.0 else None
        noise = torch.randn((B, *self.kit.latent_shape), generator=g).to(self.kit.device)
        traj = flow.sample(sampling_velocity(cfg, model), noise, cond, num_steps=cfg.flow.num_steps,
                           shift=cfg.flow.shift, guidance=cfg.flow.guidance, uncond=uncond,
                           return_trajectory=True)  # fmt: skip
        ks = torch.rand(B, cfg.flow.num_steps, generator=g).argsort(dim=1)[:, :K]  # (B, K) distinct states
        rows = torch.arange(B).repeat_interleave(K)  # (B*K,) rollout of each picked state
        ks = ks.flatten().to(traj.states.device)
        x_t = traj.states[ks, rows.to(ks.device)]  # (K+1, B, ...) -> (B*K, ...)
        t = traj.timesteps[ks]
        v_teacher = sampling_velocity(cfg, self.teacher)(x_t, t, self.table.cond(idx[rows], "solution"))
        return {"x_t": x_t, "t": t, "cond": self.table.cond(idx[rows], "task"), "v_teacher": v_teacher,
                "weight": timestep_weights(t, cfg.distill.t_weighting).to(x_t.device)}  # fmt: skip

    def state_dict(self) -> dict:
        return {}  # every draw is a function of (seed, step, rank)

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def distill_loss(model: torch.nn.Module, mb: dict) -> tuple[torch.Tensor, dict]:
    v = model.predict_velocity(mb["x_t"], mb["t"], mb["cond"])
    loss = velocity_distill_loss(v, mb["v_teacher"], mb["weight"])
    return loss, {"distill_mse": velocity_distill_loss(v.detach(), mb["v_teacher"]),
                  **work_logs(model, mb["x_t"], mb["cond"])}  # fmt: skip


class DemoBatches:
    """Flow-matching batches on stored Demonstrator videos, prompted with the task (SFT)."""

    def __init__(self, cfg: JobConfig, table: PromptTable, latents: torch.Tensor, item_idx: torch.Tensor):
        if len(latents) == 0:
            raise ValueError("off-policy distillation: no demonstrations to train on (all filtered out?)")
        self.cfg, self.table, self.latents, self.item_idx = cfg, table, latents, item_idx

    def next(self, step: int, model: torch.nn.Module) -> list[dict]:
        return [self.micro(step, i) for i in range(self.cfg.train.grad_accum)]  # batch_size per micro-step

    def micro(self, step: int, i: int) -> dict:
        cfg, B = self.cfg, self.cfg.train.batch_size
        g = step_generator(cfg, step, salt=i)
        j = torch.randint(len(self.latents), (B,), generator=g)
        x0 = self.latents[j].to(self.table.image["image_latent"].device)
        t = flow.sample_timesteps(B, cfg.flow.t_sampling, shift=cfg.flow.shift, generator=g).to(x0.device)
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        return {"x0": x0, "noise": noise, "t": t, "cond": self.table.cond(self.item_idx[j], "task"),
                "weight": timestep_weights(t, cfg.distill.t_weighting).to(x0.device)}  # fmt: skip

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def sft_loss(model: torch.nn.Module, mb: dict) -> tuple[torch.Tensor, dict]:
    v = model.predict_velocity(flow.add_noise(mb["x0"], mb["noise"], mb["t"]), mb["t"], mb["cond"])
    return flow_matching_loss(v, mb["x0"], mb["noise"], mb["weight"]), work_logs(model, mb["x0"], mb["cond"])


def load_demos(cfg: JobConfig, table: PromptTable, out: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Demonstrations of ``table``'s items (recipes/demonstrate.py) -> latents (M, ...) and item rows."""
    from recipes.demonstrate import read_demos

    demos_dir = Path(cfg.distill.demos) if cfg.distill.demos else out / "demos"
    threshold = cfg.distill.filter_threshold if cfg.distill.mode == "off_policy_filtered" else None
    latents, item_ids, kept, total = read_demos(demos_dir, threshold)
    row_of = {it.id: i for i, it in enumerate(table.items)}
    unknown = [i for i in item_ids if i not in row_of]
    if unknown:
        raise ValueError(f"demonstrations in '{demos_dir}' for items not in the task file: {unknown[:3]}")
    log.info("off-policy: %d of %d demonstrations kept (mode %s)", kept, total, cfg.distill.mode)
    return latents, torch.tensor([row_of[i] for i in item_ids], dtype=torch.long)


def build(cfg: JobConfig) -> tuple:
    """Kit, Executor, loss and batches for ``cfg.distill.mode``."""
    out = run_dir(cfg)
    kit = build_kit(cfg)
    table = kit.encode_items(load_items(tasks_path(cfg)))
    executor = kit.load_denoiser(cfg.distill.init, meta=cfg.model.meta_init)
    if cfg.distill.mode == "on_policy":
        teacher = prepare_teacher(kit.load_denoiser("", meta=cfg.model.meta_init), cfg)
        return kit, executor, distill_loss, OnPolicyBatches(cfg, kit, table, teacher)
    latents, item_idx = load_demos(cfg, table, out)
    return kit, executor, sft_loss, DemoBatches(cfg, table, latents, item_idx)


def validate(cfg: JobConfig) -> None:
    """The inputs, checked before any model is loaded: a ConfigError naming the key."""
    check_run(cfg)
    check_model(cfg)
    check_training_precision(cfg)
    check_tasks(tasks_path(cfg), "distill.tasks")
    # a checkpoint of another model config failed with a traceback once the models were loaded
    check_weights_fit(cfg, cfg.distill.init, "distill.init")
    # 0 steps returned <run>/model.safetensors, never written (the export follows a step), as the Executor
    if cfg.train.steps < 1:
        raise ConfigError(
            f"train.steps = {cfg.train.steps}: expected >= 1 (distill exports the Executor it trains)"
        )
    # both failed only after the models were loaded, with a traceback (a missing demos folder as a "task file")
    if cfg.distill.mode == "on_policy" and not 1 <= cfg.distill.steps_per_rollout <= cfg.flow.num_steps:
        raise ConfigError(f"distill.steps_per_rollout = {cfg.distill.steps_per_rollout}: expected "
                          f"1..flow.num_steps ({cfg.flow.num_steps})")  # fmt: skip
    if cfg.distill.mode != "on_policy":
        demos = Path(cfg.distill.demos) if cfg.distill.demos else run_path(cfg) / "demos"
        if not (demos / "index.jsonl").is_file():
            raise ConfigError(f"distill.demos: '{demos}' holds no demonstrations (no index.jsonl); distill.mode "
                              f"{cfg.distill.mode} trains on them: run recipes/demonstrate.py first")  # fmt: skip
        # none kept (none passing the threshold) failed with a traceback after the models were loaded
        from recipes.demonstrate import DEMOS_INDEX

        try:
            rows = read_jsonl(demos / "index.jsonl", DEMOS_INDEX)
        except (OSError, ValueError) as e:
            raise ConfigError(f"distill.demos: {e}") from None
        if cfg.distill.mode == "off_policy_filtered":
            t = cfg.distill.filter_threshold
            if not any((r.get("scores", {}).get("task") or 0.0) >= t for r in rows):
                scored = [r["scores"]["task"] for r in rows if r.get("scores", {}).get("task") is not None]
                if rows and not scored:  # "best: 0.0" read as the judge's verdict
                    raise ConfigError(f"distill.demos: none of the {len(rows)} demonstrations in '{demos}' has a "
                                      "Task score (every judge call failed); rerun recipes/demonstrate.py, which "
                                      "scores them again")  # fmt: skip
                best = max(scored, default=None)
                raise ConfigError(f"distill.filter_threshold = {t}: none of the {len(rows)} demonstrations in '{demos}' "
                                  f"has a Task score >= it (best: {best}); nothing to train on")  # fmt: skip
        elif not rows:
            raise ConfigError(
                f"distill.demos: '{demos}/index.jsonl' has no demonstrations; nothing to train on"
            )


def run(cfg: JobConfig) -> Path:
    """Train the Executor; returns the path of its exported weights."""
    from engine.trainer import Trainer

    kit, executor, loss_fn, batches = build(cfg)
    trainer = Trainer(cfg, executor, loss_fn, batches, run_dir=run_dir(cfg))
    logs = trainer.fit()
    log.info("%s distillation done at step %d: %s", cfg.distill.mode, trainer.step, logs)
    return run_dir(cfg) / "model.safetensors"


def main(argv: list[str] | None = None) -> None:
    run(config_main(JobConfig, argv, description=__doc__, validate=validate))


if __name__ == "__main__":
    main()
    end_process()  # a torchrun worker leaves without interpreter finalisation (see engine.dist)
