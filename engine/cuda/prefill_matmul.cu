// Tensor-core matmul for prefill: Y = A · W^T with A fp16 activations and W a quantized weight
// matrix in ggml layout (Q4_0, Q8_0, BF16, F32), dense or grouped by expert (the MoE of a chunk).
// K-quant weights (Q4_K, Q5_K, Q6_K) take prefill_matmul_kquant.cu's kernel, with the same tile
// and epilogue (prefill_mma.cuh).
//
// Prefill is compute-bound (a 512-token chunk multiplies every weight 512 times), so the inner
// product runs on tensor cores: mma.sync m16n8k16, fp16 inputs, fp32 accumulation.
//
// Tile: 64 rows (tokens) x 64 columns (weight rows) per block of 4 warps; warp w owns columns
// [16w, 16w + 16) for all 64 rows (4 x 2 mma tiles), so every weight element of the tile is
// dequantized exactly once per block, by the thread whose mma fragment needs it, straight from
// the raw bytes in shared memory into registers. The reduction advances 64 elements (two quant
// blocks) per stage; stages are filled with cp.async (A rows in 16-byte pieces, weight rows
// byte-exact as stored) while the previous stage computes.
//
// Dequantization is exact up to one fp16 rounding: Q4_0 nibbles and Q8_0 bytes become the
// fp16 integers q (by OR-ing them into the mantissa of 1024 or 1152 and subtracting, exact),
// then q * d is rounded once (fp16 product); BF16 and F32 are rounded to fp16.
//
// SwiGLU: the block holds the gate and the up tile of the same 64 columns and writes
// fp16(silu(g) * u) (the decode kernels' silu arithmetic) instead of either product.
//
// Every output element is one thread's fixed-order mma chain over k: deterministic, and a row's
// result depends only on that row and W, never on the other rows of its tile.
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/prefill_mma.cuh"
#include "ktune/engine/cuda/prefill_kernels.h"

namespace ktune::cuda {
namespace {

using namespace prefill_detail;

// Per weight type: bytes of one row per stage (kBK elements), the padded row stride of the raw
// stage in shared memory, the cp.async piece size, and the pipeline depth.
template <QuantType T>
struct Fmt;
template <>
struct Fmt<QuantType::Q4_0> {
  static constexpr int kStep = 36, kStride = 36, kPiece = 4, kStages = 3;
};
template <>
struct Fmt<QuantType::Q8_0> {
  static constexpr int kStep = 68, kStride = 68, kPiece = 4, kStages = 3;
};
template <>
struct Fmt<QuantType::BF16> {
  static constexpr int kStep = 128, kStride = 144, kPiece = 16, kStages = 2;
};
template <>
struct Fmt<QuantType::F32> {
  static constexpr int kStep = 256, kStride = 288, kPiece = 16, kStages = 2;
};

template <QuantType T, bool Swiglu>
__host__ __device__ constexpr int stage_bytes() {
  return kAStageBytes + (Swiglu ? 2 : 1) * kBN * Fmt<T>::kStride;
}
template <QuantType T, bool Swiglu>
__host__ __device__ constexpr int smem_bytes() {
  return Fmt<T>::kStages * stage_bytes<T, Swiglu>();
}

// The B fragments of one quant-block-sized k32 slice (elements 32*bi .. 32*bi + 31 of the stage)
// of weight row `row` (raw stage bytes): f[0], f[1] for the first k16 (elements 2t, 2t+1 and
// 2t+8, 2t+9 relative to it, t = lane % 4), f[2], f[3] for the second.
template <QuantType T>
__device__ __forceinline__ void b_frags(const uint8_t* row, int bi, int t, uint32_t (&f)[4]);

template <>
__device__ __forceinline__ void b_frags<QuantType::Q4_0>(const uint8_t* row, int bi, int t,
                                                         uint32_t (&f)[4]) {
  const uint8_t* blk = row + bi * 18;
  const __half d = __ushort_as_half(*reinterpret_cast<const uint16_t*>(blk));
  const uint32_t lo = *reinterpret_cast<const uint16_t*>(blk + 2 + 2 * t);
  const uint32_t hi = *reinterpret_cast<const uint16_t*>(blk + 2 + 2 * t + 8);
  const uint32_t w = lo | (hi << 16);              // qs[2t], qs[2t+1], qs[2t+8], qs[2t+9]
  const uint32_t p01 = __byte_perm(w, 0, 0x4140);  // qs[2t] | qs[2t+1] << 16
  const uint32_t p23 = __byte_perm(w, 0, 0x4342);  // qs[2t+8] | qs[2t+9] << 16
  const __half2 d2 = __half2half2(d);
  const __half2 bias = __float2half2_rn(1032.0f);  // 1024 (the exponent trick) + 8 (Q4_0 zero)
  const uint32_t m = 0x000F000Fu, e = 0x64006400u;
  // Low nibbles are elements 0..15 of the block, high nibbles 16..31.
  f[0] = h2_bits(__hmul2(__hsub2(bits_h2((p01 & m) | e), bias), d2));
  f[1] = h2_bits(__hmul2(__hsub2(bits_h2((p23 & m) | e), bias), d2));
  f[2] = h2_bits(__hmul2(__hsub2(bits_h2(((p01 >> 4) & m) | e), bias), d2));
  f[3] = h2_bits(__hmul2(__hsub2(bits_h2(((p23 >> 4) & m) | e), bias), d2));
}

template <>
__device__ __forceinline__ void b_frags<QuantType::Q8_0>(const uint8_t* row, int bi, int t,
                                                         uint32_t (&f)[4]) {
  const uint8_t* blk = row + bi * 34;
  const __half d = __ushort_as_half(*reinterpret_cast<const uint16_t*>(blk));
  const uint8_t* qs = blk + 2 + 2 * t;
  const uint32_t w0 = static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(qs)) |
                      (static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(qs + 8)) << 16);
  const uint32_t w1 = static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(qs + 16)) |
                      (static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(qs + 24)) << 16);
  const __half2 d2 = __half2half2(d);
  const __half2 bias = __float2half2_rn(1152.0f);  // 1024 + 128 (int8 -> offset binary)
  const uint32_t s = 0x00800080u, e = 0x64006400u;
  auto cv = [&](uint32_t p) { return h2_bits(__hmul2(__hsub2(bits_h2((p ^ s) | e), bias), d2)); };
  f[0] = cv(__byte_perm(w0, 0, 0x4140));
  f[1] = cv(__byte_perm(w0, 0, 0x4342));
  f[2] = cv(__byte_perm(w1, 0, 0x4140));
  f[3] = cv(__byte_perm(w1, 0, 0x4342));
}

