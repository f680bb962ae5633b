#!/usr/bin/env bash
# On the device (run tool, kind nvidia-h200, carry [".whl"]): the whole GPU test suite (`pytest -m gpu`: the golden
# fp64 values against rwkv / rwkv_jit / fla in bf16, the CUDA kernel against fp64, JIT on/off, FLA layer checks,
# the kernel grid and parity on real kernels, the CUDA/FLA decode paths with CUDA graphs), in one call:
#   RWKV_GIT_COMMIT=<sha> RWKV_GIT_DIRTY=0 bash scripts/device/gpu_tests.sh [pytest args ...]
# Back under $OUT: gpu_tests.log (the whole output, junit summary at the end) and the autotune choices.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/setup.sh
{
  nvidia-smi --query-gpu=name,driver_version --format=csv
  python3 -c "import torch, triton, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__)"
  timeout "${TESTS_S:-540}" python3 -m pytest -q -m gpu -p no:cacheprovider -rs "$@"
  echo "=== pytest exit $?"
} 2>&1 | grep --line-buffered -v "According to Bo" | tee "$OUT/gpu_tests.log"
return_device_records
