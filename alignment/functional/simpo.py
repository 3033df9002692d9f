"""SimPO (Meng et al., 2024), reference-free, as Liger-Kernel's ``LigerFusedLinearSimPOLoss`` computes it.

With length-averaged policy log-probs ``āw = logπ(y_w)/|y_w|``, ``āl = logπ(y_l)/|y_l|``:

    u = β(āw - āl) - γ
    loss = mean_b [ -(1-ε) logσ(u) - ε logσ(-u) ] + nll_weight · NLL

NLL is the chosen-token NLL averaged over all chosen completion tokens (Liger's ``alpha`` term; the paper
has none, hence ``nll_weight=0`` by default). Rewards are ``β·ā``.
"""

from __future__ import annotations

import torch.nn.functional as F
from prefuse.alignment.functional._common import (
    batch_mean,
    check_pair,
    check_real,
    check_vector,
    chosen_nll,
    pair_metrics,
)
from prefuse.alignment.output import LossOutput
from torch import Tensor


def average_logps(logps: Tensor, lengths: Tensor) -> Tensor:
    """Per-token average of a completion's log-prob sum (an empty completion averages to 0)."""
    return logps.float() / lengths.float().clamp(min=1)


def finish_reference_free(
    loss: Tensor,
    chosen_avg_or_sum: Tensor,
    rejected_avg_or_sum: Tensor,
    beta: float,
    nll_weight: float,
    nll_loss: Tensor | None,
) -> LossOutput:
    """Add the weighted NLL and build the paired metrics (``rewards/* = β·logps``) of a reference-free loss."""
    if nll_weight > 0:
        loss = loss + nll_weight * nll_loss
    metrics = pair_metrics(
        chosen_avg_or_sum, rejected_avg_or_sum, beta * chosen_avg_or_sum, beta * rejected_avg_or_sum
    )
    if nll_loss is not None:
        metrics["nll_loss"] = nll_loss.detach()
    return LossOutput(loss, metrics)


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 0.1,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    nll_weight: float = 0.0,
    nll_loss: Tensor | None = None,
) -> LossOutput:
    """SimPO loss (module docstring) from completion log-prob sums ``(B,)`` and token counts ``(B,)``.

    ``nll_loss`` defaults to ``-Σ policy_chosen_logps / Σ chosen_lengths``.
    """
    check_real("beta", beta, low=0.0, low_open=True)
    check_real("gamma", gamma)
    check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
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
    u = beta * (chosen_avg - rejected_avg) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(u) - label_smoothing * F.logsigmoid(-u)
    return finish_reference_free(batch_mean(losses), chosen_avg, rejected_avg, beta, nll_weight, nll_loss)
