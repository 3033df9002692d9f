r"""The matmul floor of prefuse's core op, and how close the op gets to it.

The core op at N non-ignored tokens, hidden size D and vocabulary V is GEMM work: the forward is one
``N x D x V`` matrix product (``2·N·D·V`` FLOP); the backward with recomputation adds the logits again, ``dl @ W``
(``grad_hidden``) and ``dl^T @ h`` (``grad_weight``): 4 such GEMMs for forward+backward with a trainable head,
3 with a frozen one. The deterministic path recomputes the logits once more (its weight-gradient kernel owns
the vocab tiles), so it *executes* 5 for a trainable head, though the floor still counts 4.

    floor time = counted GEMM FLOP / the device's measured bf16 matmul rate
    fraction   = floor time / measured time          (the issue's target: >= 0.70 forward+backward)

Two modes:

- ``--dry-run`` (any machine, no torch import): the arithmetic for the Llama-3-8B head (D=4096, V=128,256,
  bf16) at N = 4k, 16k, 64k: FLOP, the fewest bytes (each input read once, each output written once), the
  predicted floor at the H100 / H200 rates (measured on this workplace's machines, and the datasheet), the
  special-function (exp) count, the per-tile arithmetic intensity of the kernels, and the weight-gradient
  accumulation traffic of the two backward designs. ``TUNING.md`` quotes these numbers.
- default (CUDA): measures the bf16 matmul rate once (8192³ ``torch.matmul`` on random data, CUDA events,
  median), the head-shaped GEMM rate and the device-to-device copy bandwidth, then times prefuse's
  ``linear_logprobs`` forward and forward+backward (trainable, frozen, deterministic) at each N, checks the
  first rows against float64, and writes ``floor.json`` and ``floor.md``.

    python -m benchmarks.floor --dry-run [--json out.json]
    python -m benchmarks.floor --out DIR [--tokens 4096 16384 65536] [--budget-s 150]

Launch configs come from prefuse's usual choice (tuned table, else ``PREFUSE_AUTOTUNE``): the GPU session sets
``PREFUSE_AUTOTUNE=off`` so that an untabled shape takes the fixed default instead of minutes of autotuning;
the JSON records which config each kernel ran with and where it came from.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

D_LLAMA3_8B, V_LLAMA3_8B = 4096, 128_256
TOKENS = (4096, 16384, 65536)
TARGET_FRACTION = 0.70
BF16_BYTES = 2


@dataclass(frozen=True)
class Peak:
    """Ceilings of one device kind. ``measured_*``: read on this workplace's machines (KINDS.md, 2026-11:
    8192³ bf16 matmul on random data; device-to-device copy counting bytes read + written); ``datasheet_*``:
    the vendor's dense bf16 rate and HBM bandwidth; ``sfu_tops``: exp2/tanh-class special-function
    throughput (16 per clock per SM at about 1.83 GHz, as FlashAttention-3 quotes for the H100 SXM)."""

    name: str
    measured_tflops: float
    measured_tbps: float
    datasheet_tflops: float
    datasheet_tbps: float
    sfu_tops: float
    sms: int
    l2_mb: int
    smem_per_block_kib: int


PEAKS = {
    "h100": Peak("NVIDIA H100 80GB HBM3 (SXM)", 798.0, 3.0, 989.4, 3.35, 3.9, 132, 50, 227),
    "h200": Peak("NVIDIA H200 (SXM)", 788.0, 4.3, 989.4, 4.8, 3.9, 132, 60, 227),
}

# Variants: (name, counted GEMMs for the floor, executed GEMMs, op options)
VARIANTS = (
    ("fwd", 1, 1, dict(backward=False, trainable=False, deterministic=False)),
    ("fwd+bwd", 4, 4, dict(backward=True, trainable=True, deterministic=False)),
    ("fwd+bwd frozen head", 3, 3, dict(backward=True, trainable=False, deterministic=False)),
    ("fwd+bwd deterministic", 4, 5, dict(backward=True, trainable=True, deterministic=True)),
)

# Tiles whose arithmetic intensity the dry run reports: (BLOCK_N, BLOCK_V)
TILES = ((64, 64), (64, 128), (128, 64), (128, 128), (64, 256), (128, 256), (256, 128))


def gemm_flop(n: int, d: int, v: int) -> int:
    """FLOP of one ``n x d x v`` matrix product (a multiply and an add per term)."""
    return 2 * n * d * v


def min_bytes(n: int, d: int, v: int, *, backward: bool, trainable: bool, elem: int = BF16_BYTES) -> int:
    """Fewest device-memory bytes: every input read once, every output written once.

    Forward: hidden ``n·d``, weight ``v·d`` (elem bytes), int64 targets, fp32 log-prob and log-sum-exp out.
    Backward: hidden and weight again, targets, fp32 lse and upstream gradient in; ``grad_hidden`` (and
    ``grad_weight`` when trainable) out in the input dtype."""
    fwd = (n * d + v * d) * elem + n * 8 + 2 * n * 4
    if not backward:
        return fwd
    bwd = (n * d + v * d) * elem + n * 8 + 2 * n * 4 + n * d * elem + (v * d * elem if trainable else 0)
    return fwd + bwd


def tile_intensity(block_n: int, block_v: int, elem: int = BF16_BYTES) -> float:
    """FLOP per byte of operands a program streams into shared memory for one logit tile: the tile costs
    ``2·BLOCK_N·BLOCK_V·D`` FLOP and loads ``(BLOCK_N + BLOCK_V)·D`` elements (the hidden block is reloaded
    for every vocab tile: at D=4096 it does not fit on chip). Independent of D."""
    return 2 * block_n * block_v / ((block_n + block_v) * elem)


def weight_grad_traffic(n: int, d: int, v: int, block_n: int) -> dict:
    """Weight-gradient accumulation of the two backward designs (fp32 ``grad_W`` of ``v·d`` elements).

    - fused (default): every row block adds its ``dl^T @ h`` share to every ``grad_W`` tile with
      ``tl.atomic_add``: ``ceil(n / BLOCK_N)·v·d`` fp32 atomic adds, resolved in L2;
    - deterministic weight kernel: a program owns a vocab tile and, per row block, load-add-stores its
      ``BLOCK_V x D`` fp32 slab of ``grad_W`` (132 programs x BLOCK_V x D x 4 bytes does not fit in L2):
      ``ceil(n / BLOCK_N)·v·d·8`` bytes to and from device memory.

    Intensity = FLOP of the ``grad_W`` GEMM per byte of that traffic (``BLOCK_N / 2`` for atomics counted at
    4 bytes each, ``BLOCK_N / 4`` for the slab)."""
    blocks = math.ceil(n / block_n)
    atomics = blocks * v * d
    slab_bytes = blocks * v * d * 8
    flop = gemm_flop(n, d, v)
    return {
        "block_n": block_n,
        "row_blocks": blocks,
        "atomic_adds": atomics,
        "atomic_bytes": atomics * 4,
        "atomic_flop_per_byte": flop / (atomics * 4),
        "slab_bytes": slab_bytes,
        "slab_flop_per_byte": flop / slab_bytes,
    }


def plan(n: int, d: int = D_LLAMA3_8B, v: int = V_LLAMA3_8B) -> list[dict]:
    """The counted work of every variant at ``n`` tokens, and its floor on each device kind of :data:`PEAKS`."""
    rows = []
    one = gemm_flop(n, d, v)
    for name, counted, executed, opts in VARIANTS:
        nbytes = min_bytes(n, d, v, backward=opts["backward"], trainable=opts["trainable"])
        exps = n * v * (2 if opts["backward"] else 1)  # softmax exp per logit, per pass
        row = {
            "tokens": n,
            "variant": name,
            "counted_gemms": counted,
            "executed_gemms": executed,
            "counted_tflop": counted * one / 1e12,
            "executed_tflop": executed * one / 1e12,
            "min_gbytes": nbytes / 1e9,
            "flop_per_min_byte": counted * one / nbytes,
            "exps_g": exps / 1e9,
            "floor_ms": {},
        }
        for kind, peak in PEAKS.items():
            compute = counted * one / (peak.measured_tflops * 1e12) * 1e3
            memory = nbytes / (peak.measured_tbps * 1e12) * 1e3
            row["floor_ms"][kind] = {
                "compute_ms": compute,
                "memory_ms": memory,
                "floor_ms": max(compute, memory),
                "bound": "compute" if compute >= memory else "memory",
                "datasheet_compute_ms": counted * one / (peak.datasheet_tflops * 1e12) * 1e3,
                "target_ms": max(compute, memory) / TARGET_FRACTION,
                "exp_ms": exps / (peak.sfu_tops * 1e12) * 1e3,
            }
        rows.append(row)
    return rows


def dry_run(tokens=TOKENS, d: int = D_LLAMA3_8B, v: int = V_LLAMA3_8B) -> dict:
    """Everything the CPU can say: :func:`plan` per token count, tile intensities against each device's
    ridge point, weight-gradient traffic per token count and BLOCK_N."""
    ridges = {
        kind: {"hbm_ridge_flop_per_byte": p.measured_tflops / p.measured_tbps, "peak": asdict(p)}
        for kind, p in PEAKS.items()
    }
    tiles = []
    for bn, bv in TILES:
        ai = tile_intensity(bn, bv)
        tiles.append({
            "block_n": bn,
            "block_v": bv,
            "flop_per_operand_byte": ai,
            "operand_tbps_at_measured_peak": {k: p.measured_tflops / ai for k, p in PEAKS.items()},
            "acc_regs_per_thread": {str(w): bn * bv // (32 * w) for w in (4, 8, 16)},
        })  # fmt: skip
    return {
        "head": {"name": "llama3-8b", "D": d, "V": v, "dtype": "bfloat16"},
        "weight_gbytes": v * d * BF16_BYTES / 1e9,
        "devices": ridges,
        "cases": [row for n in tokens for row in plan(n, d, v)],
        "tiles": tiles,
        "weight_grad": [weight_grad_traffic(n, d, v, bn) for n in tokens for bn in (64, 128, 256)],
    }


def dry_run_markdown(data: dict) -> str:
    head = data["head"]
    out = [
        f"# Floor arithmetic: {head['name']} head (D={head['D']}, V={head['V']:,}, {head['dtype']})",
        "",
        f"Weight: {data['weight_gbytes']:.2f} GB. Floors use the rates measured on this workplace's machines "
        f"(H100 {PEAKS['h100'].measured_tflops:g} TFLOP/s, {PEAKS['h100'].measured_tbps:g} TB/s; "
        f"H200 {PEAKS['h200'].measured_tflops:g} TFLOP/s, {PEAKS['h200'].measured_tbps:g} TB/s).",
        "",
        "| tokens | variant | GEMMs counted (run) | TFLOP counted | min GB | FLOP/B | H100 floor ms | "
        "H200 floor ms | H100 70% target ms | exp ms (H100 SFU) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["cases"]:
        h1, h2 = r["floor_ms"]["h100"], r["floor_ms"]["h200"]
        out.append(
            f"| {r['tokens']:,} | {r['variant']} | {r['counted_gemms']} ({r['executed_gemms']}) | "
            f"{r['counted_tflop']:.1f} | {r['min_gbytes']:.2f} | {r['flop_per_min_byte']:,.0f} | "
            f"{h1['floor_ms']:.1f} ({h1['bound']}) | {h2['floor_ms']:.1f} | {h1['target_ms']:.1f} | "
            f"{h1['exp_ms']:.2f} |"
        )
    out += [
        "",
        "| BLOCK_N x BLOCK_V | FLOP per operand byte | operand TB/s needed at H100 peak | fp32 acc regs/thread "
        "(4 / 8 / 16 warps) |",
        "|---|---:|---:|---|",
    ]
    for t in data["tiles"]:
        regs = t["acc_regs_per_thread"]
        out.append(
            f"| {t['block_n']} x {t['block_v']} | {t['flop_per_operand_byte']:.1f} | "
            f"{t['operand_tbps_at_measured_peak']['h100']:.1f} | {regs['4']} / {regs['8']} / {regs['16']} |"
        )
    out += [
        "",
        "| tokens | BLOCK_N | row blocks | grad_W fp32 atomics (G) | atomic GB | GEMM FLOP per atomic byte | "
        "deterministic slab GB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in data["weight_grad"]:
        out.append(
            f"| {w['row_blocks'] * w['block_n']:,} | {w['block_n']} | {w['row_blocks']} | "
            f"{w['atomic_adds'] / 1e9:.1f} | {w['atomic_bytes'] / 1e9:.0f} | {w['atomic_flop_per_byte']:.0f} | "
            f"{w['slab_bytes'] / 1e9:.0f} |"
        )
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------- CUDA


def _median_ms(fn, *, warmup: int, min_reps: int, max_reps: int, min_time_s: float) -> tuple[float, list]:
    """Median of CUDA-event times of `fn` (after `warmup` untimed calls): at least `min_reps`, more until
    `min_time_s` of timed work, at most `max_reps`."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    while len(times) < max_reps and (len(times) < min_reps or sum(times) < min_time_s * 1e3):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times), times


