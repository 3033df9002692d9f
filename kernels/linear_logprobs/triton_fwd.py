r"""Forward Triton kernel of ``linear_logprobs``: per-token log-probabilities (and statistics) without logits.

For token row ``i`` (hidden vector ``h_i``, target ``t_i``) and vocab column ``v``::

    l_iv = h_i . W_v (+ b_v)                      raw logits, fp32 accumulation whatever the input dtype
    x_iv = logit_scale * l_iv
    s_iv = c * tanh(x_iv / c)                      optional softcap c, applied before the temperature
    z_iv = s_iv * inv_temperature                  scaled logits
    lse_i = log sum_v exp(z_iv)                    online, max-subtracted: finite for logits of any size
    logp_i = z_{i, t_i} - lse_i

With ``with_stats``, in the same pass (``p = softmax(z_i)``)::

    entropy_i          = lse_i - sum_v p_v z_iv
    log_sum_sq_probs_i = log sum_v p_v^2
    mean_logits_i      = (1/V) sum_v z_iv
    is_top1_i          = t_i is the first index of max_v z_iv

Tiling: the grid is ``(row blocks of BLOCK_N tokens, vocab splits)``. A program loads its token rows *by
index* (``hidden + rows[i] * stride``: the caller's view is never gathered) and walks the ``BLOCK_V``-column
tiles of its vocab split; each logit tile is a ``tl.dot`` loop over ``BLOCK_D`` chunks of the hidden size
(:func:`_logit_tile`, shared with the backward kernels). Per row it keeps a running max ``m`` and
``s0 = sum exp(z - m)`` (and, for the statistics, ``s1 = sum exp(z - m) (z - m)``, ``s2 = sum exp(2 (z - m))``,
the sum of ``z`` and the first argmax), rescaled whenever ``m`` grows. Per split it writes a record of
``(N, splits, K)`` fp32 partials: the split's log-sum-exp and target logit (zero where the target lies in
another split), and with statistics the split's own entropy ``log s0 - s1 / s0``, ``log s2 - 2 log s0``,
sum of ``z``, max and first argmax. The launcher combines the splits in O(tokens): with split weights
``w_s = exp(lse_s - lse)``, ``H = sum_s w_s H_s - sum_s w_s log w_s`` and
``log sum p^2 = logsumexp_s(2 log w_s + q_s)``: sums of non-negative terms, no cancellation.

A target outside ``[0, V)`` matches no column, so its target logit is 0 (never an index): for a vocab shard
(``vocab_parallel.py``) the target then lives on another rank. ``linear_logprobs`` itself clamps targets.

Ignored rows: ``rows``/``targets`` are sorted so the ``n_valid`` kept rows come first, and ``n_valid`` is a
device tensor read inside the kernel (no host synchronisation: the op can be captured in a CUDA graph). A row
block starting at or past ``n_valid`` walks no tile — no matmul work — and writes zeros; rows past
``n_valid`` inside a partly valid block are masked out of every load. Every output is exactly 0 there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from prefuse.kernels.linear_logprobs import triton_configs as cfg


@triton.jit
def _dot(a, b, acc, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``acc + a @ b`` in fp32 (``UPCAST_DOT``: fp32 operands, for bf16 under the interpreter)."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _tanh(x):
    """tanh to fp32 accuracy for every finite ``x``: an odd Taylor polynomial below ``|x| = 1/4`` (relative
    error < 1e-8 there), ``(1 - e) / (1 + e)`` with ``e = exp(-2|x|) <= exp(-1/2)`` above (no cancellation:
    ``1 - e >= 0.39``; no overflow)."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    large = (1.0 - e) / (1.0 + e)
    a2 = a * a
    small = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.25, small, large)
    return tl.where(x < 0, -t, t)


@triton.jit
def _load_rows(rows_ptr, targets_ptr, offs_n, N, n_valid):
    """Hidden-row indices, targets and validity of the token block ``offs_n`` (invalid: past ``N`` or
    ``n_valid``; their indices read as 0 and their targets as -1, never used to address memory)."""
    valid = (offs_n < N) & (offs_n < n_valid)
    rows = tl.load(rows_ptr + offs_n, mask=valid, other=0)
    targets = tl.load(targets_ptr + offs_n, mask=valid, other=-1)
    return rows, targets, valid


