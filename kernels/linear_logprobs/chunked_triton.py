"""The ``"chunked"`` backend: the driver of ``chunked.py`` with its two passes as Triton kernels.

Each pass is one program per row of a chunk's fp32 logits ``l`` (``(rows, V)``, from a cuBLAS GEMM), looping over
the vocabulary in tiles of ``BLOCK_V`` columns; ``torch_twin.py`` holds the same passes in PyTorch and the math.

**Forward pass** (online, one read of the logits). Every lane ``k`` of the tile keeps its own running max
``m_k`` and, relative to it, ``S_k = sum e^{z - m_k}``, ``A_k = sum e^{z - m_k} (z - m_k)``,
``Q_k = sum e^{2 (z - m_k)}``, the sum of ``z`` and its first argmax; when ``m_k`` grows to ``m'`` the sums are
rescaled (``a = e^{m_k - m'}``: ``S <- a S``, ``A <- a (A + (m_k - m') S)``, ``Q <- a^2 Q``). After the loop the
lanes are merged at the row max ``m``: ``S = sum_k S_k e^{m_k - m}``, and so on, giving ``lse = m + log S``,
``H = log S - A / S``, ``log sum p^2 = log Q - 2 log S``, ``mean z`` and the first argmax (the smallest index
among the lanes whose max equals ``m``). The target logit is read once at the end.

**Gradient pass.** Each tile of logits is overwritten with ``dl`` (formula in ``chunked.py``) in the dtype of the
backward GEMMs. For a half-precision ``dl`` the output is the first half of each fp32 row's bytes (row stride
``2V`` elements): the bf16 tile ``[j, j + B)`` occupies the bytes of fp32 elements ``[j/2, (j + B)/2)``, all
read already (by this tile or an earlier one) and never read again, so writing in place is safe. With a
filter it also writes the tile's largest probability.

The softcap's ``tanh`` is ``-expm1(-2|x|) / (2 + expm1(-2|x|))`` with ``expm1`` by Kahan's
``(u - 1) y / log u`` (``u = e^y``): accurate to a few ulps also for small ``|x|``, where ``(1 - e)/(1 + e)``
cancels.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from prefuse.kernels.linear_logprobs import chunked
from prefuse.kernels.linear_logprobs.compile_variants import KernelVariant
from triton.runtime.interpreter import InterpretedFunction

BLOCK_V = 1024
"""Vocabulary columns per tile (compiled); the filter's tile is ``chunked.FILTER_BLOCK_V``."""
INTERPRET_BLOCK_V = 32
"""Under the interpreter: small tiles, so that small test vocabularies take several tiles."""
NUM_WARPS = 4


@triton.jit
def _tanh(x):
    a = tl.abs(x)
    y = -2.0 * a
    u = tl.exp(y)
    regular = tl.where((u == 1.0) | (u == 0.0), 0.5, u)  # keeps the unused branch free of 0/0
    expm1 = tl.where(u == 1.0, y, tl.where(u == 0.0, -1.0, (regular - 1.0) * y / tl.log(regular)))
    t = -expm1 / (2.0 + expm1)
    return tl.where(x < 0, -t, t)


@triton.jit
def _scaled(raw, bias_ptr, cols, mask, softcap, inv_temperature, logit_scale, HAS_BIAS: tl.constexpr,
            HAS_SOFTCAP: tl.constexpr):  # fmt: skip
    """``(z, t)``: the scaled logits and, with softcap, ``tanh(s (l + b) / c)`` (else 0)."""
    if HAS_BIAS:
        raw += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    x = raw * logit_scale
    if HAS_SOFTCAP:
        t = _tanh(x / softcap)
        z = t * (softcap * inv_temperature)
    else:
        t = tl.zeros_like(x)
        z = x * inv_temperature
    return z, t


