"""Block sizes, vocab splitting and autotuning for the ``linear_logprobs`` Triton kernels, in one place.

Two regimes:

- **CUDA** (compiled): every kernel is wrapped by :func:`autotuned`, which tunes ``BLOCK_N`` (token rows),
  ``BLOCK_V`` (vocab columns), ``BLOCK_D`` (hidden chunk), ``num_warps`` and ``num_stages`` over
  :data:`GPU_SPACE`, keyed on ``D``, ``V``, a power-of-two token bucket ``N_BUCKET``, ``HAS_SOFTCAP`` (plus
  the argument dtypes, which Triton adds to the key itself) and whatever mode flags the kernel names. Configs whose
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

How a CUDA launch picks its config (:func:`choose_config`), first match wins:

1. a config forced by :func:`forced_configs` (the tuning sweep ``benchmarks/tune.py`` uses this);
2. the **tuned table** (unless ``PREFUSE_AUTOTUNE=force``): ``tuned_configs.json`` beside this file, or the
   file named by ``PREFUSE_TUNED_CONFIGS`` (empty: no table). Entries are keyed by kernel, dtype and the
   kernel's autotune key (``D``, ``V``, ``N_BUCKET``, the flags); an entry of this device's name wins over
   one of the same compute capability, and an exact token bucket over the nearest tuned one (same kernel,
   dtype, D, V and flags). A tabled config that no longer fits the device is skipped;
3. ``PREFUSE_AUTOTUNE=off``: the first config of :data:`DEFAULT_PREFERENCE` that fits (no benchmarking: the
   GPU test suite and the sanitizer run use this);
4. otherwise (``PREFUSE_AUTOTUNE`` unset or ``auto``) Triton's autotuner over the pruned :data:`GPU_SPACE`.

The table is written by ``python -m benchmarks.tune`` on the GPU (see ``TUNING.md``).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

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

# `PREFUSE_AUTOTUNE=off` (and a device without a tuned entry in that mode): the first of these that fits.
DEFAULT_PREFERENCE = (
    {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32, "num_warps": 4, "num_stages": 2},
)
META_KEYS = ("BLOCK_N", "BLOCK_V", "BLOCK_D", "num_warps", "num_stages")
AUTOTUNE_MODES = ("auto", "off", "force")
TABLE_FORMAT = 1
DEFAULT_TABLE = Path(__file__).with_name("tuned_configs.json")


@dataclass(frozen=True)
class KernelSpec:
    """What :func:`autotuned` knows of a kernel: its autotune key names and register budget."""

    key: tuple[str, ...]
    tile_per_thread: int


# kernel name -> spec, filled by `autotuned` (the table keys entries by these names)
KERNELS: dict[str, KernelSpec] = {}


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


def fits(meta: dict, element_size: int, shared_limit: int, tile_per_thread: int) -> bool:
    """Whether the config `meta` (:data:`META_KEYS`) keeps its pipelined dot operands and staged logit tile
    within `shared_limit` bytes and its fp32 logit tile within `tile_per_thread` elements per thread."""
    n, v, d = meta["BLOCK_N"], meta["BLOCK_V"], meta["BLOCK_D"]
    shared = meta["num_stages"] * (n + v) * d * element_size + n * v * 4
    return shared <= shared_limit and n * v <= tile_per_thread * 32 * meta["num_warps"]


def _config_meta(c: triton.Config) -> dict:
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


def _device_index(tensor: torch.Tensor) -> int:
    return tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()


def _prune(configs, named_args, *, tile_per_thread, **kwargs):
    """Keep the configs whose pipelined dot operands and staged logit tile fit the device's shared memory
    and whose fp32 logit tile fits the registers of its warps (`tile_per_thread` elements per thread)."""
    weight = {**named_args, **kwargs}["weight_ptr"]
    limit = _shared_memory_bytes(weight.device.index if weight.device.index is not None else 0)
    size = weight.element_size()
    return [c for c in configs if fits(_config_meta(c), size, limit, tile_per_thread)]


def kernel_name(kernel) -> str:
    """The Python name of a (possibly autotuned / interpreted) Triton kernel."""
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel.__name__


def autotuned(*, tile_per_thread, key=(), reset_to_zero=()):
    """Decorator: the CUDA autotuner over :data:`GPU_SPACE`, keyed on ``D``, ``V``, ``N_BUCKET``,
    ``HAS_SOFTCAP`` and `key`, pruned by :func:`_prune` with the kernel's register budget `tile_per_thread`.
    Registers the kernel in :data:`KERNELS` (the tuned table uses the same key).

    Under the interpreter it returns the kernel unchanged (launch it through :func:`launch`)."""
    full_key = ("D", "V", "N_BUCKET", "HAS_SOFTCAP", *key)

    def wrap(kernel):
        KERNELS[kernel_name(kernel)] = KernelSpec(full_key, tile_per_thread)
        if is_interpreted(kernel):
            return kernel
        return triton.autotune(
            configs=_gpu_configs(),
            key=list(full_key),
            prune_configs_by={
                "early_config_prune": functools.partial(_prune, tile_per_thread=tile_per_thread)
            },
            reset_to_zero=list(reset_to_zero),
        )(kernel)

    return wrap


# ------------------------------------------------------------------------------------------ config choice


def autotune_mode() -> str:
    """``PREFUSE_AUTOTUNE``: ``auto`` (default: table, else autotune), ``off`` (table, else a fixed default;
    never benchmarks) or ``force`` (always autotune, ignoring the table)."""
    mode = os.environ.get("PREFUSE_AUTOTUNE", "auto").strip().lower() or "auto"
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"PREFUSE_AUTOTUNE must be one of {AUTOTUNE_MODES}, got {mode!r}")
    return mode


def table_path() -> Path | None:
    """The tuned-config table in use: ``PREFUSE_TUNED_CONFIGS`` if set (empty: none), else the packaged one."""
    value = os.environ.get("PREFUSE_TUNED_CONFIGS")
    if value is None:
        return DEFAULT_TABLE
    return Path(value) if value.strip() else None


def _json_value(value):
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def table_key(name: str, bound: dict) -> tuple[str, str, dict]:
    """``(kernel, dtype, key)`` of a launch: `bound` maps the kernel's argument names to their values."""
    spec = KERNELS[name]
    return name, _json_value(bound["weight_ptr"].dtype), {k: _json_value(bound[k]) for k in spec.key}


