#!/usr/bin/env bash
# On the device (run tool, kind nvidia-h200, carry [".whl", ".device"]): the WKV-op benchmark grid, the
# FLA-vs-RWKV parity report and the GPU tests of both, in one call of at most 10 minutes:
#   RWKV_GIT_COMMIT=<sha> bash scripts/device/kernels.sh [parity] [grid] [tests]   (default: all three, in order)
# Back under $OUT (8 files at most): kernels.{csv,md,png}, fla-bf16_vs_rwkv_jit-bf16.{csv,md,png}, kernels.log and
# the autotune choices. The grid resumes from the committed results/bench/kernels.csv, keeping rows of the same GPU
# model only (rows an earlier call's time budget skipped are measured, the rest kept), and stops starting new
# measurements RESERVE_S before TOTAL_S (rows left: "skipped (time budget ...)", for the next call); each part runs
# under `timeout`, so the call ends inside TOTAL_S.
set -uo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)  # the 10-minute call limit counts the installs too
source scripts/device/setup.sh
TOTAL_S=${TOTAL_S:-570}; PARITY_S=${PARITY_S:-240}  # parity autotunes FLA's layer kernels at its own shapes
left() { echo $(( TOTAL_S - ($(date +%s) - start) )); }
within() { local s=$(( $(left) - $1 )); echo $(( s > 1 ? s : 1 )); }  # timeout leaving $1 s
parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=(parity grid tests)
RESERVE_S=${RESERVE_S:-$([[ " ${parts[*]} " == *" tests "* ]] && echo 150 || echo 40)}  # left after the grid
[ -f results/bench/kernels.csv ] && cp results/bench/kernels.csv "$OUT/kernels.csv"

{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
  python3 -c "import torch, triton, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__)"
  for part in "${parts[@]}"; do
    echo "=== $part ($(left) s left)"
    case "$part" in
      grid)   timeout "$(within 40)" python3 -m harness.bench kernels budget_s="$(within "$RESERVE_S")" resume=true \
                out="$OUT" figures="$OUT" \
                || python3 -m harness.bench kernels --plot-only out="$OUT" figures="$OUT" ;;  # partial CSV
      parity) timeout "$(( PARITY_S < $(within 10) ? PARITY_S : $(within 10) ))" python3 -m harness.bench parity impl_a=fla impl_b=rwkv_jit out="$OUT" ;;
      tests)  timeout "$(within 5)" python3 -m pytest -q -s -m gpu -p no:cacheprovider \
                tests/test_bench_kernels.py tests/test_parity.py tests/test_fla.py ;;
      *)      echo "unknown part '$part' (grid, parity, tests)" ;;
    esac
    echo "=== $part exit $? after $(( $(date +%s) - start )) s"
  done
} 2>&1 | grep --line-buffered -v "According to Bo" | tee "$OUT/kernels.log"
return_device_records
ls -la "$OUT"
