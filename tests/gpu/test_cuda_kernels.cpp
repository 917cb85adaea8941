// CUDA kernels against the CPU reference, on the device (ctest label `gpu`). Each test skips with
// ktune::query_gpus()'s reason when there is no usable GPU (CI, the build machine).
//
// Data are fresh random values per run (seed from std::random_device, printed on failure through
// SCOPED_TRACE; KTUNE_TEST_SEED=N pins it). Outputs are poisoned with 0xFF bytes (NaN floats, -1
// ints) before every launch and every element is checked to be written. References: the
// engine's scalar code (cpu_ops::rmsnorm / rope_table / rope_neox / route_topk, dequantize_row)
// where it exists, float64 loops otherwise. Tolerances are stated next to each check.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/matvec_variants.h"
#include "gpu/gpu_test_util.h"
#include "gpu/kernel_test_util.h"
#include "ktune/engine/cuda/cuda_check.h"
#include "ktune/engine/cuda/kernels.h"
#include "ktune/engine/error.h"
#include "ktune/engine/gpu_info.h"
#include "ktune/engine/quant.h"
#include "runtime/cpu_ops.h"

namespace ktune::cuda {
namespace {

using test::Dev;
using test::Rng;

struct Err {
  double rel_l2 = 0;   // ||out - ref|| / ||ref||
  double max_abs = 0;  // max |out - ref|
  double ref_max = 0;  // max |ref|
  int64_t unwritten = 0;
};

template <class R>
Err compare(const std::vector<float>& out, const std::vector<R>& ref) {
  Err e;
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double r = static_cast<double>(ref[i]);
    if (std::isnan(out[i])) {
      ++e.unwritten;
      continue;
    }
    const double d = static_cast<double>(out[i]) - r;
    num += d * d;
    den += r * r;
    e.max_abs = std::max(e.max_abs, std::fabs(d));
    e.ref_max = std::max(e.ref_max, std::fabs(r));
  }
  e.rel_l2 = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return e;
}

std::string describe(const Err& e) {
  char b[160];
  std::snprintf(b, sizeof b, "rel_l2 %.3g, max_abs %.3g (ref max %.3g), unwritten %lld", e.rel_l2,
                e.max_abs, e.ref_max, static_cast<long long>(e.unwritten));
  return b;
}

#define EXPECT_CLOSE(out, ref, tol)                           \
  do {                                                        \
    const Err e_ = compare(out, ref);                         \
    EXPECT_EQ(e_.unwritten, 0) << describe(e_);               \
    EXPECT_LE(e_.rel_l2, tol) << describe(e_);                \
    std::printf("    [%s] %s\n", #out, describe(e_).c_str()); \
  } while (0)

// --- error checking and memory ----------------------------------------------------------------

TEST(CudaCheck, ThrowsErrorNamingCallAndLocation) {
  try {
    KTUNE_CUDA_CHECK(cudaErrorInvalidValue);
    FAIL() << "no throw";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("cudaErrorInvalidValue"), std::string::npos) << m;
    EXPECT_NE(m.find("test_cuda_kernels.cpp:"), std::string::npos) << m;
    EXPECT_NE(m.find("failed"), std::string::npos) << m;
  }
  EXPECT_NO_THROW(KTUNE_CUDA_CHECK(cudaSuccess));
}

TEST(CudaArena, AlignsAndReportsExhaustion) {
  KTUNE_REQUIRE_GPU();
  DeviceArena arena(4096, "test arena");
  char* a = static_cast<char*>(arena.alloc(10));
  char* b = static_cast<char*>(arena.alloc(10));
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a) % 256, 0u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b) % 256, 0u);
  EXPECT_EQ(b - a, 256);
  char* c = static_cast<char*>(arena.alloc(4, 16));  // b ends at 266; 16-aligned: 272
  EXPECT_EQ(c - a, 272);
  char* d = static_cast<char*>(arena.alloc(4, 1024));
  EXPECT_EQ(reinterpret_cast<uintptr_t>(d) % 1024, 0u);
  EXPECT_GE(d - a, 276);
  try {
    arena.alloc(8192);
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("test arena"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("8192"), std::string::npos) << e.what();
  }
  arena.reset();
  EXPECT_EQ(arena.alloc(4096), a);
  Stream s;
  Event e0, e1;
  e0.record(s);
  e1.record(s);
  e1.synchronize();
  EXPECT_GE(e1.elapsed_ms_since(e0), 0.0f);
}

// --- rmsnorm ----------------------------------------------------------------------------------

TEST(CudaRmsnorm, MatchesCpu) {
  KTUNE_REQUIRE_GPU();
  Rng rng;
  SCOPED_TRACE(rng.trace());
  for (int64_t n : {2048, 128, 100, 4096}) {
    SCOPED_TRACE("n " + std::to_string(n));
    const int64_t rows = 5;
    auto x = rng.normal(rows * n, 2.0f, 0.3f);
    auto w = rng.normal(n, 0.5f, 1.0f);
    std::vector<float> ref(rows * n);
    for (int64_t r = 0; r < rows; ++r) cpu_ops::rmsnorm(&x[r * n], w.data(), 1e-6f, n, &ref[r * n]);
    Dev<float> dx(x), dw(w), dy(rows * n);
    dy.poison();
    ASSERT_EQ(launch_rmsnorm(dx.ptr(), dw.ptr(), 1e-6f, rows, n, dy.ptr(), nullptr), cudaSuccess);
    auto y = dy.download();
    // Float32 sums in another order than the CPU's 8 lanes + double: a few ulp.
    EXPECT_CLOSE(y, ref, 2e-6);
  }
}

// --- rope -------------------------------------------------------------------------------------

TEST(CudaRope, MatchesCpuWithPositionsFromDeviceMemory) {
  KTUNE_REQUIRE_GPU();
  Rng rng;
  SCOPED_TRACE(rng.trace());
  for (int64_t hd : {128, 64}) {
    const int64_t rows = 4, heads = 8;
    const std::vector<int32_t> pos = {0, 1, rng.uniform_int(2, 5000),
                                      rng.uniform_int(30000, 40000)};
    auto v = rng.normal(rows * heads * hd);
    const auto inv = rope_inv_freq(1e6f, hd);
    std::vector<float> ref = v;
    std::vector<float> cs(hd);
    for (int64_t r = 0; r < rows; ++r) {
      cpu_ops::rope_table(pos[r], inv.data(), hd, cs.data());
      for (int64_t h = 0; h < heads; ++h)
        cpu_ops::rope_neox(&ref[(r * heads + h) * hd], cs.data(), hd);
    }
    Dev<float> dv(v), dinv(inv);
    Dev<int32_t> dpos(pos);
    ASSERT_EQ(launch_rope_neox(dv.ptr(), dpos.ptr(), dinv.ptr(), rows, heads, hd, nullptr),
              cudaSuccess);
    auto out = dv.download();
    int64_t identical = 0;
    for (size_t i = 0; i < out.size(); ++i) identical += std::memcmp(&out[i], &ref[i], 4) == 0;
    std::printf("    hd %lld: %lld of %zu values bit-identical to the CPU\n",
                static_cast<long long>(hd), static_cast<long long>(identical), out.size());
    // Same float angle, double trig rounded to float, unfused rotation: expected identical up to
    // a rare 1-ulp cos/sin difference.
    EXPECT_CLOSE(out, ref, 1e-6);
  }
}

