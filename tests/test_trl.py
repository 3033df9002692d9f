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
from test_trl_patch import tiny_model  # noqa: E402

prefuse_trl = pytest.importorskip("prefuse.alignment.trl")
PrefuseDPOTrainer, PrefuseKTOTrainer = prefuse_trl.PrefuseDPOTrainer, prefuse_trl.PrefuseKTOTrainer
pytestmark = pytest.mark.slow  # trains TRL's trainers and the drop-ins: CI runs it, `-m "not slow"` skips it


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _model(tokenizer, seed, kind="llama"):
    return tiny_model(tokenizer, seed, kind)


def _common(tmp_path, **kwargs):
    options = {
        "output_dir": str(tmp_path / "out"),
        "report_to": "none",
        "use_cpu": True,
        "beta": 0.1,
        "per_device_train_batch_size": 4,
        "max_length": 64,
        "save_strategy": "no",
        "disable_tqdm": True,
        "dataset_num_proc": None,
        "bf16": False,
    }  # fp32: exact comparisons
    options.update(kwargs)
    return options


def _run(trainer_cls, config, tokenizer, data, n, kind="llama"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(
            model=_model(tokenizer, 0, kind),
            ref_model=_model(tokenizer, 1, kind),
            args=config,
            train_dataset=data,
            processing_class=tokenizer,
        )
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(n)]))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def _compare(ours, theirs, metric_keys=None):
    """Loss, every parameter gradient, and every metric TRL logged (all of them: same names)."""
    torch.testing.assert_close(ours[0], theirs[0], rtol=2e-5, atol=1e-6)
    assert ours[1].keys() == theirs[1].keys()
    for key, expected in theirs[1].items():
        scale = expected.abs().max().clamp(min=1e-3)
        torch.testing.assert_close(ours[1][key] / scale, expected / scale, rtol=1e-4, atol=5e-5, msg=key)
    assert ours[2].keys() == theirs[2].keys()
    for key in theirs[2]:
        assert ours[2][key] == pytest.approx(theirs[2][key], rel=1e-4, abs=1e-5), key
    for key in metric_keys or ():
        assert key in theirs[2], key


DPO_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "entropy",
    "logits/chosen",
    "logits/rejected",
    "mean_token_accuracy",
    "num_tokens",
)
KTO_METRICS = (
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "entropy",
    "logits/chosen",
    "logits/rejected",
    "num_tokens",
)


@pytest.mark.parametrize(
    "loss_type,extra",
    [
        ("sigmoid", {}),
        ("ipo", {}),
        ("hinge", {}),
        ("robust", {"label_smoothing": 0.1}),
        ("exo_pair", {"label_smoothing": 0.01}),
        ("nca_pair", {}),
        ("bco_pair", {}),
        ("sppo_hard", {}),
        ("apo_zero", {}),
        ("apo_down", {}),
        ("discopop", {}),
        ("sigmoid_norm", {}),
        (["sigmoid", "sft"], {"loss_weights": [1.0, 0.5]}),
    ],
)
def test_dpo_matches_trl(tmp_path, tokenizer, loss_type, extra):
    data = load_preference_data("paired", limit=4).select_columns(["prompt", "chosen", "rejected"])
    config = trl.DPOConfig(**_common(tmp_path, loss_type=loss_type, **extra))
    ours = _run(PrefuseDPOTrainer, config, tokenizer, data, 4)
    theirs = _run(
        trl.DPOTrainer, trl.DPOConfig(**_common(tmp_path, loss_type=loss_type, **extra)), tokenizer, data, 4
    )
    _compare(ours, theirs, DPO_METRICS)


def test_dpo_softcap_and_precomputed_reference_match_trl(tmp_path, tokenizer):
    data = load_preference_data("paired", limit=4).select_columns(["prompt", "chosen", "rejected"])
    for kwargs in ({}, {"precompute_ref_log_probs": True}):
        ours = _run(
            PrefuseDPOTrainer, trl.DPOConfig(**_common(tmp_path, **kwargs)), tokenizer, data, 4, "gemma2"
        )
        theirs = _run(
            trl.DPOTrainer, trl.DPOConfig(**_common(tmp_path, **kwargs)), tokenizer, data, 4, "gemma2"
        )
        _compare(ours, theirs, DPO_METRICS)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.5, 0.7)])
def test_kto_matches_trl(tmp_path, tokenizer, weights):
    data = load_preference_data("unpaired", limit=4).select_columns(["prompt", "completion", "label"])
    options = _common(tmp_path, desirable_weight=weights[0], undesirable_weight=weights[1])
    ours = _run(PrefuseKTOTrainer, trl.KTOConfig(**options), tokenizer, data, 8)
    theirs = _run(trl.KTOTrainer, trl.KTOConfig(**options), tokenizer, data, 8)
    _compare(ours, theirs, KTO_METRICS)


def test_kto_precomputed_reference_matches_trl(tmp_path, tokenizer):
    data = load_preference_data("unpaired", limit=4).select_columns(["prompt", "completion", "label"])
    options = _common(tmp_path, precompute_ref_log_probs=True)
    ours = _run(PrefuseKTOTrainer, trl.KTOConfig(**options), tokenizer, data, 8)
    theirs = _run(trl.KTOTrainer, trl.KTOConfig(**options), tokenizer, data, 8)
    _compare(ours, theirs, KTO_METRICS)


