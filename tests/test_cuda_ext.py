"""kernels._C: builds with nvcc, imports without a GPU driver, fails calls with a clear error;
wrappers validate tensors; on a GPU (marked gpu) the sampler kernel matches the torch reference
and Triton, with 128-bit and scalar (misaligned offset views) paths."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import cuda
from kernels.qk_norm_rope import qk_norm_rope_reference
from kernels.sampler import flow_step, flow_step_reference

ROOT = Path(__file__).resolve().parents[1]
HAS_NVCC = shutil.which("nvcc") is not None and os.environ.get("WMSD_BUILD_CUDA", "") != "0"
needs_ext = pytest.mark.skipif(not HAS_NVCC, reason="nvcc not found: kernels._C is not built")


def _module():
    mod, err = cuda._module()
    assert mod is not None, (
        f"{err} (nvcc is present: `pip install -e .` or `python setup.py build_ext --inplace`)"
    )
    return mod


@needs_ext
def test_extension_imports_and_plans():
    mod = _module()
    n_blocks, vec = mod.flow_step_plan(8 * 1024 + 8, 2, True)  # bf16: 8 per 128-bit load
    assert vec and n_blocks == -(-(8 * 1024 + 8) // (4 * 256 * 8))
    assert mod.flow_step_plan(1001, 2, True) == (-(-1001 // 1024), False)  # N % 8 != 0: scalar
    assert mod.flow_step_plan(4096, 0, False)[1] is False


@needs_ext
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_calls_fail_clearly_without_a_gpu():
    mod = _module()
    with pytest.raises(RuntimeError, match="cudaGetDeviceCount: cuda"):
        mod.device_count()
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        mod.flow_step(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.5, 0.4, 1.0, 0.0, 1, 16, 2, 0, 0, 0)
    with pytest.raises(RuntimeError, match="dtype code"):
        mod.flow_step(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.5, 0.4, 1.0, 0.0, 1, 16, 7, 0, 0, 0)
    assert not cuda.available()
    assert "cudaGetDeviceCount" in cuda.load_error()


@needs_ext
def test_wrappers_reject_bad_tensors_before_any_pointer():
    x = torch.randn(2, 8)
    # the message named the CPU as "the CUDA device" ("expected the CUDA device cpu")
    with pytest.raises(ValueError, match="x: on cpu, expected a CUDA tensor$"):
        cuda.flow_step(x, x, t=0.5, t_next=0.4)
    with pytest.raises(ValueError, match="q: on cpu, expected a CUDA tensor$"):
        cuda.qk_norm_rope_(
            torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4), *[torch.ones(4)] * 2, *[torch.ones(2, 2)] * 2
        )
    # shapes first: the kernel indexes k, the weights and the tables with q's sizes
    q = torch.randn(2, 8, 2, 4)
    with pytest.raises(ValueError, match=r"k: expected shape \(2, 8, H_k, 4\)"):
        cuda.qk_norm_rope_(q, torch.randn(1, 1, 1, 4), *[torch.ones(4)] * 2, *[torch.ones(8, 2)] * 2)
    with pytest.raises(ValueError, match=r"cos: expected shape \(8, 2\)"):
        cuda.qk_norm_rope_(q, torch.randn(2, 8, 1, 4), *[torch.ones(4)] * 2, *[torch.ones(4, 2)] * 2)


@needs_ext
def test_flow_step_refuses_a_missing_v_cond():
    """v_cond=None was skipped like the optional v_uncond, and address 0 went to the kernel as the velocity
    (a null read on the GPU). CUDA tensors without a GPU: torch's fake tensors (device and shape, no memory)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 8, device="cuda")
        for kw in ({}, {"sigma": 0.5}):
            with pytest.raises(TypeError, match="v_cond: expected a torch.Tensor, got NoneType"):
                cuda.flow_step(x, None, t=0.5, t_next=0.4, **kw)


