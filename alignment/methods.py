"""The preference methods of ``PreferenceTrainer``, its collators and the CLI, in one table.

Each ``Method`` states, for one method name:

- ``loss``: the loss module, built from a ``PreferenceConfig`` through ``options`` (loss argument -> config
  field, or a function of the config) with the head options (softcap, temperature, backend);
- ``defaults``: the values of the config fields left ``None`` (``beta``, ``nll_weight``);
- ``paired``: paired data (``2B`` rows, chosen then rejected) or unpaired data with mismatched KL rows;
- ``batch_keys``: the collated tensors passed to the loss by name (besides ``labels`` and the reference),
  ``token_keys`` those of them aligned with ``labels`` (shifted with the log-probs for the reduction);
- ``columns``: the data-set columns the method needs besides its kind's text columns (``tokenized_columns``:
  the same for pre-tokenised data);
- ``reference``: what the loss needs of the reference -- per-sequence ``"sums"``, per-token ``"tokens"``
  (SamPO's sample, FactAlign's sentences), or ``None`` (reference-free);
- ``sentences``: the collator emits FactAlign's sentence ids.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from prefuse.alignment.data.processing import SCORE_COLUMNS, WIN_RATE_COLUMNS
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
from torch import nn

SENTENCE_COLUMNS = ("sentences", "sentence_labels")
TOKENIZED_SENTENCE_COLUMNS = ("completion_sentence_ids", "sentence_labels")


def _sampo_seed(config) -> int:
    return config.seed if config.sampo_seed is None else config.sampo_seed


@dataclass(frozen=True)
class Method:
    """One preference method (module docstring)."""

    name: str
    loss: type[nn.Module]
    paired: bool
    defaults: Mapping[str, float]
    options: Mapping[str, str | Callable]
    batch_keys: tuple[str, ...] = ()
    token_keys: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    tokenized_columns: tuple[str, ...] = ()
    reference: str | None = "sums"
    sentences: bool = False
    summary: str = field(default="", compare=False)

    @property
    def kl_rows(self) -> bool:
        """Unpaired methods score mismatched KL rows (KTO's reference point)."""
        return not self.paired

    def build_loss(self, config, **head_options) -> nn.Module:
        """The loss module with ``config``'s hyper-parameters and the head options."""
        kwargs = {
            arg: source(config) if callable(source) else getattr(config, source)
            for arg, source in self.options.items()
        }
        return self.loss(**kwargs, **head_options)

    def collator(
        self,
        tokenizer,
        *,
        max_length: int | None = None,
        max_prompt_length: int | None = None,
        partial_sentences: str = "drop",
        pad_to_multiple_of: int | None = None,
    ):
        """The collator of this method's batches, padding with ``tokenizer``'s pad (else eos) token."""
        from prefuse.alignment.data.collators import PairedCollator, UnpairedCollator

        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")
        if self.paired:
            return PairedCollator(pad, pad_to_multiple_of=pad_to_multiple_of)
        return UnpairedCollator(
            pad,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            sentences=self.sentences,
            partial_sentences=partial_sentences,
            pad_to_multiple_of=pad_to_multiple_of,
        )


_DPO_OPTIONS = {"beta": "beta", "nll_weight": "nll_weight"}
_KTO_OPTIONS = {
    "beta": "beta",
    "desirable_weight": "desirable_weight",
    "undesirable_weight": "undesirable_weight",
}
_KTO_KEYS = ("desirable",)

_TABLE = (
    Method(
        "dpo", DPOLoss, paired=True, defaults={"beta": 0.1, "nll_weight": 0.0},
        options={**_DPO_OPTIONS, "loss_type": "loss_type", "label_smoothing": "label_smoothing"},
        summary="DPO and TRL's variants (loss_type)",
    ),
    Method(
        "sampo", SamPOLoss, paired=True, defaults={"beta": 0.1, "nll_weight": 0.0},
        options={**_DPO_OPTIONS, "seed": _sampo_seed}, reference="tokens",
        summary="DPO on down-sampled token-level KL",
    ),
    Method(
        "kto", KTOLoss, paired=False, defaults={"beta": 0.1}, options=_KTO_OPTIONS, batch_keys=_KTO_KEYS,
        summary="unpaired KTO with mismatched KL rows",
    ),
    Method(
        "factalign", FactAlignLoss, paired=False, defaults={"beta": 0.1},
        options={
            **_KTO_OPTIONS, "fg_beta": "fg_beta", "fg_desirable_weight": "fg_desirable_weight",
            "fg_undesirable_weight": "fg_undesirable_weight", "loss_weight": "loss_weight",
            "fg_loss_weight": "fg_loss_weight",
        },
        batch_keys=(*_KTO_KEYS, "sentence_ids", "sentence_labels", "kl_sentence_ids"),
        token_keys=("sentence_ids", "kl_sentence_ids"), columns=SENTENCE_COLUMNS,
        tokenized_columns=TOKENIZED_SENTENCE_COLUMNS, reference="tokens", sentences=True,
        summary="KTO plus sentence-level KTO (fKTO)",
    ),
    Method(
        "sppo", SPPOLoss, paired=True, defaults={"beta": 0.001}, options={"beta": "beta"},
        batch_keys=WIN_RATE_COLUMNS, columns=WIN_RATE_COLUMNS, tokenized_columns=WIN_RATE_COLUMNS,
        summary="self-play preference optimisation on win rates",
    ),
    Method(
        "gpo", GPOLoss, paired=True, defaults={"beta": 0.001}, options={"beta": "beta", "clamp": "gpo_clamp"},
        batch_keys=SCORE_COLUMNS, columns=SCORE_COLUMNS, tokenized_columns=SCORE_COLUMNS,
        summary="general preference optimisation on preference scores",
    ),
    Method(
        "simpo", SimPOLoss, paired=True, defaults={"beta": 0.1, "nll_weight": 0.0},
        options={**_DPO_OPTIONS, "gamma": "simpo_gamma", "label_smoothing": "label_smoothing"}, reference=None,
        summary="reference-free, length-averaged log-probs with a margin",
    ),
    Method(
        "orpo", ORPOLoss, paired=True, defaults={"beta": 0.1, "nll_weight": 1.0}, options=_DPO_OPTIONS,
        reference=None, summary="reference-free odds ratio plus NLL",
    ),
    Method(
        "cpo", CPOLoss, paired=True, defaults={"beta": 0.1, "nll_weight": 1.0},
        options={**_DPO_OPTIONS, "label_smoothing": "label_smoothing"}, reference=None,
        summary="reference-free contrastive preference plus NLL",
    ),
)  # fmt: skip

METHODS: dict[str, Method] = {m.name: m for m in _TABLE}
"""Every method by name, in the order the CLI lists them."""


def get_method(name: str) -> Method:
    """The registry entry of ``name``; ``ValueError`` naming ``method`` for an unknown one."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}") from None
