"""The sm_90 compile gate (``python -m benchmarks.aot``): which modules it compiles, and that a variant which
spills or needs more shared memory than an H100 block has fails it."""

import os
import sys
import textwrap
from pathlib import Path

import processes
import pytest

from benchmarks import aot

ROOT = Path(__file__).resolve().parents[1]

TOY_MODULE = textwrap.dedent("""\
    import triton
    import triton.language as tl
    from prefuse.kernels.linear_logprobs.compile_variants import KernelVariant


    @triton.jit
    def _square(x_ptr, out_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        a = tl.load(x_ptr + offs[:, None] * N + offs[None, :])
        b = tl.load(x_ptr + offs[None, :] * N + offs[:, None])
        tl.store(out_ptr + offs[:, None] * N + offs[None, :], tl.dot(a, b))


    def compile_variants():
        signature = {"x_ptr": "*fp16", "out_ptr": "*fp32", "N": "constexpr"}
        return [
            KernelVariant(f"_square[{name}]", _square, signature, {"N": n}, num_warps=warps, num_stages=1)
            for name, n, warps in (("fits", 32, 4), ("spills", 128, 1), ("over", 256, 8))
        ]
    """)


def test_gate_verdicts():
    ok = aot.Compiled("k[ok]", "64x128x64 w8 s3", 200, 0, 139_264)
    assert ok.problems() == []
    assert aot.Compiled("k", "", 255, 48, 1000).problems() == ["spills 48 bytes"]
    assert aot.Compiled("k", "", 100, 0, aot.SHARED_LIMIT + 1).problems()[0].startswith("needs 232,449 B")
    assert aot.Compiled("k", "", 100, 0, aot.SHARED_LIMIT).problems() == []
    assert aot.Compiled("k", "", error="PTXASError: x").problems() == ["does not compile: PTXASError: x"]
    assert aot.row(ok) == "| k[ok] | 64x128x64 w8 s3 | 200 | 0 | 139,264 | ok |"


def test_every_triton_kernel_module_is_found():
    modules = aot.variant_modules()
    assert {
        "prefuse.kernels.linear_logprobs.triton_fwd",
        "prefuse.kernels.linear_logprobs.triton_bwd",
    } <= set(modules)
    assert "prefuse.kernels.linear_logprobs.compile_variants" not in modules  # the declaration, no kernels


@pytest.mark.slow  # three sm_90 compiles in a subprocess
def test_a_spilling_or_oversized_variant_fails_the_gate(tmp_path):
    """Three variants of one small kernel compiled for sm_90: the fitting one passes, the 128x128 fp32
    accumulator on one warp spills, the 256x256 dot needs 256 KiB of shared memory; the gate exits 1."""
    (tmp_path / "toy_aot_kernels.py").write_text(TOY_MODULE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    run = processes.run([sys.executable, "-m", "benchmarks.aot", "--modules", "toy_aot_kernels", "--jobs", "1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    rows = {
        line.split(" | ")[0].strip("| "): line for line in run.stdout.splitlines() if line.startswith("| _")
    }
    assert rows["_square[fits]"].endswith("| ok |")
    assert "spills" in rows["_square[spills]"]
    assert "needs 262,144 B of shared memory" in rows["_square[over]"]
    assert "3 variants, 2 failing the gate" in run.stdout
