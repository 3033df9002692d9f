"""The lm-head three ways on the same hidden states: prefuse's fused op, TRL's fused head, full logits.

Each head computes the per-token ``log p(label)`` of a batch of the main job (``hidden (R, T, D)``, the head's
``weight (V, D)``, Hugging Face ``labels (R, T)``, position ``t`` predicting ``labels[:, t+1]``) and its gradient
in ``hidden`` and ``weight`` through ``loss = -Σ log p / n_scored``:

- ``naive``: ``log_softmax(hidden @ weight.T)`` gathered at the labels -- the full ``(tokens × V)`` logits, as
  plain PyTorch computes them;
- ``trl``: ``trl.kernels.chunked_logprob.ChunkedLogProbFunction`` called as TRL's ``add_fused_lm_head`` calls it
  on that device (only the scored positions on a Triton device, every position elsewhere; TRL's vocabulary
  chunk; log-probs only);
- ``fused``: ``prefuse.kernels.linear_logprobs(..., shift=True)``.

``python -m prefuse.alignment.head_comparison FOLDER HEAD STEPS DEVICE`` measures one head in a fresh process on
the inputs saved in ``FOLDER/inputs.pt`` (``save_inputs``): ``STEPS`` forward+backward steps, the time of each
and the growth of peak memory over them (peak resident set size ``VmHWM`` reset through ``/proc/self/clear_refs``
on CPU, ``ru_maxrss`` where that is unavailable; ``torch.cuda.max_memory_allocated`` on CUDA). It writes the
first step's log-probs and gradients to ``FOLDER/HEAD.pt`` and prints its measurements as one JSON line.
``compare`` runs every head that is installed that way and measures each against ``naive``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

HEADS = ("naive", "trl", "fused")
HEAD_NAMES = {"naive": "naive (full logits)", "trl": "TRL 1.16 fused head", "fused": "prefuse fused"}
IGNORE_INDEX = -100


def naive_head(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    from prefuse.kernels.linear_logprobs import naive_linear_logprobs

    return naive_linear_logprobs(hidden, weight, labels, shift=True)


def trl_head(hidden: Tensor, weight: Tensor, labels: Tensor, softcap: float | None = None) -> Tensor:
    """TRL 1.16's fused head (``trl.kernels.chunked_logprob.ChunkedLogProbFunction``) as its ``add_fused_lm_head``
    calls it on that device: the positions before the last predict ``labels[:, 1:]`` in tiles of TRL's vocabulary
    chunk; on a Triton device only the scored positions are projected (``hidden[mask]``), elsewhere every position
    with its label clamped to 0, masked to 0 afterwards. Log-probs ``(rows, T-1)``, 0.0 where not scored."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction, _use_triton
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk

    states, targets = hidden[:, :-1], labels[:, 1:]
    mask = targets != IGNORE_INDEX
    if _use_triton(hidden.device):
        logp = ChunkedLogProbFunction.apply(
            states[mask], weight, None, targets[mask], 1.0, chunk, softcap, 1.0, ()
        )[0]
        return logp.new_zeros(mask.shape).masked_scatter(mask, logp)
    flat_states, flat_targets = states.reshape(-1, states.shape[-1]), targets.clamp(min=0).reshape(-1)
    logp = ChunkedLogProbFunction.apply(
        flat_states, weight, None, flat_targets, 1.0, chunk, softcap, 1.0, ()
    )[0]
    return logp.view(mask.shape).masked_fill(~mask, 0.0)


def fused_head(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    from prefuse.kernels import linear_logprobs

    return linear_logprobs(hidden, weight, labels, shift=True)


HEAD_FUNCTIONS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "naive": naive_head,
    "trl": trl_head,
    "fused": fused_head,
}


def unavailable(head: str) -> str | None:
    """Why ``head`` cannot run here, or None."""
    if head == "trl" and importlib.util.find_spec("trl") is None:
        return "trl is not installed (pip install 'prefuse[trl]')"
    return None


