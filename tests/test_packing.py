"""Packed (padding-free) batches equal padded ones: every method's loss, metrics and gradients (float32), the
packed layout's own arithmetic, and the error messages of malformed packed inputs."""

from __future__ import annotations

import dataclasses
import json
import math

import processes
import pytest
import torch
import transformers
from prefuse.alignment.data.packing import TokenBudgetBatchSampler, pack_batch
from prefuse.alignment.methods import METHODS, get_method
from prefuse.alignment.packed_attention import use_varlen_attention
from prefuse.alignment.packing import PackedLayout, packed_targets, unpack_token_logps
from prefuse.kernels import linear_logprobs
from reference import IGNORE, make_sentences

D, V = 8, 29


def make_rows(rows: int, gen: torch.Generator, *, max_len: int = 9):
    """Right-padded labels ``(rows, T)`` with ``T`` the longest row (the tight padded layout), row lengths."""
    lengths = torch.randint(3, max_len + 1, (rows,), generator=gen)
    T = int(lengths.max())
    labels = torch.full((rows, T), IGNORE, dtype=torch.long)
    for r, n in enumerate(lengths.tolist()):
        prompt = int(torch.randint(1, n - 1, (1,), generator=gen))
        labels[r, prompt:n] = torch.randint(0, V, (n - prompt,), generator=gen)
    return labels, lengths


def pack(values: torch.Tensor, lengths: torch.Tensor, order: list[int], gaps: list[int], fill):
    """Rows ``values[r, :lengths[r]]`` concatenated in ``order`` with ``gaps[k]`` padding entries after each;
    ``(packed (1, N, ...), sequence_ids (1, N), where (N,) the padded (row, position) or None)``."""
    parts, ids, where = [], [], []
    for r, gap in zip(order, gaps):
        n = int(lengths[r])
        parts.append(values[r, :n])
        ids += [r] * n
        where += [(r, p) for p in range(n)]
        pad = torch.full((gap, *values.shape[2:]), fill, dtype=values.dtype)
        parts.append(pad)
        ids += [-1] * gap
        where += [None] * gap
    return torch.cat(parts).unsqueeze(0), torch.tensor([ids]), where


