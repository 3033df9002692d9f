"""Tokenisation of preference data with ``datasets.map``: chat templates, truncation, sentence ids.

``tokenize_preference_data(dataset, tokenizer, ...)`` turns text columns into token-id columns (TRL's names):

- paired data (``prompt``, ``chosen``, ``rejected``) -> ``prompt_input_ids``, ``chosen_input_ids``,
  ``rejected_input_ids``; numeric columns (``p_chosen`` ... ``s_rejected``) pass through;
- unpaired data (``prompt``, ``completion``, ``label``) -> ``prompt_input_ids``, ``completion_input_ids``,
  ``label``; with ``sentences`` / ``sentence_labels`` (FactAlign) also ``completion_sentence_ids`` (one id per
  completion token, ``-1`` outside every sentence, sentences numbered ``0..n-1`` within the example) and the
  labels of the sentences that survived truncation.

Text: ``prompt`` is a string (one user message) or a list of chat messages; a completion is a string (one
assistant message) or a list of messages. With a chat template (the default when the tokenizer has one) the
prompt is rendered with ``add_generation_prompt=True`` and the completion is what the full conversation adds
to it (content plus the template's end-of-turn); prompt and completion are tokenised separately, so their
tokens never merge across the boundary. Without a template: ``prompt`` with the tokenizer's special tokens,
``completion + eos``.

Sentence ids: each sentence must be a verbatim substring of the completion's content (located left to right).
A token belongs to the sentence holding its first non-whitespace character; a whitespace-only token belongs
to the sentence whose span contains it, else to none (-1).

Truncation (``max_prompt_length``, ``max_length``): the prompt keeps its *last* ``max_prompt_length`` tokens;
then the completion keeps its *first* tokens so that prompt + completion fit ``max_length`` (if the prompt
alone leaves no room, it is cut further from the left so that one completion token remains). A sentence that
loses tokens to truncation is **dropped** by default (``partial_sentences="drop"``: its surviving tokens become
``-1`` and its label is removed), because its label judges the whole sentence; ``"keep"`` keeps it, scored on
its surviving tokens. A sentence with no surviving token is always dropped. Either way no token ever carries
the id of a sentence it is not part of, and the ids are renumbered ``0..n-1`` in order.

Bad rows: every row is checked before it is tokenised, and a malformed one raises ``ValueError`` naming its
index in the data set and the field (``row 3, field 'label': ...``): a missing (None) field, a prompt or
completion that is not a non-empty string or list of chat messages, a ``label`` that is not a bool, win rates
(``p_chosen``/``p_rejected``) that are not finite numbers in [0, 1], scores (``s_chosen``/``s_rejected``) that
are not finite, sentences that are not strings found in the completion, or a ``sentence_labels`` list that is
not one bool per sentence.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

PARTIAL_SENTENCES = ("drop", "keep")
WIN_RATE_COLUMNS = ("p_chosen", "p_rejected")
SCORE_COLUMNS = ("s_chosen", "s_rejected")


# ---------------------------------------------------------------------------------------------- row checks
def row_error(index: int | str | None, field: str, message: str) -> ValueError:
    """``ValueError("row {index}, field {field!r}: message")`` (``index`` None: one example, no row)."""
    if index is None:
        where = "example"
    elif isinstance(index, str):
        where = index
    else:
        where = f"row {index}"
    return ValueError(f"{where}, field {field!r}: {message}")


def check_text(value, field: str, index=None) -> None:
    """A prompt / completion: a non-blank string or a non-empty list of chat messages (dicts with a string
    ``content``; the last one non-blank)."""
    if value is None:
        raise row_error(index, field, "missing (None)")
    if isinstance(value, str):
        if not value.strip():
            raise row_error(index, field, "empty string")
        return
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        if len(value) == 0:
            raise row_error(index, field, "empty list of chat messages")
        for j, message in enumerate(value):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise row_error(
                    index, field, f"chat message {j} is not a dict with a string 'content': {message!r}"
                )
            if "role" in message and not isinstance(message["role"], str):
                raise row_error(index, field, f"chat message {j} has a non-string role {message['role']!r}")
        if not value[-1]["content"].strip():
            raise row_error(index, field, "the last chat message's content is empty")
        return
    raise row_error(
        index,
        field,
        f"expected a non-empty string or a list of chat messages, got {type(value).__name__} {value!r}",
    )


def is_bool(value) -> bool:
    """A Python or NumPy bool (not an int)."""
    return isinstance(value, bool) or type(value).__name__ == "bool_"


def check_bool(value, field: str, index=None) -> None:
    if value is None:
        raise row_error(index, field, "missing (None)")
    if not is_bool(value):
        raise row_error(index, field, f"expected a bool, got {type(value).__name__} {value!r}")


def check_number(value, field: str, index=None, *, unit_interval: bool = False) -> None:
    """A finite real number (not a bool), in [0, 1] with ``unit_interval``."""
    if value is None:
        raise row_error(index, field, "missing (None)")
    if is_bool(value) or not isinstance(value, numbers.Real):
        raise row_error(index, field, f"expected a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(float(value)):
        raise row_error(index, field, f"must be finite, got {value!r}")
    if unit_interval and not 0.0 <= float(value) <= 1.0:
        raise row_error(index, field, f"a win rate must lie in [0, 1], got {value!r}")


def check_sentences(sentences, sentence_labels, index=None) -> None:
    """FactAlign's ``sentences`` (strings) and ``sentence_labels`` (one bool per sentence)."""
    for field, value in (("sentences", sentences), ("sentence_labels", sentence_labels)):
        if value is None:
            raise row_error(index, field, "missing (None)")
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise row_error(index, field, f"expected a list, got {type(value).__name__} {value!r}")
    for j, sentence in enumerate(sentences):
        if not isinstance(sentence, str) or not sentence:
            raise row_error(index, "sentences", f"sentence {j} is not a non-empty string: {sentence!r}")
    if len(sentence_labels) != len(sentences):
        raise row_error(
            index,
            "sentence_labels",
            f"{len(sentence_labels)} labels for {len(sentences)} sentences (one label per sentence)",
        )
    for j, label in enumerate(sentence_labels):
        if not is_bool(label):
            raise row_error(index, "sentence_labels", f"label {j} is not a bool: {label!r}")


