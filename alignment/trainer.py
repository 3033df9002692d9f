"""``PreferenceTrainer``: a thin ``transformers.Trainer`` for DPO, SamPO, KTO, FactAlign, SPPO and GPO on prefuse.

The policy runs to its last hidden state (``model_head.forward_hidden``: no logits), and a prefuse loss module
(``DPOLoss``, ``SamPOLoss``, ``KTOLoss``, ``FactAlignLoss``, ``SPPOLoss``, ``GPOLoss``, built from the config)
computes the log-probs with the fused head and the loss. The reference is, in this order of precedence:

1. precomputed per-token log-probs in the batch (``precompute_ref_log_probs=True``, or a data set prepared
   with ``precompute_ref_logps``): no reference model is kept;
2. ``ref_model``, a separate model (frozen, eval mode, moved to the trainer's device);
3. the policy with its PEFT adapter disabled, when the policy is a PEFT model and no ``ref_model`` is given;
4. otherwise a frozen copy of the initial policy (as TRL does).

Loss metrics (``rewards/margins`` ...) are accumulated per step and logged through ``self.log`` averaged over
the logging window (and over processes), with an ``eval_`` prefix during evaluation, as TRL's trainers do.
The loss runs inside the policy's lm-head forward and the reference log-probs inside the reference head's
(``CausalLMHead.apply`` / ``.logprobs``), so an FSDP2- or ZeRO-3-sharded head is gathered where it is used.
``head="naive"`` computes the same losses from the model's full logits (``log_softmax`` and gather, the plain
PyTorch way) -- the baseline the CLI measures prefuse against.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from prefuse.alignment.model_head import adapter_disabled, forward_hidden, head_options, is_peft_model
from prefuse.alignment.output import LossOutput
from torch import Tensor, nn
from transformers import Trainer, TrainingArguments

METHODS = ("dpo", "sampo", "kto", "factalign", "sppo", "gpo")
PAIRED_METHODS = ("dpo", "sampo", "sppo", "gpo")
UNPAIRED_METHODS = ("kto", "factalign")
DEFAULT_BETA = {"dpo": 0.1, "sampo": 0.1, "kto": 0.1, "factalign": 0.1, "sppo": 0.001, "gpo": 0.001}
HEADS = ("fused", "naive")
LIGER_BODY_KERNELS = {"rms_norm": True, "rope": True, "swiglu": True, "geglu": True, "cross_entropy": False,
                      "fused_linear_cross_entropy": False}


@dataclass
class PreferenceConfig(TrainingArguments):
    """``TrainingArguments`` plus the preference method and its loss hyper-parameters.

    ``beta`` defaults per method to the seeds' values (0.1 for DPO/SamPO/KTO/FactAlign, 0.001 for SPPO/GPO,
    i.e. η = 1000). ``remove_unused_columns`` defaults to False (the collators need the data's columns).
    ``use_liger_kernel=True`` applies Liger-Kernel's RMSNorm/RoPE/SwiGLU (GeGLU) to the model body only --
    prefuse computes the head -- and needs a Triton device (``ValueError`` on CPU).
    """

    method: str = field(default="dpo", metadata={"help": f"one of {METHODS}"})
    beta: float | None = field(default=None, metadata={"help": "β (default per method)"})
    loss_type: str = field(default="sigmoid", metadata={"help": "DPO loss type (prefuse.alignment.DPO_LOSS_TYPES)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "DPO label smoothing"})
    nll_weight: float = field(default=0.0, metadata={"help": "weight of the chosen NLL (RPO α; DPO, SamPO)"})
    desirable_weight: float = field(default=1.0, metadata={"help": "KTO/FactAlign λD"})
    undesirable_weight: float = field(default=1.0, metadata={"help": "KTO/FactAlign λU"})
    fg_beta: float = field(default=0.1, metadata={"help": "FactAlign sentence-level β"})
    fg_desirable_weight: float = field(default=1.0, metadata={"help": "FactAlign sentence-level λD"})
    fg_undesirable_weight: float = field(default=4.0, metadata={"help": "FactAlign sentence-level λU"})
    loss_weight: float = field(default=1.0, metadata={"help": "FactAlign response-level loss weight"})
    fg_loss_weight: float = field(default=1.0, metadata={"help": "FactAlign sentence-level loss weight"})
    gpo_clamp: float | None = field(default=None, metadata={"help": "GPO target clamp"})
    sampo_seed: int | None = field(default=None, metadata={"help": "SamPO sampling seed (default: seed)"})
    max_length: int | None = field(default=512, metadata={"help": "max prompt+completion tokens"})
    max_prompt_length: int | None = field(default=256, metadata={"help": "max prompt tokens (kept from the end)"})
    partial_sentences: str = field(default="drop", metadata={"help": "a sentence cut by truncation: drop | keep"})
    precompute_ref_log_probs: bool = field(default=False, metadata={"help": "precompute the reference log-probs"})
    head: str = field(default="fused", metadata={"help": "fused (prefuse) | naive (full logits)"})
    loss_backend: str = field(default="auto", metadata={"help": "linear_logprobs backend: auto | triton | torch"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep the collators' columns"})

    def __post_init__(self):
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.beta is None:
            self.beta = DEFAULT_BETA[self.method]


def build_loss(config: PreferenceConfig, *, softcap: float | None = None, temperature: float = 1.0) -> nn.Module:
    """The prefuse loss module of ``config.method`` with the config's hyper-parameters and the head options."""
    from prefuse.alignment import DPOLoss, FactAlignLoss, GPOLoss, KTOLoss, SamPOLoss, SPPOLoss

    options = {"softcap": softcap, "temperature": temperature, "backend": config.loss_backend}
    method, beta = config.method, config.beta
    if method == "dpo":
        return DPOLoss(beta, loss_type=config.loss_type, label_smoothing=config.label_smoothing,
                       nll_weight=config.nll_weight, **options)
    if method == "sampo":
        seed = config.seed if config.sampo_seed is None else config.sampo_seed
        return SamPOLoss(beta, seed=seed, nll_weight=config.nll_weight, **options)
    if method == "kto":
        return KTOLoss(beta, desirable_weight=config.desirable_weight, undesirable_weight=config.undesirable_weight,
                       **options)
    if method == "factalign":
        return FactAlignLoss(beta, fg_beta=config.fg_beta, desirable_weight=config.desirable_weight,
                             undesirable_weight=config.undesirable_weight,
                             fg_desirable_weight=config.fg_desirable_weight,
                             fg_undesirable_weight=config.fg_undesirable_weight, loss_weight=config.loss_weight,
                             fg_loss_weight=config.fg_loss_weight, **options)
    if method == "sppo":
        return SPPOLoss(beta, **options)
    if method == "gpo":
        return GPOLoss(beta, clamp=config.gpo_clamp, **options)
    raise ValueError(f"unknown method {method!r}")


def apply_liger_body_kernels(model: nn.Module, device: torch.device | str | None = None) -> None:
    """Liger-Kernel's RMSNorm / RoPE / SwiGLU (GeGLU) on ``model``'s body; never its (fused) cross entropy.

    Liger's kernels are Triton-only: on a CPU device they fail at the first forward ("0 active drivers"), so
    this raises ``ValueError`` up front.
    """
    from prefuse.alignment.model_head import unwrap_causal_lm

    device = torch.device(device) if device is not None else next(model.parameters()).device
    if device.type == "cpu":
        raise ValueError(
            "use_liger_kernel=True applies Liger-Kernel's Triton kernels (RMSNorm, RoPE, SwiGLU), which cannot run "
            "on CPU tensors; train on a CUDA device or leave use_liger_kernel off (prefuse's head runs on CPU "
            "through its PyTorch twin)"
        )
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as err:
        raise ValueError("use_liger_kernel=True needs liger-kernel: pip install liger-kernel") from err
    _apply_liger_kernel_to_instance(model=unwrap_causal_lm(model), **LIGER_BODY_KERNELS)


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with no parameter requiring grad (a reference model)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------- naive head
def naive_token_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                      ignore_index: int = -100) -> Tensor:
    """Per-token ``log p(label)`` ``(rows, T-1)`` from the model's full logits (0 at ignored positions)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    targets = labels[:, 1:]
    mask = targets != ignore_index
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, 0.0)


def reference_token_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *,
                          head: str = "fused", backend: str = "auto") -> Tensor:
    """Per-token reference log-probs ``(rows, T-1)`` without grad: prefuse's head (or full logits)."""
    with torch.no_grad():
        if head == "naive":
            return naive_token_logps(model, input_ids, attention_mask, labels)
        return forward_hidden(model, input_ids, attention_mask).logprobs(labels, backend=backend)


