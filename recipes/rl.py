"""Judge-rewarded RL of the Executor (WMSD stage 3), Flow-GRPO style, with an anchor to the Demonstrator.

    python recipes/rl.py --config recipes/configs/wmsd_toy.toml --rl.init runs/x/model.safetensors

The algorithm (the paper does not spell out its RL algorithm; this is Flow-GRPO's with WMSD's anchor). Per step:
  1. Prompts: ``rl.prompts_per_step`` items (I, task, solution) from the task file; each is repeated
     ``rl.group_size`` = G times. The group of rollouts for the step is drawn from (seed, step, rank).
  2. Rollouts: the SDE sampler (flow.num_steps steps, noise level flow.sde_sigma) under the current
     Executor v_θ(· | task, I) with classifier-free guidance flow.guidance (empty-text uncond), the
     policy evaluate.py samples (Flow-GRPO samples and trains with CFG too), no gradient; it records
     states x_k, timesteps t_k and the per-step Gaussian log-probs log π_old(x_{k+1} | x_k)
     (kernels.sampler.flow_step). The first step (from t = 1, where the SDE's noise scale diverges)
     and the last (onto t = 0) are deterministic (engine.flow.sde_step) and never trained on.
  3. Rewards: the videos are decoded and submitted to the judge service at once (one request per
     video and question in ``rl.reward_questions``; reward = mean of their scores; a video with a
     failed verdict is counted in the logs and, with rl.failed_rollouts = "skip" (default), left out
     of step 4 with advantage 0; "fallback" scores the failed verdict judge.fallback_score instead).
     With ``rl.prefetch`` the next step's group is rolled out and submitted before this step's rewards
     are collected, so the judge works while the trainer rolls out and updates; the one-step-old policy that sampled it is exactly what
     log π_old records, so the ratio stays correct. ``judge_wait_frac`` = time blocked on the judge
     / step time (from one step's batch to the next: the update included), logged every step.
  4. Advantages: A = (r - mean_group r) / (std_group r + rl.adv_eps), over the group's scored videos.
  5. Update, for ``rl.train_timesteps`` SDE steps k per rollout (distinct, uniform among the
     flow.num_steps - 2 stochastic ones): recompute v_θ(x_k | task, I) with grad (guided as in the
     rollout, cond and uncond in one forward), log π_θ(x_{k+1} | x_k) with the same Gaussian, ratio
     ρ = exp(log π_θ - log π_old) (log-probs averaged over the latent's elements with
     rl.logprob_reduction = "mean", as Flow-GRPO does; "sum" uses the joint density), and the loss
         L = mean max(-A ρ, -A clip(ρ, 1 - ε, 1 + ε))                    (ε = rl.clip_range)
           + β_d · mean ||v_θ(x_k | task, I) - v_φ(x_k | solution, I)||²   (β_d = rl.beta_d)
     with v_φ the frozen Demonstrator at the same state (computed in step 3 while the judge works).
  One optimizer step per group (no inner epochs), so π_old = the sampling policy and ρ = 1 at the
  first timestep's forward unless the group was prefetched.

Runs ``rl.steps`` steps (0 = train.steps) from ``rl.init`` ("" = the Demonstrator).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine import flow  # noqa: E402
from engine.config import ConfigError, JobConfig, config_main  # noqa: E402
from engine.dist import collective, end_process  # noqa: E402
from engine.judge import Verdict  # noqa: E402
from engine.log import get_logger  # noqa: E402
from engine.losses import demonstrator_anchor_loss, group_advantages, grpo_policy_loss  # noqa: E402
from kernels.sampler import flow_step  # noqa: E402
from recipes.common import (  # noqa: E402
    Kit,
    PromptTable,
    build_judge,
    build_kit,
    check_judge,
    check_model,
    check_run,
    check_tasks,
    check_training_precision,
    check_weights_fit,
    dist_info,
    judge_batch_s,
    judge_requests,
    load_items,
    prepare_teacher,
    run_dir,
    sampling_velocity,
    split_micro,
    step_generator,
    tasks_path,
    work_logs,
)

log = get_logger("rl")


class GroupBatches:
    """Rollout groups, judge rewards, advantages and Demonstrator targets (module docstring)."""

    def __init__(self, cfg: JobConfig, kit: Kit, table: PromptTable, teacher: torch.nn.Module, judge):
        if cfg.flow.sde_sigma <= 0 or cfg.flow.num_steps < 3:
            raise ValueError(f"rl needs flow.sde_sigma > 0 and flow.num_steps >= 3, got {cfg.flow.sde_sigma}, "
                             f"{cfg.flow.num_steps}")  # fmt: skip
        if not 1 <= cfg.rl.train_timesteps <= cfg.flow.num_steps - 2:
            raise ValueError(
                f"rl.train_timesteps={cfg.rl.train_timesteps}: expected 1..flow.num_steps - 2 (the stochastic steps)"
            )
        self.cfg, self.kit, self.table, self.teacher, self.judge = cfg, kit, table, teacher, judge
        self.pending: dict | None = None
        self.stats = {"judge_wait_s": 0.0, "fallbacks": 0}
        self.t_last: float | None = None  # when the last batch was handed to the trainer
        # the ranks of a sequence-parallel group roll out the same videos: the group's first rank judges
        # them and broadcasts the rewards (the others would send the judge the same requests again)
        cp = dist_info(cfg).cp_mesh
        self.cp_group = None if cp is None else cp.get_group()
        self.cp_src = 0 if cp is None else torch.distributed.get_global_rank(self.cp_group, 0)
        self.judges = cp is None or torch.distributed.get_rank() == self.cp_src

    @torch.no_grad()
    def rollout(self, step: int, model: torch.nn.Module) -> dict:
        """Sample one step's group with the SDE and submit its videos to the judge."""
        cfg, G = self.cfg, self.cfg.rl.group_size
        g = step_generator(cfg, step)
        prompts = torch.randint(len(self.table), (cfg.rl.prompts_per_step,), generator=g)
        idx = prompts.repeat_interleave(G)  # (P*G,) each prompt G times
        noise = torch.randn((len(idx), *self.kit.latent_shape), generator=g).to(self.kit.device)
        sde_gen = torch.Generator(device=self.kit.device).manual_seed(
            int(torch.randint(2**62, (1,), generator=g))
        )
        # the policy evaluate.py samples: CFG at flow.guidance (train rows re-score with the same guidance)
        uncond = self.table.cond(idx, "empty") if cfg.flow.guidance != 1.0 else None
        traj = flow.sample(sampling_velocity(cfg, model), noise, self.table.cond(idx, "task"), num_steps=cfg.flow.num_steps,
                           shift=cfg.flow.shift, guidance=cfg.flow.guidance, uncond=uncond, sigma=cfg.flow.sde_sigma,
                           generator=sde_gen, return_trajectory=True)  # fmt: skip
        handle = None
        if self.judges:
            items = [self.table.items[i] for i in idx.tolist()]
            handle = self.judge.submit_many(
                judge_requests(self.kit.decode(traj.x0), items, cfg.rl.reward_questions)
            )
        return {"step": step, "idx": idx, "traj": traj, "handle": handle, "g": g}

    def wait_limit_s(self, n: int) -> float:
        """How long ``n`` verdicts may take without anything failing: the service runs its batches
        ``judge.max_concurrency`` at a time, each within recipes.common.judge_batch_s, and a prefetched
        group's batches may be queued ahead."""
        j = self.cfg.judge
        waves = math.ceil(math.ceil(n / j.max_batch) / j.max_concurrency)
        return 2 * waves * judge_batch_s(self.cfg) + j.timeout_s

    def next(self, step: int, model: torch.nn.Module) -> list[dict]:
        t_start = time.perf_counter()
        group = self.pending if self.pending and self.pending["step"] == step else self.rollout(step, model)
        self.pending = None
        batch = self.train_rows(group)  # teacher targets while the judge works
        if self.cfg.rl.prefetch and step + 1 < self.cfg.train.steps:
            self.pending = self.rollout(step + 1, model)
        t_wait = time.perf_counter()
        rewards, valid = self.judged(step, group)
        wait = time.perf_counter() - t_wait
        adv = group_advantages(rewards, self.cfg.rl.group_size, self.cfg.rl.adv_eps, valid)
        K = self.cfg.rl.train_timesteps
        batch["adv"] = adv.repeat_interleave(K).to(self.kit.device)
        # a step: the previous step's update and this step's rollout, targets and judge wait (the batch
        # alone left the update out); the first step has no update before it
        t_end = time.perf_counter()
        step_time = t_end - (t_start if self.t_last is None else self.t_last)
        self.t_last = t_end
        self.stats["judge_wait_s"] += wait
        scored = rewards[valid] if bool(valid.any()) else rewards
        logs = {"reward_mean": float(scored.mean()), "reward_std": float(scored.std()) if len(scored) > 1 else 0.0,
                "judge_wait_s": wait, "judge_wait_frac": wait / max(step_time, 1e-9)}  # fmt: skip
        micro = split_micro(batch, self.cfg.train.grad_accum)
        for mb in micro:
            mb["logs"] = logs
        return micro

    def judged(self, step: int, group: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(reward, valid) of the group's videos: from the judge on a judging rank, then broadcast over
        the sequence-parallel group."""
        N = len(group["idx"])
        rewards, valid = torch.zeros(N), torch.zeros(N, dtype=torch.bool)
        if self.judges:
            n = N * len(self.cfg.rl.reward_questions)
            limit = self.wait_limit_s(n)
            try:
                verdicts = group["handle"].result(timeout=limit)
            except TimeoutError:  # the service's own timeouts should end every batch first: never a crash
                log.warning(
                    "step %d: no verdicts within %.0f s; the group counts as failed (rl.failed_rollouts)",
                    step,
                    limit,
                )
                verdicts = [Verdict(None, "timeout", "group wait limit", 0.0)] * n
            rewards, valid = self.rewards(verdicts, N)
        if self.cp_group is not None:
            both = torch.cat([rewards, valid.float()]).to(self.kit.device)
            with collective("rl rewards (sequence-parallel group)", self.cfg.parallel.timeout_s):
                torch.distributed.broadcast(both, src=self.cp_src, group=self.cp_group)
            rewards, valid = both[:N].cpu(), both[N:].cpu() > 0.5
        return rewards, valid

    def rewards(self, verdicts: list, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(reward (n,), valid (n,) bool): the mean score over the reward questions per video. A video
        with a failed verdict is not valid (rl.failed_rollouts = "skip"), or scores its failed verdicts
        as judge.fallback_score ("fallback": every video valid)."""
        q = len(self.cfg.rl.reward_questions)
        fb = self.cfg.judge.fallback_score
        failed = torch.tensor([v.score is None for v in verdicts]).view(n, q).any(dim=1)
        self.stats["fallbacks"] += sum(1 for v in verdicts if v.score is None)
        scores = torch.tensor([v.reward(fb) for v in verdicts], dtype=torch.float32)
        valid = ~failed if self.cfg.rl.failed_rollouts == "skip" else torch.ones(n, dtype=torch.bool)
        return scores.view(n, q).mean(dim=1), valid  # (n*q,) video-major -> (n,)

    @torch.no_grad()
    def train_rows(self, group: dict) -> dict:
        """(x_k, x_{k+1}, t_k, t_{k+1}, log π_old, cond, v_φ) for K SDE steps per rollout."""
        cfg, traj, idx = self.cfg, group["traj"], group["idx"]
        N, K = len(idx), cfg.rl.train_timesteps
        ts = traj.timesteps.tolist()
        stochastic = torch.tensor([k for k in range(len(ts) - 1) if flow.sde_step(ts[k], ts[k + 1])])
        pick = torch.rand(N, len(stochastic), generator=group["g"]).argsort(dim=1)[:, :K]
        ks = stochastic[pick].flatten()  # (N*K,) distinct stochastic steps per rollout
        rows = torch.arange(N).repeat_interleave(K)  # (N*K,)
        ks_d, rows_d = ks.to(traj.states.device), rows.to(traj.states.device)
        x, x_next = traj.states[ks_d, rows_d], traj.states[ks_d + 1, rows_d]
        t, t_next = traj.timesteps[ks_d], traj.timesteps[ks_d + 1]
        v_teacher = sampling_velocity(cfg, self.teacher)(x, t, self.table.cond(idx[rows], "solution"))
        out = {"x": x, "x_next": x_next, "t": t, "t_next": t_next, "logp_old": traj.logprobs[ks_d, rows_d],
               "cond": self.table.cond(idx[rows], "task"), "v_teacher": v_teacher}  # fmt: skip
        if cfg.flow.guidance != 1.0:
            out["uncond"] = self.table.cond(idx[rows], "empty")
        return out

    def state_dict(self) -> dict:
        # every draw is a function of (seed, step, rank); a prefetched group is redrawn on resume. The judge
        # counters go on, so that a resumed run reports the whole run's fallbacks and wait.
        return {"stats": dict(self.stats)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.stats.update(state_dict.get("stats", {}))


def rl_work_logs(model: torch.nn.Module, mb: dict) -> dict[str, float]:
    """Tokens and FLOPs of the loss's forward: cond and uncond rows when the rows carry an uncond (CFG)."""
    if "uncond" not in mb:
        return work_logs(model, mb["x"], mb["cond"])
    return work_logs(model, torch.cat([mb["x"], mb["x"]]), flow.cat_cond(mb["cond"], mb["uncond"]))


def rl_loss_fn(cfg: JobConfig):
    """The clipped policy loss + Demonstrator anchor (module docstring, step 5)."""

    def loss_fn(model: torch.nn.Module, mb: dict) -> tuple[torch.Tensor, dict]:
        # the rollout's guided velocity (cond and uncond in one forward); the anchor takes the conditional one
        v, v_u = flow.guided_velocity(model.predict_velocity, mb["x"], mb["t"], mb["cond"], mb.get("uncond"))
        _, logp = flow_step(mb["x"], v, v_u, guidance=cfg.flow.guidance, t=mb["t"], t_next=mb["t_next"],
                            sigma=cfg.flow.sde_sigma, x_next=mb["x_next"])  # fmt: skip
        logp_old = mb["logp_old"]
        if cfg.rl.logprob_reduction == "mean":  # per-element average log-density (Flow-GRPO)
            n = mb["x"][0].numel()
            logp, logp_old = logp / n, logp_old / n
        policy, stats = grpo_policy_loss(logp, logp_old, mb["adv"], cfg.rl.clip_range)
        anchor = demonstrator_anchor_loss(v, mb["v_teacher"], cfg.rl.beta_d)
        return policy + anchor, {"policy_loss": policy.detach(), "anchor_loss": anchor.detach(), **stats,
                                 **mb["logs"], **rl_work_logs(model, mb)}  # fmt: skip

    return loss_fn


def check_settings(cfg: JobConfig) -> None:
    """RL's own settings (GroupBatches and the judge's requests refused them after the encoding, the model
    loads and the first rollout); the pipeline checks them before its first stage."""
    from engine.judge import QUESTIONS

    f, r = cfg.flow, cfg.rl
    if f.num_steps < 3:
        raise ConfigError(
            f"flow.num_steps = {f.num_steps}: rl needs >= 3 (the first and last steps are not trained on)"
        )
    if f.sde_sigma <= 0:
        raise ConfigError(f"flow.sde_sigma = {f.sde_sigma}: rl needs an SDE noise level > 0")
    if not 1 <= r.train_timesteps <= f.num_steps - 2:
        raise ConfigError(f"rl.train_timesteps = {r.train_timesteps}: expected 1..flow.num_steps - 2 = "
                          f"{f.num_steps - 2} (the stochastic steps)")  # fmt: skip
    for k, v in (("rl.group_size", r.group_size), ("rl.prompts_per_step", r.prompts_per_step)):
        if v < 1:
            raise ConfigError(f"{k} = {v}: expected >= 1")
    # advantages are relative to the group: one rollout always gets 0, and only the anchor trained
    if r.group_size < 2:
        raise ConfigError(f"rl.group_size = {r.group_size}: a group of one rollout has advantage 0 (no policy "
                          "gradient); expected >= 2")  # fmt: skip
    # each step's rows are split into train.grad_accum micro-batches: a remainder failed after the first rollout
    rows = r.prompts_per_step * r.group_size * r.train_timesteps
    if cfg.train.grad_accum >= 1 and rows % cfg.train.grad_accum:
        raise ConfigError(f"train.grad_accum = {cfg.train.grad_accum}: rl's {rows} rows per step (rl.prompts_per_step x "
                          "rl.group_size x rl.train_timesteps) do not split into that many equal micro-batches")  # fmt: skip
    if r.steps < 0:
        raise ConfigError(f"rl.steps = {r.steps}: expected >= 0 (0 = train.steps)")
    # the losses refused the first two at the first update (after a rollout); adv_eps 0 made a group of equal
    # rewards 0 / 0 = NaN advantages, and the steps were skipped as non-finite
    for k, v, ok, want in (("rl.clip_range", r.clip_range, r.clip_range > 0, "> 0"),
                           ("rl.beta_d", r.beta_d, r.beta_d >= 0, ">= 0"),
                           ("rl.adv_eps", r.adv_eps, r.adv_eps > 0, "> 0")):  # fmt: skip
        if not ok:
            raise ConfigError(f"{k} = {v}: expected {want}")
    # 0 steps exported nothing, yet run returned <run>/model.safetensors (the pipeline refuses it too)
    if r.steps == 0 and cfg.train.steps < 1:
        raise ConfigError(f"rl.steps = 0 and train.steps = {cfg.train.steps}: rl would train no step and export no "
                          "Executor; set rl.steps or train.steps >= 1")  # fmt: skip
    bad = [q for q in r.reward_questions if q not in QUESTIONS]
    if not r.reward_questions or bad:
        raise ConfigError(
            f"rl.reward_questions = {r.reward_questions}: expected a non-empty list of {list(QUESTIONS)}"
        )


def validate(cfg: JobConfig) -> None:
    """The inputs, checked before any model is loaded: a ConfigError naming the key."""
    check_run(cfg)
    check_model(cfg)
    check_training_precision(cfg)
    check_judge(cfg)
    check_tasks(tasks_path(cfg), "distill.tasks")
    check_weights_fit(cfg, cfg.rl.init, "rl.init")
    check_settings(cfg)


def run(cfg: JobConfig) -> Path:
    """RL from ``rl.init``; returns the exported Executor's path."""
    from engine.trainer import Trainer

    steps = cfg.rl.steps or cfg.train.steps
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
    out = run_dir(cfg)
    kit = build_kit(cfg)
    table = kit.encode_items(load_items(tasks_path(cfg)))
    executor = kit.load_denoiser(cfg.rl.init, meta=cfg.model.meta_init)
    teacher = prepare_teacher(kit.load_denoiser("", meta=cfg.model.meta_init), cfg)
    with build_judge(cfg) as judge:
        batches = GroupBatches(cfg, kit, table, teacher, judge)
        trainer = Trainer(cfg, executor, rl_loss_fn(cfg), batches, run_dir=out)
        logs = trainer.fit()
        m = judge.metrics()
    log.info("rl done at step %d: %s; judge fallbacks %d, caller wait %.1fs", trainer.step, logs,
             batches.stats["fallbacks"], m.get("caller_wait_s", 0.0))  # fmt: skip
    return out / "model.safetensors"


def main(argv: list[str] | None = None) -> None:
    run(config_main(JobConfig, argv, description=__doc__, validate=validate))


if __name__ == "__main__":
    main()
    end_process()  # a torchrun worker leaves without interpreter finalisation (see engine.dist)