def _square_matmul_tflops(n: int = 8192) -> tuple[float, float, list]:
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    ms, times = _median_ms(lambda: torch.matmul(a, b), warmup=3, min_reps=10, max_reps=30, min_time_s=0.5)
    return gemm_flop(n, n, n) / (ms * 1e-3) / 1e12, ms, times


def _head_gemm_tflops(n: int = 16384, d: int = D_LLAMA3_8B, v: int = V_LLAMA3_8B) -> float:
    import torch

    g = torch.Generator(device="cuda").manual_seed(1)
    h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(v, d, device="cuda", dtype=torch.bfloat16, generator=g)
    ms, _ = _median_ms(lambda: h @ w.T, warmup=2, min_reps=5, max_reps=20, min_time_s=0.3)
    return gemm_flop(n, d, v) / (ms * 1e-3) / 1e12


def _copy_tbps(elements: int = 1 << 29) -> float:
    import torch

    src = torch.randn(elements, device="cuda", dtype=torch.float32)  # 2 GiB
    dst = torch.empty_like(src)
    ms, _ = _median_ms(lambda: dst.copy_(src), warmup=2, min_reps=10, max_reps=30, min_time_s=0.3)
    return 2 * elements * 4 / (ms * 1e-3) / 1e12


def measure_ceilings() -> dict:
    """The bf16 matmul rate (8192³ on random data, the issue's "large torch.matmul"), the rate of the
    head-shaped product (16,384 x 4096 @ 4096 x 128,256), the device-to-device copy bandwidth (bytes read
    plus written) and the L2 read bandwidth."""
    import torch

    square, ms, times = _square_matmul_tflops()
    head = _head_gemm_tflops()
    copy = _copy_tbps()
    torch.cuda.empty_cache()
    try:
        l2 = measure_l2_read(torch.cuda.get_device_properties(0).multi_processor_count)
    except Exception as err:  # noqa: BLE001 - informative only
        print(f"L2 read bandwidth: FAILED {type(err).__name__}: {err}", flush=True)
        l2 = None
    return {
        "l2_read_tbps": l2,
        "matmul_tflops": square,
        "matmul_shape": [8192, 8192, 8192],
        "matmul_ms": ms,
        "matmul_spread_ms": [min(times), max(times)],
        "head_gemm_tflops": head,
        "head_gemm_shape": [16384, D_LLAMA3_8B, V_LLAMA3_8B],
        "copy_tbps": copy,
    }


