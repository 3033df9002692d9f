"""TRL drop-ins: ``PrefuseDPOTrainer`` / ``PrefuseKTOTrainer`` match TRL's own loss, gradients and metrics.

The same batch (TRL's data preparation and collator) goes through TRL's trainer and through prefuse's subclass;
tiny models are built from configs, the tokenizer is trained locally. Skipped without TRL.
"""


import warnings

import pytest
import torch
from prefuse.alignment.data import build_tokenizer, load_preference_data

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
prefuse_trl = pytest.importorskip("prefuse.alignment.trl")
PrefuseDPOTrainer, PrefuseKTOTrainer = prefuse_trl.PrefuseDPOTrainer, prefuse_trl.PrefuseKTOTrainer
pytestmark = pytest.mark.slow  # trains TRL's trainers and the drop-ins: CI runs it, `-m "not slow"` skips it


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _model(tokenizer, seed, kind="llama"):
    t = transformers
    common = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
              "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id}
    torch.manual_seed(seed)
    if kind == "gemma2":
        model = t.Gemma2ForCausalLM(t.Gemma2Config(**common, head_dim=8, final_logit_softcapping=2.0))
    else:
        model = t.LlamaForCausalLM(t.LlamaConfig(**common))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    return model.float()


def _common(tmp_path, **kwargs):
    options = {"output_dir": str(tmp_path / "out"), "report_to": "none", "use_cpu": True, "beta": 0.1,
               "per_device_train_batch_size": 4, "max_length": 64, "save_strategy": "no", "disable_tqdm": True,
               "dataset_num_proc": None, "bf16": False}  # fp32: exact comparisons
    options.update(kwargs)
    return options


def _run(trainer_cls, config, tokenizer, data, n, kind="llama"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(model=_model(tokenizer, 0, kind), ref_model=_model(tokenizer, 1, kind), args=config,
                              train_dataset=data, processing_class=tokenizer)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(n)]))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def _compare(ours, theirs, metric_keys):
    torch.testing.assert_close(ours[0], theirs[0], rtol=2e-5, atol=1e-6)
    assert ours[1].keys() == theirs[1].keys()
    for key, expected in theirs[1].items():
        scale = expected.abs().max().clamp(min=1e-3)
        torch.testing.assert_close(ours[1][key] / scale, expected / scale, rtol=1e-4, atol=5e-5, msg=key)
    for key in metric_keys:
        assert ours[2][key] == pytest.approx(theirs[2][key], rel=1e-4, abs=1e-5), key


DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")


@pytest.mark.parametrize("loss_type,extra", [
    ("sigmoid", {}), ("ipo", {}), ("hinge", {}), ("robust", {"label_smoothing": 0.1}),
    ("exo_pair", {"label_smoothing": 0.01}), ("nca_pair", {}), ("bco_pair", {}), ("sppo_hard", {}),
    ("apo_zero", {}), ("apo_down", {}), ("discopop", {}), ("sigmoid_norm", {}),
    (["sigmoid", "sft"], {"loss_weights": [1.0, 0.5]}),
])
def test_dpo_matches_trl(tmp_path, tokenizer, loss_type, extra):
    data = load_preference_data("paired", limit=4).select_columns(["prompt", "chosen", "rejected"])
    config = trl.DPOConfig(**_common(tmp_path, loss_type=loss_type, **extra))
    ours = _run(PrefuseDPOTrainer, config, tokenizer, data, 4)
    theirs = _run(trl.DPOTrainer, trl.DPOConfig(**_common(tmp_path, loss_type=loss_type, **extra)), tokenizer,
                  data, 4)
    _compare(ours, theirs, DPO_METRICS)


def test_dpo_softcap_and_precomputed_reference_match_trl(tmp_path, tokenizer):
    data = load_preference_data("paired", limit=4).select_columns(["prompt", "chosen", "rejected"])
    for kwargs in ({}, {"precompute_ref_log_probs": True}):
        ours = _run(PrefuseDPOTrainer, trl.DPOConfig(**_common(tmp_path, **kwargs)), tokenizer, data, 4, "gemma2")
        theirs = _run(trl.DPOTrainer, trl.DPOConfig(**_common(tmp_path, **kwargs)), tokenizer, data, 4, "gemma2")
        _compare(ours, theirs, DPO_METRICS)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.5, 0.7)])
def test_kto_matches_trl(tmp_path, tokenizer, weights):
    data = load_preference_data("unpaired", limit=4).select_columns(["prompt", "completion", "label"])
    options = _common(tmp_path, desirable_weight=weights[0], undesirable_weight=weights[1])
    ours = _run(PrefuseKTOTrainer, trl.KTOConfig(**options), tokenizer, data, 8)
    theirs = _run(trl.KTOTrainer, trl.KTOConfig(**options), tokenizer, data, 8)
    _compare(ours, theirs, ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                            "logps/rejected"))


def test_kto_precomputed_reference_matches_trl(tmp_path, tokenizer):
    data = load_preference_data("unpaired", limit=4).select_columns(["prompt", "completion", "label"])
    options = _common(tmp_path, precompute_ref_log_probs=True)
    ours = _run(PrefuseKTOTrainer, trl.KTOConfig(**options), tokenizer, data, 8)
    theirs = _run(trl.KTOTrainer, trl.KTOConfig(**options), tokenizer, data, 8)
    _compare(ours, theirs, ("kl", "rewards/margins"))


def test_a_short_training_run_logs_trl_metrics(tmp_path, tokenizer):
    data = load_preference_data("paired", limit=8).select_columns(["prompt", "chosen", "rejected"])
    config = trl.DPOConfig(**_common(tmp_path, max_steps=2, logging_steps=1, learning_rate=1e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = PrefuseDPOTrainer(model=_model(tokenizer, 0), ref_model=_model(tokenizer, 0), args=config,
                                    train_dataset=data, processing_class=tokenizer)
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all("rewards/margins" in h and "num_tokens" in h for h in logs)


@pytest.mark.parametrize("trainer_cls,config_cls,kwargs,match", [
    ("dpo", "DPOConfig", {"loss_type": "aot"}, "loss_type='aot'"),
    ("dpo", "DPOConfig", {"use_weighting": True}, "use_weighting"),
    ("dpo", "DPOConfig", {"ld_alpha": 0.5}, "ld_alpha"),
    ("dpo", "DPOConfig", {"f_divergence_type": "js_divergence"}, "f_divergence_type"),
    ("dpo", "DPOConfig", {"use_liger_kernel": True}, "use_liger_kernel"),
    ("kto", "KTOConfig", {"loss_type": "apo_zero_unpaired"}, "apo_zero_unpaired"),
])
def test_unsupported_options_are_refused(tmp_path, tokenizer, trainer_cls, config_cls, kwargs, match):
    cls = PrefuseDPOTrainer if trainer_cls == "dpo" else PrefuseKTOTrainer
    view = "paired" if trainer_cls == "dpo" else "unpaired"
    try:
        config = getattr(trl, config_cls)(**_common(tmp_path, **kwargs))
    except (ValueError, TypeError) as err:  # TRL itself may refuse the option first
        pytest.skip(f"TRL refuses it: {err}")
    with pytest.raises(ValueError, match=match):
        cls(model=_model(tokenizer, 0), ref_model=_model(tokenizer, 1), args=config,
            train_dataset=load_preference_data(view, limit=4), processing_class=tokenizer)
