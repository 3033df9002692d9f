#!/usr/bin/env bash
# prefuse on a CUDA machine in one command: the sm_90 compile gate, the GPU tests, the measured ceilings
# (bf16 matmul rate, copy bandwidth), the benchmark report and the packed / padded step times. Each step is time-boxed and logged to OUT_DIR;
# a failing step does not stop the next; the exit code is non-zero if any step failed.
#
#   bash benchmarks/gpu_session.sh [OUT_DIR]       (default: $OUT, else ./gpu-out)
#
# Without an installed prefuse, the checkout's kernels/ and alignment/ are put on PYTHONPATH as `prefuse`;
# wheels in .whl/ (liger-kernel, cut-cross-entropy: the benchmark's contenders) are installed into a
# temporary directory without network access. Knobs: PYTHON (python3), BENCH_ARGS ("--device cuda").
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
OUT_DIR=${1:-${OUT:-$PWD/gpu-out}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT

if ! "$PY" -c "import prefuse.kernels" 2>/dev/null; then
  mkdir -p "$SITE/prefuse"
  ln -s "$PWD/kernels" "$SITE/prefuse/kernels"
  ln -s "$PWD/alignment" "$SITE/prefuse/alignment"
fi
for wheel in .whl/*.whl; do
  [ -e "$wheel" ] && "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$wheel"
done
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}

status=0
step() { # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 rc=0 start=$SECONDS
  shift 2
  echo "=== $name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1 || rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT_DIR/summary.txt"
  tail -n 5 "$OUT_DIR/$name.log"
  [ "$rc" -eq 0 ] || status=1
}

step aot 300 "$PY" -m benchmarks.aot
step pytest 180 "$PY" -m pytest -m gpu -q -p no:cacheprovider
step ceilings 60 "$PY" -m benchmarks.floor --measure --json "$OUT_DIR/ceilings.json"
# shellcheck disable=SC2086
step bench 420 "$PY" -m benchmarks ${BENCH_ARGS:---device cuda}
step packing 120 "$PY" -m benchmarks.packing --device cuda --hidden 1024 --layers 4 --repeats 3 \
  --out "$OUT_DIR/packing"
[ -d benchmarks/results ] && tar -czf "$OUT_DIR/results.tar.gz" -C benchmarks results
exit "$status"