// --- matvec -----------------------------------------------------------------------------------

std::vector<uint8_t> quantize_matrix(QuantType t, const std::vector<float>& w, int64_t rows,
                                     int64_t cols) {
  const int64_t rb = row_bytes(t, cols);
  std::vector<uint8_t> q(static_cast<size_t>(rows * rb));
  for (int64_t r = 0; r < rows; ++r) quantize_row(t, &w[r * cols], &q[r * rb], cols);
  return q;
}

std::vector<double> matvec_ref(QuantType t, const std::vector<uint8_t>& q,
                               const std::vector<float>& x, int64_t rows, int64_t cols) {
  const int64_t rb = row_bytes(t, cols);
  std::vector<float> row(cols);
  std::vector<double> y(rows);
  for (int64_t r = 0; r < rows; ++r) {
    dequantize_row(t, &q[r * rb], row.data(), cols);
    double s = 0;
    for (int64_t c = 0; c < cols; ++c) s += static_cast<double>(row[c]) * x[c];
    y[r] = s;
  }
  return y;
}

// Runs one matvec with the weights at byte offset `offset` of their buffer (2 forces the
// unaligned path); variant -1 = launch_matvec, else launch_*_variant(rows_per_warp=variant).
std::vector<float> run_matvec(QuantType t, const std::vector<uint8_t>& q,
                              const std::vector<float>& x, int64_t rows, int64_t cols, int offset,
                              int variant) {
  DeviceBuffer dw(q.size() + 16);
  uint8_t* wp = dw.as<uint8_t>() + offset;
  KTUNE_CUDA_CHECK(cudaMemcpy(wp, q.data(), q.size(), cudaMemcpyHostToDevice));
  Dev<float> dx(x), dy(rows);
  dy.poison();
  cudaError_t err;
  if (variant < 0) {
    err = launch_matvec(t, wp, dx.ptr(), rows, cols, dy.ptr(), nullptr);
  } else if (t == QuantType::Q4_0) {
    err = launch_matvec_q4_0_variant(wp, dx.ptr(), rows, cols, dy.ptr(), variant, nullptr);
  } else {
    err = launch_matvec_q8_0_variant(wp, dx.ptr(), rows, cols, dy.ptr(), variant, nullptr);
  }
  KTUNE_CUDA_CHECK(err);
  return dy.download();
}

void check_matvec(QuantType t) {
  Rng rng;
  SCOPED_TRACE(rng.trace());
  struct Shape {
    int64_t rows, cols;
  };
  // Real widths (2048 hidden, 768 expert ffn), an odd row count (R = 2 tail), odd block counts
  // (generic path) and a BF16 width that is not a multiple of 8.
  std::vector<Shape> shapes = {{257, 2048}, {64, 768}, {33, 96}, {5, 32 * 37}};
  if (t == QuantType::BF16) shapes.push_back({9, 100});
  for (const Shape& s : shapes) {
    SCOPED_TRACE(std::string(quant_name(t)) + " " + std::to_string(s.rows) + "x" +
                 std::to_string(s.cols));
    auto wf = rng.normal(s.rows * s.cols, 0.05f);
    auto x = rng.normal(s.cols);
    auto q = quantize_matrix(t, wf, s.rows, s.cols);
    auto ref = matvec_ref(t, q, x, s.rows, s.cols);
    // Exact products of the dequantized weights, float32 sums over <= 2048 terms: rel ~1e-6.
    for (int offset : {0, 2}) {
      auto y = run_matvec(t, q, x, s.rows, s.cols, offset, -1);
      EXPECT_CLOSE(y, ref, 1e-5);
      if (t != QuantType::BF16 && offset == 0) {
        for (int variant : {0, 1, 3}) {
          auto yv = run_matvec(t, q, x, s.rows, s.cols, 0, variant);
          EXPECT_CLOSE(yv, ref, 1e-5);
          // The byte-permute dequantization gives the very same floats as the conversions.
          if (variant == 3) EXPECT_EQ(std::memcmp(yv.data(), y.data(), y.size() * 4), 0);
        }
      }
    }
  }
}

TEST(CudaMatvec, Q4_0MatchesDequantizedReference) {
  KTUNE_REQUIRE_GPU();
  check_matvec(QuantType::Q4_0);
}
TEST(CudaMatvec, Q8_0MatchesDequantizedReference) {
  KTUNE_REQUIRE_GPU();
  check_matvec(QuantType::Q8_0);
}
TEST(CudaMatvec, BF16MatchesDequantizedReference) {
  KTUNE_REQUIRE_GPU();
  check_matvec(QuantType::BF16);
}

// --- fused matvec (decode engine) ---------------------------------------------------------------

// Three segments as one launch, with the RMSNorm prologue, the residual epilogue and the router
// tail, against float64 dots of the dequantized rows with the CPU-normalized x, and the tail
// against launch_router_topk on the kernel's own logits (bit-identical: same code, same input).
void check_matvec_fused(QuantType t, int rows_per_warp) {
  Rng rng;
  SCOPED_TRACE(rng.trace() + " " + quant_name(t) + " R " + std::to_string(rows_per_warp));
  const int64_t cols = 2048, r0 = 300, r1 = 64, r2 = 37, k = 8;
  const float eps = 1e-6f;
  auto x = rng.normal(cols);
  auto nw = rng.normal(cols, 0.2f, 1.0f);
  std::vector<float> xn(cols);
  cpu_ops::rmsnorm(x.data(), nw.data(), eps, cols, xn.data());
  std::vector<std::vector<uint8_t>> q;
  std::vector<std::vector<double>> ref;
  for (int64_t rows : {r0, r1, r2}) {
    auto wf = rng.normal(rows * cols, 0.05f);
    q.push_back(quantize_matrix(t, wf, rows, cols));
    ref.push_back(matvec_ref(t, q.back(), xn, rows, cols));
  }
  std::vector<Dev<uint8_t>> dw(3);
  for (int i = 0; i < 3; ++i) {
    dw[i] = Dev<uint8_t>(q[i].size());
    dw[i].upload(q[i]);
  }
  Dev<float> dx(x), dnw(nw), dy0(r0), dy1(r1), dy2(r2), dxn(cols), dtw(k);
  Dev<int32_t> dids(k);
  Dev<unsigned> counter(std::vector<unsigned>{0u});
  dy0.poison();
  dy1.poison();
  dy2.poison();
  dxn.poison();
  MatvecFused a;
  a.type = t;
  a.cols = cols;
  a.x = dx.ptr();
  a.norm_w = dnw.ptr();
  a.eps = eps;
  a.norm_out = dxn.ptr();
  a.seg[0] = {dw[0].ptr(), dy0.ptr(), r0};
  a.seg[1] = {dw[1].ptr(), dy1.ptr(), r1};
  a.seg[2] = {dw[2].ptr(), dy2.ptr(), r2};
  a.n_seg = 3;
  a.rows_per_warp = rows_per_warp;
  ASSERT_EQ(launch_matvec_fused(a, nullptr), cudaSuccess);
  auto y0 = dy0.download();
  EXPECT_CLOSE(y0, ref[0], 1e-5);
  auto y1 = dy1.download();
  EXPECT_CLOSE(y1, ref[1], 1e-5);
  auto y2 = dy2.download();
  EXPECT_CLOSE(y2, ref[2], 1e-5);
  auto xg = dxn.download();
  EXPECT_CLOSE(xg, xn, 1e-6);

  // Residual epilogue: segment 0 again, accumulated onto its own output: exactly 2 * dot.
  MatvecFused acc = a;
  acc.n_seg = 1;
  acc.norm_out = nullptr;
  acc.accumulate = true;
  ASSERT_EQ(launch_matvec_fused(acc, nullptr), cudaSuccess);
  auto y0b = dy0.download();
  for (int64_t i = 0; i < r0; ++i) {
    ASSERT_EQ(y0b[i], y0[i] + y0[i]) << "row " << i;
  }

  // Router tail on segment 1 (64 "experts"), twice (the counter must reset itself).
  for (int rep = 0; rep < 2; ++rep) {
    MatvecFused rt = a;
    rt.n_seg = 1;
    rt.seg[0] = {dw[1].ptr(), dy1.ptr(), r1};
    rt.topk_ids = dids.ptr();
    rt.topk_w = dtw.ptr();
    rt.topk_k = k;
    rt.topk_norm = rep == 0;
    rt.counter = counter.ptr();
    dids.poison();
    dtw.poison();
    ASSERT_EQ(launch_matvec_fused(rt, nullptr), cudaSuccess);
    auto ids = dids.download();
    auto w = dtw.download();
    Dev<int32_t> rids(k);
    Dev<float> rw(k);
    ASSERT_EQ(
        launch_router_topk(dy1.ptr(), 1, r1, k, rep == 0, rids.ptr(), rw.ptr(), nullptr, nullptr),
        cudaSuccess);
    EXPECT_EQ(ids, rids.download());
    auto wr = rw.download();
    EXPECT_EQ(std::memcmp(w.data(), wr.data(), k * 4), 0);
    EXPECT_EQ(counter.download()[0], 0u);
  }
}

