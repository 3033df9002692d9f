"""FactAlign / fKTO (Huang & Chen, 2024, "FactAlign: Long-form Factuality Alignment of LLMs").

Response level: KTO on the completions (``prefuse.alignment.functional.kto``). Sentence level: each
sentence ``s`` of a completion has a label (True = supported) and a log-ratio summed over its own tokens,

    Δ_s = Σ_{t ∈ s} (logπ - logπ_ref)(y_t),
    z_fg = max(0, mean Δ_s over the sentences of the KL rows)       (detached, count-weighted over ranks)
    fg_loss = mean_s [ λD_fg σ(β_fg(z_fg - Δ_s)) if supported else λU_fg σ(β_fg(Δ_s - z_fg)) ]
    loss = loss_weight · KTO + fg_loss_weight · fg_loss

A batch without sentences has ``fg_loss = 0``; without KL sentences (and no ``fg_kl``), ``z_fg = 0``.
Sentence sums are a segment sum (``index_add``) over the per-token log-probs: no logits are involved.
"""

from __future__ import annotations

import torch
from prefuse.alignment.functional._common import (
    check_device,
    check_real,
    check_vector,
    count_distinct,
    global_mean_clamped,
    mean_or_zero,
    segment_sum,
)
from prefuse.alignment.functional.kto import checked_reference_point, kto_loss, kto_terms
from prefuse.alignment.output import LossOutput
from prefuse.kernels.linear_logprobs.validate import host_reads_allowed
from torch import Tensor


def check_sentence_ids(
    name: str, ids: Tensor, shape: torch.Size, num_sentences: int | None, device: torch.device | None = None
) -> None:
    """Integer ids of ``shape`` (on ``device``); in eager mode every id lies in ``[-1, num_sentences)`` (or
    ``>= -1``)."""
    if not isinstance(ids, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    check_device(name, ids, device)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(ids.shape)}")
    if ids.numel() and host_reads_allowed(ids.device):
        low, high = torch.stack(torch.aminmax(ids)).tolist()  # one read (a host sync on CUDA; eager only)
        if low < -1:
            raise ValueError(f"{name} holds {low}; ids are >= 0 inside a sentence and -1 outside")
        if num_sentences is not None and high >= num_sentences:
            raise ValueError(
                f"{name} holds sentence id {high} but sentence_labels has only {num_sentences} entries "
                f"(ids must lie in [0, {num_sentences}))"
            )


def _row_sums(name: str, logps: Tensor | None) -> Tensor | None:
    if logps is None:
        return None
    if not isinstance(logps, Tensor) or logps.dim() not in (1, 2):
        raise ValueError(f"{name} must be per-token (rows, L) or per-row sums (rows,)")
    return logps.float().sum(-1) if logps.dim() == 2 else logps.float()


