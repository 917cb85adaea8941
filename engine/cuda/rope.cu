// NEOX RoPE (rotate halves) in place on [rows][heads][head_dim] float32. The position of each
// row is read from device memory so a captured decode graph replays with the new position.
// Precision follows cpu_ops::rope_table exactly: angle = float(pos) * inv_freq[i] in float32,
// cos/sin of that float angle in double, rounded to float; then the same float rotation as
// cpu_ops::rope_neox with explicitly rounded multiplies and adds (no fma contraction, which the
// CPU build does not do either), so GPU and CPU results are expected to be bit-identical except
// where the device's double sin/cos (<= 2 ulp in double) rounds to a different float.
// One block per (row, head), one thread per pair. Double trig is cheap at decode sizes
// (heads * hd/2 pairs per token).
#include <cmath>

#include "cuda/common.cuh"
#include "ktune/engine/cuda/kernels.h"

namespace ktune::cuda {
namespace {

__global__ void rope_neox_kernel(float* __restrict__ v, const int32_t* __restrict__ pos,
                                 const float* __restrict__ inv_freq, int heads, int hd) {
  const int64_t row = blockIdx.x / heads;
  const int half = hd / 2;
  const float p = static_cast<float>(pos[row]);
  float* h = v + static_cast<int64_t>(blockIdx.x) * hd;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float angle = p * inv_freq[i];
    double sd, cd;
    sincos(static_cast<double>(angle), &sd, &cd);
    const float c = static_cast<float>(cd);
    const float s = static_cast<float>(sd);
    const float a = h[i];
    const float b = h[half + i];
    h[i] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    h[half + i] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
  }
}

}  // namespace

std::vector<float> rope_inv_freq(float theta, int64_t head_dim) {
  std::vector<float> f(static_cast<size_t>(head_dim / 2));
  for (int64_t i = 0; i < head_dim / 2; ++i) {
    const float e = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    f[static_cast<size_t>(i)] = 1.0f / std::pow(theta, e);
  }
  return f;
}

cudaError_t launch_rope_neox(float* v, const int32_t* pos, const float* inv_freq, int64_t rows,
                             int64_t heads, int64_t head_dim, cudaStream_t stream) {
  if (rows < 0 || heads <= 0 || head_dim <= 0 || head_dim % 2 != 0 || head_dim > 4096 ||
      rows * heads > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  const int half = static_cast<int>(head_dim / 2);
  const int threads = half <= 32 ? 32 : (half <= 64 ? 64 : 128);
  rope_neox_kernel<<<static_cast<unsigned>(rows * heads), threads, 0, stream>>>(
      v, pos, inv_freq, static_cast<int>(heads), static_cast<int>(head_dim));
  return cudaGetLastError();
}

}  // namespace ktune::cuda
