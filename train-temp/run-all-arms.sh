#!/usr/bin/env bash
# Every arm of the study, one after another, same corpus, same data order and seed.
# A stopped arm resumes where it stopped when this script is run again.
set -euo pipefail
cd "$(dirname "$0")"
RECIPE=${1:-fair}
shift $(( $# >= 1 ? 1 : 0 ))
for arm in rwkv rwkv_jit fla-share fla-native fla-separate; do
  ./demo-training-run.sh "$arm" "$RECIPE" "$@"
done
