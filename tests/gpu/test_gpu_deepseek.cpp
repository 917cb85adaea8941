// The deepseek2 GPU engine (GpuEngine on a deepseek2 model, engine/cuda/gpu_engine_deepseek.h)
// and its kernels (mla_kernels.h), on the device (ctest label `gpu`; skipped with query_gpus()'s
// reason when there is no usable GPU).
//
//   CudaMla.*            the MLA kernels against the CPU engine's scalar code (cpu_ops::rmsnorm,
//                        rope_table_scaled, rope_pairs, attend_group) and float64 loops over
//                        dequantized weights; random data per run (KTUNE_TEST_SEED pins it),
//                        outputs poisoned (NaN) before each launch.
//   CudaDeepseekRouter.* the router kernel against cpu_ops::route_grouped (ids exactly).
//   DeepseekGpu.*        the engine against the CPU engine (DeepseekCpuEngine behind CpuEngine) on
//                        tiny random deepseek2 models: "v3" (tiny-deepseek with 4 layers: sigmoid
//                        routing + selection bias, 2 of 4 groups, a dense leading layer, compressed
//                        queries, attn_k_b/attn_v_b) and "v2" (softmax routing, no groups, no dense
//                        layer, two shared experts, uncompressed queries, attn_kv_b). All on the
//                        GPU and hybrid (routed experts split between cuda:0 and the CPU), graph
//                        on and off.
//
// Tolerance against the CPU engine: with F32 (and BF16) weights both engines multiply float32
// activations, so they differ by summation order only: logits within 1e-3 of max |logit|
// (measured values are printed; a wrong operation gives errors of order 1; one step may reach
// 5e-2, a router near-tie), and the greedy tokens
// over 16 steps are identical (the CPU is teacher-forced with the GPU's tokens; a step where the
// CPU's top two logits are closer than the tolerance may differ and is reported). With Q8_0 /
// Q4_0 weights the CPU quantizes activations to Q8_0 and the GPU does not: with 4 of 16 experts
// in 2 of 4 groups a routing flip moves a whole group, so the bounds are the Hugging Face
// fixture test's for Q8_0 (median row 15 %, every row 90 %); the exact checks there are the
// GPU's own: graph on = off, fused = unfused, run to run (bit-identical).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "gpu/engine_test_util.h"
#include "gpu/gpu_test_util.h"
#include "gpu/kernel_test_util.h"
#include "ktune/engine/cpu_engine.h"
#include "ktune/engine/cuda/cuda_check.h"
#include "ktune/engine/cuda/mla_kernels.h"
#include "ktune/engine/error.h"
#include "ktune/engine/gpu_engine.h"
#include "ktune/engine/model.h"
#include "ktune/engine/quant.h"
#include "ktune/engine/synthetic.h"
#include "runtime/cpu_engine_deepseek.h"
#include "runtime/cpu_ops.h"

namespace ktune {
namespace {

using cuda::test::Dev;
using cuda::test::Rng;

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, double(std::fabs(x)));
  return m;
}

// max |got - want| / max |want| (NaN in got counts as infinite).
double rel_err(const float* got, const float* want, size_t n) {
  double mx = 0, err = 0;
  for (size_t i = 0; i < n; ++i) {
    mx = std::max(mx, double(std::fabs(want[i])));
    const double d = std::fabs(double(got[i]) - double(want[i]));
    err = std::isnan(d) ? INFINITY : std::max(err, d);
  }
  return err / std::max(mx, 1e-30);
}