@functools.cache
def _l2_read_kernel():
    """A Triton kernel that streams an L2-resident buffer: program ``p`` sums, over ``ITERS`` iterations,
    the ``BLOCK``-element blocks ``(p + i·programs) mod blocks`` of ``x`` (``.cg`` loads: L2, not L1), and
    writes its ``BLOCK`` partial sums. Defined on first use, so that ``TRITON_INTERPRET`` set by then
    applies (the CPU tests run it under the interpreter)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, out_ptr, n_blocks, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), tl.float32)
        for i in range(ITERS):
            block = (pid + i * programs) % n_blocks
            acc += tl.load(x_ptr + block * BLOCK + offs, cache_modifier=".cg")
        tl.store(out_ptr + pid * BLOCK + offs, acc)

    return kernel


def l2_read(x, programs: int, iters: int, block: int = 1024):
    """Launch :func:`_l2_read_kernel` over the fp32 buffer ``x`` (``x.numel()`` a multiple of `block`);
    returns the ``(programs, block)`` partial sums and the bytes read."""
    import torch

    out = torch.empty(programs, block, dtype=torch.float32, device=x.device)
    _l2_read_kernel()[(programs,)](x, out, x.numel() // block, ITERS=iters, BLOCK=block, num_warps=4)
    return out, programs * iters * block * 4


def measure_l2_read(sms: int) -> float:
    """L2 read bandwidth in TB/s: a 16 MiB buffer (well inside L2) read ~1 GB over, 8 programs per SM."""
    import torch

    x = torch.randn(1 << 22, device="cuda")
    programs, iters = 8 * sms, 256
    holder = {}

    def run():
        holder["out"], holder["bytes"] = l2_read(x, programs, iters)

    ms, _ = _median_ms(run, warmup=2, min_reps=10, max_reps=50, min_time_s=0.2)
    return holder["bytes"] / (ms * 1e-3) / 1e12


def environment() -> dict:
    import torch
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "sms": props.multi_processor_count,
        "memory_gib": props.total_memory / 2**30,
        "l2_mb": getattr(props, "L2_cache_size", 0) / 1e6,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
    }


def time_op(n: int, opts: dict, *, d: int, v: int, min_time_s: float) -> dict:
    """Median time of prefuse's ``linear_logprobs`` at n all-valid tokens (one variant), its peak memory,
    the configs its kernels ran with, and the max abs error of the first rows' log-probs against float64."""
    import torch
    from prefuse.kernels.linear_logprobs import linear_logprobs
    from prefuse.kernels.linear_logprobs import triton_configs as cfg

    g = torch.Generator(device="cuda").manual_seed(n)
    hidden = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, generator=g)
    weight = (torch.randn(v, d, device="cuda", generator=g) / math.sqrt(d) * 4).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    upstream = torch.randn(n, device="cuda", generator=g)
    hidden.requires_grad_(opts["backward"])
    weight.requires_grad_(opts["backward"] and opts["trainable"])

    def step():
        if not opts["backward"]:
            with torch.no_grad():
                return linear_logprobs(hidden, weight, targets, deterministic=opts["deterministic"])
        hidden.grad = weight.grad = None
        logp = linear_logprobs(hidden, weight, targets, deterministic=opts["deterministic"])
        logp.backward(upstream)
        return logp

    with cfg.recording() as records:
        logp = step()  # compiles; autotunes if PREFUSE_AUTOTUNE asks for it
        torch.cuda.synchronize()
    rows = min(n, 256)
    with torch.no_grad():
        ref = torch.log_softmax(hidden[:rows].double() @ weight.double().T, dim=-1)
        ref = ref.gather(1, targets[:rows, None])[:, 0]
        err = (logp[:rows].double() - ref).abs().max().item()
    del logp, ref
    torch.cuda.reset_peak_memory_stats()
    ms, times = _median_ms(step, warmup=0, min_reps=3, max_reps=20, min_time_s=min_time_s)  # warm already
    return {
        "ms": ms,
        "times_ms": times,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "logp_max_abs_err_first_rows": err,
        "configs": [
            {"kernel": r.kernel, "key": r.key, "config": r.config, "source": r.source} for r in records
        ],
    }