class Layouts:
    """A padded batch of ``rows`` rows and the same batch packed in a shuffled order with padding gaps."""

    def __init__(self, rows: int, gen: torch.Generator):
        self.labels, self.lengths = make_rows(rows, gen)
        self.order = torch.randperm(rows, generator=gen).tolist()
        self.gaps = torch.randint(0, 3, (rows,), generator=gen).tolist()
        _, self.sequence_ids, self.where = pack(self.labels, self.lengths, self.order, self.gaps, IGNORE)

    def packed(self, values: torch.Tensor, fill=0):
        return pack(values, self.lengths, self.order, self.gaps, fill)[0]

    def hidden(self, gen: torch.Generator):
        """``(padded leaf (rows, T, D), packed leaf (1, N, D))`` with the same values on the rows' tokens."""
        h = torch.randn(*self.labels.shape, D, generator=gen)
        packed = self.packed(h, fill=0.0)
        packed = packed + torch.randn(packed.shape, generator=gen) * (self.sequence_ids < 0).unsqueeze(-1)
        return h.requires_grad_(), packed.detach().requires_grad_()

    def unpack_grad(self, packed_grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A packed gradient ``(1, N, D)`` moved to the padded layout; padding tokens must get none."""
        out = torch.zeros_like(like)
        for i, w in enumerate(self.where):
            if w is None:
                assert torch.all(packed_grad[0, i] == 0), "a padding token received a gradient"
            else:
                out[w] = packed_grad[0, i]
        return out


def _loss(name: str, options: dict):
    return get_method(name).loss(**({"seed": 7} if name == "sampo" else {}), **options)


def method_inputs(name: str, gen: torch.Generator, *, ref_form: str = "hidden", options: dict | None = None):
    """``(loss, weight leaf, padded (args, kwargs, leaves), packed (args, kwargs, leaves), layouts)`` for one
    method on random data; ``ref_form``: the reference as ``ref_hidden`` or as per-token ``ref_logps``;
    ``options``: the loss module's head options (``softcap``, ``temperature``, ``logit_scale``)."""
    spec = get_method(name)
    loss = _loss(name, options or {})
    b = 3
    rows = 2 * b if spec.paired else 4
    main = Layouts(rows, gen)
    weight = (torch.randn(V, D, generator=gen) / D**0.5).requires_grad_()
    ref_weight = torch.randn(V, D, generator=gen) / D**0.5
    h_pad, h_pack = main.hidden(gen)
    pad_kw, pack_kw = {}, {"sequence_ids": main.sequence_ids}
    pad_args, pack_args = [h_pad, weight, main.labels], [h_pack, weight, main.packed(main.labels, IGNORE)]
    if not spec.paired:
        desirable = torch.rand(rows, generator=gen) < 0.5
        pad_args.append(desirable)
        pack_args.append(desirable)
    if spec.reference is not None:
        r_pad, r_pack = main.hidden(gen)
        if ref_form == "hidden":
            pad_kw.update(ref_hidden=r_pad.detach(), ref_weight=ref_weight)
            pack_kw.update(ref_hidden=r_pack.detach(), ref_weight=ref_weight)
        else:
            pad_kw["ref_logps"] = linear_logprobs(r_pad.detach(), ref_weight, main.labels, shift=True)
            targets = packed_targets(pack_args[2], main.sequence_ids)
            pack_kw["ref_logps"] = linear_logprobs(r_pack.detach(), ref_weight, targets)
    for key in ("p_chosen", "p_rejected", "s_chosen", "s_rejected"):
        if key in spec.batch_keys:
            pad_kw[key] = pack_kw[key] = torch.rand(b, generator=gen)
    kl = None
    if spec.kl_rows:
        kl = Layouts(rows, gen)
        k_pad, k_pack = kl.hidden(gen)
        pad_kw.update(kl_hidden=k_pad.detach(), kl_labels=kl.labels)
        pack_kw.update(
            kl_hidden=k_pack.detach(), kl_labels=kl.packed(kl.labels, IGNORE), kl_sequence_ids=kl.sequence_ids
        )
        rk_pad, rk_pack = kl.hidden(gen)
        if ref_form == "hidden":
            pad_kw["ref_kl_hidden"], pack_kw["ref_kl_hidden"] = rk_pad.detach(), rk_pack.detach()
        else:
            pad_kw["ref_kl_logps"] = linear_logprobs(rk_pad.detach(), ref_weight, kl.labels, shift=True)
            targets = packed_targets(pack_kw["kl_labels"], kl.sequence_ids)
            pack_kw["ref_kl_logps"] = linear_logprobs(rk_pack.detach(), ref_weight, targets)
    if spec.sentences:
        ids, s = make_sentences(main.labels, gen)
        kl_ids, _ = make_sentences(kl.labels, gen)
        labels = torch.rand(s, generator=gen) < 0.5
        pad_kw.update(sentence_ids=ids, sentence_labels=labels, kl_sentence_ids=kl_ids)
        pack_kw.update(
            sentence_ids=main.packed(ids, -1), sentence_labels=labels, kl_sentence_ids=kl.packed(kl_ids, -1)
        )
    return loss, weight, (pad_args, pad_kw, h_pad), (pack_args, pack_kw, h_pack), main


def assert_packed_equals_padded(name: str, ref_form: str, seed: int, options: dict | None = None):
    gen = torch.Generator().manual_seed(seed)
    loss, weight, (pad_args, pad_kw, h_pad), (pack_args, pack_kw, h_pack), main = method_inputs(
        name, gen, ref_form=ref_form, options=options
    )
    padded = loss(*pad_args, **pad_kw)
    g_h, g_w = torch.autograd.grad(padded.loss, [h_pad, weight])
    fresh = _loss(name, options or {})  # the same SamPO stream
    packed = fresh(*pack_args, **pack_kw)
    p_h, p_w = torch.autograd.grad(packed.loss, [h_pack, weight])
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-6)
    assert set(packed.metrics) == set(padded.metrics)
    for key, value in padded.metrics.items():
        torch.testing.assert_close(packed.metrics[key], value, rtol=1e-5, atol=1e-6, msg=key)
    for got, want in ((p_w, g_w), (main.unpack_grad(p_h, h_pad), g_h)):
        scale = want.abs().max()  # relative to the gradient's size: fp32 sums in another order
        torch.testing.assert_close(got / scale, want / scale, rtol=1e-5, atol=1e-6)
    assert g_h.abs().sum() > 0 and g_w.abs().sum() > 0  # the comparison is not between zeros


