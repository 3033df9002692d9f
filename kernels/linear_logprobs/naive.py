"""Naive linear log-probs: full logits, ``log_softmax`` and gather, as plain PyTorch trainers compute them.

This is the yardstick, not an implementation to use: it materialises the ``(tokens x V)`` logits (and autograd
keeps them for backward). Tests call it in float64 as the reference; benchmarks call it in the input dtype
as the "naive PyTorch" contender.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from prefuse.kernels.linear_logprobs.op import TokenOutputs
from torch import Tensor


def _scaled_logits(hidden, weight, targets, bias, ignore_index, shift, temperature, softcap, logit_scale):
    """``(z, targets, ignored)`` with ``z = softcap(logit_scale * (hidden W^T + b)) / temperature``."""
    if shift:
        hidden, targets = hidden[..., :-1, :], targets[..., 1:]
    logits = F.linear(hidden, weight, bias) * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature, targets, targets == ignore_index


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
    logit_scale: float = 1.0,
) -> Tensor:
    """``log_softmax(softcap(logit_scale * (hidden W^T + b)) / temperature)[target]``, 0.0 where
    ``target == ignore_index``.

    Computed in the dtype of ``hidden`` (cast to float64 first for a reference); returns that dtype.
    """
    z, targets, ignored = _scaled_logits(hidden, weight, targets, bias, ignore_index, shift, temperature, softcap,
                                         logit_scale)  # fmt: skip
    logp = F.log_softmax(z, dim=-1)
    picked = logp.gather(-1, targets.masked_fill(ignored, 0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(ignored, 0.0)


def naive_token_outputs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
) -> TokenOutputs:
    """Every field of ``TokenOutputs`` from the full logits, in the dtype of ``hidden`` (is_top1: bool).

    ``entropy = -sum_j p_j log p_j`` (differentiable), ``log_sum_sq_probs = log sum_j p_j^2``,
    ``mean_logits = mean_j z_j``, ``is_top1 = (target == first argmax_j z_j)``; 0 / False where ignored.
    """
    z, targets, ignored = _scaled_logits(hidden, weight, targets, bias, ignore_index, shift, temperature, softcap,
                                         logit_scale)  # fmt: skip
    logp_all = F.log_softmax(z, dim=-1)
    safe = targets.masked_fill(ignored, 0)
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1).masked_fill(ignored, 0.0)
    p = logp_all.exp()
    entropy = -(p * logp_all).sum(-1)
    log_sum_sq = torch.logsumexp(2 * logp_all, dim=-1)
    return TokenOutputs(
        logp=logp,
        entropy=entropy.masked_fill(ignored, 0.0),
        log_sum_sq_probs=log_sum_sq.detach().masked_fill(ignored, 0.0),
        mean_logits=z.mean(-1).detach().masked_fill(ignored, 0.0),
        is_top1=(z.argmax(-1) == safe) & ~ignored,
    )
