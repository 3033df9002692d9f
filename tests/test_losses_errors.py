"""ValueErrors that name the argument, and degenerate batches that stay finite, across the loss modules."""

from __future__ import annotations

import pytest
import torch
from prefuse.alignment import (
    DPO_LOSS_TYPES,
    CPOLoss,
    DPOLoss,
    FactAlignLoss,
    GPOLoss,
    KTOLoss,
    LossOutput,
    ORPOLoss,
    SamPOLoss,
    SimPOLoss,
    SPPOLoss,
)
from prefuse.alignment import functional as PF
from reference import IGNORE, make_labels

B, T, D, V = 2, 8, 8, 20


def inputs(rows=2 * B, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, T, D, generator=gen, requires_grad=True)
    weight = torch.randn(V, D, generator=gen, requires_grad=True)
    labels = make_labels(rows, T, V, gen)
    ref_hidden = torch.randn(rows, T, D, generator=gen)
    ref_weight = torch.randn(V, D, generator=gen)
    return hidden, weight, labels, ref_hidden, ref_weight


PAIRED_EXTRA = {
    DPOLoss: {},
    SamPOLoss: {},
    SPPOLoss: {"p_chosen": torch.full((B,), 0.6), "p_rejected": torch.full((B,), 0.4)},
    GPOLoss: {"s_chosen": torch.full((B,), 0.1), "s_rejected": torch.full((B,), -0.1)},
}


# ------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("cls", list(PAIRED_EXTRA))
def test_missing_reference(cls):
    hidden, weight, labels, _, _ = inputs()
    with pytest.raises(ValueError, match="needs a reference: pass ref_hidden and ref_weight"):
        cls(backend="torch")(hidden, weight, labels, **PAIRED_EXTRA[cls])


@pytest.mark.parametrize("cls", list(PAIRED_EXTRA))
def test_ref_weight_never_defaults_to_weight(cls):
    hidden, weight, labels, ref_hidden, _ = inputs()
    with pytest.raises(ValueError, match="ref_weight"):
        cls(backend="torch")(hidden, weight, labels, ref_hidden=ref_hidden, **PAIRED_EXTRA[cls])


def test_reference_given_twice_and_bad_ref_logps_shape():
    hidden, weight, labels, ref_hidden, ref_weight = inputs()
    module = DPOLoss(backend="torch")
    with pytest.raises(ValueError, match="either ref_hidden .* or ref_logps"):
        module(
            hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_logps=torch.zeros(2 * B)
        )
    with pytest.raises(ValueError, match=r"ref_logps must be per-sequence sums \(4,\) or per-token \(4, 7\)"):
        module(hidden, weight, labels, ref_logps=torch.zeros(2 * B, T))
    with pytest.raises(ValueError, match="ref_hidden must have shape"):
        module(hidden, weight, labels, ref_hidden=ref_hidden[:, :-1], ref_weight=ref_weight)
    with pytest.raises(ValueError, match="reference head"):
        module(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight.double())


def test_kto_missing_references():
    hidden, weight, labels, ref_hidden, ref_weight = inputs()
    desirable = torch.tensor([True, False, True, False])
    module = KTOLoss(backend="torch")
    with pytest.raises(ValueError, match="KTOLoss needs a reference"):
        module(hidden, weight, labels, desirable, kl=0.0)
    with pytest.raises(ValueError, match="kl_hidden and kl_labels"):
        module(hidden, weight, labels, desirable, ref_hidden=ref_hidden, ref_weight=ref_weight)
    with pytest.raises(ValueError, match="KL rows"):
        module(
            hidden,
            weight,
            labels,
            desirable,
            kl_hidden=hidden.detach(),
            kl_labels=labels,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
        )
    with pytest.raises(ValueError, match="either kl or the KL rows"):
        module(
            hidden,
            weight,
            labels,
            desirable,
            kl=0.1,
            kl_hidden=hidden.detach(),
            kl_labels=labels,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            ref_kl_hidden=ref_hidden,
        )
    with pytest.raises(ValueError, match="kl_labels has shape"):
        module(
            hidden,
            weight,
            labels,
            desirable,
            kl_hidden=hidden.detach(),
            kl_labels=labels[:, :-1],
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            ref_kl_hidden=ref_hidden,
        )


# ------------------------------------------------------------------------------------------- shapes, options
@pytest.mark.parametrize("cls", list(PAIRED_EXTRA) + [SimPOLoss, ORPOLoss, CPOLoss])
def test_odd_rows_for_paired_losses(cls):
    hidden, weight, labels, ref_hidden, ref_weight = inputs(rows=3)
    extra = dict(PAIRED_EXTRA.get(cls, {}))
    if cls not in (SimPOLoss, ORPOLoss, CPOLoss):
        extra.update(ref_hidden=ref_hidden, ref_weight=ref_weight)
    with pytest.raises(ValueError, match="hidden has 3 rows; a paired loss takes 2B rows"):
        cls(backend="torch")(hidden, weight, labels, **extra)


@pytest.mark.parametrize("cls", [DPOLoss, KTOLoss, FactAlignLoss, SimPOLoss])
def test_label_hidden_shape_mismatch(cls):
    hidden, weight, labels, _, _ = inputs()
    args = (hidden, weight, labels[:, :-1])
    if cls in (KTOLoss, FactAlignLoss):
        args = args + (torch.ones(2 * B, dtype=torch.bool),)
    kwargs = (
        {"sentence_ids": labels, "sentence_labels": torch.ones(1, dtype=torch.bool)}
        if cls is FactAlignLoss
        else {}
    )
    with pytest.raises(ValueError, match=r"labels has shape \(4, 7\) but hidden is \(4, 8, 8\)"):
        cls(backend="torch")(*args, ref_logps=torch.zeros(2 * B), **kwargs) if cls is not SimPOLoss else cls(
            backend="torch"
        )(*args)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        DPOLoss(backend="torch")(hidden, weight, labels.float(), ref_logps=torch.zeros(2 * B))
    with pytest.raises(ValueError, match=r"hidden must be a \(rows, T, D\) tensor"):
        DPOLoss(backend="torch")(hidden[0], weight, labels, ref_logps=torch.zeros(2 * B))


