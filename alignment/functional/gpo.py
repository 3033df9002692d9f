"""GPO (general preference optimization with a General Preference Model, Zhang et al., 2024).

SPPO's square loss with the win-rate target replaced by GPM preference scores ``sw``, ``sl``:

    target = η·s  (optionally clamped to ``[-clamp, clamp]`` or ``[clamp[0], clamp[1]]``),  η = 1/β
    loss = mean_b ½ [ (Δw - target_w)² + (Δl - target_l)² ]
"""

from __future__ import annotations

import torch
from prefuse.alignment.functional._common import (
    batch_mean,
    check_finite,
    check_pair,
    check_real,
    pair_metrics,
)
from prefuse.alignment.output import LossOutput
from torch import Tensor


def gpo_clamp_bounds(clamp) -> tuple[float, float] | None:
    """``None``, a positive bound ``c`` (→ ``[-c, c]``) or a pair ``(low, high)``; ``ValueError`` otherwise."""
    if clamp is None:
        return None
    if isinstance(clamp, (tuple, list)):
        if len(clamp) != 2:
            raise ValueError(f"clamp must be a number or a (low, high) pair, got {clamp!r}")
        low, high = check_real("clamp[0]", clamp[0]), check_real("clamp[1]", clamp[1])
        if low > high:
            raise ValueError(f"clamp must have low <= high, got {clamp!r}")
        return low, high
    c = check_real("clamp", clamp, low=0.0, low_open=True)
    return -c, c


def gpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    s_chosen: Tensor,
    s_rejected: Tensor,
    *,
    beta: float = 0.001,
    clamp: float | tuple[float, float] | None = None,
) -> LossOutput:
    """GPO loss (module docstring); all inputs ``(B,)``. Returns the paired metrics.

    Non-finite scores are a ``ValueError`` (checked in eager mode, one host read)."""
    check_real("beta", beta, low=0.0, low_open=True)
    bounds = gpo_clamp_bounds(clamp)
    check_pair(
        ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "s_chosen",
         "s_rejected"),
        (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, s_chosen, s_rejected),
    )  # fmt: skip
    check_finite("s_chosen", s_chosen)
    check_finite("s_rejected", s_rejected)
    eta = 1.0 / beta
    target_chosen = eta * s_chosen.detach().float()
    target_rejected = eta * s_rejected.detach().float()
    if bounds is not None:
        target_chosen = torch.clamp(target_chosen, *bounds)
        target_rejected = torch.clamp(target_rejected, *bounds)
    chosen_logratios = policy_chosen_logps.float() - ref_chosen_logps.detach().float()
    rejected_logratios = policy_rejected_logps.float() - ref_rejected_logps.detach().float()
    losses = 0.5 * ((chosen_logratios - target_chosen) ** 2 + (rejected_logratios - target_rejected) ** 2)
    metrics = pair_metrics(
        policy_chosen_logps, policy_rejected_logps, beta * chosen_logratios, beta * rejected_logratios
    )
    return LossOutput(batch_mean(losses), metrics)
