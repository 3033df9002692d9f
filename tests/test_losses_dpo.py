"""DPOLoss (every loss_type) against a naive float64 reference and against Liger-Kernel's chunked DPO."""

from __future__ import annotations

import math

import pytest
import torch
from prefuse.alignment import DPO_LOSS_TYPES, DPOLoss
from prefuse.alignment import functional as PF
from reference import (
    IGNORE,
    PAIR_METRICS,
    SMOOTHING,
    Head,
    assert_loss_and_grads,
    assert_metrics,
    make_labels,
    naive_dpo,
    naive_pair_metrics,
    naive_seq_logps,
    naive_token_logps,
)

B, T, D, V = 3, 10, 16, 40


def batch(seed: int, *, bias: bool = True):
    gen = torch.Generator().manual_seed(seed)
    policy = Head(2 * B, T, D, V, gen, bias=bias)
    ref = Head(2 * B, T, D, V, gen, bias=bias, grad=False)
    labels = make_labels(2 * B, T, V, gen)
    return policy, ref, labels


def naive_sums(policy: Head, ref: Head, labels):
    p, lengths = naive_seq_logps(policy.h64, policy.w64, policy.b64, labels)
    r, _ = naive_seq_logps(ref.h64, ref.w64, ref.b64, labels)
    return p[:B], p[B:], r[:B], r[B:], lengths[:B], lengths[B:]


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_matches_naive_float64(loss_type):
    policy, ref, labels = batch(10 + DPO_LOSS_TYPES.index(loss_type))
    eps = SMOOTHING.get(loss_type, 0.0)
    beta = 0.5 if loss_type in ("sppo_hard", "ipo") else 0.1  # keeps the squared losses O(10)
    module = DPOLoss(beta=beta, loss_type=loss_type, label_smoothing=eps, backend="torch")
    out = module(
        policy.h32,
        policy.w32,
        labels,
        bias=policy.b32,
        ref_hidden=ref.h32,
        ref_weight=ref.w32,
        ref_bias=ref.b32,
    )
    pc, pr, rc, rr, lc, lr = naive_sums(policy, ref, labels)
    loss64, (mc, mr, cr, rr_) = naive_dpo(pc, pr, rc, rr, lc, lr, beta=beta, loss_type=loss_type, eps=eps)
    assert_loss_and_grads(out.loss, loss64, policy)
    expected = naive_pair_metrics(mc, mr, cr, rr_)
    expected["nll_loss"] = -pc.detach().sum() / lc.sum()
    assert_metrics(out.metrics, expected)


def test_dpo_nll_weight_adds_chosen_token_nll():
    policy, ref, labels = batch(40)
    module = DPOLoss(beta=0.2, nll_weight=0.7, backend="torch")
    out = module(
        policy.h32,
        policy.w32,
        labels,
        bias=policy.b32,
        ref_hidden=ref.h32,
        ref_weight=ref.w32,
        ref_bias=ref.b32,
    )
    tok, mask = naive_token_logps(policy.h64, policy.w64, policy.b64, labels)
    nll = -tok[:B].sum() / mask[:B].sum()  # mean over all chosen completion tokens
    pc, pr, rc, rr, lc, lr = naive_sums(policy, ref, labels)
    loss64, _ = naive_dpo(pc, pr, rc, rr, lc, lr, beta=0.2, loss_type="sigmoid")
    assert_loss_and_grads(out.loss, loss64 + 0.7 * nll, policy)
    torch.testing.assert_close(out.metrics["nll_loss"].double(), nll.detach(), rtol=1e-5, atol=1e-6)


def test_dpo_exo_pair_refuses_zero_smoothing_as_trl():
    """EXO's loss has ``log ε``: ε = 0 is refused (TRL raises too) instead of silently taking another value."""
    for make in (
        lambda: DPOLoss(loss_type="exo_pair", backend="torch"),
        lambda: PF.dpo_loss(*[torch.zeros(2)] * 4, loss_type="exo_pair"),
    ):
        with pytest.raises(ValueError, match="label_smoothing must be > 0"):
            make()


def test_dpo_reference_forms_agree():
    """ref_hidden + ref_weight, per-sequence ref_logps and per-token ref_logps give the same loss."""
    policy, ref, labels = batch(42)
    module = DPOLoss(backend="torch")
    args = (policy.h32, policy.w32, labels)
    a = module(*args, bias=policy.b32, ref_hidden=ref.h32, ref_weight=ref.w32, ref_bias=ref.b32)
    tok, _ = naive_token_logps(ref.h64, ref.w64, ref.b64, labels)
    noisy = tok.float().clone()
    noisy[labels[:, 1:] == IGNORE] = 123.0  # values off the completion must be ignored
    b = module(*args, bias=policy.b32, ref_logps=noisy)
    c = module(*args, bias=policy.b32, ref_logps=tok.sum(-1).float())
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.loss, c.loss, rtol=1e-5, atol=1e-6)
    assert ref.h32.grad is None and ref.w32.grad is None