template <>
__device__ __forceinline__ void b_frags<QuantType::BF16>(const uint8_t* row, int bi, int t,
                                                         uint32_t (&f)[4]) {
  const uint32_t* p = reinterpret_cast<const uint32_t*>(row) + bi * 16 + t;  // pairs
  auto cv = [](uint32_t u) {
    return h2_bits(__floats2half2_rn(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u)));
  };
  f[0] = cv(p[0]);
  f[1] = cv(p[4]);
  f[2] = cv(p[8]);
  f[3] = cv(p[12]);
}

template <>
__device__ __forceinline__ void b_frags<QuantType::F32>(const uint8_t* row, int bi, int t,
                                                        uint32_t (&f)[4]) {
  const float2* p = reinterpret_cast<const float2*>(row) + bi * 16 + t;
  auto cv = [](float2 v) { return h2_bits(__floats2half2_rn(v.x, v.y)); };
  f[0] = cv(p[0]);
  f[1] = cv(p[4]);
  f[2] = cv(p[8]);
  f[3] = cv(p[12]);
}

template <QuantType T, bool Swiglu>
__global__ void __launch_bounds__(kThreads) prefill_matmul_kernel(const PrefillMatmul args) {
  using F = Fmt<T>;
  constexpr int kMats = Swiglu ? 2 : 1;
  constexpr int kStageBytes = stage_bytes<T, Swiglu>();
  extern __shared__ __align__(16) uint8_t smem[];

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;

  // Which rows and which weights.
  int64_t row0;
  int rows;
  const uint8_t* wm[kMats];
  if (!tile_of_block<kMats>(args, &row0, &rows, wm)) return;
  const int k_tiles = static_cast<int>(args.k / kBK);
  const int64_t row_bytes = static_cast<int64_t>(k_tiles) * F::kStep;
  const int64_t n = args.n;

  const ATilePieces a_pieces(args, row0, rows, tid);

  auto load_stage = [&](int stage, int kt) {
    uint8_t* st = smem + stage * kStageBytes;
    a_pieces.issue(reinterpret_cast<uint16_t*>(st), kt, tid);
    constexpr int kPieces = F::kStep / F::kPiece;  // per row
    constexpr int kTotal = kMats * kBN * kPieces;
#pragma unroll 4
    for (int c = tid; c < kTotal; c += kThreads) {
      const int mat = c / (kBN * kPieces);
      const int rem = c - mat * (kBN * kPieces);
      const int r = rem / kPieces;
      const int piece = rem - r * kPieces;
      const bool ok = n0 + r < n;
      const uint8_t* src =
          (mat == 0 ? wm[0] : wm[kMats - 1]) +
          (ok ? (n0 + r) * row_bytes + static_cast<int64_t>(kt) * F::kStep + piece * F::kPiece : 0);
      uint8_t* dst = st + kAStageBytes + (mat * kBN + r) * F::kStride + piece * F::kPiece;
      cp_async<F::kPiece>(dst, src, ok ? F::kPiece : 0);
    }
  };

  float acc[kMats][4][2][4];
  zero_acc<kMats>(acc);

#pragma unroll
  for (int s = 0; s < F::kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<F::kStages - 2>();
    __syncthreads();  // stage kt is visible; everyone is done with stage kt - 1
    {
      const int next = kt + F::kStages - 1;
      if (next < k_tiles) load_stage(next % F::kStages, next);
      cp_async_commit();
    }
    const uint8_t* st = smem + (kt % F::kStages) * kStageBytes;
    const uint16_t* as = reinterpret_cast<const uint16_t*>(st);
#pragma unroll
    for (int bi = 0; bi < kBK / 32; ++bi) {
      uint32_t bf[kMats][2][4];
#pragma unroll
      for (int mat = 0; mat < kMats; ++mat)
#pragma unroll
        for (int nf = 0; nf < 2; ++nf) {
          const uint8_t* wrow =
              st + kAStageBytes + (mat * kBN + warp * 16 + nf * 8 + g) * F::kStride;
          b_frags<T>(wrow, bi, t, bf[mat][nf]);
        }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        mma_k16<kMats>(acc, as, bi * 2 + half, lane,
                       [&](int mat, int nf, uint32_t& b0, uint32_t& b1) {
                         b0 = bf[mat][nf][2 * half];
                         b1 = bf[mat][nf][2 * half + 1];
                       });
      }
    }
  }
  cp_async_wait<0>();

  store_tile<kMats>(args, acc, row0, rows, n0, warp, g, t);
}

