// Matmuls of a few rows (decode steps of 1-4 sequences): y[M, N] = x[M, K] * W[N, K]^T in bf16,
// summed in f32. Such a matmul only streams W, once, so its speed is the rate at which W's rows
// arrive: each warp takes one row of W (one output feature) and walks it with 16-byte loads,
// UNROLL of them in flight per lane, multiplying each chunk with the same chunk of every row of x
// (a few KiB, read through the cache), then sums across its lanes. Rows are 16-byte aligned
// (K % 8 == 0 and aligned starts, checked by the caller).

#include <cuda_bf16.h>
#include <stdint.h>

#define WARPS 8
#define UNROLL 4

__device__ __forceinline__ void unpack8(const uint4 &u, float *f) {
  const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&u);
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const float2 v = __bfloat1622float2(h[i]);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

// acc[m] += <W chunk, x[m] chunk> for one 16-byte chunk `c` of the row.
template <int M>
__device__ __forceinline__ void fma_chunk(const uint4 &wv, const uint4 *x, int chunks, int c, float (&acc)[M]) {
  float wf[8];
  unpack8(wv, wf);
#pragma unroll
  for (int m = 0; m < M; m++) {
    float xf[8];
    unpack8(__ldg(x + (size_t)m * chunks + c), xf);
#pragma unroll
    for (int e = 0; e < 8; e++) acc[m] += wf[e] * xf[e];
  }
}

template <int M>
__device__ void skinny_matmul(const __nv_bfloat16 *x, const __nv_bfloat16 *w, __nv_bfloat16 *y, int n_out, int k) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n = blockIdx.x * WARPS + warp;
  if (n >= n_out) return;
  const int chunks = k / 8;
  const uint4 *wr = reinterpret_cast<const uint4 *>(w + (size_t)n * k);
  const uint4 *xr = reinterpret_cast<const uint4 *>(x);
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; m++) acc[m] = 0.f;
  int c = lane;
  for (; c + 32 * (UNROLL - 1) < chunks; c += 32 * UNROLL) {
    uint4 wv[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; u++) wv[u] = __ldcs(wr + c + 32 * u);  // streamed: read once
#pragma unroll
    for (int u = 0; u < UNROLL; u++) fma_chunk<M>(wv[u], xr, chunks, c + 32 * u, acc);
  }
  for (; c < chunks; c += 32) fma_chunk<M>(__ldcs(wr + c), xr, chunks, c, acc);
#pragma unroll
  for (int m = 0; m < M; m++) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(0xffffffff, acc[m], o);
    if (lane == 0) y[(size_t)m * n_out + n] = __float2bfloat16(acc[m]);
  }
}

#define SKINNY(M)                                                                                              \
  extern "C" __global__ void skinny_matmul_bf16_m##M(const __nv_bfloat16 *x, const __nv_bfloat16 *w,         \
                                                     __nv_bfloat16 *y, int n_out, int k) {                     \
    skinny_matmul<M>(x, w, y, n_out, k);                                                                       \
  }

SKINNY(1)
SKINNY(2)
SKINNY(3)
SKINNY(4)
