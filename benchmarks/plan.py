"""What is measured: lm-head shapes, sweeps of token counts, and the preset of each device.

A ``Case`` is one workload at one shape (rows x tokens, prompt fraction, frozen or trainable head, forward or
forward+backward) on one head; every contender is measured on every case. A ``Sweep`` expands into the cases
of one table section and one plot (same variant, growing row count). A ``Preset`` is the whole plan of one
report run plus its timing policy.

CPU presets are sized for the 15-minute budget of a 2-core machine; GPU presets use the heads users train:
Llama-3-8B (D=4096, V=128,256) and Gemma-2 2B/9B (D=2304/3584, V=256,000, final-logit softcap 30), bf16.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

WORKLOADS = ("logprobs", "dpo", "sampo", "kto", "factalign", "sppo")
"""Every workload, in report order: the core op, then the losses."""

CONTENDERS = ("naive", "trl", "liger", "liger-compiled", "cce", "prefuse-op", "prefuse")
"""Every contender, in table order; ``prefuse`` last (the ratio columns compare it with the others).
``prefuse-op`` is a loss module on its op path (``path="op"``: ``linear_logprobs``, 4 GEMMs per policy token)
beside ``prefuse``'s default, the loss-fused path (3 GEMMs), on the DPO and KTO workloads."""

MODES = ("fwd+bwd", "fwd")


@dataclass(frozen=True)
class Head:
    """An lm-head: hidden size ``D``, vocabulary ``V``, dtype of hidden states and weight, optional softcap."""

    name: str
    hidden: int
    vocab: int
    dtype: str = "float32"
    softcap: float | None = None

    def describe(self) -> str:
        cap = f", softcap {self.softcap:g}" if self.softcap else ""
        return f"{self.name} (D={self.hidden}, V={self.vocab:,}, {self.dtype}{cap})"


@dataclass(frozen=True)
class Case:
    """One workload at one shape on one head and device; JSON-serialisable via ``to_dict`` / ``from_dict``."""

    workload: str
    head: Head
    rows: int
    seq_len: int
    prompt_frac: float = 0.5
    trainable_head: bool = True
    mode: str = "fwd+bwd"
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r}; one of {WORKLOADS}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; one of {MODES}")
        if self.mode == "fwd" and self.workload != "logprobs":
            raise ValueError(
                "only the core op (logprobs) is measured forward-only; losses are forward+backward"
            )
        if self.workload in ("dpo", "sampo", "sppo") and self.rows % 2:
            raise ValueError(f"{self.workload} is paired: rows must be even (chosen [:B], rejected [B:])")
        if not 0.0 <= self.prompt_frac < 1.0:
            raise ValueError("prompt_frac must lie in [0, 1)")

    @property
    def tokens(self) -> int:
        """Tokens of the policy rows (the x-axis of the plots); KL rows (KTO, FactAlign) come on top."""
        return self.rows * self.seq_len

    @property
    def kl_rows(self) -> int:
        """Mismatched KL rows of KTO / FactAlign (as many as the examples, as TRL builds them)."""
        return self.rows if self.workload in ("kto", "factalign") else 0

    @property
    def variant(self) -> str:
        """The sweep-invariant part of the case, e.g. ``fwd+bwd, prompt 50%, trainable head``."""
        parts = [self.mode, f"prompt {round(self.prompt_frac * 100)}%"]
        if self.mode == "fwd+bwd":
            parts.append("trainable head" if self.trainable_head else "frozen head")
        return ", ".join(parts)

    @property
    def group(self) -> tuple[str, str, str]:
        """Cases of one table section / plot: same workload, head and variant."""
        return (self.workload, self.head.name, self.variant)

    def shape(self) -> str:
        kl = f" + {self.kl_rows} KL rows" if self.kl_rows else ""
        return f"{self.rows} x {self.seq_len}{kl}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Case:
        data = dict(data)
        data["head"] = Head(**data["head"])
        return cls(**data)


@dataclass(frozen=True)
class Sweep:
    """A section of the report: one workload and variant over growing row counts."""

    workload: str
    rows: tuple[int, ...]
    seq_len: int
    prompt_frac: float = 0.5
    trainable_head: bool = True
    mode: str = "fwd+bwd"

    def cases(self, head: Head, device: str) -> list[Case]:
        return [
            Case(
                self.workload, head, r, self.seq_len, self.prompt_frac, self.trainable_head, self.mode, device
            )
            for r in self.rows
        ]


