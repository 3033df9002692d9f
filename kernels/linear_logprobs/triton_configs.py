"""Block sizes, vocab splitting and autotuning for the ``linear_logprobs`` Triton kernels, in one place.

Two regimes:

- **CUDA** (compiled): every kernel is wrapped by :func:`autotuned`, which tunes ``BLOCK_N`` (token rows),
  ``BLOCK_V`` (vocab columns), ``BLOCK_D`` (hidden chunk), ``num_warps`` and ``num_stages`` over
  :data:`GPU_SPACE`, keyed on ``D``, ``V``, a power-of-two token bucket ``N_BUCKET`` (plus the argument
  dtypes, which Triton adds to the key itself) and whatever mode flags the kernel names. Configs whose
  operand pipeline does not fit in shared memory, or whose fp32 logit tile would spill registers, are pruned
  before any benchmark. Accumulation buffers are named in ``reset_to_zero`` so that benchmark runs leave no
  trace in the result.
- **Interpreter** (``TRITON_INTERPRET=1`` set before import, CPU tests): one fixed small config,
  :data:`INTERPRET_META`, and :data:`INTERPRET_SPLITS` vocab splits so that small test vocabularies already
  exercise the multi-split code paths (partial log-sum-exp combine, atomic ``grad_hidden``).

The vocab is cut into ``splits`` contiguous ranges of ``split_v`` columns (a multiple of every ``BLOCK_V`` the
regime can pick, so a vocab tile never straddles two splits); each program of a ``(row blocks, splits)`` grid
owns one range. The split count is fixed on the host from shapes only (never from data), before the
autotuner picks ``BLOCK_V``, so partial buffers can be allocated ahead of the launch.
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

# The fixed config of the interpreter: the smallest tiles `tl.dot` accepts, so tests stay cheap.
INTERPRET_META = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_D": 16}
INTERPRET_SPLITS = 2

# The GPU search space (pruned per device and dtype by `_prune`).
GPU_SPACE = {
    "BLOCK_N": (64, 128),
    "BLOCK_V": (64, 128, 256),
    "BLOCK_D": (32, 64, 128),
    "num_warps": (4, 8),
    "num_stages": (2, 3, 4),
}
# fp32 logit-tile elements per thread beyond which the kernels spill registers (calibrated with ptxas for
# sm_90 at BLOCK_D=64: the forward keeps one tile live; the backward kernels also hold the dl tile, its 16-bit
# copy and the pointer tiles of their fp32 accumulation targets).
FORWARD_TILE_PER_THREAD = 64
BACKWARD_TILE_PER_THREAD = 32


def is_interpreted(kernel) -> bool:
    """Whether `kernel` (a ``triton.jit`` object) was decorated under ``TRITON_INTERPRET=1``."""
    return isinstance(kernel, InterpretedFunction)


def _gpu_configs() -> list[triton.Config]:
    keys = ("BLOCK_N", "BLOCK_V", "BLOCK_D")
    return [
        triton.Config(dict(zip(keys, blocks)), num_warps=warps, num_stages=stages)
        for *blocks, warps, stages in itertools.product(
            *(GPU_SPACE[k] for k in (*keys, "num_warps", "num_stages"))
        )
    ]


@functools.cache
def _shared_memory_bytes(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin


def _prune(configs, named_args, *, tile_per_thread, **kwargs):
    """Keep the configs whose pipelined dot operands and staged logit tile fit the device's shared memory
    and whose fp32 logit tile fits the registers of its warps (`tile_per_thread` elements per thread)."""
    weight = {**named_args, **kwargs}["weight_ptr"]
    limit = _shared_memory_bytes(weight.device.index if weight.device.index is not None else 0)
    size = weight.element_size()
    kept = []
    for c in configs:
        n, v, d = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_V"], c.kwargs["BLOCK_D"]
        shared = c.num_stages * (n + v) * d * size + n * v * 4
        if shared <= limit and n * v <= tile_per_thread * 32 * c.num_warps:
            kept.append(c)
    return kept


def autotuned(*, tile_per_thread, key=(), reset_to_zero=()):
    """Decorator: the CUDA autotuner over :data:`GPU_SPACE`, keyed on ``D``, ``V``, ``N_BUCKET`` and `key`,
    pruned by :func:`_prune` with the kernel's register budget `tile_per_thread`.

    Under the interpreter it returns the kernel unchanged (launch it through :func:`launch`)."""

    def wrap(kernel):
        if is_interpreted(kernel):
            return kernel
        return triton.autotune(
            configs=_gpu_configs(),
            key=["D", "V", "N_BUCKET", *key],
            prune_configs_by={
                "early_config_prune": functools.partial(_prune, tile_per_thread=tile_per_thread)
            },
            reset_to_zero=list(reset_to_zero),
        )(kernel)

    return wrap


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch an :func:`autotuned` kernel; `grid` maps the chosen meta-parameters to the launch grid.

    Under the interpreter the fixed :data:`INTERPRET_META` blocks are passed explicitly."""
    if is_interpreted(kernel):
        kernel[grid](*args, **kwargs, **INTERPRET_META)
    else:
        kernel[grid](*args, **kwargs)


def token_bucket(n_tokens: int) -> int:
    """The power-of-two token count the autotuner keys on (one tuning per bucket, not per batch shape)."""
    return triton.next_power_of_2(max(n_tokens, 1))


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def vocab_splits(n_tokens: int, vocab: int, device: torch.device, interpreted: bool) -> tuple[int, int]:
    """``(splits, split_v)``: how many contiguous vocab ranges of ``split_v`` columns the grid's second axis
    gets. On CUDA, enough for about two programs per SM when the tokens alone (at the largest ``BLOCK_N``)
    do not fill the device; one split when they do."""
    if interpreted:
        align, wanted = INTERPRET_META["BLOCK_V"], INTERPRET_SPLITS
    else:
        align = max(GPU_SPACE["BLOCK_V"])
        row_programs = triton.cdiv(max(n_tokens, 1), max(GPU_SPACE["BLOCK_N"]))
        index = device.index if device.index is not None else torch.cuda.current_device()
        wanted = triton.cdiv(2 * _sm_count(index), row_programs)
    split_v = triton.cdiv(triton.cdiv(vocab, wanted), align) * align
    return triton.cdiv(vocab, split_v), split_v


def dot_flags(hidden: torch.Tensor, weight: torch.Tensor, interpreted: bool) -> dict:
    """Constexpr flags shared by all kernels, from the operands, and the CPU/interpreter guard.

    - ``UPCAST_DOT``: under the interpreter, ``tl.dot`` on bfloat16 operands returns garbage, so bf16
      operands are cast to fp32 first there; compiled kernels keep bf16/fp16 operands for the tensor cores.
    - ``DOT_PRECISION``: for fp32 operands, ``"ieee"`` unless PyTorch itself allows TF32 matmuls
      (``torch.backends.cuda.matmul.allow_tf32``); 16-bit operands always use the tensor cores.
    """
    if hidden.device.type == "cpu" and not interpreted:
        raise ValueError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before importing prefuse "
            "(use backend='torch' or CUDA tensors otherwise)"
        )
    fp32 = weight.dtype == torch.float32
    return {
        "UPCAST_DOT": interpreted and weight.dtype == torch.bfloat16,
        "DOT_PRECISION": "ieee" if fp32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32",
    }
