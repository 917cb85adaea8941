// Decode attention: one query token, grouped-query heads, fp16 KV cache preallocated as
// [n_kv][max_ctx][hd]. The token's position is read from device memory, so one captured graph
// serves every step; the grid is sized for max_ctx and blocks past the position return at once.
//
// Two launches:
//  1. attn_decode_partial, grid (n_heads, max_ctx / kAttnChunk): block (h, s) scores positions
//     [s*C, min(pos+1, (s+1)*C)) for query head h (one warp per position, lanes over head_dim,
//     warp butterfly), softmax with the chunk's max, and the unnormalized p.V for its chunk,
//     written to the workspace with the chunk's max m and sum l. Position `pos` itself is read
//     from k_new/v_new in float32 (as the CPU engine attends its current token), and block
//     (first head of each kv group, split 0) stores k_new/v_new into the cache as fp16 (RNE).
//  2. attn_decode_combine, one block per head: merges the splits in split order
//     (M = max m_s; out = sum_s e^(m_s-M) o_s / sum_s e^(m_s-M) l_s): fixed order, deterministic.
// Heads of one kv group re-read the same K/V rows; they meet in L2 (decode reads of one layer's
// cache are small next to the weights).
#include <cmath>

#include "cuda/common.cuh"
#include "ktune/engine/cuda/kernels.h"

namespace ktune::cuda {
namespace {

constexpr int kThreads = 128;

// RMSNorm (w * (x * r)) then NEOX RoPE of one head held in shared memory, by the whole block.
__device__ __forceinline__ void norm_rope_head(float* v, const float* __restrict__ w, float eps,
                                               float p, const float* __restrict__ inv_freq,
                                               int hd, float* red) {
  float ss = 0.0f;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) ss = fmaf(v[d], v[d], ss);
  ss = detail::block_sum(ss, red);
  const float r = 1.0f / sqrtf(ss / static_cast<float>(hd) + eps);
  for (int d = threadIdx.x; d < hd; d += blockDim.x) v[d] = w[d] * (v[d] * r);
  __syncthreads();
  const int half = hd / 2;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float angle = p * inv_freq[i];
    double sd, cd;
    sincos(static_cast<double>(angle), &sd, &cd);
    const float c = static_cast<float>(cd);
    const float sn = static_cast<float>(sd);
    const float a = v[i];
    const float b = v[half + i];
    v[i] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, sn));
    v[half + i] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, sn));
  }
  __syncthreads();
}

