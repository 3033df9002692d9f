"""``KTOLoss``: unpaired KTO on the fused log-probs, with the mismatched KL rows as reference point."""

from __future__ import annotations

import torch
from prefuse.alignment.functional._common import check_vector
from prefuse.alignment.functional.kto import check_kto_options, kto_loss
from prefuse.alignment.losses.base import POLICY_HEAD, FusedLinearLoss, check_token_mask, sequence_logps
from prefuse.alignment.output import LossOutput
from torch import Tensor


class KTOLoss(FusedLinearLoss):
    """KTO (see ``prefuse.alignment.functional.kto``): with ``Δ = logπ - logπ_ref`` per row,

        z = max(0, mean Δ over the KL rows)   (detached; count-weighted over all ranks)
        loss = (Σ_desirable λD σ(β(z - Δ)) + Σ_undesirable λU σ(β(Δ - z))) / rows

    The KL rows (mismatched prompt/completion pairs) are scored without grad; ``kl=`` gives ``z`` instead.

    Args:
        beta: β.
        desirable_weight, undesirable_weight: λD, λU.
        **options: ``ignore_index``, ``temperature``, ``softcap``, ``backend``, ``deterministic``.
    """

    def __init__(
        self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0, **options
    ) -> None:
        super().__init__(**options)
        check_kto_options(beta, desirable_weight, undesirable_weight)
        self.beta = float(beta)
        self.desirable_weight = float(desirable_weight)
        self.undesirable_weight = float(undesirable_weight)

    def _rows_and_kl(
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
    ) -> dict:
        """The keyword arguments of ``loss_from_token_logps`` for the rows and the KL rows (none when ``kl``
        is given): per-token policy log-probs, the reference per-token when ``per_token`` (else sums), the KL
        rows' reference per-token when ``kl_per_token`` (else sums), and the masks."""
        rows = self._check_rows(hidden, labels)
        if not isinstance(shift, bool):
            raise ValueError(f"shift must be a bool, got {shift!r}")
        check_vector("desirable", desirable, rows, dtype_kind="bool", device=hidden.device)
        mask = self._mask(labels, shift)
        policy = self._head_logps(POLICY_HEAD, hidden, weight, labels, bias, shift)
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
        out = {"policy_logps": policy, "ref_logps": ref, "mask": mask, "desirable": desirable}
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
            return out
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
        out.update(policy_kl_logps=policy_kl, ref_kl_logps=ref_kl, kl_mask=kl_mask)
        return out

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
        inputs = self._rows_and_kl(
            hidden, weight, labels, desirable, kl_hidden=kl_hidden, kl_labels=kl_labels, kl=kl, bias=bias,
            ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, ref_logps=ref_logps,
            ref_kl_hidden=ref_kl_hidden, ref_kl_logps=ref_kl_logps, shift=shift, per_token=False,
            kl_per_token=False,
        )  # fmt: skip
        return self.loss_from_token_logps(**inputs, kl=kl)

    def _kl_sums(self, policy_kl_logps, ref_kl_logps, kl_mask) -> tuple:
        """The KL rows' ``(policy, reference)`` sums, or ``(None, None)`` when none are given."""
        if policy_kl_logps is None and ref_kl_logps is None:
            return None, None
        if policy_kl_logps is None or ref_kl_logps is None or kl_mask is None:
            raise ValueError("the KL rows need policy_kl_logps, ref_kl_logps and kl_mask together")
        kl_mask = check_token_mask(kl_mask, name="kl_mask")
        return (
            sequence_logps("policy_kl_logps", policy_kl_logps.detach(), kl_mask),
            sequence_logps("ref_kl_logps", ref_kl_logps.detach(), kl_mask),
        )

    def loss_from_token_logps(
        self,
        policy_logps: Tensor,
        ref_logps: Tensor,
        mask: Tensor,
        desirable: Tensor,
        *,
        policy_kl_logps: Tensor | None = None,
        ref_kl_logps: Tensor | None = None,
        kl_mask: Tensor | None = None,
        kl: Tensor | float | None = None,
    ) -> LossOutput:
        """The loss from per-token log-probs: ``policy_logps`` ``(rows, L)`` (or sums), ``ref_logps``
        ``(rows, L)`` or sums ``(rows,)``, the completion ``mask`` ``(rows, L)``, ``desirable`` ``(rows,)``
        bool; the KL rows as ``policy_kl_logps`` / ``ref_kl_logps`` (per-token or sums) with their ``kl_mask``
        ``(rows_kl, L_kl)``, or ``kl``."""
        mask = check_token_mask(mask)
        policy_kl, ref_kl = self._kl_sums(policy_kl_logps, ref_kl_logps, kl_mask)
        return kto_loss(
            sequence_logps("policy_logps", policy_logps, mask),
            sequence_logps(
                "ref_logps", ref_logps.detach() if isinstance(ref_logps, Tensor) else ref_logps, mask
            ),
            desirable,
            policy_kl_logps=policy_kl,
            ref_kl_logps=ref_kl,
            kl=kl,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
        )

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, desirable_weight={self.desirable_weight}, "
            f"undesirable_weight={self.undesirable_weight}, " + super().extra_repr()
        )
