"""SimPOLoss, ORPOLoss, CPOLoss against naive float64 references and Liger-Kernel's chunked losses."""

from __future__ import annotations

import math

import pytest
import torch
from prefuse.alignment import CPOLoss, ORPOLoss, SimPOLoss
from reference import (
    IGNORE,
    PAIR_METRICS,
    Head,
    assert_loss_and_grads,
    assert_metrics,
    make_labels,
    naive_cpo,
    naive_orpo,
    naive_simpo,
    naive_token_logps,
)

B, T, D, V = 3, 10, 16, 40


def batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return Head(2 * B, T, D, V, gen), make_labels(2 * B, T, V, gen)


CASES = {
    "simpo": (
        lambda: SimPOLoss(beta=2.0, gamma=0.8, label_smoothing=0.1, nll_weight=0.5, backend="torch"),
        lambda tok, mask: naive_simpo(tok, mask, beta=2.0, gamma=0.8, eps=0.1, nll_weight=0.5),
    ),
    "simpo_default": (
        lambda: SimPOLoss(backend="torch"),
        lambda tok, mask: naive_simpo(tok, mask, beta=0.1, gamma=0.5, eps=0.0, nll_weight=0.0),
    ),
    "orpo": (
        lambda: ORPOLoss(beta=0.25, backend="torch"),
        lambda tok, mask: naive_orpo(tok, mask, beta=0.25, nll_weight=1.0),
    ),
    "cpo": (
        lambda: CPOLoss(beta=0.2, label_smoothing=0.05, backend="torch"),
        lambda tok, mask: naive_cpo(tok, mask, beta=0.2, eps=0.05, nll_weight=1.0),
    ),
    "cpo_avg": (
        lambda: CPOLoss(beta=0.2, nll_weight=0.0, average_log_prob=True, backend="torch"),
        lambda tok, mask: naive_cpo(tok, mask, beta=0.2, eps=0.0, nll_weight=0.0, average=True),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reference_free_matches_naive_float64(case):
    make_module, naive = CASES[case]
    policy, labels = batch(list(CASES).index(case))
    out = make_module()(policy.h32, policy.w32, labels, bias=policy.b32)
    loss64, metrics = naive(*naive_token_logps(policy.h64, policy.w64, policy.b64, labels))
    assert_loss_and_grads(out.loss, loss64, policy)
    assert_metrics(out.metrics, metrics)
    extra = {"log_odds_ratio", "log_odds_chosen"} if case == "orpo" else set()
    assert set(out.metrics) == set(PAIR_METRICS) | {"nll_loss"} | extra


# ------------------------------------------------------------------------------------------- Liger-Kernel
def _liger(cls_name: str, policy: Head, labels, **kwargs):
    """Liger's chunked loss on the same inputs: no shift in Liger, so ``hidden[:, :-1]`` / ``labels[:, 1:]``;
    ``compiled=False`` (pure PyTorch on CPU)."""
    import liger_kernel.chunked_loss as lc

    h = policy.h32.detach()[:, :-1].contiguous().requires_grad_(True)
    w = policy.w32.detach().clone().requires_grad_(True)
    b = policy.b32.detach().clone().requires_grad_(True)
    loss, aux = getattr(lc, cls_name)(compiled=False, chunk_size=1, **kwargs)(
        w, h, labels[:, 1:].contiguous(), b
    )
    return loss, torch.autograd.grad(loss, [h, w, b]), aux


def _assert_same_as_liger(out, policy: Head, liger_loss, liger_grads):
    torch.testing.assert_close(out.loss, liger_loss, rtol=1e-4, atol=1e-5)
    gh, gw, gb = torch.autograd.grad(out.loss, policy.leaves32())
    assert (gh[:, -1] == 0).all()  # the last position predicts nothing under shift
    for ours, theirs in ((gh[:, :-1], liger_grads[0]), (gw, liger_grads[1]), (gb, liger_grads[2])):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()) + 1e-7)


@pytest.mark.parametrize("nll", [False, True])
def test_simpo_matches_liger(nll):
    """Liger's SimPO averages log-probs per token (its base class default ``average_log_prob=True``), uses
    ``β(āw - āl) - γ`` with γ not divided by β, and adds ``alpha · NLL`` when ``compute_nll_loss`` (its
    default; our ``nll_weight`` defaults to 0 as in the paper)."""
    policy, labels = batch(10)
    out = SimPOLoss(
        beta=1.5, gamma=0.7, label_smoothing=0.1, nll_weight=0.4 if nll else 0.0, backend="torch"
    )(policy.h32, policy.w32, labels, bias=policy.b32)
    liger_loss, grads, aux = _liger(
        "LigerFusedLinearSimPOLoss",
        policy,
        labels,
        beta=1.5,
        gamma=0.7,
        label_smoothing=0.1,
        alpha=0.4,
        compute_nll_loss=nll,
    )
    _assert_same_as_liger(out, policy, liger_loss, grads)
    torch.testing.assert_close(out.metrics["logps/chosen"], aux[0].mean(), rtol=1e-5, atol=1e-6)


def test_orpo_matches_liger():
    """Liger's ORPO: per-token average log-probs, ``-β · mean logσ(log_odds)`` plus the NLL with weight 1."""
    policy, labels = batch(11)
    out = ORPOLoss(beta=0.3, backend="torch")(policy.h32, policy.w32, labels, bias=policy.b32)
    liger_loss, grads, aux = _liger("LigerFusedLinearORPOLoss", policy, labels, beta=0.3)
    _assert_same_as_liger(out, policy, liger_loss, grads)
    # aux after (logps, logps, logits means, nll, rewards, rewards): log_odds_ratio, log_odds_chosen.
    torch.testing.assert_close(out.metrics["log_odds_ratio"], aux[-2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.metrics["log_odds_chosen"], aux[-1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.metrics["nll_loss"], aux[4], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("average", [False, True])
def test_cpo_matches_liger(average):
    """Liger's CPO: sums by default (``average_log_prob=False``), ``alpha · NLL`` with alpha = 1."""
    policy, labels = batch(12)
    out = CPOLoss(beta=0.15, label_smoothing=0.1, nll_weight=0.8, average_log_prob=average, backend="torch")(
        policy.h32, policy.w32, labels, bias=policy.b32
    )
    liger_loss, grads, _ = _liger(
        "LigerFusedLinearCPOLoss",
        policy,
        labels,
        beta=0.15,
        label_smoothing=0.1,
        alpha=0.8,
        average_log_prob=average,
    )
    _assert_same_as_liger(out, policy, liger_loss, grads)


def test_orpo_empty_completion_is_finite():
    """A row whose completion is entirely ignored has ā = 0: log(1 - e^0) is capped, the loss stays finite."""
    policy, labels = batch(13)
    labels = labels.clone()
    labels[0] = IGNORE  # chosen row 0 has no completion token
    labels[B + 1] = IGNORE
    for module in (ORPOLoss(backend="torch"), SimPOLoss(backend="torch"), CPOLoss(backend="torch")):
        out = module(policy.h32, policy.w32, labels, bias=policy.b32)
        assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.metrics.values())
        grads = torch.autograd.grad(out.loss, policy.leaves32())
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("module", [SimPOLoss, ORPOLoss, CPOLoss])
def test_reference_free_rejects_a_reference(module):
    policy, labels = batch(14)
    with pytest.raises(ValueError, match="reference-free; got ref_logps"):
        module(backend="torch")(policy.h32, policy.w32, labels, ref_logps=torch.zeros(2 * B))
    assert math.isfinite(float(module(backend="torch")(policy.h32, policy.w32, labels).loss.detach()))
