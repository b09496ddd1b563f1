// Paged attention: each query token attends to its sequence's keys and values where they lie in
// the paged cache, through the sequence's block table. No gather, no copy. A row is one query
// token: a decode token, or one token of a prefill chunk (which sees its sequence's keys up to its
// own position, the chunk's already written), so a whole step attends in one launch.
//
// Grid: (rows, kv_heads, parts). Block: WARPS warps. Each block serves the G query heads that
// share one K/V head, over one part of the sequence's keys (split so that a step of few sequences
// still fills the GPU); its warps take the part's keys in turn, each keeping an online softmax
// (running max, sum and weighted V) per query head, and the warps' results are merged in shared
// memory. With one part the block writes the output; with several it writes its unnormalised
// (max, sum, weighted V) and `paged_attention_combine` merges the parts.
//
// Each lane scores a whole key against the queries (held in shared memory, read as broadcasts)
// with 16-byte loads and no shuffles; the warp then takes the online softmax of its 32 keys (one
// max per query head), and for the weighted values each lane owns DPL = head_dim / 32
// dimensions of V_KEYS keys' rows at a time, their weights read back from shared memory. (A
// kernel that spread each key over a warp spent ~5 shuffles per key and query head summing its
// dot products, about as many cycles as the key's bytes take to arrive, and read K/V at a third
// of the bandwidth at 64 sequences.) Softmax sums stay per lane until the end.
//
// Inputs: q [rows, heads, head_dim]; k_cache, v_cache [kv_heads, slots, head_dim]; meta u32:
// [rows, 3] (first visible key, keys, table index), then the block tables [tables, table_width].
// Output: out [rows, heads, head_dim].

#include <cuda_bf16.h>
#include <stdint.h>

#define BLOCK_SIZE 16
#define WARPS 4

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

// This block's share of its row's visible keys, [first, end): an even share per part (some parts
// may get none). meta row: (first visible key, keys, table index).
__device__ __forceinline__ void part_keys(const uint32_t *m, uint32_t *first, uint32_t *end) {
  const uint32_t part = blockIdx.z, parts = gridDim.z;
  const uint32_t span = (m[1] + parts - 1) / parts;
  *first = m[0] + min(m[1], span * part);
  *end = m[0] + min(m[1], span * (part + 1));
}

// Merges the warps' online-softmax states, left in shared memory as max and sum [WARPS][G] and
// weighted values [WARPS][G][hd], and writes the block's result: the output when the keys are
// not split, else this part's unnormalised state for paged_attention_combine.
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

// 16 bytes of a cache row as floats: 8 bf16 or 4 f32.
template <typename T>
struct Pack;
template <>
struct Pack<__nv_bfloat16> {
  static constexpr int N = 8;
  static __device__ __forceinline__ void unpack(const uint4 &u, float *f) {
    const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&u);
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const float2 x = __bfloat1622float2(h[i]);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
};
template <>
struct Pack<float> {
  static constexpr int N = 4;
  static __device__ __forceinline__ void unpack(const uint4 &u, float *f) {
    f[0] = __uint_as_float(u.x);
    f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z);
    f[3] = __uint_as_float(u.w);
  }
};

// Keys a warp takes at once: one per lane while scoring.
#define CHUNK 32
// Keys whose values a warp loads before using any.
#define V_KEYS 8

