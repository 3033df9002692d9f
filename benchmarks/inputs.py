"""Reproducible inputs of one benchmark case, built directly on the case's device.

Every contender of a case (and the float64 reference, in another process) rebuilds the same tensors from the
case's seed. Shapes follow the loss modules' API: ``hidden`` ``(rows, T, D)``, ``labels`` ``(rows, T)`` aligned
with the input ids (``-100`` on the prompt and padding; the losses shift), paired rows chosen ``[:B]`` then
rejected ``[B:]``. The reference model has its own head (a perturbed copy of the policy's) and its own hidden
states; KTO / FactAlign get as many mismatched KL rows as examples.

Scales: hidden states ~ N(0, 1) and the head ~ N(0, (2 / sqrt(D))^2), so logits have a standard deviation of
about 2 (and |logits| of ~8 at most) — a realistic spread; the reference perturbs both by 5 %.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from benchmarks.plan import Case

IGNORE_INDEX = -100
LOGIT_STD = 2.0
REF_NOISE = 0.05
SENTENCES_PER_COMPLETION = 8


@dataclass
class Batch:
    """The tensors of one case. Optional fields are None where the workload does not use them."""

    case: Case
    hidden: Tensor
    weight: Tensor
    labels: Tensor
    ref_hidden: Tensor | None = None
    ref_weight: Tensor | None = None
    desirable: Tensor | None = None
    kl_hidden: Tensor | None = None
    kl_labels: Tensor | None = None
    ref_kl_hidden: Tensor | None = None
    sentence_ids: Tensor | None = None
    sentence_labels: Tensor | None = None
    kl_sentence_ids: Tensor | None = None
    p_chosen: Tensor | None = None
    p_rejected: Tensor | None = None

    @property
    def softcap(self) -> float | None:
        return self.case.head.softcap

    @property
    def seed(self) -> int:
        """Seed of the workload's own randomness (SamPO's token sample)."""
        return self.case.seed

    def grad_tensors(self) -> list[Tensor]:
        """The leaves that receive gradients (hidden states; the head when trainable)."""
        return [t for t in (self.hidden, self.weight) if t.requires_grad]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, Tensor))

    def scored_tokens(self) -> int:
        """Policy tokens that carry a loss (not prompt, not padding), after the one-token shift."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class _Source:
    """Seeded random tensors on one device (a generator of that device, so CUDA inputs are built on the GPU)."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed)

    def normal(self, *shape: int, std: float = 1.0, dtype: torch.dtype = torch.float32) -> Tensor:
        t = torch.randn(shape, generator=self.gen, device=self.device)
        if std != 1.0:
            t.mul_(std)
        return t if dtype == torch.float32 else t.to(dtype)

    def perturbed(self, base: Tensor, rel: float) -> Tensor:
        """``base * (1 + rel * noise)`` in ``base``'s dtype (noise drawn in fp32)."""
        noise = torch.randn(base.shape, generator=self.gen, device=self.device).mul_(rel).add_(1.0)
        return noise.mul_(base.float()).to(base.dtype)

    def tokens(self, rows: int, seq_len: int, vocab: int) -> Tensor:
        return torch.randint(0, vocab, (rows, seq_len), generator=self.gen, device=self.device)

    def uniform(self, n: int) -> Tensor:
        return torch.rand(n, generator=self.gen, device=self.device)


def _labels(src: _Source, case: Case, rows: int, *, short_rows: slice | None = None) -> Tensor:
    """Token labels with the first ``prompt_frac`` of every row ignored; rows in ``short_rows`` end early
    (padding, up to half of the completion), which makes SamPO down-sample the longer side."""
    labels = src.tokens(rows, case.seq_len, case.head.vocab)
    prompt = round(case.prompt_frac * case.seq_len)
    labels[:, :prompt] = IGNORE_INDEX
    if short_rows is not None:
        completion = case.seq_len - prompt
        idx = range(rows)[short_rows]
        pads = (src.uniform(len(idx)) * (completion // 2)).long().tolist()
        for row, pad in zip(idx, pads):
            if pad:
                labels[row, case.seq_len - pad :] = IGNORE_INDEX
    return labels


def _sentence_ids(labels: Tensor) -> tuple[Tensor, int]:
    """Split every row's completion into ``SENTENCES_PER_COMPLETION`` contiguous sentences, numbered over the
    batch (``-1`` outside a sentence); returns ``(ids, number of sentences)``."""
    ids = torch.full_like(labels, -1)
    next_id = 0
    for row in range(labels.shape[0]):
        positions = (labels[row] != IGNORE_INDEX).nonzero().squeeze(1)
        for part in positions.tensor_split(SENTENCES_PER_COMPLETION):
            if part.numel():
                ids[row, part] = next_id
                next_id += 1
    return ids, next_id


def make_batch(case: Case, device: torch.device | str | None = None) -> Batch:
    """The inputs of ``case`` on ``device`` (default: ``case.device``), with ``requires_grad`` set as the case's
    mode and head demand (hidden states always in forward+backward; the head only when trainable)."""
    device = torch.device(device if device is not None else case.device)
    head, rows, t = case.head, case.rows, case.seq_len
    dtype = _dtype(head.dtype)
    src = _Source(case.seed, device)
    hidden = src.normal(rows, t, head.hidden, dtype=dtype)
    weight = src.normal(head.vocab, head.hidden, std=LOGIT_STD / head.hidden**0.5, dtype=dtype)
    paired = case.workload in ("dpo", "sampo", "sppo")
    short = slice(rows // 2, rows) if case.workload == "sampo" else None
    batch = Batch(case, hidden, weight, _labels(src, case, rows, short_rows=short))
    if case.workload != "logprobs":
        batch.ref_weight = src.perturbed(weight, REF_NOISE)
        batch.ref_hidden = src.perturbed(hidden, REF_NOISE)
    if case.kl_rows:
        batch.desirable = torch.arange(rows, device=device) % 2 == 0
        batch.kl_hidden = src.normal(case.kl_rows, t, head.hidden, dtype=dtype)
        batch.kl_labels = _labels(src, case, case.kl_rows)
        batch.ref_kl_hidden = src.perturbed(batch.kl_hidden, REF_NOISE)
    if case.workload == "factalign":
        batch.sentence_ids, n_sentences = _sentence_ids(batch.labels)
        batch.sentence_labels = src.uniform(n_sentences) < 0.5
        batch.kl_sentence_ids, _ = _sentence_ids(batch.kl_labels)
    if paired and case.workload == "sppo":
        b = rows // 2
        batch.p_chosen = 0.5 + 0.5 * src.uniform(b)
        batch.p_rejected = 0.5 * src.uniform(b)
    train = case.mode == "fwd+bwd"
    batch.hidden.requires_grad_(train)
    batch.weight.requires_grad_(train and case.trainable_head)
    return batch
