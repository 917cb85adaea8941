// Block formats and their scalar reference quantizers. Written from ggml's published block
// layouts and rounding rules (ggml-common.h, quantize_row_*_ref) so files written by ggml tools
// and by ktune are byte-identical; every optimized kernel is checked against these functions.
#include "ktune/engine/quant.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <iterator>

#include "ktune/engine/error.h"
#include "quant/kquant.h"

namespace ktune {
namespace {

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

constexpr int64_t kQBlock = 32;  // weights per Q4_0 / Q8_0 block

// Names of the ggml type ids (ggml.h's enum ggml_type), indexed by id. Ids that ggml removed
// (Q4_2, Q4_3 and the repacked Q4_0_x_y / IQ4_NL_x_y layouts) keep their old name so a file
// from an old converter still gets a readable error.
constexpr const char* kGgmlNames[] = {
    "F32",   "F16",        "Q4_0",       "Q4_1",       "Q4_2",     "Q4_3",     "Q5_0",
    "Q5_1",  "Q8_0",       "Q8_1",       "Q2_K",       "Q3_K",     "Q4_K",     "Q5_K",
    "Q6_K",  "Q8_K",       "IQ2_XXS",    "IQ2_XS",     "IQ3_XXS",  "IQ1_S",    "IQ4_NL",
    "IQ3_S", "IQ2_S",      "IQ4_XS",     "I8",         "I16",      "I32",      "I64",
    "F64",   "IQ1_M",      "BF16",       "Q4_0_4_4",   "Q4_0_4_8", "Q4_0_8_8", "TQ1_0",
    "TQ2_0", "IQ4_NL_4_4", "IQ4_NL_4_8", "IQ4_NL_8_8", "MXFP4",
};

const char* known_ggml_name(uint32_t id) {
  return id < std::size(kGgmlNames) ? kGgmlNames[id] : nullptr;
}

constexpr QuantType kAllTypes[] = {QuantType::F32,  QuantType::F16,  QuantType::BF16,
                                   QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_K,
                                   QuantType::Q5_K, QuantType::Q6_K, QuantType::Q8_K};
// What parse_quant_name accepts: the types a weight may have (Q8_K is an activation format).
constexpr QuantType kWeightTypes[] = {QuantType::F32,  QuantType::F16,  QuantType::BF16,
                                      QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_K,
                                      QuantType::Q5_K, QuantType::Q6_K};

void check_type(QuantType t, const char* where) {
  if (!is_supported_quant(static_cast<uint32_t>(t))) {
    throw Error(where, "unsupported type " + ggml_type_name(static_cast<uint32_t>(t)),
                "ktune computes with F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K and Q6_K; convert "
                "the model to one of these");
  }
}

// Float to int8 code of Q4_0, as ggml's (int8_t)(x*id + 8.5f) then MIN(15, .), but defined for
// every input: NaN and out-of-range values clamp instead of being undefined behaviour.
uint8_t q4_code(float v) {
  const float shifted = v + 8.5f;
  if (!(shifted >= 0.0f)) return 0;  // also NaN
  if (shifted >= 15.0f) return 15;
  return static_cast<uint8_t>(static_cast<int>(shifted));  // truncation, as the C cast
}

int8_t q8_code(float v) {
  const float r = std::roundf(v);  // half away from zero, like ggml's roundf
  if (!(r >= -128.0f)) return r != r ? 0 : -128;
  if (r > 127.0f) return 127;
  return static_cast<int8_t>(r);
}

void quantize_q4_0(const float* x, BlockQ4_0* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, x += kQBlock) {
    // The signed value of largest magnitude maps to -8 exactly, which uses the asymmetric
    // range [-8, 7] fully (ggml's choice, so we must make the same one to be bit-exact).
    float amax = 0.0f;
    float max = 0.0f;
    for (int j = 0; j < kQBlock; ++j) {
      const float a = std::fabs(x[j]);
      if (amax < a) {
        amax = a;
        max = x[j];
      }
    }
    const float d = max / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = fp32_to_fp16(d);
    for (int j = 0; j < 16; ++j) {
      const uint8_t lo = q4_code(x[j] * id);
      const uint8_t hi = q4_code(x[j + 16] * id);
      y[b].qs[j] = static_cast<uint8_t>(lo | (hi << 4));
    }
  }
}

void quantize_q8_0(const float* x, BlockQ8_0* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b, x += kQBlock) {
    float amax = 0.0f;
    for (int j = 0; j < kQBlock; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = fp32_to_fp16(d);
    for (int j = 0; j < kQBlock; ++j) y[b].qs[j] = q8_code(x[j] * id);
  }
}

}  // namespace

