"""PNG plots: peak memory and time against tokens, one line per contender, one figure per sweep."""

from __future__ import annotations

from pathlib import Path

from benchmarks.environment import slug
from benchmarks.plan import CONTENDERS

STYLE = {
    "naive": ("tab:gray", "o"),
    "trl": ("tab:purple", "v"),
    "liger": ("tab:orange", "s"),
    "liger-compiled": ("tab:red", "D"),
    "cce": ("tab:green", "^"),
    "prefuse-op": ("tab:cyan", "x"),
    "prefuse": ("tab:blue", "*"),
}


def write_plots(out_dir: Path, secs: dict) -> dict[tuple, str] | None:
    """One ``<workload>_<head>_<variant>.png`` per section with at least two shapes; returns ``key -> file``.

    Returns None when matplotlib is not installed (the JSON and Markdown are written regardless).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from benchmarks.report import MIB, WORKLOAD_TITLES

    files = {}
    for key, section in secs.items():
        if len(section) < 2:
            continue
        workload, head, variant = key
        fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
        for name in CONTENDERS:
            pts = sorted(
                (
                    recs[name]["tokens"],
                    recs[name]["memory"]["peak_bytes"] / MIB,
                    recs[name]["time"]["median_s"] * 1e3,
                )
                for recs in section.values()
                if name in recs and recs[name]["status"] == "ok"
            )
            if not pts:
                continue
            color, marker = STYLE[name]
            tokens = [p[0] for p in pts]
            ax_mem.plot(tokens, [p[1] for p in pts], color=color, marker=marker, label=name)
            ax_time.plot(tokens, [p[2] for p in pts], color=color, marker=marker, label=name)
        for ax, ylabel in (
            (ax_mem, "peak memory above inputs (MiB)"),
            (ax_time, "median time per step (ms)"),
        ):
            ax.set_xlabel("tokens (policy rows × sequence length)")
            ax.set_ylabel(ylabel)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"{WORKLOAD_TITLES[workload]} — {head} — {variant}", fontsize=11)
        fig.tight_layout()
        name = f"{slug(workload)}_{slug(head)}_{slug(variant)}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        files[key] = name
    return files
