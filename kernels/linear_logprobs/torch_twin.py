"""The ``"torch"`` backend: the chunked-GEMM algorithm of ``chunked.py`` with its two passes written in PyTorch.

The CPU default, and the second opinion for the Triton passes of ``chunked_triton.py`` (same arguments, same
results). Per row of a chunk's fp32 logits ``l`` (bias ``b``, logit scale ``s``, softcap ``c``, temperature ``T``,
target ``t``)::

    z = c tanh(s (l + b) / c) / T          (without softcap: s (l + b) / T)
    m = max_j z_j,  S = sum_j e^{z_j - m},  lse = m + log S,  logp = z_t - lse
    H = log S - sum_j e^{z_j - m} (z_j - m) / S               (= lse - sum_j p_j z_j, entropy)
    log_sum_sq = log sum_j e^{2 (z_j - m)} - 2 log S        (= log sum_j p_j^2)
    mean_logits = mean_j z_j,  is_top1 = (t == first argmax_j z_j)

and the gradient pass turns the logits into ``dl`` (see ``chunked.py``). A target outside ``[0, V)`` contributes
nothing: ``z_t`` reads as 0, there is no one-hot term and ``is_top1`` is False (a vocab shard whose target lives on
another rank relies on this).

The twin allocates a few ``(rows, V)`` fp32 temporaries per chunk (the Triton passes allocate none); the chunk
size of ``chunked.py`` bounds them, so extra memory stays O(tokens + chunk x V).
"""

from __future__ import annotations

import functools

import torch
from prefuse.kernels.linear_logprobs import chunked
from torch import Tensor


def _in_vocab(targets: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """Targets clamped into ``[0, V)`` (safe to gather / scatter) and the mask of those that were inside."""
    inside = (targets >= 0) & (targets < vocab)
    return targets.clamp(0, vocab - 1)[:, None], inside


def _scaled(
    logits: Tensor, bias: Tensor | None, softcap: float | None, inv_temperature: float, logit_scale: float
):
    """``(z, dz/dl)`` from the raw logits, overwriting them; ``dz/dl`` is a scalar without softcap."""
    x = logits if bias is None else logits.add_(bias)
    x.mul_(logit_scale)
    if softcap is None:
        return x.mul_(inv_temperature), logit_scale * inv_temperature
    t = x.div_(softcap).tanh_()
    return t * (softcap * inv_temperature), (1.0 - t.square()).mul_(logit_scale * inv_temperature)


def forward_pass(
    logits: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    logp: Tensor,
    lse: Tensor,
    stats: Tensor | None,
    *,
    softcap: float | None,
    inv_temperature: float,
    logit_scale: float,
) -> None:
    """Fill ``logp``, ``lse`` (and ``stats``: entropy, log_sum_sq, mean_logits, is_top1) for a chunk's rows."""
    z, _ = _scaled(logits, bias, softcap, inv_temperature, logit_scale)
    m = z.amax(-1, keepdim=True)
    shifted = z - m
    e = shifted.exp()
    total = e.sum(-1)
    log_total = total.log()
    lse.copy_(m.squeeze(-1) + log_total)
    target, inside = _in_vocab(targets, z.shape[-1])
    logp.copy_(torch.where(inside, z.gather(1, target).squeeze(1), 0.0) - lse)
    if stats is not None:
        stats[:, 0] = log_total - (e * shifted).sum(-1) / total
        stats[:, 1] = e.square().sum(-1).log() - 2 * log_total
        stats[:, 2] = z.mean(-1)
        stats[:, 3] = (inside & (z.argmax(-1) == target.squeeze(1))).float()


def grad_pass(
    logits: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    grad_logp: Tensor,
    grad_entropy: Tensor | None,
    *,
    softcap: float | None,
    inv_temperature: float,
    logit_scale: float,
    out_dtype: torch.dtype,
    filter_block: int | None,
) -> tuple[Tensor, Tensor | None]:
    """``dl`` for a chunk (in ``out_dtype``) and, with ``filter_block``, the largest probability of each block of
    ``filter_block`` vocabulary columns over the chunk's rows."""
    z, dz_dl = _scaled(logits, bias, softcap, inv_temperature, logit_scale)
    log_p = z.sub_(lse[:, None])
    p = log_p.exp()
    g = grad_logp[:, None]
    if grad_entropy is None:
        dl = p.mul(-g)
    else:
        dl = log_p.add_(entropy[:, None]).mul_(p).mul_(-grad_entropy[:, None]).sub_(p * g)
    target, inside = _in_vocab(targets, z.shape[-1])
    dl.scatter_add_(1, target, torch.where(inside[:, None], g, 0.0))
    dl.mul_(dz_dl)
    block_max = None
    if filter_block is not None:
        column_max = p.amax(0)
        pad = -column_max.numel() % filter_block
        block_max = torch.nn.functional.pad(column_max, (0, pad)).view(-1, filter_block).amax(1)
    return dl.to(out_dtype), block_max


PASSES = chunked.Passes(forward_pass, grad_pass)
forward = functools.partial(chunked.forward, PASSES)
backward = functools.partial(chunked.backward, PASSES)
