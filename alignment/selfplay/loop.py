"""The self-play loop of the SPPO and GPO seeds: sample, score, estimate, train, refresh the reference, repeat.

Round ``k`` (``1 … iterations``), with ``π_{k−1}`` the current policy (``π_0`` the initial one):

1. **generate** -- ``K`` responses per prompt of the round sampled from ``π_{k−1}``
   (``iter{k}/samples``);
2. **score** -- every prompt's ``K × K`` preference table, SPPO win rates / GPO scores, and the training pairs
   (``iter{k}/scored/tables``, ``iter{k}/scored/pairs``: ``prompt``, ``chosen``, ``rejected``, ``p_chosen``,
   ``p_rejected``, ``s_chosen``, ``s_rejected``, as ``PreferenceTrainer`` reads them);
3. **train** -- ``PreferenceTrainer`` (SPPO or GPO loss) on the pairs with ``π_{k−1}`` as the reference, through
   ``run_iterations`` (round ``k``'s policy is round ``k + 1``'s reference); the result is saved in the Hugging
   Face format (``iter{k}/policy``, with ``train_log.json``);
4. **evaluate** -- responses of ``π_k`` to the evaluation prompts scored against ``π_0``'s (``iter{k}/eval``),
   and ``report.json`` / ``report.png`` rewritten.

Prompts: ``protocol="split"`` gives round ``k`` the ``k``-th of ``iterations`` contiguous parts (the seeds'
UltraFeedback split in three); ``"reuse"`` gives every round all prompts.

Resuming: every stage output is written atomically and a stage whose output exists is skipped, so calling
``run_self_play`` again with the same arguments after a kill continues from the last finished stage (the last
saved policy is loaded from disk) and, the sampling and training being seeded per stage, reaches the same
result as an uninterrupted run. A kill during training repeats that round's training from its start.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from prefuse.alignment.selfplay.estimates import METHODS, preference_rows, preference_scores, win_rates
from prefuse.alignment.selfplay.generation import BACKENDS, SamplingOptions, generate_responses
from prefuse.alignment.selfplay.preference import PreferenceModel
from prefuse.alignment.selfplay.report import write_report
from prefuse.alignment.selfplay.stages import (
    completed,
    dataset_stage,
    read_json,
    write_atomically,
    write_json,
)
from torch import nn

PROTOCOLS = ("split", "reuse")


@dataclass
class SelfPlayConfig:
    """Options of ``run_self_play``.

    ``beta``, ``learning_rate``, ``num_train_epochs``, ``batch_size``, ``max_length``, ``max_prompt_length`` go
    to every round's ``PreferenceConfig`` (``beta=None``: the method's default, 0.001 as in the seeds);
    ``training`` holds any other ``PreferenceConfig`` field. ``eval_samples`` responses per evaluation prompt
    are compared with the initial policy's. ``policy_path`` is the initial policy's folder (vLLM loads the
    policy from a folder). ``trust_remote_code`` applies when saved policies are loaded back.
    """

    output_dir: str
    method: str = "sppo"
    iterations: int = 3
    protocol: str = "split"
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    backend: str = "transformers"
    policy_path: str | None = None
    eval_samples: int = 2
    score_batch_size: int = 8
    seed: int = 0
    beta: float | None = None
    learning_rate: float = 5e-7
    num_train_epochs: float = 1.0
    batch_size: int = 8
    max_length: int = 1024
    max_prompt_length: int = 512
    training: dict = field(default_factory=dict)
    trust_remote_code: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("iterations", "eval_samples", "score_batch_size", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.sampling, SamplingOptions):
            raise ValueError(f"sampling must be a SamplingOptions, got {type(self.sampling).__name__}")


@dataclass
class SelfPlayResult:
    """``model``: the last policy; ``report``: the per-iteration entries of ``report.json``."""

    model: nn.Module
    report: list[dict]


def round_prompts(prompts: Sequence[str], iterations: int, protocol: str) -> list[list[str]]:
    """The prompts of each round: contiguous parts as even as possible (``"split"``) or all (``"reuse"``)."""
    prompts = list(prompts)
    if protocol == "reuse":
        return [prompts] * iterations
    if len(prompts) < iterations:
        raise ValueError(
            f"protocol 'split' needs at least one prompt per iteration: {len(prompts)} prompts for "
            f"{iterations} iterations"
        )
    size, extra = divmod(len(prompts), iterations)
    bounds = [k * size + min(k, extra) for k in range(iterations + 1)]
    return [prompts[bounds[k] : bounds[k + 1]] for k in range(iterations)]


class SelfPlay:
    """One self-play run (module docstring); ``run_self_play`` builds and runs it."""

    def __init__(
        self,
        policy: nn.Module,
        tokenizer,
        preference: PreferenceModel,
        prompts: Sequence[str],
        config: SelfPlayConfig,
        eval_prompts: Sequence[str] | None = None,
        on_stage: Callable[[int, str], None] | None = None,
    ) -> None:
        if not isinstance(preference, PreferenceModel):
            raise ValueError(
                "preference must be a PreferenceModel (PairRanker, GeneralPreferenceModel or "
                "CallablePreference wrapping a score(prompt, responses) function)"
            )
        if (
            isinstance(prompts, str)
            or not prompts
            or not all(isinstance(p, str) and p.strip() for p in prompts)
        ):
            raise ValueError("prompts must be a non-empty list of non-blank strings")
        self.policy, self.tokenizer, self.preference, self.config = policy, tokenizer, preference, config
        self.rounds = round_prompts(prompts, config.iterations, config.protocol)
        self.eval_prompts = list(eval_prompts) if eval_prompts is not None else list(prompts[:8])
        if not self.eval_prompts:
            raise ValueError("eval_prompts must not be empty")
        self.on_stage = on_stage
        self.out = config.output_dir

    # ------------------------------------------------------------------------------------------ paths
    def path(self, k: int, *parts: str) -> str:
        return os.path.join(self.out, f"iter{k}", *parts)

    def _done(self, k: int, stage: str) -> None:
        if self.on_stage is not None:
            self.on_stage(k, stage)

    def _log(self, message: str) -> None:
        if self.config.progress:
            print(message, flush=True)

    # ------------------------------------------------------------------------------------------ stages
    def _sample(self, model, prompts, samples: int, seed: int, desc: str, model_path: str | None):
        from datasets import Dataset

        options = SamplingOptions(**{**self.config.sampling.__dict__, "samples": samples})
        responses, lengths = generate_responses(
            model,
            self.tokenizer,
            prompts,
            options,
            seed=seed,
            backend=self.config.backend,
            model_path=model_path,
            progress=self.config.progress,
            desc=desc,
        )
        return Dataset.from_dict({"prompt": list(prompts), "responses": responses, "lengths": lengths})

    def generate(self, k: int, model, model_path: str | None):
        path = self.path(k, "samples")
        self._log(f"[iter {k}] generate: {'found ' + path if completed(path) else 'sampling'}")
        samples = self.config.sampling.samples
        data = dataset_stage(
            path,
            lambda: self._sample(
                model,
                self.rounds[k - 1],
                samples,
                self.config.seed + 100_000 * k,
                f"iter {k} generate",
                model_path,
            ),
        )
        self._done(k, "generate")
        return data

    def score(self, k: int, samples):
        from datasets import Dataset, load_from_disk
        from tqdm.auto import tqdm

        path = self.path(k, "scored")
        self._log(f"[iter {k}] score: {'found ' + path if completed(path) else 'scoring'}")
        if not completed(path):
            prompts, responses = samples["prompt"], samples["responses"]
            step = self.config.score_batch_size
            parts = [
                self.preference.tables(prompts[i : i + step], responses[i : i + step])
                for i in tqdm(
                    range(0, len(prompts), step),
                    desc=f"iter {k} score",
                    disable=not self.config.progress,
                    leave=False,
                )
            ]
            scores, probabilities = torch.cat([s for s, _ in parts]), torch.cat([p for _, p in parts])
            tables = Dataset.from_dict({
                "prompt": prompts, "responses": responses, "scores": scores.tolist(),
                "probabilities": probabilities.tolist(), "win_rates": win_rates(probabilities).tolist(),
                "preference_scores": preference_scores(scores).tolist()})  # fmt: skip
            rows = preference_rows(prompts, responses, scores, probabilities, method=self.config.method)
            if not rows:
                raise ValueError(
                    f"iteration {k}: every prompt's chosen or rejected response is blank; nothing to "
                    "train on (raise max_new_tokens or check the policy's generations)"
                )
            pairs = Dataset.from_list(rows)

            def save(tmp: str) -> None:
                tables.save_to_disk(os.path.join(tmp, "tables"))
                pairs.save_to_disk(os.path.join(tmp, "pairs"))

            write_atomically(path, save)
        self._done(k, "score")
        return load_from_disk(os.path.join(path, "pairs"))

    def save_policy(self, k: int, model, log_history: list[dict]) -> None:
        def save(tmp: str) -> None:
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            write_json(os.path.join(tmp, "train_log.json"), log_history)

        write_atomically(self.path(k, "policy"), save)
        self._done(k, "train")

    def load_policy(self, k: int, like: nn.Module) -> nn.Module:
        from transformers import AutoModelForCausalLM

        param = next(like.parameters())
        model = AutoModelForCausalLM.from_pretrained(
            self.path(k, "policy"), dtype=param.dtype, trust_remote_code=self.config.trust_remote_code
        )
        return model.to(param.device)

    def policy_path(self, k: int) -> str | None:
        return self.config.policy_path if k == 0 else self.path(k, "policy")

    def initial_eval(self, model):
        path = os.path.join(self.out, "initial_eval")
        self._log(
            f"[iter 0] evaluate: {'found ' + path if completed(path) else 'sampling the initial policy'}"
        )
        data = dataset_stage(
            path,
            lambda: self._sample(
                model,
                self.eval_prompts,
                self.config.eval_samples,
                self.config.seed + 50_000,
                "initial eval",
                self.policy_path(0),
            ),
        )
        self._done(0, "eval")
        return data

    def evaluate(self, k: int, model, initial):
        """``π_k``'s evaluation responses and, per prompt, their mean win rate against ``π_0``'s."""
        path = self.path(k, "eval")
        self._log(
            f"[iter {k}] evaluate: {'found ' + path if completed(path) else 'against the initial policy'}"
        )

        def build():
            data = self._sample(
                model,
                self.eval_prompts,
                self.config.eval_samples,
                self.config.seed + 100_000 * k + 50_000,
                f"iter {k} eval",
                self.policy_path(k),
            )
            m = self.config.eval_samples
            both = [a + b for a, b in zip(data["responses"], initial["responses"])]
            step = self.config.score_batch_size
            probs = torch.cat(
                [
                    self.preference.probability_batch(self.eval_prompts[i : i + step], both[i : i + step])
                    for i in range(0, len(both), step)
                ]
            )
            return data.add_column("win_rate", probs[:, :m, m:].mean((1, 2)).tolist())

        data = dataset_stage(path, build)
        self._done(k, "eval")
        return data

    # ------------------------------------------------------------------------------------------ report
    def report(self, upto: int, initial) -> list[dict]:
        from datasets import load_from_disk

        def mean(rows) -> float:
            values = [x for row in rows for x in (row if isinstance(row, list) else [row])]
            return sum(values) / max(len(values), 1)

        entries = [
            {
                "iteration": 0,
                "win_rate_vs_initial": 0.5,
                "eval_response_tokens": mean(initial["lengths"]),
                "sample_response_tokens": None,
            }
        ]
        for k in range(1, upto + 1):
            evaluation = load_from_disk(self.path(k, "eval"))
            samples = load_from_disk(self.path(k, "samples"))
            pairs = load_from_disk(self.path(k, "scored", "pairs"))
            log = read_json(self.path(k, "policy", "train_log.json"))
            losses = [e["train_loss"] for e in log if "train_loss" in e]
            entries.append({
                "iteration": k, "win_rate_vs_initial": mean(evaluation["win_rate"]),
                "eval_response_tokens": mean(evaluation["lengths"]), "sample_response_tokens": mean(samples["lengths"]),
                "prompts": len(samples), "pairs": len(pairs), "mean_p_chosen": mean(pairs["p_chosen"]),
                "mean_p_rejected": mean(pairs["p_rejected"]), "mean_s_chosen": mean(pairs["s_chosen"]),
                "mean_s_rejected": mean(pairs["s_rejected"]), "train_loss": losses[-1] if losses else None,
            })  # fmt: skip
        write_report(entries, os.path.join(self.out, "report.json"), os.path.join(self.out, "report.png"))
        return entries

    # ------------------------------------------------------------------------------------------ run
    def training_args(self):
        from prefuse.alignment.trainer import PreferenceConfig

        c = self.config
        options = dict(
            output_dir=os.path.join(self.out, "trainer"), method=c.method, beta=c.beta, learning_rate=c.learning_rate,
            num_train_epochs=c.num_train_epochs, per_device_train_batch_size=c.batch_size, max_length=c.max_length,
            max_prompt_length=c.max_prompt_length, seed=c.seed, data_seed=c.seed, save_strategy="no",
            eval_strategy="no", report_to="none", logging_strategy="no", disable_tqdm=not c.progress,
            dataloader_num_workers=0,
        )  # fmt: skip
        options.update(c.training)
        return PreferenceConfig(**options)

    def run(self) -> SelfPlayResult:
        from prefuse.alignment.iterative import run_iterations

        iterations = self.config.iterations
        initial = self.initial_eval(self.policy)
        start = 0
        while start < iterations and completed(self.path(start + 1, "policy")):
            start += 1
        for k in range(1, start + 1):  # rounds trained before a kill during their evaluation
            if not completed(self.path(k, "eval")):
                self.evaluate(k, self.load_policy(k, self.policy), initial)
        model = self.policy if start == 0 else self.load_policy(start, self.policy)
        if start:
            self._log(f"resuming after iteration {start} (policy loaded from {self.path(start, 'policy')})")
        if start < iterations:

            def data(j: int, current: nn.Module):
                k = start + j + 1
                samples = self.generate(k, current, self.policy_path(k - 1))
                pairs = self.score(k, samples)
                self._log(f"[iter {k}] train: {len(pairs)} pairs, reference = policy {k - 1}")
                return pairs

            def finish(j: int, trainer) -> None:
                k = start + j + 1
                self.save_policy(k, trainer.model, trainer.state.log_history)
                self.evaluate(k, trainer.model, initial)
                self.report(k, initial)

            model = run_iterations(
                model,
                data,
                args=self.training_args(),
                iterations=iterations - start,
                processing_class=self.tokenizer,
                on_iteration_end=finish,
            ).model
        return SelfPlayResult(model, self.report(iterations, initial))


def run_self_play(
    policy: nn.Module,
    tokenizer,
    preference: PreferenceModel,
    prompts: Sequence[str],
    config: SelfPlayConfig,
    *,
    eval_prompts: Sequence[str] | None = None,
    on_stage: Callable[[int, str], None] | None = None,
) -> SelfPlayResult:
    """Run (or resume) ``config.iterations`` rounds of SPPO / GPO self-play (module docstring).

    Args:
        policy: the initial policy, a ``transformers`` causal LM (trained in place in the first round run).
        tokenizer: its tokenizer (chat template used when it has one).
        preference: a ``PairRanker``, a ``GeneralPreferenceModel`` or a ``CallablePreference``.
        prompts: the training prompts (strings), split or reused per ``config.protocol``.
        config: a ``SelfPlayConfig``.
        eval_prompts: prompts of the win rate against the initial policy (default: the first 8 prompts).
        on_stage: called as ``on_stage(k, stage)`` when a stage of round ``k`` is complete on disk
            (``"generate"``, ``"score"``, ``"train"``, ``"eval"``; round 0 is the initial evaluation).
    """
    return SelfPlay(policy, tokenizer, preference, prompts, config, eval_prompts, on_stage).run()
