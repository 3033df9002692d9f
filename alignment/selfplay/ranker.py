"""``PairRanker``: a PairRM-style pairwise ranker -- one pair encoder reads the prompt and two responses.

A sequence classifier with one output reads ``(x, a, b)`` (``PAIR_FORMAT``) and gives a logit ``f(x, a, b)``
for "a is better than b". As PairRM does, both orders are read and combined into a skew-symmetric score

    s(a≻b) = ½ [f(x, a, b) − f(x, b, a)],     P(a≻b) = σ(s(a≻b) / τ),

so ``P(a≻b) + P(b≻a) = 1`` and ``P(a≻a) = ½`` by construction, whatever the encoder's position bias. A prompt's
``K`` responses cost ``K(K−1)`` encoder rows (both orders of every unordered pair), batched across prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from prefuse.alignment.selfplay.preference import PreferenceModel, check_responses, check_tau
from prefuse.alignment.selfplay.text import PAIR_FORMAT, encode
from torch import Tensor, nn


class PairRanker(nn.Module, PreferenceModel):
    """PairRM-style ranker (module docstring).

    Args:
        model: a ``transformers`` sequence classifier with ``num_labels == 1`` (the pair encoder).
        tokenizer: its tokenizer (needs a pad token).
        tau: the temperature of ``P = σ(s / τ)``.
        max_length: tokens per encoded pair (truncated from the left).
        batch_size: encoder rows per forward when scoring.
    """

    def __init__(
        self, model: nn.Module, tokenizer, *, tau: float = 1.0, max_length: int = 512, batch_size: int = 32
    ) -> None:
        super().__init__()
        labels = getattr(getattr(model, "config", None), "num_labels", None)
        if labels != 1:
            raise ValueError(
                f"model must be a sequence classifier with num_labels=1 (one logit), got {labels!r}"
            )
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer must have a pad token")
        if max_length < 8 or batch_size < 1:
            raise ValueError(f"max_length must be >= 8 and batch_size >= 1, got {max_length}, {batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.tau, self.max_length, self.batch_size = check_tau(tau), max_length, batch_size

    @classmethod
    def from_pretrained(cls, path: str, *, trust_remote_code: bool = False, **kwargs) -> PairRanker:
        """Load the pair encoder and its tokenizer from a Hugging Face folder or hub name (no remote code unless
        ``trust_remote_code``)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, **kwargs)

    def save_pretrained(self, path: str) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def pair_logits(self, prompts: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]) -> Tensor:
        """``(n,)`` float32 encoder logits ``f(x, a, b)`` (grad as the caller's context allows)."""
        texts = [PAIR_FORMAT.format(prompt=p, first=a, second=b) for p, a, b in zip(prompts, firsts, seconds)]
        batch = encode(
            self.tokenizer,
            texts,
            max_length=self.max_length,
            padding_side="right",
            device=self.device,
            add_special_tokens=True,
        )
        return self.model(**batch).logits[:, 0].float()

    def pair_scores(self, prompts, firsts, seconds) -> Tensor:
        """``(n,)`` ``s(a≻b) = ½[f(x, a, b) − f(x, b, a)]``, with grad."""
        n = len(prompts)
        both = self.pair_logits(list(prompts) * 2, list(firsts) + list(seconds), list(seconds) + list(firsts))
        return 0.5 * (both[:n] - both[n:])

    def score_batch(self, prompts, responses) -> Tensor:
        k = check_responses(prompts, responses)
        pairs = [(n, i, j) for n in range(len(prompts)) for i in range(k) for j in range(i + 1, k)]
        scores = torch.zeros(len(prompts), k, k)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(pairs), max(1, self.batch_size // 2)):
                    chunk = pairs[start : start + max(1, self.batch_size // 2)]
                    s = self.pair_scores(
                        [prompts[n] for n, _, _ in chunk],
                        [responses[n][i] for n, i, _ in chunk],
                        [responses[n][j] for n, _, j in chunk],
                    ).cpu()
                    index = torch.tensor(chunk, dtype=torch.long).reshape(-1, 3)
                    scores[index[:, 0], index[:, 1], index[:, 2]] = s
                    scores[index[:, 0], index[:, 2], index[:, 1]] = -s
        finally:
            self.model.train(was_training)
        return scores
