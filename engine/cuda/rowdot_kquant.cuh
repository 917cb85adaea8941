// The K-quant weight formats (Q4_K, Q5_K, Q6_K; ggml's super-block layouts, quant.h) in the
// row-dot scheme of rowwarp_dot.cuh, so every decode kernel built on RowDot<T> (the fused matvec,
// the fused and unfused MoE, the per-slot MoE, launch_matvec_kquant) and the K-quant prefill
// matmul and embedding dequantize these formats with this one code.
//
// A RowDot "block" is 32 consecutive elements and a lane's slice s is 8 of them (elements
// 8s..8s+7), as for Q8_0/BF16/F32. A K-quant super-block (256 elements) is therefore 8 RowDot
// blocks: block b lies in super-block b / 8 at 32-element position c = b % 8. The warp layouts of
// rowwarp_dot.cuh (lane = 4 * (b % 8) + s for one step of 8 blocks) then put the 32 lanes of a
// warp on one super-block per step, reading its 144 / 176 / 210 bytes together.
//
// Per slice, a fragment holds the raw bits the slice needs (the super-block scales, the packed
// sub-block scale bytes, 8 quant codes); decode() turns them into the slice's affine map
// w = a * q - b (a = d * sc, b = dmin * m: ggml's d1, m1; b = 0 for Q6_K, a = d * sc, q = code -
// 32) and the 8 codes q as exact floats (byte-permute into the mantissa of 2^23, no int->float
// conversion). dot() sums a * Σ q·x - b * Σ x with fmaf in a fixed order; values() gives the
// dequantized weights with ggml's rounding (a * q, then - b; the CPU reference's values bit for
// bit).
//
// Alignment: Q4_K / Q5_K rows 4-byte aligned (32-bit loads; their 144- and 176-byte blocks keep
// every super-block 16-byte aligned when the row is); Q6_K rows 2-byte aligned (210-byte blocks:
// 16-bit loads). cols % 256 == 0.
#pragma once

#include <cstdint>

#include "cuda/common.cuh"
#include "ktune/engine/quant.h"

namespace ktune::cuda::detail {

template <QuantType T>
struct RowDot;

// Raw reads from global memory (read-only path) or shared memory (staged rows).
template <bool kGlobal>
__device__ __forceinline__ uint32_t kq_rd32(const uint8_t* p) {
  if (kGlobal) return __ldg(reinterpret_cast<const uint32_t*>(p));
  return *reinterpret_cast<const uint32_t*>(p);
}
template <bool kGlobal>
__device__ __forceinline__ uint32_t kq_rd16(const uint8_t* p) {
  if (kGlobal) return __ldg(reinterpret_cast<const uint16_t*>(p));
  return *reinterpret_cast<const uint16_t*>(p);
}
template <bool kGlobal>
__device__ __forceinline__ int kq_rd_s8(const uint8_t* p) {
  if (kGlobal) return __ldg(reinterpret_cast<const signed char*>(p));
  return *reinterpret_cast<const signed char*>(p);
}

// Byte i (0..3) of w, a value 0..255, as an exact float (2^23 + v - 2^23 - bias, one permute).
__device__ __forceinline__ float kq_byte_float(uint32_t w, int i, float bias) {
  return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7440u | static_cast<unsigned>(i))) -
         (8388608.0f + bias);
}

// The slice's 8 codes as floats (q - bias), from two words of 4 code bytes each.
__device__ __forceinline__ void kq_codes(uint32_t c0, uint32_t c1, float bias, float q[8]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    q[i] = kq_byte_float(c0, i, bias);
    q[4 + i] = kq_byte_float(c1, i, bias);
  }
}

// a * Σ q·x - b * Σ x (+ acc), sums in element order.
__device__ __forceinline__ float kq_dot(float acc, float a, float b, const float q[8],
                                        const float xv[8]) {
  float t = 0.0f, sx = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    t = fmaf(q[i], xv[i], t);
    sx += xv[i];
  }
  acc = fmaf(a, t, acc);
  return fmaf(-b, sx, acc);
}

