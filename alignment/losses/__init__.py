"""Loss modules: one file per loss over the shared base in ``base.py``; the math is in ``functional``."""

from prefuse.alignment.losses.base import FusedLinearLoss, PairedLoss
from prefuse.alignment.losses.cpo import CPOLoss
from prefuse.alignment.losses.dpo import DPOLoss
from prefuse.alignment.losses.factalign import FactAlignLoss
from prefuse.alignment.losses.gpo import GPOLoss
from prefuse.alignment.losses.kto import KTOLoss
from prefuse.alignment.losses.orpo import ORPOLoss
from prefuse.alignment.losses.sampo import SamPOLoss
from prefuse.alignment.losses.simpo import SimPOLoss
from prefuse.alignment.losses.sppo import SPPOLoss

__all__ = [
    "CPOLoss",
    "DPOLoss",
    "FactAlignLoss",
    "FusedLinearLoss",
    "GPOLoss",
    "KTOLoss",
    "ORPOLoss",
    "PairedLoss",
    "SPPOLoss",
    "SamPOLoss",
    "SimPOLoss",
]