def test_dpo_reference_has_no_grad_and_weights_unshared():
    """The reference runs without grad even when its tensors require grad; weight is never reused for it."""
    policy, _, labels = batch(43)
    ref_h = policy.h32.detach().clone().requires_grad_(True)
    ref_w = policy.w32.detach().clone().requires_grad_(True)
    out = DPOLoss(backend="torch")(policy.h32, policy.w32, labels, ref_hidden=ref_h, ref_weight=ref_w)
    out.loss.backward()
    assert ref_h.grad is None and ref_w.grad is None and policy.h32.grad is not None
    # Same parameters for policy and reference (no bias on either): Δ = 0 so the loss is log 2.
    torch.testing.assert_close(out.loss, torch.tensor(math.log(2.0)), rtol=1e-6, atol=1e-6)


def test_dpo_bco_pair_running_mean():
    """bco_pair's δ is TRL's running mean of the per-call mean rewards (count one per call)."""
    module = DPOLoss(loss_type="bco_pair", backend="torch")
    means = []
    for step in range(3):
        policy, ref, labels = batch(50 + step)
        out = module(
            policy.h32,
            policy.w32,
            labels,
            bias=policy.b32,
            ref_hidden=ref.h32,
            ref_weight=ref.w32,
            ref_bias=ref.b32,
        )
        pc, pr, rc, rr, lc, lr = naive_sums(policy, ref, labels)
        means.append(0.1 * torch.cat([pc - rc, pr - rr]).mean().detach())
        delta = torch.stack(means).mean()
        loss64, _ = naive_dpo(pc, pr, rc, rr, lc, lr, beta=0.1, loss_type="bco_pair", delta=delta)
        assert_loss_and_grads(out.loss, loss64, policy)


def test_dpo_shift_false_equals_preshifted_inputs():
    policy, ref, labels = batch(44)
    module = DPOLoss(backend="torch")
    a = module(
        policy.h32,
        policy.w32,
        labels,
        bias=policy.b32,
        ref_hidden=ref.h32,
        ref_weight=ref.w32,
        ref_bias=ref.b32,
    )
    b = module(
        policy.h32[:, :-1],
        policy.w32,
        labels[:, 1:],
        bias=policy.b32,
        ref_hidden=ref.h32[:, :-1],
        ref_weight=ref.w32,
        ref_bias=ref.b32,
        shift=False,
    )
    torch.testing.assert_close(a.loss, b.loss)
    for key in a.metrics:
        torch.testing.assert_close(a.metrics[key], b.metrics[key])


def test_dpo_metric_names_are_trl_names():
    policy, _, labels = batch(45)
    out = DPOLoss(backend="torch")(policy.h32, policy.w32, labels, ref_logps=torch.zeros(2 * B))
    assert set(out.metrics) == set(PAIR_METRICS) | {"nll_loss"}