// Q4_K (kFive false) and Q5_K (kFive true): 32-element block c of a super-block is sub-block c
// (its own 6-bit scale and min); its low 4 code bits are the nibble 4 * (c % 2) of qs[32 * (c /
// 2) + l], Q5_K's fifth bit is bit c of qh[l] (l = element within the sub-block).
template <bool kFive>
struct RowDotK4 {
  static constexpr int kSuperBytes = kFive ? 176 : 144;
  static constexpr int kQsOff = kFive ? 48 : 16;
  static constexpr int kUnroll = 2;
  static constexpr int kX2 = 4;
  struct Frag {
    uint32_t dm;          // d | dmin << 16 (fp16 bits)
    uint32_t s0, s1, s2;  // the 12 packed scale bytes
    uint32_t q0, q1;      // qs bytes 8s..8s+7 of the sub-block's 32-byte group
    uint32_t h0, h1;      // Q5_K: qh bytes 8s..8s+7
    int c;                // sub-block (0..7)
  };
  __device__ __forceinline__ static int xoff(int b, int s) { return 32 * b + 8 * s; }
  template <bool kGlobal>
  __device__ __forceinline__ static Frag fetch(const uint8_t* row, int b, int s) {
    const uint8_t* sb = row + int64_t{kSuperBytes} * (b >> 3);
    Frag f;
    f.c = b & 7;
    f.dm = kq_rd32<kGlobal>(sb);
    f.s0 = kq_rd32<kGlobal>(sb + 4);
    f.s1 = kq_rd32<kGlobal>(sb + 8);
    f.s2 = kq_rd32<kGlobal>(sb + 12);
    const uint8_t* q = sb + kQsOff + 32 * (f.c >> 1) + 8 * s;
    f.q0 = kq_rd32<kGlobal>(q);
    f.q1 = kq_rd32<kGlobal>(q + 4);
    if (kFive) {
      f.h0 = kq_rd32<kGlobal>(sb + 16 + 8 * s);
      f.h1 = kq_rd32<kGlobal>(sb + 20 + 8 * s);
    } else {
      f.h0 = f.h1 = 0u;
    }
    return f;
  }
  // a = d * sc, b = dmin * m, and the 8 codes (unpack_k4_scales' bit layout).
  __device__ __forceinline__ static void decode(const Frag& f, float* a, float* b, float q[8]) {
    const int sh = 8 * (f.c & 3);
    const uint32_t A = (f.s0 >> sh) & 0xFFu, B = (f.s1 >> sh) & 0xFFu, C = (f.s2 >> sh) & 0xFFu;
    uint32_t sc, m;
    if (f.c < 4) {
      sc = A & 63u;
      m = B & 63u;
    } else {
      sc = (C & 0xFu) | ((A >> 6) << 4);
      m = (C >> 4) | ((B >> 6) << 4);
    }
    *a = fp16_bits_to_float(static_cast<uint16_t>(f.dm & 0xFFFFu)) * static_cast<float>(sc);
    *b = fp16_bits_to_float(static_cast<uint16_t>(f.dm >> 16)) * static_cast<float>(m);
    const int qs = 4 * (f.c & 1);
    uint32_t c0 = (f.q0 >> qs) & 0x0F0F0F0Fu, c1 = (f.q1 >> qs) & 0x0F0F0F0Fu;
    if (kFive) {
      c0 |= ((f.h0 >> f.c) & 0x01010101u) << 4;
      c1 |= ((f.h1 >> f.c) & 0x01010101u) << 4;
    }
    kq_codes(c0, c1, 0.0f, q);
  }
};