std::vector<uint8_t> quantize(QuantType t, const std::vector<float>& v, int64_t cols) {
  const int64_t rows = static_cast<int64_t>(v.size()) / cols;
  std::vector<uint8_t> out(static_cast<size_t>(rows * row_bytes(t, cols)));
  for (int64_t r = 0; r < rows; ++r) {
    quantize_row(t, v.data() + r * cols, out.data() + r * row_bytes(t, cols), cols);
  }
  return out;
}
std::vector<float> dequantize(QuantType t, const std::vector<uint8_t>& q, int64_t cols) {
  const int64_t rb = row_bytes(t, cols);
  const int64_t rows = static_cast<int64_t>(q.size()) / rb;
  std::vector<float> out(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    dequantize_row(t, q.data() + r * rb, out.data() + r * cols, cols);
  return out;
}

// ---------------------------------------------------------------------------------------------
// MLA kernels

TEST(CudaMla, RopeStoreMatchesCpuOps) {
  KTUNE_REQUIRE_GPU();
  Rng rng;
  SCOPED_TRACE(rng.trace());
  const ModelConfig& c = *find_preset("tiny-deepseek");  // YaRN: all three frequency regimes
  for (const auto& [nh, rank, rope, max_ctx] :
       {std::tuple<int64_t, int64_t, int64_t, int64_t>{4, 64, 16, 64}, {128, 512, 64, 4096}}) {
    ModelConfig cc = c;
    cc.rope_dim = rope;
    cc.kv_lora_rank = rank;
    cc.head_dim = 32 + rope;
    const DeepseekRope r = deepseek_rope(cc);
    const int64_t lat = rank + rope, dq = cc.head_dim, dn = dq - rope;
    const std::vector<float> kv = rng.normal(static_cast<size_t>(lat));
    const std::vector<float> w = rng.normal(static_cast<size_t>(rank), 0.5f, 1.0f);
    const std::vector<float> q = rng.normal(static_cast<size_t>(nh * dq));
    Dev<float> dkv(kv), dw(w), dq_(q), dfreq(r.inv_freq);
    Dev<float> cache(static_cast<size_t>(max_ctx * lat)), qout(static_cast<size_t>(nh * lat));
    for (int32_t p : {0, 7, static_cast<int32_t>(max_ctx - 1)}) {
      Dev<int32_t> pos(std::vector<int32_t>{p});
      cache.poison();
      qout.poison();
      ASSERT_EQ(cuda::launch_mla_rope_store(dkv.ptr(), dw.ptr(), 1e-6f, dq_.ptr(), dq, dn,
                                            dfreq.ptr(), r.cos_sin_scale, pos.ptr(), nh, rank, rope,
                                            max_ctx, cache.ptr(), qout.ptr(), lat, nullptr),
                cudaSuccess);
      const auto gc = cache.download();
      const auto gq = qout.download();
      std::vector<float> want(static_cast<size_t>(lat)), cs(static_cast<size_t>(rope));
      cpu_ops::rmsnorm(kv.data(), w.data(), 1e-6f, rank, want.data());
      std::copy(kv.begin() + rank, kv.end(), want.begin() + rank);
      cpu_ops::rope_table_scaled(p, r.inv_freq.data(), rope, r.cos_sin_scale, cs.data());
      cpu_ops::rope_pairs(want.data() + rank, cs.data(), rope);
      const float* row = gc.data() + static_cast<size_t>(p) * lat;
      EXPECT_LE(rel_err(row, want.data(), static_cast<size_t>(rank)), 2e-6) << "latent, pos " << p;
      for (int64_t i = 0; i < rope; ++i) {
        EXPECT_NEAR(row[rank + i], want[rank + i], 1e-6 * (1 + std::fabs(want[rank + i])))
            << "k_pe " << i << " pos " << p;
      }
      for (int64_t h = 0; h < nh; ++h) {
        std::vector<float> pe(q.begin() + h * dq + dn, q.begin() + (h + 1) * dq);
        cpu_ops::rope_pairs(pe.data(), cs.data(), rope);
        for (int64_t i = 0; i < rope; ++i) {
          EXPECT_NEAR(gq[h * lat + rank + i], pe[i], 1e-6 * (1 + std::fabs(pe[i])))
              << "q_pe head " << h << " " << i << " pos " << p;
        }
      }
    }
    // A position outside the cache stores nothing and makes the query's roped part NaN.
    Dev<int32_t> bad(std::vector<int32_t>{static_cast<int32_t>(max_ctx)});
    cache.poison();
    std::vector<float> zeros(static_cast<size_t>(max_ctx * lat), 0.0f);
    cache.upload(zeros);
    ASSERT_EQ(cuda::launch_mla_rope_store(dkv.ptr(), dw.ptr(), 1e-6f, dq_.ptr(), dq, dn,
                                          dfreq.ptr(), r.cos_sin_scale, bad.ptr(), nh, rank, rope,
                                          max_ctx, cache.ptr(), qout.ptr(), lat, nullptr),
              cudaSuccess);
    EXPECT_EQ(cache.download(), zeros);
    EXPECT_TRUE(std::isnan(qout.download()[rank]));
  }
}

void check_head_matvec(QuantType type, bool transposed) {
  Rng rng;
  SCOPED_TRACE(rng.trace() + " " + quant_name(type) + (transposed ? " transposed" : ""));
  // attn_kv_b-like: per head 96 rows (64 "key" rows then 32 "value" rows) of 128 values; the
  // kernel takes rows [row0, row0 + rows) of each head.
  const int64_t heads = 5, head_rows = 96, cols = 128;
  const std::vector<float> wf = rng.normal(static_cast<size_t>(heads * head_rows * cols), 0.1f);
  const auto wq = quantize(type, wf, cols);
  const auto wd = dequantize(type, wq, cols);
  Dev<uint8_t> dw(wq);
  for (const auto& [row0, rows] : {std::pair<int64_t, int64_t>{0, 64}, {64, 32}}) {
    // x: per head `len` values at stride x_stride (a multiple of 4).
    const int64_t len = transposed ? rows : cols;
    const int64_t x_stride = len + 12;
    const int64_t out_len = transposed ? cols : rows;
    const int64_t y_stride = out_len + 4;
    const std::vector<float> x = rng.normal(static_cast<size_t>(heads * x_stride));
    Dev<float> dx(x), dy(static_cast<size_t>(heads * y_stride));
    const cudaError_t err =
        transposed ? cuda::launch_head_matvec_t(type, dw.ptr(), head_rows, row0, rows, cols, heads,
                                                dx.ptr(), x_stride, dy.ptr(), y_stride, nullptr)
                   : cuda::launch_head_matvec(type, dw.ptr(), head_rows, row0, rows, cols, heads,
                                              dx.ptr(), x_stride, dy.ptr(), y_stride, nullptr);
    ASSERT_EQ(err, cudaSuccess);
    const auto y = dy.download();
    double worst = 0;
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t o = 0; o < out_len; ++o) {
        double ref = 0, mag = 0;
        for (int64_t i = 0; i < len; ++i) {
          const int64_t r = transposed ? i : o, c = transposed ? o : i;
          const double a = double(wd[static_cast<size_t>((h * head_rows + row0 + r) * cols + c)]) *
                           x[static_cast<size_t>(h * x_stride + i)];
          ref += a;
          mag += std::fabs(a);
        }
        const double e = std::fabs(y[static_cast<size_t>(h * y_stride + o)] - ref) / (mag + 1e-30);
        worst = std::max(worst, e);
      }
    }
    // float32 accumulation of <= 128 products: well under 1e-5 of sum |w x|.
    EXPECT_LE(worst, 1e-5) << "row0 " << row0;
    std::printf("[CudaMla head matvec%s %s] rows %lld..%lld: worst error %.3g of sum|w x|\n",
                transposed ? " transposed" : "", quant_name(type), static_cast<long long>(row0),
                static_cast<long long>(row0 + rows), worst);
  }
}