def check_row(example: dict, index, *, paired: bool, sentences: bool = False) -> None:
    """The text row ``example`` (at ``index``) before tokenisation (module docstring, "Bad rows")."""
    sides = ("chosen", "rejected") if paired else ("completion",)
    for field in ("prompt", *sides):
        check_text(example.get(field), field, index)
    if not paired:
        check_bool(example.get("label"), "label", index)
    if sentences:
        check_sentences(example.get("sentences"), example.get("sentence_labels"), index)
    for field in WIN_RATE_COLUMNS:
        if field in example:
            check_number(example[field], field, index, unit_interval=True)
    for field in SCORE_COLUMNS:
        if field in example:
            check_number(example[field], field, index)


# ---------------------------------------------------------------------------------------------- rendering
def _messages(value, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, Sequence) and all(isinstance(m, dict) and "content" in m for m in value):
        return [dict(m) for m in value]
    raise ValueError(f"expected a string or a list of chat messages, got {type(value).__name__}")


def _content(value) -> str:
    """The text that sentences are located in: the string, or the last message's content."""
    return value if isinstance(value, str) else value[-1]["content"]


def render(tokenizer, prompt, completion, *, use_chat_template: bool | None = None) -> tuple[str, str, int]:
    """``(prompt_text, completion_text, content_offset)``: where the completion's content starts in its text."""
    if use_chat_template is None:
        use_chat_template = getattr(tokenizer, "chat_template", None) is not None
    if use_chat_template:
        prompt_messages = _messages(prompt, "user")
        prompt_text = tokenizer.apply_chat_template(
            prompt_messages, add_generation_prompt=True, tokenize=False
        )
        full = tokenizer.apply_chat_template(
            prompt_messages + _messages(completion, "assistant"), tokenize=False
        )
        if not full.startswith(prompt_text):
            raise ValueError(
                "the chat template does not render the prompt (with add_generation_prompt=True) as a prefix of the "
                "full conversation; prompt and completion cannot be split"
            )
        completion_text = full[len(prompt_text) :]
    else:
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError(
                "chat messages need a tokenizer with a chat template (or use_chat_template=True)"
            )
        prompt_text, completion_text = prompt, completion + (tokenizer.eos_token or "")
    content = _content(completion)
    offset = completion_text.find(content)
    return prompt_text, completion_text, offset


# ---------------------------------------------------------------------------------------------- sentences
def sentence_spans(content: str, sentences: Sequence[str], offset: int = 0) -> list[tuple[int, int]]:
    """Character spans of ``sentences`` located left to right in ``content`` (shifted by ``offset``)."""
    spans, start = [], 0
    for sentence in sentences:
        at = content.find(sentence, start) if sentence else -1
        if at < 0:
            raise ValueError(
                f"sentence {sentence!r} is not a substring of the completion (after the previous one)"
            )
        spans.append((offset + at, offset + at + len(sentence)))
        start = at + len(sentence)
    return spans


