"""``prefuse`` (also ``python -m prefuse``): train a tiny model with a prefuse loss, then measure the lm-head.

On a fresh CPU machine, with no downloads, the main job

1. trains a byte-level BPE tokenizer on the bundled preference data and builds a tiny Llama from a config
   (its vocabulary padded to ``--vocab-size`` rows, so that the lm-head costs what it costs in real models);
2. trains ``--steps`` steps of ``--method`` through ``PreferenceTrainer`` with prefuse's fused head, showing
   progress (loss, reward margin, accuracy) and evaluating on the held-out split before and after;
3. takes the trained policy's last hidden states on a test batch and runs the lm-head on them three ways --
   prefuse's fused op, TRL 1.16's fused head (when ``trl`` is installed) and the naive full-logits head -- each
   in a fresh process (``prefuse.alignment.head_comparison``), printing time per step, peak memory and how far
   the log-probs and gradients are from the naive head's;
4. writes ``report.json`` (settings, evaluations, the per-step training log, the head comparison) and
   ``report.png`` (loss and margin curves, the head table; needs matplotlib) into ``--output-dir``.

Arguments are checked up front: a bad one is an ``argparse`` usage error (exit status 2), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from prefuse.alignment.functional import DPO_LOSS_TYPES
from prefuse.alignment.methods import METHODS

LOSS_TYPES = {"dpo": DPO_LOSS_TYPES}  # methods that take --loss-type, and their choices
UNPAIRED = tuple(name for name, method in METHODS.items() if not method.paired)
_SHOWN = (
    ("loss", "loss", "{:.4f}"),
    ("rewards/margins", "margin", "{:+.3f}"),
    ("rewards/accuracies", "acc", "{:.2f}"),
    ("rewards/chosen", "chosen", "{:+.3f}"),
    ("rewards/rejected", "rejected", "{:+.3f}"),
    ("kl", "kl", "{:.3f}"),
    ("fg_loss", "fg_loss", "{:.4f}"),
)


def version() -> str:
    from importlib.metadata import version as installed_version

    return installed_version("prefuse")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefuse",
        description="Train a tiny Llama with a prefuse preference loss on the bundled data (CPU, no downloads), "
        "then run prefuse's fused lm-head, TRL's fused head and the naive full-logits head on the "
        "same hidden states, and write a JSON + PNG report.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"prefuse {version()}")
    parser.add_argument("--method", choices=tuple(METHODS), default="dpo", help="preference loss")
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step (KTO/FactAlign: 2x rows)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (AdamW, constant after warmup)")
    parser.add_argument(
        "--beta",
        type=float,
        default=None,
        help="β (default: the method's as in the seeds, but 0.1 for SPPO/GPO, whose seeds' 0.001 "
        "(η = 1000) is sized for 8B models' long completions)",
    )
    parser.add_argument(
        "--loss-type",
        default=None,
        help=f"DPO loss type, one of {' '.join(DPO_LOSS_TYPES)} (default: sigmoid)",
    )
    parser.add_argument("--hidden-size", type=int, default=64, help="model width (a multiple of 8)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=32768,
        help="lm-head rows (the tokenizer's 512 tokens, padded: a real model's head cost)",
    )
    parser.add_argument("--max-length", type=int, default=96, help="max prompt+completion tokens")
    parser.add_argument("--log-every", type=int, default=5, help="steps between progress lines")
    parser.add_argument(
        "--compare-steps",
        type=int,
        default=4,
        help="forward+backward steps per head in the head comparison (0: skip it)",
    )
    parser.add_argument(
        "--padding-free", action="store_true", help="pack each batch's sequences into one row (no padding)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--output-dir", default="prefuse-out", help="where report.json and report.png go")
    return parser


def check_args(parser: argparse.ArgumentParser, opts: argparse.Namespace) -> None:
    """Every range and combination ``parse_args`` cannot check: ``parser.error`` (exit 2) on the first bad one."""
    from prefuse.alignment.data import read_records

    def at_least(name: str, low: int) -> None:
        if getattr(opts, name.replace("-", "_")) < low:
            parser.error(f"--{name} must be >= {low}, got {getattr(opts, name.replace('-', '_'))}")

    for name, low in (
        ("steps", 1),
        ("batch-size", 1),
        ("layers", 1),
        ("hidden-size", 8),
        ("vocab-size", 1),
        ("max-length", 8),
        ("log-every", 1),
        ("compare-steps", 0),
        ("seed", 0),
    ):
        at_least(name, low)
    if opts.hidden_size % 8:
        parser.error(
            f"--hidden-size must be a multiple of 8 (4 attention heads of even width), got {opts.hidden_size}"
        )
    train_pairs = sum(r["split"] == "train" for r in read_records())
    if opts.batch_size > train_pairs:
        parser.error(
            f"--batch-size must be <= {train_pairs} (the bundled training pairs), got {opts.batch_size}"
        )
    if not (math.isfinite(opts.lr) and 0 < opts.lr <= 1):
        parser.error(f"--lr must be in (0, 1], got {opts.lr:g}")
    if opts.beta is not None and not (math.isfinite(opts.beta) and opts.beta > 0):
        parser.error(f"--beta must be > 0, got {opts.beta:g}")
    if opts.loss_type is not None:
        if opts.method not in LOSS_TYPES:
            takes = ", ".join(f"--method {m}" for m in LOSS_TYPES)
            parser.error(f"--loss-type applies to {takes} only; --method {opts.method} has no loss types")
        if opts.loss_type not in LOSS_TYPES[opts.method]:
            parser.error(
                f"--loss-type must be one of {' '.join(LOSS_TYPES[opts.method])}, got {opts.loss_type!r}"
            )
    if opts.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error(
                f"--device cuda: CUDA is not available here (torch {torch.__version__}); use --device cpu"
            )
    if os.path.exists(opts.output_dir) and not os.path.isdir(opts.output_dir):
        parser.error(f"--output-dir {opts.output_dir} exists and is not a directory")


# ---------------------------------------------------------------------------------------------- setup
def build_job(opts, trainer_dir: str):
    """``(trainer, tokenizer)``: the tiny Llama, the bundled data and ``PreferenceTrainer`` (writing nothing)."""
    import torch
    from prefuse.alignment.data import build_tokenizer, load_preference_data
    from prefuse.alignment.trainer import PreferenceConfig, PreferenceTrainer
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    device = opts.device if opts.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = build_tokenizer()
    vocab = max(opts.vocab_size, len(tokenizer))
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=opts.hidden_size,
        intermediate_size=2 * opts.hidden_size,
        num_hidden_layers=opts.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(128, opts.max_length),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(opts.seed)
    model = LlamaForCausalLM(config)
    unpaired = opts.method in UNPAIRED
    view = "unpaired" if unpaired else "paired"
    beta = opts.beta if opts.beta is not None else (0.1 if opts.method in ("sppo", "gpo") else None)
    rows = opts.batch_size * (2 if unpaired else 1)
    loss_type = {} if opts.loss_type is None else {"loss_type": opts.loss_type}
    args = PreferenceConfig(
        output_dir=trainer_dir, method=opts.method, beta=beta, **loss_type, per_device_train_batch_size=rows,
        per_device_eval_batch_size=rows, max_steps=opts.steps, learning_rate=opts.lr,
        lr_scheduler_type="constant_with_warmup", warmup_steps=min(10, opts.steps // 10), weight_decay=0.0,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=device == "cpu", dataloader_pin_memory=device != "cpu", seed=opts.seed, data_seed=opts.seed,
        max_length=opts.max_length, max_prompt_length=opts.max_length // 2, dataloader_num_workers=0,
        padding_free=opts.padding_free,
    )  # fmt: skip
    trainer = PreferenceTrainer(
        model,
        args=args,
        train_dataset=load_preference_data(view, "train"),
        eval_dataset=load_preference_data(view, "test"),
        processing_class=tokenizer,
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer, tokenizer


def _format(logs: dict, prefix: str = "") -> str:
    return "  ".join(
        f"{name} {fmt.format(logs[prefix + key])}" for key, name, fmt in _SHOWN if prefix + key in logs
    )


def _progress_callback(total: int, every: int, started: float):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """A line every ``every`` steps (and at the last) with that step's logged metrics."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            step = state.global_step
            if logs and "loss" in logs and (step % every == 0 or step == total):
                print(
                    f"  step {step:>{len(str(total))}}/{total}  {_format(logs)}  "
                    f"({time.perf_counter() - started:.1f}s)",
                    flush=True,
                )

    return Progress()