TEST(CudaMatvecFused, SegmentsNormResidualRouterTail) {
  KTUNE_REQUIRE_GPU();
  for (QuantType t : {QuantType::Q4_0, QuantType::Q8_0, QuantType::BF16}) {
    for (int r : {0, 1, 2, 4}) check_matvec_fused(t, r);
  }
}

// The router tail ranks experts with the whole last block (block_router_topk) while the router
// kernel uses one warp's k rounds of arg-max: same ids and the same weight bits, also with ties
// (rows repeating every 5 experts: equal logits, lower index first) and with more experts than
// the block has threads (1000: two per thread).
TEST(CudaMatvecFused, RouterTailTiesAndManyExpertsMatchTheRouterKernel) {
  KTUNE_REQUIRE_GPU();
  Rng rng;
  SCOPED_TRACE(rng.trace());
  const int64_t cols = 256, k = 8;
  for (int64_t n : {128, 1000}) {
    for (bool ties : {true, false}) {
      SCOPED_TRACE("n " + std::to_string(n) + (ties ? " ties" : " random"));
      auto base = rng.normal(5 * cols, 0.05f);
      auto wf = ties ? std::vector<float>(n * cols) : rng.normal(n * cols, 0.05f);
      if (ties) {
        for (int64_t e = 0; e < n; ++e) {
          std::copy_n(base.begin() + (e % 5) * cols, cols, wf.begin() + e * cols);
        }
      }
      const auto q = quantize_matrix(QuantType::BF16, wf, n, cols);
      Dev<uint8_t> dw(q.size());
      dw.upload(q);
      Dev<float> dx(rng.normal(cols)), dy(n), dtw(k), rw(k);
      Dev<int32_t> dids(k), rids(k);
      Dev<unsigned> counter(std::vector<unsigned>{0u});
      for (bool norm : {true, false}) {
        MatvecFused a;
        a.type = QuantType::BF16;
        a.cols = cols;
        a.x = dx.ptr();
        a.seg[0] = {dw.ptr(), dy.ptr(), n};
        a.topk_ids = dids.ptr();
        a.topk_w = dtw.ptr();
        a.topk_k = k;
        a.topk_norm = norm;
        a.counter = counter.ptr();
        dids.poison();
        dtw.poison();
        ASSERT_EQ(launch_matvec_fused(a, nullptr), cudaSuccess);
        ASSERT_EQ(launch_router_topk(dy.ptr(), 1, n, k, norm, rids.ptr(), rw.ptr(), nullptr,
                                     nullptr),
                  cudaSuccess);
        const auto ids = dids.download(), ref_ids = rids.download();
        EXPECT_EQ(ids, ref_ids);
        const auto w = dtw.download(), ref_w = rw.download();
        EXPECT_EQ(std::memcmp(w.data(), ref_w.data(), k * 4), 0);
        if (ties) {
          // The largest logit repeats every 5 experts: the k lowest indices of its class win.
          const auto y = dy.download();
          const int64_t best = std::max_element(y.begin(), y.begin() + 5) - y.begin();
          for (int64_t j = 0; j < k; ++j) EXPECT_EQ(ids[j], best + 5 * j);
        }
      }
    }
  }
}

// Greedy tail (argmax over the outputs, then the end-of-step advance) in the same launch, on a
// stream (programmatic dependent launch active), twice in a row: the key and the counter reset
// themselves and the position advances twice. Against the reference argmax of the kernel's own
// outputs (ties: lowest index; NaN never wins; all NaN: -1) and the float64 dots.
struct GreedyRun {
  std::vector<float> y;
  int32_t token = 0, pos = 0;
  std::vector<int32_t> history;
};

GreedyRun run_greedy(QuantType t, const std::vector<uint8_t>& q, const std::vector<float>& x,
                     int64_t rows, int64_t cols, int32_t pos0) {
  Stream s;
  Dev<uint8_t> dw(q);
  Dev<float> dx(x), dy(rows);
  Dev<unsigned long long> key(std::vector<unsigned long long>{0ull});
  Dev<unsigned> counter(std::vector<unsigned>{0u});
  Dev<int32_t> tok(1), pos(std::vector<int32_t>{pos0}), hist(8);
  dy.poison();
  tok.poison();
  hist.poison();
  MatvecFused a;
  a.type = t;
  a.cols = cols;
  a.x = dx.ptr();
  a.seg[0] = {dw.ptr(), dy.ptr(), rows};
  a.argmax_key = key.ptr();
  a.counter = counter.ptr();
  a.argmax_out = tok.ptr();
  a.advance_pos = pos.ptr();
  a.advance_history = hist.ptr();
  a.advance_len = 8;
  for (int rep = 0; rep < 2; ++rep) KTUNE_CUDA_CHECK(launch_matvec_fused(a, s));
  s.synchronize();
  EXPECT_EQ(key.download()[0], 0ull);
  EXPECT_EQ(counter.download()[0], 0u);
  return {dy.download(), tok.download()[0], pos.download()[0], hist.download()};
}

int32_t argmax_ref(const std::vector<float>& y) {
  int32_t best = -1;
  for (size_t i = 0; i < y.size(); ++i) {
    if (!std::isnan(y[i]) && (best < 0 || y[i] > y[best])) best = static_cast<int32_t>(i);
  }
  return best;
}