def test_unknown_loss_type_lists_valid_ones():
    with pytest.raises(
        ValueError, match="loss_type must be one of sigmoid, ipo, hinge, .*sigmoid_norm; got 'kto_pair'"
    ):
        DPOLoss(loss_type="kto_pair")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        PF.dpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), loss_type="dpo")


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"beta": 0.0}, "beta"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing"),
        ({"label_smoothing": 1.5}, "label_smoothing"),
        ({"nll_weight": -1.0}, "nll_weight"),
        ({"backend": "cuda"}, "backend"),
        ({"temperature": 0.0}, "temperature"),
        ({"softcap": -3.0}, "softcap"),
        ({"ignore_index": 1.5}, "ignore_index"),
    ],
)
def test_bad_constructor_options(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DPOLoss(**kwargs)


@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        (KTOLoss, {"desirable_weight": -1.0}, "desirable_weight"),
        (FactAlignLoss, {"fg_beta": 0.0}, "fg_beta"),
        (FactAlignLoss, {"fg_undesirable_weight": -4.0}, "fg_undesirable_weight"),
        (SamPOLoss, {"seed": 1.5}, "seed"),
        (SPPOLoss, {"beta": -0.1}, "beta"),
        (SimPOLoss, {"gamma": float("nan")}, "gamma"),
        (CPOLoss, {"label_smoothing": -0.1}, "label_smoothing"),
        (ORPOLoss, {"nll_weight": -1}, "nll_weight"),
    ],
)
def test_bad_options_of_other_losses(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


def test_desirable_and_score_shapes():
    hidden, weight, labels, _, _ = inputs()
    with pytest.raises(ValueError, match="desirable must be a bool tensor"):
        KTOLoss(backend="torch")(
            hidden, weight, labels, torch.ones(2 * B), kl=0.0, ref_logps=torch.zeros(2 * B)
        )
    with pytest.raises(ValueError, match="desirable must have length 4"):
        KTOLoss(backend="torch")(
            hidden, weight, labels, torch.ones(3, dtype=torch.bool), kl=0.0, ref_logps=torch.zeros(2 * B)
        )
    with pytest.raises(ValueError, match="s_rejected must have length 2"):
        GPOLoss(backend="torch")(
            hidden,
            weight,
            labels,
            s_chosen=torch.zeros(B),
            s_rejected=torch.zeros(B + 1),
            ref_logps=torch.zeros(2 * B),
        )


def test_out_of_vocab_label_is_a_value_error():
    hidden, weight, labels, _, _ = inputs()
    labels = labels.clone()
    labels[0, -1] = V
    with pytest.raises(ValueError, match="targets"):
        DPOLoss(backend="torch")(hidden, weight, labels, ref_logps=torch.zeros(2 * B))


# ------------------------------------------------------------------------------------------- degenerate batches
def _finite(out: LossOutput):
    assert isinstance(out, LossOutput) and out.loss.dim() == 0
    assert torch.isfinite(out.loss), out.loss
    for key, value in out.metrics.items():
        assert torch.isfinite(value), key
        assert not value.requires_grad, key


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_empty_completion_row_is_finite_for_every_dpo_type(loss_type):
    """A pair whose chosen completion is entirely ignored (and a rejected one too)."""
    hidden, weight, labels, ref_hidden, ref_weight = inputs(seed=3)
    labels = labels.clone()
    labels[0] = IGNORE
    labels[B + 1] = IGNORE
    eps = 0.1 if loss_type in ("robust", "exo_pair") else 0.0
    out = DPOLoss(loss_type=loss_type, label_smoothing=eps, nll_weight=0.1, backend="torch")(
        hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight
    )
    _finite(out)
    out.loss.backward()
    assert torch.isfinite(hidden.grad).all() and (hidden.grad[0] == 0).all()


def test_all_rows_empty_is_finite():
    hidden, weight, labels, ref_hidden, ref_weight = inputs(seed=4)
    labels = torch.full_like(labels, IGNORE)
    kw = {"ref_hidden": ref_hidden, "ref_weight": ref_weight}
    for module, extra in (
        (DPOLoss(nll_weight=1.0, backend="torch"), {}),
        (SamPOLoss(seed=0, backend="torch"), {}),
        (SPPOLoss(backend="torch"), PAIRED_EXTRA[SPPOLoss]),
    ):
        _finite(module(hidden, weight, labels, **kw, **extra))
    for module in (SimPOLoss(backend="torch"), ORPOLoss(backend="torch"), CPOLoss(backend="torch")):
        _finite(module(hidden, weight, labels))
    desirable = torch.tensor([True, False, True, True])
    _finite(
        KTOLoss(backend="torch")(
            hidden,
            weight,
            labels,
            desirable,
            kl_hidden=hidden.detach(),
            kl_labels=labels,
            ref_kl_hidden=ref_hidden,
            **kw,
        )
    )
    _finite(
        FactAlignLoss(backend="torch")(
            hidden,
            weight,
            labels,
            desirable,
            sentence_ids=torch.full_like(labels, -1),
            sentence_labels=torch.zeros(0, dtype=torch.bool),
            kl=0.0,
            **kw,
        )
    )


def test_sampo_one_side_empty_keeps_nothing():
    """min(Tc, Tr) = 0 for a pair: both sides keep no token, the pair's margin is 0."""
    hidden, weight, labels, ref_hidden, ref_weight = inputs(seed=5)
    labels = labels.clone()
    labels[B] = IGNORE  # rejected of pair 0 is empty
    out = SamPOLoss(seed=0, backend="torch")(
        hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight
    )
    _finite(out)
    out.loss.backward()
    assert (hidden.grad[0] == 0).all() and (hidden.grad[B] == 0).all()


@pytest.mark.parametrize("desirable", [[True] * 4, [False] * 4])
def test_factalign_single_class_and_all_one_sentence_label(desirable):
    hidden, weight, labels, ref_hidden, ref_weight = inputs(seed=6)
    ids = torch.where(labels != IGNORE, torch.arange(2 * B)[:, None], -1)
    out = FactAlignLoss(backend="torch")(
        hidden,
        weight,
        labels,
        torch.tensor(desirable),
        sentence_ids=ids,
        sentence_labels=torch.tensor(desirable),
        kl_hidden=hidden.detach(),
        kl_labels=labels,
        kl_sentence_ids=ids,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        ref_kl_hidden=ref_hidden,
    )
    _finite(out)
    key = "count/fg_chosen" if desirable[0] else "count/fg_rejected"
    assert float(out.metrics[key]) == 4


def test_metrics_are_detached_and_loss_has_grad():
    hidden, weight, labels, ref_hidden, ref_weight = inputs(seed=7)
    out = DPOLoss(backend="torch")(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight)
    assert out.loss.requires_grad
    _, metrics = out  # LossOutput unpacks like a tuple
    assert all(not m.requires_grad for m in metrics.values())
