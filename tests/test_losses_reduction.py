"""``loss_from_token_logps``: every loss module's one reduction from per-token log-probs.

``forward`` (the fused head) and the reduction on the same per-token log-probs give the same loss, metrics and
gradients, the reference given per token or as sums; bad masks and shapes raise ``ValueError`` naming them.
"""

from __future__ import annotations

import pytest
import torch
from prefuse.alignment import (
    CPOLoss,
    DPOLoss,
    FactAlignLoss,
    GPOLoss,
    KTOLoss,
    ORPOLoss,
    SamPOLoss,
    SimPOLoss,
    SPPOLoss,
)
from prefuse.kernels import linear_logprobs
from reference import Head, make_labels, make_sentences

B, T, D, V = 3, 12, 16, 40


def _logps(hidden, weight, bias, labels):
    return linear_logprobs(hidden, weight, labels, bias, shift=True, backend="torch")


def _paired(seed):
    gen = torch.Generator().manual_seed(seed)
    policy, ref = Head(2 * B, T, D, V, gen), Head(2 * B, T, D, V, gen, grad=False)
    labels = make_labels(2 * B, T, V, gen, min_completion=2)
    extras = {
        "p_chosen": torch.rand(B, generator=gen),
        "p_rejected": torch.rand(B, generator=gen),
        "s_chosen": torch.randn(B, generator=gen),
        "s_rejected": torch.randn(B, generator=gen),
    }
    return policy, ref, labels, extras


PAIRED = {
    "dpo": (lambda: DPOLoss(beta=0.3, backend="torch"), ()),
    "dpo-ipo": (lambda: DPOLoss(beta=0.3, loss_type="ipo", nll_weight=0.5, backend="torch"), ()),
    "dpo-bco": (lambda: DPOLoss(beta=0.3, loss_type="bco_pair", backend="torch"), ()),
    "sppo": (lambda: SPPOLoss(beta=0.2, backend="torch"), ("p_chosen", "p_rejected")),
    "gpo": (lambda: GPOLoss(beta=0.2, clamp=3.0, backend="torch"), ("s_chosen", "s_rejected")),
    "simpo": (lambda: SimPOLoss(beta=2.0, nll_weight=0.3, backend="torch"), ()),
    "orpo": (lambda: ORPOLoss(backend="torch"), ()),
    "cpo": (lambda: CPOLoss(label_smoothing=0.1, backend="torch"), ()),
}


def _assert_same(a, b, leaves):
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-7)
    assert a.metrics.keys() == b.metrics.keys()
    for key in a.metrics:
        torch.testing.assert_close(a.metrics[key], b.metrics[key], rtol=1e-6, atol=1e-7, msg=key)
    for ga, gb in zip(torch.autograd.grad(a.loss, leaves), torch.autograd.grad(b.loss, leaves)):
        torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(PAIRED))
@pytest.mark.parametrize("ref_kind", ["tokens", "sums"])
def test_paired_forward_is_the_reduction(name, ref_kind):
    make, keys = PAIRED[name]
    policy, ref, labels, extras = _paired(list(PAIRED).index(name))
    kwargs = {k: extras[k] for k in keys}
    reference_free = name in ("simpo", "orpo", "cpo")
    refs = {} if reference_free else {"ref_hidden": ref.h32, "ref_weight": ref.w32, "ref_bias": ref.b32}
    fused = make()(policy.h32, policy.w32, labels, bias=policy.b32, **refs, **kwargs)
    mask = labels[:, 1:] != -100
    ref_logps = None
    if not reference_free:
        ref_logps = _logps(ref.h32, ref.w32, ref.b32, labels)
        ref_logps = ref_logps.sum(-1) if ref_kind == "sums" else ref_logps
    tokens = _logps(policy.h32, policy.w32, policy.b32, labels)
    reduced = make().loss_from_token_logps(tokens, ref_logps, mask, **kwargs)
    _assert_same(fused, reduced, policy.leaves32())


def test_sampo_forward_is_the_reduction_on_the_same_sample():
    policy, ref, labels, _ = _paired(20)
    mask = labels[:, 1:] != -100
    fused = SamPOLoss(beta=0.2, seed=5, backend="torch")(
        policy.h32,
        policy.w32,
        labels,
        bias=policy.b32,
        ref_hidden=ref.h32,
        ref_weight=ref.w32,
        ref_bias=ref.b32,
    )
    reduced = SamPOLoss(beta=0.2, seed=5, backend="torch").loss_from_token_logps(
        _logps(policy.h32, policy.w32, policy.b32, labels), _logps(ref.h32, ref.w32, ref.b32, labels), mask
    )  # the same seed draws the same sample
    _assert_same(fused, reduced, policy.leaves32())
    with pytest.raises(ValueError, match="ref_logps"):  # sums cannot be down-sampled
        SamPOLoss(backend="torch").loss_from_token_logps(
            _logps(policy.h32, policy.w32, policy.b32, labels), torch.zeros(2 * B), mask
        )


