"""Helpers shared by the functional losses: argument checks, safe means, the all-reduced reference point."""

from __future__ import annotations

import math
import numbers

import torch
import torch.distributed as dist
from prefuse.kernels.linear_logprobs.validate import host_reads_allowed
from torch import Tensor


def sigmoid_tails(x: Tensor) -> Tensor:
    """``σ(x)`` as ``exp(logσ(x))``: value and gradient accurate to float32 rounding on both tails.

    ``torch.sigmoid`` rounds ``σ(x)`` to 1 for ``x`` past about 16.6, so its gradient ``σ(x)(1 - σ(x))`` is
    exactly 0 there although the true value (``≈ e^{-x}``) is representable; ``logσ``'s gradient is
    ``σ(-x)``, computed without that cancellation. A loss written as ``1 - σ(x)`` is ``sigmoid_tails(-x)``.
    """
    return torch.exp(torch.nn.functional.logsigmoid(x))


def check_real(
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A Python real number within the given bounds, else ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return value


def check_device(name: str, value: Tensor, device: torch.device | None) -> None:
    """``ValueError`` naming ``value`` when it is not on ``device`` (None: any device)."""
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but the other inputs are on {device}")


def check_vector(
    name: str, value, n: int | None = None, *, dtype_kind: str = "float", device: torch.device | None = None
) -> Tensor:
    """A 1-D tensor (of length ``n`` when given, on ``device`` when given); ``dtype_kind``: ``"float"``,
    ``"bool"`` or ``"any"`` (real)."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    check_device(name, value, device)
    if value.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(value.shape)}")
    if n is not None and value.shape[0] != n:
        raise ValueError(f"{name} must have length {n}, got {value.shape[0]}")
    if dtype_kind == "bool" and value.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got {value.dtype}")
    if dtype_kind == "float" and not value.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if dtype_kind == "any" and (value.dtype == torch.bool or value.dtype.is_complex):
        raise ValueError(f"{name} must be a real-valued tensor, got {value.dtype}")
    return value


def check_same_shape(name: str, value: Tensor, other_name: str, other: Tensor) -> None:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.shape != other.shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)} but {other_name} has {tuple(other.shape)}")
    check_device(name, value, other.device)


def check_unit_interval(name: str, value: Tensor) -> None:
    """``ValueError`` if a probability lies outside ``[0, 1]`` (or is NaN); one host read, eager mode only."""
    if host_reads_allowed(value.device):
        bad = ~((value >= 0) & (value <= 1))
        if bool(bad.any()):
            raise ValueError(f"{name} must hold probabilities in [0, 1], got {float(value[bad][0])}")


def check_finite(name: str, value: Tensor) -> None:
    """``ValueError`` if ``value`` holds a NaN or an infinity; one host read, eager mode only."""
    if host_reads_allowed(value.device):
        bad = ~torch.isfinite(value)
        if bool(bad.any()):
            raise ValueError(f"{name} must be finite, got {float(value[bad].reshape(-1)[0])}")


def mean_or_zero(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of ``values`` (where ``mask``); 0 for an empty set instead of NaN."""
    if mask is None:
        return values.sum() / max(values.numel(), 1)
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def batch_mean(values: Tensor) -> Tensor:
    """``values.mean()``, or ``values.sum()`` (a differentiable 0) for an empty batch instead of NaN."""
    return values.mean() if values.numel() else values.sum()


def float_tensor(value, like: Tensor) -> Tensor:
    """``value`` (number or tensor) as a detached float32 0-d tensor on ``like``'s device."""
    if isinstance(value, Tensor):
        return value.detach().to(device=like.device, dtype=torch.float32).reshape(())
    return torch.tensor(float(value), device=like.device, dtype=torch.float32)


def global_mean_clamped(total: Tensor, count: Tensor) -> Tensor:
    """``max(0, Σ total / Σ count)`` over all ranks (a no-op reduction without ``torch.distributed``).

    ``total`` and ``count`` are 0-d tensors of this rank; the result is detached. The sum and the count are
    all-reduced together, so ranks with more rows weigh more (a count-weighted mean). An empty set (count 0
    everywhere) gives 0.
    """
    stats = torch.stack([total.detach().float(), count.detach().float()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    return (stats[0] / stats[1].clamp(min=1)).clamp(min=0)


def segment_sum(values: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    """``out[s] = Σ values[i] over i with segment_ids[i] == s`` for ``s < num_segments`` (shape ``(S,)``).

    Negative ids (``-1``: outside every segment) and ids ``>= num_segments`` are dropped into a spare bucket,
    so nothing indexes out of bounds; callers validate the ids in eager mode. Differentiable in ``values``.
    """
    flat_ids = segment_ids.reshape(-1)
    spare = num_segments
    idx = torch.where((flat_ids >= 0) & (flat_ids < num_segments), flat_ids, spare).long()
    out = values.new_zeros(num_segments + 1)
    out = out.index_add(0, idx, values.reshape(-1))
    return out[:num_segments]


def count_distinct(ids: Tensor) -> Tensor:
    """Number of distinct non-negative ids (a 0-d float32 tensor), without reading the ids back."""
    flat = ids.reshape(-1)
    n = flat.numel()
    idx = torch.where((flat >= 0) & (flat < n), flat, n).long()
    present = torch.zeros(n + 1, device=ids.device, dtype=torch.float32).index_fill(0, idx, 1.0)
    return present[:n].sum()


def pair_metrics(
    chosen_logps: Tensor, rejected_logps: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor
) -> dict[str, Tensor]:
    """TRL's paired metrics: means over pairs of rewards, accuracies, margins and policy log-probs."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": mean_or_zero(chosen_rewards),
        "rewards/rejected": mean_or_zero(rejected_rewards),
        "rewards/accuracies": mean_or_zero((chosen_rewards > rejected_rewards).float()),
        "rewards/margins": mean_or_zero(chosen_rewards - rejected_rewards),
        "logps/chosen": mean_or_zero(chosen_logps.detach()),
        "logps/rejected": mean_or_zero(rejected_logps.detach()),
    }


def chosen_nll(chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Chosen-token NLL, mean over all chosen completion tokens: ``-Σ_b logp_b / Σ_b len_b`` (RPO, Liger)."""
    return -chosen_logps.sum() / chosen_lengths.sum().clamp(min=1)


def check_pair(names: tuple[str, ...], tensors: tuple[Tensor, ...]) -> int:
    """All 1-D float tensors of one length on one device; returns the length."""
    n = check_vector(names[0], tensors[0]).shape[0]
    for name, t in zip(names[1:], tensors[1:]):
        check_vector(name, t, n, device=tensors[0].device)
    return n
