"""``PreferenceTrainer``: one training step of every method equals the naive full-logits computation.

For a tiny Llama, a tiny Gemma-2 with final-logit softcapping and a tied-embedding Llama (float32, built from
configs, the locally trained tokenizer, the bundled data), the trainer's loss and every parameter gradient after
``training_step`` match a loss written here from ``log_softmax(model(...).logits)``. Then: the reference
sources (default copy, precomputed log-probs, PEFT adapter disabled), metric logging, gradient accumulation,
Liger on CPU, iterative training.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from prefuse.alignment import functional as Fn
from prefuse.alignment.data import build_tokenizer, load_preference_data
from prefuse.alignment.iterative import run_iterations
from prefuse.alignment.methods import METHODS
from prefuse.alignment.trainer import PreferenceConfig, PreferenceTrainer
from reference import naive_cpo, naive_orpo, naive_simpo, tiny_config_kwargs

pytest.importorskip("accelerate")

BETA = 0.1  # SPPO/GPO too (their seeds' 0.001 gives losses of 1e5: fine, but looser to compare)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _model(kind, tokenizer, seed):
    t = transformers
    common = tiny_config_kwargs(tokenizer)
    torch.manual_seed(seed)
    if kind == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(**common))
    elif kind == "llama-tied":
        model = t.LlamaForCausalLM(t.LlamaConfig(**common, tie_word_embeddings=True))
    elif kind == "gemma2-softcap":
        model = t.Gemma2ForCausalLM(t.Gemma2Config(**common, head_dim=8, final_logit_softcapping=2.0))
    else:
        raise ValueError(kind)
    model = model.float()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)  # logits large enough for the softcap to matter
    return model


def _data(method, n_records=4):
    return load_preference_data("paired" if METHODS[method].paired else "unpaired", limit=n_records)


def _config(tmp_path, method, **kwargs):
    options = {
        "output_dir": str(tmp_path / "out"),
        "method": method,
        "beta": BETA,
        "loss_backend": "torch",
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "max_length": 48,
        "max_prompt_length": 24,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 7,
        "learning_rate": 1e-3,
    }
    options.update(kwargs)
    return PreferenceConfig(**options)


def _batch(trainer, n):
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


# ---------------------------------------------------------------------------------------------- naive loss
def _token_logps(model, ids, mask, labels):
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(labels[:, 1:] != -100, logp, 0.0)


def _naive_loss(method, policy_model, ref_model, batch, seed):
    """The method's loss from full logits, written out here (FactAlign's sentence part via functional)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    policy = _token_logps(policy_model, ids, mask, labels)
    scored = labels[:, 1:] != -100
    if method == "simpo":
        return naive_simpo(policy, scored, beta=BETA, gamma=0.5, eps=0.0, nll_weight=0.0)[0].float()
    if method == "orpo":
        return naive_orpo(policy, scored, beta=BETA, nll_weight=1.0)[0].float()
    if method == "cpo":
        return naive_cpo(policy, scored, beta=BETA, eps=0.0, nll_weight=1.0)[0].float()
    with torch.no_grad():
        ref = _token_logps(ref_model, ids, mask, labels)
    if method in ("dpo", "sampo", "sppo", "gpo"):
        b = ids.shape[0] // 2
        if method == "sampo":
            scored = labels[:, 1:] != -100
            gen = torch.Generator().manual_seed(seed)
            keep_c, keep_r = Fn.sampo_sample_masks(scored[:b], scored[b:], generator=gen)
            keep = torch.cat([keep_c, keep_r])
            assert (keep.sum(-1)[:b] == keep.sum(-1)[b:]).all()  # both sides keep min(Tc, Tr) tokens
            policy, ref = policy * keep, ref * keep
        delta = policy.sum(-1) - ref.sum(-1)
        dc, dr = delta[:b], delta[b:]
        if method in ("dpo", "sampo"):
            return -F.logsigmoid(BETA * (dc - dr)).mean()
        eta = 1.0 / BETA
        if method == "sppo":
            tc, tr = eta * (batch["p_chosen"] - 0.5), eta * (batch["p_rejected"] - 0.5)
        else:
            tc, tr = eta * batch["s_chosen"], eta * batch["s_rejected"]
        return (0.5 * ((dc - tc) ** 2 + (dr - tr) ** 2)).mean()
    kl_ids, kl_mask, kl_labels = batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"]
    with torch.no_grad():
        kl_policy = _token_logps(policy_model, kl_ids, kl_mask, kl_labels)
        kl_ref = _token_logps(ref_model, kl_ids, kl_mask, kl_labels)
    if method == "kto":
        z = (kl_policy.sum(-1) - kl_ref.sum(-1)).mean().clamp(min=0)
        delta = policy.sum(-1) - ref.sum(-1)
        desirable = batch["desirable"]
        losses = torch.where(
            desirable, 1 - torch.sigmoid(BETA * (delta - z)), 1 - torch.sigmoid(BETA * (z - delta))
        )
        return losses.mean()
    return Fn.factalign_loss(
        policy,
        ref,
        batch["desirable"],
        batch["sentence_ids"][:, 1:],
        batch["sentence_labels"],
        policy_kl_logps=kl_policy,
        ref_kl_logps=kl_ref,
        kl_sentence_ids=batch["kl_sentence_ids"][:, 1:],
        beta=BETA,
    ).loss


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(got, expected):
    assert got.keys() == expected.keys() and expected
    for key in expected:
        scale = expected[key].abs().max().clamp(min=1e-3)
        torch.testing.assert_close(got[key] / scale, expected[key] / scale, rtol=1e-4, atol=2e-5, msg=key)


