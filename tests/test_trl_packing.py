"""TRL drop-ins with ``padding_free=True``: ``PrefuseDPOTrainer`` / ``PrefuseKTOTrainer`` run the model bodies on
one packed row of the batch's real tokens and compute what they compute on TRL's padded rows.

Each test builds the same drop-in twice on the same tiny models (from configs, the bundled tokenizer), padded and
packed, and runs one ``compute_loss`` + backward on the same collated batch: loss, every parameter gradient and
every logged metric agree (float32), and forward hooks on the policy and reference models show the packed
forwards saw ``(1, N)`` inputs, ``N`` the batch's real tokens, with position ids and no attention mask.
Skipped without TRL.
"""

import logging
import math

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

from prefuse.alignment.data import build_tokenizer, load_preference_data  # noqa: E402
from test_trl import DPO_METRICS, KTO_METRICS, _common  # noqa: E402
from test_trl_patch import build, step, tiny_model  # noqa: E402

prefuse_trl = pytest.importorskip("prefuse.alignment.trl")
PrefuseDPOTrainer, PrefuseKTOTrainer = prefuse_trl.PrefuseDPOTrainer, prefuse_trl.PrefuseKTOTrainer
tokenizer_fixture = pytest.fixture(scope="module", name="tokenizer")(build_tokenizer)
TOKEN_STATS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # every TokenOutputs field but logp


def _trainer(trainer_cls, tmp_path, tokenizer, kind="llama", *, padding_free, ref_model=True, **kwargs):
    """The drop-in on tiny models of ``kind`` (the reference another one, or None) and TRL options ``kwargs``
    (``peft_config`` goes to the trainer)."""
    peft_config = kwargs.pop("peft_config", None)
    if issubclass(trainer_cls, trl.DPOTrainer):
        view, columns = "paired", ["prompt", "chosen", "rejected"]
        config = trl.DPOConfig(**_common(tmp_path, padding_free=padding_free, **kwargs))
    else:
        view, columns = "unpaired", ["prompt", "completion", "label"]
        config = prefuse_trl.PrefuseKTOConfig(**_common(tmp_path, padding_free=padding_free, **kwargs))
    return build(
        trainer_cls,
        model=tiny_model(tokenizer, 0, kind),
        ref_model=tiny_model(tokenizer, 1, kind) if ref_model else None,
        args=config,
        train_dataset=load_preference_data(view, limit=4).select_columns(columns),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def _record_forwards(model, calls: list):
    """Appends ``(input_ids shape, attention_mask is None, position_ids given)`` for every call of ``model``."""

    def hook(module, args, kwargs):
        calls.append(
            (
                tuple(kwargs["input_ids"].shape),
                kwargs.get("attention_mask") is None,
                kwargs.get("position_ids") is not None,
            )
        )

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def _step_recorded(trainer, rows: int):
    """``test_trl_patch.step`` on the first ``rows`` examples; ``{"policy": calls, "reference": calls}``."""
    calls = {"policy": [], "reference": []}
    handles = [_record_forwards(trainer.model, calls["policy"])]
    if trainer.ref_model is not None:
        handles.append(_record_forwards(trainer.ref_model, calls["reference"]))
    try:
        out = step(
            trainer, lambda t: t._prepare_inputs(t.data_collator([t.train_dataset[i] for i in range(rows)]))
        )
    finally:
        for handle in handles:
            handle.remove()
    return out, calls


def _assert_same(packed, padded, metric_keys):
    """Loss, every parameter gradient (relative to its largest entry) and every logged metric, float32."""
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-6)
    assert packed[1].keys() == padded[1].keys() and padded[1]
    for key, expected in padded[1].items():
        scale = expected.abs().max().clamp(min=1e-6)
        torch.testing.assert_close(packed[1][key] / scale, expected / scale, rtol=1e-5, atol=1e-5, msg=key)
    assert packed[2].keys() == padded[2].keys() and set(metric_keys) <= padded[2].keys()
    for key, expected in padded[2].items():
        assert packed[2][key] == pytest.approx(expected, rel=1e-5, abs=1e-6), key


def _tokens(batch, prefix=""):
    return int(batch[f"{prefix}attention_mask"].sum())