@needs_ext
@pytest.mark.parametrize("mode", ["ode", "sde", "score"])
def test_flow_step_on_empty_samples_matches_the_torch_path(mode):
    """x of shape (B, 0): the wrapper raised 'expected a non-empty tensor' (and flow_step(backend="cuda")
    sent it there) where the torch path returns an empty sample and a zero log-prob (fake CUDA tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    kw = dict(t=0.5, t_next=0.4, sigma=0.0 if mode == "ode" else 0.5)
    want = flow_step_reference(
        torch.empty(3, 0),
        torch.empty(3, 0),
        **kw,
        **({"x_next": torch.empty(3, 0)} if mode == "score" else {}),
    )
    with FakeTensorMode():
        x = torch.empty(3, 0, device="cuda")
        xn = torch.empty(3, 0, device="cuda") if mode == "score" else None
        got = cuda.flow_step(x, torch.empty(3, 0, device="cuda"), x_next=xn, **kw)
        assert got[0].shape == want[0].shape and got[0].device.type == "cuda"
        if mode == "score":
            assert got[0] is xn
        if mode == "ode":
            assert got[1] is None and want[1] is None
        else:
            assert got[1].shape == want[1].shape and got[1].dtype == want[1].dtype
    with pytest.raises(ValueError, match="B > 0"), FakeTensorMode():  # no sample at all: still refused
        cuda.flow_step(torch.empty(0, 4, device="cuda"), torch.empty(0, 4, device="cuda"), **kw)


@needs_ext
@pytest.mark.parametrize(
    "kw",
    [
        dict(t=0.5, t_next=0.4, sigma=-0.5),
        dict(t=0.5, t_next=0.4, sigma=float("nan")),
        dict(t=0.0, t_next=-0.1, sigma=0.5),
        dict(t=0.5, t_next=0.6, sigma=0.5),
        dict(t=torch.tensor([0.5, 0.0]), t_next=-0.1, sigma=0.5),
        dict(t=0.5, t_next=0.4, sigma=0.0, x_next=True),
        dict(t=0.5, t_next=0.4, sigma=0.5, x_next=True, noise=True),
    ],
)
def test_flow_step_refuses_what_the_torch_path_refuses(kw):
    """The direct wrapper checked no sigma or time (NaN out, or x_next / noise ignored) where the torch path
    raises; it now raises the same. Fake CUDA tensors without a GPU."""
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(2, 8)
    host = {k: (x if v is True else v) for k, v in kw.items()}
    with pytest.raises(ValueError) as want:
        flow_step_reference(x, x, **host)
    with contextlib.nullcontext() if torch.cuda.is_available() else FakeTensorMode():
        xc = torch.randn(2, 8, device="cuda")
    dev = {k: (xc if v is True else v) for k, v in kw.items()}
    with pytest.raises(ValueError) as got:  # outside the mode: host times stay real tensors
        cuda.flow_step(xc, xc, **dev)
    assert (
        str(got.value).rsplit(": ", 1)[-1] == str(want.value).rsplit(": ", 1)[-1]
    )  # times print differently


@needs_ext
@pytest.mark.parametrize("shape", [(2, 0, 3, 8), (0, 4, 3, 8), (2, 4, 3, 0)])
def test_qk_norm_rope_on_empty_inputs_returns_them(shape):
    """No token, sample or feature: the extension refused the launch ('need B, S > 0 and D even', a
    RuntimeError) where the torch reference returns the empty tensors; now nothing is launched."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    B, S, H, D = shape
    with FakeTensorMode():
        q, k = torch.empty(shape, device="cuda"), torch.empty(B, S, 1, D, device="cuda")
        w, tab = torch.ones(D, device="cuda"), torch.ones(S, D // 2, device="cuda")
        got = cuda.qk_norm_rope_(q, k, w, w, tab, tab)
        assert got[0] is q and got[1] is k
    want = qk_norm_rope_reference(
        *(torch.empty(s) for s in (shape, (B, S, 1, D), (D,), (D,))), *[torch.ones(S, D // 2)] * 2
    )
    assert [t.shape for t in want] == [q.shape, k.shape]


@pytest.mark.parametrize(
    "capability, archs, runs",
    [
        ((8, 0), ["sm_80", "sm_90a"], True),
        ((8, 6), ["sm_80", "sm_90a"], True),  # SASS runs on a newer minor of its major
        ((9, 0), ["sm_80", "sm_90a"], True),
        ((7, 5), ["sm_80", "sm_90a"], False),  # the default build on an older GPU
        ((10, 0), ["sm_80", "sm_90a"], False),  # ... and on Blackwell: no PTX to JIT
        ((12, 0), ["sm_80", "sm_90a"], False),
        ((10, 0), ["sm_80", "sm_90a", "compute_90a"], False),  # arch-specific PTX: 9.0 alone
        ((10, 0), ["sm_80", "sm_90a", "compute_90"], True),  # "90+ptx": JIT for any newer GPU
        ((12, 0), ["compute_90"], True),
        ((8, 9), ["compute_90"], False),
        ((10, 3), ["sm_100a"], False),
        ((10, 3), ["sm_100f"], True),  # family code: same major, newer minor
        ((11, 0), ["sm_100f", "compute_100f"], False),
        ((10, 0), ["sm_103f"], False),
        ((9, 0), [], False),
    ],
)
def test_arch_runs_on(capability, archs, runs):
    """available() counted devices only: on a GPU the build has no code for (the default 80;90a on sm_100,
    sm_120, sm_75) every call raised 'no kernel image' instead of falling back (CUDA's compatibility rules)."""
    assert cuda.arch_runs_on(capability, archs) is runs


@needs_ext
def test_fatbin_archs_reads_what_nvcc_built(tmp_path):
    src = tmp_path / "k.cu"
    src.write_text("__global__ void k(float* x) { x[0] = 1.f; }\n")
    codes = {"75": "sm_75", "90a": "sm_90a", "100f": "sm_100f", "120": "compute_120"}
    flags = [f"-gencode=arch=compute_{a},code={c}" for a, c in codes.items()]
    so = tmp_path / "k.so"
    nvcc = shutil.which("nvcc")
    subprocess.run([nvcc, "-shared", "-Xcompiler", "-fPIC", *flags, str(src), "-o", str(so)], check=True)
    assert cuda.fatbin_archs(str(so)) == sorted(codes.values())
    assert cuda.fatbin_archs(str(src)) is None and cuda.fatbin_archs(str(tmp_path / "none.so")) is None
    built = cuda.built_archs()  # the shipped extension: some SASS for the default 80;90a or WMSD_CUDA_ARCHS
    assert built and all(re.fullmatch(r"(sm|compute)_\d+[af]?", a) for a in built), built


def test_overlap_checks_on_views():
    qkv = torch.randn(2, 5, 3, 4, 8)  # fused projection output: q, k, v interleaved per token
    cuda._check_qk_disjoint(qkv[:, :, 0], qkv[:, :, 1])  # disjoint: accepted
    with pytest.raises(ValueError, match="overlap"):
        cuda._check_qk_disjoint(qkv[:, :, 0], qkv[:, :, 0, :2])
    flat = torch.randn(2, 5, 4, 8)
    with pytest.raises(ValueError, match="overlap"):
        cuda._check_qk_disjoint(flat[:, :, 0:2], flat[:, :, 1:3])  # head 1 shared
    assert cuda._self_overlapping(torch.randn(4, 1, 8).expand(4, 3, 8))
    assert not cuda._self_overlapping(qkv[:, :, 1])


def test_cuda_backend_falls_back_off_gpu():
    x, v = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    got = flow_step(x, v, t=0.5, t_next=0.3, backend="cuda")
    torch.testing.assert_close(got[0], flow_step_reference(x, v, t=0.5, t_next=0.3)[0])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_NVCC, reason="nvcc not found")
def test_setup_builds_extension_from_scratch(tmp_path):
    """`python setup.py build_ext` into a fresh folder: the shipped build path (~1 min on 2 cores). With
    "90a+ptx" it embeds portable PTX (compute_90, which an sm_100 / sm_120 GPU JITs): it embedded compute_90a,
    which runs on 9.0 alone, though csrc/README.md promised PTX for newer GPUs."""
    env = dict(os.environ, WMSD_CUDA_ARCHS="90a+ptx")
    subprocess.run(
        [
            sys.executable,
            "setup.py",
            "build_ext",
            "--build-lib",
            str(tmp_path / "lib"),
            "--build-temp",
            str(tmp_path / "tmp"),
        ],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    so = list((tmp_path / "lib" / "kernels").glob("_C*.so"))
    assert so, "no kernels/_C*.so produced"
    code = (
        f"import importlib.util as u; s = u.spec_from_file_location('_C', {str(so[0])!r}); "
        "m = u.module_from_spec(s); s.loader.exec_module(m); print(m.flow_step_plan(64, 0, True))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "(1, True)"
    archs = cuda.fatbin_archs(str(so[0]))
    assert archs == ["compute_90", "sm_90a"], archs
    assert cuda.arch_runs_on((12, 0), archs) and cuda.arch_runs_on((9, 0), archs)


def test_inplace_build_goes_on_when_nvcc_cannot_build(tmp_path):
    """nvcc present but failing (e.g. a toolkit without sm_90a): `setup.py build_ext --inplace`, the step of
    an editable install, succeeds without kernels._C and says so (it failed copying the .so never built)."""
    import shutil

    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("setup.py", "pyproject.toml", "csrc", "kernels"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    for so in (repo / "kernels").glob("_C*.so"):
        so.unlink()
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(
        "#!/bin/sh\necho \"nvcc fatal: Unsupported gpu architecture 'compute_90a'\" >&2\nexit 1\n"
    )
    nvcc.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "WMSD_BUILD_CUDA"}
    env.update(CUDA_HOME=str(nvcc.parent.parent), PATH=f"{nvcc.parent}:{env['PATH']}")
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=repo, env=env,
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "installing without it" in r.stdout and not list((repo / "kernels").glob("_C*.so"))


# ---- GPU numerics ------------------------------------------------------------------------------


def _offset_view(shape, dtype, offset):
    """A tensor of `shape` starting `offset` elements into a buffer: misaligned when offset*size % 16."""
    n = torch.Size(shape).numel()
    buf = torch.randn(n + offset, device="cuda").to(dtype)
    return buf[offset:].view(shape)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 16, 5, 6, 8), (2, 3, 7, 11)])  # N % 8 == 0 and odd N
@pytest.mark.parametrize("offset", [0, 1])  # 1: misaligned pointers -> scalar path
@pytest.mark.parametrize("mode", ["ode", "sde", "score"])
def test_cuda_flow_step_matches_reference_and_triton(dtype, shape, offset, mode):
    assert cuda.available(), cuda.load_error()
    x, vc, vu, nz, xn = (_offset_view(shape, dtype, offset) for _ in range(5))
    B = shape[0]
    t = torch.linspace(0.9, 0.5, B, device="cuda")
    tn = t - 0.1
    kw = dict(guidance=3.5, t=t, t_next=tn, sigma=0.0 if mode == "ode" else 0.7)
    if mode == "sde":
        kw["noise"] = nz
    if mode == "score":
        kw["x_next"] = xn
    aligned = offset * x.element_size() % 16 == 0
    N = x[0].numel()
    assert _module().flow_step_plan(N, cuda.DTYPE_CODES[dtype], aligned)[1] == (
        aligned and N % (16 // x.element_size()) == 0
    )
    got = cuda.flow_step(x, vc, vu, **kw)
    tri = flow_step(x, vc, vu, backend="triton", **kw)
    ref = flow_step_reference(
        *(a.double() for a in (x, vc, vu)),
        **{k: (v.double() if torch.is_tensor(v) and v.dim() > 1 else v) for k, v in kw.items()},
    )
    tol = dict(atol=2e-2, rtol=1e-2) if dtype != torch.float32 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0].double(), ref[0].to(dtype).double(), **tol)
    torch.testing.assert_close(got[0], tri[0], **tol)
    if mode != "ode":
        # score the kernel's own (rounded) sample in float64: the log-prob must agree to fp32 accuracy
        lp_ref = flow_step_reference(
            *(a.double() for a in (x, vc, vu)),
            guidance=3.5,
            t=t,
            t_next=tn,
            sigma=0.7,
            x_next=got[0].double(),
        )[1]
        torch.testing.assert_close(got[1].double(), lp_ref, atol=1e-2, rtol=1e-5)
        torch.testing.assert_close(got[1], tri[1], atol=1e-2, rtol=1e-5)


