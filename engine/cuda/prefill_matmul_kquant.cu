// Tensor-core prefill matmul Y = A · W^T for K-quant weights (Q4_K, Q5_K, Q6_K), dense or grouped
// by expert: launch_prefill_matmul's contract (prefill_kernels.h), called by it for these types.
//
// Why a second kernel: prefill_matmul.cu stages raw weight bytes with cp.async and dequantizes
// them straight into mma fragments, which needs a quant block that a 64-element k step reads
// contiguously and 4-byte aligned. A K-quant super-block spans 256 elements with its scales in a
// header (and Q6_K rows of odd super-block counts are only 2-byte aligned), so here each k step
// (64 elements of 64 weight rows) is dequantized once, by the thread that loaded it, into an fp16
// tile in shared memory, and both operands reach the tensor cores through ldmatrix.
//
// Tile and epilogue as prefill_matmul.cu (prefill_mma.cuh): 64 rows x 64 columns per block of 4
// warps, warp w owning columns [16w, 16w + 16), mma.sync m16n8k16 fp16 -> fp32. Per k step each
// thread dequantizes 8 consecutive weights of 4 rows (per matrix) with rowdot_kquant.cuh's decoder
// (the CPU reference's values, then one fp16 rounding). Pipeline of two buffers: the A rows of
// step k+1 travel by cp.async and its weight bytes are loaded into registers while step k
// computes; they are converted and stored after it.
//
// Every output element is one thread's fixed-order mma chain over k: deterministic, and a row's
// result depends only on that row and W.
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/prefill_mma.cuh"
#include "cuda/rowdot_kquant.cuh"
#include "ktune/engine/cuda/prefill_kernels.h"