def _padded_and_packed(trainer_cls, tmp_path, tokenizer, kind, rows, **kwargs):
    """``(padded step, packed step, packed forwards)``: the same drop-in built padded and packed, one step each."""
    runs = {}
    for padding_free in (False, True):
        trainer = _trainer(trainer_cls, tmp_path, tokenizer, kind, padding_free=padding_free, **kwargs)
        assert trainer.padding_free is padding_free and trainer.args.padding_free is padding_free
        runs[padding_free] = _step_recorded(trainer, rows)
    (padded, padded_calls), (packed, packed_calls) = runs[False], runs[True]
    batch = padded[3]
    assert (batch["attention_mask"] == 0).any()  # there is padding to skip
    assert padded_calls["policy"][0] == (tuple(batch["input_ids"].shape), False, False)
    return padded, packed, packed_calls


@pytest.mark.parametrize(
    "kind,ref_model,extra",
    [
        ("llama", True, {"loss_type": "sigmoid"}),
        ("llama", True, {"loss_type": "ipo", "pad_to_multiple_of": 16}),  # padded width T > the longest row
        ("llama", True, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "use_weighting": True}),
        ("llama", False, {"loss_type": "sigmoid", "precompute_ref_log_probs": True}),
        ("gemma2", True, {"loss_type": "sigmoid"}),  # a final-logit softcap, sliding-window layers
        ("gemma2", True, {"loss_type": "ipo", "precompute_ref_log_probs": True}),
        ("mixtral", True, {"loss_type": "sigmoid"}),  # the router auxiliary loss of the packed forward
    ],
)
def test_dpo_packed_equals_padded(tmp_path, tokenizer, kind, ref_model, extra):
    padded, packed, calls = _padded_and_packed(
        PrefuseDPOTrainer, tmp_path, tokenizer, kind, 4, ref_model=ref_model, **extra
    )
    _assert_same(packed, padded, DPO_METRICS + (("aux_loss",) if kind == "mixtral" else ()))
    batch = padded[3]
    assert batch["input_ids"].shape[0] == 8  # the chosen and rejected rows, packed into one
    assert calls["policy"] == [((1, _tokens(batch)), True, True)]
    references = 0 if extra.get("precompute_ref_log_probs") else 1
    assert calls["reference"] == [((1, _tokens(batch)), True, True)] * references


