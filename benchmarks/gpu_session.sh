#!/usr/bin/env bash
# The GPU half of issue 6 in two device commands of under 10 minutes each, on a lent H100 / H200.
#
#   Here (the CPU machine), once, before the first device call: fetch the Python packages the device image
#   lacks (it reaches no registry) into .whl/, which .git/info/exclude ignores and each call carries:
#       bash benchmarks/gpu_session.sh fetch-wheels
#   Device call 1 (run tool: command below, carry [".whl"], timeout_s 600):
#       bash benchmarks/gpu_session.sh check
#     environment, pytest -m "gpu or cpu" on CUDA (compiled Triton), a small-shape check of the kernels
#     against float64 and the same under compute-sanitizer memcheck, the tuning sweep.
#     Back in $OUT: summary.md, check-logs.tar.gz, tuned_configs.json, tune_timings.json.
#   Here, between the calls: copy the tuned table into the repo (commit it; call 2 uses it):
#       cp <files_at>/tuned_configs.json kernels/linear_logprobs/tuned_configs.json
#   Device call 2 (same carry):
#       bash benchmarks/gpu_session.sh bench
#     environment, the matmul floor and the core op against it (benchmarks/floor.py), the benchmark suite
#     (python -m benchmarks --device cuda), then, while time is left, Nsight Compute sections of the kernels
#     and compute-sanitizer racecheck.
#     Back in $OUT: summary.md, floor.json, floor.md, bench-results.tar.gz (benchmarks/results/ + logs).
#
#   A rerun of single steps: bash benchmarks/gpu_session.sh steps STEP... (env, pytest, sanity, memcheck,
#   racecheck, tune, floor, bench, ncu; setup always runs first).
#
# Every step runs under `timeout`, capped by its own limit and by the command's deadline
# (GPU_SESSION_BUDGET_S seconds after the start, default 555); a step that fails or times out does not stop
# the next. The summary table is printed last. Knobs: PYTHON (default python3), PREFUSE_AUTOTUNE (default
# off: an untuned shape takes the fixed default config instead of minutes of autotuning), BENCH_ARGS (default
# "--device cuda"), PYTEST_ARGS (extra pytest arguments), TUNE_ARGS (extra benchmarks.tune arguments).
#
# Files are read from the repository root; $OUT (set by the device tool) receives at most 8 files.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET=${GPU_SESSION_BUDGET_S:-555}
DEADLINE=$((START + BUDGET))
RESERVE=${GPU_SESSION_RESERVE_S:-20}   # seconds kept for packing the results
MIN_STEP=${GPU_SESSION_MIN_STEP_S:-15} # a step is skipped when fewer seconds are left
OUT=${OUT:-$PWD/prefuse-out}
case ${1:-} in
check | bench | steps)
  WORK=$(mktemp -d /tmp/prefuse-gpu.XXXXXX)
  mkdir -p "$OUT" "$WORK/logs"
  trap 'rm -rf "$WORK"' EXIT # everything worth keeping is packed into $OUT
  ;;
*) WORK=/nonexistent ;;
esac
LOGS=$WORK/logs
SUMMARY=$WORK/summary.md
export PREFUSE_AUTOTUNE=${PREFUSE_AUTOTUNE:-off}
export PYTHONUNBUFFERED=1
LIGER_VERSION=0.8.5
CCE_VERSION=25.1.1
OPTIONAL_WHEELS="datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19" # alignment.data's loader only

if [ -d "$LOGS" ]; then
  echo "| step | status | seconds | note |" >"$SUMMARY"
  echo "|---|---|---:|---|" >>"$SUMMARY"
fi

note() { # note STEP STATUS SECONDS TEXT
  echo "| $1 | $2 | $3 | ${4:-} |" >>"$SUMMARY"
}

left() { echo $((DEADLINE - $(date +%s) - RESERVE)); }

