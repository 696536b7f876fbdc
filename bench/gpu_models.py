"""DiT training-step throughput: forward + backward + fused AdamW, bf16, tokens/s and MFU.

Cases are a list (HunyuanVideo-1.5 and others append theirs): each builds our model with a given
attention backend and, as the baseline, the diffusers model with the same config and weights, on the
same input. MFU = 3 x forward matmul FLOPs (the model's ``flops_per_token``) / time / peak, with the
peak measured as a bf16 8192^3 matmul in the same run.

FP8 providers (a case's ``fp8_providers``, the Wan-1.3B case: issue 13's goal, FP8 linears + FP8
attention >= 1.3x the bf16 step): the same model and step with FP8 linears (engine.precision.apply_fp8,
torchao or Transformer Engine) and/or FP8 self-attention in every block
(engine.precision.apply_attention_precision: kernels.attention_fp8, "_all": dP and dQ/dK in FP8 too; or
"te_fp8attn": cuDNN's FP8 attention through TE, model.fp8_attention_backend "te"),
ratio vs ``ours_triton``, the bf16 step. MFU stays on the bf16 peak, so the rows compare on one scale.
A missing backend (torchao, TE, an FP8 attention kernel for this device/dtype) or a spent time budget
is an "error" record whose message starts with "skipped:" (extra skipped=True); other failures are
plain error records.

Compiled providers (opt-in: ``GPU_MODELS_COMPILE=1``, each compile costs tens of seconds, more than the
module's 90 s in bench.gpu_check allows with everything else; they run after the FP8 providers):
``ours_<backend>+compile`` and
``diffusers+compile``, every block ``torch.compile``d as engine.parallel.apply_compile does (our kernels are
custom ops, so a block stays one graph); ratios vs the eager diffusers step, and ``diffusers+compile`` is
the baseline a compiled comparison should use.

    python -m bench.gpu_models [--quick]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bench.common import error_record, module_budget, record

DTYPE = torch.bfloat16
# (provider, FP8 linear backend "none" | "torchao" | "te", FP8 self-attention: None (bf16), "default"
# (our kernel with the models' default: dV and dP in FP8), "all" (ours, dV, dP, dQ/dK in FP8) or "te" (cuDNN's
# FP8 attention through TE, model.fp8_attention_backend "te")), in the order they run (most wanted first)
FP8_PROVIDERS = (
    ("ours_te_fp8attn", "none", "te"),
    ("ours_fp8_te+te_fp8attn", "te", "te"),
    ("ours_fp8_torchao+fp8attn", "torchao", "default"),
    ("ours_fp8_torchao+fp8attn_all", "torchao", "all"),
    ("ours_fp8attn", "none", "default"),
    ("ours_fp8_torchao", "torchao", None),
    ("ours_fp8_te+fp8attn", "te", "default"),
)
FP8_QUICK = ("ours_fp8_torchao+fp8attn",)
# no FP8 provider starts after this many seconds of the module (GPU_MODULE_TIMEOUT: 150 s; above that,
# the limit less 60 s: bench.common.module_budget)
FP8_BUDGET_S = 90.0


@dataclass
class Case:
    """One benchmark case: a shape, our providers, and the diffusers baseline."""

    name: str
    build_ours: Callable[[str], torch.nn.Module]  # attention backend -> our model (bf16)
    build_diffusers: Callable[
        [torch.nn.Module], torch.nn.Module
    ]  # our model -> diffusers model, same weights
    inputs: Callable[[], dict]  # kwargs of forward(), on the case's device
    fwd_flops_per_token: float  # forward matmul FLOPs per video token
    tokens: int
    backends: tuple[str, ...] = ("triton", "sdpa")
    extra: dict = field(default_factory=dict)
    # FP8 variants of build_ours("triton"), see FP8_PROVIDERS; fp8_min_features: PrecisionConfig's (default)
    fp8_providers: tuple[tuple[str, str, str | None], ...] = ()
    fp8_min_features: int = 256


def model_builders(model_cls: type, diffusers_cls: str, cfg, device: str) -> tuple[Callable, Callable]:
    """(build_ours(backend), build_diffusers(ours)) for a Case: our ``model_cls(cfg)`` with that attention
    backend (seed 0, bf16), and the diffusers class named ``diffusers_cls`` with the same config and weights."""

    def build_ours(backend: str) -> torch.nn.Module:
        torch.manual_seed(0)
        with torch.device(device):
            return model_cls(dataclasses.replace(cfg, attention_backend=backend)).to(DTYPE)

    def build_diffusers(ours: torch.nn.Module) -> torch.nn.Module:
        import diffusers

        with torch.device(device):
            model = getattr(diffusers, diffusers_cls)(**cfg.to_diffusers_config())
        model.load_state_dict(ours.to_diffusers_state_dict())
        return model.to(DTYPE)

    return build_ours, build_diffusers


def _wan_case(
    flavour: str,
    num_layers: int,
    latent: tuple[int, int, int, int],
    text_len: int,
    *,
    device: str = "cuda",
    fp8_providers: tuple = (),
    fp8_min_features: int = 256,
    **overrides,
) -> Case:
    """Wan T2V at a flavour's dims with ``num_layers`` blocks, B=1, latent (C, F, H, W), text_len tokens."""
    from models.wan import WanConfig, WanModel

    C, Fr, H, W = latent
    cfg = WanConfig.flavour(flavour, num_layers=num_layers, **overrides)
    tokens = Fr * (H // 2) * (W // 2)
    with torch.device("meta"):
        fwd_flops = WanModel(cfg).flops_per_token(tokens, text_len)

    build_ours, build_diffusers = model_builders(WanModel, "WanTransformer3DModel", cfg, device)

    def inputs() -> dict:
        g = torch.Generator(device).manual_seed(0)
        shape = (1, text_len, cfg.text_dim)
        return dict(
            hidden_states=torch.randn(1, C, Fr, H, W, device=device, dtype=DTYPE, generator=g),
            timestep=torch.tensor([500.0], device=device),
            encoder_hidden_states=torch.randn(shape, device=device, dtype=DTYPE, generator=g),
        )

    name = f"wan{flavour}-{num_layers}blk-{Fr}x{H}x{W}"
    extra = dict(flavour=flavour, num_layers=num_layers, text_len=text_len)
    return Case(
        name, build_ours, build_diffusers, inputs, fwd_flops, tokens, extra=extra,
        fp8_providers=fp8_providers, fp8_min_features=fp8_min_features,
    )  # fmt: skip


def cases() -> list[Case]:
    """Wan2.1-1.3B, 4 of 30 blocks, B=1, 480p x 81 frames (latent 21 x 60 x 104 = 32,760 tokens), text 512;
    with the FP8 providers."""
    return [_wan_case("1.3B", 4, (16, 21, 60, 104), 512, fp8_providers=FP8_PROVIDERS)]


def peak_bf16_flops() -> float:
    """Measured dense bf16 matmul rate (8192^3) in FLOP/s."""
    a = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    b = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    sec = _time(lambda: a @ b, warmup=3, iters=10)
    return 2 * 8192**3 / sec


def _time(fn: Callable[[], object], *, warmup: int, iters: int) -> float:
    """Median seconds per call of fn (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _train_step_fn(
    model: torch.nn.Module,
    kwargs: dict,
    diffusers: bool,
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Callable[[], None]:
    """One training step; the forward runs under ``forward_context()`` (TE's FP8 autocast, FP8 attention
    backward options)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=next(model.parameters()).is_cuda)

    def step() -> None:
        with forward_context():
            out = model(**kwargs, return_dict=False)[0] if diffusers else model(**kwargs)
        out.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _measure(
    case: Case,
    provider: str,
    model,
    diffusers: bool,
    peak: float,
    quick: bool,
    *,
    baseline: str | None = "diffusers",
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    **more_extra,
) -> list[dict]:
    kwargs = case.inputs()
    step = _train_step_fn(model, kwargs, diffusers, forward_context)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sec = _time(step, warmup=1 if quick else 2, iters=2 if quick else 4)
    flops = 3 * case.fwd_flops_per_token * case.tokens
    base = None if provider == "diffusers" else baseline
    mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    extra = dict(ms=sec * 1e3, tflops=flops / sec / 1e12, peak_tflops=peak / 1e12, **case.extra, **more_extra)
    return [
        record(
            "models.train_step",
            case.name,
            provider,
            "tokens_per_s",
            case.tokens / sec,
            baseline=base,
            **extra,
        ),
        record("models.train_step", case.name, provider, "mfu", flops / sec / peak, baseline=base, **extra),
        record(
            "models.train_step",
            case.name,
            provider,
            "peak_mem_gb",
            mem,
            higher_is_better=False,
            baseline=base,
        ),
    ]


