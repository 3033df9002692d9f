"""Test-suite wiring: the Triton interpreter on CPU-only machines, and the cpu / interpret / gpu markers.

Markers (kept in step with CMakeLists.txt's CTest labels):
- ``interpret``: Triton kernels under ``TRITON_INTERPRET=1`` on CPU tensors (skipped when the interpreter is off,
  i.e. on a CUDA machine where Triton compiles);
- ``gpu``: needs CUDA (skipped without it);
- ``cpu``: everything else, added automatically.

``slow`` marks the long tests (subprocesses, spawned gloo ranks, TRL trainers, property sweeps, training runs):
``python -m pytest -m "not slow"`` is the quick inner loop; CI runs everything.
"""

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Everything the tests and their subprocesses cache goes into one temporary folder of this run, removed at exit:
# nothing is written into ~/.cache or a shared place, and a run killed mid-build (a JIT extension's lock, a
# half-written Triton cache entry) cannot break the next run, which starts from a fresh folder.
_CACHE = tempfile.mkdtemp(prefix="prefuse-tests-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
for _name, _sub in (
    ("TORCH_EXTENSIONS_DIR", "torch_extensions"),  # DeepSpeed's JIT-built ops
    ("TRITON_CACHE_DIR", "triton"),
    ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
    ("HF_HOME", "huggingface"),
    ("HF_DATASETS_CACHE", "huggingface/datasets"),
    ("MPLCONFIGDIR", "matplotlib"),
    ("XDG_CACHE_HOME", "xdg"),
):
    os.environ[_name] = os.path.join(_CACHE, _sub)

# `python -m pytest` puts the checkout root on sys.path. transformers probes for the PyPI package `kernels` and
# would find the repo-root folder `kernels/`, which refuses that name: keep the root off sys.path ...
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != ROOT]
# ... and load the checkout's plain `benchmarks/` folder as a package by its location instead.
_spec = importlib.util.spec_from_file_location(
    "benchmarks", ROOT / "benchmarks" / "__init__.py", submodule_search_locations=[str(ROOT / "benchmarks")]
)
sys.modules["benchmarks"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sys.modules["benchmarks"])

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # must precede the first import of a module that defines Triton kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    skip_interpret = pytest.mark.skip(reason="TRITON_INTERPRET is off (Triton compiles on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            if not HAS_CUDA:
                item.add_marker(skip_gpu)
        elif "interpret" in item.keywords:
            if not INTERPRET:
                item.add_marker(skip_interpret)
        else:
            item.add_marker(pytest.mark.cpu)