def measure(
    tokens, *, budget_s: float, min_time_s: float, d: int = D_LLAMA3_8B, v: int = V_LLAMA3_8B
) -> dict:
    import torch

    start = time.monotonic()
    result = {"environment": environment(), "ceilings": measure_ceilings(), "cases": [], "skipped": []}
    rate = result["ceilings"]["matmul_tflops"]
    ceil = result["ceilings"]
    print(f"bf16 matmul: {rate:.0f} TFLOP/s (8192^3), head GEMM {ceil['head_gemm_tflops']:.0f} TFLOP/s, "
          f"copy {ceil['copy_tbps']:.2f} TB/s, L2 read {ceil['l2_read_tbps'] or 0:.1f} TB/s", flush=True)  # fmt: skip
    for n in tokens:
        for name, counted, executed, opts in VARIANTS:
            label = f"N={n} {name}"
            if time.monotonic() - start > budget_s:
                result["skipped"].append(label)
                print(f"{label}: skipped (budget of {budget_s:.0f} s spent)", flush=True)
                continue
            try:
                timing = time_op(n, opts, d=d, v=v, min_time_s=min_time_s)
            except Exception as err:  # noqa: BLE001 - one failing case must not lose the others
                result["skipped"].append(f"{label}: {type(err).__name__}: {err}")
                print(f"{label}: FAILED {type(err).__name__}: {err}", flush=True)
                torch.cuda.empty_cache()
                continue
            one = gemm_flop(n, d, v)
            floor_ms = counted * one / (rate * 1e12) * 1e3
            case = {
                "tokens": n,
                "variant": name,
                "counted_gemms": counted,
                "executed_gemms": executed,
                "floor_ms": floor_ms,
                "fraction_of_floor": floor_ms / timing["ms"],
                "counted_tflops": counted * one / (timing["ms"] * 1e-3) / 1e12,
                "executed_tflops": executed * one / (timing["ms"] * 1e-3) / 1e12,
                "meets_target": floor_ms / timing["ms"] >= TARGET_FRACTION,
                **timing,
            }
            result["cases"].append(case)
            print(f"{label}: {timing['ms']:.2f} ms, {case['fraction_of_floor']:.1%} of the floor "
                  f"({case['counted_tflops']:.0f} TFLOP/s counted), err {timing['logp_max_abs_err_first_rows']:.2e}",
                  flush=True)  # fmt: skip
            torch.cuda.empty_cache()
    result["target_fraction"] = TARGET_FRACTION
    result["elapsed_s"] = time.monotonic() - start
    return result


