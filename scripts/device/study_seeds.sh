#!/usr/bin/env bash
# On the device: the study's seed runs (issue 20), loss only, several processes sharing the one GPU (the H200 holds
# about five L12-D768 bsz-48 runs). Every run is flagged trainer.loss_only=true in its run.json, so the report takes
# its loss and never its speed; throughput comes from the dedicated seed-0 runs of scripts/device/study.sh. Each run
# is stopped with Ctrl-C (SIGINT: finish the step, checkpoint, exit) before the call's limit, and the same command in
# the next call resumes every unfinished run while the machine stays warm (results under $STUDY_RESULTS).
#   SEEDS="1 2" PARALLEL=4 BUDGET_S=540 bash scripts/device/study_seeds.sh rwkv_jit rwkv fla-share fla-share-by_name \
#     fla-native fla-separate head
# As the seed-0 runs of results/study-fair-bsz48/: grad_cp off. carry [".whl", ".device", ".upstream"] (the corpus;
# HEAD's checkout for the head arm).
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/setup.sh
SEEDS=${SEEDS:-1 2}; PARALLEL=${PARALLEL:-4}; BUDGET_S=${BUDGET_S:-540}; STEPS=${STEPS:-1000}; BSZ=${BSZ:-48}
CKPT_EVERY=${CKPT_EVERY:-250}
start=$(date +%s)
jobs_list=()
for seed in $SEEDS; do for arm in "$@"; do jobs_list+=("$arm:$seed"); done; done
for job in "${jobs_list[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do sleep 2; done
  left=$(( BUDGET_S - ($(date +%s) - start) ))
  [ "$left" -gt 90 ] || { echo "=== $job: not started, ${left} s left"; continue; }
  arm=${job%:*}; seed=${job#*:}
  echo "=== $arm seed $seed: started with ${left} s left"
  ( EXPERIMENT=study-fair-bsz$BSZ DATA=corpus SEED=$seed timeout -s INT "$left" train-temp/demo-training-run.sh "$arm" \
      fair bsz=$BSZ trainer.max_steps=$STEPS trainer.ckpt_every=$CKPT_EVERY trainer.loss_only=true trainer.grad_cp=false \
      trainer.progress_every=0 results_dir=$STUDY_RESULTS ${EXTRA:-} > "/tmp/seed-$arm-$seed.log" 2>&1
    echo "=== $arm seed $seed: exit $?: $(grep -E '^done|^error|interrupted' "/tmp/seed-$arm-$seed.log" | tail -1)" ) &
done
wait
return_run_logs "study-*" study-results
return_device_records
