// Causal attention for a prefill chunk over the fp16 KV cache, on tensor cores (flash-attention
// style): one block of 4 warps per (head, tile of 64 query tokens), each warp 16 queries.
//
// For each key tile of 64 positions, in increasing order from position 0 (K and V tiles
// double-buffered in shared memory through cp.async):
//   S = Q K^T      mma.sync m16n8k16 (fp16 in, fp32 out), scaled by log2(e) / sqrt(hd)
//   causal mask    key position > query position -> -inf
//   online softmax running row max m and sum l in float32 (exp2), O rescaled by exp2(m_old - m)
//   O += P V       P rounded to fp16 in registers (the S accumulator layout is the A operand
//                  layout of the next mma), V read transposed with ldmatrix.trans
// then O / l is written as fp16. Key tile 0 always holds a visible key (position 0), so the row
// max is finite from the first tile on, and a tile that is entirely masked for a row changes
// nothing (exp2(-inf) = 0, rescale by exp2(0) = 1): a query's result depends only on its own
// position and the cache, not on the chunk around it. Fixed order throughout: deterministic.
// Query tiles with more keys are scheduled first (blockIdx.y runs from the last tile).
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/per_device.cuh"
#include "ktune/engine/cuda/prefill_kernels.h"

namespace ktune::cuda {
namespace {

constexpr int kTileQ = 64;
constexpr int kTileK = 64;
constexpr int kThreads = 128;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes));
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
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
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
__device__ __forceinline__ uint32_t pack_h2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <int HD>
struct Smem {
  static constexpr int kStride = HD + 8;  // halves per row: ldmatrix conflict-free
  static constexpr int kTile = kTileK * kStride;
  static constexpr int kBytes = (kTileQ * kStride + 4 * kTile) * 2;  // Q, K[2], V[2]
};

template <int HD>
__global__ void __launch_bounds__(kThreads)
    prefill_attention_kernel(const uint16_t* __restrict__ q16, const uint16_t* __restrict__ k_cache,
                             const uint16_t* __restrict__ v_cache, int tokens, int pos0, int group,
                             int n_heads, int max_ctx, float scale_log2,
                             uint16_t* __restrict__ out16) {
  using S = Smem<HD>;
  extern __shared__ __align__(16) uint16_t sm[];
  uint16_t* qs = sm;
  uint16_t* ks = sm + kTileQ * S::kStride;  // [2][kTileK][kStride]
  uint16_t* vs = ks + 2 * S::kTile;

  const int h = blockIdx.x;
  const int q_tile = gridDim.y - 1 - blockIdx.y;
  const int q0 = q_tile * kTileQ;
  const int kvh = h / group;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int64_t ldq = static_cast<int64_t>(n_heads) * HD;
  const int kv_end = pos0 + tokens;  // keys stored: positions [0, kv_end)
  const int last_q = min(q0 + kTileQ, tokens) - 1;
  const int n_kt = (pos0 + last_q) / kTileK + 1;
  constexpr int kPieces = HD / 8;  // 16-byte pieces per row

  // Q tile (rows past the chunk are zero).
  for (int c = tid; c < kTileQ * kPieces; c += kThreads) {
    const int r = c / kPieces, p = c % kPieces;
    const bool ok = q0 + r < tokens;
    const uint16_t* src = q16 + (ok ? (q0 + r) * ldq + static_cast<int64_t>(h) * HD + p * 8 : 0);
    cp_async16(qs + r * S::kStride + p * 8, src, ok ? 16 : 0);
  }
  const int64_t cache0 = static_cast<int64_t>(kvh) * max_ctx;
  auto load_kv = [&](int buf, int kt) {
    for (int c = tid; c < kTileK * kPieces; c += kThreads) {
      const int r = c / kPieces, p = c % kPieces;
      const int key = kt * kTileK + r;
      const bool ok = key < kv_end;
      const int64_t off = ok ? (cache0 + key) * HD + p * 8 : 0;
      cp_async16(ks + buf * S::kTile + r * S::kStride + p * 8, k_cache + off, ok ? 16 : 0);
      cp_async16(vs + buf * S::kTile + r * S::kStride + p * 8, v_cache + off, ok ? 16 : 0);
    }
  };
  load_kv(0, 0);
  cp_async_commit();

  uint32_t qf[HD / 16][4];
  float o[HD / 8][4];
#pragma unroll
  for (int i = 0; i < HD / 8; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) o[i][c] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.0f, 0.0f};
  const int row_pos[2] = {pos0 + q0 + warp * 16 + g, pos0 + q0 + warp * 16 + g + 8};

  for (int kt = 0; kt < n_kt; ++kt) {
    if (kt + 1 < n_kt) load_kv((kt + 1) % 2, kt + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (kt == 0) {
#pragma unroll
      for (int kk = 0; kk < HD / 16; ++kk) {
        ldmatrix_x4(qf[kk], qs + (warp * 16 + lane % 16) * S::kStride + kk * 16 + (lane / 16) * 8);
      }
    }
    const uint16_t* kb = ks + (kt % 2) * S::kTile;
    const uint16_t* vb = vs + (kt % 2) * S::kTile;

    float s[kTileK / 8][4];
#pragma unroll
    for (int i = 0; i < kTileK / 8; ++i)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[i][c] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < kTileK / 16; ++np) {
        uint32_t b[4];
        const int mi = lane / 8;
        ldmatrix_x4(b,
                    kb + (np * 16 + (mi / 2) * 8 + lane % 8) * S::kStride + kk * 16 + (mi % 2) * 8);
        mma_16816(s[2 * np], qf[kk], b[0], b[1]);
        mma_16816(s[2 * np + 1], qf[kk], b[2], b[3]);
      }
    }

    // Mask, scale, online softmax (rows g and g + 8 of this warp; a row's 64 scores are spread
    // over the 4 lanes of a quad).
    float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int nf = 0; nf < kTileK / 8; ++nf)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int key = kt * kTileK + nf * 8 + 2 * t + (c & 1);
        const float v = key <= row_pos[c >> 1] ? s[nf][c] * scale_log2 : -INFINITY;
        s[nf][c] = v;
        mx[c >> 1] = fmaxf(mx[c >> 1], v);
      }
    float alpha[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 1));
      mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 2));
      alpha[hh] = exp2f(m_run[hh] - mx[hh]);
      m_run[hh] = mx[hh];
      l_run[hh] *= alpha[hh];
    }
