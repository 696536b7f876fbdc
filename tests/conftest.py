"""Test harness: Triton's interpreter on CPU-only machines, markers, deterministic seeding."""

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import engine  # noqa: F401, E402  (its MKL_DISABLE_FAST_MM, engine/__init__.py, before any GEMM of a test)

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

from engine.dist import proc_stat


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


# Processes a test starts must end with it. Orphans (a SIGKILLed torchrun's workers, a killed writer's decoders)
# are re-parented to this process rather than to init, so the check below finds and kills them; the helpers
# Python and torch keep for a process's life are left alone.
_PERSISTENT = ("multiprocessing.resource_tracker", "multiprocessing.forkserver", "compile_worker")
if sys.platform.startswith("linux"):
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # 36: PR_SET_CHILD_SUBREAPER


def _descendants(root: int) -> dict[int, str]:
    """``pid -> command line`` of every live process below ``root`` (zombies left out)."""
    children: dict[int, list[int]] = {}
    zombie = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            stat = proc_stat(int(d.name))
            if stat is None:
                continue
            children.setdefault(stat[1], []).append(int(d.name))
            if stat[0] == "Z":
                zombie.add(int(d.name))
    below, todo = {}, [root]
    while todo:
        for c in children.get(todo.pop(), []):
            todo.append(c)
            if c not in zombie:
                try:
                    below[c] = (
                        Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    )
                except OSError:
                    pass
    return below


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test(request):
    """Kill (and name, in a warning) the processes a test left running: stray trainers or decoders took the CPU
    from every later test."""
    if not Path("/proc/self/stat").exists():
        yield
        return
    before = set(_descendants(os.getpid()))
    yield
    left = {
        p: c
        for p, c in _descendants(os.getpid()).items()
        if p not in before and not any(k in c for k in _PERSISTENT)
    }
    if not left:
        return
    for p in left:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + 5  # reap the orphans (our children now): no zombie is left behind
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in left):
        for p in left:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(p, os.WNOHANG)
        time.sleep(0.01)
    warnings.warn(
        f"{request.node.nodeid} left {len(left)} process(es) running, killed: "
        + "; ".join(f"{p}: {c[:120]}" for p, c in left.items()),
        stacklevel=1,
    )


@pytest.fixture(autouse=True)
def _signal_handlers_given_back():
    """A Trainer holds SIGINT / SIGTERM from its first step until close(); a test that drops one unclosed left
    them with the next tests in this process (a Ctrl-C there read as "stop after this step")."""
    yield
    trainer = sys.modules.get("engine.trainer")
    if trainer is not None:
        trainer._restore_signal_handlers()  # gives back what it saved, never _on_signal itself


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
