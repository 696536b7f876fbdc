"""bench.gpu_check's driver on a machine without a GPU: the time budget and the results file.

Each module runs in a real subprocess; without CUDA a module returns its "no CUDA device" record.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _gpu_check(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--out", str(out), *args],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "WMSD_COMMIT": "abc1234", "PYTHONPATH": f"{ROOT}:{tmp_path}"},
    )
    (path,) = out.glob("*_gpu_check.json")
    return json.loads(path.read_text())


def test_modules_run_in_subprocesses_and_the_file_names_the_commit(tmp_path):
    res = _gpu_check(tmp_path, "--only", "data,elementwise", "--budget", "200")
    assert res["env"]["commit"] == "abc1234"
    by_name = {(r["name"], r["metric"]): r for r in res["records"]}
    assert "no CUDA device" in by_name[("data.decode", "error")]["extra"]["message"]
    assert by_name[("data.module", "wall_s")]["value"] > 0
    assert by_name[("elementwise.module", "wall_s")]["value"] > 0
    assert all("skipped" not in r["extra"].get("message", "") for r in res["records"])


def test_spent_budget_skips_modules_but_still_writes_the_file(tmp_path):
    res = _gpu_check(tmp_path, "--only", "data,trainer", "--budget", "0")
    assert [(r["name"], r["extra"]["message"]) for r in res["records"]] == [
        ("data.module", "skipped: budget spent (0 s)"),
        ("trainer.module", "skipped: budget spent (0 s)"),
    ]


SLOW_MODULE = """
import time
from bench.common import record

def run(quick=False):
    record("slow.first", "a", "p", "ms", 1.0)
    record("slow.second", "a", "p", "ms", 2.0)
    time.sleep(60)  # past the module's limit: killed here
    return []
"""


def test_a_module_past_its_limit_keeps_the_records_it_made(tmp_path):
    pkg = tmp_path / "slowpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "slow.py").write_text(SLOW_MODULE)
    res = _gpu_check(tmp_path, "--only", "slowpkg.slow", "--timeout", "8")
    got = [(r["name"], r["metric"], r["value"]) for r in res["records"]]
    assert got[:2] == [("slow.first", "ms", 1.0), ("slow.second", "ms", 2.0)]
    assert got[2][:2] == ("slowpkg.slow.module", "error")
    assert "timed out after 8 s (2 records kept)" in res["records"][2]["extra"]["message"]


CRASHING_MODULES = {
    # raises after two records (journaled)
    "raises": """
from bench.common import record

def run(quick=False):
    record("raises.first", "a", "p", "ms", 1.0)
    record("raises.second", "a", "p", "ms", 2.0)
    raise RuntimeError("CUDA error: an illegal memory access")
""",
    # returns its records, then the process aborts at exit (as a CUDA or DALI teardown can)
    "teardown": """
import atexit, os
from bench.common import record

def run(quick=False):
    atexit.register(os.abort)
    return [record("teardown.first", "a", "p", "ms", 3.0)]
""",
    # starts a helper process (as torch.compile's workers) and runs past its limit
    "spawns": """
import subprocess, sys, time
from pathlib import Path
from bench.common import record

def run(quick=False):
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    Path(__file__).with_name("helper.pid").write_text(str(p.pid))
    record("spawns.first", "a", "p", "ms", 4.0)
    time.sleep(60)
    return []
""",
}


def test_a_crashed_module_keeps_its_records_and_a_killed_one_its_children_do_not_outlive_it(tmp_path):
    pkg = tmp_path / "crashpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, code in CRASHING_MODULES.items():
        (pkg / f"{name}.py").write_text(code)
    res = _gpu_check(
        tmp_path, "--only", "crashpkg.raises,crashpkg.teardown,crashpkg.spawns", "--timeout", "10"
    )
    got = [(r["name"], r["metric"]) for r in res["records"]]
    for name in ("raises.first", "raises.second", "teardown.first", "spawns.first"):
        assert (name, "ms") in got, got
    messages = {r["name"]: r["extra"].get("message", "") for r in res["records"] if r["metric"] == "error"}
    assert (
        "(2 records kept)" in messages["crashpkg.raises.module"]
        and "illegal memory" in messages["crashpkg.raises.module"]
    )
    assert messages["crashpkg.teardown.module"].startswith("exit -6 (1 records kept)")
    pid = int((pkg / "helper.pid").read_text())
    status = Path(f"/proc/{pid}/status")
    assert (
        not status.exists() or "State:\tZ" in status.read_text()
    )  # killed with the module (a zombie at most)


LIMIT_MODULE = """
from bench.common import module_budget, record

