r"""Vocab-parallel ``linear_logprobs``: the lm-head's vocabulary sharded over a process group (tensor
parallelism).

Rank ``r`` holds rows ``[v_start_r, v_end_r)`` of the head ``W`` (and of its bias); the shards of the group
partition ``[0, V)``. ``hidden`` and the *global* ``targets`` are replicated: the same on every rank, as for
Megatron-LM's vocab-parallel cross entropy. Per token, with ``z`` the scaled logits of the row::

    lse_r = logsumexp_{v in shard r} z_v          the shard's partial log-sum-exp
    zt_r  = z_t if v_start_r <= t < v_end_r else 0 the target logit, found on exactly one rank
    lse   = logsumexp_r lse_r,   logp = sum_r zt_r - lse

**Forward.** Each rank runs the single-device backend of ``op.py`` (``torch_twin.forward`` or
``triton_fwd.forward``, chosen as ``linear_logprobs`` chooses) on its shard, over the row plan of ``op._plan``
(sorted rows, ignored tokens last and free), with *shard-local* targets ``t - v_start_r``. A local target
outside ``[0, V_r)`` contributes 0 to the target logit in both backends, so ``zt_r = logp_r + lse_r``. One
all-gather of the ``(2, tokens)`` pair ``(lse_r, zt_r)`` then gives ``lse`` and ``logp``; a gather (rather
than a max and a sum all-reduce) makes the result bit-identical on every rank and independent of reduction
order.
Communication is O(tokens) per rank; nothing of size tokens x vocab is built or sent.

**Backward.** ``dz_v = g (onehot(t)_v - exp(z_v - lse))`` for every column, with the *global* ``lse``: the
backend backward run on the shard with the global ``lse`` and the local targets returns exactly the shard's
part, i.e. its own ``grad_weight`` / ``grad_bias`` rows (kept local: nothing to communicate) and the partial
``grad_hidden_r = sum_{v in shard} dl_v W_v``.

**Autograd convention (hidden).** The hidden gradient is **summed over the group inside this op's backward**
(one all-reduce, in fp32), so every rank's ``hidden.grad`` is the full gradient of the replicated input. This
is Megatron-LM's convention for a column-parallel lm-head feeding ``vocab_parallel_cross_entropy`` (there the
all-reduce sits in the linear's ``copy_to_tensor_model_parallel_region``; fusing head and loss moves it here).
It requires the upstream gradient of ``logp`` to be the same on every rank, which holds when every rank
computes the same loss from the (identical) ``logp``; do not all-reduce ``hidden``'s gradient again over the
tensor-parallel group.
"""

from __future__ import annotations

import math
import numbers
import struct

import torch
import torch.distributed as dist
from prefuse.kernels.linear_logprobs import op
from prefuse.kernels.linear_logprobs.validate import host_reads_allowed, validate_arguments
from torch import Tensor


def _world(group) -> int:
    """Group size; 1 when ``torch.distributed`` is not initialised (a single, whole-vocabulary shard)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _all_gather(tensor: Tensor, group, world: int) -> Tensor:
    """``(world, *tensor.shape)``: every rank's ``tensor``, in rank order."""
    if world == 1:
        return tensor.unsqueeze(0)
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


def _collective_device(hidden, group) -> torch.device:
    """Where this rank's agreement tensor lives: ``hidden``'s device, or the group backend's when ``hidden`` is
    not a tensor (a rank whose arguments are wrong still joins the agreement)."""
    if isinstance(hidden, Tensor):
        return hidden.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _float_bits(value: float | None) -> int:
    """``value``'s IEEE-754 float64 bit pattern (an exact int64 image for the agreement table); NaN for None."""
    return struct.unpack("<q", struct.pack("<d", math.nan if value is None else float(value)))[0]


