// The batched prefill kernels (prefill_kernels.h) against CPU references, on the device (ctest
// label `gpu`; skipped with query_gpus()'s reason when there is no usable GPU).
//
// Random data per run (seed from std::random_device, in SCOPED_TRACE; KTUNE_TEST_SEED=N pins
// it); outputs are poisoned with 0xFF bytes (NaN / -1) before each launch, so an element the
// kernel fails to write fails the check. References: the engine's scalar code (cpu_ops::rmsnorm,
// rope_table, rope_neox; quant.h's dequantize_row, fp16 conversions) and float64 loops.
//
// Tolerances follow the documented precision: the tensor-core matmul multiplies fp16 inputs
// exactly and accumulates in fp32, so against a float64 sum of the SAME fp16-rounded operands
// (each weight as the kernel dequantizes it: fp16(d * q), fp16(bf16), fp16(f32)) the error is fp32
// accumulation only: <= 1e-5 * sum |w a| for these lengths (k <= 768: k * 2^-24 ~ 5e-5 worst
// case, ~1e-6 typical). Against the unrounded weights the bound adds the fp16 rounding of weights
// (2^-11 relative each): 2^-10 * sum |w a|.
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
#include "gpu/kernel_test_util.h"
#include "ktune/engine/cuda/cuda_check.h"
#include "ktune/engine/cuda/kernels.h"
#include "ktune/engine/cuda/prefill_kernels.h"
#include "ktune/engine/quant.h"
#include "runtime/cpu_ops.h"