@pytest.mark.parametrize("path", ["op", "fused"])
@pytest.mark.parametrize("name", list(METHODS))
def test_packed_loss_equals_padded(name, path):
    """Packed = padded on the op path and on the loss-fused path (which scores the packed row in place)."""
    assert_packed_equals_padded(name, "hidden", seed=list(METHODS).index(name), options={"path": path})


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.reference is not None])
def test_packed_per_token_reference_logps_equal_padded(name):
    assert_packed_equals_padded(name, "logps", seed=17)


@pytest.mark.parametrize("name", ["dpo", "kto", "factalign"])
def test_packed_equals_padded_with_head_options(name):
    """The lm-head's options (softcap, temperature, logit_scale) apply to packed rows as to padded ones."""
    assert_packed_equals_padded(
        name, "hidden", seed=5, options={"softcap": 3.0, "temperature": 0.7, "logit_scale": 2.5}
    )


def test_layout_targets_never_cross_a_sequence_boundary():
    ids = torch.tensor([[0, 0, 0, -1, 1, 1, 0, 2, -1]])
    labels = torch.tensor([[5, 6, 7, 9, 1, 2, 8, 3, 9]])
    # row 0 is tokens 0, 1, 2, 6 (5 6 7 8); row 1 is 4, 5 (1 2); row 2 is 7 (3)
    assert packed_targets(labels, ids).tolist() == [[6, 7, 8, -100, 2, -100, -100, -100, -100]]
    assert packed_targets(labels, ids, shift=False).tolist() == [[5, 6, 7, -100, 1, 2, 8, 3, -100]]
    layout = PackedLayout(ids)
    assert (layout.rows, layout.length) == (3, 4)
    assert layout.to_rows(labels, -100, "labels").tolist() == [
        [5, 6, 7, 8],
        [1, 2, -100, -100],
        [3, -100, -100, -100],
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sequence_ids": torch.zeros(2, 5, dtype=torch.long)}, "sequence_ids must be a \\(1, N\\)"),
        ({"sequence_ids": torch.zeros(1, 5)}, "sequence_ids must be an integer"),
        ({"sequence_ids": torch.full((1, 5), -2)}, "sequence_ids must be -1"),
        ({"sequence_ids": torch.zeros(1, 4, dtype=torch.long)}, "hidden must be \\(1, 4, D\\)"),
        ({"kl_sequence_ids": torch.zeros(1, 5, dtype=torch.long)}, "kl_sequence_ids lays out the KL rows"),
    ],
)
def test_malformed_packed_inputs_raise(kwargs, match):
    loss = get_method("simpo").loss()
    hidden, weight = torch.randn(1, 5, D), torch.randn(V, D)
    labels = torch.randint(0, V, (1, 5))
    with pytest.raises(ValueError, match=match):
        loss(hidden, weight, labels, **kwargs)


def test_unpack_token_logps_feeds_the_reductions():
    """The functional route: packed per-token log-probs -> per-row layout -> ``loss_from_token_logps``."""
    gen = torch.Generator().manual_seed(3)
    loss, weight, (pad_args, pad_kw, _), (pack_args, pack_kw, _), main = method_inputs(
        "sampo", gen, ref_form="logps"
    )
    padded_tok = linear_logprobs(pad_args[0], weight, main.labels, shift=True)
    targets = packed_targets(pack_args[2], main.sequence_ids)
    packed_tok, mask = unpack_token_logps(
        linear_logprobs(pack_args[0], weight, targets), pack_args[2], main.sequence_ids
    )
    ref, _ = unpack_token_logps(pack_kw["ref_logps"], pack_args[2], main.sequence_ids)
    torch.testing.assert_close(packed_tok, padded_tok, rtol=1e-6, atol=1e-6)
    assert torch.equal(mask, main.labels[:, 1:] != IGNORE)
    fresh = get_method("sampo").loss(seed=7)
    expected = loss.loss_from_token_logps(padded_tok, pad_kw["ref_logps"], main.labels[:, 1:] != IGNORE)
    torch.testing.assert_close(fresh.loss_from_token_logps(packed_tok, ref, mask).loss, expected.loss)


