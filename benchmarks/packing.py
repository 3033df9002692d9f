"""Padding-free batches against padded ones: the padding a padded batch carries and the step time of a DPO step
(model body, fused head and loss, forward+backward) on the same pairs, packed and padded.

Two length distributions: the bundled preference data (tokenised with the bundled tokenizer) and a generated one
shaped like UltraFeedback's (prompt and completion lengths log-normal with long tails, chosen and rejected drawn
independently; nothing downloaded). Beside the measured times, a prediction labelled as such: the packed / padded
forward FLOPs of a Llama-3-8B body on the same batches with variable-length attention.

The packed rows run twice: through the model's own attention (sdpa / eager attend over the packed row's whole
``N × N`` block-causal mask) and per sequence (``prefuse.alignment.packed_attention``, what ``padding_free=True``
runs).

``python -m benchmarks.packing`` prints a markdown section; ``--out DIR`` also writes it to ``DIR/packing.md``
with the raw times and the environment in ``DIR/packing.json``. ``--device cuda`` measures a GPU (``--attn
flash_attention_2``: flash-attention's variable-length kernel for both packed runs); ``--pairs``, ``--batches``
and ``--hidden`` keep it short on a CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import environment

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


LLAMA3_8B_BODY = {"hidden": 4096, "layers": 32, "intermediate": 14336, "kv_dim": 1024}
"""Llama-3-8B's body shapes (``kv_dim``: 8 key-value heads of 128) for the FLOP prediction."""


def body_flops(
    rows: list[int], width: int | None, *, hidden: int, layers: int, intermediate: int, kv_dim: int
) -> float:
    """Forward matmul FLOPs of a Llama body on rows of the given token counts: every token slot pays the
    projections and the MLP, ``2·(2·d² + 2·d·kv + 3·d·f)`` per layer; attention pays ``2·n²·d`` per causal
    sequence of ``n`` slots (QKᵀ and PV, half the square). ``width``: the rows are padded to it (every slot
    computed, as sdpa does); None: each row alone, as a variable-length attention kernel runs a packed row."""
    linear = 2 * (2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * intermediate)
    slots = [width if width is not None else n for n in rows]
    return layers * sum(linear * n + 2 * n * n * hidden for n in slots)


def predicted_ratio(lengths: list[tuple[int, int, int]], pairs_per_batch: int) -> float:
    """Prediction, not a measurement: packed / padded body FLOPs of a Llama-3-8B forward on these batches, the
    packed row run with variable-length attention (flash-attention varlen), the padded batch padded to its longest
    row."""
    packed = padded = 0.0
    for start in range(0, len(lengths), pairs_per_batch):
        batch = lengths[start : start + pairs_per_batch]
        rows = [p + c for p, c, _ in batch] + [p + r for p, _, r in batch]
        packed += body_flops(rows, None, **LLAMA3_8B_BODY)
        padded += body_flops(rows, max(rows), **LLAMA3_8B_BODY)
    return packed / padded


def step_times(
    lengths,
    *,
    pairs_per_batch: int,
    batches: int,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 2048,
    repeats: int = 5,
    seed: int = 0,
    device: str = "cpu",
    attn: str = "sdpa",
) -> dict[str, list[float]]:
    """Seconds of ``batches`` DPO steps (forward+backward; one sum per repeat) on the pairs: ``padded``, ``packed``
    (the model's own attention over each packed row's block-causal mask) and ``packed_varlen`` (each sequence
    attending alone: ``use_varlen_attention``, what ``padding_free=True`` runs).

    The three alternate within every repeat, so all see the same machine state; ``repeats`` sums each."""
    from prefuse.alignment import DPOLoss
    from prefuse.alignment.data.collators import PairedCollator
    from prefuse.alignment.data.packing import pack_batch
    from prefuse.alignment.model_head import forward_hidden
    from prefuse.alignment.packed_attention import use_varlen_attention
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
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn).float().to(device)
    loss = DPOLoss(backend="torch" if device == "cpu" else "auto")
    gen = torch.Generator().manual_seed(seed)
    collate = PairedCollator(pad_token_id=0)
    padded = []
    for i in range(batches):
        features = _features(lengths[i * pairs_per_batch : (i + 1) * pairs_per_batch], vocab, gen)
        padded.append({**collate(features), "rows": 2 * len(features)})
    on_device = [
        [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in layout]
        for layout in (padded, [pack_batch(b) for b in padded])
    ]
    varlen = copy.deepcopy(model)
    use_varlen_attention(varlen)  # a no-op for flash / flex attention: variable-length already
    runs = {  # layout name: (model, batches)
        "padded": (model, on_device[0]),
        "packed": (model, on_device[1]),
        "packed_varlen": (varlen, on_device[1]),
    }
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step(body, batch: dict) -> float:
        body.zero_grad(set_to_none=True)
        ref = torch.zeros(batch["rows"], device=device)  # reference sums: its forward is not compared
        sync()
        start = time.perf_counter()
        if "sequence_ids" in batch:
            head = forward_hidden(body, batch["input_ids"], None, position_ids=batch["position_ids"])
            out = head.apply(loss, batch["labels"], ref_logps=ref, sequence_ids=batch["sequence_ids"])
        else:
            head = forward_hidden(body, batch["input_ids"], batch["attention_mask"])
            out = head.apply(loss, batch["labels"], ref_logps=ref)
        out.loss.backward()
        sync()
        return time.perf_counter() - start

    for (
        body,
        batches_,
    ) in runs.values():  # warm-up: every batch's shapes once (oneDNN builds kernels per shape)
        for batch in batches_:
            step(body, batch)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (body, batches_) in runs.items():
            times[name].append(sum(step(body, b) for b in batches_))
    return times


