"""Resumable stages: each stage's output appears on disk atomically, and a stage whose output exists is skipped.

A stage writes into ``<path>.partial`` and renames it to ``<path>`` when complete (``os.replace``, atomic on one
file system), so after a kill ``<path>`` either holds the whole output or does not exist; a leftover
``.partial`` is discarded by the next attempt.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable


def completed(path: str) -> bool:
    return os.path.exists(path)


def write_atomically(path: str, writer: Callable[[str], None]) -> None:
    """``writer(tmp)`` fills the folder or file ``tmp``; it then becomes ``path`` in one rename."""
    tmp = path + ".partial"
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    elif os.path.exists(tmp):
        os.remove(tmp)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    writer(tmp)
    os.replace(tmp, path)


def write_json(path: str, value) -> None:
    def dump(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2)

    write_atomically(path, dump)


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def dataset_stage(path: str, build: Callable[[], object]):
    """The ``datasets.Dataset`` saved at ``path``, built by ``build()`` and saved atomically if absent."""
    from datasets import load_from_disk

    if not completed(path):
        dataset = build()
        write_atomically(path, dataset.save_to_disk)
    return load_from_disk(path)