# ---------------------------------------------------------------------------------------------- models and trainer
FAMILIES = ("llama", "llama-tied", "gemma2-softcap", "qwen2", "mistral")


def _family_model(kind: str, vocab: int, tokenizer):
    t = transformers
    common = {
        "vocab_size": vocab,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    build = {
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**common)),
        "llama-tied": lambda: t.LlamaForCausalLM(t.LlamaConfig(**common, tie_word_embeddings=True)),
        "gemma2-softcap": lambda: t.Gemma2ForCausalLM(
            t.Gemma2Config(**common, head_dim=8, final_logit_softcapping=2.0)
        ),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**common)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(**common)),
    }
    torch.manual_seed(0)
    model = build[kind]().float()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)  # logits large enough for the softcap to matter
    return model


def _trainer(tmp_path, method: str, family: str, **options):
    from prefuse.alignment.data import build_tokenizer, load_preference_data
    from prefuse.alignment.trainer import PreferenceConfig, PreferenceTrainer

    tokenizer = build_tokenizer()
    config = PreferenceConfig(
        output_dir=str(tmp_path / "out"), method=method, beta=0.1, loss_backend="torch",
        per_device_train_batch_size=4, max_length=48, max_prompt_length=24, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True, seed=7, **options,
    )  # fmt: skip
    data = load_preference_data("paired" if METHODS[method].paired else "unpaired", limit=4)
    model = _family_model(family, len(tokenizer), tokenizer)
    return PreferenceTrainer(model, args=config, train_dataset=data, processing_class=tokenizer)


