// CPU kernels: every ISA's kernels against the scalar reference on fresh random data, the scalar
// quantized dots against a float64 dot of the dequantized vectors, and matvec_rows /
// matmul_rows against loops of vec_dot. ISAs this CPU lacks are skipped, with the reason.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "ktune/engine/cpu_kernels.h"
#include "ktune/engine/error.h"
#include "ktune/engine/quant.h"

namespace ktune::cpu {
namespace {

constexpr QuantType kTypes[] = {QuantType::Q4_0, QuantType::Q8_0, QuantType::F16, QuantType::BF16,
                                QuantType::F32};

bool is_available(Isa isa) {
  for (Isa a : available_isas()) {
    if (a == isa) return true;
  }
  return false;
}

// Lengths: single block, the model's widths (2048 hidden, 768 expert ffn, 4096), odd block
// counts (3, 5, 37: the 4-block groups end in a partial group) and a 2-block tail.
std::vector<int64_t> lengths(QuantType t) {
  std::vector<int64_t> n = {32, 64, 96, 160, 256, 768, 1184, 2048, 4096, 32 * 37, 32 * 6};
  if (block_elems(t) == 1) {
    for (int64_t odd : {1, 7, 15, 17, 33, 100, 1001}) n.push_back(odd);
  }
  return n;
}

struct Row {
  std::vector<uint8_t> bytes;
  std::vector<float> values;  // the dequantized row, what the kernel effectively multiplies
};

Row make_row(QuantType t, const std::vector<float>& x) {
  const int64_t n = static_cast<int64_t>(x.size());
  Row r;
  r.bytes.resize(static_cast<size_t>(row_bytes(t, n)));
  quantize_row(t, x.data(), r.bytes.data(), n);
  r.values.resize(x.size());
  dequantize_row(t, r.bytes.data(), r.values.data(), n);
  return r;
}

std::vector<float> random_vec(std::mt19937& rng, int64_t n) {
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n));
  for (float& v : x) v = dist(rng);
  return x;
}

