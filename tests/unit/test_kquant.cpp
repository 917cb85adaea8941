// K-quant formats (Q4_K, Q5_K, Q6_K, Q8_K): hand-written blocks decode to known floats, ktune's
// quantizers reproduce ggml's bytes (fixture made by ggml itself, tests/data/kquant/README.md),
// round-trip error stays within the format's resolution, and odd input (NaN, infinities, random
// bytes) never reaches undefined behaviour.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "ktune/engine/error.h"
#include "ktune/engine/quant.h"

namespace ktune {
namespace {

constexpr QuantType kKTypes[] = {QuantType::Q4_K, QuantType::Q5_K, QuantType::Q6_K,
                                 QuantType::Q8_K};

std::vector<uint8_t> read_file(const std::string& name) {
  const std::string path = std::string(KTUNE_TEST_DATA) + "/kquant/" + name;
  std::ifstream f(path, std::ios::binary);
  EXPECT_TRUE(f.good()) << "cannot open " << path;
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

std::vector<uint8_t> quantize(QuantType t, const std::vector<float>& x) {
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<uint8_t> q(static_cast<size_t>(row_bytes(t, n)));
  quantize_row(t, x.data(), q.data(), n);
  return q;
}

std::vector<float> dequantize(QuantType t, const std::vector<uint8_t>& q, int64_t n) {
  std::vector<float> y(static_cast<size_t>(n));
  dequantize_row(t, q.data(), y.data(), n);
  return y;
}

void set_u16(uint16_t* p, uint16_t v) { std::memcpy(p, &v, sizeof(v)); }

TEST(KQuant, TypeFacts) {
  EXPECT_EQ(static_cast<uint32_t>(QuantType::Q4_K), 12u);
  EXPECT_EQ(static_cast<uint32_t>(QuantType::Q5_K), 13u);
  EXPECT_EQ(static_cast<uint32_t>(QuantType::Q6_K), 14u);
  EXPECT_EQ(static_cast<uint32_t>(QuantType::Q8_K), 15u);
  const int64_t bytes[] = {144, 176, 210, 292};
  for (size_t i = 0; i < std::size(kKTypes); ++i) {
    EXPECT_TRUE(is_supported_quant(static_cast<uint32_t>(kKTypes[i])));
    EXPECT_EQ(block_elems(kKTypes[i]), 256);
    EXPECT_EQ(block_bytes(kKTypes[i]), bytes[i]);
    EXPECT_EQ(row_bytes(kKTypes[i], 2048), 8 * bytes[i]);
    EXPECT_THROW(row_bytes(kKTypes[i], 2048 + 32), Error);
  }
  EXPECT_EQ(ggml_type_name(12), "Q4_K");
  EXPECT_EQ(parse_quant_name("q4_k"), QuantType::Q4_K);
  EXPECT_EQ(parse_quant_name(" Q5_K"), QuantType::Q5_K);
  EXPECT_EQ(parse_quant_name("q6_K"), QuantType::Q6_K);
  EXPECT_EQ(parse_quant_name("q8_k"), std::nullopt) << "Q8_K is not a weight type";
  EXPECT_FALSE(is_supported_quant(11)) << "Q3_K";
  EXPECT_EQ(ggml_type_name(16), "IQ2_XXS (ggml type 16)");
}

// The 6-bit scales and mins of one Q4_K/Q5_K block, written out by hand:
//   bytes 0-3: sc0..sc3 in bits 0-5, bits 6-7 = top bits of sc4..sc7
//   bytes 4-7: m0..m3 in bits 0-5,  bits 6-7 = top bits of m4..m7
//   bytes 8-11: low nibble = low 4 bits of sc4..sc7, high nibble = low 4 bits of m4..m7
// 0x41: sc0 = 1, sc4 top = 1; 0x85: m0 = 5, m4 top = 2; 0x3A: sc4 = 0xA | 1<<4 = 26,
// m4 = 0x3 | 2<<4 = 35.
constexpr uint8_t kScales[12] = {0x41, 0x02, 0x03, 0x04, 0x85, 0x00,
                                 0x00, 0x00, 0x3A, 0x01, 0x01, 0x01};
constexpr int kSc[8] = {1, 2, 3, 4, 26, 1, 1, 1};
constexpr int kMin[8] = {5, 0, 0, 0, 35, 0, 0, 0};

TEST(KQuant, HandWrittenQ4_KBlockDecodes) {
  BlockQ4_K b{};
  set_u16(&b.d, 0x3C00);     // 1.0
  set_u16(&b.dmin, 0x3800);  // 0.5
  std::memcpy(b.scales, kScales, 12);
  b.qs[0] = 0x7F;   // weight 0 (sub-block 0) = 15, weight 32 (sub-block 1) = 7
  b.qs[64] = 0x93;  // weight 128 (sub-block 4) = 3, weight 160 (sub-block 5) = 9
  float y[256];
  dequantize_row(QuantType::Q4_K, &b, y, 256);
  EXPECT_EQ(y[0], 1.0f * 1 * 15 - 0.5f * 5);
  EXPECT_EQ(y[32], 1.0f * 2 * 7);
  EXPECT_EQ(y[128], 1.0f * 26 * 3 - 0.5f * 35);
  EXPECT_EQ(y[160], 9.0f);
  for (int i = 0; i < 256; ++i) {
    if (i == 0 || i == 32 || i == 128 || i == 160) continue;
    EXPECT_EQ(y[i], -0.5f * kMin[i / 32]) << "weight " << i;
  }
  (void)kSc;
}

TEST(KQuant, HandWrittenQ5_KBlockDecodes) {
  BlockQ5_K b{};
  set_u16(&b.d, 0x3C00);
  set_u16(&b.dmin, 0x3800);
  std::memcpy(b.scales, kScales, 12);
  b.qs[0] = 0x7F;
  b.qs[64] = 0x93;
  b.qh[0] = 0x11;  // bit 0: weight 0 += 16; bit 4: weight 128 (group 2, low) += 16
  b.qh[5] = 0x80;  // bit 7: weight 192 + 32 + 5 = 229 (group 3, high) += 16
  float y[256];
  dequantize_row(QuantType::Q5_K, &b, y, 256);
  EXPECT_EQ(y[0], 1.0f * 1 * 31 - 0.5f * 5);
  EXPECT_EQ(y[32], 14.0f);
  EXPECT_EQ(y[128], 1.0f * 26 * 19 - 0.5f * 35);
  EXPECT_EQ(y[160], 9.0f);
  EXPECT_EQ(y[229], 1.0f * kSc[7] * 16);
  for (int i = 0; i < 256; ++i) {
    if (i == 0 || i == 32 || i == 128 || i == 160 || i == 229) continue;
    EXPECT_EQ(y[i], -0.5f * kMin[i / 32]) << "weight " << i;
  }
}

TEST(KQuant, HandWrittenQ6_KBlockDecodes) {
  BlockQ6_K b{};
  set_u16(&b.d, 0x3800);  // 0.5
  for (int j = 0; j < 16; ++j) b.scales[j] = static_cast<int8_t>(j - 8);
  // First half, l = 0: ql[0] = 0x21 -> weight 0 low nibble 1, weight 64 low nibble 2;
  // qh[0] = 0b11'10'01'00 -> weight 0 top 0, weight 32 top 1, weight 64 top 2, weight 96 top 3.
  b.ql[0] = 0x21;
  b.qh[0] = 0xE4;
  // Second half, l = 17: ql[64 + 32 + 17] = 0x5F -> weight 128 + 32 + 17 = 177 low nibble 15,
  // weight 128 + 96 + 17 = 241 high nibble 5; qh[32 + 17] = 0b01'00'00'00 -> weight 241 top 1.
  b.ql[64 + 32 + 17] = 0x5F;
  b.qh[32 + 17] = 0x40;
  float y[256];
  dequantize_row(QuantType::Q6_K, &b, y, 256);
  auto want = [&](int i, int q) { return 0.5f * static_cast<float>(i / 16 - 8) * (q - 32); };
  EXPECT_EQ(y[0], want(0, 1));                 // sub-block 0, scale -8
  EXPECT_EQ(y[32], want(32, 16));              // q = 0 | 1<<4
  EXPECT_EQ(y[64], want(64, 2 | 2 << 4));      // q = 34
  EXPECT_EQ(y[96], want(96, 3 << 4));          // q = 48
  EXPECT_EQ(y[177], want(177, 15));            // sub-block 11, scale 3
  EXPECT_EQ(y[241], want(241, 5 | 1 << 4));    // sub-block 15, scale 7
  for (int i = 0; i < 256; ++i) {
    if (i == 0 || i == 32 || i == 64 || i == 96 || i == 177 || i == 241) continue;
    EXPECT_EQ(y[i], want(i, 0)) << "weight " << i;
  }
}

TEST(KQuant, HandWrittenQ8_KBlockDecodes) {
  BlockQ8_K b{};
  b.d = 0.25f;
  b.qs[0] = -128;
  b.qs[255] = 127;
  b.qs[100] = 3;
  float y[256];
  dequantize_row(QuantType::Q8_K, &b, y, 256);
  for (int i = 0; i < 256; ++i) EXPECT_EQ(y[i], 0.25f * b.qs[i]) << i;
  EXPECT_EQ(y[0], -32.0f);
  EXPECT_EQ(y[255], 31.75f);
}

// The fixture: 8 super-blocks (normal, zero, all-positive, all-negative, one outlier, tiny
// fp16-subnormal scales, constant sub-blocks, scales 2^-4..2^3) quantized by ggml's
// quantize_row_q*_K_ref.
TEST(KQuant, QuantizeMatchesGgmlBytes) {
  const std::vector<uint8_t> raw = read_file("input.f32");
  ASSERT_EQ(raw.size(), 8u * 256 * sizeof(float));
  std::vector<float> x(raw.size() / sizeof(float));
  std::memcpy(x.data(), raw.data(), raw.size());
  const char* files[] = {"q4_k.bin", "q5_k.bin", "q6_k.bin", "q8_k.bin"};
  for (size_t i = 0; i < std::size(kKTypes); ++i) {
    const QuantType t = kKTypes[i];
    const std::vector<uint8_t> want = read_file(files[i]);
    const std::vector<uint8_t> got = quantize(t, x);
    ASSERT_EQ(got.size(), want.size()) << quant_name(t);
    const int64_t bb = block_bytes(t);
    for (size_t k = 0; k < got.size(); ++k) {
      ASSERT_EQ(got[k], want[k]) << quant_name(t) << " super-block " << k / bb << " byte "
                                 << k % bb;
    }
    // Blocks are independent: quantizing one super-block at a time gives the same bytes.
    for (int b = 0; b < 8; ++b) {
      const std::vector<float> one(x.begin() + 256 * b, x.begin() + 256 * (b + 1));
      const std::vector<uint8_t> q = quantize(t, one);
      ASSERT_EQ(std::memcmp(q.data(), want.data() + b * bb, static_cast<size_t>(bb)), 0)
          << quant_name(t) << " super-block " << b << " alone";
    }
  }
}

// Relative RMS error of the round trip on Gaussian rows (measured here: Q4_K 0.072, Q5_K 0.036,
// Q6_K 0.018, Q8_K 0.0070 = step/sqrt(12) with step amax/127 ~ 3σ/127; the bounds leave ~15 %
// headroom, while a wrong code, scale or min layout gives errors near 1). Q8_K also has a hard
// per-element bound: half a step |d| / 2.
TEST(KQuant, RoundTripErrorIsWithinTheFormatsResolution) {
  std::mt19937 rng(11);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  const int64_t n = 256 * 64;
  std::vector<float> x(static_cast<size_t>(n));
  for (float& v : x) v = dist(rng);
  const double bound[] = {0.083, 0.042, 0.021, 0.008};
  for (size_t i = 0; i < std::size(kKTypes); ++i) {
    const QuantType t = kKTypes[i];
    const std::vector<uint8_t> q = quantize(t, x);
    const std::vector<float> y = dequantize(t, q, n);
    double err = 0, mag = 0;
    for (int64_t k = 0; k < n; ++k) {
      err += (x[k] - y[k]) * static_cast<double>(x[k] - y[k]);
      mag += x[k] * static_cast<double>(x[k]);
    }
    const double rel = std::sqrt(err / mag);
    std::printf("[ %s ] relative RMS error %.4f\n", quant_name(t), rel);
    EXPECT_LT(rel, bound[i]) << quant_name(t);
    if (t == QuantType::Q8_K) {
      const auto* blocks = reinterpret_cast<const BlockQ8_K*>(q.data());
      for (int64_t k = 0; k < n; ++k) {
        ASSERT_LE(std::fabs(x[k] - y[k]), std::fabs(blocks[k / 256].d) * 0.5f * 1.0001f) << k;
      }
    }
  }
}

// Q8_K: the largest-magnitude value maps to -127 exactly (ggml's -127/max scale), so a block's
// sign convention follows its first largest value, and bsums are the sums of 16 codes.
TEST(KQuant, Q8_KCodesAndSums) {
  std::vector<float> x(256);
  for (int i = 0; i < 256; ++i) x[i] = static_cast<float>((i * 37) % 101 - 50) / 10.0f;
  x[9] = 7.0f;
  x[200] = -7.0f;  // same magnitude, later: x[9] decides the sign
  const std::vector<uint8_t> q = quantize(QuantType::Q8_K, x);
  BlockQ8_K b;
  std::memcpy(&b, q.data(), sizeof(b));
  EXPECT_EQ(b.qs[9], -127);
  EXPECT_EQ(b.qs[200], 127);
  EXPECT_FLOAT_EQ(b.d, -7.0f / 127.0f);
  for (int j = 0; j < 16; ++j) {
    int s = 0;
    for (int i = 0; i < 16; ++i) s += b.qs[16 * j + i];
    EXPECT_EQ(b.bsums[j], s) << j;
  }
}

// NaN and infinities have no meaning in weights, but must not reach undefined behaviour (the
// sanitizer build runs this) and must leave other super-blocks alone.
TEST(KQuant, NonFiniteInputsAreDefined) {
  std::mt19937 rng(3);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> x(512);
  for (float& v : x) v = dist(rng);
  const std::vector<float> clean_second(x.begin() + 256, x.end());
  x[3] = std::numeric_limits<float>::quiet_NaN();
  x[40] = std::numeric_limits<float>::infinity();
  x[41] = -std::numeric_limits<float>::infinity();
  x[100] = 3e38f;
  for (QuantType t : kKTypes) {
    const std::vector<uint8_t> a = quantize(t, x);
    const std::vector<uint8_t> b = quantize(t, x);
    EXPECT_EQ(a, b) << quant_name(t) << ": deterministic";
    const std::vector<uint8_t> second = quantize(t, clean_second);
    const int64_t bb = block_bytes(t);
    EXPECT_EQ(std::memcmp(a.data() + bb, second.data(), static_cast<size_t>(bb)), 0)
        << quant_name(t) << ": the finite super-block is unaffected";
    (void)dequantize(t, a, 512);
  }
}

TEST(KQuant, RandomBytesDequantizeWithoutFault) {
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> byte(0, 255);
  for (QuantType t : kKTypes) {
    std::vector<uint8_t> q(static_cast<size_t>(row_bytes(t, 256 * 16)));
    for (auto& v : q) v = static_cast<uint8_t>(byte(rng));
    const std::vector<float> y = dequantize(t, q, 256 * 16);
    EXPECT_EQ(y.size(), 256u * 16);
  }
}

}  // namespace
}  // namespace ktune