namespace ktune::cuda {
namespace {

using test::Dev;
using test::Rng;

std::vector<uint16_t> to_f16(const std::vector<float>& v) {
  std::vector<uint16_t> h(v.size());
  for (size_t i = 0; i < v.size(); ++i) h[i] = fp32_to_fp16(v[i]);
  return h;
}
std::vector<float> from_f16(const std::vector<uint16_t>& h) {
  std::vector<float> v(h.size());
  for (size_t i = 0; i < h.size(); ++i) v[i] = fp16_to_fp32(h[i]);
  return v;
}

std::vector<uint8_t> quantize(QuantType t, const std::vector<float>& v, int64_t cols) {
  const int64_t rows = static_cast<int64_t>(v.size()) / cols;
  std::vector<uint8_t> out(static_cast<size_t>(rows * row_bytes(t, cols)));
  for (int64_t r = 0; r < rows; ++r) {
    quantize_row(t, v.data() + r * cols, out.data() + r * row_bytes(t, cols), cols);
  }
  return out;
}

// The weights as the kernel multiplies them: dequantized to fp16 (q * d rounded once for Q4_0 /
// Q8_0, rounded from BF16 / F32), and as stored (exact dequantization).
void weights_as_used(QuantType t, const std::vector<uint8_t>& q, int64_t cols,
                     std::vector<float>* used, std::vector<float>* exact) {
  const int64_t rb = row_bytes(t, cols);
  const int64_t rows = static_cast<int64_t>(q.size()) / rb;
  used->assign(static_cast<size_t>(rows * cols), 0.0f);
  exact->assign(used->size(), 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = q.data() + r * rb;
    dequantize_row(t, row, exact->data() + r * cols, cols);
    for (int64_t c = 0; c < cols; ++c) {
      float w = (*exact)[static_cast<size_t>(r * cols + c)];
      if (t == QuantType::Q4_0 || t == QuantType::Q8_0) {
        const uint8_t* blk = row + (c / 32) * block_bytes(t);
        const float d = fp16_to_fp32(static_cast<uint16_t>(blk[0] | (blk[1] << 8)));
        const int j = static_cast<int>(c % 32);
        const int qv = t == QuantType::Q4_0
                           ? (j < 16 ? (blk[2 + j] & 15) : (blk[2 + j - 16] >> 4)) - 8
                           : static_cast<int8_t>(blk[2 + j]);
        w = d * static_cast<float>(qv);  // exact in float; the kernel rounds it to fp16 once
      }
      (*used)[static_cast<size_t>(r * cols + c)] = fp16_to_fp32(fp32_to_fp16(w));
    }
  }
}

// ---------------------------------------------------------------------------------------------

TEST(PrefillKernels, RmsNormF32AndF16) {
  KTUNE_REQUIRE_GPU();
  Rng rng;
  SCOPED_TRACE(rng.trace());
  for (int64_t n : {2048, 256, 128}) {
    const int64_t rows = 7;
    const auto x = rng.normal(static_cast<size_t>(rows * n), 3.0f);
    const auto w = rng.normal(static_cast<size_t>(n));
    Dev<float> dx(x), dw(w), dy(x.size()), dref(x.size());
    Dev<uint16_t> dy16(x.size());
    ASSERT_EQ(
        launch_prefill_rmsnorm(dx.ptr(), dw.ptr(), 1e-6f, rows, n, dy.ptr(), dy16.ptr(), nullptr),
        cudaSuccess);
    ASSERT_EQ(launch_rmsnorm(dx.ptr(), dw.ptr(), 1e-6f, rows, n, dref.ptr(), nullptr), cudaSuccess);
    const auto y = dy.download(), ref = dref.download();
    const auto y16 = dy16.download();
    std::vector<float> cpu(static_cast<size_t>(n));
    double worst = 0;
    for (int64_t r = 0; r < rows; ++r) {
      cpu_ops::rmsnorm(x.data() + r * n, w.data(), 1e-6f, n, cpu.data());
      for (int64_t i = 0; i < n; ++i) {
        const size_t k = static_cast<size_t>(r * n + i);
        // Same arithmetic and block size as launch_rmsnorm: bit-identical.
        ASSERT_EQ(std::memcmp(&y[k], &ref[k], 4), 0) << "row " << r << " col " << i;
        // The fp16 copy is the rounding of the f32 output.
        ASSERT_EQ(y16[k], fp32_to_fp16(y[k])) << "row " << r << " col " << i;
        // Against the CPU (another summation order): float32 rounding of the sum of squares.
        worst = std::max(worst, std::fabs(double(y[k]) - cpu[static_cast<size_t>(i)]) /
                                    (std::fabs(cpu[static_cast<size_t>(i)]) + 1e-6));
      }
    }
    std::printf("[PrefillRmsNorm n=%lld] max rel |gpu - cpu_ops| %.3g\n", static_cast<long long>(n),
                worst);
    EXPECT_LE(worst, 1e-5);
  }
}

// Y = A W^T for every weight type, dense: plain, accumulate, gathered rows, partial tiles.
void check_dense_matmul(QuantType t) {
  Rng rng;
  SCOPED_TRACE(rng.trace() + " type " + quant_name(t));
  const int64_t m = 70, n = 136, k = 256;
  const auto wf = rng.normal(static_cast<size_t>(n * k), 0.05f);
  const auto wq = quantize(t, wf, k);
  std::vector<float> used, exact;
  weights_as_used(t, wq, k, &used, &exact);
  const auto a16 = to_f16(rng.normal(static_cast<size_t>(m * k)));
  const auto a = from_f16(a16);
  std::vector<int32_t> perm(static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i)
    perm[static_cast<size_t>(i)] = static_cast<int32_t>((i * 37 + 11) % m);
  const auto y0 = rng.normal(static_cast<size_t>(m * n));

  Dev<uint8_t> dw(wq);
  Dev<uint16_t> da(a16);
  Dev<int32_t> dperm(perm);
  Dev<float> dy(static_cast<size_t>(m * n)), dacc(y0), dg(static_cast<size_t>(m * n));
  PrefillMatmul p;
  p.type = t;
  p.m = m;
  p.n = n;
  p.k = k;
  p.a = da.ptr();
  p.lda = k;
  p.w = dw.ptr();
  p.y = dy.ptr();
  p.ldy = n;
  ASSERT_EQ(launch_prefill_matmul(p, nullptr), cudaSuccess);
  p.y = dacc.ptr();
  p.accumulate = true;
  ASSERT_EQ(launch_prefill_matmul(p, nullptr), cudaSuccess);
  p.y = dg.ptr();
  p.accumulate = false;
  p.a_rows = dperm.ptr();
  ASSERT_EQ(launch_prefill_matmul(p, nullptr), cudaSuccess);
  const auto y = dy.download(), yacc = dacc.download(), yg = dg.download();

  double worst_used = 0, worst_exact = 0;
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t c = 0; c < n; ++c) {
      double su = 0, se = 0, mag = 0, su_g = 0, mag_g = 0;
      const int64_t rg = perm[static_cast<size_t>(r)];
      for (int64_t i = 0; i < k; ++i) {
        const size_t wi = static_cast<size_t>(c * k + i);
        su += double(used[wi]) * a[static_cast<size_t>(r * k + i)];
        se += double(exact[wi]) * a[static_cast<size_t>(r * k + i)];
        mag += std::fabs(double(used[wi]) * a[static_cast<size_t>(r * k + i)]);
        su_g += double(used[wi]) * a[static_cast<size_t>(rg * k + i)];
        mag_g += std::fabs(double(used[wi]) * a[static_cast<size_t>(rg * k + i)]);
      }
      const size_t o = static_cast<size_t>(r * n + c);
      const double eu = std::fabs(y[o] - su), ee = std::fabs(y[o] - se);
      ASSERT_LE(eu, 1e-5 * mag + 1e-7) << "row " << r << " col " << c;
      ASSERT_LE(ee, std::ldexp(1.0, -10) * mag + 1e-7) << "row " << r << " col " << c;
      ASSERT_LE(std::fabs(yacc[o] - (y0[o] + su)), 1e-5 * mag + 1e-6 * std::fabs(y0[o]) + 1e-7)
          << "accumulate, row " << r << " col " << c;
      ASSERT_LE(std::fabs(yg[o] - su_g), 1e-5 * mag_g + 1e-7) << "gathered, row " << r;
      worst_used = std::max(worst_used, eu / (mag + 1e-12));
      worst_exact = std::max(worst_exact, ee / (mag + 1e-12));
    }
  }
  // A row's result does not depend on the rows around it: the gathered launch gives the plain
  // launch's bits for the same source row.
  for (int64_t r = 0; r < m; ++r) {
    const int64_t rg = perm[static_cast<size_t>(r)];
    ASSERT_EQ(std::memcmp(&yg[static_cast<size_t>(r * n)], &y[static_cast<size_t>(rg * n)], n * 4),
              0)
        << "row " << r;
  }
  std::printf(
      "[PrefillMatmul %s] max |err| / sum|w a|: %.3g vs fp16-rounded weights, %.3g vs stored "
      "weights\n",
      quant_name(t), worst_used, worst_exact);
}

