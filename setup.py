"""Installs the packages engine, kernels and models (``pip install -e .``).

The CUDA extension ``kernels._C`` (csrc/) is built here when nvcc is found; see csrc/README.md.
"""

from setuptools import find_packages, setup

EXTRAS = {
    "dev": [
        "pytest>=8",
        "pytest-benchmark>=4",
        "pytest-timeout>=2",
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
)
