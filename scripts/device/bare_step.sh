#!/usr/bin/env bash
# On the device: the bare training step (harness.bench step, results/bench/step.csv) for each impl, one process each.
#   RWKV_GIT_COMMIT=<sha> RWKV_GIT_DIRTY=0 BSZ=48 bash scripts/device/bare_step.sh fla rwkv_jit rwkv
# Back under $OUT: step.csv and step.jsonl (the committed files plus the new rows: copy them over results/bench/),
# and the autotune choices (results/autotune/*.json).
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/setup.sh
for impl in "$@"; do
  start=$(date +%s)
  timeout "${STEP_TIMEOUT_S:-540}" python3 -m harness.bench step impl="$impl" bsz="${BSZ:-48}" 2>&1 \
    | grep -vE "Warning|warn" | tail -3
  echo "=== $impl bare step: $(( $(date +%s) - start )) s"
  cp results/bench/step.csv results/bench/step.jsonl "$OUT/"  # after each impl: a later timeout keeps these
  return_device_records
done