TEST(CudaMla, HeadMatvecMatchesReference) {
  KTUNE_REQUIRE_GPU();
  for (QuantType t : {QuantType::F32, QuantType::BF16, QuantType::Q8_0, QuantType::Q4_0}) {
    check_head_matvec(t, false);
  }
  // Misaligned x strides are refused, not read wrongly.
  Dev<float> x(64), y(64);
  Dev<uint8_t> w(static_cast<size_t>(row_bytes(QuantType::Q8_0, 32) * 4));
  EXPECT_EQ(cuda::launch_head_matvec(QuantType::Q8_0, w.ptr(), 2, 0, 2, 32, 2, x.ptr(), 3, y.ptr(),
                                     2, nullptr),
            cudaErrorInvalidValue);
}

TEST(CudaMla, HeadMatvecTransposedMatchesReference) {
  KTUNE_REQUIRE_GPU();
  for (QuantType t :
       {QuantType::F32, QuantType::F16, QuantType::BF16, QuantType::Q8_0, QuantType::Q4_0}) {
    check_head_matvec(t, true);
  }
}

// The attention kernel against cpu_ops::attend_group (the CPU engine's absorbed attention: the
// cache is one head shared by every query head; keys whole rows, values their latent part).
void check_attention(int64_t nh, int64_t rank, int64_t rope, int64_t max_ctx,
                     const std::vector<int32_t>& positions) {
  Rng rng;
  SCOPED_TRACE(rng.trace() + " heads " + std::to_string(nh) + " rank " + std::to_string(rank));
  const int64_t lat = rank + rope;
  const float scale = 1.0f / std::sqrt(192.0f);
  const std::vector<float> cache = rng.normal(static_cast<size_t>(max_ctx * lat));
  // Queries of std 3: peaked attention, so the online softmax's rescaling matters.
  const std::vector<float> q = rng.normal(static_cast<size_t>(nh * lat), 3.0f);
  Dev<float> dc(cache), dq(q), out(static_cast<size_t>(nh * rank));
  cuda::DeviceBuffer ws(cuda::mla_attention_workspace_bytes(nh, rank, max_ctx));
  std::vector<float> scores(static_cast<size_t>(nh * max_ctx));
  std::vector<std::vector<float>> ref(static_cast<size_t>(nh), std::vector<float>(lat));
  std::vector<const float*> qp(static_cast<size_t>(nh));
  std::vector<float*> op(static_cast<size_t>(nh));
  for (int64_t h = 0; h < nh; ++h) {
    qp[static_cast<size_t>(h)] = q.data() + h * lat;
    op[static_cast<size_t>(h)] = ref[static_cast<size_t>(h)].data();
  }
  const cpu_ops::VecOps ops{cpu_ops::dot, cpu_ops::axpy};
  for (int32_t p : positions) {
    Dev<int32_t> pos(std::vector<int32_t>{p});
    out.poison();
    ASSERT_EQ(cuda::launch_mla_attention(dq.ptr(), lat, dc.ptr(), pos.ptr(), nh, rank, rope,
                                         max_ctx, scale, ws.data(), out.ptr(), rank, nullptr),
              cudaSuccess);
    const auto got = out.download();
    cpu_ops::attend_group(ops, qp.data(), static_cast<int>(nh), cache.data(), cache.data(), lat,
                          p + 1, nullptr, nullptr, lat, scale, scores.data(), op.data());
    double worst = 0;
    for (int64_t h = 0; h < nh; ++h) {
      worst = std::max(worst, rel_err(got.data() + h * rank, ref[static_cast<size_t>(h)].data(),
                                      static_cast<size_t>(rank)));
    }
    std::printf("[CudaMla attention] heads %lld rank %lld pos %d: worst %.3g of max|out|\n",
                static_cast<long long>(nh), static_cast<long long>(rank), p, worst);
    // float32 sums over p + 1 positions in another order (spans, online rescaling, merge) than
    // the CPU's: the difference grows like sqrt(p); 2e-5 at 1k positions (measured 3.8e-6 at
    // 1023 on the H100, 2.6e-5 at 19999).
    const double tol = 2e-5 * std::max(1.0, std::sqrt((p + 1) / 1024.0));
    EXPECT_LE(worst, tol) << "pos " << p;
    // Run to run: bit-identical.
    ASSERT_EQ(cuda::launch_mla_attention(dq.ptr(), lat, dc.ptr(), pos.ptr(), nh, rank, rope,
                                         max_ctx, scale, ws.data(), out.ptr(), rank, nullptr),
              cudaSuccess);
    EXPECT_EQ(std::memcmp(out.download().data(), got.data(), got.size() * 4), 0);
  }
  Dev<int32_t> bad(std::vector<int32_t>{static_cast<int32_t>(max_ctx)});
  ASSERT_EQ(cuda::launch_mla_attention(dq.ptr(), lat, dc.ptr(), bad.ptr(), nh, rank, rope, max_ctx,
                                       scale, ws.data(), out.ptr(), rank, nullptr),
            cudaSuccess);
  EXPECT_TRUE(std::isnan(out.download()[0]));
}

