#!/usr/bin/env bash
# On the device (run tool, kind nvidia-h200, carry [".whl", ".device"]): the decoding benchmark (issue 8) and its GPU tests
# in one call that ends inside TOTAL_S (default 480 s, installs included):
#   RWKV_GIT_COMMIT=<sha> RWKV_GIT_DIRTY=0 [EXTRA="compile=1 fused_step=1"] bash scripts/device/inference.sh [bench] [tests]
# (default: both parts; EXTRA holds further key=value overrides of the bench).
# Grid: L12-D768, vocab 65536, bf16; RWKV-7 with impl rwkv (CUDA-kernel prefill, reference single-step decode) and
# fla (chunk prefill, fused recurrent decode), the parameter-matched Transformer (SDPA, KV cache) and LSTM; batch 1
# and 16; L = 128 ... 32768, ascending. It starts no new measurement after BENCH_BUDGET_S (the rows left are marked
# "skipped (time budget ...)") and resumes from the committed results/bench/inference.csv, keeping the rows of the
# same GPU model: a second call measures only what the first left.
# Back under $OUT: inference.csv, inference_{latency,memory,prefill}.png, inference.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
source scripts/device/setup.sh
OUT=${OUT:-results/bench/device-inference}
mkdir -p "$OUT"
[ -f results/bench/inference.csv ] && cp results/bench/inference.csv "$OUT/inference.csv"
TOTAL_S=${TOTAL_S:-480}; BENCH_BUDGET_S=${BENCH_BUDGET_S:-300}; TESTS_S=${TESTS_S:-120}
left() { echo $(( TOTAL_S - ($(date +%s) - start) )); }
within() { local s=$(( $(left) - $1 )); echo $(( s > 1 ? s : 1 )); }  # a timeout that leaves $1 s
parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=(bench tests)

{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,memory.used --format=csv
  python3 -c "import torch as t, triton; print(t.__version__, t.version.cuda, t.backends.cudnn.version(), triton.__version__)"
  for part in "${parts[@]}"; do
    echo "=== $part ($(left) s left)"
    case "$part" in
      bench) timeout "$(within "$TESTS_S")" python3 -m harness.bench inference time_budget_s="$BENCH_BUDGET_S" resume=true ${EXTRA:-} \
               out="$OUT" figures="$OUT" \
               || python3 -m harness.bench inference --plot-only out="$OUT" figures="$OUT" ;;  # partial CSV
      tests) timeout "$(within 5)" python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/test_inference.py tests/test_wkv7_decode_triton.py ;;
      *)     echo "unknown part '$part' (bench, tests)" ;;
    esac
    echo "=== $part exit $? after $(( $(date +%s) - start )) s"
  done
} 2>&1 | grep --line-buffered -v "According to Bo" | tee "$OUT/inference.log"
return_device_records
ls -la "$OUT"
