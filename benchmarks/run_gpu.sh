#!/usr/bin/env bash
# Runs the whole GPU benchmark set on one GPU in under 8 minutes and prints every table.
#
#   bash benchmarks/run_gpu.sh [OUT_DIR]
#
# OUT_DIR defaults to $OUT if set, else benchmarks/results. It receives at most 9 files:
# ops_gpu.json (forward at the goal shapes), ops_gpu_fwdbwd.json, attention_gpu.json,
# attention_blocks_gpu.json, wake_latency_gpu.json, wake_latency_gpu.png, sleep_cost_gpu.json,
# train_step_gpu.json and run_gpu.log. Each script runs under `timeout` with a share of a 440 s
# budget (time one script leaves unused goes to the next), and writes its JSON after every row,
# so a script that runs out of time still leaves its finished rows.
# Needs jax with CUDA, flax, optax and matplotlib; nothing from the task/data pipelines.
# Environment: PYTHON (default python3), BENCH_BUDGET_S (default 440), BENCH_DRY_RUN=1 prints
# the commands without running them.

set -u -o pipefail

cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results}}"
PYTHON="${PYTHON:-python3}"
BUDGET_S="${BENCH_BUDGET_S:-440}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/run_gpu.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Compiled executables are cached across the scripts of this run (and reruns on this machine).
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/sleep_jax_compilation_cache}"

start=$(date +%s)
: >"$LOG"

# run NAME CAP_S RESERVE_S ARGS...: runs "$PYTHON ARGS..." under a timeout of at most CAP_S
# seconds, keeping RESERVE_S seconds of the budget for the scripts after it (the last script,
# with RESERVE_S 0, gets whatever is left).
run() {
  local name=$1 cap=$2 reserve=$3
  shift 3
  local elapsed=$(( $(date +%s) - start ))
  local limit=$(( BUDGET_S - elapsed - reserve ))
  if (( reserve > 0 && cap < limit )); then limit=$cap; fi
  if (( limit < 10 )); then
    echo "== $name: skipped, ${limit}s left of the ${BUDGET_S}s budget" | tee -a "$LOG"
    return
  fi
  echo "== $name: timeout ${limit}s: $PYTHON $*" | tee -a "$LOG"
  if [[ "${BENCH_DRY_RUN:-0}" == 1 ]]; then return; fi
  local t0
  t0=$(date +%s)
  timeout -k 5 "$limit" "$PYTHON" "$@" 2>&1 | tee -a "$LOG"
  echo "== $name: exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
}

# The op's goals: forward at T = 4K and 16K against fla (pure-JAX chunked form and the Pallas
# kernel), forward+backward against the per-token scan at T = 4K.
run ops 50 380 -m benchmarks.ops --out="$OUT_DIR/ops_gpu.json" --runs=5 --modes=fwd \
  --impls=chunked,pallas --shapes=4x4096x16x128,4x16384x16x128
run ops_fwdbwd 40 340 -m benchmarks.ops --out="$OUT_DIR/ops_gpu_fwdbwd.json" --runs=5 \
  --modes=fwdbwd --impls=scan,chunked,pallas --shapes=4x4096x16x128
# Full vs sliding at 4K and 16K, then the blocked sliding-window table at L = 2048.
run attention 60 285 -m benchmarks.attention --out_dir="$OUT_DIR" --seq_lens=4096,16384
run wake_latency 85 200 -m benchmarks.wake_latency --out_dir="$OUT_DIR"
run sleep_cost 90 110 -m benchmarks.sleep_cost --out_dir="$OUT_DIR"
run train_step 0 0 -m benchmarks.train_step --out_dir="$OUT_DIR"

rm -f "$OUT_DIR"/*.json.tmp

echo "== all tables ($(( $(date +%s) - start ))s in all)" | tee -a "$LOG"
if [[ "${BENCH_DRY_RUN:-0}" != 1 ]]; then
  "$PYTHON" -c "import sys; from benchmarks import common; common.print_digest(sys.argv[1])" \
    "$OUT_DIR" 2>&1 | tee -a "$LOG"
fi
