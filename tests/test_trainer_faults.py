"""Trainer faults: an interrupted run resumed from its checkpoint continues with the same losses, and a bad
data row is rejected with a ``ValueError`` that names its index and field.

Resume: ``N`` steps uninterrupted vs. ``k`` steps, stop (checkpoint at ``k``), then a FRESH trainer built
from a DIFFERENTLY initialised model resumes: the checkpoint restores the policy, ``reference_model.safetensors``
the reference (the initial policy, not the model the fresh trainer was built from) and ``prefuse_state.pt``
SamPO's sampling stream. The losses of steps ``k+1..N`` are bit-identical on CPU (same ops, same order, same
threads: nothing nondeterministic is left).
"""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from prefuse.alignment.data import (  # noqa: E402
    build_tokenizer,
    check_tokenized_data,
    collator_for,
    encode_example,
    load_preference_data,
    tokenize_preference_data,
)
from prefuse.alignment.trainer import PreferenceConfig, PreferenceTrainer  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

N_STEPS, STOP_AT = 4, 2


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _model(tokenizer, seed):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).float()


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True  # the DefaultFlowCallback has set should_save (save_steps)
        return control


def _trainer(tmp_path, method, model, tokenizer, data, callbacks=None, **kwargs):
    config = PreferenceConfig(
        output_dir=str(tmp_path), method=method, beta=0.1, loss_backend="torch", per_device_train_batch_size=2,
        max_length=32, max_prompt_length=16, report_to=[], use_cpu=True, disable_tqdm=True, seed=11,
        learning_rate=5e-3, max_steps=N_STEPS, logging_steps=1, save_strategy="steps", save_steps=STOP_AT,
        lr_scheduler_type="linear", **kwargs,
    )  # fmt: skip
    return PreferenceTrainer(
        model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=callbacks
    )


def _losses(trainer):
    return {
        e["step"]: (e["loss"], e.get("rewards/margins")) for e in trainer.state.log_history if "loss" in e
    }


@pytest.mark.slow  # an interrupted and a resumed run per method
@pytest.mark.parametrize("method", ["dpo", "sampo", "kto", "factalign", "sppo", "gpo"])
def test_resume_reproduces_the_loss_curve(tmp_path, tokenizer, method):
    view = "unpaired" if method in ("kto", "factalign") else "paired"
    data = load_preference_data(view, limit=8)
    full = _trainer(tmp_path / "full", method, _model(tokenizer, 0), tokenizer, data)
    initial_ref = {k: v.clone() for k, v in full.ref_model.state_dict().items()}
    full.train()
    expected = _losses(full)
    assert sorted(expected) == list(range(1, N_STEPS + 1))

    cut = _trainer(
        tmp_path / "cut", method, _model(tokenizer, 0), tokenizer, data, callbacks=[_StopAt(STOP_AT)]
    )
    cut.train()
    assert cut.state.global_step == STOP_AT
    checkpoint = tmp_path / "cut" / f"checkpoint-{STOP_AT}"
    assert (checkpoint / "reference_model.safetensors").is_file() and (
        checkpoint / "prefuse_state.pt"
    ).is_file()

    # a fresh trainer from another initialisation: its default reference copy is wrong until the checkpoint's
    # reference weights are restored
    resumed = _trainer(tmp_path / "cut", method, _model(tokenizer, 1), tokenizer, data)
    assert not torch.equal(resumed.ref_model.state_dict()["lm_head.weight"], initial_ref["lm_head.weight"])
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for k, v in resumed.ref_model.state_dict().items():
        assert torch.equal(v, initial_ref[k]), k
    got = _losses(resumed)
    for step in range(STOP_AT + 1, N_STEPS + 1):
        assert got[step] == expected[step], (step, got[step], expected[step])  # bit-identical
    assert all(math.isfinite(v[0]) for v in got.values())


def test_resume_restores_the_sampo_stream(tokenizer):
    """The generator state round-trips through the loss API; a different sampo_seed is refused."""
    from prefuse.alignment import SamPOLoss

    loss = SamPOLoss(0.1, seed=3)
    gen = loss.generator(torch.device("cpu"))
    torch.rand(5, generator=gen)
    state = loss.generator_state()
    after = torch.rand(5, generator=gen)
    other = SamPOLoss(0.1, seed=3)
    other.load_generator_state(state)
    assert torch.equal(torch.rand(5, generator=other.generator(torch.device("cpu"))), after)
    with pytest.raises(ValueError, match="sampo_seed"):
        SamPOLoss(0.1, seed=4).load_generator_state(state)


