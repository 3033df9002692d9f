"""``prefuse self-play``: SPPO / GPO self-play rounds, by default on a tiny policy and preference model (CPU,
no downloads), or on Hugging Face folders given with ``--policy`` / ``--preference-path``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefuse self-play",
        description="Self-play preference optimisation (SPPO / GPO): sample K responses per prompt from the policy, "
        "score every pair with a preference model, train on the estimated win rates / scores with the "
        "previous policy as reference, repeat. Resumable: rerun the same command after a kill.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--method", choices=("sppo", "gpo"), default="sppo", help="loss and estimate")
    parser.add_argument("--iterations", type=int, default=2, help="self-play rounds")
    parser.add_argument(
        "--protocol",
        choices=("split", "reuse"),
        default="split",
        help="split: a new part of the prompts per round; reuse: all prompts every round",
    )
    parser.add_argument("--prompts", type=int, default=24, help="bundled training prompts used (all rounds)")
    parser.add_argument("--prompts-file", default=None, help="a text file of prompts, one per line (instead)")
    parser.add_argument("--samples", type=int, default=4, help="K responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--generation-batch-size", type=int, default=8, help="prompts per generate call")
    parser.add_argument(
        "--backend",
        choices=("transformers", "vllm"),
        default="transformers",
        help="generation backend (vllm: needs the vllm package and --policy)",
    )
    parser.add_argument("--eval-prompts", type=int, default=8, help="held-out bundled prompts of the report")
    parser.add_argument("--eval-samples", type=int, default=2, help="responses per evaluation prompt")
    parser.add_argument(
        "--policy",
        default=None,
        help="initial policy: a Hugging Face causal-LM folder (default: a tiny Llama built from a config)",
    )
    parser.add_argument(
        "--preference",
        choices=("ranker", "gpm"),
        default=None,
        help="preference model kind (default: ranker for sppo, gpm for gpo)",
    )
    parser.add_argument(
        "--preference-path",
        default=None,
        help="a Hugging Face folder of the preference model (default: a tiny one built from a "
        "config and fitted on the bundled pairs)",
    )
    parser.add_argument(
        "--preference-callable",
        default=None,
        help="module:function returning a (K, K) table of P(i≻j) for (prompt, responses)",
    )
    parser.add_argument(
        "--fit-steps", type=int, default=20, help="fitting steps of the tiny preference model"
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=60,
        help="supervised warm-up steps of the tiny policy on the bundled answers",
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow remote code when loading models"
    )
    parser.add_argument(
        "--beta",
        type=float,
        default=None,
        help="β (default 0.1 for the tiny policy; the method's 0.001 for --policy)",
    )
    parser.add_argument(
        "--lr", type=float, default=None, help="learning rate (default 1e-3 tiny, 5e-7 --policy)"
    )
    parser.add_argument("--epochs", type=float, default=1.0, help="training epochs per round")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per training step")
    parser.add_argument("--max-length", type=int, default=256, help="max prompt+response tokens in training")
    parser.add_argument("--output-dir", default="selfplay-out", help="stage outputs, policies and the report")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or stage lines")
    return parser


def load_callable(spec: str):
    """``module:function`` -> the function (``ValueError`` naming ``--preference-callable`` otherwise)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--preference-callable must look like module:function, got {spec!r}")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"--preference-callable {spec!r} is not a callable")
    return fn


