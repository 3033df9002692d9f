"""``prefuse`` / ``python -m prefuse.alignment``: train a tiny model with a prefuse loss, then measure the head.

On a fresh CPU machine, with no downloads, the main job

1. trains a byte-level BPE tokenizer on the bundled preference data and builds a tiny Llama from a config
   (its vocabulary padded to ``--vocab-size`` rows, so that the lm-head costs what it costs in real models);
2. trains ``--steps`` steps of ``--method`` through ``PreferenceTrainer`` with prefuse's fused head, showing
   progress (loss, reward margin, accuracy) and evaluating on the held-out split before and after;
3. replays the same first ``--compare-steps`` training steps (same initial weights, same batches) with the
   fused head and with the naive head (full logits, ``log_softmax``, gather -- what plain PyTorch and TRL do),
   each in a fresh subprocess, and prints the time per step and the peak memory each needed.

Memory is measured as the growth of the process's peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs`` just before the steps; ``ru_maxrss`` where that is unavailable) over the training
steps, one fresh process per head: on CPU, allocator caches make in-process ``torch`` counters meaningless,
and the peak RSS is what decides whether a job fits. On CUDA the peak of ``torch.cuda.max_memory_allocated``
over the steps is used instead.
"""

from __future__ import annotations

import os
import sys


def _drop_repo_root_from_path() -> None:
    """Run from a prefuse checkout, ``python -m`` puts the repo root on ``sys.path``, where transformers' probe
    for the PyPI package ``kernels`` would import the root folder ``kernels/`` (importable only as
    ``prefuse.kernels``): take such entries off the path before transformers is imported."""
    def is_checkout(path: str) -> bool:
        root = os.path.abspath(path or os.curdir)
        return all(os.path.isfile(os.path.join(root, d, "__init__.py")) for d in ("kernels", "alignment"))

    sys.path[:] = [p for p in sys.path if not is_checkout(p)]


_drop_repo_root_from_path()

import argparse
import json
import resource
import subprocess
import time

_SHOWN = (("loss", "loss", "{:.4f}"), ("rewards/margins", "margin", "{:+.3f}"), ("rewards/accuracies", "acc", "{:.2f}"),
          ("rewards/chosen", "chosen", "{:+.3f}"), ("rewards/rejected", "rejected", "{:+.3f}"), ("kl", "kl", "{:.3f}"),
          ("fg_loss", "fg_loss", "{:.4f}"))


def build_parser() -> argparse.ArgumentParser:
    from prefuse.alignment.methods import METHODS

    parser = argparse.ArgumentParser(
        prog="prefuse",
        description="Train a tiny Llama with a prefuse preference loss on the bundled data (CPU, no downloads), "
                    "then compare prefuse's fused lm-head with the naive full-logits head on the same steps.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--method", choices=tuple(METHODS), default="dpo", help="preference loss")
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step (KTO/FactAlign: 2x rows)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (AdamW, constant after warmup)")
    parser.add_argument("--beta", type=float, default=None,
                        help="β (default: the method's as in the seeds, but 0.1 for SPPO/GPO, whose seeds' 0.001 "
                             "(η = 1000) is sized for 8B models' long completions)")
    parser.add_argument("--loss-type", default="sigmoid", help="DPO loss type")
    parser.add_argument("--hidden-size", type=int, default=64, help="model width")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers")
    parser.add_argument("--vocab-size", type=int, default=32768,
                        help="lm-head rows (the tokenizer's 512 tokens, padded: a real model's head cost)")
    parser.add_argument("--max-length", type=int, default=96, help="max prompt+completion tokens")
    parser.add_argument("--log-every", type=int, default=5, help="steps between progress lines")
    parser.add_argument("--compare-steps", type=int, default=4, help="steps replayed per head (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--output-dir", default="prefuse-out", help="trainer output folder (nothing is saved)")
    parser.add_argument("--head", choices=("fused", "naive"), default="fused", help=argparse.SUPPRESS)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one comparison run
    return parser


