"""Child processes of the tests: each in its own session, killed with its whole process group on a timeout.

A test that runs a command (the CLI, a benchmark, ``accelerate launch``) or spawns ranks can time out while a
grandchild -- a compiler building a JIT extension, a rank of a launcher -- still runs. Killing only the child
would leave the grandchild holding a build lock or a port for the next run; killing every process of the
child's session leaves nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest


def kill_group(pid: int) -> None:
    """SIGKILL everything of the session led by ``pid`` (a child started with ``start_new_session=True`` or that
    called ``os.setsid()``): its process group and the groups its descendants made for themselves (ninja runs
    every compiler in a group of its own), i.e. every process whose session id is ``pid``."""
    for group in {pid, *_groups_of_session(pid)}:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _groups_of_session(sid: int) -> set[int]:
    groups = set()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session ...
        except OSError:
            continue
        if int(fields[3]) == sid:
            groups.add(int(fields[2]))
    return groups


def run(command: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True, ...)`` in a new session; past ``timeout``
    seconds the whole group is killed and the test fails with the output so far."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    with subprocess.Popen(command, start_new_session=True, **_popen_kwargs(kwargs)) as proc:
        try:
            stdout, stderr = proc.communicate(input=kwargs.get("input"), timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            stdout, stderr = proc.communicate()
            pytest.fail(
                f"{command[:4]} ran past {timeout:.0f} s and was killed with its process group\n"
                f"{(stdout or '')[-3000:]}\n{(stderr or '')[-3000:]}"
            )
        finally:
            kill_group(proc.pid)  # whatever it left behind (a daemon, a stuck rank)
    result = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    if kwargs.get("check"):
        result.check_returncode()
    return result


def _popen_kwargs(kwargs: dict) -> dict:
    popen = {k: v for k, v in kwargs.items() if k not in ("capture_output", "input", "check")}
    if kwargs.get("capture_output"):
        popen["stdout"], popen["stderr"] = subprocess.PIPE, subprocess.PIPE
    if kwargs.get("input") is not None:
        popen["stdin"] = subprocess.PIPE
    return popen
