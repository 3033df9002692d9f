"""``linear_logprobs``: the public function, the row plan, and the ``torch.library`` custom ops.

The public function does three cheap O(tokens) steps around two custom ops:

1. **Plan.** Output position ``p`` reads hidden row ``rows_all[p]`` (with ``shift``, position ``(r, t)`` reads
   row ``r*T + t`` and target ``targets[r, t+1]``; ``hidden`` is never copied). A stable sort puts the
   non-ignored positions first; ``n_valid`` stays a device tensor, so nothing syncs with the host and the
   plan is CUDA-graph safe.
2. **Ops.** ``prefuse::linear_logprobs_fwd`` computes ``(logp, lse)`` over the sorted rows with the chosen
   backend (Triton kernels or the PyTorch twin); its registered autograd calls
   ``prefuse::linear_logprobs_bwd``, which recomputes logits and returns the gradients that are needed.
   Both have fake implementations, so ``torch.compile`` traces the op without a graph break.
3. **Scatter.** The sorted log-probs go back to their positions (ignored ones are 0.0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from prefuse.kernels.linear_logprobs import torch_twin
from prefuse.kernels.linear_logprobs.validate import host_reads_allowed, validate_arguments, validate_targets
from torch import Tensor


def _forward_impl(backend: str) -> Callable:
    if backend == "torch":
        return torch_twin.forward
    from prefuse.kernels.linear_logprobs import triton_fwd

    return triton_fwd.forward


def _backward_impl(backend: str) -> Callable:
    if backend == "torch":
        return torch_twin.backward
    from prefuse.kernels.linear_logprobs import triton_bwd

    return triton_bwd.backward


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as err:  # pragma: no cover - triton is a dependency where it installs
            raise ValueError("backend='triton' needs the triton package, which is not installed") from err
        if device.type == "cpu":
            from triton import knobs

            if not knobs.runtime.interpret:
                raise ValueError(
                    "backend='triton' on CPU tensors runs under the Triton interpreter: set TRITON_INTERPRET=1 "
                    "before importing prefuse, or use backend='torch'"
                )
    return backend


@torch.library.custom_op("prefuse::linear_logprobs_fwd", mutates_args=())
def _fwd_op(
    hidden2d: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    rows: Tensor,
    targets: Tensor,
    n_valid: Tensor,
    softcap: float | None,
    inv_temperature: float,
    backend: str,
    deterministic: bool,
) -> tuple[Tensor, Tensor]:
    return _forward_impl(backend)(
        hidden2d, weight, bias, rows, targets, n_valid, softcap=softcap, inv_temperature=inv_temperature
    )


@_fwd_op.register_fake
def _(hidden2d, weight, bias, rows, targets, n_valid, softcap, inv_temperature, backend, deterministic):
    n_rows = rows.shape[0]
    return hidden2d.new_empty(n_rows, dtype=torch.float32), hidden2d.new_empty(n_rows, dtype=torch.float32)


@torch.library.custom_op("prefuse::linear_logprobs_bwd", mutates_args=())
def _bwd_op(
    hidden2d: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    rows: Tensor,
    targets: Tensor,
    n_valid: Tensor,
    lse: Tensor,
    grad: Tensor,
    softcap: float | None,
    inv_temperature: float,
    backend: str,
    deterministic: bool,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(grad_hidden2d, grad_weight, grad_bias)``; an unneeded one is an empty tensor."""
    grads = _backward_impl(backend)(
        hidden2d, weight, bias, rows, targets, n_valid, lse, grad,
        softcap=softcap, inv_temperature=inv_temperature,
        need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias, deterministic=deterministic,
    )  # fmt: skip
    return tuple(g if g is not None else hidden2d.new_empty(0) for g in grads)  # type: ignore[return-value]


@_bwd_op.register_fake
def _(hidden2d, weight, bias, rows, targets, n_valid, lse, grad, softcap, inv_temperature, backend,
      deterministic, need_hidden, need_weight, need_bias):  # fmt: skip
    def like(source, needed):
        return torch.empty_like(source) if needed else hidden2d.new_empty(0)

    return like(hidden2d, need_hidden), like(weight, need_weight), like(bias, need_bias)


def _setup_context(ctx, inputs, output):
    hidden2d, weight, bias, rows, targets, n_valid, softcap, inv_temperature, backend, deterministic = inputs
    ctx.save_for_backward(hidden2d, weight, bias, rows, targets, n_valid, output[1])
    ctx.options = (softcap, inv_temperature, backend, deterministic)


def _backward(ctx, grad_logp, _grad_lse):
    hidden2d, weight, bias, rows, targets, n_valid, lse = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_h, grad_w, grad_b = _bwd_op(
        hidden2d, weight, bias, rows, targets, n_valid, lse, grad_logp.float().contiguous(), *ctx.options,
        need_hidden, need_weight, need_bias,
    )  # fmt: skip
    return (
        grad_h if need_hidden else None,
        grad_w if need_weight else None,
        grad_b if need_bias else None,
        None, None, None, None, None, None, None,
    )  # fmt: skip


torch.library.register_autograd("prefuse::linear_logprobs_fwd", _backward, setup_context=_setup_context)