# ---------------------------------------------------------------------------------------------- head comparison
def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _times(theirs: float, ours: float, better: str, worse: str) -> str:
    """``"2.31x faster"`` / ``"1.86x slower"``: prefuse's ``ours`` against ``theirs`` (smaller is better)."""
    theirs, ours = max(theirs, 1e-12), max(ours, 1e-12)
    return f"{theirs / ours:.2f}x {better}" if theirs >= ours else f"{ours / theirs:.2f}x {worse}"


def compare_heads(trainer, opts) -> dict:
    """The head comparison on the trained policy's hidden states of the first test batch (module docstring)."""
    import torch
    from prefuse.alignment import head_comparison as hc
    from prefuse.alignment.model_head import forward_hidden
    from prefuse.alignment.packing import packed_targets

    batch = next(iter(trainer.get_eval_dataloader()))
    trainer.model.eval()
    packed = {"position_ids": batch["position_ids"]} if "sequence_ids" in batch else {}
    with torch.no_grad():
        head = forward_hidden(trainer.model, batch["input_ids"], batch.get("attention_mask"), **packed)
    labels = batch["labels"]
    if packed:  # labels whose shift stays within each sequence: position t+1 holds token t's target
        targets = packed_targets(labels, batch["sequence_ids"])
        labels = torch.cat([torch.full_like(targets[:, :1], -100), targets[:, :-1]], dim=1)
    rows, length = labels.shape
    scored = int((labels[:, 1:] != -100).sum())
    device = trainer.args.device.type
    print(
        f"\nlm-head on the same hidden states: the trained policy's {rows} test rows x {length} tokens "
        f"({scored} scored), vocab {head.weight.shape[0]}, forward+backward, one fresh process per head",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="prefuse-heads-") as folder:
        hc.save_inputs(Path(folder), head.hidden, head.weight, labels)
        started = time.perf_counter()

        def on_start(name: str) -> None:
            print(
                f"  measuring {hc.HEAD_NAMES[name]}: {opts.compare_steps} steps in a fresh process ... "
                f"({time.perf_counter() - started:.1f}s)",
                flush=True,
            )

        result = hc.compare(Path(folder), opts.compare_steps, device, on_start)
    heads, diffs = result["heads"], result["max_abs_diff_vs_naive"]
    print(f"  {'head':<20} {'s/step':>8} {'peak memory growth':>19}   max |diff| vs naive: log p, dH, dW")
    for name, r in heads.items():
        d = diffs.get(name)
        diff = "  ".join(f"{d[k]:.1e}" for k in ("logp", "grad_hidden", "grad_weight")) if d else "-"
        print(
            f"  {hc.HEAD_NAMES[name]:<20} {r['seconds_per_step']:>8.3f} {_mib(r['peak_growth_bytes']):>19}   {diff}"
        )
    for name, reason in result["skipped"].items():
        print(f"  {hc.HEAD_NAMES[name]:<20} skipped: {reason}")
    fused = heads["fused"]
    for name in ("trl", "naive"):
        if name in heads:
            other = heads[name]
            memory = _times(other["peak_growth_bytes"], fused["peak_growth_bytes"], "less", "more")
            speed = _times(other["seconds_per_step"], fused["seconds_per_step"], "faster", "slower")
            print(f"  prefuse vs {hc.HEAD_NAMES[name]}: {memory} peak memory, {speed} per step")
    print(
        f"  (memory: {fused['memory_measure']} growth over the steps; time: the fastest of steps "
        f"2..{opts.compare_steps}, robust to a busy machine)"
    )
    result["batch"] = {
        "rows": rows,
        "tokens": length,
        "scored": scored,
        "vocab": int(head.weight.shape[0]),
        "hidden_size": int(head.weight.shape[1]),
    }
    return result


