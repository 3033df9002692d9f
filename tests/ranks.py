"""Launch ``torch.distributed`` ranks for the tests: one spawned CPU process per rank in a gloo group.

A file store in a temporary folder (no port is reserved, none can be taken by someone else), a 60 s gloo timeout
on every collective and a wall-clock limit on the whole launch, so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time

import pytest
import torch
import torch.multiprocessing as mp
from processes import kill_group

WORLD = 2
LAUNCH_TIMEOUT_S = 300  # a 2-rank test takes ~10 s on a quiet 2-core machine: room for a loaded one


def _entry(rank: int, world: int, init_file: str, out_dir: str, fn, args: tuple) -> None:
    import torch.distributed as dist

    os.setsid()  # a session of its own: a timeout kills the rank with whatever it started (a compiler ...)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.save(fn(rank, world, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(fn, *args, world: int = WORLD, timeout: float = LAUNCH_TIMEOUT_S) -> list:
    """``[fn(rank, world, *args) for each rank]``, each run in its own spawned process of a gloo group.

    A rank that raises fails the test with its traceback; a launch still running after ``timeout`` seconds is
    killed with everything each rank started (its session) and fails the test (a collective that never
    completes)."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _entry,
            args=(world, os.path.join(tmp, "store"), tmp, fn, args),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    pytest.fail(f"{world} gloo ranks still running after {timeout:.0f} s: a hang")
        finally:
            for process in ctx.processes:
                kill_group(process.pid)
                if process.is_alive():
                    process.kill()
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]
