r"""Backward Triton kernels of ``linear_logprobs``: gradients from recomputed logit tiles.

With upstream gradients ``g_i`` of ``logp_i`` and ``gH_i`` of the entropy ``H_i``, and the forward's ``lse_i``
(and ``H_i``) as the only saved state, ``log p_iv = z_iv - lse_i``::

    dz_iv = g_i (onehot(t_i)_v - p_iv) - gH_i p_iv (log p_iv + H_i)
    dl_iv = dz_iv * dz/dl_iv,  dz/dl = logit_scale * inv_temperature * (1 - tanh(logit_scale l_iv / c)^2)
                                       (softcap c; without it just logit_scale * inv_temperature)
    grad_h_i = sum_v dl_iv W_v        grad_W_v = sum_i dl_iv h_i        grad_b_v = sum_i dl_iv

Without an entropy gradient the launcher passes ``gH = 0`` (the term vanishes; one kernel serves both).

Every ``(BLOCK_N, BLOCK_V)`` tile of ``dl`` is recomputed from a logit tile (:func:`_logit_tile`, shared
with the forward) and consumed at once by a loop over ``BLOCK_D`` chunks of the hidden size: ``dl @ W_tile``
into the token rows of ``grad_h`` and ``dl^T @ h_block`` into the tile's rows of ``grad_W``, both fp32 (dot
operands in the input dtype, fp32 accumulation). Only the gradients asked for are computed (constexpr
``NEED_*`` flags): a frozen weight costs no ``grad_W`` work. Ignored rows (``i >= n_valid``, a device
tensor) are masked out; a row block lying wholly past ``n_valid`` returns before any matmul.

Two modes:

- default, :func:`_backward_kernel` alone: grid ``(row blocks, vocab splits)``, one fused pass; ``grad_W``,
  ``grad_b`` and (across vocab splits) ``grad_h`` are added with ``tl.atomic_add``.
- ``deterministic=True``, no atomics, bit-identical results run to run: the same kernel with one vocab split
  and only ``grad_h`` (each program owns its rows: plain load-add-store), then :func:`_weight_kernel`, one
  program per vocab tile that owns its tile and walks the valid row blocks in order (recomputing their
  logits), load-add-storing ``grad_W`` and summing ``grad_b`` in registers.

The fp32 buffers are cast to the input dtypes at the end (free for fp32 inputs).
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from prefuse.kernels.linear_logprobs import triton_configs as cfg
from prefuse.kernels.linear_logprobs.triton_fwd import _dot, _load_rows, _logit_tile


@triton.jit
def _grad_logit_tile(
    h_ptrs,
    row_mask,
    w_ptrs,
    col_mask,
    bias_ptr,
    cols,
    targets,
    lse,
    g,
    entropy,
    g_entropy,
    D,
    logit_scale,
    softcap,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The fp32 ``(BLOCK_N, BLOCK_V)`` tile of ``dl`` (module docstring); exactly zero on masked rows and
    columns (so a target outside ``[0, V)``, a vocab shard's out-of-shard target, adds no one-hot term)."""
    z, dz_dl = _logit_tile(
        h_ptrs,
        row_mask,
        w_ptrs,
        col_mask,
        bias_ptr,
        cols,
        D,
        logit_scale,
        softcap,
        inv_temperature,
        HAS_BIAS,
        HAS_SOFTCAP,
        UPCAST_DOT,
        DOT_PRECISION,
        BLOCK_N,
        BLOCK_V,
        BLOCK_D,
    )
    onehot = tl.where(cols[None, :] == targets[:, None], 1.0, 0.0)
    log_p = tl.where(col_mask[None, :], z - lse[:, None], 0.0)  # finite: masked columns end up zero below
    p = tl.exp(log_p)
    dz = g[:, None] * (onehot - p) - g_entropy[:, None] * p * (log_p + entropy[:, None])
    return tl.where(row_mask[:, None] & col_mask[None, :], dz * dz_dl, 0.0)


@triton.jit
def _accumulate_dot(
    ptrs, mask, a, b, ATOMIC: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr
):
    """``*ptrs += a @ b`` in fp32: ``tl.atomic_add`` when other programs add to the same elements, else a
    load-add-store by the owning program (deterministic)."""
    if ATOMIC:
        zero = tl.zeros((a.shape[0], b.shape[1]), dtype=tl.float32)
        tl.atomic_add(ptrs, _dot(a, b, zero, UPCAST_DOT, DOT_PRECISION), mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, _dot(a, b, tl.load(ptrs, mask=mask, other=0.0), UPCAST_DOT, DOT_PRECISION), mask=mask)


