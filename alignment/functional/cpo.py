"""CPO (Xu et al., 2024, "Contrastive Preference Optimization"), reference-free, as Liger-Kernel's
``LigerFusedLinearCPOLoss`` computes it.

With policy completion log-probs ``lw``, ``ll`` (sums; per-token averages when ``average_log_prob``):

    u = β(lw - ll)
    loss = mean_b [ -(1-ε) logσ(u) - ε logσ(-u) ] + nll_weight · NLL

NLL: the chosen-token NLL averaged over all chosen completion tokens (CPO's behaviour-cloning term,
weight 1 in the paper, TRL and Liger). Rewards are ``β·l``.
"""

from __future__ import annotations

import torch.nn.functional as F
from prefuse.alignment.functional._common import batch_mean, check_pair, check_real, check_vector, chosen_nll
from prefuse.alignment.functional.simpo import average_logps, finish_reference_free
from prefuse.alignment.output import LossOutput
from torch import Tensor


def cpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    nll_weight: float = 1.0,
    nll_loss: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    average_log_prob: bool = False,
) -> LossOutput:
    """CPO loss (module docstring) from completion log-prob sums ``(B,)``.

    ``chosen_lengths`` / ``rejected_lengths`` (token counts) are needed for ``average_log_prob`` and, when
    ``nll_loss`` is not given, for the NLL term (``nll_weight > 0``) and its metric.
    """
    check_real("beta", beta, low=0.0, low_open=True)
    check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
    check_real("nll_weight", nll_weight, low=0.0)
    n = check_pair(
        ("policy_chosen_logps", "policy_rejected_logps"), (policy_chosen_logps, policy_rejected_logps)
    )
    if chosen_lengths is not None:
        check_vector("chosen_lengths", chosen_lengths, n, dtype_kind="any", device=policy_chosen_logps.device)
    if rejected_lengths is not None:
        check_vector(
            "rejected_lengths", rejected_lengths, n, dtype_kind="any", device=policy_chosen_logps.device
        )
    if nll_loss is None and chosen_lengths is not None:
        nll_loss = chosen_nll(policy_chosen_logps.float(), chosen_lengths.float())
    if nll_weight > 0 and nll_loss is None:
        raise ValueError("nll_weight > 0 needs nll_loss or chosen_lengths")
    chosen, rejected = policy_chosen_logps.float(), policy_rejected_logps.float()
    if average_log_prob:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("average_log_prob=True needs chosen_lengths and rejected_lengths")
        chosen, rejected = average_logps(chosen, chosen_lengths), average_logps(rejected, rejected_lengths)
    u = beta * (chosen - rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(u) - label_smoothing * F.logsigmoid(-u)
    return finish_reference_free(batch_mean(losses), chosen, rejected, beta, nll_weight, nll_loss)
