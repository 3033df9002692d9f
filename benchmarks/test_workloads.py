"""pytest-benchmark entry: every workload x contender, at the smallest shape of each sweep of a preset.

    pytest benchmarks/ --benchmark-only                              # the device's quick preset
    PREFUSE_BENCH_PRESET=full pytest benchmarks/ --benchmark-only    # the full report's shapes
    PREFUSE_BENCH_PRESET=smoke pytest benchmarks/ --benchmark-disable   # run each once, tiny shapes

Not collected by the default ``python -m pytest`` (its testpaths is ``tests/``): benchmarks are never timed
tests. pytest-benchmark times in this process; peak memory (fresh process per measurement) and the sweeps
come from ``python -m benchmarks``. Each benchmark first checks its output against the float64 reference,
so a fast wrong answer fails.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks import contenders
from benchmarks.accuracy import error_of, reference_output, tolerance
from benchmarks.environment import slug
from benchmarks.inputs import make_batch
from benchmarks.measure import make_step
from benchmarks.plan import Case, get_preset

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PRESET_NAME = os.environ.get("PREFUSE_BENCH_PRESET", "quick")
if PRESET_NAME not in ("quick", "full", "smoke"):
    raise ValueError(f"PREFUSE_BENCH_PRESET must be quick, full or smoke; got {PRESET_NAME!r}")
PRESET = get_preset(DEVICE, quick=PRESET_NAME == "quick", smoke=PRESET_NAME == "smoke")


def _smallest_per_sweep() -> list[Case]:
    smallest: dict[tuple, Case] = {}
    for case in PRESET.cases():
        if case.group not in smallest or case.rows < smallest[case.group].rows:
            smallest[case.group] = case
    return list(smallest.values())


PARAMS = [
    pytest.param(
        case,
        name,
        id=f"{case.workload}-{case.head.name}-{slug(case.variant)}-{case.rows}x{case.seq_len}-{name}",
    )
    for case in _smallest_per_sweep()
    for name in PRESET.contenders
]

_references: dict[Case, torch.Tensor] = {}


def _reference(case: Case) -> torch.Tensor:
    if case not in _references:
        _references.clear()  # cases come grouped: keep one reference alive
        _references[case] = reference_output(case)
    return _references[case]


@pytest.mark.parametrize(("case", "contender"), PARAMS)
def test_workload(benchmark, case: Case, contender: str) -> None:
    reason = contenders.unavailable_reason(case, contender)
    if reason is not None:
        pytest.skip(reason)
    batch = make_batch(case)
    step = make_step(contenders.build(batch, contender), batch)
    if case.device == "cuda":
        inner = step

        def step():
            out = inner()
            torch.cuda.synchronize()
            return out

    first = step()  # warm-up (Triton autotuning, torch.compile) and the checked output
    error, kind = error_of(case, first.double(), _reference(case))
    assert error <= tolerance(case), f"{contender}: {kind} {error:.2e} > {tolerance(case):.0e}"
    benchmark.extra_info.update(
        error=error,
        error_kind=kind,
        tokens=case.tokens,
        scored_tokens=batch.scored_tokens(),
        head=case.head.describe(),
        variant=case.variant,
    )
    benchmark.pedantic(step, rounds=PRESET.timing.min_repeats + 1, iterations=1, warmup_rounds=0)
