"""KTO (Ethayarajh et al., 2024; HALOs / TRL ``KTOTrainer``) on per-sequence log-prob sums.

With ``Δ = logπ(y|x) - logπ_ref(y|x)`` per row and the reference point

    z = max(0, mean Δ_KL over the mismatched KL rows)     (detached; count-weighted over all ranks)

each desirable row costs ``λD (1 - σ(β(Δ - z)))``, each undesirable row ``λU (1 - σ(β(z - Δ)))``, and the loss
is their sum divided by the number of rows (TRL's mean over the concatenated, weighted losses). A batch
without desirable (or without undesirable) rows is fine: that class contributes nothing.
"""

from __future__ import annotations

import torch
from prefuse.alignment.functional._common import (
    check_finite,
    check_real,
    check_vector,
    float_tensor,
    global_mean_clamped,
    mean_or_zero,
    sigmoid_tails,
)
from prefuse.alignment.output import LossOutput
from torch import Tensor


def kto_terms(
    logratios: Tensor,
    desirable: Tensor,
    z: Tensor,
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> Tensor:
    """Per-item KTO losses: ``λD(1-σ(β(Δ-z)))`` where ``desirable``, else ``λU(1-σ(β(z-Δ)))``.

    Evaluated as ``1 - σ(x) = σ(-x)`` by :func:`sigmoid_tails`, which keeps both tails: the written-out
    ``1 - σ(x)`` rounds to exactly 0 in float32 for ``x`` past about 16.6 (and loses digits well before), and
    ``torch.sigmoid(-x)``'s gradient is exactly 0 for ``x`` below about -16.6. Shared by response-level KTO and
    FactAlign's sentence-level term.
    """
    gain = desirable_weight * sigmoid_tails(beta * (z - logratios))
    loss = undesirable_weight * sigmoid_tails(beta * (logratios - z))
    return torch.where(desirable, gain, loss)


def kl_reference_point(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """``z = max(0, mean_i (policy_kl_logps_i - ref_kl_logps_i))``, detached, count-weighted over ranks.

    When ``torch.distributed`` is initialised the sum and the count are all-reduced, so every rank must call
    this, and with the same source (all with KL rows, or all with a given ``kl``); a rank without KL rows passes
    empty tensors and counts 0. An empty set everywhere gives 0.
    """
    delta = (policy_kl_logps.detach().float() - ref_kl_logps.detach().float()).reshape(-1)
    count = torch.full((), float(delta.numel()), device=delta.device)
    return global_mean_clamped(delta.sum(), count)


def check_kto_options(beta: float, desirable_weight: float, undesirable_weight: float) -> None:
    check_real("beta", beta, low=0.0, low_open=True)
    check_real("desirable_weight", desirable_weight, low=0.0)
    check_real("undesirable_weight", undesirable_weight, low=0.0)


def checked_reference_point(name: str, value, like: Tensor) -> Tensor:
    """A given reference point (number or 0-d tensor) as a detached float32 0-d tensor on ``like``'s device;
    ``ValueError`` naming ``name`` when it is not a single finite value (tensors: read in eager mode only)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}"
            )
        check_finite(name, value)
    else:
        check_real(name, value)
    return float_tensor(value, like)


def resolve_kl(kl, policy_kl_logps: Tensor | None, ref_kl_logps: Tensor | None, like: Tensor) -> Tensor:
    """The reference point from a given ``kl`` or from the KL rows' log-prob sums (exactly one source)."""
    has_rows = policy_kl_logps is not None or ref_kl_logps is not None
    if kl is not None:
        if has_rows:
            raise ValueError("pass either kl or the KL rows (policy_kl_logps / ref_kl_logps), not both")
        return checked_reference_point("kl", kl, like)
    if policy_kl_logps is None or ref_kl_logps is None:
        raise ValueError(
            "KTO needs its reference point: pass kl, or both policy_kl_logps and ref_kl_logps "
            "(the mismatched KL rows)"
        )
    n_kl = check_vector("policy_kl_logps", policy_kl_logps, device=like.device).shape[0]
    check_vector("ref_kl_logps", ref_kl_logps, n_kl, device=like.device)
    return kl_reference_point(policy_kl_logps, ref_kl_logps)


def kto_metrics(policy_logps: Tensor, rewards: Tensor, desirable: Tensor, kl: Tensor) -> dict[str, Tensor]:
    """TRL's KTO metrics for this rank: sums and counts per class, their means (0 for an empty class)."""
    policy_logps, rewards = policy_logps.detach(), rewards.detach()
    chosen, rejected = desirable, ~desirable
    metrics = {
        "kl": kl.detach(),
        "count/chosen": chosen.sum().float(),
        "count/rejected": rejected.sum().float(),
        "rewards/chosen_sum": (rewards * chosen).sum(),
        "rewards/rejected_sum": (rewards * rejected).sum(),
        "logps/chosen_sum": (policy_logps * chosen).sum(),
        "logps/rejected_sum": (policy_logps * rejected).sum(),
        "rewards/chosen": mean_or_zero(rewards, chosen),
        "rewards/rejected": mean_or_zero(rewards, rejected),
        "logps/chosen": mean_or_zero(policy_logps, chosen),
        "logps/rejected": mean_or_zero(policy_logps, rejected),
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    *,
    policy_kl_logps: Tensor | None = None,
    ref_kl_logps: Tensor | None = None,
    kl: Tensor | float | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """KTO loss (module docstring), mean over the rows.

    Args:
        policy_logps, ref_logps: ``(N,)`` completion log-prob sums of the policy and the reference.
        desirable: ``(N,)`` bool, True for a desirable (chosen) completion.
        policy_kl_logps, ref_kl_logps: ``(N_kl,)`` sums over the mismatched KL completions; give these or
            ``kl``.
        kl: a given reference point (number or 0-d tensor), used as is (detached, not clamped).

    Returns:
        ``LossOutput`` with ``kl``, ``count/{chosen,rejected}``, ``rewards/{chosen,rejected}_sum``,
        ``logps/{chosen,rejected}_sum``, and the per-class means ``rewards/{chosen,rejected,margins}``,
        ``logps/{chosen,rejected}``.
    """
    check_kto_options(beta, desirable_weight, undesirable_weight)
    n = check_vector("policy_logps", policy_logps).shape[0]
    check_vector("ref_logps", ref_logps, n, device=policy_logps.device)
    check_vector("desirable", desirable, n, dtype_kind="bool", device=policy_logps.device)
    z = resolve_kl(kl, policy_kl_logps, ref_kl_logps, policy_logps)
    logratios = policy_logps.float() - ref_logps.detach().float()
    losses = kto_terms(
        logratios,
        desirable,
        z,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    loss = losses.sum() / max(n, 1)
    return LossOutput(loss, kto_metrics(policy_logps, beta * logratios, desirable, z))