# step NAME CAP_SECONDS COMMAND...: run with a time box, log to $LOGS/NAME.log, note the outcome
step() {
  local name=$1 cap=$2
  shift 2
  local remaining
  remaining=$(left)
  if ((remaining < MIN_STEP)); then
    note "$name" skipped 0 "no time left"
    echo "=== $name: skipped (no time left)"
    return 0
  fi
  local limit=$((cap < remaining ? cap : remaining))
  local t0 rc status
  t0=$(date +%s)
  echo "=== $name (limit ${limit} s) $(date -u +%H:%M:%S)"
  # through bash -c: a step may be one of the functions exported below
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  case $rc in
  0) status=ok ;;
  124 | 137) status="TIMED OUT (${limit} s)" ;;
  *) status="FAILED (rc $rc)" ;;
  esac
  note "$name" "$status" $(($(date +%s) - t0)) "$(step_note "$name")"
  tail -n 6 "$LOGS/$name.log"
  return 0
}

# the line worth quoting from a step's log
step_note() {
  local log=$LOGS/$1.log
  case $1 in
  pytest) grep -E "^(=+ )?[0-9]+ (passed|failed)|no tests ran|error" "$log" | tail -n 1 ;;
  memcheck | racecheck) grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -n 1 ;;
  sanity) grep -E "^sanity:" "$log" | tail -n 1 ;;
  tune) grep -E "entries written" "$log" | tail -n 1 ;;
  floor) grep -E "^floor summary" "$log" | tail -n 1 ;;
  *) echo "" ;;
  esac | tr '|' '/' | cut -c1-160
}

fetch_wheels() { # on the CPU machine: the packages the device image lacks, as wheels for its Python 3.12
  local exclude
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
  mkdir -p .whl
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    "liger-kernel==$LIGER_VERSION" "cut-cross-entropy==$CCE_VERSION" $OPTIONAL_WHEELS
  ls -la .whl
}

