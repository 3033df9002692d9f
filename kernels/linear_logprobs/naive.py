"""Naive linear log-probs: full logits, ``log_softmax`` and gather, as plain PyTorch trainers compute them.

This is the yardstick, not an implementation to use: it materialises the ``(tokens x V)`` logits (and autograd
keeps them for backward). Tests call it in float64 as the reference; benchmarks call it in the input dtype
as the "naive PyTorch" contender.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def naive_linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    temperature: float = 1.0,
    softcap: float | None = None,
) -> Tensor:
    """``log_softmax(softcap(hidden W^T + b) / temperature)[target]``, 0.0 where ``target == ignore_index``.

    Computed in the dtype of ``hidden`` (cast to float64 first for a reference); returns that dtype.
    """
    if shift:
        hidden, targets = hidden[..., :-1, :], targets[..., 1:]
    logits = F.linear(hidden, weight, bias)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = F.log_softmax(logits / temperature, dim=-1)
    ignored = targets == ignore_index
    picked = logp.gather(-1, targets.masked_fill(ignored, 0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(ignored, 0.0)
