"""The embedded default: a tiny policy and a tiny preference model built from configs, and the bundled prompts.

Nothing is downloaded. The tokenizer is the byte-level BPE trained on the bundled data
(``prefuse.alignment.data.build_tokenizer``); the policy is a tiny Llama, warmed up on the bundled answers
(friendly and curt alike, ``warm_up_policy``); the preference model is a tiny Llama pair encoder (``"ranker"``) or a tiny Llama backbone with a GPM head (``"gpm"``), fitted for a few steps
on the bundled preference pairs with the Bradley-Terry loss ``−log σ(s(chosen ≻ rejected) / τ)`` so that its
verdicts follow the bundled preferences (friendly, correct answers over curt, wrong ones).
"""

from __future__ import annotations

import torch
from prefuse.alignment.selfplay.gpm import GeneralPreferenceModel
from prefuse.alignment.selfplay.preference import PreferenceModel
from prefuse.alignment.selfplay.ranker import PairRanker

PREFERENCE_KINDS = ("ranker", "gpm")


def bundled_prompts(split: str | None = "train") -> list[str]:
    """The bundled data's distinct prompts, in order of first appearance."""
    from prefuse.alignment.data import read_records

    seen: dict[str, None] = {}
    for record in read_records():
        if split is None or record["split"] == split:
            seen.setdefault(record["prompt"], None)
    return list(seen)


def _llama_config(tokenizer, hidden_size: int, layers: int, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **extra,
    )


def tiny_policy(tokenizer, *, hidden_size: int = 64, layers: int = 2, seed: int = 0):
    """A randomly initialised tiny ``LlamaForCausalLM`` over ``tokenizer``'s vocabulary."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(_llama_config(tokenizer, hidden_size, layers))


def tiny_preference_model(
    kind: str, tokenizer, *, hidden_size: int = 32, layers: int = 1, seed: int = 0, max_length: int = 256
) -> PreferenceModel:
    """A randomly initialised tiny ``PairRanker`` (``"ranker"``) or ``GeneralPreferenceModel`` (``"gpm"``)."""
    from transformers import LlamaForSequenceClassification, LlamaModel

    if kind not in PREFERENCE_KINDS:
        raise ValueError(f"kind must be one of {PREFERENCE_KINDS}, got {kind!r}")
    torch.manual_seed(seed)
    if kind == "ranker":
        model = LlamaForSequenceClassification(_llama_config(tokenizer, hidden_size, layers, num_labels=1))
        return PairRanker(model, tokenizer, max_length=max_length)
    return GeneralPreferenceModel(
        LlamaModel(_llama_config(tokenizer, hidden_size, layers)), tokenizer, dim=4, max_length=max_length
    )


def fit_preference_model(
    model: PreferenceModel,
    records: list[dict],
    *,
    steps: int = 40,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Fit ``model`` on ``records`` (``prompt``, ``chosen``, ``rejected``) with the Bradley-Terry loss
    ``mean −log σ(s(chosen ≻ rejected) / τ)`` (AdamW, ``steps`` batches drawn with ``seed``); the losses."""
    from tqdm.auto import tqdm

    if steps < 0 or batch_size < 1 or not records:
        raise ValueError(
            f"need steps >= 0, batch_size >= 1 and records, got {steps}, {batch_size}, {len(records)}"
        )
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="fit preference model", disable=not progress, leave=False):
        picked = torch.randint(len(records), (batch_size,), generator=generator).tolist()
        batch = [records[i] for i in picked]
        s = model.pair_scores(
            [r["prompt"] for r in batch], [r["chosen"] for r in batch], [r["rejected"] for r in batch]
        )
        loss = -torch.nn.functional.logsigmoid(s / model.tau).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def warm_up_policy(
    policy,
    tokenizer,
    records: list[dict],
    *,
    steps: int = 100,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Supervised warm-up of the tiny policy on the bundled answers (each record's ``chosen`` and ``rejected``
    alike), so that it starts from a mix of friendly and curt answers rather than random tokens: the mean
    next-token loss over completion tokens (AdamW, ``steps`` batches drawn with ``seed``); the losses."""
    from prefuse.alignment.data import encode_example
    from tqdm.auto import tqdm

    if steps < 0 or batch_size < 1 or not records:
        raise ValueError(
            f"need steps >= 0, batch_size >= 1 and records, got {steps}, {batch_size}, {len(records)}"
        )
    examples = []
    for r in records:
        for side in ("chosen", "rejected"):
            enc = encode_example(tokenizer, r["prompt"], r[side], max_length=128)
            ids = enc["prompt_input_ids"] + enc["completion_input_ids"]
            examples.append((ids, [-100] * len(enc["prompt_input_ids"]) + enc["completion_input_ids"]))
    device = next(policy.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    policy.train()
    losses = []
    for _ in tqdm(range(steps), desc="warm up policy", disable=not progress, leave=False):
        batch = [
            examples[i] for i in torch.randint(len(examples), (batch_size,), generator=generator).tolist()
        ]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x, _ in batch], device=device)
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch], device=device)
        loss = policy(
            input_ids=ids, attention_mask=ids != tokenizer.pad_token_id, labels=labels, use_cache=False
        ).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses
