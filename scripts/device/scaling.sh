#!/usr/bin/env bash
# On the device (run tool, kind nvidia-h200-x2, carry [".whl", ".device"]): issue 9's scaling run. The same run of
# IMPL (default rwkv_jit; L12 D768 ctx 512, DeepSpeed ZeRO-2 bf16, seed 0, the corpus) at one global batch
# (GLOBAL_BSZ, default 96) on each GPU count of GPUS (default "1 2"): bsz = GLOBAL_BSZ / n per GPU, so every count
# trains on the same samples in the same order. STEPS steps each (default 220: 10 flagged warm-up, the losses of
# the first 200 compared), no checkpoints; each run ends inside RUN_TIMEOUT_S (Ctrl-C: it checkpoints and stops).
#   RWKV_GIT_COMMIT=<sha> RWKV_GIT_DIRTY=0 bash scripts/device/scaling.sh
# Back under $OUT: scaling-results.tgz (unpack into results/; `python -m harness.report` adds the scaling table).
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/setup.sh
IMPL=${IMPL:-rwkv_jit}; GLOBAL_BSZ=${GLOBAL_BSZ:-96}; GPUS=${GPUS:-1 2}; STEPS=${STEPS:-220}
RUN_TIMEOUT_S=${RUN_TIMEOUT_S:-240}
nvidia-smi --query-gpu=index,name,driver_version,clocks.sm,clocks.max.sm --format=csv
nvidia-smi topo -m
for n in $GPUS; do
  if (( GLOBAL_BSZ % n )); then echo "error: GLOBAL_BSZ=$GLOBAL_BSZ is not a multiple of $n GPUs"; continue; fi
  echo "=== $n GPU(s), bsz $(( GLOBAL_BSZ / n )) per GPU"
  timeout -s INT "$RUN_TIMEOUT_S" python3 -m harness.run impl="$IMPL" trainer=gpu data=corpus \
    bsz=$(( GLOBAL_BSZ / n )) trainer.devices="$n" trainer.max_steps="$STEPS" trainer.ckpt_every=0 \
    trainer.grad_cp=false experiment=scaling-"$IMPL"-gb"$GLOBAL_BSZ" results_dir="$STUDY_RESULTS" overwrite=true \
    2>&1 | grep -vE "Warning|warn" | tail -4
done
return_run_logs "scaling-*" scaling-results
return_device_records
ls -la "$OUT"
