#!/usr/bin/env bash
# Packs the CUDA build for the GPU machine: .device/kindling.xz (git-ignored, carried by the device tool).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device
xz -T0 -6 -c target/cuda/release/kindling > .device/kindling.xz
# The OpenAI plugin for `kindling bench serve` (the GPU machine cannot build guests).
if [ -f target/guests/openai-python.wasm ]; then cp target/guests/openai-python.wasm .device/; fi
ls -la target/cuda/release/kindling .device/*
