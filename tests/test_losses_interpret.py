"""DPO, KTO and FactAlign through the Triton backend of ``linear_logprobs`` (``TRITON_INTERPRET=1`` on CPU;
compiled kernels on CUDA machines skip these, the interpreter being off there). Tiny shapes: the interpreter
is slow. Each loss is checked against the naive float64 reference (values and grads of hidden, weight, bias).
"""

from __future__ import annotations

import pytest
import torch
from prefuse.alignment import DPOLoss, FactAlignLoss, KTOLoss
from reference import (
    Head,
    assert_loss_and_grads,
    make_labels,
    make_sentences,
    naive_dpo,
    naive_factalign,
    naive_kto,
    naive_seq_logps,
)

pytestmark = pytest.mark.interpret

B, T, D, V = 2, 8, 16, 40


def test_dpo_triton_backend():
    gen = torch.Generator().manual_seed(0)
    policy, ref = Head(2 * B, T, D, V, gen), Head(2 * B, T, D, V, gen, grad=False)
    labels = make_labels(2 * B, T, V, gen)
    out = DPOLoss(beta=0.2, nll_weight=0.3, backend="triton")(
        policy.h32,
        policy.w32,
        labels,
        bias=policy.b32,
        ref_hidden=ref.h32,
        ref_weight=ref.w32,
        ref_bias=ref.b32,
    )
    p, lengths = naive_seq_logps(policy.h64, policy.w64, policy.b64, labels)
    r, _ = naive_seq_logps(ref.h64, ref.w64, ref.b64, labels)
    loss64, _ = naive_dpo(p[:B], p[B:], r[:B], r[B:], lengths[:B], lengths[B:], beta=0.2, loss_type="sigmoid")
    nll = -p[:B].sum() / lengths[:B].sum()
    assert_loss_and_grads(out.loss, loss64 + 0.3 * nll, policy)


def test_kto_triton_backend():
    gen = torch.Generator().manual_seed(1)
    n = 2 * B
    policy, ref = Head(n, T, D, V, gen), Head(n, T, D, V, gen, grad=False)
    labels = make_labels(n, T, V, gen)
    kl_hidden, ref_kl_hidden = torch.randn(n, T, D, generator=gen), torch.randn(n, T, D, generator=gen)
    kl_labels = make_labels(n, T, V, gen)
    desirable = torch.tensor([True, False, False, True])
    out = KTOLoss(beta=0.5, undesirable_weight=1.5, backend="triton")(
        policy.h32,
        policy.w32,
        labels,
        desirable,
        kl_hidden=kl_hidden,
        kl_labels=kl_labels,
        bias=policy.b32,
        ref_hidden=ref.h32,
        ref_weight=ref.w32,
        ref_bias=ref.b32,
        ref_kl_hidden=ref_kl_hidden,
    )
    p, _ = naive_seq_logps(policy.h64, policy.w64, policy.b64, labels)
    r, _ = naive_seq_logps(ref.h64, ref.w64, ref.b64, labels)
    pkl, _ = naive_seq_logps(kl_hidden, policy.w64, policy.b64, kl_labels)
    rkl, _ = naive_seq_logps(ref_kl_hidden, ref.w64, ref.b64, kl_labels)
    z = torch.clamp((pkl - rkl).mean(), min=0).detach()
    loss64, _ = naive_kto(p, r, desirable, z, beta=0.5, wu=1.5)
    assert_loss_and_grads(out.loss, loss64, policy)


class _TinyFactAlignBatch:
    """The attributes ``naive_factalign`` reads, at interpreter size."""

    def __init__(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        n = 2 * B
        self.policy, self.ref = Head(n, T, D, V, gen), Head(n, T, D, V, gen, grad=False)
        self.labels = make_labels(n, T, V, gen, min_completion=3)
        self.kl_hidden, self.ref_kl_hidden = (
            torch.randn(n, T, D, generator=gen),
            torch.randn(n, T, D, generator=gen),
        )
        self.kl_labels = make_labels(n, T, V, gen, min_completion=3)
        self.desirable = torch.tensor([True, False, True, False])
        self.sentence_ids, self.num_sentences = make_sentences(self.labels, gen, skip=0.0)
        self.sentence_labels = torch.arange(self.num_sentences) % 3 != 1
        self.kl_sentence_ids, _ = make_sentences(self.kl_labels, gen, skip=0.0)


def test_factalign_triton_backend():
    b = _TinyFactAlignBatch(2)
    out = FactAlignLoss(fg_beta=0.3, backend="triton")(
        b.policy.h32,
        b.policy.w32,
        b.labels,
        b.desirable,
        sentence_ids=b.sentence_ids,
        sentence_labels=b.sentence_labels,
        kl_sentence_ids=b.kl_sentence_ids,
        kl_hidden=b.kl_hidden,
        kl_labels=b.kl_labels,
        bias=b.policy.b32,
        ref_hidden=b.ref.h32,
        ref_weight=b.ref.w32,
        ref_bias=b.ref.b32,
        ref_kl_hidden=b.ref_kl_hidden,
    )
    loss64, _ = naive_factalign(b, fg_beta=0.3)
    assert_loss_and_grads(out.loss, loss64, b.policy)
