"""``SPPOLoss``: self-play preference optimisation with soft win rates."""

from __future__ import annotations

from prefuse.alignment.functional._common import check_real
from prefuse.alignment.functional.sppo import sppo_loss
from prefuse.alignment.losses.base import PairedLoss
from prefuse.alignment.output import LossOutput
from torch import Tensor


class SPPOLoss(PairedLoss):
    """SPPO (see ``prefuse.alignment.functional.sppo``), ``η = 1/β``::

        loss = mean_b ½[(Δw - η(pw - ½))² + (Δl - η(pl - ½))²]

    Args:
        beta: β (the released SPPO models use η = 1000, i.e. β = 0.001).
        **options: ``FusedLinearLoss``'s ``ignore_index``, ``temperature``, ``softcap``, ``logit_scale``,
            ``backend``, ``deterministic``, ``path``.
    """

    def __init__(self, beta: float = 0.001, **options) -> None:
        super().__init__(**options)
        self.beta = check_real("beta", beta, low=0.0, low_open=True)

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        *,
        p_chosen: Tensor,
        p_rejected: Tensor,
        bias: Tensor | None = None,
        ref_hidden: Tensor | None = None,
        ref_weight: Tensor | None = None,
        ref_bias: Tensor | None = None,
        ref_logps: Tensor | None = None,
        shift: bool = True,
    ) -> LossOutput:
        """``DPOLoss.forward``'s arguments plus ``p_chosen``, ``p_rejected``: ``(B,)`` estimated win rates
        of the chosen / rejected completions against the current policy, in ``[0, 1]``."""
        return self._paired_loss(
            hidden,
            weight,
            labels,
            bias,
            shift,
            lambda policy, ref, _, b: sppo_loss(
                policy[:b], policy[b:], ref[:b], ref[b:], p_chosen, p_rejected, beta=self.beta
            ),
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            ref_bias=ref_bias,
            ref_logps=ref_logps,
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, " + super().extra_repr()