def test_resume_rejects_another_method(tmp_path, tokenizer):
    data = load_preference_data("paired", limit=4)
    cut = _trainer(tmp_path, "dpo", _model(tokenizer, 0), tokenizer, data, callbacks=[_StopAt(STOP_AT)])
    cut.train()
    other = _trainer(tmp_path, "sampo", _model(tokenizer, 0), tokenizer, data)
    with pytest.raises(ValueError, match="method 'dpo'"):
        other.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{STOP_AT}"))


# ---------------------------------------------------------------------------------------------- bad rows
try:
    import pyarrow

    _ARROW_ERRORS = (pyarrow.lib.ArrowException,)
except ImportError:  # pragma: no cover
    _ARROW_ERRORS = ()


def _dataset(rows, index, field, value):
    """``rows`` with ``rows[index][field] = value``; a value Arrow cannot mix into the column's type (an int
    among strings ...) is put in every row instead -- a column of the wrong type -- and row 0 is the bad one."""
    rows[index][field] = value
    try:
        return datasets.Dataset.from_list(rows), index
    except (TypeError, ValueError, ArithmeticError) + _ARROW_ERRORS:
        for r in rows:
            r[field] = value
        return datasets.Dataset.from_list(rows), 0


def _paired_rows():
    return [dict(r) for r in load_preference_data("paired", limit=3)]


def _unpaired_rows():
    return [dict(r) for r in load_preference_data("unpaired", limit=3)]


BAD_PAIRED = [
    ("prompt", None, "missing"),
    ("prompt", "", "empty string"),
    ("prompt", "   ", "empty string"),
    ("chosen", 5, "expected a non-empty string"),
    ("rejected", [], "empty list"),
    ("chosen", [{"role": "assistant"}], "string 'content'"),
    ("p_chosen", 1.5, r"\[0, 1\]"),
    ("p_rejected", -0.1, r"\[0, 1\]"),
    ("p_chosen", float("nan"), "finite"),
    ("p_chosen", None, "missing"),
    ("s_chosen", float("inf"), "finite"),
    ("s_rejected", float("nan"), "finite"),
]


@pytest.mark.parametrize("field,value,message", BAD_PAIRED)
def test_bad_paired_row_names_index_and_field(tokenizer, field, value, message):
    data, index = _dataset(_paired_rows(), 2, field, value)
    with pytest.raises(ValueError, match=rf"row {index}, field '{field}': .*{message}"):
        tokenize_preference_data(data, tokenizer)


BAD_UNPAIRED = [
    ("completion", "", "empty string"),
    ("completion", None, "missing"),
    ("label", 1, "expected a bool"),
    ("label", "yes", "expected a bool"),
    ("label", None, "missing"),
    ("sentences", ["This sentence is not in the completion."], "not a substring"),
    ("sentences", [3], "not a non-empty string"),
    ("sentence_labels", [True, False, True, True, False, True, True], "labels for"),
]


@pytest.mark.parametrize("field,value,message", BAD_UNPAIRED)
def test_bad_unpaired_row_names_index_and_field(tokenizer, field, value, message):
    rows = _unpaired_rows()
    for r in rows:  # a uniform sentence_labels column type for datasets
        r["sentences"], r["sentence_labels"] = r["sentences"][:1], r["sentence_labels"][:1]
    if field == "sentences" and value == [3]:
        rows[1]["sentences"] = [
            "ok",
            3,
        ]  # mixed types cannot be a datasets column: call the row check directly
        with pytest.raises(ValueError, match=r"row 1, field 'sentences': .*not a non-empty string"):
            from prefuse.alignment.data.processing import check_row

            check_row(rows[1], 1, paired=False, sentences=True)
        return
    data, index = _dataset(rows, 1, field, value)
    with pytest.raises(ValueError, match=rf"row {index}, field '{field}': .*{message}"):
        tokenize_preference_data(data, tokenizer, sentences=True)


def test_encode_example_names_the_field(tokenizer):
    with pytest.raises(ValueError, match=r"row 4, field 'prompt': empty"):
        encode_example(tokenizer, "", "fine.", index=4)
    with pytest.raises(ValueError, match=r"example, field 'completion'"):
        encode_example(tokenizer, "Q?", None)
    with pytest.raises(ValueError, match=r"field 'sentence_labels': 2 labels for 1 sentences"):
        encode_example(tokenizer, "Q?", "A fact.", sentences=["A fact."], sentence_labels=[True, False])
    with pytest.raises(ValueError, match=r"field 'sentence_labels': label 0 is not a bool"):
        encode_example(tokenizer, "Q?", "A fact.", sentences=["A fact."], sentence_labels=[1])


