#!/usr/bin/env bash
# Runs the GPU benchmark set on one GPU, most important tables first, within a time budget, and
# prints every table.
#
#   bash benchmarks/run_gpu.sh [OUT_DIR]
#
# OUT_DIR defaults to $OUT if set, else benchmarks/results. It receives ops_gpu.json (forward at
# the goal shapes, with flash-linear-attention), ops_gpu_fwdbwd.json, four profile_*_gpu.json,
# wake_latency_gpu.json and .png, train_step_gpu.json, sleep_cost_gpu.json, attention_gpu.json,
# attention_blocks_gpu.json and run_gpu.log. Each script runs under `timeout`, for at most its
# own cap and at most what is left of the budget, and writes its JSON after every row, so a
# script that runs out of time still leaves its finished rows.
#
# On a fresh H200 (no compilation cache) the whole set needs up to 13.5 minutes (the steps' caps
# below), mostly XLA and Triton compilation (docs/performance.md): more than the default 440 s
# budget, which covers the first three steps and most of the fourth. Everything but the
# attention tables (measured on an H200 already) in two runs of at most 6 minutes each:
#
#   BENCH_STEPS=ops,ops_fwdbwd,profile bash benchmarks/run_gpu.sh OUT_DIR
#   BENCH_STEPS=wake_latency,train_step,sleep_cost bash benchmarks/run_gpu.sh OUT_DIR
#
# Needs jax with CUDA, flax, optax and matplotlib, nothing from the task/data pipelines, and fla
# (flash-linear-attention) for the peer's rows, which are error rows without it.
# Environment: PYTHON (default python3), BENCH_BUDGET_S (default 440), BENCH_STEPS (comma-
# separated steps to run, in that order; default all, in the order below), BENCH_DRY_RUN=1
# prints the commands without running them.

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

# The steps, in the default order. Each has a cap in seconds: what it took on a fresh H200 plus
# a margin where that was measured (docs/performance.md, "GPU results").
STEP_NAMES=(ops ops_fwdbwd profile wake_latency train_step sleep_cost attention)
STEPS="${BENCH_STEPS:-$(IFS=,; echo "${STEP_NAMES[*]}")}"
for name in ${STEPS//,/ }; do
  if [[ " ${STEP_NAMES[*]} " != *" $name "* ]]; then
    echo "BENCH_STEPS: unknown step '$name'; choose among: ${STEP_NAMES[*]}" >&2
    exit 2
  fi
done

# run NAME CAP_S ARGS...: runs "$PYTHON ARGS..." under a timeout of CAP_S seconds, or of what
# is left of the budget if that is less (skipped under 10 s).
run() {
  local name=$1 cap=$2
  shift 2
  local limit=$(( BUDGET_S - ($(date +%s) - start) ))
  if (( cap < limit )); then limit=$cap; fi
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

step() {
  case $1 in
    # The op's goals. Forward at T = 4K and 16K against fla (the pure-JAX rows took about 45 s;
    # fla's first call autotunes its Triton kernels for over a minute: not finished in any run
    # yet). `unrolled`: the chunk loop written out, one CUDA graph instead of 256 host-driven
    # iterations at 16K (benchmarks/gpu_aot.py); about 20 s to compile on a 2-core CPU host.
    ops) run ops 150 -m benchmarks.ops --out="$OUT_DIR/ops_gpu.json" --runs=5 --modes=fwd \
           --impls=chunked,unrolled,pallas,fla --shapes=4x4096x16x128,4x16384x16x128 ;;
    # Forward+backward against the per-token scan at T = 4K: about 105 s, 81 s of it compiling.
    ops_fwdbwd) run ops_fwdbwd 120 -m benchmarks.ops --out="$OUT_DIR/ops_gpu_fwdbwd.json" \
           --runs=5 --modes=fwdbwd --impls=scan,chunked,pallas --shapes=4x4096x16x128 ;;
    # Where the time of one call goes (benchmarks/profile.py): the op's two forms at 16K, and the
    # wake steps compared by wake_latency at its largest context. Not yet run on a GPU.
    profile)
      run profile_op_pallas 30 -m benchmarks.profile --target=op --impl=pallas \
        --out="$OUT_DIR/profile_op_pallas_gpu.json"
      run profile_op_chunked 20 -m benchmarks.profile --target=op --impl=chunked \
        --out="$OUT_DIR/profile_op_chunked_gpu.json"
      run profile_wake 20 -m benchmarks.profile --target=wake --out="$OUT_DIR/profile_wake_gpu.json"
      run profile_full 20 -m benchmarks.profile --target=full --out="$OUT_DIR/profile_full_gpu.json"
      ;;
    # At a size whose compilation fits: 76 s in all (the script's GPU default, d = 2048 with 8
    # blocks, did not finish compiling in an earlier run's 180 s for the model-level scripts).
    wake_latency) run wake_latency 90 -m benchmarks.wake_latency --out_dir="$OUT_DIR" \
           --d_model=1024 --heads=8 --layout=AGAG --window=1024 --variants=donated,bf16_weights ;;
    # The MFU goal's row, its cuDNN twin and its twin with the chunk loops written out (59,373
    # host-launched thunks per step rolled, 12,525 unrolled: benchmarks/gpu_aot.py): all 13
    # default steps compiling at once gave no row in 200 s.
    train_step) run train_step 150 -m benchmarks.train_step --out_dir="$OUT_DIR" \
           --configs=350m --passes=1 --unrolled=350m ;;
    # One window: two windows' 20 functions did not finish compiling in 90 s.
    sleep_cost) run sleep_cost 120 -m benchmarks.sleep_cost --out_dir="$OUT_DIR" --windows=2048 ;;
    # Full vs sliding at 4K and 16K, then the blocked sliding-window table: 61 s reached the
    # blocked table's first rows.
    attention) run attention 90 -m benchmarks.attention --out_dir="$OUT_DIR" \
           --seq_lens=4096,16384 ;;
  esac
}

for name in ${STEPS//,/ }; do
  step "$name"
done

rm -f "$OUT_DIR"/*.json.tmp

echo "== all tables ($(( $(date +%s) - start ))s in all)" | tee -a "$LOG"
if [[ "${BENCH_DRY_RUN:-0}" != 1 ]]; then
  "$PYTHON" -c "import sys; from benchmarks import common; common.print_digest(sys.argv[1])" \
    "$OUT_DIR" 2>&1 | tee -a "$LOG"
fi