def _error(case: str, provider: str, e: BaseException) -> dict:
    return error_record("models.train_step", case, provider, e)


def _skipped(case: str, provider: str, reason: str) -> dict:
    """A provider that could not run here (missing backend, time budget): the reason, never a crash."""
    return record(
        "models.train_step", case, provider, "error", 0.0, message=f"skipped: {reason}"[:800], skipped=True
    )


class _Skip(Exception):
    """Raised by _fp8_model when a backend is missing; becomes a skipped record."""


def _fp8_model(case: Case, linears: str, attn: str | None):
    """(our bf16 model with FP8 linears / FP8 self-attention applied, forward context factory)."""
    from engine.config import ModelConfig, PrecisionConfig
    from engine.precision import FP8UnavailableError, apply_attention_precision, apply_fp8, fp8_context
    from kernels.attention_fp8 import fp8_backward_products, fp8_unsupported_reason

    model = case.build_ours("triton")
    contexts = []
    if attn == "te":
        from kernels.te_loader import import_te

        try:
            import_te()
        except (ImportError, RuntimeError, OSError) as e:
            raise _Skip(f"Transformer Engine is not usable here: {e}") from e
        apply_attention_precision(
            model,
            ModelConfig(attention_precision="fp8", fp8_attention_backend="te", fp8_attention_skip_blocks=[]),
        )
    elif attn is not None:
        attn_mod = next(m for m in model.blocks.modules() if hasattr(m, "attention_precision"))
        head_dim = attn_mod.out.in_features // attn_mod.heads
        probe = torch.empty(1, 1, 1, head_dim, device=next(model.parameters()).device, dtype=DTYPE)
        reason = fp8_unsupported_reason(probe)
        if reason is not None:
            raise _Skip(f"FP8 attention would fall back to bf16: {reason}")
        apply_attention_precision(model, ModelConfig(attention_precision="fp8", fp8_attention_skip_blocks=[]))
        if attn == "all":
            contexts.append(lambda: fp8_backward_products(dp=True, dqdk=True))
    if linears != "none":
        prec = PrecisionConfig(fp8=linears, fp8_min_features=case.fp8_min_features)
        try:
            apply_fp8(model, prec)
            if linears == "te":
                contexts.append(lambda: fp8_context(prec))
        except FP8UnavailableError as e:
            raise _Skip(str(e)) from e

    def forward_context() -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        for c in contexts:
            stack.enter_context(c())
        return stack

    return model, forward_context


