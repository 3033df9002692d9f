"""Per-token log-prob providers: ``provider(hidden, weight, labels, softcap) -> (rows, T-1)`` log-probs.

Each returns ``log p(labels[:, t+1] | hidden[:, t])`` with 0.0 where the label is ``-100`` — the contract of
``prefuse.kernels.linear_logprobs(..., shift=True)`` — so a workload's formula (``benchmarks.formulas``) can run
on any of them:

- ``naive_logps``: full logits, ``log_softmax``, gather (prefuse's ``naive_linear_logprobs``; what TRL's
  ``selective_log_softmax`` does), in the input dtype;
- ``cce_logps``: Cut Cross-Entropy's ``linear_cross_entropy(reduction="none")``, negated (CUDA only);
- ``liger_flce_logps``: Liger-Kernel's fused linear cross-entropy with ``reduction="none"``, negated (CUDA only);
- ``trl_logps``: TRL's fused head (``trl.kernels.ChunkedLogProbFunction``) called as TRL's
  ``add_fused_lm_head`` calls it on that device (log-probs only);
- ``reference_logps``: float64, chunked over the scored tokens, no autograd — the yardstick of the error column.

The third-party providers take next-token targets (labels shifted left and padded with ``-100``, as Hugging
Face models build them) on the unshifted hidden states, so no copy of ``hidden`` is made.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.inputs import IGNORE_INDEX

LogpsProvider = Callable[..., Tensor]
REFERENCE_CHUNK_BYTES = {"cpu": 128 << 20, "cuda": 1 << 30}


def next_token_targets(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``targets[:, t] = labels[:, t+1]``, the last position ``ignore_index``: same shape as ``labels``."""
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)


def naive_logps(hidden: Tensor, weight: Tensor, labels: Tensor, softcap: float | None = None) -> Tensor:
    from prefuse.kernels.linear_logprobs import naive_linear_logprobs

    return naive_linear_logprobs(hidden, weight, labels, shift=True, softcap=softcap)


def cce_logps(hidden: Tensor, weight: Tensor, labels: Tensor, softcap: float | None = None) -> Tensor:
    from cut_cross_entropy import linear_cross_entropy

    ce = linear_cross_entropy(hidden, weight, next_token_targets(labels), softcap=softcap, reduction="none")
    return -ce[:, :-1]


def liger_flce_logps(hidden: Tensor, weight: Tensor, labels: Tensor, softcap: float | None = None) -> Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    rows, steps, dim = hidden.shape
    ce = liger_fused_linear_cross_entropy(
        hidden.reshape(-1, dim),
        weight,
        next_token_targets(labels).reshape(-1),
        reduction="none",
        softcap=softcap,
    )
    return -ce.view(rows, steps)[:, :-1]


def trl_logps(hidden: Tensor, weight: Tensor, labels: Tensor, softcap: float | None = None) -> Tensor:
    """TRL 1.16's fused head as TRL calls it on that device (``prefuse.alignment.head_comparison.trl_head``, the
    main job's TRL contender)."""
    from prefuse.alignment.head_comparison import trl_head

    return trl_head(hidden, weight, labels, softcap)


def reference_logps(hidden: Tensor, weight: Tensor, labels: Tensor, softcap: float | None = None) -> Tensor:
    """float64 log-probs of the scored tokens (chunks of at most ``REFERENCE_CHUNK_BYTES`` of float64 logits)."""
    rows, steps, dim = hidden.shape
    with torch.no_grad():
        flat_h = hidden[:, :-1].reshape(-1, dim)
        flat_y = labels[:, 1:].reshape(-1)
        out = torch.zeros(flat_y.shape, dtype=torch.float64, device=hidden.device)
        w = weight.detach().double()
        budget = REFERENCE_CHUNK_BYTES.get(hidden.device.type, REFERENCE_CHUNK_BYTES["cpu"])
        chunk = max(1, budget // (8 * weight.shape[0]))
        for idx in (flat_y != IGNORE_INDEX).nonzero().squeeze(1).split(chunk):
            z = flat_h.index_select(0, idx).double() @ w.T
            if softcap is not None:
                z = softcap * torch.tanh(z / softcap)
            out[idx] = z.gather(1, flat_y[idx, None]).squeeze(1) - torch.logsumexp(z, dim=-1)
    return out.view(rows, steps - 1)
