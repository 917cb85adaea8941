// The warp-per-row dot product shared by the MoE kernels (moe_fused.cu) and the per-expert
// matvec of the unfused path (matvec_rowwarp.cu), so both paths compute every expert row with
// the same instructions in the same order: fused and unfused MoE give bit-identical results.
//
// Layout: a warp walks a row of 32-element blocks (ggml Q8_0 / Q4_0 blocks, or 32 elements of
// BF16 / F32), 8 blocks per step: lane = 4 * j + s takes block j of the step and slice s (8 of
// its 32 elements), so the warp's weight loads are contiguous (8 blocks = 272 bytes of Q8_0,
// 144 of Q4_0) and its x loads (float4, L1-resident) are contiguous too. Weights are read once,
// dequantized in registers; x stays float32. Each lane accumulates its slices with explicit
// fmaf in block order, then a warp butterfly (fixed order): deterministic.
//
// Alignment: x 16 bytes; rows 2 bytes (Q8_0, Q4_0, Q6_K), 4 bytes (Q4_K, Q5_K) or 16 bytes (BF16,
// F32); cols % 32 == 0 (% 256 for the K-quants, whose RowDot lives in rowdot_kquant.cuh).
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/rowdot_kquant.cuh"
#include "ktune/engine/quant.h"

namespace ktune::cuda::detail {

template <QuantType T>
struct RowDot;

// Each RowDot<T> splits one step (block b, slice s of a lane) into load() (the weight bytes of
// the slice, from global memory, non-coherent) and dot() (dequantize and accumulate against 8
// floats of x at offsets xoff(b, s) and xoff(b, s) + xoff2), so callers can issue the loads of
// several steps and rows before the first use. The arithmetic of dot() is the reference order:
// every caller (fused MoE, matvec_rowwarp, matvec_fused) gets the same floats for a row.
template <>
struct RowDot<QuantType::Q8_0> {
  static constexpr int kBlockBytes = 34;
  static constexpr int kUnroll = 2;
  static constexpr int kX2 = 4;  // second float4 of x at xoff + kX2
  struct Frag {
    uint16_t d, w[4];
  };
  __device__ __forceinline__ static int xoff(int b, int s) { return 32 * b + 8 * s; }
  __device__ __forceinline__ static Frag load(const uint8_t* __restrict__ row, int b, int s) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(row + int64_t{34} * b);
    Frag f;
    f.d = __ldg(h);
#pragma unroll
    for (int i = 0; i < 4; ++i) f.w[i] = __ldg(h + 1 + 4 * s + i);
    return f;
  }
  // The same fragment from shared memory (rows staged by cp.async).
  __device__ __forceinline__ static Frag lds(const uint8_t* row, int b, int s) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(row + 34 * b);
    Frag f;
    f.d = h[0];
#pragma unroll
    for (int i = 0; i < 4; ++i) f.w[i] = h[1 + 4 * s + i];
    return f;
  }
  // int8 -> float without I2F (quarter-rate on sm_90): byte b ^ 0x80 = b + 128 becomes the low
  // byte of the float 2^23 + (b + 128) (one byte permute), minus 2^23 + 128 gives b exactly, so
  // every product and sum is the same as with a conversion.
  __device__ __forceinline__ static float dot(float acc, const Frag& f, const float xv[8]) {
    const float d = fp16_bits_to_float(f.d);
    const uint32_t w01 = (static_cast<uint32_t>(f.w[0]) | (static_cast<uint32_t>(f.w[1]) << 16)) ^
                         0x80808080u;
    const uint32_t w23 = (static_cast<uint32_t>(f.w[2]) | (static_cast<uint32_t>(f.w[3]) << 16)) ^
                         0x80808080u;
    float t = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t w = i < 4 ? w01 : w23;
      const float q = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7440u | (i & 3))) - 8388736.0f;
      t = fmaf(q, xv[i], t);
    }
    return fmaf(d, t, acc);
  }
};

