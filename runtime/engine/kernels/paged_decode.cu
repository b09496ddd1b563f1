// Paged decode attention: one new query token per sequence attends to that sequence's keys and
// values where they lie in the paged cache, through its block table. No gather, no copy.
//
// Grid: (sequences, kv_heads). Block: WARPS warps. Each block serves the G query heads that share
// one K/V head; each warp walks every WARPS-th key, keeping an online softmax (running max, sum
// and weighted V) per query head; the warps' partial results are merged in shared memory.
// Each lane owns DPL = head_dim / 32 dimensions.
//
// Inputs: q [seqs, heads, head_dim]; k_cache, v_cache [kv_heads, slots, head_dim];
// meta [seqs, meta_stride] u32 = (first visible key, keys, block table...).
// Output: out [seqs, heads, head_dim].

#include <cuda_bf16.h>
#include <stdint.h>

#define BLOCK_SIZE 16
#define WARPS 4

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void store(float *p, float x) { *p = x; }
__device__ __forceinline__ void store(__nv_bfloat16 *p, float x) { *p = __float2bfloat16(x); }

template <typename T, int G, int DPL>
__device__ void paged_decode(const T *q, const T *kc, const T *vc, const uint32_t *meta, T *out, int heads,
                             int kv_heads, int slots, int meta_stride, float scale) {
  const int hd = DPL * 32;
  const int b = blockIdx.x, h = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t *m = meta + (size_t)b * meta_stride;
  const uint32_t first = m[0], keys = m[1];
  const uint32_t *table = m + 2;

  float qv[G][DPL], acc[G][DPL], mx[G], sum[G];
#pragma unroll
  for (int g = 0; g < G; g++) {
    mx[g] = -INFINITY;
    sum[g] = 0.f;
#pragma unroll
    for (int i = 0; i < DPL; i++) {
      qv[g][i] = to_f(q[((size_t)b * heads + h * G + g) * hd + lane + 32 * i]) * scale;
      acc[g][i] = 0.f;
    }
  }
  for (uint32_t p = first + warp; p < first + keys; p += WARPS) {
    const size_t slot = (size_t)table[p / BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE;
    const T *kp = kc + ((size_t)h * slots + slot) * hd;
    const T *vp = vc + ((size_t)h * slots + slot) * hd;
    float kv[DPL], vv[DPL];
#pragma unroll
    for (int i = 0; i < DPL; i++) {
      kv[i] = to_f(kp[lane + 32 * i]);
      vv[i] = to_f(vp[lane + 32 * i]);
    }
#pragma unroll
    for (int g = 0; g < G; g++) {
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < DPL; i++) dot += qv[g][i] * kv[i];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffff, dot, o);
      const float nm = fmaxf(mx[g], dot);
      const float corr = __expf(mx[g] - nm), w = __expf(dot - nm);
      sum[g] = sum[g] * corr + w;
#pragma unroll
      for (int i = 0; i < DPL; i++) acc[g][i] = acc[g][i] * corr + w * vv[i];
      mx[g] = nm;
    }
  }
  // Merge the warps: shared [WARPS][G] max and sum, [WARPS][G][hd] weighted values.
  __shared__ float s_mx[WARPS][G], s_sum[WARPS][G], s_acc[WARPS][G][DPL * 32];
#pragma unroll
  for (int g = 0; g < G; g++) {
    if (lane == 0) {
      s_mx[warp][g] = mx[g];
      s_sum[warp][g] = sum[g];
    }
#pragma unroll
    for (int i = 0; i < DPL; i++) s_acc[warp][g][lane + 32 * i] = acc[g][i];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < G * hd; idx += blockDim.x) {
    const int g = idx / hd, d = idx % hd;
    float M = -INFINITY;
    for (int w = 0; w < WARPS; w++) M = fmaxf(M, s_mx[w][g]);
    float S = 0.f, V = 0.f;
    for (int w = 0; w < WARPS; w++) {
      if (s_mx[w][g] == -INFINITY) continue;  // a warp that saw no key
      const float c = __expf(s_mx[w][g] - M);
      S += s_sum[w][g] * c;
      V += s_acc[w][g][d] * c;
    }
    store(&out[((size_t)b * heads + h * G + g) * hd + d], S > 0.f ? V / S : 0.f);
  }
}

#define KERNEL(TYPE, NAME, G, DPL)                                                                         \
  extern "C" __global__ void paged_decode_##NAME##_g##G##_d##DPL(                                          \
      const TYPE *q, const TYPE *kc, const TYPE *vc, const uint32_t *meta, TYPE *out, int heads, int kv_heads, \
      int slots, int meta_stride, float scale) {                                                          \
    paged_decode<TYPE, G, DPL>(q, kc, vc, meta, out, heads, kv_heads, slots, meta_stride, scale);          \
  }

#define KERNELS_FOR(G)                \
  KERNEL(__nv_bfloat16, bf16, G, 2)   \
  KERNEL(__nv_bfloat16, bf16, G, 4)   \
  KERNEL(float, f32, G, 2)            \
  KERNEL(float, f32, G, 4)

KERNELS_FOR(1)
KERNELS_FOR(2)
KERNELS_FOR(3)
KERNELS_FOR(4)
KERNELS_FOR(5)
KERNELS_FOR(6)
KERNELS_FOR(7)
KERNELS_FOR(8)
