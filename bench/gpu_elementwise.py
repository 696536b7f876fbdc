"""GPU benchmark of the memory-bound kernels: flow sampler step and adaLN, in GB/s.

    python -m bench.gpu_elementwise [--quick]

Providers: eager torch (the pure-torch reference), torch.compile of the same math (the baseline of
every ratio), our Triton kernel, and our CUDA kernel (kernels._C) where it exists. Bytes counted are
the unavoidable ones: every input read once and every output written once. The device's copy
bandwidth is its own record ("copy"): a 1 GiB copy (read + write), the ceiling, and a copy moving the same
bytes as a case (case name shared), the ceiling at that size.

Cases (bf16): sampler step on Wan 480p latents of a batch of 8, (8, 16, 21, 60, 104): CFG + Euler
(x, v_c, v_u read, x_next written) and CFG + SDE + log-prob (noise read too); adaLN LayerNorm +
modulation with fp32 per-sample scale/shift on (2, 32760, 1536): forward, and forward + backward.
"""

from __future__ import annotations

import json
import math
import traceback
from collections.abc import Callable

import torch

from bench.common import bench_fn, record

SAMPLER_SHAPE = (8, 16, 21, 60, 104)
ADALN_SHAPE = (2, 32760, 1536)
BASELINE = "torch_compile"


def _gbs(nbytes: int, fn: Callable[[], object]) -> float:
    return nbytes / bench_fn(fn) / 1e9


def _measure(
    records: list, name: str, case: str, provider: str, nbytes: int, fn: Callable[[], object]
) -> None:
    """Append a GB/s record, or an "error" record carrying the message; never raises."""
    try:
        value = _gbs(nbytes, fn)
        records.append(record(name, case, provider, "gb_s", value, baseline=BASELINE, bytes=nbytes))
    except Exception as e:  # a failing provider is a result, not a crash
        msg = f"{type(e).__name__}: {e}"[:1500]
        records.append(
            record(name, case, provider, "error", 0.0, message=msg, trace=traceback.format_exc()[-1500:])
        )


