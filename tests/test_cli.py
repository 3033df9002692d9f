"""The ``prefuse`` command: argument errors, version, the lm-head comparison, progress lines and the report."""

import json
import sys
from importlib.metadata import version
from pathlib import Path

import processes
import pytest
import torch

pytest.importorskip("transformers")

from prefuse.alignment import cli  # noqa: E402
from prefuse.alignment import head_comparison as hc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _prefuse(*args, cwd, timeout=900):
    return processes.run(
        [sys.executable, "-m", "prefuse", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _usage_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: prefuse") and "Traceback" not in err
    return err.splitlines()[-1]


# ---------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--loss-type", "bogus"), "--loss-type must be one of sigmoid"),
        (("--method", "kto", "--loss-type", "ipo"), "--loss-type applies to --method dpo only"),
        (("--method", "sppo", "--loss-type", "sigmoid"), "--method sppo has no loss types"),
        (("--method", "bogus"), "argument --method: invalid choice"),
        (("--steps", "0"), "--steps must be >= 1"),
        (("--batch-size", "0"), "--batch-size must be >= 1"),
        (("--batch-size", "100000"), "--batch-size must be <= 320"),
        (("--lr", "0"), "--lr must be in (0, 1]"),
        (("--lr", "nan"), "--lr must be in (0, 1]"),
        (("--lr", "5"), "--lr must be in (0, 1]"),
        (("--beta", "-1"), "--beta must be > 0"),
        (("--hidden-size", "60"), "--hidden-size must be a multiple of 8"),
        (("--layers", "0"), "--layers must be >= 1"),
        (("--compare-steps", "-1"), "--compare-steps must be >= 0"),
        (("--log-every", "0"), "--log-every must be >= 1"),
        (("--max-length", "4"), "--max-length must be >= 8"),
        (("--steps", "ten"), "argument --steps: invalid int value"),
        (("--device", "tpu"), "argument --device: invalid choice"),
    ],
)
def test_bad_arguments_are_usage_errors(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert message in _usage_error(capsys, *args)
    assert not (tmp_path / "prefuse-out").exists()  # nothing is written before the job runs


def test_cuda_without_cuda_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "--device cuda: CUDA is not available here" in _usage_error(capsys, "--device", "cuda")


def test_output_dir_that_is_a_file_is_a_usage_error(capsys, tmp_path):
    target = tmp_path / "report"
    target.write_text("")
    assert "exists and is not a directory" in _usage_error(capsys, "--output-dir", str(target))


@pytest.mark.slow  # a `prefuse` subprocess
def test_a_usage_error_from_the_command_line_has_no_traceback(tmp_path):
    done = _prefuse("--loss-type", "bogus", cwd=tmp_path)
    assert done.returncode == 2
    assert "prefuse: error: --loss-type must be one of" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == "" and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- version
@pytest.mark.slow  # `prefuse` subprocesses
def test_version_everywhere_is_the_installed_metadata(tmp_path):
    import prefuse

    assert prefuse.__version__ == version("prefuse")
    done = _prefuse("--version", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"prefuse {version('prefuse')}"


@pytest.mark.slow  # a `python -m prefuse` subprocess
def test_python_m_prefuse_is_the_prefuse_command_from_the_repo_root():
    done = _prefuse(
        "--help", cwd=ROOT
    )  # the checkout's root on sys.path must not break transformers' imports
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: prefuse")
    for flag in (
        "--method",
        "--steps",
        "--batch-size",
        "--compare-steps",
        "--vocab-size",
        "--output-dir",
        "--version",
    ):
        assert flag in done.stdout


# ---------------------------------------------------------------------------------------------- heads
HEADS_AVAILABLE = [h for h in hc.HEADS if hc.unavailable(h) is None]


@pytest.mark.parametrize("head", [h for h in HEADS_AVAILABLE if h != "naive"])
def test_each_head_matches_a_float64_reference(tmp_path, head):
    """Every head on the same batch (prompt and padding ignored) against float64 full logits: log-probs and
    both gradients."""
    from prefuse.kernels.linear_logprobs import naive_linear_logprobs

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 9, 16, generator=gen)
    weight = torch.randn(70, 16, generator=gen) * 0.5
    labels = torch.randint(0, 70, (4, 9), generator=gen)
    labels[:, :3] = -100
    labels[3, 6:] = -100
    hc.save_inputs(tmp_path, hidden, weight, labels)
    result = hc.measure(tmp_path, head, 2, "cpu")
    got = torch.load(tmp_path / f"{head}.pt", weights_only=True)

    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp = naive_linear_logprobs(h64, w64, labels, shift=True)
    n_scored = int((labels[:, 1:] != -100).sum())
    (-logp.sum() / n_scored).backward()
    torch.testing.assert_close(got["logp"], logp.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["grad_hidden"], h64.grad.float(), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(got["grad_weight"], w64.grad.float(), atol=1e-6, rtol=1e-4)
    assert result["n_scored"] == n_scored and len(result["step_seconds"]) == 2
    assert result["seconds_per_step"] == result["step_seconds"][1] and result["peak_growth_bytes"] >= 0


def test_trl_head_is_skipped_with_a_reason_when_trl_is_missing(monkeypatch):
    monkeypatch.setattr(hc.importlib.util, "find_spec", lambda name: None if name == "trl" else object())
    assert "trl is not installed" in hc.unavailable("trl")
    assert hc.unavailable("fused") is None and hc.unavailable("naive") is None


# ---------------------------------------------------------------------------------------------- the main job
@pytest.mark.slow
def test_main_job_shows_progress_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    done = _prefuse(
        "--method",
        "kto",
        "--steps",
        "3",
        "--log-every",
        "2",
        "--batch-size",
        "2",
        "--vocab-size",
        "2048",
        "--max-length",
        "48",
        "--compare-steps",
        "2",
        "--output-dir",
        str(out),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pin_memory" not in done.stderr  # --device auto on a CPU machine is a CPU run through and through
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"prefuse {version('prefuse')} -- setting up")
    for phase in (
        "evaluating before training ...",
        "training 3 steps",
        "evaluating after training ...",
        "lm-head on the same hidden states",
        "measuring naive (full logits)",
        "measuring prefuse fused",
    ):
        assert any(line.strip().startswith(phase) for line in lines), phase
    steps = [line.split()[1] for line in lines if line.strip().startswith("step ")]
    assert steps == ["2/3", "3/3"]  # every --log-every steps, and the last
    assert "KTOLoss" in done.stdout and "nothing downloaded" in done.stdout
    assert lines[-1] == f"report: {out / 'report.json'}, {out / 'report.png'}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no trainer folder, no empty prefuse-out

    report = json.loads((out / "report.json").read_text())
    assert report["prefuse"] == version("prefuse") and report["settings"]["method"] == "kto"
    assert (
        report["training"]["curves"]["step"] == [1, 2, 3] and len(report["training"]["curves"]["loss"]) == 3
    )
    assert "eval_loss" in report["eval_before"] and "eval_loss" in report["eval_after"]
    heads = report["head_comparison"]
    assert set(heads["heads"]) == set(HEADS_AVAILABLE)
    for name, diff in heads["max_abs_diff_vs_naive"].items():
        assert max(diff.values()) < 1e-4, (name, diff)
    for name, r in heads["heads"].items():
        assert r["seconds_per_step"] > 0 and len(r["step_seconds"]) == 2, name
        row = next(line for line in lines if line.strip().startswith(hc.HEAD_NAMES[name]))
        assert f"{r['seconds_per_step']:.3f}" in row
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_main_job_margin_curve_and_no_comparison(tmp_path):
    done = _prefuse(
        "--steps",
        "2",
        "--log-every",
        "1",
        "--batch-size",
        "2",
        "--vocab-size",
        "1024",
        "--max-length",
        "48",
        "--compare-steps",
        "0",
        "--loss-type",
        "ipo",
        "--output-dir",
        "rep",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loss_type='ipo'" in done.stdout and "lm-head on the same hidden states" not in done.stdout
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert "head_comparison" not in report and len(report["training"]["curves"]["margin"]) == 2
