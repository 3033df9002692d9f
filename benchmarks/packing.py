"""Padding-free batches against padded ones: the padding a padded batch carries and the step time of a DPO step
(model body, fused head and loss, forward+backward) on the same pairs, packed and padded.

Two length distributions: the bundled preference data (tokenised with the bundled tokenizer) and a generated one
shaped like UltraFeedback's (prompt and completion lengths log-normal with long tails, chosen and rejected drawn
independently; nothing downloaded). ``python -m benchmarks.packing`` prints a markdown section; ``--pairs``,
``--batches`` and the model size keep it short on a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

ULTRAFEEDBACK_LIKE = {"prompt": (100.0, 0.9), "completion": (250.0, 0.7)}
"""(median, log-space standard deviation) of the generated prompt and completion lengths, in tokens."""


def generated_lengths(pairs: int, *, max_length: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """``(prompt, chosen, rejected)`` token counts of ``pairs`` generated pairs, each row cut to ``max_length``
    (the prompt to half of it), as a tokeniser with that truncation would leave them."""
    gen = torch.Generator().manual_seed(seed)

    def draw(kind: str) -> torch.Tensor:
        median, sigma = ULTRAFEEDBACK_LIKE[kind]
        return (torch.randn(pairs, generator=gen) * sigma).exp().mul(median).round().clamp(min=1).long()

    prompt = draw("prompt").clamp(max=max_length // 2)
    chosen, rejected = draw("completion"), draw("completion")
    room = max_length - prompt
    return [
        (int(p), int(min(c, left)), int(min(r, left)))
        for p, c, r, left in zip(prompt, chosen, rejected, room)
    ]


def bundled_lengths(*, max_length: int) -> list[tuple[int, int, int]]:
    """``(prompt, chosen, rejected)`` token counts of the bundled paired training data."""
    from prefuse.alignment.data import build_tokenizer, load_preference_data
    from prefuse.alignment.data.processing import tokenize_preference_data

    data = tokenize_preference_data(
        load_preference_data("paired", "train"), build_tokenizer(), max_length=max_length,
        max_prompt_length=max_length // 2,
    )  # fmt: skip
    return [
        (len(r["prompt_input_ids"]), len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in data
    ]


def padding_fraction(lengths: list[tuple[int, int, int]], pairs_per_batch: int) -> float:
    """The share of a padded batch's token slots that hold padding (batches of consecutive pairs, each batch
    padded to its longest row); a packed batch has none."""
    slots = used = 0
    for start in range(0, len(lengths), pairs_per_batch):
        rows = [p + c for p, c, _ in lengths[start : start + pairs_per_batch]]
        rows += [p + r for p, _, r in lengths[start : start + pairs_per_batch]]
        slots += len(rows) * max(rows)
        used += sum(rows)
    return 1.0 - used / slots


def _features(lengths, vocab: int, gen: torch.Generator) -> list[dict]:
    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    return [
        {"prompt_input_ids": ids(p), "chosen_input_ids": ids(c), "rejected_input_ids": ids(r)}
        for p, c, r in lengths
    ]


def step_times(
    lengths,
    *,
    pairs_per_batch: int,
    batches: int,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 2048,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """Median seconds of a DPO step (forward+backward) on ``batches`` batches of the pairs, padded and packed."""
    from prefuse.alignment import DPOLoss
    from prefuse.alignment.data.collators import PairedCollator
    from prefuse.alignment.data.packing import pack_batch
    from prefuse.alignment.model_head import forward_hidden
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    model = LlamaForCausalLM(config).float()
    loss = DPOLoss(backend="torch")
    gen = torch.Generator().manual_seed(seed)
    collate = PairedCollator(pad_token_id=0)
    padded = []
    for i in range(batches):
        features = _features(lengths[i * pairs_per_batch : (i + 1) * pairs_per_batch], vocab, gen)
        padded.append({**collate(features), "rows": 2 * len(features)})

    def step(batch: dict) -> float:
        model.zero_grad(set_to_none=True)
        ref = torch.zeros(batch["rows"])  # reference sums: the reference forward is not what is compared
        start = time.perf_counter()
        if "sequence_ids" in batch:
            head = forward_hidden(model, batch["input_ids"], None, position_ids=batch["position_ids"])
            out = head.apply(loss, batch["labels"], ref_logps=ref, sequence_ids=batch["sequence_ids"])
        else:
            head = forward_hidden(model, batch["input_ids"], batch["attention_mask"])
            out = head.apply(loss, batch["labels"], ref_logps=ref)
        out.loss.backward()
        return time.perf_counter() - start

    times = {}
    for name, layout in (("padded", padded), ("packed", [pack_batch(b) for b in padded])):
        step(layout[0])  # warm-up
        times[name] = statistics.median(sum(step(b) for b in layout) for _ in range(repeats))
    return times


def section(*, pairs: int, pairs_per_batch: int, batches: int, max_length: int, **model) -> str:
    """The markdown section: padding fraction and packed / padded step time per length distribution."""
    lines = [
        "## Padding-free batches", "",
        f"DPO step (tiny Llama body, prefuse head and loss, forward+backward), {pairs_per_batch} pairs per batch, "
        f"rows cut to {max_length} tokens; time: median of the sum over {batches} batches.", "",
        "| lengths | padding in padded batches | step time padded | step time packed | packed / padded |",
        "|---|---|---|---|---|",
    ]  # fmt: skip
    for name, lengths in (
        ("bundled data", bundled_lengths(max_length=max_length)),
        ("UltraFeedback-like (generated)", generated_lengths(pairs, max_length=max_length)),
    ):
        frac = padding_fraction(lengths, pairs_per_batch)
        times = step_times(lengths, pairs_per_batch=pairs_per_batch, batches=batches, **model)
        ratio = times["packed"] / times["padded"]
        lines.append(
            f"| {name} | {frac:.1%} | {times['padded'] * 1e3:.1f} ms | {times['packed'] * 1e3:.1f} ms | {ratio:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.packing", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--pairs", type=int, default=256, help="generated pairs")
    parser.add_argument("--pairs-per-batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4, help="batches timed per layout")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    opts = parser.parse_args(argv)
    print(section(pairs=opts.pairs, pairs_per_batch=opts.pairs_per_batch, batches=opts.batches,
                  max_length=opts.max_length, hidden=opts.hidden, layers=opts.layers))  # fmt: skip


if __name__ == "__main__":
    main()
