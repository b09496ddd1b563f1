// Fused per-layer kernels for the decode-heavy steps, where a step is bound by kernel launches
// rather than by memory: each replaces several candle ops (and their intermediate tensors) with
// one launch. Every kernel rounds to the storage type exactly where the unfused ops do, so the
// results match the unfused path (checked at GPU boot; see network/fused.rs).

#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void store(float *p, float x) { *p = x; }
__device__ __forceinline__ void store(__nv_bfloat16 *p, float x) { *p = __float2bfloat16(x); }
// The value a T holds after x is stored in it.
__device__ __forceinline__ float round_to(float x, const float *) { return x; }
__device__ __forceinline__ float round_to(float x, const __nv_bfloat16 *) {
  return __bfloat162float(__float2bfloat16(x));
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024).
__device__ float block_sum(float v) {
  __shared__ float partial[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = (blockDim.x + 31) / 32;
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < warps; w++) total += partial[w];
  return total;
}

// q/k/v out of the fused projection's rows, with the bias (qwen2), per-head RMSNorm (qwen3) and
// RoPE (half-split or interleaved) applied to q and k; q goes to q_out [n, heads, hd], k and v
// straight into the head-major paged caches [kv_heads, cache_slots, hd] at each token's slot.
//
// Grid: (tokens, heads + 2 kv_heads). Block: max(32, hd / 2) threads; thread t owns the pair of
// dimensions RoPE rotates together, at angle t.
template <typename T>
__device__ void qkv_rope_cache(const T *qkv, const T *bias, const T *q_norm, const T *k_norm, const float *cos,
                               const float *sin, const uint32_t *positions, const uint32_t *slots, T *q_out,
                               T *k_cache, T *v_cache, int heads, int kv_heads, int hd, int cache_slots, int flags,
                               float eps) {
  const bool has_bias = flags & 1, has_norm = flags & 2, rope = flags & 4, interleaved = flags & 8;
  const int token = blockIdx.x, y = blockIdx.y, t = threadIdx.x, half = hd / 2;
  const int q_dim = heads * hd, kv_dim = kv_heads * hd, row = q_dim + 2 * kv_dim;
  int col, kind;  // 0: q, 1: k, 2: v
  if (y < heads) {
    kind = 0;
    col = y * hd;
  } else if (y < heads + kv_heads) {
    kind = 1;
    col = q_dim + (y - heads) * hd;
  } else {
    kind = 2;
    col = q_dim + kv_dim + (y - heads - kv_heads) * hd;
  }
  const bool active = t < half;
  const int i0 = interleaved ? 2 * t : t, i1 = interleaved ? 2 * t + 1 : t + half;
  float x0 = 0.f, x1 = 0.f;
  if (active) {
    const T *src = qkv + (size_t)token * row + col;
    x0 = to_f(src[i0]);
    x1 = to_f(src[i1]);
    if (has_bias) {
      x0 = round_to(x0 + to_f(bias[col + i0]), qkv);
      x1 = round_to(x1 + to_f(bias[col + i1]), qkv);
    }
  }
  if (has_norm && kind < 2) {  // block-uniform branch: every thread reaches the reduction
    const float ss = block_sum(active ? x0 * x0 + x1 * x1 : 0.f);
    const float r = rsqrtf(ss / hd + eps);
    const T *w = kind == 0 ? q_norm : k_norm;
    if (active) {
      x0 = round_to(x0 * r * to_f(w[i0]), qkv);
      x1 = round_to(x1 * r * to_f(w[i1]), qkv);
    }
  }
  if (!active) return;
  if (rope && kind < 2) {
    const size_t a = (size_t)positions[token] * half + t;
    const float c = cos[a], s = sin[a];
    const float r0 = x0 * c - x1 * s, r1 = x0 * s + x1 * c;
    x0 = r0;
    x1 = r1;
  }
  T *dst;
  if (kind == 0) {
    dst = q_out + ((size_t)token * heads + y) * hd;
  } else {
    const int kh = kind == 1 ? y - heads : y - heads - kv_heads;
    dst = (kind == 1 ? k_cache : v_cache) + ((size_t)kh * cache_slots + slots[token]) * hd;
  }
  store(dst + i0, x0);
  store(dst + i1, x1);
}

