"""Collators: tokenised preference examples -> the batches prefuse's losses and ``PreferenceTrainer`` take.

All pad on the right, put ``-100`` in ``labels`` on the prompt and the padding (labels are aligned with
``input_ids``; the losses shift), and return ``torch`` tensors.

- ``PairedCollator`` (DPO, SamPO, SPPO, GPO, SimPO, ORPO, CPO): ``2B`` rows, chosen ``[:B]`` then rejected ``[B:]``, one padded
  length; ``p_chosen``/``p_rejected`` and ``s_chosen``/``s_rejected`` ``(B,)`` float32 when the examples have
  them; ``ref_logps`` ``(2B, T-1)`` (or ``(2B,)`` sums) when they carry precomputed reference log-probs.
- ``UnpairedCollator`` (KTO, FactAlign): ``B`` rows and ``desirable`` ``(B,)`` bool, plus the mismatched KL rows
  ``kl_input_ids`` / ``kl_attention_mask`` / ``kl_labels``, built inside the batch: completion ``i`` after
  the next prompt in the batch, ``(i + 1) mod B``, skipping prompts equal to its own (an example with a fixed ``kl_prompt_input_ids``, as ``precompute_ref_logps``
  writes, uses that prompt instead). With sentence ids: ``sentence_ids`` ``(B, T)`` (``-1`` outside a
  sentence, ids ``0..S-1`` over the whole batch, row by row), ``sentence_labels`` ``(S,)`` bool and
  ``kl_sentence_ids`` (the KL rows' sentences numbered ``0..S_kl-1`` on their own).

Precomputed reference log-probs (``ref_chosen_logps`` / ``ref_rejected_logps`` / ``ref_logps`` /
``ref_kl_logps``) are stored per completion token (a list, one float per completion token) or as the
completion's sum (one float, where the loss needs no more); the collators place per-token values where
``linear_logprobs(..., shift=True)`` puts a token's log-prob (position ``t - 1`` for the token at ``t``) and
stack sums into ``(rows,)`` tensors. A batch holds one kind or the other. A KL row's sum is that of the row
as this collator builds it (same partner prompt and truncation), as ``precompute_ref_logps`` computes it.

Malformed features (a missing key, token ids that are not lists of non-negative ints, an empty completion, a
``label`` that is not a bool, win rates outside [0, 1] or NaN, non-finite scores, a per-token value list whose
length is not the completion's, sentence ids that do not match the sentence labels, a scalar column present in
some features and not others) raise ``ValueError`` naming the feature's position in the batch and the field;
``check_tokenized_data`` runs the same checks over a tokenised data set and names the row's index in it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from prefuse.alignment.data.processing import (
    PARTIAL_SENTENCES,
    WIN_RATE_COLUMNS,
    check_bool,
    check_number,
    is_bool,
    row_error,
    truncate_with_sentences,
)

IGNORE_INDEX = -100
_PAIR_SCALARS = ("p_chosen", "p_rejected", "s_chosen", "s_rejected")


# ---------------------------------------------------------------------------------------------- feature checks
def _check_ids(
    feature: dict, field: str, where, *, non_empty: bool = False, low: int = 0, vocab_size: int | None = None
) -> list:
    if field not in feature or feature[field] is None:
        raise row_error(where, field, "missing")
    ids = feature[field]
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise row_error(where, field, f"expected a list of token ids, got {type(ids).__name__}")
    for t in ids:
        if is_bool(t) or not isinstance(t, numbers.Integral) or t < low:
            raise row_error(where, field, f"expected ints >= {low}, got {t!r}")
        if vocab_size is not None and t >= vocab_size:
            raise row_error(where, field, f"token id {t} is outside the model's vocabulary of {vocab_size}")
    if non_empty and len(ids) == 0:
        raise row_error(where, field, "empty (no completion token to score)")
    return list(ids)


def _check_values(feature: dict, field: str, where, length: int, *, at_most: bool = False) -> None:
    """Precomputed reference log-probs: a per-completion-token float list of ``length`` finite entries, or
    one finite float (the completion's sum)."""
    values = feature[field]
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if isinstance(values, numbers.Real) and not is_bool(values):
        if not math.isfinite(float(values)):
            raise row_error(where, field, f"expected a finite sum, got {values!r}")
        return
    if values is None or isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise row_error(where, field, f"expected a list of floats, got {type(values).__name__}")
    if len(values) != length and not (at_most and len(values) >= length):
        raise row_error(where, field, f"{len(values)} values for {length} completion tokens")
    for v in values:
        if is_bool(v) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise row_error(where, field, f"expected finite floats, got {v!r}")


def check_feature(
    feature, where, *, paired: bool, sentences: bool = False, vocab_size: int | None = None
) -> None:
    """One tokenised example (``where`` names it: ``"row 3"``, ``"example 1 of the batch"``); see the module
    docstring for what is checked. With ``vocab_size``, token ids must also lie below it."""
    if not isinstance(feature, dict):
        raise ValueError(f"{where}: expected a dict of columns, got {type(feature).__name__}")
    _check_ids(feature, "prompt_input_ids", where, vocab_size=vocab_size)
    sides = ("chosen", "rejected") if paired else ("completion",)
    lengths = {
        side: len(_check_ids(feature, f"{side}_input_ids", where, non_empty=True, vocab_size=vocab_size))
        for side in sides
    }
    if paired:
        for field in _PAIR_SCALARS:
            if field in feature and feature[field] is not None:
                check_number(feature[field], field, where, unit_interval=field in WIN_RATE_COLUMNS)
        for side in sides:
            if f"ref_{side}_logps" in feature:
                _check_values(feature, f"ref_{side}_logps", where, lengths[side])
        return
    check_bool(feature.get("label"), "label", where)
    if "ref_logps" in feature:
        _check_values(feature, "ref_logps", where, lengths["completion"])
    if "ref_kl_logps" in feature:  # the KL row may be truncated further: at least as many as it keeps
        _check_values(feature, "ref_kl_logps", where, lengths["completion"], at_most=True)
    if feature.get("kl_prompt_input_ids") is not None:
        _check_ids(feature, "kl_prompt_input_ids", where)
    if sentences:
        ids = _check_ids(feature, "completion_sentence_ids", where, low=-1)
        labels = feature.get("sentence_labels")
        if labels is None or isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
            raise row_error(where, "sentence_labels", f"expected a list of bools, got {labels!r}")
        for j, label in enumerate(labels):
            if not is_bool(label):
                raise row_error(where, "sentence_labels", f"label {j} is not a bool: {label!r}")
        if len(ids) != lengths["completion"]:
            raise row_error(
                where,
                "completion_sentence_ids",
                f"{len(ids)} sentence ids for {lengths['completion']} completion tokens",
            )
        if ids and max(ids) >= len(labels):
            raise row_error(
                where,
                "completion_sentence_ids",
                f"sentence id {max(ids)} but only {len(labels)} sentence labels",
            )


def _check_batch(features, *, paired: bool, sentences: bool = False) -> None:
    if not isinstance(features, Sequence) or not features:
        raise ValueError("empty batch")
    for i, f in enumerate(features):
        check_feature(f, f"example {i} of the batch", paired=paired, sentences=sentences)
    keys = ("label",) if not paired else _PAIR_SCALARS
    for key in (*keys, "ref_chosen_logps", "ref_rejected_logps", "ref_logps", "ref_kl_logps"):
        have = [key in f and f[key] is not None for f in features]
        if any(have) and not all(have):
            raise row_error(
                f"example {have.index(False)} of the batch",
                key,
                "missing while other examples of the batch have it",
            )


def check_tokenized_data(dataset, method: str, *, vocab_size: int | None = None) -> None:
    """Run the collators' checks over every row of a tokenised data set (``ValueError`` naming the row); with
    ``vocab_size``, a token id the model's embedding cannot look up is one of them."""
    from prefuse.alignment.methods import get_method

    spec = get_method(method)
    required = [c for c in spec.tokenized_columns if c in _PAIR_SCALARS]
    for index in range(len(dataset)):
        feature = dataset[index]
        check_feature(
            feature, f"row {index}", paired=spec.paired, sentences=spec.sentences, vocab_size=vocab_size
        )
        for field in required:
            if feature.get(field) is None:
                raise row_error(index, field, "missing (None)")


def next_different(prompts, i: int) -> int:
    """Index of the first prompt after ``i`` (cyclically) that differs from ``prompts[i]`` (else ``i + 1``)."""
    n = len(prompts)
    for step in range(1, n):
        j = (i + step) % n
        if list(prompts[j]) != list(prompts[i]):
            return j
    return (i + 1) % n


def _padded_length(lengths, multiple: int | None) -> int:
    length = max(lengths) if lengths else 0
    if multiple:
        length = -(-length // multiple) * multiple
    return length


def _rows(prompts, completions, pad_id: int, multiple: int | None, completion_values=None):
    """``input_ids``, ``attention_mask``, ``labels`` (and per-completion-token values, shifted, if given)."""
    length = _padded_length([len(p) + len(c) for p, c in zip(prompts, completions)], multiple)
    n = len(prompts)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    values = (
        None
        if completion_values is None
        else [torch.full((n, length), fill) for fill in (v[1] for v in completion_values)]
    )
    for i, (p, c) in enumerate(zip(prompts, completions)):
        row = list(p) + list(c)
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
        labels[i, len(p) : len(row)] = torch.tensor(list(c), dtype=torch.long)
        if values is not None:
            for out, (per_example, _) in zip(values, completion_values):
                vals = per_example[i]
                if len(vals) != len(c):
                    raise ValueError(
                        f"a per-token value list has {len(vals)} entries for {len(c)} completion tokens"
                    )
                out[i, len(p) : len(row)] = torch.as_tensor(list(vals), dtype=out.dtype)
    return input_ids, attention_mask, labels, values


def _is_sum(value) -> bool:
    return isinstance(value, numbers.Real) or (isinstance(value, torch.Tensor) and value.dim() == 0)


def _split_reference(reference: list | None) -> tuple[list | None, torch.Tensor | None]:
    """Precomputed reference values of a batch's rows -> ``(per-token values for _rows, None)`` or
    ``(None, sums (rows,))``; ``ValueError`` for a batch mixing the two kinds."""
    if reference is None:
        return None, None
    kinds = {_is_sum(v) for v in reference}
    if len(kinds) > 1:
        raise ValueError(
            "precomputed reference log-probs mix per-token lists and per-sequence sums in one batch"
        )
    if kinds == {True}:
        return None, torch.tensor([float(v) for v in reference], dtype=torch.float32)
    return [(reference, 0.0)], None


def _shifted(per_position: torch.Tensor) -> torch.Tensor:
    """Values aligned with ``labels`` -> aligned with the shifted per-token output ``(rows, T-1)``."""
    return per_position[:, 1:].contiguous()


@dataclass
class PairedCollator:
    """Paired batches (module docstring). ``pad_token_id``: the tokenizer's pad id."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        _check_batch(features, paired=True)
        prompts = [f["prompt_input_ids"] for f in features]
        chosen = [f["chosen_input_ids"] for f in features]
        rejected = [f["rejected_input_ids"] for f in features]
        precomputed = all("ref_chosen_logps" in f and "ref_rejected_logps" in f for f in features)
        reference = None
        if precomputed:
            reference = [f["ref_chosen_logps"] for f in features] + [
                f["ref_rejected_logps"] for f in features
            ]
        values, sums = _split_reference(reference)
        input_ids, attention_mask, labels, vals = _rows(
            prompts + prompts, chosen + rejected, self.pad_token_id, self.pad_to_multiple_of, values
        )
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        for key in _PAIR_SCALARS:
            if all(key in f and f[key] is not None for f in features):
                batch[key] = torch.tensor([float(f[key]) for f in features], dtype=torch.float32)
        if precomputed:
            batch["ref_logps"] = sums if sums is not None else _shifted(vals[0].float())
        return batch


@dataclass
class UnpairedCollator:
    """Unpaired batches with in-batch KL rows and optional sentence ids (module docstring).

    Args:
        pad_token_id: the tokenizer's pad id.
        max_length, max_prompt_length: truncation of the KL rows (a KL prompt can be longer than the
            completion's own prompt); the same rules as ``tokenize_preference_data``.
        kl_rows: build the mismatched KL rows (KTO's reference point). With one example per batch the KL row
            is the example itself (no other prompt), which makes KTO's ``z`` the example's own log-ratio.
        sentences: emit sentence ids (None: when the examples have ``completion_sentence_ids``).
        partial_sentences: what a KL row's truncation does to a cut sentence (``"drop"`` / ``"keep"``).
    """

    pad_token_id: int
    max_length: int | None = None
    max_prompt_length: int | None = None
    kl_rows: bool = True
    sentences: bool | None = None
    partial_sentences: str = "drop"
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if self.partial_sentences not in PARTIAL_SENTENCES:
            raise ValueError(
                f"partial_sentences must be one of {PARTIAL_SENTENCES}, got {self.partial_sentences!r}"
            )

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("empty batch")
        sentences = self.sentences
        has_ids = all("completion_sentence_ids" in f and "sentence_labels" in f for f in features)
        if sentences is None:
            sentences = has_ids
        elif sentences and not has_ids:
            raise ValueError(
                "sentence ids requested but the examples have no completion_sentence_ids/sentence_labels: tokenise "
                "data with 'sentences' and 'sentence_labels' columns (tokenize_preference_data)"
            )
        _check_batch(features, paired=False, sentences=sentences)
        prompts = [f["prompt_input_ids"] for f in features]
        completions = [f["completion_input_ids"] for f in features]
        precomputed = all("ref_logps" in f for f in features)
        values, sums = _split_reference([f["ref_logps"] for f in features] if precomputed else None)
        input_ids, attention_mask, labels, vals = _rows(
            prompts, completions, self.pad_token_id, self.pad_to_multiple_of, values
        )
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "desirable": torch.tensor([bool(f["label"]) for f in features], dtype=torch.bool),
        }
        if precomputed:
            batch["ref_logps"] = sums if sums is not None else _shifted(vals[0].float())
        if sentences:
            sentence_ids, sentence_labels = self._sentence_rows(
                [f["completion_sentence_ids"] for f in features],
                [f["sentence_labels"] for f in features],
                prompts,
                input_ids.shape[1],
            )
            batch["sentence_ids"], batch["sentence_labels"] = sentence_ids, sentence_labels
        if self.kl_rows:
            batch.update(self._kl_batch(features, prompts, completions, sentences))
        return batch

    @staticmethod
    def _sentence_rows(per_example_ids, per_example_labels, prompts, length):
        """Sentence ids ``(rows, T)`` numbered over the batch and their labels ``(S,)``."""
        out = torch.full((len(prompts), length), -1, dtype=torch.long)
        labels: list[bool] = []
        for i, (ids, lab, p) in enumerate(zip(per_example_ids, per_example_labels, prompts)):
            ids = torch.as_tensor(list(ids), dtype=torch.long)
            if len(lab) and (ids.max().item() >= len(lab)):
                raise ValueError(f"example {i}: a sentence id exceeds its {len(lab)} sentence labels")
            out[i, len(p) : len(p) + len(ids)] = torch.where(ids >= 0, ids + len(labels), ids)
            labels += [bool(x) for x in lab]
        return out, torch.tensor(labels, dtype=torch.bool)

    def _kl_batch(self, features, prompts, completions, sentences) -> dict[str, torch.Tensor]:
        kl_prompts, kl_completions, kl_ids, kl_labels_list = [], [], [], []
        for i, f in enumerate(features):
            prompt = f.get("kl_prompt_input_ids") or prompts[next_different(prompts, i)]
            ids = list(f["completion_sentence_ids"]) if sentences else [-1] * len(completions[i])
            labels = list(f["sentence_labels"]) if sentences else []
            p, c, ids, labels = truncate_with_sentences(
                prompt,
                list(completions[i]),
                ids,
                labels,
                max_length=self.max_length,
                max_prompt_length=self.max_prompt_length,
                partial=self.partial_sentences,
            )
            kl_prompts.append(p)
            kl_completions.append(c)
            kl_ids.append(ids)
            kl_labels_list.append(labels)
        precomputed = all("ref_kl_logps" in f for f in features)
        reference = None
        if precomputed:  # per-token values of a KL row cut further than its own row are cut with it
            reference = [
                f["ref_kl_logps"] if _is_sum(f["ref_kl_logps"]) else list(f["ref_kl_logps"])[: len(c)]
                for f, c in zip(features, kl_completions)
            ]
        values, sums = _split_reference(reference)
        input_ids, attention_mask, labels, vals = _rows(
            kl_prompts, kl_completions, self.pad_token_id, self.pad_to_multiple_of, values
        )
        out = {"kl_input_ids": input_ids, "kl_attention_mask": attention_mask, "kl_labels": labels}
        if precomputed:
            out["ref_kl_logps"] = sums if sums is not None else _shifted(vals[0].float())
        if sentences:
            out["kl_sentence_ids"], _ = self._sentence_rows(
                kl_ids, kl_labels_list, kl_prompts, input_ids.shape[1]
            )
        return out


def collator_for(
    method: str,
    tokenizer,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    partial_sentences: str = "drop",
    pad_to_multiple_of: int | None = None,
):
    """The collator a method's batches need (``prefuse.alignment.methods``: paired, or unpaired with KL rows
    and, for ``factalign``, sentence ids)."""
    from prefuse.alignment.methods import get_method

    return get_method(method).collator(
        tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        partial_sentences=partial_sentences,
        pad_to_multiple_of=pad_to_multiple_of,
    )