TEST(CudaMatvecFused, GreedyTailArgmaxAndAdvance) {
  KTUNE_REQUIRE_GPU();
  Rng rng;
  SCOPED_TRACE(rng.trace());
  // 20000 x 2048: ~150 rows of 1-2 KB per block, several 32 KB tiles through the ring.
  for (QuantType t : {QuantType::Q4_0, QuantType::Q8_0, QuantType::BF16}) {
    SCOPED_TRACE(quant_name(t));
    const int64_t rows = 20000, cols = 2048;
    auto wf = rng.normal(rows * cols, 0.05f);
    auto x = rng.normal(cols);
    float xmax = 0;
    for (float v : x) xmax = std::max(xmax, std::fabs(v));
    // Rows a < b get the same weights, aligned with x: the two largest outputs, a tie.
    const int a = rng.uniform_int(0, 9000), b = rng.uniform_int(11000, static_cast<int>(rows) - 1);
    for (int64_t c = 0; c < cols; ++c) wf[a * cols + c] = wf[b * cols + c] = 0.1f * x[c] / xmax;
    auto q = quantize_matrix(t, wf, rows, cols);
    auto ref = matvec_ref(t, q, x, rows, cols);
    for (int32_t pos0 : {3, 7, 8}) {
      SCOPED_TRACE("pos " + std::to_string(pos0));
      const GreedyRun g = run_greedy(t, q, x, rows, cols, pos0);
      EXPECT_CLOSE(g.y, ref, 1e-5);
      EXPECT_EQ(g.y[a], g.y[b]);
      EXPECT_EQ(argmax_ref(g.y), a);
      EXPECT_EQ(g.token, a);
      EXPECT_EQ(g.pos, pos0 + 2);
      for (int32_t i = 0; i < 8; ++i) {
        EXPECT_EQ(g.history[i], i == pos0 || i == pos0 + 1 ? a : -1) << "history " << i;
      }
      if (t != QuantType::Q4_0) break;  // positions once are enough
    }
  }
  // NaN rows (an fp16 NaN scale) never win; all NaN gives -1.
  const int64_t rows = 64, cols = 256;
  auto wf = rng.normal(rows * cols, 0.05f);
  auto x = rng.normal(cols);
  auto q = quantize_matrix(QuantType::Q8_0, wf, rows, cols);
  const int64_t rb = row_bytes(QuantType::Q8_0, cols);
  auto nan_row = [&](std::vector<uint8_t>& m, int64_t r) {
    m[r * rb] = 0x00;
    m[r * rb + 1] = 0x7E;
  };
  std::vector<uint8_t> q1 = q;
  for (int64_t r = 0; r < rows; r += 3) nan_row(q1, r);
  GreedyRun g = run_greedy(QuantType::Q8_0, q1, x, rows, cols, 0);
  EXPECT_TRUE(std::isnan(g.y[0]));
  EXPECT_EQ(g.token, argmax_ref(g.y));
  EXPECT_GE(g.token, 0);
  for (int64_t r = 0; r < rows; ++r) nan_row(q1, r);
  g = run_greedy(QuantType::Q8_0, q1, x, rows, cols, 0);
  EXPECT_EQ(g.token, -1);
  EXPECT_EQ(g.history[0], -1);
  EXPECT_EQ(g.pos, 2);
}

// --- router -----------------------------------------------------------------------------------

void check_router(const std::vector<float>& logits, int64_t tokens, int64_t n, int64_t k,
                  bool norm) {
  std::vector<int32_t> ref_ids(tokens * k);
  std::vector<float> ref_w(tokens * k), ref_p(tokens * n);
  for (int64_t t = 0; t < tokens; ++t) {
    cpu_ops::route_topk(&logits[t * n], n, k, norm, &ref_p[t * n], &ref_ids[t * k], &ref_w[t * k]);
  }
  Dev<float> dl(logits), dw(tokens * k), dp(tokens * n);
  Dev<int32_t> di(tokens * k);
  dw.poison();
  dp.poison();
  di.poison();
  ASSERT_EQ(launch_router_topk(dl.ptr(), tokens, n, k, norm, di.ptr(), dw.ptr(), dp.ptr(), nullptr),
            cudaSuccess);
  auto ids = di.download();
  auto w = dw.download();
  auto p = dp.download();
  EXPECT_EQ(ids, ref_ids);
  // expf vs the CPU's exp and a double sum: a few ulp.
  EXPECT_CLOSE(w, ref_w, 1e-5);
  EXPECT_CLOSE(p, ref_p, 1e-5);
}

TEST(CudaRouterTopk, MatchesCpu) {
  KTUNE_REQUIRE_GPU();
  Rng rng;
  SCOPED_TRACE(rng.trace());
  for (int64_t n : {128, 256, 60}) {
    for (bool norm : {true, false}) {
      SCOPED_TRACE("n " + std::to_string(n) + (norm ? " norm" : ""));
      const int64_t tokens = 7, k = n == 60 ? 4 : 8;
      check_router(rng.normal(tokens * n, 2.0f), tokens, n, k, norm);
    }
  }
}

TEST(CudaRouterTopk, TiesGoToLowerIndex) {
  KTUNE_REQUIRE_GPU();
  const int64_t n = 128, k = 8;
  std::vector<float> logits(2 * n, 0.5f);  // token 0: all equal -> experts 0..7
  for (int64_t e = 0; e < n; ++e) logits[n + e] = static_cast<float>(e % 5);  // token 1: ties at 4
  check_router(logits, 2, n, k, true);
  Dev<float> dl(logits), dw(2 * k);
  Dev<int32_t> di(2 * k);
  ASSERT_EQ(launch_router_topk(dl.ptr(), 2, n, k, true, di.ptr(), dw.ptr(), nullptr, nullptr),
            cudaSuccess);
  auto ids = di.download();
  for (int j = 0; j < k; ++j) EXPECT_EQ(ids[j], j);
  for (int j = 0; j < k; ++j) EXPECT_EQ(ids[k + j], 4 + 5 * j);
}

// --- argmax -----------------------------------------------------------------------------------

TEST(CudaArgmax, GreedyTokenLowestIndexOnTies) {
  KTUNE_REQUIRE_GPU();
  Rng rng;
  SCOPED_TRACE(rng.trace());
  const int64_t n = 151936, rows = 4;
  auto l = rng.normal(rows * n, 3.0f);
  // Row 1: a tie for the maximum; row 2: NaNs around; row 3: the maximum at the last index.
  const int a = rng.uniform_int(0, 70000), b = rng.uniform_int(80000, static_cast<int>(n) - 1);
  l[n + a] = 100.0f;
  l[n + b] = 100.0f;
  l[2 * n + 5] = std::nanf("");
  l[2 * n + 6] = 50.0f;
  l[3 * n + n - 1] = 100.0f;
  std::vector<int32_t> ref(rows);
  for (int64_t r = 0; r < rows; ++r) {
    int64_t best = -1;
    for (int64_t i = 0; i < n; ++i) {
      const float v = l[r * n + i];
      if (!std::isnan(v) && (best < 0 || v > l[r * n + best])) best = i;
    }
    ref[r] = static_cast<int32_t>(best);
  }
  EXPECT_EQ(ref[1], a);
  Dev<float> dl(l);
  Dev<int32_t> dout(rows);
  dout.poison();
  ASSERT_EQ(launch_argmax(dl.ptr(), rows, n, dout.ptr(), nullptr), cudaSuccess);
  EXPECT_EQ(dout.download(), ref);
}

// --- embedding --------------------------------------------------------------------------------

