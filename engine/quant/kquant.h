// Scalar reference quantizers and dequantizers of the K-quant super-block formats (Q4_K, Q5_K,
// Q6_K and the Q8_K activations), called through quant.h's quantize_row / dequantize_row.
#pragma once

#include <cstdint>
#include <cstring>

#include "ktune/engine/quant.h"

namespace ktune::kquant {

// nb super-blocks of 256 floats each.
void quantize_q4_k(const float* x, BlockQ4_K* y, int64_t nb);
void quantize_q5_k(const float* x, BlockQ5_K* y, int64_t nb);
void quantize_q6_k(const float* x, BlockQ6_K* y, int64_t nb);
void quantize_q8_k(const float* x, BlockQ8_K* y, int64_t nb);

void dequantize_q4_k(const BlockQ4_K* x, float* y, int64_t nb);
void dequantize_q5_k(const BlockQ5_K* x, float* y, int64_t nb);
void dequantize_q6_k(const BlockQ6_K* x, float* y, int64_t nb);
void dequantize_q8_k(const BlockQ8_K* x, float* y, int64_t nb);

// ggml's rounding for these formats: nearest, ties to even. Adding 1.5 * 2^23 leaves the
// rounded integer in the low mantissa bits; exact for |v| <= 2^22 - 1 (ggml asserts that range).
// Outside it (huge or non-finite inputs) the result is still a deterministic int, and callers
// clamp it to their code range, so no input leads to undefined behaviour. The weight quantizers
// use this form, bit for bit ggml's, also on such inputs.
inline int nearest_int(float v) {
  const float shifted = v + 12582912.f;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  return (bits & 0x007fffff) - 0x00400000;
}

// The same rounding with a stated meaning for every input: clamped to ±(2^22 - 1), NaN -> 0.
// The Q8_K activation quantizer uses it, so its SIMD twins can reproduce it exactly.
inline int nearest_int_clamped(float v) {
  float c = v > 4194303.f ? 4194303.f : v;
  c = c < -4194303.f ? -4194303.f : c;
  return v == v ? nearest_int(c) : 0;
}

}  // namespace ktune::kquant
