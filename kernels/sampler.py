"""Fused flow-matching sampler step: CFG combine + Euler ODE or SDE update + Gaussian log-prob.

Convention (rectified flow): x_t = (1 - t) x0 + t eps, velocity v = eps - x0 points from data to
noise; sampling steps from t to t_next < t, dt = t_next - t < 0.

    v      = v_u + g (v_c - v_u)                      (CFG, when v_uncond is given; else v = v_c)
    ODE (sigma == 0):  x_next = x + dt v,  logprob None
    SDE (sigma > 0, Flow-GRPO's discretisation of the reverse SDE with the same marginals):
        std_t  = sigma * sqrt(t / (1 - min(t, T_MAX)))        T_MAX = 0.999 keeps t = 1 finite
        mean   = x (1 + std_t^2 / (2 t) dt) + v (1 + std_t^2 (1 - t) / (2 t)) dt
        s      = std_t sqrt(-dt)
        x_next = mean + s * noise                              (noise ~ N(0, I), or x_next given)
        logprob[b] = sum over all non-batch dims of log N(x_next; mean, s^2)
                   = -0.5 sum(((x_next - mean) / s)^2) - N (log s + 0.5 log 2 pi)

t and t_next are python floats or (B,) tensors (per-sample timesteps); t must be > 0 for the SDE.
Every tensor is read once and x_next written once; math is fp32, log-prob sums are fp32.

Tiling of the Triton kernel: each sample's N = numel / B elements are split into blocks of BLOCK
elements; program (b, j) handles block j of sample b and writes its partial log-prob sum to a
(B, blocks) fp32 buffer, summed by torch afterwards: a fixed reduction order, so the log-prob is
bitwise deterministic. Block 0 adds the constant -N (log s + 0.5 log 2 pi).
"""

from __future__ import annotations

import math
import numbers
import os

import torch
import triton
import triton.language as tl

T_MAX = 0.999
# Launch tuning of the Triton kernel (measured on H200, bench/gpu_elementwise.py).
TUNING = {"block": 4096, "warps": 8}
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _per_sample(t: float | torch.Tensor, name: str, B: int, device: torch.device) -> torch.Tensor:
    """A python float or a (B,)/scalar tensor -> (B,) float64 tensor on device."""
    if isinstance(t, torch.Tensor):
        if t.dim() == 0:
            t = t.reshape(1).expand(B)
        if t.dim() != 1 or t.shape[0] != B:
            raise ValueError(f"{name}: expected a float or a ({B},) tensor, got shape {tuple(t.shape)}")
        return t.to(device=device, dtype=torch.float64)
    if not isinstance(t, numbers.Real):  # numpy.float32 too, as the kernel paths take it
        raise TypeError(f"{name}: expected a float or a ({B},) tensor, got {type(t).__name__}")
    return torch.full((B,), float(t), dtype=torch.float64, device=device)


