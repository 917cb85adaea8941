// K-quant (Q4_K, Q5_K, Q6_K) kernels on the device against the scalar reference (weights made
// by quantize_row or random bytes, dequantized by dequantize_row on the host, products in
// float64). Skips without a GPU (ctest label gpu).
//
//   CudaMatvecKQuant.*   launch_matvec_kquant (the legacy step's matvec).
//   CudaKQuantFused.*    launch_matvec_fused (RMSNorm prologue, 3 segments, accumulate, greedy
//                        tail): the reference, and bit for bit launch_matvec_rowwarp (the same
//                        per-lane order, rows staged in shared memory), incl. Q6_K rows of 630
//                        bytes (2-byte aligned) and an output-head-sized matrix through the tile
//                        ring.
//   CudaKQuantMoe.*      fused gate/up/SwiGLU + down/weighted sum with different types for
//                        gate/up and down, all experts or a hybrid slot map: the reference, and
//                        bit for bit the unfused (rowwarp) and per-slot (graph) sequences.
//   CudaKQuantPrefill.*  launch_prefill_matmul dense / accumulate / SwiGLU / grouped: the
//                        reference of fp16-rounded activations and weights.
//   CudaKQuantEmbedding.* launch_embedding = dequantize_row bit for bit; bad ids give NaN.
// Every output is poisoned (NaN) before the launch that must write it.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gpu/gpu_test_util.h"
#include "ktune/engine/cuda/cuda_check.h"
#include "ktune/engine/cuda/hybrid_kernels.h"
#include "ktune/engine/cuda/kernels.h"
#include "ktune/engine/cuda/kquant_kernels.h"
#include "ktune/engine/cuda/prefill_kernels.h"
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
    ASSERT_EQ(
        launch_matvec_kquant(t, dw.data(), dx.as<float>(), c.rows, c.cols, dy.as<float>(), nullptr),
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
    ASSERT_EQ(
        launch_matvec_kquant(t, dw.data(), dx.as<float>(), c.rows, c.cols, dy.as<float>(), nullptr),
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

// ---------------------------------------------------------------------------------------------
// Shared by the engine-kernel tests below.

constexpr QuantType kKTypes[] = {QuantType::Q4_K, QuantType::Q5_K, QuantType::Q6_K};

// rows x cols of type t from random bytes (every code and sub-block scale pattern) with small
// fp16 super-block scales, so weights stay O(1): |w| <= 63 * 31 * 5e-4 + 63 * 5e-3 (Q4_K/Q5_K),
// 128 * 32 * 1e-4 (Q6_K). Fast (quantize_row of the K-quants is ~10 M weights/s).
std::vector<uint8_t> random_kquant(QuantType t, int64_t rows, int64_t cols, std::mt19937& rng) {
  std::vector<uint8_t> q(static_cast<size_t>(rows * row_bytes(t, cols)));
  std::uniform_int_distribution<int> byte(0, 255);
  for (auto& v : q) v = static_cast<uint8_t>(byte(rng));
  const int64_t bb = block_bytes(t);
  for (int64_t b = 0; b < rows * cols / 256; ++b) {
    uint8_t* blk = q.data() + b * bb;
    if (t == QuantType::Q6_K) {
      const uint16_t d = fp32_to_fp16(1e-4f);
      std::memcpy(blk + 208, &d, 2);
    } else {
      const uint16_t d = fp32_to_fp16(5e-4f), dmin = fp32_to_fp16(5e-3f);
      std::memcpy(blk, &d, 2);
      std::memcpy(blk + 2, &dmin, 2);
    }
  }
  return q;
}

std::vector<float> dequant_rows(QuantType t, const std::vector<uint8_t>& q, int64_t cols) {
  const int64_t rb = row_bytes(t, cols);
  const int64_t rows = static_cast<int64_t>(q.size()) / rb;
  std::vector<float> w(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    dequantize_row(t, q.data() + r * rb, w.data() + r * cols, cols);
  return w;
}

std::vector<float> normal_vec(size_t n, float sd, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

template <class T>
T* upload(DeviceBuffer& buf, const std::vector<T>& h, size_t extra = 16) {
  buf = DeviceBuffer(h.size() * sizeof(T) + extra);
  KTUNE_CUDA_CHECK(cudaMemcpy(buf.data(), h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return buf.as<T>();
}
template <class T>
std::vector<T> download(const T* p, size_t n) {
  std::vector<T> h(n);
  KTUNE_CUDA_CHECK(cudaDeviceSynchronize());
  KTUNE_CUDA_CHECK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}
void poison(void* p, size_t bytes) { KTUNE_CUDA_CHECK(cudaMemset(p, 0xFF, bytes)); }  // NaN
bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

// ---------------------------------------------------------------------------------------------
// launch_matvec_fused.

// q/k/v-like segments of one type with the RMSNorm prologue (norm_out kept), then a plain matvec
// with the residual epilogue, then an output-head-sized one with the greedy tail. Reference:
// float64 dots of the dequantized rows with the host-normalized x. Tolerance as
// CudaMatvecKQuant's: the kernel sums a*Σq·x and b*Σx per 8-weight slice (each term up to ~2x
// |w·x|), float32 over <= 2048/8 slices: 1e-5 of 4·Σ|w·x| is tens of ulps of headroom (the x
// normalization adds one float32 rounding per element, ~1e-7 relative).
void check_fused(QuantType t) {
  const unsigned seed = test_seed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " " + quant_name(t));
  std::mt19937 rng(seed);
  struct Shape {
    int64_t rows[3];
    int n_seg;
    int64_t cols;
  };
  for (const Shape sh :
       {Shape{{64, 16, 16}, 3, 256}, Shape{{37, 5, 11}, 3, 768}, Shape{{96, 0, 0}, 1, 2048}}) {
    const int64_t cols = sh.cols;
    std::vector<std::vector<uint8_t>> wq(3);
    DeviceBuffer dw[3], dy[3];
    MatvecFused a;
    a.type = t;
    a.cols = cols;
    a.n_seg = sh.n_seg;
    const std::vector<float> x = normal_vec(static_cast<size_t>(cols), 1.0f, rng);
    std::vector<float> nw = normal_vec(static_cast<size_t>(cols), 0.5f, rng);
    for (auto& v : nw) v += 1.0f;
    DeviceBuffer dx, dnw, dnorm(static_cast<size_t>(cols) * 4);
    a.x = upload(dx, x);
    a.norm_w = upload(dnw, nw);
    a.eps = 1e-6f;
    a.norm_out = dnorm.as<float>();
    for (int i = 0; i < sh.n_seg; ++i) {
      wq[i] = random_kquant(t, sh.rows[i], cols, rng);
      a.seg[i] = {upload(dw[i], wq[i]), nullptr, sh.rows[i]};
      dy[i] = DeviceBuffer(static_cast<size_t>(std::max<int64_t>(1, sh.rows[i])) * 4);
      a.seg[i].y = dy[i].as<float>();
      poison(dy[i].data(), dy[i].size());
    }
    ASSERT_EQ(launch_matvec_fused(a, nullptr), cudaSuccess);
    // Host normalization in double (the kernel's is float32: inside the tolerance).
    double ss = 0;
    for (float v : x) ss += double(v) * v;
    const double r = 1.0 / std::sqrt(ss / double(cols) + 1e-6);
    const std::vector<float> xn_gpu = download(a.norm_out, static_cast<size_t>(cols));
    for (int64_t c = 0; c < cols; ++c) {
      ASSERT_NEAR(xn_gpu[c], nw[c] * (x[c] * r), 1e-5 * std::fabs(nw[c] * x[c] * r) + 1e-7);
    }
    DeviceBuffer dyr;
    for (int i = 0; i < sh.n_seg; ++i) {
      const int64_t rows = sh.rows[i];
      const std::vector<float> w = dequant_rows(t, wq[i], cols);
      const std::vector<float> y = download(a.seg[i].y, static_cast<size_t>(rows));
      for (int64_t row = 0; row < rows; ++row) {
        double ref = 0, mag = 0;
        for (int64_t c = 0; c < cols; ++c) {
          const double p = double(w[row * cols + c]) * (nw[c] * (x[c] * r));
          ref += p;
          mag += std::fabs(p);
        }
        ASSERT_NEAR(y[row], ref, 1e-5 * 4 * mag + 1e-6) << "segment " << i << " row " << row;
      }
      // The same rows from global memory, one warp per row, fed the kernel's normalized x: the
      // same bits.
      dyr = DeviceBuffer(static_cast<size_t>(std::max<int64_t>(1, rows)) * 4);
      poison(dyr.data(), dyr.size());
      ASSERT_EQ(
          launch_matvec_rowwarp(t, a.seg[i].w, a.norm_out, rows, cols, dyr.as<float>(), nullptr),
          cudaSuccess);
      EXPECT_TRUE(same_bits(y, download(dyr.as<float>(), static_cast<size_t>(rows))))
          << "fused vs rowwarp, segment " << i << " cols " << cols;
    }
    // Residual epilogue: y = y + dot, from the first segment's output.
    MatvecFused acc;
    acc.type = t;
    acc.cols = cols;
    acc.x = a.norm_out;
    acc.seg[0] = a.seg[0];
    acc.accumulate = true;
    const std::vector<float> before = download(a.seg[0].y, static_cast<size_t>(sh.rows[0]));
    ASSERT_EQ(launch_matvec_fused(acc, nullptr), cudaSuccess);
    const std::vector<float> after = download(a.seg[0].y, static_cast<size_t>(sh.rows[0]));
    for (int64_t row = 0; row < sh.rows[0]; ++row) {
      ASSERT_EQ(after[row], before[row] + before[row]) << "accumulate row " << row;
    }
  }

  // An output head: 20000 rows x 2048 (one block's rows exceed one tile: the 3-stage ring), the
  // greedy tail's token = the host argmax of the outputs, history and position advanced.
  const int64_t rows = 20000, cols = 2048;
  const std::vector<uint8_t> wq = random_kquant(t, rows, cols, rng);
  const std::vector<float> x = normal_vec(static_cast<size_t>(cols), 1.0f, rng);
  DeviceBuffer dw, dx, dy(rows * 4), dkey(16), dtok(4), dpos(4), dhist(64);
  MatvecFused h;
  h.type = t;
  h.cols = cols;
  h.x = upload(dx, x);
  h.seg[0] = {upload(dw, wq), dy.as<float>(), rows};
  h.argmax_key = reinterpret_cast<unsigned long long*>(dkey.as<uint8_t>());
  h.counter = reinterpret_cast<unsigned*>(dkey.as<uint8_t>() + 8);
  h.argmax_out = dtok.as<int32_t>();
  h.advance_pos = dpos.as<int32_t>();
  h.advance_history = dhist.as<int32_t>();
  h.advance_len = 16;
  KTUNE_CUDA_CHECK(cudaMemset(dkey.data(), 0, 16));
  KTUNE_CUDA_CHECK(cudaMemset(dpos.data(), 0, 4));
  poison(dy.data(), dy.size());
  ASSERT_EQ(launch_matvec_fused(h, nullptr), cudaSuccess);
  const std::vector<float> y = download(dy.as<float>(), static_cast<size_t>(rows));
  DeviceBuffer dyr(rows * 4);
  ASSERT_EQ(launch_matvec_rowwarp(t, h.seg[0].w, h.x, rows, cols, dyr.as<float>(), nullptr),
            cudaSuccess);
  EXPECT_TRUE(same_bits(y, download(dyr.as<float>(), static_cast<size_t>(rows)))) << "head";
  const int64_t best = std::max_element(y.begin(), y.end()) - y.begin();
  EXPECT_EQ(download(dtok.as<int32_t>(), 1)[0], best);
  EXPECT_EQ(download(dhist.as<int32_t>(), 1)[0], best);
  EXPECT_EQ(download(dpos.as<int32_t>(), 1)[0], 1);
  const std::vector<float> w =
      dequant_rows(t, std::vector<uint8_t>(wq.begin(), wq.begin() + 64 * row_bytes(t, cols)), cols);
  for (int64_t row = 0; row < 64; ++row) {
    double ref = 0, mag = 0;
    for (int64_t c = 0; c < cols; ++c) {
      ref += double(w[row * cols + c]) * x[c];
      mag += std::fabs(double(w[row * cols + c]) * x[c]);
    }
    ASSERT_NEAR(y[row], ref, 1e-5 * 4 * mag + 1e-6) << "head row " << row;
  }
}

TEST(CudaKQuantFused, Q4_KMatchesReferenceAndRowwarp) {
  KTUNE_REQUIRE_GPU();
  check_fused(QuantType::Q4_K);
}
TEST(CudaKQuantFused, Q5_KMatchesReferenceAndRowwarp) {
  KTUNE_REQUIRE_GPU();
  check_fused(QuantType::Q5_K);
}
TEST(CudaKQuantFused, Q6_KMatchesReferenceAndRowwarp) {
  KTUNE_REQUIRE_GPU();
  check_fused(QuantType::Q6_K);
}

// ---------------------------------------------------------------------------------------------
// MoE: fused, unfused, per-slot.

// gate/up of type tg, down of type td (Q4_K_M layers pair Q4_K gate/up with Q6_K down). hidden
// 512, ffn 768 (the down rows of qwen3-30b-a3b's width: 630-byte Q6_K rows), 8 experts, top-5.
// With `map`, experts 1, 2 and 6 live "elsewhere" (slot -1): their slots give act 0 and are left
// out of the sum. Reference tolerance: act and out are float32 sums of <= 768 products per row
// (the row dot's 1e-5 * 4Σ|w·x| above) through SwiGLU; 1e-4 of the largest |value| covers both
// (measured margins are printed).
void check_moe(QuantType tg, QuantType td, bool map) {
  const unsigned seed = test_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  const int64_t hidden = 512, ffn = 768, n_exp = 8, k = 5;
  const auto gq = random_kquant(tg, n_exp * ffn, hidden, rng);
  const auto uq = random_kquant(tg, n_exp * ffn, hidden, rng);
  const auto dq = random_kquant(td, n_exp * hidden, ffn, rng);
  const auto gf = dequant_rows(tg, gq, hidden), uf = dequant_rows(tg, uq, hidden);
  const auto df = dequant_rows(td, dq, ffn);
  const std::vector<float> x = normal_vec(static_cast<size_t>(hidden), 1.0f, rng);
  const std::vector<float> resid = normal_vec(static_cast<size_t>(hidden), 1.0f, rng);
  const std::vector<int32_t> ids = {0, 2, 3, 5, 6};
  const std::vector<float> wts = {0.3f, 0.25f, 0.2f, 0.15f, 0.1f};
  std::vector<int32_t> slot_of(static_cast<size_t>(n_exp));
  for (int64_t e = 0, next = 0; e < n_exp; ++e) {
    const bool here = !map || (e != 1 && e != 2 && e != 6);
    slot_of[e] = here ? static_cast<int32_t>(next++) : -1;
  }
  // The device holds only the slots' matrices (compacted, as the hybrid engine uploads them).
  const int64_t gbytes = ffn * row_bytes(tg, hidden), dbytes = hidden * row_bytes(td, ffn);
  auto compact = [&](const std::vector<uint8_t>& all, int64_t mbytes) {
    std::vector<uint8_t> out;
    for (int64_t e = 0; e < n_exp; ++e) {
      if (slot_of[e] >= 0)
        out.insert(out.end(), all.begin() + e * mbytes, all.begin() + (e + 1) * mbytes);
    }
    return out;
  };

  std::vector<double> act(static_cast<size_t>(k * ffn), 0.0);
  for (int64_t j = 0; j < k; ++j) {
    if (slot_of[ids[j]] < 0) continue;
    for (int64_t r = 0; r < ffn; ++r) {
      double g = 0, u = 0;
      const size_t row = static_cast<size_t>((ids[j] * ffn + r) * hidden);
      for (int64_t c = 0; c < hidden; ++c) {
        g += double(gf[row + c]) * x[c];
        u += double(uf[row + c]) * x[c];
      }
      act[j * ffn + r] = g / (1.0 + std::exp(-g)) * u;
    }
  }
  std::vector<double> ref(resid.begin(), resid.end());
  for (int64_t r = 0; r < hidden; ++r) {
    for (int64_t j = 0; j < k; ++j) {
      if (slot_of[ids[j]] < 0) continue;
      double d = 0;
      const size_t row = static_cast<size_t>((ids[j] * hidden + r) * ffn);
      for (int64_t c = 0; c < ffn; ++c) d += double(df[row + c]) * act[j * ffn + c];
      ref[r] += wts[j] * d;
    }
  }

  DeviceBuffer bg, bu, bd, bx, bid, bw, bslot, bres, bres2, bres3, bact(2 * k * ffn * 4 + 16),
      bact3(k * ffn * 4 + 16), bg1(ffn * 4), bu1(ffn * 4), by(hidden * 4), bacc(hidden * 4);
  const void* dg = upload(bg, compact(gq, gbytes));
  const void* du = upload(bu, compact(uq, gbytes));
  const void* dd = upload(bd, compact(dq, dbytes));
  const float* dx = upload(bx, x);
  const int32_t* did = upload(bid, ids);
  const float* dw = upload(bw, wts);
  const int32_t* dslot = map ? upload(bslot, slot_of) : nullptr;
  float* dres = upload(bres, resid);
  float* dres2 = upload(bres2, resid);
  float* dres3 = upload(bres3, resid);
  float* dact = bact.as<float>();
  float* dact2 = dact + k * ffn;
  float* dact3 = bact3.as<float>();
  poison(bact.data(), bact.size());

  // Fused.
  ASSERT_EQ(launch_moe_gate_up_swiglu(tg, dg, du, gbytes, did, k, n_exp, dx, ffn, hidden, dact,
                                      nullptr, dslot),
            cudaSuccess);
  ASSERT_EQ(launch_moe_down_sum(td, dd, dbytes, did, dw, k, n_exp, dact, hidden, ffn, dres, nullptr,
                                dslot),
            cudaSuccess);
  // Unfused, host-driven: per selected expert that lives here, gate, up, SwiGLU, down, axpy.
  KTUNE_CUDA_CHECK(cudaMemset(bacc.data(), 0, hidden * 4));
  for (int64_t j = 0; j < k; ++j) {
    const int32_t sl = slot_of[ids[j]];
    if (sl < 0) {
      KTUNE_CUDA_CHECK(cudaMemset(dact2 + j * ffn, 0, ffn * 4));
      continue;
    }
    const auto* g0 = static_cast<const uint8_t*>(dg) + sl * gbytes;
    const auto* u0 = static_cast<const uint8_t*>(du) + sl * gbytes;
    const auto* d0 = static_cast<const uint8_t*>(dd) + sl * dbytes;
    ASSERT_EQ(launch_matvec_rowwarp(tg, g0, dx, ffn, hidden, bg1.as<float>(), nullptr),
              cudaSuccess);
    ASSERT_EQ(launch_matvec_rowwarp(tg, u0, dx, ffn, hidden, bu1.as<float>(), nullptr),
              cudaSuccess);
    ASSERT_EQ(launch_swiglu(bg1.as<float>(), bu1.as<float>(), ffn, dact2 + j * ffn, nullptr),
              cudaSuccess);
    ASSERT_EQ(launch_matvec_rowwarp(td, d0, dact2 + j * ffn, hidden, ffn, by.as<float>(), nullptr),
              cudaSuccess);
    ASSERT_EQ(launch_axpy_accumulate(wts[j], by.as<float>(), hidden, bacc.as<float>(), nullptr),
              cudaSuccess);
  }
  ASSERT_EQ(launch_add_inplace(dres2, bacc.as<float>(), hidden, nullptr), cudaSuccess);
  // Per slot (the graph-capturable unfused path): ids and the map read on the device.
  KTUNE_CUDA_CHECK(cudaMemset(bacc.data(), 0, hidden * 4));
  KTUNE_CUDA_CHECK(cudaMemset(bact3.data(), 0, bact3.size()));
  for (int64_t j = 0; j < k; ++j) {
    float* a3 = dact3 + j * ffn;
    ASSERT_EQ(launch_matvec_rowwarp_slot(tg, dg, gbytes, did, j, dslot, dx, ffn, hidden,
                                         bg1.as<float>(), nullptr),
              cudaSuccess);
    ASSERT_EQ(launch_matvec_rowwarp_slot(tg, du, gbytes, did, j, dslot, dx, ffn, hidden,
                                         bu1.as<float>(), nullptr),
              cudaSuccess);
    ASSERT_EQ(launch_swiglu_slot(did, j, dslot, bg1.as<float>(), bu1.as<float>(), ffn, a3, nullptr),
              cudaSuccess);
    ASSERT_EQ(launch_matvec_rowwarp_slot(td, dd, dbytes, did, j, dslot, a3, hidden, ffn,
                                         by.as<float>(), nullptr),
              cudaSuccess);
    ASSERT_EQ(
        launch_axpy_slot(did, j, dslot, dw, by.as<float>(), hidden, bacc.as<float>(), nullptr),
        cudaSuccess);
  }
  ASSERT_EQ(launch_add_inplace(dres3, bacc.as<float>(), hidden, nullptr), cudaSuccess);

  const auto a_f = download(dact, static_cast<size_t>(k * ffn));
  const auto a_u = download(dact2, static_cast<size_t>(k * ffn));
  const auto a_s = download(dact3, static_cast<size_t>(k * ffn));
  const auto y_f = download(dres, static_cast<size_t>(hidden));
  const auto y_u = download(dres2, static_cast<size_t>(hidden));
  const auto y_s = download(dres3, static_cast<size_t>(hidden));
  double amax = 0, aerr = 0, ymax = 0, yerr = 0;
  for (size_t i = 0; i < act.size(); ++i) {
    amax = std::max(amax, std::fabs(act[i]));
    aerr = std::max(aerr, std::fabs(a_f[i] - act[i]));
  }
  for (int64_t r = 0; r < hidden; ++r) {
    ymax = std::max(ymax, std::fabs(ref[r]));
    yerr = std::max(yerr, std::fabs(y_f[r] - ref[r]));
  }
  std::printf(
      "[CudaKQuantMoe gate/up %s down %s%s] act max|err| %.3g (max %.3g); out max|err| "
      "%.3g (max %.3g); fused = unfused = per-slot: act %s, out %s\n",
      quant_name(tg), quant_name(td), map ? ", slot map" : "", aerr, amax, yerr, ymax,
      same_bits(a_f, a_u) && same_bits(a_f, a_s) ? "yes" : "no",
      same_bits(y_f, y_u) && same_bits(y_f, y_s) ? "yes" : "no");
  EXPECT_LE(aerr, 1e-4 * amax + 1e-6);
  EXPECT_LE(yerr, 1e-4 * ymax + 1e-6);
  EXPECT_TRUE(same_bits(a_f, a_u));
  EXPECT_TRUE(same_bits(a_f, a_s));
  EXPECT_TRUE(same_bits(y_f, y_u));
  EXPECT_TRUE(same_bits(y_f, y_s));

  // A bad id gives NaN outputs, not a wild read.
  const std::vector<int32_t> bad = {0, 3, 99, 5, 7};
  DeviceBuffer bbad;
  const int32_t* dbad = upload(bbad, bad);
  ASSERT_EQ(launch_moe_gate_up_swiglu(tg, dg, du, gbytes, dbad, k, n_exp, dx, ffn, hidden, dact,
                                      nullptr, dslot),
            cudaSuccess);
  EXPECT_TRUE(std::isnan(download(dact + 2 * ffn, 1)[0]));
  ASSERT_EQ(launch_moe_down_sum(td, dd, dbytes, dbad, dw, k, n_exp, dact, hidden, ffn, dres,
                                nullptr, dslot),
            cudaSuccess);
  EXPECT_TRUE(std::isnan(download(dres, 1)[0]));
}

TEST(CudaKQuantMoe, Q4_KGateUpQ6_KDown) {
  KTUNE_REQUIRE_GPU();
  check_moe(QuantType::Q4_K, QuantType::Q6_K, false);
  check_moe(QuantType::Q4_K, QuantType::Q6_K, true);
}
TEST(CudaKQuantMoe, Q5_KGateUpQ4_KDown) {
  KTUNE_REQUIRE_GPU();
  check_moe(QuantType::Q5_K, QuantType::Q4_K, false);
  check_moe(QuantType::Q5_K, QuantType::Q4_K, true);
}
TEST(CudaKQuantMoe, Q6_KGateUpQ5_KDown) {
  KTUNE_REQUIRE_GPU();
  check_moe(QuantType::Q6_K, QuantType::Q5_K, false);
  check_moe(QuantType::Q6_K, QuantType::Q5_K, true);
}

// ---------------------------------------------------------------------------------------------
// Prefill matmul.

// Reference: float64 sums of fp16(a) * fp16(w), w the dequantized weight - exactly the products
// the tensor cores form (fp16 x fp16 is exact in float32), so the only difference is float32
// accumulation over k: at most k * 2^-24 * Σ|a·w| (k <= 768: 4.6e-5); 5e-5 * Σ|a·w| bounds it.
// SwiGLU outputs are fp16(silu(g) * u): one fp16 rounding (2^-11 relative) on top of the
// propagated gate and up errors.
struct PrefillCase {
  QuantType type;
  int64_t m, n, k;
};

std::vector<uint16_t> to_fp16(const std::vector<float>& v) {
  std::vector<uint16_t> h(v.size());
  for (size_t i = 0; i < v.size(); ++i) h[i] = fp32_to_fp16(v[i]);
  return h;
}
std::vector<float> fp16_round(const std::vector<float>& v) {
  std::vector<float> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = fp16_to_fp32(fp32_to_fp16(v[i]));
  return r;
}

void check_prefill(const PrefillCase& pc) {
  const unsigned seed = test_seed();
  SCOPED_TRACE("seed " + std::to_string(seed) + " " + quant_name(pc.type) + " m " +
               std::to_string(pc.m) + " n " + std::to_string(pc.n) + " k " + std::to_string(pc.k));
  std::mt19937 rng(seed);
  const int64_t m = pc.m, n = pc.n, k = pc.k;
  const auto wq = random_kquant(pc.type, n, k, rng), w2q = random_kquant(pc.type, n, k, rng);
  const auto wf = fp16_round(dequant_rows(pc.type, wq, k));
  const auto w2f = fp16_round(dequant_rows(pc.type, w2q, k));
  const auto af = fp16_round(normal_vec(static_cast<size_t>(m * k), 1.0f, rng));
  const auto a16 = to_fp16(af);
  auto ref = [&](const std::vector<float>& w, int64_t r, int64_t c, double* mag) {
    double s = 0, g = 0;
    for (int64_t i = 0; i < k; ++i) {
      const double p = double(af[r * k + i]) * w[c * k + i];
      s += p;
      g += std::fabs(p);
    }
    *mag = g;
    return s;
  };
  DeviceBuffer da, dw, dw2, dy(m * n * 4), dy16(m * n * 2 + 16);
  PrefillMatmul p;
  p.type = pc.type;
  p.m = m;
  p.n = n;
  p.k = k;
  p.a = upload(da, a16);
  p.lda = k;
  p.w = upload(dw, wq);
  p.y = dy.as<float>();
  p.ldy = n;
  // Dense, then accumulate on top.
  poison(dy.data(), dy.size());
  ASSERT_EQ(launch_prefill_matmul(p, nullptr), cudaSuccess);
  const auto y = download(p.y, static_cast<size_t>(m * n));
  p.accumulate = true;
  ASSERT_EQ(launch_prefill_matmul(p, nullptr), cudaSuccess);
  const auto y2 = download(p.y, static_cast<size_t>(m * n));
  double worst = 0;
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t c = 0; c < n; ++c) {
      double mag;
      const double e = ref(wf, r, c, &mag);
      const float v = y[r * n + c];
      ASSERT_NEAR(v, e, 5e-5 * mag + 1e-6) << "row " << r << " col " << c;
      ASSERT_EQ(y2[r * n + c], v + v) << "accumulate row " << r << " col " << c;
      worst = std::max(worst, std::fabs(v - e) / (mag + 1e-30));
    }
  }
  // SwiGLU: gate = w, up = w2.
  p.accumulate = false;
  p.swiglu = true;
  p.w2 = upload(dw2, w2q);
  p.y = nullptr;
  p.y16 = dy16.as<uint16_t>();
  poison(dy16.data(), dy16.size());
  ASSERT_EQ(launch_prefill_matmul(p, nullptr), cudaSuccess);
  const auto o16 = download(p.y16, static_cast<size_t>(m * n));
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t c = 0; c < n; ++c) {
      double mg, mu;
      const double g = ref(wf, r, c, &mg), u = ref(w2f, r, c, &mu);
      const double sg = 1.0 / (1.0 + std::exp(-g));
      const double e = g * sg * u;
      // d(silu)/dg <= 1.1; errors of g and u as above.
      const double tol = std::fabs(e) * 1.0 / 1024 + 1.1 * std::fabs(u) * 5e-5 * mg +
                         std::fabs(g * sg) * 5e-5 * mu + 1e-6;
      ASSERT_NEAR(fp16_to_fp32(o16[r * n + c]), e, tol) << "swiglu row " << r << " col " << c;
    }
  }
  // Grouped: rows of A picked through a_rows, two "experts" (w and w2 as expert 0 and 1) with
  // tiles {expert, first row, rows}: expert 1 takes rows [0, 5), expert 0 rows [5, m).
  const int64_t m1 = std::min<int64_t>(5, m);
  std::vector<int32_t> a_rows(static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i) a_rows[i] = static_cast<int32_t>(m - 1 - i);  // reversed
  std::vector<int32_t> tiles;
  auto add_tiles = [&](int32_t e, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r += kPrefillTileM) {
      tiles.insert(tiles.end(),
                   {e, static_cast<int32_t>(r),
                    static_cast<int32_t>(std::min<int64_t>(kPrefillTileM, r1 - r)), 0});
    }
  };
  add_tiles(1, 0, m1);
  add_tiles(0, m1, m);
  const int32_t nt = static_cast<int32_t>(tiles.size() / 4);
  const std::vector<const void*> table = {p.w, p.w2};
  DeviceBuffer drows, dtiles, dnt, dtab;
  PrefillMatmul gp;
  gp.type = pc.type;
  gp.n = n;
  gp.k = k;
  gp.a = p.a;
  gp.lda = k;
  gp.a_rows = upload(drows, a_rows);
  gp.w_table = upload(dtab, table);
  gp.tiles = upload(dtiles, tiles);
  gp.n_tiles = upload(dnt, std::vector<int32_t>{nt});
  gp.max_tiles = nt + 2;  // extra grid rows must do nothing
  gp.y = dy.as<float>();
  gp.ldy = n;
  poison(dy.data(), dy.size());
  ASSERT_EQ(launch_prefill_matmul(gp, nullptr), cudaSuccess);
  const auto yg = download(gp.y, static_cast<size_t>(m * n));
  for (int64_t r = 0; r < m; ++r) {
    const std::vector<float>& w = r < m1 ? w2f : wf;
    for (int64_t c = 0; c < n; ++c) {
      double mag;
      const double e = ref(w, a_rows[r], c, &mag);
      ASSERT_NEAR(yg[r * n + c], e, 5e-5 * mag + 1e-6) << "grouped row " << r << " col " << c;
    }
  }
  std::printf(
      "[CudaKQuantPrefill %s m %lld n %lld k %lld] worst |err| / Σ|a·w| %.3g (bound 5e-5)\n",
      quant_name(pc.type), static_cast<long long>(m), static_cast<long long>(n),
      static_cast<long long>(k), worst);
}