@dataclass(frozen=True)
class Timing:
    """Timing policy: ``warmup`` untimed steps (on CPU the memory step is the first of them), then at least
    ``min_repeats`` timed steps, more until they add up to ``min_time_s``, at most ``max_repeats``; but no
    second timed step once the timed steps add up to ``max_time_s`` (a single step that long varies little,
    and the CPU report has a 15-minute budget)."""

    warmup: int = 1
    min_repeats: int = 2
    max_repeats: int = 10
    min_time_s: float = 2.0
    max_time_s: float = float("inf")
    timeout_s: float = 600.0


@dataclass(frozen=True)
class Preset:
    """The plan of one report run. ``errors_at`` is ``"all"`` (check every case against float64) or
    ``"smallest"`` (the smallest case of each sweep: on CPU the float64 reference costs as much as a contender,
    and the per-sequence computation it checks is the same at every batch size)."""

    name: str
    device: str
    description: str
    heads: tuple[tuple[Head, tuple[Sweep, ...]], ...]
    timing: Timing
    contenders: tuple[str, ...] = CONTENDERS
    errors_at: str = "all"

    def cases(self, workloads: tuple[str, ...] | None = None) -> list[Case]:
        out = []
        for head, sweeps in self.heads:
            for sweep in sweeps:
                if workloads is None or sweep.workload in workloads:
                    out.extend(sweep.cases(head, self.device))
        return out

    def checks_error(self, case: Case) -> bool:
        """Whether ``case`` is compared with the float64 reference (``errors_at``)."""
        if self.errors_at == "all":
            return True
        return case.rows == min(c.rows for c in self.cases((case.workload,)) if c.group == case.group)


# ---------------------------------------------------------------------------------------------- heads
CPU_HEAD = Head("cpu-d1024-v32k", 1024, 32_000, "float32")
TINY_HEAD = Head("tiny-d64-v512", 64, 512, "float32")
TINY_SOFTCAP_HEAD = Head("tiny-softcap-d64-v512", 64, 512, "float32", softcap=30.0)
LLAMA3_8B = Head("llama3-8b", 4096, 128_256, "bfloat16")
GEMMA2_2B = Head("gemma2-2b", 2304, 256_000, "bfloat16", softcap=30.0)
GEMMA2_9B = Head("gemma2-9b", 3584, 256_000, "bfloat16", softcap=30.0)


def _standard_sweeps(
    rows: tuple[int, ...],
    kto_rows: tuple[int, ...],
    point: int,
    small: int,
    seq_len: int,
    dpo_prompt_0: bool = True,
) -> tuple:
    """The report's sections: the core op, DPO and KTO over a sweep of row counts at prompt 50% with a
    trainable head; the core op forward-only; single points for prompt 0% and a frozen head (``point`` rows);
    SamPO, FactAlign and SPPO at ``small`` rows."""
    return (
        Sweep("logprobs", kto_rows, seq_len),
        Sweep("logprobs", kto_rows, seq_len, mode="fwd"),
        Sweep("logprobs", (point,), seq_len, prompt_frac=0.0),
        Sweep("logprobs", (point,), seq_len, trainable_head=False),
        Sweep("dpo", rows, seq_len),
        *((Sweep("dpo", (point,), seq_len, prompt_frac=0.0),) if dpo_prompt_0 else ()),
        Sweep("dpo", (point,), seq_len, trainable_head=False),
        Sweep("sampo", (small,), seq_len),
        Sweep("kto", kto_rows, seq_len),
        Sweep("factalign", (small,), seq_len),
        Sweep("sppo", (small,), seq_len),
    )


PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        "cpu",
        "cpu",
        "CPU report: D=1024, V=32,000, fp32, 512-token sequences; DPO at 4/8/16 sequences (the core-op issue's "
        "shape and larger batches), KTO at 2/4/8 rows + as many KL rows, the core op at 1k-4k tokens",
        (
            (
                CPU_HEAD,
                _standard_sweeps(
                    rows=(4, 8, 16), kto_rows=(2, 4, 8), point=4, small=2, seq_len=512, dpo_prompt_0=False
                ),
            ),
        ),
        Timing(warmup=1, min_repeats=2, max_repeats=10, min_time_s=2.0, max_time_s=6.0, timeout_s=900.0),
        contenders=("naive", "trl", "liger", "cce", "prefuse-op", "prefuse"),
        errors_at="smallest",
    ),
    "cpu-quick": Preset(
        "cpu-quick",
        "cpu",
        "short CPU report: D=1024, V=32,000, fp32, 256-token sequences",
        (
            (
                CPU_HEAD,
                (
                    Sweep("logprobs", (2, 4), 256),
                    Sweep("logprobs", (2, 4), 256, mode="fwd"),
                    Sweep("dpo", (2, 4), 256),
                    Sweep("dpo", (2,), 256, trainable_head=False),
                    Sweep("sampo", (2,), 256),
                    Sweep("kto", (2, 4), 256),
                    Sweep("factalign", (2,), 256),
                    Sweep("sppo", (2,), 256),
                ),
            ),
        ),
        Timing(warmup=1, min_repeats=2, max_repeats=5, min_time_s=0.5, timeout_s=600.0),
        contenders=("naive", "trl", "liger", "cce", "prefuse-op", "prefuse"),
    ),
    "cuda": Preset(
        "cuda",
        "cuda",
        "GPU report: Llama-3-8B head (D=4096, V=128,256) and Gemma-2 2B/9B heads (V=256,000, softcap 30), bf16, "
        "1,024-token sequences",
        (
            (
                LLAMA3_8B,
                _standard_sweeps(
                    rows=(4, 8, 16, 32), kto_rows=(4, 8, 16, 32), point=8, small=8, seq_len=1024
                ),
            ),
            (
                GEMMA2_9B,
                (
                    Sweep("logprobs", (4, 8, 16, 32), 1024),
                    Sweep("dpo", (4, 8, 16, 32), 1024),
                    Sweep("kto", (4, 8, 16), 1024),
                ),
            ),
            (GEMMA2_2B, (Sweep("logprobs", (4, 8, 16, 32), 1024), Sweep("dpo", (4, 8, 16, 32), 1024))),
        ),
        Timing(warmup=3, min_repeats=10, max_repeats=50, min_time_s=1.0, timeout_s=900.0),
    ),
    "cuda-quick": Preset(
        "cuda-quick",
        "cuda",
        "short GPU report: Llama-3-8B and Gemma-2 9B heads, bf16, 1,024-token sequences",
        (
            (
                LLAMA3_8B,
                (
                    Sweep("logprobs", (4, 8), 1024),
                    Sweep("dpo", (4, 8), 1024),
                    Sweep("kto", (4, 8), 1024),
                    Sweep("sampo", (4,), 1024),
                    Sweep("factalign", (4,), 1024),
                    Sweep("sppo", (4,), 1024),
                ),
            ),
            (GEMMA2_9B, (Sweep("logprobs", (4, 8), 1024), Sweep("dpo", (4, 8), 1024))),
        ),
        Timing(warmup=3, min_repeats=5, max_repeats=20, min_time_s=0.5, timeout_s=600.0),
    ),
}


def smoke_preset(device: str = "cpu") -> Preset:
    """Tiny shapes that exercise every workload, variant and code path in seconds (CI's smoke pass)."""
    sweeps = (
        Sweep("logprobs", (2, 4), 32),
        Sweep("logprobs", (2,), 32, mode="fwd"),
        Sweep("logprobs", (2,), 32, prompt_frac=0.0),
        Sweep("dpo", (2, 4), 32),
        Sweep("dpo", (2,), 32, trainable_head=False),
        Sweep("sampo", (2,), 32),
        Sweep("kto", (2, 4), 32),
        Sweep("factalign", (2,), 32),
        Sweep("sppo", (2,), 32),
    )
    return Preset(
        f"{device}-smoke",
        device,
        "smoke pass: tiny shapes (D=64, V=512, 32-token sequences)",
        ((TINY_HEAD, sweeps), (TINY_SOFTCAP_HEAD, (Sweep("logprobs", (2,), 32), Sweep("dpo", (2,), 32)))),
        Timing(warmup=1, min_repeats=1, max_repeats=2, min_time_s=0.0, timeout_s=300.0),
        contenders=("naive", "trl", "liger", "cce", "prefuse-op", "prefuse"),
    )


def get_preset(device: str, *, quick: bool = False, smoke: bool = False) -> Preset:
    """The preset of ``device`` (``"cpu"`` or ``"cuda"``): full, ``quick``, or the CI ``smoke`` pass."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if smoke:
        return smoke_preset(device)
    return PRESETS[f"{device}-quick" if quick else device]