TEST(CudaEmbedding, DequantizesTheTokenRowOfEveryType) {
  KTUNE_REQUIRE_GPU();
  Rng rng;
  SCOPED_TRACE(rng.trace());
  const int64_t vocab = 50, n_embd = 256;
  const std::vector<int32_t> tokens = {3, 49, 0, 3, rng.uniform_int(0, 49)};
  const int64_t nt = static_cast<int64_t>(tokens.size());
  for (QuantType t :
       {QuantType::F32, QuantType::F16, QuantType::BF16, QuantType::Q8_0, QuantType::Q4_0}) {
    SCOPED_TRACE(quant_name(t));
    auto wf = rng.normal(vocab * n_embd, 0.1f);
    auto q = quantize_matrix(t, wf, vocab, n_embd);
    std::vector<float> ref(nt * n_embd);
    for (int64_t i = 0; i < nt; ++i) {
      dequantize_row(t, &q[tokens[i] * row_bytes(t, n_embd)], &ref[i * n_embd], n_embd);
    }
    DeviceBuffer dq(q.size());
    KTUNE_CUDA_CHECK(cudaMemcpy(dq.data(), q.data(), q.size(), cudaMemcpyHostToDevice));
    Dev<int32_t> dt(tokens);
    Dev<float> dout(nt * n_embd);
    dout.poison();
    ASSERT_EQ(launch_embedding(t, dq.data(), vocab, n_embd, dt.ptr(), nt, dout.ptr(), nullptr),
              cudaSuccess);
    auto out = dout.download();
    // Same single rounding of d * q as dequantize_row: exact.
    EXPECT_EQ(std::memcmp(out.data(), ref.data(), ref.size() * 4), 0);
    EXPECT_CLOSE(out, ref, 0.0);
  }
}

// --- attention --------------------------------------------------------------------------------

struct AttnCase {
  int64_t n_heads, n_kv, hd, max_ctx;
};

// Float64 reference over the fp16 cache values (positions < pos) plus k_new/v_new in float32.
std::vector<double> attention_ref(const AttnCase& c, const std::vector<float>& q,
                                  const std::vector<float>& kn, const std::vector<float>& vn,
                                  const std::vector<uint16_t>& kc, const std::vector<uint16_t>& vc,
                                  int pos) {
  const int64_t group = c.n_heads / c.n_kv, hd = c.hd;
  std::vector<double> out(c.n_heads * hd, 0.0), s(pos + 1);
  for (int64_t h = 0; h < c.n_heads; ++h) {
    const int64_t kvh = h / group;
    auto kval = [&](int p, int64_t d) {
      return p == pos ? static_cast<double>(kn[kvh * hd + d])
                      : static_cast<double>(fp16_to_fp32(kc[(kvh * c.max_ctx + p) * hd + d]));
    };
    auto vval = [&](int p, int64_t d) {
      return p == pos ? static_cast<double>(vn[kvh * hd + d])
                      : static_cast<double>(fp16_to_fp32(vc[(kvh * c.max_ctx + p) * hd + d]));
    };
    double mx = -INFINITY;
    for (int p = 0; p <= pos; ++p) {
      double d0 = 0;
      for (int64_t d = 0; d < hd; ++d) d0 += q[h * hd + d] * kval(p, d);
      s[p] = d0 / std::sqrt(static_cast<double>(hd));
      mx = std::max(mx, s[p]);
    }
    double sum = 0;
    for (int p = 0; p <= pos; ++p) sum += (s[p] = std::exp(s[p] - mx));
    for (int p = 0; p <= pos; ++p) {
      for (int64_t d = 0; d < hd; ++d) out[h * hd + d] += s[p] / sum * vval(p, d);
    }
  }
  return out;
}

TEST(CudaAttentionDecode, MatchesReferenceAndStoresTheNewToken) {
  KTUNE_REQUIRE_GPU();
  Rng rng;
  SCOPED_TRACE(rng.trace());
  for (const AttnCase& c :
       {AttnCase{32, 4, 128, 1024}, AttnCase{4, 1, 64, 300}, AttnCase{8, 8, 256, 520}}) {
    const int64_t hd = c.hd;
    const int64_t cache_n = c.n_kv * c.max_ctx * hd;
    std::vector<int> positions = {0,
                                  1,
                                  255,
                                  256,
                                  static_cast<int>(c.max_ctx) - 1,
                                  rng.uniform_int(2, static_cast<int>(c.max_ctx) - 2)};
    DeviceBuffer ws(attention_decode_workspace_bytes(c.n_heads, hd, c.max_ctx));
    for (int pos : positions) {
      if (pos >= c.max_ctx) continue;
      SCOPED_TRACE("heads " + std::to_string(c.n_heads) + "/" + std::to_string(c.n_kv) + " hd " +
                   std::to_string(hd) + " pos " + std::to_string(pos));
      // Cache: random fp16 before pos, NaN at and after it (must never be read).
      std::vector<uint16_t> kc(cache_n, 0x7E00), vc(cache_n, 0x7E00);
      for (int64_t kvh = 0; kvh < c.n_kv; ++kvh) {
        auto kr = rng.normal(pos * hd), vr = rng.normal(pos * hd);
        for (int64_t i = 0; i < pos * hd; ++i) {
          kc[kvh * c.max_ctx * hd + i] = fp32_to_fp16(kr[i]);
          vc[kvh * c.max_ctx * hd + i] = fp32_to_fp16(vr[i]);
        }
      }
      auto q = rng.normal(c.n_heads * hd), kn = rng.normal(c.n_kv * hd),
           vn = rng.normal(c.n_kv * hd);
      auto ref = attention_ref(c, q, kn, vn, kc, vc, pos);
      Dev<float> dq(q), dkn(kn), dvn(vn), dout(c.n_heads * hd);
      Dev<uint16_t> dkc(kc), dvc(vc);
      Dev<int32_t> dpos(std::vector<int32_t>{pos});
      dout.poison();
      ASSERT_EQ(
          launch_attention_decode(dq.ptr(), dkn.ptr(), dvn.ptr(), dkc.ptr(), dvc.ptr(), dpos.ptr(),
                                  c.n_heads, c.n_kv, hd, c.max_ctx, ws.data(), dout.ptr(), nullptr),
          cudaSuccess);
      auto out = dout.download();
      // Float32 dots of 128 terms, expf, split combine: rel ~1e-6.
      EXPECT_CLOSE(out, ref, 1e-5);
      auto kc2 = dkc.download(), vc2 = dvc.download();
      for (int64_t kvh = 0; kvh < c.n_kv; ++kvh) {
        for (int64_t d = 0; d < hd; ++d) {
          const int64_t at = (kvh * c.max_ctx + pos) * hd + d;
          ASSERT_EQ(kc2[at], fp32_to_fp16(kn[kvh * hd + d]));
          ASSERT_EQ(vc2[at], fp32_to_fp16(vn[kvh * hd + d]));
          kc2[at] = kc[at];
          vc2[at] = vc[at];
        }
      }
      EXPECT_TRUE(kc2 == kc && vc2 == vc) << "cache changed outside position pos";
    }
  }
}

