"""Runs a plan: every contender on every case, then each output against the float64 reference.

On CPU every measurement runs in a fresh process: a child forked from a ``forkserver`` that has only imported
the libraries (torch, prefuse, Liger-Kernel — importing them takes seconds, paid once), so each child starts
with the allocator state of a process that has computed nothing. On CUDA the measurements run in this process
(the allocator's peak counter is reset per measurement; Triton's autotuning is paid once).

Errors (``benchmarks.accuracy``): after a case's contenders ran, this process rebuilds its inputs, computes the
workload in float64 once, and compares every contender's first output with it.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import time
import traceback
from collections.abc import Callable, Iterable

import torch

from benchmarks import contenders
from benchmarks.accuracy import error_of, reference_output
from benchmarks.measure import measure
from benchmarks.plan import Case, Timing

PRELOAD = [
    "torch",
    "benchmarks.measure",
    "prefuse.kernels",
    "prefuse.alignment",
    "liger_kernel.chunked_loss",
    "trl.kernels.chunked_logprob",
]
"""Modules the forkserver imports once (a missing one is skipped)."""

Log = Callable[[str], None]


def _describe_failure(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".strip()


def _measure_safely(case: Case, contender: str, timing: Timing):
    """``measure`` with every failure turned into a record (status ``skipped`` / ``failed``)."""
    try:
        record, out = measure(case, contender, timing)
        return record, (out.numpy() if record["status"] == "ok" else None)
    except contenders.Unavailable as exc:
        return {"status": "skipped", "reason": str(exc)}, None
    except Exception as exc:  # noqa: BLE001 - a contender that crashes is a result, not the end of the report
        return {
            "status": "failed",
            "reason": _describe_failure(exc),
            "traceback": traceback.format_exc(),
        }, None


def _child(conn, case: Case, contender: str, timing: Timing) -> None:
    try:
        conn.send(_measure_safely(case, contender, timing))
    finally:
        conn.close()


class FreshProcess:
    """Runs each measurement in a new process forked from a forkserver that has preloaded ``PRELOAD``."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)

    def __call__(self, case: Case, contender: str, timing: Timing):
        receiver, sender = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_child, args=(sender, case, contender, timing), daemon=True)
        proc.start()
        sender.close()
        result = None
        try:
            if receiver.poll(timing.timeout_s):
                result = receiver.recv()
            else:
                proc.kill()
                result = ({"status": "failed", "reason": f"timed out after {timing.timeout_s:.0f} s"}, None)
        except EOFError:
            pass
        finally:
            receiver.close()
            proc.join()
        if result is None:
            code = proc.exitcode
            hint = " (killed: out of memory?)" if code == -9 else ""
            status = "oom" if code == -9 else "failed"
            result = ({"status": status, "reason": f"measuring process exited with code {code}{hint}"}, None)
        return result


def in_process(case: Case, contender: str, timing: Timing):
    """Runs the measurement in this process (CUDA; or CPU when fresh processes are not wanted)."""
    try:
        return _measure_safely(case, contender, timing)
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def case_record(case: Case, contender: str) -> dict:
    """The identifying fields of one result row."""
    return {
        "workload": case.workload,
        "head": case.head.name,
        "variant": case.variant,
        "rows": case.rows,
        "seq_len": case.seq_len,
        "tokens": case.tokens,
        "kl_rows": case.kl_rows,
        "prompt_frac": case.prompt_frac,
        "trainable_head": case.trainable_head,
        "mode": case.mode,
        "contender": contender,
        "case": case.to_dict(),
    }


def _fmt_record(record: dict) -> str:
    if record["status"] != "ok":
        return f"{record['status']}: {record.get('reason', '')}"
    mem = record["memory"]["peak_bytes"] / 2**20
    text = f"{record['time']['median_s'] * 1e3:10.1f} ms  peak +{mem:9.1f} MiB"
    if "compile_s" in record:
        text += f"  (compile {record['compile_s']:.0f} s)"
    return text


def run_cases(
    cases: Iterable[Case],
    contender_names: Iterable[str],
    timing: Timing,
    *,
    isolate: bool,
    log: Log = print,
    check: Callable[[Case], bool] = lambda case: True,
) -> list[dict]:
    """Measure every contender on every case; returns one record per (case, contender), with the errors
    against float64 of the cases where ``check(case)``."""
    cases, names = list(cases), list(contender_names)
    execute = FreshProcess() if isolate else in_process
    results: list[dict] = []
    started = time.perf_counter()
    for index, case in enumerate(cases, 1):
        log(f"[{index}/{len(cases)}] {case.workload} | {case.head.name} | {case.variant} | {case.shape()}")
        outputs = {}
        case_results = []
        for name in names:
            record = case_record(case, name)
            reason = contenders.unavailable_reason(case, name)
            if reason is not None:
                record.update(status="skipped", reason=reason)
            else:
                measured, output = execute(case, name, timing)
                record.update(measured)
                if output is not None:
                    outputs[name] = output
                elapsed = time.perf_counter() - started
                log(f"    {name:<15} {_fmt_record(record)}   [{elapsed / 60:5.1f} min]")
            case_results.append(record)
        if outputs and check(case):
            reference = reference_output(case)
            for record in case_results:
                if record["contender"] in outputs:
                    record["error"], record["error_kind"] = error_of(
                        case, outputs[record["contender"]], reference
                    )
            errors = ", ".join(f"{r['contender']} {r['error']:.1e}" for r in case_results if "error" in r)
            log(f"    errors vs float64: {errors}")
        results.extend(case_results)
    return results
