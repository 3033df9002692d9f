r"""Tuning sweep of the ``linear_logprobs`` Triton kernels at the GPU shapes: writes the tuned-config table.

For each job (head, token count, op) in priority order, every candidate config of each kernel the op
launches is timed at that shape (CUDA events, median) and checked against the outputs of the default config;
the fastest correct one becomes an entry of the table keyed like the autotuner (kernel, dtype, ``D``, ``V``,
token bucket, mode flags, device). ``triton_configs`` reads that table at launch time (``tuned_configs.json``
beside the kernels, or ``PREFUSE_TUNED_CONFIGS``), so a tuned shape starts at once instead of autotuning.

Ops: ``fwd`` (forward kernel), ``bwd`` (fused backward, trainable head), ``frozen`` (fused backward without
``grad_W``), ``det`` (deterministic: the hidden-only backward and the weight kernel). Candidates: the pruned
``GPU_SPACE`` (``--space full``), or its Hopper-leaning part (``--space hopper``, default: ``BLOCK_D`` 64/128,
3-4 stages) plus 16-warp configs with larger tiles (:data:`EXTRA_CANDIDATES`), each kept only where it fits
the device (``triton_configs.fits``).

Compilation dominates a sweep, so all candidates are first compiled in parallel worker processes into
Triton's on-disk cache (``JITFunction.warmup`` with the exact launch arguments, learned by a dry
``triton_configs.recording``); the timing loop then loads them. The sweep stops starting new work after
``--budget-s`` seconds and always writes what it has: the table after each job.

    python -m benchmarks.tune --out DIR [--budget-s 240] [--heads llama3-8b] [--tokens 16384 4096] [--ops fwd bwd]

Outputs in DIR: ``tuned_configs.json`` (the existing table merged with the new entries; copy it to
``kernels/linear_logprobs/tuned_configs.json`` to commit it) and ``tune_timings.json`` (every candidate's time).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import importlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HEADS = {  # name: (D, V, softcap), bf16 (benchmarks/plan.py's GPU heads)
    "llama3-8b": (4096, 128_256, None),
    "gemma2-9b": (3584, 256_000, 30.0),
    "gemma2-2b": (2304, 256_000, 30.0),
}
OPS = ("fwd", "bwd", "frozen", "det")
TUNED_KERNELS = {
    "fwd": ("_forward_kernel",),
    "bwd": ("_backward_kernel",),
    "frozen": ("_backward_kernel",),
    "det": ("_backward_kernel", "_weight_kernel"),
}
KERNEL_HOMES = {
    "_forward_kernel": "prefuse.kernels.linear_logprobs.triton_fwd",
    "_backward_kernel": "prefuse.kernels.linear_logprobs.triton_bwd",
    "_weight_kernel": "prefuse.kernels.linear_logprobs.triton_bwd",
}
# The default plan, in priority order: the target shape first (16k tokens: the DPO step and the
# floor), then the floor's other token counts, the benchmark sweep's buckets, the Gemma-2 heads.
DEFAULT_PLAN = (
    *(("llama3-8b", 16384, op) for op in ("fwd", "bwd", "frozen", "det")),
    *(("llama3-8b", n, op) for n in (65536, 4096) for op in ("fwd", "bwd")),
    *(("llama3-8b", n, op) for n in (8192, 32768) for op in ("fwd", "bwd")),
    *(("llama3-8b", n, op) for n in (65536, 4096) for op in ("frozen", "det")),
    *((head, n, op) for head in ("gemma2-9b", "gemma2-2b") for n in (16384, 32768) for op in ("fwd", "bwd")),
)
# Larger tiles than GPU_SPACE holds: 16 warps (4 warpgroups) keep a 128 x 128 / 128 x 256 fp32 tile within
# the kernels' per-thread register budgets.
EXTRA_CANDIDATES = (
    {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64, "num_warps": 16, "num_stages": 3},
    {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64, "num_warps": 16, "num_stages": 4},
    {"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_D": 64, "num_warps": 16, "num_stages": 2},
    {"BLOCK_N": 256, "BLOCK_V": 128, "BLOCK_D": 64, "num_warps": 16, "num_stages": 2},
)
WRONG_REL_ERR = 2e-2
H100_SHARED_BYTES = 232_448  # shared memory per block (opt-in) of an H100 / H200  # a candidate whose outputs differ more from the default config's is rejected


def candidates(name: str, element_size: int, shared_limit: int, space: str = "hopper") -> list[dict]:
    """The configs of kernel `name` to time, the default config first, then larger tiles first."""
    from prefuse.kernels.linear_logprobs import triton_configs as cfg

    budget = cfg.KERNELS[name].tile_per_thread
    pool = [cfg._config_meta(c) for c in cfg._gpu_configs()]
    if space == "hopper":
        pool = [m for m in pool if m["BLOCK_D"] in (64, 128) and m["num_stages"] in (3, 4)]
        pool += [dict(m) for m in EXTRA_CANDIDATES]
    elif space != "full":
        raise ValueError(f"space must be 'hopper' or 'full', got {space!r}")
    fitting = [m for m in pool if cfg.fits(m, element_size, shared_limit, budget)]
    default = next(
        (dict(m) for m in cfg.DEFAULT_PREFERENCE if cfg.fits(m, element_size, shared_limit, budget)), None
    )
    ordered = sorted(
        fitting,
        key=lambda m: (
            -m["BLOCK_N"] * m["BLOCK_V"],
            -m["BLOCK_D"],
            -m["num_warps"],
            m["num_stages"],
            m["BLOCK_N"],
        ),
    )
    out = [default] if default else []
    for m in ordered:
        if m not in out:
            out.append(m)
    return out


# ------------------------------------------------------------------------------------------- precompile


def _element_size(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def _spec(value):
    """A picklable stand-in of a launch argument: a tensor becomes its dtype (``warmup`` mocks it)."""
    import torch

    if isinstance(value, torch.Tensor):
        return ("__dtype__", str(value.dtype).removeprefix("torch."))
    return value


def _restore(value, *, mock: bool):
    import torch

    if isinstance(value, tuple) and len(value) == 2 and value[0] == "__dtype__":
        dtype = getattr(torch, value[1])
        if mock:
            from triton.runtime.jit import MockTensor

            return MockTensor(dtype)
        return dtype
    return value


def _specialisation(value):
    """What Triton specialises an argument on (for de-duplicating compiles): ints by divisibility by 16 and
    equality to 1, everything else by value."""
    if isinstance(value, int) and not isinstance(value, bool):
        return ("int", value % 16 == 0, value == 1, abs(value) >= 2**31)
    return value


def _precompile(name: str, args: tuple, kwargs: dict, config: dict) -> tuple[str, dict, float, str | None]:
    """Worker: compile kernel `name` for one config into Triton's cache (no launch)."""
    start = time.monotonic()
    try:
        kernel = getattr(importlib.import_module(KERNEL_HOMES[name]), name)
        jit = kernel.fn if hasattr(kernel, "configs") else kernel  # the triton.jit function under autotune
        jit.warmup(
            *(_restore(a, mock=False) for a in args),
            grid=(1,),
            **{k: _restore(v, mock=True) for k, v in kwargs.items()},
            **config,
        )
        return name, config, time.monotonic() - start, None
    except Exception as err:  # noqa: BLE001 - reported; the timing loop then compiles (or fails) itself
        return name, config, time.monotonic() - start, f"{type(err).__name__}: {err}"


