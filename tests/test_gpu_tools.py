"""CPU tests of the GPU session's tools: the floor arithmetic (``benchmarks/floor.py --dry-run``), the tuned-config
table and how a CUDA launch picks its config (``triton_configs``), the tuning sweep's pure parts
(``benchmarks/tune.py``), and the plumbing of ``benchmarks/gpu_session.sh`` with stub tools."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from prefuse.kernels.linear_logprobs import triton_configs as cfg

from benchmarks import floor, tune

ROOT = Path(__file__).resolve().parents[1]

D, V = 4096, 128_256

# ---------------------------------------------------------------------------------------- floor arithmetic


def test_gemm_counts_and_floor_times():
    one = 2 * 16384 * D * V
    assert floor.gemm_flop(16384, D, V) == one
    rows = {r["variant"]: r for r in floor.plan(16384)}
    assert {k: (r["counted_gemms"], r["executed_gemms"]) for k, r in rows.items()} == {
        "fwd": (1, 1),
        "fwd+bwd": (4, 4),
        "fwd+bwd frozen head": (3, 3),
        "fwd+bwd deterministic": (4, 5),
    }
    fb = rows["fwd+bwd"]
    assert fb["counted_tflop"] == pytest.approx(4 * one / 1e12)
    h100 = fb["floor_ms"]["h100"]
    assert h100["bound"] == "compute"
    assert h100["floor_ms"] == pytest.approx(4 * one / 798e12 * 1e3)  # 86.3 ms
    assert h100["floor_ms"] == pytest.approx(86.3, abs=0.1)
    assert h100["target_ms"] == pytest.approx(h100["floor_ms"] / 0.7)
    assert fb["floor_ms"]["h200"]["floor_ms"] == pytest.approx(4 * one / 788e12 * 1e3)


def test_fewest_bytes():
    n, d, v = 10, 4, 6
    fwd = (n * d + v * d) * 2 + n * 8 + 2 * n * 4
    assert floor.min_bytes(n, d, v, backward=False, trainable=False) == fwd
    frozen = fwd + (n * d + v * d) * 2 + n * 8 + 2 * n * 4 + n * d * 2
    assert floor.min_bytes(n, d, v, backward=True, trainable=False) == frozen
    assert floor.min_bytes(n, d, v, backward=True, trainable=True) == frozen + v * d * 2


def test_tile_intensity_and_weight_gradient_traffic():
    assert floor.tile_intensity(128, 128) == 64.0
    assert floor.tile_intensity(64, 128) == pytest.approx(128 / 3)
    w = floor.weight_grad_traffic(16384, D, V, 64)
    assert w["row_blocks"] == 256
    assert w["atomic_adds"] == 256 * V * D
    assert w["atomic_flop_per_byte"] == pytest.approx(64 / 2)
    assert w["slab_bytes"] == 2 * w["atomic_bytes"]
    assert floor.weight_grad_traffic(100, D, V, 64)["row_blocks"] == 2  # a partial row block counts


def test_dry_run_cli_prints_json_without_torch():
    """The dry run is plain arithmetic: it imports neither torch nor triton, and its JSON has every case."""
    script = (
        "import sys, runpy; sys.argv = ['floor', '--dry-run', '--json', '-'];"
        "\ntry: runpy.run_module('benchmarks.floor', run_name='__main__')"
        "\nexcept SystemExit: pass"
        "\nassert 'torch' not in sys.modules and 'triton' not in sys.modules, 'dry run imported torch'"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [c["tokens"] for c in data["cases"]] == [n for n in floor.TOKENS for _ in floor.VARIANTS]
    assert data["head"] == {"name": "llama3-8b", "D": D, "V": V, "dtype": "bfloat16"}
    markdown = floor.dry_run_markdown(data)
    assert "| 16,384 | fwd+bwd | 4 (4) | 68.9 |" in markdown


def test_measured_markdown_and_summary():
    case = {
        "tokens": 16384, "variant": "fwd+bwd", "counted_gemms": 4, "executed_gemms": 4, "ms": 100.0,
        "floor_ms": 80.0, "fraction_of_floor": 0.8, "counted_tflops": 640.0, "executed_tflops": 640.0,
        "meets_target": True, "peak_mem_gib": 5.0,
        "configs": [{"kernel": "_forward_kernel", "source": "table", "key": {},
                     "config": {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3}}],
    }  # fmt: skip
    data = {
        "environment": {"device": "X", "torch": "t", "triton": "r", "cuda": "c", "sms": 132},
        "ceilings": {
            "matmul_tflops": 800.0,
            "head_gemm_tflops": 700.0,
            "copy_tbps": 3.0,
            "l2_read_tbps": None,
        },
        "cases": [case],
        "skipped": ["N=65536 fwd: skipped"],
    }
    text = floor.measured_markdown(data)
    assert "| 16,384 | fwd+bwd | 4 (4) | 100.00 | 80.00 | 80.0% ✓ |" in text
    assert "_forward_kernel: table 128x128x64 w8 s3" in text and "L2 read not measured" in text
    assert floor.summary_line(data).endswith("N=16384 trainable 80%")


@pytest.mark.interpret
def test_l2_read_kernel_reads_the_blocks_it_claims():
    """The L2-bandwidth kernel under the interpreter: program p sums blocks (p + i·programs) mod blocks."""
    x = torch.randn(5 * 64)
    out, nbytes = floor.l2_read(x, programs=3, iters=4, block=64)
    blocks = x.view(5, 64)
    expected = torch.stack([sum(blocks[(p + i * 3) % 5] for i in range(4)) for p in range(3)])
    torch.testing.assert_close(out, expected)
    assert nbytes == 3 * 4 * 64 * 4


# ----------------------------------------------------------------------------------- the tuned-config table

CONFIG_A = {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3}
CONFIG_B = {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 4}
CONFIG_C = {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32, "num_warps": 4, "num_stages": 2}
KEY = {"D": D, "V": V, "HAS_SOFTCAP": False}


def entry(config, bucket, *, device="NVIDIA H100 80GB HBM3", capability="9.0", kernel="_fake_kernel", **key):
    return {"device": device, "capability": capability, "kernel": kernel, "dtype": "bfloat16",
            "key": {**KEY, "N_BUCKET": bucket, **key}, "config": config, "ms": 1.0}  # fmt: skip


def test_lookup_prefers_device_then_exact_then_nearest_bucket():
    table = cfg.TunedTable([
        entry(CONFIG_A, 4096),
        entry(CONFIG_B, 65536),
        entry(CONFIG_C, 16384, device="NVIDIA H200"),  # same capability, other device
    ])  # fmt: skip

    def pick(bucket, device="NVIDIA H100 80GB HBM3", capability="9.0", **key):
        found = table.lookup(
            "_fake_kernel", "bfloat16", {**KEY, "N_BUCKET": bucket, **key}, device, capability
        )
        return None if found is None else found["config"]

    assert pick(4096) == CONFIG_A
    assert pick(65536) == CONFIG_B
    assert pick(8192) == CONFIG_A  # nearest in powers of two
    assert pick(32768) == CONFIG_B
    assert pick(16384) == CONFIG_B  # equidistant: the larger bucket; the H200 entry loses to this device's
    assert pick(16384, device="NVIDIA H200") == CONFIG_C
    assert pick(16384, device="NVIDIA H100 PCIe") == CONFIG_C  # no entry of this name: any 9.0 entry
    assert pick(4096, capability="8.0", device="A100") is None
    assert pick(4096, HAS_SOFTCAP=True) is None  # other flags: no entry
    assert table.lookup("_other_kernel", "bfloat16", {**KEY, "N_BUCKET": 4096}, "x", "9.0") is None
    assert table.lookup("_fake_kernel", "float32", {**KEY, "N_BUCKET": 4096}, "x", "9.0") is None


def test_table_files_are_validated_and_reloaded(tmp_path, monkeypatch):
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"format": 99, "entries": []}))
    with pytest.raises(ValueError, match="format"):
        cfg.TunedTable.load(path)
    with pytest.raises(ValueError, match="lacks"):
        cfg.TunedTable([{"device": "x", "kernel": "k"}])
    monkeypatch.setenv("PREFUSE_TUNED_CONFIGS", str(path))
    path.write_text(json.dumps({"format": 1, "entries": [entry(CONFIG_A, 4096)]}))
    assert cfg.table_path() == path and len(cfg.load_table().entries) == 1
    path.write_text(json.dumps({"format": 1, "entries": [entry(CONFIG_A, 4096), entry(CONFIG_B, 8192)]}))
    os.utime(path, (1, 2))  # a new modification time: re-read
    assert len(cfg.load_table().entries) == 2
    monkeypatch.setenv("PREFUSE_TUNED_CONFIGS", "")
    assert cfg.table_path() is None and cfg.load_table() is None
    monkeypatch.delenv("PREFUSE_TUNED_CONFIGS")
    assert cfg.table_path() == cfg.DEFAULT_TABLE


class FakeJIT:
    """Stands in for a compiled ``triton.jit`` function: records ``fn[grid](*args, **kwargs)``."""

    def __init__(self, calls):
        self.calls = calls
        self.__name__ = "_fake_kernel"

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(("direct", grid, args, kwargs))


class FakeAutotuner:
    """Stands in for ``triton.autotune(...)(kernel)``: ``kernel[grid](...)`` is the autotuned launch."""

    arg_names = ["hidden_ptr", "weight_ptr", "N", "V", "D", "N_BUCKET"]

    def __init__(self):
        self.calls = []
        self.fn = FakeJIT(self.calls)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(("autotune", grid, args, kwargs))


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A registered fake CUDA kernel on an 'H100' with 227 KiB of shared memory, and a table holding
    CONFIG_B for it at the 4096-token bucket."""
    monkeypatch.setitem(
        cfg.KERNELS, "_fake_kernel", cfg.KernelSpec(("D", "V", "N_BUCKET", "HAS_SOFTCAP"), 64)
    )
    monkeypatch.setattr(cfg, "device_signature", lambda index: ("NVIDIA H100 80GB HBM3", "9.0"))
    monkeypatch.setattr(cfg, "_shared_memory_bytes", lambda index: 232_448)
    monkeypatch.setattr(cfg, "_device_index", lambda tensor: 0)
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"format": 1, "entries": [entry(CONFIG_B, 4096)]}))
    monkeypatch.setenv("PREFUSE_TUNED_CONFIGS", str(path))
    monkeypatch.delenv("PREFUSE_AUTOTUNE", raising=False)
    kernel = FakeAutotuner()

    def launch(n_tokens, **flags):
        hidden, weight = torch.empty(4, 8, dtype=torch.bfloat16), torch.empty(4, 8, dtype=torch.bfloat16)
        grid = "grid"
        cfg.launch(kernel, grid, hidden, weight, n_tokens, V, D, cfg.token_bucket(n_tokens),
                   HAS_SOFTCAP=flags.get("softcap", False))  # fmt: skip
        kind, _, args, kwargs = kernel.calls[-1]
        return kind, {k: kwargs[k] for k in cfg.META_KEYS if k in kwargs}

    launch.kernel, launch.path = kernel, path
    return launch