def save_inputs(folder: Path, hidden: Tensor, weight: Tensor, labels: Tensor) -> None:
    """The batch every head is measured on, on CPU, detached."""
    torch.save(
        {"hidden": hidden.detach().cpu(), "weight": weight.detach().cpu(), "labels": labels.cpu()},
        folder / "inputs.pt",
    )


# ---------------------------------------------------------------------------------------------- one head
def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def measure(folder: Path, head: str, steps: int, device: str) -> dict:
    """``steps`` forward+backward steps of ``head`` in this process (module docstring)."""
    inputs = torch.load(folder / "inputs.pt", weights_only=True)
    hidden = inputs["hidden"].to(device).requires_grad_()
    weight = inputs["weight"].to(device).requires_grad_()
    labels = inputs["labels"].to(device)
    n_scored = int((labels[:, 1:] != IGNORE_INDEX).sum())
    fn = HEAD_FUNCTIONS[head]
    if head == "trl":
        trl_head(
            hidden[:1, :2].detach(), weight.detach(), labels[:1, :2]
        )  # imports TRL before the peak is reset
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        clear_refs = _reset_peak()
        base = (
            _rss_kib("VmRSS") if clear_refs else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ) * 1024
    times = []
    for step in range(steps):
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        logp = fn(hidden, weight, labels)
        (-logp.sum() / max(n_scored, 1)).backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if step == 0:
            torch.save(
                {
                    "logp": logp.detach().float().cpu(),
                    "grad_hidden": hidden.grad.float().cpu(),
                    "grad_weight": weight.grad.float().cpu(),
                },
                folder / f"{head}.pt",
            )
    if cuda:
        peak, measure_name = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    elif clear_refs:
        peak, measure_name = _rss_kib("VmHWM") * 1024, "peak RSS (VmHWM)"
    else:
        peak, measure_name = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS (ru_maxrss)"
    steady = times[1:] if len(times) > 1 else times  # step 1 pays one-off allocations
    return {
        "head": head,
        "device": device,
        "seconds_per_step": min(steady),
        "step_seconds": times,
        "peak_growth_bytes": max(peak - base, 0),
        "memory_measure": measure_name,
        "n_scored": n_scored,
        "logp_sum": float(logp.detach().sum()),
    }


# ---------------------------------------------------------------------------------------------- all heads
def _max_abs_diff(a: dict, b: dict) -> dict[str, float]:
    return {key: float((a[key] - b[key]).abs().max()) for key in ("logp", "grad_hidden", "grad_weight")}


def compare(
    folder: Path, steps: int, device: str, on_start: Callable[[str], None] = lambda head: None
) -> dict:
    """Measure every available head in its own fresh process; ``on_start(head)`` before each.

    Returns ``{"heads": {head: measurements}, "skipped": {head: reason}, "max_abs_diff_vs_naive": {head: {"logp",
    "grad_hidden", "grad_weight"}}}``.
    """
    result: dict = {"heads": {}, "skipped": {}, "max_abs_diff_vs_naive": {}}
    for head in HEADS:
        reason = unavailable(head)
        if reason is not None:
            result["skipped"][head] = reason
            continue
        on_start(head)
        cmd = [
            sys.executable,
            "-m",
            "prefuse.alignment.head_comparison",
            str(folder),
            head,
            str(steps),
            device,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"measuring the {head} head failed:\n{done.stderr[-3000:]}")
        result["heads"][head] = json.loads(done.stdout.strip().splitlines()[-1])
    naive = torch.load(folder / "naive.pt", weights_only=True)
    for head in result["heads"]:
        if head != "naive":
            result["max_abs_diff_vs_naive"][head] = _max_abs_diff(
                torch.load(folder / f"{head}.pt", weights_only=True), naive
            )
    return result


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    folder_arg, head_arg, steps_arg, device_arg = sys.argv[1:]
    print(json.dumps(measure(Path(folder_arg), head_arg, int(steps_arg), device_arg)))