TEST(CudaMla, AttentionMatchesCpuAttendGroup) {
  KTUNE_REQUIRE_GPU();
  // tiny-deepseek's shape; V2-Lite's (16 heads: two groups of 8); V3's 128 heads (groups of 13).
  check_attention(4, 64, 16, 600, {0, 1, 255, 256, 599});
  check_attention(16, 512, 64, 1024, {0, 300, 1023});
  check_attention(128, 512, 64, 512, {0, 511});
  // 20000 positions: 64 spans of two chunks each (the online softmax across chunks of a span).
  check_attention(8, 512, 64, 20000, {19999});
}

// ---------------------------------------------------------------------------------------------
// Router

void check_router(int64_t n, int64_t k, bool sigmoid, bool bias, int64_t groups,
                  int64_t groups_used, bool norm, float scale, int trials) {
  Rng rng;
  SCOPED_TRACE(rng.trace() + " n " + std::to_string(n) + (sigmoid ? " sigmoid" : " softmax"));
  Dev<float> dl(static_cast<size_t>(n)), db(static_cast<size_t>(n));
  Dev<int32_t> ids(static_cast<size_t>(k));
  Dev<float> w(static_cast<size_t>(k));
  std::vector<float> scratch(static_cast<size_t>(2 * n + groups));
  std::vector<int32_t> want_ids(static_cast<size_t>(k));
  std::vector<float> want_w(static_cast<size_t>(k));
  for (int t = 0; t < trials; ++t) {
    const std::vector<float> logits = rng.normal(static_cast<size_t>(n), 2.0f);
    const std::vector<float> b = rng.normal(static_cast<size_t>(n), 0.05f);
    dl.upload(logits);
    db.upload(b);
    ASSERT_EQ(
        cuda::launch_deepseek_router(dl.ptr(), n, k, sigmoid, bias ? db.ptr() : nullptr, groups,
                                     groups_used, norm, scale, ids.ptr(), w.ptr(), nullptr),
        cudaSuccess);
    cpu_ops::route_grouped(logits.data(), n, k, sigmoid, bias ? b.data() : nullptr, groups,
                           groups_used, norm, scale, scratch.data(), want_ids.data(),
                           want_w.data());
    ASSERT_EQ(ids.download(), want_ids) << "trial " << t;
    const auto got_w = w.download();
    for (int64_t j = 0; j < k; ++j) {
      EXPECT_NEAR(got_w[j], want_w[j], 2e-6 * std::fabs(want_w[j])) << "trial " << t << " " << j;
    }
  }
}

