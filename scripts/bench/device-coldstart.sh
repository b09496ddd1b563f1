#!/usr/bin/env bash
# Runs on the lent GPU machine (no Rust there): unpacks the CUDA kindling binary carried in
# .device/, makes random-weight models of real shapes with transformers, and runs
# `kindling bench coldstart` against the fresh-process baselines. Results land in $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
BIN=/tmp/kindling
xz -dc .device/kindling.xz > "$BIN" && chmod +x "$BIN"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# Smoke: the warm worker boots and serves a tiny model end to end.
"$BIN" models make-tiny /tmp/models/tiny >/dev/null
"$BIN" bench coldstart --device cuda --model tiny=/tmp/models/tiny --runs 1 --skip-fresh 2>&1 | tail -4
python3 scripts/bench/make_models.py /tmp/models ${MODELS:-qwen2-0.5b llama3-8b}
args=()
for m in ${MODELS:-qwen2-0.5b llama3-8b}; do args+=(--model "$m=/tmp/models/$m"); done
"$BIN" bench coldstart --device cuda "${args[@]}" --runs "${RUNS:-3}" --hf-python python3 \
  --out "$OUT/coldstart.json" 2>&1 | tee "$OUT/coldstart.log"
