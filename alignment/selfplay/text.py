"""How the self-play loop turns prompts and responses into model inputs (the trainer's chat-template rules)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from prefuse.alignment.data.processing import render

PAIR_FORMAT = "{prompt}\n\n[Response A]\n{first}\n\n[Response B]\n{second}"


def uses_chat_template(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def prompt_text(tokenizer, prompt: str) -> str:
    """The prompt as the policy sees it before its answer (the chat template's generation prompt, if any)."""
    if uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return prompt


def conversation_text(tokenizer, prompt: str, response: str) -> str:
    """Prompt and response rendered as one conversation, as ``PreferenceTrainer`` renders a pair's side."""
    rendered_prompt, rendered_completion, _ = render(tokenizer, prompt, response)
    return rendered_prompt + rendered_completion


def encode(
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int,
    padding_side: str,
    device,
    add_special_tokens: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Batch-encode ``texts`` (special tokens unless the chat template already wrote them), padded on
    ``padding_side``, truncated to ``max_length`` tokens from the left (the end of a text is what matters)."""
    if add_special_tokens is None:
        add_special_tokens = not uses_chat_template(tokenizer)
    old = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = padding_side, "left"
    try:
        enc = tokenizer(
            list(texts),
            add_special_tokens=add_special_tokens,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = old
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def last_token_states(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(n, D)``: each row's hidden state at its last attended position (right or left padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.bool() * positions).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