template <typename T, int G, int DPL>
__device__ void paged_attention(const T *q, const T *kc, const T *vc, const uint32_t *meta, T *out, float *part_ms,
                                 float *part_acc, int heads, int kv_heads, int slots, int table_width, float scale) {
  constexpr int HD = DPL * 32, E = Pack<T>::N, LOADS = HD / E, BATCH = LOADS < 8 ? LOADS : 8;
  const int b = blockIdx.x, h = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t *m = meta + (size_t)b * 3;
  const uint32_t *table = meta + (size_t)gridDim.x * 3 + (size_t)m[2] * table_width;
  uint32_t first, end;
  part_keys(m, &first, &end);

  __shared__ __align__(16) float s_q[G][HD];
  __shared__ float s_w[WARPS][CHUNK][G];
  const T *q_rows = q + ((size_t)b * heads + h * G) * HD;
  for (int i = threadIdx.x; i < G * HD; i += blockDim.x) s_q[i / HD][i % HD] = to_f(q_rows[i]) * scale;
  __syncthreads();

  float acc[G][DPL], mx[G], lsum[G];
#pragma unroll
  for (int g = 0; g < G; g++) {
    mx[g] = -INFINITY;
    lsum[g] = 0.f;
#pragma unroll
    for (int i = 0; i < DPL; i++) acc[g][i] = 0.f;
  }
  const T *k_head = kc + (size_t)h * slots * HD, *v_head = vc + (size_t)h * slots * HD;
  for (uint32_t c0 = first + warp * CHUNK; c0 < end; c0 += WARPS * CHUNK) {
    const uint32_t p = c0 + lane;
    const bool valid = p < end;
    const uint32_t slot = valid ? table[p / BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE : 0;
    float dot[G];
#pragma unroll
    for (int g = 0; g < G; g++) dot[g] = 0.f;
    if (valid) {
      const uint4 *row = reinterpret_cast<const uint4 *>(k_head + (size_t)slot * HD);
#pragma unroll
      for (int c = 0; c < LOADS; c += BATCH) {
        uint4 raw[BATCH];
#pragma unroll
        for (int j = 0; j < BATCH; j++) raw[j] = row[c + j];
#pragma unroll
        for (int j = 0; j < BATCH; j++) {
          float k[E];
          Pack<T>::unpack(raw[j], k);
#pragma unroll
          for (int g = 0; g < G; g++) {
            const float4 *qq = reinterpret_cast<const float4 *>(&s_q[g][(c + j) * E]);
#pragma unroll
            for (int e = 0; e < E / 4; e++) {
              const float4 x = qq[e];
              dot[g] += x.x * k[4 * e] + x.y * k[4 * e + 1] + x.z * k[4 * e + 2] + x.w * k[4 * e + 3];
            }
          }
        }
      }
    }
    // The chunk's online softmax: lane 0's key is always visible, so each new max is finite.
#pragma unroll
    for (int g = 0; g < G; g++) {
      float cm = valid ? dot[g] : -INFINITY;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) cm = fmaxf(cm, __shfl_xor_sync(0xffffffff, cm, o));
      const float nm = fmaxf(mx[g], cm);
      const float corr = __expf(mx[g] - nm);
      const float w = valid ? __expf(dot[g] - nm) : 0.f;
      lsum[g] = lsum[g] * corr + w;
#pragma unroll
      for (int i = 0; i < DPL; i++) acc[g][i] *= corr;
      s_w[warp][lane][g] = w;
      mx[g] = nm;
    }
    __syncwarp();
    const uint32_t n = min(end - c0, (uint32_t)CHUNK);
    for (uint32_t k0 = 0; k0 < n; k0 += V_KEYS) {
      float vv[V_KEYS][DPL];
#pragma unroll
      for (int j = 0; j < V_KEYS; j++) {
        const uint32_t s = __shfl_sync(0xffffffff, slot, k0 + j);
        if (k0 + j < n) {
          load_lanes<T, DPL>(v_head + (size_t)s * HD + lane * DPL, vv[j]);
        } else {
#pragma unroll
          for (int i = 0; i < DPL; i++) vv[j][i] = 0.f;
        }
      }
#pragma unroll
      for (int j = 0; j < V_KEYS; j++) {
#pragma unroll
        for (int g = 0; g < G; g++) {
          const float w = s_w[warp][k0 + j][g];  // 0 past the chunk's last key
#pragma unroll
          for (int i = 0; i < DPL; i++) acc[g][i] += w * vv[j][i];
        }
      }
    }
    __syncwarp();
  }
  __shared__ float s_mx[WARPS][G], s_sum[WARPS][G], s_acc[WARPS][G][HD];
#pragma unroll
  for (int g = 0; g < G; g++) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) lsum[g] += __shfl_xor_sync(0xffffffff, lsum[g], o);
    if (lane == 0) {
      s_mx[warp][g] = mx[g];
      s_sum[warp][g] = lsum[g];
    }
#pragma unroll
    for (int i = 0; i < DPL; i++) s_acc[warp][g][lane * DPL + i] = acc[g][i];
  }
  __syncthreads();
  merge_warps<T, G>(&s_mx[0][0], &s_sum[0][0], &s_acc[0][0][0], HD, out, part_ms, part_acc, b, h, heads);
}

// Merges the parts of each (sequence, query head): grid (sequences * heads), block head_dim.
template <typename T>
__device__ void paged_attention_combine(const float *part_ms, const float *part_acc, T *out, int parts, int hd) {
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

extern "C" __global__ void paged_attention_combine_bf16(const float *part_ms, const float *part_acc, __nv_bfloat16 *out,
                                                     int parts, int hd) {
  paged_attention_combine(part_ms, part_acc, out, parts, hd);
}

extern "C" __global__ void paged_attention_combine_f32(const float *part_ms, const float *part_acc, float *out, int parts,
                                                    int hd) {
  paged_attention_combine(part_ms, part_acc, out, parts, hd);
}

// Named by G (query heads per K/V head) and DPL (head_dim / 32).
#define KERNEL(TYPE, NAME, G, DPL)                                                                        \
  extern "C" __global__ void paged_attention_##NAME##_g##G##_d##DPL(                                          \
      const TYPE *q, const TYPE *kc, const TYPE *vc, const uint32_t *meta, TYPE *out, float *part_ms,           \
      float *part_acc, int heads, int kv_heads, int slots, int table_width, float scale) {                    \
    paged_attention<TYPE, G, DPL>(q, kc, vc, meta, out, part_ms, part_acc, heads, kv_heads, slots, table_width,  \
                                   scale);                                                                    \
  }

#define KERNELS_FOR(G)              \
  KERNEL(__nv_bfloat16, bf16, G, 2) \
  KERNEL(__nv_bfloat16, bf16, G, 4) \
  KERNEL(float, f32, G, 2)          \
  KERNEL(float, f32, G, 4)

KERNELS_FOR(1)
KERNELS_FOR(2)
KERNELS_FOR(3)
KERNELS_FOR(4)
KERNELS_FOR(5)
KERNELS_FOR(6)
KERNELS_FOR(7)
KERNELS_FOR(8)