@pytest.mark.parametrize("kind", ["llama", "gemma2-softcap", "llama-tied"])
@pytest.mark.parametrize("method", METHODS)
def test_training_step_matches_full_logits(tmp_path, tokenizer, kind, method):
    policy = _model(kind, tokenizer, seed=0)
    # a different reference: log-ratios are not zero
    reference = _model(kind, tokenizer, seed=1) if METHODS[method].reference else None
    trainer = PreferenceTrainer(
        policy,
        ref_model=reference,
        args=_config(tmp_path, method),
        train_dataset=_data(method),
        processing_class=tokenizer,
    )
    batch = _batch(trainer, 4)
    if method == "factalign":
        assert batch["sentence_labels"].numel() > 0 and (batch["sentence_ids"] >= 0).any()
    loss = trainer.training_step(trainer.model, dict(batch))
    got = _grads(trainer.model)

    naive_policy = _model(kind, tokenizer, seed=0)
    naive = _naive_loss(method, naive_policy, _model(kind, tokenizer, seed=1), batch, seed=7)
    naive.backward()
    torch.testing.assert_close(loss, naive.detach(), rtol=1e-5, atol=1e-6)
    _assert_grads_close(got, _grads(naive_policy))
    if kind == "llama-tied":
        assert trainer.model.lm_head.weight is trainer.model.model.embed_tokens.weight


