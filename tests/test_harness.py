"""The test harness itself (tests/conftest.py): a process a test leaves behind does not outlive the test."""

import subprocess
import sys
import time

from conftest import _descendants  # noqa: E402


def test_an_orphan_a_test_leaves_is_still_found_below_the_test_process():
    """A grandchild whose parent exited (a SIGKILLed torchrun's worker, say) was re-parented to init, out of
    reach of the check that kills what a test left running; the test process is now its subreaper."""
    import os

    code = (
        "import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], "
        "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)"
    )
    orphan = int(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    )
    try:
        deadline = time.monotonic() + 10
        while orphan not in _descendants(os.getpid()):
            assert time.monotonic() < deadline, f"orphan {orphan} is not below the test process"
            time.sleep(0.01)
        assert "time.sleep(300)" in _descendants(os.getpid())[orphan]
    finally:
        os.kill(orphan, 9)
        os.waitpid(orphan, 0)  # ours to reap: re-parented to this process
