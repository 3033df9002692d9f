"""``LossOutput``: what every loss of ``prefuse.alignment`` returns."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class LossOutput(NamedTuple):
    """``(loss, metrics)``.

    ``loss`` is the scalar to back-propagate. ``metrics`` maps TRL-style names (``"rewards/chosen"``, ...) to
    detached 0-d tensors; nothing is read back to the host, so logging them is the caller's (one) sync.
    """

    loss: Tensor
    metrics: dict[str, Tensor]
