"""Launch configurations of the ``linear_logprobs`` Triton kernels: a fixed default, autotuning on request.

- **Default** (CUDA): every kernel launches with :func:`default_config` for its role (``forward``,
  ``backward``, ``weight``) and operand size. These are the configs ``python -m benchmarks.aot`` compiles for
  sm_90 and checks for register spills and shared memory; no launch ever benchmarks.
- **``PREFUSE_AUTOTUNE=1``**: Triton's autotuner over :data:`GPU_SPACE`, pruned by :func:`fits`, keyed on the
  shape (``D``, ``V``, a power-of-two token bucket ``N_BUCKET``), the dot precision and every flag that changes
  the compiled code (the argument dtypes Triton adds itself). Benchmark runs add into the gradient buffers, so
  those are named in ``reset_to_zero``; the launchers never pass ``None`` there (Triton 3.6 calls ``.zero_()``
  on each without a ``None`` check): a gradient that is not asked for gets a one-element placeholder.
- **Interpreter** (``TRITON_INTERPRET=1`` set before import, CPU tests): the fixed small
  :data:`INTERPRET_META` and :data:`INTERPRET_SPLITS` vocab splits, so that small test vocabularies exercise
  the multi-split paths (partial combine, atomic ``grad_hidden``).

The vocab is cut into ``splits`` contiguous ranges of ``split_v`` columns, a multiple of every ``BLOCK_V`` the
regime can pick (a vocab tile never straddles two splits); each program of a ``(row blocks, splits)`` grid owns
one range. The split count depends on shapes only, so partial buffers are allocated before the launch.
"""

from __future__ import annotations

import functools
import itertools
import os
from typing import NamedTuple

import torch
import triton
from prefuse.kernels.linear_logprobs.compile_variants import KernelVariant
from triton.runtime.interpreter import InterpretedFunction

INTERPRET_META = {"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_D": 16}
INTERPRET_SPLITS = 2

GPU_SPACE = {
    "BLOCK_N": (64, 128),
    "BLOCK_V": (64, 128, 256),
    "BLOCK_D": (32, 64, 128),
    "num_warps": (4, 8),
    "num_stages": (2, 3, 4),
}
META_KEYS = ("BLOCK_N", "BLOCK_V", "BLOCK_D", "num_warps", "num_stages")
SHARED_LIMIT = 232_448
"""Shared memory per block (opt-in) of an sm_90 GPU (H100 / H200): 227 KiB."""

# role -> operand bytes -> config: compiled for sm_90 under Triton 3.6 and 3.9 (``python -m benchmarks.aot``)
# without spills, within the shared memory of a block.
DEFAULT_CONFIGS = {
    "forward": {
        2: {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3},
        4: {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 32, "num_warps": 8, "num_stages": 3},
    },
    "backward": {
        2: {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 32, "num_warps": 8, "num_stages": 3},
        4: {"BLOCK_N": 64, "BLOCK_V": 32, "BLOCK_D": 16, "num_warps": 4, "num_stages": 3},
    },
}
DEFAULT_CONFIGS["weight"] = DEFAULT_CONFIGS["backward"]

# fp32 logit-tile elements per thread beyond which a role's kernel spills (ptxas, sm_90): the forward keeps one
# tile live; the backward kernels also hold the dl tile and its 16-bit copy.
TILE_PER_THREAD = {"forward": 64, "backward": 32, "weight": 32}
COMMON_KEY = ("D", "V", "N_BUCKET", "HAS_SOFTCAP", "HAS_BIAS", "DOT_PRECISION")


class KernelSpec(NamedTuple):
    """What the launcher knows of a kernel: its role, autotune key and the buffers benchmark runs dirty."""

    role: str
    key: tuple[str, ...]
    reset_to_zero: tuple[str, ...]


KERNELS: dict[str, KernelSpec] = {}
"""Kernel name -> spec, filled by :func:`autotuned`."""


def is_interpreted(kernel) -> bool:
    """Whether `kernel` (a ``triton.jit`` object) was decorated under ``TRITON_INTERPRET=1``."""
    return isinstance(kernel, InterpretedFunction)


