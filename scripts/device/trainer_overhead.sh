#!/usr/bin/env bash
# On the device: what the trainer adds to the bare step (results/bench/step.csv), per strategy variant.
# Same impl, batch and data through the harness, 50 steps each (10 flagged warm-up), no checkpoints; one row per
# (impl, variant) in $OUT/trainer_overhead.csv; profiles of the PROFILE variant beside it.
#   IMPLS="rwkv_jit fla" PROFILE=deepspeed_stage_2 bash scripts/device/trainer_overhead.sh
set -uo pipefail
source scripts/device/setup.sh
IMPLS=${IMPLS:-rwkv_jit fla}; STEPS=${STEPS:-50}; PROFILE=${PROFILE:-}
SYNC_STEPS=${SYNC_STEPS:-0}  # >0: count synchronizing CUDA calls in that many steps (run.json host_syncs)
declare -A VARIANTS=(
  [deepspeed_stage_2]="trainer.strategy=deepspeed_stage_2"
  [ds2_overlap_comm]="trainer.strategy=deepspeed_stage_2 trainer.deepspeed.overlap_comm=true"
  [ds2_no_contiguous]="trainer.strategy=deepspeed_stage_2 trainer.deepspeed.contiguous_gradients=false"
  [deepspeed_stage_1]="trainer.strategy=deepspeed_stage_1"
  [deepspeed_stage_0]="trainer.strategy=deepspeed_stage_0"
  [ds2_no_progress_bar]="trainer.strategy=deepspeed_stage_2 trainer.progress_every=0"
  [ds2_manual_gc]="trainer.strategy=deepspeed_stage_2 trainer.gc_every=50"
  [plain_bf16_true]="trainer.strategy=single_device trainer.precision=bf16-true"
  [plain_bf16_mixed]="trainer.strategy=single_device trainer.precision=bf16-mixed"
  [plain_fastest]="trainer.strategy=single_device trainer.precision=bf16-true accel.compile=true accel.fused_loss=true accel.cuda_graph=true"
  [ds2_compiled]="trainer.strategy=deepspeed_stage_2 accel.compile=true accel.fused_loss=true"
)
ORDER=${ORDER:-deepspeed_stage_2 ds2_overlap_comm ds2_no_contiguous deepspeed_stage_1 plain_bf16_true plain_bf16_mixed}
for impl in $IMPLS; do
  for variant in $ORDER; do
    profile=0; [ "$variant" = "$PROFILE" ] && profile=3
    timeout -s INT ${RUN_TIMEOUT_S:-150} python3 -m harness.run impl=$impl trainer=gpu bsz=48 data=corpus trainer.max_steps=$STEPS \
      trainer.ckpt_every=0 trainer.profile_steps=$profile trainer.progress_every=10 trainer.sync_debug_steps=$SYNC_STEPS \
      ${VARIANTS[$variant]} \
      experiment=overhead/$variant results_dir=$STUDY_RESULTS overwrite=true 2>&1 | grep -E "^done|^error|Error" | tail -2
  done
done
# One tidy row per run, in the columns of results/bench/trainer_overhead.csv (append them there).
python3 - "$STUDY_RESULTS/overhead" "$OUT/trainer_overhead.csv" <<'PY'
import csv, json, sys
from pathlib import Path
from harness.report.bench_tables import bench_table
runs, out = Path(sys.argv[1]), sys.argv[2]
latest = bench_table(Path("results"))  # the latest bare step per (gpu, impl, bsz, accel)
bare = {(r.impl, r.gpu, r.accel): r.kt_per_s for r in latest[latest["bsz"] == 48].itertuples()}
fields = ["impl", "variant", "status", "timed_steps", "kt_per_s", "median_step_kt_per_s", "bare_kt_per_s", "vs_bare",
          "git_commit", "gpu", "step_sync", "host_syncs_per_step", "accel"]
with open(out, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    for path in sorted(runs.glob("*/*/run.json")):
        r = json.loads(path.read_text())
        t, env = r.get("throughput") or {}, r["environment"][-1]
        accel = r.get("accel", {}).get("label", "eager")
        kt, ref = t.get("kt_per_s"), bare.get((r["impl"]["name"], env["gpu"], accel))
        writer.writerow({"impl": r["impl"]["name"], "variant": path.parent.parent.name,
                         "status": r.get("status", "").split(":")[0], "timed_steps": t.get("timed_steps"),
                         "kt_per_s": kt and round(kt, 2), "median_step_kt_per_s": kt and round(t["median_step_kt_per_s"], 2),
                         "bare_kt_per_s": ref, "vs_bare": kt and ref and round(kt / ref, 3),
                         "git_commit": env["git"]["commit"], "gpu": env["gpu"],
                         "step_sync": t.get("step_timing", "synchronize"),
                         "host_syncs_per_step": (r.get("host_syncs") or {}).get("per_step"), "accel": accel})
PY
cat "$OUT/trainer_overhead.csv"
for d in "$STUDY_RESULTS"/overhead/*/*/; do [ -f "$d/profile.txt" ] && cp "$d/profile.txt" "$OUT/profile-$(basename "$(dirname "$d")")-$(basename "$d").txt"; done
