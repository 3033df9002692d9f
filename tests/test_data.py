"""``prefuse.alignment.data``: bundled data, the locally trained tokenizer, tokenisation and collators."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from prefuse.alignment.data import (
    DATA_FILE,
    PairedCollator,
    UnpairedCollator,
    build_tokenizer,
    collator_for,
    encode_example,
    load_preference_data,
    read_records,
    synthetic,
    tokenize_preference_data,
)
from prefuse.alignment.data.processing import compact_sentences, truncate, unpair


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# ---------------------------------------------------------------------------------------------- bundled data
def test_bundled_file_is_the_generators_output():
    assert DATA_FILE.read_text(encoding="utf-8") == synthetic.render(synthetic.generate())


def test_bundled_records_carry_every_methods_fields():
    records = read_records()
    assert (
        sum(r["split"] == "train" for r in records) == 320
        and sum(r["split"] == "test" for r in records) == 32
    )
    for r in records:
        assert r["chosen"] != r["rejected"]
        for side in ("chosen", "rejected"):
            assert len(r[f"{side}_sentences"]) == len(r[f"{side}_sentence_labels"]) > 0
            start = 0
            for sentence in r[f"{side}_sentences"]:
                start = r[side].index(sentence, start) + len(sentence)
        assert all(r["chosen_sentence_labels"])  # chosen answers state only supported facts
        assert 0 <= r["p_rejected"] < 0.5 < r["p_chosen"] <= 1 and r["s_rejected"] < 0 < r["s_chosen"]
    paired = load_preference_data("paired")
    assert (
        paired.column_names
        == ["prompt", "chosen", "rejected", "p_chosen", "p_rejected", "s_chosen", "s_rejected"]
        and len(paired) == 320
    )
    unpaired = load_preference_data("unpaired", "test")
    assert len(unpaired) == 64 and unpaired["label"][:2] == [True, False]
    assert set(unpaired.column_names) == {"prompt", "completion", "label", "sentences", "sentence_labels"}
    with pytest.raises(ValueError, match="view"):
        load_preference_data("triples")


# ---------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_is_trained_locally_and_deterministic(tok):
    again = build_tokenizer()
    assert tok.get_vocab() == again.get_vocab() and len(tok) == 512
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "Sure! The capital of Kalo is Venmi."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.convert_tokens_to_ids("<|assistant|>") != tok.unk_token_id
    small = build_tokenizer(["aaa bbb"] * 10, vocab_size=300, chat_template=None)
    assert small.chat_template is None and len(small) <= 300


def test_chat_template_split_into_prompt_and_completion(tok):
    enc = encode_example(tok, "What is 7 plus 2?", "Sure! 7 plus 2 is 9.")
    full = tok.apply_chat_template(
        [
            {"role": "user", "content": "What is 7 plus 2?"},
            {"role": "assistant", "content": "Sure! 7 plus 2 is 9."},
        ],
        tokenize=False,
    )
    assert tok.decode(enc["prompt_input_ids"] + enc["completion_input_ids"]) == full
    assert enc["prompt_input_ids"][0] == tok.bos_token_id
    assert tok.decode(enc["prompt_input_ids"]).endswith("<|assistant|>\n")
    assert enc["completion_input_ids"][-1] == tok.eos_token_id
    # a conversation as the prompt (system + user), and without the template
    conv = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}]
    enc = encode_example(tok, conv, "Hello.")
    assert tok.decode(enc["prompt_input_ids"]).count("<|") == 3
    plain = encode_example(tok, "Hi?", "Hello.", use_chat_template=False)
    assert tok.decode(plain["prompt_input_ids"]) == "Hi?"
    assert tok.decode(plain["completion_input_ids"]) == "Hello.</s>"


# ---------------------------------------------------------------------------------------------- sentences
def _sentence_texts(tok, enc):
    texts = {}
    for token, sid in zip(enc["completion_input_ids"], enc["completion_sentence_ids"]):
        if sid >= 0:
            texts[sid] = texts.get(sid, "") + tok.decode([token])
    return [texts[s].strip() for s in sorted(texts)]


def test_sentence_ids_follow_the_offset_mapping(tok):
    answer = "Sure! The capital of Kalo is Venmi. Venmi lies near a green lake. Hope this helps."
    sentences = ["The capital of Kalo is Venmi.", "Venmi lies near a green lake."]
    enc = encode_example(
        tok, "Tell me about Kalo.", answer, sentences=sentences, sentence_labels=[True, False]
    )
    assert _sentence_texts(tok, enc) == sentences
    assert enc["sentence_labels"] == [True, False]
    ids = enc["completion_sentence_ids"]
    assert ids[0] == -1 and ids[-1] == -1  # the opener and the end-of-turn are outside every sentence
    assert sorted(set(ids)) == [-1, 0, 1]
    with pytest.raises(ValueError, match="not a substring"):
        encode_example(tok, "Q?", answer, sentences=["Nothing like this."], sentence_labels=[True])


@pytest.mark.parametrize("partial", ["drop", "keep"])
def test_truncation_never_leaves_a_wrong_sentence_id(tok, partial):
    answer = "Sure! The capital of Kalo is Venmi. Venmi lies near a green lake. A cat has 4 legs."
    sentences = ["The capital of Kalo is Venmi.", "Venmi lies near a green lake.", "A cat has 4 legs."]
    labels = [True, False, True]
    full = encode_example(tok, "Q?", answer, sentences=sentences, sentence_labels=labels)
    prompt_len = len(full["prompt_input_ids"])
    second = [i for i, s in enumerate(full["completion_sentence_ids"]) if s == 1]
    cut = second[len(second) // 2]  # keep the first half of sentence 1
    enc = encode_example(
        tok,
        "Q?",
        answer,
        sentences=sentences,
        sentence_labels=labels,
        max_length=prompt_len + cut,
        partial_sentences=partial,
    )
    assert len(enc["completion_input_ids"]) == cut
    ids = enc["completion_sentence_ids"]
    assert ids[: second[0]] == full["completion_sentence_ids"][: second[0]]  # sentence 0 intact
    if partial == "drop":
        assert enc["sentence_labels"] == [True] and set(ids) == {-1, 0}
        assert all(s == -1 for s in ids[second[0] :])
    else:  # the cut sentence keeps its surviving tokens, its id and label
        assert enc["sentence_labels"] == [True, False] and ids[second[0] :] == [1] * (cut - second[0])
    # every token carrying an id is part of that sentence's text
    kept = [s for s, k in zip(sentences, [True, partial == "keep"]) if k]
    for sid, text in enumerate(_sentence_texts(tok, enc)):
        assert kept[sid].startswith(text)


def test_truncation_rules():
    assert truncate(list(range(10)), list(range(100, 110)), max_prompt_length=4) == (
        [6, 7, 8, 9],
        list(range(100, 110)),
    )
    assert truncate([1, 2, 3], [4, 5, 6, 7], max_length=5) == ([1, 2, 3], [4, 5])
    assert truncate([1, 2, 3, 4, 5, 6], [7, 8], max_length=4) == ([4, 5, 6], [7])  # one completion token left
    # sentence 1 lost all its tokens, sentence 2 one of its three
    assert compact_sentences([-1, 2, 2, -1, 0], [True, False, True], [1, 4, 3], "drop") == (
        [-1, -1, -1, -1, 0],
        [True],
    )
    assert compact_sentences([-1, 2, 2, -1, 0], [True, False, True], [1, 4, 3], "keep") == (
        [-1, 1, 1, -1, 0],
        [True, True],
    )
    assert compact_sentences([-1, 2, 2, -1, 0], [True, False, True], [1, 4, 2], "drop") == (
        [-1, 1, 1, -1, 0],
        [True, True],
    )


def test_tokenize_datasets(tok):
    paired = tokenize_preference_data(
        load_preference_data("paired", limit=8), tok, max_length=40, max_prompt_length=16
    )
    assert set(paired.column_names) == {
        "prompt_input_ids",
        "chosen_input_ids",
        "rejected_input_ids",
        "p_chosen",
        "p_rejected",
        "s_chosen",
        "s_rejected",
    }
    for ex in paired:
        assert len(ex["prompt_input_ids"]) <= 16
        assert (
            len(ex["prompt_input_ids"]) + max(len(ex["chosen_input_ids"]), len(ex["rejected_input_ids"]))
            <= 40
        )
    unpaired = tokenize_preference_data(load_preference_data("unpaired", limit=4), tok)
    assert "completion_sentence_ids" in unpaired.column_names and len(unpaired) == 8
    no_sent = tokenize_preference_data(load_preference_data("unpaired", limit=4), tok, sentences=False)
    assert "completion_sentence_ids" not in no_sent.column_names
    kto = unpair(load_preference_data("paired", limit=3))
    assert (
        kto["label"] == [True, False] * 3
        and kto["completion"][1] == load_preference_data("paired")["rejected"][0]
    )


# ---------------------------------------------------------------------------------------------- collators
def test_paired_collator(tok):
    data = tokenize_preference_data(load_preference_data("paired", limit=3), tok)
    batch = collator_for("sppo", tok)([data[i] for i in range(3)])
    assert isinstance(collator_for("dpo", tok), PairedCollator)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == labels.shape == mask.shape and ids.shape[0] == 6
    for i in range(3):
        ex = data[i]
        p = len(ex["prompt_input_ids"])
        for row, completion in ((i, ex["chosen_input_ids"]), (i + 3, ex["rejected_input_ids"])):
            n = p + len(completion)
            assert ids[row, :n].tolist() == ex["prompt_input_ids"] + completion
            assert (labels[row, :p] == -100).all() and labels[row, p:n].tolist() == completion
            assert (labels[row, n:] == -100).all() and (ids[row, n:] == tok.pad_token_id).all()
            assert mask[row].sum() == n
    torch.testing.assert_close(batch["p_chosen"], torch.tensor(data["p_chosen"][:3]))
    assert batch["s_rejected"].dtype == torch.float32


def test_paired_collator_places_precomputed_logps_where_the_op_does(tok):
    data = tokenize_preference_data(load_preference_data("paired", limit=2), tok)
    features = []
    for ex in data:
        ex = dict(ex)
        ex["ref_chosen_logps"] = [-(k + 1.0) for k in range(len(ex["chosen_input_ids"]))]
        ex["ref_rejected_logps"] = [-(k + 0.5) for k in range(len(ex["rejected_input_ids"]))]
        features.append(ex)
    batch = PairedCollator(tok.pad_token_id, pad_to_multiple_of=8)(features)
    assert batch["input_ids"].shape[1] % 8 == 0
    ref, scored = batch["ref_logps"], batch["labels"][:, 1:] != -100
    assert ref.shape == scored.shape
    assert ref[0][scored[0]].tolist() == features[0]["ref_chosen_logps"]
    assert ref[3][scored[3]].tolist() == features[1]["ref_rejected_logps"]
    assert (ref[~scored] == 0).all()


def test_unpaired_collator_kl_rows_and_global_sentence_ids(tok):
    data = tokenize_preference_data(load_preference_data("unpaired", limit=3), tok)
    features = [data[i] for i in range(6)]
    collate = collator_for("factalign", tok)
    assert isinstance(collate, UnpairedCollator) and collate.sentences
    batch = collate(features)
    assert batch["desirable"].tolist() == [True, False] * 3
    # sentence ids numbered over the batch, labels concatenated
    expected_labels = [label for f in features for label in f["sentence_labels"]]
    assert batch["sentence_labels"].tolist() == expected_labels
    offset = 0
    for i, f in enumerate(features):
        p = len(f["prompt_input_ids"])
        row = batch["sentence_ids"][i, p : p + len(f["completion_input_ids"])].tolist()
        assert row == [s + offset if s >= 0 else -1 for s in f["completion_sentence_ids"]]
        assert (batch["sentence_ids"][i, :p] == -1).all()
        offset += len(f["sentence_labels"])
    # KL rows: completion i after the next *different* prompt (rows 0/1 share a prompt: row 0 pairs with row 2)
    partners = [2, 2, 4, 4, 0, 0]
    kl_offset = 0
    for i, j in enumerate(partners):
        prompt, completion = features[j]["prompt_input_ids"], features[i]["completion_input_ids"]
        n = len(prompt) + len(completion)
        assert batch["kl_input_ids"][i, :n].tolist() == prompt + completion
        assert batch["kl_labels"][i, len(prompt) : n].tolist() == completion
        kl_ids = batch["kl_sentence_ids"][i, len(prompt) : n].tolist()
        # the KL rows' sentences are numbered on their own, 0..S_kl-1 over the KL rows
        assert kl_ids == [s + kl_offset if s >= 0 else -1 for s in features[i]["completion_sentence_ids"]]
        kl_offset += len(features[i]["sentence_labels"])
    assert batch["kl_sentence_ids"].max() == kl_offset - 1
    # KTO: no sentence ids
    kto = collator_for("kto", tok)(features)
    assert "sentence_ids" not in kto and "kl_input_ids" in kto
    with pytest.raises(ValueError, match="sentence ids requested"):
        UnpairedCollator(tok.pad_token_id, sentences=True)(
            [{k: v for k, v in f.items() if k != "completion_sentence_ids"} for f in features]
        )


def test_unpaired_collator_truncates_kl_rows_without_wrong_sentence_ids(tok):
    data = tokenize_preference_data(load_preference_data("unpaired", limit=6), tok)
    features = [data[i] for i in range(12)]
    longest = max(len(f["prompt_input_ids"]) + len(f["completion_input_ids"]) for f in features)
    batch = UnpairedCollator(tok.pad_token_id, max_length=longest - 16)(features)
    assert batch["kl_input_ids"].shape[1] <= longest - 16
    ids, labels = batch["kl_sentence_ids"], batch["kl_labels"]
    dropped, offset = 0, 0
    for i, f in enumerate(features):
        kept = ids[i][ids[i] >= 0]
        assert (labels[i][ids[i] >= 0] != -100).all()  # ids only on completion tokens
        own = [s for s in f["completion_sentence_ids"] if s >= 0]
        # a surviving sentence keeps all its tokens (drop mode), in order; the cut ones are gone
        survivors = kept.unique().tolist()
        assert survivors == list(range(offset, offset + len(survivors)))
        for k, s in enumerate(survivors):
            assert (kept == s).sum() == own.count(k)
        offset += len(survivors)
        dropped += len(f["sentence_labels"]) - len(survivors)
    assert dropped > 0