def run(quick=False):
    return [record("limit.budget", "a", "p", "s", module_budget(70.0, reserve=20.0))]
"""


def test_a_module_budget_follows_the_limit_gpu_check_gives_it(tmp_path, monkeypatch):
    """GPU_MODULE_TIMEOUT reaches the modules' own budgets (the trainer's was fixed at 70 s: a raised limit
    bought no case)."""
    from bench.common import module_budget

    pkg = tmp_path / "limitpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "limit.py").write_text(LIMIT_MODULE)
    res = _gpu_check(tmp_path, "--only", "limitpkg.limit", "--timeout", "160")
    assert res["records"][0]["value"] == 140.0
    monkeypatch.setenv("GPU_MODULE_LIMIT_S", "60")
    assert module_budget(70.0, reserve=20.0) == 70.0  # never below the module's own default
    monkeypatch.delenv("GPU_MODULE_LIMIT_S", raising=False)
    assert module_budget(70.0, reserve=20.0) == 70.0


def test_trainer_cases_are_selected_by_name_after_the_baseline():
    from bench.gpu_trainer import CASES, selected_cases

    assert selected_cases(True) == CASES[:1] and selected_cases(False) == CASES
    picked = selected_cases(False, "fp8_te+compile, bf16+compile")
    assert [c[0] for c in picked] == ["bf16", "bf16+compile", "fp8_te+compile"]  # CASES order, baseline first
    with pytest.raises(ValueError, match="GPU_TRAINER_CASES: unknown \\['fp8_tee'\\]"):
        selected_cases(False, "fp8_tee")


def test_trainer_te_attention_cases_configure_what_the_trainer_accepts(tmp_path):
    """The te_attn cases set FP8 self-attention through TE on the job (the model's attention stays sdpa), a
    configuration the trainer's check accepts; the others leave attention in bf16."""
    from bench.gpu_trainer import CASES, _job
    from engine.precision import attention_precision_problem

    for provider, fp8, compile_, attn in CASES:
        cfg = _job(fp8, compile_, str(tmp_path), attn)
        assert attention_precision_problem(cfg.model) is None, provider
        want = ("fp8", "te") if "te_attn" in provider else ("bf16", "triton")
        assert (cfg.model.attention_precision, cfg.model.fp8_attention_backend) == want, provider
        assert cfg.precision.fp8 == fp8 and cfg.parallel.compile == compile_


def test_attention_profile_groups_every_attention_kernel():
    """bench.gpu_attention_profile sums GPU time by kernel name: each kernel the attention paths launch has
    its group (a renamed kernel would silently count as "torch")."""
    import triton

    import kernels.attention as A
    import kernels.attention_fp8 as F
    import kernels.rope as R
    from bench.gpu_attention_profile import kernel_group

    launched = {
        (A, "_attn_fwd"): "forward",
        (A, "_attn_bwd_dkdv"): "dkdv",
        (A, "_attn_bwd_dq"): "dq",
        (A, "_attn_bwd_delta"): "delta",
        (F, "_fp8_fwd"): "forward",
        (F, "_fp8_bwd_dkdv"): "dkdv",
        (F, "_fp8_bwd_dq"): "dq",
        (F, "_quant_blocks_kernel"): "prepass",
        (R, "_rope_kernel"): "rope",
    }
    for (module, name), group in launched.items():
        assert isinstance(getattr(module, name), triton.runtime.KernelInterface), name
        assert kernel_group(name) == group, name
    assert (
        kernel_group("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>")
        == "torch"
    )


def test_step_profile_sorts_the_kernels_of_a_training_step_by_kind():
    """bench.gpu_step_profile's kinds on kernel names as the profiler shows them (cuDNN, torch's flash, our
    kernels, cuBLAS, TE, inductor, torch's own), first match winning: our FP8 attention is attention, not an
    FP8 cast; an inductor kernel with an amax in it is inductor's."""
    from bench.gpu_step_profile import kernel_kind

    names = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_kernel0_0": "attention",
        "flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel": "attention",
        "_attn_bwd_dkdv": "attention",
        "_fp8_bwd_dq": "attention",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1": "gemm",
        "nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "gemm",
        "triton_red_fused__to_copy_abs_amax_0": "inductor",
        "void multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor<float, 4>>": "optimizer",
        "void transformer_engine::cast_transpose_kernel<8, true, float, __nv_fp8_e4m3>": "fp8_cast",
        "_adaln_modulate_kernel": "ours",
        "_te_prepass_kernel": "ours",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda": "copy",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>": "reduce",
        "void at::native::vectorized_elementwise_kernel<4, at::native::AUnaryFunctor<float>>": "elementwise",
        "void cub::DeviceRadixSortOnesweepKernel": "other",
    }
    assert {n: kernel_kind(n) for n in names} == names