# ---------------------------------------------------------------------------------------------- report
def training_curves(log_history: list[dict]) -> dict[str, list]:
    """``{"step": [...], "loss": [...], "margin": [...]}`` from the trainer's per-step training logs."""
    logs = [entry for entry in log_history if "loss" in entry and "step" in entry]
    curves = {"step": [e["step"] for e in logs], "loss": [e["loss"] for e in logs]}
    if logs and all("rewards/margins" in e for e in logs):
        curves["margin"] = [e["rewards/margins"] for e in logs]
    return curves


def write_report(folder: Path, report: dict) -> list[Path]:
    """``report.json`` and, with matplotlib, ``report.png`` in ``folder`` (created); the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "report.json"]
    written[0].write_text(json.dumps(report, indent=2) + "\n")
    try:
        import matplotlib
    except ImportError:
        print("  (no report.png: matplotlib is not installed -- pip install 'prefuse[plot]')")
        return written
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = report["training"]["curves"]
    panels = 2 if "margin" in curves else 1
    heads = report.get("head_comparison")
    fig, axes = plt.subplots(
        1, panels + (heads is not None), figsize=(5.5 * (panels + (heads is not None)), 4)
    )
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    for ax, key, title in zip(
        axes, ("loss", "margin"), ("training loss", "reward margin (chosen - rejected)")
    ):
        if key in curves:
            ax.plot(curves["step"], curves[key])
            ax.set_xlabel("step")
            ax.set_title(f"{report['settings']['method']}: {title}")
            ax.grid(alpha=0.3)
    if heads is not None:
        from prefuse.alignment.head_comparison import HEAD_NAMES

        ax = axes[-1]
        ax.axis("off")
        cells = [
            [HEAD_NAMES[name], f"{r['seconds_per_step']:.3f}", _mib(r["peak_growth_bytes"])]
            for name, r in heads["heads"].items()
        ]
        cells += [[HEAD_NAMES[name], "skipped", ""] for name in heads["skipped"]]
        table = ax.table(cellText=cells, colLabels=["lm-head", "s/step", "peak memory growth"], loc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(10)
        table.scale(1, 1.6)
        b = heads["batch"]
        ax.set_title(f"lm-head fwd+bwd, {b['rows']}x{b['tokens']} tokens, vocab {b['vocab']}")
    fig.tight_layout()
    fig.savefig(folder / "report.png", dpi=110)
    plt.close(fig)
    written.append(folder / "report.png")
    return written


# ---------------------------------------------------------------------------------------------- main
def run(opts, argv: list[str]) -> dict:
    """The main job (module docstring); returns the report it writes."""
    print(
        f"prefuse {version()} -- setting up: tokenizer, tiny Llama, bundled data (nothing downloaded) ...",
        flush=True,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(
        prefix="prefuse-trainer-"
    ) as trainer_dir:  # the trainer writes nothing kept
        import torch

        trainer, tokenizer = build_job(opts, trainer_dir)
        trainer.add_callback(_progress_callback(opts.steps, opts.log_every, started))
        model = trainer.model
        n_params = sum(p.numel() for p in model.parameters())
        cfg = model.config
        unit = "rows" if opts.method in UNPAIRED else "pairs"
        print(f"  {opts.method} on a tiny Llama, {trainer.args.device.type}, torch {torch.__version__}")
        print(
            f"  model     : LlamaForCausalLM hidden={cfg.hidden_size} layers={cfg.num_hidden_layers} "
            f"vocab={cfg.vocab_size} (tokenizer {len(tokenizer)} + padding rows), {n_params / 1e6:.2f}M parameters"
        )
        print("  tokenizer : byte-level BPE trained locally on the bundled data, chat template")
        print(
            f"  data      : bundled preference set, {len(trainer.train_dataset)} train / "
            f"{len(trainer.eval_dataset)} test {unit}"
        )
        print(f"  loss      : prefuse.alignment.{trainer.loss_module!r}")
        if opts.padding_free:
            print(
                "  batches   : packed, one row of the batch's tokens per step, no padding; attention "
                f"{cfg._attn_implementation} (each sequence alone)"
            )
        reference = (
            "none (a reference-free loss)"
            if trainer.ref_source == "none"
            else (f"{trainer.ref_source.replace('_', ' ')} of the initial policy")
        )
        print(f"  reference : {reference} ({time.perf_counter() - started:.1f}s)")
        print("evaluating before training ...", flush=True)
        before = trainer.evaluate()
        print(f"eval before : {_format(before, 'eval_')}")
        batch = f"batch {opts.batch_size} {'x2 rows' if opts.method in UNPAIRED else 'pairs'}"
        print(f"training {opts.steps} steps ({batch}, lr {opts.lr:g})", flush=True)
        trainer.train()
        print("evaluating after training ...", flush=True)
        after = trainer.evaluate()
        print(f"eval after  : {_format(after, 'eval_')}")
        print(f"trained in {time.perf_counter() - started:.1f}s", flush=True)
        report = {
            "prefuse": version(),
            "command": ["prefuse", *argv],
            "settings": vars(opts),
            "environment": {
                "device": trainer.args.device.type,
                "torch": torch.__version__,
                "python": sys.version.split()[0],
            },
            "model": {
                "hidden_size": cfg.hidden_size,
                "layers": cfg.num_hidden_layers,
                "vocab": cfg.vocab_size,
                "parameters": n_params,
            },
            "loss": repr(trainer.loss_module),
            "eval_before": before,
            "eval_after": after,
            "training": {
                "seconds": time.perf_counter() - started,
                "curves": training_curves(trainer.state.log_history),
                "log_history": trainer.state.log_history,
            },
        }
        if opts.compare_steps > 0:
            report["head_comparison"] = compare_heads(trainer, opts)
    written = write_report(Path(opts.output_dir), report)
    print(f"\nreport: {', '.join(str(p) for p in written)}")
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["self-play"]:
        from prefuse.alignment.selfplay.cli import main as self_play

        return self_play(argv[1:])
    parser = build_parser()
    opts = parser.parse_args(argv)
    check_args(parser, opts)
    run(opts, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
