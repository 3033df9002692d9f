"""``FactAlignLoss``: response-level KTO plus sentence-level (fine-grained) KTO, FactAlign's fKTO."""

from __future__ import annotations

from prefuse.alignment.functional._common import check_real
from prefuse.alignment.functional.factalign import factalign_loss
from prefuse.alignment.losses.base import check_token_mask, token_logps
from prefuse.alignment.losses.kto import KTOLoss
from prefuse.alignment.output import LossOutput
from torch import Tensor


class FactAlignLoss(KTOLoss):
    """FactAlign / fKTO (see ``prefuse.alignment.functional.factalign``)::

        loss = loss_weight · KTO(rows) + fg_loss_weight · mean_s fgKTO(Δ_s; z_fg)
        Δ_s = Σ_{t ∈ s} (logπ - logπ_ref)(y_t),  z_fg = max(0, mean Δ_s over the KL rows' sentences)

    A sentence is scored on its own tokens: ``sentence_ids`` is aligned with ``labels`` (and ``input_ids``)
    and shifted with them, so token ``t`` of a sentence contributes ``log p(y_t | y_<t)``. (The authors' code
    scores each sentence shifted by one token.) Per-sentence sums are a segment sum of the per-token output
    of ``linear_logprobs``; no logits are materialised.

    Args:
        beta, desirable_weight, undesirable_weight: response-level KTO's β, λD, λU.
        fg_beta, fg_desirable_weight, fg_undesirable_weight: sentence-level β, λD, λU (λU = 4 by default, as
            the released FactAlign model).
        loss_weight, fg_loss_weight: weights of the two terms.
        **options: ``ignore_index``, ``temperature``, ``softcap``, ``backend``, ``deterministic``.
    """

    def __init__(
        self,
        beta: float = 0.1,
        fg_beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        fg_desirable_weight: float = 1.0,
        fg_undesirable_weight: float = 4.0,
        loss_weight: float = 1.0,
        fg_loss_weight: float = 1.0,
        **options,
    ) -> None:
        super().__init__(beta, desirable_weight, undesirable_weight, **options)
        check_real("fg_beta", fg_beta, low=0.0, low_open=True)
        for name, value in (
            ("fg_desirable_weight", fg_desirable_weight),
            ("fg_undesirable_weight", fg_undesirable_weight),
            ("loss_weight", loss_weight),
            ("fg_loss_weight", fg_loss_weight),
        ):
            check_real(name, value, low=0.0)
        self.fg_beta = float(fg_beta)
        self.fg_desirable_weight = float(fg_desirable_weight)
        self.fg_undesirable_weight = float(fg_undesirable_weight)
        self.loss_weight = float(loss_weight)
        self.fg_loss_weight = float(fg_loss_weight)

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        desirable: Tensor,
        *,
        sentence_ids: Tensor | None = None,
        sentence_labels: Tensor | None = None,
        kl_sentence_ids: Tensor | None = None,
        kl_hidden: Tensor | None = None,
        kl_labels: Tensor | None = None,
        kl: Tensor | float | None = None,
        fg_kl: Tensor | float | None = None,
        bias: Tensor | None = None,
        ref_hidden: Tensor | None = None,
        ref_weight: Tensor | None = None,
        ref_bias: Tensor | None = None,
        ref_logps: Tensor | None = None,
        ref_kl_hidden: Tensor | None = None,
        ref_kl_logps: Tensor | None = None,
        shift: bool = True,
    ) -> LossOutput:
        """``KTOLoss.forward``'s arguments plus:

        - ``sentence_ids`` ``(rows, T)``, aligned with ``labels``: ``-1`` outside a sentence, ids ``0..S-1``
          numbered over the batch; ``sentence_labels`` ``(S,)`` bool (True = supported). Both are required
          (a batch without sentences: all ``-1`` and an empty ``sentence_labels``).
        - ``kl_sentence_ids`` ``(rows_kl, T_kl)``: the KL rows' sentences, numbered ``0..S_kl-1`` on their own;
          they give ``z_fg`` (otherwise ``fg_kl``, or 0).

        ``ref_logps`` / ``ref_kl_logps`` must be per-token here (``(rows, T-1)`` with shift), as sentence sums
        need them; the KL ones may be sums when ``kl_sentence_ids`` is not given.
        """
        if sentence_ids is None or sentence_labels is None:
            missing = "sentence_labels" if sentence_ids is not None else "sentence_ids"
            raise ValueError(
                f"FactAlignLoss needs sentence_ids and sentence_labels (missing {missing}); for a batch without "
                "sentences pass sentence_ids full of -1 and an empty sentence_labels"
            )
        self._check_rows(hidden, labels)
        if not isinstance(sentence_ids, Tensor) or sentence_ids.shape != labels.shape:
            shape = (
                tuple(sentence_ids.shape) if isinstance(sentence_ids, Tensor) else type(sentence_ids).__name__
            )
            raise ValueError(f"sentence_ids must have labels' shape {tuple(labels.shape)}, got {shape}")
        if kl_sentence_ids is not None and (
            not isinstance(kl_labels, Tensor)
            or not isinstance(kl_sentence_ids, Tensor)
            or kl_sentence_ids.shape != kl_labels.shape
        ):
            raise ValueError("kl_sentence_ids must have kl_labels' shape (and needs the KL rows)")
        inputs = self._rows_and_kl(
            hidden, weight, labels, desirable, kl_hidden=kl_hidden, kl_labels=kl_labels, kl=kl, bias=bias,
            ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, ref_logps=ref_logps,
            ref_kl_hidden=ref_kl_hidden, ref_kl_logps=ref_kl_logps, shift=shift, per_token=True,
            kl_per_token=kl_sentence_ids is not None,
        )  # fmt: skip

        def aligned(ids: Tensor | None) -> Tensor | None:
            return None if ids is None else (ids[:, 1:] if shift else ids)

        return self.loss_from_token_logps(
            **inputs, sentence_ids=aligned(sentence_ids), sentence_labels=sentence_labels,
            kl_sentence_ids=aligned(kl_sentence_ids), kl=kl, fg_kl=fg_kl,
        )  # fmt: skip

    def loss_from_token_logps(  # type: ignore[override]
        self,
        policy_logps: Tensor,
        ref_logps: Tensor,
        mask: Tensor,
        desirable: Tensor,
        *,
        sentence_ids: Tensor,
        sentence_labels: Tensor,
        policy_kl_logps: Tensor | None = None,
        ref_kl_logps: Tensor | None = None,
        kl_mask: Tensor | None = None,
        kl_sentence_ids: Tensor | None = None,
        kl: Tensor | float | None = None,
        fg_kl: Tensor | float | None = None,
    ) -> LossOutput:
        """The loss from per-token log-probs (``KTOLoss.loss_from_token_logps``'s arguments, the reference
        per-token here) and ``sentence_ids`` ``(rows, L)`` aligned with the per-token log-probs (already
        shifted), ``sentence_labels`` ``(S,)``; the KL rows per-token when ``kl_sentence_ids`` (aligned with
        them) is given, else per-token or sums."""
        mask = check_token_mask(mask)
        ref = ref_logps.detach() if isinstance(ref_logps, Tensor) else ref_logps
        if kl_sentence_ids is None:
            policy_kl, ref_kl = self._kl_sums(policy_kl_logps, ref_kl_logps, kl_mask)
        else:
            if kl_mask is None:
                raise ValueError("kl_sentence_ids needs the KL rows' kl_mask")
            kl_mask = check_token_mask(kl_mask, name="kl_mask")
            policy_kl = token_logps("policy_kl_logps", policy_kl_logps, kl_mask)
            ref_kl = token_logps("ref_kl_logps", ref_kl_logps, kl_mask)
        return factalign_loss(
            token_logps("policy_logps", policy_logps, mask), token_logps("ref_logps", ref, mask), desirable,
            sentence_ids, sentence_labels, policy_kl_logps=policy_kl, ref_kl_logps=ref_kl,
            kl_sentence_ids=kl_sentence_ids, kl=kl, fg_kl=fg_kl, beta=self.beta, fg_beta=self.fg_beta,
            desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight,
            fg_desirable_weight=self.fg_desirable_weight, fg_undesirable_weight=self.fg_undesirable_weight,
            loss_weight=self.loss_weight, fg_loss_weight=self.fg_loss_weight,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"fg_beta={self.fg_beta}, fg_desirable_weight={self.fg_desirable_weight}, "
            f"fg_undesirable_weight={self.fg_undesirable_weight}, loss_weight={self.loss_weight}, "
            f"fg_loss_weight={self.fg_loss_weight}, " + super().extra_repr()
        )
