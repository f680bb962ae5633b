#!/usr/bin/env bash
# On the device (issue 27): for each seed and impl, three runs of STEPS steps from the same shared weights on the same
# batches (data=corpus, bsz 48, plain Lightning bf16-true: the bare step's recipe), into the experiment $EXPERIMENT:
# eager; eager with NUDGE_ULP weights of head.weight one bf16 ulp up (init.nudge_ulp: the noise floor's twin, run id
# ...-shared-nudge<K>s0-...); and accelerated (FAST). The report pairs each twin with its eager run ("Accelerated runs
# against eager, beside the noise floor": a verdict per accelerated configuration from >= 3 pairs of each kind) and
# draws the differences (figures/$EXPERIMENT/accel_vs_floor.png).
#   IMPLS="rwkv fla" SEEDS="0 1 2" BUDGET_S=540 bash scripts/device/accel_curves.sh     (carry [".whl", ".device"])
# Resumable as study_seeds.sh: each run is stopped with SIGINT at the budget (it checkpoints and exits 130), the same
# command in the next call resumes it while the machine stays warm (results under $STUDY_RESULTS), and a finished run
# is skipped by the harness (its run.json says completed). Runs start seed-major, so that a budget cut leaves whole
# triples for the first seeds; a run is started only while MIN_LEFT_S of the budget remain. PARALLEL runs share the
# GPU (no timing is read here; eager peaks ~34 GiB at bsz 48, results/bench/step.csv: 2 fit an H100, 3 an H200).
# Cost (H200, from the bare step's ~0.16 s at bsz 48): an eager 300-step run ~48 s of steps + ~20-30 s to start
# (imports, the corpus checksum, the model, the first step); an accelerated run as much, plus its compile: ~80 s cold
# for rwkv, ~120 s for fla, less from a warm $TORCHINDUCTOR_CACHE_DIR (same warm machine only). Per impl and 3 seeds
# ~6 x 75 s + 3 x 75 s + compiles ~ 13-15 min, so the default two impls ~ 27 min with PARALLEL=1: most of one
# session's 30 device minutes, over three calls of BUDGET_S=540; IMPLS=rwkv alone ~ two calls.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/setup.sh
IMPLS=${IMPLS:-rwkv fla}; SEEDS=${SEEDS:-0 1 2}; STEPS=${STEPS:-300}; NUDGE_ULP=${NUDGE_ULP:-4}
EXPERIMENT=${EXPERIMENT:-accel-curves-bsz48}; BUDGET_S=${BUDGET_S:-540}; MIN_LEFT_S=${MIN_LEFT_S:-60}
PARALLEL=${PARALLEL:-1}
FAST=${FAST:-accel.compile=true accel.fused_loss=true accel.cuda_graph=true}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$HOME/inductor-cache}
declare -A VARIANTS=([eager]="" [nudged]="init.nudge_ulp=$NUDGE_ULP" [fast]="$FAST")
start=$(date +%s)
for seed in $SEEDS; do
  for impl in $IMPLS; do
    for variant in eager nudged fast; do
      while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do wait -n; done
      left=$(( BUDGET_S - ($(date +%s) - start) ))
      [ "$left" -gt "$MIN_LEFT_S" ] || { echo "=== $impl seed $seed $variant: not started, ${left} s left"; continue; }
      log="$DEVICE_LOGS/accel-curves-$impl-$seed-$variant.log"
      echo "=== $impl seed $seed $variant: started at +$(( $(date +%s) - start )) s with ${left} s left"
      ( timeout -s INT "$left" python3 -m harness.run impl=$impl trainer=gpu bsz=48 data=corpus seed=$seed \
          trainer.max_steps=$STEPS trainer.ckpt_every=0 trainer.progress_every=50 trainer.strategy=single_device \
          trainer.precision=bf16-true experiment=$EXPERIMENT results_dir=$STUDY_RESULTS ${VARIANTS[$variant]} \
          > "$log" 2>&1
        echo "=== $impl seed $seed $variant: exit $? at +$(( $(date +%s) - start )) s:" \
          "$(grep -E '^done|^error|interrupted|Error' "$log" | tail -1)" ) &
    done
  done
done
wait
return_run_logs "$EXPERIMENT" accel-curves
tail -n 3 "$DEVICE_LOGS"/accel-curves-*.log > "$OUT/accel-curves-logs-tail.txt" 2>/dev/null
return_device_records