def _tokenized(tokenizer, view):
    return [dict(r) for r in tokenize_preference_data(load_preference_data(view, limit=3), tokenizer)]


@pytest.mark.parametrize("mutate,field,message", [
    (lambda f: f.pop("chosen_input_ids"), "chosen_input_ids", "missing"),
    (lambda f: f.update(rejected_input_ids=[]), "rejected_input_ids", "empty"),
    (lambda f: f.update(prompt_input_ids=[1, -5]), "prompt_input_ids", "ints >= 0"),
    (lambda f: f.update(chosen_input_ids=[1, 2.5]), "chosen_input_ids", "ints >= 0"),
    (lambda f: f.update(chosen_input_ids="abc"), "chosen_input_ids", "list of token ids"),
    (lambda f: f.update(p_chosen=float("nan")), "p_chosen", "finite"),
    (lambda f: f.update(p_rejected=2.0), "p_rejected", r"\[0, 1\]"),
    (lambda f: f.update(s_chosen=float("-inf")), "s_chosen", "finite"),
    (lambda f: f.update(p_chosen=None), "p_chosen", "missing while other examples"),
    (lambda f: f.update(ref_chosen_logps=[0.0], ref_rejected_logps=[0.0]), "ref_chosen_logps", "values for"),
])  # fmt: skip
def test_paired_collator_rejects_malformed_features(tokenizer, mutate, field, message):
    features = _tokenized(tokenizer, "paired")
    mutate(features[1])
    collate = collator_for("dpo", tokenizer)
    with pytest.raises(ValueError, match=rf"example 1 of the batch, field '{field}': .*{message}"):
        collate(features)


@pytest.mark.parametrize("mutate,field,message", [
    (lambda f: f.update(label=0), "label", "expected a bool"),
    (lambda f: f.pop("label"), "label", "missing"),
    (lambda f: f.pop("completion_input_ids"), "completion_input_ids", "missing"),
    (lambda f: f.update(completion_sentence_ids=f["completion_sentence_ids"][:-1]), "completion_sentence_ids",
     "sentence ids for"),
    (lambda f: f.update(sentence_labels=[]), "completion_sentence_ids", "only 0 sentence labels"),
    (lambda f: f.update(sentence_labels=[1] * len(f["sentence_labels"])), "sentence_labels", "not a bool"),
    (lambda f: f.update(ref_logps=[float("nan")] * len(f["completion_input_ids"])), "ref_logps", "finite"),
])  # fmt: skip
def test_unpaired_collator_rejects_malformed_features(tokenizer, mutate, field, message):
    features = _tokenized(tokenizer, "unpaired")
    for f in features:
        f.setdefault("ref_logps", [0.0] * len(f["completion_input_ids"])) if field == "ref_logps" else None
    mutate(features[2])
    collate = collator_for("factalign", tokenizer)
    with pytest.raises(ValueError, match=rf"example 2 of the batch, field '{field}': .*{message}"):
        collate(features)


def test_trainer_rejects_a_bad_tokenized_row_by_index(tmp_path, tokenizer):
    rows = _tokenized(tokenizer, "unpaired")
    rows[2]["completion_sentence_ids"] = rows[2]["completion_sentence_ids"][:-1]
    data = datasets.Dataset.from_list(rows)
    with pytest.raises(ValueError, match=r"row 2, field 'completion_sentence_ids'"):
        check_tokenized_data(data, "factalign")
    with pytest.raises(ValueError, match=r"row 2, field 'completion_sentence_ids'"):
        _trainer(tmp_path, "factalign", _model(tokenizer, 0), tokenizer, data)
    good = _tokenized(tokenizer, "paired")
    good[0]["p_chosen"] = 1.5
    with pytest.raises(ValueError, match=r"row 0, field 'p_chosen': .*\[0, 1\]"):
        _trainer(tmp_path, "sppo", _model(tokenizer, 0), tokenizer, datasets.Dataset.from_list(good))


def test_trainer_rejects_a_token_id_past_the_embedding(tmp_path, tokenizer):
    """A pre-tokenised row with an id the model cannot embed fails at set-up with its index, not in the embedding."""
    rows = _tokenized(tokenizer, "paired")
    model = _model(tokenizer, 0)
    vocab = model.get_input_embeddings().num_embeddings
    rows[2]["rejected_input_ids"] = [*rows[2]["rejected_input_ids"][:-1], vocab]
    data = datasets.Dataset.from_list(rows)
    check_tokenized_data(data, "dpo")  # without the vocabulary size the row looks fine
    with pytest.raises(ValueError, match=rf"row 2, field 'rejected_input_ids': token id {vocab} is outside"):
        _trainer(tmp_path, "dpo", model, tokenizer, data)