def measured_markdown(data: dict) -> str:
    env, ceil = data["environment"], data["ceilings"]
    out = [
        f"# prefuse core op against the matmul floor: {env['device']}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; {env['sms']} SMs.",
        f"Measured bf16 matmul rate (8192³, random data, median): **{ceil['matmul_tflops']:.0f} TFLOP/s**; "
        f"head-shaped GEMM (16,384 x 4096 @ 4096 x 128,256): {ceil['head_gemm_tflops']:.0f} TFLOP/s; "
        f"device-to-device copy {ceil['copy_tbps']:.2f} TB/s; L2 read "
        + (f"{ceil['l2_read_tbps']:.1f} TB/s." if ceil.get("l2_read_tbps") else "not measured."),
        "",
        "Llama-3-8B head (D=4096, V=128,256), bf16, all tokens non-ignored. Floor = counted GEMM FLOP / the "
        "measured matmul rate; target: forward+backward at >= 70 % of it.",
        "",
        "| tokens | variant | GEMMs counted (run) | time ms | floor ms | fraction of floor | TFLOP/s counted "
        "(run) | peak GiB | configs |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in data["cases"]:
        configs = "; ".join(
            f"{r['kernel']}: {r['source']}"
            + (
                f" {r['config']['BLOCK_N']}x{r['config']['BLOCK_V']}x{r['config']['BLOCK_D']}"
                f" w{r['config']['num_warps']} s{r['config']['num_stages']}"
                if r["config"]
                else ""
            )
            for r in c["configs"]
        )
        mark = " ✓" if c["meets_target"] and c["variant"] != "fwd" else ""
        out.append(
            f"| {c['tokens']:,} | {c['variant']} | {c['counted_gemms']} ({c['executed_gemms']}) | {c['ms']:.2f} | "
            f"{c['floor_ms']:.2f} | {c['fraction_of_floor']:.1%}{mark} | {c['counted_tflops']:.0f} "
            f"({c['executed_tflops']:.0f}) | {c['peak_mem_gib']:.1f} | {configs} |"
        )
    if data["skipped"]:
        out += ["", "Skipped: " + "; ".join(data["skipped"])]
    return "\n".join(out) + "\n"


def summary_line(data: dict) -> str:
    """One line for the GPU session's summary: the forward+backward fractions of the floor."""
    parts = [
        f"N={c['tokens']} {c['variant'].removeprefix('fwd+bwd').strip() or 'trainable'} {c['fraction_of_floor']:.0%}"
        for c in data["cases"]
        if c["variant"].startswith("fwd+bwd")
    ]
    rate = data["ceilings"]["matmul_tflops"]
    return f"floor summary: matmul {rate:.0f} TFLOP/s; fwd+bwd fraction of floor (target 70%): " + (
        ", ".join(parts) or "none measured"
    )


def profile(n: int, d: int = D_LLAMA3_8B, v: int = V_LLAMA3_8B) -> None:
    """Forward+backward with a trainable head at `n` tokens, twice (the second run has every kernel
    compiled: profile it with ``ncu -c``)."""
    import torch
    from prefuse.kernels.linear_logprobs import linear_logprobs

    g = torch.Generator(device="cuda").manual_seed(n)
    hidden = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    weight = (
        (torch.randn(v, d, device="cuda", generator=g) / math.sqrt(d) * 4).to(torch.bfloat16).requires_grad_()
    )
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    for _ in range(2):
        hidden.grad = weight.grad = None
        linear_logprobs(hidden, weight, targets).sum().backward()
    torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the arithmetic only (no GPU, no torch)")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--out", type=Path, help="folder for floor.json and floor.md")
    parser.add_argument("--json", type=Path, help="dry run: write the JSON here ('-': stdout)")
    parser.add_argument("--budget-s", type=float, default=150.0, help="stop starting new cases after this")
    parser.add_argument("--min-time-s", type=float, default=1.0, help="timed work per case, at least")
    parser.add_argument("--profile", type=int, metavar="N",
                        help="run forward+backward (trainable head) twice at N tokens, untimed (for ncu)")  # fmt: skip
    args = parser.parse_args(argv)

    if args.dry_run:
        data = dry_run(tuple(args.tokens))
        if args.json is not None and str(args.json) == "-":
            json.dump(data, sys.stdout, indent=1)
            return 0
        print(dry_run_markdown(data))
        if args.json is not None:
            args.json.write_text(json.dumps(data, indent=1))
        return 0

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: use --dry-run for the arithmetic", file=sys.stderr)
        return 2
    if args.profile:
        profile(args.profile)
        return 0
    data = measure(tuple(args.tokens), budget_s=args.budget_s, min_time_s=args.min_time_s)
    data["dry_run"] = dry_run(tuple(args.tokens))
    text = measured_markdown(data)
    print(text)
    print(summary_line(data))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "floor.json").write_text(json.dumps(data, indent=1))
        (args.out / "floor.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
