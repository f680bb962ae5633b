#!/usr/bin/env bash
# Run HERE (not on the device): put what device runs need but git does not track into .device/ (ignored),
# to be named in the run tool's `carry`: the wheels the device lacks and the xz-compressed corpus (fits the
# 64 MiB limit: data/corpus.bin is ~53 MB raw, ~17 MB compressed).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .device
[ -f data/corpus.bin ] || python scripts/build_corpus.py
xz -T2 -6 -c data/corpus.bin > .device/corpus.bin.xz
cp data/corpus.idx data/corpus.manifest.json .device/
du -sh .device .whl