def token_sentence_ids(
    text: str, offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[int]:
    """One sentence index per token (``-1`` outside): the sentence holding the token's first non-space char."""
    ids = []
    for a, b in offsets:
        first = next((i for i in range(a, b) if not text[i].isspace()), None)
        found = -1
        for s, (lo, hi) in enumerate(spans):
            if (lo <= first < hi) if first is not None else (lo <= a and b <= hi and a < b):
                found = s
                break
        ids.append(found)
    return ids


def compact_sentences(
    ids: Sequence[int], labels: Sequence[bool], full_counts: Sequence[int] | None, partial: str = "drop"
) -> tuple[list[int], list[bool]]:
    """Renumber surviving sentences ``0..n-1``; drop those cut by truncation (``partial="drop"``) or empty.

    ``full_counts[s]`` is sentence ``s``'s token count before truncation (None: nothing was truncated).
    """
    if partial not in PARTIAL_SENTENCES:
        raise ValueError(f"partial_sentences must be one of {PARTIAL_SENTENCES}, got {partial!r}")
    counts = [0] * len(labels)
    for s in ids:
        if s >= 0:
            counts[s] += 1
    keep = [
        c > 0 and (partial == "keep" or full_counts is None or c == full_counts[s])
        for s, c in enumerate(counts)
    ]
    new_index, next_id = [], 0
    for k in keep:
        new_index.append(next_id if k else -1)
        next_id += bool(k)
    new_ids = [new_index[s] if s >= 0 else -1 for s in ids]
    return new_ids, [bool(label) for label, k in zip(labels, keep) if k]


def truncate(
    prompt_ids: list[int],
    completion_ids: list[int],
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
) -> tuple[list[int], list[int]]:
    """The prompt keeps its last tokens, the completion its first (module docstring)."""
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length :]
    if max_length is not None and len(prompt_ids) + len(completion_ids) > max_length:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if len(prompt_ids) > max_length - 1:
            prompt_ids = prompt_ids[len(prompt_ids) - (max_length - 1) :]
        completion_ids = completion_ids[: max_length - len(prompt_ids)]
    return prompt_ids, completion_ids


def truncate_with_sentences(
    prompt_ids,
    completion_ids,
    sentence_ids,
    sentence_labels,
    *,
    max_length=None,
    max_prompt_length=None,
    partial: str = "drop",
):
    """``truncate`` plus the sentence ids of the kept completion tokens (``compact_sentences``)."""
    new_prompt, new_completion = truncate(
        prompt_ids, completion_ids, max_length=max_length, max_prompt_length=max_prompt_length
    )
    full_counts = [0] * len(sentence_labels)
    for s in sentence_ids:
        if s >= 0:
            full_counts[s] += 1
    ids, labels = compact_sentences(
        sentence_ids[: len(new_completion)], sentence_labels, full_counts, partial
    )
    return new_prompt, new_completion, ids, labels


# ---------------------------------------------------------------------------------------------- examples
def _encode_prompt(tokenizer, prompt_text: str, chat: bool) -> list[int]:
    return list(tokenizer(prompt_text, add_special_tokens=not chat)["input_ids"])


def encode_example(
    tokenizer,
    prompt,
    completion,
    *,
    sentences=None,
    sentence_labels=None,
    use_chat_template: bool | None = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    partial_sentences: str = "drop",
    index=None,
    completion_field: str = "completion",
) -> dict:
    """One prompt/completion pair -> ``prompt_input_ids``, ``completion_input_ids`` (and sentence ids).

    A malformed input raises ``ValueError`` naming the field (and ``index``, the row's index in its data set,
    when given; ``completion_field`` names the completion, e.g. ``"chosen"``).
    """
    check_text(prompt, "prompt", index)
    check_text(completion, completion_field, index)
    if sentences is not None or sentence_labels is not None:
        check_sentences(sentences, sentence_labels, index)
    if use_chat_template is None:
        use_chat_template = getattr(tokenizer, "chat_template", None) is not None
    prompt_text, completion_text, offset = render(
        tokenizer, prompt, completion, use_chat_template=use_chat_template
    )
    prompt_ids = _encode_prompt(tokenizer, prompt_text, use_chat_template)
    enc = tokenizer(completion_text, add_special_tokens=False, return_offsets_mapping=sentences is not None)
    completion_ids = list(enc["input_ids"])
    if sentences is None:
        prompt_ids, completion_ids = truncate(
            prompt_ids, completion_ids, max_length=max_length, max_prompt_length=max_prompt_length
        )
        return {"prompt_input_ids": prompt_ids, "completion_input_ids": completion_ids}
    if offset < 0:
        raise row_error(
            index,
            completion_field,
            "the completion's content is not found in its rendered text; sentences cannot be located",
        )
    try:
        spans = sentence_spans(_content(completion), sentences, offset)
    except ValueError as err:
        raise row_error(index, "sentences", str(err)) from None
    ids = token_sentence_ids(completion_text, enc["offset_mapping"], spans)
    prompt_ids, completion_ids, ids, labels = truncate_with_sentences(
        prompt_ids,
        completion_ids,
        ids,
        list(sentence_labels),
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        partial=partial_sentences,
    )
    return {
        "prompt_input_ids": prompt_ids,
        "completion_input_ids": completion_ids,
        "completion_sentence_ids": ids,
        "sentence_labels": labels,
    }


