# Source on the device: `source scripts/device/setup.sh` (needs `carry: [".whl", ".device"]`).
# Installs the carried wheels, unpacks the corpus (checked against its manifest), sets the environment.
# Locations default under $HOME / $TMPDIR (on the device: /root, /tmp) and can be set before sourcing.
export DEVICE_SITE=${DEVICE_SITE:-${TMPDIR:-/tmp}/rwkv-site}
# The scripts' per-run logs (their tails go into $OUT): a fresh folder for each script that sources this.
export DEVICE_LOGS=$(mktemp -d)
# Installed once per machine: a second script sourcing this while the first one's processes import from the site
# must not reinstall under them.
if [ ! -f "$DEVICE_SITE/.installed" ]; then
  for wheels in .whl .whl-tf; do  # .whl-tf: a newer transformers for flash-linear-attention, when carried
    compgen -G "$wheels/*.whl" > /dev/null || continue
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$DEVICE_SITE" \
      "$wheels"/*.whl
  done
  touch "$DEVICE_SITE/.installed"
fi
export PYTHONPATH=$DEVICE_SITE${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# DeepSpeed's op builder cannot parse arch names such as "9.0a" in the image's TORCH_CUDA_ARCH_LIST.
export TORCH_CUDA_ARCH_LIST=9.0
export RWKV_GIT_COMMIT=${RWKV_GIT_COMMIT:-unknown} RWKV_GIT_DIRTY=${RWKV_GIT_DIRTY:-unknown}
# Results live outside the synced tree so that they survive between calls while the machine stays warm.
export STUDY_RESULTS=${STUDY_RESULTS:-$HOME/study-results}
# FLA caches its autotune choices in Triton's cache (FLA_CACHE_RESULTS=1): a cache carried from an earlier machine
# (.device/triton-cache.tar.xz.part-*, from SAVE_TRITON_CACHE=1) spares the ~7-minute cold autotune.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/triton-cache}
mkdir -p data "$STUDY_RESULTS" "$TRITON_CACHE_DIR"
if compgen -G ".device/triton-cache.tar.xz.part-*" > /dev/null && [ -z "$(ls -A "$TRITON_CACHE_DIR")" ]; then
  cat .device/triton-cache.tar.xz.part-* | tar xJf - -C "$TRITON_CACHE_DIR"
fi
# Into $OUT at the end of every device script: the autotune choices this machine made (results/autotune/*.json,
# impls/triton_autotune.py; commit them), and with SAVE_TRITON_CACHE=1 the whole Triton cache in parts under the
# 16 MiB file limit (copy them to .device/ here).
return_device_records() {
  cp results/autotune/*.json "$OUT/" 2>/dev/null
  [ "${SAVE_TRITON_CACHE:-0}" = 1 ] || return 0
  tar cf - -C "$TRITON_CACHE_DIR" . | xz -T16 -6 | split -b 15M - "$OUT/triton-cache.tar.xz.part-"
}
# Into $OUT as NAME.tgz: the logs (steps.csv, run.json; no checkpoints or init files) of the experiments under
# $STUDY_RESULTS matching PATTERN, with the machine's results folder written as results/ in the records.
return_run_logs() {  # return_run_logs PATTERN NAME
  local staging; staging=$(mktemp -d)
  (cd "$STUDY_RESULTS" && tar cf - --exclude=checkpoints --exclude=init --exclude=run.lock ./$1) | tar xf - -C "$staging"
  find "$staging" -name run.json -exec sed -i "s#$STUDY_RESULTS#results#g" {} +
  tar czf "$OUT/$2.tgz" -C "$staging" . && rm -rf "$staging"
}
if [ -f .device/corpus.bin.xz ] && [ ! -f data/corpus.bin ]; then
  xz -d -T8 -c .device/corpus.bin.xz > data/corpus.bin
  cp .device/corpus.idx data/
  python3 - <<'PY'
import hashlib, json, sys
manifest = json.load(open(".device/corpus.manifest.json"))
for name, entry in manifest["outputs"].items():
    digest = hashlib.sha256(open(f"data/{name}", "rb").read()).hexdigest()
    if digest != entry["sha256"]:
        sys.exit(f"data/{name} does not match its manifest")
print("corpus ok:", manifest["tokens"], "tokens")
PY
fi
