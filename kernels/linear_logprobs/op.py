"""``linear_logprobs``: the public function, the row plan, and the ``torch.library`` custom ops.

The public function does three cheap O(tokens) steps around two custom ops:

1. **Plan.** Output position ``p`` reads hidden row ``rows_all[p]`` (with ``shift``, position ``(r, t)`` reads
   row ``r*T + t`` and target ``targets[r, t+1]``; ``hidden`` is never copied). A stable sort puts the
   non-ignored positions first; ``n_valid`` stays a device tensor, so the plan never syncs with the host
   (the ``"chunked"`` / ``"torch"`` backends read it to size their GEMMs; ``"triton"`` never does).
2. **Ops.** ``prefuse::linear_logprobs_fwd`` computes ``(logp, lse, stats)`` over the sorted rows with the
   chosen backend; its registered autograd calls ``prefuse::linear_logprobs_bwd``, which recomputes logits and
   returns the gradients that are needed (of ``logp`` and, when requested, of the entropy). Both have fake
   implementations, so ``torch.compile`` traces the op without a graph break. Both run with autocast off:
   logits and sums accumulate in fp32 whatever autocast is active.
3. **Scatter.** The sorted values go back to their positions (ignored ones are 0 / False).

Backends (each module provides ``forward`` and ``backward`` with the same arguments):

- ``"chunked"`` (``chunked_triton.py``, the CUDA default): per chunk of scored rows a cuBLAS GEMM for the
  logits and one Triton pass over them (``chunked.py`` is the driver);
- ``"torch"`` (``torch_twin.py``, the default elsewhere): the same driver with the passes in PyTorch;
- ``"triton"`` (``triton_fwd.py`` / ``triton_bwd.py``): all-fused Triton kernels, no host sync.

Interface::

    forward(hidden2d, weight, bias, rows, targets, n_valid, *, softcap, inv_temperature, logit_scale, with_stats)
        -> (logp (N,), lse (N,), stats (N, 4) or (0,))    float32, 0 past n_valid
    backward(hidden2d, weight, bias, rows, targets, n_valid, lse, entropy, grad_logp, grad_entropy, *,
             softcap, inv_temperature, logit_scale, need_hidden, need_weight, need_bias, deterministic,
             filter_eps)
        -> (grad_hidden2d | None, grad_weight | None, grad_bias | None)

Transforms: reverse-mode autograd (``.backward()``, ``torch.autograd.grad``), ``torch.compile`` and
``torch.func.vmap`` on its own (PyTorch runs the op once per batch entry; the target-range check is skipped,
so an out-of-range target gives NaN) are supported. Forward-mode AD (``torch.autograd.forward_ad``,
``torch.func.jvp`` / ``jacfwd``) and the ``torch.func`` gradient transforms (``grad``, ``vjp``, ``jacrev``) are
not: the op raises ``NotImplementedError`` saying so, rather than returning a zero tangent or failing inside
PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as forward_ad
from prefuse.kernels.linear_logprobs import torch_twin
from prefuse.kernels.linear_logprobs.validate import (
    OUTPUTS,
    host_reads_allowed,
    validate_arguments,
    validate_outputs,
    validate_targets,
)
from torch import Tensor


class TokenOutputs(NamedTuple):
    """Per-token outputs of ``linear_logprobs(..., outputs=...)``; a field not requested is None.

    All have the shape of the log-probs and are 0 (``is_top1``: False) at ignored positions.
    """

    logp: Tensor
    """float32 ``log p(target)``, differentiable."""
    entropy: Tensor | None = None
    """float32 ``H = lse(z) - sum_j p_j z_j``, differentiable (``dH/dz_j = -p_j (log p_j + H)``)."""
    log_sum_sq_probs: Tensor | None = None
    """float32 ``log sum_j p_j^2``, no gradient."""
    mean_logits: Tensor | None = None
    """float32 ``mean_j z_j`` over the vocabulary, no gradient."""
    is_top1: Tensor | None = None
    """bool: the target is the first argmax of ``z``."""


def _forward_impl(backend: str) -> Callable:
    if backend == "torch":
        return torch_twin.forward
    if backend == "chunked":
        from prefuse.kernels.linear_logprobs import chunked_triton

        return chunked_triton.forward
    from prefuse.kernels.linear_logprobs import triton_fwd

    return triton_fwd.forward


def _backward_impl(backend: str) -> Callable:
    if backend == "torch":
        return torch_twin.backward
    if backend == "chunked":
        from prefuse.kernels.linear_logprobs import chunked_triton

        return chunked_triton.backward
    from prefuse.kernels.linear_logprobs import triton_bwd

    return triton_bwd.backward


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        try:
            import triton  # noqa: F401
        except ImportError:  # pragma: no cover - triton is a dependency where it installs
            return "torch"
        return "chunked"
    if backend in ("triton", "chunked"):
        try:
            import triton  # noqa: F401
        except ImportError as err:  # pragma: no cover - triton is a dependency where it installs
            raise ValueError(f"backend={backend!r} needs the triton package, which is not installed") from err
        if device.type == "cpu":
            from triton import knobs

            if not knobs.runtime.interpret:
                raise ValueError(
                    f"backend={backend!r} on CPU tensors runs under the Triton interpreter: set TRITON_INTERPRET=1 "
                    "before importing prefuse, or use backend='torch'"
                )
    return backend


def _call_forward(backend, hidden2d, weight, bias, rows, targets, n_valid, softcap, inv_temperature, logit_scale,
                  with_stats):  # fmt: skip
    impl = _forward_impl(backend)
    with torch.autocast(hidden2d.device.type, enabled=False):
        return impl(
            hidden2d, weight, bias, rows, targets, n_valid, softcap=softcap, inv_temperature=inv_temperature,
            logit_scale=logit_scale, with_stats=with_stats,
        )  # fmt: skip


def _call_backward(backend, hidden2d, weight, bias, rows, targets, n_valid, lse, entropy, grad_logp, grad_entropy,
                   options):  # fmt: skip
    impl = _backward_impl(backend)
    with torch.autocast(hidden2d.device.type, enabled=False):
        return impl(
            hidden2d, weight, bias, rows, targets, n_valid, lse, entropy, grad_logp, grad_entropy, **options
        )


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
    logit_scale: float,
    with_stats: bool,
    backend: str,
    deterministic: bool,
    filter_eps: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(logp, lse, stats)``; ``stats`` is ``(N, 4)`` with ``with_stats``, else empty."""
    return _call_forward(backend, hidden2d, weight, bias, rows, targets, n_valid, softcap, inv_temperature,
                         logit_scale, with_stats)  # fmt: skip