setup() { # on the device: wheels into /tmp/site, prefuse as the repo's folders, no install, no network
  if compgen -G ".whl/*.whl" >/dev/null; then
    local wheel
    for wheel in .whl/*.whl; do # one at a time: a wheel that does not install stops no other
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$wheel" || echo "WARNING: $wheel did not install"
    done
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "WARNING: no .whl/ carried: liger-kernel and cut-cross-entropy are missing (run fetch-wheels here)"
  fi
  mkdir -p /tmp/prefuse-src/prefuse
  ln -sfn "$PWD/kernels" /tmp/prefuse-src/prefuse/kernels
  ln -sfn "$PWD/alignment" /tmp/prefuse-src/prefuse/alignment
  export PYTHONPATH=/tmp/prefuse-src:$PWD${PYTHONPATH:+:$PYTHONPATH}
  "$PY" -c "import prefuse.kernels, prefuse.alignment" || echo "WARNING: prefuse does not import"
}

env_info() {
  date -u
  uname -a
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,persistence_mode,mig.mode.current --format=csv
  nvidia-smi -q -d CLOCK,PERFORMANCE | head -n 60
  nvcc --version | tail -n 2
  compute-sanitizer --version | head -n 2
  ncu --version | tail -n 1
  "$PY" - <<'EOF'
import importlib, json, os
import torch, triton
p = torch.cuda.get_device_properties(0)
print(json.dumps({
    "device": torch.cuda.get_device_name(0), "capability": torch.cuda.get_device_capability(0),
    "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
    "l2_mb": getattr(p, "L2_cache_size", 0) / 1e6, "smem_per_block_optin": p.shared_memory_per_block_optin,
    "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
    "PREFUSE_AUTOTUNE": os.environ.get("PREFUSE_AUTOTUNE"),
}, indent=1))
for name in ("liger_kernel", "cut_cross_entropy", "transformers", "datasets", "pytest", "xdist", "pytest_timeout"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "installed"))
    except Exception as err:
        print(name, "MISSING", type(err).__name__)
from prefuse.kernels.linear_logprobs import triton_configs as cfg
table = cfg.load_table()
print("tuned table:", cfg.table_path(), len(table.entries) if table else "none")
EOF
}

write_driver() { # the small-shape kernel check, run plainly and under compute-sanitizer
  cat >"$WORK/driver.py" <<'EOF'
"""Compiled kernels at a small shape against float64: permuted rows, n_valid < N (row blocks wholly and
partly ignored), V=1000 over several vocab splits (atomic grad_hidden), D=136 (no BLOCK_D divides it),
softcap, bias, temperature; fp32 and bf16; fused and deterministic backward; frozen weight; the public op.
PREFUSE_DRIVER_SHAPE="M,N,V,D,VALID" changes the shape (the CPU test runs it under the interpreter)."""
import os, sys
os.environ.setdefault("PREFUSE_AUTOTUNE", "off")
import torch
from prefuse.kernels.linear_logprobs import linear_logprobs, triton_bwd, triton_fwd

DEV = "cuda" if torch.cuda.is_available() else "cpu"
M, N, V, D, VALID = map(int, os.environ.get("PREFUSE_DRIVER_SHAPE", "300,257,1000,136,150").split(","))
CAP, INV_T = 30.0, 1 / 0.9
failures = []

def rel(a, r):
    return ((a.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()

for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(M, D, generator=g).to(dtype).to(DEV)
    w = (torch.randn(V, D, generator=g) * 3 / D**0.5).to(dtype).to(DEV)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype).to(DEV)
    rows = torch.randperm(M, generator=g)[:N].to(DEV)
    t = torch.randint(0, V, (N,), generator=g).to(DEV)
    n_valid = torch.tensor([VALID]).to(DEV)
    up = torch.randn(N, generator=g).to(DEV)
    h64, w64, b64 = (x.double().requires_grad_() for x in (h, w, b))
    z = CAP * torch.tanh((h64[rows[:VALID]] @ w64.T + b64) / CAP) * INV_T
    ref = z.gather(1, t[:VALID, None])[:, 0] - torch.logsumexp(z, -1)
    (ref * up[:VALID].double()).sum().backward()
    logp, lse = triton_fwd.forward(h, w, b, rows, t, n_valid, softcap=CAP, inv_temperature=INV_T)
    errs = {"logp": rel(logp[:VALID], ref.detach()), "ignored": logp[VALID:].abs().max().item()}
    for det in (False, True):
        for need_w in (True, False):
            gh, gw, gb = triton_bwd.backward(h, w, b, rows, t, n_valid, lse, up, softcap=CAP, inv_temperature=INV_T,
                                             need_hidden=True, need_weight=need_w, need_bias=True, deterministic=det)
            tag = f"{'det' if det else 'fused'}{'' if need_w else '-frozen'}"
            errs[f"gh {tag}"] = rel(gh, h64.grad)
            errs[f"gb {tag}"] = rel(gb, b64.grad)
            if need_w:
                errs[f"gw {tag}"] = rel(gw, w64.grad)
    T = min(64, M // 4)  # the public op: shift, ignore_index, autograd
    hb = h[: 4 * T].reshape(4, T, D).clone().requires_grad_()
    labels = torch.randint(0, V, (4, T), generator=g).to(DEV)
    labels[:, : T // 3] = -100
    out = linear_logprobs(hb, w, labels, b, shift=True, softcap=CAP, backend="triton")
    out.sum().backward()
    errs["op finite"] = 0.0 if torch.isfinite(out).all() and torch.isfinite(hb.grad).all() else 1.0
    bad = {k: v for k, v in errs.items() if not (v <= (0.0 if k in ("ignored", "op finite") else tol))}
    print(dtype, " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    if bad:
        failures.append((str(dtype), bad))
if DEV == "cuda":
    torch.cuda.synchronize()
print("sanity:", "FAILED " + str(failures) if failures else "all within tolerance")
sys.exit(1 if failures else 0)
EOF
}

run_pytest() {
  local extra=()
  "$PY" -c "import xdist" 2>/dev/null && extra+=(-n 8)
  "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 300)
  "$PY" -m pytest -m "gpu or cpu" -q -p no:cacheprovider --junitxml="$LOGS/junit.xml" "${extra[@]}" ${PYTEST_ARGS:-}
}

run_tune() { # the sweep's own budget ends 45 s before its time box, so that it writes what it has
  local box=$TUNE_CAP remaining
  remaining=$(left)
  ((remaining < box)) && box=$remaining
  local budget=$((box - 45))
  ((budget < 30)) && budget=30
  "$PY" -m benchmarks.tune --out "$WORK/tune" --budget-s "$budget" ${TUNE_ARGS:-}
}

run_bench() {
  # shellcheck disable=SC2086
  "$PY" -m benchmarks ${BENCH_ARGS:---device cuda}
}

run_ncu() { # Nsight Compute sections of the forward and backward kernels at 4,096 tokens (read only clocks)
  ncu --clock-control none --target-processes all -k regex:"^_(forward|backward|weight)_kernel" -c 3 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section Occupancy --section LaunchStats "$PY" -m benchmarks.floor --profile 4096
}

pack() { # pack TARBALL: logs, step outputs and the summary into $OUT (at most 8 files in all)
  local parts
  parts=$(cd "$WORK" && ls -d logs tune floor results 2>/dev/null)
  cp "$SUMMARY" "$OUT/summary.md"
  # shellcheck disable=SC2086
  tar -czf "$OUT/$1" -C "$WORK" $parts
  echo
  echo "## $(uname -n) $(date -u +%FT%TZ): $(($(date +%s) - START)) s"
  cat "$SUMMARY"
  [ -f "$OUT/floor.md" ] && grep -E "^\|" "$OUT/floor.md" | tail -n 14
  echo "files in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
}

run_steps() {
  setup >"$LOGS/setup.log" 2>&1
  cat "$LOGS/setup.log"
  write_driver
  for s in "$@"; do
    case $s in
    env) step env 45 env_info ;;
    pytest) step pytest 240 run_pytest ;;
    sanity) step sanity 60 "$PY" "$WORK/driver.py" ;;
    memcheck) # no caching allocator: out-of-bounds accesses inside a pooled block are reported too
      step memcheck 100 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
        --error-exitcode 3 --print-limit 20 "$PY" "$WORK/driver.py" ;;
    racecheck) step racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 3 --print-limit 20 "$PY" "$WORK/driver.py" ;;
    tune)
      step tune "$TUNE_CAP" run_tune
      [ -f "$WORK/tune/tuned_configs.json" ] && cp "$WORK/tune/tuned_configs.json" "$WORK/tune/tune_timings.json" "$OUT/"
      ;;
    floor)
      step floor 200 "$PY" -m benchmarks.floor --out "$WORK/floor" --budget-s 130
      [ -f "$WORK/floor/floor.json" ] && cp "$WORK/floor/floor.json" "$WORK/floor/floor.md" "$OUT/"
      ;;
    bench) step bench 420 run_bench ;;
    ncu) step ncu 100 run_ncu ;;
    *) echo "unknown step $s" >&2 ;;
    esac
  done
}

export -f env_info run_pytest run_tune run_bench run_ncu left
TUNE_CAP=330
export PY WORK LOGS DEADLINE RESERVE TUNE_CAP

case ${1:-} in
fetch-wheels) fetch_wheels ;;
check)
  run_steps env pytest sanity memcheck tune
  pack check-logs.tar.gz
  ;;
bench)
  run_steps env floor bench ncu racecheck
  mkdir -p "$WORK/results"
  [ -d benchmarks/results ] && cp -r benchmarks/results/. "$WORK/results/"
  pack bench-results.tar.gz
  ;;
steps)
  shift
  run_steps "$@"
  [ -d benchmarks/results ] && mkdir -p "$WORK/results" && cp -r benchmarks/results/. "$WORK/results/"
  pack steps-logs.tar.gz
  ;;
*)
  sed -n '2,32p' "$0"
  exit 2
  ;;
esac
