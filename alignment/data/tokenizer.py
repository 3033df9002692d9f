"""A byte-level BPE tokenizer trained locally on the bundled data, with a chat template (no downloads).

``build_tokenizer()`` trains it in well under a second with the ``tokenizers`` library and wraps it in a
``transformers.PreTrainedTokenizerFast`` with special tokens and a chat template (TuluV2-like, as the KTO seed
uses)::

    <s><|user|>
    What is 7 plus 2?</s>
    <|assistant|>
    7 plus 2 is 9.</s>

The prompt with ``add_generation_prompt=True`` is a prefix of the full conversation, so the completion's
text (content + ``</s>``) is the difference of the two renderings.
"""

from __future__ import annotations

from collections.abc import Iterable

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS) + ROLE_TOKENS

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n<|assistant|>\n' }}{% endif %}"
)


def default_texts() -> list[str]:
    """Every prompt and answer of the bundled data set (the tokenizer's training corpus)."""
    from prefuse.alignment.data.bundled import read_records

    texts = []
    for record in read_records():
        texts += [record["prompt"], record["chosen"], record["rejected"]]
    return texts


def build_tokenizer(
    texts: Iterable[str] | None = None, *, vocab_size: int = 512, chat_template: str | None = CHAT_TEMPLATE
):
    """Train a byte-level BPE on ``texts`` (default: the bundled data) and return a fast HF tokenizer.

    Deterministic for given texts. ``vocab_size`` counts the 256 byte symbols and the special tokens
    (``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, then the role tokens); it is an upper bound when the corpus
    has fewer merges. ``chat_template=None`` leaves the template unset.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
    texts = list(default_texts() if texts is None else texts)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="right"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(ROLE_TOKENS)})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
