#!/usr/bin/env bash
# On the device: the bare training step (harness.bench step, results/bench/step.csv) of each ARM at each of BATCHES,
# one process per row, in one call, so that every ratio between rows is measured on one machine in one run. An arm is
#   head | dc6c3ec     an RWKV-LM checkout through impl=rwkv_lm: HEAD (RWKV_KERNEL=@rwkv3, JIT on: all its fused
#                      kernels and its fused loss) or the published comparison's baseline (JIT on);
#   IMPL[+OPTION...]   one of this project's impls with accelerations on (harness/training/accel.py), e.g.
#                      rwkv+compile+fused_loss+cuda_graph.
# The default ARMS are the anchors: head dc6c3ec rwkv_jit fla. The checkouts are exported here (ignored by git, see
# .git/info/exclude):
#   mkdir -p .upstream/head .upstream/dc6c3ec
#   git -C <RWKV-LM> archive --prefix=RWKV-v7/train_temp/ HEAD:RWKV-v7/train_temp | tar x -C .upstream/head
#   git -C <RWKV-LM> archive --prefix=RWKV-v7/train_temp/ dc6c3ec:RWKV-v7/train_temp | tar x -C .upstream/dc6c3ec
# and carried: carry [".whl", ".device", ".upstream"].
#   RWKV_GIT_COMMIT=<sha> RWKV_GIT_DIRTY=0 ARMS="head rwkv+compile+fused_loss" bash scripts/device/step_grid.sh
# HEAD_LABEL names HEAD's rows (rwkv_lm-<label>; its export carries no commit), BATCHES the batch sizes. HEAD builds
# its eight extensions on a thread pool at the first import (about 75 s), dc6c3ec its one; later rows reuse them.
# Back under $OUT: step.csv and step.jsonl (the committed files plus the new rows: copy them over results/bench/),
# anchors.log (every row's output, one after another) and the autotune choices (results/autotune/*.json).
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/setup.sh
HEAD_LABEL=${HEAD_LABEL:-head-524481d}; BATCHES=${BATCHES:-48 16}; ARMS=${ARMS:-head dc6c3ec rwkv_jit fla}
PROFILE_ARMS=${PROFILE_ARMS:-}  # arms also profiled (harness.bench step --profile) at the first batch size
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$HOME/inductor-cache}  # compiled arms reuse it
BUDGET_S=${BUDGET_S:-570}; STEP_TIMEOUT_S=${STEP_TIMEOUT_S:-240}  # the call's limit, and one row's
arm_args() {  # arm_args ARM: the step bench's arguments of that arm, into ARGS
  local checkout="+impl_options.path=.upstream/$1/RWKV-v7/train_temp"
  case $1 in
    head) ARGS=(impl=rwkv_lm "$checkout" +impl_options.kernel=@rwkv3 +impl_options.jit=true
                "+impl_options.label=$HEAD_LABEL") ;;
    dc6c3ec) ARGS=(impl=rwkv_lm "$checkout" "+impl_options.kernel=''" +impl_options.jit=true  # reads no RWKV_KERNEL
                   +impl_options.label=dc6c3ec) ;;
    *) IFS=+ read -r -a parts <<< "$1"; ARGS=("impl=${parts[0]}")
       for option in "${parts[@]:1}"; do ARGS+=("accel.$option=true"); done ;;
  esac
}
for folder in head dc6c3ec; do
  [ -f ".upstream/$folder/RWKV-v7/train_temp/src/model.py" ] || echo "=== missing .upstream/$folder (see the header)"
done
start_all=$(date +%s)
for bsz in $BATCHES; do
  for arm in $ARMS; do
    left=$(( BUDGET_S - ($(date +%s) - start_all) ))
    if [ "$left" -lt 45 ]; then echo "=== $arm bsz=$bsz: skipped, ${left} s of the call left"; continue; fi
    start=$(date +%s)
    log="$DEVICE_LOGS/step-$arm-bsz$bsz.log"  # $OUT takes 8 files: the rows' logs go into one
    arm_args "$arm"
    timeout $(( left < STEP_TIMEOUT_S ? left : STEP_TIMEOUT_S )) python3 -m harness.bench step "${ARGS[@]}" \
      bsz="$bsz" > "$log" 2>&1
    status=$?
    { echo "=== $arm bsz=$bsz"; cat "$log"; } >> "$OUT/anchors.log"
    echo "=== $arm bsz=$bsz: exit $status, $(( $(date +%s) - start )) s: $(grep -E 'kt/s|^error' "$log" | tail -1)"
    cp results/bench/step.csv results/bench/step.jsonl "$OUT/"  # after each row: a later timeout keeps these
    if [[ " $PROFILE_ARMS " == *" $arm "* && $bsz == "${BATCHES%% *}" ]]; then
      timeout 200 python3 -m harness.bench step "${ARGS[@]}" bsz="$bsz" out="$DEVICE_LOGS/profiles" --profile \
        > "$DEVICE_LOGS/profile-$arm.log" 2>&1
      { echo "=== profile $arm bsz=$bsz"; cat "$DEVICE_LOGS/profile-$arm.log"; } >> "$OUT/profiles.log"
    fi
  done
done
return_device_records
