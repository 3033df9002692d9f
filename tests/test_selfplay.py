"""Self-play (SPPO / GPO): estimators against hand-made tables, the preference models against their direct
formulas, the resumable loop against an uninterrupted run, and the ``prefuse self-play`` command."""

import json
import os
import sys

import processes
import pytest
import torch
from datasets import load_from_disk
from prefuse.alignment.data import build_tokenizer
from prefuse.alignment.selfplay import (
    CallablePreference,
    GeneralPreferenceModel,
    PairRanker,
    SamplingOptions,
    SelfPlayConfig,
    generate_responses,
    preference_rows,
    preference_scores,
    round_prompts,
    run_self_play,
    select_pair,
    skew_operator,
    win_rates,
)
from prefuse.alignment.selfplay import loop as loop_module
from prefuse.alignment.selfplay.default import bundled_prompts, tiny_policy, tiny_preference_model
from prefuse.alignment.selfplay.generation import vllm_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# P(i≻j) for three responses; the diagonal holds junk that the estimator must read as ½
TABLE = torch.tensor([[0.9, 0.8, 0.6],
                      [0.2, 0.1, 0.3],
                      [0.4, 0.7, 0.0]])  # fmt: skip
RESPONSES = ["first", "second", "third"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


PROMPTS = ["What is 7 plus 2?", "What colour is snow?", "How many legs does a cat have?"]
GROUPS = [
    ["7 plus 2 is 9.", "Whatever. It is 10.", "Sure! 9.", "No idea."],
    ["Snow is white.", "Snow is blue.", "White, of course.", "Ugh, okay. Black."],
    ["A cat has 4 legs.", "A cat has 3 legs.", "Four.", "Not sure, honestly."],
]


# ---------------------------------------------------------------------------------------------- estimates
def test_win_rates_hand_made_table():
    expected = torch.tensor(
        [(0.5 + 0.8 + 0.6) / 3, (0.2 + 0.5 + 0.3) / 3, (0.4 + 0.7 + 0.5) / 3], dtype=torch.float64
    )
    torch.testing.assert_close(win_rates(TABLE), expected)
    torch.testing.assert_close(win_rates(TABLE.expand(2, 3, 3)), expected.expand(2, 3))
    assert select_pair(win_rates(TABLE)) == (0, 1)
    assert select_pair(torch.tensor([0.3, 0.3, 0.1])) == (0, 2)  # first index on ties


def test_preference_scores_hand_made_table():
    s = torch.tensor([[0.0, 1.0, -2.0], [-1.0, 0.0, 0.5], [2.0, -0.5, 0.0]])
    junk = s.clone().fill_diagonal_(7.0)
    expected = torch.tensor([-1.0 / 3, -0.5 / 3, 1.5 / 3], dtype=torch.float64)
    torch.testing.assert_close(preference_scores(junk), expected)
    assert select_pair(preference_scores(s)) == (2, 0)


def test_preference_rows_select_as_sppo_and_gpo():
    scores = torch.logit(TABLE.clone().fill_diagonal_(0.5))
    probabilities = TABLE.clone().fill_diagonal_(0.5)
    (row,) = preference_rows(["p"], [RESPONSES], scores[None], probabilities[None], method="sppo")
    assert (row["chosen"], row["rejected"]) == ("first", "second")
    assert row["p_chosen"] == pytest.approx(1.9 / 3) and row["p_rejected"] == pytest.approx(1.0 / 3)
    assert row["p_chosen_over_rejected"] == pytest.approx(0.8)
    means = preference_scores(scores)
    assert row["s_chosen"] == pytest.approx(float(means[0])) and row["s_rejected"] == pytest.approx(
        float(means[1])
    )
    # GPO picks by the mean score, which can disagree with the mean probability
    s = torch.tensor([[0.0, 0.1, 0.1], [-0.1, 0.0, 3.0], [-0.1, -3.0, 0.0]])
    (gpo,) = preference_rows(["p"], [RESPONSES], s[None], torch.sigmoid(s)[None], method="gpo")
    assert (gpo["chosen"], gpo["rejected"]) == ("second", "third")
    assert gpo["s_chosen"] == pytest.approx(2.9 / 3) and gpo["s_rejected"] == pytest.approx(-3.1 / 3)
    # a blank chosen/rejected response drops the prompt (the trainer rejects blank completions)
    assert (
        preference_rows(["p"], [["first", " ", "x"]], scores[None], probabilities[None], method="sppo") == []
    )


def test_estimates_reject_bad_input():
    with pytest.raises(ValueError, match="probabilities must lie"):
        win_rates(TABLE + 1)
    with pytest.raises(ValueError, match="probabilities must be a"):
        win_rates(torch.ones(3, 2))
    with pytest.raises(ValueError, match="scores must be finite"):
        preference_scores(torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="method"):
        preference_rows(["p"], [RESPONSES], TABLE[None], TABLE[None], method="dpo")


def test_round_prompts_split_and_reuse():
    prompts = [f"q{i}" for i in range(7)]
    parts = round_prompts(prompts, 3, "split")
    assert parts == [["q0", "q1", "q2"], ["q3", "q4"], ["q5", "q6"]]
    assert round_prompts(prompts, 2, "reuse") == [prompts, prompts]
    with pytest.raises(ValueError, match="at least one prompt per iteration"):
        round_prompts(prompts[:2], 3, "split")


# ---------------------------------------------------------------------------------------------- GPM
def test_skew_operator_blocks():
    r = skew_operator(torch.tensor([1.0, 2.5]))
    expected = torch.tensor([[0, -1, 0, 0], [1, 0, 0, 0], [0, 0, 0, -2.5], [0, 0, 2.5, 0]])
    torch.testing.assert_close(r, expected)
    torch.testing.assert_close(r.T, -r)


def test_gpm_scores_skew_symmetric_and_direct_formula(tokenizer):
    gpm = tiny_preference_model("gpm", tokenizer, seed=3)
    gpm.block_scales.copy_(torch.tensor([0.7, 1.9]))
    scores = gpm.score_batch(PROMPTS, GROUPS)
    assert scores.shape == (3, 4, 4)
    assert torch.equal(scores, -scores.transpose(1, 2))
    assert torch.equal(torch.diagonal(scores, dim1=1, dim2=2), torch.zeros(3, 4))
    # direct: one embedding per conversation, s(i≻j) = v_iᵀ R v_j in float64 with R written out
    r = torch.zeros(4, 4, dtype=torch.float64)
    r[0, 1], r[1, 0], r[2, 3], r[3, 2] = -0.7, 0.7, -1.9, 1.9
    gpm.eval()
    with torch.no_grad():
        for n, (prompt, group) in enumerate(zip(PROMPTS, GROUPS)):
            v = torch.stack([gpm.embed([prompt], [y])[0] for y in group]).double()
            direct = torch.tensor(
                [[float(v[i] @ r @ v[j]) for j in range(4)] for i in range(4)], dtype=torch.float64
            )
            torch.testing.assert_close(scores[n].double(), direct, atol=1e-5, rtol=0)
    assert scores.abs().max() > 1e-3  # the comparison is not between zeros
    p = gpm.probability_batch(PROMPTS, GROUPS)
    torch.testing.assert_close(p, torch.sigmoid(scores / gpm.tau))
    torch.testing.assert_close(p + p.transpose(1, 2), torch.ones_like(p), atol=1e-6, rtol=0)


def test_gpm_save_load_round_trip(tokenizer, tmp_path):
    gpm = tiny_preference_model("gpm", tokenizer, seed=4)
    gpm.block_scales.copy_(torch.tensor([0.5, 2.0]))
    gpm.save_pretrained(str(tmp_path))
    loaded = GeneralPreferenceModel.from_pretrained(str(tmp_path))
    assert loaded.tau == gpm.tau
    torch.testing.assert_close(loaded.score_batch(PROMPTS, GROUPS), gpm.score_batch(PROMPTS, GROUPS))


def test_gpm_rejects_bad_arguments(tokenizer):
    gpm = tiny_preference_model("gpm", tokenizer)
    with pytest.raises(ValueError, match="dim"):
        GeneralPreferenceModel(gpm.backbone, tokenizer, dim=3)
    with pytest.raises(ValueError, match="block_scales"):
        GeneralPreferenceModel(gpm.backbone, tokenizer, dim=4, block_scales=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="tau"):
        GeneralPreferenceModel(gpm.backbone, tokenizer, tau=0.0)
    with pytest.raises(ValueError, match="responses"):
        gpm.score_batch(PROMPTS, GROUPS[:2])
    with pytest.raises(ValueError, match="same length"):
        gpm.score_batch(PROMPTS[:2], [GROUPS[0], GROUPS[1][:3]])


# ---------------------------------------------------------------------------------------------- ranker
def test_ranker_probabilities_complementary(tokenizer):
    ranker = tiny_preference_model("ranker", tokenizer, seed=5)
    with torch.no_grad():  # a freshly initialised score head is near zero: make the verdicts clear
        ranker.model.score.weight.normal_(0.0, 1.0)
    p = ranker.probability_batch(PROMPTS, GROUPS)
    torch.testing.assert_close(p + p.transpose(1, 2), torch.ones_like(p), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.diagonal(p, dim1=1, dim2=2), torch.full((3, 4), 0.5))
    # s(a≻b) = ½[f(x, a, b) − f(x, b, a)] read off the encoder directly
    scores = ranker.score_batch(PROMPTS, GROUPS)
    with torch.no_grad():
        f_ab = ranker.pair_logits([PROMPTS[1]], [GROUPS[1][0]], [GROUPS[1][2]])
        f_ba = ranker.pair_logits([PROMPTS[1]], [GROUPS[1][2]], [GROUPS[1][0]])
    torch.testing.assert_close(scores[1, 0, 2], 0.5 * (f_ab - f_ba)[0], atol=1e-6, rtol=0)
    assert (f_ab - f_ba).abs().item() > 1e-4  # the encoder is order-sensitive: the symmetry is built in


def test_ranker_save_load_round_trip(tokenizer, tmp_path):
    ranker = tiny_preference_model("ranker", tokenizer, seed=6)
    ranker.save_pretrained(str(tmp_path))
    loaded = PairRanker.from_pretrained(str(tmp_path))
    torch.testing.assert_close(loaded.score_batch(PROMPTS, GROUPS), ranker.score_batch(PROMPTS, GROUPS))
    with pytest.raises(ValueError, match="num_labels=1"):
        PairRanker(tiny_policy(tokenizer), tokenizer)


def test_callable_preference_checks_and_diagonal():
    def score(prompt, responses):
        k = len(responses)
        return [[0.9 if i < j else 0.1 for j in range(k)] for i in range(k)]

    pref = CallablePreference(score)
    p = pref.probabilities("q", ["a", "b", "c"])
    torch.testing.assert_close(torch.diagonal(p), torch.full((3,), 0.5))
    scores, probabilities = pref.tables(["q"], [["a", "b"]])
    torch.testing.assert_close(probabilities[0], torch.tensor([[0.5, 0.9], [0.1, 0.5]]))
    torch.testing.assert_close(scores[0], torch.logit(probabilities[0]))
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        CallablePreference(lambda x, ys: [[0.5]]).probabilities("q", ["a", "b"])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        CallablePreference(lambda x, ys: [[0.5, 2.0], [0.0, 0.5]]).probabilities("q", ["a", "b"])
    with pytest.raises(ValueError, match="score must be callable"):
        CallablePreference(3)


# ---------------------------------------------------------------------------------------------- generation
def test_generate_k_samples_seeded(tokenizer):
    policy = tiny_policy(tokenizer, seed=1)
    options = SamplingOptions(samples=3, max_new_tokens=5, batch_size=2)
    responses, lengths = generate_responses(policy, tokenizer, PROMPTS, options, seed=7, progress=False)
    assert [len(r) for r in responses] == [3, 3, 3] and all(0 <= n <= 5 for row in lengths for n in row)
    again, _ = generate_responses(policy, tokenizer, PROMPTS, options, seed=7, progress=False)
    assert again == responses
    with pytest.raises(ValueError, match="top_p"):
        SamplingOptions(top_p=0.0)
    with pytest.raises(ValueError, match="backend"):
        generate_responses(policy, tokenizer, PROMPTS, options, backend="tgi")


@pytest.mark.skipif(vllm_available(), reason="vllm is installed")
def test_vllm_backend_missing_is_a_value_error(tokenizer):
    with pytest.raises(ValueError, match="vllm"):
        generate_responses(None, tokenizer, PROMPTS, SamplingOptions(), backend="vllm", model_path="x")


# ---------------------------------------------------------------------------------------------- resumable loop
def _run(tmp, tokenizer, method, *, fail=None):
    """A tiny run; ``fail=(stage, k)`` raises inside that stage of round k (before its output is written)."""
    policy = tiny_policy(tokenizer, seed=0)
    preference = tiny_preference_model("gpm" if method == "gpo" else "ranker", tokenizer, seed=0)
    config = SelfPlayConfig(
        output_dir=str(tmp), method=method, iterations=2, protocol="split", eval_samples=1, seed=11, beta=0.1,
        learning_rate=1e-3, batch_size=2, max_length=64, max_prompt_length=32, progress=False,
        sampling=SamplingOptions(samples=3, max_new_tokens=6, batch_size=4),
        training={"use_cpu": True, "lr_scheduler_type": "constant"},
    )  # fmt: skip
    calls = []
    if fail is not None:
        stage, at = fail
        if stage == "score":
            original = preference.tables

            def tables(prompts, responses):
                if any(p in prompts for p in round_prompts(bundled_prompts()[:6], 2, "split")[at - 1]):
                    raise RuntimeError("killed while scoring")
                return original(prompts, responses)

            preference.tables = tables
        else:
            from prefuse.alignment.trainer import PreferenceTrainer

            def boom(self, *args, **kwargs):
                # run_iterations names its rounds iter0, iter1, ... within this call
                if self.args.output_dir.endswith(f"iter{at - 1}"):
                    raise RuntimeError("killed while training")
                return original_loss(self, *args, **kwargs)

            original_loss = PreferenceTrainer.compute_loss
            PreferenceTrainer.compute_loss = boom
    real_generate = loop_module.generate_responses

    def counting(*args, **kwargs):
        calls.append(kwargs["desc"])
        return real_generate(*args, **kwargs)

    loop_module.generate_responses = counting
    try:
        result = run_self_play(
            policy,
            tokenizer,
            preference,
            bundled_prompts()[:6],
            config,
            eval_prompts=bundled_prompts("test")[:2],
        )
    finally:
        loop_module.generate_responses = real_generate
        if fail is not None and fail[0] == "train":
            PreferenceTrainer.compute_loss = original_loss
    return result, calls


@pytest.mark.slow  # a killed subprocess run, then the resumed and the uninterrupted runs
@pytest.mark.parametrize("method,stage", [("sppo", "score"), ("gpo", "train")])
def test_killed_run_resumes_to_the_uninterrupted_result(tokenizer, tmp_path, method, stage):
    whole, calls = _run(tmp_path / "whole", tokenizer, method)
    assert calls == ["initial eval", "iter 1 generate", "iter 1 eval", "iter 2 generate", "iter 2 eval"]
    with pytest.raises(RuntimeError, match="killed"):
        _run(tmp_path / "cut", tokenizer, method, fail=(stage, 2))
    assert os.path.isdir(tmp_path / "cut" / "iter1" / "policy")
    assert os.path.isdir(tmp_path / "cut" / "iter2" / "samples")
    assert not os.path.exists(tmp_path / "cut" / "iter2" / "policy")
    assert os.path.exists(tmp_path / "cut" / "iter2" / "scored") == (stage == "train")
    resumed, calls = _run(tmp_path / "cut", tokenizer, method)
    assert calls == ["iter 2 eval"]  # nothing finished before the kill is sampled again
    assert resumed.report == whole.report
    for part in ("iter1/scored/pairs", "iter2/scored/pairs", "iter2/eval"):
        assert (
            load_from_disk(str(tmp_path / "cut" / part)).to_list()
            == load_from_disk(str(tmp_path / "whole" / part)).to_list()
        )
    whole_state, resumed_state = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(whole_state[k], resumed_state[k]) for k in whole_state)
    # the run trained: the final policy differs from the initial one
    initial = tiny_policy(tokenizer, seed=0).state_dict()
    assert any(not torch.equal(initial[k], whole_state[k].cpu()) for k in initial)
    report = json.loads((tmp_path / "whole" / "report.json").read_text())["iterations"]
    assert [e["iteration"] for e in report] == [0, 1, 2] and (
        tmp_path / "whole" / "report.png"
    ).stat().st_size
    pairs = load_from_disk(str(tmp_path / "whole" / "iter1" / "scored" / "pairs"))
    assert {"prompt", "chosen", "rejected", "p_chosen", "p_rejected", "s_chosen", "s_rejected"} <= set(
        pairs.column_names
    )
    assert len(pairs) == 3  # split protocol: half of the six prompts per round


