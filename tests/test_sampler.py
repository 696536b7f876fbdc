"""flow_step vs independent math: analytic Euler, torch.distributions.Normal log-densities, CFG."""

import math

import pytest
import torch
from torch.distributions import Normal

from kernels.sampler import T_MAX, flow_step, flow_step_reference

SHAPES = [(3, 4, 5, 7), (2, 3, 1500)]  # odd sizes; the second spans two kernel blocks
BACKENDS = ["torch", "triton"]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}


def _tensors(shape, dtype, device, n=4):
    return [torch.randn(shape, device=device).to(dtype) for _ in range(n)]


def _flowgrpo_mean_std(x, v, t, t_next, sigma):
    """Flow-GRPO's SDE step written out independently, float64, t as python floats."""
    dt = t_next - t
    std_t = sigma * math.sqrt(t / (1 - min(t, T_MAX)))
    mean = x * (1 + std_t**2 / (2 * t) * dt) + v * (1 + std_t**2 * (1 - t) / (2 * t)) * dt
    return mean, std_t * math.sqrt(-dt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_ode_is_euler_with_cfg(backend, dtype, shape, device):
    x, vc, vu, _ = _tensors(shape, dtype, device)
    g, t, tn = 4.5, 0.8, 0.65
    out, lp = flow_step(x, vc, vu, guidance=g, t=t, t_next=tn, backend=backend)
    v = vu.double() + g * (vc.double() - vu.double())
    want = x.double() + (tn - t) * v
    assert lp is None and out.dtype == dtype and out.shape == x.shape
    # fp16 output: one rounding of the exact value
    torch.testing.assert_close(out.double(), want.to(dtype).double(), **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_guidance_one_ignores_the_unconditional_velocity(backend, device):
    """guidance 1 is the conditional velocity alone: the step equals the one without v_uncond, bit for bit,
    even when v_uncond holds NaN (vu + 1 * (vc - vu) rounds differently, and carries a NaN)."""
    x, vc, vu, _ = _tensors(SHAPES[0], torch.float32, device)
    noise = torch.randn_like(x)
    for sigma in (0.0, 0.7):
        alone, lp = flow_step(x, vc, t=0.8, t_next=0.65, sigma=sigma, noise=noise, backend=backend)
        with_nan, lp2 = flow_step(x, vc, torch.full_like(vu, float("nan")), guidance=1.0, t=0.8, t_next=0.65,
                                  sigma=sigma, noise=noise, backend=backend)  # fmt: skip
        assert torch.equal(alone, with_nan) and (lp is None or torch.equal(lp, lp2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_sde_sample_and_logprob_match_normal(backend, dtype, shape, device):
    x, vc, vu, noise = _tensors(shape, dtype, device)
    g, t, tn, sigma = 3.0, 0.7, 0.6, 0.8
    out, lp = flow_step(x, vc, vu, guidance=g, t=t, t_next=tn, sigma=sigma, noise=noise, backend=backend)
    v = vu.double() + g * (vc.double() - vu.double())
    mean, std = _flowgrpo_mean_std(x.double(), v, t, tn, sigma)
    torch.testing.assert_close(out.double(), (mean + std * noise.double()).to(dtype).double(), **TOL[dtype])
    want = Normal(mean, std).log_prob(out.double()).flatten(1).sum(1)
    assert lp.dtype == torch.float32 and lp.shape == (shape[0],)
    # fp32 sums of N terms of size ~1: relative error ~1e-6
    torch.testing.assert_close(lp.double(), want, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_times_and_given_x_next(backend, device):
    shape = (3, 2, 9, 11)
    x, vc, _, x_next = _tensors(shape, torch.float32, device)
    t = torch.tensor([0.9, 0.5, 1.0], device=device)
    tn = torch.tensor([0.8, 0.2, 0.95], device=device)
    sigma = 0.5
    _, lp = flow_step(x, vc, t=t, t_next=tn, sigma=sigma, x_next=x_next, backend=backend)
    for i in range(3):
        mean, std = _flowgrpo_mean_std(x[i].double(), vc[i].double(), t[i].item(), tn[i].item(), sigma)
        want = Normal(mean, std).log_prob(x_next[i].double()).sum()
        torch.testing.assert_close(lp[i].double(), want, atol=1e-3, rtol=1e-5)
    out, _ = flow_step(x, vc, t=t, t_next=tn, backend=backend)
    torch.testing.assert_close(out, x + (tn - t).view(3, 1, 1, 1) * vc)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprob_grad_wrt_velocity(backend, device):
    """d logprob / d v_c against the analytic gradient of a Gaussian log-density (float64)."""
    x, vc, vu, x_next = (a.double() for a in _tensors((2, 3, 5), torch.float32, device))
    vc.requires_grad_(True)
    g, t, tn, sigma = 2.0, 0.6, 0.5, 0.9
    _, lp = flow_step(x, vc, vu, guidance=g, t=t, t_next=tn, sigma=sigma, x_next=x_next, backend=backend)
    lp.sum().backward()
    v = vu + g * (vc.detach() - vu)
    mean, std = _flowgrpo_mean_std(x, v, t, tn, sigma)
    dmean_dv = (1 + (sigma**2 * t / (1 - t)) * (1 - t) / (2 * t)) * (tn - t)
    want = (x_next - mean) / std**2 * dmean_dv * g
    torch.testing.assert_close(vc.grad, want)


def test_triton_matches_reference_when_sampling_noise(device):
    """noise=None draws the same N(0, I) as torch.randn under the same seed."""
    x, vc, _, _ = _tensors((2, 33), torch.float32, device)
    torch.manual_seed(1)
    a = flow_step(x, vc, t=0.5, t_next=0.4, sigma=0.3, backend="triton")
    torch.manual_seed(1)
    b = flow_step_reference(x, vc, t=0.5, t_next=0.4, sigma=0.3)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="v_cond: expected x's shape"):
        flow_step(x, torch.randn(2, 3, 5), t=0.5, t_next=0.4, backend=backend)
    with pytest.raises(ValueError, match="t_next < t"):
        flow_step(x, x, t=0.5, t_next=0.6, sigma=0.5, backend=backend)
    with pytest.raises(ValueError, match="sigma == 0"):
        flow_step(x, x, t=0.5, t_next=0.4, x_next=x, backend=backend)
    with pytest.raises(ValueError, match=r"t: expected a float or a \(2,\) tensor"):
        flow_step(x, x, t=torch.ones(3), t_next=0.4, backend=backend)
    with pytest.raises(ValueError, match="backend="):
        flow_step(x, x, t=0.5, t_next=0.4, backend="nope")
    # guidance 1 ignores v_uncond's values, not a wrong shape
    with pytest.raises(ValueError, match="v_uncond: expected x's shape"):
        flow_step(x, x, torch.randn(2, 3), guidance=1.0, t=0.5, t_next=0.4, backend=backend)


@pytest.mark.huge
def test_sample_past_2_31_elements(monkeypatch):
    """One sample of more than 2^31 elements (a 4 GB fp16 latent): the kernel's block offsets j * BLOCK ran in
    int32 and wrapped negative past 2^31, so the tail was read and written out of bounds. Checked against the
    reference on filled windows at both ends; the rest stays untouched (unwritten pages cost no memory)."""
    import kernels.sampler as S

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setitem(S.TUNING, "block", 2**20)  # fewer interpreter programs (Triton caps a tile at 2^20)
    n, w = 2**31 + 2**22, 2**16
    x = torch.empty(1, n, dtype=torch.float16, device=dev)
    vc = torch.empty_like(x)
    for t in (x, vc):
        t[:, :w] = torch.randn(1, w, device=dev).half()
        t[:, -w:] = torch.randn(1, w, device=dev).half()
    out, _ = flow_step(x, vc, t=0.8, t_next=0.65, backend="triton")
    for sl in (slice(0, w), slice(n - w, n)):
        want, _ = flow_step_reference(x[:, sl], vc[:, sl], t=0.8, t_next=0.65)
        torch.testing.assert_close(out[:, sl], want, **TOL[torch.float16])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sde_one_element_per_sample(backend, device):
    """x of shape (B,): the torch path (also what any velocity with requires_grad runs) summed the log-prob
    over dim 1 and raised IndexError; every backend gives Normal's log-density."""
    x, vc, _, noise = _tensors((3,), torch.float32, device)
    t, tn, sigma = 0.7, 0.6, 0.8
    out, lp = flow_step(x, vc, t=t, t_next=tn, sigma=sigma, noise=noise, backend=backend)
    mean, std = _flowgrpo_mean_std(x.double(), vc.double(), t, tn, sigma)
    torch.testing.assert_close(out.double(), mean + std * noise.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp.double(), Normal(mean, std).log_prob(out.double()), atol=1e-4, rtol=1e-5)
    vg = vc.clone().requires_grad_(True)  # the differentiable path, whatever the backend
    _, lp2 = flow_step(x, vg, t=t, t_next=tn, sigma=sigma, x_next=out, backend=backend)
    torch.testing.assert_close(lp2.detach(), lp, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_wrt_per_sample_times_and_sigma(backend, device):
    """(B,) times or a sigma tensor that require grad: the kernel path returned results without a gradient
    for them, silently; d logprob / d t_next and d sigma now match float64 central differences of Normal's
    log-density."""
    x, vc, _, x_next = (a.double() for a in _tensors((2, 3, 5), torch.float32, device))
    t, tn0, sigma0 = 0.7, [0.5, 0.4], 0.6
    tn = torch.tensor(tn0, dtype=torch.float64, device=device, requires_grad=True)
    sigma = torch.tensor(sigma0, dtype=torch.float64, device=device, requires_grad=True)
    f32 = dict(x_next=x_next.float(), backend=backend)
    _, lp = flow_step(x.float(), vc.float(), t=t, t_next=tn, sigma=sigma0, **f32)
    (got_tn,) = torch.autograd.grad(lp.sum(), tn)
    _, lp = flow_step(x.float(), vc.float(), t=t, t_next=tn0[0], sigma=sigma, **f32)
    (got_sigma,) = torch.autograd.grad(lp.sum(), sigma)

    def logprob(i, tn_i, s):
        mean, std = _flowgrpo_mean_std(x[i], vc[i], t, tn_i, s)
        return Normal(mean, std).log_prob(x_next[i]).sum().item()

    h = 1e-6
    want_tn = [(logprob(i, tn0[i] + h, sigma0) - logprob(i, tn0[i] - h, sigma0)) / (2 * h) for i in range(2)]
    want_sigma = sum(
        (logprob(i, tn0[0], sigma0 + h) - logprob(i, tn0[0], sigma0 - h)) / (2 * h) for i in range(2)
    )
    tol = dict(rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(
        got_tn.double(), torch.tensor(want_tn, dtype=torch.float64, device=device), **tol
    )
    torch.testing.assert_close(got_sigma.double().item(), want_sigma, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_per_sample_times_on_the_host(backend):
    """(B,) CPU tensor times outside 0 < t <= 1, t_next < t: the kernel path returned NaN for that sample
    (std_t of t = 0 / sqrt of -dt) where the torch path raised; both raise now."""
    x = torch.randn(2, 3, 4)
    for t, tn in ((torch.tensor([0.0, 0.5]), torch.tensor([0.1, 0.3])), (torch.tensor([0.9, 0.5]), 0.6)):
        with pytest.raises(ValueError, match="the SDE step needs 0 < t <= 1 and t_next < t"):
            flow_step(x, x, t=t, t_next=tn, sigma=0.5, backend=backend)
    out, lp = flow_step(x, x, t=torch.tensor([0.9, 0.5]), t_next=0.3, sigma=0.5, backend=backend)  # valid
    assert torch.isfinite(out).all() and torch.isfinite(lp).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_float_times(backend):
    """numpy.float32 times: the Triton path took them, the torch path raised a TypeError."""
    np = pytest.importorskip("numpy")
    x, v, noise = torch.randn(3, 2, 5), torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    t, tn = np.float32(0.7), np.float32(0.55)
    got = flow_step(x, v, t=t, t_next=tn, sigma=0.6, noise=noise, backend=backend)
    want = flow_step(x, v, t=float(t), t_next=float(tn), sigma=0.6, noise=noise, backend=backend)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_bad_host_t_beside_times_on_a_gpu():
    """t on the host, t_next on a GPU: flow_step checked nothing (the GPU side would need a sync), so t = 0
    gave NaN where the torch path raises; t is checked now. NaN times passed the tensor check as well."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kernels.sampler import _check_float_times

    x, tn_host = torch.randn(2, 4), torch.full((2,), 0.3)
    with FakeTensorMode():
        tn_gpu = torch.full((2,), 0.3, device="cuda")  # a CUDA tensor without a GPU: never read
    for t in (0.0, 1.5, float("nan"), torch.tensor([0.5, 0.0]), torch.tensor([0.5, float("nan")])):
        with pytest.raises(ValueError, match="0 < t <= 1"):  # the torch path, all on the host
            flow_step_reference(x, x, t=t, t_next=tn_host, sigma=0.5)
        with pytest.raises(ValueError, match="0 < t <= 1"):
            _check_float_times(t, tn_gpu, 0.5, 2)
    _check_float_times(0.5, tn_gpu, 0.5, 2)
    _check_float_times(torch.tensor([0.5, 1.0]), tn_gpu, 0.5, 2)
    _check_float_times(0.0, tn_gpu, 0.0, 2)  # the ODE step takes any times
