"""``prefuse.alignment.model_head``: hidden states without the lm-head reproduce the model's own log-probs.

Tiny models are built from configs (hidden 32, 2 layers, vocab 300): nothing is downloaded.
"""

import copy

import pytest
import torch
from prefuse.alignment.model_head import (
    adapter_disabled,
    check_head,
    forward_hidden,
    head_options,
    is_peft_model,
    output_head,
    unwrap_causal_lm,
)
from prefuse.kernels import linear_logprobs
from torch import nn

transformers = pytest.importorskip("transformers")

V = 300
_COMMON = {
    "vocab_size": V,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def _models():
    t = transformers
    return {
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**_COMMON)),
        "llama-tied": lambda: t.LlamaForCausalLM(t.LlamaConfig(**_COMMON, tie_word_embeddings=True)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(**_COMMON)),
        "gemma2-softcap": lambda: t.Gemma2ForCausalLM(
            t.Gemma2Config(**_COMMON, head_dim=8, final_logit_softcapping=1.5)
        ),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**_COMMON)),
        "cohere-logit-scale": lambda: t.CohereForCausalLM(t.CohereConfig(**_COMMON, logit_scale=0.5)),
        "granite-logits-scaling": lambda: t.GraniteForCausalLM(
            t.GraniteConfig(**_COMMON, logits_scaling=4.0)
        ),
    }


def _build(name, seed=0):
    torch.manual_seed(seed)
    model = _models()[name]().float()
    with torch.no_grad():  # larger random logits, so softcap / scale / tying visibly matter
        head = model.get_output_embeddings()
        head.weight.mul_(8.0)
    return model


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    labels[mask == 0] = -100
    return ids, mask, labels


def _naive(model, ids, mask, labels):
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(labels[:, 1:] != -100, logp, 0.0)


def _fused(model, ids, mask, labels):
    head = forward_hidden(model, ids, mask)
    return linear_logprobs(
        head.hidden, head.weight, labels, head.bias, shift=True, backend="torch", **head.options
    )


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(_models()))
def test_logprobs_and_grads_match_full_logits(name):
    model = _build(name)
    ids, mask, labels = _batch()
    naive = _naive(model, ids, mask, labels)
    naive.sum().backward()
    expected = _grads(model)
    model.zero_grad()
    fused = _fused(model, ids, mask, labels)
    torch.testing.assert_close(fused, naive, rtol=1e-5, atol=1e-5)
    fused.sum().backward()
    got = _grads(model)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)


def test_head_is_the_tied_embedding():
    model = _build("llama-tied")
    weight, bias = output_head(model)
    assert weight is model.get_input_embeddings().weight and bias is None
    assert check_head(model, *_batch()[:2]) < 1e-5


@pytest.mark.parametrize(
    "name,expected",
    [
        ("llama", {"softcap": None, "temperature": 1.0}),
        ("gemma2-softcap", {"softcap": 1.5, "temperature": 1.0}),
        ("cohere-logit-scale", {"softcap": None, "temperature": 2.0}),  # logits * 0.5 = logits / 2
        ("granite-logits-scaling", {"softcap": None, "temperature": 4.0}),  # logits / 4
    ],
)
def test_head_options(name, expected):
    model = _build(name)
    assert head_options(model) == expected
    assert head_options(model.config) == expected
    assert forward_hidden(model, *_batch()[:2]).options == expected


def test_head_options_refuses_softcap_with_scale():
    config = transformers.Gemma2Config(**_COMMON, head_dim=8, final_logit_softcapping=30.0)
    config.logit_scale = 0.5
    with pytest.raises(ValueError, match="softcap"):
        head_options(config)


def test_gradient_checkpointing_gives_the_same_grads():
    ids, mask, labels = _batch()
    model = _build("llama")
    model.train()
    _fused(model, ids, mask, labels).sum().backward()
    expected = _grads(model)
    ckpt = _build("llama")
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.train()
    assert ckpt.model.gradient_checkpointing
    _fused(ckpt, ids, mask, labels).sum().backward()
    got = _grads(ckpt)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)


def test_no_full_logits_are_built():
    model = _build("llama")
    ids, mask, _ = _batch()
    seen = []
    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape)))
    head = forward_hidden(model, ids, mask)
    handle.remove()
    assert head.hidden.shape == (3, 11, 32)
    assert "forward" not in model.lm_head.__dict__  # the swap is undone
    assert model(ids).logits.shape == (3, 11, V)


def test_hidden_matches_the_backbone_output():
    model = _build("qwen2")
    ids, mask, _ = _batch()
    with torch.no_grad():
        expected = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = forward_hidden(model, ids, mask).hidden
    torch.testing.assert_close(got, expected)


def test_a_model_that_skips_its_head_is_refused():
    model = _build("llama")

    class NoHead(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            return self.module.model(input_ids=input_ids, attention_mask=attention_mask)

    with pytest.raises(ValueError, match="never called"):
        forward_hidden(NoHead(model), *_batch()[:2])
    with pytest.raises(ValueError, match="causal LM"):
        unwrap_causal_lm(nn.Linear(2, 2))


def test_ddp_wrapper_runs_through_its_forward(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ids, mask, labels = _batch()
        model = _build("llama")
        _naive(model, ids, mask, labels).sum().backward()
        expected = _grads(model)
        wrapped = DistributedDataParallel(_build("llama"), find_unused_parameters=True)
        calls = []
        wrapped.register_forward_pre_hook(lambda mod, args: calls.append(1))
        _fused(wrapped, ids, mask, labels).sum().backward()
        assert calls == [1]
        got = _grads(wrapped.module)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- PEFT
def _lora(model, **kwargs):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **kwargs
    )
    return peft.get_peft_model(model, config)


def test_lora_policy_and_disabled_adapter_reference():
    ids, mask, labels = _batch()
    base = _build("llama")
    frozen_base = copy.deepcopy(base)
    model = _lora(base)
    assert is_peft_model(model) and not is_peft_model(frozen_base)
    with torch.no_grad():
        merged = copy.deepcopy(model).merge_and_unload()
        torch.testing.assert_close(
            _fused(model, ids, mask, labels), _naive(merged, ids, mask, labels), rtol=1e-5, atol=1e-5
        )
        with adapter_disabled(model):
            reference = _fused(model, ids, mask, labels)
        torch.testing.assert_close(reference, _naive(frozen_base, ids, mask, labels), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(reference, _fused(model, ids, mask, labels))
    with pytest.raises(ValueError, match="not a PEFT model"), adapter_disabled(frozen_base):
        pass
    # only the adapter gets gradients, through the fused head
    _fused(model, ids, mask, labels).sum().backward()
    assert all(("lora_" in n) == (p.grad is not None) for n, p in model.named_parameters())


def test_lora_on_the_lm_head_is_refused_and_modules_to_save_is_followed():
    peft = pytest.importorskip("peft")
    ids, mask, labels = _batch()
    on_head = peft.get_peft_model(_build("llama"), peft.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="adapter on the lm-head"):
        forward_hidden(on_head, ids, mask)
    saved = peft.get_peft_model(
        _build("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    with torch.no_grad():
        active = output_head(saved)[0]
        active.add_(torch.randn_like(active))  # the trainable copy now differs from the original head
        merged = copy.deepcopy(saved).merge_and_unload()
        torch.testing.assert_close(
            _fused(saved, ids, mask, labels), _naive(merged, ids, mask, labels), rtol=1e-5, atol=1e-5
        )
        with adapter_disabled(saved):
            assert output_head(saved)[0] is not active
