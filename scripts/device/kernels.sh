#!/usr/bin/env bash
# On the device (run tool, kind nvidia-h100-x1, carry [".whl", ".device"]): the WKV-op benchmark grid, the
# FLA-vs-RWKV parity report and the GPU tests of both, in one call of at most 10 minutes:
#   RWKV_GIT_COMMIT=<sha> bash scripts/device/kernels.sh [grid] [parity] [tests]   (default: all three, in order)
# Back under $OUT (8 files at most): kernels.{csv,md,png}, fla-bf16_vs_rwkv_jit-bf16.{csv,md,png}, kernels.log.
# The grid stops starting new measurements after GRID_BUDGET_S (rows left get status "skipped (time budget ...)")
# and each part runs under `timeout`, so the whole call ends inside TOTAL_S even on a cold Triton cache.
set -uo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)  # the 10-minute call limit counts the installs too
source scripts/device/setup.sh
TOTAL_S=${TOTAL_S:-570}; GRID_BUDGET_S=${GRID_BUDGET_S:-400}
left() { echo $(( TOTAL_S - ($(date +%s) - start) )); }
within() { local s=$(( $(left) - $1 )); echo $(( s > 1 ? s : 1 )); }  # timeout leaving $1 s
parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=(grid parity tests)

{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
  python3 -c "import torch, triton, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__)"
  for part in "${parts[@]}"; do
    echo "=== $part ($(left) s left)"
    case "$part" in
      grid)   timeout "$(within 40)" python3 -m harness.bench kernels budget_s="$GRID_BUDGET_S" \
                out="$OUT" figures="$OUT" \
                || python3 -m harness.bench kernels --plot-only out="$OUT" figures="$OUT" ;;  # partial CSV
      parity) timeout "$(within 10)" python3 -m harness.parity impl_a=fla impl_b=rwkv_jit out="$OUT" ;;
      tests)  timeout "$(within 5)" python3 -m pytest -q -s -m gpu -p no:cacheprovider \
                tests/test_bench_kernels.py tests/test_parity.py tests/test_fla.py ;;
      *)      echo "unknown part '$part' (grid, parity, tests)" ;;
    esac
    echo "=== $part exit $? after $(( $(date +%s) - start )) s"
  done
} 2>&1 | grep --line-buffered -v "According to Bo" | tee "$OUT/kernels.log"
save_triton_cache
ls -la "$OUT"
