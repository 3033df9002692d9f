"""prefuse's own losses and ``PreferenceTrainer`` against TRL 1.16's trainers where both compute the same thing:
IPO's logged rewards, KTO's per-class means over a logging window, and the start-up note that names where they
differ on purpose. Tiny models from configs, the bundled tokenizer; skipped without TRL."""

import logging
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")

from prefuse.alignment import DPOLoss, PreferenceConfig, PreferenceTrainer  # noqa: E402
from prefuse.alignment.data import build_tokenizer, load_preference_data  # noqa: E402
from prefuse.alignment.model_head import forward_hidden  # noqa: E402
from prefuse.alignment.trainer import trl_differences, window_metrics  # noqa: E402
from test_trl_patch import build, options, tiny_model  # noqa: E402

prefuse_trl = pytest.importorskip("prefuse.alignment.trl")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_dpo_loss_ipo_logs_rewards_on_sums_as_trl(tmp_path, tokenizer):
    """Same batch, same models: ``DPOLoss(loss_type="ipo")``'s loss and ``rewards/*`` / ``logps/*`` are TRL's
    (TRL averages the log-ratios per token for the loss only and logs the sums)."""
    data = load_preference_data("paired", limit=4).select_columns(["prompt", "chosen", "rejected"])
    config = trl.DPOConfig(
        **options(tmp_path, beta=0.1, loss_type="ipo", max_length=64, dataset_num_proc=None)
    )
    trainer = build(
        trl.DPOTrainer,
        model=tiny_model(tokenizer, 0),
        ref_model=tiny_model(tokenizer, 1),
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
    )
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    trl_loss = trainer.compute_loss(trainer.model, batch)
    logged = {key: values[-1] for key, values in trainer._metrics["train"].items()}

    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    policy = forward_hidden(trainer.model, **inputs)
    with torch.no_grad():
        ref = forward_hidden(trainer.ref_model, **inputs)
    out = DPOLoss(beta=0.1, loss_type="ipo")(
        policy.hidden, policy.weight, labels, ref_hidden=ref.hidden, ref_weight=ref.weight
    )
    torch.testing.assert_close(out.loss, trl_loss.detach(), rtol=1e-5, atol=1e-6)
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ):
        assert out.metrics[key].item() == pytest.approx(logged[key], rel=1e-4, abs=1e-6), key


def test_kto_class_means_over_a_window_are_trl_s(tmp_path, tokenizer, monkeypatch):
    """A window of two steps, one with only desirable examples and one with only undesirable ones: TRL's
    ``KTOTrainer.log`` and ``PreferenceTrainer``'s window (``window_metrics``), each on its own step metrics of the
    same batches, log the same class means -- neither averages in a 0 for the step without the class."""
    data = load_preference_data("unpaired", limit=8).select_columns(["prompt", "completion", "label"])
    steps = []
    kto_loss = prefuse_trl.trainers.Fn.kto_loss

    def recorded(*args, **kwargs):
        out = kto_loss(*args, **kwargs)
        steps.append(out.metrics)
        return out

    monkeypatch.setattr(prefuse_trl.trainers.Fn, "kto_loss", recorded)
    logged = {}
    for cls in (trl.KTOTrainer, prefuse_trl.PrefuseKTOTrainer):
        config = trl.KTOConfig(**options(tmp_path, beta=0.1, max_length=64, dataset_num_proc=None))
        trainer = build(
            cls,
            model=tiny_model(tokenizer, 0),
            ref_model=tiny_model(tokenizer, 1),
            args=config,
            train_dataset=data,
            processing_class=tokenizer,
        )
        labels = trainer.train_dataset["label"]
        for wanted in (True, False):
            rows = [i for i, label in enumerate(labels) if label == wanted][:2]
            assert len(rows) == 2
            batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in rows]))
            with torch.no_grad():
                trainer.compute_loss(trainer.model, batch)
        logs = {}
        trainer.log(logs)
        logged[cls] = logs
    ours = window_metrics({key: [step[key] for step in steps] for key in steps[0]})
    theirs = logged[trl.KTOTrainer]
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
    assert "rewards/margins" not in theirs and "rewards/margins" not in ours  # no step had both classes


def test_window_metrics_pool_each_step_and_skip_absent_classes():
    def step(total, count):
        return {
            "rewards/chosen_sum": torch.tensor(total),
            "count/chosen": torch.tensor(count),
            "rewards/chosen": torch.tensor(total / max(count, 1.0)),
            "loss": torch.tensor(1.0),
        }

    steps = [step(0.3, 3.0), step(0.0, 0.0), step(0.5, 1.0)]
    logged = window_metrics({key: [s[key] for s in steps] for key in steps[0]})
    assert logged["rewards/chosen"] == pytest.approx((0.1 + 0.5) / 2)  # the empty step is left out, not a 0
    assert logged["loss"] == pytest.approx(1.0)
    absent = window_metrics({key: [s[key] for s in steps[1:2]] for key in steps[0]})
    assert "rewards/chosen" not in absent


def test_window_metrics_pool_factalign_sentence_means_over_steps_with_the_class():
    """FactAlign's ``fg_logps/*`` are per-step means over the class's sentences (0 without one): a step without
    a supported sentence is left out of ``fg_logps/policy_chosen``, and steps are pooled by their counts."""

    def step(mean, count):
        return {"fg_logps/policy_chosen": torch.tensor(mean), "count/fg_chosen": torch.tensor(count)}

    steps = [step(-2.0, 2.0), step(0.0, 0.0), step(-5.0, 1.0)]
    logged = window_metrics({key: [s[key] for s in steps] for key in steps[0]})
    assert logged["fg_logps/policy_chosen"] == pytest.approx((-2.0 - 5.0) / 2)  # not (-2 + 0 - 5) / 3
    assert set(logged) == {"fg_logps/policy_chosen", "count/fg_chosen"}
    absent = window_metrics({key: [s[key] for s in steps[1:2]] for key in steps[0]})
    assert "fg_logps/policy_chosen" not in absent


@pytest.mark.parametrize(
    "settings,expected",
    [
        ({"method": "dpo", "loss_type": "sigmoid", "label_smoothing": 0.1}, "cDPO"),
        ({"method": "dpo", "loss_type": "bco_pair"}, "running mean"),
    ],
)
def test_start_up_note_names_deliberate_differences(tmp_path, tokenizer, caplog, settings, expected):
    data = load_preference_data("paired", limit=4).select_columns(["prompt", "chosen", "rejected"])
    config = PreferenceConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **settings)
    notes = trl_differences(config, tokenizer, data)
    assert any(expected in note for note in notes)
    assert any("chat template" in note for note in notes)  # plain-text prompts, a tokenizer with a template
    assert trl_differences(PreferenceConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)) == []
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PreferenceTrainer(
            tiny_model(tokenizer, 0), args=config, train_dataset=data, processing_class=tokenizer
        )
    assert expected in caplog.text and "TRL 1.16" in caplog.text
