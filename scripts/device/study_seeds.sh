#!/usr/bin/env bash
# On the device: the study's seed runs (issue 26), loss only, several processes sharing the one GPU. Every run is
# flagged trainer.loss_only=true in its run.json, so the report takes its loss and never its speed; throughput comes
# from the dedicated seed-0 runs of scripts/device/study.sh.
#   JOBS="fla-share-by_name:0 rwkv_jit:1 fla-share:1 ..." BUDGET_S=540 bash scripts/device/study_seeds.sh
# or, every arm at every seed of SEEDS (seed-major order):
#   SEEDS="1 2" bash scripts/device/study_seeds.sh rwkv_jit rwkv fla-share fla-share-by_name fla-native fla-separate head
# Jobs start in the order given, each once the GPU has room for it: an arm's peak (GiB, measured in
# results/bench/step.csv at bsz 48 ctx 512, grad_cp off, plus DeepSpeed's ~3 GiB) must fit under the card's memory
# less RESERVE_GIB (left to the GPU tests run alongside). A job is started only while at least MIN_LEFT_S of the
# budget remains; each is stopped with SIGINT at the budget (finish the step, checkpoint, exit 130), and the same
# command in the next call resumes every unfinished run while the machine stays warm (results under $STUDY_RESULTS).
# Finished runs are skipped (the harness refuses nothing here: a completed run_dir is detected by its run.json).
# As the seed-0 runs of results/study-fair-bsz48/: grad_cp off. carry [".whl", ".device", ".upstream"].
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/setup.sh
SEEDS=${SEEDS:-1 2}; BUDGET_S=${BUDGET_S:-540}; STEPS=${STEPS:-1000}; BSZ=${BSZ:-48}
CKPT_EVERY=${CKPT_EVERY:-250}; RESERVE_GIB=${RESERVE_GIB:-0}; MIN_LEFT_S=${MIN_LEFT_S:-120}
start=$(date +%s)
if [ -n "${JOBS:-}" ]; then read -r -a jobs_list <<< "$JOBS"; else
  jobs_list=(); for seed in $SEEDS; do for arm in "$@"; do jobs_list+=("$arm:$seed"); done; done
fi
peak_gib() { case "$1" in rwkv|rwkv_jit) echo 37 ;; fla-*) echo 32 ;; head) echo 27 ;; *) echo 40 ;; esac; }
card_gib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1); card_gib=$(( card_gib / 1024 ))
declare -A running_gib
used_gib() {  # what the live jobs hold, by their arms' peaks
  local total=0 pid
  for pid in "${!running_gib[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then total=$(( total + running_gib[$pid] )); else unset "running_gib[$pid]"; fi
  done
  echo "$total"
}
echo "=== card ${card_gib} GiB, reserve ${RESERVE_GIB} GiB, budget ${BUDGET_S} s, jobs: ${jobs_list[*]}"
for job in "${jobs_list[@]}"; do
  arm=${job%:*}; seed=${job#*:}; need=$(peak_gib "$arm")
  while [ $(( $(used_gib) + need )) -gt $(( card_gib - RESERVE_GIB )) ]; do sleep 2; done
  left=$(( BUDGET_S - ($(date +%s) - start) ))
  [ "$left" -gt "$MIN_LEFT_S" ] || { echo "=== $job: not started, ${left} s left"; continue; }
  echo "=== $arm seed $seed: started at +$(( $(date +%s) - start )) s with ${left} s left ($(used_gib) GiB in use)"
  ( EXPERIMENT=study-fair-bsz$BSZ DATA=corpus SEED=$seed timeout -s INT "$left" train-temp/demo-training-run.sh "$arm" \
      fair bsz=$BSZ trainer.max_steps=$STEPS trainer.ckpt_every=$CKPT_EVERY trainer.loss_only=true trainer.grad_cp=false \
      trainer.progress_every=0 results_dir=$STUDY_RESULTS ${EXTRA:-} > "$DEVICE_LOGS/seed-$arm-$seed.log" 2>&1
    echo "=== $arm seed $seed: exit $? at +$(( $(date +%s) - start )) s:" \
      "$(grep -E '^done|^error|interrupted|Error' "$DEVICE_LOGS/seed-$arm-$seed.log" | tail -1)" ) &
  running_gib[$!]=$need
  sleep 5
done
wait
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
return_run_logs "study-*" study-results
tail -n 3 "$DEVICE_LOGS"/seed-*.log > "$OUT/seed-logs-tail.txt" 2>/dev/null
return_device_records
