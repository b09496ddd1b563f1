// Paged decode attention: one new query token per sequence attends to that sequence's keys and
// values where they lie in the paged cache, through its block table. No gather, no copy.
//
// Grid: (sequences, kv_heads, parts). Block: WARPS warps. Each block serves the G query heads that
// share one K/V head, over one part of the sequence's keys (split so that a step of few sequences
// still fills the GPU: a warp's walk over its keys is a chain of dependent loads, so one block per
// head would take ~100 us per layer for a few hundred keys); each warp walks every WARPS-th key of
// the part, keeping an online softmax (running max, sum and weighted V) per query head, and the
// warps' results are merged in shared memory. A warp takes KEYS keys at a time, loading all of
// their K and V before using any, so each warp has that many rows' loads in flight instead of a
// chain of one key's load, dot and softmax after another. With one part the block writes the output; with
// several it writes its unnormalised (max, sum, weighted V) and `paged_decode_combine` merges the
// parts. Each lane owns DPL = head_dim / 32 consecutive dimensions (one vector load per row).
//
// Inputs: q [seqs, heads, head_dim]; k_cache, v_cache [kv_heads, slots, head_dim];
// meta [seqs, meta_stride] u32 = (first visible key, keys, block table...).
// Output: out [seqs, heads, head_dim].

#include <cuda_bf16.h>
#include <stdint.h>

#define BLOCK_SIZE 16
#define WARPS 4
#define KEYS 4

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void store(float *p, float x) { *p = x; }
__device__ __forceinline__ void store(__nv_bfloat16 *p, float x) { *p = __float2bfloat16(x); }

// DPL consecutive elements of T, loaded with one vector instruction (rows are aligned to it).
template <typename T, int DPL>
struct __align__(sizeof(T) * DPL) Lanes {
  T v[DPL];
};

template <typename T, int DPL>
__device__ __forceinline__ void load_lanes(const T *p, float *out) {
  const Lanes<T, DPL> x = *reinterpret_cast<const Lanes<T, DPL> *>(p);
#pragma unroll
  for (int i = 0; i < DPL; i++) out[i] = to_f(x.v[i]);
}

// This block's share of its sequence's visible keys, [first, end): an even share per part (some
// parts may get none). meta row: (first visible key, keys, block table...).
__device__ __forceinline__ void part_keys(const uint32_t *m, uint32_t *first, uint32_t *end) {
  const uint32_t part = blockIdx.z, parts = gridDim.z;
  const uint32_t span = (m[1] + parts - 1) / parts;
  *first = m[0] + min(m[1], span * part);
  *end = m[0] + min(m[1], span * (part + 1));
}

// A lane's N dimensions of each of the G query heads (pre-scaled), and an empty online softmax.
template <typename T, int G, int N>
__device__ __forceinline__ void start_heads(const T *q_row, int hd, float scale, float (&qv)[G][N],
                                            float (&acc)[G][N], float (&mx)[G], float (&sum)[G]) {
#pragma unroll
  for (int g = 0; g < G; g++) {
    mx[g] = -INFINITY;
    sum[g] = 0.f;
    load_lanes<T, N>(q_row + (size_t)g * hd, qv[g]);
#pragma unroll
    for (int i = 0; i < N; i++) {
      qv[g][i] *= scale;
      acc[g][i] = 0.f;
    }
  }
}

// Merges the warps' online-softmax states, left in shared memory as max and sum [WARPS][G] and
// weighted values [WARPS][G][hd], and writes the block's result: the output when the keys are
// not split, else this part's unnormalised state for paged_decode_combine.
template <typename T, int G>
__device__ void merge_warps(const float *s_mx, const float *s_sum, const float *s_acc, int hd, T *out,
                            float *part_ms, float *part_acc, int b, int h, int heads) {
  const int part = blockIdx.z, parts = gridDim.z;
  for (int idx = threadIdx.x; idx < G * hd; idx += blockDim.x) {
    const int g = idx / hd, d = idx % hd;
    float M = -INFINITY;
    for (int w = 0; w < WARPS; w++) M = fmaxf(M, s_mx[w * G + g]);
    float S = 0.f, V = 0.f;
    for (int w = 0; w < WARPS; w++) {
      if (s_mx[w * G + g] == -INFINITY) continue;  // a warp that saw no key
      const float c = __expf(s_mx[w * G + g] - M);
      S += s_sum[w * G + g] * c;
      V += s_acc[(w * G + g) * hd + d] * c;
    }
    const size_t row = (size_t)b * heads + h * G + g;
    if (parts == 1) {
      store(&out[row * hd + d], S > 0.f ? V / S : 0.f);
    } else {
      if (d == 0) {
        part_ms[(row * parts + part) * 2] = M;
        part_ms[(row * parts + part) * 2 + 1] = S;
      }
      part_acc[(row * parts + part) * hd + d] = V;
    }
  }
}

