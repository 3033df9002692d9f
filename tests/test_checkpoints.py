"""Interrupted checkpoint saves: a run killed while writing ``checkpoint-4`` resumes from the complete
``checkpoint-2`` and continues the uninterrupted loss curve bit for bit; a corrupt file is named.

A kill is simulated by a writer that writes half of its file and raises a ``BaseException`` (nothing in the
trainer can catch it, as nothing can catch SIGKILL): inside the model's safetensors file, the optimizer, the
RNG state, before ``prefuse_state.pt`` and before the reference's weights are linked in. The resumed trainer is built from a
*differently* initialised model, so a checkpoint whose reference is missing or wrong shows in the losses.
"""

import io
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prefuse.alignment import checkpoints  # noqa: E402
from prefuse.alignment.data import load_preference_data  # noqa: E402
from test_trainer_faults import N_STEPS, STOP_AT, _losses, _model, _StopAt, _trainer  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

KILLED_AT = f"checkpoint-{2 * STOP_AT}"


class Killed(BaseException):
    """The process died here."""


class _Steps(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.fixture(scope="module")
def tokenizer():
    from prefuse.alignment.data import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def data():
    return load_preference_data("paired", limit=8)


@pytest.fixture(scope="module")
def expected(tmp_path_factory, tokenizer, data):
    """The uninterrupted run's losses."""
    full = _trainer(tmp_path_factory.mktemp("full"), "dpo", _model(tokenizer, 0), tokenizer, data)
    full.train()
    return _losses(full)


def _half_then_die(path: str, payload: bytes):
    with open(path, "wb") as f:
        f.write(payload[: len(payload) // 2])
    raise Killed(path)


def _kill_torch_save(monkeypatch, name: str):
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if (
            isinstance(f, (str, os.PathLike))
            and KILLED_AT in os.fspath(f)
            and os.path.basename(f).startswith(name)
        ):
            buffer = io.BytesIO()
            real(obj, buffer, *args, **kwargs)
            _half_then_die(os.fspath(f), buffer.getvalue())
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def _kill_safetensors(monkeypatch, module, attribute: str, name: str):
    from safetensors.torch import save as to_bytes

    real = getattr(module, attribute)

    def save(tensors, filename, *args, **kwargs):
        if KILLED_AT in os.fspath(filename) and os.path.basename(filename).startswith(name):
            _half_then_die(os.fspath(filename), to_bytes({k: v.contiguous() for k, v in tensors.items()}))
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(module, attribute, save)


def _kill_model_save(monkeypatch):
    import transformers.modeling_utils as modeling_utils

    _kill_safetensors(monkeypatch, modeling_utils, "safe_save_file", "model")


def _kill_reference_save(monkeypatch):
    """The reference's weights are written once and hard-linked into later checkpoints: die before the link."""
    real = os.link

    def link(source, target, *args, **kwargs):
        if KILLED_AT in os.fspath(target):
            raise Killed(target)
        return real(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "link", link)


KILLS = {
    "model": _kill_model_save,
    "optimizer": lambda mp: _kill_torch_save(mp, "optimizer"),
    "rng": lambda mp: _kill_torch_save(mp, "rng_state"),
    "prefuse-state": lambda mp: _kill_torch_save(mp, "prefuse_state"),
    "reference": _kill_reference_save,
}


@pytest.mark.parametrize("limit", [None, 1], ids=["keep-all", "save_total_limit=1"])
@pytest.mark.parametrize("where", list(KILLS))
def test_a_kill_during_a_save_resumes_from_the_last_complete_checkpoint(
    tmp_path, monkeypatch, tokenizer, data, expected, where, limit
):
    killed = _trainer(tmp_path, "dpo", _model(tokenizer, 0), tokenizer, data, save_total_limit=limit)
    with monkeypatch.context() as patch:
        KILLS[where](patch)
        with pytest.raises(Killed):
            killed.train()
    assert os.path.isdir(tmp_path / KILLED_AT) and not checkpoints.is_complete(str(tmp_path / KILLED_AT))
    assert checkpoints.last_complete(str(tmp_path)) == str(tmp_path / f"checkpoint-{STOP_AT}")

    trained = _Steps()
    resumed = _trainer(
        tmp_path, "dpo", _model(tokenizer, 1), tokenizer, data, [trained], save_total_limit=limit
    )
    resumed.train(resume_from_checkpoint=True)
    assert trained.steps == list(range(STOP_AT + 1, N_STEPS + 1))
    got = _losses(resumed)  # the log history of steps 1..2 comes from the checkpoint
    for step in range(STOP_AT + 1, N_STEPS + 1):
        assert got[step] == expected[step], (
            step,
            got[step],
            expected[step],
        )  # the initial policy's reference
    # the new checkpoint-4 is complete; rotation then dropped checkpoint-2 (limit 1), never before
    assert checkpoints.is_complete(str(tmp_path / KILLED_AT))
    assert os.path.isdir(tmp_path / f"checkpoint-{STOP_AT}") == (limit is None)


def test_an_incomplete_or_corrupt_checkpoint_is_refused_by_name(tmp_path, tokenizer, data):
    run = _trainer(tmp_path, "dpo", _model(tokenizer, 0), tokenizer, data, callbacks=[_StopAt(STOP_AT)])
    run.train()
    folder = tmp_path / f"checkpoint-{STOP_AT}"
    manifest = json.loads((folder / checkpoints.MANIFEST_NAME).read_text())
    assert {"prefuse_state.pt", "reference_model.safetensors", "optimizer.pt", "model.safetensors"} <= set(
        manifest["files"]
    )
    fresh = _trainer(tmp_path, "dpo", _model(tokenizer, 0), tokenizer, data)

    (folder / "prefuse_state.pt").write_bytes(b"")  # emptied after the save
    with pytest.raises(ValueError, match=r"checkpoint file .*prefuse_state\.pt is corrupt: 0 bytes"):
        fresh.train(resume_from_checkpoint=str(folder))
    with pytest.raises(ValueError, match=r"checkpoint file .*prefuse_state\.pt cannot be loaded \(EOFError"):
        checkpoints.load_state(str(folder / "prefuse_state.pt"))
    os.remove(folder / "optimizer.pt")
    with pytest.raises(ValueError, match=r"checkpoint file .*optimizer\.pt is missing"):
        fresh.train(resume_from_checkpoint=str(folder))

    os.remove(folder / checkpoints.MANIFEST_NAME)
    with pytest.raises(ValueError, match=r"is not a complete PreferenceTrainer checkpoint"):
        fresh.train(resume_from_checkpoint=str(folder))
    with pytest.raises(ValueError, match=r"no complete checkpoint in output_dir"):
        fresh.train(resume_from_checkpoint=True)


def test_rotation_unmarks_a_checkpoint_before_deleting_it(tmp_path, monkeypatch):
    """A deletion cut short leaves an incomplete folder, never a complete-looking one with files missing."""
    for step in (2, 4, 6):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "weights.bin").write_bytes(b"x" * step)
        checkpoints.mark_complete(str(folder), step)
    (tmp_path / "checkpoint-3").mkdir()  # left by an interrupted save

    def rmtree(path, ignore_errors=False):
        assert not checkpoints.is_complete(path), "a folder must lose its manifest before its files"
        raise Killed(path)

    monkeypatch.setattr(checkpoints.shutil, "rmtree", rmtree)
    with pytest.raises(Killed):
        checkpoints.rotate(str(tmp_path), 1)
    assert checkpoints.last_complete(str(tmp_path)) == str(tmp_path / "checkpoint-6")
    monkeypatch.undo()

    checkpoints.rotate(str(tmp_path), 2, keep=str(tmp_path / "checkpoint-2"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    checkpoints.rotate(str(tmp_path), 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6"]
    checkpoints.verify(str(tmp_path / "checkpoint-6"))
