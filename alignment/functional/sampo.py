"""SamPO: DPO on down-sampled token-level KL (Lu et al., 2024, "Eliminating Biased Length Reliance of DPO
via Down-Sampled KL Divergence").

Per pair ``b`` with ``n_c`` chosen and ``n_r`` rejected completion tokens, ``k = min(n_c, n_r)``: the longer
completion keeps a uniform random subset of ``k`` of its tokens (without replacement), the shorter keeps all.
With ``S_c``, ``S_r`` the kept positions,

    Δc = Σ_{t∈S_c} (logπ - logπ_ref)(y_w,t),   Δr = Σ_{t∈S_r} (logπ - logπ_ref)(y_l,t),
    loss = mean_b -logσ(β(Δc - Δr))

Policy and reference use the same kept positions (the paper's semantics); ``independent_ref_sample=True``
reproduces the authors' code, which draws the reference's positions separately.
"""

from __future__ import annotations

import torch
from prefuse.alignment.functional._common import check_real, check_same_shape, chosen_nll
from prefuse.alignment.functional.dpo import dpo_loss
from prefuse.alignment.output import LossOutput
from torch import Tensor

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64's finaliser (Steele et al., 2014): a bijective 64-bit mix."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def rank_seed(seed: int, rank: int) -> int:
    """The seed that data-parallel rank ``rank`` draws SamPO's samples with, for a run seeded with ``seed``.

    Rank 0 uses ``seed`` itself, so a single process (and the first rank) draw exactly what they drew before
    data parallelism existed. Rank ``r > 0`` uses a SplitMix64 hash of ``(seed, r)``: every rank has its own
    stream, so pairs on different ranks get independent samples (with one shared seed every rank would draw
    the same keys, and same-length pairs on different ranks would keep the same positions), and unlike
    ``seed + rank`` the streams of neighbouring seeds do not coincide (run seed 1 rank 0 vs seed 0 rank 1).
    Each pair's sample is a uniform ``k``-subset on every rank, so the union over ranks is a proper per-pair
    uniform draw; it is reproducible for a given seed and data-parallel layout (world size and the rows each
    rank gets), but it is not the sample one process would draw on the whole batch.
    """
    if rank == 0:
        return int(seed)
    return _splitmix64(_splitmix64(int(seed) & _MASK64) ^ int(rank)) & ((1 << 63) - 1)


def _token_keys(mask: Tensor, generator: torch.Generator | None) -> Tensor:
    """A uniform key in ``[0, 1)`` for every ``True`` position of ``mask`` ``(B, L)`` (undefined elsewhere).

    The ``j``-th token of row ``b`` gets entry ``[b, j]`` of one ``(B, n)`` draw, ``n`` the largest token count
    of a row: the keys, and how far the stream advances, depend on the rows' tokens only -- not on where they
    sit, so a batch padded to any width and the same rows packed draw the same sample. (One host sync for ``n``.)
    """
    width = int(mask.sum(-1).max()) if mask.numel() else 0
    if width == 0:
        return torch.zeros(mask.shape, device=mask.device)
    shape = (mask.shape[0], width)
    if generator is None:
        keys = torch.rand(shape, device=mask.device)
    else:
        keys = torch.rand(shape, device=generator.device, generator=generator).to(
            mask.device, non_blocking=True
        )
    index = (mask.long().cumsum(-1) - 1).clamp(min=0, max=width - 1)  # the token's index within its row
    return keys.gather(-1, index)


def _keep_smallest_keys(mask: Tensor, keep: Tensor, keys: Tensor) -> Tensor:
    """Of each row's ``True`` positions in ``mask``, the ``keep[row]`` ones with the smallest keys."""
    keys = keys.masked_fill(~mask, 2.0)  # keys are in [0, 1): masked positions sort last
    order = keys.argsort(dim=-1)
    ranks = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.zeros_like(mask).scatter(-1, order, ranks < keep.unsqueeze(-1))


