"""prefuse.alignment: preference-alignment losses built on prefuse.kernels."""

if __name__ != "prefuse.alignment":  # the repo-root folder must not shadow PyPI's `alignment`
    raise ImportError(
        f"this folder is the package `prefuse.alignment`; it cannot be imported as `{__name__}`"
    )

from prefuse.alignment import functional
from prefuse.alignment.functional import DPO_LOSS_TYPES
from prefuse.alignment.losses import (
    CPOLoss,
    DPOLoss,
    FactAlignLoss,
    GPOLoss,
    KTOLoss,
    ORPOLoss,
    SamPOLoss,
    SimPOLoss,
    SPPOLoss,
)
from prefuse.alignment.output import LossOutput
from prefuse.alignment.packed_attention import use_varlen_attention
from prefuse.alignment.packing import packed_targets, unpack_token_logps

# Trainer integration pulls in transformers (and TRL for the drop-ins): imported on first use, so the losses stay light.
_LAZY = {
    "PreferenceTrainer": "prefuse.alignment.trainer",
    "PreferenceConfig": "prefuse.alignment.trainer",
    "precompute_ref_logps": "prefuse.alignment.trainer",
    "build_loss": "prefuse.alignment.trainer",
    "forward_hidden": "prefuse.alignment.model_head",
    "CausalLMHead": "prefuse.alignment.model_head",
    "head_options": "prefuse.alignment.model_head",
    "run_iterations": "prefuse.alignment.iterative",
    "PrefuseDPOTrainer": "prefuse.alignment.trl",
    "PrefuseKTOTrainer": "prefuse.alignment.trl",
    "patch_trl": "prefuse.alignment.trl",
    "unpatch_trl": "prefuse.alignment.trl",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prefuse.alignment' has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "DPO_LOSS_TYPES",
    "CPOLoss",
    "DPOLoss",
    "FactAlignLoss",
    "GPOLoss",
    "KTOLoss",
    "LossOutput",
    "ORPOLoss",
    "SPPOLoss",
    "SamPOLoss",
    "SimPOLoss",
    "functional",
    "packed_targets",
    "unpack_token_logps",
    "use_varlen_attention",
]
