// Small element-wise kernels of the GPU engine's decode step and of the unfused MoE path:
// SwiGLU, acc += w * y (rounded multiply then add, no contraction: the fused down kernel's
// combine), x += y (residual), and the end-of-step advance (record the sampled token, bump the
// position), all graph-capturable (values that change per token live in device memory).
#include "cuda/common.cuh"
#include "cuda/rowwarp_dot.cuh"
#include "ktune/engine/cuda/kernels.h"

namespace ktune::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void swiglu_kernel(const float* __restrict__ g, const float* __restrict__ u, int n,
                              float* __restrict__ out) {
  const int i = blockIdx.x * kThreads + threadIdx.x;
  if (i < n) out[i] = detail::swiglu(g[i], u[i]);
}

__global__ void axpy_kernel(float w, const float* __restrict__ y, int n, float* __restrict__ acc) {
  const int i = blockIdx.x * kThreads + threadIdx.x;
  if (i < n) acc[i] = __fadd_rn(acc[i], __fmul_rn(w, y[i]));
}

__global__ void add_kernel(float* __restrict__ x, const float* __restrict__ y, int n) {
  const int i = blockIdx.x * kThreads + threadIdx.x;
  if (i < n) x[i] = __fadd_rn(x[i], y[i]);
}

__global__ void advance_kernel(int32_t* pos, const int32_t* token, int32_t* history, int len) {
  const int p = *pos;
  if (p >= 0 && p < len) history[p] = *token;
  *pos = p + 1;
}

unsigned blocks(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

}  // namespace

cudaError_t launch_swiglu(const float* g, const float* u, int64_t n, float* out,
                          cudaStream_t stream) {
  if (n < 0 || n > 0x7fffffff) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  swiglu_kernel<<<blocks(n), kThreads, 0, stream>>>(g, u, static_cast<int>(n), out);
  return cudaGetLastError();
}

cudaError_t launch_axpy_accumulate(float w, const float* y, int64_t n, float* acc,
                                   cudaStream_t stream) {
  if (n < 0 || n > 0x7fffffff) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  axpy_kernel<<<blocks(n), kThreads, 0, stream>>>(w, y, static_cast<int>(n), acc);
  return cudaGetLastError();
}

cudaError_t launch_add_inplace(float* x, const float* y, int64_t n, cudaStream_t stream) {
  if (n < 0 || n > 0x7fffffff) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  add_kernel<<<blocks(n), kThreads, 0, stream>>>(x, y, static_cast<int>(n));
  return cudaGetLastError();
}

cudaError_t launch_decode_advance(int32_t* pos, const int32_t* token, int32_t* history,
                                  int64_t history_len, cudaStream_t stream) {
  if (history_len < 0 || history_len > 0x7fffffff) return cudaErrorInvalidValue;
  advance_kernel<<<1, 1, 0, stream>>>(pos, token, history, static_cast<int>(history_len));
  return cudaGetLastError();
}

}  // namespace ktune::cuda
