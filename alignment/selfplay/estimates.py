"""What the seeds train on: SPPO's win rates, GPO's preference scores, and the chosen / rejected pair.

For one prompt with ``K`` sampled responses ``y_1 … y_K`` of the current policy ``π``:

- SPPO's win rate of ``y_i`` against the policy, ``P̂(y_i ≻ π) = (1/K) Σ_j P(y_i ≻ y_j)``, the mean over all
  ``K`` samples with ``P(y_i ≻ y_i) = ½`` (as the SPPO code averages its full ``K × K`` table);
- GPO's general preference score ``ŝ(y_i ≻ π) = (1/K) Σ_j s(y_i ≻ y_j)`` (``s(y_i ≻ y_i) = 0``).

The pair is the SPPO code's: ``chosen`` the response with the highest estimate, ``rejected`` the one with the
lowest (the first on ties); the SPPO loss trains on their win rates ``p_chosen = P̂(y_c ≻ π)``,
``p_rejected = P̂(y_r ≻ π)`` and the GPO loss on their scores ``s_chosen``, ``s_rejected``. ``method`` decides
which estimate picks the pair ("sppo": win rates, "gpo": scores); each row carries both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

METHODS = ("sppo", "gpo")


def _check_table(name: str, table: Tensor) -> Tensor:
    table = torch.as_tensor(table)
    if table.ndim < 2 or table.shape[-1] != table.shape[-2] or table.shape[-1] < 1:
        raise ValueError(f"{name} must be a (..., K, K) table, got shape {tuple(table.shape)}")
    if not torch.isfinite(table).all():
        raise ValueError(f"{name} must be finite")
    return table


def win_rates(probabilities: Tensor) -> Tensor:
    """``(..., K)`` SPPO win rates ``P̂(y_i ≻ π) = mean_j P(y_i ≻ y_j)`` of a ``(..., K, K)`` table ``P(i≻j)``
    in ``[0, 1]`` (its diagonal is taken as ``½``, whatever it holds)."""
    p = _check_table("probabilities", probabilities).double()
    if (p < 0).any() or (p > 1).any():
        raise ValueError("probabilities must lie in [0, 1]")
    p = p.clone()
    p.diagonal(dim1=-2, dim2=-1).fill_(0.5)
    return p.mean(-1)


def preference_scores(scores: Tensor) -> Tensor:
    """``(..., K)`` GPO scores ``ŝ(y_i ≻ π) = mean_j s(y_i ≻ y_j)`` of a ``(..., K, K)`` table ``s(i≻j)`` (its
    diagonal is taken as ``0``)."""
    s = _check_table("scores", scores).double().clone()
    s.diagonal(dim1=-2, dim2=-1).fill_(0.0)
    return s.mean(-1)


def select_pair(estimates: Tensor) -> tuple[int, int]:
    """``(chosen, rejected)``: the indices of the highest and the lowest estimate (first on ties)."""
    estimates = torch.as_tensor(estimates)
    if estimates.ndim != 1 or estimates.numel() < 1:
        raise ValueError(f"estimates must be a (K,) vector, got shape {tuple(estimates.shape)}")
    return int(estimates.argmax()), int(estimates.argmin())


def preference_rows(
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    scores: Tensor,
    probabilities: Tensor,
    *,
    method: str,
) -> list[dict]:
    """One training row per prompt: ``prompt``, ``chosen``, ``rejected``, ``p_chosen``, ``p_rejected`` (SPPO win
    rates), ``s_chosen``, ``s_rejected`` (GPO scores) and ``p_chosen_over_rejected`` (``P(y_c ≻ y_r)``).

    ``scores`` and ``probabilities`` are ``(N, K, K)``. A prompt whose chosen or rejected response is blank is
    skipped (the trainer rejects blank completions).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    rates, values = win_rates(probabilities), preference_scores(scores)
    if rates.shape[0] != len(prompts) or len(responses) != len(prompts):
        raise ValueError(f"scores, probabilities and responses must cover the {len(prompts)} prompts")
    rows = []
    for n, prompt in enumerate(prompts):
        c, r = select_pair(rates[n] if method == "sppo" else values[n])
        chosen, rejected = responses[n][c], responses[n][r]
        if not chosen.strip() or not rejected.strip():
            continue
        rows.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "p_chosen": float(rates[n, c]),
                "p_rejected": float(rates[n, r]),
                "s_chosen": float(values[n, c]),
                "s_rejected": float(values[n, r]),
                "p_chosen_over_rejected": float(probabilities[n][c, r]),
            }
        )
    return rows
