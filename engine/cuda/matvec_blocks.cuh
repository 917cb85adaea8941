// The decode matvec of ggml's 32-weight blocks with an fp16 scale, shared by matvec_q4_0.cu and
// matvec_q8_0.cu: each of them names its block format and its kernels, the loops and the launcher
// are here.
//
// A block format B gives kWords (32-bit words of quants per block: 4 for Q4_0, 8 for Q8_0; the
// block is 2 + 4 * kWords bytes) and the block's dot product with 32 values of x, dot(q, xb), and
// the same sum without integer-to-float conversions, dot_magic(q, xb) (bit-identical).
//
// Paired path: one warp per R rows (R = 2: x loaded once for both), 4 warps per block, each lane
// a PAIR of blocks = 2 * kWords + 1 aligned 32-bit words when the row starts 4-byte aligned with
// an even block count; the even block's scale is the low half of word 0 and its quants straddle
// words (bytes 2 ..) and are realigned with funnel shifts, the odd block's scale is the high half
// of word kWords and its quants the words after it. Generic path (odd block count, 2-byte aligned
// rows): one block per lane, 16-bit loads. x stays float32; each lane sums its blocks in a fixed
// order, then a warp butterfly: deterministic.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common.cuh"

namespace ktune::cuda::detail {

template <class B>
constexpr int64_t kBlockBytes = 2 + 4 * B::kWords;

template <class B, int R, bool kMagic>
__device__ __forceinline__ void matvec_block_pairs(const uint8_t* __restrict__ w,
                                                   const float* __restrict__ x, int rows,
                                                   int npairs, int64_t row_bytes,
                                                   float* __restrict__ y) {
  constexpr int kW = B::kWords;
  const int lane = threadIdx.x % 32;
  const int64_t r0 = (static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32) * R;
  if (r0 >= rows) return;
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.0f;
  for (int p = lane; p < npairs; p += 32) {
    uint32_t wv[R][2 * kW + 1];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r0 + r < rows) {
        const uint32_t* src =
            reinterpret_cast<const uint32_t*>(w + (r0 + r) * row_bytes + 2 * kBlockBytes<B> * p);
#pragma unroll
        for (int i = 0; i < 2 * kW + 1; ++i) wv[r][i] = __ldg(src + i);
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
        uint32_t q0[kW];
#pragma unroll
        for (int i = 0; i < kW; ++i) q0[i] = __funnelshift_r(wv[r][i], wv[r][i + 1], 16);
        uint32_t q1[kW];
#pragma unroll
        for (int i = 0; i < kW; ++i) q1[i] = wv[r][kW + 1 + i];
        const float d0 = fp16_bits_to_float(static_cast<uint16_t>(wv[r][0] & 0xffffu));
        const float d1 = fp16_bits_to_float(static_cast<uint16_t>(wv[r][kW] >> 16));
        if (kMagic) {
          acc[r] = fmaf(d0, B::dot_magic(q0, xv), acc[r]);
          acc[r] = fmaf(d1, B::dot_magic(q1, xv + 32), acc[r]);
        } else {
          acc[r] = fmaf(d0, B::dot(q0, xv), acc[r]);
          acc[r] = fmaf(d1, B::dot(q1, xv + 32), acc[r]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float s = warp_sum(acc[r]);
    if (lane == 0 && r0 + r < rows) y[r0 + r] = s;
  }
}

template <class B>
__device__ __forceinline__ void matvec_block_generic(const uint8_t* __restrict__ w,
                                                     const float* __restrict__ x, int rows, int nb,
                                                     int64_t row_bytes, float* __restrict__ y) {
  constexpr int kW = B::kWords;
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (r >= rows) return;
  float acc = 0.0f;
  for (int b = lane; b < nb; b += 32) {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(w + r * row_bytes + kBlockBytes<B> * b);
    uint16_t h[2 * kW + 1];
#pragma unroll
    for (int i = 0; i < 2 * kW + 1; ++i) h[i] = __ldg(src + i);
    uint32_t q[kW];
#pragma unroll
    for (int i = 0; i < kW; ++i) q[i] = h[1 + 2 * i] | (static_cast<uint32_t>(h[2 + 2 * i]) << 16);
    acc = fmaf(fp16_bits_to_float(h[0]), B::dot(q, x + int64_t{32} * b), acc);
  }
  acc = warp_sum(acc);
  if (lane == 0) y[r] = acc;
}

// The kernels' signature: (w, x, rows, npairs or nb, row_bytes, y).
using MatvecBlockKernel = void (*)(const uint8_t*, const float*, int, int, int64_t, float*);

// launch_matvec_q4_0_variant's contract (matvec_variants.h) for format B, whose kernels are
// kPairs2Magic (R = 2, dot_magic), kPairs2 (R = 2), kPairs1 (R = 1) and kGeneric.
template <class B, MatvecBlockKernel kPairs2Magic, MatvecBlockKernel kPairs2,
          MatvecBlockKernel kPairs1, MatvecBlockKernel kGeneric>
cudaError_t launch_matvec_blocks(const void* w, const float* x, int64_t rows, int64_t cols,
                                 float* y, int rows_per_warp, cudaStream_t stream) {
  if (rows < 0 || rows > 0x7fffffff || cols <= 0 || cols % 32 != 0 || cols > (1 << 28) ||
      (reinterpret_cast<uintptr_t>(w) & 1u) != 0 || (reinterpret_cast<uintptr_t>(x) & 15u) != 0) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  const int nb = static_cast<int>(cols / 32);
  const int64_t row_bytes = kBlockBytes<B> * nb;
  const uint8_t* wb = static_cast<const uint8_t*>(w);
  constexpr int kWarps = 4;
  const bool pairs = nb % 2 == 0 && (reinterpret_cast<uintptr_t>(w) & 3u) == 0;
  if (pairs && rows_per_warp == 3) {  // R = 2 with the conversion-free dequantization
    const int64_t grid = (rows + 2 * kWarps - 1) / (2 * kWarps);
    kPairs2Magic<<<static_cast<unsigned>(grid), 32 * kWarps, 0, stream>>>(
        wb, x, static_cast<int>(rows), nb / 2, row_bytes, y);
  } else if (pairs && rows_per_warp == 2) {
    const int64_t grid = (rows + 2 * kWarps - 1) / (2 * kWarps);
    kPairs2<<<static_cast<unsigned>(grid), 32 * kWarps, 0, stream>>>(wb, x, static_cast<int>(rows),
                                                                     nb / 2, row_bytes, y);
  } else if (pairs && rows_per_warp == 1) {
    const int64_t grid = (rows + kWarps - 1) / kWarps;
    kPairs1<<<static_cast<unsigned>(grid), 32 * kWarps, 0, stream>>>(wb, x, static_cast<int>(rows),
                                                                     nb / 2, row_bytes, y);
  } else {
    const int64_t grid = (rows + kWarps - 1) / kWarps;
    kGeneric<<<static_cast<unsigned>(grid), 32 * kWarps, 0, stream>>>(wb, x, static_cast<int>(rows),
                                                                      nb, row_bytes, y);
  }
  return cudaGetLastError();
}

}  // namespace ktune::cuda::detail