def _run_fp8_providers(case: Case, peak: float, quick: bool, deadline: float) -> list[dict]:
    """The case's FP8 providers, ratios vs ours_triton (the bf16 step); each may be skipped with a reason."""
    recs = []
    for provider, linears, attn in case.fp8_providers:
        if quick and provider not in FP8_QUICK:
            continue
        if time.time() > deadline:
            recs.append(_skipped(case.name, provider, "time budget"))
            continue
        model = None
        try:
            model, ctx = _fp8_model(case, linears, attn)
            extra = dict(fp8_linears=linears, fp8_attention=attn or "none")
            recs += _measure(
                case,
                provider,
                model,
                False,
                peak,
                quick,
                baseline="ours_triton",
                forward_context=ctx,
                **extra,
            )
        except _Skip as e:
            recs.append(_skipped(case.name, provider, str(e)))
        except Exception as e:  # a failing provider is a record, never a crash
            recs.append(_error(case.name, provider, e))
        del model
        _empty_cache()
    return recs


COMPILE_KWARGS: dict = {}  # torch.compile options of the compiled providers (Inductor by default)


def _compile_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile each block in place (ours: ``blocks``; diffusers: ``blocks`` or ``transformer_blocks``)."""
    blocks = getattr(model, "blocks", None) or model.transformer_blocks
    for block in blocks:
        block.compile(**COMPILE_KWARGS)
    return model


def _run_diffusers(
    case: Case, provider: str, ours, peak: float, quick: bool, compile_blocks: bool
) -> list[dict]:
    """The diffusers model with our model's weights (built from ``ours``, which the caller then drops)."""
    try:
        if ours is None:
            raise RuntimeError("our model could not be built; no weights for the baseline")
        theirs = case.build_diffusers(ours)
        return _measure(
            case, provider, _compile_blocks(theirs) if compile_blocks else theirs, True, peak, quick
        )
    except Exception as e:  # a failing provider is a record, never a crash
        return [_error(case.name, provider, e)]
    finally:
        _empty_cache()


