#!/usr/bin/env bash
# Packs the CUDA build for the GPU machine: .device/kindling.xz (git-ignored, carried by the device tool).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device
xz -T0 -6 -c target/cuda/release/kindling > .device/kindling.xz
# Guests for `kindling bench serve` and `bench invoke` (the GPU machine cannot build guests).
for guest in openai-python ping-python ping-js; do
  if [ -f "target/guests/$guest.wasm" ]; then cp "target/guests/$guest.wasm" .device/; fi
done
ls -la target/cuda/release/kindling .device/*