def jit_function(kernel):
    """The ``@triton.jit`` function under any autotuner."""
    while isinstance(kernel, triton.runtime.Autotuner):
        kernel = kernel.fn
    return kernel


def kernel_name(kernel) -> str:
    """The Python name of a (possibly autotuned / interpreted) Triton kernel."""
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel.__name__


def shared_bytes(meta: dict, element_size: int, role: str) -> int:
    """Upper estimate of the shared memory a config allocates, fitted to what ptxas reports for sm_90
    (``tests/test_gpu_tools.py`` holds the measurements): the pipelined ``h`` and ``W`` operand tiles of the
    logit loop (``num_stages`` buffers) — all of the forward's; the backward kernels add the ``dl`` tile twice
    (as the operand of ``dl @ W`` and of ``dlᵀ @ h``) and an fp32 ``W``-chunk-sized layout conversion (exact at
    7 of the 13 backward configs measured, at most 32 KiB over at the others)."""
    n, v, d = meta["BLOCK_N"], meta["BLOCK_V"], meta["BLOCK_D"]
    operands = meta["num_stages"] * (n + v) * d * element_size
    if role == "forward":
        return operands
    return operands + 2 * n * v * element_size + v * d * 4


def fits(meta: dict, element_size: int, role: str, shared_limit: int = SHARED_LIMIT) -> bool:
    """Whether config `meta` (:data:`META_KEYS`) stays within `shared_limit` bytes of shared memory and its
    fp32 logit tile within the role's register budget :data:`TILE_PER_THREAD`."""
    tile = meta["BLOCK_N"] * meta["BLOCK_V"]
    return (
        shared_bytes(meta, element_size, role) <= shared_limit
        and tile <= TILE_PER_THREAD[role] * 32 * meta["num_warps"]
    )


def default_config(role: str, element_size: int) -> dict:
    """The config every untuned CUDA launch of a `role` kernel uses, for operands of `element_size` bytes."""
    return dict(DEFAULT_CONFIGS[role][element_size])


def gpu_configs() -> list[triton.Config]:
    """Every config of :data:`GPU_SPACE`."""
    blocks = ("BLOCK_N", "BLOCK_V", "BLOCK_D")
    return [
        triton.Config(dict(zip(blocks, values)), num_warps=warps, num_stages=stages)
        for *values, warps, stages in itertools.product(*(GPU_SPACE[k] for k in META_KEYS))
    ]