def _paired_map(example, index, tokenizer, use_chat_template, max_length, max_prompt_length):
    check_row(example, index, paired=True)
    out = {}
    for side in ("chosen", "rejected"):
        enc = encode_example(
            tokenizer,
            example["prompt"],
            example[side],
            use_chat_template=use_chat_template,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            index=index,
            completion_field=side,
        )
        out["prompt_input_ids"] = enc["prompt_input_ids"]  # identical for both sides
        out[f"{side}_input_ids"] = enc["completion_input_ids"]
    return out


def _unpaired_map(
    example, index, tokenizer, use_chat_template, max_length, max_prompt_length, sentences, partial
):
    check_row(example, index, paired=False, sentences=sentences)
    enc = encode_example(
        tokenizer, example["prompt"], example["completion"],
        sentences=example["sentences"] if sentences else None,
        sentence_labels=example["sentence_labels"] if sentences else None,
        use_chat_template=use_chat_template, max_length=max_length, max_prompt_length=max_prompt_length,
        partial_sentences=partial, index=index,
    )  # fmt: skip
    enc["label"] = bool(example["label"])
    return enc


def unpair(dataset):
    """Paired text data -> unpaired (KTO): each pair gives ``(prompt, chosen, True)`` and ``(prompt, rejected,
    False)``, in that order; other columns are dropped."""

    def expand(batch):
        out = {"prompt": [], "completion": [], "label": []}
        for prompt, chosen, rejected in zip(batch["prompt"], batch["chosen"], batch["rejected"]):
            out["prompt"] += [prompt, prompt]
            out["completion"] += [chosen, rejected]
            out["label"] += [True, False]
        return out

    return dataset.map(expand, batched=True, remove_columns=dataset.column_names, desc="unpairing")


def tokenize_preference_data(
    dataset,
    tokenizer,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    use_chat_template: bool | None = None,
    sentences: bool | None = None,
    partial_sentences: str = "drop",
    num_proc: int | None = None,
):
    """Tokenise a ``datasets.Dataset`` of paired or unpaired preference data (module docstring).

    Paired when it has ``chosen``/``rejected`` columns, unpaired with ``completion``/``label``. ``sentences``
    (default: when the data has a ``sentences`` column) computes FactAlign's sentence ids. Text columns are
    removed; other columns (win rates, scores) are kept. A malformed row raises ``ValueError`` naming its index
    and field (module docstring).
    """
    columns = set(dataset.column_names)
    if partial_sentences not in PARTIAL_SENTENCES:
        raise ValueError(f"partial_sentences must be one of {PARTIAL_SENTENCES}, got {partial_sentences!r}")
    if {"prompt", "chosen", "rejected"} <= columns:
        fn, kwargs = _paired_map, {}
        remove = ["prompt", "chosen", "rejected"]
    elif {"prompt", "completion", "label"} <= columns:
        if sentences is None:
            sentences = "sentences" in columns
        if sentences and not {"sentences", "sentence_labels"} <= columns:
            raise ValueError("sentence ids need the columns 'sentences' and 'sentence_labels'")
        fn, kwargs = _unpaired_map, {"sentences": sentences, "partial": partial_sentences}
        remove = ["prompt", "completion", "sentences", "sentence_labels"]
    else:
        raise ValueError(
            f"cannot tell the data's kind from its columns {sorted(columns)}: paired data needs prompt/chosen/"
            "rejected, unpaired data prompt/completion/label"
        )
    fn_kwargs = {
        "tokenizer": tokenizer,
        "use_chat_template": use_chat_template,
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        **kwargs,
    }
    return dataset.map(
        fn,
        fn_kwargs=fn_kwargs,
        with_indices=True,
        remove_columns=[c for c in remove if c in columns],
        num_proc=num_proc,
        desc="tokenizing preference data",
    )
