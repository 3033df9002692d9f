"""DPO and its TRL variants on per-sequence log-prob sums.

Notation (per pair ``b``): ``Δc = logπ(y_w) - logπ_ref(y_w)``, ``Δr = logπ(y_l) - logπ_ref(y_l)`` (sums over
completion tokens), ``u = β(Δc - Δr)``, ``ε = label_smoothing``. The loss is the mean over pairs of:

================  ===================================================================================
``sigmoid``       ``-(1-ε) logσ(u) - ε logσ(-u)``  (DPO; cDPO when ε > 0)
``ipo``           ``(Δc/|y_w| - Δr/|y_l| - 1/(2β))²``  (TRL normalises by completion length; the rewards
                  and ``logps/*`` metrics stay on the sums, as TRL logs them)
``hinge``         ``max(0, 1 - u)``  (SLiC)
``robust``        ``(-(1-ε) logσ(u) + ε logσ(-u)) / (1-2ε)``  (rDPO; ``0 <= ε < 0.5``)
``exo_pair``      ``σ(u)(logσ(u) - log(1-ε)) + σ(-u)(logσ(-u) - log ε)``  (EXO; ``0 < ε < 1``: ε = 0 is
                  ``log 0``, refused as TRL does)
``nca_pair``      ``-logσ(βΔc) - ½ logσ(-βΔc) - ½ logσ(-βΔr)``
``bco_pair``      ``-logσ(βΔc - δ) - logσ(-(βΔr - δ))``, ``δ`` the running mean of the rewards (TRL's
                  ``RunningMoments``; the functional form uses this batch's mean unless ``bco_delta``)
``sppo_hard``     ``(Δc - 1/(2β))² + (Δr + 1/(2β))²``  (TRL's sum form)
``apo_zero``      ``1 - σ(βΔc) + σ(βΔr)``
``apo_down``      ``σ(βΔc) + 1 - σ(u)``
``discopop``      ``-logσ(u)(1 - m) + exp(-u) m``, ``m = σ(u/τ)``, ``τ = discopop_tau``
``sigmoid_norm``  ``-logσ(β(Δc/|y_w| - Δr/|y_l|))``  (length-normalised DPO, TRL)
================  ===================================================================================

``nll_weight > 0`` adds ``nll_weight · NLL``, the chosen-token NLL averaged over all chosen completion tokens
(RPO). Rewards are ``βΔ`` (detached).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from prefuse.alignment.functional._common import (
    batch_mean,
    check_pair,
    check_real,
    check_vector,
    chosen_nll,
    float_tensor,
    pair_metrics,
    sigmoid_tails,
)
from prefuse.alignment.output import LossOutput
from torch import Tensor

DPO_LOSS_TYPES = (
    "sigmoid",
    "ipo",
    "hinge",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)
"""Every ``loss_type`` of :func:`dpo_loss` / ``DPOLoss``."""

_LENGTH_NORMALISED = ("ipo", "sigmoid_norm")


def check_dpo_options(
    loss_type: str, beta: float, label_smoothing: float, nll_weight: float, discopop_tau: float
) -> None:
    """``ValueError`` naming the argument for an unknown ``loss_type`` or an out-of-range option."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}; got {loss_type!r}")
    check_real("beta", beta, low=0.0, low_open=True)
    check_real("nll_weight", nll_weight, low=0.0)
    check_real("discopop_tau", discopop_tau, low=0.0, low_open=True)
    if loss_type == "robust":
        check_real("label_smoothing", label_smoothing, low=0.0, high=0.5, high_open=True)
    elif loss_type == "exo_pair":  # log ε: TRL refuses ε = 0 too (the EXO paper suggests 1e-3)
        check_real("label_smoothing", label_smoothing, low=0.0, high=1.0, low_open=True, high_open=True)
    else:
        check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)


