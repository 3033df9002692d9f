"""``KTOLoss``: unpaired KTO on the fused log-probs, with the mismatched KL rows as reference point."""

from __future__ import annotations

import torch
from prefuse.alignment.functional._common import check_vector
from prefuse.alignment.functional.kto import check_kto_options, kto_loss
from prefuse.alignment.losses.base import FusedLinearLoss
from prefuse.alignment.losses.fused import row_groups
from prefuse.alignment.output import LossOutput
from torch import Tensor


class KTOLoss(FusedLinearLoss):
    """KTO (see ``prefuse.alignment.functional.kto``): with ``Δ = logπ - logπ_ref`` per row,

        z = max(0, mean Δ over the KL rows)   (detached; count-weighted over all ranks)
        loss = (Σ_desirable λD(1 - σ(β(Δ - z))) + Σ_undesirable λU(1 - σ(β(z - Δ)))) / rows

    The KL rows (mismatched prompt/completion pairs) are scored without grad; ``kl=`` gives ``z`` instead.

    Args:
        beta: β.
        desirable_weight, undesirable_weight: λD, λU.
        **options: ``FusedLinearLoss``'s ``ignore_index``, ``temperature``, ``softcap``, ``logit_scale``,
            ``backend``, ``deterministic``, ``path``.
    """

    def __init__(
        self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0, **options
    ) -> None:
        super().__init__(**options)
        check_kto_options(beta, desirable_weight, undesirable_weight)
        self.beta = float(beta)
        self.desirable_weight = float(desirable_weight)
        self.undesirable_weight = float(undesirable_weight)

    def _reference_and_kl(
        self,
        hidden,
        weight,
        labels,
        desirable,
        *,
        kl_hidden,
        kl_labels,
        kl,
        bias,
        ref_hidden,
        ref_weight,
        ref_bias,
        ref_logps,
        ref_kl_hidden,
        ref_kl_logps,
        shift,
        per_token: bool,
        kl_per_token: bool,
    ):
        """The reference log-probs of the rows, and the policy's and the reference's of the KL rows (``None``
        when ``kl`` is given), all without grad: everything the loss needs before the policy's rows.

        Returns ``(ref, policy_kl, ref_kl)``: per-token ``(rows, L)`` when ``per_token`` else sums; the KL ones
        per-token when ``kl_per_token``.
        """
        rows = self._check_rows(hidden, labels)
        if not isinstance(shift, bool):
            raise ValueError(f"shift must be a bool, got {shift!r}")
        check_vector("desirable", desirable, rows, dtype_kind="bool", device=hidden.device)
        mask = self._mask(labels, shift)
        ref = self._reference(
            hidden=ref_hidden,
            weight=ref_weight,
            bias=ref_bias,
            logps=ref_logps,
            targets=labels,
            mask=mask,
            shift=shift,
            per_token=per_token,
        )
        if kl is not None:
            given = [
                n
                for n, v in (
                    ("kl_hidden", kl_hidden),
                    ("kl_labels", kl_labels),
                    ("ref_kl_hidden", ref_kl_hidden),
                    ("ref_kl_logps", ref_kl_logps),
                )
                if v is not None
            ]
            if given:
                raise ValueError(f"pass either kl or the KL rows, not both (got kl and {', '.join(given)})")
            return ref, None, None
        if kl_hidden is None or kl_labels is None:
            raise ValueError(
                f"{type(self).__name__} needs its reference point: pass kl_hidden and kl_labels (the mismatched "
                "KL rows, with ref_kl_hidden or ref_kl_logps), or kl"
            )
        self._check_rows(kl_hidden, kl_labels, hidden_name="kl_hidden", labels_name="kl_labels")
        kl_mask = self._mask(kl_labels, shift)
        with torch.no_grad():  # z is detached: the KL rows need no backward
            policy_kl = self._head_logps(
                "KL rows' head (kl_hidden, weight, bias; kl_labels are its targets)",
                kl_hidden, weight, kl_labels, bias, shift,
            )  # fmt: skip
        ref_kl = self._reference(
            hidden=ref_kl_hidden,
            weight=ref_weight,
            bias=ref_bias,
            logps=ref_kl_logps,
            targets=kl_labels,
            mask=kl_mask,
            shift=shift,
            per_token=kl_per_token,
            hidden_name="ref_kl_hidden",
            logps_name="ref_kl_logps",
            what="the reference's log-probs of the KL rows",
        )
        if not kl_per_token:
            policy_kl = policy_kl.sum(-1)
        return ref, policy_kl, ref_kl

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        desirable: Tensor,
        *,
        kl_hidden: Tensor | None = None,
        kl_labels: Tensor | None = None,
        kl: Tensor | float | None = None,
        bias: Tensor | None = None,
        ref_hidden: Tensor | None = None,
        ref_weight: Tensor | None = None,
        ref_bias: Tensor | None = None,
        ref_logps: Tensor | None = None,
        ref_kl_hidden: Tensor | None = None,
        ref_kl_logps: Tensor | None = None,
        shift: bool = True,
    ) -> LossOutput:
        """Args: ``hidden`` ``(rows, T, D)``, ``labels`` ``(rows, T)``, ``desirable`` ``(rows,)`` bool; the KL
        rows ``kl_hidden`` ``(rows_kl, T_kl, D)`` / ``kl_labels`` with ``ref_kl_hidden`` or ``ref_kl_logps``,
        or ``kl``; the reference as ``ref_hidden`` + ``ref_weight`` (+ ``ref_bias``) or ``ref_logps``.

        Returns ``LossOutput`` with KTO's metrics (``kl``, ``count/*``, ``rewards/*_sum``, ...).
        """
        ref, policy_kl, ref_kl = self._reference_and_kl(
            hidden, weight, labels, desirable, kl_hidden=kl_hidden, kl_labels=kl_labels, kl=kl, bias=bias,
            ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, ref_logps=ref_logps,
            ref_kl_hidden=ref_kl_hidden, ref_kl_logps=ref_kl_logps, shift=shift, per_token=False,
            kl_per_token=False,
        )  # fmt: skip
        options = {
            "beta": self.beta,
            "desirable_weight": self.desirable_weight,
            "undesirable_weight": self.undesirable_weight,
        }

        def loss(tok: Tensor) -> LossOutput:
            return kto_loss(
                tok.sum(-1), ref, desirable, policy_kl_logps=policy_kl, ref_kl_logps=ref_kl, kl=kl, **options
            )

        def make_chunk_loss():  # z, a statistic of the KL rows only, computed once (it all-reduces)
            z = loss(torch.zeros(self._mask(labels, shift).shape, device=labels.device)).metrics["kl"]
            return lambda tok: kto_loss(tok.sum(-1), ref, desirable, kl=z, **options).loss

        return self._policy_loss(
            hidden, weight, labels, bias, shift, loss, make_groups=lambda: row_groups(hidden.shape[0], labels.device),
            make_chunk_loss=make_chunk_loss,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, desirable_weight={self.desirable_weight}, "
            f"undesirable_weight={self.undesirable_weight}, " + super().extra_repr()
        )
