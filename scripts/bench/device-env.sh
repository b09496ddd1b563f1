# Sourced by the device-*.sh scripts on the lent GPU machine: results dir, CUDA libraries, the
# carried binary unpacked to $BIN (always afresh: a warm machine may hold an older one) and the
# OpenAI plugin to /tmp/openai-python.wasm when it was carried.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
BIN=/tmp/kindling M=/tmp/models
mkdir -p "$M"
xz -dc .device/kindling.xz > "$BIN" && chmod +x "$BIN"
if [ -f .device/openai-python.wasm.xz ]; then xz -dc .device/openai-python.wasm.xz > /tmp/openai-python.wasm; fi
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
