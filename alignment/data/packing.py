"""Padding-free batches: a padded collated batch packed into one row, and batches sized by a token budget.

``pack_batch`` turns the rows ``(R, T)`` of a collated batch into one packed row ``(1, N)`` holding only the rows'
tokens (``N = Σ lengths``): ``input_ids``, ``labels``, ``sequence_ids`` (the token's row ``0..R-1``) and
``position_ids`` restarting at 0 for every sequence; ``attention_mask`` is dropped, so a Hugging Face causal LM
called with ``position_ids``, no attention mask and ``use_cache=False`` builds the block-causal mask of the
packed sequences itself (sdpa / eager: from the position ids; flash-attention: variable-length). The rows keep
their order and meaning (paired: ``[:B]`` chosen, ``[B:]`` rejected). The KL rows (``kl_*``) are packed the same
way into their own row with ``kl_sequence_ids`` / ``kl_position_ids``. Per-token values aligned with ``labels``
(``sentence_ids``) are packed with them; per-token reference log-probs ``(R, T-1)`` (the shifted layout) go to
the packed layout the losses take (entry ``i`` = the log-prob of the token that token ``i`` predicts, 0 at a
sequence's last token); per-row values (``desirable``, win rates, sums) are unchanged.

``TokenBudgetBatchSampler`` groups examples into batches of at most ``max_tokens`` tokens (prompt and
completions, every row the collator builds from the example) instead of a fixed number of rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

_TOKEN_KEYS = {"input_ids": 0, "labels": -100, "sentence_ids": -1}
_ROW_GROUPS = ("", "kl_")


def _lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """Row lengths of a right-padded ``attention_mask`` ``(R, T)``; ``ValueError`` for holes or left padding."""
    lengths = attention_mask.long().sum(-1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not torch.equal(attention_mask.bool(), positions < lengths.unsqueeze(1)):
        raise ValueError("attention_mask must be right padding (each row's tokens first) to pack the batch")
    return lengths


def _pack_group(batch: dict, prefix: str) -> dict:
    mask = batch[f"{prefix}attention_mask"]
    if mask is None:
        raise ValueError(
            f"{prefix}attention_mask is None: the batch is packed already or has no padding mask"
        )
    lengths = _lengths(mask)
    keep = mask.bool()
    rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)
    out = {f"{prefix}sequence_ids": rows[keep].unsqueeze(0)}
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    out[f"{prefix}position_ids"] = positions[keep].unsqueeze(0)
    for key in _TOKEN_KEYS:
        if batch.get(prefix + key) is not None:
            out[prefix + key] = batch[prefix + key][keep].unsqueeze(0)
    ref_key = "ref_logps" if prefix == "" else "ref_kl_logps"
    ref = batch.get(ref_key)
    if ref is not None and ref.dim() == 2:  # per-token, shifted: (R, T-1) -> entry i = row value at p_i
        shifted = torch.cat([ref, ref.new_zeros(ref.shape[0], 1)], dim=1)
        last = positions == (lengths - 1).unsqueeze(1)
        out[ref_key] = shifted.masked_fill(last, 0.0)[keep].unsqueeze(0)
    out[f"{prefix}attention_mask"] = None
    return out


def pack_batch(batch: dict) -> dict:
    """A padded collated batch (``PairedCollator`` / ``UnpairedCollator``) as one packed row (module
    docstring), on the batch's device. A batch that is packed already (it has ``sequence_ids``) is returned as
    is."""
    if "sequence_ids" in batch:
        return batch
    out = dict(batch)
    for prefix in _ROW_GROUPS:
        if f"{prefix}input_ids" in batch:
            out.update(_pack_group(batch, prefix))
    return {k: v for k, v in out.items() if v is not None}


@dataclass
class PackedCollator:
    """``collator``'s batches packed into one row (``pack_batch``)."""

    collator: object

    def __call__(self, features: list[dict]) -> dict:
        return pack_batch(self.collator(features))


def example_tokens(feature: dict) -> int:
    """Tokens an example puts into a batch: prompt + chosen and prompt + rejected (paired), prompt + completion
    and its KL row (unpaired; counted as long as the row itself)."""
    prompt = len(feature["prompt_input_ids"])
    if "chosen_input_ids" in feature:
        return 2 * prompt + len(feature["chosen_input_ids"]) + len(feature["rejected_input_ids"])
    return 2 * (prompt + len(feature["completion_input_ids"]))


class TokenBudgetBatchSampler:
    """Batches of example indices whose ``example_tokens`` sum to at most ``max_tokens`` (an example larger than
    the budget is a batch of its own), in a shuffled order per epoch (``seed + epoch``) or in order.

    Args:
        lengths: tokens per example (``[example_tokens(f) for f in dataset]``).
        max_tokens: the token budget of a batch (> 0).
        shuffle, seed: the order of the examples.
    """

    def __init__(
        self, lengths: Sequence[int], max_tokens: int, *, shuffle: bool = True, seed: int = 0
    ) -> None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        self.lengths = [int(n) for n in lengths]
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.lengths), generator=gen).tolist()
        else:
            order = list(range(len(self.lengths)))
        batches, current, used = [], [], 0
        for i in order:
            if current and used + self.lengths[i] > self.max_tokens:
                batches.append(current)
                current, used = [], 0
            current.append(i)
            used += self.lengths[i]
        if current:
            batches.append(current)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
