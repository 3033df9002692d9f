"""``python -m benchmarks``: measure every workload and contender, write JSON / Markdown / PNG, print the table.

Examples::

    python -m benchmarks                          # full report on this machine (CUDA if available, else CPU)
    python -m benchmarks --device cpu --quick     # short CPU report (a couple of minutes)
    python -m benchmarks --only dpo kto           # some workloads only
    python -m benchmarks --contenders naive liger liger-compiled prefuse   # add Liger compiled on CPU
    python -m benchmarks --list                   # the plan: cases and contenders, nothing measured
    python -m benchmarks --render benchmarks/results/<device>/results.json   # rewrite table and plots
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks import environment, report
from benchmarks.contenders import unavailable_reason
from benchmarks.plan import CONTENDERS, WORKLOADS, get_preset
from benchmarks.runner import run_cases

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark prefuse against naive PyTorch, TRL's fused head, Liger-Kernel and Cut Cross-Entropy: "
        "time of forward+backward, peak memory and error against float64, over a sweep of token counts.",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="device to measure on (default: cuda if available, else cpu); picks the shapes",
    )
    parser.add_argument("--quick", action="store_true", help="a short version of the device's report")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes, seconds: checks the suite works (CI)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"results root; files go to OUT/<device-name>/ (default: {DEFAULT_OUT})",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=WORKLOADS,
        metavar="WORKLOAD",
        help=f"measure only these workloads ({', '.join(WORKLOADS)})",
    )
    parser.add_argument(
        "--contenders",
        nargs="+",
        choices=CONTENDERS,
        metavar="NAME",
        help=f"contenders to run (default: the preset's; any of {', '.join(CONTENDERS)}). On CPU "
        "the preset leaves out liger-compiled: each fresh process compiles for ~20 s",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure in this process on CPU too (faster; CPU memory numbers then are not "
        "from fresh processes)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--list", action="store_true", help="print the plan (cases, contenders) and exit")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="rewrite results.md and the plots beside an existing results.json, measuring nothing",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        data = json.loads(args.render.read_text())
        paths = report.write(args.render.parent, data["meta"], data["results"], plots=not args.no_plots)
        print(paths["markdown"].read_text())
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = get_preset(device, quick=args.quick, smoke=args.smoke)
    names = tuple(args.contenders) if args.contenders else preset.contenders
    cases = preset.cases(tuple(args.only) if args.only else None)
    isolate = device == "cpu" and not args.in_process
    if args.list:
        for case in cases:
            runs = [
                n if unavailable_reason(case, n) is None else f"({n}: {unavailable_reason(case, n)})"
                for n in names
            ]
            check = ", float64 check" if preset.checks_error(case) else ""
            print(
                f"{case.workload:<10} {case.head.name:<16} {case.variant:<36} {case.shape():<20} "
                f"{' '.join(runs)}{check}"
            )
        print(f"{len(cases)} cases; preset {preset.name}: {preset.description}")
        return 0
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    out_dir = args.out / environment.device_slug(device)
    meta = {**environment.describe(device), **report.preset_meta(preset)}
    meta["contenders"] = list(names)
    meta["memory_method"] = (
        "CUDA allocator peak"
        if device == "cuda"
        else "peak RSS of a fresh process per measurement"
        if isolate
        else "peak RSS, in-process (not isolated)"
    )
    meta["notes"] = _notes(device, names)
    if preset.errors_at == "smallest":
        meta["notes"].append(
            "Errors against float64 are checked at the smallest shape of each sweep (on CPU the "
            'reference costs as much as a contender); "–" elsewhere.'
        )
    print(
        f"prefuse benchmarks on {meta['device_name']}: preset {preset.name}, {len(cases)} cases x "
        f"{len(names)} contenders -> {out_dir}",
        flush=True,
    )

    started = time.time()
    meta["started"] = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started))
    results = run_cases(
        cases,
        names,
        preset.timing,
        isolate=isolate,
        log=lambda line: print(line, flush=True),
        check=preset.checks_error,
    )
    meta["duration_s"] = time.time() - started

    paths = report.write(out_dir, meta, results, plots=not args.no_plots)
    print()
    print(paths["markdown"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    failed = [r for r in results if r["status"] == "failed"]
    if failed:
        print(f"{len(failed)} measurement(s) failed; see {paths['json']}", file=sys.stderr)
    return 1 if failed else 0


def _notes(device: str, names: tuple[str, ...]) -> list[str]:
    notes = [
        (
            "Liger-Kernel's chunked losses run one pair (DPO) / one row (KTO) per chunk, their default; KTO "
            "breaks with larger chunks. Its KTO takes the reference point `kl` ready-made: the Liger contender "
            "computes it from the KL rows with Liger's own chunk forward."
        ),
        (
            "Naive = the workload's formula on full logits (`naive_linear_logprobs`: logits, log_softmax, "
            "gather, in the input dtype); Cut Cross-Entropy = the same formula on "
            '`-linear_cross_entropy(reduction="none")`.'
        ),
    ]
    if device == "cpu":
        notes.append(
            "Liger's fused linear cross-entropy and Cut Cross-Entropy are Triton kernels (CUDA only)."
        )
        if "liger-compiled" not in names:
            notes.append(
                "Liger compiled (`compiled=True`) is left out on CPU: every fresh process pays ~20 s of "
                "compilation, beyond the report's 15-minute budget; add it with `--contenders naive "
                "liger liger-compiled prefuse`."
            )
    return notes


if __name__ == "__main__":
    sys.exit(main())