TEST(PrefillKernels, MatmulDenseQ4_0) {
  KTUNE_REQUIRE_GPU();
  check_dense_matmul(QuantType::Q4_0);
}
TEST(PrefillKernels, MatmulDenseQ8_0) {
  KTUNE_REQUIRE_GPU();
  check_dense_matmul(QuantType::Q8_0);
}
TEST(PrefillKernels, MatmulDenseBF16) {
  KTUNE_REQUIRE_GPU();
  check_dense_matmul(QuantType::BF16);
}
TEST(PrefillKernels, MatmulDenseF32) {
  KTUNE_REQUIRE_GPU();
  check_dense_matmul(QuantType::F32);
}

TEST(PrefillKernels, MatmulRejectsBadShapes) {
  KTUNE_REQUIRE_GPU();
  Dev<uint16_t> a(64 * 96);
  Dev<uint8_t> w(4096);
  Dev<float> y(64 * 64);
  PrefillMatmul p;
  p.type = QuantType::Q4_0;
  p.m = 4;
  p.n = 64;
  p.k = 96;  // not a multiple of 64
  p.a = a.ptr();
  p.lda = 96;
  p.w = w.ptr();
  p.y = y.ptr();
  p.ldy = 64;
  EXPECT_EQ(launch_prefill_matmul(p, nullptr), cudaErrorInvalidValue);
  p.k = 64;
  p.type = QuantType::F16;
  EXPECT_EQ(launch_prefill_matmul(p, nullptr), cudaErrorInvalidValue);
  p.type = QuantType::Q4_0;
  p.y = nullptr;
  EXPECT_EQ(launch_prefill_matmul(p, nullptr), cudaErrorInvalidValue);
}