// The activation as the kernel sees it (after quantize_activation) plus its values.
Row make_act(QuantType w, const std::vector<float>& x, Isa isa) {
  const QuantType at = activation_type(w);
  const int64_t n = static_cast<int64_t>(x.size());
  Row r;
  r.bytes.resize(static_cast<size_t>(row_bytes(at, n)));
  quantize_activation(w, x.data(), r.bytes.data(), n, isa);
  r.values.resize(x.size());
  dequantize_row(at, r.bytes.data(), r.values.data(), n);
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

class CpuKernelIsa : public ::testing::TestWithParam<Isa> {
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

TEST_P(CpuKernelIsa, QuantizeActivationIsBitExactWithScalar) {
  SCOPED_TRACE(trace());
  for (int64_t n : {32, 64, 2048, 32 * 37}) {
    std::vector<float> x = random_vec(rng_, n);
    // Edge cases inside the row: an all-zero block, exact .5 ties after scaling (amax 127 ->
    // id 1), and a block with one huge value.
    if (n >= 128) {
      for (int j = 0; j < 32; ++j) x[j] = 0.0f;
      x[32] = 127.0f;
      for (int j = 1; j < 32; ++j) x[32 + j] = static_cast<float>(j - 16) + 0.5f;
      x[64] = -3e30f;
    }
    for (QuantType w : {QuantType::Q4_0, QuantType::Q8_0, QuantType::F32}) {
      const Row want = make_act(w, x, Isa::Scalar);
      const Row got = make_act(w, x, GetParam());
      ASSERT_EQ(got.bytes, want.bytes) << quant_name(w) << " n=" << n;
    }
  }
}

TEST_P(CpuKernelIsa, VecDotMatchesScalarReference) {
  SCOPED_TRACE(trace());
  for (QuantType t : kTypes) {
    for (int64_t n : lengths(t)) {
      const Row w = make_row(t, random_vec(rng_, n));
      const Row a = make_act(t, random_vec(rng_, n), Isa::Scalar);
      const float want = vec_dot(t, Isa::Scalar)(n, w.bytes.data(), a.bytes.data());
      const float got = vec_dot(t, GetParam())(n, w.bytes.data(), a.bytes.data());
      // Only the float summation order differs: bound it by the sum of |terms|.
      const double tol = 2e-5 * abs_dot(w.values, a.values) + 1e-6;
      ASSERT_NEAR(got, want, tol) << quant_name(t) << " n=" << n;
    }
  }
}

TEST_P(CpuKernelIsa, QuantizedDotsSurviveExtremeCodes) {
  // Raw random bytes reach codes quantize_row never writes (Q8_0 -128) and the extremes of
  // each format (Q4_0 nibbles 0 and 15, activations ±127): no saturation anywhere.
  SCOPED_TRACE(trace());
  std::uniform_int_distribution<int> byte(0, 255);
  for (QuantType t : {QuantType::Q4_0, QuantType::Q8_0}) {
    for (int64_t n : {32, 96, 2048, 32 * 37}) {
      const int64_t nb = n / 32;
      std::vector<uint8_t> w(static_cast<size_t>(row_bytes(t, n)));
      for (auto& v : w) v = static_cast<uint8_t>(byte(rng_));
      std::vector<BlockQ8_0> a(static_cast<size_t>(nb));
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t wb = block_bytes(t);
        const uint16_t d = fp32_to_fp16(0.01f * static_cast<float>(1 + b % 7));
        std::memcpy(&w[static_cast<size_t>(b * wb)], &d, 2);
        a[b].d = fp32_to_fp16(0.02f);
        for (int j = 0; j < 32; ++j) {
          a[b].qs[j] =
              static_cast<int8_t>((b % 3 == 0) ? ((j & 1) ? 127 : -127) : byte(rng_) % 255 - 127);
        }
        if (b % 4 == 1) std::memset(&w[static_cast<size_t>(b * wb + 2)], 0xFF, wb - 2);
        if (b % 4 == 2) std::memset(&w[static_cast<size_t>(b * wb + 2)], 0x00, wb - 2);
      }
      const float want = vec_dot(t, Isa::Scalar)(n, w.data(), a.data());
      const float got = vec_dot(t, GetParam())(n, w.data(), a.data());
      std::vector<float> wv(static_cast<size_t>(n)), av(static_cast<size_t>(n));
      dequantize_row(t, w.data(), wv.data(), n);
      dequantize_row(QuantType::Q8_0, a.data(), av.data(), n);
      ASSERT_NEAR(got, want, 2e-5 * abs_dot(wv, av) + 1e-6) << quant_name(t) << " n=" << n;
    }
  }
}

TEST_P(CpuKernelIsa, MatvecRowsMatchesVecDot) {
  // Tiling rows (4 at a time, then single rows) must not change any row's arithmetic, so the
  // results are identical, not just close: a thread split never changes the numbers.
  SCOPED_TRACE(trace());
  const int64_t rows = 15;
  for (QuantType t : kTypes) {
    for (int64_t n : {32, 160, 2048, 32 * 37}) {
      const int64_t rb = row_bytes(t, n);
      std::vector<uint8_t> W(static_cast<size_t>(rows * rb));
      for (int64_t r = 0; r < rows; ++r) {
        const Row row = make_row(t, random_vec(rng_, n));
        std::memcpy(&W[static_cast<size_t>(r * rb)], row.bytes.data(), row.bytes.size());
      }
      const Row a = make_act(t, random_vec(rng_, n), GetParam());
      for (auto [r0, r1] : {std::pair<int64_t, int64_t>{0, rows}, {2, 13}, {5, 6}, {7, 7}}) {
        std::vector<float> y(static_cast<size_t>(rows) + 1, -12345.0f);
        matvec_rows(t, GetParam(), W.data(), n, r0, r1, a.bytes.data(), y.data());
        for (int64_t r = r0; r < r1; ++r) {
          const float want =
              vec_dot(t, GetParam())(n, &W[static_cast<size_t>(r * rb)], a.bytes.data());
          ASSERT_EQ(y[static_cast<size_t>(r - r0)], want)
              << quant_name(t) << " n=" << n << " row " << r << " of [" << r0 << "," << r1 << ")";
        }
        ASSERT_EQ(y[static_cast<size_t>(r1 - r0)], -12345.0f) << "wrote past the range";
      }
    }
  }
}

TEST_P(CpuKernelIsa, MatmulRowsMatchesVecDot) {
  SCOPED_TRACE(trace());
  const int64_t rows = 9;
  for (QuantType t : kTypes) {
    for (int64_t n : {64, 32 * 37, 2048}) {
      const int64_t rb = row_bytes(t, n);
      std::vector<uint8_t> W(static_cast<size_t>(rows * rb));
      for (int64_t r = 0; r < rows; ++r) {
        const Row row = make_row(t, random_vec(rng_, n));
        std::memcpy(&W[static_cast<size_t>(r * rb)], row.bytes.data(), row.bytes.size());
      }
      for (int64_t T : {1, 2, 3, 4, 5, 9}) {
        // Padded activation rows and output rows: strides are honoured, padding untouched.
        const int64_t ab = row_bytes(activation_type(t), n);
        const int64_t act_stride = ab + 40;
        const int64_t ldy = rows + 3;
        std::vector<uint8_t> act(static_cast<size_t>(T * act_stride), 0xAB);
        for (int64_t i = 0; i < T; ++i) {
          const Row a = make_act(t, random_vec(rng_, n), GetParam());
          std::memcpy(&act[static_cast<size_t>(i * act_stride)], a.bytes.data(), a.bytes.size());
        }
        // 8 and 7 rows: whole row tiles, and leftover rows.
        for (int64_t r0 : {1, 2}) {
          const int64_t r1 = rows;
          std::vector<float> Y(static_cast<size_t>(T * ldy), -12345.0f);
          matmul_rows(t, GetParam(), W.data(), n, r0, r1, act.data(), act_stride, T, Y.data(), ldy);
          for (int64_t i = 0; i < T; ++i) {
            for (int64_t r = 0; r < ldy; ++r) {
              const float got = Y[static_cast<size_t>(i * ldy + r)];
              if (r < r0 || r >= r1) {
                ASSERT_EQ(got, -12345.0f) << "wrote outside rows [r0, r1) at t=" << i << " r=" << r;
                continue;
              }
              const float want = vec_dot(t, GetParam())(n, &W[static_cast<size_t>(r * rb)],
                                                        &act[static_cast<size_t>(i * act_stride)]);
              ASSERT_EQ(got, want)
                  << quant_name(t) << " n=" << n << " T=" << T << " t=" << i << " r=" << r;
            }
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(CpuKernel, CpuKernelIsa,
                         ::testing::Values(Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni),
                         [](const auto& info) { return std::string(isa_name(info.param)); });

// --- the scalar reference against float64 -----------------------------------------------------

TEST(CpuKernelScalar, QuantizedDotsMatchFloat64OfDequantizedVectors) {
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  for (QuantType t : {QuantType::Q4_0, QuantType::Q8_0}) {
    for (int64_t n : {32, 256, 2048, 4096, 32 * 37}) {
      const Row w = make_row(t, random_vec(rng, n));
      const Row a = make_act(t, random_vec(rng, n), Isa::Scalar);
      const double want = exact_dot(w.values, a.values);
      const float got = vec_dot(t, Isa::Scalar)(n, w.bytes.data(), a.bytes.data());
      ASSERT_NEAR(got, want, 1e-5 * abs_dot(w.values, a.values) + 1e-7)
          << quant_name(t) << " n=" << n;
    }
  }
}

TEST(CpuKernelScalar, FloatDotsMatchFloat64) {
  std::mt19937 rng(std::random_device{}());
  for (QuantType t : {QuantType::F32, QuantType::F16, QuantType::BF16}) {
    for (int64_t n : {1, 33, 4096}) {
      const Row w = make_row(t, random_vec(rng, n));
      const std::vector<float> a = random_vec(rng, n);
      const float got = vec_dot(t, Isa::Scalar)(n, w.bytes.data(), a.data());
      ASSERT_NEAR(got, exact_dot(w.values, a), 1e-6 * abs_dot(w.values, a) + 1e-7) << quant_name(t);
    }
  }
}

// --- dispatch -------------------------------------------------------------------------------

class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old, had_ = true;
    setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (had_) {
      setenv(name_, old_.c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }

 private:
  const char* name_;
  std::string old_;
  bool had_ = false;
};

TEST(CpuKernelDispatch, IsaListAndNames) {
  const std::vector<Isa> isas = available_isas();
  ASSERT_FALSE(isas.empty());
  EXPECT_EQ(isas.front(), Isa::Scalar);
  EXPECT_STREQ(isa_name(Isa::Scalar), "scalar");
  EXPECT_STREQ(isa_name(Isa::Avx2), "avx2");
  EXPECT_STREQ(isa_name(Isa::Avx512), "avx512");
  EXPECT_STREQ(isa_name(Isa::Avx512Vnni), "avx512vnni");
  ScopedEnv unset("KTUNE_ISA", "");
  EXPECT_EQ(detect_isa(), isas.back());
}

TEST(CpuKernelDispatch, EnvironmentCanOnlyLower) {
  const Isa best = available_isas().back();
  {
    ScopedEnv env("KTUNE_ISA", "scalar");
    EXPECT_EQ(detect_isa(), Isa::Scalar);
  }
  {
    ScopedEnv env("KTUNE_ISA", "AVX2");
    EXPECT_EQ(detect_isa(), best < Isa::Avx2 ? best : Isa::Avx2);
  }
  {
    ScopedEnv env("KTUNE_ISA", "avx512vnni");
    EXPECT_EQ(detect_isa(), best);
  }
  {
    ScopedEnv env("KTUNE_ISA", "sse9");
    EXPECT_THROW(detect_isa(), Error);
  }
}

TEST(CpuKernelDispatch, UnsupportedTypesAreErrors) {
  EXPECT_THROW(vec_dot(static_cast<QuantType>(11), Isa::Scalar), Error);  // Q3_K
  EXPECT_THROW(activation_type(static_cast<QuantType>(11)), Error);
  std::vector<float> x(33);
  std::vector<uint8_t> out(64);
  EXPECT_THROW(quantize_activation(QuantType::Q4_0, x.data(), out.data(), 33, Isa::Scalar), Error);
  EXPECT_EQ(activation_type(QuantType::Q4_0), QuantType::Q8_0);
  EXPECT_EQ(activation_type(QuantType::Q8_0), QuantType::Q8_0);
  EXPECT_EQ(activation_type(QuantType::BF16), QuantType::F32);
}

TEST(CpuKernelDispatch, IsaAboveTheCpuDegradesInsteadOfFaulting) {
  // Asking for the widest ISA must run (clamped) on every CPU.
  std::mt19937 rng(7);
  const int64_t n = 256;
  const Row w = make_row(QuantType::Q4_0, random_vec(rng, n));
  const Row a = make_act(QuantType::Q4_0, random_vec(rng, n), Isa::Avx512Vnni);
  const float got = vec_dot(QuantType::Q4_0, Isa::Avx512Vnni)(n, w.bytes.data(), a.bytes.data());
  const float want = vec_dot(QuantType::Q4_0, Isa::Scalar)(n, w.bytes.data(), a.bytes.data());
  EXPECT_NEAR(got, want, 2e-5 * abs_dot(w.values, a.values) + 1e-6);
}

}  // namespace
}  // namespace ktune::cpu
