"""SPPO (Wu et al., 2024, "Self-Play Preference Optimization") with soft win rates.

With ``η = 1/β``, log-ratios ``Δw``, ``Δl`` (sums over completion tokens) and estimated win rates
``pw = P(y_w ≻ π_t | x)``, ``pl = P(y_l ≻ π_t | x)`` in ``[0, 1]``:

    loss = mean_b ½ [ (Δw - η(pw - ½))² + (Δl - η(pl - ½))² ]

``pw = 1``, ``pl = 0`` gives half of DPO's ``sppo_hard``.
"""

from __future__ import annotations

from prefuse.alignment.functional._common import check_pair, check_unit_interval
from prefuse.alignment.functional.gpo import gpo_loss
from prefuse.alignment.output import LossOutput
from torch import Tensor


def sppo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    p_chosen: Tensor,
    p_rejected: Tensor,
    *,
    beta: float = 0.001,
) -> LossOutput:
    """SPPO loss (module docstring); all inputs ``(B,)``. ``p_*`` outside ``[0, 1]`` is a ``ValueError``.

    It is ``gpo_loss`` with the scores ``s = p - ½`` (no clamp). Returns the paired metrics ``rewards/*``
    (``βΔ``) and ``logps/*``.
    """
    check_pair(
        ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "p_chosen",
         "p_rejected"),
        (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, p_chosen, p_rejected),
    )  # fmt: skip
    check_unit_interval("p_chosen", p_chosen)
    check_unit_interval("p_rejected", p_rejected)
    return gpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        p_chosen.detach().float() - 0.5, p_rejected.detach().float() - 0.5, beta=beta,
    )  # fmt: skip
