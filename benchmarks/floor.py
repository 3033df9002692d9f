r"""Roofline of the lm-head log-prob at the GPU benchmark shapes (predicted), and the measured ceilings.

The work is GEMMs over the ``n`` scored tokens (ignored tokens cost nothing in every prefuse backend): one
``n x D x V`` product is ``2·n·D·V`` FLOP. Forward+backward with a trainable head, per backend:

- ``chunked``: per chunk of ``CHUNK`` rows, cuBLAS logits (fp32 out), one Triton pass (online max / sum-exp /
  target) over them; the backward recomputes the logits, one pass writes ``dl`` (bf16) over them, then
  ``dH = dl @ W`` and ``dW += dlᵀ @ H`` (fp32 accumulator). 4 GEMMs.
- ``torch``: the same chunks with the passes as PyTorch element-wise kernels on fp32 logits (each pass a read,
  most a read and a write). 4 GEMMs.
- ``triton``: the all-fused kernels at their default tiles. 4 GEMMs, but the hidden rows are re-streamed for
  every vocab tile (from HBM once they exceed L2), and the backward adds ``dH`` per vocab tile and ``dW`` per
  row block with fp32 atomics (a read-modify-write, counted as 8 bytes of HBM traffic per add).
- ``loss-fused``: the loss modules' path: per chunk logits → loss gradient → ``dl`` → ``dH``, ``dW`` in the
  same pass; no recomputation: 3 GEMMs.

Predicted time = the sum over the phases (kernels that run one after another) of
``max(FLOP / peak, bytes / HBM bandwidth)``: a roofline, no efficiency factor. These are predictions;
``python -m benchmarks.floor --measure`` on a GPU measures the two ceilings themselves.

    python -m benchmarks.floor                      # the predicted table (Markdown)
    python -m benchmarks.floor --write-tuning       # refresh the table in kernels/linear_logprobs/TUNING.md
    python -m benchmarks.floor --measure [--json F] # CUDA: bf16 matmul TFLOP/s and device copy TB/s
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import NamedTuple

CHUNK = 4096
"""Rows per chunk of the chunked, torch and loss-fused backends."""
TRITON_TILES = {"forward": (64, 128), "backward": (64, 128)}
"""(BLOCK_N, BLOCK_V) of the Triton kernels' default bf16 configs."""
BF16 = 2
TUNING_MD = Path(__file__).resolve().parents[1] / "kernels" / "linear_logprobs" / "TUNING.md"
MARKERS = ("<!-- roofline:start -->", "<!-- roofline:end -->")


class Peak(NamedTuple):
    """Assumed ceilings of one GPU: dense bf16 matmul rate, HBM bandwidth, L2 size."""

    name: str
    tflops: float
    tbps: float
    l2_mb: int


PEAKS = (
    Peak("H100 SXM", 790.0, 3.35, 50),
    Peak("H200", 790.0, 4.8, 60),
)
"""790 TFLOP/s: what cuBLAS reaches on a large bf16 GEMM (80 % of the 989 dense datasheet rate); HBM: the
datasheet bandwidths."""


class Shape(NamedTuple):
    head: str
    d: int
    v: int
    softcap: float | None
    tokens: int
    prompt: float

    @property
    def scored(self) -> int:
        return round(self.tokens * (1 - self.prompt))


SHAPES = tuple(
    Shape(head, d, v, cap, tokens, prompt)
    for head, d, v, cap, cases in (
        ("llama3-8b", 4096, 128_256, None, [(t, p) for t in (8192, 16384) for p in (0.0, 0.5)]),
        ("gemma2-9b", 3584, 256_000, 30.0, [(16384, 0.5)]),
    )
    for tokens, prompt in cases
)
BACKENDS = ("chunked", "torch", "triton", "loss-fused")


class Phase(NamedTuple):
    flop: float
    bytes: float


def gemm_flop(n: int, d: int, v: int) -> int:
    """FLOP of one ``n x d x v`` matrix product."""
    return 2 * n * d * v


