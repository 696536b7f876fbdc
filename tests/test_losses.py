"""engine/losses.py against analytic values and gradients."""

import math

import numpy as np
import pytest
import torch

from engine.losses import (
    demonstrator_anchor_loss,
    flow_matching_loss,
    group_advantages,
    grpo_policy_loss,
    timestep_weights,
    velocity_distill_loss,
)


def test_velocity_distill_gradient_is_analytic_and_teacher_gets_none():
    vs = torch.randn(3, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    vt = torch.randn(3, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    loss = velocity_distill_loss(vs, vt, w)
    n = vs[0].numel()
    d = (vs - vt).detach()
    expected = sum(float(w[b]) * float((d[b] ** 2).mean()) for b in range(3)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    analytic = 2 * w.view(3, 1, 1, 1).float() * (vs - vt).detach().float() / (n * 3)
    torch.testing.assert_close(vs.grad.float(), analytic, rtol=1e-5, atol=1e-7)
    assert vt.grad is None


def test_anchor_gradient_equals_its_analytic_form():
    vs = torch.randn(4, 3, 6, requires_grad=True)
    vt = torch.randn(4, 3, 6)
    beta = 0.01
    demonstrator_anchor_loss(vs, vt, beta).backward()
    torch.testing.assert_close(vs.grad, 2 * beta * (vs - vt).detach() / vs.numel())
    with pytest.raises(ValueError, match="beta_d"):
        demonstrator_anchor_loss(vs, vt, -1.0)


def test_flow_matching_loss_is_squared_offset_from_target():
    x0, noise = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    assert flow_matching_loss(noise - x0, x0, noise).item() == pytest.approx(0.0, abs=1e-12)
    assert flow_matching_loss(noise - x0 + 0.3, x0, noise).item() == pytest.approx(0.09, rel=1e-5)
    with pytest.raises(ValueError, match="v_pred has shape"):
        flow_matching_loss(torch.zeros(2, 3, 7), x0, noise)


def _grpo_grad(logp_new_val: float, adv: float, eps: float = 0.1) -> float:
    lp_new = torch.tensor([logp_new_val], dtype=torch.float64, requires_grad=True)
    loss, _ = grpo_policy_loss(lp_new, torch.zeros(1, dtype=torch.float64), torch.tensor([adv]), eps)
    loss.backward()
    return lp_new.grad.item()


@pytest.mark.parametrize(
    "log_ratio, adv, clipped",
    [
        (0.0, 1.0, False),  # on-policy: d/dlogp (-A ρ) = -A
        (0.0, -2.0, False),
        (np.log(1.5), 1.0, True),  # A > 0 and ρ above 1+ε: no further push up
        (np.log(0.5), 1.0, False),  # A > 0 and ρ below 1-ε: the pessimistic term is unclipped
        (np.log(0.5), -1.0, True),  # A < 0 and ρ below 1-ε: no further push down
        (np.log(1.5), -1.0, False),
    ],
)
def test_grpo_gradient_sign_and_zero_cases(log_ratio, adv, clipped):
    g = _grpo_grad(float(log_ratio), adv)
    if clipped:
        assert g == 0.0
    else:
        # loss = -A ρ => dL/dlogp = -A ρ; lowering the loss raises logp exactly when A > 0
        assert g == pytest.approx(-adv * float(np.exp(log_ratio)), rel=1e-9)


def test_grpo_logs_and_bad_input():
    lp_old = torch.zeros(4)
    lp_new = torch.tensor([0.0, 0.5, -0.5, 0.01])
    _, logs = grpo_policy_loss(lp_new, lp_old, torch.ones(4), 0.1)
    assert logs["clip_frac"] == pytest.approx(0.5)
    assert logs["approx_kl"] == pytest.approx(float((0.5 * lp_new**2).mean()), rel=1e-6)
    with pytest.raises(ValueError, match="advantages has shape"):
        grpo_policy_loss(lp_new, lp_old, torch.ones(3), 0.1)
    with pytest.raises(ValueError, match="clip_range"):
        grpo_policy_loss(lp_new, lp_old, torch.ones(4), 0.0)


def test_group_advantages_match_numpy_per_group():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.2, 0.2, 0.2, 0.2, 0.9, 0.1, 0.5, 0.3])
    adv = group_advantages(r, 4, eps=1e-6).numpy()
    for g in range(3):
        x = r.numpy()[4 * g : 4 * g + 4]
        np.testing.assert_allclose(
            adv[4 * g : 4 * g + 4], (x - x.mean()) / (x.std() + 1e-6), rtol=1e-5, atol=1e-6
        )
    assert np.all(adv[4:8] == 0)  # equal rewards carry no signal
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(r, 5)


def test_group_advantages_leave_failed_rollouts_out():
    """A rollout without a verdict (valid False) gets advantage 0 and stays out of its group's statistics:
    the others get what numpy gives on the scored rewards alone."""
    r = torch.tensor([0.9, 0.8, 0.0, 0.85, 0.3, 0.0, 0.0, 0.0])
    valid = torch.tensor([True, True, False, True, True, False, False, False])
    adv = group_advantages(r, 4, eps=1e-6, valid=valid).numpy()
    x = np.array([0.9, 0.8, 0.85])
    np.testing.assert_allclose(adv[[0, 1, 3]], (x - x.mean()) / (x.std() + 1e-6), rtol=1e-5, atol=1e-5)
    assert adv[1] < 0  # the worst scored video is pushed down, not up as with a 0.0 stand-in
    assert adv[2] == 0 and np.all(adv[4:] == 0)  # one scored video alone carries no preference
    np.testing.assert_array_equal(
        group_advantages(r, 4, valid=torch.ones(8, dtype=torch.bool)), group_advantages(r, 4)
    )
    with pytest.raises(ValueError, match="valid of shape"):
        group_advantages(r, 4, valid=valid[:4])


@pytest.mark.parametrize("scheme", ["uniform", "snr", "late"])
def test_timestep_weights_average_to_one_over_uniform_t(scheme):
    t = torch.linspace(0.0005, 0.9995, 1000)
    w = timestep_weights(t, scheme)
    assert w.min() >= 0
    assert w.mean().item() == pytest.approx(1.0, abs=2e-3)


def test_snr_weights_are_min_snr_in_x0_terms_for_rectified_flow():
    """min-SNR-5 weights the x0 loss by min(SNR, 5) (Hang et al. 2023). In rectified flow x0 = x_t - t v, so a
    velocity weight w(t) is an x0 weight w(t) / t²: w(t) = min(((1-t)/t)², 5) t² / M, with M its mean over
    U(0, 1) in closed form, (5 a³ + (1 - a)³) / 3 at a = 1 / (1 + √5) where SNR = 5. The VP v-prediction
    form min(SNR, 5) / (SNR + 1) was off by up to 1.8x across t."""
    a = 1 / (1 + math.sqrt(5))
    m = (5 * a**3 + (1 - a) ** 3) / 3
    t = torch.tensor([0.05, 0.1, 0.2, a, 0.4, 0.5, 0.7, 0.9, 0.99], dtype=torch.float64)
    expected = torch.minimum(((1 - t) / t) ** 2, torch.tensor(5.0, dtype=torch.float64)) * t**2 / m
    torch.testing.assert_close(timestep_weights(t, "snr").double(), expected, rtol=1e-5, atol=1e-6)


def test_timestep_weights_bad_scheme_names_choices():
    with pytest.raises(ValueError, match="uniform, snr, late"):
        timestep_weights(torch.zeros(2), "cosine")