def test_launch_uses_the_tuned_table(fake):
    with cfg.recording() as records:
        assert fake(4000) == ("direct", CONFIG_B)  # bucket 4096: the tabled config, launched directly
    assert records[0].source == "table" and records[0].key == {**KEY, "N_BUCKET": 4096}
    assert fake(9000) == ("direct", CONFIG_B)  # bucket 16384: the nearest tuned bucket
    assert fake(4000, softcap=True) == ("autotune", {})  # no entry with a softcap: Triton's autotuner


def test_autotune_modes(fake, monkeypatch):
    monkeypatch.setenv("PREFUSE_AUTOTUNE", "force")
    assert fake(4000) == ("autotune", {})
    monkeypatch.setenv("PREFUSE_AUTOTUNE", "off")
    assert fake(4000) == ("direct", CONFIG_B)  # the table still applies
    assert fake(4000, softcap=True) == ("direct", cfg.DEFAULT_PREFERENCE[0])  # no entry: the fixed default
    monkeypatch.setenv("PREFUSE_AUTOTUNE", "sometimes")
    with pytest.raises(ValueError, match="PREFUSE_AUTOTUNE"):
        fake(4000)


def test_forced_configs_and_dry_recording(fake):
    with cfg.forced_configs({"_fake_kernel": CONFIG_C}):
        assert fake(4000) == ("direct", CONFIG_C)
    assert fake(4000) == ("direct", CONFIG_B)
    calls = len(fake.kernel.calls)
    with cfg.recording(keep_args=True, dry=True) as records:
        hidden, weight = torch.empty(4, 8, dtype=torch.bfloat16), torch.empty(4, 8, dtype=torch.bfloat16)
        cfg.launch(fake.kernel, "grid", hidden, weight, 100, V, D, 128, HAS_SOFTCAP=False)
    assert len(fake.kernel.calls) == calls  # nothing launched
    assert records[0].args[2:] == (100, V, D, 128) and records[0].kwargs == {"HAS_SOFTCAP": False}


