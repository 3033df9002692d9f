"""The loss-fused path: the policy's lm-head, the loss and the loss's gradient in one pass over the rows.

On the op path a loss module calls ``linear_logprobs``: the forward computes the logits (GEMM 1) and the
per-token log-probs; the backward recomputes the logits (GEMM 2), forms ``dl`` and computes ``dH = dl W``
(GEMM 3) and ``dW = dlᵀ H`` (GEMM 4). A preference loss sees the policy only through per-token log-probs, and
every loss here is a sum of per-group terms (a pair, a row) whose weights come from the labels alone (batch
size, token counts, sentence counts): a group's gradient is known as soon as its own log-probs are. So the
loss-fused path walks the policy's rows in chunks of whole groups and, per chunk ``c`` of scored tokens::

    z = softcap(s (H_c Wᵀ + b)) / T                      GEMM 1 (the chunk's logits, fp32 accumulation)
    logp_t = z_t[y_t] - logsumexp(z_t)                   per-token log-probs
    g_t = ∂loss/∂logp_t                                  autograd on the loss of the per-token log-probs
    dl = g (onehot(y) - softmax(z)) dz/dl                in the logits' buffer
    dH_c = dl W                                          GEMM 2
    dW += dlᵀ H_c,   db += Σ_t dl_t                      GEMM 3

all in the forward: 3 GEMMs per scored policy token instead of 4, nothing recomputed (2 with a frozen head, which
skips GEMM 3). The backward returns the stored gradients scaled by the loss's upstream gradient. The loss value
and the metrics come from the loss of all per-token log-probs, the very function the op path calls; the
reference and the detached reference points (KTO's ``z``, FactAlign's ``z_fg``, SamPO's sample) are computed
before the policy's first chunk.

``g`` of a chunk is the gradient of the loss evaluated on the whole batch's per-token log-probs with the rows of
later chunks held at 0; it is exact because the loss is a sum over groups (no term couples two groups). The GEMMs,
the two passes over the logits (with ``backend="auto"``: Triton on CUDA, PyTorch elsewhere) and the chunk size are
the op's chunked backend's (``prefuse.kernels.linear_logprobs.chunked``), so ``logit_scale`` (``s``),
``softcap``, ``temperature`` (``T``), a bias and a frozen head mean what they mean for ``linear_logprobs``; a
group larger than a chunk is a chunk alone (the path then holds that group's logits). Extra memory: fp32
accumulators for ``dH`` (the policy's hidden states' size) and ``dW`` (the head's) during the forward, kept in
the input dtype until the backward, and O(tokens) besides. The chunk plan reads the per-row token counts once (a
host sync on CUDA), so the path is eager-only (not CUDA-graph capturable).

Path choice (the loss modules' ``path`` option): ``"auto"`` takes this path when the loss supports it, a
gradient is needed (grad mode on, and hidden, weight or bias requires grad) and ``backend`` is not
``"triton"`` (an explicit request for the op's Triton kernels); ``"fused"`` requires support (``ValueError``
otherwise) under the same gradient rule (without a gradient the op's single GEMM is all there is to do);
``"op"`` always calls ``linear_logprobs``. ``loss.fused_unsupported()`` names the reason a loss falls back, and
``loss.uses_fused_path(hidden, weight, bias)`` says which path the next call takes.

Supported, each a sum of per-group terms with label-only weights:

- DPO, every ``loss_type`` but ``bco_pair``: the mean over pairs of a function of the pair's log-ratios (``ipo``
  and ``sigmoid_norm`` divide them by the pair's completion lengths); ``nll_weight``'s NLL is ``-Σ_b logπ(y_w,b)
  / Σ_b |y_w,b|``, linear in the log-probs with a denominator from the labels.
- SamPO: DPO on the kept tokens of a sample drawn before the policy is scored.
- KTO: ``Σ_rows term(Δ_row; z) / rows``; FactAlign adds ``Σ_sentences term(Δ_s; z_fg) / S``.
- SPPO, GPO: the mean over pairs of squares of the pair's log-ratios against given win rates / scores.
- SimPO, ORPO, CPO: the mean over pairs of a function of the pair's (length-averaged) log-probs, plus the NLL.

Falls back to the op path:

- DPO ``bco_pair``: its shift δ is the running mean of the rewards updated with *this batch's* mean policy
  reward before the loss is evaluated, so every pair's gradient depends on every other pair's log-probs (a
  batch statistic of the policy itself), which are not known until the last chunk.

Packed rows (``PackedRows``: a ``(1, N, D)`` row seen per row) take the path as padded ones do: each per-row
output position is scored from the packed token it stands for (``PackedLayout.packed_index``), and the gradient
goes to the packed tensor (none to its padding tokens).

KTO's ``z`` and FactAlign's ``z_fg`` are statistics of the policy too, but detached and computed from the KL
rows (scored without grad before the policy), so they do not couple the policy's groups. FactAlign's sentences
group the rows they span (``linked_row_groups``); pairs are grouped by ``pair_groups``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from prefuse.alignment.output import LossOutput
from prefuse.alignment.packing import PackedRows
from prefuse.kernels.linear_logprobs import chunked, torch_twin
from prefuse.kernels.linear_logprobs.op import _resolve_backend
from prefuse.kernels.linear_logprobs.validate import validate_arguments, validate_targets
from torch import Tensor

PATHS = ("auto", "op", "fused")
"""Values of the loss modules' ``path`` option."""


