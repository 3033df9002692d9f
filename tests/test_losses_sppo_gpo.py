"""SPPOLoss and GPOLoss against naive float64 references."""

from __future__ import annotations

import pytest
import torch
from prefuse.alignment import DPOLoss, GPOLoss, SPPOLoss
from prefuse.alignment import functional as PF
from reference import (
    PAIR_METRICS,
    Head,
    assert_loss_and_grads,
    assert_metrics,
    head_token_logps,
    make_labels,
    naive_square,
)

B, T, D, V = 3, 10, 16, 40


def batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    policy = Head(2 * B, T, D, V, gen)
    ref = Head(2 * B, T, D, V, gen, grad=False)
    labels = make_labels(2 * B, T, V, gen)
    return policy, ref, labels, gen


@pytest.mark.parametrize("beta", [0.001, 0.2])
def test_sppo_matches_naive_float64(beta):
    policy, ref, labels, gen = batch(0)
    pw, pl = torch.rand(B, generator=gen), torch.rand(B, generator=gen)
    out = SPPOLoss(beta=beta, backend="torch")(
        policy.h32,
        policy.w32,
        labels,
        p_chosen=pw,
        p_rejected=pl,
        bias=policy.b32,
        ref_hidden=ref.h32,
        ref_weight=ref.w32,
        ref_bias=ref.b32,
    )
    eta = 1 / beta
    loss64, metrics = naive_square(
        head_token_logps(policy, labels),
        head_token_logps(ref, labels),
        eta * (pw.double() - 0.5),
        eta * (pl.double() - 0.5),
        beta,
    )
    assert_loss_and_grads(out.loss, loss64, policy, rtol=5e-4)
    assert_metrics(out.metrics, metrics)
    assert set(out.metrics) == set(PAIR_METRICS)


def test_sppo_hard_win_rates_are_half_of_trl_sppo_hard():
    """p_chosen = 1, p_rejected = 0: SPPO's ½-weighted square loss is half of TRL's ``sppo_hard``."""
    policy, ref, labels, _ = batch(1)
    kw = {"bias": policy.b32, "ref_hidden": ref.h32, "ref_weight": ref.w32, "ref_bias": ref.b32}
    sppo = SPPOLoss(beta=0.3, backend="torch")(
        policy.h32, policy.w32, labels, p_chosen=torch.ones(B), p_rejected=torch.zeros(B), **kw
    )
    hard = DPOLoss(beta=0.3, loss_type="sppo_hard", backend="torch")(policy.h32, policy.w32, labels, **kw)
    torch.testing.assert_close(2 * sppo.loss, hard.loss)


@pytest.mark.parametrize("clamp", [None, 3.0, (-1.0, 2.0)])
def test_gpo_matches_naive_float64(clamp):
    policy, ref, labels, gen = batch(2)
    sw, sl = torch.randn(B, generator=gen) * 0.01, torch.randn(B, generator=gen) * 0.01
    beta = 0.002
    out = GPOLoss(beta=beta, clamp=clamp, backend="torch")(
        policy.h32,
        policy.w32,
        labels,
        s_chosen=sw,
        s_rejected=sl,
        bias=policy.b32,
        ref_hidden=ref.h32,
        ref_weight=ref.w32,
        ref_bias=ref.b32,
    )
    tc, tr = sw.double() / beta, sl.double() / beta
    if clamp is not None:
        low, high = (-clamp, clamp) if isinstance(clamp, float) else clamp
        tc, tr = tc.clamp(low, high), tr.clamp(low, high)
        assert ((sw / beta).abs() > min(abs(low), high)).any()  # the clamp bites on this batch
    loss64, metrics = naive_square(
        head_token_logps(policy, labels), head_token_logps(ref, labels), tc, tr, beta
    )
    assert_loss_and_grads(out.loss, loss64, policy, rtol=5e-4)
    assert_metrics(out.metrics, metrics)


def test_functional_sppo_gpo_on_sums():
    gen = torch.Generator().manual_seed(3)
    x = [torch.randn(4, generator=gen) * 5 for _ in range(4)]
    p = torch.rand(4, generator=gen)
    out = PF.sppo_loss(*x, p, 1 - p, beta=0.5)
    dc, dr = x[0] - x[2], x[1] - x[3]
    torch.testing.assert_close(
        out.loss, (0.5 * ((dc - 2 * (p - 0.5)) ** 2 + (dr - 2 * (0.5 - p)) ** 2)).mean()
    )
    gout = PF.gpo_loss(*x, p - 0.5, 0.5 - p, beta=0.5)
    torch.testing.assert_close(gout.loss, out.loss)


@pytest.mark.parametrize("name, value", [("p_chosen", 1.5), ("p_rejected", -0.1), ("p_chosen", float("nan"))])
def test_sppo_probabilities_outside_unit_interval(name, value):
    policy, _, labels, _ = batch(4)
    probs = {"p_chosen": torch.full((B,), 0.5), "p_rejected": torch.full((B,), 0.5)}
    probs[name][1] = value
    with pytest.raises(ValueError, match=name):
        SPPOLoss(backend="torch")(policy.h32, policy.w32, labels, ref_logps=torch.zeros(2 * B), **probs)


def test_gpo_bad_clamp():
    with pytest.raises(ValueError, match="clamp"):
        GPOLoss(clamp=-1.0)
    with pytest.raises(ValueError, match="clamp"):
        GPOLoss(clamp=(2.0, 1.0))


@pytest.mark.parametrize("name", ["s_chosen", "s_rejected"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_gpo_non_finite_scores_are_a_value_error(name, value):
    policy, ref, labels, gen = batch(5)
    scores = {"s_chosen": torch.rand(B, generator=gen), "s_rejected": torch.rand(B, generator=gen)}
    scores[name][1] = value
    with pytest.raises(ValueError, match=name):
        GPOLoss(backend="torch")(
            policy.h32,
            policy.w32,
            labels,
            bias=policy.b32,
            ref_hidden=ref.h32,
            ref_weight=ref.w32,
            ref_bias=ref.b32,
            **scores,
        )
    with pytest.raises(ValueError, match=name):
        PF.gpo_loss(torch.zeros(B), torch.zeros(B), torch.zeros(B), torch.zeros(B), **scores)


def test_sppo_is_gpo_with_centred_win_rates():
    """SPPOLoss is GPOLoss (unclamped) with the scores p - ½: the same value and gradient."""
    policy, ref, labels, gen = batch(6)
    pw, pl = torch.rand(B, generator=gen), torch.rand(B, generator=gen)
    common = {"bias": policy.b32, "ref_hidden": ref.h32, "ref_weight": ref.w32, "ref_bias": ref.b32}
    sppo = SPPOLoss(beta=0.05, backend="torch")(
        policy.h32, policy.w32, labels, p_chosen=pw, p_rejected=pl, **common
    )
    gpo = GPOLoss(beta=0.05, backend="torch")(
        policy.h32, policy.w32, labels, s_chosen=pw - 0.5, s_rejected=pl - 0.5, **common
    )
    torch.testing.assert_close(sppo.loss, gpo.loss)
    for a, b in zip(
        torch.autograd.grad(sppo.loss, policy.leaves32()), torch.autograd.grad(gpo.loss, policy.leaves32())
    ):
        torch.testing.assert_close(a, b)
    assert isinstance(SPPOLoss(), GPOLoss)