def test_a_tabled_config_that_does_not_fit_is_skipped(fake, monkeypatch):
    monkeypatch.setattr(cfg, "_shared_memory_bytes", lambda index: 100_000)  # smaller than CONFIG_B needs
    monkeypatch.setenv("PREFUSE_AUTOTUNE", "off")
    kind, config = fake(4000)
    assert kind == "direct" and config != CONFIG_B
    assert cfg.fits(config, 2, 100_000, 64)


def test_real_kernels_are_registered_with_their_autotune_keys():
    from prefuse.kernels.linear_logprobs import triton_bwd, triton_fwd  # noqa: F401 - registers the kernels

    assert cfg.KERNELS["_forward_kernel"].key == ("D", "V", "N_BUCKET", "HAS_SOFTCAP")
    assert cfg.KERNELS["_backward_kernel"].key[-4:] == ("NEED_H", "NEED_W", "NEED_B", "ATOMIC_H")
    assert cfg.KERNELS["_weight_kernel"].tile_per_thread == cfg.BACKWARD_TILE_PER_THREAD


# -------------------------------------------------------------------------------------------- tuning sweep


def test_tune_candidates_fit_and_start_with_the_default():
    from prefuse.kernels.linear_logprobs import triton_bwd, triton_fwd  # noqa: F401 - registers the kernels

    for name, budget in (("_forward_kernel", 64), ("_backward_kernel", 32)):
        for space in ("hopper", "full"):
            cands = tune.candidates(name, 2, tune.H100_SHARED_BYTES, space)
            assert cands[0] == cfg.DEFAULT_PREFERENCE[0]
            assert len({json.dumps(c, sort_keys=True) for c in cands}) == len(cands)
            assert all(cfg.fits(c, 2, tune.H100_SHARED_BYTES, budget) for c in cands)
        hopper = tune.candidates(name, 2, tune.H100_SHARED_BYTES, "hopper")
        assert any(c["num_warps"] == 16 for c in hopper)  # the larger tiles of EXTRA_CANDIDATES
    with pytest.raises(ValueError):
        tune.candidates("_forward_kernel", 2, tune.H100_SHARED_BYTES, "everything")