@triton.jit
def _forward_pass_kernel(
    logits_ptr, bias_ptr, targets_ptr, logp_ptr, lse_ptr, stats_ptr,
    V, stride_l, softcap, inv_temperature, logit_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_STATS: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_l
    target = tl.load(targets_ptr + row)
    inside = (target >= 0) & (target < V)
    lanes = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_V,), tl.float32)
    a = tl.zeros((BLOCK_V,), tl.float32)
    q = tl.zeros((BLOCK_V,), tl.float32)
    total = tl.zeros((BLOCK_V,), tl.float32)
    best = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    best_idx = tl.full((BLOCK_V,), V, tl.int32)
    for start in range(0, V, BLOCK_V):
        cols = start + lanes
        mask = cols < V
        raw = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        z, _ = _scaled(
            raw, bias_ptr, cols, mask, softcap, inv_temperature, logit_scale, HAS_BIAS, HAS_SOFTCAP
        )
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, z)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe)
        if WITH_STATS:
            a = alpha * (a + tl.where(s > 0, m - m_safe, 0.0) * s) + e * tl.where(mask, z - m_safe, 0.0)
            q = alpha * alpha * q + e * e
            total += tl.where(mask, z, 0.0)
            better = z > best
            best = tl.where(better, z, best)
            best_idx = tl.where(better, cols, best_idx)
        s = alpha * s + e
        m = m_new
    row_max = tl.max(m, axis=0)
    w = tl.exp(m - row_max)
    s_row = tl.sum(s * w, axis=0)
    log_s = tl.log(s_row)
    lse = row_max + log_s
    t_col = tl.minimum(tl.maximum(target, 0), V - 1)
    l_t = tl.load(base + t_col).to(tl.float32)
    z_t, _ = _scaled(
        l_t, bias_ptr, t_col, inside, softcap, inv_temperature, logit_scale, HAS_BIAS, HAS_SOFTCAP
    )
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, tl.where(inside, z_t, 0.0) - lse)
    if WITH_STATS:
        a_row = tl.sum(w * (a + tl.where(s > 0, m - row_max, 0.0) * s), axis=0)
        q_row = tl.sum(q * w * w, axis=0)
        first = tl.min(tl.where(best == row_max, best_idx, V), axis=0)
        tl.store(stats_ptr + row * 4, log_s - a_row / s_row)
        tl.store(stats_ptr + row * 4 + 1, tl.log(q_row) - 2.0 * log_s)
        tl.store(stats_ptr + row * 4 + 2, tl.sum(total, axis=0) / V)
        tl.store(stats_ptr + row * 4 + 3, tl.where(inside & (first == target), 1.0, 0.0))


