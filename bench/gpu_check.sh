#!/usr/bin/env bash
# The GPU check: the `gpu` tests and bench/throughput.py on CUDA, GPU utilisation while the pipeline
# runs, every figure in one file. Each stage has its own time limit; together at most 8 minutes.
#
#   bench/gpu_check.sh [--out FILE] [--logs DIR] [--device cuda|cuda:N] [--images N] [--wheels DIR] ...
#   bench/gpu_check.sh --cpu            # the same stages on the CPU with tiny sizes (one to two minutes)
#
# Defaults: UNet base 32, depth 4, 640 synthetic images of 512x512, batch 8, bf16, work folder
# bench/out/gpu-check (--work), figures to WORK/gpu_check.txt (--out); --logs DIR copies the
# stages' logs and samples there too. Exit status 0 only when every stage ran and passed.
#
# Stages (limits in seconds; --scale F multiplies them):
#   install   45  wheels of --wheels DIR into WORK/site, when given (a machine without network access)
#   preflight 60  interpreter, torch, GPU, missing packages (bench/gpu_check.py preflight)
#   tests    120  python -m pytest -m gpu on the test files that carry the marker
#   prepare  105  synthetic collection, ingest, checkpoint (bench/throughput.py --prepare-only)
#   bench    130  bare loop, segflow segment, bare loop (bench/throughput.py), sampled by
#                 bench/gpu_check.py sample (NVML, else nvidia-smi; psutil's CPU figures with --cpu)
#   report    20  the figures file (default WORK/gpu_check.txt), also printed
#
# Runs from the repository as it is: PYTHON, else .venv/bin/python, else python3, with the
# repository on PYTHONPATH (nothing is installed but the wheels of --wheels).
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE=gpu DEVICE=cuda PRECISION=bf16 IMAGES=640 SIZE=512 BASE=32 DEPTH=4 BATCH=8
WORK="" OUT_FILE="" LOGS="" WHEELS="${SEGFLOW_WHEELS:-}" SCALE=1 JOBS="$(nproc 2>/dev/null || echo 2)"
SIZES_GIVEN=()

usage() { sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) MODE=cpu ;;
    --device) DEVICE="$2"; shift ;;
    --precision) PRECISION="$2"; shift ;;
    --images) IMAGES="$2"; SIZES_GIVEN+=(images); shift ;;
    --size) SIZE="$2"; SIZES_GIVEN+=(size); shift ;;
    --base) BASE="$2"; SIZES_GIVEN+=(base); shift ;;
    --depth) DEPTH="$2"; SIZES_GIVEN+=(depth); shift ;;
    --batch-size) BATCH="$2"; shift ;;
    --jobs) JOBS="$2"; shift ;;
    --work) WORK="$2"; shift ;;
    --out) OUT_FILE="$2"; shift ;;
    --logs) LOGS="$2"; shift ;;
    --wheels) WHEELS="$2"; shift ;;
    --scale) SCALE="$2"; shift ;;
    -h|--help) usage 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; usage 2 ;;
  esac
  shift
done

given() { local k; for k in "${SIZES_GIVEN[@]+"${SIZES_GIVEN[@]}"}"; do [ "$k" = "$1" ] && return 0; done; return 1; }
if [ "$MODE" = cpu ]; then
  DEVICE=cpu
  given images || IMAGES=24
  given size || SIZE=256
  given base || BASE=8
  given depth || DEPTH=3
fi
case "$DEVICE" in cpu|cuda|cuda:[0-9]*) ;; *) echo "gpu_check.sh: --device must be cuda or cuda:N" >&2; exit 2 ;; esac
GPU_INDEX=0
case "$DEVICE" in cuda:*) GPU_INDEX="${DEVICE#cuda:}" ;; esac

WORK="${WORK:-$ROOT/bench/out/gpu-check}"
OUT_FILE="${OUT_FILE:-$WORK/gpu_check.txt}"
mkdir -p "$WORK"
rm -f "$WORK"/{env.json,ready.sh,tests.log,prepare.json,bench.json,samples.txt,stages.tsv,bench.log,prepare.log}

