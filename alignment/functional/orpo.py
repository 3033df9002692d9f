"""ORPO (Hong et al., 2024), reference-free, as Liger-Kernel's ``LigerFusedLinearORPOLoss`` computes it.

With length-averaged policy log-probs ``āw``, ``āl`` (``log P`` per token, so ``P = exp(ā) < 1``):

    log_odds = (āw - āl) - (log(1 - exp(āw)) - log(1 - exp(āl)))
    loss = nll_weight · NLL - β · mean_b logσ(log_odds)

NLL: the chosen-token NLL averaged over all chosen completion tokens (ORPO's SFT term, weight 1 in the
paper and in Liger). Metrics add ``log_odds_ratio = mean logσ(log_odds)`` and ``log_odds_chosen = mean
log_odds`` (TRL's names). ``log(1 - exp(ā))`` is evaluated stably and ``ā`` is capped just below 0, so an
empty completion (ā = 0) stays finite.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from prefuse.alignment.functional._common import batch_mean, check_pair, check_real, check_vector, chosen_nll
from prefuse.alignment.functional.simpo import average_logps, finish_reference_free
from prefuse.alignment.output import LossOutput
from torch import Tensor

_MAX_AVG_LOGP = -1e-6


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate on both sides of ``-log 2``."""
    x = x.clamp(max=_MAX_AVG_LOGP)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 0.1,
    nll_weight: float = 1.0,
    nll_loss: Tensor | None = None,
) -> LossOutput:
    """ORPO loss (module docstring) from completion log-prob sums ``(B,)`` and token counts ``(B,)``."""
    check_real("beta", beta, low=0.0, low_open=True)
    check_real("nll_weight", nll_weight, low=0.0)
    n = check_pair(
        ("policy_chosen_logps", "policy_rejected_logps"), (policy_chosen_logps, policy_rejected_logps)
    )
    check_vector("chosen_lengths", chosen_lengths, n, dtype_kind="any", device=policy_chosen_logps.device)
    check_vector("rejected_lengths", rejected_lengths, n, dtype_kind="any", device=policy_chosen_logps.device)
    if nll_loss is None:
        nll_loss = chosen_nll(policy_chosen_logps.float(), chosen_lengths.float())
    chosen_avg = average_logps(policy_chosen_logps, chosen_lengths)
    rejected_avg = average_logps(policy_rejected_logps, rejected_lengths)
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    ratio = F.logsigmoid(log_odds)
    out = finish_reference_free(
        -beta * batch_mean(ratio), chosen_avg, rejected_avg, beta, nll_weight, nll_loss
    )
    out.metrics["log_odds_ratio"] = batch_mean(ratio.detach())
    out.metrics["log_odds_chosen"] = batch_mean(log_odds.detach())
    return out