// The MoE of a chunk: route (grouping), gate/up + SwiGLU and down over grouped rows, combine.
void check_moe(QuantType t) {
  Rng rng;
  SCOPED_TRACE(rng.trace() + " type " + quant_name(t));
  const int64_t T = 150, k = 3, E = 8, hidden = 256, ffn = 192;
  // Routing: k distinct experts per token, skewed so some expert gets more than one tile; one
  // pair of token 5 names a bad expert id.
  std::vector<int32_t> ids(static_cast<size_t>(T * k));
  std::vector<float> wts(ids.size());
  for (int64_t tk = 0; tk < T; ++tk) {
    std::vector<int32_t> pick;
    while (static_cast<int64_t>(pick.size()) < k) {
      const int32_t e =
          rng.uniform_int(0, 99) < 50 ? 2 : rng.uniform_int(0, static_cast<int>(E) - 1);
      if (std::find(pick.begin(), pick.end(), e) == pick.end()) pick.push_back(e);
    }
    std::sort(pick.begin(), pick.end());
    for (int64_t j = 0; j < k; ++j) {
      ids[static_cast<size_t>(tk * k + j)] = pick[static_cast<size_t>(j)];
      wts[static_cast<size_t>(tk * k + j)] = 0.2f + 0.1f * static_cast<float>(j);
    }
  }
  ids[5 * k + 1] = static_cast<int32_t>(E);
  const int64_t P = T * k;

  // CPU grouping: stable counting sort.
  std::vector<int32_t> cnt(static_cast<size_t>(E), 0), first(static_cast<size_t>(E), 0);
  for (int32_t e : ids) {
    if (e >= 0 && e < E) ++cnt[static_cast<size_t>(e)];
  }
  for (int64_t e = 1; e < E; ++e) {
    first[static_cast<size_t>(e)] =
        first[static_cast<size_t>(e - 1)] + cnt[static_cast<size_t>(e - 1)];
  }
  std::vector<int32_t> next = first, ref_pos(static_cast<size_t>(P), -1), ref_tok;
  std::vector<int32_t> pair_of_row(static_cast<size_t>(P), -1);
  for (int64_t p = 0; p < P; ++p) {
    const int32_t e = ids[static_cast<size_t>(p)];
    if (e < 0 || e >= E) continue;
    const int32_t pos = next[static_cast<size_t>(e)]++;
    ref_pos[static_cast<size_t>(p)] = pos;
    pair_of_row[static_cast<size_t>(pos)] = static_cast<int32_t>(p);
  }
  const int64_t rows = first.back() + cnt.back();
  std::vector<int32_t> ref_tiles;
  for (int64_t e = 0; e < E; ++e) {
    for (int32_t i = 0; i * kPrefillTileM < cnt[static_cast<size_t>(e)]; ++i) {
      ref_tiles.insert(
          ref_tiles.end(),
          {static_cast<int32_t>(e), first[static_cast<size_t>(e)] + i * kPrefillTileM,
           std::min<int32_t>(kPrefillTileM, cnt[static_cast<size_t>(e)] - i * kPrefillTileM), 0});
    }
  }

  const int64_t max_tiles = prefill_moe_max_tiles(P, E, kPrefillTileM);
  Dev<int32_t> dids(ids), dsorted(static_cast<size_t>(P)), dpos(static_cast<size_t>(P)),
      dtiles(static_cast<size_t>(4 * max_tiles)), dnt(1), dcounts(static_cast<size_t>(E));
  ASSERT_EQ(launch_prefill_moe_route(dids.ptr(), T, k, E, kPrefillTileM, dsorted.ptr(), dpos.ptr(),
                                     dtiles.ptr(), dnt.ptr(), dcounts.ptr(), nullptr),
            cudaSuccess);
  const auto sorted = dsorted.download(), pos = dpos.download(), tiles = dtiles.download();
  const int32_t n_tiles = dnt.download()[0];
  EXPECT_EQ(pos, ref_pos);
  EXPECT_EQ(dcounts.download(), cnt);
  for (int64_t r = 0; r < rows; ++r) {
    ASSERT_EQ(sorted[static_cast<size_t>(r)], pair_of_row[static_cast<size_t>(r)] / k)
        << "row " << r;
  }
  ASSERT_EQ(n_tiles * 4, static_cast<int32_t>(ref_tiles.size()));
  EXPECT_TRUE(std::equal(ref_tiles.begin(), ref_tiles.end(), tiles.begin()));
  EXPECT_GT(cnt[2], kPrefillTileM);  // expert 2 spans two tiles

  // Expert weights, one allocation per matrix kind; per-expert pointer tables.
  const auto gq = quantize(t, rng.normal(static_cast<size_t>(E * ffn * hidden), 0.05f), hidden);
  const auto uq = quantize(t, rng.normal(static_cast<size_t>(E * ffn * hidden), 0.05f), hidden);
  const auto dq = quantize(t, rng.normal(static_cast<size_t>(E * hidden * ffn), 0.05f), ffn);
  std::vector<float> gu_used, gu_ex, uu_used, uu_ex, du_used, du_ex;
  weights_as_used(t, gq, hidden, &gu_used, &gu_ex);
  weights_as_used(t, uq, hidden, &uu_used, &uu_ex);
  weights_as_used(t, dq, ffn, &du_used, &du_ex);
  Dev<uint8_t> dgw(gq), duw(uq), ddw(dq);
  const int64_t gbytes = ffn * row_bytes(t, hidden), dbytes = hidden * row_bytes(t, ffn);
  std::vector<const void*> table(static_cast<size_t>(3 * E));
  for (int64_t e = 0; e < E; ++e) {
    table[static_cast<size_t>(e)] = dgw.ptr() + e * gbytes;
    table[static_cast<size_t>(E + e)] = duw.ptr() + e * gbytes;
    table[static_cast<size_t>(2 * E + e)] = ddw.ptr() + e * dbytes;
  }
  Dev<const void*> dtable(table);
  const auto h16 = to_f16(rng.normal(static_cast<size_t>(T * hidden)));
  const auto h = from_f16(h16);
  Dev<uint16_t> dh(h16), dact(static_cast<size_t>(P * ffn));
  Dev<float> dye(static_cast<size_t>(P * hidden));

  PrefillMatmul gu;
  gu.type = t;
  gu.n = ffn;
  gu.k = hidden;
  gu.a = dh.ptr();
  gu.lda = hidden;
  gu.a_rows = dsorted.ptr();
  gu.w_table = dtable.ptr();
  gu.w2_table = dtable.ptr() + E;
  gu.tiles = dtiles.ptr();
  gu.n_tiles = dnt.ptr();
  gu.max_tiles = max_tiles;
  gu.y16 = dact.ptr();
  gu.ldy = ffn;
  gu.swiglu = true;
  ASSERT_EQ(launch_prefill_matmul(gu, nullptr), cudaSuccess);
  const auto act16 = dact.download();
  double worst_act = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t p = pair_of_row[static_cast<size_t>(r)];
    const int64_t e = ids[static_cast<size_t>(p)], tk = p / k;
    for (int64_t c = 0; c < ffn; ++c) {
      double g = 0, u = 0, gm = 0, um = 0;
      for (int64_t i = 0; i < hidden; ++i) {
        const size_t wi = static_cast<size_t>((e * ffn + c) * hidden + i);
        const double x = h[static_cast<size_t>(tk * hidden + i)];
        g += gu_used[wi] * x;
        u += uu_used[wi] * x;
        gm += std::fabs(gu_used[wi] * x);
        um += std::fabs(uu_used[wi] * x);
      }
      const double sg = g / (1.0 + std::exp(-g));
      const double ref = sg * u;
      // fp32 accumulation moves g and u by <= 1e-5 of their magnitudes; silu'(g) <= 1.1; then
      // the fp16 rounding of the result (2^-11 relative).
      const double tol = 1.1e-5 * gm * std::fabs(u) + 1e-5 * um * std::fabs(sg) +
                         std::ldexp(std::fabs(ref), -10) + 1e-7;
      const double got = fp16_to_fp32(act16[static_cast<size_t>(r * ffn + c)]);
      ASSERT_LE(std::fabs(got - ref), tol) << "row " << r << " col " << c;
      worst_act = std::max(worst_act, std::fabs(got - ref) / (std::fabs(ref) + 1e-6));
    }
  }

  PrefillMatmul dn;
  dn.type = t;
  dn.n = hidden;
  dn.k = ffn;
  dn.a = dact.ptr();
  dn.lda = ffn;
  dn.w_table = dtable.ptr() + 2 * E;
  dn.tiles = dtiles.ptr();
  dn.n_tiles = dnt.ptr();
  dn.max_tiles = max_tiles;
  dn.y = dye.ptr();
  dn.ldy = hidden;
  ASSERT_EQ(launch_prefill_matmul(dn, nullptr), cudaSuccess);
  const auto ye = dye.download();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t e = ids[static_cast<size_t>(pair_of_row[static_cast<size_t>(r)])];
    for (int64_t c = 0; c < hidden; ++c) {
      double s = 0, mag = 0;
      for (int64_t i = 0; i < ffn; ++i) {
        const double v = double(du_used[static_cast<size_t>((e * hidden + c) * ffn + i)]) *
                         fp16_to_fp32(act16[static_cast<size_t>(r * ffn + i)]);
        s += v;
        mag += std::fabs(v);
      }
      ASSERT_LE(std::fabs(ye[static_cast<size_t>(r * hidden + c)] - s), 1e-5 * mag + 1e-7)
          << "row " << r << " col " << c;
    }
  }

  // Combine: the CPU's float arithmetic in the same order (rounded multiply, then add).
  const auto x0 = rng.normal(static_cast<size_t>(T * hidden));
  Dev<float> dx(x0), dw(wts);
  ASSERT_EQ(
      launch_prefill_moe_combine(dye.ptr(), dpos.ptr(), dw.ptr(), T, k, hidden, dx.ptr(), nullptr),
      cudaSuccess);
  const auto x = dx.download();
  for (int64_t tk = 0; tk < T; ++tk) {
    for (int64_t c = 0; c < hidden; ++c) {
      const size_t o = static_cast<size_t>(tk * hidden + c);
      if (tk == 5) {
        ASSERT_TRUE(std::isnan(x[o])) << "a bad expert id gives NaN";
        continue;
      }
      volatile float s = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        const size_t p = static_cast<size_t>(tk * k + j);
        volatile float prod = wts[p] * ye[static_cast<size_t>(ref_pos[p] * hidden + c)];
        s = s + prod;
      }
      volatile float want = x0[o] + s;
      ASSERT_EQ(x[o], want) << "token " << tk << " col " << c;
    }
  }
  std::printf("[PrefillMoe %s] %lld pairs in %d tiles; SwiGLU max rel err %.3g\n", quant_name(t),
              static_cast<long long>(rows), n_tiles, worst_act);
}

