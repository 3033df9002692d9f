"""The chunked-GEMM driver shared by the ``"chunked"`` (Triton passes) and ``"torch"`` (PyTorch passes) backends.

Per chunk of scored rows, the logits come from one GEMM and everything else from one pass over them:

**Forward.** ``l = H_c W^T`` (``H_c`` the chunk's gathered hidden rows; fp32 accumulation), then one pass
computes, per row, with ``z = softcap(s * (l + b)) / T`` (``s`` the logit scale, ``softcap(x) = c tanh(x / c)``)::

    lse = logsumexp(z)           logp = z[t] - lse
    H   = lse - sum_j p_j z_j    (entropy)        log_sum_sq = log sum_j p_j^2
    mean_logits = mean_j z_j     is_top1 = (t == first argmax_j z_j)

**Backward.** The chunk's logits are recomputed by the same GEMM; one pass overwrites them in place with ::

    dl_j = [g (1[j = t] - p_j) - g_H p_j (log p_j + H)] * dz_j/dl_j,
    dz_j/dl_j = s / T * (1 - tanh^2(s l_j / c))   (softcap), else s / T

(``g``, ``g_H``: the upstream gradients of ``logp`` and of the entropy), then
``dH_c = dl W``, ``dW += dl^T H_c``, ``db += sum_rows dl``, all accumulated in fp32. There are no atomics:
every output element is written by one GEMM or one pass, so the result is deterministic by construction.

**GEMM precision.** fp32 inputs: ``torch.mm`` in fp32. bf16 / fp16 inputs on CUDA: ``torch.mm`` /
``torch.addmm`` in the input dtype with ``out_dtype=torch.float32`` (tensor cores, fp32 accumulation and fp32
output, no rounding of the logits to the input dtype); ``dl`` is written in the input dtype for the two backward
GEMMs. Where ``out_dtype`` is not available for the device and dtype (torch's CPU ``mm`` has none; the probe is
``_has_fp32_out_mm``) the operands are upcast to fp32 once per call instead, so the products are exact and
accumulate in fp32 as well, and ``dl`` stays fp32. The logits handed to the passes are fp32 on every path.

**Compaction and the host sync.** The row plan sorts the scored rows first; only the first ``n_valid`` are
gathered and multiplied. ``torch.mm`` needs the chunk shapes on the host, so ``n_valid`` is read once per forward
and once per backward: a host synchronisation on CUDA (the price of launching GEMMs of exactly the scored rows;
``torch.compile`` keeps the op opaque, but CUDA-graph capture needs the sync-free ``"triton"`` backend).

**Gradient filtering** (opt-in ``filter_eps = eps``, as Cut Cross-Entropy). The backward pass also reports, per
block of ``FILTER_BLOCK_V`` vocabulary columns, the largest probability over the chunk's rows. A block whose
probabilities are all ``< eps`` and that holds no target of the chunk is skipped: its ``dl`` is left out of
the GEMMs (treated as 0). For a skipped entry ``p < eps`` and no one-hot term, so with ``k = s / T``
(``|dz/dl| <= k``) and ``eps <= 1/e`` (where ``|p log p| <= eps |log eps|``)::

    |dl_ij| <= k * (|g_i| eps + |g_H,i| eps (|log eps| + H_i)) =: k * eps * e_i

(for ``eps > 1/e`` the term ``eps |log eps|`` becomes ``1/e``), and the gradient errors are bounded by the sums
over the skipped entries::

    |d(dH)_i,d| <= sum_{j skipped} |dl_ij| |W_jd| <= k eps e_i sum_j |W_jd|
    |d(dW)_j,d| <= k eps sum_i e_i |h_id|,        |d(db)_j| <= k eps sum_i e_i

With ``filter_eps=None`` nothing is skipped and the result is exact. Which blocks are kept is read on the host
(another sync per chunk on CUDA); the kept columns of ``dl`` and rows of ``W`` are gathered for the GEMMs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

CHUNK_ROWS_CUDA = 4096
"""Rows per chunk on CUDA: large enough for full-efficiency GEMMs, small enough for an fp32 ``(rows, V)`` block."""
CHUNK_BUDGET_BYTES = 64 << 20
"""Elsewhere: bytes of the fp32 ``(rows, V)`` logits block per chunk."""
FILTER_BLOCK_V = 256
"""Vocabulary columns per block of the gradient filter."""


class Passes(NamedTuple):
    """A backend's two passes over a chunk's logits (``torch_twin.forward_pass`` documents the arguments)."""

    forward_pass: Callable
    grad_pass: Callable


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk (at least one)."""
    if device.type == "cuda":
        return CHUNK_ROWS_CUDA
    return max(1, CHUNK_BUDGET_BYTES // (4 * vocab))


def _chunks(n: int, vocab: int, device: torch.device):
    step = chunk_rows(vocab, device)
    return ((start, min(n, start + step)) for start in range(0, n, step))


@functools.cache
def _has_fp32_out_mm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` runs for ``dtype`` inputs on this device type."""
    try:
        a = torch.zeros(1, 1, dtype=dtype, device=device_type)
        torch.mm(a, a, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


class _Gemms:
    """The three GEMMs of a call, with fp32 accumulation and fp32 results (see the module docstring)."""

    def __init__(self, weight: Tensor):
        half = weight.dtype != torch.float32
        self.mixed = half and _has_fp32_out_mm(weight.device.type, weight.dtype)
        self.weight = weight if (self.mixed or not half) else weight.float()
        self.dtype = self.weight.dtype  # the operand dtype, also the dtype of dl

    def operand(self, x: Tensor) -> Tensor:
        return x.to(self.dtype)

    def mm(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.mm(a, b, out_dtype=torch.float32) if self.mixed else torch.mm(a, b)

    def addmm_(self, acc: Tensor, a: Tensor, b: Tensor) -> None:
        """``acc += a @ b`` for an fp32 ``acc``."""
        if self.mixed:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        else:
            acc.addmm_(a, b)


def forward(
    passes: Passes,
    hidden2d: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    rows: Tensor,
    targets: Tensor,
    n_valid: Tensor,
    *,
    softcap: float | None,
    inv_temperature: float,
    logit_scale: float,
    with_stats: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(logp, lse, stats)`` over the sorted rows (see the backend interface in ``op.py``)."""
    n_rows, vocab = rows.numel(), weight.shape[0]
    device = hidden2d.device
    logp = torch.zeros(n_rows, dtype=torch.float32, device=device)
    lse = torch.zeros_like(logp)
    stats = torch.zeros((n_rows, 4) if with_stats else (0,), dtype=torch.float32, device=device)
    gemms = _Gemms(weight)
    b = bias.float() if bias is not None else None
    for start, end in _chunks(int(n_valid.reshape(())), vocab, device):
        h = gemms.operand(hidden2d.index_select(0, rows[start:end]))
        logits = gemms.mm(h, gemms.weight.T)
        passes.forward_pass(
            logits, b, targets[start:end], logp[start:end], lse[start:end],
            stats[start:end] if with_stats else None,
            softcap=softcap, inv_temperature=inv_temperature, logit_scale=logit_scale,
        )  # fmt: skip
    return logp, lse, stats


def _kept_columns(block_max: Tensor, targets: Tensor, vocab: int, filter_eps: float) -> Tensor:
    """Indices of the vocabulary columns in blocks with a probability ``>= filter_eps`` or a target."""
    keep = block_max >= filter_eps
    inside = targets[(targets >= 0) & (targets < vocab)]
    keep[inside // FILTER_BLOCK_V] = True
    columns = keep.repeat_interleave(FILTER_BLOCK_V)[:vocab]
    return columns.nonzero().squeeze(1)


def backward(
    passes: Passes,
    hidden2d: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    rows: Tensor,
    targets: Tensor,
    n_valid: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    grad_logp: Tensor,
    grad_entropy: Tensor | None,
    *,
    softcap: float | None,
    inv_temperature: float,
    logit_scale: float,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    deterministic: bool = True,
    filter_eps: float | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``sum(grad_logp * logp + grad_entropy * entropy)``; always deterministic (no atomics)."""
    del deterministic
    need_bias = need_bias and bias is not None
    vocab, device = weight.shape[0], hidden2d.device
    gemms = _Gemms(weight)
    b = bias.float() if bias is not None else None
    grad_h = torch.zeros(hidden2d.shape, dtype=torch.float32, device=device) if need_hidden else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_weight else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=device) if need_bias else None
    with_entropy = grad_entropy is not None
    for start, end in _chunks(int(n_valid.reshape(())), vocab, device):
        idx = rows[start:end]
        h = gemms.operand(hidden2d.index_select(0, idx))
        logits = gemms.mm(h, gemms.weight.T)
        dl, block_max = passes.grad_pass(
            logits, b, targets[start:end], lse[start:end],
            entropy[start:end] if with_entropy else None, grad_logp[start:end],
            grad_entropy[start:end] if with_entropy else None,
            softcap=softcap, inv_temperature=inv_temperature, logit_scale=logit_scale, out_dtype=gemms.dtype,
            filter_block=FILTER_BLOCK_V if filter_eps is not None else None,
        )  # fmt: skip
        w = gemms.weight
        if filter_eps is not None:
            columns = _kept_columns(block_max, targets[start:end], vocab, filter_eps)
            dl, w = dl.index_select(1, columns), w.index_select(0, columns)
        if grad_h is not None:
            grad_h.index_copy_(0, idx, gemms.mm(dl, w))
        if filter_eps is None:
            if grad_w is not None:
                gemms.addmm_(grad_w, dl.T, h)
            if grad_b is not None:
                grad_b.add_(dl.sum(0, dtype=torch.float32))
        else:
            if grad_w is not None:
                part = grad_w.index_select(0, columns)
                gemms.addmm_(part, dl.T, h)
                grad_w.index_copy_(0, columns, part)
            if grad_b is not None:
                grad_b.index_copy_(
                    0, columns, grad_b.index_select(0, columns) + dl.sum(0, dtype=torch.float32)
                )
    return (
        grad_h.to(hidden2d.dtype) if grad_h is not None else None,
        grad_w.to(weight.dtype) if grad_w is not None else None,
        grad_b.to(bias.dtype) if grad_b is not None else None,
    )