def copy_bandwidth(records: list, case: str = "1GiB", nbytes: int = 2**31) -> float:
    """GB/s of a device copy moving ``nbytes`` in all (half read, half written): 1 GiB copied, the
    ceiling; or the same traffic as a kernel's case, its ceiling at that size (launch and tail included)."""
    src = torch.empty(nbytes // 4, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    _measure(records, "copy", case, "torch", 2 * src.numel() * src.element_size(), lambda: dst.copy_(src))
    return records[-1]["value"]


def _euler_math(x, vc, vu, g: float, dt: float):
    """The reference's ODE math (fp32, one rounding): x + dt (v_u + g (v_c - v_u))."""
    vu32 = vu.float()
    return (x.float() + dt * (vu32 + g * (vc.float() - vu32))).to(x.dtype)


def _sde_math(x, vc, vu, noise, g: float, a: float, b: float, s: float):
    """The reference's SDE math: mean = a x + b v, x_next = mean + s noise, per-sample log-prob."""
    vu32 = vu.float()
    mean = a * x.float() + b * (vu32 + g * (vc.float() - vu32))
    xn = (mean + s * noise.float()).to(x.dtype)
    z = (xn.float() - mean) / s
    n = x[0].numel()
    return xn, -0.5 * z.pow(2).flatten(1).sum(1) - n * (math.log(s) + 0.9189385332046727)


def bench_sampler(records: list, quick: bool) -> None:
    from kernels import cuda
    from kernels.sampler import flow_step, flow_step_reference, sde_coefficients

    x, vc, vu, nz = (torch.randn(SAMPLER_SHAPE, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    g, t, tn, sigma = 5.0, 0.8, 0.75, 0.7
    tt, tnn = torch.tensor([t], dtype=torch.float64), torch.tensor([tn], dtype=torch.float64)
    a, b, s = (float(c) for c in sde_coefficients(tt, tnn, sigma))
    X = x.numel() * x.element_size()
    euler_c = torch.compile(_euler_math)
    sde_c = torch.compile(_sde_math)
    case = "wan480p-b8-bf16"
    ode = {
        "eager": lambda: flow_step_reference(x, vc, vu, guidance=g, t=t, t_next=tn),
        BASELINE: lambda: euler_c(x, vc, vu, g, tn - t),
        "triton": lambda: flow_step(x, vc, vu, guidance=g, t=t, t_next=tn, backend="triton"),
    }
    sde = {
        "eager": lambda: flow_step_reference(x, vc, vu, guidance=g, t=t, t_next=tn, sigma=sigma, noise=nz),
        BASELINE: lambda: sde_c(x, vc, vu, nz, g, a, b, s),
        "triton": lambda: flow_step(
            x, vc, vu, guidance=g, t=t, t_next=tn, sigma=sigma, noise=nz, backend="triton"
        ),
    }
    if cuda.available():
        ode["cuda"] = lambda: cuda.flow_step(x, vc, vu, guidance=g, t=t, t_next=tn)
        sde["cuda"] = lambda: cuda.flow_step(x, vc, vu, guidance=g, t=t, t_next=tn, sigma=sigma, noise=nz)
    else:
        records.append(
            record("sampler.cfg_euler", case, "cuda", "error", 0.0, message=str(cuda.load_error()))
        )
    copy_bandwidth(records, case, 4 * X)  # the Euler step's traffic: 3 reads + 1 write of X
    for provider, fn in ode.items():
        _measure(records, "sampler.cfg_euler", case, provider, 4 * X, fn)
    if quick:
        return
    for provider, fn in sde.items():
        _measure(records, "sampler.cfg_sde_logprob", case, provider, 5 * X, fn)
    from kernels import sampler

    default = dict(sampler.TUNING)
    for block, warps in ((2048, 4), (8192, 8)):  # other launch settings, to re-tune sampler.TUNING
        sampler.TUNING.update(block=block, warps=warps)
        _measure(
            records, "sampler.cfg_euler", case, f"triton[block={block},warps={warps}]", 4 * X, ode["triton"]
        )
    sampler.TUNING.update(default)


def bench_adaln(records: list, quick: bool) -> None:
    from kernels.adaln import adaln_modulate, adaln_modulate_reference

    x = torch.randn(ADALN_SHAPE, device="cuda", dtype=torch.bfloat16)
    scale, shift = (0.1 * torch.randn(ADALN_SHAPE[0], 1, ADALN_SHAPE[2], device="cuda") for _ in range(2))
    dy = torch.randn_like(x)
    X = x.numel() * x.element_size()
    case = "wan1.3b-480p-layer-bf16"
    copy_bandwidth(records, case, 2 * X)  # the forward's traffic: read x, write y
    ref_c = torch.compile(adaln_modulate_reference)
    fwd = {
        "eager": lambda: adaln_modulate_reference(x, scale, shift),
        BASELINE: lambda: ref_c(x, scale, shift),
        "triton": lambda: adaln_modulate(x, scale, shift, backend="triton"),
    }
    for provider, fn in fwd.items():
        _measure(records, "adaln.fwd", case, provider, 2 * X, fn)  # read x, write y
    if quick:
        return
    _adaln_fwd_variants(records, case, X, fwd["triton"])
    xg, sg, hg = (t.detach().clone().requires_grad_(True) for t in (x, scale, shift))

    def fwd_bwd(f):
        def run():  # autograd.grad, not .backward: no .grad accumulation pass (3 more x-sized transfers)
            torch.autograd.grad(f(xg, sg, hg), (xg, sg, hg), dy)

        return run

    full = {
        "eager": fwd_bwd(adaln_modulate_reference),
        BASELINE: fwd_bwd(ref_c),
        "triton": fwd_bwd(lambda *a: adaln_modulate(*a, backend="triton")),
    }
    for provider, fn in full.items():
        _measure(records, "adaln.fwd_bwd", case, provider, 5 * X, fn)  # fwd: x, y; bwd: x, dy, dx
    _adaln_tuning_variants(records, case, X, fwd_bwd(lambda *a: adaln_modulate(*a, backend="triton")))


def _adaln_fwd_variants(records: list, case: str, X: int, fn: Callable[[], object]) -> None:
    """Other launch settings of the Triton forward (67% of copy on an H200 with the default; goal 70%)."""
    from kernels import adaln

    default = dict(adaln.TUNING)
    for change in ({"fwd_progs_per_sm": 8}, {"fwd_progs_per_sm": 32}, {"tile": 8192}, {"warps": 4}):
        adaln.TUNING.update(change)
        name = ",".join(f"{k}={v}" for k, v in change.items())
        _measure(records, "adaln.fwd", case, f"triton[{name}]", 2 * X, fn)
        adaln.TUNING.update(default)


def _adaln_tuning_variants(records: list, case: str, X: int, fn: Callable[[], object]) -> None:
    """Other launch settings of the Triton backward as extra providers, to re-tune kernels/adaln.TUNING."""
    from kernels import adaln

    default = dict(adaln.TUNING)
    for bwd_progs in (8, 16):
        adaln.TUNING.update(bwd_progs_per_sm=bwd_progs)
        _measure(records, "adaln.fwd_bwd", case, f"triton[bwd_progs_per_sm={bwd_progs}]", 5 * X, fn)
    adaln.TUNING.update(default)


def run(quick: bool = False) -> list[dict]:
    """All cases; each failure becomes an "error" record. About 30 s on an H200 (quick: ~10 s)."""
    records: list[dict] = []
    if not torch.cuda.is_available():
        return [record("elementwise", "-", "-", "error", 0.0, message="no CUDA device")]
    for part in (copy_bandwidth, bench_sampler, bench_adaln):
        try:
            part(records) if part is copy_bandwidth else part(records, quick)
        except Exception as e:
            records.append(
                record(
                    f"elementwise.{part.__name__}",
                    "-",
                    "-",
                    "error",
                    0.0,
                    message=f"{type(e).__name__}: {e}"[:1500],
                    trace=traceback.format_exc()[-1500:],
                )
            )
        torch.cuda.empty_cache()
    copy = next((r["value"] for r in records if r["name"] == "copy" and r["metric"] == "gb_s"), None)
    for r in records:
        if copy and r["metric"] == "gb_s" and r["name"] != "copy":
            r["extra"]["fraction_of_copy"] = r["value"] / copy
    return records


if __name__ == "__main__":
    from bench.common import add_ratios, module_args

    args = module_args(__doc__)

    print(json.dumps(add_ratios(run(quick=args.quick)), indent=1))
