"""PyTorch twin of the fused linear log-prob kernels: the CPU implementation and the kernels' second opinion.

Same interface and semantics as ``triton_fwd.forward`` / ``triton_bwd.backward``. Rows are processed in
chunks whose fp32 logits block stays within ``CHUNK_BUDGET_BYTES``; the forward keeps only the per-row
log-sum-exp and the backward recomputes each chunk's logits, so extra memory is O(tokens + chunk x V),
never O(tokens x V).

Math, per row ``i`` with hidden ``h_i``, target ``t_i`` and upstream gradient ``g_i``::

    l = h_i W^T + b                      raw logits over the vocabulary
    s = c tanh(l / c)                    softcap (when given), before temperature
    z = s / temperature                  scaled logits
    logp_i = z[t_i] - logsumexp(z)
    dz = g_i (onehot(t_i) - softmax(z))
    dl = dz / temperature * (1 - tanh(l / c)^2)            (the last factor only with softcap)
    dh_i = dl W,   dW += dl^T h_i,   db += dl

Only the first ``n_valid`` of the sorted ``rows`` are computed; the rest are ignored tokens and cost nothing.
Reading ``n_valid`` is a host synchronisation, free on CPU; the Triton path never syncs.

A target outside ``[0, V)`` contributes nothing: ``z[t_i]`` reads as 0 and the one-hot term is absent, exactly
as in the Triton kernels (whose column match never fires). ``linear_logprobs`` clamps its targets into range,
so this only matters for a vocab shard (``vocab_parallel.py``), where the target lives on another rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_BUDGET_BYTES = 64 << 20
"""Bytes of fp32 (chunk x V) work buffers per chunk: two buffers with softcap, one without."""


def chunk_rows(vocab: int, softcap: float | None) -> int:
    """Rows per chunk so that the chunk's fp32 work buffers fit in ``CHUNK_BUDGET_BYTES`` (at least one row)."""
    buffers = 2 if softcap is not None else 1
    return max(1, CHUNK_BUDGET_BYTES // (4 * vocab * buffers))


def _compute_weights(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """fp32 views (or, for half-precision inputs, fp32 copies) of the head used for every chunk."""
    return weight.float(), (bias.float() if bias is not None else None)


def _scaled_logits(
    h: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None, inv_temperature: float
) -> tuple[Tensor, Tensor | None]:
    """``z = softcap(h W^T + b) * inv_temperature`` in fp32, and the softcap's ``tanh(l / c)`` if any."""
    z = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
    if softcap is None:
        return z.mul_(inv_temperature), None
    t = z.div_(softcap).tanh_()
    return t * (softcap * inv_temperature), t


def _chunks(n: int, vocab: int, softcap: float | None):
    """``(start, end)`` row ranges covering the first ``n`` rows."""
    step = chunk_rows(vocab, softcap)
    return ((start, min(n, start + step)) for start in range(0, n, step))


def _in_vocab(targets: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    """Targets clamped into ``[0, V)`` (safe to gather / scatter) and the mask of those that were inside."""
    inside = (targets >= 0) & (targets < vocab)
    return targets.clamp(0, vocab - 1), inside


def forward(
    hidden2d: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    rows: Tensor,
    targets: Tensor,
    n_valid: Tensor,
    *,
    softcap: float | None,
    inv_temperature: float,
) -> tuple[Tensor, Tensor]:
    """Return ``(logp, lse)``, float32 ``(N,)``; both exactly 0 past ``n_valid``."""
    logp = torch.empty(rows.numel(), dtype=torch.float32, device=hidden2d.device)
    lse = torch.empty_like(logp)
    n = int(n_valid.reshape(()))
    logp[n:] = 0.0
    lse[n:] = 0.0
    w, b = _compute_weights(weight, bias)
    for start, end in _chunks(n, weight.shape[0], softcap):
        h = hidden2d.index_select(0, rows[start:end]).float()
        z, _ = _scaled_logits(h, w, b, softcap, inv_temperature)
        chunk_lse = torch.logsumexp(z, dim=-1)
        lse[start:end] = chunk_lse
        target, inside = _in_vocab(targets[start:end], weight.shape[0])
        logp[start:end] = torch.where(inside, z.gather(1, target[:, None]).squeeze(1), 0.0) - chunk_lse
    return logp, lse


def backward(
    hidden2d: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    rows: Tensor,
    targets: Tensor,
    n_valid: Tensor,
    lse: Tensor,
    grad: Tensor,
    *,
    softcap: float | None,
    inv_temperature: float,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    deterministic: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``sum(grad * logp)`` for hidden2d, weight and bias (None where not needed).

    Always deterministic (no atomics), so ``deterministic`` is accepted for interface parity only.
    """
    del deterministic
    w, b = _compute_weights(weight, bias)
    grad_h = torch.zeros(hidden2d.shape, dtype=torch.float32, device=hidden2d.device) if need_hidden else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_weight else None
    grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_bias else None
    for start, end in _chunks(int(n_valid.reshape(())), weight.shape[0], softcap):
        idx = rows[start:end]
        h = hidden2d.index_select(0, idx).float()
        z, t = _scaled_logits(h, w, b, softcap, inv_temperature)
        g = grad[start:end, None]
        # dl = g * (onehot - softmax(z)) * inv_temperature * (1 - t^2), built in place in z's buffer
        dl = z.sub_(lse[start:end, None]).exp_().mul_(-g)
        target, inside = _in_vocab(targets[start:end], weight.shape[0])
        dl.scatter_add_(1, target[:, None], torch.where(inside[:, None], g, 0.0))
        dl.mul_(inv_temperature)
        if t is not None:
            dl.mul_(t.square_().neg_().add_(1.0))
        if grad_h is not None:
            grad_h.index_copy_(0, idx, dl @ w)
        if grad_w is not None:
            grad_w.addmm_(dl.T, h)
        if grad_b is not None:
            grad_b.add_(dl.sum(0))
    return (
        grad_h.to(hidden2d.dtype) if grad_h is not None else None,
        grad_w.to(weight.dtype) if grad_w is not None else None,
        grad_b.to(bias.dtype) if grad_b is not None else None,
    )
