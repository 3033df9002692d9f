"""The method registry: one entry per method drives the config, the loss, the collator and the data checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from prefuse.alignment import (
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
from prefuse.alignment.data import PairedCollator, UnpairedCollator, collator_for
from prefuse.alignment.methods import METHODS, get_method
from prefuse.alignment.trainer import PreferenceConfig, build_loss

EXPECTED = {
    "dpo": DPOLoss,
    "sampo": SamPOLoss,
    "kto": KTOLoss,
    "factalign": FactAlignLoss,
    "sppo": SPPOLoss,
    "gpo": GPOLoss,
    "simpo": SimPOLoss,
    "orpo": ORPOLoss,
    "cpo": CPOLoss,
}


class _Tokenizer:
    pad_token_id, eos_token_id = 0, 1


def _config(tmp_path, method, **kwargs):
    return PreferenceConfig(output_dir=str(tmp_path), method=method, report_to=[], use_cpu=True, **kwargs)


def test_every_method_and_its_loss():
    assert {name: m.loss for name, m in METHODS.items()} == EXPECTED
    assert [m.name for m in METHODS.values()] == list(METHODS)
    with pytest.raises(ValueError, match="method must be one of"):
        get_method("ppo")


@pytest.mark.parametrize("method", list(METHODS))
def test_config_defaults_and_the_built_loss(tmp_path, method):
    spec = METHODS[method]
    config = _config(tmp_path, method)
    loss = build_loss(config, softcap=3.0, temperature=0.5)
    assert type(loss) is spec.loss and loss.softcap == 3.0 and loss.temperature == 0.5
    assert loss.beta == config.beta == spec.defaults["beta"]
    for arg, source in spec.options.items():  # every mapped option reaches the loss
        if isinstance(source, str) and hasattr(loss, arg):
            assert getattr(loss, arg) == getattr(config, source), arg
    if "nll_weight" in spec.defaults:
        assert loss.nll_weight == config.nll_weight == spec.defaults["nll_weight"]
    collator = spec.collator(_Tokenizer())
    assert isinstance(collator, PairedCollator if spec.paired else UnpairedCollator)
    assert type(collator_for(method, _Tokenizer())) is type(collator)
    assert (spec.reference is None) == (method in ("simpo", "orpo", "cpo"))


def test_config_values_override_the_defaults(tmp_path):
    loss = build_loss(_config(tmp_path, "cpo", beta=0.3, nll_weight=0.0, label_smoothing=0.1))
    assert (loss.beta, loss.nll_weight, loss.label_smoothing) == (0.3, 0.0, 0.1)
    loss = build_loss(_config(tmp_path, "simpo", simpo_gamma=1.5))
    assert loss.gamma == 1.5 and loss.nll_weight == 0.0
    loss = build_loss(_config(tmp_path, "sampo", seed=3))
    assert loss.seed == 3
    loss = build_loss(_config(tmp_path, "sampo", seed=3, sampo_seed=11))
    assert loss.seed == 11


def test_the_registry_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        METHODS["dpo"].paired = False


# ---------------------------------------------------------------------------------------------- reference sums
def _paired_feature(ref_c, ref_r):
    return {"prompt_input_ids": [5, 6], "chosen_input_ids": [7, 8, 9], "rejected_input_ids": [10],
            "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}  # fmt: skip


def test_collators_stack_precomputed_sums():
    batch = PairedCollator(0)([_paired_feature(-1.5, -2.0), _paired_feature(-3.0, -0.5)])
    assert batch["ref_logps"].shape == (4,) and batch["ref_logps"].tolist() == [-1.5, -3.0, -2.0, -0.5]
    tokens = PairedCollator(0)([_paired_feature([-0.5, -0.25, -1.0], [-2.0])])
    assert tokens["ref_logps"].shape == (2, 4)
    features = [
        {"prompt_input_ids": [5], "completion_input_ids": [7, 8], "label": True, "ref_logps": -1.0,
         "ref_kl_logps": -2.0},
        {"prompt_input_ids": [6], "completion_input_ids": [9], "label": False, "ref_logps": -4.0,
         "ref_kl_logps": -0.5},
    ]  # fmt: skip
    batch = UnpairedCollator(0)(features)
    assert batch["ref_logps"].tolist() == [-1.0, -4.0] and batch["ref_kl_logps"].tolist() == [-2.0, -0.5]


def test_collators_refuse_mixed_or_non_finite_sums():
    with pytest.raises(ValueError, match="mix"):
        PairedCollator(0)([_paired_feature(-1.5, -2.0), _paired_feature([-1.0, -1.0, -1.0], [-1.0])])
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        PairedCollator(0)([_paired_feature(float("nan"), -2.0)])


def test_precomputed_sums_give_the_per_token_loss():
    """DPO on a batch with reference sums equals DPO on the same reference per token."""
    gen = torch.Generator().manual_seed(0)
    tokens = -torch.rand(4, 6, generator=gen)
    mask = torch.rand(4, 6, generator=gen) < 0.7
    policy = -torch.rand(4, 6, generator=gen)
    a = DPOLoss().loss_from_token_logps(policy, tokens, mask)
    b = DPOLoss().loss_from_token_logps(policy, torch.where(mask, tokens, 0.0).sum(-1), mask)
    torch.testing.assert_close(a.loss, b.loss)