def precompute_ref_logps(ref_model: nn.Module, dataset, collator, *, batch_size: int = 8,
                         device: torch.device | str | None = None, head: str = "fused", backend: str = "auto"):
    """Add the reference's per-token log-probs of every completion token to a tokenised data set.

    Paired data (``chosen_input_ids``/``rejected_input_ids``) gets ``ref_chosen_logps`` and
    ``ref_rejected_logps``; unpaired data gets ``ref_logps`` and -- when ``collator`` builds KL rows -- a fixed
    KL partner prompt per example (``kl_prompt_input_ids``: the next example's prompt in data-set order that
    differs from its own) and ``ref_kl_logps`` for that KL row. The collators turn these lists into the
    ``ref_logps`` / ``ref_kl_logps`` tensors ``PreferenceTrainer`` passes to the losses, so no reference model
    is needed while training. Runs in data-set order with prefuse's op (``head="fused"``).
    """
    from prefuse.alignment.data.collators import UnpairedCollator, next_different

    device = torch.device(device) if device is not None else next(ref_model.parameters()).device
    was_training = ref_model.training
    ref_model.eval()
    paired = "chosen_input_ids" in dataset.column_names
    kl_rows = isinstance(collator, UnpairedCollator) and collator.kl_rows and not paired
    if kl_rows and "kl_prompt_input_ids" not in dataset.column_names:
        prompts = dataset["prompt_input_ids"]
        partners = [prompts[next_different(prompts, i)] for i in range(len(prompts))]
        dataset = dataset.add_column("kl_prompt_input_ids", partners)
    columns: dict[str, list] = defaultdict(list)

    def per_example(batch, prefix: str) -> list[list[float]]:
        ids, mask, labels = (batch[f"{prefix}input_ids"].to(device), batch[f"{prefix}attention_mask"].to(device),
                             batch[f"{prefix}labels"].to(device))
        logps = reference_token_logps(ref_model, ids, mask, labels, head=head, backend=backend).float().cpu()
        scored = labels[:, 1:].cpu() != -100
        return [row[keep].tolist() for row, keep in zip(logps, scored)]

    try:
        for start in range(0, len(dataset), batch_size):
            features = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = collator(features)
            rows = per_example(batch, "")
            if paired:
                columns["ref_chosen_logps"] += rows[: len(features)]
                columns["ref_rejected_logps"] += rows[len(features):]
            else:
                columns["ref_logps"] += rows
                if kl_rows:
                    columns["ref_kl_logps"] += per_example(batch, "kl_")
    finally:
        ref_model.train(was_training)
    for name, values in columns.items():
        if name in dataset.column_names:
            dataset = dataset.remove_columns(name)
        dataset = dataset.add_column(name, values)
    return dataset


