"""Argument checks of ``linear_logprobs``: every bad input is a ``ValueError`` that names the argument."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("auto", "chunked", "triton", "torch")
OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
"""The optional per-token outputs, in the order of ``TokenOutputs``'s fields after ``logp``."""
FILTER_BACKENDS = ("chunked", "torch")
INT64_RANGE = (-(2**63), 2**63 - 1)


def _check_tensor(name: str, value, dtypes=None) -> None:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {value.dtype}")


def _check_positive_finite(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def validate_arguments(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    ignore_index: int,
    shift: bool,
    temperature: float,
    softcap: float | None,
    backend: str,
    **options,
) -> None:
    """Shapes, dtypes, devices and options (``options``: the keyword options of ``validate_options``); the
    data-dependent target range is ``validate_targets``."""
    _check_tensor("hidden", hidden, FLOAT_DTYPES)
    _check_tensor("weight", weight, FLOAT_DTYPES)
    _check_tensor("targets", targets)
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if hidden.dim() < 2:
        raise ValueError(
            f"hidden must have shape (..., D) with at least one token dimension, got {tuple(hidden.shape)}"
        )
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, D), got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V == 0)")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight's D ({weight.shape[1]}) differs from hidden's last dim ({hidden.shape[-1]})"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] {tuple(hidden.shape[:-1])}"
        )
    devices = {"weight": weight.device, "targets": targets.device}
    if bias is not None:
        _check_tensor("bias", bias, FLOAT_DTYPES)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias dtype {bias.dtype} differs from weight dtype {weight.dtype}")
        devices["bias"] = bias.device
    for name, device in devices.items():
        if device != hidden.device:
            raise ValueError(f"{name} is on {device} but hidden is on {hidden.device}")
    _check_bool("shift", shift)
    validate_options(ignore_index, temperature, softcap, backend, **options)


def validate_options(
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    backend: str,
    *,
    logit_scale: float = 1.0,
    filter_eps: float | None = None,
    deterministic: bool = False,
) -> None:
    """The op's scalar options (also checked by the loss modules when they are built).

    ``temperature`` and ``logit_scale`` must also keep ``logit_scale / temperature`` finite in float32 (a
    temperature of 1e-39 would turn every logit into an infinity and the log-probs into NaN)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if not INT64_RANGE[0] <= ignore_index <= INT64_RANGE[1]:
        raise ValueError(f"ignore_index must fit in int64 (targets are int64), got {ignore_index!r}")
    _check_positive_finite("temperature", temperature)
    _check_positive_finite("logit_scale", logit_scale)
    if not float(logit_scale) / float(temperature) <= torch.finfo(torch.float32).max:
        raise ValueError(
            f"temperature {temperature!r} is too small: logit_scale / temperature overflows float32 "
            f"(logit_scale={logit_scale!r})"
        )
    if softcap is not None:
        _check_positive_finite("softcap", softcap)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if filter_eps is not None:
        if isinstance(filter_eps, bool) or not isinstance(filter_eps, numbers.Real):
            raise ValueError(f"filter_eps must be None or a real number in (0, 1), got {filter_eps!r}")
        if not 0 < filter_eps < 1:
            raise ValueError(f"filter_eps must be None or in (0, 1), got {filter_eps!r}")
        if backend not in (*FILTER_BACKENDS, "auto"):
            raise ValueError(
                f"filter_eps needs backend in {FILTER_BACKENDS} (or 'auto'), got backend={backend!r}"
            )
    _check_bool("deterministic", deterministic)


def validate_outputs(outputs) -> tuple[str, ...]:
    """``outputs`` as a tuple of distinct names from ``OUTPUTS``."""
    if isinstance(outputs, (str, bytes)) or not isinstance(outputs, (tuple, list, set, frozenset)):
        raise ValueError(f"outputs must be a tuple of names from {OUTPUTS}, got {outputs!r}")
    unknown = [name for name in outputs if name not in OUTPUTS]
    if unknown:
        raise ValueError(f"outputs holds {unknown!r}; allowed names are {OUTPUTS}")
    return tuple(name for name in OUTPUTS if name in outputs)


def host_reads_allowed(device: torch.device) -> bool:
    """Whether a check may read tensor values (a host sync on CUDA): not while ``torch.compile`` traces or a
    CUDA graph is being captured, nor under a ``torch.func`` transform (``vmap`` cannot branch on batched data).
    The op's target-range check and the losses' value checks all ask this."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def validate_targets(targets: Tensor, valid: Tensor, vocab: int) -> None:
    """Non-ignored targets must lie in ``[0, vocab)``.

    Reads the data, so it is a host synchronisation on CUDA; the op skips it while a CUDA graph is being
    captured or ``torch.compile`` traces. There, an out-of-range target yields NaN, never a wrong number.
    """
    bad = valid & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        first = targets[bad][0]
        raise ValueError(f"targets holds {int(first)}, outside [0, V={vocab}) and not ignore_index")