def _loss_and_grads(trainer, batch):
    model = trainer.model
    model.zero_grad()
    out = trainer.preference_loss(model, batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


CASES = [
    pytest.param(
        method, family, "varlen", marks=() if family == "llama" or method == "dpo" else pytest.mark.slow
    )
    for method in METHODS
    for family in FAMILIES
] + [pytest.param(method, "llama", "model", marks=pytest.mark.slow) for method in METHODS]


@pytest.mark.parametrize(("method", "family", "attention"), CASES)
def test_packed_batch_equals_padded_through_the_model(tmp_path, method, family, attention):
    """The whole step on a model: packed (position ids, no attention mask) equals padded -- loss, metrics and
    every parameter's gradient, float32. The packed row attends per sequence (``varlen``, what padding_free=True
    uses) or through the model's own block-causal mask (``model``). The padded batch is padded to a multiple of
    64 columns, wider than its longest row (SamPO's sample must not depend on the padded width)."""
    trainer = _trainer(tmp_path, method, family)
    features = [trainer.train_dataset[i] for i in range(4)]
    packed = pack_batch(trainer.data_collator(features))
    padded = dataclasses.replace(trainer.data_collator, pad_to_multiple_of=64)(features)
    assert padded["input_ids"].shape[1] == 64 and padded["attention_mask"][:, -1].sum() == 0
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    sampo = hasattr(trainer.loss_module, "generator_state")
    out_pad, grads_pad = _loss_and_grads(trainer, padded)
    if sampo:  # the packed batch draws from the same point of the stream
        trainer.loss_module._generator = None
    if attention == "varlen":  # what padding_free=True switches to: each sequence attends alone
        for m in (trainer.model, trainer.ref_model):
            if m is not None:
                use_varlen_attention(m)
    out_pack, grads_pack = _loss_and_grads(trainer, packed)
    torch.testing.assert_close(out_pack.loss, out_pad.loss, rtol=2e-5, atol=2e-6)
    for key, value in out_pad.metrics.items():
        torch.testing.assert_close(out_pack.metrics[key], value, rtol=2e-5, atol=2e-6, msg=key)
    assert grads_pad.keys() == grads_pack.keys() and grads_pad
    for name, g in grads_pad.items():
        scale = g.abs().max().clamp(min=1e-12)  # relative to the gradient's size: fp32 sums in another order
        torch.testing.assert_close(
            grads_pack[name] / scale, g / scale, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_padding_free_trainer_trains(tmp_path, method):
    """``PreferenceConfig(padding_free=True)`` packs every batch and a short run trains (finite losses)."""
    trainer = _trainer(tmp_path, method, "llama", padding_free=True, max_steps=2, logging_steps=1)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 1 and "sequence_ids" in batch
    result = trainer.train()
    assert math.isfinite(result.training_loss)


@pytest.mark.parametrize(("option", "expected"), [("varlen", "prefuse_varlen_sdpa"), ("model", "sdpa")])
def test_padding_free_switches_the_attention(tmp_path, option, expected):
    """padding_free=True runs the policy and the reference per sequence unless packed_attention='model'."""
    trainer = _trainer(tmp_path, "dpo", "llama", padding_free=True, packed_attention=option)
    assert trainer.model.config._attn_implementation == expected
    assert trainer.ref_model.config._attn_implementation == expected


def test_packed_attention_is_checked(tmp_path):
    from prefuse.alignment.trainer import PreferenceConfig

    with pytest.raises(ValueError, match="packed_attention must be one of"):
        PreferenceConfig(output_dir=str(tmp_path), packed_attention="flash", use_cpu=True, report_to=[])


def test_padding_free_needs_the_fused_head(tmp_path):
    from prefuse.alignment.trainer import PreferenceConfig

    with pytest.raises(ValueError, match="padding_free"):
        PreferenceConfig(
            output_dir=str(tmp_path), padding_free=True, head="naive", use_cpu=True, report_to=[]
        )


def _padded_batch(device="cpu"):
    return {
        "input_ids": torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]], device=device),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], device=device),
        "labels": torch.tensor([[-100, 6, 7, -100], [-100, 9, -100, -100]], device=device),
        "ref_logps": torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]], device=device),
        "desirable": torch.tensor([True, False], device=device),
    }


