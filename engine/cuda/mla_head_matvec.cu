// Per-head matvec (launch_head_matvec, mla_kernels.h): MLA's per-head matrices (attn_k_b,
// attn_v_b, attn_kv_b's value rows) each multiply their own head's vector. One warp per output
// row, with the MoE kernels' row dot (rowwarp_dot.cuh: weights read once, dequantized in
// registers, x float32, fixed-order butterfly): deterministic. Grid (row groups, heads).
#include "cuda/common.cuh"
#include "cuda/rowwarp_dot.cuh"
#include "ktune/engine/cuda/mla_kernels.h"

namespace ktune::cuda {
namespace {

constexpr int kWarps = 8;

template <QuantType T>
__global__ void __launch_bounds__(kWarps * 32)
    head_matvec_kernel(const uint8_t* __restrict__ w, int64_t head_rows, int64_t row0, int rows,
                       int nb, int64_t row_bytes, const float* __restrict__ x, int64_t x_stride,
                       float* __restrict__ y, int64_t y_stride) {
  const int h = blockIdx.y;
  const int r = blockIdx.x * kWarps + threadIdx.x / detail::kWarp;
  if (r >= rows) return;
  const uint8_t* const rp[1] = {w + (h * head_rows + row0 + r) * row_bytes};
  const float* const xp[1] = {x + h * x_stride};
  float out[1];
  detail::warp_rows_dot<T, 1>(rp, xp, nb, out);
  if (threadIdx.x % detail::kWarp == 0) y[h * y_stride + r] = out[0];
}

}  // namespace

cudaError_t launch_head_matvec(QuantType type, const void* w, int64_t head_rows, int64_t row0,
                               int64_t rows, int64_t cols, int64_t heads, const float* x,
                               int64_t x_stride, float* y, int64_t y_stride, cudaStream_t stream) {
  if (!detail::rowdot_supported(type) || w == nullptr || x == nullptr || y == nullptr ||
      !detail::rowdot_aligned(type, w) || rows < 1 || rows > (int64_t{1} << 24) || row0 < 0 ||
      head_rows < row0 + rows || heads < 1 || heads > 65535 || cols < 32 || cols % 32 != 0 ||
      cols > (1 << 24) || (reinterpret_cast<uintptr_t>(x) & 15u) != 0 || x_stride < 0 ||
      x_stride % 4 != 0 || y_stride < 0 || (heads > 1 && y_stride < rows)) {
    return cudaErrorInvalidValue;
  }
  const int nb = static_cast<int>(cols / 32);
  const int64_t rb = row_bytes(type, cols);
  const auto* wb = static_cast<const uint8_t*>(w);
  const dim3 grid(static_cast<unsigned>((rows + kWarps - 1) / kWarps),
                  static_cast<unsigned>(heads));
  const int r = static_cast<int>(rows);
  switch (type) {
    case QuantType::Q8_0:
      head_matvec_kernel<QuantType::Q8_0><<<grid, kWarps * 32, 0, stream>>>(
          wb, head_rows, row0, r, nb, rb, x, x_stride, y, y_stride);
      break;
    case QuantType::Q4_0:
      head_matvec_kernel<QuantType::Q4_0><<<grid, kWarps * 32, 0, stream>>>(
          wb, head_rows, row0, r, nb, rb, x, x_stride, y, y_stride);
      break;
    case QuantType::BF16:
      head_matvec_kernel<QuantType::BF16><<<grid, kWarps * 32, 0, stream>>>(
          wb, head_rows, row0, r, nb, rb, x, x_stride, y, y_stride);
      break;
    default:
      head_matvec_kernel<QuantType::F32><<<grid, kWarps * 32, 0, stream>>>(
          wb, head_rows, row0, r, nb, rb, x, x_stride, y, y_stride);
      break;
  }
  return cudaGetLastError();
}

}  // namespace ktune::cuda