@triton.jit
def _backprop_tile(
    dl,
    h_ptrs,
    row_mask,
    rows,
    w_ptrs,
    col_mask,
    cols,
    grad_h_ptr,
    grad_w_ptr,
    D,
    NEED_H: tl.constexpr,
    NEED_W: tl.constexpr,
    ATOMIC_H: tl.constexpr,
    ATOMIC_W: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Add ``dl @ W_tile`` to the tile's token rows of ``grad_h`` and ``dl^T @ h_block`` to its vocab rows of
    ``grad_W`` (both ``(.., D)`` row-major fp32), one ``BLOCK_D`` chunk at a time."""
    # dot operands in the input dtype (tensor cores), fp32 accumulation
    dl_op = dl.to(w_ptrs.dtype.element_ty)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d[None, :] < D
        if NEED_H:
            w = tl.load(w_ptrs[:, None] + d[None, :], mask=col_mask[:, None] & d_mask, other=0.0)
            _accumulate_dot(
                grad_h_ptr + rows[:, None] * D + d[None, :],
                row_mask[:, None] & d_mask,
                dl_op,
                w,
                ATOMIC_H,
                UPCAST_DOT,
                DOT_PRECISION,
            )
        if NEED_W:
            h = tl.load(h_ptrs[:, None] + d[None, :], mask=row_mask[:, None] & d_mask, other=0.0)
            _accumulate_dot(
                grad_w_ptr + cols.to(tl.int64)[:, None] * D + d[None, :],
                col_mask[:, None] & d_mask,
                tl.trans(dl_op),
                h,
                ATOMIC_W,
                UPCAST_DOT,
                DOT_PRECISION,
            )


@cfg.autotuned(
    role="backward",
    key=("NEED_H", "NEED_W", "NEED_B", "ATOMIC_H"),
    reset_to_zero=("grad_h_ptr", "grad_w_ptr", "grad_b_ptr"),
)
@triton.jit
def _backward_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    rows_ptr,
    targets_ptr,
    n_valid_ptr,
    lse_ptr,
    grad_ptr,
    entropy_ptr,
    grad_entropy_ptr,
    grad_h_ptr,
    grad_w_ptr,
    grad_b_ptr,
    N,
    V,
    D,
    stride_h,
    stride_w,
    SPLIT_V,
    logit_scale,
    softcap,
    inv_temperature,
    N_BUCKET,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    NEED_H: tl.constexpr,
    NEED_W: tl.constexpr,
    NEED_B: tl.constexpr,
    ATOMIC_H: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program ``(row block, split)``: walk the split's vocab tiles, adding each ``dl`` tile's share to
    ``grad_h`` (atomic iff ``ATOMIC_H``, else the program owns its rows), ``grad_W`` and ``grad_b`` (atomic)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_valid = tl.load(n_valid_ptr)
    if pid_n * BLOCK_N >= n_valid:  # all rows ignored: no work
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows, targets, row_mask = _load_rows(rows_ptr, targets_ptr, offs_n, N, n_valid)
    lse = tl.load(lse_ptr + offs_n, mask=row_mask, other=0.0)
    g = tl.load(grad_ptr + offs_n, mask=row_mask, other=0.0)
    entropy = tl.load(entropy_ptr + offs_n, mask=row_mask, other=0.0)
    g_entropy = tl.load(grad_entropy_ptr + offs_n, mask=row_mask, other=0.0)
    h_ptrs = hidden_ptr + rows * stride_h

    v_lo = pid_s * SPLIT_V
    v_hi = tl.minimum(v_lo + SPLIT_V, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_hi
        w_ptrs = weight_ptr + cols.to(tl.int64) * stride_w
        dl = _grad_logit_tile(
            h_ptrs,
            row_mask,
            w_ptrs,
            col_mask,
            bias_ptr,
            cols,
            targets,
            lse,
            g,
            entropy,
            g_entropy,
            D,
            logit_scale,
            softcap,
            inv_temperature,
            HAS_BIAS,
            HAS_SOFTCAP,
            UPCAST_DOT,
            DOT_PRECISION,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
        )
        if NEED_B:
            tl.atomic_add(grad_b_ptr + cols, tl.sum(dl, axis=0), mask=col_mask, sem="relaxed")
        _backprop_tile(
            dl,
            h_ptrs,
            row_mask,
            rows,
            w_ptrs,
            col_mask,
            cols,
            grad_h_ptr,
            grad_w_ptr,
            D,
            NEED_H,
            NEED_W,
            ATOMIC_H,
            True,
            UPCAST_DOT,
            DOT_PRECISION,
            BLOCK_D,
        )


@cfg.autotuned(role="weight", key=("NEED_W", "NEED_B"), reset_to_zero=("grad_w_ptr", "grad_b_ptr"))
@triton.jit
def _weight_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    rows_ptr,
    targets_ptr,
    n_valid_ptr,
    lse_ptr,
    grad_ptr,
    entropy_ptr,
    grad_entropy_ptr,
    grad_w_ptr,
    grad_b_ptr,
    N,
    V,
    D,
    stride_h,
    stride_w,
    logit_scale,
    softcap,
    inv_temperature,
    N_BUCKET,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    NEED_W: tl.constexpr,
    NEED_B: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program ``vocab tile`` (deterministic mode): owns its rows of ``grad_W`` / ``grad_b`` and walks the row
    blocks below ``n_valid`` in order."""
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    w_ptrs = weight_ptr + cols.to(tl.int64) * stride_w
    n_valid = tl.load(n_valid_ptr)
    grad_b = tl.zeros((BLOCK_V,), tl.float32)
    for n0 in range(0, tl.minimum(n_valid, N), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        rows, targets, row_mask = _load_rows(rows_ptr, targets_ptr, offs_n, N, n_valid)
        lse = tl.load(lse_ptr + offs_n, mask=row_mask, other=0.0)
        g = tl.load(grad_ptr + offs_n, mask=row_mask, other=0.0)
        entropy = tl.load(entropy_ptr + offs_n, mask=row_mask, other=0.0)
        g_entropy = tl.load(grad_entropy_ptr + offs_n, mask=row_mask, other=0.0)
        h_ptrs = hidden_ptr + rows * stride_h
        dl = _grad_logit_tile(
            h_ptrs,
            row_mask,
            w_ptrs,
            col_mask,
            bias_ptr,
            cols,
            targets,
            lse,
            g,
            entropy,
            g_entropy,
            D,
            logit_scale,
            softcap,
            inv_temperature,
            HAS_BIAS,
            HAS_SOFTCAP,
            UPCAST_DOT,
            DOT_PRECISION,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
        )
        if NEED_B:
            grad_b += tl.sum(dl, axis=0)
        _backprop_tile(
            dl,
            h_ptrs,
            row_mask,
            rows,
            w_ptrs,
            col_mask,
            cols,
            None,
            grad_w_ptr,
            D,
            False,
            NEED_W,
            False,
            False,
            UPCAST_DOT,
            DOT_PRECISION,
            BLOCK_D,
        )
    if NEED_B:
        tl.store(grad_b_ptr + cols, grad_b, mask=col_mask)


def _check_options(entropy, grad_entropy, filter_eps) -> None:
    if filter_eps is not None:
        raise ValueError(
            f"filter_eps={filter_eps!r}: gradient filtering is not supported by backend='triton' "
            "(use backend='chunked' or 'torch', or filter_eps=None)"
        )
    if (entropy is None) != (grad_entropy is None):
        raise ValueError("entropy and grad_entropy must both be given or both be None")


def backward(
    hidden2d,
    weight,
    bias,
    rows,
    targets,
    n_valid,
    lse,
    entropy,
    grad_logp,
    grad_entropy,
    *,
    softcap,
    inv_temperature,
    logit_scale,
    need_hidden,
    need_weight,
    need_bias,
    deterministic,
    filter_eps,
):
    """``(grad_hidden2d, grad_weight, grad_bias)`` of ``sum(grad_logp * logp + grad_entropy * entropy)``, each
    ``None`` unless its ``need_*`` flag is set, else in its input's dtype: ``(M, D)`` (zero on rows not in
    ``rows[:n_valid]``), ``(V, D)``, ``(V,)``.

    ``rows[:n_valid]`` must be distinct (each hidden row scored once). ``lse``, ``grad_logp`` and, when an
    entropy gradient flows, ``entropy`` and ``grad_entropy`` are ``(N,)`` fp32 (both ``None`` otherwise);
    entries past ``n_valid`` are never read. ``filter_eps`` must be ``None`` (not supported here). No host
    synchronisation."""
    _check_options(entropy, grad_entropy, filter_eps)
    need_bias = need_bias and bias is not None
    interpreted = cfg.is_interpreted(_backward_kernel)
    flags = cfg.dot_flags(hidden2d, weight, interpreted)
    n_tokens, (vocab, dim) = rows.numel(), weight.shape
    device = hidden2d.device

    def buffer(needed, *shape):
        """An fp32 gradient accumulator; a one-element placeholder (never written) when not needed."""
        return torch.zeros(shape if needed else (1,), dtype=torch.float32, device=device)

    grad_h = buffer(need_hidden, hidden2d.shape[0], dim)
    grad_w = buffer(need_weight, vocab, dim)
    grad_b = buffer(need_bias, vocab)
    if entropy is None:  # no entropy gradient: gH = 0 removes the term
        entropy = grad_entropy = torch.zeros(n_tokens, dtype=torch.float32, device=device)

    # autograd may hand an expanded (stride-0) gradient; the kernels read it contiguously (an O(N) copy)
    inputs = (
        hidden2d,
        weight,
        bias,
        rows,
        targets,
        n_valid,
        lse,
        grad_logp.contiguous(),
        entropy.contiguous(),
        grad_entropy.contiguous(),
    )
    scalars = dict(
        N=n_tokens,
        V=vocab,
        D=dim,
        stride_h=hidden2d.stride(0),
        stride_w=weight.stride(0),
        logit_scale=float(logit_scale),
        softcap=1.0 if softcap is None else float(softcap),
        inv_temperature=float(inv_temperature),
        N_BUCKET=cfg.token_bucket(n_tokens),
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        **flags,
    )

    def fused(splits, split_v, need_w, need_b, atomic_h):
        cfg.launch(
            _backward_kernel,
            lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_N"]), splits),
            *inputs,
            grad_h,
            grad_w,
            grad_b,
            SPLIT_V=split_v,
            NEED_H=need_hidden,
            NEED_W=need_w,
            NEED_B=need_b,
            ATOMIC_H=atomic_h,
            **scalars,
        )

    if n_tokens and (need_hidden or need_weight or need_bias):
        if not deterministic:
            splits, split_v = cfg.vocab_splits(n_tokens, vocab, device, interpreted)
            fused(splits, split_v, need_weight, need_bias, need_hidden)
        else:
            if need_hidden:
                fused(1, vocab, False, False, False)
            if need_weight or need_bias:
                cfg.launch(
                    _weight_kernel,
                    lambda meta: (triton.cdiv(vocab, meta["BLOCK_V"]),),
                    *inputs,
                    grad_w,
                    grad_b,
                    NEED_W=need_weight,
                    NEED_B=need_bias,
                    **scalars,
                )

    def cast(buffer, needed, like):
        return buffer.to(like.dtype) if needed else None

    return (
        cast(grad_h, need_hidden, hidden2d),
        cast(grad_w, need_weight, weight),
        cast(grad_b, need_bias, bias),
    )


def _gradient_sets(bias: bool):
    """The (need_hidden, need_weight, need_bias) combinations a backward can ask for."""
    return [
        need for need in itertools.product((False, True), repeat=3) if any(need) and (bias or not need[2])
    ]


def compile_variants() -> list:
    """Every backward variant a CUDA launch can compile (for ``python -m benchmarks.aot``): per operand dtype
    and dot precision, softcap and bias, the fused kernel for each set of gradients (atomic ``grad_h``), the
    deterministic hidden-only pass, and the weight kernel for each set of weight / bias gradients."""
    variants = []
    for (dtype, precision), softcap, bias in itertools.product(cfg.PRECISIONS, (False, True), (False, True)):
        common = dict(HAS_SOFTCAP=softcap, HAS_BIAS=bias)
        fused = [dict(NEED_H=h, NEED_W=w, NEED_B=b, ATOMIC_H=h) for h, w, b in _gradient_sets(bias)]
        fused.append(dict(NEED_H=True, NEED_W=False, NEED_B=False, ATOMIC_H=False))
        weight = [dict(NEED_W=w, NEED_B=b) for h, w, b in _gradient_sets(bias) if not h]
        variants += [cfg.kernel_variant(_backward_kernel, dtype, precision, **common, **f) for f in fused]
        variants += [cfg.kernel_variant(_weight_kernel, dtype, precision, **common, **f) for f in weight]
    return variants
