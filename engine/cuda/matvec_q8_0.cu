// Decode matvec for Q8_0 weights (ggml block_q8_0: fp16 d, then 32 int8; weight = d * q).
//
// Same shape as matvec_q4_0.cu: one warp per R = 2 rows (x loaded once for both), 4 warps per
// block, each lane a PAIR of 34-byte blocks = 68 bytes = seventeen aligned 32-bit words when the
// row starts 4-byte aligned with an even block count; the even block's quants straddle words
// (bytes 2..33) and are realigned with funnel shifts, the odd block's scale is the high half of
// word 8 and its quants words 9..16. x stays float32; fixed-order sums then a warp butterfly.
// The loops and the launcher are matvec_blocks.cuh's (shared with Q4_0); here: the format.
#include "cuda/common.cuh"
#include "cuda/matvec_blocks.cuh"
#include "cuda/matvec_variants.h"
#include "ktune/engine/cuda/kernels.h"

namespace ktune::cuda {
namespace {

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

// The format for matvec_blocks.cuh.
struct BlockQ8_0 {
  static constexpr int kWords = 8;
  __device__ __forceinline__ static float dot(const uint32_t q[8], const float* __restrict__ xb) {
    return q8_block_dot(q, xb);
  }
  __device__ __forceinline__ static float dot_magic(const uint32_t q[8],
                                                    const float* __restrict__ xb) {
    return q8_block_dot_magic(q, xb);
  }
};

template <int R, bool kMagic>
__global__ void matvec_q8_0_pairs(const uint8_t* __restrict__ w, const float* __restrict__ x,
                                  int rows, int npairs, int64_t row_bytes, float* __restrict__ y) {
  detail::matvec_block_pairs<BlockQ8_0, R, kMagic>(w, x, rows, npairs, row_bytes, y);
}

// Any layout with 2-byte alignment: one block per lane, 16-bit loads.
__global__ void matvec_q8_0_generic(const uint8_t* __restrict__ w, const float* __restrict__ x,
                                    int rows, int nb, int64_t row_bytes, float* __restrict__ y) {
  detail::matvec_block_generic<BlockQ8_0>(w, x, rows, nb, row_bytes, y);
}

}  // namespace

cudaError_t launch_matvec_q8_0_variant(const void* w, const float* x, int64_t rows, int64_t cols,
                                       float* y, int rows_per_warp, cudaStream_t stream) {
  return detail::launch_matvec_blocks<BlockQ8_0, matvec_q8_0_pairs<2, true>,
                                      matvec_q8_0_pairs<2, false>, matvec_q8_0_pairs<1, false>,
                                      matvec_q8_0_generic>(w, x, rows, cols, y, rows_per_warp,
                                                           stream);
}

cudaError_t launch_matvec_q8_0(const void* w, const float* x, int64_t rows, int64_t cols, float* y,
                               cudaStream_t stream) {
  return launch_matvec_q8_0_variant(w, x, rows, cols, y, 2, stream);
}

}  // namespace ktune::cuda
