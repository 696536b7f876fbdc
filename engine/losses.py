"""The training objectives of WMSD, as plain functions of tensors.

Notation (rectified flow, engine/flow.py): ``x_t = (1 - t) x0 + t eps``, the velocity target is
``v = eps - x0``, ``t`` in [0, 1] with t = 1 pure noise. Executor v_θ(x_t | task, I) is the student,
Demonstrator v_φ(x_t | solution, I) the frozen teacher.

- :func:`velocity_distill_loss` — on-policy self-distillation: on states x_t taken from the
  Executor's own rollouts, ``mean_b w(t_b) · mean_i (v_θ - sg[v_φ])_i²``. Its gradient w.r.t. v_θ is
  ``2 w (v_θ - v_φ) / N`` per sample (N = elements per sample). On the flow ODE this is the
  velocity-distance surrogate for the reverse KL between the Executor's and the Demonstrator's
  path measures (Girsanov: KL = ½∫ ||Δv||²/g² dt for SDE-perturbed flows).
- :func:`flow_matching_loss` — the SFT ablation: ordinary flow matching of v_θ(x_t | task, I) to
  ``eps - x0`` on Demonstrator videos x0.
- :func:`grpo_policy_loss` — Flow-GRPO's clipped surrogate on per-step Gaussian log-probs:
  ``ρ = exp(log π_θ - log π_old)``, ``L = mean max(-A ρ, -A clip(ρ, 1-ε, 1+ε))``.
- :func:`demonstrator_anchor_loss` — ``β_d · mean_b mean_i (v_θ - sg[v_φ])_i²``, the RL anchor.
- :func:`group_advantages` — ``(r - mean_group) / (std_group + eps)``.
- :func:`timestep_weights` — the configurable w(t) of the distillation loss.
"""

from __future__ import annotations

import torch

T_WEIGHTINGS = ("uniform", "snr", "late")


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has {tuple(b.shape)}; expected equal"
        )


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, ...) x (B, ...) -> (B,) mean squared difference per sample, in float32."""
    d = a.float() - b.float()
    return d.pow(2).flatten(1).mean(dim=1)


def _weighted_mean(per_sample: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return per_sample.mean()
    if weight.shape != per_sample.shape:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected ({per_sample.shape[0]},)")
    return (per_sample * weight.to(per_sample)).mean()


def timestep_weights(t: torch.Tensor, scheme: str) -> torch.Tensor:
    """Per-sample loss weights w(t) for t in [0, 1] (1 = noise), each with mean 1 over t ~ U(0, 1).

    - ``uniform``: w = 1.
    - ``snr``: min-SNR-5 (Hang et al. 2023: x0-loss weight min(SNR, 5)) carried to the rectified-flow
      velocity: x0 = x_t - t v, so ||Δx0||² = t² ||Δv||² and w = min(SNR, 5) t² with SNR = ((1-t)/t)²
      (the VP form min(SNR, 5) / (SNR + 1) assumes α² + σ² = 1), rescaled by 1 / its mean over U(0,1)
      (computed once) so that lr keeps its meaning.
    - ``late``: w = 2 (1 - t), more weight late in sampling where the video's details form.
    """
    if scheme == "uniform":
        return torch.ones_like(t, dtype=torch.float32)
    if scheme == "snr":
        tc = t.float().clamp(1e-4, 1 - 1e-4)
        snr = ((1 - tc) / tc) ** 2
        return snr.clamp(max=5.0) * tc**2 / _SNR_MEAN
    if scheme == "late":
        return 2.0 * (1.0 - t.float())
    raise ValueError(f"t_weighting {scheme!r} is not one of {', '.join(T_WEIGHTINGS)}")


def _snr_weight_mean(n: int = 200_001) -> float:
    t = torch.linspace(0.5 / n, 1 - 0.5 / n, n, dtype=torch.float64)
    snr = ((1 - t) / t) ** 2
    return float((snr.clamp(max=5.0) * t**2).mean())


_SNR_MEAN = _snr_weight_mean()


def velocity_distill_loss(
    v_student: torch.Tensor, v_teacher: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``mean_b w_b · mean_i (v_student - v_teacher)²``; the teacher is detached (stop-gradient).

    v_student, v_teacher: (B, ...) velocities at the same states x_t; weight: optional (B,).
    """
    _check_same_shape(v_student, v_teacher, "v_student", "v_teacher")
    return _weighted_mean(_per_sample_mse(v_student, v_teacher.detach()), weight)


def flow_matching_loss(
    v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """SFT loss: ``mean_b w_b · mean_i (v_pred - (noise - x0))²`` for v_pred = v_θ(x_t) at
    ``x_t = (1 - t) x0 + t noise``."""
    _check_same_shape(v_pred, x0, "v_pred", "x0")
    _check_same_shape(noise, x0, "noise", "x0")
    return _weighted_mean(_per_sample_mse(v_pred, noise - x0), weight)


def demonstrator_anchor_loss(v_student: torch.Tensor, v_teacher: torch.Tensor, beta_d: float) -> torch.Tensor:
    """``beta_d · mean_b mean_i (v_student - sg[v_teacher])²``: keeps the Executor near the
    Demonstrator during RL. Gradient w.r.t. v_student: ``2 beta_d (v_student - v_teacher) / numel``."""
    if beta_d < 0:
        raise ValueError(f"beta_d must be >= 0, got {beta_d}")
    return beta_d * velocity_distill_loss(v_student, v_teacher)


def grpo_policy_loss(
    logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow-GRPO's clipped surrogate for one sampler step per row.

    logp_new: (N,) log π_θ(x_{k+1} | x_k) with grad; logp_old: (N,) the same under the sampling policy
    (no grad); advantages: (N,). Returns the loss and logs: ``clip_frac`` (share of rows whose ratio
    left [1-ε, 1+ε]) and ``approx_kl`` (mean of ½ (log ρ)²).
    """
    _check_same_shape(logp_new, logp_old, "logp_new", "logp_old")
    _check_same_shape(advantages, logp_old, "advantages", "logp_old")
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    log_ratio = logp_new.float() - logp_old.detach().float()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().float()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        logs = {
            "clip_frac": float(((ratio - 1.0).abs() > clip_range).float().mean()),
            "approx_kl": float((0.5 * log_ratio.pow(2)).mean()),
        }
    return loss, logs


def group_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-4, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """(N,) rewards laid out as N / group_size consecutive groups -> group-normalised advantages.

    A group whose rewards are all equal gets advantage 0 (it carries no preference signal). valid: (N,)
    bool, the rewards to use (None: all); the others get advantage 0 and stay out of their group's mean
    and std, so a failed verdict neither shifts the others nor is pushed itself.
    """
    if rewards.ndim != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)}: expected (N,) with N a multiple of group_size={group_size}"
        )
    if valid is not None and valid.shape != rewards.shape:
        raise ValueError(f"valid of shape {tuple(valid.shape)}: expected rewards' {tuple(rewards.shape)}")
    r = rewards.float().view(-1, group_size)  # (N,) -> (groups, G)
    w = torch.ones_like(r) if valid is None else valid.view(-1, group_size).float()
    n = w.sum(dim=1, keepdim=True).clamp(min=1)
    mean = (r * w).sum(dim=1, keepdim=True) / n
    std = ((r - mean).square() * w).sum(dim=1, keepdim=True).div(n).sqrt()  # population std, as numpy's
    return ((r - mean) / (std + eps) * w).view(-1)
