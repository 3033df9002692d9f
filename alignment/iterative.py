"""Iterative preference training (the seeds' protocol): iteration k's policy is iteration k+1's reference.

The SamPO, KTO (Snorkel/Contextual), SPPO and GPO model cards train in rounds -- "each previous iteration's
model serving as the reference for the subsequent" -- on a new slice of prompts per round, with responses
generated and scored by the current policy (SPPO/GPO: win rates / preference scores of its samples).
``run_iterations`` runs the rounds through ``PreferenceTrainer``; the data of each round comes from the user,
as a list of data sets or as a function of the round and the current policy (where generation and scoring
happen). The optimizer and scheduler restart every round, as in the seeds' scripts (one run per iteration).

The reference of round ``k + 1`` is round ``k``'s trained policy, frozen:

- full models: a frozen deep copy of the policy (the policy itself keeps training);
- PEFT models: the adapter is merged into the base weights and a fresh adapter of the same configuration is
  attached, so "adapter disabled" *is* the previous policy and no second model is kept.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefuse.alignment.methods import get_method
from prefuse.alignment.model_head import is_peft_model
from prefuse.alignment.trainer import PreferenceConfig, PreferenceTrainer, freeze
from torch import nn


@dataclass
class IterationResult:
    """``model``: the final policy; ``log_histories[k]``: round ``k``'s ``trainer.state.log_history``;
    ``references[k]``: what round ``k`` used as its reference (None: the trainer's default)."""

    model: nn.Module
    log_histories: list[list[dict]] = field(default_factory=list)
    references: list[Any] = field(default_factory=list)


def _fresh_adapter(model: nn.Module) -> nn.Module:
    """Merge the (single) PEFT adapter into the base model and attach a new one with the same config."""
    from peft import get_peft_model

    config = copy.deepcopy(model.peft_config[model.active_adapter])
    merged = model.merge_and_unload()
    return get_peft_model(merged, config)


def run_iterations(
    model: nn.Module,
    datasets: Sequence | Callable[[int, nn.Module], Any],
    *,
    args: PreferenceConfig,
    iterations: int | None = None,
    processing_class=None,
    ref_model: nn.Module | None = None,
    eval_datasets: Sequence | None = None,
    trainer_kwargs: dict | None = None,
    on_iteration_end: Callable[[int, PreferenceTrainer], None] | None = None,
) -> IterationResult:
    """Train ``iterations`` rounds of ``args.method``; round ``k + 1``'s reference is round ``k``'s policy.

    Args:
        model: the initial policy (a HF causal LM or a PEFT model).
        datasets: one training set per round, or ``datasets(k, policy) -> dataset`` (e.g. generate with the
            current policy, score, build pairs); text or tokenised, as ``PreferenceTrainer`` takes them.
        args: the ``PreferenceConfig`` of every round; round ``k`` writes to ``{output_dir}/iter{k}``.
        iterations: the number of rounds (default ``len(datasets)``; required for a function).
        processing_class: the tokenizer.
        ref_model: round 0's reference (None: the trainer's default -- a frozen copy of the initial policy,
            or the PEFT base model). Later rounds ignore it.
        eval_datasets: optional per-round evaluation sets.
        trainer_kwargs: more ``PreferenceTrainer`` arguments (callbacks ...).
        on_iteration_end: called with ``(k, trainer)`` after each round (save, evaluate, generate ...).
    """
    if iterations is None:
        if callable(datasets):
            raise ValueError("iterations is required when datasets is a function")
        iterations = len(datasets)
    if not callable(datasets) and len(datasets) < iterations:
        raise ValueError(f"{iterations} iterations need {iterations} data sets, got {len(datasets)}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    result = IterationResult(model)
    reference = ref_model
    uses_reference = (
        get_method(args.method).reference is not None
    )  # SimPO, ORPO, CPO: rounds on new data only
    for k in range(iterations):
        data = datasets(k, model) if callable(datasets) else datasets[k]
        round_args = copy.deepcopy(args)
        round_args.output_dir = os.path.join(args.output_dir, f"iter{k}")
        trainer = PreferenceTrainer(
            model, ref_model=reference, args=round_args, train_dataset=data,
            eval_dataset=None if eval_datasets is None else eval_datasets[k], processing_class=processing_class,
            **(trainer_kwargs or {}),
        )  # fmt: skip
        result.references.append(reference)
        trainer.train()
        result.log_histories.append(trainer.state.log_history)
        if on_iteration_end is not None:
            on_iteration_end(k, trainer)
        model = trainer.model
        if k + 1 < iterations and uses_reference:
            if is_peft_model(model):
                model, reference = _fresh_adapter(model), None
            else:
                reference = freeze(copy.deepcopy(model))
        del trainer
    result.model = model
    return result