TEST(PrefillKernels, MoeGroupedQ4_0) {
  KTUNE_REQUIRE_GPU();
  check_moe(QuantType::Q4_0);
}
TEST(PrefillKernels, MoeGroupedQ8_0) {
  KTUNE_REQUIRE_GPU();
  check_moe(QuantType::Q8_0);
}
TEST(PrefillKernels, MoeGroupedBF16) {
  KTUNE_REQUIRE_GPU();
  check_moe(QuantType::BF16);
}

TEST(PrefillKernels, RouterF32) {
  KTUNE_REQUIRE_GPU();
  Rng rng;
  SCOPED_TRACE(rng.trace());
  const int64_t m = 70, n = 136, k = 256;
  const auto x = rng.normal(static_cast<size_t>(m * k));
  const auto w = rng.normal(static_cast<size_t>(n * k), 0.05f);
  Dev<float> dx(x), dw(w), dy(static_cast<size_t>(m * n));
  ASSERT_EQ(launch_prefill_matmul_f32(dx.ptr(), dw.ptr(), m, n, k, dy.ptr(), nullptr), cudaSuccess);
  const auto y = dy.download();
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t c = 0; c < n; ++c) {
      double s = 0, mag = 0;
      for (int64_t i = 0; i < k; ++i) {
        const double v =
            double(x[static_cast<size_t>(r * k + i)]) * w[static_cast<size_t>(c * k + i)];
        s += v;
        mag += std::fabs(v);
      }
      ASSERT_LE(std::fabs(y[static_cast<size_t>(r * n + c)] - s), 1e-5 * mag) << r << "," << c;
    }
  }
}

