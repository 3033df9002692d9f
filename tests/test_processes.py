"""The tests' child-process helper: a timed-out command is killed with everything it started."""

import os
import time

import processes
import pytest


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
def test_a_timeout_kills_grandchildren_in_their_own_process_groups(tmp_path):
    """As ninja runs each compiler in a process group of its own: ``set -m`` gives the background job its own
    group, which a process-group kill of the command would miss."""
    pidfile = tmp_path / "pid"
    script = f"set -m; sleep 300 & echo $! > {pidfile}; wait"
    with pytest.raises(pytest.fail.Exception, match="ran past 3 s and was killed"):
        processes.run(["bash", "-c", script], timeout=3)
    grandchild = int(pidfile.read_text())
    for _ in range(50):
        if not _alive(grandchild):
            break
        time.sleep(0.1)
    assert not _alive(grandchild)


def test_run_returns_the_output():
    out = processes.run(["bash", "-c", "echo hi; echo oops >&2; exit 3"], timeout=30)
    assert (out.returncode, out.stdout, out.stderr) == (3, "hi\n", "oops\n")
