"""``patch_trl()``: every TRL trainer with TRL's fused head (DPO, KTO, SFT, GRPO, RLOO) runs on prefuse's op and
computes what it computes on TRL's own head -- loss, parameter gradients, every logged metric -- on the same batch.

Each test builds one TRL trainer on a tiny model (from a config, the bundled tokenizer, no downloads), prepares a
batch, and runs it once on TRL's head and once patched; GRPO and RLOO generate their batch again under the same
seed, so the patched run also scores the reference and old log-probs with prefuse. Skipped without TRL.
"""

import math
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

from datasets import Dataset  # noqa: E402
from prefuse.alignment.data import build_tokenizer, load_preference_data  # noqa: E402
from reference import tiny_config_kwargs  # noqa: E402

prefuse_trl = pytest.importorskip("prefuse.alignment.trl")
trl_utils = pytest.importorskip("trl.trainer.utils")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(autouse=True)
def _unpatched():
    prefuse_trl.unpatch_trl()
    yield
    prefuse_trl.unpatch_trl()


def tiny_model(tokenizer, seed=0, kind="llama"):
    t = transformers
    common = tiny_config_kwargs(tokenizer)
    torch.manual_seed(seed)
    if kind == "gemma2":  # a final-logit softcap
        model = t.Gemma2ForCausalLM(t.Gemma2Config(**common, head_dim=8, final_logit_softcapping=2.0))
    elif kind == "cohere":  # a logit scale
        model = t.CohereForCausalLM(t.CohereConfig(**common, logit_scale=0.5))
    elif kind == "mixtral":  # a MoE router auxiliary loss
        model = t.MixtralForCausalLM(
            t.MixtralConfig(
                **common,
                num_local_experts=4,
                num_experts_per_tok=2,
                output_router_logits=True,
                router_aux_loss_coef=0.02,
            )
        )
    else:
        model = t.LlamaForCausalLM(t.LlamaConfig(**common))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)  # peaked distributions: entropy, top-1 and logits move
    return model.float()


def options(tmp_path, **kwargs):
    base = {
        "output_dir": str(tmp_path / "out"),
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "bf16": False,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
    }
    return {**base, **kwargs}


def build(trainer_cls, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trainer_cls(**kwargs)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, read by compute_loss
    return trainer


def step(trainer, make_batch):
    """``(loss, gradients, metrics, batch)`` of one ``compute_loss`` + backward on ``make_batch(trainer)``."""
    trainer.model.zero_grad(set_to_none=True)
    for mode in ("train", "eval"):
        trainer._metrics[mode].clear()
    trainer._total_train_tokens = 0  # the token counters the trainers log
    trainer.state.num_input_tokens_seen = 0
    torch.manual_seed(1234)
    batch = make_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {key: list(values) for key, values in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics, batch


def run_both(trainer, make_batch, monkeypatch):
    """The step on TRL's head, then patched (the trainer built before the patch: looked up per call); the patched
    step must score every row through prefuse's op."""
    theirs = step(trainer, make_batch)
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[2].numel())
        return op(*args, **kwargs)

    op = prefuse_trl.patch.linear_logprobs
    monkeypatch.setattr(prefuse_trl.patch, "linear_logprobs", counted)
    prefuse_trl.patch_trl()
    try:
        ours = step(trainer, make_batch)
    finally:
        prefuse_trl.unpatch_trl()
    assert calls, "the patched step never reached prefuse's op"
    return ours, theirs


def assert_same(ours, theirs, *, rtol=1e-4, atol=1e-5):
    loss, grads, metrics, batch = ours
    torch.testing.assert_close(loss, theirs[0], rtol=rtol, atol=atol)
    assert grads.keys() == theirs[1].keys() and grads
    for name, expected in theirs[1].items():
        scale = expected.abs().max().clamp(min=1e-3)
        torch.testing.assert_close(
            grads[name] / scale, expected / scale, rtol=10 * rtol, atol=10 * atol, msg=name
        )
    assert metrics.keys() == theirs[2].keys()
    for key, expected in theirs[2].items():
        assert len(metrics[key]) == len(expected), key
        for got, want in zip(metrics[key], expected):
            assert math.isclose(got, want, rel_tol=10 * rtol, abs_tol=10 * atol), (key, got, want)
    for key, expected in theirs[3].items():  # the batch itself: generated tokens, reference and old log-probs
        if isinstance(expected, torch.Tensor):
            torch.testing.assert_close(batch[key], expected, rtol=rtol, atol=atol, msg=key)


def collate(trainer, n):
    return trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(n)]))