def test_functional_dpo_takes_sums():
    """The functional twin on log-prob sums equals the module on hidden states."""
    policy, ref, labels = batch(46)
    module = DPOLoss(loss_type="ipo", beta=0.3, backend="torch")
    out = module(
        policy.h32,
        policy.w32,
        labels,
        bias=policy.b32,
        ref_hidden=ref.h32,
        ref_weight=ref.w32,
        ref_bias=ref.b32,
    )
    pc, pr, rc, rr, lc, lr = [t.float().detach() for t in naive_sums(policy, ref, labels)]
    fout = PF.dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr)
    torch.testing.assert_close(out.loss, fout.loss, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chosen_lengths"):
        PF.dpo_loss(pc, pr, rc, rr, loss_type="ipo")


# ------------------------------------------------------------------------------------------- Liger-Kernel
LIGER_TYPES = [
    "sigmoid",
    "hinge",
    "robust",
    "exo_pair",
    "nca_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
]


def _liger_dpo(policy: Head, ref: Head, labels, **kwargs):
    """Liger's chunked DPO on the same inputs. Liger does not shift: it gets ``hidden[:, :-1]`` and
    ``labels[:, 1:]`` (what ``shift=True`` means); ``average_log_prob=False`` makes its log-probs sums like
    ours; ``compiled=False`` runs its pure-PyTorch path on CPU."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    h = policy.h32.detach()[:, :-1].contiguous().requires_grad_(True)
    w = policy.w32.detach().clone().requires_grad_(True)
    b = policy.b32.detach().clone().requires_grad_(True)
    liger = LigerFusedLinearDPOLoss(
        compiled=False, use_ref_model=True, average_log_prob=False, chunk_size=1, **kwargs
    )
    loss, aux = liger(w, h, labels[:, 1:].contiguous(), b, ref.h32[:, :-1].contiguous(), ref.w32, ref.b32)
    grads = torch.autograd.grad(loss, [h, w, b])
    return loss, grads, aux


def _compare_with_liger(loss, policy: Head, liger_loss, liger_grads):
    torch.testing.assert_close(loss, liger_loss, rtol=1e-4, atol=1e-5)
    gh, gw, gb = torch.autograd.grad(loss, policy.leaves32())
    # Our hidden has one more position (the last, which predicts nothing under shift): its grad is 0.
    assert (gh[:, -1] == 0).all()
    for ours, theirs in ((gh[:, :-1], liger_grads[0]), (gw, liger_grads[1]), (gb, liger_grads[2])):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()) + 1e-7)


@pytest.mark.parametrize("loss_type", LIGER_TYPES)
def test_dpo_matches_liger(loss_type):
    """Same loss and grads as Liger-Kernel. Conventions: Liger's ``sigmoid`` ignores ``label_smoothing``
    (so ε = 0 here); its ``exo_pair`` requires ε > 0 (as TRL and prefuse do; 1e-3 here)."""
    policy, ref, labels = batch(60 + LIGER_TYPES.index(loss_type))
    eps = {"robust": 0.1, "exo_pair": 1e-3}.get(loss_type, 0.0)
    beta = 0.5 if loss_type == "sppo_hard" else 0.1
    out = DPOLoss(beta=beta, loss_type=loss_type, label_smoothing=eps, backend="torch")(
        policy.h32,
        policy.w32,
        labels,
        bias=policy.b32,
        ref_hidden=ref.h32,
        ref_weight=ref.w32,
        ref_bias=ref.b32,
    )
    liger_loss, liger_grads, aux = _liger_dpo(
        policy, ref, labels, beta=beta, loss_type=loss_type, label_smoothing=eps
    )
    _compare_with_liger(out.loss, policy, liger_loss, liger_grads)
    # Liger's aux: chosen/rejected log-prob sums, then (after logits means and nll) the rewards.
    torch.testing.assert_close(out.metrics["logps/chosen"], aux[0].mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        out.metrics["rewards/margins"], (aux[-2] - aux[-1]).mean(), rtol=1e-4, atol=1e-5
    )


def test_dpo_nll_matches_liger_alpha():
    """``nll_weight`` is Liger's ``alpha`` with ``compute_nll_loss=True`` (NLL averaged over chosen tokens)."""
    policy, ref, labels = batch(70)
    out = DPOLoss(nll_weight=0.5, backend="torch")(
        policy.h32,
        policy.w32,
        labels,
        bias=policy.b32,
        ref_hidden=ref.h32,
        ref_weight=ref.w32,
        ref_bias=ref.b32,
    )
    liger_loss, liger_grads, aux = _liger_dpo(policy, ref, labels, compute_nll_loss=True, alpha=0.5)
    _compare_with_liger(out.loss, policy, liger_loss, liger_grads)
    torch.testing.assert_close(out.metrics["nll_loss"], aux[4], rtol=1e-5, atol=1e-6)


def test_dpo_bco_pair_matches_liger_without_running_mean():
    """Liger's ``bco_pair`` omits TRL's running-mean shift δ; with δ = 0 our functional form agrees."""
    policy, ref, labels = batch(71)
    from prefuse.kernels import linear_logprobs

    tok = linear_logprobs(policy.h32, policy.w32, labels, policy.b32, shift=True, backend="torch")
    with torch.no_grad():
        ref_tok = linear_logprobs(ref.h32, ref.w32, labels, ref.b32, shift=True, backend="torch")
    p, r = tok.sum(-1), ref_tok.sum(-1)
    out = PF.dpo_loss(p[:B], p[B:], r[:B], r[B:], loss_type="bco_pair", bco_delta=0.0)
    liger_loss, liger_grads, _ = _liger_dpo(policy, ref, labels, loss_type="bco_pair")
    _compare_with_liger(out.loss, policy, liger_loss, liger_grads)


@pytest.mark.parametrize(
    "loss_type, chosen, expected",
    [
        ("apo_zero", 200.0, lambda c, r: torch.sigmoid(-c) + torch.sigmoid(r)),  # σ(-βΔc) + σ(βΔr)
        ("apo_down", -200.0, lambda c, r: torch.sigmoid(c) + torch.sigmoid(-(c - r))),  # σ(βΔc) + σ(-u)
    ],
)
def test_apo_keeps_the_tail_of_a_saturated_sigmoid(loss_type, chosen, expected):
    """APO's ``1 - σ(x)`` terms are evaluated as σ(-x): far on the good side (x = 20) they cost σ(-20), not the
    float32 ``1 - σ(20) = 0``; the value and the gradient match float64."""
    policy = torch.tensor([chosen], requires_grad=True)
    rejected = torch.tensor([-400.0])  # β Δr = -40
    out = PF.dpo_loss(policy, rejected, torch.zeros(1), torch.zeros(1), beta=0.1, loss_type=loss_type)
    c64 = torch.tensor([chosen * 0.1], dtype=torch.float64, requires_grad=True)
    loss64 = expected(c64, torch.tensor([-40.0], dtype=torch.float64)).sum()
    torch.testing.assert_close(out.loss.double(), loss64.detach(), rtol=1e-5, atol=0)
    (grad,) = torch.autograd.grad(out.loss, policy)
    (grad64,) = torch.autograd.grad(loss64, c64)
    torch.testing.assert_close(grad.double(), 0.1 * grad64, rtol=1e-4, atol=0)
