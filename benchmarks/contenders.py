"""The contenders of every workload: what a user would pick instead of prefuse, and prefuse.

``build(batch, contender)`` returns a zero-argument forward callable (the loss, or the per-token
log-probs of the core op); the harness adds the backward. A contender that cannot run on this case raises
``Unavailable`` with the reason, which the report prints.

- ``naive``: the workload's formula on full logits (``benchmarks.formulas`` + ``providers.naive_logps``).
- ``liger`` / ``liger-compiled``: Liger-Kernel's chunked losses (``LigerFusedLinearDPOLoss``,
  ``LigerFusedLinearKTOLoss``; one pair / one row per chunk, its default), eager or ``torch.compile``-d; for
  the core op, its fused linear cross-entropy with ``reduction="none"`` (Triton: CUDA only). Liger has no
  SamPO, FactAlign, soft-win-rate SPPO, softcap in its chunked losses, nor KL rows for KTO: its KTO gets the
  reference point ``kl`` computed from the KL rows with Liger's own chunk forward.
- ``trl``: TRL 1.16's fused head (``ChunkedLogProbFunction``, as ``add_fused_lm_head`` calls it on that device:
  scored rows only on CUDA, every row on CPU) as the per-token log-prob provider of the workload's formula -- what
  TRL's DPO and KTO trainers run (when ``trl`` is installed).
- ``cce``: Cut Cross-Entropy's ``linear_cross_entropy(reduction="none")`` as the per-token log-prob provider of
  the workload's formula (CUDA only; when ``cut-cross-entropy`` is installed).
- ``prefuse``: ``prefuse.kernels.linear_logprobs`` for the core op, the ``prefuse.alignment`` loss modules
  (their ``forward(hidden, weight, labels, ...)``, default hyper-parameters and options: the loss-fused path,
  3 GEMMs per policy token) for the losses.
- ``prefuse-op``: the same loss modules on the op path (``path="op"``: ``linear_logprobs``, 4 GEMMs per policy
  token), on DPO and KTO: the loss-fused path's gain in the same run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from benchmarks import formulas, providers
from benchmarks.inputs import Batch
from benchmarks.plan import Case

Forward = Callable[[], Tensor]

LIGER_LOSSES = {"dpo": "LigerFusedLinearDPOLoss", "kto": "LigerFusedLinearKTOLoss"}
PREFUSE_LOSSES = {
    "dpo": "DPOLoss",
    "sampo": "SamPOLoss",
    "kto": "KTOLoss",
    "factalign": "FactAlignLoss",
    "sppo": "SPPOLoss",
}
OP_PATH_WORKLOADS = ("dpo", "kto")
"""Workloads ``prefuse-op`` runs on (beside ``prefuse``'s loss-fused path)."""


class Unavailable(Exception):
    """The contender cannot run this case; ``str(exc)`` says why (shown in the report)."""


def _installed(module: str) -> bool:
    """Whether ``module`` imports (a module that is missing or broken mid-development does not)."""
    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure means "cannot run", with the reason in the report
        return False
    return True


def unavailable_reason(case: Case, contender: str) -> str | None:
    """Why ``contender`` cannot run ``case`` on this machine (None if it can); decided without any tensor."""
    workload, cuda = case.workload, case.device == "cuda"
    if (
        workload == "sampo"
        and contender in ("naive", "cce")
        and not _installed("prefuse.alignment.functional")
    ):
        return "SamPO's shared sampler (prefuse.alignment.functional.sampo_sample_masks) is not importable"
    if contender == "naive":
        return None
    if contender in ("prefuse", "prefuse-op"):
        if workload == "logprobs":
            return (
                None
                if contender == "prefuse"
                else "the core op is the op path (prefuse-op is a loss's op path)"
            )
        if contender == "prefuse-op" and workload not in OP_PATH_WORKLOADS:
            return f"the losses' op path is measured on {' and '.join(OP_PATH_WORKLOADS)}"
        if not _installed("prefuse.alignment"):
            return "prefuse.alignment is not importable"
        name = PREFUSE_LOSSES[workload]
        module = importlib.import_module("prefuse.alignment")
        return None if hasattr(module, name) else f"prefuse.alignment.{name} does not exist yet"
    if contender == "trl":
        return None if _installed("trl.kernels.chunked_logprob") else "trl is not installed"
    if contender == "cce":
        if not cuda:
            return "Cut Cross-Entropy is Triton-only (needs CUDA)"
        return None if _installed("cut_cross_entropy") else "cut-cross-entropy is not installed"
    if contender in ("liger", "liger-compiled"):
        if workload == "logprobs":
            if contender == "liger-compiled":
                return "Liger's fused linear cross-entropy is a Triton kernel (no compiled variant)"
            if not cuda:
                return "Liger's fused linear cross-entropy is Triton-only (needs CUDA)"
            return (
                None
                if _installed("liger_kernel.transformers.functional")
                else "liger-kernel is not installed"
            )
        if workload not in LIGER_LOSSES:
            return f"Liger-Kernel has no {workload} loss"
        if case.head.softcap is not None:
            return "Liger's chunked losses have no logit softcap"
        return None if _installed("liger_kernel.chunked_loss") else "liger-kernel is not installed"
    return f"unknown contender {contender!r}"


# ------------------------------------------------------------------------------------- naive / CCE / TRL
def _naive(batch: Batch) -> Forward:
    return partial(formulas.FORMULAS[batch.case.workload], batch, providers.naive_logps)


def _cce(batch: Batch) -> Forward:
    return partial(formulas.FORMULAS[batch.case.workload], batch, providers.cce_logps)


def _trl(batch: Batch) -> Forward:
    import trl.trainer.utils  # noqa: F401  -- imported here, not in the first (memory-measured) step

    return partial(formulas.FORMULAS[batch.case.workload], batch, providers.trl_logps)


# ------------------------------------------------------------------------------------------------ Liger
def liger_sequence_logps(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """Per-row completion log-prob sums with Liger's own chunk forward (one row per chunk), no grad; how a
    Liger user gets the KL rows' log-probs, since its KTO loss takes the reference point ``kl`` ready-made."""
    from liger_kernel.chunked_loss.fused_linear_unpaired_preference import (
        LigerFusedLinearUnpairedPreferenceBase as Base,
    )

    label = torch.ones(1, dtype=torch.bool, device=hidden.device)
    with torch.no_grad():
        sums = [Base.chunk_forward(h[None], weight, t[None], label)[0] for h, t in zip(hidden, targets)]
    return torch.cat(sums).float()


def _liger(batch: Batch, compiled: bool) -> Forward:
    workload = batch.case.workload
    if workload == "logprobs":
        return partial(formulas.logprobs, batch, providers.liger_flce_logps)
    from liger_kernel import chunked_loss

    targets = providers.next_token_targets(batch.labels)
    if workload == "dpo":
        dpo = chunked_loss.LigerFusedLinearDPOLoss(beta=formulas.BETA, compiled=compiled, use_ref_model=True)
        return lambda: dpo(
            batch.weight, batch.hidden, targets, ref_input=batch.ref_hidden, ref_weight=batch.ref_weight
        )[0]
    kto = chunked_loss.LigerFusedLinearKTOLoss(beta=formulas.BETA, compiled=compiled, use_ref_model=True)
    kl_targets = providers.next_token_targets(batch.kl_labels)

    def forward() -> Tensor:
        kl_delta = liger_sequence_logps(batch.kl_hidden, batch.weight, kl_targets) - liger_sequence_logps(
            batch.ref_kl_hidden, batch.ref_weight, kl_targets
        )
        z = kl_delta.mean().clamp(min=0)
        return kto(
            batch.hidden,
            batch.weight,
            targets,
            preference_labels=batch.desirable,
            ref_input=batch.ref_hidden,
            ref_weight=batch.ref_weight,
            kl=z,
        )[0]

    return forward


# ---------------------------------------------------------------------------------------------- prefuse
def _prefuse(batch: Batch, path: str = "auto") -> Forward:
    workload = batch.case.workload
    if workload == "logprobs":
        from prefuse.kernels import linear_logprobs

        return lambda: linear_logprobs(
            batch.hidden, batch.weight, batch.labels, shift=True, softcap=batch.softcap
        )
    from prefuse import alignment

    options = {"softcap": batch.softcap, "path": path}
    refs = {"ref_hidden": batch.ref_hidden, "ref_weight": batch.ref_weight}
    kl = {"kl_hidden": batch.kl_hidden, "kl_labels": batch.kl_labels, "ref_kl_hidden": batch.ref_kl_hidden}
    if workload == "dpo":
        loss = alignment.DPOLoss(beta=formulas.BETA, **options)
        return lambda: loss(batch.hidden, batch.weight, batch.labels, **refs).loss
    if workload == "sampo":
        loss = alignment.SamPOLoss(beta=formulas.BETA, seed=batch.seed, **options)
        return lambda: loss(batch.hidden, batch.weight, batch.labels, **refs).loss
    if workload == "sppo":
        loss = alignment.SPPOLoss(beta=formulas.SPPO_BETA, **options)
        return lambda: (
            loss(
                batch.hidden,
                batch.weight,
                batch.labels,
                p_chosen=batch.p_chosen,
                p_rejected=batch.p_rejected,
                **refs,
            ).loss
        )
    if workload == "kto":
        loss = alignment.KTOLoss(beta=formulas.BETA, **options)
        return lambda: loss(batch.hidden, batch.weight, batch.labels, batch.desirable, **kl, **refs).loss
    loss = alignment.FactAlignLoss(
        beta=formulas.BETA,
        fg_beta=formulas.FG_BETA,
        fg_undesirable_weight=formulas.FG_UNDESIRABLE_WEIGHT,
        **options,
    )
    return lambda: (
        loss(
            batch.hidden,
            batch.weight,
            batch.labels,
            batch.desirable,
            sentence_ids=batch.sentence_ids,
            sentence_labels=batch.sentence_labels,
            kl_sentence_ids=batch.kl_sentence_ids,
            **kl,
            **refs,
        ).loss
    )


BUILDERS: dict[str, Callable[[Batch], Forward]] = {
    "naive": _naive,
    "liger": partial(_liger, compiled=False),
    "liger-compiled": partial(_liger, compiled=True),
    "cce": _cce,
    "trl": _trl,
    "prefuse-op": partial(_prefuse, path="op"),
    "prefuse": _prefuse,
}

NEEDS_WARMUP = {"liger-compiled"}
"""Contenders whose first call compiles: on CPU they get an untimed call before the memory step."""


def build(batch: Batch, contender: str) -> Forward:
    """The forward callable of ``contender`` on ``batch``; raises ``Unavailable`` with the reason."""
    reason = unavailable_reason(batch.case, contender)
    if reason is not None:
        raise Unavailable(reason)
    return BUILDERS[contender](batch)