// kFuse: q / k_new are the raw projections, normalized and rotated here (q_norm, k_norm, eps,
// inv_freq); else they are final and the norm arguments are unused.
template <bool kFuse>
__global__ void attn_decode_partial(const float* __restrict__ q, const float* __restrict__ k_new,
                                    const float* __restrict__ v_new, uint16_t* __restrict__ k_cache,
                                    uint16_t* __restrict__ v_cache, const int32_t* __restrict__ pos,
                                    int group, int hd, int max_ctx, float scale,
                                    float* __restrict__ ws_o, float* __restrict__ ws_ml,
                                    const float* __restrict__ q_norm,
                                    const float* __restrict__ k_norm, float eps,
                                    const float* __restrict__ inv_freq) {
  extern __shared__ float smem[];
  float* qs = smem;           // hd
  float* kn = smem + hd;      // hd: this token's key (normalized and rotated when kFuse)
  float* sc = smem + 2 * hd;  // kAttnChunk
  __shared__ float red[32];
  const int h = blockIdx.x;
  const int s = blockIdx.y;
  const int nsplit = gridDim.y;
  const int kvh = h / group;
  const int P = *pos;
  if (P < 0 || P >= max_ctx) return;
  const int start = s * kAttnChunk;
  const int end = min(P + 1, start + kAttnChunk);
  if (start >= end) return;  // never for split 0, which stores the new token below
  const int len = end - start;
  const float* vn = v_new + static_cast<int64_t>(kvh) * hd;
  const int64_t cache_row0 = static_cast<int64_t>(kvh) * max_ctx;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    qs[d] = q[static_cast<int64_t>(h) * hd + d];
    kn[d] = k_new[static_cast<int64_t>(kvh) * hd + d];
  }
  __syncthreads();
  if (kFuse) {
    const float pf = static_cast<float>(P);
    norm_rope_head(qs, q_norm, eps, pf, inv_freq, hd, red);
    norm_rope_head(kn, k_norm, eps, pf, inv_freq, hd, red);
  }
  if (s == 0 && h % group == 0) {
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
      k_cache[(cache_row0 + P) * hd + d] = __half_as_ushort(__float2half_rn(kn[d]));
      v_cache[(cache_row0 + P) * hd + d] = __half_as_ushort(__float2half_rn(vn[d]));
    }
  }

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int nwarps = blockDim.x / 32;
  for (int t = warp; t < len; t += nwarps) {
    const int p = start + t;
    float acc = 0.0f;
    if (p == P) {
      for (int d = 2 * lane; d < hd; d += 64) {
        acc = fmaf(qs[d], kn[d], acc);
        acc = fmaf(qs[d + 1], kn[d + 1], acc);
      }
    } else {
      const __half2* kr = reinterpret_cast<const __half2*>(k_cache + (cache_row0 + p) * hd);
      for (int d = 2 * lane; d < hd; d += 64) {
        const float2 kv = __half22float2(kr[d / 2]);
        acc = fmaf(qs[d], kv.x, acc);
        acc = fmaf(qs[d + 1], kv.y, acc);
      }
    }
    acc = detail::warp_sum(acc);
    if (lane == 0) sc[t] = acc * scale;
  }
  __syncthreads();

  float m = -INFINITY;
  for (int t = threadIdx.x; t < len; t += blockDim.x) m = fmaxf(m, sc[t]);
  m = detail::block_max(m, red);
  float l = 0.0f;
  for (int t = threadIdx.x; t < len; t += blockDim.x) {
    const float e = expf(sc[t] - m);
    sc[t] = e;
    l += e;
  }
  l = detail::block_sum(l, red);  // its __syncthreads also publishes sc

  float* o = ws_o + (static_cast<int64_t>(h) * nsplit + s) * hd;
  for (int d2 = threadIdx.x; d2 < hd / 2; d2 += blockDim.x) {
    float ax = 0.0f, ay = 0.0f;
    for (int t = 0; t < len; ++t) {
      const int p = start + t;
      float2 vv;
      if (p == P) {
        vv = make_float2(vn[2 * d2], vn[2 * d2 + 1]);
      } else {
        vv = __half22float2(reinterpret_cast<const __half2*>(v_cache + (cache_row0 + p) * hd)[d2]);
      }
      ax = fmaf(sc[t], vv.x, ax);
      ay = fmaf(sc[t], vv.y, ay);
    }
    o[2 * d2] = ax;
    o[2 * d2 + 1] = ay;
  }
  if (threadIdx.x == 0) {
    ws_ml[(static_cast<int64_t>(h) * nsplit + s) * 2] = m;
    ws_ml[(static_cast<int64_t>(h) * nsplit + s) * 2 + 1] = l;
  }
}

__global__ void attn_decode_combine(const int32_t* __restrict__ pos, int hd, int max_ctx,
                                    int nsplit, const float* __restrict__ ws_o,
                                    const float* __restrict__ ws_ml, float* __restrict__ out) {
  const int h = blockIdx.x;
  const int P = *pos;
  float* oh = out + static_cast<int64_t>(h) * hd;
  if (P < 0 || P >= max_ctx) {
    for (int d = threadIdx.x; d < hd; d += blockDim.x) oh[d] = __int_as_float(0x7fc00000);
    return;
  }
  const int used = (P + 1 + kAttnChunk - 1) / kAttnChunk;
  const float* ml = ws_ml + static_cast<int64_t>(h) * nsplit * 2;
  float M = -INFINITY;
  for (int s = 0; s < used; ++s) M = fmaxf(M, ml[2 * s]);
  float L = 0.0f;
  for (int s = 0; s < used; ++s) L = fmaf(expf(ml[2 * s] - M), ml[2 * s + 1], L);
  const float inv = 1.0f / L;
  const float* o = ws_o + static_cast<int64_t>(h) * nsplit * hd;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < used; ++s)
      acc = fmaf(expf(ml[2 * s] - M), o[static_cast<int64_t>(s) * hd + d], acc);
    oh[d] = acc * inv;
  }
}

