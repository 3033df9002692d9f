"""What the sm_90 compile gate (``python -m benchmarks.aot``) compiles: every Triton kernel variant prefuse launches.

Each module that defines Triton kernels exposes ``compile_variants() -> list[KernelVariant]``: one entry per
constexpr combination its launchers can pick with their default (untuned) configuration. The gate compiles each
entry ahead of time for a CUDA target on a machine without a GPU and reads registers, spills and shared memory
from the cubin.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class KernelVariant(NamedTuple):
    """One compilable Triton kernel variant."""

    name: str
    """Kernel and variant, e.g. ``"chunked_forward_pass[bf16,stats]"``."""
    fn: Any
    """The ``@triton.jit`` function (unwrapped from any autotuner)."""
    signature: dict[str, str]
    """Argument name -> Triton type: ``"*bf16"``, ``"*fp32"``, ``"i32"``, ``"i64"``, ``"fp32"`` or ``"constexpr"``."""
    constexprs: dict[str, Any]
    """Values of the ``tl.constexpr`` arguments."""
    num_warps: int = 4
    num_stages: int = 3