template <>
struct RowDot<QuantType::Q4_0> {
  static constexpr int kBlockBytes = 18;
  static constexpr int kUnroll = 4;
  static constexpr int kX2 = 16;  // xl = x[32b + 4s ..], xh = x[32b + 16 + 4s ..]
  struct Frag {
    uint16_t d;
    uint32_t q;
  };
  __device__ __forceinline__ static int xoff(int b, int s) { return 32 * b + 4 * s; }
  __device__ __forceinline__ static Frag load(const uint8_t* __restrict__ row, int b, int s) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(row + int64_t{18} * b);
    Frag f;
    f.d = __ldg(h);
    f.q = static_cast<uint32_t>(__ldg(h + 1 + 2 * s)) |
          (static_cast<uint32_t>(__ldg(h + 2 + 2 * s)) << 16);
    return f;
  }
  __device__ __forceinline__ static Frag lds(const uint8_t* row, int b, int s) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(row + 18 * b);
    Frag f;
    f.d = h[0];
    f.q = static_cast<uint32_t>(h[1 + 2 * s]) | (static_cast<uint32_t>(h[2 + 2 * s]) << 16);
    return f;
  }
  // Byte i of q is quant byte 4s+i: element 4s+i (low nibble) and 16+4s+i (high nibble). A nibble
  // n becomes the float 2^23 + n by one byte permute (no I2F, which is quarter-rate on sm_90);
  // minus 2^23 + 8 gives n - 8 exactly, so the products and sums are those of a conversion.
  __device__ __forceinline__ static float dot(float acc, const Frag& f, const float xv[8]) {
    const float d = fp16_bits_to_float(f.d);
    const uint32_t lo = f.q & 0x0F0F0F0Fu;
    const uint32_t hi = (f.q >> 4) & 0x0F0F0F0Fu;
    float t = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float a = __uint_as_float(__byte_perm(lo, 0x4B000000u, 0x7440u | i)) - 8388616.0f;
      const float b = __uint_as_float(__byte_perm(hi, 0x4B000000u, 0x7440u | i)) - 8388616.0f;
      t = fmaf(a, xv[i], t);
      t = fmaf(b, xv[4 + i], t);
    }
    return fmaf(d, t, acc);
  }
};

template <>
struct RowDot<QuantType::BF16> {
  static constexpr int kBlockBytes = 64;
  static constexpr int kUnroll = 2;
  static constexpr int kX2 = 4;
  struct Frag {
    uint4 w;
  };
  __device__ __forceinline__ static int xoff(int b, int s) { return 32 * b + 8 * s; }
  __device__ __forceinline__ static Frag load(const uint8_t* __restrict__ row, int b, int s) {
    Frag f;
    f.w = __ldg(reinterpret_cast<const uint4*>(row + int64_t{64} * b + 16 * s));
    return f;
  }
  __device__ __forceinline__ static Frag lds(const uint8_t* row, int b, int s) {
    Frag f;
    f.w = *reinterpret_cast<const uint4*>(row + 64 * b + 16 * s);
    return f;
  }
  __device__ __forceinline__ static float dot(float acc, const Frag& f, const float xv[8]) {
    const uint32_t wv[4] = {f.w.x, f.w.y, f.w.z, f.w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      acc = fmaf(__uint_as_float(wv[i] << 16), xv[2 * i], acc);
      acc = fmaf(__uint_as_float(wv[i] & 0xffff0000u), xv[2 * i + 1], acc);
    }
    return acc;
  }
};

template <>
struct RowDot<QuantType::F32> {
  static constexpr int kBlockBytes = 128;
  static constexpr int kUnroll = 2;
  static constexpr int kX2 = 4;
  struct Frag {
    float4 a, b;
  };
  __device__ __forceinline__ static int xoff(int b, int s) { return 32 * b + 8 * s; }
  __device__ __forceinline__ static Frag load(const uint8_t* __restrict__ row, int b, int s) {
    const float4* wp = reinterpret_cast<const float4*>(row + int64_t{128} * b + 32 * s);
    Frag f;
    f.a = __ldg(wp);
    f.b = __ldg(wp + 1);
    return f;
  }
  __device__ __forceinline__ static Frag lds(const uint8_t* row, int b, int s) {
    const float4* wp = reinterpret_cast<const float4*>(row + 128 * b + 32 * s);
    Frag f;
    f.a = wp[0];
    f.b = wp[1];
    return f;
  }
  __device__ __forceinline__ static float dot(float acc, const Frag& f, const float xv[8]) {
    acc = fmaf(f.a.x, xv[0], acc);
    acc = fmaf(f.a.y, xv[1], acc);
    acc = fmaf(f.a.z, xv[2], acc);
    acc = fmaf(f.a.w, xv[3], acc);
    acc = fmaf(f.b.x, xv[4], acc);
    acc = fmaf(f.b.y, xv[5], acc);
    acc = fmaf(f.b.z, xv[6], acc);
    acc = fmaf(f.b.w, xv[7], acc);
    return acc;
  }
};