TEST(CudaDeepseekRouter, MatchesRouteGrouped) {
  KTUNE_REQUIRE_GPU();
  check_router(256, 8, true, true, 8, 4, true, 2.5f, 100);    // DeepSeek-V3
  check_router(64, 6, false, false, 1, 1, false, 1.0f, 100);  // DeepSeek-V2-Lite
  check_router(16, 4, true, true, 4, 2, true, 2.5f, 100);     // tiny-deepseek
  check_router(160, 6, false, false, 8, 3, true, 16.0f, 50);  // softmax with groups
  // Equal logits: ties go to the lower index (the first groups, then the first experts).
  const std::vector<float> flat(64, 0.5f);
  Dev<float> dl(flat);
  Dev<int32_t> ids(4);
  Dev<float> w(4);
  ASSERT_EQ(cuda::launch_deepseek_router(dl.ptr(), 64, 4, true, nullptr, 4, 2, true, 1.0f,
                                         ids.ptr(), w.ptr(), nullptr),
            cudaSuccess);
  EXPECT_EQ(ids.download(), (std::vector<int32_t>{0, 1, 2, 3}));
  std::vector<float> scratch(2 * 64 + 4), want_w(4);
  std::vector<int32_t> want_ids(4);
  cpu_ops::route_grouped(flat.data(), 64, 4, true, nullptr, 4, 2, true, 1.0f, scratch.data(),
                         want_ids.data(), want_w.data());
  EXPECT_EQ(want_ids, ids.download());
  const auto got_w = w.download();
  for (int j = 0; j < 4; ++j) EXPECT_NEAR(got_w[j], want_w[j], 1e-7f);
  EXPECT_EQ(cuda::launch_deepseek_router(dl.ptr(), 64, 4, true, nullptr, 5, 2, true, 1.0f,
                                         ids.ptr(), w.ptr(), nullptr),
            cudaErrorInvalidValue);  // 5 groups do not divide 64 experts
}

// ---------------------------------------------------------------------------------------------
// The engine

ModelConfig v3_config() {
  ModelConfig c = *find_preset("tiny-deepseek");
  c.name = "tiny-deepseek-v3";
  c.n_layers = 4;  // one dense layer, three MoE layers
  return c;
}

ModelConfig v2_config() {
  ModelConfig c = *find_preset("tiny-deepseek");
  c.name = "tiny-deepseek-v2";
  c.q_lora_rank = 0;
  c.gating = ExpertGating::Softmax;
  c.expert_score_bias = false;
  c.n_expert_groups = c.n_groups_used = 1;
  c.norm_topk_prob = false;
  c.expert_weights_scale = 1.0f;
  c.n_shared_experts = 2;
  c.split_kv_b = false;
  c.n_dense_lead = 0;
  c.yarn_mscale = c.yarn_mscale_all_dim = 0.707f;
  return c;
}

const ModelWeights& model(const ModelConfig& c, QuantType q) {
  static std::vector<std::unique_ptr<ModelWeights>> cache;
  static std::vector<std::string> keys;
  const std::string key = c.name + ":" + quant_name(q);
  for (size_t i = 0; i < keys.size(); ++i) {
    if (keys[i] == key) return *cache[i];
  }
  SynthOptions o;
  o.preset = c.name;
  o.quant = q;
  o.seed = 3;
  o.shape = c;
  cache.push_back(std::make_unique<ModelWeights>(make_synthetic_model(o)));
  keys.push_back(key);
  return *cache.back();
}

const std::vector<int32_t> kTokens = {1, 17, 200, 5, 99, 42};

