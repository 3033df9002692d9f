"""TRL drop-ins: ``PrefuseDPOTrainer`` / ``PrefuseKTOTrainer`` -- TRL's trainers with the loss through prefuse.

Everything else stays TRL's (data preparation, collators, precomputed reference log-probs, reference-model
sync, PEFT handling, logging); only ``_compute_loss`` changes: the policy (and the reference) run to their last
hidden state through ``model_head.forward_hidden`` -- through the wrapped model's own ``forward``, so DDP and
accelerate hooks run -- and ``prefuse.kernels.linear_logprobs`` scores the completion tokens inside the lm-head
module's own forward (``CausalLMHead.apply``: FSDP2 / DeepSpeed ZeRO-3 hooks gather a sharded head for the op
and its backward and reduce-scatter its gradient, as for the model's own head), then the loss is
prefuse's (``prefuse.alignment.functional.dpo_loss`` for each of TRL's ``loss_type`` entries, ``KTOLoss`` for
KTO). Metrics go through TRL's ``self._metrics`` under TRL's names.

Tested with TRL 1.16.0 (``pip install 'prefuse[trl]'``). The TRL options that matter for the loss are honoured:
``beta``, ``loss_type`` (a list, with ``loss_weights``), ``label_smoothing`` (where TRL uses it: ``robust``,
``exo_pair``; TRL >= 1.0 ignores it for ``sigmoid`` and so does this drop-in), ``discopop_tau``,
``desirable_weight`` / ``undesirable_weight``, ``precompute_ref_log_probs`` (TRL's stored sums are used).
Refused with a ``ValueError`` at construction, because prefuse computes no vocabulary-wide statistic other
than the log-sum-exp, or has no such loss:

- DPO ``loss_type`` ``aot`` / ``aot_unpaired`` (batch-sorted losses, not in prefuse);
- ``use_weighting=True`` (WPO needs ``log Σ p²`` over the vocabulary);
- ``ld_alpha`` (LD-DPO) and ``f_divergence_type != "reverse_kl"`` (not in prefuse's losses);
- ``padding_free=True`` (packed rows);
- KTO ``loss_type="apo_zero_unpaired"``;
- a MoE model whose router auxiliary loss is enabled (``output_router_logits``): the hidden-state forward
  does not return it;
- a PEFT adapter (LoRA) on the lm-head (``model_head`` raises: its delta would be skipped).

Not logged (they need full logits): ``entropy``, ``logits/chosen``, ``logits/rejected``, ``mean_token_accuracy``.
"""

from __future__ import annotations

import contextlib

import torch

try:
    import trl
    from trl import DPOTrainer, KTOTrainer
except ImportError as err:  # pragma: no cover - exercised only without TRL
    raise ImportError("prefuse.alignment.trl needs TRL: pip install 'prefuse[trl]'") from err

from prefuse.alignment import KTOLoss
from prefuse.alignment import functional as Fn
from prefuse.alignment.model_head import adapter_disabled, forward_hidden, head_options, is_peft_model
from prefuse.kernels import linear_logprobs

__all__ = ["TESTED_TRL_VERSION", "PrefuseDPOTrainer", "PrefuseKTOTrainer"]

TESTED_TRL_VERSION = "1.16.0"
SUPPORTED_DPO_LOSS_TYPES = tuple(sorted((set(Fn.DPO_LOSS_TYPES) & {
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
    "discopop", "sigmoid_norm"}) | {"sft"}))
_LABEL_SMOOTHED = ("robust", "exo_pair")  # the loss types whose TRL (>= 1.0) formula reads label_smoothing
_DPO_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
_KTO_NON_MODEL_KEYS = {"completion_mask", "KL_input_ids", "KL_attention_mask", "KL_completion_mask",
                       "KL_token_type_ids", "KL_mm_token_type_ids", "label", "ref_logps", "ref_KL_logps"}


def _require(trainer_cls) -> None:
    if not hasattr(trainer_cls, "_compute_loss"):
        raise ImportError(
            f"prefuse's TRL drop-ins override {trainer_cls.__name__}._compute_loss, which TRL {trl.__version__} does "
            f"not have; they are tested with TRL {TESTED_TRL_VERSION}"
        )


def _refuse(errors: list[str], owner: str) -> None:
    if errors:
        raise ValueError(f"{owner} (prefuse) does not support: " + "; ".join(errors))


