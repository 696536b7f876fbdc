"""FP8 attention: speed (GPU) and accuracy (GPU kernel, or the CPU emulation) at video DiT shapes.

Speed: forward and forward+backward TFLOP/s of kernels.attention_fp8 (bwd dP in bf16, and with dP in FP8;
with GPU_FP8_BWD_ALL=1 also, forward+backward only, dQ/dK in FP8 and all five backward products in FP8) vs
our bf16 Triton kernel and torch SDPA (cuDNN) in the same run; where Transformer Engine imports, also
cuDNN's own FP8 attention through TE: ``te_fp8`` is kernels.attention's backend "te" with precision "fp8"
(DelayedScaling with fp8_dpa, every scale set from the call's tensors: kernels.attention._te_fp8), and
``te_fp8_dpa`` the same kernel as TE leaves it (DelayedScaling with fp8_dpa: every scale from the amax seen
before, 1 at the first call), with their accuracy beside ours (te_fp8_dpa's after 3 calls too, and te_fp8's
with the output gradient scaled by 1e-6, a training step's size); FLOPs 4 B H S^2 D forward, 3.5x that
forward+backward. Accuracy: relative L2 error and cosine similarity of out, dq, dk, dv against an fp32
reference on activations with outliers (:func:`video_activations`), for bf16 and the FP8 variants.

    python -m bench.gpu_attention_fp8 [--quick]        # GPU: records as JSON (bench.gpu_check runs run())
    python -m bench.gpu_attention_fp8 --accuracy       # CPU: the accuracy table with the emulation

Environment: GPU_FP8_SHAPES (names of bench.gpu_attention.SHAPES), GPU_FP8_PROVIDERS (names of PROVIDERS;
their baselines are timed with them), GPU_FP8_ACCURACY=0 (no accuracy rows), GPU_FP8_BWD_ALL=1; each list is
checked before the CUDA check, so a typo fails a CPU rehearsal.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time

import torch

from bench.common import error_record, module_budget, record
from bench.gpu_attention import SHAPES, bench_providers

LOGIT_STD = 3.0  # spread of scale * q.k in video_activations (trained DiTs: ~2-5, max ~20-30)
# stop starting new cases past this (GPU_MODULE_TIMEOUT: 150 s; at 50 s the H100 run skipped Wan, HY; with a
# longer module limit, that limit less 60 s: bench.common.module_budget). GPU_FP8_SHAPES=hy1.5-480p-121f
# (comma-separated names of bench.gpu_attention.SHAPES) times only those shapes.
TIME_BUDGET_S = 90.0


def video_activations(
    grid: tuple[int, int, int], heads: int, head_dim: int, *, device="cpu", seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """q, k, v (1, S, H, D) fp32 shaped like a trained video DiT's, plus a (1, S, H, D) output gradient.

    q, k: RMS-normalised tokens that are smooth over the (t, h, w) grid (so RoPE attention is local and
    peaked, logits std LOGIT_STD) times a learned gain, with 4 outlier channels per head at 10x and a per-channel
    key offset (the mean that K smoothing removes); v: unit tokens with 1% outlier tokens at 20x.
    """
    g = torch.Generator().manual_seed(seed)
    T, Hh, W = grid
    S = T * Hh * W

    def smooth_field(scale: float) -> torch.Tensor:
        base = torch.randn(1, heads * head_dim, T, Hh, W, generator=g)
        base = torch.nn.functional.avg_pool3d(base, 3, stride=1, padding=1, count_include_pad=False)
        x = base.flatten(2).transpose(1, 2).reshape(1, S, heads, head_dim)  # (1, C, T, H, W) -> (1, S, H, D)
        x = x + scale * torch.randn(1, S, heads, head_dim, generator=g)
        return x / x.pow(2).mean(-1, keepdim=True).sqrt()

    gain = 1.0 + 0.3 * torch.randn(heads, head_dim, generator=g)
    out_ch = torch.randint(0, head_dim, (heads, 4), generator=g)
    gain.scatter_(1, out_ch, 10.0)  # outlier channels, shared by q and k (they come from one norm weight)
    q = smooth_field(0.3) * gain
    k = smooth_field(0.3) * gain
    logits = torch.einsum("bshd,bthd->bhst", q[:, :2048], k[:, :2048]) * head_dim**-0.5
    c = (LOGIT_STD / logits.std()).sqrt()  # calibrate the logit spread
    q, k = q * c, k * c + 2.0 * torch.randn(heads, head_dim, generator=g)  # + a per-channel key offset
    v = torch.randn(1, S, heads, head_dim, generator=g)
    hot = torch.rand(1, S, 1, 1, generator=g) < 0.01
    v = torch.where(hot, 20.0 * v, v)
    do = torch.randn(1, S, heads, head_dim, generator=g) * 1e-3
    return tuple(t.to(device) for t in (q, k, v, do))


def _fp8_round(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x quantised to ``dtype`` (torch.float8_e4m3fn / e5m2) at ``scale`` (saturating), back in x's dtype."""
    top = torch.finfo(dtype).max
    return (x * scale).clamp(-top, top).to(dtype).to(x.dtype) / scale


