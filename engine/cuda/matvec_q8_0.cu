// Decode matvec for Q8_0 weights (ggml block_q8_0: fp16 d, then 32 int8; weight = d * q).
//
// Same shape as matvec_q4_0.cu: one warp per R = 2 rows (x loaded once for both), 4 warps per
// block, each lane a PAIR of 34-byte blocks = 68 bytes = seventeen aligned 32-bit words when the
// row starts 4-byte aligned with an even block count; the even block's quants straddle words
// (bytes 2..33) and are realigned with funnel shifts, the odd block's scale is the high half of
// word 8 and its quants words 9..16. x stays float32; fixed-order sums then a warp butterfly.
#include "cuda/common.cuh"
#include "cuda/matvec_variants.h"
#include "ktune/engine/cuda/kernels.h"

namespace ktune::cuda {
namespace {

using detail::fp16_bits_to_float;

// Sum over one block of q * x: q holds the 32 int8 quants little-endian in 8 words.
__device__ __forceinline__ float q8_block_dot(const uint32_t q[8], const float* __restrict__ xb) {
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int v = static_cast<int8_t>(static_cast<uint8_t>((q[i] >> (8 * k)) & 0xffu));
      s = fmaf(static_cast<float>(v), xb[4 * i + k], s);
    }
  }
  return s;
}

// The same sum without integer-to-float conversions (quarter rate on sm_90): q ^ 0x80 = q + 128
// as an unsigned byte, placed by one byte permute into the mantissa of 2^23 (float bits
// 0x4B0000nn), and one exact subtraction of 8388736 gives q as a float. Bit-identical.
__device__ __forceinline__ float q8_block_dot_magic(const uint32_t q[8],
                                                    const float* __restrict__ xb) {
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t u = q[i] ^ 0x80808080u;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float f = __uint_as_float(__byte_perm(u, 0x4b000000u, 0x7440u + k)) - 8388736.0f;
      s = fmaf(f, xb[4 * i + k], s);
    }
  }
  return s;
}

template <int R, bool kMagic>
__global__ void matvec_q8_0_pairs(const uint8_t* __restrict__ w, const float* __restrict__ x,
                                  int rows, int npairs, int64_t row_bytes, float* __restrict__ y) {
  const int lane = threadIdx.x % 32;
  const int64_t r0 = (static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32) * R;
  if (r0 >= rows) return;
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.0f;
  for (int p = lane; p < npairs; p += 32) {
    uint32_t wv[R][17];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r0 + r < rows) {
        const uint32_t* src =
            reinterpret_cast<const uint32_t*>(w + (r0 + r) * row_bytes + int64_t{68} * p);
#pragma unroll
        for (int i = 0; i < 17; ++i) wv[r][i] = __ldg(src + i);
      }
    }
    const float4* x4 = reinterpret_cast<const float4*>(x + int64_t{64} * p);
    float xv[64];
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const float4 t = __ldg(x4 + i);
      xv[4 * i] = t.x;
      xv[4 * i + 1] = t.y;
      xv[4 * i + 2] = t.z;
      xv[4 * i + 3] = t.w;
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r0 + r < rows) {
        uint32_t q0[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) q0[i] = __funnelshift_r(wv[r][i], wv[r][i + 1], 16);
        uint32_t q1[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) q1[i] = wv[r][9 + i];
        const float d0 = fp16_bits_to_float(static_cast<uint16_t>(wv[r][0] & 0xffffu));
        const float d1 = fp16_bits_to_float(static_cast<uint16_t>(wv[r][8] >> 16));
        if (kMagic) {
          acc[r] = fmaf(d0, q8_block_dot_magic(q0, xv), acc[r]);
          acc[r] = fmaf(d1, q8_block_dot_magic(q1, xv + 32), acc[r]);
        } else {
          acc[r] = fmaf(d0, q8_block_dot(q0, xv), acc[r]);
          acc[r] = fmaf(d1, q8_block_dot(q1, xv + 32), acc[r]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float s = detail::warp_sum(acc[r]);
    if (lane == 0 && r0 + r < rows) y[r0 + r] = s;
  }
}

// Any layout with 2-byte alignment: one block per lane, 16-bit loads.
__global__ void matvec_q8_0_generic(const uint8_t* __restrict__ w, const float* __restrict__ x,
                                    int rows, int nb, int64_t row_bytes, float* __restrict__ y) {
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (r >= rows) return;
  float acc = 0.0f;
  for (int b = lane; b < nb; b += 32) {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(w + r * row_bytes + int64_t{34} * b);
    uint16_t h[17];
#pragma unroll
    for (int i = 0; i < 17; ++i) h[i] = __ldg(src + i);
    uint32_t q[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) q[i] = h[1 + 2 * i] | (static_cast<uint32_t>(h[2 + 2 * i]) << 16);
    acc = fmaf(fp16_bits_to_float(h[0]), q8_block_dot(q, x + int64_t{32} * b), acc);
  }
  acc = detail::warp_sum(acc);
  if (lane == 0) y[r] = acc;
}

}  // namespace

cudaError_t launch_matvec_q8_0_variant(const void* w, const float* x, int64_t rows, int64_t cols,
                                       float* y, int rows_per_warp, cudaStream_t stream) {
  if (rows < 0 || rows > 0x7fffffff || cols <= 0 || cols % 32 != 0 || cols > (1 << 28) ||
      (reinterpret_cast<uintptr_t>(w) & 1u) != 0 || (reinterpret_cast<uintptr_t>(x) & 15u) != 0) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  const int nb = static_cast<int>(cols / 32);
  const int64_t row_bytes = int64_t{34} * nb;
  const uint8_t* wb = static_cast<const uint8_t*>(w);
  constexpr int kWarps = 4;
  const bool pairs = nb % 2 == 0 && (reinterpret_cast<uintptr_t>(w) & 3u) == 0;
  if (pairs && rows_per_warp == 3) {  // R = 2 with the conversion-free dequantization
    const int64_t grid = (rows + 2 * kWarps - 1) / (2 * kWarps);
    matvec_q8_0_pairs<2, true><<<static_cast<unsigned>(grid), 32 * kWarps, 0, stream>>>(
        wb, x, static_cast<int>(rows), nb / 2, row_bytes, y);
  } else if (pairs && rows_per_warp == 2) {
    const int64_t grid = (rows + 2 * kWarps - 1) / (2 * kWarps);
    matvec_q8_0_pairs<2, false><<<static_cast<unsigned>(grid), 32 * kWarps, 0, stream>>>(
        wb, x, static_cast<int>(rows), nb / 2, row_bytes, y);
  } else if (pairs && rows_per_warp == 1) {
    const int64_t grid = (rows + kWarps - 1) / kWarps;
    matvec_q8_0_pairs<1, false><<<static_cast<unsigned>(grid), 32 * kWarps, 0, stream>>>(
        wb, x, static_cast<int>(rows), nb / 2, row_bytes, y);
  } else {
    const int64_t grid = (rows + kWarps - 1) / kWarps;
    matvec_q8_0_generic<<<static_cast<unsigned>(grid), 32 * kWarps, 0, stream>>>(
        wb, x, static_cast<int>(rows), nb, row_bytes, y);
  }
  return cudaGetLastError();
}

cudaError_t launch_matvec_q8_0(const void* w, const float* x, int64_t rows, int64_t cols, float* y,
                               cudaStream_t stream) {
  return launch_matvec_q8_0_variant(w, x, rows, cols, y, 2, stream);
}

}  // namespace ktune::cuda
