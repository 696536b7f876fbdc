"""Test harness: Triton's interpreter on CPU-only machines, markers, deterministic seeding."""

import os
import random
import subprocess
import sys
from pathlib import Path

# Must happen before anything imports triton: without a CUDA device Triton runs only interpreted.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard requirement
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_huge = pytest.mark.skip(
        reason="4+ GB under the CPU interpreter (minutes): set WMSD_HUGE_TESTS=1 to run"
    )
    huge_on_cpu = os.environ.get("WMSD_HUGE_TESTS") == "1"
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)
        if "huge" in item.keywords and not (_HAS_CUDA or huge_on_cpu):
            item.add_marker(skip_huge)


# Tests run tiny ops, often beside torchrun/subprocess workers: one intra-op thread avoids
# oversubscribing a 2-core machine (measured ~40x slower fits with 2 threads under load).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``), restored
    after it: on a shared, oversubscribed CPU box 2 threads make tiny training steps ~40x slower
    (spinning thread barriers); results do not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def device() -> str:
    return "cuda" if _HAS_CUDA else "cpu"


@pytest.fixture(scope="session")
def without_interpreter():
    """Run ``python <args>`` from the repo root in a process without TRITON_INTERPRET (Triton's GPU compiler,
    which the interpreter replaces, compiles there for a GPU target without a GPU): returns
    run(*args, timeout=600, interpret=False) -> CompletedProcess. A child exiting with 3 (no
    ahead-of-time compile API in this Triton) skips the test."""

    def run(*args: str, timeout: float = 600, interpret: bool = False) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        if interpret:
            env["TRITON_INTERPRET"] = "1"
        root = Path(__file__).resolve().parents[1]
        r = subprocess.run(
            [sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout
        )
        if r.returncode == 3:
            pytest.skip(r.stdout.strip())
        return r

    return run
