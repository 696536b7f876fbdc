"""Test harness: Triton's interpreter on CPU-only machines, markers, deterministic seeding."""

import os
import random

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
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)


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