def _targets_fingerprint(targets: Tensor, ignore_index: int, vocab_size: int) -> tuple[Tensor, Tensor]:
    """Two int64 sums of ``targets`` (ignored positions as -1, out-of-range ids as ``vocab_size``): plain and
    weighted by position (weights 1..65521), so a changed id, a changed ignore mask or two swapped ids changes
    them. Bounded by ``numel * 65521 * vocab_size``: exact in int64 far beyond any real batch."""
    flat = targets.reshape(-1)
    ids = torch.where(flat == ignore_index, -1, flat.clamp(min=-1, max=vocab_size)).to(torch.int64)
    weights = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64) % 65521 + 1
    return ids.sum(), (ids * weights).sum()


def _agree(error: ValueError | None, args: dict | None, targets, device, group, world) -> None:
    """Every rank of ``group`` checks every rank's arguments, so all raise the same ``ValueError`` together
    (none is left waiting in the op's collectives).

    One all-gather of a small int64 row per rank -- whether its own checks passed, its shard, its options (as
    exact bit patterns) and a fingerprint of its targets -- and one host read; when a rank's own checks
    failed, its message is all-gathered too (``all_gather_object``, on that failure path only). Checked
    across ranks: the shards partition ``[0, vocab_size)``; ``vocab_size``, ``shift``, ``ignore_index``,
    ``temperature``, ``softcap`` and the targets (count and fingerprint) are the same on every rank.
    """
    fields = ("vocab_start", "vocab_end", "vocab_size", "n_targets", "shift", "ignore_index", "temperature",
              "softcap", "targets_sum", "targets_weighted_sum")  # fmt: skip
    row = [0] * (1 + len(fields))
    if error is None:
        plain, weighted = _targets_fingerprint(targets, args["ignore_index"], args["vocab_size"])
        row = [1, args["vocab_start"], args["vocab_end"], args["vocab_size"], targets.numel(), int(args["shift"]),
               int(args["ignore_index"]), _float_bits(args["temperature"]), _float_bits(args["softcap"]), 0, 0]  # fmt: skip
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    if error is None:
        mine[-2], mine[-1] = plain, weighted  # on the device: no host read of the targets before the gather
    rows = _all_gather(mine, group, world).tolist()
    if not all(r[0] for r in rows):
        messages = [None] * world
        dist.all_gather_object(messages, None if error is None else str(error), group=group)
        if error is not None:
            raise error
        failed = [rank for rank, r in enumerate(rows) if not r[0]]
        raise ValueError(
            f"vocab_parallel_linear_logprobs: the arguments of rank {failed[0]} of the process group are invalid "
            f"({messages[failed[0]]}); every rank raises"
        )
    table = [dict(zip(fields, r[1:])) for r in rows]
    for name in ("vocab_size", "shift", "ignore_index", "temperature", "softcap"):
        values = [t[name] for t in table]
        if len(set(values)) > 1:
            if name in ("temperature", "softcap"):
                values = [struct.unpack("<d", struct.pack("<q", v))[0] for v in values]
                values = [None if math.isnan(v) else v for v in values]
            raise ValueError(
                f"{name} must be the same on every rank of the process group; ranks have {values}"
            )
    counts = [t["n_targets"] for t in table]
    if len(set(counts)) > 1:
        raise ValueError(
            f"targets must be replicated over the process group; ranks hold {counts} target positions"
        )
    if len({(t["targets_sum"], t["targets_weighted_sum"]) for t in table}) > 1:
        raise ValueError(
            "targets must be replicated over the process group (the same ids on every rank); the ranks' targets "
            "differ"
        )
    shards = [(t["vocab_start"], t["vocab_end"]) for t in table]
    vocab_size = table[0]["vocab_size"]
    cursor = 0
    for start, end in sorted(shards):
        if start != cursor:
            what = "overlap" if start < cursor else "leave a gap"
            raise ValueError(
                f"the vocab shards {shards} (rank order) {what} at {min(start, cursor)}: they must partition "
                f"[0, vocab_size={vocab_size})"
            )
        cursor = end
    if cursor != vocab_size:
        raise ValueError(
            f"the vocab shards {shards} (rank order) cover [0, {cursor}), not [0, vocab_size={vocab_size})"
        )


