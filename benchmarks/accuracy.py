"""Errors against the float64 reference, so that speed never hides a wrong answer.

The reference rebuilds a case's inputs and computes its workload in float64 from per-token log-probs of the
scored tokens (``providers.reference_logps`` + ``formulas``). A contender's error is the maximum absolute error
of its per-token log-probs (core op) or the relative error of its loss (losses). ``TOLERANCES`` are the
bounds the smoke test and the pytest-benchmark entry assert.
"""

from __future__ import annotations

import torch

from benchmarks import formulas, providers
from benchmarks.inputs import make_batch
from benchmarks.plan import Case

TOLERANCES = {
    # (dtype, "logprobs" | "loss") -> bound. fp32: sums of ~500 log-probs of ~-6 cancel in logπ - logπ_ref.
    ("float32", "logprobs"): 1e-4,
    ("float32", "loss"): 1e-3,
    # bf16: the naive contender computes log_softmax in bf16 (|logits| ~ 8: ~0.03 per token).
    ("bfloat16", "logprobs"): 0.25,
    ("bfloat16", "loss"): 0.1,
    ("float16", "logprobs"): 0.05,
    ("float16", "loss"): 0.05,
}


def reference_output(case: Case) -> torch.Tensor:
    """The case's workload in float64 on its device (per-token log-probs or the loss), on the CPU."""
    batch = make_batch(case)
    with torch.no_grad():
        return formulas.FORMULAS[case.workload](batch, providers.reference_logps).cpu()


def error_of(case: Case, output, reference: torch.Tensor) -> tuple[float, str]:
    """Max absolute error of the log-probs (core op) or relative error of the loss; and what it is."""
    out = torch.as_tensor(output, dtype=torch.float64).cpu()
    if case.workload == "logprobs":
        return float((out - reference).abs().max()), "max abs error of the per-token log-probs"
    return float((out - reference).abs() / reference.abs().clamp(min=1e-30)), "relative error of the loss"


def tolerance(case: Case) -> float:
    return TOLERANCES[(case.head.dtype, "logprobs" if case.workload == "logprobs" else "loss")]