def _check_inputs(x, v_cond, v_uncond, noise, x_next, sigma) -> None:
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x: expected a (B, ...) tensor with B > 0, got shape {tuple(x.shape)}")
    for name, t in (("v_cond", v_cond), ("v_uncond", v_uncond), ("noise", noise), ("x_next", x_next)):
        if t is None:
            continue
        if t.shape != x.shape:
            raise ValueError(f"{name}: expected x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name}: on {t.device}, expected x's device {x.device}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
    if not (sigma >= 0.0 and math.isfinite(sigma)):
        raise ValueError(f"sigma={sigma}: expected a finite value >= 0")
    if sigma == 0.0 and x_next is not None:
        raise ValueError("x_next given with sigma == 0: the ODE step is deterministic and has no log-prob")
    if noise is not None and x_next is not None:
        raise ValueError(
            "noise and x_next both given: pass one (noise samples x_next; x_next scores a given step)"
        )


def sde_coefficients(t: torch.Tensor, t_next: torch.Tensor, sigma: float) -> tuple[torch.Tensor, ...]:
    """Per-sample (a, b, s) with mean = a x + b v and x_next = mean + s noise (see module doc)."""
    dt = t_next - t
    if sigma == 0.0:
        return torch.ones_like(t), dt, torch.zeros_like(t)
    std_t = sigma * torch.sqrt(t / (1.0 - t.clamp(max=T_MAX)))
    a = 1.0 + std_t**2 / (2.0 * t) * dt
    b = (1.0 + std_t**2 * (1.0 - t) / (2.0 * t)) * dt
    return a, b, std_t * torch.sqrt(-dt)


def _check_times(t: torch.Tensor, t_next: torch.Tensor, sigma: float) -> None:
    if sigma > 0.0 and not bool(((t > 0) & (t_next < t) & (t <= 1)).all()):  # NaN fails too
        raise ValueError(
            f"t={t.tolist()}, t_next={t_next.tolist()}: the SDE step needs 0 < t <= 1 and t_next < t"
        )


def flow_step_reference(
    x: torch.Tensor,
    v_cond: torch.Tensor,
    v_uncond: torch.Tensor | None = None,
    *,
    guidance: float = 1.0,
    t: float | torch.Tensor,
    t_next: float | torch.Tensor,
    sigma: float = 0.0,
    noise: torch.Tensor | None = None,
    x_next: torch.Tensor | None = None,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pure torch flow step (module doc); differentiable w.r.t. v_cond / v_uncond. Returns (x_next, logprob)."""
    _check_inputs(x, v_cond, v_uncond, noise, x_next, sigma)
    B = x.shape[0]
    tt, tn = _per_sample(t, "t", B, x.device), _per_sample(t_next, "t_next", B, x.device)
    _check_times(tt, tn, sigma)
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    bshape = (B,) + (1,) * (x.dim() - 1)
    a, b, s = (c.to(ct).view(bshape) for c in sde_coefficients(tt, tn, sigma))
    v = v_cond.to(ct)
    if v_uncond is not None and guidance != 1.0:  # guidance 1: v_cond alone (v_uncond plays no part)
        vu = v_uncond.to(ct)
        v = vu + guidance * (v - vu)
    mean = a * x.to(ct) + b * v
    if sigma == 0.0:
        return mean.to(x.dtype), None
    if x_next is None:
        if noise is None:
            noise = torch.randn_like(x, dtype=ct)
        x_next = (mean + s * noise.to(ct)).to(x.dtype)
    z = (x_next.to(ct) - mean) / s
    n = x[0].numel()
    # reshape, not flatten(1): x of shape (B,) (one element per sample) has no dim 1
    logprob = -0.5 * z.pow(2).reshape(B, -1).sum(1) - n * (torch.log(s.flatten()) + _HALF_LOG_2PI)
    return x_next, logprob.to(torch.float32) if ct == torch.float32 else logprob


@triton.jit
def _flow_step_kernel(
    x_ptr,
    vc_ptr,
    vu_ptr,
    noise_ptr,
    xn_ptr,
    out_ptr,
    part_ptr,
    t_ptr,
    tn_ptr,
    t_val,
    tn_val,
    guidance,
    sigma,
    N,
    n_blocks,
    HAS_UNCOND: tl.constexpr,
    MODE: tl.constexpr,
    PER_SAMPLE_T: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One block of one sample. MODE 0: ODE x + dt v. MODE 1: SDE mean + s noise, log-prob partial.
    MODE 2: log-prob partial of the given x_next (no store)."""
    j = tl.program_id(0)
    b = tl.program_id(1)
    if PER_SAMPLE_T:
        t = tl.load(t_ptr + b).to(tl.float32)
        tn = tl.load(tn_ptr + b).to(tl.float32)
    else:
        t = t_val
        tn = tn_val
    dt = tn - t
    # N (one sample's elements) can pass 2^31: the block's start in int64, offsets within the block int32
    start = j.to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    mask = offs < tl.minimum(N - start, BLOCK).to(tl.int32)
    base = b.to(tl.int64) * N + start
    v = tl.load(vc_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        vu = tl.load(vu_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        v = vu + guidance * (v - vu)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    if MODE == 0:
        tl.store(out_ptr + base + offs, (x + dt * v).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        var_t = sigma * sigma * t / (1.0 - tl.minimum(t, 0.999))  # std_t^2; 0.999 == T_MAX
        a = 1.0 + var_t / (2.0 * t) * dt
        c = (1.0 + var_t * (1.0 - t) / (2.0 * t)) * dt
        s = tl.sqrt(var_t * -dt)
        mean = a * x + c * v
        if MODE == 1:
            z = tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            xn = (mean + s * z).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + base + offs, xn, mask=mask)
            z = (xn.to(tl.float32) - mean) / s  # score the stored (rounded) sample, as the reference does
        else:
            z = (tl.load(xn_ptr + base + offs, mask=mask, other=0.0).to(tl.float32) - mean) / s
        z = tl.where(mask, z, 0.0)
        part = -0.5 * tl.sum(z * z, axis=0)
        if j == 0:
            part -= N * (tl.log(s) + 0.9189385332046727)  # 0.5 log(2 pi)
        tl.store(part_ptr + b * n_blocks + j, part)


def _flow_step_triton(x, v_cond, v_uncond, guidance, t, t_next, sigma, noise, x_next):
    """Launch the kernel on contiguous (B, N) views; per-sample times stay on device (no sync)."""
    B = x.shape[0]
    N = x.numel() // B
    x_, vc = x.contiguous(), v_cond.contiguous()
    vu = v_uncond.contiguous() if v_uncond is not None else vc
    mode = 0 if sigma == 0.0 else (2 if x_next is not None else 1)
    if mode == 1 and noise is None:
        noise = torch.randn_like(x_)
    nz = noise.contiguous() if noise is not None else x_
    xn = x_next.contiguous() if x_next is not None else x_
    out = torch.empty_like(x_) if mode != 2 else xn
    BLOCK = TUNING["block"] if N >= TUNING["block"] else triton.next_power_of_2(max(N, 16))
    n_blocks = triton.cdiv(N, BLOCK)
    part = torch.empty((B, n_blocks), device=x.device, dtype=torch.float32) if mode else out
    per_sample = isinstance(t, torch.Tensor) or isinstance(t_next, torch.Tensor)
    tt = _per_sample(t, "t", B, x.device).float() if per_sample else x_
    tn = _per_sample(t_next, "t_next", B, x.device).float() if per_sample else x_
    _flow_step_kernel[(n_blocks, B)](
        x_,
        vc,
        vu,
        nz,
        xn,
        out,
        part,
        tt,
        tn,
        0.0 if per_sample else float(t),
        0.0 if per_sample else float(t_next),
        float(guidance),
        float(sigma),
        N,
        n_blocks,
        HAS_UNCOND=v_uncond is not None,
        MODE=mode,
        PER_SAMPLE_T=per_sample,
        BLOCK=BLOCK,
        num_warps=TUNING["warps"] if BLOCK >= 4096 else 4,
    )
    out = out.view(x.shape)
    return out, (part.sum(1) if mode else None)


def _cuda_fits(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """The CUDA kernel takes one I/O dtype (fp32/fp16/bf16) and contiguous tensors; else Triton runs."""
    ok = x.dtype in (torch.float32, torch.float16, torch.bfloat16) and x.is_contiguous()
    return ok and all(o is None or (o.dtype == x.dtype and o.is_contiguous()) for o in others)


def _check_float_times(t, t_next, sigma: float, B: int) -> None:
    """Validate times held on the host (python floats, CPU tensors: bad ones gave NaN where the torch path
    raises); times on a GPU are not checked (that would sync the device), a host t beside them is."""
    on_gpu = [isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in (t, t_next)]
    if not isinstance(t, torch.Tensor) and not isinstance(t_next, torch.Tensor):
        if sigma > 0.0 and not (0.0 < t <= 1.0 and t_next < t):
            raise ValueError(f"t={t}, t_next={t_next}: the SDE step needs 0 < t <= 1 and t_next < t")
    elif not any(on_gpu):
        cpu = torch.device("cpu")
        _check_times(_per_sample(t, "t", B, cpu), _per_sample(t_next, "t_next", B, cpu), sigma)
    elif sigma > 0.0 and not on_gpu[0]:  # t on the host, t_next on a GPU: t's range
        tt = _per_sample(t, "t", B, torch.device("cpu"))
        if not bool(((tt > 0) & (tt <= 1)).all()):
            raise ValueError(f"t={tt.tolist()}: the SDE step needs 0 < t <= 1 and t_next < t")


def flow_step(
    x: torch.Tensor,
    v_cond: torch.Tensor,
    v_uncond: torch.Tensor | None = None,
    *,
    guidance: float = 1.0,
    t: float | torch.Tensor,
    t_next: float | torch.Tensor,
    sigma: float = 0.0,
    noise: torch.Tensor | None = None,
    x_next: torch.Tensor | None = None,
    backend: str = "triton",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One sampler step from t to t_next (module doc) -> (x_next, logprob (B,) float32 or None).

    x_next: score a given transition instead of sampling one (RL ratios). When an input (a velocity,
    tensor times, guidance or sigma) requires grad the differentiable torch path runs whatever the backend.
    backend: "triton", "cuda" (kernels._C; Triton runs instead when it is not built or has no code for
    the GPU's architecture, the device is not CUDA, or the tensors mix dtypes / are not contiguous) or "torch".
    """
    if backend not in ("triton", "cuda", "torch"):
        raise ValueError(f"backend={backend!r}: expected 'triton', 'cuda' or 'torch'")
    # v_uncond + 1 (v_cond - v_uncond) is v_cond: the unconditional velocity plays no part
    if guidance == 1.0:
        # checked before it is dropped: a wrong one is a caller's bug whatever the guidance
        _check_inputs(x, v_cond, v_uncond, noise, x_next, sigma)
        v_uncond = None
    # tensor times, guidance and sigma too: the kernels gave them no gradient, silently
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(v, torch.Tensor) and v.requires_grad
        for v in (x, v_cond, v_uncond, x_next, noise, t, t_next, guidance, sigma)
    )
    on_triton = x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "torch" or needs_grad or x.dtype == torch.float64 or not on_triton:
        return flow_step_reference(
            x,
            v_cond,
            v_uncond,
            guidance=guidance,
            t=t,
            t_next=t_next,
            sigma=sigma,
            noise=noise,
            x_next=x_next,
        )
    _check_inputs(x, v_cond, v_uncond, noise, x_next, sigma)
    _check_float_times(t, t_next, sigma, x.shape[0])
    if backend == "cuda" and x.is_cuda and _cuda_fits(x, v_cond, v_uncond, noise, x_next):
        from kernels import cuda as _cuda

        if _cuda.available(x.device):
            return _cuda.flow_step(
                x,
                v_cond,
                v_uncond,
                guidance=guidance,
                t=t,
                t_next=t_next,
                sigma=sigma,
                noise=noise,
                x_next=x_next,
            )
    return _flow_step_triton(x, v_cond, v_uncond, guidance, t, t_next, sigma, noise, x_next)
