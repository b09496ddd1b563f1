#!/usr/bin/env bash
# Packs the CUDA build for the GPU machine: .device/kindling.xz (git-ignored, carried by the device tool).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device
xz -T0 -6 -c target/cuda/release/kindling > .device/kindling.xz
ls -la target/cuda/release/kindling .device/kindling.xz
