"""``PrefuseDPOTrainer`` / ``PrefuseKTOTrainer``: TRL's trainers with the log-probs and the loss through prefuse.

Everything else stays TRL's (data preparation, collators, precomputed reference log-probs, reference-model sync,
PEFT handling, logging); only ``_compute_loss`` changes: the policy (and the reference) run to their last hidden
state through ``model_head.forward_hidden`` -- through the wrapped model's own ``forward``, so DDP and accelerate
hooks run -- and ``prefuse.kernels.linear_logprobs`` scores the completion tokens inside the lm-head module's own
forward (``CausalLMHead.apply``: FSDP2 / DeepSpeed ZeRO-3 hooks gather a sharded head for the op and its backward
and reduce-scatter its gradient, as for the model's own head), with TRL's per-token outputs in the same pass
(entropy, mean logit, is-top-1, and ``log Σp²`` for WPO). The loss is prefuse's:
``prefuse.alignment.functional.dpo.dpo_pair_losses`` for each of TRL's DPO ``loss_type`` entries, ``kto_loss`` for
KTO. Metrics go through TRL's ``self._metrics`` under TRL's names, reduced as TRL reduces them: ``entropy``,
``logits/chosen``, ``logits/rejected``, ``mean_token_accuracy`` (DPO), ``rewards/*``, ``logps/*``, ``kl`` (KTO),
``num_tokens`` and ``aux_loss``.

Tested with TRL 1.16.0 (``pip install 'prefuse[trl]'``). The options that matter for the loss are honoured:
``beta``, ``loss_type`` (DPO: a list, with ``loss_weights``; KTO: ``kto`` and ``apo_zero_unpaired``),
``label_smoothing`` (where TRL 1.16 reads it: ``robust``, ``exo_pair``), ``discopop_tau``, ``use_weighting``
(WPO), ``ld_alpha`` (LD-DPO), ``f_divergence_type`` / ``f_alpha_divergence_coef``, ``desirable_weight`` /
``undesirable_weight``, ``precompute_ref_log_probs`` (TRL's stored sums are used), and a MoE model's router
auxiliary loss (``router_aux_loss_coef``).

``padding_free=True`` (``DPOConfig.padding_free``; ``PrefuseKTOConfig.padding_free``, as TRL 1.16's ``KTOConfig``
has no such field) runs the model bodies without padding. TRL 1.16 switches the option off for DPO
(with a warning) and pads; the drop-ins keep it from TRL's ``__init__`` and pack each step's batch themselves:
TRL's collator still pads (on the right), and ``_compute_loss`` packs the policy/reference rows (DPO: the 2B
chosen and rejected rows; KTO: the main rows, and the ``KL_*`` rows into a row of their own) with
``prefuse.alignment.data.pack_batch`` into one row of the ``N`` real tokens, runs the model on it with
``position_ids`` restarting per sequence and no attention mask (Hugging Face models build the block-causal mask
from them), scores each token against the next label *of its own sequence* (``packed_targets``), and lays every
per-token output back in the padded batch's shifted layout ``(rows, T-1)`` (zeros past a row's end). The loss and
every metric are then those of the padded batch; only padding compute is saved. Refused with
``padding_free=True`` (``ValueError``): multimodal inputs (pixel values, ``token_type_ids`` ...), which
``pack_batch`` does not lay out, and a prompt-learning PEFT adapter, which ignores ``position_ids``.

Refused with a ``ValueError`` at construction:

- DPO ``loss_type`` ``aot`` / ``aot_unpaired``: losses on log-ratios sorted across the batch, which prefuse's
  losses (one formula per pair) do not have;
- ``use_liger_kernel=True`` on CPU: Liger-Kernel's body kernels are Triton-only;
- a PEFT adapter (LoRA) on the lm-head (``model_head`` raises: its delta would be skipped).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

try:
    import trl
    from trl import DPOTrainer, KTOConfig, KTOTrainer
except ImportError as err:  # pragma: no cover - exercised only without TRL
    raise ImportError("prefuse.alignment.trl needs TRL: pip install 'prefuse[trl]'") from err

from prefuse.alignment import functional as Fn
from prefuse.alignment.data.packing import pack_batch
from prefuse.alignment.functional.dpo import dpo_pair_losses
from prefuse.alignment.model_head import (
    adapter_disabled,
    forward_hidden,
    head_options,
    is_peft_model,
    unwrap_causal_lm,
)
from prefuse.alignment.packed_attention import use_varlen_attention
from prefuse.alignment.packing import PackedLayout
from prefuse.kernels import linear_logprobs

__all__ = ["TESTED_TRL_VERSION", "PrefuseDPOTrainer", "PrefuseKTOConfig", "PrefuseKTOTrainer"]

TESTED_TRL_VERSION = "1.16.0"
SUPPORTED_DPO_LOSS_TYPES = tuple(sorted(set(Fn.DPO_LOSS_TYPES) | {"sft"}))
SUPPORTED_KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
_LABEL_SMOOTHED = ("robust", "exo_pair")  # the loss types whose TRL 1.16 formula reads label_smoothing
_DPO_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
_KTO_NON_MODEL_KEYS = {
    "completion_mask",
    "KL_input_ids",
    "KL_attention_mask",
    "KL_completion_mask",
    "KL_token_type_ids",
    "KL_mm_token_type_ids",
    "label",
    "ref_logps",
    "ref_KL_logps",
}
_DPO_STATS = ("entropy", "mean_logits", "is_top1")  # TRL's DPO metrics; WPO adds log_sum_sq_probs
_KTO_STATS = ("entropy", "mean_logits")


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
    if args.use_liger_kernel and args.device.type == "cpu":  # TRL applies Liger's body kernels at train()
        errors.append("use_liger_kernel=True on CPU (Liger-Kernel's kernels are Triton-only)")
    return errors


@contextlib.contextmanager
def _padding_free_kept_from_trl(args):
    """Yields the user's ``padding_free``; within the block ``args.padding_free`` is False, so TRL 1.16's DPO
    ``__init__`` does not warn that it falls back to padding (the drop-ins pack in ``_compute_loss``)."""
    padding_free = bool(getattr(args, "padding_free", False))
    if padding_free:
        args.padding_free = False
    try:
        yield padding_free
    finally:
        if padding_free:
            args.padding_free = True


def _packing(trainer, padding_free: bool) -> bool:
    """``padding_free``, refused (``ValueError``) for a prompt-learning PEFT adapter (prompt / prefix tuning ...):
    PEFT prepends its virtual tokens once to the packed row, not to each sequence, and drops ``position_ids``
    (prefix tuning offsets them), so the packed sequences would attend across each other. With packing, models on
    sdpa / eager attention attend per sequence (``use_varlen_attention``) instead of over the packed row's
    ``N × N`` block-causal mask."""
    if padding_free and is_peft_model(trainer.model):
        config = trainer.accelerator.unwrap_model(trainer.model).active_peft_config
        if config.is_prompt_learning:
            raise ValueError(
                f"padding_free=True with a prompt-learning PEFT adapter ({type(config).__name__}) is not supported: "
                "PEFT adds its virtual tokens once to the packed row, not to each sequence, and ignores the "
                "position_ids that keep the packed sequences apart. Set padding_free=False"
            )
    if padding_free:
        for model in (trainer.model, trainer.ref_model):
            if model is not None:
                use_varlen_attention(model)
    return padding_free


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


@contextlib.contextmanager
def _model_output(model, box: dict):
    """Within the block, ``box["output"]`` is the causal LM's last output (its MoE ``aux_loss`` ...)."""
    handle = unwrap_causal_lm(model).register_forward_hook(
        lambda module, args, output: box.update(output=output)
    )
    try:
        yield
    finally:
        handle.remove()


