"""``ORPOLoss``: reference-free odds-ratio preference optimisation."""

from __future__ import annotations

from prefuse.alignment.functional._common import check_real
from prefuse.alignment.functional.orpo import orpo_loss
from prefuse.alignment.losses.base import ReferenceFreePairedLoss
from prefuse.alignment.output import LossOutput
from torch import Tensor


class ORPOLoss(ReferenceFreePairedLoss):
    """ORPO (see ``prefuse.alignment.functional.orpo``), as Liger-Kernel computes it::

        loss = nll_weight · NLL - β · mean_b logσ(log_odds),
        log_odds = (āw - āl) - (log(1 - e^āw) - log(1 - e^āl))

    with ``ā`` the per-token average completion log-prob and NLL the chosen-token NLL (ORPO's SFT term).
    Metrics add ``log_odds_ratio`` and ``log_odds_chosen``.

    Args:
        beta: β (the paper's λ).
        nll_weight: weight of the SFT / NLL term (1 in the paper and in Liger).
        **options: ``FusedLinearLoss``'s ``ignore_index``, ``temperature``, ``softcap``, ``logit_scale``,
            ``backend``, ``deterministic``, ``path``.
    """

    def __init__(self, beta: float = 0.1, nll_weight: float = 1.0, **options) -> None:
        super().__init__(**options)
        self.beta = check_real("beta", beta, low=0.0, low_open=True)
        self.nll_weight = check_real("nll_weight", nll_weight, low=0.0)

    def _pair_loss(
        self, chosen: Tensor, rejected: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor
    ) -> LossOutput:
        return orpo_loss(
            chosen, rejected, chosen_lengths, rejected_lengths, beta=self.beta, nll_weight=self.nll_weight
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, nll_weight={self.nll_weight}, " + super().extra_repr()