// The 8 floats of x one step of RowDot<T> uses (two float4: x must be 16-byte aligned).
// kGlobal: read-only global memory (__ldg); else shared memory.
template <QuantType T, bool kGlobal>
__device__ __forceinline__ void load_x8(const float* __restrict__ x, int b, int s, float xv[8]) {
  const int o = RowDot<T>::xoff(b, s);
  float4 a, c;
  if (kGlobal) {
    a = __ldg(reinterpret_cast<const float4*>(x + o));
    c = __ldg(reinterpret_cast<const float4*>(x + o + RowDot<T>::kX2));
  } else {
    a = *reinterpret_cast<const float4*>(x + o);
    c = *reinterpret_cast<const float4*>(x + o + RowDot<T>::kX2);
  }
  xv[0] = a.x;
  xv[1] = a.y;
  xv[2] = a.z;
  xv[3] = a.w;
  xv[4] = c.x;
  xv[5] = c.y;
  xv[6] = c.z;
  xv[7] = c.w;
}

// R dot products by one warp, interleaved (more loads in flight); out[r] = dot(rows[r], xs[r])
// over nb blocks, the same on every lane. Each result is independent of R and of the other rows.
// Loads of kUnroll steps of all R rows are issued before the first multiply; the accumulation
// order of a row (blocks lane/4, lane/4 + 8, ... in increasing order, then a butterfly) does not
// depend on that batching.
template <QuantType T, int R>
__device__ __forceinline__ void warp_rows_dot(const uint8_t* const* rows, const float* const* xs,
                                              int nb, float* out) {
  using D = RowDot<T>;
  constexpr int U = D::kUnroll;
  const int lane = threadIdx.x % kWarp;
  const int s = lane & 3;
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.0f;
  for (int b0 = lane >> 2; b0 < nb; b0 += 8 * U) {
    typename D::Frag f[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (b0 + 8 * u < nb) {
#pragma unroll
        for (int r = 0; r < R; ++r) f[u][r] = D::load(rows[r], b0 + 8 * u, s);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (b0 + 8 * u < nb) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float xv[8];
          load_x8<T, true>(xs[r], b0 + 8 * u, s, xv);
          acc[r] = D::dot(acc[r], f[u][r], xv);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) out[r] = warp_sum(acc[r]);
}

// ---- rows and x in shared memory (staged by cp.async) ----
//
// x is kept in shared memory permuted, so that the two float4 a lane reads per step sit at
// 16 * b + 4 * s and 16 * nb + 16 * b + 4 * s: the 8 lanes of a quarter-warp (blocks b, b + 1,
// slices 0..3) then read 32 consecutive floats, free of bank conflicts (in x's natural layout
// blocks b and b + 1 are 128 bytes apart and collide). Element 32 * b + c goes to
// part * 16 * nb + 16 * b + r with (part, r) = (c / 16, c % 16) for Q4_0 (a slice's elements
// 4s..4s+3 and 16+4s..16+4s+3) and (c / 4 % 2, 4 * (c / 8) + c % 4) for the 8-consecutive-element
// slices of Q8_0, BF16 and F32. Same values, same order: results are bit-identical.
template <QuantType T>
__device__ __forceinline__ int xperm(int e, int nb) {
  const int b = e >> 5, c = e & 31;
  if (T == QuantType::Q4_0) return (c >> 4) * 16 * nb + 16 * b + (c & 15);
  return ((c >> 2) & 1) * 16 * nb + 16 * b + 4 * (c >> 3) + (c & 3);
}

// Stages src[0, n) into shared memory permuted: element e of segment g = e / seg (seg % 32 ==
// 0, n % seg == 0) goes to dst[g * seg + xperm(e % seg)]; with norm_w (one segment), the value
// staged is norm_w[e] * (src[e] * r), r = 1 / sqrt(mean(src^2) + eps) (launch_rmsnorm's
// arithmetic; the sum of squares in a fixed order), also written to `also` when non-null. By the
// whole block (red: 32 floats of shared scratch). Every thread issues all loads of a pass (up to
// kStageV float4 each) before its first store: a store to shared memory may alias src as far as
// the compiler knows, so a load-store loop would serialize one L2 round trip per element.
constexpr int kStageV = 8;

__device__ __forceinline__ float4 load_f4(const float* __restrict__ p, int q, bool vec) {
  if (vec) return *reinterpret_cast<const float4*>(p + 4 * q);
  return make_float4(p[4 * q], p[4 * q + 1], p[4 * q + 2], p[4 * q + 3]);
}

template <QuantType T>
__device__ __forceinline__ void stage_x_perm(float* dst, const float* __restrict__ src, int n,
                                             int seg, const float* __restrict__ norm_w,
                                             float eps, float* __restrict__ also, float* red) {
  const int n4 = n / 4;
  const int nb = seg / 32;
  const bool vec = ((reinterpret_cast<uintptr_t>(src) |
                     (norm_w ? reinterpret_cast<uintptr_t>(norm_w) : 0)) &
                    15u) == 0;
  const int step = kStageV * static_cast<int>(blockDim.x);
  float r = 1.0f;
  if (norm_w != nullptr) {
    float ss = 0.0f;
    for (int base = 0; base < n4; base += step) {
      float4 v[kStageV];
#pragma unroll
      for (int i = 0; i < kStageV; ++i) {
        const int q = base + static_cast<int>(threadIdx.x) + i * static_cast<int>(blockDim.x);
        v[i] = q < n4 ? load_f4(src, q, vec) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int i = 0; i < kStageV; ++i) {
        ss = fmaf(v[i].x, v[i].x, ss);
        ss = fmaf(v[i].y, v[i].y, ss);
        ss = fmaf(v[i].z, v[i].z, ss);
        ss = fmaf(v[i].w, v[i].w, ss);
      }
    }
    ss = block_sum(ss, red);
    r = 1.0f / sqrtf(ss / static_cast<float>(n) + eps);
  }
  for (int base = 0; base < n4; base += step) {
    float4 v[kStageV], w[kStageV];
#pragma unroll
    for (int i = 0; i < kStageV; ++i) {
      const int q = base + static_cast<int>(threadIdx.x) + i * static_cast<int>(blockDim.x);
      if (q < n4) {
        v[i] = load_f4(src, q, vec);
        if (norm_w != nullptr) w[i] = load_f4(norm_w, q, vec);
      }
    }
#pragma unroll
    for (int i = 0; i < kStageV; ++i) {
      const int q = base + static_cast<int>(threadIdx.x) + i * static_cast<int>(blockDim.x);
      if (q >= n4) continue;
      float vals[4] = {v[i].x, v[i].y, v[i].z, v[i].w};
      if (norm_w != nullptr) {
        const float ws[4] = {w[i].x, w[i].y, w[i].z, w[i].w};
#pragma unroll
        for (int c = 0; c < 4; ++c) vals[c] = ws[c] * (vals[c] * r);
      }
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int e = 4 * q + c;
        const int g = e / seg;
        dst[g * seg + xperm<T>(e - g * seg, nb)] = vals[c];
        if (also != nullptr) also[e] = vals[c];
      }
    }
  }
}

__device__ __forceinline__ void load_x8_perm(const float* x, int nb, int b, int s, float xv[8]) {
  const float4 a = *reinterpret_cast<const float4*>(x + 16 * b + 4 * s);
  const float4 c = *reinterpret_cast<const float4*>(x + 16 * nb + 16 * b + 4 * s);
  xv[0] = a.x;
  xv[1] = a.y;
  xv[2] = a.z;
  xv[3] = a.w;
  xv[4] = c.x;
  xv[5] = c.y;
  xv[6] = c.z;
  xv[7] = c.w;
}

// warp_rows_dot with the rows in shared memory and x permuted there (xs[r]: row r's x; kSameX:
// every row uses xs[0], read once per step): the same per-lane order (blocks lane/4, lane/4 + 8,
// ...; one D::dot per block) and butterfly, so every result is bit-identical to warp_rows_dot's.
template <QuantType T, int R, bool kSameX>
__device__ __forceinline__ void warp_rows_dot_smem(const uint8_t* const* rows,
                                                   const float* const* xs, int nb, float* out) {
  using D = RowDot<T>;
  const int lane = threadIdx.x % kWarp;
  const int s = lane & 3;
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.0f;
#pragma unroll 2
  for (int b = lane >> 2; b < nb; b += 8) {
    typename D::Frag f[R];
#pragma unroll
    for (int r = 0; r < R; ++r) f[r] = D::lds(rows[r], b, s);
    float xv[8];
    if (kSameX) load_x8_perm(xs[0], nb, b, s, xv);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (!kSameX) load_x8_perm(xs[r], nb, b, s, xv);
      acc[r] = D::dot(acc[r], f[r], xv);
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) out[r] = warp_sum(acc[r]);
}

// SwiGLU as the CPU engine computes it: silu(g) * u, silu(g) = g / (1 + exp(-g)).
__device__ __forceinline__ float swiglu(float g, float u) {
  return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
}

// The supported-type check shared by the launchers.
inline bool rowdot_supported(QuantType t) {
  return t == QuantType::Q8_0 || t == QuantType::Q4_0 || t == QuantType::BF16 ||
         t == QuantType::F32 || is_kquant(t);
}
inline bool rowdot_aligned(QuantType t, const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  switch (t) {
    case QuantType::Q8_0:
    case QuantType::Q4_0:
    case QuantType::Q6_K:
      return (a & 1u) == 0;
    case QuantType::Q4_K:
    case QuantType::Q5_K:
      return (a & 3u) == 0;
    default:
      return (a & 15u) == 0;
  }
}
// Row lengths the row dot takes: whole 32-element blocks, whole 256-element super-blocks for the
// K-quants (checked before row_bytes(), which throws on a partial block).
inline bool rowdot_cols_ok(QuantType t, int64_t cols) {
  return cols > 0 && cols % (is_kquant(t) ? 256 : 32) == 0;
}
// Host-side dispatch of a launcher over the row-dot types: f(std::integral_constant<QuantType,
// T>{}) for t's T (F32 for any type rowdot_supported() refuses: launchers check it first). Every
// call of f must return the same type.
template <QuantType T>
using RowDotTag = std::integral_constant<QuantType, T>;
template <class F>
decltype(auto) with_rowdot_type(QuantType t, F&& f) {
  switch (t) {
    case QuantType::Q8_0:
      return f(RowDotTag<QuantType::Q8_0>{});
    case QuantType::Q4_0:
      return f(RowDotTag<QuantType::Q4_0>{});
    case QuantType::BF16:
      return f(RowDotTag<QuantType::BF16>{});
    case QuantType::Q4_K:
      return f(RowDotTag<QuantType::Q4_K>{});
    case QuantType::Q5_K:
      return f(RowDotTag<QuantType::Q5_K>{});
    case QuantType::Q6_K:
      return f(RowDotTag<QuantType::Q6_K>{});
    default:
      return f(RowDotTag<QuantType::F32>{});
  }
}

// Rows per run of a staged copy that keeps cp.async's 16-byte alignment: rows of `row_bytes`
// bytes, runs starting at a multiple of this many rows from a 16-byte aligned base, move in
// whole 16-byte pieces. 1 for rows of 256k elements in every type but Q6_K, whose 210-byte
// super-blocks need up to 8 rows (qwen3-30b-a3b's ffn_down rows: 3 super-blocks, 630 bytes).
inline int64_t rows_per_16_bytes(int64_t row_bytes) {
  int64_t g = 1;
  while ((row_bytes * g) % 16 != 0) g *= 2;
  return g;
}

}  // namespace ktune::cuda::detail