def _token_outputs(trainer, model, labels, model_kwargs, *, grad: bool, stats: tuple[str, ...] = ()):
    """``(per-token outputs, model output)`` of ``labels`` ``(rows, T)`` through the hidden-state forward and
    prefuse's op: a ``(rows, T-1)`` log-prob tensor without ``stats``, else a ``TokenOutputs`` with them; with
    ``trainer.padding_free`` the rows run packed (``_packed_token_outputs``), in the same layout."""
    box: dict = {}
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()), _model_output(model, box):
        if trainer.padding_free:
            out = _packed_token_outputs(trainer, model, labels, model_kwargs, stats)
        else:  # the op runs in the head's forward: gathered if sharded
            head = forward_hidden(model, **model_kwargs)
            out = head.apply(linear_logprobs, labels, shift=True, outputs=stats, **trainer.prefuse_options)
    return out, box.get("output")


def _packed_token_outputs(trainer, model, labels, model_kwargs, stats):
    """``_token_outputs`` of right-padded rows ``(R, T)`` run as one packed row of their ``N`` real tokens.

    ``pack_batch`` keeps the tokens (``attention_mask``), with ``position_ids`` restarting at 0 per row and no
    attention mask (the model masks block-causally); token ``i`` of row ``r`` at position ``p`` predicts the
    label at ``[r, p + 1]`` (``packed_targets``: ``-100`` at a row's last token), which is what the padded
    ``shift=True`` call scores at ``[r, p]``. Each per-token output ``(1, N)`` goes back to ``[r, p]``
    (``PackedLayout.token_rows``), zero (False) where the padded call has padding; ``(R, T-1)`` as padded."""
    rows = {"input_ids": model_kwargs["input_ids"], "attention_mask": model_kwargs["attention_mask"]}
    extra = sorted(k for k, v in model_kwargs.items() if k not in rows and isinstance(v, torch.Tensor))
    if extra:
        raise ValueError(
            f"padding_free=True packs input_ids and attention_mask only; the batch also has {extra} (multimodal "
            "inputs: per-image pixel values and per-token type ids that pack_batch does not lay out in one "
            "packed row). Set padding_free=False"
        )
    options = {k: v for k, v in model_kwargs.items() if k not in rows}  # e.g. output_router_logits
    packed = pack_batch({**rows, "labels": labels})
    head = forward_hidden(model, packed["input_ids"], None, position_ids=packed["position_ids"], **options)
    layout = PackedLayout(packed["sequence_ids"])  # once: the targets and the outputs' way back share it
    targets = layout.targets(layout.to_rows(packed["labels"], -100, "labels"), True, -100)  # packed_targets
    out = head.apply(linear_logprobs, targets, shift=False, outputs=stats, **trainer.prefuse_options)
    n_rows, width = labels.shape[0], labels.shape[1] - 1

    def padded(values, name):  # (rows, length - 1) -> (R, T-1): T can exceed the longest row + 1
        values = layout.token_rows(values, shift=True, name=name)
        return F.pad(values, (0, width - values.shape[1], 0, n_rows - values.shape[0]))

    if isinstance(out, torch.Tensor):
        return padded(out, "logp")
    return out._replace(**{name: padded(v, name) for name, v in out._asdict().items() if v is not None})


