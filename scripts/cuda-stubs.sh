#!/usr/bin/env bash
# Link-time stand-ins for the CUDA libraries candle links against (it uses cudarc's
# dynamic-linking), for building on a machine with no GPU driver or cuBLAS: each stub has the real
# library's SONAME and a dummy for every symbol the objects reference, so the binary records the
# right NEEDED entries and binds to the real libraries on the GPU machine at run time.
# usage: cuda-stubs.sh TARGET_DIR STUB_DIR
set -euo pipefail
target=$1 out=$2
mkdir -p "$out"
syms=$(for f in "$target"/deps/libcudarc-*.rlib "$target"/build/candle-kernels-*/out/libmoe.a; do nm -u "$f" 2>/dev/null; done \
  | awk '{print $2}' | grep -E '^(cu|nvrtc|cublas|curand|nccl)' | sort -u)
stub() { # soname link-name regex
  local c="$out/$2.c"
  grep -E "$3" <<<"$syms" | sed 's/.*/void &(void) {}/' > "$c" || true
  gcc -shared -fPIC -Wl,-soname,"$1" -o "$out/$2.so" "$c"
}
stub libcuda.so.1 libcuda '^cu[A-Z]'
stub libcublas.so.13 libcublas '^cublas[^L]|^cublasL[^t]'
stub libcublasLt.so.13 libcublasLt '^cublasLt'
stub libcurand.so.10 libcurand '^curand'
stub libnvrtc.so.13 libnvrtc '^nvrtc'
stub libnccl.so.2 libnccl '^nccl'
# The runtime is on PyPI with the compiler: link the real one (nvcc's objects need its internals).
ln -sf "${CUDA_ROOT:?}/lib/libcudart.so.13" "$out/libcudart.so"
ls "$out"/*.so >&2