# --------------------------------------------------------------------------------------------- the patch
def test_patch_is_idempotent_and_unpatch_restores_trl():
    original = (trl_utils._ChunkedLogProbFunction, trl_utils._use_triton)
    prefuse_trl.patch_trl()
    prefuse_trl.patch_trl()
    assert prefuse_trl.is_trl_patched()
    assert trl_utils._ChunkedLogProbFunction is prefuse_trl.PrefuseChunkedLogProb
    assert trl_utils._use_triton(torch.device("cpu"))  # scored rows only, on every device
    prefuse_trl.unpatch_trl()
    prefuse_trl.unpatch_trl()
    assert (trl_utils._ChunkedLogProbFunction, trl_utils._use_triton) == original
    assert not prefuse_trl.is_trl_patched()


def test_stand_in_returns_trl_outputs():
    """TRL's own call, argument for argument, against ``ChunkedLogProbFunction``: every output and gradient."""
    from trl.kernels import ChunkedLogProbFunction

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(7, 16, generator=gen, requires_grad=True)
    w = (3 * torch.randn(50, 16, generator=gen)).requires_grad_()
    b = torch.randn(50, generator=gen, requires_grad=True)
    y = torch.randint(0, 50, (7,), generator=gen)
    for softcap, scale, temperature in ((None, 1.0, 1.0), (2.0, 0.5, 0.7)):
        args = (b, y, temperature, 32768, softcap, scale, ("log_probs", *prefuse_trl.patch.TRL_OUTPUTS))
        ours = prefuse_trl.PrefuseChunkedLogProb.apply(h, w, *args)
        theirs = ChunkedLogProbFunction.apply(h, w, *args)
        for got, want in zip(ours, theirs):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        grads = [torch.autograd.grad(out[0].sum() + 0.3 * out[1].sum(), (h, w, b)) for out in (ours, theirs)]
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    only_logps = prefuse_trl.PrefuseChunkedLogProb.apply(h, w, None, y, 1.0, 32768, None, 1.0, ("log_probs",))
    assert only_logps[1:] == (None, None, None, None)


