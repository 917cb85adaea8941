// Decode matvec for Q4_0 weights (ggml block_q4_0: fp16 d, then 16 bytes; byte j holds element
// j in its low nibble and element j+16 in its high nibble, both stored as q+8).
//
// Shape: one warp per R rows (R = 2: every x value loaded from L1 serves two rows, halving the
// L1 traffic of x, which is 7x the weight bytes for Q4_0), 4 warps per block. Each lane takes a
// PAIR of 18-byte blocks (36 bytes = nine aligned 32-bit words when the row starts 4-byte aligned
// and has an even block count, the case for every real model width), so the weights of a warp
// are 1152 contiguous bytes read with nine 32-bit loads per lane; the odd block's scale and the
// even block's quants straddle words and are pulled out with funnel shifts. Dequantization is in
// registers, x stays float32 (no Q8 activation quantization: exact products, float32 sums).
// Each lane sums its blocks in a fixed order, then a warp butterfly: deterministic. Other
// layouts (odd block count, 2-byte aligned rows) take a plain one-block-per-lane path.
// The loops and the launcher are matvec_blocks.cuh's (shared with Q8_0); here: the format.
#include "cuda/common.cuh"
#include "cuda/matvec_blocks.cuh"
#include "cuda/matvec_variants.h"
#include "ktune/engine/cuda/kernels.h"

namespace ktune::cuda {
namespace {

// Sum over one block of (q - 8) * x: q0..q3 hold the 16 quant bytes little-endian.
__device__ __forceinline__ float q4_block_dot(const uint32_t q[4], const float* __restrict__ xb) {
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t byte = (q[i] >> (8 * k)) & 0xffu;
      const int j = 4 * i + k;
      s = fmaf(static_cast<float>(static_cast<int>(byte & 15u) - 8), xb[j], s);
      s = fmaf(static_cast<float>(static_cast<int>(byte >> 4) - 8), xb[j + 16], s);
    }
  }
  return s;
}

// The same sum without integer-to-float conversions (quarter rate on sm_90): each nibble is
// placed by one byte permute into the mantissa of 2^23 (float bits 0x4B0000nn = 8388608 + nn),
// and one exact subtraction of 8388616 gives q - 8 as a float. Bit-identical to q4_block_dot.
__device__ __forceinline__ float q4_block_dot_magic(const uint32_t q[4],
                                                    const float* __restrict__ xb) {
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t lo = q[i] & 0x0f0f0f0fu;
    const uint32_t hi = (q[i] >> 4) & 0x0f0f0f0fu;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int j = 4 * i + k;
      const float fl = __uint_as_float(__byte_perm(lo, 0x4b000000u, 0x7440u + k)) - 8388616.0f;
      const float fh = __uint_as_float(__byte_perm(hi, 0x4b000000u, 0x7440u + k)) - 8388616.0f;
      s = fmaf(fl, xb[j], s);
      s = fmaf(fh, xb[j + 16], s);
    }
  }
  return s;
}

// The format for matvec_blocks.cuh.
struct BlockQ4_0 {
  static constexpr int kWords = 4;
  __device__ __forceinline__ static float dot(const uint32_t q[4], const float* __restrict__ xb) {
    return q4_block_dot(q, xb);
  }
  __device__ __forceinline__ static float dot_magic(const uint32_t q[4],
                                                    const float* __restrict__ xb) {
    return q4_block_dot_magic(q, xb);
  }
};

template <int R, bool kMagic>
__global__ void matvec_q4_0_pairs(const uint8_t* __restrict__ w, const float* __restrict__ x,
                                  int rows, int npairs, int64_t row_bytes, float* __restrict__ y) {
  detail::matvec_block_pairs<BlockQ4_0, R, kMagic>(w, x, rows, npairs, row_bytes, y);
}

// Any layout with 2-byte alignment: one block per lane, 16-bit loads.
__global__ void matvec_q4_0_generic(const uint8_t* __restrict__ w, const float* __restrict__ x,
                                    int rows, int nb, int64_t row_bytes, float* __restrict__ y) {
  detail::matvec_block_generic<BlockQ4_0>(w, x, rows, nb, row_bytes, y);
}

}  // namespace

cudaError_t launch_matvec_q4_0_variant(const void* w, const float* x, int64_t rows, int64_t cols,
                                       float* y, int rows_per_warp, cudaStream_t stream) {
  return detail::launch_matvec_blocks<BlockQ4_0, matvec_q4_0_pairs<2, true>,
                                      matvec_q4_0_pairs<2, false>, matvec_q4_0_pairs<1, false>,
                                      matvec_q4_0_generic>(w, x, rows, cols, y, rows_per_warp,
                                                           stream);
}

cudaError_t launch_matvec_q4_0(const void* w, const float* x, int64_t rows, int64_t cols, float* y,
                               cudaStream_t stream) {
  return launch_matvec_q4_0_variant(w, x, rows, cols, y, 2, stream);
}

}  // namespace ktune::cuda
