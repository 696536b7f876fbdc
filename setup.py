"""Installs the packages engine, kernels and models (``pip install -e .``).

The CUDA extension ``kernels._C`` (csrc/) is built here when nvcc is found; see csrc/README.md.
"""

import os
import shutil
import subprocess
import sysconfig

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

# --- CUDA extension kernels._C (csrc/): plain pybind11 + nvcc, no torch headers -------------------
# WMSD_BUILD_CUDA=0/1 forces the build off/on (default: on when nvcc is found);
# WMSD_CUDA_ARCHS="80;90a" picks the SASS targets (a trailing "+ptx" on one also embeds the PTX of its
# portable form, "90a+ptx" -> compute_90, which newer GPUs JIT).
CUDA_SOURCES = ["csrc/bindings.cpp", "csrc/sampler_step.cu", "csrc/qk_norm_rope.cu"]


def _find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_extensions() -> list[Extension]:
    """[kernels._C] when it should be built, else [] after printing one line saying why."""
    flag = os.environ.get("WMSD_BUILD_CUDA", "").strip()
    if flag == "0":
        print("wmsd-engine: WMSD_BUILD_CUDA=0: installing without the CUDA extension kernels._C")
        return []
    if _find_nvcc() is None:
        if flag == "1":
            raise RuntimeError("WMSD_BUILD_CUDA=1 but nvcc was not found on PATH or under $CUDA_HOME/bin")
        print(
            "wmsd-engine: nvcc not found: installing without the CUDA extension kernels._C (Triton/torch used)"
        )
        return []
    return [Extension("kernels._C", sources=CUDA_SOURCES, depends=["csrc/common.cuh", "csrc/launchers.h"])]


def _gencode_flags() -> list[str]:
    flags = []
    for arch in os.environ.get("WMSD_CUDA_ARCHS", "80;90a").replace(",", ";").split(";"):
        arch = arch.strip()
        if arch.endswith("+ptx"):
            arch = arch[: -len("+ptx")]
            # the portable PTX ("90", not "90a": arch-specific PTX JITs on 9.0 alone); csrc/ uses no 90a feature
            ptx = arch.rstrip("af")
            flags.append(f"-gencode=arch=compute_{ptx},code=compute_{ptx}")
        if arch:
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


class NvccBuildExt(build_ext):
    """Builds kernels._C with one nvcc call (static cudart: importing needs no driver)."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name != "kernels._C":
            return super().build_extension(ext)
        import pybind11

        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        cmd = [
            _find_nvcc(),
            "-O3",
            "-std=c++17",
            "-shared",
            "-Xcompiler",
            "-fPIC",
            "-cudart",
            "static",
            "--threads",
            "2",
            *_gencode_flags(),
            f"-I{pybind11.get_include()}",
            f"-I{sysconfig.get_paths()['include']}",
            *ext.sources,
            "-o",
            out,
        ]
        print("wmsd-engine: building kernels._C:", " ".join(cmd))
        try:
            subprocess.run(cmd, check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            if os.environ.get("WMSD_BUILD_CUDA", "").strip() == "1":
                raise
            print(f"wmsd-engine: building kernels._C failed ({e}): installing without it (Triton/torch used)")
            # out of the list that editable installs and --inplace copy from (the loop calling us keeps its own)
            self.extensions = [e for e in self.extensions if e is not ext]


EXTRAS = {
    "dev": [
        "pytest>=8",
        "pybind11>=2.12",  # tests rebuild kernels._C with `python setup.py build_ext`
        "pytest-benchmark>=4",
        "pytest-timeout>=2",
        "pytest-xdist>=3",  # the README test command runs tests/ on both cores (-n 2); bench/ without it (pytest-benchmark)
        "ruff>=0.6",
        "torchao>=0.10",
        "nvidia-dali-cuda130>=1.50",
        "tensorboard>=2.15",
        "matplotlib>=3.7",
    ],
    "gpu": [
        "flash-attn>=2.6",
        "transformer-engine[pytorch]>=2.0",
        "nvidia-dali-cuda130>=1.50",
    ],
}

setup(
    name="wmsd-engine",
    version="0.1.0",
    description="A lean training engine for video world models implementing World Model Self-Distillation",
    python_requires=">=3.11",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "models", "models.*"]),
    package_data={"engine": ["world/assets/*"]},
    install_requires=[
        # A range: cluster users bring their own CUDA torch. The README's CPU install pins 2.13.0.
        "torch>=2.6",
        "triton>=3.2",
        "numpy>=1.26",
        "transformers>=4.50",
        "diffusers>=0.35",
        "safetensors>=0.4",
        "av>=12",
        "tqdm>=4.66",
        "httpx>=0.27",
        "pillow>=10",
    ],
    extras_require=EXTRAS,
    ext_modules=_cuda_extensions(),
    cmdclass={"build_ext": NvccBuildExt},
)