CLASS_MEANS = {
    "rewards/chosen": ("rewards/chosen_sum", "count/chosen"),
    "rewards/rejected": ("rewards/rejected_sum", "count/rejected"),
    "logps/chosen": ("logps/chosen_sum", "count/chosen"),
    "logps/rejected": ("logps/rejected_sum", "count/rejected"),
}
"""KTO's and FactAlign's per-class means and the per-step (sum, count) they are logged from."""


def window_metrics(stored: dict[str, list[Tensor]], accelerator=None) -> dict[str, float]:
    """The logged value of each metric over a logging window of per-step values (one host read).

    Every metric is its mean over the window's steps (and processes). The per-class means of KTO and FactAlign
    (``CLASS_MEANS``) are logged as TRL 1.16's ``KTOTrainer`` logs them: per step ``Σ sum / Σ count`` over the
    processes, steps without an example of the class left out (not counted as 0), then the mean over the window;
    ``rewards/margins`` over the steps that have both classes. A class absent from the whole window is not logged.
    """
    keys = sorted(stored)
    steps = [torch.stack(stored[k]) for k in keys]
    if accelerator is not None and accelerator.num_processes > 1:
        steps = [accelerator.reduce(v, reduction="mean") for v in steps]  # a ratio of two means is Σ / Σ
    per_step = dict(zip(keys, steps))
    logged = dict(zip(keys, torch.stack([v.mean() for v in steps]).tolist()))
    classes = {name: pair for name, pair in CLASS_MEANS.items() if set(pair) <= per_step.keys()}
    if not classes:
        return logged
    means = {}
    for name, (total, count) in classes.items():
        present = per_step[count] > 0
        means[name] = torch.where(present, per_step[total] / per_step[count].clamp(min=1), torch.nan)
    if "rewards/chosen" in means and "rewards/rejected" in means:
        means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
    for name, value in zip(means, torch.stack(list(means.values())).nanmean(-1).tolist()):
        logged.pop(name, None)
        if not math.isnan(value):  # NaN: no step of the window had the class
            logged[name] = value
    return logged