@_fwd_op.register_fake
def _(hidden2d, weight, bias, rows, targets, n_valid, softcap, inv_temperature, logit_scale, with_stats, backend,
      deterministic, filter_eps):  # fmt: skip
    n_rows = rows.shape[0]
    vector = hidden2d.new_empty(n_rows, dtype=torch.float32)
    stats = hidden2d.new_empty((n_rows, 4) if with_stats else (0,), dtype=torch.float32)
    return vector, torch.empty_like(vector), stats


@torch.library.custom_op("prefuse::linear_logprobs_bwd", mutates_args=())
def _bwd_op(
    hidden2d: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    rows: Tensor,
    targets: Tensor,
    n_valid: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    grad_logp: Tensor,
    grad_entropy: Tensor | None,
    softcap: float | None,
    inv_temperature: float,
    logit_scale: float,
    backend: str,
    deterministic: bool,
    filter_eps: float | None,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(grad_hidden2d, grad_weight, grad_bias)``; an unneeded one is an empty tensor."""
    options = dict(
        softcap=softcap, inv_temperature=inv_temperature, logit_scale=logit_scale, need_hidden=need_hidden,
        need_weight=need_weight, need_bias=need_bias, deterministic=deterministic, filter_eps=filter_eps,
    )  # fmt: skip
    grads = _call_backward(backend, hidden2d, weight, bias, rows, targets, n_valid, lse, entropy, grad_logp,
                           grad_entropy, options)  # fmt: skip
    return tuple(g if g is not None else hidden2d.new_empty(0) for g in grads)  # type: ignore[return-value]


@_bwd_op.register_fake
def _(hidden2d, weight, bias, rows, targets, n_valid, lse, entropy, grad_logp, grad_entropy, softcap,
      inv_temperature, logit_scale, backend, deterministic, filter_eps, need_hidden, need_weight,
      need_bias):  # fmt: skip
    def like(source, needed):
        return torch.empty_like(source) if needed else hidden2d.new_empty(0)

    return like(hidden2d, need_hidden), like(weight, need_weight), like(bias, need_bias)


def _setup_context(ctx, inputs, output):
    hidden2d, weight, bias, rows, targets, n_valid, softcap, inv_temperature, logit_scale, with_stats = (
        inputs[:10]
    )
    backend, deterministic, filter_eps = inputs[10:]
    entropy = output[2][:, 0].contiguous() if with_stats else None
    ctx.save_for_backward(hidden2d, weight, bias, rows, targets, n_valid, output[1], entropy)
    ctx.options = (softcap, inv_temperature, logit_scale, backend, deterministic, filter_eps)
    ctx.with_stats = with_stats


def _backward(ctx, grad_logp, _grad_lse, grad_stats):
    hidden2d, weight, bias, rows, targets, n_valid, lse, entropy = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_entropy = None
    if ctx.with_stats and grad_stats is not None:
        grad_entropy = grad_stats[:, 0].float().contiguous()
    grad_logp = grad_logp.float().contiguous() if grad_logp is not None else torch.zeros_like(lse)
    grad_h, grad_w, grad_b = _bwd_op(
        hidden2d, weight, bias, rows, targets, n_valid, lse, entropy if grad_entropy is not None else None,
        grad_logp, grad_entropy, *ctx.options, need_hidden, need_weight, need_bias,
    )  # fmt: skip
    return (
        grad_h if need_hidden else None,
        grad_w if need_weight else None,
        grad_b if need_bias else None,
        *([None] * 10),
    )


torch.library.register_autograd("prefuse::linear_logprobs_fwd", _backward, setup_context=_setup_context)


def _only_vmap_active() -> bool:
    """Whether every active ``torch.func`` transform is a ``vmap`` (the op then runs once per batch entry)."""
    from torch._C._functorch import TransformType, get_interpreter_stack

    return all(level.key() == TransformType.Vmap for level in get_interpreter_stack() or ())


def _refuse_unsupported_transforms(*tensors: Tensor | None) -> None:
    """Forward-mode AD and the ``torch.func`` transforms would silently get a zero tangent or fail deep inside
    PyTorch: say so instead."""
    if torch._C._are_functorch_transforms_active() and not _only_vmap_active():
        raise NotImplementedError(
            "linear_logprobs does not support the torch.func transforms grad, vjp, jacrev, jvp and jacfwd "
            "(vmap alone is supported): use torch.autograd.grad / .backward() for gradients"
        )
    if forward_ad._current_level >= 0 and any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors
    ):
        raise NotImplementedError(
            "linear_logprobs does not support forward-mode AD (torch.autograd.forward_ad dual tensors): "
            "use reverse mode (torch.autograd.grad / .backward())"
        )


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


def _nonfinite_rows(hidden2d: Tensor, rows: Tensor, n_valid: Tensor) -> Tensor:
    """Sorted positions that are scored and whose hidden row holds a NaN or an infinity (no host sync)."""
    scored = torch.arange(rows.numel(), device=rows.device) < n_valid
    row_max = torch.linalg.vector_norm(hidden2d.detach(), ord=float("inf"), dim=-1)  # NaN/inf survive the max
    return scored & ~row_max.isfinite().index_select(0, rows)


def _scatter_back(sorted_values: Tensor, order: Tensor, bad: Tensor, out_shape) -> Tensor:
    """``sorted_values`` (``(N,)`` or ``(N, k)``) back to the output order; ``bad`` positions become NaN."""
    index = order if sorted_values.dim() == 1 else order[:, None].expand_as(sorted_values)
    values = torch.zeros_like(sorted_values).scatter(0, index, sorted_values)
    if sorted_values.dim() > 1:
        bad = bad[:, None]
    return torch.where(bad, torch.nan, values).reshape(*out_shape, *sorted_values.shape[1:])


def _out_shape(targets_shape, shift: bool) -> tuple[int, ...]:
    return (*targets_shape[:-1], max(targets_shape[-1] - 1, 0)) if shift else tuple(targets_shape)


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
    logp_sorted = torch.where(_nonfinite_rows(hidden2d, rows, n_valid), torch.nan, logp_sorted)
    return _scatter_back(logp_sorted, order, out_of_range, _out_shape(targets_shape, shift))


def _token_outputs(logp: Tensor, stats_sorted: Tensor, outputs: tuple[str, ...], order: Tensor,
                   out_of_range: Tensor, out_shape, hidden2d: Tensor, rows: Tensor, n_valid: Tensor) -> TokenOutputs:  # fmt: skip
    """The requested per-token outputs, with the log-probs' conventions for ignored and non-finite positions."""
    nonfinite = _nonfinite_rows(hidden2d, rows, n_valid)
    entropy = stats_sorted[:, 0]
    others = stats_sorted[:, 1:].detach()  # log_sum_sq_probs, mean_logits, is_top1 carry no gradient
    values = _scatter_back(torch.where(nonfinite[:, None], torch.nan, others), order, out_of_range, out_shape)
    fields = {
        "entropy": _scatter_back(torch.where(nonfinite, torch.nan, entropy), order, out_of_range, out_shape),
        "log_sum_sq_probs": values[..., 0],
        "mean_logits": values[..., 1],
        "is_top1": values[..., 2] == 1.0,  # NaN (bad position) compares False
    }
    return TokenOutputs(logp, **{name: fields[name] for name in outputs})


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
    logit_scale: float = 1.0,
    outputs: tuple[str, ...] = (),
    filter_eps: float | None = None,
    backend: str = "auto",
    deterministic: bool = False,
) -> Tensor | TokenOutputs:
    """Per-token ``log p(target)`` of the linear head ``hidden @ weight.T + bias``, without the logits.

    ``logp[..., t] = z[targets[..., t]] - logsumexp(z)`` with ``z = softcap(s * (hidden[..., t, :] W^T + b)) / T``,
    where ``s`` is ``logit_scale`` and ``softcap(x) = c * tanh(x / c)`` (Gemma-2; applied after the logit scale and
    before the temperature ``T``).

    Args:
        hidden: ``(..., D)`` float32 / bfloat16 / float16 hidden states.
        weight: ``(V, D)`` lm-head, same dtype and device as ``hidden``.
        targets: ``(...)`` integer token ids; entries equal to ``ignore_index`` are skipped (no matmul work).
        bias: optional ``(V,)``.
        ignore_index: the id of ignored positions (prompt, padding); must fit in int64.
        shift: if True, ``hidden[..., t, :]`` predicts ``targets[..., t + 1]`` and the output is ``(..., T-1)``;
            no copy of ``hidden`` is made.
        temperature: finite, > 0; logits are divided by it.
        softcap: None or finite > 0.
        logit_scale: finite, > 0; multiplies the raw logits before the softcap.
        outputs: names from ``("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")`` to compute in the
            same pass; when non-empty the result is a ``TokenOutputs``.
        filter_eps: None (exact) or ``eps`` in (0, 1): the backward skips vocabulary blocks of a chunk whose
            probabilities are all below ``eps`` and that hold no target (``"chunked"`` / ``"torch"`` only; the
            error bound is in ``chunked.py``).
        backend: ``"auto"`` (``"chunked"`` on CUDA, ``"torch"`` elsewhere), ``"chunked"`` (cuBLAS GEMMs and
            Triton passes), ``"triton"`` (all-fused Triton kernels, never syncs with the host), or ``"torch"``.
            On CPU tensors, ``"chunked"`` and ``"triton"`` need ``TRITON_INTERPRET=1``.
        deterministic: Triton backward without atomics (bit-reproducible, one more logits recomputation when
            the weight needs a gradient). ``"chunked"`` and ``"torch"`` are always deterministic.

    Returns:
        With ``outputs=()``: float32 log-probabilities, exactly 0.0 at ignored positions. Otherwise a
        ``TokenOutputs`` whose requested fields are filled (0 / False at ignored positions), the rest None.
        Differentiable (log-probs and entropy) in ``hidden``, ``weight`` and ``bias``, each only when it requires
        grad. Extra memory is O(tokens + chunk x V): the forward saves the per-token log-sum-exp (and entropy)
        and the backward recomputes the logits. A scored position whose hidden row holds a NaN or an infinity is
        NaN (is_top1 False) whatever the softcap; ignored positions stay 0. Non-finite ``weight`` / ``bias``
        entries are not checked: they make the affected outputs non-finite, or under a softcap meaningless.

    Raises:
        ValueError: naming the argument, for a bad shape, dtype, device, option or an out-of-range target.
        NotImplementedError: under forward-mode AD or a ``torch.func`` transform other than ``vmap``.
    """
    _refuse_unsupported_transforms(hidden, weight, bias)
    validate_arguments(
        hidden, weight, targets, bias, ignore_index, shift, temperature, softcap, backend,
        logit_scale=logit_scale, filter_eps=filter_eps, deterministic=deterministic,
    )  # fmt: skip
    outputs = validate_outputs(outputs)
    backend = _resolve_backend(backend, hidden.device)
    rows, sorted_targets, n_valid, order, out_of_range = _plan(targets, ignore_index, shift, weight.shape[0])
    hidden2d = _hidden_rows(hidden)
    with_stats = bool(outputs)
    logp_sorted, _, stats_sorted = _fwd_op(
        hidden2d, weight.contiguous(), bias.contiguous() if bias is not None else None, rows, sorted_targets,
        n_valid, None if softcap is None else float(softcap), 1.0 / float(temperature), float(logit_scale),
        with_stats, backend, deterministic, None if filter_eps is None else float(filter_eps),
    )  # fmt: skip
    logp = _unsort(logp_sorted, order, out_of_range, targets.shape, shift, hidden2d, rows, n_valid)
    if not with_stats:
        return logp
    return _token_outputs(logp, stats_sorted.reshape(rows.numel(), 4), outputs, order, out_of_range,
                          _out_shape(targets.shape, shift), hidden2d, rows, n_valid)  # fmt: skip


__all__ = ["OUTPUTS", "TokenOutputs", "linear_logprobs"]