def test_a_short_training_run_logs_trl_metrics(tmp_path, tokenizer):
    data = load_preference_data("paired", limit=8).select_columns(["prompt", "chosen", "rejected"])
    config = trl.DPOConfig(**_common(tmp_path, max_steps=2, logging_steps=1, learning_rate=1e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = PrefuseDPOTrainer(
            model=_model(tokenizer, 0),
            ref_model=_model(tokenizer, 0),
            args=config,
            train_dataset=data,
            processing_class=tokenizer,
        )
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all("rewards/margins" in h and "num_tokens" in h for h in logs)


@pytest.mark.parametrize(
    "extra",
    [
        {"use_weighting": True},
        {"ld_alpha": 0.5},
        {"f_divergence_type": "forward_kl"},
        {"f_divergence_type": "js_divergence", "loss_type": "ipo"},
        {
            "f_divergence_type": "alpha_divergence",
            "f_alpha_divergence_coef": 0.5,
            "loss_type": "sigmoid_norm",
        },
        {"use_weighting": True, "ld_alpha": 0.3, "loss_type": ["robust", "sigmoid"], "label_smoothing": 0.2},
    ],
)
def test_dpo_options_trl_runs_without_logits_match_trl(tmp_path, tokenizer, extra):
    data = load_preference_data("paired", limit=4).select_columns(["prompt", "chosen", "rejected"])
    ours = _run(PrefuseDPOTrainer, trl.DPOConfig(**_common(tmp_path, **extra)), tokenizer, data, 4)
    theirs = _run(trl.DPOTrainer, trl.DPOConfig(**_common(tmp_path, **extra)), tokenizer, data, 4)
    _compare(ours, theirs, DPO_METRICS)


def test_moe_router_aux_loss_matches_trl(tmp_path, tokenizer):
    for trainer_cls, config_cls, view, columns, n in (
        (PrefuseDPOTrainer, trl.DPOConfig, "paired", ["prompt", "chosen", "rejected"], 4),
        (PrefuseKTOTrainer, trl.KTOConfig, "unpaired", ["prompt", "completion", "label"], 8),
    ):
        data = load_preference_data(view, limit=4).select_columns(columns)
        ours = _run(trainer_cls, config_cls(**_common(tmp_path)), tokenizer, data, n, "mixtral")
        theirs = _run(trainer_cls.__mro__[1], config_cls(**_common(tmp_path)), tokenizer, data, n, "mixtral")
        assert theirs[2]["aux_loss"] > 0
        _compare(ours, theirs, ("aux_loss",))


def test_kto_apo_zero_unpaired_matches_trl(tmp_path, tokenizer):
    data = load_preference_data("unpaired", limit=4).select_columns(["prompt", "completion", "label"])
    options = _common(tmp_path, loss_type="apo_zero_unpaired", undesirable_weight=0.6)
    ours = _run(PrefuseKTOTrainer, trl.KTOConfig(**options), tokenizer, data, 8)
    theirs = _run(trl.KTOTrainer, trl.KTOConfig(**options), tokenizer, data, 8)
    _compare(ours, theirs, KTO_METRICS)


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_keep_end_truncation_normalises_as_trl(tmp_path, tokenizer, loss_type):
    """``truncation_mode="keep_end"`` can cut the prompt away: the first completion token has no predecessor, and
    TRL still counts it in ``ipo`` / ``sigmoid_norm``'s length (``completion_mask`` rows); so does the drop-in."""
    data = load_preference_data("paired", limit=4).select_columns(["prompt", "chosen", "rejected"])
    options = _common(tmp_path, loss_type=loss_type, truncation_mode="keep_end", max_length=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = _run(PrefuseDPOTrainer, trl.DPOConfig(**options), tokenizer, data, 4)
        theirs = _run(trl.DPOTrainer, trl.DPOConfig(**options), tokenizer, data, 4)
    _compare(ours, theirs, DPO_METRICS)


def test_exo_pair_without_smoothing_is_refused_as_trl(tmp_path, tokenizer):
    data = load_preference_data("paired", limit=4).select_columns(["prompt", "chosen", "rejected"])
    for cls in (trl.DPOTrainer, PrefuseDPOTrainer):
        with pytest.raises(ValueError, match="(?i)label.smoothing"):
            cls(
                model=_model(tokenizer, 0),
                ref_model=_model(tokenizer, 1),
                train_dataset=data,
                args=trl.DPOConfig(**_common(tmp_path, loss_type="exo_pair")),
                processing_class=tokenizer,
            )


@pytest.mark.parametrize(
    "trainer_cls,config_cls,kwargs,match",
    [
        ("dpo", "DPOConfig", {"loss_type": "aot"}, "loss_type='aot' .*sorted across the batch"),
        ("dpo", "DPOConfig", {"loss_type": ["sigmoid", "aot_unpaired"]}, "aot_unpaired"),
        ("dpo", "DPOConfig", {"use_liger_kernel": True}, "use_liger_kernel=True on CPU .*Triton-only"),
    ],
)
def test_remaining_refusals_say_why(tmp_path, tokenizer, trainer_cls, config_cls, kwargs, match):
    cls = PrefuseDPOTrainer if trainer_cls == "dpo" else PrefuseKTOTrainer
    view = "paired" if trainer_cls == "dpo" else "unpaired"
    try:
        config = getattr(trl, config_cls)(**_common(tmp_path, **kwargs))
    except (ValueError, TypeError) as err:  # TRL itself may refuse the option first
        pytest.skip(f"TRL refuses it: {err}")
    with pytest.raises(ValueError, match=match):
        cls(
            model=_model(tokenizer, 0),
            ref_model=_model(tokenizer, 1),
            args=config,
            train_dataset=load_preference_data(view, limit=4),
            processing_class=tokenizer,
        )