def _plan(targets: Tensor, ignore_index: int, shift: bool, vocab: int):
    """Sorted rows/targets (non-ignored first), the count of non-ignored rows, and the output order.

    Returns ``(rows, sorted_targets, n_valid, order, out_of_range)``; ``order[i]`` is the output position of
    sorted row ``i``; ``out_of_range`` marks output positions whose non-ignored target lies outside
    ``[0, vocab)`` (their target is clamped for the kernels and their output set to NaN).
    """
    if shift:
        lead, steps = targets.shape[:-1].numel(), targets.shape[-1]
        flat = targets[..., 1:].reshape(-1).long()
        rows_all = (
            torch.arange(lead, device=targets.device)[:, None] * steps
            + torch.arange(max(steps - 1, 0), device=targets.device)[None, :]  # T = 0: no position
        ).reshape(-1)
    else:
        flat = targets.reshape(-1).long()
        rows_all = torch.arange(flat.numel(), device=targets.device)
    valid = flat != ignore_index
    if host_reads_allowed(targets.device):
        validate_targets(flat, valid, vocab)
    out_of_range = valid & ((flat < 0) | (flat >= vocab))
    order = torch.argsort((~valid).to(torch.int8), stable=True)
    n_valid = valid.sum(dtype=torch.int64).reshape(1)
    return rows_all[order], flat.clamp(0, vocab - 1)[order], n_valid, order, out_of_range


def _hidden_rows(hidden: Tensor) -> Tensor:
    """``hidden`` as ``(M, D)`` rows with unit stride along ``D`` (a view whenever possible, never a gather)."""
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    return hidden2d if hidden2d.stride(-1) == 1 else hidden2d.contiguous()


def _unsort(
    logp_sorted: Tensor,
    order: Tensor,
    out_of_range: Tensor,
    targets_shape,
    shift: bool,
    hidden2d: Tensor,
    rows: Tensor,
    n_valid: Tensor,
) -> Tensor:
    """Sorted log-probs back to their output positions: ignored ones 0.0; NaN for an out-of-range target and for
    a scored position whose hidden row holds a NaN or an infinity.

    The last rule makes a non-finite hidden state a NaN whatever the options: without it an infinite entry can
    come out as ``-inf`` or, under a softcap (which saturates ``±inf`` logits to ``±c``), as a finite and
    meaningless number. It costs one read of the hidden rows (a per-row max-abs reduction: O(tokens) memory,
    no host sync).
    """
    out_shape = (*targets_shape[:-1], max(targets_shape[-1] - 1, 0)) if shift else tuple(targets_shape)
    scored = torch.arange(rows.numel(), device=rows.device) < n_valid
    row_max = torch.linalg.vector_norm(hidden2d.detach(), ord=float("inf"), dim=-1)  # NaN/inf survive the max
    nonfinite = scored & ~row_max.isfinite().index_select(0, rows)
    logp_sorted = torch.where(nonfinite, torch.nan, logp_sorted)
    logp = torch.zeros_like(logp_sorted).scatter(0, order, logp_sorted)
    logp = torch.where(out_of_range, torch.nan, logp)
    return logp.reshape(out_shape)


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    shift: bool = False,
    temperature: float = 1.0,
    softcap: float | None = None,
    backend: str = "auto",
    deterministic: bool = False,
) -> Tensor:
    """Per-token ``log p(target)`` of the linear head ``hidden @ weight.T + bias``, without the logits.

    ``logp[..., t] = z[targets[..., t]] - logsumexp(z)`` with ``z = softcap(hidden[..., t, :] W^T + b) / T``,
    where ``softcap(l) = c * tanh(l / c)`` (Gemma-2; applied before the temperature ``T``).

    Args:
        hidden: ``(..., D)`` float32 / bfloat16 / float16 hidden states.
        weight: ``(V, D)`` lm-head, same dtype and device as ``hidden``.
        targets: ``(...)`` integer token ids; entries equal to ``ignore_index`` are skipped (no matmul work).
        bias: optional ``(V,)``.
        ignore_index: the id of ignored positions (prompt, padding).
        shift: if True, ``hidden[..., t, :]`` predicts ``targets[..., t + 1]`` and the output is ``(..., T-1)``;
            no copy of ``hidden`` is made.
        temperature: finite, > 0; logits are divided by it.
        softcap: None or finite > 0.
        backend: ``"auto"`` (Triton on CUDA, the PyTorch twin elsewhere), ``"triton"`` (CPU tensors need
            ``TRITON_INTERPRET=1``), or ``"torch"``.
        deterministic: Triton backward without atomics (bit-reproducible, one more logits recomputation when
            the weight needs a gradient). The PyTorch twin is always deterministic.

    Returns:
        float32 log-probabilities, exactly 0.0 at ignored positions. Differentiable in ``hidden``, ``weight``
        and ``bias``, each only when it requires grad. Extra memory is O(tokens): the forward saves the
        per-token log-sum-exp and the backward recomputes logit tiles. A scored position whose hidden row holds
        a NaN or an infinity is NaN (whatever the softcap, which would otherwise saturate an infinite logit to
        a finite value); ignored positions stay 0.0. Non-finite ``weight`` / ``bias`` entries are not checked:
        they make the affected outputs non-finite, or under a softcap meaningless.

    Raises:
        ValueError: naming the argument, for a bad shape, dtype, device, option or an out-of-range target.
    """
    validate_arguments(hidden, weight, targets, bias, ignore_index, shift, temperature, softcap, backend)
    backend = _resolve_backend(backend, hidden.device)
    rows, sorted_targets, n_valid, order, out_of_range = _plan(targets, ignore_index, shift, weight.shape[0])
    hidden2d = _hidden_rows(hidden)
    logp_sorted, _ = _fwd_op(
        hidden2d, weight.contiguous(), bias.contiguous() if bias is not None else None, rows, sorted_targets,
        n_valid, None if softcap is None else float(softcap), 1.0 / float(temperature), backend, deterministic,
    )  # fmt: skip
    return _unsort(logp_sorted, order, out_of_range, targets.shape, shift, hidden2d, rows, n_valid)
