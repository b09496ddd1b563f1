#!/usr/bin/env bash
# Packs the CUDA build for the GPU machine: .device/kindling.xz (git-ignored, carried by the device tool).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device
xz -T0 -6 -c target/cuda/release/kindling > .device/kindling.xz
# An earlier build to compare against in the same run (scripts/bench/device-ab.sh).
rm -f .device/kindling-before.xz
if [ -n "${BEFORE:-}" ]; then xz -T0 -6 -c "$BEFORE" > .device/kindling-before.xz; fi
# Guests for `kindling bench serve` and `bench invoke` (the GPU machine cannot build guests),
# named by GUESTS; the carry limit is 64 MiB in all.
for guest in ${GUESTS:-openai-python}; do
  if [ -f "target/guests/$guest.wasm" ]; then xz -T0 -6 -c "target/guests/$guest.wasm" > ".device/$guest.wasm.xz"; fi
done
# The gguf package (make_gguf.py, transformers' GGUF loader), and, with SMOLLM2=1, the real
# SmolLM2 GGUF split in two (over the limit whole) at a fixed point, so that a part b already on
# the machine fits any build: part a in .device/, part b in .device-b/, carried by a second call.
pip download -q --no-deps "gguf>=0.10" -d .device/
rm -f .device/smollm2.part-a
if [ "${SMOLLM2:-0}" = 1 ]; then
  f=.kindling/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
  mkdir -p .device-b
  head -c 44000000 "$f" > .device/smollm2.part-a
  tail -c +44000001 "$f" > .device-b/smollm2.part-b
fi
ls -la target/cuda/release/kindling .device/* .device-b/* 2>/dev/null
du -sh .device .device-b 2>/dev/null
