"""FactAlignLoss (fKTO) against a naive float64 reference with per-sentence loops."""

from __future__ import annotations

import pytest
import torch
from prefuse.alignment import FactAlignLoss, KTOLoss
from prefuse.alignment import functional as PF
from reference import (
    IGNORE,
    KTO_METRICS,
    Head,
    assert_loss_and_grads,
    assert_metrics,
    make_labels,
    make_sentences,
    naive_factalign,
    naive_token_logps,
)

N, T, D, V = 4, 14, 16, 40
T_KL = 12
FG_METRICS = {
    "fg_kl",
    "fg_loss",
    "fg_rewards/chosen_sum",
    "fg_rewards/rejected_sum",
    "count/fg_chosen",
    "count/fg_rejected",
    "fg_logps/policy_chosen",
    "fg_logps/reference_chosen",
    "fg_logps/policy_rejected",
    "fg_logps/reference_rejected",
}
FG_KL_METRICS = {"fg_logps/policy_KL", "fg_logps/reference_KL"}


class Batch:
    def __init__(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.policy = Head(N, T, D, V, gen)
        self.ref = Head(N, T, D, V, gen, grad=False)
        self.labels = make_labels(N, T, V, gen, min_completion=4)
        self.kl_hidden = torch.randn(N, T_KL, D, generator=gen)
        self.ref_kl_hidden = torch.randn(N, T_KL, D, generator=gen)
        self.kl_labels = make_labels(N, T_KL, V, gen, min_completion=3)
        self.desirable = torch.tensor([True, False, True, False])
        self.sentence_ids, self.num_sentences = make_sentences(self.labels, gen)
        self.sentence_labels = torch.rand(self.num_sentences, generator=gen) < 0.6
        self.kl_sentence_ids, _ = make_sentences(self.kl_labels, gen)

    def kwargs(self, **over):
        kw = {
            "sentence_ids": self.sentence_ids,
            "sentence_labels": self.sentence_labels,
            "kl_sentence_ids": self.kl_sentence_ids,
            "kl_hidden": self.kl_hidden,
            "kl_labels": self.kl_labels,
            "bias": self.policy.b32,
            "ref_hidden": self.ref.h32,
            "ref_weight": self.ref.w32,
            "ref_bias": self.ref.b32,
            "ref_kl_hidden": self.ref_kl_hidden,
        }
        kw.update(over)
        return kw


def test_factalign_matches_naive_float64_defaults():
    b = Batch(0)
    assert b.num_sentences > 5 and b.sentence_labels.any() and (~b.sentence_labels).any()
    out = FactAlignLoss(backend="torch")(b.policy.h32, b.policy.w32, b.labels, b.desirable, **b.kwargs())
    loss64, metrics = naive_factalign(b)
    assert_loss_and_grads(out.loss, loss64, b.policy)
    assert_metrics(out.metrics, metrics)
    assert set(out.metrics) == KTO_METRICS | FG_METRICS | FG_KL_METRICS


def test_factalign_matches_naive_float64_custom_weights():
    b = Batch(1)
    params = {
        "beta": 0.2,
        "fg_beta": 0.5,
        "desirable_weight": 1.5,
        "undesirable_weight": 0.7,
        "fg_desirable_weight": 2.0,
        "fg_undesirable_weight": 3.0,
        "loss_weight": 0.6,
        "fg_loss_weight": 1.7,
    }
    out = FactAlignLoss(**params, backend="torch")(
        b.policy.h32, b.policy.w32, b.labels, b.desirable, **b.kwargs()
    )
    loss64, metrics = naive_factalign(
        b, beta=0.2, fg_beta=0.5, wd=1.5, wu=0.7, fwd=2.0, fwu=3.0, lw=0.6, fgw=1.7
    )
    assert_loss_and_grads(out.loss, loss64, b.policy)
    assert_metrics(out.metrics, metrics)


def test_factalign_fg_reference_point_is_positive_and_detached():
    """Force a positive z_fg (reference KL log-probs lowered by 0.4 per token) and check its value."""
    b = Batch(2)
    ktok, _ = naive_token_logps(b.kl_hidden, b.policy.w64, b.policy.b64, b.kl_labels)
    ref_kl = (ktok - 0.4 * (b.kl_labels[:, 1:] != IGNORE)).float()
    out = FactAlignLoss(backend="torch")(
        b.policy.h32, b.policy.w32, b.labels, b.desirable, **b.kwargs(ref_kl_hidden=None, ref_kl_logps=ref_kl)
    )
    ksid = b.kl_sentence_ids[:, 1:]
    ids = sorted(set(ksid[ksid >= 0].tolist()))
    counts = torch.tensor([float((ksid == s).sum()) for s in ids])
    torch.testing.assert_close(out.metrics["fg_kl"], 0.4 * counts.mean(), rtol=1e-4, atol=1e-5)
    assert not out.metrics["fg_kl"].requires_grad


def test_factalign_without_sentences_is_kto():
    """No sentence in the batch: fg term 0, finite, and the loss is loss_weight · KTO."""
    b = Batch(3)
    kwargs = b.kwargs(
        sentence_ids=torch.full_like(b.labels, -1),
        sentence_labels=torch.zeros(0, dtype=torch.bool),
        kl_sentence_ids=torch.full_like(b.kl_labels, -1),
    )
    out = FactAlignLoss(loss_weight=0.5, backend="torch")(
        b.policy.h32, b.policy.w32, b.labels, b.desirable, **kwargs
    )
    kto_kwargs = {k: v for k, v in kwargs.items() if "sentence" not in k}
    kto = KTOLoss(backend="torch")(b.policy.h32, b.policy.w32, b.labels, b.desirable, **kto_kwargs)
    torch.testing.assert_close(out.loss, 0.5 * kto.loss)
    assert float(out.metrics["fg_loss"]) == 0 and float(out.metrics["fg_kl"]) == 0
    assert all(torch.isfinite(v) for v in out.metrics.values())
    out.loss.backward()
    assert torch.isfinite(b.policy.h32.grad).all()


def test_factalign_without_kl_sentences_has_zero_fg_reference_point():
    b = Batch(4)
    out = FactAlignLoss(backend="torch")(
        b.policy.h32, b.policy.w32, b.labels, b.desirable, **b.kwargs(kl_sentence_ids=None)
    )
    loss64, metrics = naive_factalign(b, use_kl_sentences=False)
    assert_loss_and_grads(out.loss, loss64, b.policy)
    assert_metrics(out.metrics, metrics)


def test_factalign_per_token_ref_logps_and_given_kls():
    b = Batch(5)
    rtok, _ = naive_token_logps(b.ref.h64, b.ref.w64, b.ref.b64, b.labels)
    krtok, _ = naive_token_logps(b.ref_kl_hidden, b.ref.w64, b.ref.b64, b.kl_labels)
    module = FactAlignLoss(backend="torch")
    a = module(b.policy.h32, b.policy.w32, b.labels, b.desirable, **b.kwargs())
    c = module(
        b.policy.h32,
        b.policy.w32,
        b.labels,
        b.desirable,
        **b.kwargs(ref_hidden=None, ref_logps=rtok.float(), ref_kl_hidden=None, ref_kl_logps=krtok.float()),
    )
    torch.testing.assert_close(a.loss, c.loss, rtol=1e-5, atol=1e-6)
    d = module(
        b.policy.h32,
        b.policy.w32,
        b.labels,
        b.desirable,
        **b.kwargs(
            kl_hidden=None,
            kl_labels=None,
            ref_kl_hidden=None,
            kl_sentence_ids=None,
            kl=a.metrics["kl"],
            fg_kl=a.metrics["fg_kl"],
        ),
    )
    torch.testing.assert_close(a.loss, d.loss, rtol=1e-5, atol=1e-6)


def test_functional_factalign_segment_sums():
    """The functional form on per-token log-probs; sentence sums by segment sum."""
    gen = torch.Generator().manual_seed(6)
    pol, ref = torch.randn(3, 6, generator=gen), torch.randn(3, 6, generator=gen)
    ids = torch.tensor([[0, 0, 1, 1, -1, -1], [-1, 2, 2, 2, 3, -1], [4, -1, 4, 5, 5, 5]])
    labels = torch.tensor([True, False, False, True, True, False])
    out = PF.factalign_loss(
        pol,
        ref,
        torch.tensor([True, False, True]),
        ids,
        labels,
        kl=0.0,
        fg_kl=0.3,
        fg_beta=0.5,
        fg_undesirable_weight=2.0,
        loss_weight=0.0,
    )
    d = pol - ref
    d_s = torch.stack([d[ids == s].sum() for s in range(6)])
    expected = torch.where(
        labels, 1 - torch.sigmoid(0.5 * (d_s - 0.3)), 2 * (1 - torch.sigmoid(0.5 * (0.3 - d_s)))
    )
    torch.testing.assert_close(out.loss, expected.mean())
    torch.testing.assert_close(PF.segment_sum(d, ids, 6), d_s)


@pytest.mark.parametrize(
    "bad",
    [
        "missing_labels",
        "missing_ids",
        "out_of_range",
        "below_minus_one",
        "shape",
        "sums_ref",
        "kl_ids_without_rows",
    ],
)
def test_factalign_value_errors(bad):
    b = Batch(7)
    kwargs = b.kwargs()
    match = "sentence"
    if bad == "missing_labels":
        kwargs["sentence_labels"] = None
        match = "sentence_labels"
    elif bad == "missing_ids":
        kwargs["sentence_ids"] = None
        match = "sentence_ids"
    elif bad == "out_of_range":
        kwargs["sentence_ids"] = b.sentence_ids.clone()
        kwargs["sentence_ids"][0, -1] = b.num_sentences
        match = "sentence_ids holds sentence id"
    elif bad == "below_minus_one":
        kwargs["kl_sentence_ids"] = b.kl_sentence_ids.clone()
        kwargs["kl_sentence_ids"][1, 3] = -2
        match = "kl_sentence_ids"
    elif bad == "shape":
        kwargs["sentence_ids"] = b.sentence_ids[:, :-1]
        match = "sentence_ids must have labels' shape"
    elif bad == "sums_ref":
        kwargs.update(ref_hidden=None, ref_logps=torch.zeros(N))
        match = "per-token ref_logps"
    elif bad == "kl_ids_without_rows":
        kwargs.update(kl_hidden=None, kl_labels=None, ref_kl_hidden=None, kl=0.0)
        match = "kl_sentence_ids"
    with pytest.raises(ValueError, match=match):
        FactAlignLoss(backend="torch")(b.policy.h32, b.policy.w32, b.labels, b.desirable, **kwargs)


def test_factalign_sentence_term_keeps_the_tail():
    """Sentence-level KTO far on its good side costs σ(-x) (not the float32 ``1 - σ(x)``, exactly 0 there)."""
    x = torch.tensor([18.0, 30.0])  # β_fg · Δ_s of a supported and an unsupported sentence, z_fg = 0
    logps = torch.tensor([[x[0] / 0.5, -x[1] / 0.5]], requires_grad=True)
    out = PF.factalign_loss(
        logps, torch.zeros(1, 2), torch.tensor([True]), torch.tensor([[0, 1]]), torch.tensor([True, False]),
        kl=0.0, fg_kl=0.0, fg_beta=0.5, loss_weight=0.0, fg_desirable_weight=1.0, fg_undesirable_weight=1.0,
    )  # fmt: skip
    expected = torch.sigmoid(-x.double()).mean()
    torch.testing.assert_close(out.metrics["fg_loss"].double(), expected, rtol=1e-5, atol=0)
    (grad,) = torch.autograd.grad(out.loss, logps)
    assert (grad != 0).all()


@pytest.mark.parametrize("fg_kl", [float("nan"), torch.tensor(float("-inf"))])
def test_factalign_bad_given_fg_kl_is_a_value_error(fg_kl):
    with pytest.raises(ValueError, match="fg_kl"):
        PF.factalign_loss(
            torch.zeros(1, 2),
            torch.zeros(1, 2),
            torch.tensor([True]),
            torch.tensor([[0, 1]]),
            torch.tensor([True, False]),
            kl=0.0,
            fg_kl=fg_kl,
        )
