#!/usr/bin/env bash
# On the device: each impl trained 200 steps eager and with the fastest accelerations, from the same shared weights on
# the same batches (data=corpus, bsz 48, plain Lightning bf16-true: the bare step's recipe), into the experiment
# accel-curves-bsz48; the report compares each pair step by step ("Accelerated runs against eager") and draws the
# curves (figures/accel-curves-bsz48/loss.png).
#   IMPLS="rwkv fla" FAST="accel.compile=true accel.fused_loss=true accel.cuda_graph=true" \
#     bash scripts/device/accel_curves.sh     (carry [".whl", ".device"])
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/setup.sh
IMPLS=${IMPLS:-rwkv fla}; STEPS=${STEPS:-200}
FAST=${FAST:-accel.compile=true accel.fused_loss=true accel.cuda_graph=true}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$HOME/inductor-cache}
for impl in $IMPLS; do
  for accel in "" "$FAST"; do
    echo "=== $impl ${accel:-eager}"
    timeout -s INT "${RUN_TIMEOUT_S:-240}" python3 -m harness.run impl=$impl trainer=gpu bsz=48 data=corpus \
      trainer.max_steps=$STEPS trainer.ckpt_every=0 trainer.progress_every=50 trainer.strategy=single_device \
      trainer.precision=bf16-true experiment=accel-curves-bsz48 results_dir=$STUDY_RESULTS $accel 2>&1 \
      | grep -E "^done|^error|Error" | tail -2
  done
done
return_run_logs "accel-curves-*" accel-curves
return_device_records