def _reference_logps(trainer, labels, model_kwargs) -> torch.Tensor:
    with torch.no_grad(), _reference_context(trainer):
        source = trainer.model if trainer.ref_model is None else trainer.ref_model
        return _token_outputs(trainer, source, labels, model_kwargs, grad=False)[0]


def _masked_mean(trainer, values, mask) -> float | None:
    """``Σ values·mask / Σ mask`` over all processes (TRL's token-weighted metrics); None without tokens."""
    gather = trainer.accelerator.gather_for_metrics
    total = gather(torch.where(mask.bool(), values.float(), 0.0).sum()).sum().item()
    count = gather(mask.sum()).sum().item()
    return total / count if count > 0 else None


def _num_tokens(trainer, mode: str, attention_mask: torch.Tensor) -> None:
    if mode == "train" and hasattr(trainer, "_total_train_tokens"):
        count = trainer.accelerator.gather_for_metrics(attention_mask.sum()).sum().item()
        trainer._total_train_tokens += count // getattr(trainer, "_tp_size", 1)
    trainer._metrics[mode]["num_tokens"] = [getattr(trainer, "_total_train_tokens", 0)]


def _add_aux_loss(trainer, mode: str, loss, output):
    """TRL's MoE term: ``loss + router_aux_loss_coef · aux_loss`` (the model's load-balancing loss), logged."""
    if not trainer.aux_loss_enabled:
        return loss
    aux_loss = getattr(output, "aux_loss", None)
    if aux_loss is None:
        raise ValueError(
            f"{type(unwrap_causal_lm(trainer.model)).__name__} returned no aux_loss with output_router_logits=True: "
            "prefuse takes the router auxiliary loss from the model's own output"
        )
    trainer._metrics[mode]["aux_loss"].append(trainer.accelerator.gather_for_metrics(aux_loss).mean().item())
    return loss + trainer.router_aux_loss_coef * aux_loss