def dpo_pair_losses(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    bco_delta: Tensor | float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> Tensor:
    """Per-pair losses ``(B,)`` of the table above, from log-ratios ``Δc``, ``Δr`` (already length-averaged
    for ``ipo``; ``sigmoid_norm`` divides by the lengths here)."""
    eps = label_smoothing
    logits = chosen_logratios - rejected_logratios
    u = beta * logits
    if loss_type == "sigmoid":
        return -(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - u)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(u) + eps * F.logsigmoid(-u)) / (1 - 2 * eps)
    if loss_type == "exo_pair":
        return torch.sigmoid(u) * (F.logsigmoid(u) - math.log1p(-eps)) + torch.sigmoid(-u) * (
            F.logsigmoid(-u) - math.log(eps)
        )
    if loss_type == "nca_pair":
        rc, rr = beta * chosen_logratios, beta * rejected_logratios
        return -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)
    if loss_type == "bco_pair":
        rc, rr = beta * chosen_logratios, beta * rejected_logratios
        return -F.logsigmoid(rc - bco_delta) - F.logsigmoid(-(rr - bco_delta))
    if loss_type == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type == "apo_zero":  # 1 - σ(x) as σ(-x), both tails kept (sigmoid_tails)
        return sigmoid_tails(-beta * chosen_logratios) + sigmoid_tails(beta * rejected_logratios)
    if loss_type == "apo_down":
        return sigmoid_tails(beta * chosen_logratios) + sigmoid_tails(-u)
    if loss_type == "discopop":
        # exp(-u) σ(u/τ) as exp(logσ(u/τ) - u) and 1 - σ(u/τ) as σ(-u/τ): the written-out form overflows to
        # inf * 0 = NaN for u below about -88 (float32), where the value is ~0 for τ < 1
        return -F.logsigmoid(u) * torch.sigmoid(-u / discopop_tau) + torch.exp(
            F.logsigmoid(u / discopop_tau) - u
        )
    if loss_type == "sigmoid_norm":
        chosen_avg = chosen_logratios / chosen_lengths.clamp(min=1)
        rejected_avg = rejected_logratios / rejected_lengths.clamp(min=1)
        return -F.logsigmoid(beta * (chosen_avg - rejected_avg))
    raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}; got {loss_type!r}")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    nll_weight: float = 0.0,
    nll_loss: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    discopop_tau: float = 0.05,
    bco_delta: Tensor | float | None = None,
) -> LossOutput:
    """DPO family loss (see the module docstring for every ``loss_type``), mean over the ``B`` pairs.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` policy log-prob sums over completion tokens.
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` reference sums (detached here).
        chosen_lengths, rejected_lengths: ``(B,)`` completion-token counts; needed by ``ipo`` and
            ``sigmoid_norm``, and (chosen) to derive the NLL when ``nll_loss`` is not given.
        nll_loss: the chosen-token NLL to add with ``nll_weight`` (and report); by default
            ``-Σ policy_chosen_logps / Σ chosen_lengths`` when ``chosen_lengths`` is given.
        bco_delta: ``bco_pair``'s shift δ; ``None`` takes this batch's mean reward (TRL's running mean after
            its first update). ``DPOLoss`` passes its running mean.

    Returns:
        ``LossOutput`` with ``rewards/{chosen,rejected,accuracies,margins}``, ``logps/{chosen,rejected}`` and,
        when known, ``nll_loss``.
    """
    check_dpo_options(loss_type, beta, label_smoothing, nll_weight, discopop_tau)
    names = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    n = check_pair(names, (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))
    if chosen_lengths is not None:
        check_vector("chosen_lengths", chosen_lengths, n, dtype_kind="any", device=policy_chosen_logps.device)
    if rejected_lengths is not None:
        check_vector(
            "rejected_lengths", rejected_lengths, n, dtype_kind="any", device=policy_chosen_logps.device
        )
    if loss_type in _LENGTH_NORMALISED and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(
            f"loss_type={loss_type!r} normalises by length: pass chosen_lengths and rejected_lengths"
        )

    pc, pr = policy_chosen_logps.float(), policy_rejected_logps.float()
    rc, rr = ref_chosen_logps.detach().float(), ref_rejected_logps.detach().float()
    if nll_loss is None and chosen_lengths is not None:
        nll_loss = chosen_nll(pc, chosen_lengths.float())
    if nll_weight > 0 and nll_loss is None:
        raise ValueError("nll_weight > 0 needs nll_loss or chosen_lengths")
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    if loss_type == "ipo":  # TRL: the loss on per-token average log-ratios, the metrics on the sums
        chosen_logratios = chosen_logratios / chosen_lengths.float().clamp(min=1)
        rejected_logratios = rejected_logratios / rejected_lengths.float().clamp(min=1)
    if loss_type == "bco_pair":
        delta = batch_mean(torch.cat([chosen_rewards, rejected_rewards])) if bco_delta is None else bco_delta
        bco_delta = float_tensor(delta, pc)
    losses = dpo_pair_losses(
        chosen_logratios, rejected_logratios, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
        discopop_tau=discopop_tau, bco_delta=0.0 if bco_delta is None else bco_delta,
        chosen_lengths=None if chosen_lengths is None else chosen_lengths.float(),
        rejected_lengths=None if rejected_lengths is None else rejected_lengths.float(),
    )  # fmt: skip
    loss = batch_mean(losses)
    if nll_weight > 0:
        loss = loss + nll_weight * nll_loss
    metrics = pair_metrics(pc, pr, chosen_rewards, rejected_rewards)
    if nll_loss is not None:
        metrics["nll_loss"] = nll_loss.detach()
    return LossOutput(loss, metrics)
