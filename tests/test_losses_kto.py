"""KTOLoss against a naive float64 reference and Liger-Kernel's chunked KTO; the all-reduced reference point."""

from __future__ import annotations

import pytest
import torch
from prefuse.alignment import KTOLoss
from prefuse.alignment import functional as PF
from reference import (
    KTO_METRICS,
    Head,
    assert_loss_and_grads,
    assert_metrics,
    make_labels,
    naive_kto,
    naive_seq_logps,
)

N, T, D, V = 6, 10, 16, 40
T_KL = 8


class Batch:
    def __init__(self, seed: int, desirable=None):
        gen = torch.Generator().manual_seed(seed)
        self.policy = Head(N, T, D, V, gen)
        self.ref = Head(N, T, D, V, gen, grad=False)
        self.labels = make_labels(N, T, V, gen)
        self.kl_hidden = torch.randn(N, T_KL, D, generator=gen)
        self.ref_kl_hidden = torch.randn(N, T_KL, D, generator=gen)
        self.kl_labels = make_labels(N, T_KL, V, gen)
        self.desirable = (
            torch.tensor([True, False, True, True, False, True])
            if desirable is None
            else torch.as_tensor(desirable)
        )

    def module_kwargs(self):
        return {
            "kl_hidden": self.kl_hidden,
            "kl_labels": self.kl_labels,
            "bias": self.policy.b32,
            "ref_hidden": self.ref.h32,
            "ref_weight": self.ref.w32,
            "ref_bias": self.ref.b32,
            "ref_kl_hidden": self.ref_kl_hidden,
        }

    def naive_logps(self):
        p, _ = naive_seq_logps(self.policy.h64, self.policy.w64, self.policy.b64, self.labels)
        r, _ = naive_seq_logps(self.ref.h64, self.ref.w64, self.ref.b64, self.labels)
        pkl, _ = naive_seq_logps(self.kl_hidden, self.policy.w64, self.policy.b64, self.kl_labels)
        rkl, _ = naive_seq_logps(self.ref_kl_hidden, self.ref.w64, self.ref.b64, self.kl_labels)
        return p, r, pkl.detach(), rkl


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.5)])
def test_kto_matches_naive_float64(weights):
    b = Batch(0)
    module = KTOLoss(beta=0.3, desirable_weight=weights[0], undesirable_weight=weights[1], backend="torch")
    out = module(b.policy.h32, b.policy.w32, b.labels, b.desirable, **b.module_kwargs())
    p, r, pkl, rkl = b.naive_logps()
    z = torch.clamp((pkl - rkl).mean(), min=0).detach()
    loss64, metrics = naive_kto(p, r, b.desirable, z, beta=0.3, wd=weights[0], wu=weights[1])
    assert_loss_and_grads(out.loss, loss64, b.policy)
    assert_metrics(out.metrics, metrics)


@pytest.mark.parametrize("shift_kl, expected_z", [(0.7, 0.7), (-0.5, 0.0)])
def test_kto_reference_point_mean_and_clamp(shift_kl, expected_z):
    """z = max(0, mean over KL rows of Δ): ref_kl_logps (sums) set so that mean Δ_KL = shift_kl."""
    b = Batch(1)
    p, r, pkl, _ = b.naive_logps()
    ref_kl = (pkl - shift_kl).float()
    out = KTOLoss(backend="torch")(
        b.policy.h32,
        b.policy.w32,
        b.labels,
        b.desirable,
        kl_hidden=b.kl_hidden,
        kl_labels=b.kl_labels,
        bias=b.policy.b32,
        ref_logps=r.float(),
        ref_kl_logps=ref_kl,
    )
    torch.testing.assert_close(
        out.metrics["kl"].double(), torch.tensor(expected_z, dtype=torch.float64), rtol=1e-5, atol=1e-5
    )
    loss64, _ = naive_kto(p, r, b.desirable, torch.tensor(expected_z, dtype=torch.float64), beta=0.1)
    assert_loss_and_grads(out.loss, loss64, b.policy)


def test_kto_given_kl_and_reference_forms():
    b = Batch(2)
    p, r, _, _ = b.naive_logps()
    module = KTOLoss(backend="torch")
    out = module(
        b.policy.h32,
        b.policy.w32,
        b.labels,
        b.desirable,
        kl=0.25,
        bias=b.policy.b32,
        ref_hidden=b.ref.h32,
        ref_weight=b.ref.w32,
        ref_bias=b.ref.b32,
    )
    loss64, _ = naive_kto(p, r, b.desirable, torch.tensor(0.25, dtype=torch.float64), beta=0.1)
    assert_loss_and_grads(out.loss, loss64, b.policy)
    assert float(out.metrics["kl"]) == 0.25
    from reference import naive_token_logps

    rtok, _ = naive_token_logps(b.ref.h64, b.ref.w64, b.ref.b64, b.labels)
    per_token = module(
        b.policy.h32, b.policy.w32, b.labels, b.desirable, kl=0.25, bias=b.policy.b32, ref_logps=rtok.float()
    )
    torch.testing.assert_close(per_token.loss, out.loss, rtol=1e-5, atol=1e-6)


def test_kto_kl_rows_cost_no_backward():
    """The KL rows are scored without grad (z is detached): kl_hidden gets no gradient."""
    b = Batch(3)
    kl_hidden = b.kl_hidden.clone().requires_grad_(True)
    out = KTOLoss(backend="torch")(
        b.policy.h32,
        b.policy.w32,
        b.labels,
        b.desirable,
        kl_hidden=kl_hidden,
        kl_labels=b.kl_labels,
        ref_logps=torch.zeros(N),
        ref_kl_logps=torch.zeros(N),
    )
    assert not out.metrics["kl"].requires_grad
    out.loss.backward()
    assert kl_hidden.grad is None


@pytest.mark.parametrize("desirable", [[True] * N, [False] * N])
def test_kto_single_class_batches_are_finite(desirable):
    b = Batch(4, desirable=desirable)
    p, r, pkl, rkl = b.naive_logps()
    out = KTOLoss(backend="torch")(b.policy.h32, b.policy.w32, b.labels, b.desirable, **b.module_kwargs())
    z = torch.clamp((pkl - rkl).mean(), min=0).detach()
    loss64, metrics = naive_kto(p, r, b.desirable, z, beta=0.1)
    assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.metrics.values())
    assert_loss_and_grads(out.loss, loss64, b.policy)
    assert_metrics(out.metrics, metrics)


def test_kto_metric_names():
    b = Batch(5)
    out = KTOLoss(backend="torch")(b.policy.h32, b.policy.w32, b.labels, b.desirable, **b.module_kwargs())
    assert set(out.metrics) == KTO_METRICS


def test_kto_matches_liger_chunk_size_1():
    """Liger's chunked KTO (``chunk_size=1``: it is wrong for larger chunks) given our reference point as
    ``kl``. Liger has no class weights (λD = λU = 1 here) and does not shift (it gets ``hidden[:, :-1]`` and
    ``labels[:, 1:]``); ``average_log_prob=False`` sums log-probs as we do."""
    from liger_kernel.chunked_loss import LigerFusedLinearKTOLoss

    b = Batch(6)
    out = KTOLoss(beta=0.2, backend="torch")(
        b.policy.h32, b.policy.w32, b.labels, b.desirable, **b.module_kwargs()
    )
    h = b.policy.h32.detach()[:, :-1].contiguous().requires_grad_(True)
    w = b.policy.w32.detach().clone().requires_grad_(True)
    bias = b.policy.b32.detach().clone().requires_grad_(True)
    liger = LigerFusedLinearKTOLoss(
        beta=0.2, compiled=False, use_ref_model=True, average_log_prob=False, chunk_size=1
    )
    liger_loss, aux = liger(
        h,
        w,
        b.labels[:, 1:].contiguous(),
        bias,
        b.desirable,
        b.ref.h32[:, :-1].contiguous(),
        b.ref.w32,
        b.ref.b32,
        out.metrics["kl"],
    )
    torch.testing.assert_close(out.loss, liger_loss, rtol=1e-5, atol=1e-6)
    theirs = torch.autograd.grad(liger_loss, [h, w, bias])
    gh, gw, gb = torch.autograd.grad(out.loss, b.policy.leaves32())
    assert (gh[:, -1] == 0).all()
    for ours, ref in ((gh[:, :-1], theirs[0]), (gw, theirs[1]), (gb, theirs[2])):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()) + 1e-7)
    # aux: chosen / rejected log-prob sums, logits sums, then chosen / rejected reward sums.
    torch.testing.assert_close(out.metrics["logps/chosen_sum"], aux[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.metrics["rewards/chosen_sum"], aux[4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.metrics["rewards/rejected_sum"], aux[5], rtol=1e-5, atol=1e-5)


def test_functional_kto_on_sums():
    gen = torch.Generator().manual_seed(7)
    p, r = torch.randn(5, generator=gen) * 10, torch.randn(5, generator=gen) * 10
    pkl, rkl = torch.randn(9, generator=gen), torch.randn(9, generator=gen)
    desirable = torch.tensor([True, True, False, True, False])
    out = PF.kto_loss(p, r, desirable, policy_kl_logps=pkl, ref_kl_logps=rkl, beta=0.2)
    z = torch.clamp((pkl - rkl).double().mean(), min=0)
    loss64, metrics = naive_kto(p.double(), r.double(), desirable, z, beta=0.2)
    torch.testing.assert_close(out.loss.double(), loss64, rtol=1e-5, atol=1e-6)
    assert_metrics(out.metrics, metrics)


# ----------------------------------------------------------------------------------------- distributed
KL_DELTAS = [[3.0], [0.5, 0.5, 1.0, 0.0]]


def _worker(rank: int, world: int) -> tuple[float, float]:
    d = torch.tensor(KL_DELTAS[rank], dtype=torch.float32)
    z = PF.kl_reference_point(d, torch.zeros_like(d))
    out = PF.kto_loss(
        torch.zeros(2),
        torch.zeros(2),
        torch.tensor([True, False]),
        policy_kl_logps=d,
        ref_kl_logps=torch.zeros_like(d),
    )
    return float(z), float(out.metrics["kl"])


@pytest.mark.slow  # spawns gloo ranks
def test_kl_reference_point_is_count_weighted_over_ranks():
    """Two gloo ranks with 1 and 4 KL rows: z is the mean over all 5 rows, not the mean of rank means.
    (The launcher, with its timeouts, and the full 2-rank loss tests are in test_distributed.py.)"""
    from ranks import run_ranks

    expected = (3.0 + 2.0) / 5  # count-weighted; the mean of rank means would be (3.0 + 0.5) / 2
    for z, kl in run_ranks(_worker):
        assert abs(z - expected) < 1e-6 and abs(kl - expected) < 1e-6


# ----------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("desirable", [True, False])
def test_kto_keeps_the_tail_of_a_saturated_sigmoid(desirable):
    """A row far on its good side costs σ(-x), not the float32 ``1 - σ(x)`` (0.6 % off at x = 12.7, exactly 0
    past x ≈ 16.6); a row far on its bad side keeps its gradient σ(x)σ(-x) (``torch.sigmoid``'s is exactly 0
    below x ≈ -16.6): value and gradient match float64 at x from -40 to 60."""
    x = torch.tensor(
        [-40.0, -20.0, -16.0, 5.0, 12.7, 16.0, 20.0, 40.0, 60.0]
    )  # β(Δ - z) if desirable, else β(z - Δ)
    beta, n = 0.5, 9
    delta = (x if desirable else -x) / beta
    policy = delta.clone().requires_grad_(True)
    labels = torch.full((n,), desirable)
    out = PF.kto_loss(policy, torch.zeros(n), labels, kl=0.0, beta=beta)
    (grad,) = torch.autograd.grad(out.loss, policy)
    expected = torch.sigmoid(-x.double()) / n  # per row: λ σ(-x), mean over the rows
    torch.testing.assert_close(out.loss.double(), expected.sum(), rtol=1e-5, atol=0)
    sign = -1.0 if desirable else 1.0  # d/dΔ of σ(β(z - Δ)) and of σ(β(Δ - z))
    torch.testing.assert_close(
        grad.double(), sign * beta * expected * torch.sigmoid(x.double()), rtol=1e-5, atol=0
    )
    assert (grad != 0).all()


@pytest.mark.parametrize(
    "kl", [float("nan"), float("inf"), torch.tensor(float("nan")), torch.tensor([0.1, 0.2])]
)
def test_kto_bad_given_kl_is_a_value_error(kl):
    b = Batch(6)
    with pytest.raises(ValueError, match="kl"):
        KTOLoss(backend="torch")(
            b.policy.h32,
            b.policy.w32,
            b.labels,
            b.desirable,
            kl=kl,
            bias=b.policy.b32,
            ref_hidden=b.ref.h32,
            ref_weight=b.ref.w32,
            ref_bias=b.ref.b32,
        )
    with pytest.raises(ValueError, match="kl"):
        PF.kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([True, False]), kl=kl)