GpuEngineOptions gpu_opt(const ModelConfig& c, test::Split split, bool graph,
                         MoeKernel k = MoeKernel::Fused) {
  GpuEngineOptions o;
  o.max_context = 64;
  o.cuda_graph = graph;
  o.moe_kernel = k;
  if (split != test::Split::AllOnGpu) {
    o.expert_on_gpu = test::expert_map(c, split);
    o.cpu_threads = 3;
    o.pin_threads = false;
  }
  return o;
}

std::vector<std::vector<float>> cpu_logits(const ModelWeights& m) {
  CpuEngineOptions co;
  co.threads = 3;
  co.max_context = 64;
  co.pin_threads = false;
  CpuEngine cpu(m, co);
  std::vector<std::vector<float>> out;
  for (int32_t t : kTokens) {
    out.emplace_back();
    cpu.decode(t, &out.back());
  }
  return out;
}

std::vector<std::vector<float>> gpu_logits(const ModelWeights& m, const GpuEngineOptions& o) {
  GpuEngine e(m, o);
  std::vector<std::vector<float>> out;
  for (int32_t t : kTokens) {
    out.emplace_back();
    e.decode(t, &out.back());
  }
  return out;
}

std::string describe(const ModelConfig& c, QuantType q, test::Split s, bool graph) {
  return c.name + " " + quant_name(q) + ", " + test::split_name(s) + ", graph " +
         (graph ? "on" : "off");
}

// F32/BF16: logits within 1e-3 of max |logit| for every step; greedy tokens over 16 steps equal
// the CPU's (teacher-forced; a near-tie of the CPU's top two is reported, at most one allowed).
void check_exact_path(const ModelConfig& c, QuantType q, test::Split split, bool graph,
                      CpuHandoff handoff = CpuHandoff::Flags) {
  const ModelWeights& m = model(c, q);
  const std::string tag = describe(c, q, split, graph);
  SCOPED_TRACE(tag);
  GpuEngineOptions o = gpu_opt(c, split, graph);
  o.cpu_handoff = handoff;
  const auto ref = cpu_logits(m);
  const auto got = gpu_logits(m, o);
  double worst = 0;
  int outliers = 0;
  for (size_t s = 0; s < ref.size(); ++s) {
    ASSERT_EQ(got[s].size(), ref[s].size());
    const double e = rel_err(got[s].data(), ref[s].data(), ref[s].size());
    worst = std::max(worst, e);
    // One step may exceed the bound (up to 5e-2): two experts whose biased scores are closer
    // than float rounding can be chosen differently by the two engines (one router, one step).
    if (e > 1e-3) {
      ++outliers;
      EXPECT_LE(e, 5e-2) << "step " << s;
    }
  }
  EXPECT_LE(outliers, 1) << "steps beyond 1e-3 of max |logit|";
  const double tol = 1e-3;
  GpuEngine g(m, o);
  const std::vector<int32_t> toks = g.generate_greedy(kTokens[0], 16);
  CpuEngineOptions co;
  co.threads = 3;
  co.max_context = 64;
  co.pin_threads = false;
  CpuEngine cpu(m, co);
  std::vector<float> lg;
  int32_t tok = kTokens[0];
  int near_ties = 0, same = 0;
  for (size_t i = 0; i < toks.size(); ++i) {
    cpu.decode(tok, &lg);
    const int32_t want = CpuEngine::argmax(lg.data(), static_cast<int64_t>(lg.size()));
    if (want == toks[i]) {
      ++same;
    } else {
      const double gap = lg[static_cast<size_t>(want)] - lg[static_cast<size_t>(toks[i])];
      const bool tie = gap <= tol * max_abs(lg);
      near_ties += tie;
      EXPECT_TRUE(tie) << "step " << i << ": cpu " << want << ", gpu " << toks[i] << ", gap "
                       << gap;
    }
    tok = toks[i];
  }
  EXPECT_LE(near_ties, 1);
  std::printf(
      "[DeepseekGpu %s] logits worst %.3g of max|logit|; greedy 16: %d same, %d near-ties\n",
      tag.c_str(), worst, same, near_ties);
}

TEST(DeepseekGpu, F32MatchesCpuEngineAllOnGpu) {
  KTUNE_REQUIRE_GPU();
  for (const ModelConfig& c : {v3_config(), v2_config()}) {
    for (bool graph : {false, true})
      check_exact_path(c, QuantType::F32, test::Split::AllOnGpu, graph);
  }
}

TEST(DeepseekGpu, Bf16MatchesCpuEngine) {
  KTUNE_REQUIRE_GPU();
  check_exact_path(v3_config(), QuantType::BF16, test::Split::AllOnGpu, true);
  check_exact_path(v2_config(), QuantType::BF16, test::Split::EvenOnGpu, true);
}

