#!/usr/bin/env bash
# On the device: what the trainer adds to the bare step (results/bench/step.csv), per strategy variant.
# Same impl, batch and data through the harness, 50 steps each (10 flagged warm-up), no checkpoints; one row per
# (impl, variant) in $OUT/overhead.csv, run records in $OUT/overhead-runs.tgz.
#   IMPLS="rwkv_jit fla" PROFILE=deepspeed_stage_2 bash scripts/device/trainer_overhead.sh
set -uo pipefail
source scripts/device/setup.sh
IMPLS=${IMPLS:-rwkv_jit fla}; STEPS=${STEPS:-50}; PROFILE=${PROFILE:-}
declare -A VARIANTS=(
  [deepspeed_stage_2]="trainer.strategy=deepspeed_stage_2"
  [ds2_no_overlap]="trainer.strategy=deepspeed_stage_2 trainer.deepspeed.overlap_comm=false"
  [ds2_no_overlap_no_contiguous]="trainer.strategy=deepspeed_stage_2 trainer.deepspeed.overlap_comm=false trainer.deepspeed.contiguous_gradients=false"
  [deepspeed_stage_1]="trainer.strategy=deepspeed_stage_1"
  [deepspeed_stage_0]="trainer.strategy=deepspeed_stage_0"
  [ds2_no_progress_bar]="trainer.strategy=deepspeed_stage_2 trainer.progress_every=0"
  [plain_bf16_true]="trainer.strategy=single_device trainer.precision=bf16-true"
  [plain_bf16_mixed]="trainer.strategy=single_device trainer.precision=bf16-mixed"
)
ORDER=${ORDER:-deepspeed_stage_2 ds2_no_progress_bar ds2_no_overlap ds2_no_overlap_no_contiguous deepspeed_stage_1 deepspeed_stage_0 plain_bf16_true plain_bf16_mixed}
echo "impl,variant,status,timed_steps,kt_per_s,median_step_kt_per_s,first_step_s" > "$OUT/overhead.csv"
for impl in $IMPLS; do
  for variant in $ORDER; do
    profile=0; [ "$variant" = "$PROFILE" ] && profile=3
    timeout -s INT 150 python3 -m harness.run impl=$impl trainer=gpu bsz=48 data=corpus trainer.max_steps=$STEPS \
      trainer.ckpt_every=0 trainer.profile_steps=$profile trainer.progress_every=10 ${VARIANTS[$variant]} \
      experiment=overhead/$variant results_dir=$STUDY_RESULTS overwrite=true 2>&1 | grep -E "^done|^error|Error" | tail -2
    python3 - "$STUDY_RESULTS/overhead/$variant/$impl-shared-bsz48-seed0/run.json" "$impl" "$variant" >> "$OUT/overhead.csv" <<'PY'
import json, sys
path, impl, variant = sys.argv[1:]
try:
    r = json.load(open(path))
except OSError:
    print(f"{impl},{variant},no run.json,,,,"); sys.exit()
t = r.get("throughput") or {}
print(",".join(str(x) for x in (impl, variant, r.get("status", "").split(":")[0], t.get("timed_steps", ""),
      t.get("kt_per_s", ""), t.get("median_step_kt_per_s", ""), t.get("first_step_s", ""))))
PY
    tail -1 "$OUT/overhead.csv"
  done
done
tar czf "$OUT/overhead-runs.tgz" -C "$STUDY_RESULTS" overhead
