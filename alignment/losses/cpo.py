"""``CPOLoss``: reference-free contrastive preference optimisation."""

from __future__ import annotations

from prefuse.alignment.functional._common import check_real
from prefuse.alignment.functional.cpo import cpo_loss
from prefuse.alignment.losses.base import ReferenceFreePairedLoss
from prefuse.alignment.output import LossOutput
from torch import Tensor


class CPOLoss(ReferenceFreePairedLoss):
    """CPO (see ``prefuse.alignment.functional.cpo``), as Liger-Kernel computes it::

        loss = mean_b [-(1-ε) logσ(β(lw - ll)) - ε logσ(-β(lw - ll))] + nll_weight · NLL

    with ``l`` the completion log-prob sums (per-token averages when ``average_log_prob``) and NLL the
    chosen-token NLL (CPO's behaviour-cloning term).

    Args:
        beta: β.
        label_smoothing: ε.
        nll_weight: weight of the NLL term (1 in the paper, TRL and Liger).
        average_log_prob: use per-token averages instead of sums (Liger's option of the same name).
        **options: ``FusedLinearLoss``'s ``ignore_index``, ``temperature``, ``softcap``, ``logit_scale``,
            ``backend``, ``deterministic``, ``path``.
    """

    def __init__(
        self,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        nll_weight: float = 1.0,
        *,
        average_log_prob: bool = False,
        **options,
    ) -> None:
        super().__init__(**options)
        self.beta = check_real("beta", beta, low=0.0, low_open=True)
        self.label_smoothing = check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
        self.nll_weight = check_real("nll_weight", nll_weight, low=0.0)
        self.average_log_prob = bool(average_log_prob)

    def _pair_loss(
        self, chosen: Tensor, rejected: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor
    ) -> LossOutput:
        return cpo_loss(
            chosen,
            rejected,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            nll_weight=self.nll_weight,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            average_log_prob=self.average_log_prob,
        )

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, label_smoothing={self.label_smoothing}, nll_weight={self.nll_weight}, "
            f"average_log_prob={self.average_log_prob}, " + super().extra_repr()
        )