def _unpaired(seed):
    gen = torch.Generator().manual_seed(seed)
    n, t_kl = 4, 10
    policy, ref = Head(n, T, D, V, gen), Head(n, T, D, V, gen, grad=False)
    labels = make_labels(n, T, V, gen, min_completion=3)
    kl_hidden, ref_kl_hidden = torch.randn(n, t_kl, D, generator=gen), torch.randn(n, t_kl, D, generator=gen)
    kl_labels = make_labels(n, t_kl, V, gen, min_completion=2)
    sentence_ids, s = make_sentences(labels, gen)
    kl_sentence_ids, _ = make_sentences(kl_labels, gen)
    batch = {
        "desirable": torch.tensor([True, False, True, False]),
        "sentence_ids": sentence_ids,
        "sentence_labels": torch.rand(s, generator=gen) < 0.5,
        "kl_sentence_ids": kl_sentence_ids,
    }
    return policy, ref, labels, kl_hidden, ref_kl_hidden, kl_labels, batch


@pytest.mark.parametrize("cls", [KTOLoss, FactAlignLoss])
def test_unpaired_forward_is_the_reduction(cls):
    policy, ref, labels, kl_hidden, ref_kl_hidden, kl_labels, batch = _unpaired(30)
    sentences = cls is FactAlignLoss
    extra = {k: batch[k] for k in ("sentence_ids", "sentence_labels", "kl_sentence_ids")} if sentences else {}
    fused = cls(backend="torch")(
        policy.h32, policy.w32, labels, batch["desirable"], kl_hidden=kl_hidden, kl_labels=kl_labels,
        bias=policy.b32, ref_hidden=ref.h32, ref_weight=ref.w32, ref_bias=ref.b32, ref_kl_hidden=ref_kl_hidden,
        **extra,
    )  # fmt: skip
    if sentences:  # the reduction takes ids aligned with the per-token log-probs
        extra = {
            **extra,
            "sentence_ids": extra["sentence_ids"][:, 1:],
            "kl_sentence_ids": extra["kl_sentence_ids"][:, 1:],
        }
    with torch.no_grad():
        kl_policy = _logps(kl_hidden, policy.w32, policy.b32, kl_labels)
    reduced = cls(backend="torch").loss_from_token_logps(
        _logps(policy.h32, policy.w32, policy.b32, labels), _logps(ref.h32, ref.w32, ref.b32, labels),
        labels[:, 1:] != -100, batch["desirable"], policy_kl_logps=kl_policy,
        ref_kl_logps=_logps(ref_kl_hidden, ref.w32, ref.b32, kl_labels), kl_mask=kl_labels[:, 1:] != -100, **extra,
    )  # fmt: skip
    _assert_same(fused, reduced, policy.leaves32())


def test_reduction_bad_inputs_name_the_argument():
    policy, _, labels, _ = _paired(40)
    tokens = _logps(policy.h32, policy.w32, policy.b32, labels)
    mask = labels[:, 1:] != -100
    with pytest.raises(ValueError, match="mask"):
        DPOLoss().loss_from_token_logps(tokens, tokens.detach(), mask.float())
    with pytest.raises(ValueError, match="mask"):
        DPOLoss().loss_from_token_logps(tokens[:5], tokens[:5].detach(), mask[:5])
    with pytest.raises(ValueError, match="ref_logps"):
        DPOLoss().loss_from_token_logps(tokens, tokens[:, :3].detach(), mask)
    with pytest.raises(ValueError, match="ref_logps"):
        DPOLoss().loss_from_token_logps(tokens, None, mask)
    with pytest.raises(ValueError, match="reference-free"):
        SimPOLoss().loss_from_token_logps(tokens, tokens.detach(), mask)
    with pytest.raises(ValueError, match="kl_mask"):
        KTOLoss().loss_from_token_logps(
            tokens, tokens.detach(), mask, torch.ones(2 * B, dtype=torch.bool), policy_kl_logps=tokens.detach(),
            ref_kl_logps=tokens.detach(),
        )  # fmt: skip
