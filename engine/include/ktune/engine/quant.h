// Block quantization formats, bit-exact with ggml's block layouts (ggml-common.h), plus the scalar
// reference quantize/dequantize that every optimized kernel is tested against.
//
// A tensor row of n elements of type T occupies row_bytes(T, n) bytes: n / block_elems(T) blocks
// of block_bytes(T) each, stored back to back. The enum values are ggml's type ids, which is what
// a GGUF tensor info stores.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace ktune {

enum class QuantType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q8_0 = 8,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,  // activations only: what the CPU kernels multiply K-quant weights with
  BF16 = 30,
};

// ggml's blocks. Q4_0: 32 weights, scale d (fp16) then 16 bytes; byte j holds weight j in its low
// nibble and weight j+16 in its high nibble, each stored as q+8 with q in [-8, 7].
struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[16];
};
static_assert(sizeof(BlockQ4_0) == 18, "ggml block_q4_0 is 18 bytes");

// Q8_0: 32 weights, scale d (fp16) then 32 signed bytes; weight = d * qs[i].
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[32];
};
static_assert(sizeof(BlockQ8_0) == 34, "ggml block_q8_0 is 34 bytes");

// K-quants ("k" for the super-blocks): 256 weights per block, split into sub-blocks that each
// have their own small integer scale, which a per-super-block fp16 scale turns into floats.
constexpr int64_t kQK_K = 256;

// Q4_K: 8 sub-blocks of 32, weight = d * sc[j] * q - dmin * m[j] with q in 0..15 and 6-bit sc[j],
// m[j] packed into scales[12] (unpack_k4_scales). qs holds 4 groups of 64 weights in 32 bytes
// each: byte l of group g holds weight 64g + l in its low nibble and 64g + 32 + l in its high one.
struct BlockQ4_K {
  uint16_t d;     // fp16 scale of the sub-block scales
  uint16_t dmin;  // fp16 scale of the sub-block mins
  uint8_t scales[12];
  uint8_t qs[128];
};
static_assert(sizeof(BlockQ4_K) == 144, "ggml block_q4_K is 144 bytes");

// Q5_K: Q4_K plus a fifth bit: q in 0..31, the low 4 bits in qs as in Q4_K, bit 4 of weight
// 64g + l in bit 2g of qh[l], of weight 64g + 32 + l in bit 2g + 1.
struct BlockQ5_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];
  uint8_t qh[32];
  uint8_t qs[128];
};
static_assert(sizeof(BlockQ5_K) == 176, "ggml block_q5_K is 176 bytes");

// Q6_K: 16 sub-blocks of 16, weight = d * scales[j] * (q - 32) with q in 0..63 and signed 8-bit
// scales. Per half of 128 weights (ql += 64, qh += 32): weight l (l < 32) has its low 4 bits in
// the low nibble of ql[l], weight 32 + l in the low nibble of ql[32 + l], weights 64 + l and
// 96 + l in the high nibbles of the same two bytes; their top 2 bits are bits 0-1, 2-3, 4-5, 6-7
// of qh[l].
struct BlockQ6_K {
  uint8_t ql[128];
  uint8_t qh[64];
  int8_t scales[16];
  uint16_t d;
};
static_assert(sizeof(BlockQ6_K) == 210, "ggml block_q6_K is 210 bytes");

// Q8_K: activations for K-quant dot products. A float scale (not fp16), 256 signed bytes, and
// the sums of each 16 consecutive bytes (what the min terms of Q4_K/Q5_K need).
struct BlockQ8_K {
  float d;
  int8_t qs[256];
  int16_t bsums[16];
};
static_assert(sizeof(BlockQ8_K) == 292, "ggml block_q8_K is 292 bytes");

// The 8 six-bit scales and mins of a Q4_K/Q5_K block. Sub-blocks 0-3 keep theirs in the low 6
// bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 keep the low 4 bits in the nibbles
// of bytes 8-11 and the top 2 bits in the top bits of bytes 0-3 (scales) and 4-7 (mins).
inline void unpack_k4_scales(const uint8_t packed[12], uint8_t sc[8], uint8_t m[8]) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = packed[j] & 63;
    m[j] = packed[j + 4] & 63;
    sc[j + 4] = static_cast<uint8_t>((packed[j + 8] & 0x0F) | ((packed[j] >> 6) << 4));
    m[j + 4] = static_cast<uint8_t>((packed[j + 8] >> 4) | ((packed[j + 4] >> 6) << 4));
  }
}

// True when ggml type id `id` is one ktune can read and compute with (Q8_K counts: ktune reads
// and writes it, though only as the CPU kernels' activation type).
bool is_supported_quant(uint32_t ggml_type_id);

// ggml's spelling of a type name ("F32", "Q4_0", ...). For ids ktune does not support, a
// descriptive name ("Q4_K (ggml type 12)") or "ggml type N" so errors can name it.
const char* quant_name(QuantType t);
std::string ggml_type_name(uint32_t ggml_type_id);

// Case-insensitive: "q4_0", "Q4_0" and "Q4_0 " (trimmed) all parse. nullopt when unknown. Only
// weight types parse (f32 f16 bf16 q8_0 q4_0 q4_k q5_k q6_k): Q8_K is never a weight type.
std::optional<QuantType> parse_quant_name(std::string_view name);
// Same, but throws ktune::Error (usage error) naming `where` and listing the valid names.
QuantType parse_quant_or_throw(std::string_view name, const std::string& where);

int64_t block_elems(QuantType t);   // weights per block (1 F32/F16/BF16, 32 Q4_0/Q8_0, 256 K)
int64_t block_bytes(QuantType t);   // bytes per block
// Bytes of a row of n elements. Throws ktune::Error when n is not a multiple of block_elems(t).
int64_t row_bytes(QuantType t, int64_t n);

// Scalar reference quantization (ggml's *_ref functions: same rounding, same bytes; for the
// K-quants also on NaN and infinities, where the codes are meaningless but deterministic; Q8_K
// activations map NaN to 0 and clamp). No input reaches undefined behaviour. n % block_elems == 0.
void quantize_row(QuantType t, const float* src, void* dst, int64_t n);
void dequantize_row(QuantType t, const void* src, float* dst, int64_t n);

// Half-precision conversions, round-to-nearest-even like ggml (F16C semantics; BF16 as
// ggml_compute_fp32_to_bf16, NaN kept quiet).
uint16_t fp32_to_fp16(float f);
float fp16_to_fp32(uint16_t h);
uint16_t fp32_to_bf16(float f);
float bf16_to_fp32(uint16_t h);

}  // namespace ktune
