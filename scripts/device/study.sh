#!/usr/bin/env bash
# On the device: the study's arms, each stopped with Ctrl-C (SIGINT: finish the step, checkpoint, exit) before
# the 10-minute call limit and resumed by the next call while the machine stays warm. Logs come back via $OUT.
#   STEPS=1000 BSZ=48 BUDGET_S=540 scripts/device/study.sh rwkv rwkv_jit fla-share fla-native fla-separate
# EXTRA holds further Hydra overrides for every arm; SAVE_TRITON_CACHE=1 also returns the Triton cache.
set -uo pipefail
source scripts/device/setup.sh
STEPS=${STEPS:-1000}; BSZ=${BSZ:-48}; BUDGET_S=${BUDGET_S:-540}; RECIPE=${RECIPE:-fair}
# A ZeRO-2 checkpoint of L12-D768 takes ~4-6 s to write; Ctrl-C (the timeout) writes one anyway, so few suffice.
CKPT_EVERY=${CKPT_EVERY:-500}
start=$(date +%s)
for arm in "$@"; do
  left=$(( BUDGET_S - ($(date +%s) - start) ))
  [ "$left" -gt 60 ] || break
  EXPERIMENT=study-$RECIPE-bsz$BSZ DATA=corpus timeout -s INT "$left" train-temp/demo-training-run.sh "$arm" "$RECIPE" \
    bsz=$BSZ trainer.max_steps=$STEPS trainer.ckpt_every=$CKPT_EVERY results_dir=$STUDY_RESULTS ${EXTRA:-} \
    2>&1 | grep -vE "Warning|warn" | tail -4
done
return_run_logs "study-*" study-results
return_device_records
ls -la "$OUT"
