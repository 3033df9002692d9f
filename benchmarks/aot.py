r"""The sm_90 compile gate: every Triton kernel variant prefuse launches, compiled for Hopper without a GPU.

Each module of ``prefuse.kernels`` that defines ``compile_variants()`` (found by scanning the package's sources,
so a new kernel module joins by defining it) lists its variants (``KernelVariant``: one per constexpr combination
its launchers can pick with their default configs). Each is compiled ahead of time with the Triton installed
here (which ships ``ptxas``) for ``GPUTarget("cuda", 90, 32)``; the ``ptxas -v`` log of that compile gives registers
and spill bytes, ``metadata.shared`` the shared memory the launch requests. One table row per variant; the exit
code is non-zero when a variant fails to compile, spills, or needs more than 227 KiB (232,448 B) of shared
memory per block.

    python -m benchmarks.aot [--modules MODULE ...] [--jobs N]

Pointer arguments are compiled as 16-byte aligned (every PyTorch allocation is); an integer argument whose type
carries ``:16`` (``"i32:16"``) as divisible by 16, as Triton specialises it at a launch with such a value.
Compiled kernels go to a fresh temporary ``TRITON_CACHE_DIR``, removed at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import importlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

SHARED_LIMIT = 232_448
"""Shared memory per block (opt-in) of an H100 / H200: 227 KiB."""
TARGET = ("cuda", 90, 32)
PACKAGE = "prefuse.kernels"


@dataclass(frozen=True)
class Compiled:
    """Resource usage of one compiled variant (``error`` set when it did not compile)."""

    name: str
    config: str
    registers: int = 0
    spill_bytes: int = 0
    shared: int = 0
    error: str = ""

    def problems(self, shared_limit: int = SHARED_LIMIT) -> list[str]:
        """Why this variant fails the gate (empty when it passes)."""
        if self.error:
            return [f"does not compile: {self.error}"]
        out = []
        if self.spill_bytes:
            out.append(f"spills {self.spill_bytes} bytes")
        if self.shared > shared_limit:
            out.append(f"needs {self.shared:,} B of shared memory > {shared_limit:,}")
        return out


def variant_modules(package: str = PACKAGE) -> list[str]:
    """Modules of `package` whose source defines ``compile_variants`` (read as text: nothing is imported)."""
    root = Path(importlib.import_module(package).__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if re.search(r"^def compile_variants\(", path.read_text(), re.MULTILINE):
            parts = path.relative_to(root).with_suffix("").parts
            found.append(".".join((package, *parts)))
    return found


def _variants(module: str) -> list:
    return importlib.import_module(module).compile_variants()


def _config_text(variant) -> str:
    c = variant.constexprs
    blocks = "x".join(str(c[k]) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D") if k in c)
    return f"{blocks} w{variant.num_warps} s{variant.num_stages}".strip()


def _ptxas_usage(log: str) -> tuple[int, int]:
    """``(registers, spill bytes)`` from the ``ptxas -v`` log Triton's compile wrote."""
    registers = re.search(r"Used (\d+) registers", log)
    if registers is None:
        raise RuntimeError(f"no ptxas resource line in the compile log: {log[-300:]!r}")
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return int(registers.group(1)), spills


@contextlib.contextmanager
def _captured_stdout():
    """Capture file descriptor 1 (where Triton prints the ptxas log) into the yielded list's one string."""
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+") as log:
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(log.fileno(), 1)
        try:
            yield out
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            log.seek(0)
            out.append(log.read())


def compile_variant(variant) -> Compiled:
    """Compile one ``KernelVariant`` for :data:`TARGET` and read its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = variant.fn
    signature = {name: kind.split(":")[0] for name, kind in variant.signature.items()}
    attrs = {
        (fn.arg_names.index(name),): [["tt.divisibility", 16]]
        for name, kind in variant.signature.items()
        if kind.startswith("*") or kind.endswith(":16")
    }
    config = _config_text(variant)
    try:
        source = ASTSource(fn=fn, signature=signature, constexprs=dict(variant.constexprs), attrs=attrs)
        with _captured_stdout() as log:
            kernel = triton.compile(
                source,
                target=GPUTarget(*TARGET),
                options={"num_warps": variant.num_warps, "num_stages": variant.num_stages},
            )
        registers, spills = _ptxas_usage(log[0])
    except Exception as err:  # a compile failure is a gate failure, reported with the others
        return Compiled(variant.name, config, error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    return Compiled(variant.name, config, registers, spills, kernel.metadata.shared)


_WORKER_VARIANTS: dict[str, list] = {}


def _compile_by_index(module: str, index: int) -> Compiled:
    if module not in _WORKER_VARIANTS:
        _WORKER_VARIANTS[module] = _variants(module)
    return compile_variant(_WORKER_VARIANTS[module][index])


def compile_all(modules: list[str], jobs: int):
    """Compile every variant of `modules` with `jobs` worker processes; yields the results in declaration
    order as they complete."""
    tasks = [(module, i) for module in modules for i in range(len(_variants(module)))]
    if jobs <= 1:
        yield from (_compile_by_index(*task) for task in tasks)
        return
    with futures.ProcessPoolExecutor(jobs) as pool:
        yield from pool.map(_compile_by_index, *zip(*tasks))


HEADER = ("| kernel | config | registers | spills (B) | shared (B) | gate |", "|---|---|---:|---:|---:|---|")


def row(result: Compiled, shared_limit: int = SHARED_LIMIT) -> str:
    """One table row: the variant's resources and its verdict."""
    r = result
    verdict = "; ".join(r.problems(shared_limit)) or "ok"
    return f"| {r.name} | {r.config} | {r.registers} | {r.spill_bytes} | {r.shared:,} | {verdict} |"


def summary(results: list[Compiled]) -> str:
    """Markdown table with one row per kernel, operand dtype and config: the range of registers and shared
    memory over its variants and the largest spill."""
    groups: dict[tuple, list[Compiled]] = {}
    for r in results:
        kernel, _, flags = r.name.partition("[")
        groups.setdefault((kernel, flags.split(",")[0].rstrip("]"), r.config), []).append(r)
    lines = [
        "| kernel | operands | config | variants | registers | spills (B) | shared (B) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for (kernel, dtype, config), rs in groups.items():
        regs = sorted({r.registers for r in rs})
        shared = sorted({r.shared for r in rs})
        lines.append(
            f"| {kernel} | {dtype} | {config} | {len(rs)} | {regs[0]}–{regs[-1]} | "
            f"{max(r.spill_bytes for r in rs)} | {shared[0]:,}–{shared[-1]:,} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="+", help="modules to compile (default: every module of the package "
                        "that defines compile_variants)")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="worker processes")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # the gate compiles; interpreted kernels cannot be
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v as Triton runs it: registers and spills
    with tempfile.TemporaryDirectory(prefix="prefuse-aot-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # a fresh cache: every variant runs ptxas
        return _gate(args)


def _gate(args) -> int:
    import triton

    modules = args.modules or variant_modules()
    print(f"sm_90 compile gate: triton {triton.__version__}, target {TARGET}, modules {', '.join(modules)}")
    print(*HEADER, sep="\n")
    results = []
    for result in compile_all(modules, args.jobs):
        print(row(result), flush=True)
        results.append(result)
    print()
    print(summary(results))
    failed = [r for r in results if r.problems()]
    print(
        f"{len(results)} variants, {len(failed)} failing the gate (shared limit {SHARED_LIMIT:,} B, no spills)"
    )
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