def _check_common(args) -> list[str]:
    errors = []
    if getattr(args, "padding_free", False):
        errors.append("padding_free=True (packed rows)")
    if args.use_liger_kernel and args.device.type == "cpu":  # TRL applies Liger's body kernels at train()
        errors.append("use_liger_kernel=True on CPU (Liger-Kernel's kernels are Triton-only)")
    return errors


def _reference_context(trainer):
    """TRL's adapter switch when the reference is the PEFT model's base (or a "ref" adapter)."""
    if trainer.ref_model is None and is_peft_model(trainer.model):
        model = trainer.accelerator.unwrap_model(trainer.model)
        try:
            from trl.trainer.utils import use_adapter

            return use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None)
        except ImportError:  # pragma: no cover
            return adapter_disabled(model)
    return contextlib.nullcontext()


def _token_logps(trainer, model, labels, model_kwargs, *, grad: bool) -> torch.Tensor:
    """Per-token log-probs ``(rows, T-1)`` of ``labels`` through the hidden-state forward and prefuse's op."""
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        head = forward_hidden(model, **model_kwargs)  # the op runs in the head's forward: gathered if sharded
        return head.apply(linear_logprobs, labels, shift=True, **trainer.prefuse_options)


def _reference_logps(trainer, labels, model_kwargs) -> torch.Tensor:
    with torch.no_grad(), _reference_context(trainer):
        source = trainer.model if trainer.ref_model is None else trainer.ref_model
        return _token_logps(trainer, source, labels, model_kwargs, grad=False)


def _num_tokens(trainer, mode: str, attention_mask: torch.Tensor) -> None:
    if mode == "train" and hasattr(trainer, "_total_train_tokens"):
        count = trainer.accelerator.gather_for_metrics(attention_mask.sum()).sum().item()
        trainer._total_train_tokens += count // getattr(trainer, "_tp_size", 1)
        trainer._metrics[mode]["num_tokens"] = [trainer._total_train_tokens]


def _recompute_outputs(model, model_kwargs):
    """TRL's deprecated ``return_outputs=True``: the logits, from an extra forward (as TRL does)."""
    with torch.no_grad():
        return model(**model_kwargs)


class PrefuseDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` whose policy/reference log-probs and loss go through prefuse (module docstring)."""

    def __init__(self, model, ref_model=None, args=None, *rest, **kwargs):
        _require(DPOTrainer)
        if args is not None:
            self._check_args(args)
        super().__init__(model, ref_model, args, *rest, **kwargs)
        self._check_args(self.args)
        if getattr(self, "aux_loss_enabled", False):
            raise ValueError("PrefuseDPOTrainer (prefuse) does not support the MoE router auxiliary loss")
        self.prefuse_options = head_options(self.model)

    @staticmethod
    def _check_args(args) -> None:
        loss_types = args.loss_type if isinstance(args.loss_type, (list, tuple)) else [args.loss_type]
        errors = [f"loss_type={t!r}" for t in loss_types if t not in SUPPORTED_DPO_LOSS_TYPES]
        if getattr(args, "use_weighting", False):
            errors.append("use_weighting=True (WPO weights need log Σ p² over the vocabulary)")
        if getattr(args, "ld_alpha", None) is not None:
            errors.append("ld_alpha (LD-DPO)")
        if getattr(args, "f_divergence_type", "reverse_kl") not in ("reverse_kl", None):
            errors.append(f"f_divergence_type={args.f_divergence_type!r}")
        errors += _check_common(args)
        _refuse(errors, "PrefuseDPOTrainer")

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _DPO_NON_MODEL_KEYS}
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        policy = _token_logps(self, model, labels, model_kwargs, grad=True)
        chosen_logps, rejected_logps = policy.sum(-1).chunk(2)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = _reference_logps(self, labels, model_kwargs).sum(-1).chunk(2)
        lengths = (labels[:, 1:] != -100).sum(-1)
        chosen_lengths, rejected_lengths = lengths.chunk(2)

        loss = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "sft":  # TRL's SFT term: the chosen tokens' mean NLL
                term = -chosen_logps.sum() / chosen_lengths.sum().clamp(min=1)
            else:
                term = Fn.dpo_loss(
                    chosen_logps, rejected_logps, ref_chosen, ref_rejected, beta=self.beta, loss_type=loss_type,
                    label_smoothing=self.label_smoothing if loss_type in _LABEL_SMOOTHED else 0.0,
                    chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                    discopop_tau=self.args.discopop_tau, bco_delta=0.0 if loss_type == "bco_pair" else None,
                ).loss  # fmt: skip
            loss = loss + weight * term
        self._log_dpo_metrics(mode, chosen_logps.detach(), rejected_logps.detach(), ref_chosen, ref_rejected,
                              inputs["attention_mask"])
        if return_outputs:
            return loss, _recompute_outputs(model, model_kwargs)
        return loss


    def _log_dpo_metrics(self, mode, chosen, rejected, ref_chosen, ref_rejected, attention_mask) -> None:
        """TRL's DPO metrics: rewards ``β·(logπ − logπ_ref)`` of the sums whatever the loss type, gathered."""
        gather = self.accelerator.gather
        chosen_rewards = self.beta * (chosen - ref_chosen.float())
        rejected_rewards = self.beta * (rejected - ref_rejected.float())
        _num_tokens(self, mode, attention_mask)
        values = {
            "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards, "logps/chosen": chosen, "logps/rejected": rejected,
        }  # fmt: skip
        for key, value in values.items():
            self._metrics[mode][key].append(gather(value).mean().item())


class PrefuseKTOTrainer(KTOTrainer):
    """``trl.KTOTrainer`` whose log-probs and loss (``prefuse.alignment.KTOLoss``) go through prefuse."""

    def __init__(self, model, ref_model=None, args=None, *rest, **kwargs):
        _require(KTOTrainer)
        if args is not None:
            self._check_args(args)
        super().__init__(model, ref_model, args, *rest, **kwargs)
        self._check_args(self.args)
        if getattr(self, "aux_loss_enabled", False):
            raise ValueError("PrefuseKTOTrainer (prefuse) does not support the MoE router auxiliary loss")
        self.prefuse_options = head_options(self.model)
        self.prefuse_loss = KTOLoss(self.beta, desirable_weight=self.desirable_weight,
                                    undesirable_weight=self.undesirable_weight, **self.prefuse_options)

    @staticmethod
    def _check_args(args) -> None:
        errors = [] if args.loss_type == "kto" else [f"loss_type={args.loss_type!r}"]
        errors += _check_common(args)
        _refuse(errors, "PrefuseKTOTrainer")

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        model_kwargs = {k: v for k, v in batch.items() if k not in _KTO_NON_MODEL_KEYS}
        kl_kwargs = dict(model_kwargs, input_ids=batch["KL_input_ids"], attention_mask=batch["KL_attention_mask"])
        for key in ("token_type_ids", "mm_token_type_ids"):
            if f"KL_{key}" in batch:
                kl_kwargs[key] = batch[f"KL_{key}"]
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        kl_labels = batch["KL_input_ids"].masked_fill(batch["KL_completion_mask"] == 0, -100)
        desirable = torch.as_tensor(batch["label"], dtype=torch.bool, device=labels.device)

        policy = forward_hidden(model, **model_kwargs)
        with torch.no_grad():
            kl_policy = forward_hidden(model, **kl_kwargs)
        if self.precompute_ref_logps:
            reference = {"ref_logps": batch["ref_logps"], "ref_kl_logps": batch["ref_KL_logps"]}
        else:
            reference = {"ref_logps": _reference_logps(self, labels, model_kwargs),
                         "ref_kl_logps": _reference_logps(self, kl_labels, kl_kwargs)}
        # the loss runs in the policy head's forward (gathered if sharded); the KL rows share that head
        out = policy.apply(self.prefuse_loss, labels, desirable, kl_hidden=kl_policy.hidden, kl_labels=kl_labels,
                           **reference)
        self._log_kto_metrics(mode, out.metrics, batch["attention_mask"])
        if return_outputs:
            return out.loss, _recompute_outputs(model, model_kwargs)
        return out.loss

    def _log_kto_metrics(self, mode, metrics, attention_mask) -> None:
        """TRL's KTO metrics: ``kl`` and the per-class means pooled over processes (sum / count)."""
        gather = self.accelerator.gather_for_metrics
        self._metrics[mode]["kl"].append(metrics["kl"].item())
        _num_tokens(self, mode, attention_mask)
        counts = {side: gather(metrics[f"count/{side}"]).sum().item() for side in ("chosen", "rejected")}
        for side in ("chosen", "rejected"):
            if counts[side] > 0:
                for kind in ("rewards", "logps"):
                    total = gather(metrics[f"{kind}/{side}_sum"]).sum().item()
                    self._metrics[mode][f"{kind}/{side}"].append(total / counts[side])
        if counts["chosen"] > 0 and counts["rejected"] > 0:
            self._metrics[mode]["rewards/margins"].append(
                self._metrics[mode]["rewards/chosen"][-1] - self._metrics[mode]["rewards/rejected"][-1])
