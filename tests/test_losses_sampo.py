"""SamPO: the down-sampling's statistics and reproducibility, and SamPOLoss against a naive float64 reference."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prefuse.alignment import SamPOLoss
from prefuse.alignment import functional as PF
from reference import (
    IGNORE,
    PAIR_METRICS,
    Head,
    assert_loss_and_grads,
    assert_metrics,
    head_token_logps,
    make_labels,
    naive_sampo,
    naive_token_logps,
)

B, T, D, V = 4, 14, 16, 40


# ----------------------------------------------------------------------------------------- the sampler
def _masks(counts_c, counts_r, L, offset=2):
    """Completion masks with the given token counts, starting after an ``offset``-token prompt."""

    def build(counts):
        m = torch.zeros(len(counts), L, dtype=torch.bool)
        for i, n in enumerate(counts):
            m[i, offset : offset + n] = True
        return m

    return build(counts_c), build(counts_r)


def test_sample_counts_and_subsets():
    """Both sides keep min(Tc, Tr) tokens; the shorter keeps all; kept ⊆ completion (no prompt token)."""
    counts_c, counts_r = [3, 9, 5, 0, 7], [8, 2, 5, 4, 0]
    mc, mr = _masks(counts_c, counts_r, 12)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        kc, kr = PF.sampo_sample_masks(mc, mr, generator=gen)
        k = torch.minimum(mc.sum(-1), mr.sum(-1))
        assert kc.sum(-1).tolist() == k.tolist() and kr.sum(-1).tolist() == k.tolist()
        assert not (kc & ~mc).any() and not (kr & ~mr).any()
        shorter_c = mc.sum(-1) <= mr.sum(-1)
        assert (kc[shorter_c] == mc[shorter_c]).all() and (kr[~shorter_c] == mr[~shorter_c]).all()


def test_sample_is_uniform_over_subsets():
    """Every k-subset of the longer side is equally likely (chi-square over all C(5, 2) = 10 subsets).

    20,000 independent rows in one vectorised draw; with df = 9 the statistic exceeds 33 with probability
    < 1e-4, and the seed is fixed, so the test is deterministic.
    """
    rows = 20_000
    mc = torch.zeros(rows, 9, dtype=torch.bool)
    mc[:, 3:8] = True  # 5 chosen tokens at positions 3..7 (positions 0..2: prompt, 8: padding)
    mr = torch.zeros(rows, 6, dtype=torch.bool)
    mr[:, 1:3] = True  # 2 rejected tokens
    kc, kr = PF.sampo_sample_masks(mc, mr, generator=torch.Generator().manual_seed(1))
    assert (kr == mr).all()
    subsets = Counter(tuple(torch.nonzero(row).flatten().tolist()) for row in kc)
    expected_subsets = set(itertools.combinations(range(3, 8), 2))
    assert set(subsets) == expected_subsets
    expected = rows / len(expected_subsets)
    chi2 = sum((subsets[s] - expected) ** 2 / expected for s in expected_subsets)
    assert chi2 < 33.0, chi2
    # Marginals: each position kept with probability k/n = 0.4.
    freq = kc[:, 3:8].float().mean(0)
    assert (freq - 0.4).abs().max() < 0.02


def test_sample_uniform_over_many_seeds():
    """Across seeds (one draw each), each completion position of a 10-token side sampled to 3 is kept
    with frequency 3/10; no prompt or padding position is ever drawn."""
    mc, mr = _masks([10], [3], 16, offset=4)
    hits = torch.zeros(16)
    n_seeds = 3000
    for seed in range(n_seeds):
        kc, _ = PF.sampo_sample_masks(mc, mr, generator=torch.Generator().manual_seed(seed))
        hits += kc[0].float()
    assert hits[:4].sum() == 0 and hits[14:].sum() == 0
    expected = n_seeds * 0.3
    chi2 = float(((hits[4:14] - expected) ** 2 / expected).sum())
    assert chi2 < 33.0, chi2  # df = 9


def test_sample_reproducible_and_fresh_each_call():
    mc, mr = _masks([12, 4], [4, 11], 16)
    a = PF.sampo_sample_masks(mc, mr, generator=torch.Generator().manual_seed(7))
    b = PF.sampo_sample_masks(mc, mr, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    gen = torch.Generator().manual_seed(7)
    draws = [PF.sampo_sample_masks(mc, mr, generator=gen) for _ in range(5)]
    assert len({tuple(d[0].flatten().tolist() + d[1].flatten().tolist()) for d in draws}) == 5


def test_sample_depends_on_the_rows_tokens_not_their_layout():
    """The same rows padded to another width, behind a longer prompt: the same tokens kept (by their index in
    the row) and the stream advanced alike, so the next draw agrees too (packed and padded batches, any
    ``pad_to_multiple_of``, draw one sample)."""
    counts_c, counts_r = [9, 4, 6], [3, 11, 6]
    tight = _masks(counts_c, counts_r, 13)
    wide = _masks(counts_c, counts_r, 40, offset=17)
    gen_tight, gen_wide = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(3):
        a = PF.sampo_sample_masks(*tight, generator=gen_tight)
        b = PF.sampo_sample_masks(*wide, generator=gen_wide)
        for kept_a, mask_a, kept_b, mask_b in zip(a, tight, b, wide):
            for row in range(len(counts_c)):
                assert torch.equal(kept_a[row][mask_a[row]], kept_b[row][mask_b[row]])
        assert not torch.equal(a[0][0][tight[0][0]], torch.ones(9, dtype=torch.bool))  # a real down-sample


# ----------------------------------------------------------------------------------------- the module
def batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    policy = Head(2 * B, T, D, V, gen)
    ref = Head(2 * B, T, D, V, gen, grad=False)
    labels = make_labels(2 * B, T, V, gen, min_completion=1)
    return policy, ref, labels


def _completion_masks(labels):
    mask = labels[:, 1:] != IGNORE
    return mask[:B], mask[B:]


def test_sampo_matches_naive_float64():
    policy, ref, labels = batch(0)
    module = SamPOLoss(beta=0.2, seed=123, backend="torch")
    out = module(
        policy.h32,
        policy.w32,
        labels,
        bias=policy.b32,
        ref_hidden=ref.h32,
        ref_weight=ref.w32,
        ref_bias=ref.b32,
    )
    # The module's first draw: a CPU generator seeded with 123, chosen keys first.
    kept_c, kept_r = PF.sampo_sample_masks(
        *_completion_masks(labels), generator=torch.Generator().manual_seed(123)
    )
    assert (kept_c.sum() + kept_r.sum()) < (labels[:, 1:] != IGNORE).sum()  # this batch down-samples
    loss64, metrics = naive_sampo(
        head_token_logps(policy, labels), head_token_logps(ref, labels), kept_c, kept_r, beta=0.2
    )
    assert_loss_and_grads(out.loss, loss64, policy)
    assert_metrics(out.metrics, metrics)  # no nll_loss: unsampled chosen tokens were never computed
    assert set(out.metrics) == set(PAIR_METRICS)


class _Spy(SamPOLoss):
    """Records the targets handed to ``linear_logprobs`` on the op path, policy (with grad) first, then the
    reference (without)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, path="op", **kwargs)
        self._calls = []

    def _logps(self, hidden, weight, targets, bias, shift):
        self._calls.append((torch.is_grad_enabled(), targets.clone()))
        return super()._logps(hidden, weight, targets, bias, shift)

    @property
    def calls(self):
        return sorted(self._calls, key=lambda call: not call[0])


def test_sampo_policy_and_reference_share_positions_and_skip_unsampled():
    policy, ref, labels = batch(1)
    spy = _Spy(seed=5, backend="torch")
    spy(
        policy.h32,
        policy.w32,
        labels,
        bias=policy.b32,
        ref_hidden=ref.h32,
        ref_weight=ref.w32,
        ref_bias=ref.b32,
    )
    (grad_p, tp), (grad_r, tr) = spy.calls
    assert grad_p and not grad_r
    assert torch.equal(tp, tr)  # same kept positions for policy and reference
    kept = tp[:, 1:] != IGNORE
    mc, mr = _completion_masks(labels)
    k = torch.minimum(mc.sum(-1), mr.sum(-1))
    assert kept[:B].sum(-1).tolist() == k.tolist() and kept[B:].sum(-1).tolist() == k.tolist()
    assert not (kept & ~torch.cat([mc, mr])).any()  # no prompt / padding position
    assert torch.equal(tp[tp != IGNORE], labels[tp != IGNORE])  # kept tokens keep their label
    assert (labels[:, 1:] != IGNORE).sum() > kept.sum()  # this batch really down-samples


def test_sampo_nll_weight_scores_full_chosen():
    policy, ref, labels = batch(2)
    spy = _Spy(seed=9, nll_weight=0.3, backend="torch")
    out = spy(
        policy.h32,
        policy.w32,
        labels,
        bias=policy.b32,
        ref_hidden=ref.h32,
        ref_weight=ref.w32,
        ref_bias=ref.b32,
    )
    (_, tp), (_, tr) = spy.calls
    assert torch.equal(tp[:B], labels[:B])  # chosen rows in full for the NLL
    assert torch.equal(tp[B:], tr[B:])
    kept_c, kept_r = PF.sampo_sample_masks(
        *_completion_masks(labels), generator=torch.Generator().manual_seed(9)
    )
    loss64, _ = naive_sampo(
        head_token_logps(policy, labels), head_token_logps(ref, labels), kept_c, kept_r, beta=0.1
    )
    tok, mask = naive_token_logps(policy.h64, policy.w64, policy.b64, labels)
    nll = -tok[:B].sum() / mask[:B].sum()
    assert_loss_and_grads(out.loss, loss64 + 0.3 * nll, policy)
    torch.testing.assert_close(out.metrics["nll_loss"].double(), nll.detach(), rtol=1e-5, atol=1e-6)


def test_sampo_reproducible_with_seed_and_different_each_call():
    policy, ref, labels = batch(3)
    kwargs = {"bias": policy.b32, "ref_hidden": ref.h32, "ref_weight": ref.w32, "ref_bias": ref.b32}
    a, b = SamPOLoss(seed=11, backend="torch"), SamPOLoss(seed=11, backend="torch")
    la = [a(policy.h32, policy.w32, labels, **kwargs).loss.item() for _ in range(4)]
    lb = [b(policy.h32, policy.w32, labels, **kwargs).loss.item() for _ in range(4)]
    assert la == lb
    assert len(set(la)) == 4
    # A torch.Generator as seed, and the global RNG with seed=None.
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert SamPOLoss(seed=g1, backend="torch")(policy.h32, policy.w32, labels, **kwargs).loss.item() == (
        SamPOLoss(seed=g2, backend="torch")(policy.h32, policy.w32, labels, **kwargs).loss.item()
    )
    torch.manual_seed(0)
    x = SamPOLoss(backend="torch")(policy.h32, policy.w32, labels, **kwargs).loss.item()
    torch.manual_seed(0)
    assert SamPOLoss(backend="torch")(policy.h32, policy.w32, labels, **kwargs).loss.item() == x


def test_sampo_per_token_ref_logps_equal_ref_hidden():
    policy, ref, labels = batch(4)
    with torch.no_grad():
        rtok, _ = naive_token_logps(ref.h64, ref.w64, ref.b64, labels)
    a = SamPOLoss(seed=3, backend="torch")(
        policy.h32,
        policy.w32,
        labels,
        bias=policy.b32,
        ref_hidden=ref.h32,
        ref_weight=ref.w32,
        ref_bias=ref.b32,
    )
    b = SamPOLoss(seed=3, backend="torch")(
        policy.h32, policy.w32, labels, bias=policy.b32, ref_logps=rtok.float()
    )
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="per-token ref_logps"):
        SamPOLoss(backend="torch")(policy.h32, policy.w32, labels, ref_logps=rtok.sum(-1).float())


def test_sampo_independent_reference_sample_flag():
    """Compatibility flag: the reference draws its own positions (the authors' code)."""
    policy, ref, labels = batch(5)
    spy = _Spy(seed=1, independent_ref_sample=True, backend="torch")
    spy(
        policy.h32,
        policy.w32,
        labels,
        bias=policy.b32,
        ref_hidden=ref.h32,
        ref_weight=ref.w32,
        ref_bias=ref.b32,
    )
    (_, tp), (_, tr) = spy.calls
    assert ((tp != IGNORE).sum(-1) == (tr != IGNORE).sum(-1)).all()
    assert not torch.equal(tp, tr)


def test_functional_sampo_equals_dpo_on_equal_lengths():
    """With equal completion lengths nothing is dropped: SamPO is DPO (sigmoid)."""
    gen = torch.Generator().manual_seed(6)
    mask = torch.ones(3, 5, dtype=torch.bool)
    p, r = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    out = PF.sampo_loss(p[:3], p[3:], r[:3], r[3:], mask, mask, beta=0.3)
    ref = PF.dpo_loss(p[:3].sum(-1), p[3:].sum(-1), r[:3].sum(-1), r[3:].sum(-1), beta=0.3)
    torch.testing.assert_close(out.loss, ref.loss)


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(
        st.tuples(st.integers(0, 12), st.integers(0, 12), st.integers(0, 3)), min_size=1, max_size=6
    ),
    seed=st.integers(0, 2**31 - 1),
)
def test_sample_invariants_property(counts, seed):
    """For any completion lengths and prompt offsets: kept ⊆ completion, |kept| = min(n_c, n_r) on both
    sides, the shorter side is kept whole."""
    L = 16
    mc = torch.zeros(len(counts), L, dtype=torch.bool)
    mr = torch.zeros(len(counts), L, dtype=torch.bool)
    for i, (nc, nr, off) in enumerate(counts):
        mc[i, off : off + nc] = True
        mr[i, L - nr :] = True
    kc, kr = PF.sampo_sample_masks(mc, mr, generator=torch.Generator().manual_seed(seed))
    k = torch.minimum(mc.sum(-1), mr.sum(-1))
    assert torch.equal(kc.sum(-1), k) and torch.equal(kr.sum(-1), k)
    assert not (kc & ~mc).any() and not (kr & ~mr).any()
    assert torch.equal(kc[mc.sum(-1) == k], mc[mc.sum(-1) == k])
    assert torch.equal(kr[mr.sum(-1) == k], mr[mr.sum(-1) == k])
