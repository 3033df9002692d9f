"""``use_varlen_attention``: a packed row through sdpa / eager attention run per sequence equals every sequence run
alone (outputs and gradients, float32), for the model families tested elsewhere -- with sliding windows shorter
than the sequences and Gemma-2's attention softcap -- while padded batches keep the base implementation's mask."""

from __future__ import annotations

import pytest
import torch
import transformers as t
from prefuse.alignment.packed_attention import sequence_bounds, use_varlen_attention

V = 50
COMMON = {
    "vocab_size": V, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 64,
}  # fmt: skip
FAMILIES = {  # windows of 3-5 tokens: shorter than the longest sequences (9), so the window matters
    "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**COMMON)),
    "gemma2-softcap-window": lambda: t.Gemma2ForCausalLM(
        t.Gemma2Config(
            **COMMON, head_dim=8, attn_logit_softcapping=5.0, final_logit_softcapping=2.0, sliding_window=4
        )
    ),
    "mistral-window": lambda: t.MistralForCausalLM(t.MistralConfig(**COMMON, sliding_window=5)),
    "qwen2-window": lambda: t.Qwen2ForCausalLM(
        t.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=3, max_window_layers=1)
    ),
}
LENGTHS = [7, 3, 9, 1, 5]


def _model(family: str):
    torch.manual_seed(0)
    return FAMILIES[family]().float()


def _sequences():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, V, (n,), generator=gen) for n in LENGTHS]


def _packed(sequences):
    ids = torch.cat(sequences).unsqueeze(0)
    positions = torch.cat([torch.arange(len(s)) for s in sequences]).unsqueeze(0)
    return ids, positions


def _outputs_and_grads(model, run):
    model.zero_grad(set_to_none=True)
    logits = run()
    (logits.square().mean()).backward()  # a loss that reaches every logit
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_row_equals_each_sequence_alone(family):
    sequences = _sequences()
    alone_model = _model(family)
    alone, grads_alone = _outputs_and_grads(
        alone_model,
        lambda: torch.cat([alone_model(input_ids=s[None], use_cache=False).logits[0] for s in sequences]),
    )
    model = _model(family)
    base = model.config._attn_implementation
    assert use_varlen_attention(model) == f"prefuse_varlen_{base}"
    ids, positions = _packed(sequences)
    packed, grads_packed = _outputs_and_grads(
        model, lambda: model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
    )
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert grads_packed.keys() == grads_alone.keys() and grads_alone
    for name, grad in grads_alone.items():
        scale = grad.abs().max().clamp(min=1e-12)
        torch.testing.assert_close(grads_packed[name] / scale, grad / scale, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["llama", "gemma2-softcap-window"])
def test_padded_rows_keep_the_base_mask(family):
    """A right-padded batch with its attention mask gives the same logits on the switched model as before."""
    sequences = _sequences()
    width = max(LENGTHS)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    model = _model(family).eval()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        use_varlen_attention(model)
        after = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    keep = mask.bool()
    torch.testing.assert_close(after[keep], before[keep], rtol=1e-5, atol=1e-6)


def test_no_block_causal_mask_is_built_for_a_packed_row():
    """The packed row's attention gets no ``N × N`` mask (each sequence builds its own, here none: sdpa's causal
    path) and runs once per sequence."""
    from transformers import AttentionInterface

    model = _model("llama")
    name = use_varlen_attention(model)
    varlen = AttentionInterface._global_mapping[name]
    calls = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        calls.append(attention_mask)
        return varlen(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("spy_varlen", spy)
    try:
        from transformers.masking_utils import AttentionMaskInterface

        AttentionMaskInterface.register("spy_varlen", AttentionMaskInterface._global_mapping[name])
        model.set_attn_implementation("spy_varlen")
        ids, positions = _packed(_sequences())
        with torch.no_grad():
            model(input_ids=ids, position_ids=positions, use_cache=False)
    finally:
        del AttentionInterface._global_mapping["spy_varlen"]
        del AttentionMaskInterface._global_mapping["spy_varlen"]
    assert calls == [None] * COMMON["num_hidden_layers"]


def test_sequence_bounds():
    positions = torch.tensor([[0, 1, 2, 0, 0, 1]])
    assert sequence_bounds(positions, 6) == [(0, 3), (3, 4), (4, 6)]
    assert sequence_bounds(torch.tensor([[3, 4, 0, 1]]), 4) == [
        (0, 2),
        (2, 4),
    ]  # a row may start mid-sequence
    assert sequence_bounds(None, 5) == [(0, 5)]


def test_bounds_are_read_once_per_forward(monkeypatch):
    """Every layer gets the same position ids: the host sync that finds the sequences runs once per forward, and
    again for new (or changed) position ids."""
    from prefuse.alignment import packed_attention

    reads = []
    nonzero = torch.Tensor.nonzero
    monkeypatch.setattr(
        torch.Tensor, "nonzero", lambda self, *a, **k: reads.append(1) or nonzero(self, *a, **k)
    )
    model = _model("llama")
    use_varlen_attention(model)
    ids, positions = _packed(_sequences())
    with torch.no_grad():
        first = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        assert len(reads) == 1
        positions[0, 13:19] = torch.arange(6)  # in place: the 9-token sequence (tokens 10-18) cut in two
        second = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    assert len(reads) == 2 and not torch.equal(first, second)
    assert packed_attention.sequence_bounds(positions, positions.shape[1])[2:4] == [(10, 13), (13, 19)]


def test_other_implementations_are_left_alone():
    model = t.LlamaForCausalLM._from_config(t.LlamaConfig(**COMMON), attn_implementation="flex_attention")
    assert use_varlen_attention(model) == "flex_attention"
    assert model.config._attn_implementation == "flex_attention"


def test_the_switch_is_not_saved(tmp_path):
    model = _model("llama")
    use_varlen_attention(model)
    model.save_pretrained(tmp_path)
    assert t.AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"
