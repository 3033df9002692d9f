"""The way users scale out: ``accelerate launch`` with the configs prefuse ships (``prefuse.alignment.launch``),
2 CPU processes on gloo, running ``tests/launch_train.py`` -- PreferenceTrainer and the TRL drop-in
``PrefuseDPOTrainer``, 2 DPO steps of a tiny Llama -- against the same function in one process.

Each launch must report 2 processes and the engine its config asks for (``ddp``, ``zero3``, ``fsdp2``: a launch
that fell back to one process or to plain data parallelism fails), and log the single-process losses: step 1
(the same weights) and step 2 (after one synchronised update of sharded or replicated parameters) within
``rtol=1e-5`` -- the only difference is the order of fp32 sums over two processes' halves of the batch.

Slow (each launch starts 2 processes that import torch, transformers and DeepSpeed); every launch runs in a
temporary folder with its own caches (DeepSpeed JIT-builds its CPU shared-memory op into TORCH_EXTENSIONS_DIR,
set per run by conftest.py), in its own session, killed with everything it started on a timeout.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import launch_train
import processes
import pytest

pytest.importorskip("accelerate")
pytestmark = pytest.mark.slow

SCRIPT = Path(launch_train.__file__)
LAUNCH_TIMEOUT_S = 900
CONFIGS = {"ddp": (), "zero3": (), "fsdp2": ("--fsdp_cpu_ram_efficient_loading", "false")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """The one-process losses of each trainer (the same script, no launcher)."""
    return {
        kind: launch_train.train(kind, str(tmp_path_factory.mktemp(kind)))["losses"]
        for kind in ("preference", "trl")
    }


def test_every_config_is_shipped_and_found():
    from prefuse.alignment.launch import CONFIGS as SHIPPED
    from prefuse.alignment.launch import config_path

    assert set(SHIPPED) == set(CONFIGS)
    out = processes.run([sys.executable, "-m", "prefuse.alignment.launch", "zero3"], timeout=120, cwd="/")
    assert (
        out.returncode == 0
        and Path(out.stdout.strip()) == config_path("zero3")
        and config_path("zero3").is_file()
    )
    with pytest.raises(ValueError, match="name must be one of"):
        config_path("zero2")


@pytest.mark.parametrize("kind", ["preference", "trl"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_accelerate_launch_two_processes_gives_the_single_process_loss(tmp_path, single, config, kind):
    if kind == "trl":
        pytest.importorskip("trl")
    if config == "zero3":
        pytest.importorskip("deepspeed")
    from prefuse.alignment.launch import config_path

    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path(config)),
               "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
               *CONFIGS[config], str(SCRIPT), "--trainer", kind, "--out", str(tmp_path)]  # fmt: skip
    if config == "fsdp2":
        command.append("--fsdp-on-cpu")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "false"}
    out = processes.run(command, timeout=LAUNCH_TIMEOUT_S, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["processes"] == 2 and result["engine"] == config, result
    assert len(result["losses"]) == launch_train.STEPS
    assert result["losses"] == pytest.approx(single[kind], rel=1e-5, abs=1e-6), (
        result["losses"],
        single[kind],
    )
