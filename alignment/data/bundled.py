"""The bundled preference data set (``prefs.jsonl``, written by ``synthetic.py``) as ``datasets.Dataset``s.

Views:

- ``"paired"``: ``prompt``, ``chosen``, ``rejected`` plus ``p_chosen``/``p_rejected`` (SPPO win rates) and
  ``s_chosen``/``s_rejected`` (GPO scores) -- DPO, SamPO, SPPO, GPO;
- ``"unpaired"``: ``prompt``, ``completion``, ``label`` (True = desirable), ``sentences``,
  ``sentence_labels`` -- KTO and FactAlign; every record gives two rows (its chosen answer, desirable, and its
  rejected answer, undesirable), interleaved in record order;
- ``"raw"``: every field of the records.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA_FILE = Path(__file__).with_name("prefs.jsonl")
VIEWS = ("paired", "unpaired", "raw")
_PAIRED = ("prompt", "chosen", "rejected", "p_chosen", "p_rejected", "s_chosen", "s_rejected")


def read_records(path: str | Path | None = None) -> list[dict]:
    """The JSONL records (all splits)."""
    path = DATA_FILE if path is None else Path(path)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_preference_data(
    view: str = "paired",
    split: str | None = "train",
    *,
    path: str | Path | None = None,
    limit: int | None = None,
):
    """The bundled data as a ``datasets.Dataset`` (``split``: ``"train"``, ``"test"`` or None for both)."""
    from datasets import Dataset

    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    records = [r for r in read_records(path) if split is None or r["split"] == split]
    if not records:
        raise ValueError(f"no record in split {split!r}")
    if limit is not None:
        records = records[:limit]
    if view == "raw":
        return Dataset.from_list(records)
    if view == "paired":
        return Dataset.from_list([{k: r[k] for k in _PAIRED} for r in records])
    rows = []
    for r in records:
        for side, label in (("chosen", True), ("rejected", False)):
            rows.append(
                {
                    "prompt": r["prompt"],
                    "completion": r[side],
                    "label": label,
                    "sentences": r[f"{side}_sentences"],
                    "sentence_labels": r[f"{side}_sentence_labels"],
                }
            )
    return Dataset.from_list(rows)
