"""``SimPOLoss``: reference-free SimPO on length-averaged log-probs."""

from __future__ import annotations

from prefuse.alignment.functional._common import check_real
from prefuse.alignment.functional.simpo import simpo_loss
from prefuse.alignment.losses.base import ReferenceFreePairedLoss
from prefuse.alignment.output import LossOutput
from torch import Tensor


class SimPOLoss(ReferenceFreePairedLoss):
    """SimPO (see ``prefuse.alignment.functional.simpo``), as Liger-Kernel computes it::

        loss = mean_b [-(1-ε) logσ(β(āw - āl) - γ) - ε logσ(-(β(āw - āl) - γ))] + nll_weight · NLL

    with ``ā`` the per-token average completion log-prob. Liger's SimPO adds its NLL term with weight
    ``alpha = 1`` by default; the paper has none, so ``nll_weight = 0`` here.

    Args:
        beta, gamma: β and the target margin γ.
        label_smoothing: ε.
        nll_weight: weight of the chosen-token NLL (Liger's ``alpha``).
        **options: ``FusedLinearLoss``'s ``ignore_index``, ``temperature``, ``softcap``, ``logit_scale``,
            ``backend``, ``deterministic``, ``path``.
    """

    def __init__(
        self,
        beta: float = 0.1,
        gamma: float = 0.5,
        label_smoothing: float = 0.0,
        nll_weight: float = 0.0,
        **options,
    ) -> None:
        super().__init__(**options)
        self.beta = check_real("beta", beta, low=0.0, low_open=True)
        self.gamma = check_real("gamma", gamma)
        self.label_smoothing = check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
        self.nll_weight = check_real("nll_weight", nll_weight, low=0.0)

    def _pair_loss(
        self, chosen: Tensor, rejected: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor
    ) -> LossOutput:
        return simpo_loss(
            chosen,
            rejected,
            chosen_lengths,
            rejected_lengths,
            beta=self.beta,
            gamma=self.gamma,
            label_smoothing=self.label_smoothing,
            nll_weight=self.nll_weight,
        )

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, gamma={self.gamma}, label_smoothing={self.label_smoothing}, "
            f"nll_weight={self.nll_weight}, " + super().extra_repr()
        )