def test_dpo_lora_reference_packed_equals_padded(tmp_path, tokenizer):
    """No reference model: the reference is the LoRA policy with its adapter disabled, packed as well."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    padded, packed, calls = _padded_and_packed(
        PrefuseDPOTrainer, tmp_path, tokenizer, "llama", 4, ref_model=False, peft_config=lora
    )
    _assert_same(packed, padded, DPO_METRICS)
    assert padded[2]["rewards/margins"][-1] != 0  # the adapter moves the policy away from its reference
    assert calls["policy"] == [((1, _tokens(padded[3])), True, True)] * 2  # the policy, then its base


@pytest.mark.parametrize(
    "kind,ref_model,extra",
    [
        ("llama", True, {}),
        ("llama", True, {"loss_type": "apo_zero_unpaired", "undesirable_weight": 0.6}),
        ("llama", False, {"precompute_ref_log_probs": True}),
        ("gemma2", True, {"desirable_weight": 1.5, "undesirable_weight": 0.7}),
    ],
)
def test_kto_packed_equals_padded(tmp_path, tokenizer, kind, ref_model, extra):
    padded, packed, calls = _padded_and_packed(
        PrefuseKTOTrainer, tmp_path, tokenizer, kind, 8, ref_model=ref_model, **extra
    )
    _assert_same(packed, padded, KTO_METRICS if extra.get("loss_type") is None else ("rewards/chosen",))
    batch = padded[3]
    main = ((1, _tokens(batch)), True, True)
    if extra.get("loss_type") == "apo_zero_unpaired":  # no KL rows
        scored = [main]
    else:  # the KL rows: a packed row of their own, scored after the main rows
        assert (batch["KL_attention_mask"] == 0).any()
        scored = [main, ((1, _tokens(batch, "KL_")), True, True)]
    assert calls["policy"] == scored
    assert calls["reference"] == ([] if extra.get("precompute_ref_log_probs") else scored)


@pytest.mark.parametrize("trainer_cls", [PrefuseDPOTrainer, PrefuseKTOTrainer])
def test_a_short_packed_training_run(tmp_path, tokenizer, trainer_cls):
    """``train()`` (the Trainer's loop, accelerate's preparation) runs packed forwards only and logs finite
    losses."""
    trainer = _trainer(
        trainer_cls, tmp_path, tokenizer, padding_free=True, max_steps=2, logging_steps=1, learning_rate=1e-3
    )
    calls = []
    handle = _record_forwards(trainer.model, calls)
    try:
        trainer.train()
    finally:
        handle.remove()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) and h["num_tokens"] > 0 for h in logs)
    assert calls and all(shape[0] == 1 and no_mask and positions for shape, no_mask, positions in calls)


def test_every_token_output_is_laid_out_as_the_padded_rows(tmp_path, tokenizer):
    """The helper itself on hand-made right-padded rows: a row shorter than the others, an all-padding last row
    and a width past the longest row -- every ``TokenOutputs`` field (is-top-1 a bool) equals the padded call's,
    zero (False) where the padded rows have no token."""
    trainer = _trainer(PrefuseDPOTrainer, tmp_path, tokenizer, padding_free=True)
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 4, 6, 0]
    width = 9
    input_ids = torch.randint(5, 200, (len(lengths), width), generator=gen)
    attention_mask = (torch.arange(width) < torch.tensor(lengths).unsqueeze(1)).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, tokenizer.pad_token_id)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :2] = -100  # a two-token prompt
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    outputs = {}
    for padding_free in (False, True):
        trainer.padding_free = padding_free
        outputs[padding_free] = prefuse_trl.trainers._token_outputs(
            trainer, trainer.model, labels, kwargs, grad=False, stats=TOKEN_STATS
        )[0]
    for name in ("logp",) + TOKEN_STATS:
        padded, packed = getattr(outputs[False], name), getattr(outputs[True], name)
        assert packed.shape == (len(lengths), width - 1) and packed.dtype == padded.dtype, name
        scored = labels[:, 1:] != -100
        torch.testing.assert_close(packed[scored], padded[scored], rtol=1e-5, atol=1e-5, msg=name)
        assert not packed[~scored].any(), name
        assert packed[scored].any(), name


def test_trl_s_fallback_warning_is_not_printed(tmp_path, tokenizer, caplog):
    """TRL 1.16's DPO warns that ``padding_free`` is off and pads; the drop-in packs, so TRL's warning (which
    ``trl.DPOTrainer`` prints for the same config) would be wrong."""
    logs = {}
    for cls in (trl.DPOTrainer, PrefuseDPOTrainer):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            trainer = _trainer(cls, tmp_path, tokenizer, padding_free=True)
        logs[cls] = caplog.text
    assert "padding_free" in logs[trl.DPOTrainer]
    assert "padding_free" not in logs[PrefuseDPOTrainer]
    assert trainer.args.padding_free is True and trainer.padding_free is True


@pytest.mark.parametrize("key", ["token_type_ids", "pixel_values"])
def test_multimodal_inputs_are_refused_with_padding_free(tmp_path, tokenizer, key):
    trainer = _trainer(PrefuseDPOTrainer, tmp_path, tokenizer, padding_free=True)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(2)]))
    batch[key] = torch.zeros_like(batch["input_ids"])
    with pytest.raises(ValueError, match=rf"padding_free=True .*\['{key}'\].*multimodal"):
        trainer.compute_loss(trainer.model, batch)


def test_prompt_learning_adapters_are_refused_with_padding_free(tmp_path, tokenizer):
    """PEFT prompt tuning prepends its virtual tokens once per row and drops ``position_ids``: on a packed row the
    sequences would attend across each other, so the drop-ins refuse it (and accept it padded)."""
    peft = pytest.importorskip("peft")
    prompt_tuning = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    for trainer_cls in (PrefuseDPOTrainer, PrefuseKTOTrainer):
        kwargs = {"ref_model": False, "peft_config": prompt_tuning}
        assert not _trainer(trainer_cls, tmp_path, tokenizer, padding_free=False, **kwargs).padding_free
        with pytest.raises(ValueError, match="padding_free=True with a prompt-learning PEFT adapter"):
            _trainer(trainer_cls, tmp_path, tokenizer, padding_free=True, **kwargs)