def _run_compiled(case: Case, peak: float) -> list[dict]:
    """``ours_<last backend, sdpa>+compile`` and ``diffusers+compile`` (GPU_MODELS_COMPILE=1)."""
    recs, ours = [], None
    provider = f"ours_{case.backends[-1]}+compile"
    try:
        ours = case.build_ours(case.backends[-1])
        recs += _measure(case, provider, _compile_blocks(ours), False, peak, False)
    except Exception as e:  # a failing provider is a record, never a crash
        recs.append(_error(case.name, provider, e))
    return recs + _run_diffusers(case, "diffusers+compile", ours, peak, False, compile_blocks=True)


def _run_case(case: Case, peak: float, quick: bool, deadline: float = float("inf")) -> list[dict]:
    recs = []
    backends = case.backends[:1] if quick else case.backends
    ours = None
    for backend in backends:
        try:
            ours = case.build_ours(backend)
            recs += _measure(case, f"ours_{backend}", ours, False, peak, quick)
        except Exception as e:  # a failing provider is a record, never a crash
            recs.append(_error(case.name, f"ours_{backend}", e))
        _empty_cache()
    recs += _run_diffusers(case, "diffusers", ours, peak, quick, compile_blocks=False)
    del ours
    recs += _run_fp8_providers(case, peak, quick, deadline)  # before the compiled ones, which cost minutes
    if os.environ.get("GPU_MODELS_COMPILE") == "1" and not quick:
        recs += _run_compiled(case, peak)
    return recs


def run_cases(module: str, make_cases: Callable[[], list[Case]], quick: bool) -> list[dict]:
    """The peak matmul rate, then records per (case, provider) of ``make_cases()``; ``module`` names the
    module's own records (no device, wall time)."""
    if not torch.cuda.is_available():
        return [record(f"{module}.module", "-", "-", "error", 0.0, message="no CUDA device")]
    t0 = time.time()
    recs = []
    try:
        peak = peak_bf16_flops()
        recs.append(record("models.peak_matmul", "bf16-8192", "torch", "tflops", peak / 1e12))
    except Exception as e:  # a failure is a record, never a crash
        peak = 989e12  # H100/H200 dense bf16 spec
        recs.append(record("models.peak_matmul", "bf16-8192", "torch", "error", 0.0, message=str(e)[:800]))
    for case in make_cases():
        try:
            recs += _run_case(case, peak, quick, deadline=t0 + module_budget(FP8_BUDGET_S, reserve=60.0))
        except Exception as e:
            recs.append(_error(case.name, "-", e))
    recs.append(record(f"{module}.module", "-", "-", "wall_s", time.time() - t0, higher_is_better=False))
    return recs


def run(quick: bool = False) -> list[dict]:
    """Records per (case, provider): tokens/s and MFU (ratios vs diffusers), peak memory; quick: one backend."""
    return run_cases("models", cases, quick)


if __name__ == "__main__":
    from bench.common import add_ratios, module_args

    args = module_args(__doc__)

    print(json.dumps(add_ratios(run(quick=args.quick)), indent=1))