bool is_supported_quant(uint32_t id) {
  for (QuantType t : kAllTypes) {
    if (static_cast<uint32_t>(t) == id) return true;
  }
  return false;
}

const char* quant_name(QuantType t) {
  switch (t) {
    case QuantType::F32:
      return "F32";
    case QuantType::F16:
      return "F16";
    case QuantType::BF16:
      return "BF16";
    case QuantType::Q8_0:
      return "Q8_0";
    case QuantType::Q4_0:
      return "Q4_0";
    case QuantType::Q4_K:
      return "Q4_K";
    case QuantType::Q5_K:
      return "Q5_K";
    case QuantType::Q6_K:
      return "Q6_K";
    case QuantType::Q8_K:
      return "Q8_K";
  }
  return "unknown";
}

std::string ggml_type_name(uint32_t id) {
  if (is_supported_quant(id)) return quant_name(static_cast<QuantType>(id));
  const char* name = known_ggml_name(id);
  if (name == nullptr) return "ggml type " + std::to_string(id);
  return std::string(name) + " (ggml type " + std::to_string(id) + ")";
}

std::optional<QuantType> parse_quant_name(std::string_view name) {
  while (!name.empty() && std::isspace(static_cast<unsigned char>(name.front()))) {
    name.remove_prefix(1);
  }
  while (!name.empty() && std::isspace(static_cast<unsigned char>(name.back()))) {
    name.remove_suffix(1);
  }
  for (QuantType t : kWeightTypes) {
    const std::string_view candidate = quant_name(t);
    if (candidate.size() != name.size()) continue;
    bool equal = true;
    for (size_t i = 0; i < name.size() && equal; ++i) {
      equal = std::toupper(static_cast<unsigned char>(name[i])) == candidate[i];
    }
    if (equal) return t;
  }
  return std::nullopt;
}

QuantType parse_quant_or_throw(std::string_view name, const std::string& where) {
  if (auto t = parse_quant_name(name)) return *t;
  throw_usage(where, "unknown quant type '" + std::string(name) + "'",
              "use one of f32, f16, bf16, q8_0, q4_0, q4_k, q5_k, q6_k");
}

int64_t block_elems(QuantType t) {
  check_type(t, "block_elems");
  switch (t) {
    case QuantType::Q4_0:
    case QuantType::Q8_0:
      return kQBlock;
    case QuantType::Q4_K:
    case QuantType::Q5_K:
    case QuantType::Q6_K:
    case QuantType::Q8_K:
      return kQK_K;
    default:
      return 1;
  }
}

int64_t block_bytes(QuantType t) {
  check_type(t, "block_bytes");
  switch (t) {
    case QuantType::F32:
      return 4;
    case QuantType::F16:
    case QuantType::BF16:
      return 2;
    case QuantType::Q8_0:
      return sizeof(BlockQ8_0);
    case QuantType::Q4_0:
      return sizeof(BlockQ4_0);
    case QuantType::Q4_K:
      return sizeof(BlockQ4_K);
    case QuantType::Q5_K:
      return sizeof(BlockQ5_K);
    case QuantType::Q6_K:
      return sizeof(BlockQ6_K);
    case QuantType::Q8_K:
      return sizeof(BlockQ8_K);
  }
  return 0;
}

int64_t row_bytes(QuantType t, int64_t n) {
  const int64_t be = block_elems(t);
  if (n < 0 || n % be != 0) {
    throw Error(std::string(quant_name(t)) + " row",
                "a row of " + std::to_string(n) + " elements is not a whole number of " +
                    std::to_string(be) + "-element blocks",
                "use a row length that is a multiple of " + std::to_string(be) +
                    " (tensor rows of block formats always are; check the tensor's shape)");
  }
  return n / be * block_bytes(t);
}

