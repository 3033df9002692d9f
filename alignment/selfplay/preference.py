"""Pairwise preference models: the interface the self-play loop scores with, and a user callable behind it.

A preference model maps a prompt ``x`` and ``K`` responses to a ``(K, K)`` table of preference scores
``s(i≻j) = s(y_i ≻ y_j | x)``, skew-symmetric (``s(j≻i) = −s(i≻j)``, ``s(i≻i) = 0``), and to probabilities

    P(i≻j) = σ(s(i≻j) / τ),     so that  P(i≻j) + P(j≻i) = 1  and  P(i≻i) = ½.

SPPO's win rates are built from ``P``, GPO's preference scores from ``s`` (``prefuse.alignment.selfplay.estimates``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def check_responses(prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> int:
    """``K``, the common number of responses per prompt; ``ValueError`` naming the argument otherwise."""
    if isinstance(prompts, str) or not len(prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    if len(responses) != len(prompts):
        raise ValueError(f"responses must hold one list per prompt ({len(prompts)}), got {len(responses)}")
    counts = {len(r) for r in responses}
    if len(counts) != 1 or min(counts) < 1 or any(isinstance(r, str) for r in responses):
        raise ValueError(
            f"responses must be lists of the same length K >= 1 per prompt, got lengths {sorted(counts)}"
        )
    return counts.pop()


class PreferenceModel:
    """Base of the pairwise preference models (module docstring).

    Subclasses implement ``score_batch`` (no grad) and, when they can be fitted, ``pair_scores`` (with grad).
    ``tau`` is the temperature of ``P = σ(s / τ)``.
    """

    tau: float = 1.0

    def score_batch(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> Tensor:
        """``(N, K, K)`` float32 scores ``s(i≻j)`` of each prompt's ``K`` responses."""
        raise NotImplementedError

    def probability_batch(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> Tensor:
        """``(N, K, K)`` float32 ``P(i≻j) = σ(s(i≻j) / τ)``."""
        return torch.sigmoid(self.score_batch(prompts, responses) / self.tau)

    def tables(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> tuple[Tensor, Tensor]:
        """``(scores, probabilities)``, both ``(N, K, K)``, from one scoring pass."""
        scores = self.score_batch(prompts, responses)
        return scores, torch.sigmoid(scores / self.tau)

    def pair_scores(self, prompts: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]) -> Tensor:
        """``(n,)`` scores ``s(first ≻ second)`` with grad (to fit the model); not every model has them."""
        raise NotImplementedError(f"{type(self).__name__} cannot be fitted")

    def scores(self, prompt: str, responses: Sequence[str]) -> Tensor:
        """``(K, K)`` scores of one prompt's responses."""
        return self.score_batch([prompt], [list(responses)])[0]

    def probabilities(self, prompt: str, responses: Sequence[str]) -> Tensor:
        """``(K, K)`` probabilities ``P(i≻j)`` of one prompt's responses."""
        return self.probability_batch([prompt], [list(responses)])[0]


class CallablePreference(PreferenceModel):
    """A user function ``score(prompt, responses) -> (K, K)`` of probabilities ``P(i≻j)`` as a preference model.

    The returned table must be finite and lie in ``[0, 1]`` (``ValueError`` otherwise); its diagonal is set to
    ``½`` (a response ties with itself). Scores are the log-odds ``s(i≻j) = log(P / (1 − P))`` (``τ = 1``), with
    ``P`` clipped to ``[eps, 1 − eps]`` so that a certain preference stays finite.
    """

    def __init__(self, fn: Callable[[str, list[str]], object], *, eps: float = 1e-6) -> None:
        if not callable(fn):
            raise ValueError(f"score must be callable, got {type(fn).__name__}")
        if not 0.0 < eps < 0.5:
            raise ValueError(f"eps must lie in (0, 0.5), got {eps!r}")
        self.fn, self.eps, self.tau = fn, eps, 1.0

    def probability_batch(self, prompts, responses) -> Tensor:
        k = check_responses(prompts, responses)
        tables = []
        for prompt, group in zip(prompts, responses):
            table = torch.as_tensor(self.fn(prompt, list(group)), dtype=torch.float32).detach().cpu()
            if table.shape != (k, k):
                raise ValueError(
                    f"score(prompt, responses) must return a ({k}, {k}) table, got {tuple(table.shape)}"
                )
            if not torch.isfinite(table).all() or (table < 0).any() or (table > 1).any():
                raise ValueError("score(prompt, responses) must return probabilities P(i≻j) in [0, 1]")
            tables.append(table.fill_diagonal_(0.5))
        return torch.stack(tables)

    def score_batch(self, prompts, responses) -> Tensor:
        return torch.logit(self.probability_batch(prompts, responses), eps=self.eps)

    def tables(self, prompts, responses) -> tuple[Tensor, Tensor]:
        probabilities = self.probability_batch(prompts, responses)
        return torch.logit(probabilities, eps=self.eps), probabilities

    def __repr__(self) -> str:
        return f"CallablePreference({getattr(self.fn, '__name__', self.fn)!r})"


def check_tau(tau: float) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    return float(tau)