def pair_groups(rows: int, device: torch.device) -> Tensor:
    """Group ids of a paired batch of ``rows = 2B`` rows: rows ``b`` and ``B + b`` form pair ``b``."""
    return torch.arange(rows, device=device) % max(rows // 2, 1)


def row_groups(rows: int, device: torch.device) -> Tensor:
    """Group ids of an unpaired batch: every row on its own."""
    return torch.arange(rows, device=device)


def linked_row_groups(segment_ids: Tensor) -> Tensor:
    """Group ids ``(rows,)`` when rows sharing a segment id (``>= 0``; FactAlign's sentences) must stay
    together: the smallest row index of each row's connected component (rows linked through shared ids)."""
    rows = segment_ids.shape[0]
    label = torch.arange(rows, device=segment_ids.device)
    inside = segment_ids >= 0
    distinct, ids = torch.unique(segment_ids[inside], return_inverse=True)
    owner = label[:, None].expand_as(segment_ids)[inside]
    smallest = torch.full((distinct.numel(),), rows, device=label.device)
    while True:  # each pass links rows one shared id further; the labels only decrease
        per_id = smallest.scatter_reduce(0, ids, label[owner], "amin")
        linked = label.scatter_reduce(0, owner, per_id[ids], "amin")
        if torch.equal(linked, label):
            return label
        label = linked


def _chunks(groups: Tensor, tokens: Tensor, budget: int) -> list[Tensor]:
    """Row indices of each chunk: whole groups, in group order, adding up to at most ``budget`` scored tokens
    (a group over the budget is a chunk alone). One host read of the per-row token counts."""
    order = torch.argsort(groups, stable=True)
    ids, counts = groups[order].tolist(), tokens[order].tolist()
    chunks, start, size, i = [], 0, 0, 0
    while i < len(ids):
        end, group_size = i, 0
        while end < len(ids) and ids[end] == ids[i]:
            group_size += counts[end]
            end += 1
        if size and size + group_size > budget:
            chunks.append(order[start:i])
            start, size = i, 0
        size += group_size
        i = end
    if start < len(ids):
        chunks.append(order[start:])
    return chunks


def _logps_gradient(
    chunk_loss: Callable[[Tensor], Tensor], tok: Tensor, flat: Tensor, logp: Tensor
) -> Tensor:
    """``∂ chunk_loss / ∂ logp`` at the chunk's positions ``flat`` of ``tok`` (the batch's per-token log-probs,
    0 where not yet computed); then writes ``logp`` into ``tok``."""
    with torch.enable_grad():
        x = logp.detach().requires_grad_(True)
        value = chunk_loss(tok.reshape(-1).index_put((flat,), x).view_as(tok))
        grad = torch.autograd.grad(value, x, allow_unused=True)[0] if value.requires_grad else None
    tok.view(-1).index_copy_(0, flat, logp)
    return torch.zeros_like(logp) if grad is None else grad.float()


def _passes(backend: str) -> chunked.Passes:
    """The chunk passes of the resolved ``backend``: Triton (``"chunked"``) or PyTorch (``"torch"``)."""
    if backend == "chunked":
        from prefuse.kernels.linear_logprobs import chunked_triton

        return chunked_triton.PASSES
    return torch_twin.PASSES


def _fused_pass(
    hidden2d: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    source: Tensor,
    targets: Tensor,
    scored: Tensor,
    groups: Tensor,
    chunk_loss: Callable[[Tensor], Tensor],
    *,
    passes: chunked.Passes,
    softcap: float | None,
    inv_temperature: float,
    logit_scale: float,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor, tuple[Tensor | None, Tensor | None, Tensor | None]]:
    """Per-token log-probs ``(rows, L)`` (0.0 where not scored) and the gradients of ``hidden2d``, ``weight``,
    ``bias`` (None where not needed). ``source[p]`` is the hidden row of output position ``p``.

    The GEMMs and the two passes are the op's chunked backend's (``chunked._Gemms``: fp32 accumulation, half
    precision operands on CUDA; ``passes.forward_pass`` / ``grad_pass``); the PyTorch forward pass works in place
    of the logits, so it gets a copy: the gradient pass needs them raw."""
    rows, length = targets.shape
    device = hidden2d.device
    tok = torch.zeros(rows, length, dtype=torch.float32, device=device)
    gemms = chunked._Gemms(weight)
    b = bias.float() if bias is not None else None
    options = {"softcap": softcap, "inv_temperature": inv_temperature, "logit_scale": logit_scale}
    need_hidden, need_weight, need_bias = needs
    grad_h = torch.zeros(hidden2d.shape, dtype=torch.float32, device=device) if need_hidden else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=device) if need_weight else None
    grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=device) if need_bias else None
    positions = torch.arange(rows * length, device=device).view(rows, length)
    budget = chunked.chunk_rows(weight.shape[0], device)
    for chunk in _chunks(groups, scored.sum(-1), budget):
        flat = positions[chunk][scored[chunk]]
        if flat.numel() == 0:
            continue
        src, target = source[flat], targets.reshape(-1)[flat]
        h_raw = hidden2d.index_select(0, src)
        h = gemms.operand(h_raw)
        logits = gemms.mm(h, gemms.weight.T)
        logp, lse = torch.empty(2, flat.numel(), dtype=torch.float32, device=device)
        in_place = passes is torch_twin.PASSES
        passes.forward_pass(logits.clone() if in_place else logits, b, target, logp, lse, None, **options)
        logp = torch.where(h_raw.isfinite().all(-1), logp, torch.nan)  # the op's rule for a non-finite row
        g = _logps_gradient(chunk_loss, tok, flat, logp)
        dl, _ = passes.grad_pass(
            logits, b, target, lse, None, g, None, **options, out_dtype=gemms.dtype, filter_block=None
        )
        if grad_h is not None:
            grad_h.index_copy_(0, src, gemms.mm(dl, gemms.weight))
        if grad_w is not None:
            gemms.addmm_(grad_w, dl.T, h)
        if grad_b is not None:
            grad_b.add_(dl.sum(0, dtype=torch.float32))
    return tok, (
        grad_h.to(hidden2d.dtype) if grad_h is not None else None,
        grad_w.to(weight.dtype) if grad_w is not None else None,
        grad_b.to(bias.dtype) if grad_b is not None else None,
    )