TEST(CudaKQuantPrefill, MatchesFp16Reference) {
  KTUNE_REQUIRE_GPU();
  for (QuantType t : kKTypes) {
    check_prefill({t, 37, 96, 512});   // partial row and column tiles
    check_prefill({t, 130, 64, 768});  // Q6_K rows of 630 bytes (2-byte aligned)
  }
}

// ---------------------------------------------------------------------------------------------
// Embedding.

TEST(CudaKQuantEmbedding, EqualsDequantizeRow) {
  KTUNE_REQUIRE_GPU();
  std::mt19937 rng(test_seed());
  const int64_t vocab = 50, embd = 768;
  for (QuantType t : kKTypes) {
    const auto q = random_kquant(t, vocab, embd, rng);
    const auto ref = dequant_rows(t, q, embd);
    const std::vector<int32_t> toks = {0, 49, 7, -1, 50};
    DeviceBuffer dq, dt, dout(toks.size() * embd * 4);
    poison(dout.data(), dout.size());
    ASSERT_EQ(launch_embedding(t, upload(dq, q), vocab, embd, upload(dt, toks),
                               static_cast<int64_t>(toks.size()), dout.as<float>(), nullptr),
              cudaSuccess);
    const auto out = download(dout.as<float>(), toks.size() * embd);
    for (size_t i = 0; i < 3; ++i) {
      EXPECT_EQ(std::memcmp(out.data() + i * embd, ref.data() + toks[i] * embd, embd * 4), 0)
          << quant_name(t) << " token " << toks[i];
    }
    for (size_t i = 3; i < 5; ++i) EXPECT_TRUE(std::isnan(out[i * embd])) << "bad id " << toks[i];
  }
}

