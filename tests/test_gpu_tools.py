"""CPU tests of the GPU tools: the roofline (``benchmarks/floor.py``), the launch configs and shared-memory
estimate (``triton_configs``), and ``benchmarks/gpu_session.sh`` with stub tools."""

import os
import sys
from pathlib import Path

import processes
import pytest
from prefuse.kernels.linear_logprobs import triton_configs as cfg

from benchmarks import floor

ROOT = Path(__file__).resolve().parents[1]
LLAMA = floor.Shape("llama3-8b", 4096, 128_256, None, 16384, 0.5)
H200 = floor.PEAKS[1]

# ------------------------------------------------------------------------------------------------ roofline


def test_gemm_counts_and_flop():
    one = floor.gemm_flop(8192, 4096, 128_256)
    assert one == 2 * 8192 * 4096 * 128_256
    for backend, gemms in (("chunked", 4), ("torch", 4), ("triton", 4), ("loss-fused", 3)):
        row = floor.predict(backend, LLAMA, H200)
        assert row["gemms"] == gemms and row["tflop"] == pytest.approx(gemms * one / 1e12)
    with pytest.raises(ValueError, match="backend"):
        floor.predict("cuda", LLAMA, H200)


def test_predicted_times_follow_the_roofline():
    """Compute-bound GEMM phases at the assumed rate; ignored prompt tokens cost nothing; the loss-fused path
    saves one GEMM; a memory-bound pass is priced at the HBM bandwidth."""
    one_ms = floor.gemm_flop(8192, 4096, 128_256) / (H200.tflops * 1e12) * 1e3  # 10.9 ms
    assert one_ms == pytest.approx(10.9, abs=0.05)
    chunked = floor.predict("chunked", LLAMA, H200)
    fused = floor.predict("loss-fused", LLAMA, H200)
    assert 4 * one_ms < chunked["ms"] < 4.4 * one_ms
    assert 3 * one_ms < fused["ms"] < chunked["ms"] - one_ms * 0.9
    no_prompt = floor.predict("chunked", LLAMA._replace(tokens=8192, prompt=0.0), H200)
    assert no_prompt == chunked
    logits = 8192 * 128_256
    passes = floor.phases("chunked", LLAMA, H200.l2_mb)
    assert [p.flop for p in passes].count(0) == 2 and passes[1].bytes == 4 * logits