def _check_arguments(
    hidden,
    weight,
    targets,
    bias,
    ignore_index,
    shift,
    temperature,
    softcap,
    backend,
    deterministic,
    vocab_start,
    vocab_size,
    world,
) -> tuple[int, int, str]:
    """This rank's own checks: ``linear_logprobs``'s on the shard, then the shard's place in the vocabulary.
    Returns ``(vocab_start, vocab_end, resolved backend)``."""
    validate_arguments(
        hidden,
        weight,
        targets,
        bias,
        ignore_index,
        shift,
        temperature,
        softcap,
        backend,
        deterministic=deterministic,
    )
    for name, value in (("vocab_start", vocab_start), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an int, got {value!r}")
    vocab_start, vocab_size = int(vocab_start), int(vocab_size)
    vocab_end = vocab_start + weight.shape[0]
    if vocab_start < 0 or vocab_end > vocab_size:
        raise ValueError(
            f"weight's shard [vocab_start={vocab_start}, {vocab_end}) must lie inside "
            f"[0, vocab_size={vocab_size})"
        )
    if world == 1 and (vocab_start, vocab_end) != (0, vocab_size):
        raise ValueError(
            f"without a process group of several ranks the shard must be the whole vocabulary; got "
            f"[{vocab_start}, {vocab_end}) of vocab_size={vocab_size}"
        )
    return vocab_start, vocab_end, op._resolve_backend(backend, hidden.device)


class _VocabParallelLogprobs(torch.autograd.Function):
    """Sorted-row log-probs over a sharded head; see the module docstring for both passes."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, rows, local_targets, n_valid, group, world, options):
        softcap, inv_temperature, backend, _ = options
        logp_r, lse_r, _ = op._call_forward(
            backend, hidden2d, weight, bias, rows, local_targets, n_valid, softcap, inv_temperature, 1.0, False,
        )  # fmt: skip
        parts = _all_gather(torch.stack([lse_r, logp_r + lse_r]), group, world)  # (world, 2, N)
        valid = torch.arange(rows.numel(), device=rows.device) < n_valid
        lse = torch.where(valid, torch.logsumexp(parts[:, 0], dim=0), 0.0)
        logp = torch.where(valid, parts[:, 1].sum(0) - lse, 0.0)
        ctx.save_for_backward(hidden2d, weight, bias, rows, local_targets, n_valid, lse)
        ctx.group, ctx.world, ctx.options = group, world, options
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden2d, weight, bias, rows, local_targets, n_valid, lse = ctx.saved_tensors
        softcap, inv_temperature, backend, deterministic = ctx.options
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        options = dict(
            softcap=softcap, inv_temperature=inv_temperature, logit_scale=1.0, need_hidden=need_hidden,
            need_weight=need_weight, need_bias=need_bias and bias is not None, deterministic=deterministic,
            filter_eps=None,
        )  # fmt: skip
        grad_h, grad_w, grad_b = op._call_backward(
            backend, hidden2d, weight, bias, rows, local_targets, n_valid, lse, None,
            grad_logp.float().contiguous(), None, options,
        )  # fmt: skip
        if grad_h is not None and ctx.world > 1:
            total = grad_h.float()  # summed in fp32 whatever the dtype: one rounding, after the sum
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
            grad_h = total.to(grad_h.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


@torch.compiler.disable
def vocab_parallel_linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    vocab_start: int,
    vocab_size: int,
    process_group: dist.ProcessGroup | None = None,
    ignore_index: int = -100,
    shift: bool = False,
    temperature: float = 1.0,
    softcap: float | None = None,
    backend: str = "auto",
    deterministic: bool = False,
) -> Tensor:
    """``linear_logprobs`` with the head's vocabulary sharded over ``process_group`` (module docstring).

    A separate function rather than keywords on ``linear_logprobs``: it is a *collective* (every rank of the
    group must call it, with the same ``hidden``, ``targets`` and options), its hidden gradient is all-reduced
    over the group (Megatron's convention), and it runs eagerly (``torch.compiler.disable``: a graph break
    under ``torch.compile``), whereas ``linear_logprobs`` is a local, traceable ``torch.library`` op whose
    schema cannot carry a process group. Both share the row plan, the backends and the argument checks.

    Args:
        hidden: ``(..., D)``, replicated over the group (same values on every rank).
        weight: ``(V_r, D)`` this rank's shard: rows ``[vocab_start, vocab_start + V_r)`` of the full head.
        targets: ``(...)`` *global* token ids in ``[0, vocab_size)`` or ``ignore_index``, replicated.
        bias: optional ``(V_r,)`` shard of the bias.
        vocab_start: first vocabulary id of this rank's shard.
        vocab_size: the full vocabulary size ``V``; the shards of all ranks must partition ``[0, V)`` (checked
            with one small all-gather in eager mode, so a misconfigured group fails on every rank alike).
        process_group: the tensor-parallel group (default: the default group). Without an initialised
            ``torch.distributed`` the call is a single shard (``vocab_start=0``, ``V_r == vocab_size``).
            ``hidden`` must be replicated too; it is not checked (that would read ``tokens x D`` per call).
        ignore_index, shift, temperature, softcap, backend, deterministic: as ``linear_logprobs``.

    Returns:
        float32 log-probabilities of the full vocabulary's softmax, identical on every rank, 0.0 at ignored
        positions (NaN at a non-finite hidden state, like ``linear_logprobs``). Gradients: ``weight`` /
        ``bias`` get this shard's rows; ``hidden`` gets the gradient summed over all shards (on every rank).

    Raises:
        ValueError: the checks of ``linear_logprobs`` on the shard, a bad ``vocab_start`` / ``vocab_size``,
            shards that do not partition ``[0, vocab_size)``, options or targets that differ across ranks, or a
            target outside ``[0, vocab_size)``. **Every rank raises together**: before the op's first
            collective the ranks all-gather one small table -- whether each rank's own checks passed (with
            the failing rank's message), its shard, its options and a fingerprint of its targets
            (``_agree``) -- so a mistake that only one rank can see (an empty shard, a bad option) stops every
            rank at once instead of leaving the others waiting in the op's collective until the group's
            timeout. The table is skipped only where a host read is not allowed (``torch.compile`` tracing,
            CUDA-graph capture); there a rank's own error is raised on that rank alone. Every rank must also
            back-propagate through the result (the backward all-reduces).
    """
    world = _world(process_group)
    error, agreed = None, None
    try:
        vocab_start, vocab_end, backend = _check_arguments(
            hidden, weight, targets, bias, ignore_index, shift, temperature, softcap, backend, deterministic,
            vocab_start, vocab_size, world,
        )  # fmt: skip
        agreed = {"vocab_start": vocab_start, "vocab_end": vocab_end, "vocab_size": int(vocab_size), "shift": shift,
                  "ignore_index": ignore_index, "temperature": temperature, "softcap": softcap}  # fmt: skip
    except ValueError as err:
        error = err
    device = _collective_device(hidden, process_group) if world > 1 else None
    if world > 1 and host_reads_allowed(device):
        _agree(error, agreed, targets, device, process_group, world)  # every rank raises, or none
    elif error is not None:
        raise error

    rows, sorted_targets, n_valid, order, out_of_range = op._plan(targets, ignore_index, shift, vocab_size)
    options = (None if softcap is None else float(softcap), 1.0 / float(temperature), backend, deterministic)
    hidden2d = op._hidden_rows(hidden)
    logp_sorted = _VocabParallelLogprobs.apply(
        hidden2d, weight.contiguous(), bias.contiguous() if bias is not None else None, rows,
        sorted_targets - vocab_start, n_valid, process_group, world, options,
    )  # fmt: skip
    return op._unsort(logp_sorted, order, out_of_range, targets.shape, shift, hidden2d, rows, n_valid)