// x + delta, then RMSNorm of the sum: out [2, rows, hidden] holds the sum (rounded to T, as the
// unfused add stores it) and its normalised value. Grid: rows. Block: a multiple of 32 threads,
// at least hidden / NORM_PER_THREAD: each thread keeps its elements in registers, so every load
// is issued before the reduction and nothing is read back (a row is one round trip to memory,
// not one per element). Wider rows than NORM_PER_THREAD * 1024 loop over memory instead.
#define NORM_PER_THREAD 8
template <typename T>
__device__ void add_rms_norm(const T *x, const T *delta, const T *w, T *out, int rows, int hidden, float eps) {
  const int r = blockIdx.x;
  const T *xr = x + (size_t)r * hidden, *dr = delta + (size_t)r * hidden;
  T *sum = out + (size_t)r * hidden, *normed = out + ((size_t)rows + r) * hidden;
  if (hidden <= NORM_PER_THREAD * (int)blockDim.x) {
    float v[NORM_PER_THREAD];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < NORM_PER_THREAD; k++) {
      const int i = threadIdx.x + k * blockDim.x;
      v[k] = i < hidden ? round_to(to_f(xr[i]) + to_f(dr[i]), x) : 0.f;
      ss += v[k] * v[k];
    }
    const float scale = rsqrtf(block_sum(ss) / hidden + eps);
#pragma unroll
    for (int k = 0; k < NORM_PER_THREAD; k++) {
      const int i = threadIdx.x + k * blockDim.x;
      if (i < hidden) {
        store(sum + i, v[k]);
        store(normed + i, v[k] * scale * to_f(w[i]));
      }
    }
    return;
  }
  float ss = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float v = round_to(to_f(xr[i]) + to_f(dr[i]), x);
    store(sum + i, v);
    ss += v * v;
  }
  const float scale = rsqrtf(block_sum(ss) / hidden + eps);
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    store(normed + i, to_f(sum[i]) * scale * to_f(w[i]));
  }
}

// silu(gate) * up from the fused gate/up projection's rows [n, 2 inter] -> [n, inter].
template <typename T>
__device__ void silu_mul(const T *gate_up, T *out, int n, int inter) {
  const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (size_t)n * inter) return;
  const size_t r = idx / inter, c = idx % inter;
  const float g = to_f(gate_up[r * 2 * inter + c]), u = to_f(gate_up[r * 2 * inter + inter + c]);
  const float s = round_to(g / (1.f + expf(-g)), gate_up);
  store(out + idx, s * u);
}

#define INSTANTIATE(T, NAME)                                                                                      \
  extern "C" __global__ void qkv_rope_cache_##NAME(                                                               \
      const T *qkv, const T *bias, const T *q_norm, const T *k_norm, const float *cos, const float *sin,          \
      const uint32_t *positions, const uint32_t *slots, T *q_out, T *k_cache, T *v_cache, int heads,              \
      int kv_heads, int hd, int cache_slots, int flags, float eps) {                                              \
    qkv_rope_cache<T>(qkv, bias, q_norm, k_norm, cos, sin, positions, slots, q_out, k_cache, v_cache, heads,      \
                      kv_heads, hd, cache_slots, flags, eps);                                                     \
  }                                                                                                               \
  extern "C" __global__ void add_rms_norm_##NAME(const T *x, const T *delta, const T *w, T *out, int rows,       \
                                                  int hidden, float eps) {                                        \
    add_rms_norm<T>(x, delta, w, out, rows, hidden, eps);                                                         \
  }                                                                                                               \
  extern "C" __global__ void silu_mul_##NAME(const T *gate_up, T *out, int n, int inter) {                        \
    silu_mul<T>(gate_up, out, n, inter);                                                                          \
  }

INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(float, f32)