template <typename T, int G, int DPL>
__device__ void paged_decode(const T *q, const T *kc, const T *vc, const uint32_t *meta, T *out, float *part_ms,
                             float *part_acc, int heads, int kv_heads, int slots, int meta_stride, float scale) {
  const int hd = DPL * 32;
  const int b = blockIdx.x, h = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t *m = meta + (size_t)b * meta_stride;
  const uint32_t *table = m + 2;
  uint32_t first, end;
  part_keys(m, &first, &end);

  float qv[G][DPL], acc[G][DPL], mx[G], sum[G];
  start_heads<T, G, DPL>(q + ((size_t)b * heads + h * G) * hd + lane * DPL, hd, scale, qv, acc, mx, sum);
  for (uint32_t p0 = first + warp * KEYS; p0 < end; p0 += WARPS * KEYS) {
    float kv[KEYS][DPL], vv[KEYS][DPL];
#pragma unroll
    for (int j = 0; j < KEYS; j++) {
      const uint32_t p = p0 + j;
      if (p < end) {
        const size_t slot = (size_t)table[p / BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE;
        const size_t at = ((size_t)h * slots + slot) * hd + lane * DPL;
        load_lanes<T, DPL>(kc + at, kv[j]);
        load_lanes<T, DPL>(vc + at, vv[j]);
      } else {
#pragma unroll
        for (int i = 0; i < DPL; i++) kv[j][i] = vv[j][i] = 0.f;
      }
    }
#pragma unroll
    for (int g = 0; g < G; g++) {
      float dot[KEYS];
#pragma unroll
      for (int j = 0; j < KEYS; j++) {
        dot[j] = 0.f;
#pragma unroll
        for (int i = 0; i < DPL; i++) dot[j] += qv[g][i] * kv[j][i];
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
        for (int j = 0; j < KEYS; j++) dot[j] += __shfl_xor_sync(0xffffffff, dot[j], o);
      }
      float nm = mx[g];
#pragma unroll
      for (int j = 0; j < KEYS; j++)
        if (p0 + j < end) nm = fmaxf(nm, dot[j]);
      const float corr = __expf(mx[g] - nm);
      sum[g] *= corr;
#pragma unroll
      for (int i = 0; i < DPL; i++) acc[g][i] *= corr;
#pragma unroll
      for (int j = 0; j < KEYS; j++) {
        if (p0 + j >= end) continue;
        const float w = __expf(dot[j] - nm);
        sum[g] += w;
#pragma unroll
        for (int i = 0; i < DPL; i++) acc[g][i] += w * vv[j][i];
      }
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
    for (int i = 0; i < DPL; i++) s_acc[warp][g][lane * DPL + i] = acc[g][i];
  }
  __syncthreads();
  merge_warps<T, G>(&s_mx[0][0], &s_sum[0][0], &s_acc[0][0][0], hd, out, part_ms, part_acc, b, h, heads);
}

// The same attention with 16 lanes per key instead of 32 (KINDLING_PAGED_LANES=16): each half of
// a warp takes its own key, so a step of a warp covers two keys, and a key's dot product is
// summed over 16 lanes in 4 shuffles (every query head's sums for both keys in the same
// instructions) instead of 5 per key. Each half keeps its own online softmax; the halves are
// merged before the warps are. D = head_dim / 16 dimensions per lane.
template <typename T, int G, int D>
__device__ void paged_decode_l16(const T *q, const T *kc, const T *vc, const uint32_t *meta, T *out, float *part_ms,
                                 float *part_acc, int heads, int kv_heads, int slots, int meta_stride, float scale) {
  const int hd = D * 16;
  const int b = blockIdx.x, h = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, half = lane / 16, hl = lane % 16;
  const uint32_t *m = meta + (size_t)b * meta_stride;
  const uint32_t *table = m + 2;
  uint32_t first, end;
  part_keys(m, &first, &end);

  float qv[G][D], acc[G][D], mx[G], sum[G];
  start_heads<T, G, D>(q + ((size_t)b * heads + h * G) * hd + hl * D, hd, scale, qv, acc, mx, sum);
  for (uint32_t p0 = first + warp * 2; p0 < end; p0 += WARPS * 2) {
    const uint32_t p = p0 + half;
    const bool valid = p < end;
    float kv[D], vv[D];
    if (valid) {
      const size_t slot = (size_t)table[p / BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE;
      const size_t at = ((size_t)h * slots + slot) * hd + hl * D;
      load_lanes<T, D>(kc + at, kv);
      load_lanes<T, D>(vc + at, vv);
    } else {
#pragma unroll
      for (int i = 0; i < D; i++) kv[i] = vv[i] = 0.f;
    }
#pragma unroll
    for (int g = 0; g < G; g++) {
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < D; i++) dot += qv[g][i] * kv[i];
      // Within each half only (xor 8, 4, 2, 1 never crosses lane 16); every lane takes part.
#pragma unroll
      for (int o = 8; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffff, dot, o);
      if (valid) {
        const float nm = fmaxf(mx[g], dot);
        const float corr = __expf(mx[g] - nm), w = __expf(dot - nm);
        sum[g] = sum[g] * corr + w;
#pragma unroll
        for (int i = 0; i < D; i++) acc[g][i] = acc[g][i] * corr + w * vv[i];
        mx[g] = nm;
      }
    }
  }
  // Merge the two halves: lane l and lane l ^ 16 hold the same dimensions of different keys.
#pragma unroll
  for (int g = 0; g < G; g++) {
    const float om = __shfl_xor_sync(0xffffffff, mx[g], 16), os = __shfl_xor_sync(0xffffffff, sum[g], 16);
    const float M = fmaxf(mx[g], om);
    const float c1 = mx[g] == -INFINITY ? 0.f : __expf(mx[g] - M), c2 = om == -INFINITY ? 0.f : __expf(om - M);
    sum[g] = sum[g] * c1 + os * c2;
#pragma unroll
    for (int i = 0; i < D; i++) {
      const float oa = __shfl_xor_sync(0xffffffff, acc[g][i], 16);
      acc[g][i] = acc[g][i] * c1 + oa * c2;
    }
    mx[g] = M;
  }
  __shared__ float s_mx[WARPS][G], s_sum[WARPS][G], s_acc[WARPS][G][D * 16];
#pragma unroll
  for (int g = 0; g < G; g++) {
    if (lane == 0) {
      s_mx[warp][g] = mx[g];
      s_sum[warp][g] = sum[g];
    }
    if (half == 0) {
#pragma unroll
      for (int i = 0; i < D; i++) s_acc[warp][g][hl * D + i] = acc[g][i];
    }
  }
  __syncthreads();
  merge_warps<T, G>(&s_mx[0][0], &s_sum[0][0], &s_acc[0][0][0], hd, out, part_ms, part_acc, b, h, heads);
}

// Merges the parts of each (sequence, query head): grid (sequences * heads), block head_dim.
template <typename T>
__device__ void paged_decode_combine(const float *part_ms, const float *part_acc, T *out, int parts, int hd) {
  const size_t row = blockIdx.x;
  const int d = threadIdx.x;
  float M = -INFINITY;
  for (int p = 0; p < parts; p++) M = fmaxf(M, part_ms[(row * parts + p) * 2]);
  float S = 0.f, V = 0.f;
  for (int p = 0; p < parts; p++) {
    const float mp = part_ms[(row * parts + p) * 2];
    if (mp == -INFINITY) continue;  // a part that saw no key
    const float c = __expf(mp - M);
    S += part_ms[(row * parts + p) * 2 + 1] * c;
    V += part_acc[(row * parts + p) * hd + d] * c;
  }
  store(&out[row * hd + d], S > 0.f ? V / S : 0.f);
}

extern "C" __global__ void paged_decode_combine_bf16(const float *part_ms, const float *part_acc, __nv_bfloat16 *out,
                                                     int parts, int hd) {
  paged_decode_combine(part_ms, part_acc, out, parts, hd);
}

extern "C" __global__ void paged_decode_combine_f32(const float *part_ms, const float *part_acc, float *out, int parts,
                                                    int hd) {
  paged_decode_combine(part_ms, part_acc, out, parts, hd);
}

#define KERNEL(TYPE, NAME, G, DPL)                                                                         \
  extern "C" __global__ void paged_decode_##NAME##_g##G##_d##DPL(                                          \
      const TYPE *q, const TYPE *kc, const TYPE *vc, const uint32_t *meta, TYPE *out, float *part_ms,           \
      float *part_acc, int heads, int kv_heads, int slots, int meta_stride, float scale) {                    \
    paged_decode<TYPE, G, DPL>(q, kc, vc, meta, out, part_ms, part_acc, heads, kv_heads, slots, meta_stride, scale); \
  }

// The 16-lanes-per-key variant, named by the same DPL (head_dim / 32) as the kernel above.
#define KERNEL_L16(TYPE, NAME, G, DPL)                                                                        \
  extern "C" __global__ void paged_decode_l16_##NAME##_g##G##_d##DPL(                                      \
      const TYPE *q, const TYPE *kc, const TYPE *vc, const uint32_t *meta, TYPE *out, float *part_ms,           \
      float *part_acc, int heads, int kv_heads, int slots, int meta_stride, float scale) {                    \
    paged_decode_l16<TYPE, G, 2 * DPL>(q, kc, vc, meta, out, part_ms, part_acc, heads, kv_heads, slots, meta_stride, \
                                       scale);                                                               \
  }

#define KERNELS_FOR(G)                  \
  KERNEL(__nv_bfloat16, bf16, G, 2)     \
  KERNEL(__nv_bfloat16, bf16, G, 4)     \
  KERNEL(float, f32, G, 2)              \
  KERNEL(float, f32, G, 4)              \
  KERNEL_L16(__nv_bfloat16, bf16, G, 2) \
  KERNEL_L16(__nv_bfloat16, bf16, G, 4) \
  KERNEL_L16(float, f32, G, 2)          \
  KERNEL_L16(float, f32, G, 4)

KERNELS_FOR(1)
KERNELS_FOR(2)
KERNELS_FOR(3)
KERNELS_FOR(4)
KERNELS_FOR(5)
KERNELS_FOR(6)
KERNELS_FOR(7)
KERNELS_FOR(8)