def factalign_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    sentence_ids: Tensor,
    sentence_labels: Tensor,
    *,
    policy_kl_logps: Tensor | None = None,
    ref_kl_logps: Tensor | None = None,
    kl_sentence_ids: Tensor | None = None,
    kl: Tensor | float | None = None,
    fg_kl: Tensor | float | None = None,
    beta: float = 0.1,
    fg_beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    fg_desirable_weight: float = 1.0,
    fg_undesirable_weight: float = 4.0,
    loss_weight: float = 1.0,
    fg_loss_weight: float = 1.0,
) -> LossOutput:
    """FactAlign loss (module docstring) from per-token log-probs.

    Args:
        policy_logps, ref_logps: ``(N, L)`` per-token log-probs, 0 at positions that are not scored (as
            ``linear_logprobs`` returns them); a row's sum is its completion log-prob.
        desirable: ``(N,)`` bool response labels.
        sentence_ids: ``(N, L)`` aligned with the per-token log-probs (i.e. already shifted when the
            log-probs are), ``-1`` outside a sentence, ids ``0..S-1`` over the batch.
        sentence_labels: ``(S,)`` bool, True = supported (desirable) sentence.
        policy_kl_logps, ref_kl_logps: the KL rows, per-token ``(N_kl, L)`` or sums ``(N_kl,)``; per-token
            when ``kl_sentence_ids`` is given. Alternatively ``kl`` (response) and ``fg_kl`` (sentence).
        kl_sentence_ids: ``(N_kl, L)`` ids of the KL rows' sentences, numbered on their own.

    Returns:
        ``LossOutput``: KTO's metrics plus ``fg_kl``, ``fg_loss``, ``fg_rewards/{chosen,rejected}_sum``,
        ``count/fg_{chosen,rejected}``, the per-sentence means ``fg_logps/{policy,reference}_{chosen,rejected}``
        and, with per-token KL rows, ``fg_logps/{policy,reference}_KL`` (the seed code's names).
    """
    for name, value in (("fg_beta", fg_beta),):
        check_real(name, value, low=0.0, low_open=True)
    for name, value in (
        ("fg_desirable_weight", fg_desirable_weight),
        ("fg_undesirable_weight", fg_undesirable_weight),
        ("loss_weight", loss_weight),
        ("fg_loss_weight", fg_loss_weight),
    ):
        check_real(name, value, low=0.0)
    if not isinstance(policy_logps, Tensor) or policy_logps.dim() != 2:
        raise ValueError("policy_logps must be per-token log-probs of shape (rows, L)")
    if not isinstance(ref_logps, Tensor) or ref_logps.shape != policy_logps.shape:
        raise ValueError(f"ref_logps must be per-token with policy_logps' shape {tuple(policy_logps.shape)}")
    device = policy_logps.device
    check_device("ref_logps", ref_logps, device)
    num_sentences = check_vector("sentence_labels", sentence_labels, dtype_kind="bool", device=device).shape[
        0
    ]
    check_sentence_ids("sentence_ids", sentence_ids, policy_logps.shape, num_sentences, device)

    kl_per_token = None
    if kl_sentence_ids is not None:
        if fg_kl is not None:
            raise ValueError("pass either fg_kl or kl_sentence_ids, not both")
        if not (
            isinstance(policy_kl_logps, Tensor)
            and isinstance(ref_kl_logps, Tensor)
            and policy_kl_logps.dim() == 2
            and ref_kl_logps.shape == policy_kl_logps.shape
        ):
            raise ValueError("kl_sentence_ids needs per-token policy_kl_logps and ref_kl_logps (N_kl, L)")
        check_sentence_ids("kl_sentence_ids", kl_sentence_ids, policy_kl_logps.shape, None, device)
        check_device("policy_kl_logps", policy_kl_logps, device)
        check_device("ref_kl_logps", ref_kl_logps, device)
        kl_per_token = (policy_kl_logps.detach().float(), ref_kl_logps.detach().float())

    response = kto_loss(
        policy_logps.float().sum(-1), ref_logps.float().sum(-1), desirable,
        policy_kl_logps=_row_sums("policy_kl_logps", policy_kl_logps),
        ref_kl_logps=_row_sums("ref_kl_logps", ref_kl_logps), kl=kl, beta=beta,
        desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
    )  # fmt: skip
    metrics = dict(response.metrics)

    # Sentence level: segment sums of the per-token log-probs over each sentence's own tokens.
    policy_s = segment_sum(policy_logps.float(), sentence_ids, num_sentences)
    ref_s = segment_sum(ref_logps.detach().float(), sentence_ids, num_sentences)
    if fg_kl is not None:
        z_fg = checked_reference_point("fg_kl", fg_kl, policy_logps)
    elif kl_per_token is not None:
        in_sentence = kl_sentence_ids >= 0
        kl_policy_total = torch.where(in_sentence, kl_per_token[0], 0.0).sum()
        kl_ref_total = torch.where(in_sentence, kl_per_token[1], 0.0).sum()
        kl_count = count_distinct(kl_sentence_ids)
        z_fg = global_mean_clamped(kl_policy_total - kl_ref_total, kl_count)
        metrics["fg_logps/policy_KL"] = kl_policy_total / kl_count.clamp(min=1)
        metrics["fg_logps/reference_KL"] = kl_ref_total / kl_count.clamp(min=1)
    else:
        z_fg = torch.zeros((), device=policy_logps.device)
    fg_logratios = policy_s - ref_s
    if num_sentences > 0:
        terms = kto_terms(
            fg_logratios,
            sentence_labels,
            z_fg,
            beta=fg_beta,
            desirable_weight=fg_desirable_weight,
            undesirable_weight=fg_undesirable_weight,
        )
        fg_loss = terms.sum() / num_sentences
    else:
        fg_loss = torch.zeros((), device=policy_logps.device)
    loss = loss_weight * response.loss + fg_loss_weight * fg_loss

    supported, unsupported = sentence_labels, ~sentence_labels
    fg_rewards = fg_beta * fg_logratios.detach()
    policy_s, ref_s = policy_s.detach(), ref_s.detach()
    metrics.update({
        "fg_kl": z_fg.detach(),
        "fg_loss": fg_loss.detach(),
        "fg_rewards/chosen_sum": (fg_rewards * supported).sum(),
        "fg_rewards/rejected_sum": (fg_rewards * unsupported).sum(),
        "count/fg_chosen": supported.sum().float(),
        "count/fg_rejected": unsupported.sum().float(),
        "fg_logps/policy_chosen": mean_or_zero(policy_s, supported),
        "fg_logps/reference_chosen": mean_or_zero(ref_s, supported),
        "fg_logps/policy_rejected": mean_or_zero(policy_s, unsupported),
        "fg_logps/reference_rejected": mean_or_zero(ref_s, unsupported),
    })  # fmt: skip
    return LossOutput(loss, {k: v.detach() for k, v in metrics.items()})
