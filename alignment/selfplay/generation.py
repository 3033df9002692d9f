"""Sampling ``K`` responses per prompt from the current policy: ``transformers`` ``generate`` or vLLM.

``generate_responses`` renders each prompt as the trainer does (chat template with the generation prompt),
samples in batches of prompts with ``num_return_sequences=K`` (temperature, top-p), and returns the decoded
responses (special tokens removed) with their lengths in tokens (up to, not counting, the end of sequence).
With ``seed``, batch ``b`` samples under ``torch.manual_seed(seed + b)`` inside a forked RNG, so a batch's
responses do not depend on what ran before it (a resumed run samples what an uninterrupted one did).

vLLM (``backend="vllm"``) is optional: it loads the policy from a folder (``model_path``) and is used only when
installed; asking for it without it is a ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from prefuse.alignment.selfplay.text import encode, prompt_text, uses_chat_template

BACKENDS = ("transformers", "vllm")


@dataclass
class SamplingOptions:
    """``samples`` (K) responses per prompt, at most ``max_new_tokens`` each; ``batch_size`` prompts per call."""

    samples: int = 5
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    batch_size: int = 8
    max_prompt_length: int = 512

    def __post_init__(self):
        for name in ("samples", "max_new_tokens", "batch_size", "max_prompt_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def generate_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    options: SamplingOptions,
    *,
    seed: int = 0,
    backend: str = "transformers",
    model_path: str | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> tuple[list[list[str]], list[list[int]]]:
    """``(responses, lengths)``: ``K`` sampled responses per prompt and their token counts (module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(prompts, str) or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("prompts must be a list of non-blank strings")
    if backend == "vllm":
        return _generate_vllm(model_path, tokenizer, prompts, options, seed=seed)
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    responses, lengths = [], []
    was_training = model.training
    model.eval()
    starts = range(0, len(prompts), options.batch_size)
    try:
        for b, start in enumerate(tqdm(starts, desc=desc, disable=not progress, leave=False)):
            texts = [prompt_text(tokenizer, p) for p in prompts[start : start + options.batch_size]]
            batch = encode(
                tokenizer, texts, max_length=options.max_prompt_length, padding_side="left", device=device
            )
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
                torch.manual_seed(seed + b)
                out = model.generate(
                    **batch,
                    do_sample=True,
                    temperature=options.temperature,
                    top_p=options.top_p,
                    top_k=0,
                    max_new_tokens=options.max_new_tokens,
                    num_return_sequences=options.samples,
                    pad_token_id=pad,
                    eos_token_id=eos,
                )
            new = out[:, batch["input_ids"].shape[1] :].cpu()
            for i in range(len(texts)):
                rows = new[i * options.samples : (i + 1) * options.samples]
                responses.append(tokenizer.batch_decode(rows, skip_special_tokens=True))
                lengths.append([_length(row, eos, pad) for row in rows.tolist()])
    finally:
        model.train(was_training)
    return responses, lengths


def _length(ids: list[int], eos: int | None, pad: int | None) -> int:
    """Tokens before the first end-of-sequence (or padding) token."""
    for n, token in enumerate(ids):
        if token == eos or token == pad:
            return n
    return len(ids)


def _generate_vllm(model_path, tokenizer, prompts, options: SamplingOptions, *, seed: int):
    if not vllm_available():
        raise ValueError(
            "backend='vllm' needs the vllm package (pip install vllm); use backend='transformers'"
        )
    if model_path is None:
        raise ValueError("backend='vllm' needs model_path: the policy's Hugging Face folder")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, tokenizer=model_path, seed=seed)
    params = SamplingParams(
        n=options.samples,
        temperature=options.temperature,
        top_p=options.top_p,
        max_tokens=options.max_new_tokens,
        seed=seed,
    )
    special = not uses_chat_template(tokenizer)  # the template already wrote them
    ids = [tokenizer(prompt_text(tokenizer, p), add_special_tokens=special)["input_ids"] for p in prompts]
    outputs = llm.generate([{"prompt_token_ids": list(x)} for x in ids], params)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    responses = [[c.text for c in o.outputs] for o in outputs]
    lengths = [[_length(list(c.token_ids), eos, pad) for c in o.outputs] for o in outputs]
    del llm
    return responses, lengths
