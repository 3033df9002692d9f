"""Self-checks of the float64 references in ``tests/reference.py`` that every other test compares against."""

from __future__ import annotations

import pytest
import torch
from reference import IGNORE, Head, logsig, make_labels, naive_token_logps


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