@pytest.mark.parametrize("method", METHODS)
def test_naive_head_option_matches_fused(tmp_path, tokenizer, method):
    results = []
    for head in ("fused", "naive"):
        ref_model = _model("gemma2-softcap", tokenizer, 1) if METHODS[method].reference else None
        trainer = PreferenceTrainer(
            _model("gemma2-softcap", tokenizer, 0),
            ref_model=ref_model,
            args=_config(tmp_path, method, head=head),
            train_dataset=_data(method),
            processing_class=tokenizer,
        )
        loss = trainer.training_step(trainer.model, _batch(trainer, 4))
        results.append((loss, _grads(trainer.model)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    _assert_grads_close(results[0][1], results[1][1])


@pytest.mark.parametrize("method", ["simpo", "orpo", "cpo"])
def test_reference_free_methods_train(tmp_path, tokenizer, method):
    """SimPO, ORPO, CPO: no reference is built; the step's loss is the loss module's on the policy's hidden
    states; a few steps on the bundled data lower the loss on that data."""
    trainer = PreferenceTrainer(
        _model("llama", tokenizer, 0),
        args=_config(tmp_path, method, learning_rate=3e-3, max_steps=6, logging_steps=100),
        train_dataset=_data(method, n_records=8),
        processing_class=tokenizer,
    )
    assert trainer.ref_source == "none" and trainer.ref_model is None
    assert type(trainer.loss_module) is METHODS[method].loss
    batch = _batch(trainer, 4)
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, dict(batch))
        out = trainer.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
        module = trainer.loss_module(out.hidden_states[-1], trainer.model.lm_head.weight, batch["labels"])
    torch.testing.assert_close(got, module.loss)
    before = trainer.evaluate(trainer.train_dataset)["eval_loss"]
    trainer.train()
    after = trainer.evaluate(trainer.train_dataset)["eval_loss"]
    assert after < before - 1e-3, (before, after)


def test_reference_free_methods_refuse_a_reference(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="reference-free"):
        PreferenceTrainer(
            _model("llama", tokenizer, 0),
            ref_model=_model("llama", tokenizer, 1),
            args=_config(tmp_path, "simpo"),
            train_dataset=_data("simpo"),
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        _config(tmp_path, "orpo", precompute_ref_log_probs=True)


@pytest.mark.parametrize("method", ["dpo", "sampo", "kto", "factalign"])
def test_reference_sources_agree(tmp_path, tokenizer, method):
    """Default (frozen copy of the initial policy) == explicit copy == precomputed log-probs."""

    def loss_of(**kwargs):
        extra = kwargs.pop("config", {})
        trainer = PreferenceTrainer(
            _model("llama", tokenizer, 0),
            args=_config(tmp_path, method, **extra),
            train_dataset=_data(method),
            processing_class=tokenizer,
            **kwargs,
        )
        batch = _batch(trainer, 4)
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, batch), trainer, batch

    # perturb the policy so that policy != reference: train one step first, then compare the sources
    default, trainer, _ = loss_of()
    assert trainer.ref_source == "copy" and trainer.ref_model is not trainer.model
    explicit, _, _ = loss_of(ref_model=_model("llama", tokenizer, 0))
    precomputed, trainer, batch = loss_of(config={"precompute_ref_log_probs": True})
    assert trainer.ref_source == "precomputed" and trainer.ref_model is None
    assert "ref_logps" in batch and ("ref_kl_logps" in batch) == (method in ("kto", "factalign"))
    # per-token only where the loss needs tokens (SamPO's sample, FactAlign's sentences); else sums
    assert batch["ref_logps"].dim() == (2 if method in ("sampo", "factalign") else 1)
    assert isinstance(
        trainer.train_dataset[0]["ref_logps" if method in ("kto", "factalign") else "ref_chosen_logps"],
        list if method in ("sampo", "factalign") else float,
    )
    torch.testing.assert_close(default, explicit)
    torch.testing.assert_close(default, precomputed, rtol=1e-5, atol=1e-6)

    # with a policy that moved away from its reference, precomputed == reference model
    ref_model = _model("llama", tokenizer, 0)
    moved = _model("llama", tokenizer, 3)
    with_model = PreferenceTrainer(
        moved,
        ref_model=ref_model,
        args=_config(tmp_path, method),
        train_dataset=_data(method),
        processing_class=tokenizer,
    )
    with_logps = PreferenceTrainer(
        copy.deepcopy(moved),
        ref_model=ref_model,
        args=_config(tmp_path, method, precompute_ref_log_probs=True),
        train_dataset=_data(method),
        processing_class=tokenizer,
    )
    n = len(with_model.train_dataset)  # the whole set: in-batch KL partners == the precomputed ones
    with torch.no_grad():
        a = with_model.compute_loss(with_model.model, _batch(with_model, n))
        b = with_logps.compute_loss(with_logps.model, _batch(with_logps, n))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert a.item() != pytest.approx(default.item())


def test_lora_reference_is_the_base_model(tmp_path, tokenizer):
    peft = pytest.importorskip("peft")
    base = _model("llama", tokenizer, 0)
    frozen_base = copy.deepcopy(base)
    lora = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    trainer = PreferenceTrainer(
        lora, args=_config(tmp_path, "dpo"), train_dataset=_data("dpo"), processing_class=tokenizer
    )
    assert trainer.ref_source == "adapter_disabled" and trainer.ref_model is None
    batch = _batch(trainer, 4)
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, batch, return_outputs=True)
        merged = copy.deepcopy(lora).merge_and_unload()
        explicit = PreferenceTrainer(
            merged,
            ref_model=frozen_base,
            args=_config(tmp_path, "dpo"),
            train_dataset=_data("dpo"),
            processing_class=tokenizer,
        )
        expected = explicit.compute_loss(explicit.model, batch, return_outputs=True)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        got[1]["rewards/margins"], expected[1]["rewards/margins"], rtol=1e-5, atol=1e-6
    )
    assert got[1]["rewards/margins"].abs() > 0


