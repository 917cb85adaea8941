// Decode matvec for Q4_K, Q5_K and Q6_K weights (ggml's super-block layouts, quant.h).
//
// The row dot is rowdot_kquant.cuh's, the one every K-quant decode kernel uses (fused matvec,
// fused and unfused MoE): one warp per row, 4 warps per block; a step of the warp covers one
// super-block (lane = 4 * sub-block + slice, 8 weights each), so its weight loads are one
// contiguous 144 / 176 / 210-byte block and its x loads (float4) contiguous too. Each lane
// accumulates a * Σ q·x - b * Σ x per slice with fmaf in super-block order, then a warp
// butterfly: deterministic. Weights are dequantized in registers; x stays float32.
#include "cuda/common.cuh"
#include "cuda/rowwarp_dot.cuh"
#include "ktune/engine/cuda/kquant_kernels.h"

namespace ktune::cuda {
namespace {

constexpr int kWarps = 4;

template <QuantType kType>
__global__ void matvec_kquant_kernel(const uint8_t* __restrict__ w, const float* __restrict__ x,
                                     int rows, int nb, int64_t row_bytes, float* __restrict__ y) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / detail::kWarp;
  if (r >= rows) return;
  const uint8_t* const rp[1] = {w + r * row_bytes};
  const float* const xp[1] = {x};
  float out[1];
  detail::warp_rows_dot<kType, 1>(rp, xp, nb, out);
  if (threadIdx.x % detail::kWarp == 0) y[r] = out[0];
}

template <QuantType kType>
cudaError_t launch(const void* w, const float* x, int64_t rows, int64_t cols, float* y,
                   cudaStream_t stream) {
  if (rows < 0 || rows > 0x7fffffff || !detail::rowdot_cols_ok(kType, cols) || cols > (1 << 28) ||
      w == nullptr || x == nullptr || y == nullptr || !detail::rowdot_aligned(kType, w) ||
      (reinterpret_cast<uintptr_t>(x) & 15u) != 0) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  const int nb = static_cast<int>(cols / 32);
  const int64_t grid = (rows + kWarps - 1) / kWarps;
  matvec_kquant_kernel<kType><<<static_cast<unsigned>(grid), 32 * kWarps, 0, stream>>>(
      static_cast<const uint8_t*>(w), x, static_cast<int>(rows), nb, row_bytes(kType, cols), y);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_matvec_q4_k(const void* w, const float* x, int64_t rows, int64_t cols, float* y,
                               cudaStream_t stream) {
  return launch<QuantType::Q4_K>(w, x, rows, cols, y, stream);
}

cudaError_t launch_matvec_q5_k(const void* w, const float* x, int64_t rows, int64_t cols, float* y,
                               cudaStream_t stream) {
  return launch<QuantType::Q5_K>(w, x, rows, cols, y, stream);
}

cudaError_t launch_matvec_q6_k(const void* w, const float* x, int64_t rows, int64_t cols, float* y,
                               cudaStream_t stream) {
  return launch<QuantType::Q6_K>(w, x, rows, cols, y, stream);
}

cudaError_t launch_matvec_kquant(QuantType type, const void* w, const float* x, int64_t rows,
                                 int64_t cols, float* y, cudaStream_t stream) {
  switch (type) {
    case QuantType::Q4_K:
      return launch_matvec_q4_k(w, x, rows, cols, y, stream);
    case QuantType::Q5_K:
      return launch_matvec_q5_k(w, x, rows, cols, y, stream);
    case QuantType::Q6_K:
      return launch_matvec_q6_k(w, x, rows, cols, y, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace ktune::cuda
