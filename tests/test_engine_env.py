"""What importing the engine sets in the process environment."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_engine_turns_off_mkls_memory_manager_unless_the_user_set_it():
    """MKL's memory manager livelocked a CPU distill run (threads that ran a GEMM exiting while others
    allocated; engine/__init__.py): importing the engine sets MKL_DISABLE_FAST_MM before any GEMM, keeping a
    value the user set."""
    code = "import engine, os; print(os.environ.get('MKL_DISABLE_FAST_MM'))"
    for user, want in ((None, "1"), ("0", "0")):
        env = {k: v for k, v in os.environ.items() if k != "MKL_DISABLE_FAST_MM"}
        env["PYTHONPATH"] = str(ROOT)
        if user is not None:
            env["MKL_DISABLE_FAST_MM"] = user
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == want, (user, r.stdout, r.stderr[-2000:])
