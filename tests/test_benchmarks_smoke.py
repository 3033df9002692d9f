"""Smoke pass of the benchmark suite (``benchmarks/``) at tiny shapes: it runs end to end, writes its files,
its numbers are sane and every contender's answer matches the float64 reference.

Benchmarks are never timed tests: nothing here asserts a speed or a memory ratio.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import processes
import pytest
import torch

from benchmarks import report
from benchmarks.accuracy import tolerance
from benchmarks.plan import Case, get_preset
from benchmarks.runner import in_process, run_cases

pytestmark = (
    pytest.mark.slow
)  # runs the benchmark suite in subprocesses: CI runs it, `-m "not slow"` skips it

REPO = Path(__file__).resolve().parents[1]

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
HAS_TRL = importlib.util.find_spec("trl") is not None
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
MIB = 2**20


def _env() -> dict[str, str]:
    """The subprocesses' environment: the repository importable, one thread (tiny shapes on a busy machine)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def smoke_results() -> list[dict]:
    """Every workload, variant and contender of the smoke preset, measured in this process (one thread: at
    tiny shapes a busy machine's thread-pool barriers cost more than the work)."""
    preset = get_preset("cpu", smoke=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_cases(preset.cases(), preset.contenders, preset.timing, isolate=False, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)


def test_every_workload_runs_and_matches_the_reference(smoke_results):
    assert {r["workload"] for r in smoke_results} == {"logprobs", "dpo", "sampo", "kto", "factalign", "sppo"}
    failed = [
        (r["workload"], r["contender"], r.get("reason"))
        for r in smoke_results
        if r["status"] != "ok" and r["status"] != "skipped"
    ]
    assert not failed
    for rec in smoke_results:
        if rec["status"] != "ok":
            continue
        case = Case.from_dict(rec["case"])
        assert 0 < rec["time"]["median_s"] < 60 and math.isfinite(rec["time"]["median_s"])
        assert 0 <= rec["memory"]["peak_bytes"] < 4096 * MIB
        assert 0 < rec["scored_tokens"] <= rec["tokens"]
        assert rec["error"] <= tolerance(case), (rec["workload"], rec["contender"], rec["error"])


def test_contenders_run_where_they_exist_and_say_why_not(smoke_results):
    by_key = {(r["workload"], r["head"], r["variant"], r["rows"], r["contender"]): r for r in smoke_results}
    for (workload, head, _, _, contender), rec in by_key.items():
        if contender in ("naive", "prefuse"):
            assert rec["status"] == "ok", rec.get("reason")
        elif contender == "prefuse-op":  # the losses' op path beside the loss-fused path, on DPO and KTO
            assert (rec["status"] == "ok") == (workload in ("dpo", "kto")), (workload, rec.get("reason"))
            if rec["status"] != "ok":
                assert rec["reason"]
        elif contender == "trl":  # TRL's own head runs every workload, on CPU too
            assert rec["status"] == ("ok" if HAS_TRL else "skipped"), (workload, head, rec.get("reason"))
        elif contender == "cce":  # Triton-only: a CPU run says so
            assert rec["status"] == "skipped" and "CUDA" in rec["reason"]
        elif contender == "liger":
            liger_runs = HAS_LIGER and workload in ("dpo", "kto") and "softcap" not in head
            assert (rec["status"] == "ok") == liger_runs, (workload, head, rec.get("reason"))
            if not liger_runs:
                assert rec["reason"]


def test_report_files_from_results(smoke_results, tmp_path):
    meta = {
        "device": "cpu",
        "device_name": "test CPU",
        "cpu_model": "test",
        "torch_threads": 1,
        "started": "now",
        "duration_s": 1.0,
        "command": "python -m benchmarks --smoke",
        "memory_method": "in-process",
        "versions": {
            "python": "3",
            "torch": "2",
            "triton": None,
            "liger-kernel": None,
            "cut-cross-entropy": None,
            "prefuse": "0",
        },
        **report.preset_meta(get_preset("cpu", smoke=True)),
    }
    paths = report.write(tmp_path, meta, smoke_results)
    text = paths["markdown"].read_text()
    for title in report.WORKLOAD_TITLES.values():
        assert title in text
    assert "prefuse/naive" in text and "prefuse/prefuse-op" in text
    assert "Peak-memory growth per 1,000 tokens" in text
    if HAS_LIGER:
        assert "prefuse/liger" in text
    if HAS_TRL:
        assert "prefuse/trl" in text
    data = json.loads(paths["json"].read_text())
    assert len(data["results"]) == len(smoke_results)
    pngs = sorted(tmp_path.glob("*.png"))
    if HAS_MATPLOTLIB:
        assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
        assert all(f"]({p.name})" in text for p in pngs)


def test_measurement_in_a_fresh_process_grows_with_tokens():
    """The CPU report's path: a forked process per measurement, peak RSS above the inputs."""
    from benchmarks.plan import TINY_HEAD, Timing
    from benchmarks.runner import FreshProcess

    timing = Timing(warmup=1, min_repeats=1, max_repeats=1, min_time_s=0.0, timeout_s=300.0)
    run = FreshProcess()
    small, _ = run(Case("logprobs", TINY_HEAD, 2, 32), "naive", timing)
    large, out = run(Case("logprobs", TINY_HEAD, 64, 256), "naive", timing)
    assert small["status"] == large["status"] == "ok", (small.get("reason"), large.get("reason"))
    assert large["memory"]["method"] == "peak RSS, fresh process"
    # 16k tokens x 512 vocab x 4 bytes = 32 MiB per logits-sized buffer: naive holds several of them
    assert large["memory"]["peak_bytes"] - small["memory"]["peak_bytes"] > 32 * MIB
    assert out.shape == (64, 255)
    same, _ = in_process(Case("logprobs", TINY_HEAD, 2, 32), "prefuse", timing)
    assert same["status"] == "ok"


def test_command_line_writes_json_markdown_and_plots(tmp_path):
    proc = processes.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--device",
            "cpu",
            "--smoke",
            "--only",
            "dpo",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (out_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert out_dir.name.startswith("cpu-")
    data = json.loads((out_dir / "results.json").read_text())
    meta = data["meta"]
    for key in ("python", "torch", "triton", "trl", "liger-kernel", "cut-cross-entropy"):
        assert key in meta["versions"]
    assert (
        meta["cpu_model"] and meta["device_name"] and meta["memory_method"].startswith("peak RSS of a fresh")
    )
    assert {r["workload"] for r in data["results"]} == {"dpo"}
    assert "| shape |" in (out_dir / "results.md").read_text()
    assert "| shape |" in proc.stdout  # the table is printed
    if HAS_MATPLOTLIB:
        assert list(out_dir.glob("*.png"))


def test_pytest_benchmark_entry_collects_and_runs():
    pytest.importorskip("pytest_benchmark")
    proc = processes.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "benchmarks/",
            "--benchmark-disable",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "tiny-d64-v512 and (naive or trl or prefuse) and not fwd-prompt",
        ],
        cwd=REPO,
        env={**_env(), "PREFUSE_BENCH_PRESET": "smoke"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout
