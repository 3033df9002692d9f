"""Naive float64 references for the loss tests (full logits, ``log_softmax``, autograd), and their self-checks.

Every other ``test_losses_*.py`` imports these helpers. The references here are written from the papers /
TRL formulas independently of ``prefuse.alignment.functional``: full ``(rows, T, V)`` logits in float64, plain
Python loops where that is clearer.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

IGNORE = -100


# ---------------------------------------------------------------------------------------------- inputs
def make_labels(
    rows: int,
    T: int,
    V: int,
    gen: torch.Generator,
    *,
    min_prompt: int = 1,
    min_completion: int = 1,
    pad: bool = True,
) -> torch.Tensor:
    """Random HF-style labels: ``-100`` on a random-length prompt and on right padding."""
    labels = torch.randint(0, V, (rows, T), generator=gen)
    for r in range(rows):
        prompt = int(torch.randint(min_prompt, max(min_prompt + 1, T - min_completion), (1,), generator=gen))
        end = (
            T
            if not pad
            else int(torch.randint(min(T, prompt + 1 + min_completion), T + 1, (1,), generator=gen))
        )
        labels[r, :prompt] = IGNORE
        labels[r, end:] = IGNORE
    return labels


class Head:
    """Policy (or reference) inputs as float32 leaves for prefuse and float64 leaves for the reference."""

    def __init__(
        self,
        rows: int,
        T: int,
        D: int,
        V: int,
        gen: torch.Generator,
        *,
        bias: bool = True,
        scale: float = 1.0,
        grad: bool = True,
    ):
        h = torch.randn(rows, T, D, generator=gen) * scale
        w = torch.randn(V, D, generator=gen) / math.sqrt(D) * 2.0
        b = torch.randn(V, generator=gen) * 0.5 if bias else None
        self.h32 = h.clone().requires_grad_(grad)
        self.w32 = w.clone().requires_grad_(grad)
        self.b32 = b.clone().requires_grad_(grad) if bias else None
        self.h64 = h.double().requires_grad_(grad)
        self.w64 = w.double().requires_grad_(grad)
        self.b64 = b.double().requires_grad_(grad) if bias else None

    def leaves32(self):
        return [t for t in (self.h32, self.w32, self.b32) if t is not None]

    def leaves64(self):
        return [t for t in (self.h64, self.w64, self.b64) if t is not None]


def naive_token_logps(hidden, weight, bias, labels, *, shift: bool = True):
    """Per-token ``log p(label)`` in float64 from full logits; returns ``(logps (rows, L), mask (rows, L))``."""
    hidden, weight = hidden.double(), weight.double()
    if shift:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias.double()
    logp = F.log_softmax(logits, dim=-1)
    mask = labels != IGNORE
    tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, tok, torch.zeros((), dtype=tok.dtype)), mask


def naive_seq_logps(hidden, weight, bias, labels, *, shift: bool = True):
    """``(sums (rows,), lengths (rows,))`` in float64."""
    tok, mask = naive_token_logps(hidden, weight, bias, labels, shift=shift)
    return tok.sum(-1), mask.sum(-1).double()


def assert_loss_and_grads(loss32, loss64, head: Head, *, rtol: float = 2e-4, atol: float = 2e-5):
    """``loss32`` (prefuse, float32) and its gradients match the float64 reference."""
    torch.testing.assert_close(loss32.double(), loss64.detach(), rtol=rtol, atol=atol)
    grads32 = torch.autograd.grad(loss32, head.leaves32(), allow_unused=True)
    grads64 = torch.autograd.grad(loss64, head.leaves64(), allow_unused=True)
    for name, g32, g64 in zip(("hidden", "weight", "bias"), grads32, grads64):
        g32 = torch.zeros_like(g64) if g32 is None else g32.double()
        g64 = torch.zeros_like(g32) if g64 is None else g64
        scale = g64.abs().max().clamp(min=1e-6)
        torch.testing.assert_close(
            g32 / scale, g64 / scale, rtol=rtol, atol=atol, msg=lambda m, name=name: f"grad {name}: {m}"
        )


def assert_metrics(metrics: dict, expected: dict, *, rtol: float = 2e-4, atol: float = 2e-5):
    """Names are exactly ``expected``'s keys; each value matches and is detached, 0-d."""
    assert set(metrics) == set(expected), (sorted(metrics), sorted(expected))
    for key, value in expected.items():
        got = metrics[key]
        assert isinstance(got, torch.Tensor) and got.dim() == 0 and not got.requires_grad, key
        torch.testing.assert_close(
            got.double(),
            torch.as_tensor(value, dtype=torch.float64),
            rtol=rtol,
            atol=atol,
            msg=lambda m, key=key: f"metric {key}: {m}",
        )


PAIR_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def naive_pair_metrics(chosen_logps, rejected_logps, chosen_rewards, rejected_rewards) -> dict:
    cr, rr = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/accuracies": (cr > rr).double().mean(),
        "rewards/margins": (cr - rr).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def logsig(x):
    """``log σ(x) = -log(1 + e^{-x})``, written out (stable on both sides; each branch's ``exp`` argument is
    clamped to <= 0, so the unused branch cannot overflow and poison the gradient with inf * 0)."""
    return -torch.where(
        x >= 0, torch.log1p(torch.exp(-x.clamp(min=0))), -x + torch.log1p(torch.exp(x.clamp(max=0)))
    )


# ---------------------------------------------------------------------------------------------- self-checks
def test_naive_token_logps_by_hand():
    """The reference itself: one position by explicit softmax, ignored positions are 0, shift aligns."""
    gen = torch.Generator().manual_seed(0)
    head = Head(2, 5, 4, 7, gen)
    labels = torch.tensor([[IGNORE, 3, 1, IGNORE, 6], [IGNORE, IGNORE, 0, 2, 5]])
    tok, mask = naive_token_logps(head.h64, head.w64, head.b64, labels)
    assert tok.shape == (2, 4) and mask.tolist() == [[True, True, False, True], [False, True, True, True]]
    logits = head.h64[0, 1] @ head.w64.T + head.b64  # hidden[0, 1] predicts labels[0, 2] = 1
    expected = logits[1] - torch.logsumexp(logits, 0)
    torch.testing.assert_close(tok[0, 1], expected)
    assert tok[0, 2] == 0 and tok[1, 0] == 0


def test_make_labels_has_prompt_and_completion():
    gen = torch.Generator().manual_seed(1)
    labels = make_labels(64, 12, 9, gen)
    assert (labels[:, 0] == IGNORE).all()
    assert ((labels[:, 1:] != IGNORE).sum(-1) >= 1).all()


def test_prefuse_op_matches_naive_reference():
    """The torch backend of ``linear_logprobs`` agrees with the float64 reference these tests use."""
    from prefuse.kernels import linear_logprobs

    gen = torch.Generator().manual_seed(2)
    head = Head(3, 9, 8, 17, gen)
    labels = make_labels(3, 9, 17, gen)
    ours = linear_logprobs(head.h32, head.w32, labels, head.b32, shift=True, backend="torch")
    ref, _ = naive_token_logps(head.h64, head.w64, head.b64, labels)
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x", [-30.0, -1.0, 0.0, 2.0, 30.0])
def test_logsig_matches_definition(x):
    x = torch.tensor(x, dtype=torch.float64)
    torch.testing.assert_close(logsig(x), torch.log(1 / (1 + torch.exp(-x))))
