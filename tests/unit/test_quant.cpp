// Block formats: byte layouts written out by hand from ggml's spec, round-trip error bounds,
// half-precision rounding (ties, subnormals, inf/NaN), names and row sizes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "ktune/engine/error.h"
#include "ktune/engine/quant.h"

namespace ktune {
namespace {

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

std::vector<uint8_t> quantize_bytes(QuantType t, const std::vector<float>& x) {
  std::vector<uint8_t> out(static_cast<size_t>(row_bytes(t, static_cast<int64_t>(x.size()))));
  quantize_row(t, x.data(), out.data(), static_cast<int64_t>(x.size()));
  return out;
}

// --- hand-written layouts ---------------------------------------------------------------------

TEST(QuantLayout, Q4_0ScaleOneRamp) {
  // x[j] = j - 8 for the low half, 7 - j for the high half: the first element of largest
  // magnitude is x[0] = -8, so d = -8 / -8 = 1 (fp16 0x3C00) and codes are x + 8.
  std::vector<float> x(32);
  for (int j = 0; j < 16; ++j) {
    x[j] = static_cast<float>(j - 8);
    x[16 + j] = static_cast<float>(7 - j);
  }
  std::vector<uint8_t> want = {0x00, 0x3C};
  for (int j = 0; j < 16; ++j) want.push_back(static_cast<uint8_t>(j | ((15 - j) << 4)));
  EXPECT_EQ(quantize_bytes(QuantType::Q4_0, x), want);
}

TEST(QuantLayout, Q4_0PositiveMaxGivesNegativeScale) {
  // Largest magnitude +4 -> d = 4 / -8 = -0.5 (fp16 0xB800), id = -2; code = trunc(x*id + 8.5):
  // 0 -> 8, 4 -> 0, -1 -> 10, 1.3 -> trunc(5.9) = 5, -3.75 -> 15 (clamped from 16).
  std::vector<float> x(32, 0.0f);
  x[3] = 4.0f;
  x[20] = -1.0f;
  x[5] = 1.3f;
  x[31] = -3.75f;
  std::vector<uint8_t> want(18, 0x88);
  want[0] = 0x00;
  want[1] = 0xB8;
  want[2 + 3] = 0x80;   // low nibble: x[3] -> 0; high nibble: x[19] -> 8
  want[2 + 4] = 0xA8;   // high nibble: x[20] -> 10
  want[2 + 5] = 0x85;   // low nibble: x[5] -> 5
  want[2 + 15] = 0xF8;  // high nibble: x[31] -> 15
  EXPECT_EQ(quantize_bytes(QuantType::Q4_0, x), want);
}

TEST(QuantLayout, Q4_0AllZeroBlock) {
  std::vector<uint8_t> want(18, 0x88);
  // d = 0 / -8 = -0.0, stored as fp16 0x8000 (as ggml does); every code is the zero point 8.
  want[0] = 0x00;
  want[1] = 0x80;
  EXPECT_EQ(quantize_bytes(QuantType::Q4_0, std::vector<float>(32, 0.0f)), want);
}

TEST(QuantLayout, Q8_0RoundsHalfAwayFromZero) {
  // amax 127 -> d = 1 (0x3C00), id = 1: roundf ties go away from zero (2.5 -> 3, not 2).
  std::vector<float> x(32, 0.0f);
  x[0] = 127.0f;
  x[1] = 2.5f;
  x[2] = -2.5f;
  x[3] = 0.5f;
  x[4] = -0.5f;
  x[5] = 0.49999997f;
  x[6] = 126.5f;
  x[7] = -100.25f;
  x[31] = -7.0f;
  std::vector<uint8_t> want(34, 0x00);
  want[1] = 0x3C;
  const int8_t q[] = {127, 3, -3, 1, -1, 0, 127, -100};
  for (int j = 0; j < 8; ++j) want[2 + j] = static_cast<uint8_t>(q[j]);
  want[2 + 31] = static_cast<uint8_t>(-7);
  EXPECT_EQ(quantize_bytes(QuantType::Q8_0, x), want);
}

TEST(QuantLayout, Q8_0ScaleTwo) {
  // amax 254 -> d = 2 (0x4000), id = 0.5: 5 -> 2.5 -> 3, -5 -> -3, 3 -> 2, 1 -> 1, -254 -> -127.
  std::vector<float> x(32, 0.0f);
  x[10] = -254.0f;
  x[11] = 5.0f;
  x[12] = -5.0f;
  x[13] = 3.0f;
  x[14] = 1.0f;
  std::vector<uint8_t> want(34, 0x00);
  want[1] = 0x40;
  want[2 + 10] = static_cast<uint8_t>(-127);
  want[2 + 11] = 3;
  want[2 + 12] = static_cast<uint8_t>(-3);
  want[2 + 13] = 2;
  want[2 + 14] = 1;
  EXPECT_EQ(quantize_bytes(QuantType::Q8_0, x), want);
}

TEST(QuantLayout, HalfFormatsAreLittleEndianPerElement) {
  const std::vector<float> x = {1.0f, -2.0f, 0.5f};
  EXPECT_EQ(quantize_bytes(QuantType::F16, x),
            (std::vector<uint8_t>{0x00, 0x3C, 0x00, 0xC0, 0x00, 0x38}));
  EXPECT_EQ(quantize_bytes(QuantType::BF16, x),
            (std::vector<uint8_t>{0x80, 0x3F, 0x00, 0xC0, 0x00, 0x3F}));
}

// --- round trips ------------------------------------------------------------------------------

std::vector<float> random_row(std::mt19937& rng, int64_t n, float scale) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> x(static_cast<size_t>(n));
  for (float& v : x) v = dist(rng);
  return x;
}

class QuantRoundTrip : public ::testing::TestWithParam<QuantType> {};

TEST_P(QuantRoundTrip, ErrorWithinFormatBound) {
  const QuantType t = GetParam();
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  const int64_t n = 32 * 67;
  for (float scale : {1e-3f, 1.0f, 300.0f}) {
    const std::vector<float> x = random_row(rng, n, scale);
    const std::vector<uint8_t> q = quantize_bytes(t, x);
    std::vector<float> y(static_cast<size_t>(n));
    dequantize_row(t, q.data(), y.data(), n);
    for (int64_t b = 0; b < n / 32; ++b) {
      float amax = 0.0f;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[b * 32 + j]));
      for (int j = 0; j < 32; ++j) {
        const float xv = x[b * 32 + j], yv = y[b * 32 + j];
        float bound = 0.0f;
        switch (t) {
          case QuantType::F32:
            bound = 0.0f;
            break;
          case QuantType::F16:
            bound = std::fabs(xv) * 0x1p-11f + 0x1p-25f;
            break;  // + subnormals
          case QuantType::BF16:
            bound = std::fabs(xv) * 0x1p-8f;
            break;
          // Half a step (amax/127) plus the fp16 rounding of the scale (<= 127 * 2^-11 steps).
          // (a tiny block's scale is an fp16 subnormal: absolute error up to 2^-25 per code).
          case QuantType::Q8_0:
            bound = amax / 127.0f * (0.5f + 127.0f * 0x1p-11f) * 1.001f + 127.0f * 0x1p-25f;
            break;
          // A step is amax/8; the side opposite the max may clamp at code 15 (up to one step),
          // plus the fp16 rounding of the scale (<= 8 * 2^-11 steps).
          case QuantType::Q4_0:
            bound = amax / 8.0f * (1.0f + 8.0f * 0x1p-11f) * 1.001f + 8.0f * 0x1p-25f;
            break;
          default:  // K-quants have their own bounds in test_kquant.cpp
            FAIL() << quant_name(t) << " has no bound here";
        }
        ASSERT_LE(std::fabs(xv - yv), bound)
            << quant_name(t) << " element " << b * 32 + j << " x=" << xv << " y=" << yv;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Quant, QuantRoundTrip,
                         ::testing::Values(QuantType::F32, QuantType::F16, QuantType::BF16,
                                           QuantType::Q8_0, QuantType::Q4_0),
                         [](const auto& info) { return std::string(quant_name(info.param)); });

TEST(QuantRoundTripExact, Q4_0MaxElementIsExactUpToFp16) {
  // The element of largest magnitude maps to code 0 (-8 · d), so it comes back to within the
  // fp16 rounding of d.
  std::mt19937 rng(std::random_device{}());
  const std::vector<float> x = random_row(rng, 32, 2.0f);
  const std::vector<uint8_t> q = quantize_bytes(QuantType::Q4_0, x);
  std::vector<float> y(32);
  dequantize_row(QuantType::Q4_0, q.data(), y.data(), 32);
  int imax = 0;
  for (int j = 1; j < 32; ++j) {
    if (std::fabs(x[j]) > std::fabs(x[imax])) imax = j;
  }
  EXPECT_NEAR(y[imax], x[imax], std::fabs(x[imax]) * 0x1p-11f);
}

// --- fp16 -----------------------------------------------------------------------------------

TEST(QuantFp16, KnownValues) {
  EXPECT_EQ(fp32_to_fp16(0.0f), 0x0000);
  EXPECT_EQ(fp32_to_fp16(-0.0f), 0x8000);
  EXPECT_EQ(fp32_to_fp16(1.0f), 0x3C00);
  EXPECT_EQ(fp32_to_fp16(-2.0f), 0xC000);
  EXPECT_EQ(fp32_to_fp16(65504.0f), 0x7BFF);
  EXPECT_EQ(fp32_to_fp16(65519.996f), 0x7BFF);
  EXPECT_EQ(fp32_to_fp16(65520.0f), 0x7C00);  // tie between 65504 and 65536: to even (inf)
  EXPECT_EQ(fp32_to_fp16(1e9f), 0x7C00);
  EXPECT_EQ(fp32_to_fp16(-1e9f), 0xFC00);
  EXPECT_EQ(fp32_to_fp16(std::numeric_limits<float>::infinity()), 0x7C00);
  EXPECT_EQ(fp32_to_fp16(-std::numeric_limits<float>::infinity()), 0xFC00);
}

TEST(QuantFp16, TiesRoundToEven) {
  EXPECT_EQ(fp32_to_fp16(1.0f + 0x1p-11f), 0x3C00);             // between 0x3C00 and 0x3C01
  EXPECT_EQ(fp32_to_fp16(1.0f + 3 * 0x1p-11f), 0x3C02);         // between 0x3C01 and 0x3C02
  EXPECT_EQ(fp32_to_fp16(1.0f + 0x1p-11f + 0x1p-20f), 0x3C01);  // just above the tie
  EXPECT_EQ(fp32_to_fp16(2.0f - 0x1p-12f), 0x4000);             // 0x3BFF/0x4000 tie: carry to 2
}

TEST(QuantFp16, Subnormals) {
  EXPECT_EQ(fp32_to_fp16(0x1p-24f), 0x0001);             // smallest subnormal
  EXPECT_EQ(fp32_to_fp16(0x1p-25f), 0x0000);             // tie 0 / 1: to even (0)
  EXPECT_EQ(fp32_to_fp16(0x1.000002p-25f), 0x0001);      // just above the tie
  EXPECT_EQ(fp32_to_fp16(1.5f * 0x1p-24f), 0x0002);      // tie 1 / 2: to even (2)
  EXPECT_EQ(fp32_to_fp16(2.5f * 0x1p-24f), 0x0002);      // tie 2 / 3: to even (2)
  EXPECT_EQ(fp32_to_fp16(0x1p-14f), 0x0400);             // smallest normal
  EXPECT_EQ(fp32_to_fp16(0x1p-14f - 0x1p-25f), 0x0400);  // tie 0x3FF / 0x400: to even
  EXPECT_EQ(fp32_to_fp16(-0x1p-24f), 0x8001);
  EXPECT_EQ(fp32_to_fp16(1e-30f), 0x0000);
  EXPECT_EQ(fp16_to_fp32(0x0001), 0x1p-24f);
  EXPECT_EQ(fp16_to_fp32(0x03FF), 1023.0f * 0x1p-24f);
  EXPECT_EQ(fp16_to_fp32(0x8001), -0x1p-24f);
}

TEST(QuantFp16, InfAndNaN) {
  EXPECT_TRUE(std::isinf(fp16_to_fp32(0x7C00)));
  EXPECT_TRUE(std::isnan(fp16_to_fp32(0x7E00)));
  EXPECT_TRUE(std::isnan(fp16_to_fp32(0xFC01)));
  EXPECT_EQ(fp32_to_fp16(std::numeric_limits<float>::quiet_NaN()), 0x7E00);
  EXPECT_EQ(fp32_to_fp16(float_of(0x7F800001u)), 0x7E00);  // signalling NaN comes back quiet
  EXPECT_EQ(fp32_to_fp16(float_of(0xFFC02000u)), 0xFE01);  // sign and top payload kept
}

TEST(QuantFp16, EveryHalfRoundTripsAndEveryMidpointRoundsToEven) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = fp16_to_fp32(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(fp32_to_fp16(f), h) << std::hex << h;
  }
  // Between consecutive positive halves (and 0x7BFF/inf, where inf stands for 65536) the
  // midpoint is exact in float: it must go to the even code, its neighbours to the near one.
  for (uint32_t h = 0; h < 0x7C00; ++h) {
    const float lo = fp16_to_fp32(static_cast<uint16_t>(h));
    const float hi = h + 1 == 0x7C00 ? 65536.0f : fp16_to_fp32(static_cast<uint16_t>(h + 1));
    const float mid = (lo + hi) / 2;
    const uint32_t even = (h & 1u) ? h + 1 : h;
    ASSERT_EQ(fp32_to_fp16(mid), even) << std::hex << h;
    ASSERT_EQ(fp32_to_fp16(std::nextafter(mid, 0.0f)), h) << std::hex << h;
    ASSERT_EQ(fp32_to_fp16(std::nextafter(mid, 1e30f)), h + 1) << std::hex << h;
    ASSERT_EQ(fp32_to_fp16(-mid), even | 0x8000u) << std::hex << h;
  }
}

// --- bf16 -----------------------------------------------------------------------------------

TEST(QuantBf16, RoundingAndSpecials) {
  EXPECT_EQ(fp32_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(fp32_to_bf16(float_of(0x3F808000u)), 0x3F80);  // tie, even stays
  EXPECT_EQ(fp32_to_bf16(float_of(0x3F818000u)), 0x3F82);  // tie, odd rounds up
  EXPECT_EQ(fp32_to_bf16(float_of(0x3F808001u)), 0x3F81);  // above the tie
  EXPECT_EQ(fp32_to_bf16(float_of(0x3F807FFFu)), 0x3F80);  // below the tie
  EXPECT_EQ(fp32_to_bf16(float_of(0x00000001u)), 0x0000);  // float subnormal: rounds to 0
  EXPECT_EQ(fp32_to_bf16(float_of(0x00018000u)), 0x0002);  // subnormal tie, to even
  EXPECT_EQ(fp32_to_bf16(float_of(0x7F7FFFFFu)), 0x7F80);  // FLT_MAX rounds to inf
  EXPECT_EQ(fp32_to_bf16(std::numeric_limits<float>::infinity()), 0x7F80);
  EXPECT_EQ(fp32_to_bf16(-std::numeric_limits<float>::infinity()), 0xFF80);
  EXPECT_EQ(fp32_to_bf16(std::numeric_limits<float>::quiet_NaN()), 0x7FC0);
  EXPECT_EQ(fp32_to_bf16(float_of(0x7F800001u)), 0x7FC0);  // signalling NaN made quiet
  EXPECT_EQ(fp32_to_bf16(float_of(0xFF800001u)), 0xFFC0);
  EXPECT_EQ(bits_of(bf16_to_fp32(0x3F80)), 0x3F800000u);
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = bf16_to_fp32(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(fp32_to_bf16(f), h) << std::hex << h;
  }
}

// --- names and sizes ------------------------------------------------------------------------

TEST(QuantNames, ParseIsCaseInsensitiveAndTrimmed) {
  EXPECT_EQ(parse_quant_name("q4_0"), QuantType::Q4_0);
  EXPECT_EQ(parse_quant_name("Q4_0"), QuantType::Q4_0);
  EXPECT_EQ(parse_quant_name("Q4_0 "), QuantType::Q4_0);
  EXPECT_EQ(parse_quant_name("  q8_0\t"), QuantType::Q8_0);
  EXPECT_EQ(parse_quant_name("bf16"), QuantType::BF16);
  EXPECT_EQ(parse_quant_name("F16"), QuantType::F16);
  EXPECT_EQ(parse_quant_name("f32"), QuantType::F32);
  EXPECT_EQ(parse_quant_name("q4_k"), QuantType::Q4_K);
  EXPECT_EQ(parse_quant_name("q3_k"), std::nullopt);
  EXPECT_EQ(parse_quant_name(""), std::nullopt);
  EXPECT_EQ(parse_quant_name("q4_0x"), std::nullopt);
}

TEST(QuantNames, ParseOrThrowIsAUsageErrorNamingTheField) {
  EXPECT_EQ(parse_quant_or_throw(" Q8_0", "--quant"), QuantType::Q8_0);
  try {
    parse_quant_or_throw("q3_k", "--quant");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::Usage);
    EXPECT_EQ(e.where(), "--quant");
    EXPECT_NE(std::string(e.what()).find("q3_k"), std::string::npos);
    EXPECT_NE(e.fix().find("q4_0"), std::string::npos);
  }
}

TEST(QuantNames, GgmlTypeNames) {
  EXPECT_EQ(ggml_type_name(0), "F32");
  EXPECT_EQ(ggml_type_name(2), "Q4_0");
  EXPECT_EQ(ggml_type_name(8), "Q8_0");
  EXPECT_EQ(ggml_type_name(30), "BF16");
  EXPECT_EQ(ggml_type_name(12), "Q4_K");
  EXPECT_EQ(ggml_type_name(11), "Q3_K (ggml type 11)");
  EXPECT_EQ(ggml_type_name(3), "Q4_1 (ggml type 3)");
  EXPECT_EQ(ggml_type_name(14), "Q6_K");
  EXPECT_EQ(ggml_type_name(20), "IQ4_NL (ggml type 20)");
  EXPECT_EQ(ggml_type_name(39), "MXFP4 (ggml type 39)");
  EXPECT_EQ(ggml_type_name(1000), "ggml type 1000");
  EXPECT_STREQ(quant_name(QuantType::Q4_0), "Q4_0");
  EXPECT_STREQ(quant_name(QuantType::BF16), "BF16");
  EXPECT_TRUE(is_supported_quant(2));
  EXPECT_TRUE(is_supported_quant(30));
  EXPECT_TRUE(is_supported_quant(12));
  EXPECT_FALSE(is_supported_quant(11));
  EXPECT_FALSE(is_supported_quant(3));
}

TEST(QuantSizes, BlocksAndRows) {
  EXPECT_EQ(block_elems(QuantType::Q4_0), 32);
  EXPECT_EQ(block_bytes(QuantType::Q4_0), 18);
  EXPECT_EQ(block_elems(QuantType::Q8_0), 32);
  EXPECT_EQ(block_bytes(QuantType::Q8_0), 34);
  EXPECT_EQ(block_elems(QuantType::BF16), 1);
  EXPECT_EQ(block_bytes(QuantType::BF16), 2);
  EXPECT_EQ(block_bytes(QuantType::F32), 4);
  EXPECT_EQ(row_bytes(QuantType::Q4_0, 2048), 1152);
  EXPECT_EQ(row_bytes(QuantType::Q8_0, 4096), 4352);
  EXPECT_EQ(row_bytes(QuantType::F16, 3), 6);
  EXPECT_EQ(row_bytes(QuantType::F32, 0), 0);
}

TEST(QuantSizes, RowBytesRejectsPartialBlocks) {
  EXPECT_THROW(row_bytes(QuantType::Q4_0, 33), Error);
  EXPECT_THROW(row_bytes(QuantType::Q8_0, 16), Error);
  EXPECT_THROW(row_bytes(QuantType::F32, -1), Error);
  try {
    row_bytes(QuantType::Q4_0, 100);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("Q4_0"), std::string::npos) << msg;
    EXPECT_NE(msg.find("100"), std::string::npos) << msg;
    EXPECT_NE(msg.find("32"), std::string::npos) << msg;
  }
  std::vector<float> x(33);
  std::vector<uint8_t> q(64);
  EXPECT_THROW(quantize_row(QuantType::Q4_0, x.data(), q.data(), 33), Error);
}

TEST(QuantSizes, UnsupportedTypeIsAnErrorNamingIt) {
  try {
    block_bytes(static_cast<QuantType>(11));
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("Q3_K"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace ktune