if [ -n "${PYTHON:-}" ]; then :;
elif [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python";
else PYTHON="$(command -v python3 || command -v python)"; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export PREFECT_HOME="$WORK/prefect-home"

limit() { awk -v s="$1" -v f="$SCALE" 'BEGIN { printf "%d", s * f + 0.5 }'; }
T0=$(date +%s)
# stage NAME LIMIT_S COMMAND...: runs COMMAND under `timeout` (its whole process group), records
# "NAME<TAB>ok|failed rc=N|timed out<TAB>seconds" in WORK/stages.tsv.
stage() {
  local name="$1" lim; lim="$(limit "$2")"; shift 2
  echo "== $name (limit ${lim} s): $*"
  local t rc status
  t=$(date +%s)
  timeout --kill-after=5 "$lim" "$@"
  rc=$?
  case $rc in 0) status=ok ;; 124|137) status="timed out" ;; *) status="failed rc=$rc" ;; esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t ))" >> "$WORK/stages.tsv"
  echo "== $name: $status in $(( $(date +%s) - t )) s"
  return $rc
}
skip() { printf '%s\t%s\t0\n' "$1" "skipped: $2" >> "$WORK/stages.tsv"; echo "== $1: skipped ($2)"; }

echo "gpu_check ($MODE): python $PYTHON, work $WORK, figures to $OUT_FILE"

if [ -n "$WHEELS" ]; then
  SITE="$WORK/site"
  rm -rf "$SITE"
  if stage install 45 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target "$SITE" "$WHEELS"/*.whl; then
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH#"$ROOT"}"
  fi
fi

stage preflight 60 "$PYTHON" "$ROOT/bench/gpu_check.py" preflight --work "$WORK" --device "$DEVICE"
READY_TESTS=1 READY_BENCH=1
if [ -f "$WORK/ready.sh" ]; then . "$WORK/ready.sh";
else echo "the preflight gave no answer: every stage is tried, each under its own limit"; fi

if [ "$READY_TESTS" = 1 ]; then
  mapfile -t GPU_TESTS < <(cd "$ROOT" && grep -rl --include='test_*.py' 'pytest.mark.gpu' tests | sort)
  PER_TEST=()
  "$PYTHON" -c 'import pytest_timeout' 2>/dev/null && PER_TEST=(--timeout 90)
  (cd "$ROOT" && stage tests 120 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider "${PER_TEST[@]+"${PER_TEST[@]}"}" \
      "${GPU_TESTS[@]}") 2>&1 | tee "$WORK/tests.log"
else
  skip tests "packages missing (see preflight)"
fi

BENCH_ARGS=(--images "$IMAGES" --size "$SIZE" --base "$BASE" --depth "$DEPTH" --batch-size "$BATCH"
            --workdir "$WORK/bench")
if [ "$READY_BENCH" = 1 ]; then
  if stage prepare 105 "$PYTHON" "$ROOT/bench/throughput.py" "${BENCH_ARGS[@]}" --jobs "$JOBS" --prepare-only \
      --json "$WORK/prepare.json" 2>&1 | tee "$WORK/prepare.log"; then
    SAMPLER_BACKEND=auto
    [ "$DEVICE" = cpu ] && SAMPLER_BACKEND=cpu
    "$PYTHON" "$ROOT/bench/gpu_check.py" sample --out "$WORK/samples.txt" --index "$GPU_INDEX" \
      --backend "$SAMPLER_BACKEND" &
    SAMPLER=$!
    BENCH_PRECISION=()
    [ "$DEVICE" != cpu ] && BENCH_PRECISION=(--precision "$PRECISION")
    stage bench 130 "$PYTHON" "$ROOT/bench/throughput.py" "${BENCH_ARGS[@]}" --device "$DEVICE" \
      "${BENCH_PRECISION[@]+"${BENCH_PRECISION[@]}"}" --json "$WORK/bench.json" 2>&1 | tee "$WORK/bench.log"
    kill -TERM "$SAMPLER" 2>/dev/null
    wait "$SAMPLER" 2>/dev/null
  else
    skip bench "the prepare stage did not finish"
  fi
else
  skip prepare "packages or GPU missing (see preflight)"
  skip bench "packages or GPU missing (see preflight)"
fi

echo "== figures"
timeout 20 "$PYTHON" "$ROOT/bench/gpu_check.py" report --work "$WORK" --out "$OUT_FILE" --mode "$MODE" \
  --total-s "$(( $(date +%s) - T0 ))"
RC=$?
[ "$RC" = 0 ] || echo "gpu_check.sh: the report failed (rc=$RC); stage outputs are in $WORK"
if [ -n "$LOGS" ]; then
  mkdir -p "$LOGS"
  for f in env.json tests.log prepare.log bench.log bench.json samples.txt; do
    [ -f "$WORK/$f" ] && cp "$WORK/$f" "$LOGS/gpu_check-$f"
  done
fi
grep -q "failed\|timed out\|skipped" "$WORK/stages.tsv" 2>/dev/null && exit 1
exit "$RC"
