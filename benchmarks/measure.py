"""One measurement: a contender on a case — peak memory, time of a step, and the output to check.

A *step* is the contender's forward plus, in ``fwd+bwd`` mode, the backward of its loss (the sum of the
log-probs for the core op) into the hidden states and, when trainable, the head; gradients are dropped before
each step, so every step allocates them anew. ``fwd`` mode runs under ``torch.no_grad()``.

Memory, as "peak during one step minus what was allocated before it" (gradient outputs included, inputs not):

- CPU: peak RSS of the process. The caller runs this in a fresh process per contender and case
  (``benchmarks.runner``), and the memory step is the first step of that process (after a compiling warm-up
  call only for ``liger-compiled``; the C heap's free pages are handed back with ``malloc_trim`` before the
  step), so no earlier step's freed but cached memory hides what this one needs. The kernel's high-water mark
  is reset after the inputs are built (``/proc/self/clear_refs``), so building them does not count.
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the memory allocated
  before the step (after warm-up: the allocator's cache does not count as allocated).

Time: CPU ``time.perf_counter()``, CUDA events (synchronised); the median of the timed steps after warm-up.
The output checked against the float64 reference is the first call's, which is deterministic even for
contenders with internal state (SamPO draws a new sample every call, the first from its seed).
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor

from benchmarks import contenders
from benchmarks.inputs import Batch, make_batch
from benchmarks.plan import Case, Timing


def make_step(forward: contenders.Forward, batch: Batch) -> Callable[[], Tensor]:
    """Forward (+ backward in ``fwd+bwd`` mode) of one contender; returns the detached forward output."""
    leaves = batch.grad_tensors()
    train = batch.case.mode == "fwd+bwd"

    def step() -> Tensor:
        for leaf in leaves:
            leaf.grad = None
        if not train:
            with torch.no_grad():
                return forward()
        out = forward()
        (out if out.dim() == 0 else out.sum()).backward()
        return out.detach()

    return step


# ------------------------------------------------------------------------------------------ CPU memory
def current_rss() -> int:
    """Resident set size of this process in bytes (Linux ``/proc``; ``ru_maxrss`` elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def peak_rss() -> int:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in bytes (kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def release_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim``), so memory that an earlier step freed
    but the allocator kept cached is not silently reused by the measured step; a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def initialise_runtime(device: torch.device) -> None:
    """Start what every contender's first step would start anyway — the intra-op thread pool, the autograd
    engine, the BLAS library's workspaces — with a tiny matmul / log-softmax / backward, so the memory step
    measures the contender's buffers, not the runtime's one-time set-up."""
    x = torch.randn(64, 64, device=device, requires_grad=True)
    w = torch.randn(256, 64, device=device, requires_grad=True)
    torch.log_softmax(x @ w.T, dim=-1)[:, 0].sum().backward()


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


# -------------------------------------------------------------------------------------------- clocks
def _cpu_time(step: Callable[[], Tensor]) -> tuple[float, Tensor]:
    start = time.perf_counter()
    out = step()
    return time.perf_counter() - start, out


def _cuda_time(step: Callable[[], Tensor]) -> tuple[float, Tensor]:
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    out = step()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / 1e3, out


def _timed_repeats(step: Callable[[], Tensor], clock, timing: Timing) -> list[float]:
    samples: list[float] = []
    while (
        len(samples) < timing.max_repeats
        and (len(samples) < timing.min_repeats or sum(samples) < timing.min_time_s)
        and not (samples and sum(samples) >= timing.max_time_s)
    ):
        seconds, _ = clock(step)
        samples.append(seconds)
    return samples


# ---------------------------------------------------------------------------------------- measurement
def measure(case: Case, contender: str, timing: Timing) -> tuple[dict, Tensor]:
    """Measure ``contender`` on ``case`` in this process; returns ``(record, first output)``.

    On CPU, call it in a fresh process (``benchmarks.runner`` does) for an honest peak RSS. Raises
    ``contenders.Unavailable`` if the contender cannot run the case; CUDA out-of-memory is returned as a
    record with status ``"oom"``.
    """
    cuda = case.device == "cuda"
    record: dict = {}
    try:
        batch = make_batch(case)
        step = make_step(contenders.build(batch, contender), batch)
        record.update(scored_tokens=batch.scored_tokens(), input_bytes=batch.nbytes())
        if cuda:
            first = _measure_cuda(step, batch, timing, record)
        else:
            first = _measure_cpu(step, batch, timing, record, warm_first=contender in contenders.NEEDS_WARMUP)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if not isinstance(err, torch.cuda.OutOfMemoryError) and "can't allocate memory" not in message:
            raise
        record.update(status="oom", reason=message)
        return record, torch.empty(0)
    record["status"] = "ok"
    return record, first.double().cpu()


def _drop_grads(batch: Batch) -> None:
    for leaf in batch.grad_tensors():
        leaf.grad = None
    gc.collect()


def _measure_cpu(step, batch: Batch, timing: Timing, record: dict, warm_first: bool) -> Tensor:
    first = None
    initialise_runtime(batch.hidden.device)
    if warm_first:  # compiles: keep compilation out of the memory step (and the timings)
        started = time.perf_counter()
        first = step()
        record["compile_s"] = time.perf_counter() - started
        _drop_grads(batch)
    gc.collect()
    release_free_memory()
    reset = reset_peak_rss()
    base = current_rss()
    seconds, out = _cpu_time(step)
    record["memory"] = {
        "peak_bytes": max(0, peak_rss() - base),
        "baseline_bytes": base,
        "method": "peak RSS, fresh process",
        "high_water_reset": reset,
    }
    first = out if first is None else first
    for _ in range(max(0, timing.warmup - 1)):
        step()
    samples = _timed_repeats(step, _cpu_time, timing)
    record["time"] = _time_stats(samples, first_s=seconds)
    return first


def _measure_cuda(step, batch: Batch, timing: Timing, record: dict) -> Tensor:
    started = time.perf_counter()
    first = step()
    torch.cuda.synchronize()
    record["first_call_s"] = time.perf_counter() - started  # includes Triton autotuning / torch.compile
    for _ in range(max(0, timing.warmup - 1)):
        step()
    _drop_grads(batch)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    record["memory"] = {
        "peak_bytes": max(0, torch.cuda.max_memory_allocated() - base),
        "baseline_bytes": base,
        "method": "CUDA allocator peak",
    }
    samples = _timed_repeats(step, _cuda_time, timing)
    record["time"] = _time_stats(samples)
    return first


def _time_stats(samples: list[float], first_s: float | None = None) -> dict:
    stats = {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "repeats": len(samples),
        "samples_s": samples,
    }
    if first_s is not None:
        stats["first_step_s"] = first_s
    return stats