def test_a_misspelt_case_or_shape_fails_the_cpu_rehearsal(tmp_path):
    """GPU_TRAINER_CASES and GPU_FP8_SHAPES are checked before the CUDA check: a typo shows in a CPU run of
    gpu_check, not first on the GPU (both modules returned "no CUDA device" here whatever they named)."""
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "WMSD_COMMIT": "abc1234",
           "GPU_TRAINER_CASES": "fp8_tee", "GPU_FP8_SHAPES": "hy1.5-480p"}  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--out", str(out), "--only", "trainer,attention_fp8"],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    (path,) = out.glob("*_gpu_check.json")
    errors = {r["name"]: r["extra"]["message"] for r in json.loads(path.read_text())["records"]}
    assert "GPU_TRAINER_CASES: unknown ['fp8_tee']" in errors["trainer.module"]
    assert "GPU_FP8_SHAPES: unknown ['hy1.5-480p']" in errors["attention_fp8.module"]


def test_fp8_providers_are_picked_with_their_baselines():
    """GPU_FP8_PROVIDERS=te_fp8 times te_fp8 and the baselines its ratio needs (our bf16 kernel, and cuDNN
    bf16 that one is compared with), in the same run; a misspelt name is refused, naming the choices."""
    from bench.gpu_attention_fp8 import PROVIDERS, selected_providers

    assert selected_providers("") is None
    assert selected_providers(" te_fp8 ,") == {"te_fp8", "triton_bf16", "sdpa_cudnn"}
    assert selected_providers("sdpa_cudnn") == {"sdpa_cudnn"}
    with pytest.raises(ValueError, match=r"GPU_FP8_PROVIDERS: unknown \['te-fp8'\]"):
        selected_providers("te-fp8")
    from bench.gpu_attention_fp8 import _providers

    names = set(_providers(None))  # without TE here: the te ones are absent, the others all named
    assert names <= set(PROVIDERS) and set(PROVIDERS) - names <= {"te_fp8", "te_fp8_dpa"}


@pytest.mark.filterwarnings("ignore:'bench.gpu_:RuntimeWarning")  # runpy of a module imported for its doc
@pytest.mark.parametrize("area", ["attention", "attention_fp8", "attention_profile", "data", "elementwise",
                                  "models", "models_hunyuan", "step_profile", "trainer"])  # fmt: skip
