"""``CPOLoss``: reference-free contrastive preference optimisation."""

from __future__ import annotations

from prefuse.alignment.functional._common import check_real
from prefuse.alignment.functional.cpo import cpo_loss
from prefuse.alignment.losses.base import PairedLoss
from prefuse.alignment.output import LossOutput
from torch import Tensor


class CPOLoss(PairedLoss):
    """CPO (see ``prefuse.alignment.functional.cpo``), as Liger-Kernel computes it::

        loss = mean_b [-(1-ε) logσ(β(lw - ll)) - ε logσ(-β(lw - ll))] + nll_weight · NLL

    with ``l`` the completion log-prob sums (per-token averages when ``average_log_prob``) and NLL the
    chosen-token NLL (CPO's behaviour-cloning term).

    Args:
        beta: β.
        label_smoothing: ε.
        nll_weight: weight of the NLL term (1 in the paper, TRL and Liger).
        average_log_prob: use per-token averages instead of sums (Liger's option of the same name).
        **options: ``ignore_index``, ``temperature``, ``softcap``, ``backend``, ``deterministic``.
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

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        *,
        bias: Tensor | None = None,
        ref_hidden: Tensor | None = None,
        ref_weight: Tensor | None = None,
        ref_bias: Tensor | None = None,
        ref_logps: Tensor | None = None,
        shift: bool = True,
    ) -> LossOutput:
        """``hidden`` ``(2B, T, D)``, ``labels`` ``(2B, T)``; reference-free (``ref_*`` must be None)."""
        self._reject_reference(
            ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, ref_logps=ref_logps
        )
        policy, _, lengths, b = self._paired_sums(hidden, weight, labels, bias, shift, reference=False)
        return cpo_loss(
            policy[:b],
            policy[b:],
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            nll_weight=self.nll_weight,
            chosen_lengths=lengths[:b],
            rejected_lengths=lengths[b:],
            average_log_prob=self.average_log_prob,
        )

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, label_smoothing={self.label_smoothing}, nll_weight={self.nll_weight}, "
            f"average_log_prob={self.average_log_prob}, " + super().extra_repr()
        )