// The decode engine's attention (q/k head RMSNorm and RoPE folded in; one cluster launch per
// layer on sm_90), on a stream, against CPU rmsnorm + rope_table/rope_neox + the float64
// attention, at positions on both sides of the 64-position chunks and of the 512 positions one
// pass of a cluster covers; group sizes 8, 4, 16 and 1. Twice per case: bit-identical.
TEST(CudaAttentionDecode, QkNormRopeMatchesReference) {
  KTUNE_REQUIRE_GPU();
  Rng rng;
  SCOPED_TRACE(rng.trace());
  const float eps = 1e-6f;
  for (const AttnCase& c : {AttnCase{32, 4, 128, 1100}, AttnCase{4, 1, 64, 300},
                            AttnCase{16, 1, 256, 700}, AttnCase{8, 8, 128, 200}}) {
    const int64_t hd = c.hd;
    const int64_t cache_n = c.n_kv * c.max_ctx * hd;
    const auto inv = rope_inv_freq(1e6f, hd);
    const auto qw = rng.normal(hd, 0.2f, 1.0f), kw = rng.normal(hd, 0.2f, 1.0f);
    Dev<float> dinv(inv), dqw(qw), dkw(kw);
    DeviceBuffer ws(attention_decode_workspace_bytes(c.n_heads, hd, c.max_ctx));
    Stream s;
    for (int pos : {0, 1, 63, 64, 65, 511, 512, 513, 1030, static_cast<int>(c.max_ctx) - 1,
                    rng.uniform_int(2, static_cast<int>(c.max_ctx) - 2)}) {
      if (pos >= c.max_ctx) continue;
      SCOPED_TRACE("heads " + std::to_string(c.n_heads) + "/" + std::to_string(c.n_kv) + " hd " +
                   std::to_string(hd) + " pos " + std::to_string(pos));
      std::vector<uint16_t> kc(cache_n, 0x7E00), vc(cache_n, 0x7E00);  // NaN from pos on
      for (int64_t kvh = 0; kvh < c.n_kv; ++kvh) {
        auto kr = rng.normal(pos * hd), vr = rng.normal(pos * hd);
        for (int64_t i = 0; i < pos * hd; ++i) {
          kc[kvh * c.max_ctx * hd + i] = fp32_to_fp16(kr[i]);
          vc[kvh * c.max_ctx * hd + i] = fp32_to_fp16(vr[i]);
        }
      }
      auto q = rng.normal(c.n_heads * hd, 2.0f), k = rng.normal(c.n_kv * hd, 2.0f),
           vn = rng.normal(c.n_kv * hd);
      std::vector<float> qn(q.size()), kn(k.size()), cs(hd);
      cpu_ops::rope_table(pos, inv.data(), hd, cs.data());
      for (int64_t h = 0; h < c.n_heads; ++h) {
        cpu_ops::rmsnorm(&q[h * hd], qw.data(), eps, hd, &qn[h * hd]);
        cpu_ops::rope_neox(&qn[h * hd], cs.data(), hd);
      }
      for (int64_t h = 0; h < c.n_kv; ++h) {
        cpu_ops::rmsnorm(&k[h * hd], kw.data(), eps, hd, &kn[h * hd]);
        cpu_ops::rope_neox(&kn[h * hd], cs.data(), hd);
      }
      auto ref = attention_ref(c, qn, kn, vn, kc, vc, pos);
      Dev<float> dq(q), dk(k), dvn(vn), dout(c.n_heads * hd);
      Dev<uint16_t> dkc(kc), dvc(vc);
      Dev<int32_t> dpos(std::vector<int32_t>{pos});
      std::vector<float> first;
      for (int run = 0; run < 2; ++run) {
        dout.poison();
        ASSERT_EQ(launch_attention_decode_qknorm_rope(dq.ptr(), dk.ptr(), dvn.ptr(), dqw.ptr(),
                                                      dkw.ptr(), eps, dinv.ptr(), dkc.ptr(),
                                                      dvc.ptr(), dpos.ptr(), c.n_heads, c.n_kv, hd,
                                                      c.max_ctx, ws.data(), dout.ptr(), s),
                  cudaSuccess);
        s.synchronize();
        auto out = dout.download();
        if (run == 0) {
          // Head norms summed in another order than the CPU's: a few ulp more than the plain
          // attention's 1e-5.
          EXPECT_CLOSE(out, ref, 2e-5);
          first = out;
        } else {
          EXPECT_EQ(std::memcmp(first.data(), out.data(), out.size() * 4), 0) << "run to run";
        }
      }
      auto kc2 = dkc.download(), vc2 = dvc.download();
      for (int64_t kvh = 0; kvh < c.n_kv; ++kvh) {
        for (int64_t d = 0; d < hd; ++d) {
          const int64_t at = (kvh * c.max_ctx + pos) * hd + d;
          const float want = kn[kvh * hd + d];
          // The normalized key may differ from the CPU's by an ulp before rounding to fp16.
          ASSERT_NEAR(fp16_to_fp32(kc2[at]), want, 1e-3f * std::max(1.0f, std::fabs(want)));
          ASSERT_EQ(vc2[at], fp32_to_fp16(vn[kvh * hd + d]));
          kc2[at] = kc[at];
          vc2[at] = vc[at];
        }
      }
      EXPECT_TRUE(kc2 == kc && vc2 == vc) << "cache changed outside position pos";
    }
  }
}

// --- fused MoE at the engine's shapes ----------------------------------------------------------

