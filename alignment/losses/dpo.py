"""``DPOLoss``: DPO and its TRL variants on the fused log-probs."""

from __future__ import annotations

import torch
import torch.distributed as dist
from prefuse.alignment.functional._common import batch_mean
from prefuse.alignment.functional.dpo import check_dpo_options, dpo_loss
from prefuse.alignment.losses.base import PairedLoss
from prefuse.alignment.output import LossOutput
from torch import Tensor


class DPOLoss(PairedLoss):
    """DPO family loss over ``2B`` rows of last hidden states (chosen ``[:B]``, rejected ``[B:]``).

    ``loss = mean_b ℓ(Δc_b, Δr_b) + nll_weight · NLL`` with ``Δ = logπ - logπ_ref`` summed over completion
    tokens and ``ℓ`` the ``loss_type``'s formula (``prefuse.alignment.functional.dpo`` lists them all, with
    TRL's conventions: ``ipo``'s loss on per-token averages, ``sppo_hard`` in sum form, ``exo_pair`` with
    ``0 < label_smoothing < 1``). NLL is the chosen-token NLL averaged over all chosen completion tokens
    (RPO). ``bco_pair`` keeps TRL's running mean of the rewards (all-reduced across ranks) in this module.

    Args:
        beta: β, the KL strength (IPO's τ).
        loss_type: one of ``prefuse.alignment.functional.DPO_LOSS_TYPES``.
        label_smoothing: ε for ``sigmoid`` (cDPO), ``robust`` and ``exo_pair``.
        nll_weight: weight of the chosen-token NLL (RPO's α).
        discopop_tau: DiscoPOP's temperature τ.
        **options: ``ignore_index``, ``temperature``, ``softcap``, ``backend``, ``deterministic``.

    ``forward`` returns ``LossOutput`` with ``rewards/{chosen,rejected,accuracies,margins}``,
    ``logps/{chosen,rejected}`` and ``nll_loss``.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        nll_weight: float = 0.0,
        *,
        discopop_tau: float = 0.05,
        **options,
    ) -> None:
        super().__init__(**options)
        check_dpo_options(loss_type, beta, label_smoothing, nll_weight, discopop_tau)
        self.beta = float(beta)
        self.loss_type = loss_type
        self.label_smoothing = float(label_smoothing)
        self.nll_weight = float(nll_weight)
        self.discopop_tau = float(discopop_tau)
        self._bco_mean: Tensor | None = None  # bco_pair: running mean of the batch-mean rewards
        self._bco_count: Tensor | None = None

    def _bco_delta(self, policy: Tensor, ref: Tensor) -> Tensor:
        """TRL's ``RunningMoments`` update with this batch's mean reward (one count per rank); the new mean.

        As TRL (which gathers the scalar batch means), the update is the mean of the ranks' batch means, so a
        2-rank run equals a 1-rank run on the whole batch when the ranks hold equal batches; a rank with an empty
        batch counts 0 (and every rank must call this: it all-reduces)."""
        with torch.no_grad():
            rewards = self.beta * (policy.detach().float() - ref.float())
            batch = batch_mean(rewards)  # an empty batch (a rank without data) counts 0: it leaves δ as it is
            stats = torch.stack([batch, torch.full_like(batch, float(rewards.numel() > 0))])
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(stats, op=dist.ReduceOp.SUM)
            if self._bco_mean is None or self._bco_mean.device != batch.device:
                self._bco_mean = torch.zeros((), device=batch.device)
                self._bco_count = torch.zeros((), device=batch.device)
            count = self._bco_count + stats[1]
            step = (stats[0] / stats[1].clamp(min=1) - self._bco_mean) * stats[1] / count.clamp(min=1)
            self._bco_mean = self._bco_mean + step
            self._bco_count = count
            return self._bco_mean

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
        """Args: ``hidden`` ``(2B, T, D)``, ``weight`` ``(V, D)``, ``labels`` ``(2B, T)`` (-100 off the
        completion), ``bias`` ``(V,)``; the reference as ``ref_hidden`` + ``ref_weight`` (+ ``ref_bias``) or
        ``ref_logps`` (sums ``(2B,)`` or per-token ``(2B, T-1)``)."""
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
        )

    def fused_unsupported(self) -> str | None:
        if self.loss_type == "bco_pair":
            return (
                "loss_type='bco_pair' shifts every pair by the running mean of the rewards, updated with this "
                "batch's policy rewards before the loss: each pair's gradient depends on all pairs' log-probs"
            )
        return None

    def loss_from_token_logps(
        self,
        policy_logps: Tensor,
        ref_logps: Tensor,
        mask: Tensor,
        *,
        bco_delta: Tensor | float | None = None,
    ) -> LossOutput:
        """The loss from per-token log-probs: ``policy_logps`` ``(2B, L)`` (or sums ``(2B,)``), ``ref_logps``
        ``(2B, L)`` or sums ``(2B,)``, the completion ``mask`` ``(2B, L)`` (its row sums are the lengths).
        ``bco_delta`` overrides ``bco_pair``'s running mean (None: update and use it)."""
        policy, ref, lengths, b = self._pair_sums(policy_logps, ref_logps, mask)
        if self.loss_type == "bco_pair" and bco_delta is None:
            bco_delta = self._bco_delta(policy, ref)
        return dpo_loss(
            policy[:b], policy[b:], ref[:b], ref[b:], beta=self.beta, loss_type=self.loss_type,
            label_smoothing=self.label_smoothing, nll_weight=self.nll_weight, chosen_lengths=lengths[:b],
            rejected_lengths=lengths[b:], discopop_tau=self.discopop_tau, bco_delta=bco_delta,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}, "
            f"nll_weight={self.nll_weight}, " + super().extra_repr()
        )