def _recompute_outputs(model, model_kwargs):
    """TRL's deprecated ``return_outputs=True``: the logits, from an extra forward (as TRL does)."""
    with torch.no_grad():
        return model(**model_kwargs)


def f_divergence_scores(logratios: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """``f'(π/π_ref)`` of TRL's ``f_divergence_type`` from ``log(π/π_ref)``: the reverse KL's ``log t``, the forward
    KL's ``1 - 1/t``, Jensen-Shannon's ``log 2t/(t+1)``, the α-divergence's ``(t^(α-1) - 1)/(α-1)`` (``log t`` at
    α = 1; the exponent clamped at 80 as TRL)."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return logratios
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence":
        return (torch.exp(((alpha - 1.0) * logratios).clamp(max=80.0)) - 1.0) / (alpha - 1.0)
    raise ValueError(
        f"f_divergence_type must be reverse_kl, forward_kl, js_divergence or alpha_divergence; got {kind!r}"
    )


class PrefuseDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` whose policy/reference log-probs and loss go through prefuse (module docstring)."""

    def __init__(self, model, ref_model=None, args=None, *rest, **kwargs):
        _require(DPOTrainer)
        if args is not None:
            self._check_args(args)
        with _padding_free_kept_from_trl(args) as padding_free:
            super().__init__(model, ref_model, args, *rest, **kwargs)
        self.padding_free = _packing(self, padding_free)
        self._check_args(self.args)
        self.prefuse_options = head_options(self.model)

    @staticmethod
    def _check_args(args) -> None:
        loss_types = args.loss_type if isinstance(args.loss_type, (list, tuple)) else [args.loss_type]
        errors = [
            f"loss_type={t!r} (a loss on log-ratios sorted across the batch)"
            for t in loss_types
            if t not in SUPPORTED_DPO_LOSS_TYPES
        ]
        errors += _check_common(args)
        _refuse(errors, "PrefuseDPOTrainer")

    def _sequence_logps(self, per_token, shift_mask):
        """Per-row sums; LD-DPO (``ld_alpha``) weighs the tokens past the shorter completion of the pair by α."""
        if self.ld_alpha is None:
            return per_token.sum(-1)
        position = shift_mask.cumsum(-1)
        shared = torch.minimum(*shift_mask.sum(-1).chunk(2)).repeat(2).unsqueeze(-1)
        in_shared = (position > 0) & (position <= shared)
        return (per_token * in_shared).sum(-1) + self.ld_alpha * (per_token * (position > shared)).sum(-1)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _DPO_NON_MODEL_KEYS}
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[:, 1:]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        stats = _DPO_STATS + (("log_sum_sq_probs",) if self.use_weighting else ())
        policy_kwargs = (
            dict(model_kwargs, output_router_logits=True) if self.aux_loss_enabled else model_kwargs
        )
        policy, output = _token_outputs(self, model, labels, policy_kwargs, grad=True, stats=stats)
        chosen_logps, rejected_logps = self._sequence_logps(policy.logp, shift_mask).chunk(2)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            reference = _reference_logps(self, labels, model_kwargs)
            ref_chosen, ref_rejected = self._sequence_logps(reference, shift_mask).chunk(2)
        chosen_logratios, rejected_logratios = chosen_logps - ref_chosen, rejected_logps - ref_rejected

        loss = self._loss(policy, shift_mask, completion_mask, chosen_logratios, rejected_logratios)
        loss = _add_aux_loss(self, mode, loss, output)
        self._log_dpo_metrics(
            mode,
            policy,
            shift_mask,
            inputs["attention_mask"],
            chosen_logps.detach(),
            rejected_logps.detach(),
            chosen_logratios.detach(),
            rejected_logratios.detach(),
        )
        if return_outputs:
            return loss, _recompute_outputs(model, model_kwargs)
        return loss

    def _loss(self, policy, shift_mask, completion_mask, chosen_logratios, rejected_logratios):
        """Σ over ``loss_type`` of ``weight · mean_b ℓ``; the f-divergence's scores stand for the log-ratios, and
        ``ipo`` / ``sigmoid_norm`` divide them by TRL's completion lengths (``completion_mask`` rows)."""
        scores = [
            f_divergence_scores(x, self.f_divergence_type, self.f_alpha_divergence_coef)
            for x in (chosen_logratios, rejected_logratios)
        ]
        lengths = completion_mask.sum(-1).float().clamp(min=1).chunk(2)
        pair_weights = None
        if self.use_weighting:  # WPO: exp of the mean over completion tokens of log p - log Σp², per row
            with torch.no_grad():
                aligned = ((policy.logp - policy.log_sum_sq_probs) * shift_mask).sum(-1)
                chosen_w, rejected_w = torch.exp(aligned / shift_mask.sum(-1).clamp(min=1)).chunk(2)
                pair_weights = chosen_w * rejected_w
        loss = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "sft":  # TRL's SFT term: the chosen tokens' mean NLL
                chosen_mask = shift_mask.chunk(2)[0].bool()
                per_pair = (-policy.logp.chunk(2)[0][chosen_mask].mean()).expand(chosen_logratios.shape[0])
            else:
                chosen, rejected = scores
                if loss_type == "ipo":
                    chosen, rejected = chosen / lengths[0], rejected / lengths[1]
                per_pair = dpo_pair_losses(
                    chosen, rejected, beta=self.beta, loss_type=loss_type,
                    label_smoothing=self.label_smoothing if loss_type in _LABEL_SMOOTHED else 0.0,
                    discopop_tau=self.args.discopop_tau, bco_delta=0.0, chosen_lengths=lengths[0],
                    rejected_lengths=lengths[1],
                )  # fmt: skip
            if pair_weights is not None:
                per_pair = per_pair * pair_weights
            loss = loss + weight * per_pair.mean()
        return loss

    def _log_dpo_metrics(
        self, mode, policy, shift_mask, attention_mask, chosen, rejected, chosen_logratios, rejected_logratios
    ) -> None:
        """TRL 1.16's DPO metrics, reduced over processes as TRL reduces them."""
        metrics, gather = self._metrics[mode], self.accelerator.gather
        metrics["entropy"].append(_masked_mean(self, policy.entropy.detach(), shift_mask) or 0.0)
        _num_tokens(self, mode, attention_mask)
        chosen_mask, rejected_mask = shift_mask.chunk(2)
        for side, logits, mask in zip(
            ("chosen", "rejected"), policy.mean_logits.chunk(2), (chosen_mask, rejected_mask)
        ):
            metrics[f"logits/{side}"].append(_masked_mean(self, logits, mask) or 0.0)
        metrics["mean_token_accuracy"].append(
            _masked_mean(self, policy.is_top1.chunk(2)[0], chosen_mask) or 0.0
        )
        chosen_rewards, rejected_rewards = self.beta * chosen_logratios, self.beta * rejected_logratios
        values = {
            "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards, "logps/chosen": chosen, "logps/rejected": rejected,
        }  # fmt: skip
        for key, value in values.items():
            metrics[key].append(gather(value).mean().item())