void check_qk_norm_rope(int64_t hd) {
  Rng rng;
  SCOPED_TRACE(rng.trace() + " hd " + std::to_string(hd));
  const int64_t T = 5, pos0 = 7, nh = 4, nkv = 2, max_ctx = 16;
  const auto q = rng.normal(static_cast<size_t>(T * nh * hd), 2.0f);
  const auto k = rng.normal(static_cast<size_t>(T * nkv * hd), 2.0f);
  const auto v = rng.normal(static_cast<size_t>(T * nkv * hd), 2.0f);
  const auto qn = rng.normal(static_cast<size_t>(hd));
  const auto kn = rng.normal(static_cast<size_t>(hd));
  const std::vector<float> inv = rope_inv_freq(1e6f, hd);
  Dev<float> dq(q), dk(k), dv(v), dqn(qn), dkn(kn), dinv(inv);
  Dev<uint16_t> dq16(static_cast<size_t>(T * nh * hd)),
      dkc(static_cast<size_t>(nkv * max_ctx * hd)), dvc(static_cast<size_t>(nkv * max_ctx * hd));
  ASSERT_EQ(launch_prefill_qk_norm_rope(dq.ptr(), dk.ptr(), dv.ptr(), dqn.ptr(), dkn.ptr(), 1e-6f,
                                        dinv.ptr(), T, pos0, nh, nkv, hd, max_ctx, dq16.ptr(),
                                        dkc.ptr(), dvc.ptr(), nullptr),
            cudaSuccess);
  const auto q16 = dq16.download(), kc = dkc.download(), vc = dvc.download();
  std::vector<float> head(static_cast<size_t>(hd)), cs(static_cast<size_t>(hd));
  // The CPU engine's path: rmsnorm, then the rope table of the position. Float32 on both sides,
  // different summation order of the norm (~1e-6 relative), then fp16 rounding: within 1 fp16
  // ulp (2^-10 relative) of the CPU value.
  auto near = [](uint16_t got, float want) {
    return std::fabs(fp16_to_fp32(got) - want) <= std::ldexp(std::fabs(want), -10) + 1e-6;
  };
  for (int64_t t = 0; t < T; ++t) {
    cpu_ops::rope_table(pos0 + t, inv.data(), hd, cs.data());
    for (int64_t h = 0; h < nh + nkv; ++h) {
      const bool isq = h < nh;
      const float* src = isq ? &q[static_cast<size_t>((t * nh + h) * hd)]
                             : &k[static_cast<size_t>((t * nkv + h - nh) * hd)];
      cpu_ops::rmsnorm(src, isq ? qn.data() : kn.data(), 1e-6f, hd, head.data());
      cpu_ops::rope_neox(head.data(), cs.data(), hd);
      for (int64_t d = 0; d < hd; ++d) {
        if (isq) {
          ASSERT_TRUE(
              near(q16[static_cast<size_t>((t * nh + h) * hd + d)], head[static_cast<size_t>(d)]))
              << "q t " << t << " h " << h << " d " << d;
        } else {
          const size_t c = static_cast<size_t>(((h - nh) * max_ctx + pos0 + t) * hd + d);
          ASSERT_TRUE(near(kc[c], head[static_cast<size_t>(d)])) << "k t " << t << " d " << d;
          ASSERT_EQ(vc[c], fp32_to_fp16(v[static_cast<size_t>((t * nkv + h - nh) * hd + d)]));
        }
      }
    }
  }
  // Positions outside [pos0, pos0 + T) are untouched (still the 0xffff poison).
  for (int64_t kv = 0; kv < nkv; ++kv) {
    for (int64_t p : {pos0 - 1, pos0 + T}) {
      EXPECT_EQ(kc[static_cast<size_t>((kv * max_ctx + p) * hd)], 0xffff);
    }
  }
}

