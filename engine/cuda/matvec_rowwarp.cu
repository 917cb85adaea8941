// Decode matvec with one warp per row (rowwarp_dot.cuh; K-quants: rowdot_kquant.cuh): y[r] =
// dot(W row r, x). It exists for two callers: the router (F32 weights, which launch_matvec does not
// take) and the unfused MoE path, whose per-expert gate/up/down launches must compute each row
// exactly as the fused MoE kernels do, so that fused and unfused give bit-identical logits.
#include "cuda/common.cuh"
#include "cuda/rowwarp_dot.cuh"
#include "ktune/engine/cuda/kernels.h"

namespace ktune::cuda {
namespace {

constexpr int kWarps = 4;

template <QuantType T>
__global__ void matvec_rowwarp_kernel(const uint8_t* __restrict__ w, const float* __restrict__ x,
                                      int rows, int nb, int64_t row_bytes, float* __restrict__ y) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / detail::kWarp;
  if (r >= rows) return;
  const uint8_t* const rp[1] = {w + r * row_bytes};
  const float* const xp[1] = {x};
  float out[1];
  detail::warp_rows_dot<T, 1>(rp, xp, nb, out);
  if (threadIdx.x % detail::kWarp == 0) y[r] = out[0];
}

}  // namespace

cudaError_t launch_matvec_rowwarp(QuantType type, const void* w, const float* x, int64_t rows,
                                  int64_t cols, float* y, cudaStream_t stream) {
  if (!detail::rowdot_supported(type) || rows < 0 || rows > 0x7fffffff ||
      !detail::rowdot_cols_ok(type, cols) || cols > (1 << 28) || !detail::rowdot_aligned(type, w) ||
      (reinterpret_cast<uintptr_t>(x) & 15u) != 0) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  const int nb = static_cast<int>(cols / 32);
  const int64_t rb = row_bytes(type, cols);
  const auto* wb = static_cast<const uint8_t*>(w);
  const unsigned grid = static_cast<unsigned>((rows + kWarps - 1) / kWarps);
  const int r = static_cast<int>(rows);
  detail::with_rowdot_type(type, [&](auto tag) {
    matvec_rowwarp_kernel<decltype(tag)::value>
        <<<grid, 32 * kWarps, 0, stream>>>(wb, x, r, nb, rb, y);
  });
  return cudaGetLastError();
}

}  // namespace ktune::cuda