void quantize_row(QuantType t, const float* src, void* dst, int64_t n) {
  const int64_t nb = row_bytes(t, n) / block_bytes(t);  // validates t and n
  switch (t) {
    case QuantType::F32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      break;
    case QuantType::F16: {
      auto* out = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) out[i] = fp32_to_fp16(src[i]);
      break;
    }
    case QuantType::BF16: {
      auto* out = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) out[i] = fp32_to_bf16(src[i]);
      break;
    }
    case QuantType::Q8_0:
      quantize_q8_0(src, static_cast<BlockQ8_0*>(dst), nb);
      break;
    case QuantType::Q4_0:
      quantize_q4_0(src, static_cast<BlockQ4_0*>(dst), nb);
      break;
    case QuantType::Q4_K:
      kquant::quantize_q4_k(src, static_cast<BlockQ4_K*>(dst), nb);
      break;
    case QuantType::Q5_K:
      kquant::quantize_q5_k(src, static_cast<BlockQ5_K*>(dst), nb);
      break;
    case QuantType::Q6_K:
      kquant::quantize_q6_k(src, static_cast<BlockQ6_K*>(dst), nb);
      break;
    case QuantType::Q8_K:
      kquant::quantize_q8_k(src, static_cast<BlockQ8_K*>(dst), nb);
      break;
  }
}

void dequantize_row(QuantType t, const void* src, float* dst, int64_t n) {
  const int64_t nb = row_bytes(t, n) / block_bytes(t);
  switch (t) {
    case QuantType::F32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      break;
    case QuantType::F16: {
      const auto* in = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_fp32(in[i]);
      break;
    }
    case QuantType::BF16: {
      const auto* in = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_fp32(in[i]);
      break;
    }
    case QuantType::Q8_0: {
      const auto* in = static_cast<const BlockQ8_0*>(src);
      for (int64_t b = 0; b < nb; ++b) {
        const float d = fp16_to_fp32(in[b].d);
        for (int j = 0; j < kQBlock; ++j) dst[b * kQBlock + j] = in[b].qs[j] * d;
      }
      break;
    }
    case QuantType::Q4_0: {
      const auto* in = static_cast<const BlockQ4_0*>(src);
      for (int64_t b = 0; b < nb; ++b) {
        const float d = fp16_to_fp32(in[b].d);
        for (int j = 0; j < 16; ++j) {
          dst[b * kQBlock + j] = ((in[b].qs[j] & 0x0F) - 8) * d;
          dst[b * kQBlock + j + 16] = ((in[b].qs[j] >> 4) - 8) * d;
        }
      }
      break;
    }
    case QuantType::Q4_K:
      kquant::dequantize_q4_k(static_cast<const BlockQ4_K*>(src), dst, nb);
      break;
    case QuantType::Q5_K:
      kquant::dequantize_q5_k(static_cast<const BlockQ5_K*>(src), dst, nb);
      break;
    case QuantType::Q6_K:
      kquant::dequantize_q6_k(static_cast<const BlockQ6_K*>(src), dst, nb);
      break;
    case QuantType::Q8_K:
      kquant::dequantize_q8_k(static_cast<const BlockQ8_K*>(src), dst, nb);
      break;
  }
}

uint16_t fp32_to_fp16(float f) {
  uint32_t x = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7FFFFFFFu;
  if (x >= 0x7F800000u) {
    // Inf stays inf; NaN keeps its top payload bits and is made quiet, as F16C does.
    if (x == 0x7F800000u) return sign | 0x7C00u;
    return static_cast<uint16_t>(sign | 0x7E00u | ((x >> 13) & 0x3FFu));
  }
  if (x >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 rounds (ties to even) to inf
  if (x >= 0x38800000u) {
    // Normal half: rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest
    // even; a carry out of the mantissa correctly bumps the exponent.
    const uint32_t rounded = x + 0x0FFFu + ((x >> 13) & 1u);
    return static_cast<uint16_t>(sign | ((rounded >> 13) - (112u << 10)));
  }
  if (x <= 0x33000000u) return sign;  // <= 2^-25: rounds to zero (2^-25 is a tie, to even)
  // Subnormal half: value / 2^-24, rounded to nearest even. The result may reach 0x400, the
  // smallest normal, which is the right encoding for that case.
  const uint32_t mant = (x & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126u - (x >> 23);  // 14..24
  uint32_t q = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return static_cast<uint16_t>(sign | q);
}

float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  if (exp == 0) {
    const float mag = std::ldexp(static_cast<float>(mant), -24);  // exact
    return sign ? -mag : mag;
  }
  if (exp == 31) return bits_float(sign | 0x7F800000u | (mant << 13));
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

uint16_t fp32_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 64u);  // quiet
  return static_cast<uint16_t>((u + (0x7FFFu + ((u >> 16) & 1u))) >> 16);
}

float bf16_to_fp32(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

}  // namespace ktune