def phases(backend: str, shape: Shape, l2_mb: int) -> list[Phase]:
    """The kernels of one forward+backward (trainable head) and their FLOP and HBM bytes (module docstring)."""
    n, d, v = shape.scored, shape.d, shape.v
    gemm = gemm_flop(n, d, v)
    chunks = math.ceil(n / CHUNK)
    w, h, logits = v * d * BF16, n * d * BF16, n * v  # bytes of W and H; logit elements
    grad_w_acc = chunks * v * d * 4 * 2 + v * d * (4 + BF16)  # fp32 accumulate per chunk, final cast
    if backend in ("chunked", "torch", "loss-fused"):
        logits_gemm = Phase(gemm, chunks * w + h + 4 * logits)  # fp32 logits out
        dh = Phase(gemm, 2 * logits + chunks * w + h)  # bf16 dl in
        dw = Phase(gemm, 2 * logits + h + grad_w_acc)
        if backend == "chunked":
            fwd_pass = Phase(0, 4 * logits)
            bwd_pass = Phase(0, 6 * logits)  # read fp32 logits, write bf16 dl
            return [logits_gemm, fwd_pass, logits_gemm, bwd_pass, dh, dw]
        if backend == "loss-fused":
            return [logits_gemm, Phase(0, 6 * logits), dh, dw]
        passes = 2 + (2 if shape.softcap else 0)  # max, sum-exp (+ tanh, scale)
        fwd_passes = Phase(0, passes * 4 * logits)
        # sub lse, exp, scale by the gradient, the one-hot, dz/dl (+ the softcap's 1 - t^2): read + write
        bwd_passes = Phase(0, (4 + (2 if shape.softcap else 0)) * 8 * logits + 2 * logits)  # + bf16 copy
        return [logits_gemm, fwd_passes, logits_gemm, bwd_passes, dh, dw]
    if backend != "triton":
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    h_passes = {k: math.ceil(v / tile[1]) if h > l2_mb * 1e6 else 1 for k, tile in TRITON_TILES.items()}
    forward = Phase(gemm, w + h * h_passes["forward"])
    block_n, block_v = TRITON_TILES["backward"]
    atomics = (math.ceil(v / block_v) * n * d + math.ceil(n / block_n) * v * d) * 8
    backward = Phase(3 * gemm, 2 * (w + h * h_passes["backward"]) + atomics + v * d * (4 + BF16))
    return [forward, backward]


def predict(backend: str, shape: Shape, peak: Peak) -> dict:
    """GEMM count, TFLOP, HBM GB and the predicted milliseconds of `backend` at `shape` on `peak`."""
    parts = phases(backend, shape, peak.l2_mb)
    flop = sum(p.flop for p in parts)
    nbytes = sum(p.bytes for p in parts)
    ms = sum(max(p.flop / (peak.tflops * 1e12), p.bytes / (peak.tbps * 1e12)) for p in parts) * 1e3
    one = gemm_flop(shape.scored, shape.d, shape.v)
    return {"gemms": round(flop / one), "tflop": flop / 1e12, "gbytes": nbytes / 1e9, "ms": ms}


def roofline_markdown(shapes=SHAPES, peaks=PEAKS) -> str:
    """The predicted table, one row per shape and backend, a time column per device."""
    assumed = "; ".join(f"{p.name}: {p.tflops:g} TFLOP/s bf16 dense, {p.tbps:g} TB/s HBM, {p.l2_mb} MB L2"
                        for p in peaks)  # fmt: skip
    lines = [
        f"Predicted, not measured (roofline of `benchmarks/floor.py`; {assumed}). Op forward+backward, "
        "trainable head, bf16; only scored tokens cost work.",
        "",
        "| head | tokens | prompt | scored | backend | GEMMs | TFLOP | HBM GB | "
        + " | ".join(f"{p.name} ms" for p in peaks)
        + " |",
        "|---|---:|---:|---:|---|---:|---:|---:|" + "---:|" * len(peaks),
    ]
    for shape in shapes:
        cap = f" (softcap {shape.softcap:g})" if shape.softcap else ""
        for backend in BACKENDS:
            rows = [predict(backend, shape, peak) for peak in peaks]
            r = rows[0]
            times = " | ".join(f"{row['ms']:.1f}" for row in rows)
            lines.append(
                f"| {shape.head}{cap} | {shape.tokens:,} | {shape.prompt:.0%} | {shape.scored:,} | {backend} | "
                f"{r['gemms']} | {r['tflop']:.1f} | {r['gbytes']:.0f} | {times} |"
            )
    return "\n".join(lines) + "\n"


def write_tuning(path: Path = TUNING_MD) -> None:
    """Replace the text between :data:`MARKERS` in `path` by :func:`roofline_markdown`."""
    text = path.read_text()
    start, end = (re.escape(m) for m in MARKERS)
    new, count = re.subn(f"{start}.*?{end}", lambda _: f"{MARKERS[0]}\n{roofline_markdown()}{MARKERS[1]}", text,
                         flags=re.DOTALL)  # fmt: skip
    if count != 1:
        raise ValueError(f"{path} must hold the markers {MARKERS} once")
    path.write_text(new)


def measure_ceilings() -> dict:
    """CUDA: median bf16 matmul rate (8192³) and device-to-device copy bandwidth (bytes read + written)."""
    import torch

    def median_ms(fn, reps=20):
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        return sorted(times)[reps // 2]

    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    src = torch.empty(1 << 29, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    return {
        "device": torch.cuda.get_device_name(),
        "matmul_tflops": gemm_flop(8192, 8192, 8192) / median_ms(lambda: a @ b) / 1e9,
        "copy_tbps": 2 * src.numel() / median_ms(lambda: dst.copy_(src)) / 1e9,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-tuning", action="store_true", help="refresh the table in TUNING.md")
    parser.add_argument("--measure", action="store_true", help="measure the ceilings on this CUDA device")
    parser.add_argument("--json", type=Path, help="write the measured ceilings here")
    args = parser.parse_args(argv)
    if args.write_tuning:
        write_tuning()
    if args.measure:
        ceilings = measure_ceilings()
        print(json.dumps(ceilings, indent=1))
        if args.json:
            args.json.write_text(json.dumps(ceilings, indent=1) + "\n")
    else:
        print(roofline_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
