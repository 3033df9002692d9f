"""Crash-safe ``PreferenceTrainer`` checkpoints: a completion manifest written last, rotation among complete ones.

A checkpoint folder ``checkpoint-N`` is written by several writers -- the ``transformers.Trainer`` (model,
optimizer, scheduler, RNG state per process, trainer state), an engine (DeepSpeed / FSDP shards, per process)
and ``PreferenceTrainer`` (``prefuse_state.pt`` per process, the default reference's weights) -- and a kill can
land between any two files or inside one. So a folder is *complete* only once its manifest
``prefuse_checkpoint.json`` exists: written by the saving process after every process has finished writing
(a barrier), atomically (a temporary file, ``fsync``, ``os.replace``), and listing every file of the folder
with its size. Everything else follows from that one rule:

- resuming (``resume_from_checkpoint=True``) takes the newest *complete* checkpoint (``last_complete``); a
  folder given by path must be complete (``verify``), and every file the manifest lists must still be there
  with its recorded size, so a truncated or emptied file is named before anything is loaded;
- rotation (``save_total_limit``) runs only after the new checkpoint is complete, counts complete checkpoints
  only, keeps the best one, and removes a folder's manifest *before* deleting its files, so a deletion cut
  short leaves an incomplete folder, never a complete-looking one with files missing. Each complete
  checkpoint holds the reference weights it needs, so rotation never deletes a reference still in use;
- re-saving a step removes the folder's manifest first: a folder being rewritten is incomplete.

Why a manifest rather than writing into a temporary folder and renaming it: the processes of a distributed
run, and the engines, write into the checkpoint by its final path (DeepSpeed records its tag there, the
``Trainer`` looks for its best checkpoint there), and a rename needs the same barrier a manifest needs. The
manifest also records sizes, which a rename could not check at resume.

Checkpoint files are loaded with ``torch.load(..., weights_only=True)``; a file that does not load is reported
as a ``ValueError`` naming it.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch

MANIFEST_NAME = "prefuse_checkpoint.json"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def _files(folder: str) -> dict[str, int]:
    """``{path relative to folder: size in bytes}`` of every file under ``folder`` but the manifest."""
    sizes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative != MANIFEST_NAME and not name.startswith(f".{MANIFEST_NAME}"):
                sizes[relative.replace(os.sep, "/")] = os.path.getsize(path)
    return sizes


def mark_complete(folder: str, step: int) -> None:
    """Write ``folder``'s manifest (every file and its size): from now on resuming may take it.

    Call once every process has finished writing ``folder``; the manifest appears atomically."""
    manifest = {"step": int(step), "files": _files(folder)}
    temporary = os.path.join(folder, f".{MANIFEST_NAME}.{os.getpid()}.tmp")
    with open(temporary, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, os.path.join(folder, MANIFEST_NAME))
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def unmark(folder: str) -> None:
    """Remove ``folder``'s manifest (before rewriting or deleting the folder)."""
    try:
        os.remove(os.path.join(folder, MANIFEST_NAME))
    except FileNotFoundError:
        pass


def is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MANIFEST_NAME))


def verify(folder: str) -> None:
    """``ValueError`` unless ``folder`` is complete and every file of its manifest has its recorded size."""
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isdir(folder):
        raise ValueError(f"resume_from_checkpoint: {folder} is not a folder")
    if not os.path.isfile(path):
        raise ValueError(
            f"resume_from_checkpoint: {folder} is not a complete PreferenceTrainer checkpoint (no {MANIFEST_NAME}: "
            "its save was interrupted, or another trainer wrote it); resume_from_checkpoint=True takes the newest "
            "complete checkpoint of output_dir"
        )
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"the checkpoint manifest {path} is corrupt: {err}") from err
    for name, size in sorted(files.items()):
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise ValueError(f"the checkpoint file {file} is missing (the manifest {path} lists it)")
        actual = os.path.getsize(file)
        if actual != size:
            raise ValueError(
                f"the checkpoint file {file} is corrupt: {actual} bytes, {size} when the checkpoint was written"
            )


def checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """``[(step, folder)]`` of the ``checkpoint-N`` folders in ``output_dir``, by step."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _STEP.match(name)
        folder = os.path.join(output_dir, name)
        if match and os.path.isdir(folder):
            found.append((int(match.group(1)), folder))
    return sorted(found)


def last_complete(output_dir: str) -> str:
    """The newest complete checkpoint of ``output_dir``; ``ValueError`` when there is none."""
    complete = [folder for _, folder in checkpoints(output_dir) if is_complete(folder)]
    if not complete:
        raise ValueError(f"resume_from_checkpoint=True: no complete checkpoint in output_dir ({output_dir})")
    return complete[-1]


def rotate(output_dir: str, limit: int | None, keep: str | None = None) -> None:
    """Delete all but the newest ``limit`` complete checkpoints (and ``keep``, the best one), and the
    incomplete ones older than the newest complete checkpoint (left by an interrupted save); nothing when
    ``limit`` is None or <= 0. A folder loses its manifest before its files."""
    if limit is None or limit <= 0:
        return
    found = checkpoints(output_dir)
    complete = [(step, folder) for step, folder in found if is_complete(folder)]
    if not complete:
        return
    kept = {os.path.realpath(folder) for _, folder in complete[-limit:]}
    if keep is not None:
        kept.add(os.path.realpath(keep))
    newest = complete[-1][0]
    for step, folder in found:
        if os.path.realpath(folder) in kept or step > newest:
            continue
        unmark(folder)
        shutil.rmtree(folder, ignore_errors=True)


def load_state(path: str) -> dict:
    """``torch.load(path, weights_only=True)`` of a dict; a file that does not load is a ``ValueError`` naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # EOFError, UnpicklingError, RuntimeError (zip) ...: all mean "cannot read it"
        raise ValueError(
            f"the checkpoint file {path} cannot be loaded ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(state, dict):
        raise ValueError(
            f"the checkpoint file {path} is corrupt: expected a dict, got {type(state).__name__}"
        )
    return state


def load_weights(model: torch.nn.Module, path: str, device: str) -> None:
    """``safetensors.torch.load_model``; a file that does not load is a ``ValueError`` naming it."""
    from safetensors.torch import load_model

    try:
        load_model(model, path, device=device)
    except Exception as err:  # a truncated header, missing tensors ...
        raise ValueError(
            f"the checkpoint file {path} cannot be loaded ({type(err).__name__}: {err})"
        ) from err
