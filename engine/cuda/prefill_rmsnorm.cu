// RMSNorm of a prefill chunk's rows with float32 and/or fp16 outputs: the fp16 copy is the A
// operand of the tensor-core matmuls, the float32 copy feeds the router (float32 logits). Same
// arithmetic and block size rule as launch_rmsnorm (w * (x * r), fixed-order block sum), so
// the float32 output equals launch_rmsnorm's bit for bit and the fp16 one is its rounding.
#include <cuda_fp16.h>

#include "cuda/common.cuh"
#include "ktune/engine/cuda/prefill_kernels.h"

namespace ktune::cuda {
namespace {

__global__ void prefill_rmsnorm_kernel(const float* __restrict__ x, const float* __restrict__ w,
                                       float eps, int n, float* __restrict__ y,
                                       uint16_t* __restrict__ y16) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const float* xr = x + row * n;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
  ss = detail::block_sum(ss, red);
  const float mean = ss / static_cast<float>(n);
  const float r = 1.0f / sqrtf(mean + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = w[i] * (xr[i] * r);
    if (y) y[row * n + i] = v;
    if (y16) y16[row * n + i] = __half_as_ushort(__float2half_rn(v));
  }
}

}  // namespace

cudaError_t launch_prefill_rmsnorm(const float* x, const float* w, float eps, int64_t rows,
                                   int64_t n, float* y, uint16_t* y16, cudaStream_t stream) {
  if (rows < 0 || n <= 0 || n > (int64_t{1} << 30) || rows > 0x7fffffff ||
      (y == nullptr && y16 == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  const int threads = n >= 1024 ? 256 : (n >= 256 ? 128 : 64);  // launch_rmsnorm's rule
  prefill_rmsnorm_kernel<<<static_cast<unsigned>(rows), threads, 0, stream>>>(
      x, w, eps, static_cast<int>(n), y, y16);
  return cudaGetLastError();
}

}  // namespace ktune::cuda
