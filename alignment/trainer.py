"""``PreferenceTrainer``: a thin ``transformers.Trainer`` for DPO, SamPO, KTO, FactAlign, SPPO, GPO, SimPO, ORPO
and CPO on prefuse.

The policy runs to its last hidden state (``model_head.forward_hidden``: no logits), and the method's prefuse
loss module (``prefuse.alignment.methods``: ``DPOLoss`` ... ``CPOLoss``, built from the config) computes the
log-probs with the fused head and the loss. SimPO, ORPO and CPO need no reference. For the others the
reference is, in this order of precedence:

1. precomputed log-probs in the batch (``precompute_ref_log_probs=True``, or a data set prepared with
   ``precompute_ref_logps``; per-sequence sums where the loss needs no more, per token for SamPO and
   FactAlign): no reference model is kept;
2. ``ref_model``, a separate model (frozen, eval mode, moved to the trainer's device);
3. the policy with its PEFT adapter disabled, when the policy is a PEFT model and no ``ref_model`` is given;
4. otherwise a frozen copy of the initial policy (as TRL does).

Loss metrics (``rewards/margins`` ...) are accumulated per step and logged through ``self.log`` averaged over
the logging window (and over processes), with an ``eval_`` prefix during evaluation, as TRL's trainers do.
The loss runs inside the policy's lm-head forward and the reference log-probs inside the reference head's
(``CausalLMHead.apply`` / ``.logprobs``), so an FSDP2- or ZeRO-3-sharded head is gathered where it is used.
``head="naive"`` computes the same losses from the model's full logits (``log_softmax`` and gather, the plain
PyTorch way; then the loss module's own ``loss_from_token_logps``) -- the baseline the CLI measures prefuse
against.
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
from prefuse.alignment import checkpoints
from prefuse.alignment.data.packing import PackedCollator, TokenBudgetBatchSampler, example_tokens
from prefuse.alignment.methods import METHODS, get_method
from prefuse.alignment.model_head import adapter_disabled, forward_hidden, head_options, is_peft_model
from prefuse.alignment.output import LossOutput
from prefuse.alignment.packed_attention import use_varlen_attention
from prefuse.alignment.packing import packed_targets
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments

HEADS = ("fused", "naive")
PACKED_ATTENTION = ("varlen", "model")
LIGER_BODY_KERNELS = {
    "rms_norm": True,
    "rope": True,
    "swiglu": True,
    "geglu": True,
    "cross_entropy": False,
    "fused_linear_cross_entropy": False,
}


@dataclass
class PreferenceConfig(TrainingArguments):
    """``TrainingArguments`` plus the preference method and its loss hyper-parameters.

    ``beta`` and ``nll_weight`` default per method (``prefuse.alignment.methods``): β = 0.1, but 0.001 for
    SPPO/GPO (η = 1000, the seeds' value); the NLL weight 0, but 1 for ORPO and CPO (their SFT / behaviour-
    cloning term). ``remove_unused_columns`` defaults to False (the collators need the data's columns).
    ``use_liger_kernel=True`` applies Liger-Kernel's RMSNorm/RoPE/SwiGLU (GeGLU) to the model body only --
    prefuse computes the head -- and needs a Triton device (``ValueError`` on CPU).
    """

    method: str = field(default="dpo", metadata={"help": f"one of {tuple(METHODS)}"})
    beta: float | None = field(default=None, metadata={"help": "β (default per method)"})
    loss_type: str = field(
        default="sigmoid", metadata={"help": "DPO loss type (prefuse.alignment.DPO_LOSS_TYPES)"}
    )
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing ε (DPO, SimPO, CPO)"})
    nll_weight: float | None = field(
        default=None,
        metadata={"help": "weight of the chosen-token NLL (default per method: 1 for ORPO/CPO, else 0)"},
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target margin γ"})
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
    max_prompt_length: int | None = field(
        default=256, metadata={"help": "max prompt tokens (kept from the end)"}
    )
    partial_sentences: str = field(
        default="drop", metadata={"help": "a sentence cut by truncation: drop | keep"}
    )
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "precompute the reference log-probs"}
    )
    head: str = field(default="fused", metadata={"help": "fused (prefuse) | naive (full logits)"})
    loss_backend: str = field(
        default="auto", metadata={"help": "linear_logprobs backend: auto | triton | torch"}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep the collators' columns"})
    padding_free: bool = field(
        default=False,
        metadata={"help": "pack each batch's sequences into one row (no padding; position_ids)"},
    )
    max_tokens_per_batch: int | None = field(
        default=None,
        metadata={"help": "padding_free: training batches of at most this many tokens, not rows"},
    )
    packed_attention: str = field(
        default="varlen",
        metadata={
            "help": "padding_free: varlen (sdpa / eager models attend per sequence: packed_attention.py) | "
            "model (the model's own attention over the packed row's block-causal mask)"
        },
    )

    def __post_init__(self):
        super().__post_init__()
        spec = get_method(self.method)
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.max_tokens_per_batch is not None and not self.padding_free:
            raise ValueError("max_tokens_per_batch sizes packed batches: it needs padding_free=True")
        if self.padding_free and self.head != "fused":
            raise ValueError("padding_free=True needs head='fused' (the naive head scores padded rows only)")
        if self.packed_attention not in PACKED_ATTENTION:
            raise ValueError(
                f"packed_attention must be one of {PACKED_ATTENTION}, got {self.packed_attention!r}"
            )
        if self.precompute_ref_log_probs and spec.reference is None:
            raise ValueError(f"precompute_ref_log_probs=True, but method {self.method!r} uses no reference")
        for name, value in spec.defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.nll_weight is None:
            self.nll_weight = 0.0


def build_loss(
    config: PreferenceConfig, *, softcap: float | None = None, temperature: float = 1.0
) -> nn.Module:
    """The prefuse loss module of ``config.method`` with the config's hyper-parameters and the head options."""
    options = {"softcap": softcap, "temperature": temperature, "backend": config.loss_backend}
    return get_method(config.method).build_loss(config, **options)


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


def _packing(inputs: dict, prefix: str) -> dict:
    """``{"position_ids", "sequence_ids"}`` of a packed row group (``prefix`` "" or "kl_"), else ``{}``."""
    if inputs.get(f"{prefix}sequence_ids") is None:
        return {}
    return {"position_ids": inputs[f"{prefix}position_ids"], "sequence_ids": inputs[f"{prefix}sequence_ids"]}


# ---------------------------------------------------------------------------------------------- naive head
def naive_token_logps(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, ignore_index: int = -100
) -> Tensor:
    """Per-token ``log p(label)`` ``(rows, T-1)`` from the model's full logits (0 at ignored positions)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    targets = labels[:, 1:]
    mask = targets != ignore_index
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, 0.0)


def reference_token_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    *,
    head: str = "fused",
    backend: str = "auto",
) -> Tensor:
    """Per-token reference log-probs ``(rows, T-1)`` without grad: prefuse's head (or full logits)."""
    with torch.no_grad():
        if head == "naive":
            return naive_token_logps(model, input_ids, attention_mask, labels)
        return forward_hidden(model, input_ids, attention_mask).logprobs(labels, backend=backend)


def precompute_ref_logps(
    ref_model: nn.Module,
    dataset,
    collator,
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    head: str = "fused",
    backend: str = "auto",
    per_token: bool = True,
):
    """Add the reference's log-probs of every completion to a tokenised data set.

    Paired data (``chosen_input_ids``/``rejected_input_ids``) gets ``ref_chosen_logps`` and
    ``ref_rejected_logps``; unpaired data gets ``ref_logps`` and -- when ``collator`` builds KL rows -- a fixed
    KL partner prompt per example (``kl_prompt_input_ids``: the next example's prompt in data-set order that
    differs from its own) and ``ref_kl_logps`` for that KL row. Each is one float per completion token
    (``per_token=True``: SamPO's sample and FactAlign's sentences need them), else the completion's sum, one
    float per example (what DPO, KTO, SPPO and GPO use). The collators turn them into the ``ref_logps`` /
    ``ref_kl_logps`` tensors ``PreferenceTrainer`` passes to the losses, so no reference model is needed
    while training. Runs in data-set order with prefuse's op (``head="fused"``).
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

    def per_example(batch, prefix: str) -> list:
        ids, mask, labels = (
            batch[f"{prefix}input_ids"].to(device),
            batch[f"{prefix}attention_mask"].to(device),
            batch[f"{prefix}labels"].to(device),
        )
        logps = reference_token_logps(ref_model, ids, mask, labels, head=head, backend=backend).float()
        if not per_token:
            return logps.sum(-1).cpu().tolist()  # one transfer of one float per row
        logps, scored = logps.cpu(), labels[:, 1:].cpu() != -100
        return [row[keep].tolist() for row, keep in zip(logps, scored)]

    try:
        for start in range(0, len(dataset), batch_size):
            features = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = collator(features)
            rows = per_example(batch, "")
            if paired:
                columns["ref_chosen_logps"] += rows[: len(features)]
                columns["ref_rejected_logps"] += rows[len(features) :]
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

CLASS_STEP_MEANS = {
    "fg_logps/policy_chosen": "count/fg_chosen",
    "fg_logps/reference_chosen": "count/fg_chosen",
    "fg_logps/policy_rejected": "count/fg_rejected",
    "fg_logps/reference_rejected": "count/fg_rejected",
}
"""FactAlign's per-class sentence means, logged per step as a mean (0 without a sentence of the class) with the
count they are taken over: pooled like ``CLASS_MEANS`` with the sum ``mean × count``."""


def window_metrics(stored: dict[str, list[Tensor]], accelerator=None) -> dict[str, float]:
    """The logged value of each metric over a logging window of per-step values (one host read).

    Every metric is its mean over the window's steps (and processes). The per-class means of KTO and FactAlign
    (``CLASS_MEANS``, and FactAlign's sentence means, ``CLASS_STEP_MEANS``) are logged as TRL 1.16's ``KTOTrainer`` logs them: per step ``Σ sum / Σ count`` over the
    processes, steps without an example of the class left out (not counted as 0), then the mean over the window;
    ``rewards/margins`` over the steps that have both classes. A class absent from the whole window is not logged.
    """
    pairs = dict(CLASS_MEANS)
    stored = dict(stored)
    derived = []
    for name, count in CLASS_STEP_MEANS.items():
        if name in stored and count in stored:
            total = f"{name}__sum"
            stored[total] = [mean * n for mean, n in zip(stored[name], stored[count])]
            pairs[name] = (total, count)
            derived.append(total)
    keys = sorted(stored)
    steps = [torch.stack(stored[k]) for k in keys]
    if accelerator is not None and accelerator.num_processes > 1:
        steps = [accelerator.reduce(v, reduction="mean") for v in steps]  # a ratio of two means is Σ / Σ
    per_step = dict(zip(keys, steps))
    logged = dict(zip(keys, torch.stack([v.mean() for v in steps]).tolist()))
    for total in derived:
        del logged[total]
    classes = {name: pair for name, pair in pairs.items() if set(pair) <= per_step.keys()}
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
        notes.append(
            "loss_type='sigmoid' with label_smoothing > 0 is conservative DPO (cDPO); TRL 1.16's sigmoid "
            "loss ignores label_smoothing"
        )
    if config.method == "dpo" and config.loss_type == "bco_pair":
        notes.append(
            "bco_pair shifts the rewards by their running mean (BCO's δ); TRL 1.16's bco_pair uses δ = 0"
        )
    columns = getattr(dataset, "column_names", None) or ()
    if (
        getattr(tokenizer, "chat_template", None) is not None
        and "prompt" in columns
        and "prompt_input_ids" not in columns
        and len(dataset) > 0
        and isinstance(dataset[0]["prompt"], str)
    ):
        notes.append(
            "plain-text prompts are rendered with the tokenizer's chat template; TRL applies it to "
            "conversational data only"
        )
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
        train_dataset, eval_dataset: text data (``prompt``/``chosen``/``rejected`` for DPO, SamPO, SPPO, GPO,
            SimPO, ORPO, CPO; ``prompt``/``completion``/``label`` (+ ``sentences``/``sentence_labels``) for KTO, FactAlign) --
            tokenised here with ``processing_class`` -- or data already tokenised by
            ``tokenize_preference_data``. KTO accepts paired data (unpaired here).
        processing_class: the tokenizer (chat template used when it has one).
        data_collator: default: the method's collator (``prefuse.alignment.methods``).
        loss: a prefuse loss module to use instead of the one built from ``args``.
        **kwargs: the rest of ``transformers.Trainer``'s arguments (callbacks, optimizers ...).
    """

    def __init__(
        self,
        model: nn.Module,
        ref_model: nn.Module | None = None,
        args: PreferenceConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        loss: nn.Module | None = None,
        **kwargs,
    ):
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
        self.spec = get_method(args.method)
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
                eval_dataset = {
                    k: self._prepare_dataset(v, processing_class, args) for k, v in eval_dataset.items()
                }
            else:
                eval_dataset = self._prepare_dataset(eval_dataset, processing_class, args)
        if data_collator is None:
            if processing_class is None:
                raise ValueError("pass processing_class (the tokenizer) or a data_collator")
            data_collator = self.spec.collator(
                processing_class,
                max_length=args.max_length,
                max_prompt_length=args.max_prompt_length,
                partial_sentences=args.partial_sentences,
            )

        self.ref_model = None
        self.ref_source = None
        if self.spec.reference is None:
            if ref_model is not None:
                raise ValueError(f"method {self.method!r} is reference-free: pass no ref_model")
            self.ref_source = "none"
        elif args.precompute_ref_log_probs:
            self.ref_source = "precomputed"
        elif ref_model is not None:
            self.ref_source = "ref_model"
        elif is_peft_model(model):
            self.ref_source = "adapter_disabled"
        else:
            self.ref_source = "copy"
            ref_model = copy.deepcopy(model)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self.model_accepts_loss_kwargs = False  # the loss is a batch mean: the base class divides by GA steps
        self._metrics: dict[str, dict[str, list[Tensor]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

        if self.ref_source == "precomputed":
            source = ref_model if ref_model is not None else self.model
            self.train_dataset = self._precompute(source, self.train_dataset)
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self._precompute(source, v) for k, v in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = self._precompute(source, self.eval_dataset)
        elif ref_model is not None:
            self.ref_model = freeze(ref_model).to(self.args.device)
        if args.padding_free:  # after precomputing, which runs the collator's padded rows
            self.data_collator = PackedCollator(self.data_collator)
            if args.packed_attention == "varlen":
                for m in (self.model, self.ref_model):
                    if m is not None:
                        use_varlen_attention(m)

    # ------------------------------------------------------------------------------------------ data
    def get_train_dataloader(self):
        """The base class's loader, or with ``max_tokens_per_batch`` batches sized by their token count
        (``TokenBudgetBatchSampler``, reshuffled every epoch from the config's seed)."""
        if self.args.max_tokens_per_batch is None:
            return super().get_train_dataloader()
        dataset = self.train_dataset
        lengths = [example_tokens(dataset[i]) for i in range(len(dataset))]
        sampler = TokenBudgetBatchSampler(lengths, self.args.max_tokens_per_batch, seed=self.args.seed)
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def _prepare_dataset(self, dataset, processing_class, args):
        from prefuse.alignment.data import tokenize_preference_data
        from prefuse.alignment.data.processing import unpair

        columns = set(dataset.column_names)
        tokenized = "prompt_input_ids" in columns
        paired = {"chosen", "rejected"} <= columns or {"chosen_input_ids", "rejected_input_ids"} <= columns
        spec = self.spec
        if spec.paired and not paired:
            raise ValueError(
                f"method {self.method!r} needs paired data (prompt/chosen/rejected), got {sorted(columns)}"
            )
        if not spec.paired and paired:
            if spec.sentences or tokenized:
                raise ValueError(f"method {self.method!r} needs unpaired data (prompt/completion/label)")
            dataset = unpair(dataset)
        needed = spec.tokenized_columns if tokenized else spec.columns
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ValueError(f"method {self.method!r} needs the columns {list(needed)}; missing {missing}")
        if tokenized:
            from prefuse.alignment.data import check_tokenized_data

            # a bad row (a token id past the embedding included): ValueError naming its index and field
            check_tokenized_data(dataset, self.method, vocab_size=self.vocab_size)
            return dataset
        if processing_class is None:
            raise ValueError("text data needs processing_class (the tokenizer) to be tokenised")
        return tokenize_preference_data(
            dataset,
            processing_class,
            max_length=args.max_length,
            max_prompt_length=args.max_prompt_length,
            sentences=spec.sentences or None,
            partial_sentences=args.partial_sentences,
        )

    def _precompute(self, source: nn.Module, dataset):
        if dataset is None:
            return None
        context = adapter_disabled(source) if is_peft_model(source) else contextlib.nullcontext()
        with context:
            return precompute_ref_logps(
                source,
                dataset,
                self.data_collator,
                batch_size=self.args.per_device_eval_batch_size,
                device=self.args.device,
                head=self.args.head,
                backend=self.args.loss_backend,
                per_token=self.spec.reference == "tokens",
            )

    # ------------------------------------------------------------------------------------------ loss
    def _policy_and_reference(self, model: nn.Module, inputs: dict, prefix: str = "") -> tuple:
        """``(policy CausalLMHead, reference kwargs for the loss)`` for the rows ``{prefix}input_ids``."""
        ids, mask = inputs[f"{prefix}input_ids"], inputs.get(f"{prefix}attention_mask")
        packing = _packing(inputs, prefix)
        body = {"position_ids": packing["position_ids"]} if packing else {}
        grad = prefix == "" and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):  # KL rows: z is detached, no backward through them
            policy = forward_hidden(model, ids, mask, **body)
        if self.spec.reference is None:
            return policy, {}
        ref_name = "ref_logps" if prefix == "" else "ref_kl_logps"
        if ref_name in inputs:
            return policy, {ref_name: inputs[ref_name]}
        return policy, {ref_name: self._reference_logps(model, ids, mask, inputs[f"{prefix}labels"], packing)}

    def _reference_logps(self, model, ids, mask, labels, packing: dict) -> Tensor:
        """Per-token reference log-probs ``(rows, T-1)`` (a packed row: ``(1, N)`` in the packed layout),
        computed in the reference head's own forward (so a sharded reference head is gathered for it) and
        handed to the loss as ``ref_logps``."""
        if self.ref_source == "precomputed":
            raise ValueError(
                "precompute_ref_log_probs=True but the batch has no precomputed reference log-probs"
            )
        ignore = self.loss_module.ignore_index
        body = {"position_ids": packing["position_ids"]} if packing else {}
        with torch.no_grad():
            if self.ref_model is not None:
                ref = forward_hidden(self.ref_model, ids, mask, **body)
            else:
                with adapter_disabled(model):
                    ref = forward_hidden(model, ids, mask, **body)
            if packing:
                targets = packed_targets(labels, packing["sequence_ids"], ignore_index=ignore)
                return ref.logprobs(targets, shift=False, ignore_index=ignore, backend=self.args.loss_backend)
            return ref.logprobs(labels, ignore_index=ignore, backend=self.args.loss_backend)

    def _batch_kwargs(self, inputs: dict, *, shifted: bool) -> dict:
        """The method's batch tensors for the loss (``token_keys`` shifted like the log-probs when ``shifted``)."""
        out = {}
        for key in self.spec.batch_keys:
            if inputs.get(key) is not None:
                value = inputs[key]
                out[key] = value[:, 1:] if shifted and key in self.spec.token_keys else value
        return out

    def preference_loss(self, model: nn.Module, inputs: dict) -> LossOutput:
        """The method's ``LossOutput`` on a collated batch (the policy's graph attached to ``loss``)."""
        if self.args.head == "naive":
            return self._naive_loss(model, inputs)
        policy, ref = self._policy_and_reference(model, inputs)
        kwargs = {**ref, **self._batch_kwargs(inputs, shifted=False)}
        if "sequence_ids" in inputs:
            kwargs["sequence_ids"] = inputs["sequence_ids"]
        if self.spec.kl_rows:
            # the KL rows go through the same head (the policy's weight) within the same call
            kl_policy, kl_ref = self._policy_and_reference(model, inputs, prefix="kl_")
            kwargs.update(kl_hidden=kl_policy.hidden, kl_labels=inputs["kl_labels"], **kl_ref)
            if "kl_sequence_ids" in inputs:
                kwargs["kl_sequence_ids"] = inputs["kl_sequence_ids"]
        # the loss runs inside the policy head's forward (CausalLMHead.apply): a sharded head is gathered for it
        return policy.apply(self.loss_module, inputs["labels"], **kwargs)

    def _naive_logps(self, model, inputs, prefix: str = "") -> tuple[Tensor, Tensor | None, Tensor]:
        """``(policy, reference, mask)`` per-token log-probs ``(rows, T-1)`` from full logits, and the
        completion mask (the reference None for a reference-free method)."""
        ids, mask, labels = (
            inputs[f"{prefix}input_ids"],
            inputs[f"{prefix}attention_mask"],
            inputs[f"{prefix}labels"],
        )
        grad = prefix == "" and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            policy = naive_token_logps(model, ids, mask, labels)
        scored = labels[:, 1:] != -100
        ref_name = "ref_logps" if prefix == "" else "ref_kl_logps"
        if self.spec.reference is None:
            ref = None
        elif ref_name in inputs:
            ref = inputs[ref_name]
        else:
            with torch.no_grad():
                if self.ref_model is not None:
                    ref = naive_token_logps(self.ref_model, ids, mask, labels)
                else:
                    with adapter_disabled(model):
                        ref = naive_token_logps(model, ids, mask, labels)
        return policy, ref, scored

    def _naive_loss(self, model, inputs) -> LossOutput:
        """The same loss from full logits (``head="naive"``), through the loss module's
        ``loss_from_token_logps``."""
        policy, ref, mask = self._naive_logps(model, inputs)
        kwargs = self._batch_kwargs(inputs, shifted=True)
        if self.spec.kl_rows:
            kl_policy, kl_ref, kl_mask = self._naive_logps(model, inputs, prefix="kl_")
            kwargs.update(policy_kl_logps=kl_policy, ref_kl_logps=kl_ref, kl_mask=kl_mask)
        return self.loss_module.loss_from_token_logps(policy, ref, mask, **kwargs)

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
    # A checkpoint counts once its manifest is written, after every file of every process
    # (``prefuse.alignment.checkpoints``): resuming and rotation only ever see complete checkpoints.
    PREFUSE_STATE_NAME = "prefuse_state.pt"
    REFERENCE_WEIGHTS_NAME = "reference_model.safetensors"

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """``Trainer.train``; resuming takes the newest complete checkpoint (``True``) or checks the one given,
        then restores prefuse's checkpoint state (reference, SamPO stream) before the base class resumes."""
        if isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint:
            resume_from_checkpoint = checkpoints.last_complete(self.args.output_dir)
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            resume_from_checkpoint = os.fspath(resume_from_checkpoint)
            checkpoints.verify(resume_from_checkpoint)
            self._load_prefuse_state(resume_from_checkpoint)
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def _save_checkpoint(self, model, trial) -> None:
        """The base class's checkpoint, prefuse's state, then -- once every process is done -- the manifest that
        makes it complete, and only then the rotation (``save_total_limit``) among complete checkpoints."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            checkpoints.unmark(folder)  # a step saved again is incomplete until its new manifest
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # the base class would rotate before this checkpoint is complete
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self._save_prefuse_state(folder)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            checkpoints.mark_complete(folder, self.state.global_step)
            checkpoints.rotate(run_dir, limit, keep=self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

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
            raise ValueError(
                f"the checkpoint {checkpoint} has no {os.path.basename(path)}: it was saved by another "
                f"number of processes than this run's {self.args.world_size}"
            )
        state = checkpoints.load_state(path)
        if state.get("method") != self.method:
            raise ValueError(
                f"the checkpoint {checkpoint} was trained with method {state.get('method')!r}, this "
                f"trainer runs {self.method!r}"
            )
        if self.ref_source == "copy":
            weights = os.path.join(checkpoint, self.REFERENCE_WEIGHTS_NAME)
            if os.path.isfile(weights):
                checkpoints.load_weights(self.ref_model, weights, str(self.args.device))
                self._reference_weights_file = None
            else:
                warnings.warn(
                    f"{checkpoint} has no {self.REFERENCE_WEIGHTS_NAME} (its reference was "
                    f"{state.get('ref_source')!r}): the reference is the copy of the model this trainer "
                    "was built with",
                    stacklevel=3,
                )
        elif state.get("ref_source") != self.ref_source:
            warnings.warn(
                f"the checkpoint's reference was {state.get('ref_source')!r}, this trainer's is "
                f"{self.ref_source!r}: the resumed losses differ from an uninterrupted run",
                stacklevel=3,
            )
        if "sampo_generator" in state and hasattr(self.loss_module, "load_generator_state"):
            self.loss_module.load_generator_state(state["sampo_generator"])