// The staged MoE kernels (16-byte rows through cp.async, several gate/up tiles per block, the
// down kernel's copies before its wait) at qwen3-30b-a3b's widths, on a stream: against the
// unfused launches (bit-identical: same row dots, same combine order) and float64; then with a
// slot map (the even experts here, compacted) against unfused over those experts only.
void check_moe_staged(QuantType t, bool with_map) {
  Rng rng;
  SCOPED_TRACE(rng.trace() + " " + quant_name(t) + (with_map ? " slot map" : ""));
  const int64_t hidden = 2048, ffn = 768, n_exp = 10, k = 8;
  const int64_t grb = row_bytes(t, hidden), drb = row_bytes(t, ffn);
  const int64_t gbytes = ffn * grb, dbytes = hidden * drb;
  auto gq = quantize_matrix(t, rng.normal(n_exp * ffn * hidden, 0.05f), n_exp * ffn, hidden);
  auto uq = quantize_matrix(t, rng.normal(n_exp * ffn * hidden, 0.05f), n_exp * ffn, hidden);
  auto dq = quantize_matrix(t, rng.normal(n_exp * hidden * ffn, 0.05f), n_exp * hidden, ffn);
  std::vector<int32_t> all(n_exp);
  for (int64_t e = 0; e < n_exp; ++e) all[e] = static_cast<int32_t>(e);
  std::shuffle(all.begin(), all.end(), rng.gen);
  std::vector<int32_t> ids(all.begin(), all.begin() + k);
  std::sort(ids.begin(), ids.end());
  std::vector<float> wts(k);
  for (auto& w : wts) w = 0.05f + 0.2f * static_cast<float>(rng.uniform_int(0, 1000)) / 1000.0f;
  const auto x = rng.normal(hidden), resid = rng.normal(hidden);
  // Experts on this device: all, or the even ids compacted (slot = id / 2).
  std::vector<int32_t> slot(n_exp);
  for (int64_t e = 0; e < n_exp; ++e) slot[e] = with_map ? (e % 2 == 0 ? e / 2 : -1) : e;
  auto here = [&](int32_t id) { return slot[id] >= 0; };
  auto compact = [&](const std::vector<uint8_t>& m, int64_t eb) {
    if (!with_map) return m;
    std::vector<uint8_t> c;
    for (int64_t e = 0; e < n_exp; e += 2)
      c.insert(c.end(), m.begin() + e * eb, m.begin() + (e + 1) * eb);
    return c;
  };
  Dev<uint8_t> dg(compact(gq, gbytes)), du(compact(uq, gbytes)), dd(compact(dq, dbytes));
  Dev<int32_t> did(ids), dslot(slot);
  Dev<float> dw(wts), dx(x), dres(resid), dres2(resid), dact(k * ffn), dact2(k * ffn), dg1(ffn),
      du1(ffn), dy(hidden), dacc(std::vector<float>(hidden, 0.0f));
  dact.poison();
  Stream s;
  const int32_t* map = with_map ? dslot.ptr() : nullptr;
  ASSERT_EQ(launch_moe_gate_up_swiglu(t, dg.ptr(), du.ptr(), gbytes, did.ptr(), k, n_exp, dx.ptr(),
                                      ffn, hidden, dact.ptr(), s, map),
            cudaSuccess);
  ASSERT_EQ(launch_moe_down_sum(t, dd.ptr(), dbytes, did.ptr(), dw.ptr(), k, n_exp, dact.ptr(),
                                hidden, ffn, dres.ptr(), s, map),
            cudaSuccess);
  s.synchronize();
  // Unfused: per expert here, in slot order.
  std::vector<float> act2(k * ffn, 0.0f);
  for (int64_t j = 0; j < k; ++j) {
    if (!here(ids[j])) continue;
    const int64_t sl = slot[ids[j]];
    ASSERT_EQ(
        launch_matvec_rowwarp(t, dg.ptr() + sl * gbytes, dx.ptr(), ffn, hidden, dg1.ptr(), nullptr),
        cudaSuccess);
    ASSERT_EQ(
        launch_matvec_rowwarp(t, du.ptr() + sl * gbytes, dx.ptr(), ffn, hidden, du1.ptr(), nullptr),
        cudaSuccess);
    ASSERT_EQ(launch_swiglu(dg1.ptr(), du1.ptr(), ffn, dact2.ptr() + j * ffn, nullptr),
              cudaSuccess);
    ASSERT_EQ(launch_matvec_rowwarp(t, dd.ptr() + sl * dbytes, dact2.ptr() + j * ffn, hidden, ffn,
                                    dy.ptr(), nullptr),
              cudaSuccess);
    ASSERT_EQ(launch_axpy_accumulate(wts[j], dy.ptr(), hidden, dacc.ptr(), nullptr), cudaSuccess);
    auto a = dact2.download();
    std::copy(a.begin() + j * ffn, a.begin() + (j + 1) * ffn, act2.begin() + j * ffn);
  }
  ASSERT_EQ(launch_add_inplace(dres2.ptr(), dacc.ptr(), hidden, nullptr), cudaSuccess);
  const auto act = dact.download(), out = dres.download(), out2 = dres2.download();
  EXPECT_EQ(std::memcmp(act.data(), act2.data(), act.size() * 4), 0) << "act fused vs unfused";
  EXPECT_EQ(std::memcmp(out.data(), out2.data(), out.size() * 4), 0) << "out fused vs unfused";
  // float64 reference of the experts here.
  std::vector<float> gf(hidden), uf(hidden), df(ffn);
  std::vector<double> ref(resid.begin(), resid.end()), aref(k * ffn, 0.0);
  for (int64_t j = 0; j < k; ++j) {
    if (!here(ids[j])) continue;
    for (int64_t r = 0; r < ffn; ++r) {
      dequantize_row(t, &gq[(ids[j] * ffn + r) * grb], gf.data(), hidden);
      dequantize_row(t, &uq[(ids[j] * ffn + r) * grb], uf.data(), hidden);
      double g = 0, u = 0;
      for (int64_t c = 0; c < hidden; ++c) {
        g += double(gf[c]) * x[c];
        u += double(uf[c]) * x[c];
      }
      aref[j * ffn + r] = g / (1.0 + std::exp(-g)) * u;
    }
    for (int64_t r = 0; r < hidden; ++r) {
      dequantize_row(t, &dq[(ids[j] * hidden + r) * drb], df.data(), ffn);
      double d = 0;
      for (int64_t c = 0; c < ffn; ++c) d += double(df[c]) * aref[j * ffn + c];
      ref[r] += wts[j] * d;
    }
  }
  EXPECT_CLOSE(act, aref, 1e-5);
  EXPECT_CLOSE(out, ref, 1e-5);
}

TEST(CudaMoeStaged, EngineShapesMatchUnfusedAndReference) {
  KTUNE_REQUIRE_GPU();
  for (QuantType t : {QuantType::Q4_0, QuantType::Q8_0}) {
    for (bool map : {false, true}) check_moe_staged(t, map);
  }
}

// --- determinism and graph replay -------------------------------------------------------------

TEST(CudaDeterminism, TwoRunsAreBitIdentical) {
  KTUNE_REQUIRE_GPU();
  Rng rng;
  SCOPED_TRACE(rng.trace());
  const int64_t rows = 512, cols = 2048;
  auto wf = rng.normal(rows * cols, 0.05f);
  auto x = rng.normal(cols);
  for (QuantType t : {QuantType::Q4_0, QuantType::Q8_0, QuantType::BF16}) {
    auto q = quantize_matrix(t, wf, rows, cols);
    auto a = run_matvec(t, q, x, rows, cols, 0, -1);
    auto b = run_matvec(t, q, x, rows, cols, 0, -1);
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0) << quant_name(t);
  }
  // Attention with 4 splits and the router.
  const AttnCase c{32, 4, 128, 1024};
  const int pos = 900;
  std::vector<uint16_t> kc(c.n_kv * c.max_ctx * c.hd), vc(kc.size());
  auto kr = rng.normal(kc.size()), vr = rng.normal(vc.size());
  for (size_t i = 0; i < kc.size(); ++i) {
    kc[i] = fp32_to_fp16(kr[i]);
    vc[i] = fp32_to_fp16(vr[i]);
  }
  Dev<float> dq(rng.normal(c.n_heads * c.hd)), dkn(rng.normal(c.n_kv * c.hd)),
      dvn(rng.normal(c.n_kv * c.hd)), dout(c.n_heads * c.hd);
  Dev<uint16_t> dkc(kc), dvc(vc);
  Dev<int32_t> dpos(std::vector<int32_t>{pos});
  DeviceBuffer ws(attention_decode_workspace_bytes(c.n_heads, c.hd, c.max_ctx));
  std::vector<float> first;
  for (int run = 0; run < 2; ++run) {
    dout.poison();
    KTUNE_CUDA_CHECK(launch_attention_decode(dq.ptr(), dkn.ptr(), dvn.ptr(), dkc.ptr(), dvc.ptr(),
                                             dpos.ptr(), c.n_heads, c.n_kv, c.hd, c.max_ctx,
                                             ws.data(), dout.ptr(), nullptr));
    auto o = dout.download();
    if (run == 0)
      first = o;
    else
      EXPECT_EQ(std::memcmp(first.data(), o.data(), o.size() * 4), 0) << "attention";
  }
  Dev<float> dl(rng.normal(16 * 128, 2.0f)), dw(16 * 8);
  Dev<int32_t> di(16 * 8);
  std::vector<float> w0;
  for (int run = 0; run < 2; ++run) {
    KTUNE_CUDA_CHECK(
        launch_router_topk(dl.ptr(), 16, 128, 8, true, di.ptr(), dw.ptr(), nullptr, nullptr));
    auto w = dw.download();
    if (run == 0)
      w0 = w;
    else
      EXPECT_EQ(std::memcmp(w0.data(), w.data(), w.size() * 4), 0) << "router";
  }
}