DISTRIBUTIONS = ("bundled data", "UltraFeedback-like (generated)")


def measure(
    *, pairs: int, pairs_per_batch: int, batches: int, max_length: int, hiddens: tuple[int, ...], layers: int,
    repeats: int, device: str = "cpu", attn: str = "sdpa",
) -> list[dict]:  # fmt: skip
    """One record per (length distribution, body width): padding share, the predicted Llama-3-8B FLOP ratio and
    the measured step times (every repeat's sum, seconds)."""
    sources = {
        DISTRIBUTIONS[0]: bundled_lengths(max_length=max_length),
        DISTRIBUTIONS[1]: generated_lengths(pairs, max_length=max_length),
    }
    records = []
    for name, lengths in sources.items():
        for hidden in hiddens:
            times = step_times(
                lengths, pairs_per_batch=pairs_per_batch, batches=batches, hidden=hidden, layers=layers,
                repeats=repeats, device=device, attn=attn,
            )  # fmt: skip
            records.append({
                "lengths": name, "hidden": hidden, "layers": layers,
                "padding_fraction": padding_fraction(lengths, pairs_per_batch),
                "predicted_llama3_8b_flop_ratio": predicted_ratio(lengths, pairs_per_batch),
                "seconds": times,
            })  # fmt: skip
    return records


def section(
    records: list[dict], *, pairs_per_batch: int, batches: int, max_length: int, attn: str = "sdpa"
) -> str:
    """The markdown section of ``measure``'s records: padding share, measured step times (medians of the
    interleaved repeats) and packed / padded ratios, and the predicted FLOP ratio of a Llama-3-8B body."""
    lines = [
        "## Padding-free batches", "",
        f"A DPO step (tiny Llama body of the given width, {attn} attention, prefuse head and loss, forward+backward), "
        f"{pairs_per_batch} pairs per batch, rows cut to {max_length} tokens; time: the median over repeats of the "
        f"sum over {batches} batches, the three layouts alternating. *packed, block-causal*: the model's own "
        "attention over the packed row's `N × N` mask; *packed, varlen*: each sequence attends alone "
        "(`use_varlen_attention`, what `padding_free=True` runs). The last column is a prediction, not a "
        "measurement: packed / padded forward FLOPs of a Llama-3-8B body, the packed row under variable-length "
        "attention.", "",
        "| lengths | body width | padding in padded batches | padded | packed, block-causal | packed, varlen "
        "| varlen / padded | block-causal / padded | Llama-3-8B FLOPs packed / padded (predicted) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in records:
        padded, packed, varlen = (
            statistics.median(r["seconds"][k]) for k in ("padded", "packed", "packed_varlen")
        )
        lines.append(
            f"| {r['lengths']} | {r['hidden']} | {r['padding_fraction']:.1%} | {padded * 1e3:.0f} ms "
            f"| {packed * 1e3:.0f} ms | {varlen * 1e3:.0f} ms | {varlen / padded:.2f} | {packed / padded:.2f} "
            f"| {r['predicted_llama3_8b_flop_ratio']:.2f} |"
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
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 256], help="body widths measured")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--attn", default="sdpa", help="the body's attn_implementation (flash_attention_2 on a GPU)"
    )
    parser.add_argument("--out", type=Path, help="also write packing.md and packing.json (raw times) here")
    opts = parser.parse_args(argv)
    shape = {"pairs_per_batch": opts.pairs_per_batch, "batches": opts.batches, "max_length": opts.max_length}
    records = measure(pairs=opts.pairs, hiddens=tuple(opts.hidden), layers=opts.layers, repeats=opts.repeats,
                      device=opts.device, attn=opts.attn, **shape)  # fmt: skip
    text = section(records, attn=opts.attn, **shape)
    print(text)
    if opts.out is not None:
        opts.out.mkdir(parents=True, exist_ok=True)
        meta = {
            **environment.describe("cpu"),
            "command": " ".join(["python -m benchmarks.packing", *sys.argv[1:]]),
        }
        (opts.out / "packing.md").write_text(text + "\n")
        with open(opts.out / "packing.json", "w") as f:
            json.dump({"meta": meta, "options": vars(opts) | {"out": str(opts.out)}, "records": records}, f,
                      indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