#pragma unroll
    for (int nf = 0; nf < kTileK / 8; ++nf)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const float p = exp2f(s[nf][c] - mx[c >> 1]);
        s[nf][c] = p;
        l_run[c >> 1] += p;
      }
#pragma unroll
    for (int i = 0; i < HD / 8; ++i) {
      o[i][0] *= alpha[0];
      o[i][1] *= alpha[0];
      o[i][2] *= alpha[1];
      o[i][3] *= alpha[1];
    }

    // O += P V.
#pragma unroll
    for (int kk = 0; kk < kTileK / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack_h2(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack_h2(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack_h2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack_h2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < HD / 16; ++dp) {
        uint32_t b[4];
        const int mi = lane / 8;
        ldmatrix_x4_trans(
            b, vb + (kk * 16 + (mi % 2) * 8 + lane % 8) * S::kStride + dp * 16 + (mi / 2) * 8);
        mma_16816(o[2 * dp], a, b[0], b[1]);
        mma_16816(o[2 * dp + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites this buffer
  }
  cp_async_wait<0>();

  float inv[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    float l = l_run[hh];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[hh] = 1.0f / l;
  }
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int r = q0 + warp * 16 + g + 8 * hh;
    if (r >= tokens) continue;
    uint16_t* dst = out16 + r * ldq + static_cast<int64_t>(h) * HD;
#pragma unroll
    for (int nf = 0; nf < HD / 8; ++nf) {
      *reinterpret_cast<uint32_t*>(dst + nf * 8 + 2 * t) =
          pack_h2(o[nf][2 * hh] * inv[hh], o[nf][2 * hh + 1] * inv[hh]);
    }
  }
}

template <int HD>
cudaError_t launch_hd(const uint16_t* q16, const uint16_t* k_cache, const uint16_t* v_cache,
                      int64_t tokens, int64_t pos0, int64_t n_heads, int64_t n_kv, int64_t max_ctx,
                      uint16_t* out16, cudaStream_t stream) {
  constexpr int kSmem = Smem<HD>::kBytes;
  static detail::PerDevice<cudaError_t> per_device;  // the opt-in is per device context
  const cudaError_t attr = per_device.get([](int) {
    return cudaFuncSetAttribute(prefill_attention_kernel<HD>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  });
  if (attr != cudaSuccess) return attr;
  const float scale_log2 =
      static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(HD)));
  const dim3 grid(static_cast<unsigned>(n_heads),
                  static_cast<unsigned>((tokens + kTileQ - 1) / kTileQ));
  prefill_attention_kernel<HD><<<grid, kThreads, kSmem, stream>>>(
      q16, k_cache, v_cache, static_cast<int>(tokens), static_cast<int>(pos0),
      static_cast<int>(n_heads / n_kv), static_cast<int>(n_heads), static_cast<int>(max_ctx),
      scale_log2, out16);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_prefill_attention(const uint16_t* q16, const uint16_t* k_cache,
                                     const uint16_t* v_cache, int64_t tokens, int64_t pos0,
                                     int64_t n_heads, int64_t n_kv, int64_t head_dim,
                                     int64_t max_ctx, uint16_t* out16, cudaStream_t stream) {
  if (tokens < 0 || pos0 < 0 || n_heads <= 0 || n_kv <= 0 || n_heads % n_kv != 0 ||
      n_heads > 65535 || max_ctx <= 0 || max_ctx > (int64_t{1} << 24) || pos0 + tokens > max_ctx ||
      (tokens + kTileQ - 1) / kTileQ > 65535 || (head_dim != 64 && head_dim != 128)) {
    return cudaErrorInvalidValue;
  }
  if (tokens == 0) return cudaSuccess;
  if (head_dim == 64) {
    return launch_hd<64>(q16, k_cache, v_cache, tokens, pos0, n_heads, n_kv, max_ctx, out16,
                         stream);
  }
  return launch_hd<128>(q16, k_cache, v_cache, tokens, pos0, n_heads, n_kv, max_ctx, out16, stream);
}

}  // namespace ktune::cuda
