// K-quant CPU kernels (Q4_K, Q5_K, Q6_K weights × Q8_K activations): every ISA's activation
// quantizer is bit-exact with the scalar one, every ISA's dot matches the scalar reference, the
// scalar reference matches a float64 dot of the dequantized vectors, and matvec_rows /
// matmul_rows are bit-identical to vec_dot. ISAs this CPU lacks are skipped with the reason.
#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "ktune/engine/cpu_kernels.h"
#include "ktune/engine/error.h"
#include "ktune/engine/quant.h"

namespace ktune::cpu {
namespace {

constexpr QuantType kTypes[] = {QuantType::Q4_K, QuantType::Q5_K, QuantType::Q6_K};
constexpr int64_t kLengths[] = {256, 512, 768, 2048, 4096, 256 * 37};

bool is_available(Isa isa) {
  for (Isa a : available_isas()) {
    if (a == isa) return true;
  }
  return false;
}

std::vector<float> random_vec(std::mt19937& rng, int64_t n, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> x(static_cast<size_t>(n));
  for (float& v : x) v = dist(rng);
  return x;
}

struct Row {
  std::vector<uint8_t> bytes;
  std::vector<float> values;
};

Row make_weights(QuantType t, const std::vector<float>& x) {
  const int64_t n = static_cast<int64_t>(x.size());
  Row r;
  r.bytes.resize(static_cast<size_t>(row_bytes(t, n)));
  quantize_row(t, x.data(), r.bytes.data(), n);
  r.values.resize(x.size());
  dequantize_row(t, r.bytes.data(), r.values.data(), n);
  return r;
}

Row make_act(QuantType w, const std::vector<float>& x, Isa isa) {
  const int64_t n = static_cast<int64_t>(x.size());
  EXPECT_EQ(activation_type(w), QuantType::Q8_K);
  Row r;
  r.bytes.resize(static_cast<size_t>(row_bytes(QuantType::Q8_K, n)));
  quantize_activation(w, x.data(), r.bytes.data(), n, isa);
  r.values.resize(x.size());
  dequantize_row(QuantType::Q8_K, r.bytes.data(), r.values.data(), n);
  return r;
}

double abs_dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += std::fabs(static_cast<double>(a[i]) * b[i]);
  return s;
}

double exact_dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

// Raw random weight bytes (every code, scale and min pattern, including ones quantize_row never
// writes) with small sane fp16 super-block scales, and activations with extreme codes
// (±127, -128) and consistent bsums.
Row random_weight_bytes(QuantType t, int64_t n, std::mt19937& rng) {
  std::uniform_int_distribution<int> byte(0, 255);
  Row r;
  r.bytes.resize(static_cast<size_t>(row_bytes(t, n)));
  for (auto& v : r.bytes) v = static_cast<uint8_t>(byte(rng));
  const int64_t bb = block_bytes(t);
  for (int64_t b = 0; b < n / 256; ++b) {
    uint8_t* blk = r.bytes.data() + b * bb;
    const uint16_t d = fp32_to_fp16(0.001f * static_cast<float>(1 + b % 5));
    const uint16_t dmin = fp32_to_fp16(0.0007f * static_cast<float>(1 + b % 3));
    if (t == QuantType::Q6_K) {
      std::memcpy(blk + offsetof(BlockQ6_K, d), &d, 2);
      if (b % 4 == 1) std::memset(blk, 0xFF, offsetof(BlockQ6_K, scales));  // all codes 63
    } else {
      std::memcpy(blk, &d, 2);
      std::memcpy(blk + 2, &dmin, 2);
      if (b % 4 == 1) std::memset(blk + 4, 0xFF, static_cast<size_t>(bb - 4));  // all at max
    }
  }
  r.values.resize(static_cast<size_t>(n));
  dequantize_row(t, r.bytes.data(), r.values.data(), n);
  return r;
}

Row extreme_act(int64_t n, std::mt19937& rng) {
  std::uniform_int_distribution<int> byte(0, 255);
  std::vector<BlockQ8_K> a(static_cast<size_t>(n / 256));
  for (size_t b = 0; b < a.size(); ++b) {
    a[b].d = 0.01f * static_cast<float>(1 + b % 4);
    for (int j = 0; j < 256; ++j) {
      const int v = b % 3 == 0 ? ((j & 1) ? 127 : -128) : byte(rng) - 128;
      a[b].qs[j] = static_cast<int8_t>(v);
    }
    for (int j = 0; j < 16; ++j) {
      int s = 0;
      for (int i = 0; i < 16; ++i) s += a[b].qs[16 * j + i];
      a[b].bsums[j] = static_cast<int16_t>(s);
    }
  }
  Row r;
  r.bytes.resize(a.size() * sizeof(BlockQ8_K));
  std::memcpy(r.bytes.data(), a.data(), r.bytes.size());
  r.values.resize(static_cast<size_t>(n));
  dequantize_row(QuantType::Q8_K, r.bytes.data(), r.values.data(), n);
  return r;
}

class KQuantDotIsa : public ::testing::TestWithParam<Isa> {
 protected:
  void SetUp() override {
    if (!is_available(GetParam())) {
      GTEST_SKIP() << "this CPU (or OS) lacks " << isa_name(GetParam()) << "; best here is "
                   << isa_name(available_isas().back());
    }
    seed_ = std::random_device{}();
    rng_.seed(seed_);
  }
  std::string trace() const { return "seed " + std::to_string(seed_); }
  unsigned seed_ = 0;
  std::mt19937 rng_;
};

TEST_P(KQuantDotIsa, QuantizeActivationIsBitExactWithScalar) {
  SCOPED_TRACE(trace());
  for (int64_t n : {256, 2048, 256 * 37}) {
    std::vector<float> x = random_vec(rng_, n);
    if (n >= 2048) {
      for (int j = 0; j < 256; ++j) x[j] = 0.0f;                          // zero block
      for (int j = 0; j < 256; ++j) x[256 + j] = static_cast<float>(j % 255 - 127);  // exact
      for (int j = 0; j < 256; ++j) x[512 + j] = (j - 128) * 0.5f + 0.25f;  // .5 ties
      x[768] = -3e30f;                                                     // one huge value
      x[1024 + 5] = std::numeric_limits<float>::quiet_NaN();
      x[1280 + 7] = std::numeric_limits<float>::infinity();
      x[1536 + 1] = 2.5f;
      x[1536 + 2] = -2.5f * 100;  // first largest is negative
    }
    for (QuantType w : kTypes) {
      const Row want = make_act(w, x, Isa::Scalar);
      const Row got = make_act(w, x, GetParam());
      ASSERT_EQ(got.bytes, want.bytes) << quant_name(w) << " n=" << n;
    }
  }
}

TEST_P(KQuantDotIsa, VecDotMatchesScalarReference) {
  SCOPED_TRACE(trace());
  for (QuantType t : kTypes) {
    for (int64_t n : kLengths) {
      const Row w = make_weights(t, random_vec(rng_, n, 0.05f));
      const Row a = make_act(t, random_vec(rng_, n), Isa::Scalar);
      const float want = vec_dot(t, Isa::Scalar)(n, w.bytes.data(), a.bytes.data());
      const float got = vec_dot(t, GetParam())(n, w.bytes.data(), a.bytes.data());
      // Integer sums are exact in every kernel; only the float accumulation order differs. Its
      // error is bounded by a few ulps of the sum of |terms| (2e-5 relative: ~170 ulps).
      ASSERT_NEAR(got, want, 2e-5 * abs_dot(w.values, a.values) + 1e-6)
          << quant_name(t) << " n=" << n;
    }
  }
}

TEST_P(KQuantDotIsa, ExtremeCodesDoNotSaturate) {
  SCOPED_TRACE(trace());
  for (QuantType t : kTypes) {
    for (int64_t n : {256, 1024, 256 * 37}) {
      const Row w = random_weight_bytes(t, n, rng_);
      const Row a = extreme_act(n, rng_);
      const double ref = exact_dot(w.values, a.values);
      const double mag = abs_dot(w.values, a.values);
      const float want = vec_dot(t, Isa::Scalar)(n, w.bytes.data(), a.bytes.data());
      const float got = vec_dot(t, GetParam())(n, w.bytes.data(), a.bytes.data());
      // Q4_K/Q5_K split each weight into a scale term and a min term, each up to ~2x |w·a|:
      // bound the float error by 1e-5 of their total magnitude (plenty for float32 sums).
      ASSERT_NEAR(want, ref, 1e-5 * 4 * mag + 1e-6) << quant_name(t) << " scalar n=" << n;
      ASSERT_NEAR(got, want, 1e-5 * 4 * mag + 1e-6) << quant_name(t) << " n=" << n;
    }
  }
}

TEST_P(KQuantDotIsa, MatvecAndMatmulRowsAreBitIdenticalToVecDot) {
  SCOPED_TRACE(trace());
  const int64_t rows = 11;
  for (QuantType t : kTypes) {
    for (int64_t n : {256, 2048}) {
      const int64_t rb = row_bytes(t, n);
      std::vector<uint8_t> W(static_cast<size_t>(rows * rb));
      for (int64_t r = 0; r < rows; ++r) {
        const Row row = make_weights(t, random_vec(rng_, n, 0.05f));
        std::memcpy(&W[static_cast<size_t>(r * rb)], row.bytes.data(), row.bytes.size());
      }
      const int64_t T = 6;  // a tile of 4 tokens and 2 single ones
      const int64_t ab = row_bytes(QuantType::Q8_K, n);
      std::vector<uint8_t> acts(static_cast<size_t>(T * ab));
      for (int64_t k = 0; k < T; ++k) {
        const Row a = make_act(t, random_vec(rng_, n), GetParam());
        std::memcpy(&acts[static_cast<size_t>(k * ab)], a.bytes.data(), a.bytes.size());
      }
      const VecDotFn dot = vec_dot(t, GetParam());
      std::vector<float> y(rows + 1, -7.0f);
      matvec_rows(t, GetParam(), W.data(), n, 2, 9, acts.data(), y.data());
      for (int64_t r = 2; r < 9; ++r) {
        ASSERT_EQ(y[static_cast<size_t>(r - 2)], dot(n, &W[static_cast<size_t>(r * rb)],
                                                    acts.data()))
            << quant_name(t) << " n=" << n << " row " << r;
      }
      ASSERT_EQ(y[7], -7.0f) << "matvec wrote past its range";
      std::vector<float> Y(static_cast<size_t>(T * rows), -7.0f);
      matmul_rows(t, GetParam(), W.data(), n, 1, rows, acts.data(), ab, T, Y.data(), rows);
      for (int64_t k = 0; k < T; ++k) {
        for (int64_t r = 1; r < rows; ++r) {
          ASSERT_EQ(Y[static_cast<size_t>(k * rows + r)],
                    dot(n, &W[static_cast<size_t>(r * rb)], &acts[static_cast<size_t>(k * ab)]))
              << quant_name(t) << " token " << k << " row " << r;
        }
        ASSERT_EQ(Y[static_cast<size_t>(k * rows)], -7.0f) << "matmul wrote row 0";
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Isa, KQuantDotIsa,
                         ::testing::Values(Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni),
                         [](const auto& info) { return std::string(isa_name(info.param)); });

TEST(KQuantDot, ScalarDotMatchesDequantizedFloat64Dot) {
  std::mt19937 rng(21);
  for (QuantType t : kTypes) {
    for (int64_t n : kLengths) {
      const Row w = make_weights(t, random_vec(rng, n, 0.05f));
      const Row a = make_act(t, random_vec(rng, n), Isa::Scalar);
      const float got = vec_dot(t, Isa::Scalar)(n, w.bytes.data(), a.bytes.data());
      EXPECT_NEAR(got, exact_dot(w.values, a.values), 1e-5 * 4 * abs_dot(w.values, a.values))
          << quant_name(t) << " n=" << n;
    }
  }
}

TEST(KQuantDot, Q8_KIsNotAWeightType) {
  EXPECT_THROW(vec_dot(QuantType::Q8_K, Isa::Scalar), Error);
  EXPECT_THROW(activation_type(QuantType::Q8_K), Error);
}

}  // namespace
}  // namespace ktune::cpu
