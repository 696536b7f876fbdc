"""Precision: FP8 linear conversion (torchao on CPU via torch._scaled_mm; TE on GPU), the filter,
clear errors for a missing backend, bf16 autocast, per-block compile."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parent / "dist_scripts"))
from tiny import SeededBatches, TinyDiT, flow_loss  # noqa: E402

from engine.config import JobConfig, PrecisionConfig  # noqa: E402
from engine.parallel import apply_compile  # noqa: E402
from engine.precision import (  # noqa: E402
    FP8UnavailableError,
    apply_fp8,
    fp8_context,
    fp8_filter,
    is_te_module,
)
from engine.trainer import Trainer  # noqa: E402
from kernels.te_loader import loaded_library_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


HAS_TE = importlib.util.find_spec("transformer_engine") is not None


def _cfg(steps: int, device: str = "cpu", **prec) -> JobConfig:
    cfg = JobConfig()
    cfg.run.device = device
    cfg.checkpoint.enabled = cfg.checkpoint.export_safetensors = False
    cfg.train.steps, cfg.train.lr, cfg.train.log_every = steps, 3e-3, 100
    for k, v in prec.items():
        setattr(cfg.precision, k, v)
    return cfg


def _train(cfg: JobConfig, run_dir: Path, model: nn.Module | None = None, **batch_kw) -> tuple[Trainer, list]:
    torch.manual_seed(0)
    tr = Trainer(cfg, model or TinyDiT(), flow_loss, SeededBatches(**batch_kw), run_dir=run_dir)
    return tr, [tr.train_step()["loss"].item() for _ in range(cfg.train.steps)]


def test_fp8_filter_selects_block_linears_by_size_and_name():
    model = TinyDiT(dim=32)  # block linears: qkv 32->96, proj 32->32, mlp 32->128 / 128->32, mod 32->128
    keep = fp8_filter(model, PrecisionConfig(fp8="torchao", fp8_min_features=32, fp8_skip=["mod"]))
    chosen = {n for n, m in model.named_modules() if keep(m, n)}
    assert chosen == {f"blocks.{i}.{k}" for i in range(2) for k in ("qkv", "proj", "mlp.0", "mlp.2")}
    keep = fp8_filter(model, PrecisionConfig(fp8="torchao", fp8_min_features=64))  # every min(in, out) is 32
    assert not any(keep(m, n) for n, m in model.named_modules())
    odd = nn.Module()
    odd.blocks = nn.ModuleList([nn.Linear(40, 24)])  # 24 and 40 are not multiples of 16
    assert not fp8_filter(odd, PrecisionConfig(fp8_min_features=1))(odd.blocks[0], "blocks.0")
    model.fp8_skip = ("mod",)  # the model's own list, as HunyuanVideo-1.5's per-sample modulation
    keep = fp8_filter(model, PrecisionConfig(fp8="torchao", fp8_min_features=32))
    assert {n for n, m in model.named_modules() if keep(m, n)} == chosen


def test_hunyuan_modulation_linears_stay_out_of_fp8():
    """HunyuanVideo-1.5's blocks hold their modulation linears (one row per sample): they stay bf16."""
    from models import build_model

    model = build_model("hunyuan15", "debug")
    keep = fp8_filter(model, PrecisionConfig(fp8="torchao", fp8_min_features=1))
    chosen = {n for n, m in model.named_modules() if keep(m, n)}
    assert chosen and not any(n.endswith(("x_mod", "c_mod")) for n in chosen)


def test_torchao_fp8_trains_on_cpu(tmp_path, caplog):
    """torch._scaled_mm runs on CPU (torch >= 2.7): the FP8 path itself trains, loss goes down."""
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear

    cfg = _cfg(25, fp8="torchao", fp8_min_features=32)
    with caplog.at_level("WARNING", logger="wmsd.trainer"):
        tr, losses = _train(cfg, tmp_path / "fp8", seq=15)  # 4 x 15 = 60 tokens: not a multiple of 16
    assert "without parallel.compile" in caplog.text  # eager Float8Linear: slow on GPUs, said once
    fp8 = [n for n, m in tr.model.named_modules() if isinstance(m, Float8Linear)]
    assert len(fp8) == 2 * 5 and all(n.startswith("blocks.") for n in fp8)
    assert type(tr.model.out) is nn.Linear and type(tr.model.inp) is nn.Linear
    _, ref = _train(_cfg(25), tmp_path / "fp32", seq=15)
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])
    assert losses[0] == pytest.approx(ref[0], rel=0.05)  # same init, fp8 rounding only
    assert sum(losses[-5:]) == pytest.approx(sum(ref[-5:]), rel=0.15)


@pytest.mark.skipif(HAS_TE, reason="Transformer Engine is installed here")
def test_missing_transformer_engine_is_a_clear_error_only_when_asked(tmp_path):
    apply_fp8(TinyDiT(), PrecisionConfig(fp8="none"))  # no import attempted
    with pytest.raises(FP8UnavailableError, match="precision.fp8 = 'te' needs Transformer Engine"):
        apply_fp8(TinyDiT(), PrecisionConfig(fp8="te", fp8_min_features=16))


def test_bf16_autocast_training_tracks_fp32(tmp_path):
    _, bf16 = _train(_cfg(8, param_dtype="bfloat16"), tmp_path / "bf16")
    _, fp32 = _train(_cfg(8), tmp_path / "fp32")
    assert bf16 != fp32  # autocast was active
    assert bf16 == pytest.approx(fp32, rel=0.05)


@pytest.mark.slow
def test_per_block_compile_matches_eager(tmp_path):
    cfg = _cfg(3)
    _, eager = _train(cfg, tmp_path / "eager")
    cfg.parallel.compile = True
    tr, compiled = _train(cfg, tmp_path / "compiled")
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert tr.model.state_dict().keys() == TinyDiT().state_dict().keys()