class _StoredGradients(torch.autograd.Function):
    """``value`` as a function of ``hidden``, ``weight``, ``bias`` whose gradients were computed in the forward:
    the backward returns them scaled by the upstream gradient."""

    @staticmethod
    def forward(ctx, value, hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_value):
        def scaled(grad):
            return None if grad is None else grad * grad_value.to(grad.dtype)

        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return None, scaled(grad_hidden), scaled(grad_weight), scaled(grad_bias), None, None, None


def fused_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    loss: Callable[[Tensor], LossOutput],
    *,
    groups: Tensor,
    chunk_loss: Callable[[Tensor], Tensor] | None = None,
    ignore_index: int = -100,
    shift: bool = True,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    backend: str = "auto",
    names: str = "hidden, weight, bias, targets",
) -> LossOutput:
    """``loss(logp)`` on the policy's per-token log-probs ``logp = linear_logprobs(hidden, weight, targets, bias,
    shift=shift, ...)``, differentiable in ``hidden``, ``weight`` and ``bias`` through the loss-fused path.

    Args:
        hidden: ``(rows, T, D)`` policy hidden states, or a packed row seen per row (``PackedRows``: the
            gradient goes to its ``(1, N, D)`` tensor); ``weight`` ``(V, D)``, ``bias`` ``(V,)`` or None.
        targets: ``(rows, T)``; positions equal to ``ignore_index`` are not scored.
        loss: per-token log-probs ``(rows, L)`` (0.0 where not scored) -> ``LossOutput``; called once, on all
            of them (the op path's call: its value and metrics are returned).
        groups: ``(rows,)`` group id of each row: ``loss`` must be a sum of terms each of which reads the rows of
            one group only (``pair_groups``, ``row_groups``, ``linked_row_groups``).
        chunk_loss: the scalar loss the chunks' gradients are taken of (default: ``loss(...).loss``), for a
            ``loss`` that must not run once per chunk (one that all-reduces a reference point: ``chunk_loss`` uses
            the point computed beforehand).
        ignore_index, shift, temperature, softcap, logit_scale: as ``linear_logprobs``.
        backend: ``"auto"`` (the Triton passes on CUDA, PyTorch elsewhere), ``"chunked"`` or ``"torch"`` (the
            op's backend of the same name supplies the passes); ``"triton"`` has no loss-fused form.
        names: the arguments named in a ``ValueError`` about the head.

    Returns:
        ``LossOutput`` whose ``loss`` carries the stored gradients (module docstring); ``metrics`` from ``loss``.
    """
    if backend == "triton":
        raise ValueError("backend='triton' has no loss-fused form: use 'auto', 'chunked' or 'torch'")
    packed = isinstance(hidden, PackedRows)
    leaf = hidden.hidden if packed else hidden  # the tensor the gradient goes to: (1, N, D) when packed
    try:
        if packed:  # the op's checks on the packed row and the targets its layout gives each token
            op_targets, op_shift = hidden.layout.targets(targets, shift, ignore_index), False
        else:
            op_targets, op_shift = targets, shift
        validate_arguments(
            leaf, weight, op_targets, bias, ignore_index, op_shift, temperature, softcap, backend,
            logit_scale=logit_scale,
        )  # fmt: skip
        backend = _resolve_backend(backend, leaf.device)
        if hidden.dim() != 3:
            raise ValueError(f"hidden must have shape (rows, T, D), got {tuple(hidden.shape)}")
        scored_targets = (targets[:, 1:] if shift else targets).long()
        scored = scored_targets != ignore_index
        validate_targets(scored_targets, scored, weight.shape[0])
    except ValueError as err:
        raise ValueError(f"{names}: {err}") from err
    rows, steps = targets.shape
    length = scored_targets.shape[1]
    device = leaf.device
    if packed:  # output position [r, p] is scored from the packed token at row r, position p
        source = hidden.layout.packed_index(steps)[:, :length].reshape(-1)
    else:
        source = (
            torch.arange(rows, device=device)[:, None] * steps + torch.arange(length, device=device)
        ).reshape(-1)
    needs = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (leaf, weight, bias))
    if chunk_loss is None:

        def chunk_loss(tok: Tensor) -> Tensor:
            return loss(tok).loss

    hidden2d = leaf.reshape(-1, leaf.shape[-1])
    with torch.no_grad():
        tok, (grad_h, grad_w, grad_b) = _fused_pass(
            hidden2d if hidden2d.stride(-1) == 1 else hidden2d.contiguous(),
            weight.contiguous(),
            bias.contiguous() if bias is not None else None,
            source,
            scored_targets.clamp(0, weight.shape[0] - 1),
            scored,
            groups,
            chunk_loss,
            passes=_passes(backend),
            softcap=None if softcap is None else float(softcap),
            inv_temperature=1.0 / float(temperature),
            logit_scale=float(logit_scale),
            needs=needs,
        )
        out = loss(tok)
    if grad_h is not None:
        grad_h = grad_h.view(leaf.shape)
    value = _StoredGradients.apply(out.loss.detach(), leaf, weight, bias, grad_h, grad_w, grad_b)
    return LossOutput(value, out.metrics)
