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

// True when ggml type id `id` is one ktune can read and compute with.
bool is_supported_quant(uint32_t ggml_type_id);

// ggml's spelling of a type name ("F32", "Q4_0", ...). For ids ktune does not support, a
// descriptive name ("Q4_K (ggml type 12)") or "ggml type N" so errors can name it.
const char* quant_name(QuantType t);
std::string ggml_type_name(uint32_t ggml_type_id);

// Case-insensitive: "q4_0", "Q4_0" and "Q4_0 " (trimmed) all parse. nullopt when unknown.
std::optional<QuantType> parse_quant_name(std::string_view name);
// Same, but throws ktune::Error (usage error) naming `where` and listing the valid names.
QuantType parse_quant_or_throw(std::string_view name, const std::string& where);

int64_t block_elems(QuantType t);   // weights per block (1 for F32/F16/BF16, 32 for Q4_0/Q8_0)
int64_t block_bytes(QuantType t);   // bytes per block
// Bytes of a row of n elements. Throws ktune::Error when n is not a multiple of block_elems(t).
int64_t row_bytes(QuantType t, int64_t n);

// Scalar reference quantization (ggml's *_ref functions, same rounding). n % block_elems == 0.
void quantize_row(QuantType t, const float* src, void* dst, int64_t n);
void dequantize_row(QuantType t, const void* src, float* dst, int64_t n);

// Half-precision conversions, round-to-nearest-even like ggml (F16C semantics; BF16 as
// ggml_compute_fp32_to_bf16, NaN kept quiet).
uint16_t fp32_to_fp16(float f);
float fp16_to_fp32(uint16_t h);
uint16_t fp32_to_bf16(float f);
float bf16_to_fp32(uint16_t h);

}  // namespace ktune
