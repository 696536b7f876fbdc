"""CPU microbenchmark (pytest-benchmark): one toy-size Wan training step, ours vs diffusers.

pytest bench/test_bench_models.py --benchmark-only
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # kernels import Triton; on CPU it runs only interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from models.wan import WanConfig, WanModel  # noqa: E402

# Toy DiT on T2V latents: 4 channels, 5 x 16 x 16 latent (320 tokens), 16 text tokens.
CFG = dict(in_channels=4, out_channels=4, attention_backend="sdpa")


def _inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(2, 4, 5, 16, 16, generator=g),
        timestep=torch.tensor([100.0, 800.0]),
        encoder_hidden_states=torch.randn(2, 16, 64, generator=g),
    )


def _step(model: torch.nn.Module, kwargs: dict, diffusers: bool):
    out = model(**kwargs, return_dict=False)[0] if diffusers else model(**kwargs)
    out.square().mean().backward()
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.benchmark(group="wan-toy-train-step")
def test_bench_wan_toy_ours(benchmark):
    torch.manual_seed(0)
    model, kwargs = WanModel(WanConfig.flavour("toy", **CFG)), _inputs()
    out = benchmark(_step, model, kwargs, False)
    assert out.shape == kwargs["hidden_states"].shape


@pytest.mark.benchmark(group="wan-toy-train-step")
def test_bench_wan_toy_diffusers(benchmark):
    from diffusers import WanTransformer3DModel

    cfg = WanConfig.flavour("toy", **CFG)
    model, kwargs = WanTransformer3DModel(**cfg.to_diffusers_config()), _inputs()
    out = benchmark(_step, model, kwargs, True)
    assert out.shape == kwargs["hidden_states"].shape


@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_models_case_machinery_runs_on_cpu(compiled, monkeypatch):
    """bench/gpu_models.py's case code on a tiny fp32 CPU case (our Triton attention in the interpreter,
    which takes no bf16): every provider yields records, no errors; with GPU_MODELS_COMPILE=1 also the
    compiled steps (AOTAutograd graphs without Inductor's codegen here)."""
    import bench.gpu_models as gm

    monkeypatch.setattr(gm, "DTYPE", torch.float32)
    if compiled:
        monkeypatch.setenv("GPU_MODELS_COMPILE", "1")
        monkeypatch.setattr(gm, "COMPILE_KWARGS", {"backend": "aot_eager", "fullgraph": True})
    case = gm._wan_case("debug", 2, (4, 2, 8, 8), 8, device="cpu")
    recs = gm._run_case(case, peak=1e12, quick=False)
    errors = [r["extra"].get("message") for r in recs if r["metric"] == "error"]
    assert not errors, errors
    providers = {r["provider"] for r in recs if r["metric"] == "tokens_per_s"}
    want = {"ours_triton", "ours_sdpa", "diffusers"}
    assert providers == (want | {"ours_sdpa+compile", "diffusers+compile"} if compiled else want)


def test_gpu_models_fp8_providers_run_or_skip_on_cpu(monkeypatch):
    """bench/gpu_models.py's FP8 providers on a tiny fp32 CPU case (FP8 attention in the Triton
    interpreter): each yields records or a "skipped:" record naming the missing backend (TE here, for its
    linears and its FP8 attention), none fails; FP8 attention is set on every block's self-attention."""
    import bench.gpu_models as gm

    monkeypatch.setattr(gm, "DTYPE", torch.float32)  # the interpreter's FP8 path takes fp32 (not bf16)
    monkeypatch.setattr(
        gm, "FP8_QUICK", tuple(p for p, _, _ in gm.FP8_PROVIDERS)
    )  # all, with quick's 3 steps
    case = gm._wan_case(
        "debug", 2, (4, 2, 8, 8), 8, device="cpu", fp8_providers=gm.FP8_PROVIDERS, fp8_min_features=16,
        attention_head_dim=64,
    )  # fmt: skip
    recs = gm._run_fp8_providers(case, 1e12, quick=True, deadline=float("inf"))
    by_provider = {}
    for r in recs:
        by_provider.setdefault(r["provider"], []).append(r)
    assert set(by_provider) == {p for p, _, _ in gm.FP8_PROVIDERS}
    for provider, linears, attn in gm.FP8_PROVIDERS:
        rs = by_provider[provider]
        errors = [r for r in rs if r["metric"] == "error"]
        if not errors:
            assert {r["metric"] for r in rs} == {"tokens_per_s", "mfu", "peak_mem_gb"}
            assert all(r["baseline"] == "ours_triton" for r in rs)
            assert rs[0]["extra"]["fp8_attention"] == (attn or "none")
            continue
        (err,) = errors
        assert err["extra"].get("skipped"), err  # a skip with its reason, never a failure
        assert linears != "none" or attn == "te", err  # our FP8 attention alone has no missing backend here
        name = {"te": "Transformer Engine", "torchao": "torchao"}["te" if attn == "te" else linears]
        assert name in err["extra"]["message"], err
    assert by_provider["ours_fp8attn"][0]["metric"] == "tokens_per_s"
    late = gm._run_fp8_providers(case, 1e12, quick=False, deadline=0.0)  # past the module's time budget
    assert [r["extra"]["message"] for r in late] == ["skipped: time budget"] * len(gm.FP8_PROVIDERS)
    model, _ = gm._fp8_model(case, "none", "all")
    assert {m.attention_precision for m in model.modules() if hasattr(m, "attention_precision")} == {"fp8"}
