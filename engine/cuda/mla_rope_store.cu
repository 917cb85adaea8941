// MLA's per-token RoPE and cache store (launch_mla_rope_store, mla_kernels.h): block 0 normalizes
// the latent and ropes k_pe into the cache row at *pos; the other blocks rope q_pe of the query
// heads into the tails of the absorbed queries (one thread per rotated pair). Rotation as
// cpu_ops::rope_table_scaled + rope_pairs: float angle, cos/sin in double rounded to float, times
// the YaRN factor, then rounded multiplies and adds (the CPU build does not contract them into
// fma either).
#include <cmath>

#include "cuda/common.cuh"
#include "ktune/engine/cuda/mla_kernels.h"

namespace ktune::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ void rotate_pair(const float* src, float* dst, int i, float p,
                                            const float* inv_freq, float cs_scale) {
  const float angle = p * inv_freq[i];
  double sd, cd;
  sincos(static_cast<double>(angle), &sd, &cd);
  const float c = __fmul_rn(static_cast<float>(cd), cs_scale);
  const float s = __fmul_rn(static_cast<float>(sd), cs_scale);
  const float a = src[2 * i];
  const float b = src[2 * i + 1];
  dst[2 * i] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
  dst[2 * i + 1] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
}

__global__ void __launch_bounds__(kThreads)
    mla_rope_store_kernel(const float* __restrict__ kv, const float* __restrict__ kv_norm_w,
                          float eps, const float* __restrict__ q, int64_t q_stride, int q_pe_off,
                          const float* __restrict__ inv_freq, float cs_scale,
                          const int32_t* __restrict__ pos, int n_heads, int rank, int rope,
                          int max_ctx, float* __restrict__ cache, float* __restrict__ q_out,
                          int64_t q_out_stride) {
  __shared__ float red[32];
  const int p = *pos;
  const bool ok = p >= 0 && p < max_ctx;
  const int half = rope / 2;
  if (blockIdx.x == 0) {
    if (!ok) return;
    float* row = cache + static_cast<int64_t>(p) * (rank + rope);
    float ss = 0.0f;
    for (int i = threadIdx.x; i < rank; i += blockDim.x) ss = fmaf(kv[i], kv[i], ss);
    ss = detail::block_sum(ss, red);
    const float r = 1.0f / sqrtf(ss / static_cast<float>(rank) + eps);
    for (int i = threadIdx.x; i < rank; i += blockDim.x) row[i] = kv_norm_w[i] * (kv[i] * r);
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
      rotate_pair(kv + rank, row + rank, i, static_cast<float>(p), inv_freq, cs_scale);
    }
    return;
  }
  const int64_t t = static_cast<int64_t>(blockIdx.x - 1) * blockDim.x + threadIdx.x;
  if (t >= static_cast<int64_t>(n_heads) * half) return;
  const int h = static_cast<int>(t / half);
  const int i = static_cast<int>(t % half);
  float* dst = q_out + h * q_out_stride + rank;
  if (!ok) {
    dst[2 * i] = dst[2 * i + 1] = __int_as_float(0x7fc00000);
    return;
  }
  rotate_pair(q + h * q_stride + q_pe_off, dst, i, static_cast<float>(p), inv_freq, cs_scale);
}

}  // namespace

cudaError_t launch_mla_rope_store(const float* kv, const float* kv_norm_w, float eps,
                                  const float* q, int64_t q_stride, int64_t q_pe_off,
                                  const float* inv_freq, float cs_scale, const int32_t* pos,
                                  int64_t n_heads, int64_t rank, int64_t rope, int64_t max_ctx,
                                  float* cache, float* q_out, int64_t q_out_stride,
                                  cudaStream_t stream) {
  if (kv == nullptr || kv_norm_w == nullptr || q == nullptr || inv_freq == nullptr ||
      pos == nullptr || cache == nullptr || q_out == nullptr || n_heads < 1 || n_heads > 65536 ||
      rank < 1 || rank > 8192 || rope < 2 || rope % 2 != 0 || rope > 1024 || max_ctx < 1 ||
      max_ctx > (int64_t{1} << 24) || q_pe_off < 0 || q_stride < q_pe_off + rope ||
      q_out_stride < rank + rope) {
    return cudaErrorInvalidValue;
  }
  const int64_t pairs = n_heads * (rope / 2);
  const unsigned grid = 1 + static_cast<unsigned>((pairs + kThreads - 1) / kThreads);
  mla_rope_store_kernel<<<grid, kThreads, 0, stream>>>(
      kv, kv_norm_w, eps, q, q_stride, static_cast<int>(q_pe_off), inv_freq, cs_scale, pos,
      static_cast<int>(n_heads), static_cast<int>(rank), static_cast<int>(rope),
      static_cast<int>(max_ctx), cache, q_out, q_out_stride);
  return cudaGetLastError();
}

}  // namespace ktune::cuda