def _worker_init() -> None:
    os.environ.setdefault("PREFUSE_AUTOTUNE", "off")


# ------------------------------------------------------------------------------------------------- jobs


@dataclass
class Job:
    head: str
    tokens: int
    op: str
    records: list = field(default_factory=list)  # LaunchRecords (with args) of the kernels to tune
    futures: list = field(default_factory=list)


def make_inputs(tokens: int, d: int, v: int, *, fill: bool, seed: int = 0) -> dict:
    """Launcher inputs at `tokens` all-valid rows (bf16); ``fill=False`` leaves them uninitialised."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)

    def tensor(*shape, scale=1.0):
        if not fill:
            return torch.empty(*shape, device="cuda", dtype=torch.bfloat16)
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(torch.bfloat16)

    return dict(
        hidden2d=tensor(tokens, d),
        weight=tensor(v, d, scale=4 / math.sqrt(d)),
        bias=None,
        rows=torch.arange(tokens, device="cuda"),
        targets=torch.randint(0, v, (tokens,), device="cuda", generator=g),
        n_valid=torch.tensor([tokens], device="cuda"),
    )


def runner(op: str, inputs: dict, softcap):
    """A callable that launches the kernels of `op` once and returns the outputs to compare."""
    import torch
    from prefuse.kernels.linear_logprobs import triton_bwd, triton_fwd

    scalars = dict(softcap=softcap, inv_temperature=1.0)
    if op == "fwd":
        return lambda: triton_fwd.forward(**inputs, **scalars)
    n = inputs["rows"].numel()
    g = torch.Generator(device="cuda").manual_seed(1)
    _, lse = triton_fwd.forward(**inputs, **scalars)  # the real log-sum-exp (table / default config)
    grad = torch.randn(n, device="cuda", generator=g)
    need = dict(need_hidden=True, need_weight=op != "frozen", need_bias=False, deterministic=op == "det")
    return lambda: triton_bwd.backward(**inputs, lse=lse, grad=grad, **scalars, **need)


def _rel_err(out, base) -> float:
    worst = 0.0
    for a, b in zip(out, base):
        if a is None or b is None:
            continue
        scale = b.float().abs().max().clamp_min(1e-30)
        diff = (a.float() - b.float()).abs().max()
        worst = max(worst, float("inf") if not bool(diff.isfinite()) else (diff / scale).item())
    return worst


def time_config(fn, best_ms: float, *, min_time_s: float = 0.25, max_reps: int = 10) -> list[float]:
    """CUDA-event times of `fn` (already warm: called once before): stops after one rep when that is
    already 1.3x the best so far, else at >= 3 reps and `min_time_s`, at most `max_reps`."""
    import torch

    times: list[float] = []
    while len(times) < max_reps:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
        if len(times) == 1 and times[0] > 1.3 * best_ms:
            break
        if len(times) >= 3 and sum(times) >= min_time_s * 1e3:
            break
    return times


def merge(existing: list[dict], new: list[dict]) -> list[dict]:
    """`existing` entries less those `new` replaces (same device, kernel, dtype and key), then `new`."""

    def ident(e):
        return e["device"], e["kernel"], e["dtype"], json.dumps(e["key"], sort_keys=True)

    replaced = {ident(e) for e in new}
    return [e for e in existing if ident(e) not in replaced] + list(new)


def parse_plan(heads, tokens, ops) -> list[tuple[str, int, str]]:
    if heads is None and tokens is None and ops is None:
        return list(DEFAULT_PLAN)
    return [(h, n, op) for h in heads or ["llama3-8b"] for n in tokens or [16384] for op in ops or list(OPS)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for tuned_configs.json, tune_timings.json"
    )
    parser.add_argument("--merge", type=Path, help="table to merge into (default: the packaged one, if any)")
    parser.add_argument("--budget-s", type=float, default=240.0, help="start no new timing after this")
    parser.add_argument("--heads", nargs="+", choices=sorted(HEADS))
    parser.add_argument("--tokens", type=int, nargs="+")
    parser.add_argument("--ops", nargs="+", choices=OPS)
    parser.add_argument("--space", choices=("hopper", "full"), default="hopper")
    parser.add_argument("--jobs", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)),
                        help="parallel compile processes (0: compile in the timing loop)")  # fmt: skip
    parser.add_argument(
        "--list", action="store_true", help="print the plan and the candidate counts, run nothing"
    )
    args = parser.parse_args(argv)
    start = time.monotonic()
    os.environ.setdefault("PREFUSE_AUTOTUNE", "off")  # kernels not being tuned: table, else the default

    plan = parse_plan(args.heads, args.tokens, args.ops)
    if args.list:  # candidate counts for an H100/H200 (227 KiB of shared memory per block), bf16
        for name, home in KERNEL_HOMES.items():
            importlib.import_module(home)  # registers the kernels' specs
        for head, n, op in plan:
            counts = ", ".join(f"{k} ({len(candidates(k, 2, H100_SHARED_BYTES, args.space))} configs)"
                               for k in TUNED_KERNELS[op])  # fmt: skip
            print(f"{head} N={n} {op}: {counts}")
        return 0

    import torch
    from prefuse.kernels.linear_logprobs import triton_configs as cfg

    if not torch.cuda.is_available():
        print("the tuning sweep needs CUDA", file=sys.stderr)
        return 2
    device, capability = cfg.device_signature(torch.cuda.current_device())
    shared_limit = cfg._shared_memory_bytes(torch.cuda.current_device())
    import triton

    provenance = {"device": device, "capability": capability, "torch": torch.__version__,
                  "triton": triton.__version__, "space": args.space}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    merge_path = args.merge or cfg.table_path()
    existing = []
    if merge_path is not None and Path(merge_path).is_file():
        existing = json.loads(Path(merge_path).read_text()).get("entries", [])

    # 1. learn every job's launch arguments (dry: nothing runs) and queue the compiles, in plan order
    jobs = [Job(*item) for item in plan]
    pool = None
    if args.jobs > 0:
        pool = futures.ProcessPoolExecutor(
            max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init
        )
    queued = set()
    for job in jobs:
        d, v, softcap = HEADS[job.head]
        inputs = make_inputs(job.tokens, d, v, fill=False)
        with cfg.recording(keep_args=True, dry=True) as records:
            runner(job.op, inputs, softcap)()
        job.records = [r for r in records if r.kernel in TUNED_KERNELS[job.op]]
        del inputs, records
        torch.cuda.empty_cache()
        if pool is None:
            continue
        for rec in job.records:
            a = tuple(_spec(x) for x in rec.args)
            kw = {k: _spec(x) for k, x in rec.kwargs.items()}
            for config in candidates(rec.kernel, _element_size(rec.dtype), shared_limit, args.space):
                ident = (rec.kernel, tuple(map(_specialisation, a)),
                         tuple(sorted((k, _specialisation(x)) for k, x in kw.items())), tuple(config.items()))  # fmt: skip
                if ident not in queued:
                    queued.add(ident)
                    job.futures.append(pool.submit(_precompile, rec.kernel, a, kw, config))
    print(f"[tune] {len(jobs)} jobs, {len(queued)} compiles queued on {args.jobs} processes "
          f"({time.monotonic() - start:.0f} s)", flush=True)  # fmt: skip

    # 2. time every candidate, job by job
    entries, timings = [], []
    for job in jobs:
        if time.monotonic() - start > args.budget_s:
            print(f"[tune] budget spent: skipping {job.head} N={job.tokens} {job.op}", flush=True)
            timings.append({"head": job.head, "tokens": job.tokens, "op": job.op, "skipped": "budget"})
            continue
        compile_errors = []
        for fut in job.futures:
            try:
                name, config, seconds, error = fut.result(
                    timeout=max(1.0, args.budget_s - (time.monotonic() - start))
                )
            except futures.TimeoutError:
                break
            except Exception as err:  # noqa: BLE001 - a broken pool: the timing loop compiles by itself
                compile_errors.append({"error": f"{type(err).__name__}: {err}"})
                break
            if error:
                compile_errors.append({"kernel": name, "config": config, "error": error})
        d, v, softcap = HEADS[job.head]
        inputs = make_inputs(job.tokens, d, v, fill=True)
        run = runner(job.op, inputs, softcap)
        chosen: dict[str, dict] = {}
        for rec in job.records:
            cands = candidates(rec.kernel, _element_size(rec.dtype), shared_limit, args.space)
            results, best_ms, baseline = [], math.inf, None
            for i, config in enumerate(cands):
                if i and time.monotonic() - start > args.budget_s:
                    break
                try:
                    with cfg.forced_configs({**chosen, rec.kernel: config}):
                        out = run()
                        torch.cuda.synchronize()
                        if baseline is None:
                            baseline = out
                            err = 0.0
                        else:
                            err = _rel_err(out, baseline)
                        del out
                        if err > WRONG_REL_ERR:
                            results.append({"config": config, "status": f"wrong (rel err {err:.2e})"})
                            continue
                        times = time_config(run, best_ms)
                except Exception as error:  # noqa: BLE001 - out of resources, compile errors: skip the config
                    results.append(
                        {"config": config, "status": f"{type(error).__name__}: {str(error)[:200]}"}
                    )
                    torch.cuda.empty_cache()
                    continue
                ms = statistics.median(times)
                results.append(
                    {"config": config, "ms": ms, "times_ms": times, "rel_err": err, "status": "ok"}
                )
                best_ms = min(best_ms, ms)
            ok = [r for r in results if r.get("status") == "ok"]
            record = {"head": job.head, "tokens": job.tokens, "op": job.op, "kernel": rec.kernel, "key": rec.key,
                      "dtype": rec.dtype, "candidates": results, "of": len(cands), "compile_errors": compile_errors}  # fmt: skip
            timings.append(record)
            if not ok:
                print(f"[tune] {job.head} N={job.tokens} {job.op} {rec.kernel}: no config ran", flush=True)
                continue
            best = min(ok, key=lambda r: r["ms"])
            chosen[rec.kernel] = best["config"]
            base_ms = ok[0]["ms"] if ok[0]["config"] == cands[0] else None
            entries.append({
                **provenance, "kernel": rec.kernel, "dtype": rec.dtype, "key": rec.key, "config": best["config"],
                "ms": best["ms"], "default_ms": base_ms, "tried": len(results), "of": len(cands),
                "op": job.op, "head": job.head, "tokens": job.tokens,
            })  # fmt: skip
            c = best["config"]
            print(f"[tune] {job.head} N={job.tokens} {job.op} {rec.kernel}: best {c['BLOCK_N']}x{c['BLOCK_V']}x"
                  f"{c['BLOCK_D']} w{c['num_warps']} s{c['num_stages']} {best['ms']:.2f} ms (default "
                  f"{base_ms if base_ms is None else round(base_ms, 2)} ms; {len(results)}/{len(cands)} tried) "
                  f"[{time.monotonic() - start:.0f} s]", flush=True)  # fmt: skip
        del inputs, run
        torch.cuda.empty_cache()
        table = {"format": cfg.TABLE_FORMAT, "entries": merge(existing, entries)}
        (args.out / "tuned_configs.json").write_text(json.dumps(table, indent=1) + "\n")
        (args.out / "tune_timings.json").write_text(
            json.dumps({**provenance, "jobs": timings}, indent=1) + "\n"
        )
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)
    table = {"format": cfg.TABLE_FORMAT, "entries": merge(existing, entries)}
    (args.out / "tuned_configs.json").write_text(json.dumps(table, indent=1) + "\n")
    (args.out / "tune_timings.json").write_text(json.dumps({**provenance, "jobs": timings}, indent=1) + "\n")
    print(f"[tune] {len(entries)} entries written to {args.out / 'tuned_configs.json'} "
          f"({time.monotonic() - start:.0f} s)", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
