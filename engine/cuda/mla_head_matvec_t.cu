// Transposed per-head matvec (launch_head_matvec_t, mla_kernels.h): y[h][c] = sum_i x[h][i] *
// W[h * head_rows + row0 + i][c]. The query absorption of attn_kv_b (GGUFs from before the split
// into attn_k_b / attn_v_b, and Hugging Face checkpoints): head h's key rows are kv_lora_rank
// long and the absorbed query is their sum weighted by q_nope, as the CPU engine computes it
// (dequantize each row, y += x_i * row). One thread per output column walks the rows in order
// (fixed order, no atomics); a warp reads consecutive elements of a row, so loads coalesce.
#include "cuda/common.cuh"
#include "ktune/engine/cuda/mla_kernels.h"

namespace ktune::cuda {
namespace {

constexpr int kThreads = 128;

// Element c of a row of `type` (ggml layouts, dequantized as quant.cpp's dequantize_row).
template <QuantType T>
__device__ __forceinline__ float element(const uint8_t* __restrict__ row, int c) {
  if constexpr (T == QuantType::F32) {
    return __ldg(reinterpret_cast<const float*>(row) + c);
  } else if constexpr (T == QuantType::F16) {
    return detail::fp16_bits_to_float(__ldg(reinterpret_cast<const uint16_t*>(row) + c));
  } else if constexpr (T == QuantType::BF16) {
    return detail::bf16_bits_to_float(__ldg(reinterpret_cast<const uint16_t*>(row) + c));
  } else if constexpr (T == QuantType::Q8_0) {
    const uint8_t* blk = row + (c / 32) * 34;
    const float d =
        detail::fp16_bits_to_float(static_cast<uint16_t>(blk[0] | (uint16_t{blk[1]} << 8)));
    return static_cast<float>(static_cast<int8_t>(blk[2 + c % 32])) * d;
  } else {  // Q4_0
    const uint8_t* blk = row + (c / 32) * 18;
    const float d =
        detail::fp16_bits_to_float(static_cast<uint16_t>(blk[0] | (uint16_t{blk[1]} << 8)));
    const int j = c % 32;
    const int q = j < 16 ? (blk[2 + j] & 0x0F) : (blk[2 + j - 16] >> 4);
    return static_cast<float>(q - 8) * d;
  }
}

template <QuantType T>
__global__ void __launch_bounds__(kThreads)
    head_matvec_t_kernel(const uint8_t* __restrict__ w, int64_t head_rows, int64_t row0, int rows,
                         int cols, int64_t row_bytes, const float* __restrict__ x, int64_t x_stride,
                         float* __restrict__ y, int64_t y_stride) {
  const int h = blockIdx.y;
  const int c = blockIdx.x * kThreads + threadIdx.x;
  if (c >= cols) return;
  const uint8_t* base = w + (h * head_rows + row0) * row_bytes;
  const float* xh = x + h * x_stride;
  float acc = 0.0f;
  for (int i = 0; i < rows; ++i) acc = fmaf(xh[i], element<T>(base + i * row_bytes, c), acc);
  y[h * y_stride + c] = acc;
}

}  // namespace

cudaError_t launch_head_matvec_t(QuantType type, const void* w, int64_t head_rows, int64_t row0,
                                 int64_t rows, int64_t cols, int64_t heads, const float* x,
                                 int64_t x_stride, float* y, int64_t y_stride,
                                 cudaStream_t stream) {
  const bool quant = type == QuantType::Q8_0 || type == QuantType::Q4_0;
  const bool ok_type =
      quant || type == QuantType::F32 || type == QuantType::F16 || type == QuantType::BF16;
  const uintptr_t wa = reinterpret_cast<uintptr_t>(w);
  if (!ok_type || w == nullptr || x == nullptr || y == nullptr || rows < 1 ||
      rows > (int64_t{1} << 24) || row0 < 0 || head_rows < row0 + rows || heads < 1 ||
      heads > 65535 || cols < 1 || cols > (1 << 24) || (quant && cols % 32 != 0) ||
      (type == QuantType::F32 ? (wa & 3u) != 0 : (wa & 1u) != 0) || x_stride < 0 || y_stride < 0 ||
      (heads > 1 && y_stride < cols)) {
    return cudaErrorInvalidValue;
  }
  const int64_t rb = row_bytes(type, cols);
  const auto* wb = static_cast<const uint8_t*>(w);
  const dim3 grid(static_cast<unsigned>((cols + kThreads - 1) / kThreads),
                  static_cast<unsigned>(heads));
  const int r = static_cast<int>(rows), c = static_cast<int>(cols);
  switch (type) {
    case QuantType::Q8_0:
      head_matvec_t_kernel<QuantType::Q8_0>
          <<<grid, kThreads, 0, stream>>>(wb, head_rows, row0, r, c, rb, x, x_stride, y, y_stride);
      break;
    case QuantType::Q4_0:
      head_matvec_t_kernel<QuantType::Q4_0>
          <<<grid, kThreads, 0, stream>>>(wb, head_rows, row0, r, c, rb, x, x_stride, y, y_stride);
      break;
    case QuantType::BF16:
      head_matvec_t_kernel<QuantType::BF16>
          <<<grid, kThreads, 0, stream>>>(wb, head_rows, row0, r, c, rb, x, x_stride, y, y_stride);
      break;
    case QuantType::F16:
      head_matvec_t_kernel<QuantType::F16>
          <<<grid, kThreads, 0, stream>>>(wb, head_rows, row0, r, c, rb, x, x_stride, y, y_stride);
      break;
    default:
      head_matvec_t_kernel<QuantType::F32>
          <<<grid, kThreads, 0, stream>>>(wb, head_rows, row0, r, c, rb, x, x_stride, y, y_stride);
      break;
  }
  return cudaGetLastError();
}

}  // namespace ktune::cuda
