// RMSNorm over rows: y = w * (x * r), r = 1 / sqrt(mean(x^2) + eps), float32 as the CPU engine's
// cpu_ops::rmsnorm and Hugging Face's Qwen3MoeRMSNorm. One block per row: the row is read once
// for the sum of squares (strided per thread, then a fixed-order block tree) and once more for
// the output, which hits L1/L2 for the row sizes of decode (hidden 2048, head_dim 128).
#include "cuda/common.cuh"
#include "ktune/engine/cuda/kernels.h"

namespace ktune::cuda {
namespace {

__global__ void rmsnorm_kernel(const float* __restrict__ x, const float* __restrict__ w, float eps,
                               int n, float* __restrict__ y) {
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const float* xr = x + row * n;
  float* yr = y + row * n;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
  ss = detail::block_sum(ss, red);
  const float mean = ss / static_cast<float>(n);
  const float r = 1.0f / sqrtf(mean + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = w[i] * (xr[i] * r);
}

}  // namespace

cudaError_t launch_rmsnorm(const float* x, const float* w, float eps, int64_t rows, int64_t n,
                           float* y, cudaStream_t stream) {
  if (rows < 0 || n <= 0 || n > (int64_t{1} << 30) || rows > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  // Block size depends only on n, so the reduction order is the same on every call.
  const int threads = n >= 1024 ? 256 : (n >= 256 ? 128 : 64);
  rmsnorm_kernel<<<static_cast<unsigned>(rows), threads, 0, stream>>>(x, w, eps,
                                                                      static_cast<int>(n), y);
  return cudaGetLastError();
}

}  // namespace ktune::cuda
