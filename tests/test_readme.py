"""The README runs: its commands come first, every ``python`` block runs from the repository root, its sample
output is what its first command prints; and the repository root does not break the ecosystem's imports."""

import os
import re
import subprocess
import sys
from pathlib import Path

import processes
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PYTHON_BLOCKS = re.findall(r"^```python\n(.*?)^```$", README, flags=re.S | re.M)


def _run_at_root(code: str, tmp_path: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter whose working directory is the repository root (as after the README's
    commands), the temporary folder of ``tmp_path`` as ``TMPDIR`` (the blocks write only there)."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    return processes.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# ---------------------------------------------------------------------------------------------- the root
@pytest.mark.slow  # a subprocess importing transformers, trl and peft
def test_the_ecosystem_imports_from_the_repository_root(tmp_path):
    """transformers probes for PyPI's ``kernels`` (its hub kernels); from the root it finds the ``kernels/``
    folder, which must read as "not installed" and never as prefuse.kernels."""
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    done = _run_at_root(
        "import transformers, trl, peft, prefuse.alignment, prefuse.kernels\n"
        "from transformers.utils import is_kernels_available\n"
        "import kernels\n"
        "assert not is_kernels_available()\n"
        "assert not hasattr(kernels, 'linear_logprobs') and getattr(kernels, '__file__', None) is None\n"
        "from transformers import LlamaForCausalLM\n"
        "print('ok')\n",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


@pytest.mark.slow  # a subprocess importing transformers
def test_the_root_folder_steps_aside_for_an_installed_kernels(tmp_path):
    """With a real ``kernels`` distribution further down ``sys.path``, the root folder hands the name to it."""
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '0.9.0'\nWHO = 'the installed kernels'\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    done = processes.run(
        [sys.executable, "-c", "import kernels, prefuse.kernels; print(kernels.WHO)"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "the installed kernels"


# ---------------------------------------------------------------------------------------------- the README
def test_readme_starts_with_the_two_commands():
    block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if not line.startswith("#")]
    assert len(commands) == 2
    main_job, tests = commands
    assert main_job.endswith('pip install -e ".[trl,plot]" && prefuse')
    assert tests.endswith('pip install -e ".[dev,trl,deepspeed]" && python -m pytest')
    assert "deepspeed" not in main_job  # what a user installs stays lean
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install --quiet -e ".[dev,trl,deepspeed]"' in ci  # CI installs what the test command installs


def test_readme_sample_output_is_the_default_command():
    """The sample output is ``prefuse`` with its defaults: the step count, batch, progress lines and heads."""
    from prefuse.alignment.cli import build_parser

    defaults = build_parser().parse_args([])
    sample = README.split("## What the main job prints", 1)[1].split("```\n", 2)[1]
    lines = sample.splitlines()
    assert lines[0].startswith("prefuse ") and "setting up" in lines[0]
    assert (
        f"training {defaults.steps} steps (batch {defaults.batch_size} pairs, lr {defaults.lr:g})" in sample
    )
    steps = [line.split()[1] for line in lines if line.strip().startswith("step ")]
    expected = list(range(defaults.log_every, defaults.steps + 1, defaults.log_every))
    assert steps == [f"{s}/{defaults.steps}" for s in expected]
    assert f"{defaults.method} on a tiny Llama" in sample and f"vocab={defaults.vocab_size}" in sample
    for head in ("naive (full logits)", "TRL 1.16 fused head", "prefuse fused"):
        assert any(line.strip().startswith(head) for line in lines), head
    assert f"steps 2..{defaults.compare_steps}" in sample
    assert lines[-1] == "report: prefuse-out/report.json, prefuse-out/report.png"


def test_readme_has_python_blocks():
    assert len(PYTHON_BLOCKS) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_block_runs_from_the_repository_root(tmp_path, index):
    code = PYTHON_BLOCKS[index]
    if "from trl" in code:
        pytest.importorskip("trl")
    done = _run_at_root(code, tmp_path)
    assert done.returncode == 0, f"README python block {index}:\n{code}\n{done.stderr[-4000:]}"