class _TEFP8Scheme(torch.autograd.Function):
    """cuDNN's FP8 attention as TE runs it under DelayedScaling (HYBRID), emulated in the input dtype at its
    quantisation points, with the scales kernels.attention._te_fp8 sets: Q, K, V (one scale) and softmax P
    (448) E4M3, O E4M3 at max|v|, dO E5M2 at its amax, dS E5M2 and dQ/dK/dV (one scale) E5M2 at
    te_fp8_backward_bounds. P is the exact softmax of the quantised logits (cuDNN's exponentials are fp32)."""

    @staticmethod
    def forward(ctx, q, k, v, scale):  # (B, H, S, D)
        from kernels.attention import TE_FP8_MARGIN

        e4 = torch.float8_e4m3fn
        top = torch.finfo(e4).max
        q8, k8, v8 = (_fp8_round(t, top / torch.stack([q.abs().max(), k.abs().max(), v.abs().max()]).max(), e4)
                      for t in (q, k, v))  # fmt: skip
        p = torch.softmax(scale * q8 @ k8.transpose(-1, -2), dim=-1)
        p8 = _fp8_round(p, torch.tensor(top, dtype=p.dtype), e4)
        o8 = _fp8_round(p8 @ v8, top / (TE_FP8_MARGIN * v.abs().max()), e4)
        ctx.save_for_backward(q8, k8, v8, p, p8, o8, q.abs().max(), k.abs().max(), v.norm(dim=-1).max())
        ctx.scale = scale
        return o8

    @staticmethod
    def backward(ctx, g):
        from kernels.attention import TE_FP8_MARGIN, te_fp8_backward_bounds

        q8, k8, v8, p, p8, o8, qmax, kmax, v_row = ctx.saved_tensors
        e5, sc = torch.float8_e5m2, ctx.scale
        top = torch.finfo(e5).max
        g_max = g.abs().max()
        ds_bound, dqkv_bound = te_fp8_backward_bounds(
            g_max, g.norm(dim=-1).max(), v_row, qmax, kmax, sc, q8.shape[2]
        )
        g8 = _fp8_round(g, top / g_max, e5)
        ds = p * (g8 @ v8.transpose(-1, -2) - (g8 * o8).sum(-1, keepdim=True))
        ds8 = _fp8_round(ds, top / (TE_FP8_MARGIN * ds_bound), e5)
        s = top / (TE_FP8_MARGIN * dqkv_bound)
        grads = (sc * ds8 @ k8, sc * ds8.transpose(-1, -2) @ q8, p8.transpose(-1, -2) @ g8)
        return (*(_fp8_round(t, s, e5) for t in grads), None)


def te_fp8_scheme_emulated(q, k, v, rope=None, prepare: bool = True):
    """attention(backend="te", precision="fp8") emulated on the CPU (:class:`_TEFP8Scheme`), with or without its
    pre-pass (kernels.attention._te_fp8_prepare); q, k, v (B, S, H, D)."""
    from kernels.attention import _te_fp8_prepare
    from kernels.rope import apply_rope_reference

    if rope is not None:
        q, k = apply_rope_reference(q, *rope), apply_rope_reference(k, *rope)
    scale, c = q.shape[-1] ** -0.5, 1.0
    if prepare:
        q, k, v, scale, c = _te_fp8_prepare(q, k, v, scale)
    out = _TEFP8Scheme.apply(*(t.transpose(1, 2) for t in (q, k, v)), scale)
    return out.transpose(1, 2) * c