// A captured graph replays with the position it finds in device memory at replay time.
TEST(CudaGraph, RopeReplayReadsThePositionFromDeviceMemory) {
  KTUNE_REQUIRE_GPU();
  Rng rng;
  SCOPED_TRACE(rng.trace());
  const int64_t heads = 4, hd = 128;
  auto v = rng.normal(heads * hd);
  const auto inv = rope_inv_freq(1e6f, hd);
  Dev<float> dv(heads * hd), dsrc(v), dinv(inv);
  Dev<int32_t> dpos(std::vector<int32_t>{0});
  Stream s;
  cudaGraph_t graph = nullptr;
  KTUNE_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  KTUNE_CUDA_CHECK(
      cudaMemcpyAsync(dv.ptr(), dsrc.ptr(), v.size() * 4, cudaMemcpyDeviceToDevice, s));
  KTUNE_CUDA_CHECK(launch_rope_neox(dv.ptr(), dpos.ptr(), dinv.ptr(), 1, heads, hd, s));
  KTUNE_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
  cudaGraphExec_t exec = nullptr;
  KTUNE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int32_t pos : {7, 1234}) {
    dpos.upload({pos});
    KTUNE_CUDA_CHECK(cudaGraphLaunch(exec, s));
    s.synchronize();
    std::vector<float> ref = v, cs(hd);
    cpu_ops::rope_table(pos, inv.data(), hd, cs.data());
    for (int64_t h = 0; h < heads; ++h) cpu_ops::rope_neox(&ref[h * hd], cs.data(), hd);
    auto out = dv.download();
    EXPECT_CLOSE(out, ref, 1e-6);
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}

// --- bandwidth of the decode matvec (prints; no pass/fail threshold) --------------------------
//
// Two timings per case, each behind a spin kernel so no host submission gap is counted:
//   one:  events around a single launch, median of 100;
//   b2b:  events around 100 launches queued back to back (includes the GPU's inter-kernel gap).
// hot reuses one weight copy (L2-resident when it fits the 50 MB L2); cold rotates over copies
// totalling >= 256 MB so every launch reads HBM. GB/s = (weight + x + y bytes) / time.

double median_us(std::vector<float> ms) {
  std::sort(ms.begin(), ms.end());
  return 1000.0 * ms[ms.size() / 2];
}

TEST(CudaMatvecBench, PrintsAchievedBandwidth) {
  KTUNE_REQUIRE_GPU();
  Rng rng;
  struct Case {
    QuantType t;
    int64_t rows, cols;
    int variant;
    const char* name;
  };
  const Case cases[] = {
      {QuantType::Q4_0, 6144, 2048, -1, "Q4_0 R=2 (default)"},
      {QuantType::Q4_0, 6144, 2048, 3, "Q4_0 R=2 permute"},
      {QuantType::Q4_0, 6144, 2048, 1, "Q4_0 R=1"},
      {QuantType::Q4_0, 6144, 2048, 0, "Q4_0 generic"},
      {QuantType::Q4_0, 2048, 6144, -1, "Q4_0 R=2 (default)"},
      {QuantType::Q8_0, 6144, 2048, -1, "Q8_0 R=2 (default)"},
      {QuantType::Q8_0, 6144, 2048, 3, "Q8_0 R=2 permute"},
      {QuantType::Q8_0, 6144, 2048, 1, "Q8_0 R=1"},
      {QuantType::BF16, 6144, 2048, -1, "BF16 R=2 (default)"},
  };
  std::printf("    %-19s %5s x %-5s %6s | %8s %7s | %8s %7s | %8s %7s | %8s %7s\n", "kernel",
              "rows", "cols", "MB", "hot1 us", "GB/s", "hotB us", "GB/s", "cold1 us", "GB/s",
              "coldB us", "GB/s");
  for (const Case& c : cases) {
    const int64_t rb = row_bytes(c.t, c.cols);
    const size_t wbytes = static_cast<size_t>(c.rows * rb);
    const int copies = static_cast<int>(std::max<size_t>(2, (256u << 20) / wbytes + 1));
    DeviceBuffer w(wbytes * copies);
    auto wf = rng.normal(c.rows * c.cols, 0.05f);
    auto q = quantize_matrix(c.t, wf, c.rows, c.cols);
    for (int i = 0; i < copies; ++i) {
      KTUNE_CUDA_CHECK(
          cudaMemcpy(w.as<uint8_t>() + i * wbytes, q.data(), wbytes, cudaMemcpyHostToDevice));
    }
    Dev<float> dx(rng.normal(c.cols)), dy(c.rows);
    Stream s;
    Event e0, e1;
    auto launch = [&](int i) {
      const void* wp = w.as<uint8_t>() + static_cast<size_t>(i % copies) * wbytes;
      if (c.variant < 0) {
        KTUNE_CUDA_CHECK(launch_matvec(c.t, wp, dx.ptr(), c.rows, c.cols, dy.ptr(), s));
      } else if (c.t == QuantType::Q4_0) {
        KTUNE_CUDA_CHECK(
            launch_matvec_q4_0_variant(wp, dx.ptr(), c.rows, c.cols, dy.ptr(), c.variant, s));
      } else {
        KTUNE_CUDA_CHECK(
            launch_matvec_q8_0_variant(wp, dx.ptr(), c.rows, c.cols, dy.ptr(), c.variant, s));
      }
    };
    const double bytes = static_cast<double>(wbytes) + 4.0 * (c.cols + c.rows);
    double us[4];
    int k = 0;
    for (int cold = 0; cold < 2; ++cold) {
      for (int i = 0; i < 10; ++i) launch(cold ? i : 0);
      std::vector<float> ms;
      for (int i = 0; i < 100; ++i) {
        KTUNE_CUDA_CHECK(launch_spin(20000, s));
        e0.record(s);
        launch(cold ? i + 1 : 0);
        e1.record(s);
        e1.synchronize();
        ms.push_back(e1.elapsed_ms_since(e0));
      }
      us[k++] = median_us(ms);
      KTUNE_CUDA_CHECK(launch_spin(2000000, s));
      e0.record(s);
      for (int i = 0; i < 100; ++i) launch(cold ? i + 1 : 0);
      e1.record(s);
      e1.synchronize();
      us[k++] = 1000.0 * e1.elapsed_ms_since(e0) / 100.0;
    }
    std::printf(
        "    %-19s %5lld x %-5lld %6.2f | %8.2f %7.0f | %8.2f %7.0f | %8.2f %7.0f | %8.2f %7.0f\n",
        c.name, static_cast<long long>(c.rows), static_cast<long long>(c.cols), bytes / 1e6, us[0],
        bytes / (us[0] * 1e3), us[1], bytes / (us[1] * 1e3), us[2], bytes / (us[2] * 1e3), us[3],
        bytes / (us[3] * 1e3));
  }
  std::printf("    device: %s\n", ::ktune::test::gpus().devices[0].name.c_str());
}

}  // namespace
}  // namespace ktune::cuda
