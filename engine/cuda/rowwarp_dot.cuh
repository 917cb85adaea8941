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
// Alignment: x 16 bytes; rows 2 bytes (Q8_0, Q4_0) or 16 bytes (BF16, F32); cols % 32 == 0.
#pragma once

#include <cstdint>

#include "cuda/common.cuh"
#include "ktune/engine/quant.h"

namespace ktune::cuda::detail {

template <QuantType T>
struct RowDot;

template <>
struct RowDot<QuantType::Q8_0> {
  static constexpr int kBlockBytes = 34;
  __device__ __forceinline__ static float step(float acc, const uint8_t* __restrict__ row,
                                               const float* __restrict__ x, int b, int s) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(row + int64_t{34} * b);
    const float d = fp16_bits_to_float(__ldg(h));
    uint16_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = __ldg(h + 1 + 4 * s + i);
    const float4* xp = reinterpret_cast<const float4*>(x + int64_t{32} * b + 8 * s);
    const float4 xa = __ldg(xp);
    const float4 xb = __ldg(xp + 1);
    const float xv[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
    float t = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float lo = static_cast<float>(static_cast<int8_t>(w[i] & 0xffu));
      const float hi = static_cast<float>(static_cast<int8_t>(w[i] >> 8));
      t = fmaf(lo, xv[2 * i], t);
      t = fmaf(hi, xv[2 * i + 1], t);
    }
    return fmaf(d, t, acc);
  }
};

template <>
struct RowDot<QuantType::Q4_0> {
  static constexpr int kBlockBytes = 18;
  __device__ __forceinline__ static float step(float acc, const uint8_t* __restrict__ row,
                                               const float* __restrict__ x, int b, int s) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(row + int64_t{18} * b);
    const float d = fp16_bits_to_float(__ldg(h));
    const uint32_t q = static_cast<uint32_t>(__ldg(h + 1 + 2 * s)) |
                       (static_cast<uint32_t>(__ldg(h + 2 + 2 * s)) << 16);
    // Byte i of q is quant byte 4s+i: element 4s+i (low nibble) and 16+4s+i (high nibble).
    const float4 xa = __ldg(reinterpret_cast<const float4*>(x + int64_t{32} * b + 4 * s));
    const float4 xb = __ldg(reinterpret_cast<const float4*>(x + int64_t{32} * b + 16 + 4 * s));
    const float xl[4] = {xa.x, xa.y, xa.z, xa.w};
    const float xh[4] = {xb.x, xb.y, xb.z, xb.w};
    float t = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t byte = (q >> (8 * i)) & 0xffu;
      t = fmaf(static_cast<float>(static_cast<int>(byte & 15u) - 8), xl[i], t);
      t = fmaf(static_cast<float>(static_cast<int>(byte >> 4) - 8), xh[i], t);
    }
    return fmaf(d, t, acc);
  }
};

template <>
struct RowDot<QuantType::BF16> {
  static constexpr int kBlockBytes = 64;
  __device__ __forceinline__ static float step(float acc, const uint8_t* __restrict__ row,
                                               const float* __restrict__ x, int b, int s) {
    const uint4 w = __ldg(reinterpret_cast<const uint4*>(row + int64_t{64} * b + 16 * s));
    const float4* xp = reinterpret_cast<const float4*>(x + int64_t{32} * b + 8 * s);
    const float4 xa = __ldg(xp);
    const float4 xb = __ldg(xp + 1);
    const uint32_t wv[4] = {w.x, w.y, w.z, w.w};
    const float xv[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
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
  __device__ __forceinline__ static float step(float acc, const uint8_t* __restrict__ row,
                                               const float* __restrict__ x, int b, int s) {
    const float4* wp = reinterpret_cast<const float4*>(row + int64_t{128} * b + 32 * s);
    const float4* xp = reinterpret_cast<const float4*>(x + int64_t{32} * b + 8 * s);
    const float4 wa = __ldg(wp), wb = __ldg(wp + 1);
    const float4 xa = __ldg(xp), xb = __ldg(xp + 1);
    acc = fmaf(wa.x, xa.x, acc);
    acc = fmaf(wa.y, xa.y, acc);
    acc = fmaf(wa.z, xa.z, acc);
    acc = fmaf(wa.w, xa.w, acc);
    acc = fmaf(wb.x, xb.x, acc);
    acc = fmaf(wb.y, xb.y, acc);
    acc = fmaf(wb.z, xb.z, acc);
    acc = fmaf(wb.w, xb.w, acc);
    return acc;
  }
};

// R dot products by one warp, interleaved (more loads in flight); out[r] = dot(rows[r], xs[r])
// over nb blocks, the same on every lane. Each result is independent of R and of the other rows.
template <QuantType T, int R>
__device__ __forceinline__ void warp_rows_dot(const uint8_t* const* rows, const float* const* xs,
                                              int nb, float* out) {
  const int lane = threadIdx.x % kWarp;
  const int s = lane & 3;
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.0f;
#pragma unroll 2
  for (int b = lane >> 2; b < nb; b += 8) {
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = RowDot<T>::step(acc[r], rows[r], xs[r], b, s);
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
         t == QuantType::F32;
}
inline bool rowdot_aligned(QuantType t, const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  return (t == QuantType::Q8_0 || t == QuantType::Q4_0) ? (a & 1u) == 0 : (a & 15u) == 0;
}

}  // namespace ktune::cuda::detail