def test_triton_backward_counts_its_atomics():
    block_n, block_v = floor.TRITON_TILES["backward"]
    n, d, v = 8192, 4096, 128_256
    small_l2 = floor.phases("triton", LLAMA, l2_mb=1000)  # hidden rows fit: read once
    atomics = (-(-v // block_v) * n * d + -(-n // block_n) * v * d) * 8
    assert small_l2[1].bytes == 2 * (v * d * 2 + n * d * 2) + atomics + v * d * 6
    assert floor.phases("triton", LLAMA, l2_mb=50)[0].bytes > small_l2[0].bytes  # re-streamed past L2


def test_tuning_md_holds_the_current_table(tmp_path):
    text = floor.TUNING_MD.read_text()
    assert f"{floor.MARKERS[0]}\n{floor.roofline_markdown()}{floor.MARKERS[1]}" in text
    copy = tmp_path / "TUNING.md"
    copy.write_text(f"intro\n{floor.MARKERS[0]}\nstale\n{floor.MARKERS[1]}\nrest\n")
    floor.write_tuning(copy)
    assert (
        copy.read_text()
        == f"intro\n{floor.MARKERS[0]}\n{floor.roofline_markdown()}{floor.MARKERS[1]}\nrest\n"
    )
    copy.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        floor.write_tuning(copy)


def test_report_carries_the_predictions_labelled_as_such():
    from benchmarks import report

    meta = {"device": "cpu", "device_name": "test CPU", "cpu_model": "test", "torch_threads": 1,
            "preset": "smoke", "preset_description": "d", "started": "now", "duration_s": 1.0,
            "command": "c", "memory_method": "m", "versions": {"python": "3"}}  # fmt: skip
    text = report.markdown(meta, [], {})
    section = text.split("## Predicted GPU times (roofline predictions, not measurements)\n\n", 1)[1]
    assert section.startswith(floor.roofline_markdown())


# ---------------------------------------------------------------------------------------- launch configs

# (role, operand bytes, BLOCK_N, BLOCK_V, BLOCK_D, warps, stages) -> shared bytes (`metadata.shared`) of the
# kernel compiled for sm_90 with Triton 3.9 (`benchmarks.aot.compile_variant`, all flags on)
PTXAS_SHARED = {
    ("forward", 2, 64, 128, 64, 8, 3): 73_728,
    ("backward", 2, 64, 64, 64, 4, 3): 73_728,
    ("backward", 2, 64, 128, 64, 8, 3): 139_264,
    ("backward", 2, 64, 128, 128, 8, 3): 245_760,
    ("backward", 2, 64, 128, 128, 8, 4): 294_912,
    ("backward", 2, 128, 128, 64, 8, 3): 163_840,
    ("backward", 2, 64, 64, 128, 4, 4): 172_032,
    ("backward", 2, 128, 64, 64, 8, 4): 147_456,
    ("backward", 2, 64, 256, 64, 8, 2): 212_992,
    ("backward", 4, 64, 64, 64, 4, 3): 131_072,
    ("backward", 4, 64, 128, 32, 8, 3): 155_648,
    ("backward", 4, 64, 64, 32, 4, 3): 73_728,
    ("backward", 2, 64, 128, 32, 8, 3): 86_016,
    ("backward", 4, 64, 32, 16, 4, 3): 32_768,
}


@pytest.mark.parametrize("key", list(PTXAS_SHARED))
def test_shared_memory_estimate_is_an_upper_bound(key):
    """The estimate never under-counts what ptxas allocated (the configs over 227 KiB are pruned)."""
    role, size, n, v, d, warps, stages = key
    meta = dict(BLOCK_N=n, BLOCK_V=v, BLOCK_D=d, num_warps=warps, num_stages=stages)
    estimate = cfg.shared_bytes(meta, size, role)
    assert PTXAS_SHARED[key] <= estimate <= PTXAS_SHARED[key] + 32 * 1024
    if PTXAS_SHARED[key] > cfg.SHARED_LIMIT:
        assert not cfg.fits(meta, size, role)


def test_default_configs_fit_and_the_space_prunes():
    for role, by_size in cfg.DEFAULT_CONFIGS.items():
        for size, config in by_size.items():
            assert cfg.fits(config, size, role) and cfg.default_config(role, size) == config
    configs = cfg.gpu_configs()
    assert len(configs) == 2 * 3 * 3 * 2 * 3

    class Weight:
        def __init__(self, size):
            self.size = size

        def element_size(self):
            return self.size

    for role in ("forward", "backward"):
        kept = cfg._prune(configs, {"weight_ptr": Weight(2)}, role=role)
        assert 0 < len(kept) < len(configs)
        assert all(cfg.fits(cfg._meta(c), 2, role) for c in kept)


# ------------------------------------------------------------------------------------------ gpu_session.sh

SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
STUB_PYTHON = """\
#!/bin/bash
echo "python $*" >> "$CALLS"
case "$*" in
"-c import prefuse.kernels") exit 0 ;;
"-m benchmarks.aot") echo "160 variants, 0 failing the gate" ;;
"-m pytest "*) echo "3 passed"; exit 1 ;;
"-m benchmarks.floor "*) echo '{}' > "$5" ;;
esac
"""


@pytest.mark.skipif(sys.platform != "linux", reason="bash and timeout of a Linux machine")
def test_gpu_session_runs_every_step_and_reports_a_failure(tmp_path):
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(stub), "CALLS": str(tmp_path / "calls")}
    run = processes.run(["bash", str(SCRIPT), str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr  # the failing pytest step
    calls = (tmp_path / "calls").read_text()
    for command in (
        "-m benchmarks.aot",
        "-m pytest -m gpu",
        "-m benchmarks.floor --measure",
        "-m benchmarks --device cuda",
        "-m benchmarks.packing --device cuda",
    ):
        assert command in calls
    summary = (out / "summary.txt").read_text()
    assert "aot: exit 0" in summary and "pytest: exit 1" in summary and (out / "ceilings.json").exists()
    assert "packing: exit 0" in summary