TEST(DeepseekGpu, F32MatchesCpuEngineHybrid) {
  KTUNE_REQUIRE_GPU();
  for (const ModelConfig& c : {v3_config(), v2_config()}) {
    for (test::Split s :
         {test::Split::EvenOnGpu, test::Split::AllOnCpu, test::Split::FirstHalfLayersOnGpu}) {
      for (bool graph : {false, true}) check_exact_path(c, QuantType::F32, s, graph);
    }
  }
  check_exact_path(v3_config(), QuantType::F32, test::Split::EvenOnGpu, true, CpuHandoff::HostNode);
}

// The Hugging Face fixture (tests/data/deepseek-v3-tiny-hf: F32, attn_kv_b kept whole) against
// transformers' float64 logits, decoded token by token on the GPU: the CPU engine's bound (1e-4).
TEST(DeepseekGpu, HfFixtureMatchesTransformers) {
  KTUNE_REQUIRE_GPU();
  const std::string dir = std::string(KTUNE_TEST_DATA) + "/deepseek-v3-tiny-hf";
  if (!std::filesystem::exists(dir + "/reference.json")) GTEST_SKIP() << "no " << dir;
  std::ifstream in(dir + "/reference.json");
  const nlohmann::json j = nlohmann::json::parse(in);
  std::vector<int32_t> toks = j["prompt"].get<std::vector<int32_t>>();
  const auto cont = j["continuation"].get<std::vector<int32_t>>();
  std::vector<std::vector<double>> rows = j["prefill"].get<std::vector<std::vector<double>>>();
  for (const auto& r : j["decode"].get<std::vector<std::vector<double>>>()) rows.push_back(r);
  toks.insert(toks.end(), cont.begin(), cont.end());
  const ModelWeights m = load_model(dir);
  for (bool graph : {false, true}) {
    GpuEngineOptions o;
    o.max_context = 64;
    o.cuda_graph = graph;
    GpuEngine e(m, o);
    std::vector<float> lg;
    double worst = 0;
    for (size_t i = 0; i < rows.size(); ++i) {
      e.decode(toks[i], &lg);
      double mx = 0, err = 0;
      for (size_t v = 0; v < rows[i].size(); ++v) {
        mx = std::max(mx, std::fabs(rows[i][v]));
        err = std::max(err, std::fabs(lg[v] - rows[i][v]));
      }
      worst = std::max(worst, err / mx);
      EXPECT_LT(err / mx, 1e-4) << "row " << i;
      EXPECT_EQ(CpuEngine::argmax(lg.data(), static_cast<int64_t>(lg.size())),
                std::max_element(rows[i].begin(), rows[i].end()) - rows[i].begin())
          << "row " << i;
    }
    std::printf("[DeepseekGpu HF fixture, graph %s] worst row %.3g of max|logit|\n",
                graph ? "on" : "off", worst);
  }
}

// Q8_0 / Q4_0: the CPU quantizes activations, the GPU does not (see the top of the file).
TEST(DeepseekGpu, QuantizedNearCpuEngine) {
  KTUNE_REQUIRE_GPU();
  for (const ModelConfig& c : {v3_config(), v2_config()}) {
    for (QuantType q : {QuantType::Q8_0, QuantType::Q4_0}) {
      for (test::Split s : {test::Split::AllOnGpu, test::Split::EvenOnGpu}) {
        const ModelWeights& m = model(c, q);
        const std::string tag = describe(c, q, s, true);
        SCOPED_TRACE(tag);
        const auto ref = cpu_logits(m);
        const auto got = gpu_logits(m, gpu_opt(c, s, true));
        std::vector<double> e;
        int agree = 0;
        for (size_t i = 0; i < ref.size(); ++i) {
          e.push_back(rel_err(got[i].data(), ref[i].data(), ref[i].size()));
          agree += CpuEngine::argmax(got[i].data(), static_cast<int64_t>(got[i].size())) ==
                   CpuEngine::argmax(ref[i].data(), static_cast<int64_t>(ref[i].size()));
        }
        std::sort(e.begin(), e.end());
        std::printf("[DeepseekGpu %s] vs cpu: median row %.3g, worst %.3g, argmax agrees %d/%zu\n",
                    tag.c_str(), e[e.size() / 2], e.back(), agree, ref.size());
        EXPECT_LT(e[e.size() / 2], 0.15);
        EXPECT_LT(e.back(), 0.9);
      }
    }
  }
}

