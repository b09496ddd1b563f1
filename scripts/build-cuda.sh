#!/usr/bin/env bash
# Builds the CUDA kindling binary on a machine without a GPU: nvcc comes from PyPI (the CUDA 13.0
# wheels, matching the lent H100's driver), kernels are compiled for sm_90 (Hopper). Output:
# target/cuda/release/kindling, stripped; scripts/pack-device.sh packs it for the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA_PIP=${CUDA_PIP:-/opt/cuda-pip}
if [ ! -x "$CUDA_PIP/nvidia/cu13/bin/nvcc" ]; then
  python3 -m pip install --quiet --target "$CUDA_PIP" nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
fi
export PATH="$CUDA_PIP/nvidia/cu13/bin:$PATH"
export CUDA_ROOT="$CUDA_PIP/nvidia/cu13" CUDA_PATH="$CUDA_PIP/nvidia/cu13" CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
# candle links the CUDA libraries (cudarc's dynamic-linking); this machine has none, so link
# against stubs with the real SONAMEs (scripts/cuda-stubs.sh) and bind to the real ones there.
# One cargo invocation, run twice: the first compiles everything and fails only at the final link
# (no stubs yet), the stubs are made from the compiled objects, the second just links. The same
# command and environment both times keep every crate's fingerprint, so nothing compiles twice.
# FEATURES=cuda builds without NCCL (no tensor parallelism over GPUs; no libnccl needed at run time).
build() { LIBRARY_PATH="$PWD/target/cuda/stubs" cargo build --locked --release -p kindling --features "${FEATURES:-cuda,nccl}" --target-dir target/cuda; }
mkdir -p target/cuda/stubs
if [ ! -f target/cuda/stubs/libcuda.so ]; then
  build 2>/dev/null || true
  scripts/cuda-stubs.sh target/cuda/release target/cuda/stubs
fi
build
ls -la target/cuda/release/kindling