// ---------------------------------------------------------------------------------------------

TEST(CudaKQuantLaunchers, RejectWhatTheyCannotTake) {
  KTUNE_REQUIRE_GPU();
  DeviceBuffer dw(1 << 20), dx(1 << 16), dy(1 << 16), dids(64);
  const auto* w = static_cast<const uint8_t*>(dw.data());
  const float* x = dx.as<float>();
  float* y = dy.as<float>();
  const int32_t* ids = dids.as<int32_t>();
  for (QuantType t : kKTypes) {
    SCOPED_TRACE(quant_name(t));
    // Rows of partial super-blocks, misaligned weights: refused, never a throw or a launch.
    EXPECT_EQ(launch_matvec_rowwarp(t, w, x, 4, 288, y, nullptr), cudaErrorInvalidValue);
    EXPECT_EQ(launch_matvec_rowwarp(t, w + 1, x, 4, 256, y, nullptr), cudaErrorInvalidValue);
    MatvecFused a;
    a.type = t;
    a.cols = 288;
    a.x = x;
    a.seg[0] = {w, y, 4};
    EXPECT_EQ(launch_matvec_fused(a, nullptr), cudaErrorInvalidValue);
    EXPECT_EQ(launch_moe_gate_up_swiglu(t, w, w, 1 << 16, ids, 2, 4, x, 64, 288, y, nullptr),
              cudaErrorInvalidValue);
    EXPECT_EQ(launch_moe_down_sum(t, w, 1 << 16, ids, x, 2, 4, y, 64, 288, y, nullptr),
              cudaErrorInvalidValue);
    EXPECT_EQ(launch_matvec_rowwarp_slot(t, w, 1 << 16, ids, 0, nullptr, x, 4, 288, y, nullptr),
              cudaErrorInvalidValue);
    EXPECT_EQ(launch_embedding(t, w, 4, 288, ids, 1, y, nullptr), cudaErrorInvalidValue);
    PrefillMatmul p;
    p.type = t;
    p.m = 4;
    p.n = 4;
    p.k = 320;  // a multiple of 64, not of 256
    p.a = reinterpret_cast<const uint16_t*>(x);
    p.lda = 320;
    p.w = w;
    p.y = y;
    p.ldy = 4;
    EXPECT_EQ(launch_prefill_matmul(p, nullptr), cudaErrorInvalidValue);
  }
  EXPECT_EQ(launch_matvec_rowwarp(QuantType::Q4_K, w + 2, x, 4, 256, y, nullptr),
            cudaErrorInvalidValue);
  EXPECT_EQ(launch_matvec_rowwarp(QuantType::Q6_K, w + 2, x, 4, 256, y, nullptr), cudaSuccess);
  KTUNE_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace
}  // namespace ktune::cuda