@dataclass
class PrefuseKTOConfig(KTOConfig):
    """``trl.KTOConfig`` with ``padding_free``, which TRL 1.16's has not: ``PrefuseKTOTrainer`` then packs each
    step's rows, and its KL rows, into packed rows (module docstring). Any ``KTOConfig`` works with the
    trainer; this one only adds the field."""

    padding_free: bool = field(
        default=False,
        metadata={"help": "PrefuseKTOTrainer: run the model bodies on packed rows, without padding"},
    )


class PrefuseKTOTrainer(KTOTrainer):
    """``trl.KTOTrainer`` whose log-probs and loss (``prefuse.alignment.functional.kto_loss``) go through prefuse.

    ``apo_zero_unpaired`` is KTO with the reference point fixed at 0 (``1 - σ(βΔ)`` desirable, ``σ(βΔ)``
    undesirable): no KL rows are scored, as in TRL."""

    def __init__(self, model, ref_model=None, args=None, *rest, **kwargs):
        _require(KTOTrainer)
        if args is not None:
            self._check_args(args)
        super().__init__(model, ref_model, args, *rest, **kwargs)
        padding_free = bool(getattr(self.args, "padding_free", False))  # TRL's KTO ignores it
        self.padding_free = _packing(self, padding_free)
        self._check_args(self.args)
        self.prefuse_options = head_options(self.model)

    @staticmethod
    def _check_args(args) -> None:
        errors = [] if args.loss_type in SUPPORTED_KTO_LOSS_TYPES else [f"loss_type={args.loss_type!r}"]
        errors += _check_common(args)
        _refuse(errors, "PrefuseKTOTrainer")

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        model_kwargs = {k: v for k, v in batch.items() if k not in _KTO_NON_MODEL_KEYS}
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        desirable = torch.as_tensor(batch["label"], dtype=torch.bool, device=labels.device)

        policy_kwargs = (
            dict(model_kwargs, output_router_logits=True) if self.aux_loss_enabled else model_kwargs
        )
        policy, output = _token_outputs(self, model, labels, policy_kwargs, grad=True, stats=_KTO_STATS)
        if self.precompute_ref_logps:
            ref_logps = batch["ref_logps"]
        else:
            ref_logps = _reference_logps(self, labels, model_kwargs).sum(-1)
        reference_point = self._reference_point(model, batch, model_kwargs)
        out = Fn.kto_loss(
            policy.logp.sum(-1),
            ref_logps,
            desirable,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
            **reference_point,
        )
        loss = _add_aux_loss(self, mode, out.loss, output)
        self._log_kto_metrics(mode, out.metrics, policy, desirable, batch)
        if return_outputs:
            return loss, _recompute_outputs(model, model_kwargs)
        return loss

    def _reference_point(self, model, batch, model_kwargs) -> dict:
        """``kto_loss``'s reference point: the KL rows' sums under the policy and the reference, or ``kl=0``."""
        if not self.calculate_KL:
            return {"kl": 0.0}
        kl_kwargs = dict(
            model_kwargs, input_ids=batch["KL_input_ids"], attention_mask=batch["KL_attention_mask"]
        )
        for key in ("token_type_ids", "mm_token_type_ids"):
            if f"KL_{key}" in batch:
                kl_kwargs[key] = batch[f"KL_{key}"]
        kl_labels = batch["KL_input_ids"].masked_fill(batch["KL_completion_mask"] == 0, -100)
        with torch.no_grad():
            policy_kl = _token_outputs(self, model, kl_labels, kl_kwargs, grad=False)[0].sum(-1)
        if self.precompute_ref_logps:
            ref_kl = batch["ref_KL_logps"]
        else:
            ref_kl = _reference_logps(self, kl_labels, kl_kwargs).sum(-1)
        return {"policy_kl_logps": policy_kl, "ref_kl_logps": ref_kl}

    def _log_kto_metrics(self, mode, metrics, policy, desirable, batch) -> None:
        """TRL 1.16's KTO metrics: ``kl``, token-weighted ``entropy`` and ``logits/*``, the per-class means pooled
        over processes (``Σ sum / Σ count``, a class absent from the step not logged)."""
        logged, gather = self._metrics[mode], self.accelerator.gather_for_metrics
        logged["kl"].append(metrics["kl"].item())
        shift_mask = batch["completion_mask"][:, 1:]
        logged["entropy"].append(_masked_mean(self, policy.entropy.detach(), shift_mask) or 0.0)
        _num_tokens(self, mode, batch["attention_mask"])
        for side, rows in (("chosen", desirable), ("rejected", ~desirable)):
            value = _masked_mean(self, policy.mean_logits, shift_mask * rows.unsqueeze(-1))
            if value is not None:
                logged[f"logits/{side}"].append(value)
        counts = {side: gather(metrics[f"count/{side}"]).sum().item() for side in ("chosen", "rejected")}
        for side in ("chosen", "rejected"):
            if counts[side] > 0:
                for kind in ("rewards", "logps"):
                    total = gather(metrics[f"{kind}/{side}_sum"]).sum().item()
                    logged[f"{kind}/{side}"].append(total / counts[side])
        if counts["chosen"] > 0 and counts["rejected"] > 0:
            logged["rewards/margins"].append(logged["rewards/chosen"][-1] - logged["rewards/rejected"][-1])
