"""The report: raw numbers as JSON, a Markdown table per workload and variant, a summary, and the plots.

Table cells are ``time · peak memory`` per contender; ratio columns give prefuse's time and memory divided by
each other contender's (below 1 = prefuse is faster / leaner); the error column holds each contender's error
against the float64 reference, in the contender order of the header. Under each sweep, the memory growth per
1,000 tokens (least-squares slope over the sweep) says how memory scales — the honest number where the
allocator's caching blurs single points.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import OrderedDict
from pathlib import Path

from benchmarks.floor import roofline_markdown
from benchmarks.plan import CONTENDERS, Preset

WORKLOAD_TITLES = {
    "logprobs": "Core op: per-token log-probs",
    "dpo": "DPO (policy fwd+bwd, reference fwd)",
    "sampo": "SamPO (DPO on down-sampled tokens)",
    "kto": "KTO with KL rows",
    "factalign": "FactAlign (fKTO) with sentences",
    "sppo": "SPPO (soft win rates)",
}
MIB = 2**20


# --------------------------------------------------------------------------------------------- grouping
def sections(results: list[dict]) -> OrderedDict:
    """``(workload, head, variant) -> {rows -> {contender -> record}}`` in plan order."""
    out: OrderedDict = OrderedDict()
    for rec in results:
        key = (rec["workload"], rec["head"], rec["variant"])
        out.setdefault(key, OrderedDict()).setdefault(rec["rows"], {})[rec["contender"]] = rec
    return out


def _contenders_in(section: dict) -> tuple[list[str], dict[str, str]]:
    """Contenders with at least one measured row, and the skip reason of those never run."""
    present: set[str] = set()
    skipped: dict[str, str] = {}
    for by_contender in section.values():
        for name, rec in by_contender.items():
            if rec["status"] == "skipped":
                skipped.setdefault(name, rec.get("reason", ""))
            else:
                present.add(name)
    ordered = [c for c in CONTENDERS if c in present]
    return ordered, {k: v for k, v in skipped.items() if k not in present}


# ------------------------------------------------------------------------------------------- formatting
def fmt_time(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 10_000:
        return f"{seconds:.1f} s"
    return f"{ms:,.0f} ms" if ms >= 100 else f"{ms:.1f} ms" if ms >= 10 else f"{ms:.2f} ms"


def fmt_mem(nbytes: float) -> str:
    mib = nbytes / MIB
    if mib >= 10_240:
        return f"{mib / 1024:.1f} GiB"
    return f"{mib:,.0f} MiB" if mib >= 100 else f"{mib:.1f} MiB"


def fmt_ratio(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:.2f}×" if x < 10 else f"{x:.0f}×"


def _ok(rec: dict | None) -> bool:
    return rec is not None and rec["status"] == "ok"


def cell(rec: dict | None) -> str:
    if rec is None or rec["status"] == "skipped":
        return "–"
    if rec["status"] == "oom":
        return "out of memory"
    if rec["status"] != "ok":
        return "failed"
    return f"{fmt_time(rec['time']['median_s'])} · {fmt_mem(rec['memory']['peak_bytes'])}"


def ratio_cell(mine: dict | None, other: dict | None) -> str:
    if not (_ok(mine) and _ok(other)):
        return "–"
    t = mine["time"]["median_s"] / other["time"]["median_s"]
    m_other = other["memory"]["peak_bytes"]
    m = mine["memory"]["peak_bytes"] / m_other if m_other > 0 else None
    return f"{fmt_ratio(t)} · {fmt_ratio(m)}"


def error_cell(by_contender: dict, names: list[str]) -> str:
    parts = []
    for name in names:
        rec = by_contender.get(name)
        parts.append(f"{rec['error']:.0e}" if rec is not None and "error" in rec else "–")
    return " / ".join(parts)


def memory_slopes(section: dict, names: list[str]) -> dict[str, float]:
    """Least-squares slope of peak memory (bytes) per token over the sweep, per contender (≥ 2 points)."""
    slopes = {}
    for name in names:
        pts = [
            (recs[name]["tokens"], recs[name]["memory"]["peak_bytes"])
            for recs in section.values()
            if _ok(recs.get(name))
        ]
        if len(pts) < 2:
            continue
        mx = sum(x for x, _ in pts) / len(pts)
        my = sum(y for _, y in pts) / len(pts)
        var = sum((x - mx) ** 2 for x, _ in pts)
        if var > 0:
            slopes[name] = sum((x - mx) * (y - my) for x, y in pts) / var
    return slopes


# ------------------------------------------------------------------------------------------------ tables
def section_table(section: dict, names: list[str]) -> list[str]:
    baselines = [n for n in names if n != "prefuse"] if "prefuse" in names else []
    header = [
        "shape",
        "tokens (scored)",
        *names,
        *(f"prefuse/{b}" for b in baselines),
        f"error vs fp64 ({' / '.join(names)})",
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + ["---"]) + "|",
    ]
    for by_contender in section.values():
        any_rec = next(iter(by_contender.values()))
        shape = _shape(any_rec)
        scored = next((r["scored_tokens"] for r in by_contender.values() if "scored_tokens" in r), None)
        tokens = f"{any_rec['tokens']:,}" + (f" ({scored:,})" if scored is not None else "")
        row = [
            shape,
            tokens,
            *(cell(by_contender.get(n)) for n in names),
            *(ratio_cell(by_contender.get("prefuse"), by_contender.get(b)) for b in baselines),
            error_cell(by_contender, names),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def summary_table(secs: OrderedDict) -> list[str]:
    """One row per section at its largest shape: every contender measured anywhere, and prefuse's ratios."""
    measured = {
        rec["contender"]
        for section in secs.values()
        for by in section.values()
        for rec in by.values()
        if rec["status"] != "skipped"
    }
    names = [c for c in CONTENDERS if c in measured]
    baselines = [n for n in names if n != "prefuse"] if "prefuse" in names else []
    header = ["workload", "variant", "head", "shape", *names, *(f"prefuse/{b}" for b in baselines)]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 4 + ["---:"] * (len(header) - 4)) + "|",
    ]
    for (workload, head, variant), section in secs.items():
        largest = section[max(section)]
        mine = largest.get("prefuse")
        row = [
            workload,
            variant,
            head,
            _shape(next(iter(largest.values()))),
            *(cell(largest.get(n)) for n in names),
            *(ratio_cell(mine, largest.get(b)) for b in baselines),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _shape(rec: dict) -> str:
    return f"{rec['rows']} × {rec['seq_len']}" + (f" + {rec['kl_rows']} KL" if rec["kl_rows"] else "")


def _repeats_text(timing: dict) -> str:
    if not timing:
        return "repeats in the JSON"
    text = f"at least {timing['min_repeats']}, adding up to {timing['min_time_s']:g} s"
    max_time = timing.get("max_time_s")
    if max_time is not None:
        text += f"; a single one once it takes {max_time:g} s"
    return text


def _versions_line(meta: dict) -> str:
    v = meta["versions"]
    names = ["torch", "triton", "trl", "liger-kernel", "cut-cross-entropy", "prefuse"]
    parts = [f"{n} {v.get(n) or 'not installed'}" for n in names]
    return ", ".join(parts) + f", Python {v['python']}"


LEGEND = (
    "Each cell: median time of one step (forward + backward; forward only for `fwd`) over the timed steps "
    "after warm-up ({repeats}) · peak memory above the inputs ({memory}), gradient outputs included. Ratios are prefuse / other, time · memory (below 1: "
    "prefuse is faster / leaner). Errors against a float64 reference: max absolute error of the per-token "
    "log-probs (core op), relative error of the loss (losses). Token counts are the policy rows' (scored: not "
    "prompt, not padding); KTO and FactAlign process as many KL rows again."
)


def markdown(meta: dict, results: list[dict], plots: dict[tuple, str]) -> str:
    secs = sections(results)
    machine = f"CPU: {meta['cpu_model']} ({meta['torch_threads']} torch threads)"
    if meta.get("device") == "cuda":
        machine = f"GPU: {meta['device_name']} (CUDA {meta.get('cuda_version')}); " + machine
    out = [
        f"# prefuse benchmarks — {meta['device_name']}",
        "",
        f"Preset `{meta['preset']}`: {meta['preset_description']}.  ",
        (
            f"Measured {meta['started']} in {meta['duration_s'] / 60:.1f} min with `{meta['command']}` "
            f"(commit {meta.get('git_commit') or 'unknown'}).  "
        ),
        f"{_versions_line(meta)}; {machine}.",
        "",
        LEGEND.format(memory=meta["memory_method"], repeats=_repeats_text(meta.get("timing", {}))),
        "",
        "## Summary: largest shape of every sweep",
        "",
        *summary_table(secs),
        "",
        "## Predicted GPU times (roofline predictions, not measurements)",
        "",
        roofline_markdown(),
    ]
    for key, section in secs.items():
        workload, head, variant = key
        names, skipped = _contenders_in(section)
        out += [f"## {WORKLOAD_TITLES[workload]} — {head} — {variant}", ""]
        head_info = meta.get("heads", {}).get(head)
        if isinstance(head_info, str):  # older results.json: the description only
            head_info = {"description": head_info}
        if head_info:
            text = f"Head: {head_info['description']}."
            if "trainable head" in variant and "vocab" in head_info:
                text += (
                    f" The head's gradient ({fmt_mem(_head_gradient_bytes(head_info))}) is part of every "
                    "memory figure."
                )
            out += [text, ""]
        if names:
            out += section_table(section, names)
        slopes = memory_slopes(section, names)
        if slopes:
            growth = ", ".join(f"{n} {fmt_mem(s * 1000)}" for n, s in slopes.items())
            out += ["", f"Peak-memory growth per 1,000 tokens (least squares over the sweep): {growth}."]
        problems = [
            f"{n} at {r} rows: {rec['status']} ({rec.get('reason', '')})"
            for r, by in section.items()
            for n, rec in by.items()
            if rec["status"] in ("failed", "oom")
        ]
        if problems:
            out += ["", "Failures: " + "; ".join(problems) + "."]
        if skipped:
            out += ["", "Not measured: " + "; ".join(f"{n} — {why}" for n, why in skipped.items()) + "."]
        if key in plots:
            out += ["", f"![{workload} {variant}]({plots[key]})"]
        out.append("")
    if meta.get("notes"):
        out += ["## Notes", "", *[f"- {note}" for note in meta["notes"]], ""]
    return "\n".join(out)


def write(out_dir: Path, meta: dict, results: list[dict], *, plots: bool = True) -> dict[str, Path]:
    """Write ``results.json``, the plots and ``results.md`` into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    paths["json"].write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str) + "\n")
    plot_files: dict[tuple, str] | None = {}
    if plots:
        from benchmarks import plots as plotting

        plot_files = plotting.write_plots(out_dir, sections(results))
        if plot_files is None:
            meta = {**meta, "notes": [*meta.get("notes", []), "No plots: matplotlib is not installed."]}
            plot_files = {}
    paths["markdown"].write_text(markdown(meta, results, plot_files))
    for i, name in enumerate(plot_files.values()):
        paths[f"plot{i}"] = out_dir / name
    return paths


def preset_meta(preset: Preset) -> dict:
    timing = {
        k: (v if not isinstance(v, float) or math.isfinite(v) else None)
        for k, v in dataclasses.asdict(preset.timing).items()
    }
    return {
        "preset": preset.name,
        "preset_description": preset.description,
        "heads": {
            head.name: {**dataclasses.asdict(head), "description": head.describe()}
            for head, _ in preset.heads
        },
        "timing": timing,
        "errors_at": preset.errors_at,
    }


def _head_gradient_bytes(head: dict) -> int:
    size = {"float32": 4, "bfloat16": 2, "float16": 2}.get(head.get("dtype", "float32"), 4)
    return head["vocab"] * head["hidden"] * size