def trl_differences(config: PreferenceConfig, tokenizer=None, dataset=None) -> list[str]:
    """Where this trainer, with these settings, deliberately computes something else than TRL 1.16 would."""
    notes = []
    if config.method == "dpo" and config.loss_type == "sigmoid" and config.label_smoothing > 0:
        notes.append("loss_type='sigmoid' with label_smoothing > 0 is conservative DPO (cDPO); TRL 1.16's sigmoid "
                     "loss ignores label_smoothing")
    if config.method == "dpo" and config.loss_type == "bco_pair":
        notes.append("bco_pair shifts the rewards by their running mean (BCO's δ); TRL 1.16's bco_pair uses δ = 0")
    columns = getattr(dataset, "column_names", None) or ()
    if (getattr(tokenizer, "chat_template", None) is not None and "prompt" in columns and "prompt_input_ids"
            not in columns and len(dataset) > 0 and isinstance(dataset[0]["prompt"], str)):
        notes.append("plain-text prompts are rendered with the tokenizer's chat template; TRL applies it to "
                     "conversational data only")
    return notes


_NOTED: set[str] = set()


def _note_trl_differences(notes: list[str]) -> None:
    """Say once per process which deliberate differences from TRL 1.16 these settings meet."""
    message = "PreferenceTrainer differs from TRL 1.16 on purpose here: " + "; ".join(notes)
    if notes and message not in _NOTED:
        _NOTED.add(message)
        from transformers.utils import logging

        logging.get_logger(__name__).warning(message)