def _variants(device: str) -> dict:
    """name -> fn(q, k, v, rope) computing in the way named (inputs in the dtype given to it)."""
    from kernels.attention import attention, attention_reference
    from kernels.attention_fp8 import attention_fp8, attention_fp8_emulated

    def emu(**kw):
        return lambda q, k, v, rope: attention_fp8_emulated(q, k, v, rope=rope, **kw)

    if device == "cuda":
        return {
            "bf16 (our kernel)": lambda q, k, v, rope: attention(q, k, v, rope=rope),
            "fp8 kernel (dV fp8)": lambda q, k, v, rope: attention_fp8(q, k, v, rope=rope),
            "fp8 kernel (dV, dP fp8)": lambda q, k, v, rope: attention_fp8(
                q, k, v, rope=rope, bwd_fp8_dp=True
            ),
            "fp8 kernel (dV, dQ/dK fp8, dS e4m3)": lambda q, k, v, rope: attention_fp8(
                q, k, v, rope=rope, bwd_fp8_dqdk=True
            ),
            "fp8 kernel (dV, dP, dQ/dK fp8, dS e4m3)": lambda q, k, v, rope: attention_fp8(
                q, k, v, rope=rope, bwd_fp8_dp=True, bwd_fp8_dqdk=True
            ),
            "fp8 emulation (dV fp8)": emu(),
            "fp8 emulation (dV, dP, dQ/dK fp8, dS e4m3)": emu(bwd_fp8=("dv", "dp", "dqdk")),
        }
    return {
        "bf16 (fp32 math)": lambda q, k, v, rope: attention_reference(q, k, v, rope=rope),
        "fp8, no K smoothing, no Hadamard": emu(smooth_k=False, rotate=False),
        "fp8, no Hadamard": emu(rotate=False),
        "fp8 (dV fp8) [kernel default]": emu(),
        "fp8 (dV, dP fp8) [bwd_fp8_dp]": emu(bwd_fp8=("dv", "dp")),
        "fp8 (dV, dQ/dK fp8, dS e4m3) [bwd_fp8_dqdk]": emu(bwd_fp8=("dv", "dqdk")),
        "fp8 (dV, dQ/dK fp8, dS e5m2)": emu(bwd_fp8=("dv", "dqdk"), ds_format="e5m2"),
        "fp8 (dV, dP, dQ/dK fp8, dS e4m3) [both]": emu(bwd_fp8=("dv", "dp", "dqdk")),
        "fp8 (dV, dP, dQ/dK fp8, dS e5m2)": emu(bwd_fp8=("dv", "dp", "dqdk"), ds_format="e5m2"),
        "te fp8 scheme [backend te] (emulated)": te_fp8_scheme_emulated,
        "te fp8 scheme without its pre-pass (emulated)": lambda q, k, v, rope: te_fp8_scheme_emulated(
            q, k, v, rope, prepare=False
        ),
    }


def te_fp8_dpa():
    """fn(q, k, v, rope=None) -> out: cuDNN's FP8 fused attention through Transformer Engine (q, k, v bf16
    (B, S, H, D); RoPE applied first by kernels.rope). TE is imported at the first call, which raises what
    importing it raises (inside a provider's try, so a TE that fails to load is an error record)."""
    from kernels.rope import apply_rope
    from kernels.te_loader import import_te, te_autocast

    modules: dict = {}  # TE, its recipe and one DotProductAttention per (heads, head dim), made once (timed)

    def fn(q, k, v, rope=None):
        if "te" not in modules:
            modules["te"] = import_te()
            from transformer_engine.common import recipe

            modules["recipe"] = recipe.DelayedScaling(fp8_dpa=True)
        te = modules["te"]
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        H, D = q.shape[2], q.shape[3]
        if (H, D) not in modules:
            modules[H, D] = te.DotProductAttention(H, D, qkv_format="bshd", attn_mask_type="no_mask")
        with te_autocast(modules["recipe"]):
            out = modules[H, D](q, k, v)
        return out.view(q.shape)

    return fn


def _errors(got, ref) -> dict:
    out = {}
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        a, b = a.double().flatten(), b.double().flatten()
        out[name] = ((a - b).norm() / b.norm()).item(), torch.nn.functional.cosine_similarity(a, b, 0).item()
    return out