def test_config_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="method"):
        SelfPlayConfig(output_dir=str(tmp_path), method="dpo")
    with pytest.raises(ValueError, match="protocol"):
        SelfPlayConfig(output_dir=str(tmp_path), protocol="shuffle")
    with pytest.raises(ValueError, match="iterations"):
        SelfPlayConfig(output_dir=str(tmp_path), iterations=0)


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
@pytest.mark.parametrize("method", ["sppo", "gpo"])
def test_cli_end_to_end(tmp_path, method):
    out = tmp_path / "out"
    options = (
        f"--method {method} --iterations 2 --prompts 6 --samples 3 --max-new-tokens 6 --fit-steps 2 "
        "--warmup-steps 2 --eval-prompts 2 --eval-samples 1 --no-progress"
    )
    cmd = [
        sys.executable,
        "-m",
        "prefuse.alignment.cli",
        "self-play",
        *options.split(),
        "--output-dir",
        str(out),
    ]
    done = processes.run(cmd, capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "win rate vs initial" in done.stdout
    report = json.loads((out / "report.json").read_text())["iterations"]
    assert [e["iteration"] for e in report] == [0, 1, 2]
    assert all(0.0 <= e["win_rate_vs_initial"] <= 1.0 for e in report)
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "iter2" / "policy" / "config.json").is_file()
    again = processes.run(cmd, capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["iterations"] == report  # all stages found on disk


def test_default_warm_up_and_fit_learn_the_bundled_data(tokenizer):
    from prefuse.alignment.data import read_records
    from prefuse.alignment.selfplay.default import fit_preference_model, warm_up_policy

    records = [r for r in read_records() if r["split"] == "train"]
    policy = tiny_policy(tokenizer, seed=2)
    losses = warm_up_policy(policy, tokenizer, records, steps=12, batch_size=4, lr=5e-3, progress=False)
    assert sum(losses[-3:]) < sum(losses[:3])
    gpm = tiny_preference_model("gpm", tokenizer, seed=2)
    losses = fit_preference_model(gpm, records, steps=12, batch_size=4, progress=False)
    assert sum(losses[-3:]) < sum(losses[:3])
    with pytest.raises(ValueError, match="kind"):
        tiny_preference_model("reward", tokenizer)


def test_stage_outputs_appear_atomically(tmp_path):
    from datasets import Dataset
    from prefuse.alignment.selfplay.stages import dataset_stage, write_atomically

    target = str(tmp_path / "stage")

    def dies(tmp):
        os.makedirs(tmp)
        (tmp_path / "stage.partial" / "half").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_atomically(target, dies)
    assert not os.path.exists(target) and os.path.isdir(target + ".partial")  # a kill leaves no output
    builds = []

    def build():
        builds.append(1)
        return Dataset.from_dict({"x": [1, 2]})

    assert dataset_stage(target, build).to_dict() == {"x": [1, 2]}
    assert dataset_stage(target, build).to_dict() == {"x": [1, 2]}
    assert builds == [1] and not os.path.exists(target + ".partial")  # built once, the leftover discarded