def test_gradient_accumulation_matches_the_full_batch(tmp_path, tokenizer):
    grads = []
    for accumulation, size in ((1, 4), (2, 2)):
        trainer = PreferenceTrainer(
            _model("llama", tokenizer, 0),
            ref_model=_model("llama", tokenizer, 1),
            args=_config(
                tmp_path, "dpo", gradient_accumulation_steps=accumulation, per_device_train_batch_size=size
            ),
            train_dataset=_data("dpo"),
            processing_class=tokenizer,
        )
        trainer.current_gradient_accumulation_steps = accumulation
        features = [trainer.train_dataset[i] for i in range(4)]
        for start in range(0, 4, size):
            trainer.training_step(trainer.model, trainer.data_collator(features[start : start + size]))
        grads.append(_grads(trainer.model))
    _assert_grads_close(grads[1], grads[0])


def test_training_logs_averaged_metrics_and_eval(tmp_path, tokenizer):
    trainer = PreferenceTrainer(
        _model("llama", tokenizer, 0),
        args=_config(tmp_path, "dpo", max_steps=4, logging_steps=2),
        train_dataset=_data("dpo", 16),
        eval_dataset=load_preference_data("paired", "test", limit=4),
        processing_class=tokenizer,
    )
    stored = []
    original = trainer._store_metrics
    trainer._store_metrics = lambda metrics, mode: (stored.append((mode, metrics)), original(metrics, mode))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4]
    train_margins = [m["rewards/margins"].item() for mode, m in stored if mode == "train"]
    assert logs[0]["rewards/margins"] == pytest.approx(sum(train_margins[:2]) / 2, rel=1e-5)
    assert logs[1]["rewards/margins"] == pytest.approx(sum(train_margins[2:4]) / 2, rel=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert key in logs[0]
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and "eval_rewards/margins" in metrics


def test_liger_kernel_on_cpu_is_a_clear_error(tmp_path, tokenizer):
    pytest.importorskip("liger_kernel")
    with pytest.raises(ValueError, match="Triton kernels.*CPU"):
        PreferenceTrainer(
            _model("llama", tokenizer, 0),
            args=_config(tmp_path, "dpo", use_liger_kernel=True),
            train_dataset=_data("dpo"),
            processing_class=tokenizer,
        )


@pytest.mark.gpu
def test_liger_kernel_beside_prefuse_on_gpu(tmp_path, tokenizer):
    pytest.importorskip("liger_kernel")
    model = _model("llama", tokenizer, 0).cuda()
    trainer = PreferenceTrainer(
        model,
        args=_config(tmp_path, "dpo", use_cpu=False, use_liger_kernel=True),
        train_dataset=_data("dpo"),
        processing_class=tokenizer,
    )
    assert trainer.liger_applied
    batch = {k: v.cuda() for k, v in _batch(trainer, 4).items()}
    loss = trainer.training_step(trainer.model, batch)
    assert torch.isfinite(loss)


def test_bad_configuration_is_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="method"):
        _config(tmp_path, "ppo")
    with pytest.raises(ValueError, match="paired data"):
        PreferenceTrainer(
            _model("llama", tokenizer, 0),
            args=_config(tmp_path, "dpo"),
            train_dataset=_data("kto"),
            processing_class=tokenizer,
        )
    with pytest.raises(TypeError, match="PreferenceConfig"):
        PreferenceTrainer(
            _model("llama", tokenizer, 0),
            args=transformers.TrainingArguments(str(tmp_path)),
            train_dataset=_data("dpo"),
            processing_class=tokenizer,
        )