def _group(name: str, dtype: str, key: dict) -> tuple:
    return name, dtype, tuple(sorted((k, v) for k, v in key.items() if k != "N_BUCKET"))


class TunedTable:
    """The entries of a tuned-config JSON file (format :data:`TABLE_FORMAT`), indexed for :meth:`lookup`.

    File layout::

        {"format": 1, "entries": [{"device": "NVIDIA H100 80GB HBM3", "capability": "9.0",
          "kernel": "_forward_kernel", "dtype": "bfloat16",
          "key": {"D": 4096, "V": 128256, "N_BUCKET": 16384, "HAS_SOFTCAP": false},
          "config": {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3},
          "ms": 21.7, ...free-form provenance...}, ...]}
    """

    def __init__(self, entries: list[dict]):
        self.entries = list(entries)
        self._index: dict[tuple, list[dict]] = {}
        for entry in self.entries:
            missing = {"device", "capability", "kernel", "dtype", "key", "config"} - entry.keys()
            if missing or "N_BUCKET" not in entry["key"] or set(META_KEYS) - entry["config"].keys():
                raise ValueError(
                    f"tuned-config entry lacks {sorted(missing) or 'N_BUCKET / config keys'}: {entry}"
                )
            self._index.setdefault(_group(entry["kernel"], entry["dtype"], entry["key"]), []).append(entry)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TunedTable:
        data = json.loads(Path(path).read_text())
        if data.get("format") != TABLE_FORMAT:
            raise ValueError(f"{path}: tuned-config format {data.get('format')!r}, expected {TABLE_FORMAT}")
        return cls(data.get("entries", []))

    def lookup(self, name: str, dtype: str, key: dict, device: str, capability: str) -> dict | None:
        """The entry for this launch: same kernel, dtype and non-bucket key; this device's name before its
        capability; the exact token bucket, else the nearest (in powers of two; the larger on a tie)."""
        candidates = self._index.get(_group(name, dtype, key), [])
        for same in (lambda e: e["device"] == device, lambda e: e["capability"] == capability):
            matching = [e for e in candidates if same(e)]
            if matching:
                bucket = math.log2(key["N_BUCKET"])
                return min(
                    matching,
                    key=lambda e: (abs(math.log2(e["key"]["N_BUCKET"]) - bucket), -e["key"]["N_BUCKET"]),
                )
        return None


_TABLES: dict[tuple[str, float], TunedTable] = {}