TEST(PrefillKernels, QkNormRopeStore) {
  KTUNE_REQUIRE_GPU();
  check_qk_norm_rope(64);
  check_qk_norm_rope(128);
}

void check_attention(int64_t hd) {
  Rng rng;
  SCOPED_TRACE(rng.trace() + " hd " + std::to_string(hd));
  const int64_t nh = 4, nkv = 2, max_ctx = 300, pos0 = 100, T = 77;
  const int64_t group = nh / nkv;
  const auto kc = to_f16(rng.normal(static_cast<size_t>(nkv * max_ctx * hd)));
  const auto vc = to_f16(rng.normal(static_cast<size_t>(nkv * max_ctx * hd)));
  const auto q16 = to_f16(rng.normal(static_cast<size_t>(T * nh * hd), 0.5f));
  Dev<uint16_t> dk(kc), dv(vc), dq(q16), dout(static_cast<size_t>(T * nh * hd)),
      dout2(static_cast<size_t>(T * nh * hd));
  ASSERT_EQ(launch_prefill_attention(dq.ptr(), dk.ptr(), dv.ptr(), T, pos0, nh, nkv, hd, max_ctx,
                                     dout.ptr(), nullptr),
            cudaSuccess);
  // The same queries split into two chunks (30 at pos0, 47 at pos0 + 30): bit-identical.
  const int64_t split = 30;
  ASSERT_EQ(launch_prefill_attention(dq.ptr(), dk.ptr(), dv.ptr(), split, pos0, nh, nkv, hd,
                                     max_ctx, dout2.ptr(), nullptr),
            cudaSuccess);
  ASSERT_EQ(launch_prefill_attention(dq.ptr() + split * nh * hd, dk.ptr(), dv.ptr(), T - split,
                                     pos0 + split, nh, nkv, hd, max_ctx,
                                     dout2.ptr() + split * nh * hd, nullptr),
            cudaSuccess);
  const auto out = dout.download(), out2 = dout2.download();
  EXPECT_EQ(out, out2);
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  double worst = 0;
  std::vector<double> sc(static_cast<size_t>(pos0 + T));
  for (int64_t t = 0; t < T; ++t) {
    const int64_t qp = pos0 + t;
    for (int64_t h = 0; h < nh; ++h) {
      const int64_t kvh = h / group;
      double mx = -1e300;
      for (int64_t p = 0; p <= qp; ++p) {
        double s = 0;
        for (int64_t d = 0; d < hd; ++d) {
          s += double(fp16_to_fp32(q16[static_cast<size_t>((t * nh + h) * hd + d)])) *
               fp16_to_fp32(kc[static_cast<size_t>((kvh * max_ctx + p) * hd + d)]);
        }
        sc[static_cast<size_t>(p)] = s * scale;
        mx = std::max(mx, s * scale);
      }
      double l = 0;
      for (int64_t p = 0; p <= qp; ++p) {
        sc[static_cast<size_t>(p)] = std::exp(sc[static_cast<size_t>(p)] - mx);
        l += sc[static_cast<size_t>(p)];
      }
      for (int64_t d = 0; d < hd; ++d) {
        double o = 0, vmax = 0;
        for (int64_t p = 0; p <= qp; ++p) {
          const double vv = fp16_to_fp32(vc[static_cast<size_t>((kvh * max_ctx + p) * hd + d)]);
          o += sc[static_cast<size_t>(p)] * vv;
          vmax = std::max(vmax, std::fabs(vv));
        }
        o /= l;
        const double got = fp16_to_fp32(out[static_cast<size_t>((t * nh + h) * hd + d)]);
        // P rounded to fp16 (2^-11 relative per weight: <= 2^-11 max|v|), fp32 scores and
        // sums, the output rounded to fp16 (2^-11 relative).
        ASSERT_LE(std::fabs(got - o), std::ldexp(vmax, -10) + std::ldexp(std::fabs(o), -10))
            << "t " << t << " h " << h << " d " << d;
        worst = std::max(worst, std::fabs(got - o) / vmax);
      }
    }
  }
  std::printf("[PrefillAttention hd=%lld] max |err| / max|v| %.3g; split launch bit-identical %s\n",
              static_cast<long long>(hd), worst, out == out2 ? "yes" : "no");
}

TEST(PrefillKernels, AttentionHd64) {
  KTUNE_REQUIRE_GPU();
  check_attention(64);
}
TEST(PrefillKernels, AttentionHd128) {
  KTUNE_REQUIRE_GPU();
  check_attention(128);
}

}  // namespace
}  // namespace ktune::cuda
