"""``SPPOLoss``: self-play preference optimisation with soft win rates -- GPO with the target ``p - ½``."""

from __future__ import annotations

from prefuse.alignment.functional.sppo import sppo_loss
from prefuse.alignment.losses.gpo import GPOLoss
from prefuse.alignment.output import LossOutput
from torch import Tensor


class SPPOLoss(GPOLoss):
    """SPPO (see ``prefuse.alignment.functional.sppo``), ``η = 1/β``::

        loss = mean_b ½[(Δw - η(pw - ½))² + (Δl - η(pl - ½))²]

    i.e. ``GPOLoss`` (unclamped) with the scores ``s = p - ½``.

    Args:
        beta: β (the released SPPO models use η = 1000, i.e. β = 0.001).
        **options: ``ignore_index``, ``temperature``, ``softcap``, ``backend``, ``deterministic``.
    """

    def __init__(self, beta: float = 0.001, **options) -> None:
        super().__init__(beta, clamp=None, **options)

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
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            ref_bias=ref_bias,
            ref_logps=ref_logps,
            p_chosen=p_chosen,
            p_rejected=p_rejected,
        )

    def loss_from_token_logps(  # type: ignore[override]
        self, policy_logps: Tensor, ref_logps: Tensor, mask: Tensor, *, p_chosen: Tensor, p_rejected: Tensor
    ) -> LossOutput:
        """The loss from per-token log-probs (as ``DPOLoss.loss_from_token_logps``) and the ``(B,)`` win
        rates."""
        policy, ref, _, b = self._pair_sums(policy_logps, ref_logps, mask)
        return sppo_loss(policy[:b], policy[b:], ref[:b], ref[b:], p_chosen, p_rejected, beta=self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, " + super(GPOLoss, self).extra_repr()
