// Q/K head RMSNorm + NEOX RoPE for a prefill chunk, and the chunk's K/V stored into the fp16
// cache: block (token t, head h) for h < n_heads normalizes and rotates query head h into q16;
// blocks h >= n_heads take kv head h - n_heads: its normalized, rotated key and its value go to
// the caches at position pos0 + t. The arithmetic is the decode attention's norm_rope_head
// (w * (x * r), r = 1 / sqrt(mean(x^2) + eps) over a fixed-order block sum; angle = float(pos) *
// inv_freq in float32, sin/cos in double, unfused rotation), so prefill and decode store the
// same keys up to the inputs' own differences.
#include <cuda_fp16.h>

#include "cuda/common.cuh"
#include "ktune/engine/cuda/prefill_kernels.h"

namespace ktune::cuda {
namespace {

constexpr int kThreads = 64;

__global__ void prefill_qk_norm_rope_kernel(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const float* __restrict__ q_norm, const float* __restrict__ k_norm, float eps,
    const float* __restrict__ inv_freq, int pos0, int n_heads, int n_kv, int hd, int max_ctx,
    uint16_t* __restrict__ q16, uint16_t* __restrict__ k_cache, uint16_t* __restrict__ v_cache) {
  extern __shared__ float head[];  // hd
  __shared__ float red[32];
  const int64_t tok = blockIdx.x;
  const int hi = blockIdx.y;
  const bool is_q = hi < n_heads;
  const int kv = hi - n_heads;
  const float* src = is_q ? q + (tok * n_heads + hi) * hd : k + (tok * n_kv + kv) * hd;
  const float* w = is_q ? q_norm : k_norm;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) head[d] = src[d];
  __syncthreads();
  float ss = 0.0f;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) ss = fmaf(head[d], head[d], ss);
  ss = detail::block_sum(ss, red);
  const float r = 1.0f / sqrtf(ss / static_cast<float>(hd) + eps);
  for (int d = threadIdx.x; d < hd; d += blockDim.x) head[d] = w[d] * (head[d] * r);
  __syncthreads();
  const int half = hd / 2;
  const int pos = pos0 + static_cast<int>(tok);
  const float p = static_cast<float>(pos);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float angle = p * inv_freq[i];
    double sd, cd;
    sincos(static_cast<double>(angle), &sd, &cd);
    const float c = static_cast<float>(cd);
    const float sn = static_cast<float>(sd);
    const float a = head[i];
    const float b = head[half + i];
    head[i] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, sn));
    head[half + i] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, sn));
  }
  __syncthreads();
  if (is_q) {
    uint16_t* dst = q16 + (tok * n_heads + hi) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
      dst[d] = __half_as_ushort(__float2half_rn(head[d]));
    }
  } else {
    const int64_t row = (static_cast<int64_t>(kv) * max_ctx + pos) * hd;
    const float* vs = v + (tok * n_kv + kv) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
      k_cache[row + d] = __half_as_ushort(__float2half_rn(head[d]));
      v_cache[row + d] = __half_as_ushort(__float2half_rn(vs[d]));
    }
  }
}

}  // namespace

cudaError_t launch_prefill_qk_norm_rope(const float* q, const float* k, const float* v,
                                        const float* q_norm, const float* k_norm, float eps,
                                        const float* inv_freq, int64_t tokens, int64_t pos0,
                                        int64_t n_heads, int64_t n_kv, int64_t head_dim,
                                        int64_t max_ctx, uint16_t* q16, uint16_t* k_cache,
                                        uint16_t* v_cache, cudaStream_t stream) {
  if (tokens < 0 || tokens > 0x7fffffff || pos0 < 0 || n_heads <= 0 || n_kv <= 0 ||
      n_heads + n_kv > 65535 || head_dim <= 0 || head_dim % 2 != 0 || head_dim > 256 ||
      max_ctx <= 0 || max_ctx > (int64_t{1} << 24) || pos0 + tokens > max_ctx) {
    return cudaErrorInvalidValue;
  }
  if (tokens == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(n_heads + n_kv));
  prefill_qk_norm_rope_kernel<<<grid, kThreads, static_cast<size_t>(head_dim) * sizeof(float),
                                stream>>>(q, k, v, q_norm, k_norm, eps, inv_freq,
                                          static_cast<int>(pos0), static_cast<int>(n_heads),
                                          static_cast<int>(n_kv), static_cast<int>(head_dim),
                                          static_cast<int>(max_ctx), q16, k_cache, v_cache);
  return cudaGetLastError();
}

}  // namespace ktune::cuda