def test_kto_accepts_paired_data(tmp_path, tokenizer):
    trainer = PreferenceTrainer(
        _model("llama", tokenizer, 0),
        args=_config(tmp_path, "kto"),
        train_dataset=_data("dpo"),
        processing_class=tokenizer,
    )
    assert len(trainer.train_dataset) == 8 and trainer.train_dataset["label"][:2] == [True, False]


def test_iterations_use_the_previous_policy_as_reference(tmp_path, tokenizer):
    seen = []

    def data(k, policy):
        seen.append(k)
        return load_preference_data("paired", limit=8)

    result = run_iterations(
        _model("llama", tokenizer, 0),
        data,
        iterations=2,
        processing_class=tokenizer,
        args=_config(tmp_path, "sampo", max_steps=2, logging_steps=1),
    )
    assert seen == [0, 1] and len(result.log_histories) == 2
    first, second = result.references
    assert first is None  # round 0: the trainer's default (a frozen copy of the initial model)
    assert not any(p.requires_grad for p in second.parameters()) and not second.training
    # round 1's reference is round 0's final policy, which round 1 then moved away from
    final = dict(result.model.named_parameters())
    moved = [not torch.equal(p, final[n]) for n, p in second.named_parameters()]
    assert any(moved)


def test_reference_free_iterations_keep_no_reference(tmp_path, tokenizer):
    result = run_iterations(
        _model("llama", tokenizer, 0),
        [_data("orpo")] * 2,
        processing_class=tokenizer,
        args=_config(tmp_path, "orpo", max_steps=1, logging_steps=1),
    )
    assert result.references == [None, None] and len(result.log_histories) == 2


def test_iterations_with_lora_merge_the_adapter(tmp_path, tokenizer):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        _model("llama", tokenizer, 0), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    snapshots = []

    def snapshot(k, trainer):
        merged = copy.deepcopy(trainer.model).merge_and_unload()
        snapshots.append({n: p.detach().clone() for n, p in merged.named_parameters()})

    result = run_iterations(
        model,
        [load_preference_data("paired", limit=8)] * 2,
        processing_class=tokenizer,
        args=_config(tmp_path, "dpo", max_steps=2, learning_rate=1e-2),
        on_iteration_end=snapshot,
    )
    assert result.references == [None, None]  # PEFT: the reference is always "adapter disabled"
    from prefuse.alignment.model_head import adapter_disabled

    # round 1's adapter-disabled model is round 0's trained policy
    with adapter_disabled(result.model):
        base = {
            n.replace("base_model.model.", "").replace(".base_layer", ""): p
            for n, p in result.model.named_parameters()
            if "lora_" not in n
        }
    for name, value in snapshots[0].items():
        torch.testing.assert_close(base[name], value, msg=name)
