// The MoE combine of a prefill chunk: each token's expert outputs (rows of ye in grouped order,
// found through pair_pos) are weighted and summed in slot order, s = 0; s = s + w_j * y_j
// (rounded multiply, then add: the decode combine's arithmetic), and added to the residual.
// One thread per (token, column): no atomics, deterministic.
#include "cuda/common.cuh"
#include "ktune/engine/cuda/prefill_kernels.h"

namespace ktune::cuda {
namespace {

__global__ void prefill_moe_combine_kernel(const float* __restrict__ ye,
                                           const int32_t* __restrict__ pair_pos,
                                           const float* __restrict__ weights, int k, int hidden,
                                           float* __restrict__ x) {
  const int64_t t = blockIdx.y;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= hidden) return;
  float s = 0.0f;
  for (int j = 0; j < k; ++j) {
    const int32_t p = pair_pos[t * k + j];
    const float y = p >= 0 ? ye[static_cast<int64_t>(p) * hidden + c] : __int_as_float(0x7fc00000);
    s = __fadd_rn(s, __fmul_rn(weights[t * k + j], y));
  }
  x[t * hidden + c] = __fadd_rn(x[t * hidden + c], s);
}

}  // namespace

cudaError_t launch_prefill_moe_combine(const float* ye, const int32_t* pair_pos,
                                       const float* weights, int64_t tokens, int64_t k,
                                       int64_t hidden, float* x, cudaStream_t stream) {
  if (tokens < 0 || tokens > 65535 || k < 1 || k > 64 || hidden <= 0 || hidden > (1 << 24)) {
    return cudaErrorInvalidValue;
  }
  if (tokens == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((hidden + 255) / 256), static_cast<unsigned>(tokens));
  prefill_moe_combine_kernel<<<grid, 256, 0, stream>>>(ye, pair_pos, weights, static_cast<int>(k),
                                                       static_cast<int>(hidden), x);
  return cudaGetLastError();
}

}  // namespace ktune::cuda