def accuracy(
    grid=(4, 16, 24),
    heads: int = 2,
    head_dim: int = 128,
    device: str = "cpu",
    variants: dict | None = None,
    grad_scale: float = 1.0,
    warmup: int = 0,
) -> dict:
    """{variant: {tensor: (relative L2 error, cosine)}} vs the fp32 reference (inputs rounded to bf16), for
    ``variants`` (name -> fn(q, k, v, rope); default: :func:`_variants` of the device); the output gradient
    times ``grad_scale``; each variant first runs ``warmup`` forward+backward calls on the same inputs
    (a delayed-scaling recipe's scales come from them)."""
    from kernels.attention import attention_reference
    from kernels.rope import rope_3d_tables

    q, k, v, do = video_activations(grid, heads, head_dim, device=device)
    do = do * grad_scale
    rope = rope_3d_tables(grid, head_dim, device=device)
    lp = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = (t.to(torch.bfloat16).to(lp) for t in (q, k, v))  # same bf16-representable inputs for all

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        o = fn(*leaves, rope)
        return (o, *torch.autograd.grad(o, leaves, do.to(dtype)))

    ref = run(lambda q, k, v, rope: attention_reference(q, k, v, rope=rope), torch.float32)
    table = {}
    for name, fn in (variants or _variants(device)).items():
        dtype = torch.float32 if name.startswith("bf16 (fp32") else lp
        for _ in range(warmup):
            run(fn, dtype)
        got = run(fn, dtype)
        if name.startswith("bf16 (fp32"):  # bf16 in/out with fp32 math: round outputs like a bf16 kernel
            got = tuple(t.to(torch.bfloat16) for t in got)
        table[name] = _errors(got, ref)
    return table


def format_table(table: dict) -> str:
    lines = ["| variant | out rel.err / cos | dq | dk | dv |", "|---|---|---|---|---|"]
    for name, errs in table.items():
        cells = " | ".join(f"{e:.2e} / {c:.5f}" for e, c in errs.values())
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


# speed providers (name: baseline), :func:`_providers`; the te ones where Transformer Engine imports
PROVIDERS = {"sdpa_cudnn": None, "triton_bf16": "sdpa_cudnn", "triton_fp8": "triton_bf16",
             "triton_fp8_dp": "triton_bf16", "triton_fp8+rope": "triton_bf16", "te_fp8": "triton_bf16",
             "te_fp8_dpa": "triton_bf16"}  # fmt: skip


def selected_providers(only: str) -> set[str] | None:
    """The providers named in ``only`` (comma-separated) and their baselines, or None (all) for ''."""
    names = {n.strip() for n in only.split(",") if n.strip()}
    if not names:
        return None
    unknown = sorted(names - set(PROVIDERS))
    if unknown:
        raise ValueError(f"GPU_FP8_PROVIDERS: unknown {unknown}; expected names from {list(PROVIDERS)}")
    picked = set()
    for name in names:
        while name is not None and name not in picked:
            picked.add(name)
            name = PROVIDERS[name]
    return picked


