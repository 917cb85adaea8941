// Device pieces shared by the prefill matmuls (prefill_matmul.cu: weights staged raw and
// dequantized into mma fragments; prefill_matmul_kquant.cu: K-quant weights dequantized into an
// fp16 tile): the 64 x 64 block tile of 4 warps, its asynchronous copies (the A rows' pieces
// among them), ldmatrix / mma.sync wrappers and the k16 mma chain, the epilogue that writes a
// tile (float32, accumulated or not, or SwiGLU fp16), and the launch. What differs between the
// two kernels is how the weights reach the B fragments (and so the stage pipeline).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/per_device.cuh"
#include "ktune/engine/cuda/prefill_kernels.h"

namespace ktune::cuda::prefill_detail {

constexpr int kBM = kPrefillTileM;
constexpr int kBN = 64;
constexpr int kBK = 64;
constexpr int kThreads = 128;
constexpr int kAStride = kBK + 8;  // halves per A row in shared memory (ldmatrix conflict-free)
constexpr int kAStageBytes = kBM * kAStride * 2;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// cp.async of `Bytes` (4 or 16) bytes; src_bytes 0 fills the destination with zeros.
template <int Bytes>
__device__ __forceinline__ void cp_async(void* dst, const void* src, int src_bytes) {
  if constexpr (Bytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(src_bytes));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(src_bytes));
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t h2_bits(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ __half2 bits_h2(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }

__device__ __forceinline__ float silu_mul(float g, float u) {
  return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
}

// The block's rows and weight matrices: a dense tile (blockIdx.y-th 64 rows, args.w / args.w2)
// or a grouped one (the tile list's entry blockIdx.y: its expert's matrices). False when the
// block has nothing to do (a grouped tile beyond *n_tiles).
template <int kMats>
__device__ __forceinline__ bool tile_of_block(const PrefillMatmul& args, int64_t* row0, int* rows,
                                              const uint8_t* (&wm)[kMats]) {
  if (args.tiles != nullptr) {
    if (static_cast<int>(blockIdx.y) >= *args.n_tiles) return false;
    const int4 ti = reinterpret_cast<const int4*>(args.tiles)[blockIdx.y];
    *row0 = ti.y;
    *rows = ti.z;
    wm[0] = static_cast<const uint8_t*>(args.w_table[ti.x]);
    if constexpr (kMats == 2) wm[1] = static_cast<const uint8_t*>(args.w2_table[ti.x]);
  } else {
    *row0 = static_cast<int64_t>(blockIdx.y) * kBM;
    *rows = args.m - *row0 < kBM ? static_cast<int>(args.m - *row0) : kBM;
    wm[0] = static_cast<const uint8_t*>(args.w);
    if constexpr (kMats == 2) wm[1] = static_cast<const uint8_t*>(args.w2);
  }
  return true;
}

// This thread's A pieces of every stage: rows tid/8 + 16i of the block's rows, 8 halves at
// column (tid % 8) * 8 of the stage (rows past the block's read row0 and are zero-filled).
struct ATilePieces {
  const uint16_t* src[4];
  int ok[4];  // cp.async source bytes: 16, or 0 past the block's rows

  __device__ __forceinline__ ATilePieces(const PrefillMatmul& args, int64_t row0, int rows,
                                         int tid) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = tid / 8 + 16 * i;
      ok[i] = r < rows ? 16 : 0;
      const int64_t gr = row0 + (r < rows ? r : 0);
      const int64_t src_row = args.a_rows ? args.a_rows[gr] : gr;
      src[i] = args.a + src_row * args.lda + (tid % 8) * 8;
    }
  }

  // cp.async of k step kt's pieces into the stage's A tile `as` (kAStride halves per row).
  __device__ __forceinline__ void issue(uint16_t* as, int kt, int tid) const {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = tid / 8 + 16 * i;
      cp_async<16>(as + r * kAStride + (tid % 8) * 8, src[i] + kt * kBK, ok[i]);
    }
  }
};

template <int kMats>
__device__ __forceinline__ void zero_acc(float (&acc)[kMats][4][2][4]) {
#pragma unroll
  for (int a = 0; a < kMats; ++a)
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[a][i][j][c] = 0.0f;
}