def test_a_module_run_alone_prints_its_help_and_refuses_an_unknown_option(area, monkeypatch, capsys):
    """``python -m bench.gpu_<area> --help`` ran the whole benchmark (on a GPU: minutes), as did a misspelt
    option such as --quik; now --help prints the module's docstring and an unknown option exits 2."""
    import importlib
    import runpy

    doc = importlib.import_module(f"bench.gpu_{area}").__doc__
    monkeypatch.setattr(sys, "argv", [f"gpu_{area}.py", "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module(f"bench.gpu_{area}", run_name="__main__")
    out = capsys.readouterr().out
    assert e.value.code == 0 and doc.splitlines()[0] in out and "CUDA" not in out.split("options:")[-1]
    monkeypatch.setattr(sys, "argv", [f"gpu_{area}.py", "--quik"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module(f"bench.gpu_{area}", run_name="__main__")
    assert e.value.code == 2 and "unrecognized arguments: --quik" in capsys.readouterr().err


def _gpu_check_sh(tmp_path: Path, only: str, tests: dict[str, str] | None = None, **env_more):
    """bench/gpu_check.sh from a copy of bench/ (no setup.py there: its build step fails at once and leaves
    the checkout's kernels._C alone), ncu off, the GPU tests off unless ``tests`` (file name -> source) gives
    the copy a tests/ folder of its own."""
    import shutil

    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "bench", tree / "bench", ignore=shutil.ignore_patterns("results", "__pycache__"))
    for name, src in (tests or {}).items():
        (tree / "tests").mkdir(exist_ok=True)
        (tree / "tests" / name).write_text(src)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "PYTHON": sys.executable, "GPU_ONLY": only,
           "GPU_TESTS": "1" if tests else "0", "GPU_NCU": "0", "OUT": str(tmp_path / "out"),
           "WMSD_COMMIT": "abc1234", **env_more}  # fmt: skip
    return subprocess.run(["bash", "bench/gpu_check.sh"], cwd=tree, capture_output=True, text=True, timeout=120,
                          env=env)  # fmt: skip


def test_gpu_check_sh_runs_huge_tests_alone_and_keeps_the_failures_of_a_run_cut_at_its_limit(tmp_path):
    """The huge tests (up to ~50 GB each) ran beside the others on four workers, and a run cut at its limit
    left no failure message (two failures on an H200, 2026-11-28): now `gpu and not huge` on the workers,
    then `huge` in one process, each cut by SIGINT so that pytest still prints its failures and XML."""
    import tarfile

    src = (
        "import os, time\nimport pytest\n\n"
        "@pytest.mark.gpu\ndef test_gpu_one():\n    assert False, 'gpu failure message'\n\n"
        "@pytest.mark.huge\ndef test_huge_a():\n    assert 'PYTEST_XDIST_WORKER' not in os.environ, 'on a worker'\n"
        "    assert False, 'huge failure message'\n\n"
        "@pytest.mark.huge\ndef test_huge_b():\n    time.sleep(100)\n"
    )
    r = _gpu_check_sh(tmp_path, "attention", tests={"test_marks.py": src}, GPU_BENCH="0",
                      GPU_TEST_TIMEOUT="60", GPU_HUGE_TIMEOUT="8", GPU_TEST_WORKERS="2")  # fmt: skip
    out = tmp_path / "out"
    gpu, huge = (out / "pytest_gpu.log").read_text(), (out / "pytest_huge.log").read_text()
    assert "gpu failure message" in gpu and "test_huge" not in gpu, gpu
    assert (
        "huge failure message" in huge
        and "AssertionError: on a worker" not in huge
        and "KeyboardInterrupt" in huge
    ), huge
    with tarfile.open(out / "logs.tgz") as tar:
        assert {"./pytest_gpu.xml", "./pytest_huge.xml"} <= set(tar.getnames()), r.stdout


def test_gpu_check_sh_refuses_a_misspelt_area_before_the_build_and_takes_spaces(tmp_path):
    """A misspelt GPU_ONLY area was found only after the build and the GPU tests ("module not present" at
    the end); "attention, elementwise" split into two arguments and gpu_check refused them, no module ran."""
    bad = _gpu_check_sh(tmp_path / "bad", "attention, atention")
    assert bad.returncode == 2 and "bench/gpu_atention.py" in bad.stdout and "building" not in bad.stdout
    good = _gpu_check_sh(tmp_path / "good", "attention, elementwise")
    (path,) = (tmp_path / "good" / "out").glob("*_gpu_check.json")
    names = {r["name"] for r in json.loads(path.read_text())["records"]}
    assert {"attention.module", "elementwise.module"} <= names, good.stdout + good.stderr