// Q6_K: 32-element block c of a super-block is quarter k = c % 4 of half h = c / 4; element l of
// it has its low 4 bits in nibble 4 * (k / 2) of ql[64h + 32 * (k % 2) + l], its top 2 bits in
// bits 2k, 2k+1 of qh[32h + l], and the signed scale scales[8h + 2k + l / 16] (one per slice).
struct RowDotQ6K {
  static constexpr int kSuperBytes = 210;
  static constexpr int kUnroll = 2;
  static constexpr int kX2 = 4;
  struct Frag {
    uint32_t l0, l1, h0, h1;  // ql and qh bytes of the slice
    int sc;                   // signed 8-bit scale
    uint32_t d;               // fp16 bits
    int c;                    // 32-element block in the super-block (0..7)
  };
  __device__ __forceinline__ static int xoff(int b, int s) { return 32 * b + 8 * s; }
  template <bool kGlobal>
  __device__ __forceinline__ static Frag fetch(const uint8_t* row, int b, int s) {
    const uint8_t* sb = row + int64_t{kSuperBytes} * (b >> 3);
    Frag f;
    f.c = b & 7;
    const int h = f.c >> 2, k = f.c & 3;
    const uint8_t* ql = sb + 64 * h + 32 * (k & 1) + 8 * s;
    const uint8_t* qh = sb + 128 + 32 * h + 8 * s;
    f.l0 = kq_rd16<kGlobal>(ql) | (kq_rd16<kGlobal>(ql + 2) << 16);
    f.l1 = kq_rd16<kGlobal>(ql + 4) | (kq_rd16<kGlobal>(ql + 6) << 16);
    f.h0 = kq_rd16<kGlobal>(qh) | (kq_rd16<kGlobal>(qh + 2) << 16);
    f.h1 = kq_rd16<kGlobal>(qh + 4) | (kq_rd16<kGlobal>(qh + 6) << 16);
    f.sc = kq_rd_s8<kGlobal>(sb + 192 + 8 * h + 2 * k + (s >> 1));
    f.d = kq_rd16<kGlobal>(sb + 208);
    return f;
  }
  __device__ __forceinline__ static void decode(const Frag& f, float* a, float* b, float q[8]) {
    *a = fp16_bits_to_float(static_cast<uint16_t>(f.d)) * static_cast<float>(f.sc);
    *b = 0.0f;
    const int k = f.c & 3;
    const int ls = 4 * (k >> 1), hs = 2 * k;
    const uint32_t c0 = ((f.l0 >> ls) & 0x0F0F0F0Fu) | (((f.h0 >> hs) & 0x03030303u) << 4);
    const uint32_t c1 = ((f.l1 >> ls) & 0x0F0F0F0Fu) | (((f.h1 >> hs) & 0x03030303u) << 4);
    kq_codes(c0, c1, 32.0f, q);
  }
};

// The RowDot interface (load / lds / dot, as rowwarp_dot.cuh's other types) plus values().
template <class K>
struct RowDotKQuant : K {
  using Frag = typename K::Frag;
  __device__ __forceinline__ static Frag load(const uint8_t* __restrict__ row, int b, int s) {
    return K::template fetch<true>(row, b, s);
  }
  __device__ __forceinline__ static Frag lds(const uint8_t* row, int b, int s) {
    return K::template fetch<false>(row, b, s);
  }
  __device__ __forceinline__ static float dot(float acc, const Frag& f, const float xv[8]) {
    float a, b, q[8];
    K::decode(f, &a, &b, q);
    return kq_dot(acc, a, b, q, xv);
  }
  // The slice's 8 weights, as the CPU's dequantize_row computes them (a * q rounded, then - b).
  __device__ __forceinline__ static void values(const Frag& f, float w[8]) {
    float a, b, q[8];
    K::decode(f, &a, &b, q);
#pragma unroll
    for (int i = 0; i < 8; ++i) w[i] = __fsub_rn(__fmul_rn(a, q[i]), b);
  }
};

template <>
struct RowDot<QuantType::Q4_K> : RowDotKQuant<RowDotK4<false>> {};
template <>
struct RowDot<QuantType::Q5_K> : RowDotKQuant<RowDotK4<true>> {};
template <>
struct RowDot<QuantType::Q6_K> : RowDotKQuant<RowDotQ6K> {};

__host__ __device__ constexpr bool is_kquant(QuantType t) {
  return t == QuantType::Q4_K || t == QuantType::Q5_K || t == QuantType::Q6_K;
}

}  // namespace ktune::cuda::detail
