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

__all__ = [
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
]