// The mma.sync chain of one k16 slice (kk-th of the stage) for warp w's 4 x 2 tiles of each
// matrix: A fragments by ldmatrix from the stage's A tile `as`, B fragments from
// b_frag(mat, nf, b0, b1). The order (mf, then mat, then nf) fixes every accumulator's chain.
template <int kMats, class BFrag>
__device__ __forceinline__ void mma_k16(float (&acc)[kMats][4][2][4], const uint16_t* as, int kk,
                                        int lane, const BFrag& b_frag) {
#pragma unroll
  for (int mf = 0; mf < 4; ++mf) {
    uint32_t af[4];
    ldmatrix_x4(af, as + (mf * 16 + lane % 16) * kAStride + kk * 16 + (lane / 16) * 8);
#pragma unroll
    for (int mat = 0; mat < kMats; ++mat)
#pragma unroll
      for (int nf = 0; nf < 2; ++nf) {
        uint32_t b0, b1;
        b_frag(mat, nf, b0, b1);
        mma_16816(acc[mat][mf][nf], af, b0, b1);
      }
  }
}

// Writes the block's tile: warp w's accumulators acc[mat][mf][nf] (mma C fragments: c0, c1 at
// (row g, cols 2t, 2t+1), c2, c3 at (row g + 8, same cols) of the 16 x 8 tile (mf, nf)) as
// float32 (= or += with args.accumulate) or, with two matrices, fp16(silu(gate) * up).
template <int kMats>
__device__ __forceinline__ void store_tile(const PrefillMatmul& args,
                                           const float (&acc)[kMats][4][2][4], int64_t row0,
                                           int rows, int64_t n0, int warp, int g, int t) {
  const int64_t n = args.n;
#pragma unroll
  for (int mf = 0; mf < 4; ++mf)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = mf * 16 + g + 8 * h;
      if (r >= rows) continue;
      const int64_t orow = row0 + r;
#pragma unroll
      for (int nf = 0; nf < 2; ++nf) {
        const int64_t col = n0 + warp * 16 + nf * 8 + 2 * t;
        if (col >= n) continue;
        const float v0 = acc[0][mf][nf][2 * h], v1 = acc[0][mf][nf][2 * h + 1];
        if constexpr (kMats == 2) {
          const float o0 = silu_mul(v0, acc[kMats - 1][mf][nf][2 * h]);
          const float o1 = silu_mul(v1, acc[kMats - 1][mf][nf][2 * h + 1]);
          uint16_t* out = args.y16 + orow * args.ldy + col;
          if (col + 1 < n) {
            *reinterpret_cast<__half2*>(out) = __floats2half2_rn(o0, o1);
          } else {
            *out = __half_as_ushort(__float2half_rn(o0));
          }
        } else {
          float* out = args.y + orow * args.ldy + col;
          if (col + 1 < n) {
            float2 o = make_float2(v0, v1);
            if (args.accumulate) {
              const float2 old = *reinterpret_cast<const float2*>(out);
              o.x = __fadd_rn(old.x, o.x);
              o.y = __fadd_rn(old.y, o.y);
            }
            *reinterpret_cast<float2*>(out) = o;
          } else {
            out[0] = args.accumulate ? __fadd_rn(out[0], v0) : v0;
          }
        }
      }
    }
}

// Launches a tile kernel over `a`: one block per 64 columns x (64 rows, or one entry of the tile
// list: max_tiles of them), kSmem bytes of dynamic shared memory, opted in once per device (the
// opt-in belongs to each device's context; stages above 48 KiB need it).
template <void (*Kernel)(PrefillMatmul), int kSmem>
cudaError_t launch_tiles(const PrefillMatmul& a, cudaStream_t stream) {
  static detail::PerDevice<cudaError_t> per_device;
  const cudaError_t attr = per_device.get([](int) {
    return cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  });
  if (attr != cudaSuccess) return attr;
  const int64_t m_tiles = a.tiles ? a.max_tiles : (a.m + kBM - 1) / kBM;
  if (m_tiles == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((a.n + kBN - 1) / kBN), static_cast<unsigned>(m_tiles));
  Kernel<<<grid, kThreads, kSmem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace ktune::cuda::prefill_detail

namespace ktune::cuda::detail {
// prefill_matmul_kquant.cu: launch_prefill_matmul for Q4_K / Q5_K / Q6_K weights (arguments
// already checked by launch_prefill_matmul, k % 256 == 0).
cudaError_t launch_prefill_matmul_kquant(const PrefillMatmul& a, cudaStream_t stream);
}  // namespace ktune::cuda::detail