def test_pack_batch_layout():
    """Position ids restart per sequence, padding is gone, per-token reference values move with their token."""
    batch = _padded_batch()
    packed = pack_batch(batch)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert packed["sequence_ids"].tolist() == [[0, 0, 0, 1, 1]]
    assert packed["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert packed["ref_logps"].tolist() == [[-1.0, -2.0, 0.0, -3.0, 0.0]]
    assert torch.equal(packed["desirable"], batch["desirable"]) and "attention_mask" not in packed
    with pytest.raises(ValueError, match="right padding"):
        pack_batch({**batch, "attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])})


@pytest.mark.gpu
def test_pack_batch_packs_on_the_batch_device():
    """A batch already on the GPU (the TRL drop-ins pack after ``_prepare_inputs``) is packed there."""
    expected = pack_batch(_padded_batch())
    packed = pack_batch(_padded_batch("cuda"))
    assert packed.keys() == expected.keys()
    for key, value in expected.items():
        assert packed[key].device.type == "cuda" and torch.equal(packed[key].cpu(), value), key


def test_token_budget_batches():
    lengths = [5, 3, 9, 2, 12, 4]
    sampler = TokenBudgetBatchSampler(lengths, 10, shuffle=False)
    assert list(sampler) == [[0, 1], [2], [3], [4], [5]]
    shuffled = list(TokenBudgetBatchSampler(lengths, 10, seed=1))
    assert sorted(i for b in shuffled for i in b) == list(range(6))
    assert all(sum(lengths[i] for i in b) <= 10 or len(b) == 1 for b in shuffled)
    with pytest.raises(ValueError, match="max_tokens"):
        TokenBudgetBatchSampler(lengths, 0)


@pytest.mark.slow
def test_token_budget_batches_in_training(tmp_path):
    """``max_tokens_per_batch``: every training batch holds at most the budget (or one example) and trains."""
    trainer = _trainer(tmp_path, "dpo", "llama", padding_free=True, max_tokens_per_batch=300, max_steps=2)
    batches = list(trainer.get_train_dataloader())
    assert len(batches) > 1 and all(b["input_ids"].shape[0] == 1 for b in batches)
    assert all(b["input_ids"].shape[1] <= 300 or int(b["sequence_ids"].max()) == 1 for b in batches)
    assert sum(int(b["sequence_ids"].max()) + 1 for b in batches) == 2 * len(trainer.train_dataset)
    assert math.isfinite(trainer.train().training_loss)


def test_token_budget_needs_padding_free(tmp_path):
    from prefuse.alignment.trainer import PreferenceConfig

    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        PreferenceConfig(output_dir=str(tmp_path), max_tokens_per_batch=64, use_cpu=True, report_to=[])


@pytest.mark.slow  # a subprocess that trains and compares the heads
def test_cli_padding_free(tmp_path):
    import sys

    done = processes.run(
        [sys.executable, "-m", "prefuse.alignment", "--method", "factalign", "--steps", "2", "--log-every", "1",
         "--batch-size", "2", "--vocab-size", "2048", "--max-length", "48", "--compare-steps", "1",
         "--padding-free", "--output-dir", str(tmp_path / "out")],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 2/2" in done.stdout and "1 test rows" in done.stdout  # one packed row
    assert "attention prefuse_varlen_sdpa (each sequence alone)" in done.stdout


def test_benchmark_padding_fraction_and_lengths():
    from benchmarks.packing import generated_lengths, padding_fraction

    # one batch of 1 pair: rows of 2 + 3 = 5 and 2 + 1 = 3 tokens, padded to 5: 2 of 10 slots are padding
    assert padding_fraction([(2, 3, 1)], 1) == pytest.approx(0.2)
    lengths = generated_lengths(64, max_length=128, seed=1)
    assert lengths == generated_lengths(64, max_length=128, seed=1)
    assert all(p <= 64 and p + max(c, r) <= 128 and min(p, c, r) >= 1 for p, c, r in lengths)


@pytest.mark.slow  # tokenises the bundled data and times tiny steps
def test_benchmark_section_runs(tmp_path):
    from benchmarks.packing import main

    main(["--pairs", "8", "--pairs-per-batch", "2", "--batches", "1", "--max-length", "64", "--hidden", "16",
          "--layers", "1", "--repeats", "2", "--out", str(tmp_path)])  # fmt: skip
    text = (tmp_path / "packing.md").read_text()
    assert "| bundled data | 16 |" in text and "| UltraFeedback-like (generated) | 16 |" in text
    records = json.loads((tmp_path / "packing.json").read_text())["records"]
    assert [sorted(r["seconds"]) for r in records] == [["packed", "packed_varlen", "padded"]] * 2
    assert all(len(times) == 2 for r in records for times in r["seconds"].values())
    ratios = [r["predicted_llama3_8b_flop_ratio"] for r in records]
    assert 0 < ratios[0] < 1 and 0 < ratios[1] <= 1  # the bundled rows carry padding


def test_predicted_flop_ratio():
    """The FLOP model: a batch without padding costs the same packed; one row of 2 slots padded to 4 costs the
    padded slots' projections and the square of the padded row's attention."""
    from benchmarks.packing import body_flops, predicted_ratio

    shapes = {"hidden": 2, "layers": 1, "intermediate": 3, "kv_dim": 1}
    linear = 2 * (2 * 4 + 2 * 2 + 3 * 6)  # per token: 2·(2d² + 2·d·kv + 3·d·f) with d=2, kv=1, f=3
    assert body_flops([2], None, **shapes) == linear * 2 + 2 * 4 * 2
    assert body_flops([2], 4, **shapes) == linear * 4 + 2 * 16 * 2
    assert predicted_ratio([(3, 5, 5)] * 4, 4) == pytest.approx(1.0)
    assert predicted_ratio([(3, 5, 1)], 1) < 1.0
