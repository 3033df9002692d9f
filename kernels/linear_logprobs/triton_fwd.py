r"""Forward Triton kernel of ``linear_logprobs``: per-token log-probabilities without a logits tensor.

For token row ``i`` (hidden vector ``h_i``, target ``t_i``) and vocab column ``v``::

    l_iv = h_i . W_v (+ b_v)                      logits, fp32 accumulation whatever the input dtype
    s_iv = c * tanh(l_iv / c)                      optional softcap c, applied before the temperature
    z_iv = s_iv * inv_temperature
    lse_i = log sum_v exp(z_iv)                    online, max-subtracted: finite for logits of any size
    logp_i = z_{i, t_i} - lse_i

Tiling: the grid is ``(row blocks of BLOCK_N tokens, vocab splits)``. A program loads its token rows *by
index* (``hidden + rows[i] * stride``: the caller's view is never gathered) and walks the ``BLOCK_V``-column
tiles of its vocab split; each logit tile is a ``tl.dot`` loop over ``BLOCK_D`` chunks of the hidden size
(:func:`_logit_tile`, shared with the backward kernels). It keeps a running (max, sum-exp) per row and picks
the target logit out of the tile that holds it. Per split it writes a partial log-sum-exp and the target part
(zero where the target lies in another split) into ``(N, splits)`` fp32 buffers that the launcher combines
(a log-sum-exp over splits, O(tokens)). Nothing of size tokens x vocab exists at any point; the backward
only needs the returned ``lse``.

A target outside ``[0, V)`` matches no column, so its target logit is 0 (never an index): for a vocab shard
(``vocab_parallel.py``) the target then lives on another rank. ``linear_logprobs`` itself clamps targets.

Ignored rows: ``rows``/``targets`` are sorted so the ``n_valid`` kept rows come first, and ``n_valid`` is a
device tensor read inside the kernel (no host synchronisation: the op can be captured in a CUDA graph). A row
block starting at or past ``n_valid`` walks no tile — no matmul work — and writes zeros; rows past
``n_valid`` inside a partly valid block are masked out of every load. The combine writes exactly 0.0 to both
outputs there.
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
    """tanh from one exp of a non-positive argument: no overflow for any finite ``x``."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
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
    """One ``(BLOCK_N, BLOCK_V)`` tile of scaled logits ``z`` and of ``dz/dl``, both fp32.

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
        t = _tanh(acc / softcap)
        z = softcap * t * inv_temperature
        dz_dl = inv_temperature * (1.0 - t * t)
    else:
        z = acc * inv_temperature
        dz_dl = tl.full((BLOCK_N, BLOCK_V), inv_temperature, tl.float32)
    z = tl.where(col_mask[None, :], z, float("-inf"))
    return z, dz_dl


@cfg.autotuned(tile_per_thread=cfg.FORWARD_TILE_PER_THREAD)
@triton.jit
def _forward_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    rows_ptr,
    targets_ptr,
    n_valid_ptr,
    lse_part_ptr,
    target_part_ptr,
    N,
    V,
    D,
    stride_h,
    stride_w,
    SPLIT_V,
    softcap,
    inv_temperature,
    N_BUCKET,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program ``(row block, split)``: partial log-sum-exp and target logit of its rows over its vocab split,
    written at ``[row, split]`` of the ``(N, splits)`` buffers (zeros for invalid rows)."""
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
    sum_exp = tl.zeros((BLOCK_N,), tl.float32)
    z_target = tl.zeros((BLOCK_N,), tl.float32)
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
        m_new = tl.maximum(m, tl.max(z, axis=1))  # every tile holds a valid column: finite
        sum_exp = sum_exp * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        # col_mask: a target at or past V (a vocab shard's out-of-shard target) must not pick a masked -inf
        hit = (cols[None, :] == targets[:, None]) & col_mask[None, :]
        z_target += tl.sum(tl.where(hit, z, 0.0), axis=1)

    out = offs_n * tl.num_programs(1) + pid_s
    # sum_exp >= 1 once a tile is walked (its max term is exp(0)); the floor only spares ignored rows a log(0)
    lse_part = m + tl.log(tl.maximum(sum_exp, 1.0))
    tl.store(lse_part_ptr + out, tl.where(row_mask, lse_part, 0.0), mask=offs_n < N)
    tl.store(target_part_ptr + out, tl.where(row_mask, z_target, 0.0), mask=offs_n < N)


def _empty(shape, device) -> torch.Tensor:
    """Uninitialised fp32 buffer (the kernel writes every element; tests poison it through this hook)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def forward(hidden2d, weight, bias, rows, targets, n_valid, *, softcap, inv_temperature):
    """``(logp, lse)``, two fp32 ``(N,)`` tensors, ``N = rows.numel()``.

    Row ``i < n_valid`` scores ``hidden2d[rows[i]]`` against ``targets[i]``; rows ``i >= n_valid`` are 0.0
    in both outputs and cost no matmul. ``n_valid`` is a ``(1,)`` int64 device tensor, read on the device
    only."""
    interpreted = cfg.is_interpreted(_forward_kernel)
    flags = cfg.dot_flags(hidden2d, weight, interpreted)
    n_tokens, (vocab, dim) = rows.numel(), weight.shape
    device = hidden2d.device
    splits, split_v = cfg.vocab_splits(n_tokens, vocab, device, interpreted)
    lse_part = _empty((n_tokens, splits), device)
    target_part = _empty((n_tokens, splits), device)
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
            lse_part,
            target_part,
            n_tokens,
            vocab,
            dim,
            hidden2d.stride(0),
            weight.stride(0),
            split_v,
            1.0 if softcap is None else float(softcap),
            float(inv_temperature),
            cfg.token_bucket(n_tokens),
            HAS_BIAS=bias is not None,
            HAS_SOFTCAP=softcap is not None,
            **flags,
        )
    valid = torch.arange(n_tokens, device=device) < n_valid
    lse = torch.where(valid, torch.logsumexp(lse_part, dim=1), 0.0)
    logp = torch.where(valid, target_part.sum(dim=1) - lse, 0.0)
    return logp, lse
