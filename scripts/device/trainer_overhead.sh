#!/usr/bin/env bash
# On the device: where does the trainer's step time go beyond the bare step (results/bench/step.csv)?
# Same impl and batch through the harness (a) with DeepSpeed ZeRO-2 bf16 + fp32 master weights, as RWKV-LM
# trains, and (b) with plain Lightning (single device, bf16-true, fused torch AdamW), as the bare benchmark;
# both profiled.
set -uo pipefail
source scripts/device/setup.sh
IMPL=${IMPL:-rwkv_jit}
common="impl=$IMPL trainer=gpu bsz=48 data=corpus trainer.max_steps=40 trainer.profile_steps=3 trainer.ckpt_every=0"
timeout 280 python3 -m harness.run $common experiment=overhead-deepspeed results_dir=$STUDY_RESULTS
timeout 200 python3 -m harness.run $common experiment=overhead-plain trainer.strategy=single_device \
  trainer.precision=bf16-true results_dir=$STUDY_RESULTS
for d in "$STUDY_RESULTS"/overhead-*/*-seed0; do
  tag=$(basename "$(dirname "$d")")
  cp "$d/profile.txt" "$OUT/$tag-profile.txt"; cp "$d/steps.csv" "$OUT/$tag-steps.csv"; cp "$d/run.json" "$OUT/$tag-run.json"
done