def test_tune_merge_plan_and_specialisation():
    old = [entry(CONFIG_A, 4096), entry(CONFIG_A, 8192), entry(CONFIG_A, 4096, device="NVIDIA H200")]
    new = [entry(CONFIG_B, 4096)]
    merged = tune.merge(old, new)
    assert merged == [old[1], old[2], new[0]]
    cfg.TunedTable(merged)  # what tune writes, the table reads
    assert tune.parse_plan(None, None, None) == list(tune.DEFAULT_PLAN)
    assert tune.DEFAULT_PLAN[0] == ("llama3-8b", 16384, "fwd")
    assert tune.parse_plan(["gemma2-9b"], [4096], ["bwd"]) == [("gemma2-9b", 4096, "bwd")]
    assert tune._specialisation(4096) == tune._specialisation(8192) != tune._specialisation(4097)
    assert tune._specialisation(1) != tune._specialisation(3)
    assert tune._spec(torch.empty(1, dtype=torch.bfloat16)) == ("__dtype__", "bfloat16")
    assert tune._restore(("__dtype__", "bfloat16"), mock=False) is torch.bfloat16


@pytest.mark.slow  # a subprocess that imports the tuning module and its Triton kernels
def test_tune_list_runs_without_a_gpu():
    out = subprocess.run([sys.executable, "-m", "benchmarks.tune", "--out", "unused", "--list"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith("llama3-8b N=16384 fwd: _forward_kernel (")


# ------------------------------------------------------------------------------------------ gpu_session.sh

SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"


def test_gpu_session_script_parses():
    out = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    usage = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, cwd=ROOT)
    assert usage.returncode == 2 and "gpu_session.sh check" in usage.stdout


def _heredoc(opening: str) -> str:
    """The text of the script's heredoc that starts on the line `opening`."""
    lines = SCRIPT.read_text().splitlines()
    start = lines.index(opening) + 1
    return "\n".join(lines[start : lines.index("EOF", start)]) + "\n"


def test_gpu_session_python_heredocs_compile():
    compile(_heredoc("  \"$PY\" - <<'EOF'"), "env_info", "exec")
    compile(_heredoc("  cat >\"$WORK/driver.py\" <<'EOF'"), "driver.py", "exec")


@pytest.mark.slow  # the session's sanity driver in a subprocess, under the interpreter
@pytest.mark.interpret
def test_gpu_session_sanity_driver_under_the_interpreter(tmp_path):
    """The small-shape driver the GPU session runs plainly and under compute-sanitizer, at a smaller shape on
    CPU tensors: its float64 reference and tolerances accept the kernels."""
    driver = tmp_path / "driver.py"
    driver.write_text(_heredoc("  cat >\"$WORK/driver.py\" <<'EOF'"))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PREFUSE_DRIVER_SHAPE": "20,17,40,16,9"}
    out = subprocess.run([sys.executable, str(driver)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "sanity: all within tolerance" in out.stdout


STUB_PYTHON = """\
#!/bin/bash
case "$1 $2" in
"-m pytest") echo "12 passed, 3 skipped in 1.0s" ;;
"-m benchmarks.tune") mkdir -p "$4"; echo '{"format": 1, "entries": []}' > "$4/tuned_configs.json";
  echo '{}' > "$4/tune_timings.json"; echo "[tune] 0 entries written to $4" ;;
"-m benchmarks.floor") mkdir -p "$4"; echo '{}' > "$4/floor.json"; echo '| a |' > "$4/floor.md";
  echo "floor summary: matmul 800 TFLOP/s" ;;
"-m benchmarks") sleep 100 ;;
"- ") cat > /dev/null; echo "environment" ;;
*) if [[ $1 == *driver.py ]]; then echo "sanity: all within tolerance"; else echo "python $*"; fi ;;
esac
"""


@pytest.mark.skipif(sys.platform != "linux", reason="bash, timeout and tar of a Linux machine")
def test_gpu_session_plumbing_with_stub_tools(tmp_path):
    """Both commands with stub GPU tools and a stub python under a short deadline: every step is noted,
    a step over the deadline is cut, and $OUT gets at most 8 files."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "python").write_text(STUB_PYTHON)
    for tool in ("nvidia-smi", "nvcc", "ncu"):
        (stubs / tool).write_text("#!/bin/bash\necho stub\n")
    (stubs / "compute-sanitizer").write_text(textwrap.dedent("""\
        #!/bin/bash
        while [[ $1 == --* ]]; do shift; [[ $1 != --* ]] && shift; done
        "$@"; echo "========= ERROR SUMMARY: 0 errors"
        """))  # fmt: skip
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    for command, expected in (
        ("check", {"summary.md", "check-logs.tar.gz", "tuned_configs.json", "tune_timings.json"}),
        ("bench", {"summary.md", "bench-results.tar.gz", "floor.json", "floor.md"}),
    ):
        out_dir = tmp_path / command
        env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "PYTHON": str(stubs / "python"),
               "OUT": str(out_dir), "GPU_SESSION_BUDGET_S": "6", "GPU_SESSION_RESERVE_S": "1",
               "GPU_SESSION_MIN_STEP_S": "1"}  # fmt: skip
        run = subprocess.run(["bash", str(SCRIPT), command], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)  # fmt: skip
        assert run.returncode == 0, run.stderr
        files = {p.name for p in out_dir.iterdir()}
        assert files == expected and len(files) <= 8
        summary = (out_dir / "summary.md").read_text()
        if command == "check":
            for line in ("| pytest | ok |", "12 passed", "ERROR SUMMARY: 0 errors", "| tune | ok |"):
                assert line in summary
        else:
            assert "| floor | ok |" in summary and "| bench | TIMED OUT" in summary
            assert "| racecheck | skipped |" in summary
