// Small kernels of the batched decode step (batch_kernels.h): fp16 conversion of the attention
// output, the hybrid expert mask, the MoE combine with the CPU experts' sums, and the step's
// advance. One thread per output element; no atomics.
#include <cuda_fp16.h>

#include "ktune/engine/cuda/batch_kernels.h"

namespace ktune::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void f32_to_f16_kernel(const float* __restrict__ x, int64_t n,
                                  uint16_t* __restrict__ y) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] = __half_as_ushort(__float2half_rn(x[i]));
}

__global__ void gpu_ids_kernel(const int32_t* __restrict__ ids, int pairs,
                               const int32_t* __restrict__ slot_map, int n_exp,
                               int32_t* __restrict__ gpu_ids) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= pairs) return;
  const int32_t e = ids[p];
  gpu_ids[p] = e >= 0 && e < n_exp && slot_map[e] < 0 ? -1 : e;
}

__global__ void batch_combine_kernel(const float* __restrict__ ye,
                                     const int32_t* __restrict__ pair_pos,
                                     const int32_t* __restrict__ ids,
                                     const float* __restrict__ weights,
                                     const int32_t* __restrict__ slot_map,
                                     const float* __restrict__ ycpu, int k, int n_exp, int hidden,
                                     float* __restrict__ x) {
  const int64_t t = blockIdx.y;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= hidden) return;
  const float nan = __int_as_float(0x7fc00000);
  float s = 0.0f;
  bool gpu = false, cpu = false;
  for (int j = 0; j < k; ++j) {
    const int32_t e = ids[t * k + j];
    if (e < 0 || e >= n_exp) {
      s = nan;
      gpu = true;
      continue;
    }
    if (slot_map != nullptr && slot_map[e] < 0) {
      cpu = true;
      continue;
    }
    gpu = true;
    const int32_t p = pair_pos[t * k + j];
    const float y = p >= 0 ? ye[static_cast<int64_t>(p) * hidden + c] : nan;
    s = __fadd_rn(s, __fmul_rn(weights[t * k + j], y));
  }
  float v = x[t * hidden + c];
  if (gpu) v = __fadd_rn(v, s);
  if (cpu) v = __fadd_rn(v, ycpu != nullptr ? ycpu[t * hidden + c] : nan);
  x[t * hidden + c] = v;
}

__global__ void batch_advance_kernel(const int32_t* __restrict__ tokens, int32_t* __restrict__ pos,
                                     int32_t* __restrict__ history, int64_t history_len, int batch,
                                     int32_t* __restrict__ step) {
  for (int b = threadIdx.x; b < batch; b += blockDim.x) {
    const int32_t p = pos[b];
    if (p >= 0 && p < history_len) history[b * history_len + p] = tokens[b];
    pos[b] = p + 1;
  }
  if (threadIdx.x == 0) *step = *step + 1;
}

unsigned blocks(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

}  // namespace

cudaError_t launch_f32_to_f16(const float* x, int64_t n, uint16_t* y16, cudaStream_t stream) {
  if (x == nullptr || y16 == nullptr || n < 0 || n > (int64_t{1} << 40)) {
    return cudaErrorInvalidValue;
  }
  if (n == 0) return cudaSuccess;
  f32_to_f16_kernel<<<blocks(n), kThreads, 0, stream>>>(x, n, y16);
  return cudaGetLastError();
}

cudaError_t launch_batch_gpu_ids(const int32_t* ids, int64_t pairs, const int32_t* slot_map,
                                 int64_t n_experts, int32_t* gpu_ids, cudaStream_t stream) {
  if (ids == nullptr || slot_map == nullptr || gpu_ids == nullptr || pairs < 0 ||
      pairs > (int64_t{1} << 30) || n_experts < 1 || n_experts > (int64_t{1} << 30)) {
    return cudaErrorInvalidValue;
  }
  if (pairs == 0) return cudaSuccess;
  gpu_ids_kernel<<<blocks(pairs), kThreads, 0, stream>>>(ids, static_cast<int>(pairs), slot_map,
                                                         static_cast<int>(n_experts), gpu_ids);
  return cudaGetLastError();
}

cudaError_t launch_batch_moe_combine(const float* ye, const int32_t* pair_pos, const int32_t* ids,
                                     const float* weights, const int32_t* slot_map,
                                     const float* ycpu, int64_t tokens, int64_t k,
                                     int64_t n_experts, int64_t hidden, float* x,
                                     cudaStream_t stream) {
  if (tokens < 0 || tokens > 65535 || k < 1 || k > 64 || n_experts < 1 ||
      n_experts > (int64_t{1} << 30) || hidden <= 0 || hidden > (1 << 24) || ids == nullptr ||
      weights == nullptr || pair_pos == nullptr || x == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (tokens == 0) return cudaSuccess;
  const dim3 grid(blocks(hidden), static_cast<unsigned>(tokens));
  batch_combine_kernel<<<grid, kThreads, 0, stream>>>(
      ye, pair_pos, ids, weights, slot_map, ycpu, static_cast<int>(k), static_cast<int>(n_experts),
      static_cast<int>(hidden), x);
  return cudaGetLastError();
}

cudaError_t launch_batch_advance(const int32_t* tokens, int32_t* pos, int32_t* history,
                                 int64_t history_len, int64_t batch, int32_t* step,
                                 cudaStream_t stream) {
  if (tokens == nullptr || pos == nullptr || history == nullptr || step == nullptr ||
      history_len < 1 || history_len > (int64_t{1} << 30) || batch < 1 || batch > 65535) {
    return cudaErrorInvalidValue;
  }
  batch_advance_kernel<<<1, kThreads, 0, stream>>>(tokens, pos, history, history_len,
                                                   static_cast<int>(batch), step);
  return cudaGetLastError();
}

}  // namespace ktune::cuda