int64_t n_splits(int64_t max_ctx) { return (max_ctx + kAttnChunk - 1) / kAttnChunk; }

}  // namespace

size_t attention_decode_workspace_bytes(int64_t n_heads, int64_t head_dim, int64_t max_ctx) {
  return static_cast<size_t>(n_heads * n_splits(max_ctx) * (head_dim + 2)) * sizeof(float);
}

namespace {

cudaError_t attention_impl(const float* q, const float* k_new, const float* v_new,
                           uint16_t* k_cache, uint16_t* v_cache, const int32_t* pos,
                           int64_t n_heads, int64_t n_kv, int64_t head_dim, int64_t max_ctx,
                           void* workspace, float* out, const float* q_norm, const float* k_norm,
                           float eps, const float* inv_freq, cudaStream_t stream) {
  if (n_heads <= 0 || n_kv <= 0 || n_heads % n_kv != 0 || n_heads > 65535 || head_dim <= 0 ||
      head_dim % 2 != 0 || head_dim > 256 || max_ctx <= 0 || max_ctx > (int64_t{1} << 24) ||
      workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int64_t ns = n_splits(max_ctx);
  float* ws_o = static_cast<float*>(workspace);
  float* ws_ml = ws_o + n_heads * ns * head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const size_t smem = static_cast<size_t>(2 * head_dim + kAttnChunk) * sizeof(float);
  const dim3 grid(static_cast<unsigned>(n_heads), static_cast<unsigned>(ns));
  const int group = static_cast<int>(n_heads / n_kv);
  const int hd = static_cast<int>(head_dim);
  const int mc = static_cast<int>(max_ctx);
  if (q_norm != nullptr) {
    attn_decode_partial<true><<<grid, kThreads, smem, stream>>>(
        q, k_new, v_new, k_cache, v_cache, pos, group, hd, mc, scale, ws_o, ws_ml, q_norm, k_norm,
        eps, inv_freq);
  } else {
    attn_decode_partial<false><<<grid, kThreads, smem, stream>>>(
        q, k_new, v_new, k_cache, v_cache, pos, group, hd, mc, scale, ws_o, ws_ml, nullptr,
        nullptr, 0.0f, nullptr);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  attn_decode_combine<<<static_cast<unsigned>(n_heads), kThreads, 0, stream>>>(
      pos, hd, mc, static_cast<int>(ns), ws_o, ws_ml, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_attention_decode(const float* q, const float* k_new, const float* v_new,
                                    uint16_t* k_cache, uint16_t* v_cache, const int32_t* pos,
                                    int64_t n_heads, int64_t n_kv, int64_t head_dim,
                                    int64_t max_ctx, void* workspace, float* out,
                                    cudaStream_t stream) {
  return attention_impl(q, k_new, v_new, k_cache, v_cache, pos, n_heads, n_kv, head_dim, max_ctx,
                        workspace, out, nullptr, nullptr, 0.0f, nullptr, stream);
}

cudaError_t launch_attention_decode_qknorm_rope(const float* q_raw, const float* k_raw,
                                                const float* v_new, const float* q_norm,
                                                const float* k_norm, float eps,
                                                const float* inv_freq, uint16_t* k_cache,
                                                uint16_t* v_cache, const int32_t* pos,
                                                int64_t n_heads, int64_t n_kv, int64_t head_dim,
                                                int64_t max_ctx, void* workspace, float* out,
                                                cudaStream_t stream) {
  if (q_norm == nullptr || k_norm == nullptr || inv_freq == nullptr) return cudaErrorInvalidValue;
  return attention_impl(q_raw, k_raw, v_new, k_cache, v_cache, pos, n_heads, n_kv, head_dim,
                        max_ctx, workspace, out, q_norm, k_norm, eps, inv_freq, stream);
}

}  // namespace ktune::cuda
