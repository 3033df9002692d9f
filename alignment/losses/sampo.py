"""``SamPOLoss``: DPO with the longer completion's log-ratio down-sampled to the shorter one's length."""

from __future__ import annotations

import numbers

import torch
import torch.distributed as dist
from prefuse.alignment.functional._common import check_real
from prefuse.alignment.functional.sampo import rank_seed, sampo_loss, sampo_sample_masks
from prefuse.alignment.losses.base import POLICY_HEAD, PairedLoss, check_token_mask, token_logps
from prefuse.alignment.output import LossOutput
from torch import Tensor


class SamPOLoss(PairedLoss):
    """SamPO (see ``prefuse.alignment.functional.sampo``): per pair, the longer completion keeps a uniform
    sample without replacement of ``min(Tc, Tr)`` of its completion tokens, and

        loss = mean_b -logσ(β(Σ_{kept} Δ(y_w,t) - Σ_{kept} Δ(y_l,t)))  (+ nll_weight · chosen-token NLL)

    Policy and reference are scored on the same kept tokens; the unsampled tokens are passed to
    ``linear_logprobs`` as ignored, so they cost no matmul work (the chosen completion is scored in full only
    when ``nll_weight > 0`` needs it).

    Args:
        beta: β.
        seed: an ``int`` (a private ``torch.Generator`` on the data's device is seeded on first use with
            ``functional.rank_seed(seed, rank)``: ``seed`` itself in a single process and on rank 0, an
            independent stream on every other data-parallel rank), a ``torch.Generator`` (used as is), or
            None (the global RNG, reproducible via ``torch.manual_seed``; ranks seeded alike, as
            ``accelerate.utils.set_seed`` does by default, then draw identical keys). Every call draws a new
            sample; the same seed and data-parallel layout give the same sequence.
        data_parallel_group: the process group whose rank picks the stream (default: the global rank). Pass
            the data-parallel group when ranks of a tensor-parallel group see the same batch and must keep the
            same tokens.
        nll_weight: weight of the chosen-token NLL over all chosen completion tokens.
        independent_ref_sample: compatibility with the authors' code (the reference draws its own sample);
            the default shares the sample, as the paper does.
        **options: ``ignore_index``, ``temperature``, ``softcap``, ``backend``, ``deterministic``.
    """

    def __init__(
        self,
        beta: float = 0.1,
        seed: int | torch.Generator | None = None,
        *,
        nll_weight: float = 0.0,
        independent_ref_sample: bool = False,
        data_parallel_group=None,
        **options,
    ) -> None:
        super().__init__(**options)
        check_real("beta", beta, low=0.0, low_open=True)
        check_real("nll_weight", nll_weight, low=0.0)
        if (
            seed is not None
            and not isinstance(seed, torch.Generator)
            and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral))
        ):
            raise ValueError(f"seed must be an int, a torch.Generator or None, got {seed!r}")
        self.beta = float(beta)
        self.seed = seed
        self.nll_weight = float(nll_weight)
        self.independent_ref_sample = bool(independent_ref_sample)
        self.data_parallel_group = data_parallel_group
        self._generator: torch.Generator | None = None
        self._generator_seed: int | None = None

    def rank(self) -> int:
        """This process's rank in ``data_parallel_group`` (0 without ``torch.distributed``)."""
        if not (dist.is_available() and dist.is_initialized()):
            return 0
        return dist.get_rank(self.data_parallel_group)

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The generator the next sample is drawn from (None: the global RNG); seeded once per device and rank
        with ``rank_seed(seed, rank)``, then advanced by every draw."""
        if self.seed is None or isinstance(self.seed, torch.Generator):
            return self.seed
        seed = rank_seed(int(self.seed), self.rank())
        if self._generator is None or self._generator.device != device or self._generator_seed != seed:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(seed)
            self._generator_seed = seed
        return self._generator

    def generator_state(self) -> dict | None:
        """The sampling stream's position, for a checkpoint (``load_generator_state`` restores it): None when
        nothing is drawn from a private stream yet (or ``seed=None``, the global RNG a trainer saves itself)."""
        gen = self.seed if isinstance(self.seed, torch.Generator) else self._generator
        if gen is None:
            return None
        return {"state": gen.get_state(), "device": str(gen.device), "seed": self._generator_seed}

    def load_generator_state(self, state: dict | None) -> None:
        """Continue the draws exactly where ``generator_state()`` left them (None: nothing to restore)."""
        if state is None:
            return
        if isinstance(self.seed, torch.Generator):
            self.seed.set_state(state["state"])
            return
        if self.seed is None:
            raise ValueError(
                "this SamPOLoss draws from the global RNG (seed=None): it has no generator state"
            )
        if state["seed"] != rank_seed(int(self.seed), self.rank()):
            raise ValueError(
                f"the saved sampling stream was seeded with {state['seed']}, this loss (seed={self.seed}, rank "
                f"{self.rank()}) seeds {rank_seed(int(self.seed), self.rank())}: resume with the same sampo_seed"
            )
        self._generator = torch.Generator(device=state["device"])
        self._generator.set_state(state["state"])
        self._generator_seed = state["seed"]

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        *,
        bias: Tensor | None = None,
        ref_hidden: Tensor | None = None,
        ref_weight: Tensor | None = None,
        ref_bias: Tensor | None = None,
        ref_logps: Tensor | None = None,
        shift: bool = True,
    ) -> LossOutput:
        """Arguments as ``DPOLoss.forward``; ``ref_logps`` must be per-token ``(2B, T-1)`` (sums cannot be
        down-sampled)."""
        rows = self._check_rows(hidden, labels, paired=True)
        if not isinstance(shift, bool):
            raise ValueError(f"shift must be a bool, got {shift!r}")
        b = rows // 2
        mask = self._mask(labels, shift)
        kept, ref_kept = self.sample(mask)
        policy_keep = torch.cat([mask[:b] if self.nll_weight > 0 else kept[0], kept[1]])
        ref_keep = torch.cat(ref_kept)
        targets = self._masked_targets(labels, policy_keep, shift)
        policy = self._head_logps(POLICY_HEAD, hidden, weight, targets, bias, shift)
        ref = self._reference(
            hidden=ref_hidden,
            weight=ref_weight,
            bias=ref_bias,
            logps=ref_logps,
            targets=self._masked_targets(labels, ref_keep, shift),
            mask=ref_keep,
            shift=shift,
            per_token=True,
        )
        return self.loss_from_token_logps(policy, ref, mask, sampled_masks=kept, ref_sampled_masks=ref_kept)

    def sample(self, mask: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``(kept, ref_kept)``: the next draw of kept ``(chosen, rejected)`` masks for the completion mask
        ``(2B, L)``, and the reference's (the same ones unless ``independent_ref_sample``)."""
        b = mask.shape[0] // 2
        gen = self.generator(mask.device)
        kept = sampo_sample_masks(mask[:b], mask[b:], generator=gen)
        ref_kept = (
            sampo_sample_masks(mask[:b], mask[b:], generator=gen) if self.independent_ref_sample else kept
        )
        return kept, ref_kept

    def loss_from_token_logps(
        self,
        policy_logps: Tensor,
        ref_logps: Tensor,
        mask: Tensor,
        *,
        sampled_masks: tuple[Tensor, Tensor] | None = None,
        ref_sampled_masks: tuple[Tensor, Tensor] | None = None,
    ) -> LossOutput:
        """The loss from per-token log-probs ``(2B, L)`` of the policy and the reference (sums cannot be
        down-sampled) and the completion ``mask`` ``(2B, L)``. ``sampled_masks`` / ``ref_sampled_masks``: the
        kept ``(chosen, rejected)`` masks (``sample``); None draws them here."""
        mask = check_token_mask(mask, paired=True)
        b = mask.shape[0] // 2
        if sampled_masks is None:
            sampled_masks, drawn_ref = self.sample(mask)
            ref_sampled_masks = drawn_ref if ref_sampled_masks is None else ref_sampled_masks
        policy = token_logps("policy_logps", policy_logps, mask)
        ref = token_logps(
            "ref_logps", ref_logps.detach() if isinstance(ref_logps, Tensor) else ref_logps, mask
        )
        return sampo_loss(
            policy[:b], policy[b:], ref[:b], ref[b:], mask[:b], mask[b:], beta=self.beta,
            nll_weight=self.nll_weight, sampled_masks=sampled_masks, ref_sampled_masks=ref_sampled_masks,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"beta={self.beta}, seed={self.seed!r}, nll_weight={self.nll_weight}, " + super().extra_repr()
