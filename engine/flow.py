"""Rectified flow: timestep sampling and shift, the training loss, and the samplers (ODE / SDE, CFG).

Conventions (shared by every module of the engine):

- ``x_t = (1 - t) x0 + t eps`` with ``t`` in [0, 1]; t = 0 is data, t = 1 is pure noise.
- The velocity points from data to noise: ``v = dx_t/dt = eps - x0``. Sampling integrates from
  t = 1 down to t = 0 (``x_{t'} = x_t + (t' - t) v``) with :func:`kernels.sampler.flow_step`.
- A model's timestep input is ``1000 t`` (Wan convention); that scaling happens inside the model's
  ``predict_velocity``. The engine only calls a velocity function ``v_fn(x_t, t, cond) -> v`` with
  ``t`` a (B,) float tensor in [0, 1] and ``cond`` a dict of batched tensors (``"text"`` (B, L, D),
  ``"text_lengths"`` (B,), ``"image_latent"`` (B, C, 1, h, w), ...). Recipes pass
  ``model.predict_velocity``.
- Timestep shift ``s``: ``t' = s t / (1 + (s - 1) t)``; s > 1 spends more steps near noise.
- CFG: ``v = v_u + g (v_c - v_u)``; cond and uncond run batched in one forward (batch 2B).

Samplers return a :class:`Trajectory`: the final sample, and when asked the states x at every
timestep, the timesteps, and the per-step Gaussian log-probs of the SDE transitions (RL and on-policy
distillation train on them). :func:`transition_logprob` re-scores a stored transition under new
parameters (the ratio in GRPO).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]
T_SAMPLINGS = ("uniform", "logit_normal")


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``t' = s t / (1 + (s - 1) t)``: a monotone map of [0, 1] onto itself (identity for s = 1)."""
    if shift <= 0:
        raise ValueError(f"shift: expected > 0, got {shift}")
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_timesteps(
    n: int,
    scheme: str = "logit_normal",
    *,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(n,) training timesteps in (0, 1): uniform, or logit-normal ``sigmoid(N(0, 1))``, then shifted."""
    if scheme == "uniform":
        t = torch.rand(n, generator=generator, device=device)
    elif scheme == "logit_normal":
        t = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    else:
        raise ValueError(f"t_sampling: {scheme!r} is not one of {T_SAMPLINGS}")
    return shift_timesteps(t, shift)


def timestep_schedule(num_steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """(num_steps + 1,) sampling timesteps from 1 down to 0: ``shift(linspace(1, 0))``."""
    if num_steps < 1:
        raise ValueError(f"num_steps: expected >= 1, got {num_steps}")
    return shift_timesteps(torch.linspace(1.0, 0.0, num_steps + 1, device=device), shift)


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast against x."""
    return t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x0 + t eps`` with t of shape (B,)."""
    tb = _bcast(t, x0)
    return (1.0 - tb) * x0 + tb * noise


def flow_matching_loss(
    v_fn: VelocityFn,
    x0: torch.Tensor,
    cond: dict,
    *,
    scheme: str = "logit_normal",
    shift: float = 1.0,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict]:
    """Rectified-flow training loss ``E ||v_fn(x_t, t, c) - (eps - x0)||²`` (mean over elements).

    ``t`` and ``noise`` are drawn when not given. Returns (loss, logs) with logs holding detached
    scalars (``loss``, ``t_mean``).
    """
    b = x0.shape[0]
    if t is None:
        t = sample_timesteps(b, scheme, shift=shift, generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if noise.shape != x0.shape or t.shape != (b,):
        raise ValueError(
            f"noise {tuple(noise.shape)} / t {tuple(t.shape)}: expected {tuple(x0.shape)} / ({b},)"
        )
    v = v_fn(add_noise(x0, noise, t), t, cond)
    loss = (v.float() - (noise - x0).float()).pow(2).mean()
    return loss, {"loss": loss.detach(), "t_mean": t.mean().detach()}


# ---------------------------------------------------------------------------------------------
# Conditioning helpers: batch cond and uncond into one forward.
# ---------------------------------------------------------------------------------------------


def _cat_values(a: torch.Tensor, b: torch.Tensor, key: str) -> torch.Tensor:
    """Concatenate along batch; sequence tensors (B, L, D) of different L are zero-padded to max L."""
    if a.dim() == 3 and b.dim() == 3 and a.shape[1] != b.shape[1] and a.shape[2] == b.shape[2]:
        L = max(a.shape[1], b.shape[1])
        a = torch.nn.functional.pad(a, (0, 0, 0, L - a.shape[1]))
        b = torch.nn.functional.pad(b, (0, 0, 0, L - b.shape[1]))
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"cond[{key!r}]: cond {tuple(a.shape)} and uncond {tuple(b.shape)} cannot be batched"
        )
    return torch.cat([a, b], dim=0)


def cat_cond(cond: dict, uncond: dict) -> dict:
    """One cond dict of batch 2B: cond's rows first, then uncond's. Both need the same keys."""
    if set(cond) != set(uncond):
        raise ValueError(f"cond keys {sorted(cond)} and uncond keys {sorted(uncond)}: expected the same keys")
    return {k: _cat_values(cond[k], uncond[k], k) for k in cond}


def guided_velocity(
    v_fn: VelocityFn, x: torch.Tensor, t: torch.Tensor, cond: dict, uncond: dict | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(v_cond, v_uncond or None), with cond and uncond evaluated in one batched forward."""
    if uncond is None:
        return v_fn(x, t, cond), None
    v = v_fn(torch.cat([x, x]), torch.cat([t, t]), cat_cond(cond, uncond))
    return v.chunk(2)


# ---------------------------------------------------------------------------------------------
# Samplers.
# ---------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """A sampling run. ``x0``: the final sample (B, ...). With ``return_trajectory``: ``states``
    (K+1, B, ...) = x at ``timesteps`` (K+1,) from 1 to 0 (states[0] is the initial noise), and for an
    SDE run ``logprobs`` (K, B) float32 = log N(states[k+1]; mean_k, std_k²) summed over elements."""

    x0: torch.Tensor
    timesteps: torch.Tensor
    states: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None


def _flow_step(**kwargs):
    """kernels.sampler.flow_step: the Triton kernel on CUDA, the torch reference on CPU."""
    from kernels.sampler import flow_step

    return flow_step(**kwargs, backend="triton" if kwargs["x"].is_cuda else "torch")


def sde_step(t: float, t_next: float) -> bool:
    """Whether the SDE sampler injects noise on the step t -> t_next: only strictly inside (0, 1).

    The SDE's noise scale sigma sqrt(t / (1 - t)) diverges at t = 1 (the kernel caps it at t = 0.999,
    still ~32 sigma), which wrecks the first Euler step; and the step onto t = 0 should land on data.
    Those two steps are deterministic (ODE) and carry log-prob 0: RL trains on the others."""
    return 0.0 < t_next and t < 1.0 - 1e-6


def sample(
    v_fn: VelocityFn,
    noise: torch.Tensor,
    cond: dict,
    *,
    num_steps: int = 8,
    shift: float = 1.0,
    guidance: float = 1.0,
    uncond: dict | None = None,
    sigma: float = 0.0,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
) -> Trajectory:
    """Integrate from ``noise`` at t = 1 to t = 0 in ``num_steps`` steps of the shifted schedule.

    ``sigma == 0``: Euler ODE. ``sigma > 0``: the SDE of :func:`kernels.sampler.flow_step`, whose step
    noise is drawn from ``generator`` (same generator state -> same rollout), with per-step log-probs;
    the first (t = 1) and last (to t = 0) steps stay deterministic (:func:`sde_step`), log-prob 0.
    ``guidance != 1`` needs ``uncond`` (a cond dict of the same keys, e.g. empty text).
    Runs under ``torch.no_grad``; training code recomputes velocities at the stored states.
    """
    if guidance != 1.0 and uncond is None:
        raise ValueError(f"guidance={guidance}: classifier-free guidance needs an uncond dict")
    use_uncond = uncond if guidance != 1.0 else None
    ts = timestep_schedule(num_steps, shift, device=noise.device)
    x = noise
    states, logps = [x], []
    with torch.no_grad():
        for k in range(num_steps):
            t = ts[k].expand(x.shape[0])
            v_c, v_u = guided_velocity(v_fn, x, t, cond, use_uncond)
            eps = None
            if sigma > 0 and sde_step(float(ts[k]), float(ts[k + 1])):
                eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            step_sigma = sigma if eps is not None else 0.0
            x, logp = _flow_step(
                x=x,
                v_cond=v_c,
                v_uncond=v_u,
                guidance=guidance,
                t=float(ts[k]),
                t_next=float(ts[k + 1]),
                sigma=step_sigma,
                noise=eps,
            )
            if return_trajectory:
                states.append(x)
                logps.append(logp if logp is not None else torch.zeros(x.shape[0], device=x.device))
    if not return_trajectory:
        return Trajectory(x0=x, timesteps=ts)
    return Trajectory(
        x0=x, timesteps=ts, states=torch.stack(states), logprobs=torch.stack(logps) if sigma > 0 else None
    )


def transition_logprob(
    v_fn: VelocityFn,
    x: torch.Tensor,
    x_next: torch.Tensor,
    t: float,
    t_next: float,
    cond: dict,
    *,
    sigma: float,
    guidance: float = 1.0,
    uncond: dict | None = None,
) -> torch.Tensor:
    """(B,) log-prob of the stored SDE transition x -> x_next under ``v_fn`` (with gradients)."""
    if sigma <= 0:
        raise ValueError(f"sigma: a transition log-prob needs sigma > 0, got {sigma}")
    if not sde_step(t, t_next):
        raise ValueError(f"step {t} -> {t_next}: deterministic in engine.flow.sample (sde_step), no log-prob")
    if guidance != 1.0 and uncond is None:
        raise ValueError(f"guidance={guidance}: classifier-free guidance needs an uncond dict")
    tt = torch.full((x.shape[0],), float(t), device=x.device)
    v_c, v_u = guided_velocity(v_fn, x, tt, cond, uncond if guidance != 1.0 else None)
    _, logp = _flow_step(
        x=x,
        v_cond=v_c,
        v_uncond=v_u,
        guidance=guidance,
        t=t,
        t_next=t_next,
        sigma=sigma,
        noise=None,
        x_next=x_next,
    )
    return logp
