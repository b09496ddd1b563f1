# Sourced by the device-*.sh scripts on the lent GPU machine: results dir, CUDA libraries, the
# carried binary unpacked to $BIN (always afresh: a warm machine may hold an older one) and the
# OpenAI plugin to /tmp/openai-python.wasm when it was carried.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
# NVLink multicast stays off on the lent machines (it can take the host's shared GPUs down).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# NCCL (tensor parallelism) comes with PyTorch's wheels.
NCCL_LIB=$(python3 -c 'import os, nvidia.nccl as n; print(os.path.join(list(n.__path__)[0], "lib"))' 2>/dev/null)
[ -n "$NCCL_LIB" ] && export LD_LIBRARY_PATH=$NCCL_LIB:$LD_LIBRARY_PATH
BIN=/tmp/kindling M=/tmp/models
mkdir -p "$M"
xz -dc .device/kindling.xz > "$BIN" && chmod +x "$BIN"
if [ -f .device/openai-python.wasm.xz ]; then xz -dc .device/openai-python.wasm.xz > /tmp/openai-python.wasm; fi
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# `kindling bench serve` of one model (LABEL NAME PATH EXTRA...): prompts 128-512, 256 out, at
# LEVELS streams (default 1,64); the JSON lands in $OUT, a summary on stdout, the log in /tmp.
bench_serve() {
  local label=$1 name=$2 path=$3; shift 3
  "$BIN" bench serve --device cuda --model "$name=$path" --plugin /tmp/openai-python.wasm --concurrency ${LEVELS:-1,64} \
    --prompt-tokens 128-512 --output-tokens 256 --serve-args "--kv-cache-gib 24 --max-step-tokens 4096" \
    --out "$OUT/serve-$name-$label.json" "$@" 2>"/tmp/serve-$name-$label.log" | tail -1 \
    || { echo "bench serve $name $label failed"; grep -v " INFO " "/tmp/serve-$name-$label.log" | tail -10; }
  python3 scripts/bench/serve_summary.py "$OUT/serve-$name-$label.json" "$label"
}
# For each model of SPECS (a make_models.py shape, made if missing, or NAME=PATH): bench_serve
# LABEL with the HF baseline, then OFF_LABEL with OFF_ENV (NAME=VALUE) set, in the same run.
bench_serve_pair() { # LABEL OFF_LABEL OFF_ENV SPECS...
  local label=$1 off_label=$2 off_env=$3 spec name path; shift 3
  for spec in "$@"; do
    name=${spec%%=*}; path=$M/$name; [ "$spec" = "$name" ] || path=${spec#*=}
    [ -e "$path" ] || python3 scripts/bench/make_models.py $M "$name" 2>&1 | tail -1
    [ -e "$path" ] || { echo "no model at $path"; continue; }
    bench_serve "$label" "$name" "$path" --hf-python python3 ${HF_MODEL:+--hf-model $HF_MODEL}
    (export "$off_env"; bench_serve "$off_label" "$name" "$path")
  done
}
