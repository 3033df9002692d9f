"""The per-iteration report of a self-play run: ``report.json`` and ``report.png`` (matplotlib, Agg).

Iteration 0 is the initial policy (win rate ½ against itself by construction); iteration ``k`` the policy
trained in round ``k``: its mean win rate against the initial policy on the evaluation prompts, judged by the
preference model, and the mean length (tokens) of its evaluation responses and of the samples it trained on.
"""

from __future__ import annotations

from prefuse.alignment.selfplay.stages import write_atomically, write_json


def write_report(entries: list[dict], json_path: str, png_path: str | None) -> None:
    write_json(json_path, {"iterations": entries})
    if png_path is not None:
        write_atomically(png_path, lambda tmp: _plot(entries, tmp))


def _plot(entries: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    steps = [e["iteration"] for e in entries]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(steps, [e["win_rate_vs_initial"] for e in entries], marker="o")
    left.axhline(0.5, color="grey", lw=0.8, ls="--")
    left.set(xlabel="iteration", ylabel="win rate vs initial policy", title="preference model's verdict")
    right.plot(steps, [e["eval_response_tokens"] for e in entries], marker="o", label="evaluation responses")
    trained = [e for e in entries if e.get("sample_response_tokens") is not None]
    right.plot(
        [e["iteration"] for e in trained],
        [e["sample_response_tokens"] for e in trained],
        marker="s",
        label="training samples",
    )
    right.set(xlabel="iteration", ylabel="mean tokens", title="response length")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xticks(steps)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
