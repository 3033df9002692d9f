"""``patch_trl()`` / ``unpatch_trl()``: prefuse's op behind TRL's fused lm-head, for every TRL trainer at once.

TRL 1.16 gives the models of its DPO, KTO, SFT, GRPO and RLOO trainers a fused head
(``trl.trainer.utils.add_fused_lm_head``); on each call that head's forward looks up two names in
``trl.trainer.utils``: ``_ChunkedLogProbFunction`` (whose ``apply`` scores the tokens) and ``_use_triton``
(whether to score only the positions with a label). ``patch_trl`` rebinds both there:

- ``_ChunkedLogProbFunction`` becomes :class:`PrefuseChunkedLogProb`, whose ``apply`` takes TRL's arguments
  ``(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)`` and
  returns TRL's 5-tuple ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)`` from
  ``prefuse.kernels.linear_logprobs`` -- the logits ``z = softcap(logit_scale · (h Wᵀ + b)) / temperature``, the
  per-token outputs in the same pass, ``None`` for those not requested. ``chunk_size`` is TRL's tile width and is
  not used: prefuse picks its own tiles;
- ``_use_triton`` answers True for every device, so the head hands over only the scored positions (TRL does that
  on CUDA only; on CPU it would score every position with its label clamped to 0).

Nothing else changes: the trainers' options, losses, metric names and reductions are TRL's own, and models whose
fused head was added before the call use prefuse from then on (the names are looked up per call). Both calls
are idempotent; ``unpatch_trl`` puts TRL's own objects back.
"""

from __future__ import annotations

import torch

try:
    import trl
    import trl.trainer.utils as trl_utils
except ImportError as err:  # pragma: no cover - exercised only without TRL
    raise ImportError("prefuse.alignment.trl needs TRL: pip install 'prefuse[trl]'") from err

from prefuse.kernels import linear_logprobs

__all__ = ["PrefuseChunkedLogProb", "is_trl_patched", "patch_trl", "unpatch_trl"]

TRL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
"""The per-token outputs TRL's head computes on request besides the log-probs (same names in prefuse's op)."""

_PATCHED_NAMES = ("_ChunkedLogProbFunction", "_use_triton")
_originals: dict[str, object] = {}


def _score_every_device(device: torch.device) -> bool:
    """TRL's question "score only the labelled positions?": always yes, whatever the device."""
    return True


class PrefuseChunkedLogProb:
    """Stands in for TRL's ``ChunkedLogProbFunction`` at its call site (module docstring); only ``apply``."""

    @staticmethod
    def apply(
        hidden,
        weight,
        bias,
        targets,
        temperature,
        chunk_size,
        final_logit_softcapping=None,
        logit_scale=1.0,
        outputs=TRL_OUTPUTS,
    ):
        """TRL's ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)`` of ``targets`` ``(N,)`` under
        ``hidden`` ``(N, D)`` and the head ``weight`` ``(V, D)`` / ``bias``; unrequested outputs are None."""
        del chunk_size  # TRL's tile width; prefuse's op tiles on its own
        requested = tuple(name for name in TRL_OUTPUTS if name in outputs)
        if hidden.dtype != weight.dtype:  # TRL's cast_lm_head_to_fp32: fp32 hidden states, a bf16 head
            dtype = torch.promote_types(hidden.dtype, weight.dtype)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        result = linear_logprobs(
            hidden,
            weight,
            targets,
            bias,
            temperature=float(temperature),
            softcap=final_logit_softcapping,
            logit_scale=float(logit_scale),
            outputs=requested,
        )
        if not requested:
            return result, None, None, None, None
        return result.logp, result.entropy, result.log_sum_sq_probs, result.mean_logits, result.is_top1


def patch_trl() -> None:
    """Route every TRL trainer's fused lm-head through prefuse's op (module docstring); idempotent."""
    missing = [name for name in _PATCHED_NAMES if not hasattr(trl_utils, name)]
    if missing:
        raise ImportError(
            f"patch_trl() replaces trl.trainer.utils.{' and '.join(missing)}, which TRL {trl.__version__} does not "
            "have; it is written for TRL 1.16's fused head"
        )
    if _originals:
        return
    _originals.update({name: getattr(trl_utils, name) for name in _PATCHED_NAMES})
    trl_utils._ChunkedLogProbFunction = PrefuseChunkedLogProb
    trl_utils._use_triton = _score_every_device


def unpatch_trl() -> None:
    """Put TRL's own fused head back; a no-op when not patched."""
    for name, value in _originals.items():
        setattr(trl_utils, name, value)
    _originals.clear()


def is_trl_patched() -> bool:
    """Whether TRL's fused head currently runs on prefuse's op."""
    return trl_utils._ChunkedLogProbFunction is PrefuseChunkedLogProb