namespace ktune::cuda {
namespace {

using namespace prefill_detail;

constexpr int kBStride = kBK + 8;                           // halves per dequantized weight row
constexpr int kBTileBytes = kBN * kBStride * 2;             // one matrix's k step
constexpr int kRowsPerThread = kBN * (kBK / 8) / kThreads;  // 8-weight slices per thread

template <bool Swiglu>
__host__ __device__ constexpr int stage_bytes() {
  return kAStageBytes + (Swiglu ? 2 : 1) * kBTileBytes;
}
template <bool Swiglu>
__host__ __device__ constexpr int smem_bytes() {
  return 2 * stage_bytes<Swiglu>();
}

template <QuantType T, bool Swiglu>
__global__ void __launch_bounds__(kThreads) prefill_matmul_kquant_kernel(const PrefillMatmul args) {
  using D = detail::RowDot<T>;
  constexpr int kMats = Swiglu ? 2 : 1;
  constexpr int kStageBytes = stage_bytes<Swiglu>();
  extern __shared__ __align__(16) uint8_t smem[];

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;

  int64_t row0;
  int rows;
  const uint8_t* wm[kMats];
  if (!tile_of_block<kMats>(args, &row0, &rows, wm)) return;
  const int k_tiles = static_cast<int>(args.k / kBK);
  const int64_t row_bytes = args.k / 256 * D::kSuperBytes;
  const int64_t n = args.n;

  const ATilePieces a_pieces(args, row0, rows, tid);
  auto issue_a = [&](int stage, int kt) {
    a_pieces.issue(reinterpret_cast<uint16_t*>(smem + stage * kStageBytes), kt, tid);
  };

  // This thread's weight slices: rows tid/8 + 16i of the column tile, weights 8 * (tid % 8) ..
  // + 7 of each k step (RowDot block 2 * kt + (tid % 8) / 4, slice tid % 4).
  const int sl = tid % 8;
  const uint8_t* w_rows[kMats][kRowsPerThread];
  bool w_ok[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t col = n0 + tid / 8 + 16 * i;
    w_ok[i] = col < n;
#pragma unroll
    for (int mat = 0; mat < kMats; ++mat)
      w_rows[mat][i] = wm[mat] + (w_ok[i] ? col : 0) * row_bytes;
  }
  typename D::Frag frag[kMats][kRowsPerThread] = {};
  auto load_b = [&](int kt) {
#pragma unroll
    for (int mat = 0; mat < kMats; ++mat)
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        if (w_ok[i]) frag[mat][i] = D::load(w_rows[mat][i], 2 * kt + sl / 4, sl % 4);
      }
  };
  auto store_b = [&](int stage) {
    uint8_t* bs = smem + stage * kStageBytes + kAStageBytes;
#pragma unroll
    for (int mat = 0; mat < kMats; ++mat)
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        float w[8];
        if (w_ok[i]) {
          D::values(frag[mat][i], w);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) w[e] = 0.0f;
        }
        uint4 v;
        v.x = h2_bits(__floats2half2_rn(w[0], w[1]));
        v.y = h2_bits(__floats2half2_rn(w[2], w[3]));
        v.z = h2_bits(__floats2half2_rn(w[4], w[5]));
        v.w = h2_bits(__floats2half2_rn(w[6], w[7]));
        const int r = tid / 8 + 16 * i;
        *reinterpret_cast<uint4*>(bs + mat * kBTileBytes + (r * kBStride + 8 * sl) * 2) = v;
      }
  };

  float acc[kMats][4][2][4];
  zero_acc<kMats>(acc);

  issue_a(0, 0);
  cp_async_commit();
  load_b(0);
  store_b(0);

  for (int kt = 0; kt < k_tiles; ++kt) {
    const int cur = kt & 1;
    const bool more = kt + 1 < k_tiles;
    if (more) issue_a(cur ^ 1, kt + 1);
    cp_async_commit();
    if (more) load_b(kt + 1);  // in flight while this step computes
    cp_async_wait<1>();
    __syncthreads();  // A and B of step kt visible
    const uint8_t* st = smem + cur * kStageBytes;
    const uint16_t* as = reinterpret_cast<const uint16_t*>(st);
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t bf[kMats][4];  // (nf 0: k lo, k hi), (nf 1: k lo, k hi)
#pragma unroll
      for (int mat = 0; mat < kMats; ++mat) {
        const uint16_t* bs =
            reinterpret_cast<const uint16_t*>(st + kAStageBytes + mat * kBTileBytes);
        ldmatrix_x4(bf[mat], bs + (warp * 16 + (lane / 16) * 8 + lane % 8) * kBStride + kk * 16 +
                                 ((lane / 8) % 2) * 8);
      }
      mma_k16<kMats>(acc, as, kk, lane, [&](int mat, int nf, uint32_t& b0, uint32_t& b1) {
        b0 = bf[mat][2 * nf];
        b1 = bf[mat][2 * nf + 1];
      });
    }
    if (more) store_b(cur ^ 1);
    __syncthreads();  // step kt's buffers free for step kt + 2; step kt + 1's weights visible
  }
  cp_async_wait<0>();

  store_tile<kMats>(args, acc, row0, rows, n0, warp, g, t);
}

template <QuantType T, bool Swiglu>
cudaError_t launch_typed(const PrefillMatmul& a, cudaStream_t stream) {
  return launch_tiles<prefill_matmul_kquant_kernel<T, Swiglu>, smem_bytes<Swiglu>()>(a, stream);
}

template <bool Swiglu>
cudaError_t launch_swiglu_or_not(const PrefillMatmul& a, cudaStream_t stream) {
  switch (a.type) {
    case QuantType::Q4_K:
      return launch_typed<QuantType::Q4_K, Swiglu>(a, stream);
    case QuantType::Q5_K:
      return launch_typed<QuantType::Q5_K, Swiglu>(a, stream);
    case QuantType::Q6_K:
      return launch_typed<QuantType::Q6_K, Swiglu>(a, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

namespace detail {
cudaError_t launch_prefill_matmul_kquant(const PrefillMatmul& a, cudaStream_t stream) {
  return a.swiglu ? launch_swiglu_or_not<true>(a, stream) : launch_swiglu_or_not<false>(a, stream);
}
}  // namespace detail

}  // namespace ktune::cuda
