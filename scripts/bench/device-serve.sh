#!/usr/bin/env bash
# Runs on the lent GPU machine: the warm-path benchmark (`kindling bench serve`) for random-weight
# models of real shapes, each against HF transformers `generate` in the same run. Needs the CUDA
# binary and the OpenAI plugin carried in .device/ (scripts/pack-device.sh). Results land in $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
BIN=/tmp/kindling
[ -x "$BIN" ] || { xz -dc .device/kindling.xz > "$BIN" && chmod +x "$BIN"; }
for g in .device/*.wasm.xz; do xz -dc "$g" > ".device/$(basename "$g" .xz)"; done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# Smoke: the CUDA engine serves a tiny model through the whole stack before the long runs.
"$BIN" models make-tiny /tmp/models/tiny >/dev/null
"$BIN" bench serve --device cuda --model tiny=/tmp/models/tiny --plugin .device/openai-python.wasm \
  --concurrency 1,8 --prompt-tokens 8-64 --output-tokens 16 2>"$OUT/smoke.log" | grep -E '"(output_tok_s|errors)"' | head -4 \
  || { grep -v " INFO " "$OUT/smoke.log" | tail -20; exit 1; }
python3 scripts/bench/make_models.py /tmp/models ${MODELS:-qwen2-0.5b llama3-8b} 2>&1 | tail -2
run() { # NAME CONCURRENCY
  "$BIN" bench serve --device cuda --model "$1=/tmp/models/$1" --plugin .device/openai-python.wasm \
    --concurrency "$2" --prompt-tokens 128-512 --output-tokens "${OUTPUT_TOKENS:-256}" --hf-python python3 \
    --serve-args "${SERVE_ARGS:---kv-cache-gib 24 --max-step-tokens 4096}" --out "$OUT/serve-$1.json" 2>"$OUT/serve-$1.log" | tail -3 || {
      echo "bench serve $1 failed; log tail:"; grep -v " INFO " "$OUT/serve-$1.log" | tail -20; }
}
for spec in ${RUNS:-qwen2-0.5b:1 llama3-8b:1,64,256}; do run "${spec%%:*}" "${spec#*:}"; done
