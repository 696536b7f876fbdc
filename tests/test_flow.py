"""engine.flow against closed-form cases: Gaussian data, whose optimal velocity is known exactly."""

import math

import pytest
import torch

from engine import flow

MU, S = 1.5, 0.5  # data x0 ~ N(MU, S^2) per element


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """E[eps - x0 | x_t] for x0 ~ N(MU, S^2), eps ~ N(0, 1), x_t = (1 - t) x0 + t eps."""
    t = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    var = (1 - t) ** 2 * S**2 + t**2
    r = x - (1 - t) * MU
    e_x0 = MU + (1 - t) * S**2 / var * r
    e_eps = t / var * r
    return e_eps - e_x0


def test_shift_maps_unit_interval_monotonically():
    t = torch.linspace(0, 1, 101)
    for s in (0.5, 1.0, 3.0):
        y = flow.shift_timesteps(t, s)
        assert y[0] == 0 and y[-1] == 1 and torch.all(y[1:] > y[:-1])
    assert torch.allclose(flow.shift_timesteps(t, 1.0), t)
    assert flow.shift_timesteps(torch.tensor(0.5), 3.0) == pytest.approx(0.75)  # 3*.5 / (1 + 2*.5)


def test_timestep_sampling_distributions():
    g = torch.Generator().manual_seed(0)
    u = flow.sample_timesteps(20000, "uniform", generator=g)
    ln = flow.sample_timesteps(20000, "logit_normal", generator=g)
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    logit = torch.log(ln / (1 - ln))
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03
    with pytest.raises(ValueError, match="t_sampling"):
        flow.sample_timesteps(4, "cosine")


def test_schedule_endpoints_and_shift():
    ts = flow.timestep_schedule(4, shift=3.0)
    assert ts.shape == (5,) and ts[0] == 1 and ts[-1] == 0
    assert ts[1] == pytest.approx(3 * 0.75 / (1 + 2 * 0.75))


def test_loss_is_minimised_by_the_optimal_velocity():
    """L(v* + c) = L(v*) + c^2 since E[target - v* | x_t] = 0 (the cross term vanishes)."""
    g = torch.Generator().manual_seed(1)
    x0 = MU + S * torch.randn(200000, 1, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = flow.sample_timesteps(x0.shape[0], "uniform", generator=g)
    base, _ = flow.flow_matching_loss(gaussian_velocity, x0, {}, t=t, noise=noise)
    c = 0.3
    shifted, _ = flow.flow_matching_loss(
        lambda x, tt, cd: gaussian_velocity(x, tt, cd) + c, x0, {}, t=t, noise=noise
    )
    assert float(shifted - base) == pytest.approx(c**2, rel=0.05)


@pytest.mark.parametrize("sigma", [0.0, 0.5])
def test_sampler_reaches_the_data_distribution(sigma):
    """ODE and SDE (same marginals) from N(0, 1) with the exact velocity land on N(MU, S^2)."""
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(8000, 1, generator=g)
    traj = flow.sample(
        gaussian_velocity, noise, {}, num_steps=100, sigma=sigma, generator=g, return_trajectory=True
    )
    x = traj.x0
    assert float(x.mean()) == pytest.approx(MU, abs=0.03)
    assert float(x.std()) == pytest.approx(S, rel=0.05)
    assert traj.states.shape == (101, 8000, 1) and torch.equal(traj.states[0], noise)
    if sigma > 0:
        assert traj.logprobs.shape == (100, 8000) and torch.isfinite(traj.logprobs).all()
    else:
        assert traj.logprobs is None


def test_transition_logprob_matches_the_rollout():
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(16, 2, 3, generator=g)
    traj = flow.sample(
        gaussian_velocity, noise, {}, num_steps=6, sigma=0.7, generator=g, return_trajectory=True
    )
    ts = traj.timesteps
    assert torch.all(traj.logprobs[0] == 0) and torch.all(traj.logprobs[-1] == 0)  # deterministic ends
    for k in (1, 4):
        lp = flow.transition_logprob(
            gaussian_velocity,
            traj.states[k],
            traj.states[k + 1],
            float(ts[k]),
            float(ts[k + 1]),
            {},
            sigma=0.7,
        )
        assert torch.allclose(lp, traj.logprobs[k], rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="deterministic"):
        flow.transition_logprob(gaussian_velocity, noise, noise, 1.0, float(ts[1]), {}, sigma=0.7)
    # guidance without an uncond dict: an error, as in flow.sample (not silently the unguided log-prob)
    with pytest.raises(ValueError, match="uncond"):
        flow.transition_logprob(
            gaussian_velocity,
            traj.states[1],
            traj.states[2],
            float(ts[1]),
            float(ts[2]),
            {},
            sigma=0.7,
            guidance=3.0,
        )


def test_cfg_combines_cond_and_uncond_in_one_batched_forward():
    calls = []

    def v_fn(x, t, cond):
        calls.append(x.shape[0])
        return cond["text"].sum(dim=(1, 2)).view(-1, 1) * torch.ones_like(x)

    x = torch.zeros(3, 1)
    cond = {"text": torch.ones(3, 2, 4)}  # sum 8
    uncond = {"text": torch.ones(3, 1, 4)}  # sum 4 (shorter: padded to length 2 with zeros)
    out = flow.sample(v_fn, x, cond, num_steps=1, guidance=2.5, uncond=uncond).x0
    v = 4 + 2.5 * (8 - 4)
    assert calls == [6]
    assert torch.allclose(out, torch.full((3, 1), -v))  # x_0 = x_1 + (0 - 1) v
    with pytest.raises(ValueError, match="uncond"):
        flow.sample(v_fn, x, cond, num_steps=1, guidance=2.0)


def test_cat_cond_rejects_mismatched_keys():
    with pytest.raises(ValueError, match="same keys"):
        flow.cat_cond({"text": torch.zeros(1, 2, 3)}, {"image_latent": torch.zeros(1, 2)})
    assert math.isclose(
        float(flow.add_noise(torch.ones(1, 2), torch.zeros(1, 2), torch.tensor([0.25]))[0, 0]), 0.75
    )