def test_stand_in_mixed_dtypes_and_no_scored_rows():
    """``cast_lm_head_to_fp32`` hands fp32 hidden states and a bf16 head; a micro-batch without labels hands zero
    rows. Both as TRL's function, gradients included."""
    from trl.kernels import ChunkedLogProbFunction

    gen = torch.Generator().manual_seed(1)
    h = torch.randn(5, 16, generator=gen, requires_grad=True)
    w = torch.randn(40, 16, generator=gen).bfloat16().requires_grad_()
    y = torch.randint(0, 40, (5,), generator=gen)
    args = (None, y, 1.0, 32768, None, 1.0, ("log_probs", "entropy"))
    ours = prefuse_trl.PrefuseChunkedLogProb.apply(h, w, *args)
    theirs = ChunkedLogProbFunction.apply(h, w, *args)
    for got, want in zip(ours[:2], theirs[:2]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grads = [torch.autograd.grad(out[0].sum() + out[1].sum(), (h, w)) for out in (ours, theirs)]
    for got, want in zip(*grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    empty = prefuse_trl.PrefuseChunkedLogProb.apply(
        h[:0], w, None, y[:0], 1.0, 32768, None, 1.0, ("entropy",)
    )
    assert empty[0].shape == (0,) and empty[1].shape == (0,)
    (empty[0].sum() + empty[1].sum()).backward()  # a differentiable zero, as TRL's


# ---------------------------------------------------------------------------------------- every trainer
@pytest.mark.parametrize(
    "kind,extra",
    [
        ("llama", {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}),
        ("llama", {"use_weighting": True, "ld_alpha": 0.5}),
        ("gemma2", {"loss_type": "ipo"}),
        ("cohere", {}),
        ("mixtral", {}),
    ],
)
def test_dpo_patched_matches_trl(tmp_path, tokenizer, kind, extra, monkeypatch):
    data = load_preference_data("paired", limit=4).select_columns(["prompt", "chosen", "rejected"])
    config = trl.DPOConfig(**options(tmp_path, beta=0.1, max_length=64, dataset_num_proc=None, **extra))
    trainer = build(
        trl.DPOTrainer,
        model=tiny_model(tokenizer, 0, kind),
        ref_model=tiny_model(tokenizer, 1, kind),
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
    )
    ours, theirs = run_both(trainer, lambda tr: collate(tr, 4), monkeypatch)
    assert {"entropy", "logits/chosen", "mean_token_accuracy"} <= theirs[2].keys()
    assert_same(ours, theirs)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_patched_matches_trl(tmp_path, tokenizer, loss_type, monkeypatch):
    data = load_preference_data("unpaired", limit=4).select_columns(["prompt", "completion", "label"])
    config = trl.KTOConfig(
        **options(
            tmp_path,
            beta=0.1,
            max_length=64,
            dataset_num_proc=None,
            loss_type=loss_type,
            desirable_weight=1.5,
        )
    )
    trainer = build(
        trl.KTOTrainer,
        model=tiny_model(tokenizer, 0),
        ref_model=tiny_model(tokenizer, 1),
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
    )
    ours, theirs = run_both(trainer, lambda tr: collate(tr, 8), monkeypatch)
    assert_same(ours, theirs)


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_sft_patched_matches_trl(tmp_path, tokenizer, loss_type, monkeypatch):
    data = load_preference_data("paired", limit=4).select_columns(["prompt", "chosen"])
    data = data.rename_column("chosen", "completion")
    config = trl.SFTConfig(**options(tmp_path, max_length=64, dataset_num_proc=None, loss_type=loss_type))
    trainer = build(
        trl.SFTTrainer,
        model=tiny_model(tokenizer, 0, "gemma2"),
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
    )
    ours, theirs = run_both(trainer, lambda tr: collate(tr, 4), monkeypatch)
    assert {"entropy", "mean_token_accuracy"} <= theirs[2].keys()
    assert_same(ours, theirs)


def _online(trainer_cls, config_cls, tmp_path, tokenizer, **extra):
    """An online trainer (GRPO, RLOO) on a saved tiny model (it builds its reference from the path), a length
    reward, two generations per prompt, the policy nudged away from the reference so the KL term is not 0."""
    path = tmp_path / "model"
    tiny_model(tokenizer, 0).save_pretrained(path)
    prompts = Dataset.from_dict(
        {"prompt": ["The sky is", "Two plus two is", "Water boils at", "Paris is in"]}
    )

    def length_reward(completions, **kwargs):
        return [len(c) / 10.0 for c in completions]

    config = config_cls(**options(tmp_path, num_generations=2, max_completion_length=8, beta=0.1, **extra))
    trainer = build(
        trainer_cls,
        model=str(path),
        reward_funcs=length_reward,
        args=config,
        train_dataset=prompts,
        processing_class=tokenizer,
    )
    with torch.no_grad():
        gen = torch.Generator().manual_seed(7)
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    batch = [prompts[0], prompts[0], prompts[1], prompts[1]]
    return trainer, lambda tr: tr._prepare_inputs(batch)


@pytest.mark.slow
def test_grpo_patched_matches_trl(tmp_path, tokenizer, monkeypatch):
    trainer, make_batch = _online(trl.GRPOTrainer, trl.GRPOConfig, tmp_path, tokenizer, temperature=0.7)
    ours, theirs = run_both(trainer, make_batch, monkeypatch)
    assert {"kl", "entropy", "reward", "clip_ratio/region_mean"} <= theirs[2].keys()
    assert theirs[2]["kl"][0] > 0
    assert_same(ours, theirs)


@pytest.mark.slow
def test_rloo_patched_matches_trl(tmp_path, tokenizer, monkeypatch):
    trainer, make_batch = _online(trl.RLOOTrainer, trl.RLOOConfig, tmp_path, tokenizer)
    ours, theirs = run_both(trainer, make_batch, monkeypatch)
    assert {"kl", "entropy", "reward"} <= theirs[2].keys()
    assert_same(ours, theirs)


def test_a_patched_training_run_logs_what_trl_logs(tmp_path, tokenizer):
    """Two optimizer steps of ``SFTTrainer.train()`` with gradient accumulation, on TRL's head and patched: the
    same log history (loss, grad norm, entropy, token accuracy), step by step."""
    data = load_preference_data("paired", limit=8).select_columns(["prompt", "chosen"])
    data = data.rename_column("chosen", "completion")
    histories = []
    for patched in (False, True):
        config = trl.SFTConfig(
            **options(
                tmp_path,
                max_length=64,
                dataset_num_proc=None,
                max_steps=2,
                seed=3,
                per_device_train_batch_size=2,
                gradient_accumulation_steps=2,
                learning_rate=1e-3,
            )
        )
        trainer = build(
            trl.SFTTrainer,
            model=tiny_model(tokenizer, 0),
            args=config,
            train_dataset=data,
            processing_class=tokenizer,
        )
        if patched:
            prefuse_trl.patch_trl()
        try:
            trainer.train()
        finally:
            prefuse_trl.unpatch_trl()
        histories.append([h for h in trainer.state.log_history if "loss" in h])
    theirs, ours = histories
    assert len(ours) == len(theirs) == 2
    for got, want in zip(ours, theirs):
        assert got.keys() == want.keys()
        for key in ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key