@triton.jit
def _grad_pass_kernel(
    logits_ptr, dl_ptr, bias_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr,
    block_max_ptr, V, stride_l, stride_dl, n_blocks, softcap, inv_temperature, logit_scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr, FILTER: tl.constexpr,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_l
    out = dl_ptr + row * stride_dl
    target = tl.load(targets_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.load(grad_logp_ptr + row)
    if WITH_ENTROPY:
        h = tl.load(entropy_ptr + row)
        g_h = tl.load(grad_entropy_ptr + row)
    lanes = tl.arange(0, BLOCK_V)
    scale = logit_scale * inv_temperature
    for start in range(0, V, BLOCK_V):
        cols = start + lanes
        mask = cols < V
        raw = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        z, t = _scaled(
            raw, bias_ptr, cols, mask, softcap, inv_temperature, logit_scale, HAS_BIAS, HAS_SOFTCAP
        )
        log_p = z - lse
        p = tl.exp(log_p)
        dz = tl.where(cols == target, g, 0.0) - g * p
        if WITH_ENTROPY:
            dz -= g_h * p * (log_p + h)
        if HAS_SOFTCAP:
            dl = dz * (scale * (1.0 - t * t))
        else:
            dl = dz * scale
        tl.store(out + cols, dl.to(dl_ptr.dtype.element_ty), mask=mask)
        if FILTER:
            tl.store(
                block_max_ptr + row * n_blocks + start // BLOCK_V, tl.max(tl.where(mask, p, 0.0), axis=0)
            )


def _interpreted() -> bool:
    return isinstance(_forward_pass_kernel, InterpretedFunction)


def _block_v() -> int:
    return INTERPRET_BLOCK_V if _interpreted() else BLOCK_V


def forward_pass(logits, bias, targets, logp, lse, stats, *, softcap, inv_temperature, logit_scale) -> None:
    """Triton twin of ``torch_twin.forward_pass``."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    _forward_pass_kernel[(rows,)](
        logits, bias if bias is not None else logits, targets, logp, lse, stats if stats is not None else logp,
        vocab, logits.stride(0), 1.0 if softcap is None else float(softcap), float(inv_temperature),
        float(logit_scale), HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        WITH_STATS=stats is not None, BLOCK_V=_block_v(), num_warps=NUM_WARPS,
    )  # fmt: skip


def grad_pass(logits, bias, targets, lse, entropy, grad_logp, grad_entropy, *, softcap, inv_temperature,
              logit_scale, out_dtype, filter_block):  # fmt: skip
    """Triton twin of ``torch_twin.grad_pass``; ``dl`` overwrites ``logits`` (a view of its storage)."""
    rows, vocab = logits.shape
    lse, grad_logp = lse.contiguous(), grad_logp.contiguous()
    if grad_entropy is not None:
        entropy, grad_entropy = entropy.contiguous(), grad_entropy.contiguous()
    dl = logits if out_dtype == torch.float32 else logits.view(out_dtype)[:, :vocab]
    block = filter_block if filter_block is not None else _block_v()
    n_blocks = triton.cdiv(vocab, block)
    block_max = torch.empty((rows, n_blocks) if filter_block is not None else (0,), dtype=torch.float32,
                            device=logits.device)  # fmt: skip
    if rows:
        with_entropy = grad_entropy is not None
        _grad_pass_kernel[(rows,)](
            logits, dl, bias if bias is not None else logits, targets, lse, entropy if with_entropy else lse,
            grad_logp, grad_entropy if with_entropy else grad_logp, block_max if filter_block is not None else lse,
            vocab, logits.stride(0), dl.stride(0), n_blocks, 1.0 if softcap is None else float(softcap),
            float(inv_temperature), float(logit_scale), HAS_BIAS=bias is not None,
            HAS_SOFTCAP=softcap is not None, WITH_ENTROPY=with_entropy, FILTER=filter_block is not None,
            BLOCK_V=block, num_warps=NUM_WARPS,
        )  # fmt: skip
    return dl, (block_max.amax(0) if filter_block is not None else None)


PASSES = chunked.Passes(forward_pass, grad_pass)
forward = functools.partial(chunked.forward, PASSES)
backward = functools.partial(chunked.backward, PASSES)


def compile_variants() -> list[KernelVariant]:
    """Every constexpr combination the launchers use with the default tiles (see ``compile_variants.py``)."""
    flags = [(b, c) for b in (False, True) for c in (False, True)]
    variants = []
    for has_bias, has_softcap in flags:
        for with_stats in (False, True):
            variants.append(KernelVariant(
                name=f"chunked_forward_pass[bias={has_bias},softcap={has_softcap},stats={with_stats}]",
                fn=_forward_pass_kernel,
                signature={
                    "logits_ptr": "*fp32", "bias_ptr": "*fp32", "targets_ptr": "*i64", "logp_ptr": "*fp32",
                    "lse_ptr": "*fp32", "stats_ptr": "*fp32", "V": "i32", "stride_l": "i32", "softcap": "fp32",
                    "inv_temperature": "fp32", "logit_scale": "fp32", "HAS_BIAS": "constexpr",
                    "HAS_SOFTCAP": "constexpr", "WITH_STATS": "constexpr", "BLOCK_V": "constexpr",
                },
                constexprs={"HAS_BIAS": has_bias, "HAS_SOFTCAP": has_softcap, "WITH_STATS": with_stats,
                            "BLOCK_V": BLOCK_V},
                num_warps=NUM_WARPS,
            ))  # fmt: skip
        for dl_type in ("fp32", "bf16", "fp16"):
            for with_entropy in (False, True):
                for filtered in (False, True):
                    block = chunked.FILTER_BLOCK_V if filtered else BLOCK_V
                    variants.append(KernelVariant(
                        name=(f"chunked_grad_pass[{dl_type},bias={has_bias},softcap={has_softcap},"
                              f"entropy={with_entropy},filter={filtered}]"),
                        fn=_grad_pass_kernel,
                        signature={
                            "logits_ptr": "*fp32", "dl_ptr": f"*{dl_type}", "bias_ptr": "*fp32",
                            "targets_ptr": "*i64", "lse_ptr": "*fp32", "entropy_ptr": "*fp32",
                            "grad_logp_ptr": "*fp32", "grad_entropy_ptr": "*fp32", "block_max_ptr": "*fp32",
                            "V": "i32", "stride_l": "i32", "stride_dl": "i32", "n_blocks": "i32",
                            "softcap": "fp32", "inv_temperature": "fp32", "logit_scale": "fp32",
                            "HAS_BIAS": "constexpr", "HAS_SOFTCAP": "constexpr", "WITH_ENTROPY": "constexpr",
                            "FILTER": "constexpr", "BLOCK_V": "constexpr",
                        },
                        constexprs={"HAS_BIAS": has_bias, "HAS_SOFTCAP": has_softcap,
                                    "WITH_ENTROPY": with_entropy, "FILTER": filtered, "BLOCK_V": block},
                        num_warps=NUM_WARPS,
                    ))  # fmt: skip
    return variants