@pytest.mark.gpu
def test_available_follows_the_device_architecture():
    cap = torch.cuda.get_device_capability()
    assert cuda.available(torch.device("cuda")) == cuda.arch_runs_on(cap, cuda.built_archs()), (
        cuda.load_error()
    )


@pytest.mark.gpu
def test_cuda_flow_step_rejects_bad_tensors():
    x = torch.randn(2, 4, 8, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="v_cond: dtype torch.float32, expected torch.bfloat16"):
        cuda.flow_step(x, x.float(), t=0.5, t_next=0.4)
    with pytest.raises(ValueError, match="v_cond: expected a contiguous tensor"):
        cuda.flow_step(x, x.transpose(1, 2).contiguous().transpose(1, 2), t=0.5, t_next=0.4)
    with pytest.raises(ValueError, match="noise: shape"):
        cuda.flow_step(x, x, t=0.5, t_next=0.4, sigma=0.5, noise=x[:, :2])


def _addresses(t: torch.Tensor) -> set[int]:
    """Every element's address (in elements), enumerated."""
    idx = torch.zeros(t.shape, dtype=torch.int64)
    for i, (n, st) in enumerate(zip(t.shape, t.stride())):
        idx = idx + torch.arange(n).view([n if j == i else 1 for j in range(t.dim())]) * st
    return set((idx + t.data_ptr() // t.element_size()).flatten().tolist())


def _fused_views(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k = two slots of a fused (B, S, 3, H, D) projection whose (B, S, 3, H) dims lie in memory in a
    random order (token- or head-major, ...), k sometimes shifted by a few elements (then they may overlap)."""

    def draw(n: int) -> int:
        return int(torch.randint(n, (1,), generator=gen))

    shape = [1 + draw(2), 1 + draw(3), 3, 1 + draw(3)]  # B, S, slots, H
    D = 2 + 2 * draw(2)
    strides, ext = [0, 0, 0, 0], D + draw(2)
    for i in torch.randperm(4, generator=gen).tolist():
        strides[i], ext = ext, ext * shape[i]
    base = torch.randn(ext + 16)
    fused = base.as_strided([*shape, D], [*strides, 1], 8)
    a, b = torch.randperm(3, generator=gen)[:2].tolist()
    q, k = fused[:, :, a], fused[:, :, b]
    shift = (draw(5) - 2) * draw(2)  # mostly 0
    return q, k.as_strided(k.shape, k.stride(), k.storage_offset() + shift)


def test_qk_disjoint_accepts_head_major_qkv_and_never_misses_an_overlap():
    """q, k as views of a head-major fused projection (B, 3, H, S, D) are disjoint but were refused as
    overlapping; random fused layouts: whatever the check accepts shares no element (enumerated)."""
    hm = torch.randn(2, 3, 4, 5, 8)
    cuda._check_qk_disjoint(hm[:, 0].transpose(1, 2), hm[:, 1].transpose(1, 2))
    cuda._check_qk_disjoint(hm[:, 2].transpose(1, 2), hm[:, 0].transpose(1, 2))
    gen = torch.Generator().manual_seed(0)
    accepted = refused = 0
    for _ in range(300):
        q, k = _fused_views(gen)
        try:
            cuda._check_qk_disjoint(q, k)
        except ValueError:
            refused += 1
            continue
        accepted += 1
        assert not _addresses(q) & _addresses(k), (
            q.stride(),
            k.stride(),
            q.storage_offset(),
            k.storage_offset(),
        )
    assert accepted > 100 and refused > 20
