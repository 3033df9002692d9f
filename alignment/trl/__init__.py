"""prefuse inside TRL (``pip install 'prefuse[trl]'``, tested with TRL 1.16).

Two ways in, for two needs:

- ``patch_trl()`` -- one call before building any TRL trainer (or after: the head is looked up per call) and
  every trainer that uses TRL's fused lm-head (``DPOTrainer``, ``KTOTrainer``, ``SFTTrainer``, ``GRPOTrainer``,
  ``RLOOTrainer``) scores its tokens with prefuse's op instead of TRL's ``ChunkedLogProbFunction``. The trainer
  stays TRL's in every other respect: the same options (all of them), the same losses, the same metrics.
  ``unpatch_trl()`` restores TRL. Pick this to keep a TRL run as it is and swap only the head.
- ``PrefuseDPOTrainer`` / ``PrefuseKTOTrainer`` -- subclasses of TRL's trainers whose loss is prefuse's: the
  policy and reference run to their last hidden state and prefuse's op scores the completion tokens inside the
  lm-head module's own forward (so FSDP2 / ZeRO-3-sharded heads are gathered there), and the loss math is
  prefuse's one implementation (``prefuse.alignment.functional``), the one its ``PreferenceTrainer`` and loss
  modules run. Pick this to train a TRL DPO/KTO setup on prefuse's losses; options TRL has and prefuse's losses
  do not are refused with a ``ValueError`` that says why.
"""

from prefuse.alignment.trl.patch import PrefuseChunkedLogProb, is_trl_patched, patch_trl, unpatch_trl
from prefuse.alignment.trl.trainers import (
    TESTED_TRL_VERSION,
    PrefuseDPOTrainer,
    PrefuseKTOConfig,
    PrefuseKTOTrainer,
)

__all__ = [
    "TESTED_TRL_VERSION",
    "PrefuseChunkedLogProb",
    "PrefuseDPOTrainer",
    "PrefuseKTOConfig",
    "PrefuseKTOTrainer",
    "is_trl_patched",
    "patch_trl",
    "unpatch_trl",
]
