// Scalar reference quantizers and dequantizers of the K-quant super-block formats (Q4_K, Q5_K,
// Q6_K and the Q8_K activations), called through quant.h's quantize_row / dequantize_row.
#pragma once

#include <cstdint>

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

// ggml's rounding for these formats: nearest, ties to even (the float magic-number trick), for
// |v| <= 2^22 - 1; beyond that (and for infinities) clamped to ±(2^22 - 1), NaN -> 0.
int nearest_int(float v);

}  // namespace ktune::kquant