class PreferenceTrainer(Trainer):
    """``transformers.Trainer`` for prefuse's preference losses (module docstring).

    Args:
        model: a Hugging Face causal LM (or a PEFT model wrapping one).
        ref_model: a separate frozen reference (None: see the module docstring).
        args: a ``PreferenceConfig``.
        train_dataset, eval_dataset: text data (``prompt``/``chosen``/``rejected`` for DPO, SamPO, SPPO, GPO;
            ``prompt``/``completion``/``label`` (+ ``sentences``/``sentence_labels``) for KTO, FactAlign) --
            tokenised here with ``processing_class`` -- or data already tokenised by
            ``tokenize_preference_data``. KTO accepts paired data (unpaired here).
        processing_class: the tokenizer (chat template used when it has one).
        data_collator: default ``collator_for(method, ...)``.
        loss: a prefuse loss module to use instead of the one built from ``args``.
        **kwargs: the rest of ``transformers.Trainer``'s arguments (callbacks, optimizers ...).
    """

    def __init__(self, model: nn.Module, ref_model: nn.Module | None = None, args: PreferenceConfig | None = None,
                 data_collator=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 loss: nn.Module | None = None, **kwargs):
        from prefuse.alignment.data import collator_for

        if args is None:
            args = PreferenceConfig(output_dir="prefuse-out")
        if not isinstance(args, PreferenceConfig):
            raise TypeError(
                f"args must be a PreferenceConfig (TrainingArguments plus the method's options), got "
                f"{type(args).__name__}"
            )
        if isinstance(model, str) or isinstance(ref_model, str):
            raise TypeError("pass model objects; load them yourself (prefuse never downloads)")
        self.method = args.method
        if args.use_liger_kernel:
            apply_liger_body_kernels(model, args.device)
            if ref_model is not None:
                apply_liger_body_kernels(ref_model, args.device)
            args.use_liger_kernel = False  # applied here; the base class would add Liger's cross entropy
            self.liger_applied = True
        else:
            self.liger_applied = False

        options = head_options(model)
        if ref_model is not None and head_options(ref_model) != options:
            raise ValueError(
                f"the reference's head options {head_options(ref_model)} differ from the policy's {options}: "
                "prefuse's losses score both with one softcap/temperature"
            )
        self.head_options = options
        self.loss_module = loss if loss is not None else build_loss(args, **options)
        self.vocab_size = model.get_input_embeddings().num_embeddings  # token ids of tokenised data must fit
        _note_trl_differences(trl_differences(args, processing_class, train_dataset))

        if train_dataset is not None:
            train_dataset = self._prepare_dataset(train_dataset, processing_class, args)
        if eval_dataset is not None:
            if isinstance(eval_dataset, dict):
                eval_dataset = {k: self._prepare_dataset(v, processing_class, args) for k, v in eval_dataset.items()}
            else:
                eval_dataset = self._prepare_dataset(eval_dataset, processing_class, args)
        if data_collator is None:
            if processing_class is None:
                raise ValueError("pass processing_class (the tokenizer) or a data_collator")
            data_collator = collator_for(self.method, processing_class, max_length=args.max_length,
                                         max_prompt_length=args.max_prompt_length,
                                         partial_sentences=args.partial_sentences)

        self.ref_model = None
        self.ref_source = None
        if args.precompute_ref_log_probs:
            self.ref_source = "precomputed"
        elif ref_model is not None:
            self.ref_source = "ref_model"
        elif is_peft_model(model):
            self.ref_source = "adapter_disabled"
        else:
            self.ref_source = "copy"
            ref_model = copy.deepcopy(model)

        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self.model_accepts_loss_kwargs = False  # the loss is a batch mean: the base class divides by GA steps
        self._metrics: dict[str, dict[str, list[Tensor]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

        if self.ref_source == "precomputed":
            source = ref_model if ref_model is not None else self.model
            self.train_dataset = self._precompute(source, self.train_dataset)
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self._precompute(source, v) for k, v in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = self._precompute(source, self.eval_dataset)
        elif ref_model is not None:
            self.ref_model = freeze(ref_model).to(self.args.device)

    # ------------------------------------------------------------------------------------------ data
    def _prepare_dataset(self, dataset, processing_class, args):
        from prefuse.alignment.data import tokenize_preference_data
        from prefuse.alignment.data.processing import unpair

        columns = set(dataset.column_names)
        tokenized = "prompt_input_ids" in columns
        paired = {"chosen", "rejected"} <= columns or {"chosen_input_ids", "rejected_input_ids"} <= columns
        if self.method in PAIRED_METHODS and not paired:
            raise ValueError(f"method {self.method!r} needs paired data (prompt/chosen/rejected), got {sorted(columns)}")
        if self.method in UNPAIRED_METHODS and paired:
            if self.method == "factalign" or tokenized:
                raise ValueError(f"method {self.method!r} needs unpaired data (prompt/completion/label)")
            dataset = unpair(dataset)
        if self.method == "sppo" and not {"p_chosen", "p_rejected"} <= columns:
            raise ValueError("SPPO needs win-rate columns p_chosen and p_rejected")
        if self.method == "gpo" and not {"s_chosen", "s_rejected"} <= columns:
            raise ValueError("GPO needs preference-score columns s_chosen and s_rejected")
        if self.method == "factalign" and not ({"sentences", "sentence_labels"} <= columns
                                               or "completion_sentence_ids" in columns):
            raise ValueError("FactAlign needs sentence columns (sentences, sentence_labels)")
        if tokenized:
            from prefuse.alignment.data import check_tokenized_data

            # a bad row (a token id past the embedding included): ValueError naming its index and field
            check_tokenized_data(dataset, self.method, vocab_size=self.vocab_size)
            return dataset
        if processing_class is None:
            raise ValueError("text data needs processing_class (the tokenizer) to be tokenised")
        return tokenize_preference_data(dataset, processing_class, max_length=args.max_length,
                                        max_prompt_length=args.max_prompt_length,
                                        sentences=self.method == "factalign" or None,
                                        partial_sentences=args.partial_sentences)

    def _precompute(self, source: nn.Module, dataset):
        if dataset is None:
            return None
        context = adapter_disabled(source) if is_peft_model(source) else contextlib.nullcontext()
        with context:
            return precompute_ref_logps(source, dataset, self.data_collator,
                                        batch_size=self.args.per_device_eval_batch_size, device=self.args.device,
                                        head=self.args.head, backend=self.args.loss_backend)

    # ------------------------------------------------------------------------------------------ loss
    def _policy_and_reference(self, model: nn.Module, inputs: dict, prefix: str = "") -> tuple:
        """``(policy CausalLMHead, reference kwargs for the loss)`` for the rows ``{prefix}input_ids``."""
        ids, mask = inputs[f"{prefix}input_ids"], inputs[f"{prefix}attention_mask"]
        grad = prefix == "" and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):  # KL rows: z is detached, no backward through them
            policy = forward_hidden(model, ids, mask)
        ref_name = "ref_logps" if prefix == "" else "ref_kl_logps"
        if ref_name in inputs:
            return policy, {ref_name: inputs[ref_name]}
        return policy, {ref_name: self._reference_logps(model, ids, mask, inputs[f"{prefix}labels"])}

    def _reference_logps(self, model, ids, mask, labels) -> Tensor:
        """Per-token reference log-probs ``(rows, T-1)``, computed in the reference head's own forward (so a
        sharded reference head is gathered for it) and handed to the loss as ``ref_logps``."""
        if self.ref_source == "precomputed":
            raise ValueError("precompute_ref_log_probs=True but the batch has no precomputed reference log-probs")
        with torch.no_grad():
            if self.ref_model is not None:
                ref = forward_hidden(self.ref_model, ids, mask)
            else:
                with adapter_disabled(model):
                    ref = forward_hidden(model, ids, mask)
            return ref.logprobs(labels, ignore_index=self.loss_module.ignore_index, backend=self.args.loss_backend)

    def preference_loss(self, model: nn.Module, inputs: dict) -> LossOutput:
        """The method's ``LossOutput`` on a collated batch (the policy's graph attached to ``loss``)."""
        if self.args.head == "naive":
            return self._naive_loss(model, inputs)
        method, loss = self.method, self.loss_module
        labels = inputs["labels"]
        policy, ref = self._policy_and_reference(model, inputs)
        # the loss runs inside the policy head's forward (CausalLMHead.apply): a sharded head is gathered for it
        if method in ("dpo", "sampo"):
            return policy.apply(loss, labels, **ref)
        if method == "sppo":
            return policy.apply(loss, labels, p_chosen=inputs["p_chosen"], p_rejected=inputs["p_rejected"], **ref)
        if method == "gpo":
            return policy.apply(loss, labels, s_chosen=inputs["s_chosen"], s_rejected=inputs["s_rejected"], **ref)
        kl_policy, kl_ref = self._policy_and_reference(model, inputs, prefix="kl_")
        # the KL rows go through the same head (the policy's weight) within the same call
        kwargs = {"kl_hidden": kl_policy.hidden, "kl_labels": inputs["kl_labels"], **ref, **kl_ref}
        if method == "kto":
            return policy.apply(loss, labels, inputs["desirable"], **kwargs)
        return policy.apply(loss, labels, inputs["desirable"], sentence_ids=inputs["sentence_ids"],
                            sentence_labels=inputs["sentence_labels"], kl_sentence_ids=inputs.get("kl_sentence_ids"),
                            **kwargs)

    def _naive_logps(self, model, inputs, prefix: str = "") -> tuple[Tensor, Tensor]:
        ids, mask, labels = (inputs[f"{prefix}input_ids"], inputs[f"{prefix}attention_mask"],
                             inputs[f"{prefix}labels"])
        grad = prefix == "" and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            policy = naive_token_logps(model, ids, mask, labels)
        ref_name = "ref_logps" if prefix == "" else "ref_kl_logps"
        if ref_name in inputs:
            ref = torch.where(labels[:, 1:] != -100, inputs[ref_name], 0.0)
        else:
            with torch.no_grad():
                if self.ref_model is not None:
                    ref = naive_token_logps(self.ref_model, ids, mask, labels)
                else:
                    with adapter_disabled(model):
                        ref = naive_token_logps(model, ids, mask, labels)
        return policy, ref

    def _naive_loss(self, model, inputs) -> LossOutput:
        """The same loss from full logits (``head="naive"``), through ``prefuse.alignment.functional``."""
        from prefuse.alignment import functional as Fn

        loss, method = self.loss_module, self.method
        labels = inputs["labels"]
        mask = labels[:, 1:] != -100
        policy, ref = self._naive_logps(model, inputs)
        if method in PAIRED_METHODS:
            b = labels.shape[0] // 2
            if method == "sampo":
                gen = loss.generator(policy.device)
                kept = Fn.sampo_sample_masks(mask[:b], mask[b:], generator=gen)
                ref_kept = (Fn.sampo_sample_masks(mask[:b], mask[b:], generator=gen)
                            if loss.independent_ref_sample else kept)
                return Fn.sampo_loss(policy[:b], policy[b:], ref[:b], ref[b:], mask[:b], mask[b:], beta=loss.beta,
                                     nll_weight=loss.nll_weight, sampled_masks=kept, ref_sampled_masks=ref_kept)
            ps, rs, lengths = policy.sum(-1), ref.sum(-1), mask.sum(-1)
            if method == "dpo":
                delta = loss._bco_delta(ps, rs) if loss.loss_type == "bco_pair" else None
                return Fn.dpo_loss(ps[:b], ps[b:], rs[:b], rs[b:], beta=loss.beta, loss_type=loss.loss_type,
                                   label_smoothing=loss.label_smoothing, nll_weight=loss.nll_weight,
                                   chosen_lengths=lengths[:b], rejected_lengths=lengths[b:],
                                   discopop_tau=loss.discopop_tau, bco_delta=delta)
            if method == "sppo":
                return Fn.sppo_loss(ps[:b], ps[b:], rs[:b], rs[b:], inputs["p_chosen"], inputs["p_rejected"],
                                    beta=loss.beta)
            return Fn.gpo_loss(ps[:b], ps[b:], rs[:b], rs[b:], inputs["s_chosen"], inputs["s_rejected"],
                               beta=loss.beta, clamp=loss.clamp)
        kl_policy, kl_ref = self._naive_logps(model, inputs, prefix="kl_")
        common = {"beta": loss.beta, "desirable_weight": loss.desirable_weight,
                  "undesirable_weight": loss.undesirable_weight}
        if method == "kto":
            return Fn.kto_loss(policy.sum(-1), ref.sum(-1), inputs["desirable"], policy_kl_logps=kl_policy.sum(-1),
                               ref_kl_logps=kl_ref.sum(-1), **common)
        kl_ids = inputs.get("kl_sentence_ids")
        return Fn.factalign_loss(
            policy, ref, inputs["desirable"], inputs["sentence_ids"][:, 1:], inputs["sentence_labels"],
            policy_kl_logps=kl_policy if kl_ids is not None else kl_policy.sum(-1),
            ref_kl_logps=kl_ref if kl_ids is not None else kl_ref.sum(-1),
            kl_sentence_ids=None if kl_ids is None else kl_ids[:, 1:], fg_beta=loss.fg_beta,
            fg_desirable_weight=loss.fg_desirable_weight, fg_undesirable_weight=loss.fg_undesirable_weight,
            loss_weight=loss.loss_weight, fg_loss_weight=loss.fg_loss_weight, **common,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------ Trainer hooks
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != "skip_logits"}
        out = self.preference_loss(model, inputs)
        self._store_metrics(out.metrics, "train" if model.training else "eval")
        return (out.loss, out.metrics) if return_outputs else out.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs({k: v for k, v in inputs.items() if k != "skip_logits"})
        with torch.no_grad(), self.compute_loss_context_manager():
            out = self.preference_loss(model, inputs)
        self._store_metrics(out.metrics, "eval")
        return out.loss.detach(), None, None

    def _store_metrics(self, metrics: dict[str, Tensor], mode: str) -> None:
        for key, value in metrics.items():
            self._metrics[mode][key].append(value.detach().float().reshape(()))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        stored = self._metrics[mode]
        if stored:
            prefix = "eval_" if mode == "eval" else ""
            logs.update({prefix + k: v for k, v in window_metrics(stored, self.accelerator).items()})
            stored.clear()  # logs is updated in place: evaluate() returns it
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------ checkpoints
    # A checkpoint also holds prefuse's own state, so that a resumed run continues the uninterrupted one exactly:
    # ``prefuse_state.pt`` (``prefuse_state_{rank}.pt`` per process when distributed: the SamPO sampling
    # stream's position) and, for the default reference (a frozen copy of the initial policy),
    # ``reference_model.safetensors`` -- the copy's weights, written once per run and hard-linked into later
    # checkpoints. ``train(resume_from_checkpoint=...)`` restores both before the base class resumes, so the
    # reference stays the INITIAL policy whatever model the resumed trainer was built from. A ``ref_model`` or
    # a PEFT base (adapter disabled) is the caller's and is not saved: pass the same one when resuming;
    # precomputed reference log-probs are recomputed at construction from the model (or ``ref_model``) given,
    # so build the resumed trainer from the initial policy, or pass the data set with its reference columns.
    PREFUSE_STATE_NAME = "prefuse_state.pt"
    REFERENCE_WEIGHTS_NAME = "reference_model.safetensors"

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """``Trainer.train``; resuming first restores prefuse's checkpoint state (reference, SamPO stream)."""
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            self._load_prefuse_state(os.fspath(resume_from_checkpoint))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._save_prefuse_state(os.path.join(self._get_output_dir(trial=trial), folder))

    def _prefuse_state_file(self, checkpoint: str) -> str:
        name = self.PREFUSE_STATE_NAME
        if self.args.world_size > 1:
            name = name.replace(".pt", f"_{self.args.process_index}.pt")
        return os.path.join(checkpoint, name)

    def _save_prefuse_state(self, output_dir: str) -> None:
        os.makedirs(output_dir, exist_ok=True)
        state = {"method": self.method, "ref_source": self.ref_source}
        if hasattr(self.loss_module, "generator_state"):
            state["sampo_generator"] = self.loss_module.generator_state()
        torch.save(state, self._prefuse_state_file(output_dir))
        if self.ref_source == "copy" and self.ref_model is not None and self.args.should_save:
            target = os.path.join(output_dir, self.REFERENCE_WEIGHTS_NAME)
            written = getattr(self, "_reference_weights_file", None)
            if written is not None and os.path.isfile(written) and written != target:
                try:
                    if os.path.exists(target):
                        os.remove(target)
                    os.link(written, target)  # the same weights every checkpoint: no second copy on disk
                    return
                except OSError:
                    pass
            from safetensors.torch import save_model

            save_model(self.ref_model, target)  # handles tied (shared) tensors
            self._reference_weights_file = target

    def _load_prefuse_state(self, checkpoint: str) -> None:
        path = self._prefuse_state_file(checkpoint)
        if not os.path.isfile(path):
            warnings.warn(f"{checkpoint} has no {os.path.basename(path)} (not written by PreferenceTrainer): the "
                          "reference and SamPO's sampling stream are not restored", stacklevel=3)
            return
        state = torch.load(path, weights_only=True)
        if state.get("method") != self.method:
            raise ValueError(f"the checkpoint {checkpoint} was trained with method {state.get('method')!r}, this "
                             f"trainer runs {self.method!r}")
        if self.ref_source == "copy":
            weights = os.path.join(checkpoint, self.REFERENCE_WEIGHTS_NAME)
            if os.path.isfile(weights):
                from safetensors.torch import load_model

                load_model(self.ref_model, weights, device=str(self.args.device))
                self._reference_weights_file = None
            else:
                warnings.warn(f"{checkpoint} has no {self.REFERENCE_WEIGHTS_NAME}: the reference is the copy of "
                              "the model this trainer was built with", stacklevel=3)
        elif state.get("ref_source") != self.ref_source:
            warnings.warn(f"the checkpoint's reference was {state.get('ref_source')!r}, this trainer's is "
                          f"{self.ref_source!r}: the resumed losses differ from an uninterrupted run", stacklevel=3)
        if "sampo_generator" in state and hasattr(self.loss_module, "load_generator_state"):
            self.loss_module.load_generator_state(state["sampo_generator"])