template <QuantType T, bool Swiglu>
cudaError_t launch_typed(const PrefillMatmul& a, cudaStream_t stream) {
  return launch_tiles<prefill_matmul_kernel<T, Swiglu>, smem_bytes<T, Swiglu>()>(a, stream);
}

template <bool Swiglu>
cudaError_t launch_swiglu_or_not(const PrefillMatmul& a, cudaStream_t stream) {
  switch (a.type) {
    case QuantType::Q4_0:
      return launch_typed<QuantType::Q4_0, Swiglu>(a, stream);
    case QuantType::Q8_0:
      return launch_typed<QuantType::Q8_0, Swiglu>(a, stream);
    case QuantType::BF16:
      return launch_typed<QuantType::BF16, Swiglu>(a, stream);
    case QuantType::F32:
      return launch_typed<QuantType::F32, Swiglu>(a, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_prefill_matmul(const PrefillMatmul& a, cudaStream_t stream) {
  const bool grouped = a.tiles != nullptr;
  if (a.k <= 0 || a.k % kBK != 0 || a.n <= 0 || a.n > (int64_t{1} << 30) || a.a == nullptr ||
      a.lda < a.k || a.lda % 8 != 0 || (reinterpret_cast<uintptr_t>(a.a) & 15) != 0 ||
      a.ldy < a.n || a.ldy % 2 != 0) {
    return cudaErrorInvalidValue;
  }
  if (grouped) {
    if (a.n_tiles == nullptr || a.max_tiles < 0 || a.max_tiles > 65535 || a.w_table == nullptr ||
        (a.swiglu && a.w2_table == nullptr)) {
      return cudaErrorInvalidValue;
    }
  } else {
    if (a.m < 0 || a.m > int64_t{65535} * kBM || a.w == nullptr || (a.swiglu && a.w2 == nullptr)) {
      return cudaErrorInvalidValue;
    }
  }
  if (a.swiglu ? a.y16 == nullptr : a.y == nullptr) return cudaErrorInvalidValue;
  if (a.type == QuantType::Q4_K || a.type == QuantType::Q5_K || a.type == QuantType::Q6_K) {
    // Whole super-blocks; rows read with 32-bit (Q4_K, Q5_K) or 16-bit (Q6_K) loads.
    const uintptr_t kal = a.type == QuantType::Q6_K ? 1 : 3;
    if (a.k % 256 != 0 ||
        (!grouped && ((reinterpret_cast<uintptr_t>(a.w) & kal) != 0 ||
                      (a.swiglu && (reinterpret_cast<uintptr_t>(a.w2) & kal) != 0)))) {
      return cudaErrorInvalidValue;
    }
    return detail::launch_prefill_matmul_kquant(a, stream);
  }
  // Raw stages: BF16 / F32 rows are copied in 16-byte pieces, Q4_0 / Q8_0 rows in 4-byte ones.
  const uintptr_t wal = (a.type == QuantType::BF16 || a.type == QuantType::F32) ? 15 : 3;
  if (!grouped && ((reinterpret_cast<uintptr_t>(a.w) & wal) != 0 ||
                   (a.swiglu && (reinterpret_cast<uintptr_t>(a.w2) & wal) != 0))) {
    return cudaErrorInvalidValue;
  }
  return a.swiglu ? launch_swiglu_or_not<true>(a, stream) : launch_swiglu_or_not<false>(a, stream);
}

}  // namespace ktune::cuda
