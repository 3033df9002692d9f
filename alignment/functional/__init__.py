"""Functional preference losses on log-probs: the one place where the loss math lives.

Each function takes per-sequence log-prob sums (SamPO and FactAlign: per-token log-probs with masks /
sentence ids) and returns ``LossOutput(loss, metrics)``. The ``nn.Module`` losses of ``prefuse.alignment``
compute the log-probs with ``prefuse.kernels.linear_logprobs`` and call these.
"""

from prefuse.alignment.functional._common import segment_sum
from prefuse.alignment.functional.cpo import cpo_loss
from prefuse.alignment.functional.dpo import DPO_LOSS_TYPES, dpo_loss
from prefuse.alignment.functional.factalign import factalign_loss
from prefuse.alignment.functional.gpo import gpo_loss
from prefuse.alignment.functional.kto import kl_reference_point, kto_loss
from prefuse.alignment.functional.orpo import orpo_loss
from prefuse.alignment.functional.sampo import rank_seed, sampo_loss, sampo_sample_masks
from prefuse.alignment.functional.simpo import simpo_loss
from prefuse.alignment.functional.sppo import sppo_loss
from prefuse.alignment.output import LossOutput

__all__ = [
    "DPO_LOSS_TYPES",
    "LossOutput",
    "cpo_loss",
    "dpo_loss",
    "factalign_loss",
    "gpo_loss",
    "kl_reference_point",
    "kto_loss",
    "orpo_loss",
    "rank_seed",
    "sampo_loss",
    "sampo_sample_masks",
    "segment_sum",
    "simpo_loss",
    "sppo_loss",
]