def _providers(rope):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.attention import attention
    from kernels.attention_fp8 import attention_fp8

    def cudnn(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return attention(q, k, v, backend="sdpa")

    providers = {
        "sdpa_cudnn": (cudnn, None),
        "triton_bf16": (lambda q, k, v: attention(q, k, v), "sdpa_cudnn"),
        "triton_fp8": (lambda q, k, v: attention_fp8(q, k, v), "triton_bf16"),
        "triton_fp8_dp": (lambda q, k, v: attention_fp8(q, k, v, bwd_fp8_dp=True), "triton_bf16"),
        "triton_fp8+rope": (lambda q, k, v: attention_fp8(q, k, v, rope=rope), "triton_bf16"),
    }
    if importlib.util.find_spec("transformer_engine") is not None:  # a TE that fails to load: an error record
        providers["te_fp8"] = (
            lambda q, k, v: attention(q, k, v, backend="te", precision="fp8"),
            "triton_bf16",
        )
        providers["te_fp8_dpa"] = (te_fp8_dpa(), "triton_bf16")
    return providers


def _bwd_providers(rope):
    """Variants whose forward is triton_fp8's: measured forward+backward only, with GPU_FP8_BWD_ALL=1 (an H100
    at 3f3fc34 measured them at 0.74x / 0.78x of our bf16 kernel at LTX-2, and each autotunes kernels of its
    own, which took the time the Wan and HY shapes needed)."""
    from kernels.attention_fp8 import attention_fp8

    return {
        "triton_fp8_dqdk": (lambda q, k, v: attention_fp8(q, k, v, bwd_fp8_dqdk=True), "triton_bf16"),
        "triton_fp8_all": (
            lambda q, k, v: attention_fp8(q, k, v, bwd_fp8_dp=True, bwd_fp8_dqdk=True),
            "triton_bf16",
        ),
    }


def _accuracy_records() -> list[dict]:
    """The kernel's error vs fp32 (and the emulation's) on the GPU at a CPU-sized video shape."""
    recs = []
    try:
        for name, errs in accuracy(grid=(8, 16, 24), heads=2, device="cuda").items():
            for tensor, (err, cos) in errs.items():
                recs.append(
                    record(
                        "attention_fp8.accuracy",
                        tensor,
                        name,
                        "rel_err",
                        err,
                        higher_is_better=False,
                        cos=cos,
                    )
                )
    except Exception as e:
        recs.append(error_record("attention_fp8.accuracy", "-", "-", e))
    if importlib.util.find_spec("transformer_engine") is None:
        return recs
    from kernels.attention import attention

    def te_fp8(q, k, v, rope=None):
        return attention(q, k, v, rope=rope, backend="te", precision="fp8")

    cases = (  # (name, variant, accuracy() keywords); te_fp8_dpa() anew each time: its scales start at 1
        ("te fp8 [backend te] (cuDNN)", te_fp8, {}),
        ("te fp8 [backend te] (cuDNN), dO x 1e-6", te_fp8, dict(grad_scale=1e-6)),
        ("te fp8 dpa (cuDNN, delayed scaling), first call", te_fp8_dpa(), {}),
        ("te fp8 dpa (cuDNN, delayed scaling), after 3 calls", te_fp8_dpa(), dict(warmup=3)),
    )
    for name, fn, kw in cases:
        try:
            errs = accuracy(grid=(8, 16, 24), heads=2, device="cuda", variants={name: fn}, **kw)[name]
            for tensor, (err, cos) in errs.items():
                recs.append(record("attention_fp8.accuracy", tensor, name, "rel_err", err,
                                   higher_is_better=False, cos=cos))  # fmt: skip
        except Exception as e:
            recs.append(error_record("attention_fp8.accuracy", "-", name, e))
    return recs


def run(quick: bool = False) -> list[dict]:
    """Accuracy records, then speed for every (shape, provider, fwd | fwd_bwd); quick: the LTX-2 shape only."""
    # before the CUDA check: a misspelt shape fails a CPU rehearsal, not only the GPU run
    shapes = [s for s in os.environ.get("GPU_FP8_SHAPES", "").split(",") if s] or list(SHAPES)
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        raise ValueError(f"GPU_FP8_SHAPES: unknown {unknown}; expected names from {list(SHAPES)}")
    picked = selected_providers(os.environ.get("GPU_FP8_PROVIDERS", ""))

    def providers(rope):
        return {n: p for n, p in _providers(rope).items() if picked is None or n in picked}

    if not torch.cuda.is_available():
        return [record("attention_fp8.module", "-", "-", "error", 0.0, message="no CUDA device")]
    t0, budget = time.time(), module_budget(TIME_BUDGET_S, reserve=60.0)
    recs = _accuracy_records() if os.environ.get("GPU_FP8_ACCURACY", "1") != "0" else []
    for case in ["ltx2-512p-121f"] if quick else shapes:
        if time.time() - t0 > budget:
            recs.append(record("attention_fp8.case", case, "-", "error", 0.0, message="skipped: time budget"))
            continue
        try:
            recs += bench_providers("attention_fp8", case, SHAPES[case], providers)
            if os.environ.get("GPU_FP8_BWD_ALL") == "1":
                recs += bench_providers(
                    "attention_fp8", case, SHAPES[case], _bwd_providers, modes=("fwd_bwd",)
                )
        except Exception as e:
            recs.append(error_record("attention_fp8.case", case, "-", e))
        torch.cuda.empty_cache()
    from kernels.attention_fp8 import tuned_configs

    configs = tuned_configs()
    recs.append(
        record("attention_fp8.configs", "-", "triton_fp8", "count", float(len(configs)), configs=configs)
    )
    recs.append(record("attention_fp8.module", "-", "-", "wall_s", time.time() - t0, higher_is_better=False))
    return recs


if __name__ == "__main__":
    from bench.common import module_args

    args = module_args(__doc__, accuracy="CPU: the accuracy table with the emulation")
    if args.accuracy:
        torch.manual_seed(0)
        t0 = time.time()
        for grid in ((4, 16, 24), (8, 16, 30)):
            print(f"grid {grid} (S={grid[0] * grid[1] * grid[2]}), H=2, D=128, bf16-rounded inputs")
            print(format_table(accuracy(grid=grid)))
        print(f"({time.time() - t0:.0f} s)")
    else:
        from bench.common import add_ratios

        print(json.dumps(add_ratios(run(quick=args.quick)), indent=1))
