// K-quant decode matvec (engine/cuda/matvec_kquant.cu) against the scalar reference on the
// device: weights quantized by quantize_row, dequantized by dequantize_row on the host, dotted
// with x in float64. The kernel multiplies the same dequantized values in float32 with a fixed
// summation order, so the gap is float32 rounding only. Skips without a GPU (ctest label gpu).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gpu/gpu_test_util.h"
#include "ktune/engine/cuda/cuda_check.h"
#include "ktune/engine/cuda/kquant_kernels.h"
#include "ktune/engine/quant.h"

namespace ktune::cuda {
namespace {

unsigned test_seed() {
  if (const char* s = std::getenv("KTUNE_TEST_SEED")) return static_cast<unsigned>(std::atol(s));
  return std::random_device{}();
}

struct Case {
  int64_t rows, cols;
};

// y_ref[r] = Σ dequant(W[r]) · x in float64, and Σ |dequant(W[r]) · x| for the bound.
void reference(QuantType t, const std::vector<uint8_t>& q, const std::vector<float>& x,
               int64_t rows, int64_t cols, std::vector<double>* y, std::vector<double>* mag) {
  const int64_t rb = row_bytes(t, cols);
  std::vector<float> w(static_cast<size_t>(cols));
  y->assign(static_cast<size_t>(rows), 0.0);
  mag->assign(static_cast<size_t>(rows), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    dequantize_row(t, q.data() + r * rb, w.data(), cols);
    for (int64_t i = 0; i < cols; ++i) {
      (*y)[r] += static_cast<double>(w[i]) * x[i];
      (*mag)[r] += std::fabs(static_cast<double>(w[i]) * x[i]);
    }
  }
}

void check(QuantType t, bool random_bytes) {
  const unsigned seed = test_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> byte(0, 255);
  for (const Case c : {Case{1, 256}, Case{37, 768}, Case{128, 2048}, Case{6, 256 * 37}}) {
    const int64_t rb = row_bytes(t, c.cols);
    std::vector<uint8_t> q(static_cast<size_t>(c.rows * rb));
    if (random_bytes) {
      // Every code, scale and min pattern, with small sane fp16 super-block scales.
      for (auto& v : q) v = static_cast<uint8_t>(byte(rng));
      const int64_t bb = block_bytes(t);
      for (int64_t b = 0; b < c.rows * c.cols / 256; ++b) {
        const uint16_t d = fp32_to_fp16(0.01f), dmin = fp32_to_fp16(0.004f);
        uint8_t* blk = q.data() + b * bb;
        if (t == QuantType::Q6_K) {
          std::memcpy(blk + 208, &d, 2);
        } else {
          std::memcpy(blk, &d, 2);
          std::memcpy(blk + 2, &dmin, 2);
        }
      }
    } else {
      std::vector<float> wf(static_cast<size_t>(c.cols));
      for (int64_t r = 0; r < c.rows; ++r) {
        for (float& v : wf) v = 0.05f * normal(rng);
        quantize_row(t, wf.data(), q.data() + r * rb, c.cols);
      }
    }
    std::vector<float> x(static_cast<size_t>(c.cols));
    for (float& v : x) v = normal(rng);
    std::vector<double> ref, mag;
    reference(t, q, x, c.rows, c.cols, &ref, &mag);

    DeviceBuffer dw(q.size() + 16), dx(x.size() * sizeof(float)), dy(c.rows * sizeof(float));
    KTUNE_CUDA_CHECK(cudaMemcpy(dw.data(), q.data(), q.size(), cudaMemcpyHostToDevice));
    KTUNE_CUDA_CHECK(cudaMemcpy(dx.data(), x.data(), x.size() * 4, cudaMemcpyHostToDevice));
    KTUNE_CUDA_CHECK(cudaMemset(dy.data(), 0xFF, c.rows * sizeof(float)));  // NaN: unwritten
    ASSERT_EQ(launch_matvec_kquant(t, dw.data(), dx.as<float>(), c.rows, c.cols, dy.as<float>(),
                                   nullptr),
              cudaSuccess);
    std::vector<float> y(static_cast<size_t>(c.rows));
    KTUNE_CUDA_CHECK(cudaDeviceSynchronize());
    KTUNE_CUDA_CHECK(cudaMemcpy(y.data(), dy.data(), y.size() * 4, cudaMemcpyDeviceToHost));
    // Q4_K/Q5_K split each product into a scale term and a min term (each up to ~2x |w·x|),
    // float32 sums over <= 9472 terms: 1e-5 of 4·Σ|w·x| is ~40 ulps of headroom.
    for (int64_t r = 0; r < c.rows; ++r) {
      ASSERT_NEAR(y[r], ref[r], 1e-5 * 4 * mag[r] + 1e-6)
          << quant_name(t) << " rows " << c.rows << " cols " << c.cols << " row " << r;
    }
    // Deterministic: a second launch gives the same bits.
    std::vector<float> y2(y.size());
    ASSERT_EQ(launch_matvec_kquant(t, dw.data(), dx.as<float>(), c.rows, c.cols, dy.as<float>(),
                                   nullptr),
              cudaSuccess);
    KTUNE_CUDA_CHECK(cudaDeviceSynchronize());
    KTUNE_CUDA_CHECK(cudaMemcpy(y2.data(), dy.data(), y2.size() * 4, cudaMemcpyDeviceToHost));
    EXPECT_EQ(std::memcmp(y.data(), y2.data(), y.size() * 4), 0);
  }
}

TEST(CudaMatvecKQuant, Q4_KMatchesDequantizedReference) {
  KTUNE_REQUIRE_GPU();
  check(QuantType::Q4_K, false);
  check(QuantType::Q4_K, true);
}
TEST(CudaMatvecKQuant, Q5_KMatchesDequantizedReference) {
  KTUNE_REQUIRE_GPU();
  check(QuantType::Q5_K, false);
  check(QuantType::Q5_K, true);
}
TEST(CudaMatvecKQuant, Q6_KMatchesDequantizedReference) {
  KTUNE_REQUIRE_GPU();
  check(QuantType::Q6_K, false);
  check(QuantType::Q6_K, true);
}

TEST(CudaMatvecKQuant, RejectsWhatItCannotTake) {
  KTUNE_REQUIRE_GPU();
  DeviceBuffer dw(4096), dx(4096), dy(64);
  const float* x = dx.as<float>();
  float* y = dy.as<float>();
  EXPECT_EQ(launch_matvec_kquant(QuantType::Q4_0, dw.data(), x, 1, 256, y, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(launch_matvec_q4_k(dw.data(), x, 1, 300, y, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_matvec_q4_k(static_cast<uint8_t*>(dw.data()) + 2, x, 1, 256, y, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(launch_matvec_q6_k(static_cast<uint8_t*>(dw.data()) + 1, x, 1, 256, y, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(launch_matvec_q6_k(dw.data(), x + 1, 1, 256, y, nullptr), cudaErrorInvalidValue);
  EXPECT_EQ(launch_matvec_q5_k(dw.data(), x, 0, 256, y, nullptr), cudaSuccess);
}

}  // namespace
}  // namespace ktune::cuda