# ---------------------------------------------------------------------------------------------- setup
def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def build_job(opts, *, steps: int, head: str = "fused"):
    """``(trainer, tokenizer)`` of the main job: the same model, data and batches for every head and run."""
    import torch
    from prefuse.alignment.data import build_tokenizer, load_preference_data
    from prefuse.alignment.methods import get_method
    from prefuse.alignment.trainer import PreferenceConfig, PreferenceTrainer
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    device = _device(opts.device)
    tokenizer = build_tokenizer()
    vocab = max(opts.vocab_size, len(tokenizer))
    config = LlamaConfig(vocab_size=vocab, hidden_size=opts.hidden_size, intermediate_size=2 * opts.hidden_size,
                         num_hidden_layers=opts.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max(128, opts.max_length), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(opts.seed)
    model = LlamaForCausalLM(config)
    unpaired = not get_method(opts.method).paired
    view = "unpaired" if unpaired else "paired"
    beta = opts.beta if opts.beta is not None else (0.1 if opts.method in ("sppo", "gpo") else None)
    args = PreferenceConfig(
        output_dir=opts.output_dir, method=opts.method, beta=beta, loss_type=opts.loss_type,
        per_device_train_batch_size=opts.batch_size * (2 if unpaired else 1),
        per_device_eval_batch_size=opts.batch_size * (2 if unpaired else 1), max_steps=steps,
        learning_rate=opts.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=min(10, steps // 10),
        weight_decay=0.0, logging_steps=opts.log_every, save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=device == "cpu", seed=opts.seed, data_seed=opts.seed,
        max_length=opts.max_length, max_prompt_length=opts.max_length // 2, head=head, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = PreferenceTrainer(model, args=args, train_dataset=load_preference_data(view, "train"),
                                eval_dataset=load_preference_data(view, "test"), processing_class=tokenizer)
    return trainer, tokenizer


def _quiet_printer(trainer) -> None:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def _format(logs: dict, prefix: str = "") -> str:
    parts = []
    for key, name, fmt in _SHOWN:
        if prefix + key in logs:
            parts.append(f"{name} {fmt.format(logs[prefix + key])}")
    return "  ".join(parts)


def _progress_callback(total: int, started: float):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                width = len(str(total))
                print(f"  step {state.global_step:>{width}}/{total}  {_format(logs)}  "
                      f"({time.perf_counter() - started:.1f}s)", flush=True)

    return Progress()


# ---------------------------------------------------------------------------------------------- measurement
def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def measure(opts) -> dict:
    """Run ``--compare-steps`` training steps with ``--head`` in this (fresh) process; time and peak memory."""
    import torch
    from transformers import TrainerCallback

    trainer, _ = build_job(opts, steps=opts.compare_steps, head=opts.head)
    _quiet_printer(trainer)
    cuda = trainer.args.device.type == "cuda"
    marks: dict = {"step_times": [], "losses": []}

    class Meter(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                marks["base"] = torch.cuda.memory_allocated()
            else:
                marks["clear_refs"] = _reset_peak()
                marks["base"] = (_rss_kib("VmRSS") if marks["clear_refs"] else
                                 resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            marks["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            marks["step_times"].append(time.perf_counter() - marks["t0"])

    trainer.add_callback(Meter())
    original = trainer.compute_loss

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = original(model, inputs, return_outputs, num_items_in_batch)
        marks["losses"].append(float((loss[0] if return_outputs else loss).detach()))
        return loss

    trainer.compute_loss = compute_loss
    trainer.train()
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    elif marks["clear_refs"]:
        peak = _rss_kib("VmHWM") * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = marks["step_times"]
    steady = times[1:] if len(times) > 1 else times  # step 1 pays one-off allocations
    return {"head": opts.head, "device": trainer.args.device.type, "peak_growth_bytes": max(peak - marks["base"], 0),
            "seconds_per_step": min(steady), "step_seconds": times, "losses": marks["losses"],
            "memory_measure": "cuda max_memory_allocated" if cuda else (
                "peak RSS (VmHWM)" if marks["clear_refs"] else "peak RSS (ru_maxrss)")}


def _run_measurement(argv: list[str], head: str) -> dict:
    cmd = [sys.executable, "-m", "prefuse.alignment.cli", *argv, "--measure", "--head", head]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {head} measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def compare_heads(argv: list[str], opts) -> dict:
    print(f"\nfused vs naive lm-head: the first {opts.compare_steps} training steps again, same initial weights "
          "and batches, one fresh process per head", flush=True)
    results = {head: _run_measurement(argv, head) for head in ("naive", "fused")}
    print(f"  {'head':<6} {'s/step':>8} {'peak memory growth':>19}   loss per step")
    for head in ("naive", "fused"):
        r = results[head]
        losses = " ".join(f"{x:.5f}" for x in r["losses"])
        print(f"  {head:<6} {r['seconds_per_step']:>8.3f} {_mib(r['peak_growth_bytes']):>19}   {losses}")
    naive, fused = results["naive"], results["fused"]
    saved = naive["peak_growth_bytes"] - fused["peak_growth_bytes"]
    ratio = naive["peak_growth_bytes"] / max(fused["peak_growth_bytes"], 1)
    speed = naive["seconds_per_step"] / max(fused["seconds_per_step"], 1e-9)
    same = max((abs(a - b) for a, b in zip(naive["losses"], fused["losses"])), default=0.0)
    print(f"  prefuse saved {_mib(saved)} of peak memory ({ratio:.1f}x less) and ran {speed:.2f}x "
          f"{'faster' if speed >= 1 else 'slower'} per step; the losses agree to {same:.1e}")
    print(f"  (memory: {fused['memory_measure']} growth over the steps; time: the fastest of steps "
          f"2..{opts.compare_steps}, robust to a busy machine)")
    return results


# ---------------------------------------------------------------------------------------------- main
def run(opts, argv: list[str]) -> dict:
    import torch

    started = time.perf_counter()
    trainer, tokenizer = build_job(opts, steps=opts.steps)
    _quiet_printer(trainer)
    trainer.add_callback(_progress_callback(opts.steps, started))
    model = trainer.model
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    print(f"prefuse {_version()} -- {opts.method} on a tiny Llama, {trainer.args.device.type}, torch "
          f"{torch.__version__}, nothing downloaded")
    print(f"  model     : LlamaForCausalLM hidden={cfg.hidden_size} layers={cfg.num_hidden_layers} "
          f"vocab={cfg.vocab_size} (tokenizer {len(tokenizer)} + padding rows), {n_params / 1e6:.2f}M parameters")
    print("  tokenizer : byte-level BPE trained locally on the bundled data, chat template")
    print(f"  data      : bundled preference set, {len(trainer.train_dataset)} train / {len(trainer.eval_dataset)} "
          f"test {'pairs' if trainer.spec.paired else 'rows'}")
    print(f"  loss      : prefuse.alignment.{trainer.loss_module!r}")
    if trainer.ref_source == "none":
        print("  reference : none (reference-free loss)")
    else:
        print(f"  reference : {trainer.ref_source.replace('_', ' ')} of the initial policy")
    before = trainer.evaluate()
    print(f"eval before : {_format(before, 'eval_')}")
    unit = "pairs" if trainer.spec.paired else "x2 rows"
    print(f"training {opts.steps} steps (batch {opts.batch_size} {unit}, lr {opts.lr:g})", flush=True)
    trainer.train()
    after = trainer.evaluate()
    print(f"eval after  : {_format(after, 'eval_')}")
    print(f"trained in {time.perf_counter() - started:.1f}s", flush=True)
    result = {"eval_before": before, "eval_after": after, "log_history": trainer.state.log_history}
    if opts.compare_steps > 0:
        result["heads"] = compare_heads(argv, opts)
    return result


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prefuse")
    except PackageNotFoundError:  # pragma: no cover
        return "(dev)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = build_parser().parse_args(argv)
    if opts.measure:
        print(json.dumps(measure(opts)))
        return 0
    for name in ("steps", "batch_size", "layers", "hidden_size", "log_every"):
        if getattr(opts, name) < 1:
            raise SystemExit(f"prefuse: --{name.replace('_', '-')} must be >= 1")
    if opts.compare_steps < 0:
        raise SystemExit("prefuse: --compare-steps must be >= 0")
    run(opts, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