@triton.jit
def _logit_tile(
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
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One ``(BLOCK_N, BLOCK_V)`` tile of scaled logits ``z`` and of ``dz/dl`` (module docstring), both fp32.

    ``h_ptrs``: ``(BLOCK_N,)`` pointers to the token rows of ``hidden``; ``w_ptrs``: ``(BLOCK_V,)`` pointers
    to the rows of ``weight``. Masked rows read zeros; masked columns come out as ``z = -inf`` (they drop out
    of every max, sum-exp and softmax)."""
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        h = tl.load(h_ptrs[:, None] + d[None, :], mask=row_mask[:, None] & (d[None, :] < D), other=0.0)
        w = tl.load(w_ptrs[:, None] + d[None, :], mask=col_mask[:, None] & (d[None, :] < D), other=0.0)
        acc = _dot(h, tl.trans(w), acc, UPCAST_DOT, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        t = _tanh(acc * (logit_scale / softcap))
        z = t * (softcap * inv_temperature)
        dz_dl = (logit_scale * inv_temperature) * (1.0 - t * t)
    else:
        z = acc * (logit_scale * inv_temperature)
        dz_dl = tl.full((BLOCK_N, BLOCK_V), logit_scale * inv_temperature, tl.float32)
    z = tl.where(col_mask[None, :], z, float("-inf"))
    return z, dz_dl


STATS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
"""Columns of the ``(N, 4)`` statistics tensor."""
RECORD = {False: 2, True: 7}
"""Partial-record length per (row, split), without / with statistics."""


@cfg.autotuned(role="forward", key=("WITH_STATS",))
@triton.jit
def _forward_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    rows_ptr,
    targets_ptr,
    n_valid_ptr,
    part_ptr,
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
    WITH_STATS: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program ``(row block, split)``: the partial record of its rows over its vocab split (module docstring),
    written at ``part[row, split, :]`` (zeros for invalid rows)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_valid = tl.load(n_valid_ptr)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows, targets, row_mask = _load_rows(rows_ptr, targets_ptr, offs_n, N, n_valid)
    h_ptrs = hidden_ptr + rows * stride_h

    v_lo = pid_s * SPLIT_V
    v_hi = tl.minimum(v_lo + SPLIT_V, V)
    if pid_n * BLOCK_N >= n_valid:  # all rows ignored: walk no tile
        v_hi = v_lo

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s0 = tl.zeros((BLOCK_N,), tl.float32)
    z_target = tl.zeros((BLOCK_N,), tl.float32)
    s1 = tl.zeros((BLOCK_N,), tl.float32)
    s2 = tl.zeros((BLOCK_N,), tl.float32)
    z_sum = tl.zeros((BLOCK_N,), tl.float32)
    arg = tl.zeros((BLOCK_N,), tl.int32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_hi
        z, _ = _logit_tile(
            h_ptrs,
            row_mask,
            weight_ptr + cols.to(tl.int64) * stride_w,
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
        tile_max = tl.max(z, axis=1)  # every tile holds a valid column: finite
        m_new = tl.maximum(m, tile_max)
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])  # 0 on masked columns
        if WITH_STATS:
            d = tl.where(col_mask[None, :], z - m_new[:, None], 0.0)
            # s1 relative to the new max: exp(z - m_new)(z - m_new) = alpha exp(z - m)((z - m) + (m - m_new))
            m_old = tl.where(
                s0 > 0, m, m_new
            )  # before the first tile s0 = 0: no correction (and no -inf * 0)
            s1 = alpha * (s1 + (m_old - m_new) * s0) + tl.sum(e * d, axis=1)
            s2 = alpha * alpha * s2 + tl.sum(e * e, axis=1)
            z_sum += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
            # strictly greater: on a tie the earlier tile keeps the first argmax
            arg = tl.where(tile_max > m, v0 + tl.argmax(z, axis=1, tie_break_left=True), arg)
        s0 = s0 * alpha + tl.sum(e, axis=1)
        m = m_new
        # col_mask: a target at or past V (a vocab shard's out-of-shard target) must not pick a masked -inf
        hit = (cols[None, :] == targets[:, None]) & col_mask[None, :]
        z_target += tl.sum(tl.where(hit, z, 0.0), axis=1)

    record = offs_n * tl.num_programs(1) + pid_s
    if WITH_STATS:
        out = part_ptr + record * 7
    else:
        out = part_ptr + record * 2
    store = offs_n < N
    # s0 >= 1 once a tile is walked (its max term is exp(0)); the floor only spares ignored rows a log(0)
    log_s0 = tl.log(tl.maximum(s0, 1.0))
    tl.store(out, tl.where(row_mask, m + log_s0, 0.0), mask=store)
    tl.store(out + 1, tl.where(row_mask, z_target, 0.0), mask=store)
    if WITH_STATS:
        entropy = log_s0 - s1 / tl.maximum(s0, 1.0)
        log_sum_sq = tl.log(tl.maximum(s2, 1.0)) - 2.0 * log_s0
        tl.store(out + 2, tl.where(row_mask, entropy, 0.0), mask=store)
        tl.store(out + 3, tl.where(row_mask, log_sum_sq, 0.0), mask=store)
        tl.store(out + 4, tl.where(row_mask, z_sum, 0.0), mask=store)
        tl.store(out + 5, tl.where(row_mask, m, 0.0), mask=store)
        tl.store(out + 6, tl.where(row_mask, arg.to(tl.float32), 0.0), mask=store)


def _empty(shape, device) -> torch.Tensor:
    """Uninitialised fp32 buffer (the kernel writes every element; tests poison it through this hook)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def _combine(part: torch.Tensor, targets: torch.Tensor, vocab: int, valid: torch.Tensor, with_stats: bool):
    """``(logp, lse, stats)`` from the ``(N, splits, K)`` partial records (module docstring)."""
    lse_s = part[..., 0]
    lse = torch.logsumexp(lse_s, dim=1)
    logp = torch.where(valid, part[..., 1].sum(dim=1) - lse, 0.0)
    if not with_stats:
        return logp, torch.where(valid, lse, 0.0), part.new_zeros(0)
    log_w = lse_s - lse[:, None]
    w = log_w.exp()
    entropy = (w * part[..., 2]).sum(dim=1) - torch.xlogy(w, w).sum(dim=1)
    log_sum_sq = torch.logsumexp(2.0 * log_w + part[..., 3], dim=1)
    mean = part[..., 4].sum(dim=1) / vocab
    split_max = part[..., 5]
    first = (
        (split_max == split_max.max(dim=1, keepdim=True).values).to(torch.uint8).argmax(dim=1, keepdim=True)
    )
    top1 = (part[..., 6].gather(1, first)[:, 0].long() == targets).float()
    stats = torch.stack([entropy, log_sum_sq, mean, top1], dim=1)
    return logp, torch.where(valid, lse, 0.0), torch.where(valid[:, None], stats, 0.0)


def forward(
    hidden2d, weight, bias, rows, targets, n_valid, *, softcap, inv_temperature, logit_scale, with_stats
):
    """``(logp, lse, stats)``: fp32 ``(N,)``, ``(N,)`` and ``(N, 4)`` (columns :data:`STATS`; an empty ``(0,)``
    tensor without ``with_stats``), ``N = rows.numel()``.

    Row ``i < n_valid`` scores ``hidden2d[rows[i]]`` against ``targets[i]``; rows ``i >= n_valid`` are 0 in
    every output and cost no matmul. ``n_valid`` is a ``(1,)`` int64 device tensor, read on the device only."""
    interpreted = cfg.is_interpreted(_forward_kernel)
    flags = cfg.dot_flags(hidden2d, weight, interpreted)
    n_tokens, (vocab, dim) = rows.numel(), weight.shape
    device = hidden2d.device
    splits, split_v = cfg.vocab_splits(n_tokens, vocab, device, interpreted)
    part = _empty((n_tokens, splits, RECORD[bool(with_stats)]), device)
    if n_tokens:
        cfg.launch(
            _forward_kernel,
            lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_N"]), splits),
            hidden2d,
            weight,
            bias,
            rows,
            targets,
            n_valid,
            part,
            n_tokens,
            vocab,
            dim,
            hidden2d.stride(0),
            weight.stride(0),
            split_v,
            float(logit_scale),
            1.0 if softcap is None else float(softcap),
            float(inv_temperature),
            cfg.token_bucket(n_tokens),
            HAS_BIAS=bias is not None,
            HAS_SOFTCAP=softcap is not None,
            WITH_STATS=bool(with_stats),
            **flags,
        )
    valid = torch.arange(n_tokens, device=device) < n_valid
    return _combine(part, targets, vocab, valid, with_stats)


def compile_variants() -> list:
    """Every forward variant a CUDA launch can compile: operand dtype and dot precision, softcap, bias,
    statistics (for ``python -m benchmarks.aot``)."""
    return [
        cfg.kernel_variant(
            _forward_kernel, dtype, precision, HAS_SOFTCAP=softcap, HAS_BIAS=bias, WITH_STATS=stats
        )
        for dtype, precision in cfg.PRECISIONS
        for softcap in (False, True)
        for bias in (False, True)
        for stats in (False, True)
    ]