def sampo_sample_masks(
    chosen_mask: Tensor, rejected_mask: Tensor, *, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Down-sampled completion masks ``(chosen_kept, rejected_kept)``, each a subset of its input mask.

    ``chosen_mask`` ``(B, Lc)`` and ``rejected_mask`` ``(B, Lr)`` are bool completion masks. Per row the side
    with more tokens keeps a uniform ``k``-subset, ``k = min(n_c, n_r)``; the other keeps all of its tokens.
    Vectorised: every token draws a uniform key and the ``k`` smallest keys of the row are kept, which is a
    uniform ``k``-subset. Keys come from ``generator`` (any device; moved to the masks' device) or the global
    RNG, the chosen side first; a row's ``j``-th token always takes the ``j``-th key of its row
    (``_token_keys``), so the sample depends on the rows' tokens and the stream, never on the padded width or a
    packed layout.
    """
    for name, m in (("chosen_mask", chosen_mask), ("rejected_mask", rejected_mask)):
        if not isinstance(m, Tensor) or m.dtype != torch.bool or m.dim() != 2:
            raise ValueError(f"{name} must be a 2-D bool tensor (pairs, tokens)")
    if chosen_mask.shape[0] != rejected_mask.shape[0]:
        raise ValueError(
            f"chosen_mask has {chosen_mask.shape[0]} rows but rejected_mask has {rejected_mask.shape[0]}"
        )
    keep = torch.minimum(chosen_mask.sum(-1), rejected_mask.sum(-1))
    chosen_keys = _token_keys(chosen_mask, generator)
    rejected_keys = _token_keys(rejected_mask, generator)
    return (
        _keep_smallest_keys(chosen_mask, keep, chosen_keys),
        _keep_smallest_keys(rejected_mask, keep, rejected_keys),
    )


def sampo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    *,
    beta: float = 0.1,
    nll_weight: float = 0.0,
    generator: torch.Generator | None = None,
    independent_ref_sample: bool = False,
    sampled_masks: tuple[Tensor, Tensor] | None = None,
    ref_sampled_masks: tuple[Tensor, Tensor] | None = None,
) -> LossOutput:
    """SamPO loss from per-token log-probs (module docstring for the formula).

    Args:
        policy_*_logps, ref_*_logps: per-token log-probs ``(B, L)`` of the chosen / rejected completions
            (values outside the masks are not read).
        chosen_mask, rejected_mask: bool completion masks ``(B, L)``.
        nll_weight: weight of the chosen-token NLL over *all* chosen completion tokens (RPO-style).
        generator: source of the sample (``sampo_sample_masks``); ignored when ``sampled_masks`` is given.
        independent_ref_sample: compatibility with the SamPO authors' code, which draws the reference's
            tokens independently of the policy's; the default (False) shares them, as the paper does. Only
            used when this function draws the samples (``sampled_masks`` not given).
        sampled_masks: an already drawn ``(chosen_kept, rejected_kept)`` (what ``SamPOLoss`` passes, having
            computed only those tokens). The log-probs then need to be valid only on the kept tokens, and on
            every chosen completion token when ``nll_weight > 0``.
        ref_sampled_masks: the reference's kept tokens when drawn independently (default: ``sampled_masks``).

    Returns:
        ``dpo_loss`` metrics on the down-sampled sums, plus ``nll_loss`` over the full chosen completions
        (omitted when ``sampled_masks`` is given with ``nll_weight == 0``: those tokens were not computed).
    """
    check_real("beta", beta, low=0.0, low_open=True)
    for name, t, mask in (
        ("policy_chosen_logps", policy_chosen_logps, chosen_mask),
        ("ref_chosen_logps", ref_chosen_logps, chosen_mask),
        ("policy_rejected_logps", policy_rejected_logps, rejected_mask),
        ("ref_rejected_logps", ref_rejected_logps, rejected_mask),
    ):
        check_same_shape(name, t, "its mask", mask)
    computed_all = sampled_masks is None
    if sampled_masks is None:
        sampled_masks = sampo_sample_masks(chosen_mask, rejected_mask, generator=generator)
    if ref_sampled_masks is None:
        ref_sampled_masks = (
            sampo_sample_masks(chosen_mask, rejected_mask, generator=generator)
            if independent_ref_sample and computed_all
            else sampled_masks
        )
    chosen_kept, rejected_kept = sampled_masks
    ref_chosen_kept, ref_rejected_kept = ref_sampled_masks

    def kept_sum(logps: Tensor, kept: Tensor) -> Tensor:
        return torch.where(kept, logps.float(), 0.0).sum(-1)

    nll = None
    if nll_weight > 0 or computed_all:
        full_chosen = torch.where(chosen_mask, policy_chosen_logps.float(), 0.0).sum(-1)
        nll = chosen_nll(full_chosen, chosen_mask.sum(-1))
    return dpo_loss(
        kept_sum(policy_chosen_logps, chosen_kept),
        kept_sum(policy_rejected_logps, rejected_kept),
        kept_sum(ref_chosen_logps.detach(), ref_chosen_kept),
        kept_sum(ref_rejected_logps.detach(), ref_rejected_kept),
        beta=beta,
        loss_type="sigmoid",
        nll_weight=nll_weight,
        nll_loss=nll,
    )
