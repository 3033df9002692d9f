"""``GPOLoss``: general preference optimisation with General Preference Model scores."""

from __future__ import annotations

from prefuse.alignment.functional._common import check_real
from prefuse.alignment.functional.gpo import gpo_clamp_bounds, gpo_loss
from prefuse.alignment.losses.base import PairedLoss
from prefuse.alignment.output import LossOutput
from torch import Tensor


class GPOLoss(PairedLoss):
    """GPO (see ``prefuse.alignment.functional.gpo``), ``η = 1/β``::

        loss = mean_b ½[(Δw - clamp(η·sw))² + (Δl - clamp(η·sl))²]

    Args:
        beta: β (0.001 for the released GPO model).
        clamp: None, a bound ``c`` (targets clamped to ``[-c, c]``) or ``(low, high)``.
        **options: ``ignore_index``, ``temperature``, ``softcap``, ``backend``, ``deterministic``.
    """

    def __init__(
        self, beta: float = 0.001, clamp: float | tuple[float, float] | None = None, **options
    ) -> None:
        super().__init__(**options)
        self.beta = check_real("beta", beta, low=0.0, low_open=True)
        gpo_clamp_bounds(clamp)
        self.clamp = clamp

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        *,
        s_chosen: Tensor,
        s_rejected: Tensor,
        bias: Tensor | None = None,
        ref_hidden: Tensor | None = None,
        ref_weight: Tensor | None = None,
        ref_bias: Tensor | None = None,
        ref_logps: Tensor | None = None,
        shift: bool = True,
    ) -> LossOutput:
        """``DPOLoss.forward``'s arguments plus ``s_chosen``, ``s_rejected``: ``(B,)`` preference scores."""
        return self._paired_loss(
            hidden,
            weight,
            labels,
            bias,
            shift,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            ref_bias=ref_bias,
            ref_logps=ref_logps,
            s_chosen=s_chosen,
            s_rejected=s_rejected,
        )

    def loss_from_token_logps(
        self, policy_logps: Tensor, ref_logps: Tensor, mask: Tensor, *, s_chosen: Tensor, s_rejected: Tensor
    ) -> LossOutput:
        """The loss from per-token log-probs (as ``DPOLoss.loss_from_token_logps``) and the ``(B,)`` scores."""
        policy, ref, _, b = self._pair_sums(policy_logps, ref_logps, mask)
        return gpo_loss(
            policy[:b], policy[b:], ref[:b], ref[b:], s_chosen, s_rejected, beta=self.beta, clamp=self.clamp
        )

    def extra_repr(self) -> str:
        return f"beta={self.beta}, clamp={self.clamp!r}, " + super().extra_repr()
