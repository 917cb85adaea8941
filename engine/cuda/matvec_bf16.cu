// Decode matvec for BF16 weights (raw bfloat16 bits, as GGUF and safetensors store them), plus
// launch_matvec, the dispatcher over weight types.
//
// One warp per R = 2 rows, 4 warps per block; each lane reads 8 weights per row with one 16-byte
// load (rows 16-byte aligned when cols % 8 == 0 and the base is aligned) and the matching 8
// floats of x with two 16-byte loads, shared by both rows. bf16 -> float is a shift, exact.
// Other layouts take a one-element-pair-per-lane path with 32-bit loads. Fixed-order sums, then
// a warp butterfly: deterministic.
#include "cuda/common.cuh"
#include "ktune/engine/cuda/kernels.h"
#include "ktune/engine/cuda/kquant_kernels.h"

namespace ktune::cuda {
namespace {

using detail::bf16_bits_to_float;

template <int R>
__global__ void matvec_bf16_vec8(const uint16_t* __restrict__ w, const float* __restrict__ x,
                                 int rows, int64_t cols, float* __restrict__ y) {
  const int lane = threadIdx.x % 32;
  const int64_t r0 = (static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32) * R;
  if (r0 >= rows) return;
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.0f;
  const int64_t n8 = cols / 8;
  for (int64_t c = lane; c < n8; c += 32) {
    uint4 wv[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r0 + r < rows) wv[r] = __ldg(reinterpret_cast<const uint4*>(w + (r0 + r) * cols) + c);
    }
    const float4 xa = __ldg(reinterpret_cast<const float4*>(x) + 2 * c);
    const float4 xb = __ldg(reinterpret_cast<const float4*>(x) + 2 * c + 1);
    const float xv[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r0 + r < rows) {
        const uint32_t u[4] = {wv[r].x, wv[r].y, wv[r].z, wv[r].w};
        float s = acc[r];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          s = fmaf(__uint_as_float(u[i] << 16), xv[2 * i], s);
          s = fmaf(__uint_as_float(u[i] & 0xffff0000u), xv[2 * i + 1], s);
        }
        acc[r] = s;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float s = detail::warp_sum(acc[r]);
    if (lane == 0 && r0 + r < rows) y[r0 + r] = s;
  }
}

__global__ void matvec_bf16_generic(const uint16_t* __restrict__ w, const float* __restrict__ x,
                                    int rows, int64_t cols, float* __restrict__ y) {
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (r >= rows) return;
  const uint16_t* wr = w + r * cols;
  float acc = 0.0f;
  for (int64_t c = lane; c < cols; c += 32)
    acc = fmaf(bf16_bits_to_float(__ldg(wr + c)), x[c], acc);
  acc = detail::warp_sum(acc);
  if (lane == 0) y[r] = acc;
}

}  // namespace

cudaError_t launch_matvec_bf16(const void* w, const float* x, int64_t rows, int64_t cols, float* y,
                               cudaStream_t stream) {
  if (rows < 0 || rows > 0x7fffffff || cols <= 0 || (reinterpret_cast<uintptr_t>(w) & 1u) != 0 ||
      (reinterpret_cast<uintptr_t>(x) & 3u) != 0) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  constexpr int kWarps = 4;
  const uint16_t* wh = static_cast<const uint16_t*>(w);
  const bool vec8 = cols % 8 == 0 && (reinterpret_cast<uintptr_t>(w) & 15u) == 0 &&
                    (reinterpret_cast<uintptr_t>(x) & 15u) == 0;
  if (vec8) {
    const int64_t grid = (rows + 2 * kWarps - 1) / (2 * kWarps);
    matvec_bf16_vec8<2><<<static_cast<unsigned>(grid), 32 * kWarps, 0, stream>>>(
        wh, x, static_cast<int>(rows), cols, y);
  } else {
    const int64_t grid = (rows + kWarps - 1) / kWarps;
    matvec_bf16_generic<<<static_cast<unsigned>(grid), 32 * kWarps, 0, stream>>>(
        wh, x, static_cast<int>(rows), cols, y);
  }
  return cudaGetLastError();
}

cudaError_t launch_matvec(QuantType type, const void* w, const float* x, int64_t rows, int64_t cols,
                          float* y, cudaStream_t stream) {
  switch (type) {
    case QuantType::Q4_0:
      return launch_matvec_q4_0(w, x, rows, cols, y, stream);
    case QuantType::Q8_0:
      return launch_matvec_q8_0(w, x, rows, cols, y, stream);
    case QuantType::BF16:
      return launch_matvec_bf16(w, x, rows, cols, y, stream);
    case QuantType::Q4_K:
    case QuantType::Q5_K:
    case QuantType::Q6_K:
      return launch_matvec_kquant(type, w, x, rows, cols, y, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace ktune::cuda