// graph on = off, fused = unfused, all-GPU and hybrid: bit-identical logits; run to run and after
// reset the same greedy tokens; generate_greedy = argmax of decode's logits fed back; prefill =
// the same decode steps.
TEST(DeepseekGpu, GraphFusedUnfusedAndRunToRunBitIdentical) {
  KTUNE_REQUIRE_GPU();
  for (const ModelConfig& c : {v3_config(), v2_config()}) {
    const ModelWeights& m = model(c, QuantType::Q8_0);
    for (test::Split s : {test::Split::AllOnGpu, test::Split::EvenOnGpu}) {
      SCOPED_TRACE(c.name + " " + test::split_name(s));
      const auto base = gpu_logits(m, gpu_opt(c, s, false));
      for (const auto& [graph, kernel] : {std::pair<bool, MoeKernel>{true, MoeKernel::Fused},
                                          {false, MoeKernel::Unfused},
                                          {true, MoeKernel::Unfused}}) {
        const auto other = gpu_logits(m, gpu_opt(c, s, graph, kernel));
        for (size_t i = 0; i < base.size(); ++i) {
          EXPECT_EQ(std::memcmp(base[i].data(), other[i].data(), base[i].size() * 4), 0)
              << "step " << i << ", graph " << graph << ", " << moe_kernel_name(kernel);
        }
      }
      GpuEngine a(m, gpu_opt(c, s, true));
      EXPECT_EQ(a.hybrid(), s != test::Split::AllOnGpu);
      const auto ta = a.generate_greedy(3, 16);
      a.reset();
      EXPECT_EQ(a.generate_greedy(3, 16), ta);
      GpuEngine b(m, gpu_opt(c, s, false));
      int32_t tok = 3;
      std::vector<float> lg;
      for (size_t i = 0; i < ta.size(); ++i) {
        b.decode(tok, &lg);
        tok = CpuEngine::argmax(lg.data(), static_cast<int64_t>(lg.size()));
        EXPECT_EQ(tok, ta[i]) << "step " << i;
      }
      GpuEngine p(m, gpu_opt(c, s, true));
      std::vector<float> pl;
      p.prefill(kTokens.data(), static_cast<int64_t>(kTokens.size()), &pl);
      EXPECT_EQ(p.position(), static_cast<int64_t>(kTokens.size()));
      EXPECT_EQ(std::memcmp(pl.data(), base.back().data(), pl.size() * 4), 0);
      std::string str;
      for (int32_t t : ta) str += std::to_string(t) + " ";
      std::printf("[DeepseekGpu %s %s] greedy: %s\n", c.name.c_str(), test::split_name(s),
                  str.c_str());
    }
  }
}

TEST(DeepseekGpu, ErrorsAreClear) {
  KTUNE_REQUIRE_GPU();
  const ModelConfig c = v3_config();
  const ModelWeights& m = model(c, QuantType::Q8_0);
  GpuEngineOptions o = gpu_opt(c, test::Split::AllOnGpu, true);
  o.max_context = 4;
  GpuEngine e(m, o);
  EXPECT_THROW(e.generate_greedy(1, 5), Error);
  EXPECT_EQ(e.generate_greedy(1, 4).size(), 4u);
  EXPECT_THROW(e.decode(1, nullptr), Error);
  e.reset();
  const int32_t bad = 100000;
  EXPECT_THROW(e.prefill(&bad, 1, nullptr), Error);
  // The sequence API (what `ktune run` calls for every GPU placement): one sequence, batch of 1
  // through the single-sequence step, a larger batch refused. (It dereferenced the qwen3moe
  // engine's state and crashed `ktune run` on deepseek2 models before.)
  e.reset();
  EXPECT_EQ(e.max_sequences(), 1);
  EXPECT_EQ(e.sequence(), 0);
  e.set_sequence(0);
  EXPECT_THROW(e.set_sequence(1), Error);
  EXPECT_EQ(e.position(0), 0);
  const int32_t one = 1, two[2] = {1, 2};
  EXPECT_EQ(e.generate_greedy_batch(&one, 1, 2).size(), 2u);
  EXPECT_EQ(e.position(0), 2);
  EXPECT_THROW(e.decode_batch(two, 2, nullptr), Error);
  // A layer split over several GPUs is refused for deepseek2 (before any GPU work).
  GpuEngineOptions split = gpu_opt(c, test::Split::AllOnGpu, true);
  split.layer_device = {0, 0, 1, 1};
  try {
    GpuEngine s(m, split);
    ADD_FAILURE() << "a deepseek2 layer split was accepted";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("deepseek2"), std::string::npos) << err.what();
  }
}

}  // namespace
}  // namespace ktune
