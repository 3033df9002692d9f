"""Where a report was measured: device name and slug, CPU model, library versions, git commit."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

PACKAGES = ("torch", "triton", "trl", "liger-kernel", "cut-cross-entropy", "prefuse", "numpy", "matplotlib")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` on CUDA; ``"<CPU model>, <n> threads"`` on CPU."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def slug(text: str) -> str:
    """``"AMD EPYC, 2 threads"`` -> ``"amd-epyc-2-threads"``: a directory name."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def device_slug(device: str) -> str:
    """Directory name of a device's results: ``cpu-<model>-<n>-threads`` or the GPU's name."""
    return slug(device_name(device)) if device == "cuda" else slug(f"cpu {device_name(device)}")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(repo: Path) -> str | None:
    """``HEAD``'s commit of the repository (``+dirty`` with local changes), or None outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=False
        )
        if head.returncode:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def describe(device: str) -> dict:
    """Everything needed to interpret and re-run a report."""
    info = {
        "device": device,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "versions": versions(),
        "git_commit": git_commit(Path(__file__).resolve().parent.parent),
        "command": " ".join(["python -m benchmarks", *sys.argv[1:]]),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            cuda_version=torch.version.cuda,
            gpu_memory_bytes=props.total_memory,
            gpu_capability=f"{props.major}.{props.minor}",
        )
    return info