def build(opts):
    """``(policy, tokenizer, preference, prompts, eval_prompts, config)`` from the parsed options."""
    import torch
    from prefuse.alignment.data import build_tokenizer, read_records
    from prefuse.alignment.selfplay import (
        CallablePreference,
        GeneralPreferenceModel,
        PairRanker,
        SamplingOptions,
        SelfPlayConfig,
    )
    from prefuse.alignment.selfplay.default import (
        bundled_prompts,
        fit_preference_model,
        tiny_policy,
        tiny_preference_model,
        warm_up_policy,
    )

    device = ("cuda" if torch.cuda.is_available() else "cpu") if opts.device == "auto" else opts.device
    kind = opts.preference or ("ranker" if opts.method == "sppo" else "gpm")
    remote = opts.trust_remote_code
    if opts.policy is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(opts.policy, trust_remote_code=remote)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        policy = AutoModelForCausalLM.from_pretrained(opts.policy, trust_remote_code=remote)
    else:
        tokenizer = build_tokenizer()
        policy = tiny_policy(tokenizer, seed=opts.seed).to(device)
        warm_up_policy(
            policy,
            tokenizer,
            [r for r in read_records() if r["split"] == "train"],
            steps=opts.warmup_steps,
            batch_size=8,
            lr=5e-3,
            seed=opts.seed,
            progress=not opts.no_progress,
        )
    policy.to(device)
    if opts.preference_callable is not None:
        preference = CallablePreference(load_callable(opts.preference_callable))
    elif opts.preference_path is not None:
        cls = PairRanker if kind == "ranker" else GeneralPreferenceModel
        preference = cls.from_pretrained(opts.preference_path, trust_remote_code=remote)
        preference.to(device)
    else:
        preference = tiny_preference_model(kind, build_tokenizer(), seed=opts.seed)
        preference.to(device)
        records = [r for r in read_records() if r["split"] == "train"]
        fit_preference_model(
            preference,
            records,
            steps=opts.fit_steps,
            batch_size=8,
            seed=opts.seed,
            progress=not opts.no_progress,
        )
    if opts.prompts_file is not None:
        with open(opts.prompts_file, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    else:
        prompts = bundled_prompts("train")[: opts.prompts]
    eval_prompts = bundled_prompts("test")[: opts.eval_prompts]
    tiny = opts.policy is None
    config = SelfPlayConfig(
        output_dir=opts.output_dir, method=opts.method, iterations=opts.iterations, protocol=opts.protocol,
        sampling=SamplingOptions(samples=opts.samples, max_new_tokens=opts.max_new_tokens,
                                 temperature=opts.temperature, top_p=opts.top_p,
                                 batch_size=opts.generation_batch_size),
        backend=opts.backend, policy_path=opts.policy, eval_samples=opts.eval_samples, seed=opts.seed,
        beta=opts.beta if opts.beta is not None else (0.1 if tiny else None),
        learning_rate=opts.lr if opts.lr is not None else (1e-3 if tiny else 5e-7), num_train_epochs=opts.epochs,
        batch_size=opts.batch_size, max_length=opts.max_length, max_prompt_length=opts.max_length // 2,
        trust_remote_code=remote, progress=not opts.no_progress,
        training={"use_cpu": device == "cpu", "warmup_steps": 0, "lr_scheduler_type": "constant"},
    )  # fmt: skip
    return policy, tokenizer, preference, prompts, eval_prompts, config


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    for name in (
        "iterations",
        "prompts",
        "samples",
        "max_new_tokens",
        "eval_prompts",
        "eval_samples",
        "batch_size",
    ):
        if getattr(opts, name) < 1:
            raise SystemExit(f"prefuse self-play: --{name.replace('_', '-')} must be >= 1")
    for name in ("fit_steps", "warmup_steps"):
        if getattr(opts, name) < 0:
            raise SystemExit(f"prefuse self-play: --{name.replace('_', '-')} must be >= 0")
    from datasets.utils.logging import disable_progress_bar
    from prefuse.alignment.selfplay import run_self_play
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    disable_progress_bar()  # dataset saving and tokenising: the stages show their own bars
    started = time.perf_counter()
    try:
        policy, tokenizer, preference, prompts, eval_prompts, config = build(opts)
        result = run_self_play(policy, tokenizer, preference, prompts, config, eval_prompts=eval_prompts)
    except ValueError as err:
        raise SystemExit(f"prefuse self-play: {err}") from None
    print(
        f"\n{opts.method} self-play, {opts.iterations} iterations ({opts.protocol} prompts), preference model: "
        f"{type(preference).__name__}"
    )
    print(f"  {'iter':>4} {'win rate vs initial':>20} {'eval tokens':>12} {'pairs':>6} {'train loss':>11}")
    for e in result.report:
        loss = e.get("train_loss")
        print(
            f"  {e['iteration']:>4} {e['win_rate_vs_initial']:>20.3f} {e['eval_response_tokens']:>12.1f} "
            f"{e.get('pairs', '-'):>6} {'-' if loss is None else f'{loss:.4f}':>11}"
        )
    out = os.path.abspath(opts.output_dir)
    print(
        f"report: {os.path.join(out, 'report.json')}, {os.path.join(out, 'report.png')} "
        f"({time.perf_counter() - started:.1f}s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
