"""``accelerate launch`` configurations shipped with prefuse: ``ddp``, ``fsdp2`` (``fully_shard``) and ``zero3``
(DeepSpeed ZeRO-3), for one node of 8 GPUs in bf16 -- ``--num_processes``, ``--num_machines``,
``--machine_rank``, ``--main_process_ip`` and ``--main_process_port`` on the command line override them.

``python -m prefuse.alignment.launch NAME`` prints the installed file's path, so that::

    accelerate launch --config_file "$(python -m prefuse.alignment.launch fsdp2)" train.py

works from any checkout or installation. ``gradient_accumulation_steps`` and ``gradient_clipping`` of the
ZeRO-3 file must match the ``TrainingArguments`` (``accelerate`` refuses a mismatch).
"""

from __future__ import annotations

from pathlib import Path

CONFIGS = ("ddp", "fsdp2", "zero3")


def config_path(name: str) -> Path:
    """The path of the shipped ``accelerate`` config ``name`` (one of ``CONFIGS``)."""
    if name not in CONFIGS:
        raise ValueError(f"name must be one of {CONFIGS}, got {name!r}")
    return Path(__file__).resolve().parent / f"{name}.yaml"