def load_table(path: Path | None = None) -> TunedTable | None:
    """The tuned table at `path` (default :func:`table_path`), re-read when the file changes; ``None`` when
    there is no file."""
    path = table_path() if path is None else path
    if path is None or not path.is_file():
        return None
    stamp = (str(path.resolve()), path.stat().st_mtime)
    if stamp not in _TABLES:
        _TABLES[stamp] = TunedTable.load(path)
    return _TABLES[stamp]


@functools.cache
def device_signature(device_index: int) -> tuple[str, str]:
    """``(name, "major.minor")`` of a CUDA device, as the tuned table records them."""
    major, minor = torch.cuda.get_device_capability(device_index)
    return torch.cuda.get_device_name(device_index), f"{major}.{minor}"


_FORCED: dict[str, dict] = {}
_RECORDERS: list[tuple[list, bool, bool]] = []


@contextlib.contextmanager
def forced_configs(configs: dict[str, dict]):
    """Within the block, launches of the named kernels use the given config (:data:`META_KEYS`)."""
    saved = dict(_FORCED)
    _FORCED.update(configs)
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)


@dataclass
class LaunchRecord:
    kernel: str
    dtype: str
    key: dict
    config: dict | None  # None: left to Triton's autotuner
    source: str  # forced / table / default / autotune
    args: tuple = ()  # the launch's arguments, with `recording(keep_args=True)` only
    kwargs: dict = field(default_factory=dict)


@contextlib.contextmanager
def recording(*, keep_args: bool = False, dry: bool = False):
    """Collect a :class:`LaunchRecord` of every CUDA launch made through :func:`launch` within the block
    (with `keep_args`, also its arguments). ``dry=True`` records without launching anything (outputs stay
    uninitialised): the tuning sweep learns each kernel's launch arguments that way, to precompile configs."""
    records: list[LaunchRecord] = []
    entry = (records, keep_args, dry)
    _RECORDERS.append(entry)
    try:
        yield records
    finally:
        del _RECORDERS[next(i for i, e in enumerate(_RECORDERS) if e is entry)]


def default_config(name: str, bound: dict) -> dict:
    """The first config of :data:`DEFAULT_PREFERENCE` (then of :data:`GPU_SPACE`) that fits the device."""
    weight = bound["weight_ptr"]
    limit = _shared_memory_bytes(_device_index(weight))
    budget = KERNELS[name].tile_per_thread
    for meta in (*DEFAULT_PREFERENCE, *(_config_meta(c) for c in _gpu_configs())):
        if fits(meta, weight.element_size(), limit, budget):
            return dict(meta)
    raise RuntimeError(f"no config of {name} fits this device's shared memory ({limit} bytes)")


def choose_config(name: str, bound: dict) -> tuple[dict | None, str]:
    """``(config, source)`` for a CUDA launch of kernel `name` with arguments `bound` (module docstring);
    ``config is None`` means: let Triton's autotuner choose."""
    if name in _FORCED:
        return dict(_FORCED[name]), "forced"
    mode = autotune_mode()
    if mode != "force":
        table = load_table()
        if table is not None:
            weight = bound["weight_ptr"]
            index = _device_index(weight)
            device, capability = device_signature(index)
            entry = table.lookup(*table_key(name, bound), device, capability)
            if entry is not None:
                config = {k: entry["config"][k] for k in META_KEYS}
                budget = KERNELS[name].tile_per_thread
                if fits(config, weight.element_size(), _shared_memory_bytes(index), budget):
                    return config, "table"
    if mode == "off":
        return default_config(name, bound), "default"
    return None, "autotune"


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch an :func:`autotuned` kernel; `grid` maps the chosen meta-parameters to the launch grid.

    Under the interpreter the fixed :data:`INTERPRET_META` blocks are passed explicitly. On CUDA the config
    comes from :func:`choose_config`: a chosen one launches the underlying ``triton.jit`` function directly
    (no benchmarking), else the autotuner runs."""
    if is_interpreted(kernel):
        kernel[grid](*args, **kwargs, **INTERPRET_META)
        return
    name = kernel_name(kernel)
    bound = {**dict(zip(kernel.arg_names, args)), **kwargs}
    config, source = choose_config(name, bound)
    dry = False
    for records, keep_args, dry_run in _RECORDERS:
        extra = (args, dict(kwargs)) if keep_args else ()
        records.append(LaunchRecord(*table_key(name, bound), config, source, *extra))
        dry = dry or dry_run
    if dry:
        return
    if config is None:
        kernel[grid](*args, **kwargs)
    else:
        kernel.fn[grid](*args, **kwargs, **config)


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