# ---- GPU ----------------------------------------------------------------------------------------


def _wide() -> TinyDiT:
    return TinyDiT(channels=16, dim=256, depth=2)


@pytest.mark.gpu
def test_torchao_fp8_cuda_odd_token_count(tmp_path):
    """On CUDA torch._scaled_mm needs inner dims % 16 == 0; 4 x 75 = 300 tokens exercises the padding."""
    pytest.importorskip("torchao")
    cfg = _cfg(20, "cuda", fp8="torchao", fp8_min_features=256, param_dtype="bfloat16")
    _, losses = _train(cfg, tmp_path, _wide(), seq=75)
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TE, reason="needs Transformer Engine")
@pytest.mark.parametrize("ac", ["none", "full", "selective"])
@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_te_fp8_cuda_trains(tmp_path, recipe, ac):
    """TE linears train, also with activation checkpointing (TE's checkpoint: its recompute re-enters
    te.autocast; torch's would recompute without FP8)."""
    cfg = _cfg(20, "cuda", fp8="te", fp8_recipe=recipe, fp8_min_features=256, param_dtype="bfloat16")
    cfg.parallel.activation_checkpointing = ac
    tr, losses = _train(cfg, tmp_path, _wide(), seq=64)
    assert any(is_te_module(m) for m in tr.model.modules())
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-5:]) < sum(losses[:5])


def test_loaded_library_dir_finds_torchs_own_library():
    """The folder TE is pointed at for cuDNN comes from the process's mapped libraries: checked here on a
    library every torch build maps."""
    lib = Path(torch.__file__).parent / "lib"
    assert Path(loaded_library_dir("libtorch_cpu")).resolve() == lib.resolve()
    assert loaded_library_dir("libno_such_library_here") is None
    assert not is_te_module(nn.Linear(4, 4))


# how TE gets imported after torch ran cuDNN: through our loader; by a third party once kernels is imported
# (accelerate, peft); by diffusers' Wan model, which failed so in bench.gpu_models on the H200 (2026-11-27)
TE_IMPORTERS = {
    "import_te": "from kernels.te_loader import import_te\nte = import_te()\n",
    "third_party": "import transformer_engine.pytorch as te\n",
    "diffusers": "from diffusers import WanTransformer3DModel\nimport transformer_engine.pytorch as te\n",
}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TE, reason="needs Transformer Engine")
@pytest.mark.parametrize("importer", list(TE_IMPORTERS))
def test_te_loads_after_torch_ran_cudnn(importer):
    """The GPU image has a system cuDNN (9.14) older than torch's (9.19): TE loaded the system one after
    torch's cuDNN attention had run, and failed with an undefined symbol. A fresh process, as the trainer
    benchmark: our package imported, cuDNN attention, then TE (module TE_IMPORTERS)."""
    if importer == "diffusers" and importlib.util.find_spec("diffusers") is None:
        pytest.skip("needs diffusers")
    code = (
        "import torch, torch.nn.functional as F\n"
        "from torch.nn.attention import SDPBackend, sdpa_kernel\n"
        "import kernels\n"
        "q = torch.randn(1, 2, 256, 64, device='cuda', dtype=torch.bfloat16)\n"
        "with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):\n"
        "    F.scaled_dot_product_attention(q, q, q)\n"
        + TE_IMPORTERS[importer]
        + "print('te ok', te.Linear)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("CUDNN_PATH", None), env.pop("CUDNN_HOME", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "te ok" in r.stdout, r.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TE, reason="needs Transformer Engine")
@pytest.mark.parametrize("shape", [(4, 256), (64, 256), (3, 25, 256)])
def test_te_linear_pads_rows_fp8_gemms_cannot_take(shape, caplog):
    """TE's FP8 GEMMs need rows (the product of the leading dims) in multiples of 8 forward and 16 in the
    weight gradient (32,760 Wan tokens failed there): our TE linear pads them. Output and gradients match
    torch's bf16 linear within FP8's error, and are not bit-equal to it (FP8 ran)."""
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Linear(256, 512)]).cuda().to(torch.bfloat16)
    ref = nn.Linear(256, 512).cuda().to(torch.bfloat16)
    ref.load_state_dict(model.blocks[0].state_dict())
    prec = PrecisionConfig(fp8="te", fp8_recipe="current", fp8_min_features=256)
    with caplog.at_level("INFO", logger="wmsd.precision"):
        apply_fp8(model, prec)
    # the count of linears left in high precision was negative with TE (a TE Linear is no nn.Linear)
    assert "fp8 (te): 1 linears converted, 0 stay in high precision" in caplog.messages, caplog.messages
    lin = model.blocks[0]
    assert is_te_module(lin)
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    with fp8_context(prec):
        y = lin(x)
    want = ref(xr)
    assert y.shape == want.shape
    y.float().square().sum().backward()
    want.float().square().sum().backward()
    for got, exp in ((y, want), (x.grad, xr.grad), (lin.weight.grad, ref.weight.grad)):
        err = ((got - exp).float().norm() / exp.float().norm()).item()
        assert 1e-4 < err < 0.15, (shape, err)


@pytest.mark.gpu
def test_compile_cuda_matches_eager(tmp_path):
    model = _wide().cuda()
    ref = _wide().cuda()
    ref.load_state_dict(model.state_dict())
    apply_compile(model)
    mb = {k: v.cuda() for k, v in SeededBatches().next(0, model)[0].items()}
    torch.testing.assert_close(flow_loss(model, mb)[0], flow_loss(ref, mb)[0], rtol=1e-4, atol=1e-5)