def _meta(config: triton.Config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _prune(configs, named_args, *, role, **kwargs):
    """The autotuner's pre-filter: the configs that :func:`fits` an sm_90 block."""
    size = {**named_args, **kwargs}["weight_ptr"].element_size()
    return [c for c in configs if fits(_meta(c), size, role)]


def autotuner(kernel, spec: KernelSpec):
    """Triton's autotuner for `kernel` over the pruned :data:`GPU_SPACE`, with `spec`'s key and resets."""
    return triton.autotune(
        configs=gpu_configs(),
        key=list(spec.key),
        prune_configs_by={"early_config_prune": functools.partial(_prune, role=spec.role)},
        reset_to_zero=list(spec.reset_to_zero),
    )(kernel)


def autotuned(*, role, key=(), reset_to_zero=()):
    """Decorator: register the kernel (:data:`KERNELS`) and, when compiled, wrap it in :func:`autotuner`
    (used only under ``PREFUSE_AUTOTUNE=1``; :func:`launch` otherwise runs the bare kernel)."""

    def wrap(kernel):
        spec = KernelSpec(role, (*COMMON_KEY, *key), tuple(reset_to_zero))
        KERNELS[kernel_name(kernel)] = spec
        return kernel if is_interpreted(kernel) else autotuner(kernel, spec)

    return wrap


def autotune_enabled() -> bool:
    """``PREFUSE_AUTOTUNE``: ``1`` turns Triton's autotuner on; unset, empty or ``0`` keeps the defaults."""
    value = os.environ.get("PREFUSE_AUTOTUNE", "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"PREFUSE_AUTOTUNE must be '0' or '1', got {value!r}")
    return value == "1"


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch an :func:`autotuned` kernel; `grid` maps the chosen meta-parameters to the launch grid."""
    spec = KERNELS[kernel_name(kernel)]
    bound = {**dict(zip(jit_function(kernel).arg_names, args)), **kwargs}
    missing = [name for name in spec.reset_to_zero if bound[name] is None]
    if missing:
        raise ValueError(f"{kernel_name(kernel)}: reset_to_zero buffers {missing} must not be None")
    if is_interpreted(kernel):
        kernel[grid](*args, **kwargs, **INTERPRET_META)
    elif autotune_enabled():
        kernel[grid](*args, **kwargs)
    else:
        jit_function(kernel)[grid](
            *args, **kwargs, **default_config(spec.role, bound["weight_ptr"].element_size())
        )


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
    - ``DOT_PRECISION``: for fp32 operands ``"tf32"`` when PyTorch itself allows TF32 matmuls
      (``torch.backends.cuda.matmul.allow_tf32``), else ``"tf32x3"`` (three TF32 products: fp32 accuracy on
      the tensor cores; the ``"ieee"`` FMA path spilled registers on sm_90 at every tile tried);
      16-bit operands always use the tensor cores.
    """
    if hidden.device.type == "cpu" and not interpreted:
        raise ValueError(
            "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before importing prefuse "
            "(use backend='torch' or CUDA tensors otherwise)"
        )
    fp32 = weight.dtype == torch.float32
    return {
        "UPCAST_DOT": interpreted and weight.dtype == torch.bfloat16,
        "DOT_PRECISION": "tf32x3" if fp32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32",
    }


# ------------------------------------------------------------------------------------ sm_90 compile gate

PRECISIONS = (("fp32", "tf32x3"), ("fp32", "tf32"), ("bf16", "tf32"), ("fp16", "tf32"))
"""(operand dtype, ``DOT_PRECISION``) pairs :func:`dot_flags` can produce on CUDA."""
_ELEMENT_SIZE = {"fp32": 4, "bf16": 2, "fp16": 2}
_INDEX_ARGS = ("rows_ptr", "targets_ptr", "n_valid_ptr")
_OPERAND_ARGS = ("hidden_ptr", "weight_ptr", "bias_ptr")
_ALIGNED_INTS = (
    "D",
    "stride_h",
    "stride_w",
    "SPLIT_V",
)  # multiples of 16 at the GPU shapes (SPLIT_V: always)


def _arg_type(name: str, dtype: str) -> str:
    if name in _OPERAND_ARGS:
        return f"*{dtype}"
    if name in _INDEX_ARGS:
        return "*i64"
    if name.endswith("_ptr"):
        return "*fp32"
    if name in ("logit_scale", "softcap", "inv_temperature"):
        return "fp32"
    return "i32:16" if name in _ALIGNED_INTS else "i32"


def kernel_variant(kernel, dtype: str, precision: str, **flags) -> KernelVariant:
    """The :class:`KernelVariant` a CUDA launch of `kernel` with these operands and constexpr `flags` compiles:
    its default config (:func:`default_config`), ``bias_ptr`` as ``None`` without a bias."""
    fn = jit_function(kernel)
    name = kernel_name(kernel)
    config = default_config(KERNELS[name].role, _ELEMENT_SIZE[dtype])
    constexprs = {**flags, "UPCAST_DOT": False, "DOT_PRECISION": precision}
    constexprs.update({k: config[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")})
    if not flags["HAS_BIAS"]:
        constexprs["bias_ptr"] = None
    signature = {a: "constexpr" if a in constexprs else _arg_type(a, dtype) for a in fn.arg_names}
    label = [dtype if dtype != "fp32" else f"fp32-{precision}"]
    label += [k.lower().removeprefix("has_") for k, v in flags.items() if v]
    return KernelVariant(
        f"{name}[{','.join(label)}]", fn, signature, constexprs, config["num_warps"], config["num_stages"]
    )
