// GpuEngine's batched prefill on the device (ctest label `gpu`; skipped with query_gpus()'s
// reason when there is no usable GPU), on synth:tiny (Q8_0) and its F32, BF16 and Q4_0 variants.
//
//   GpuPrefill.LogitsMatchCpuEngine*   last-token logits of a 37-token prompt (chunks of 16: 16,
//       16, 5) against CpuEngine::prefill. Tolerance as the decode test (test_gpu_engine.cpp):
//       the CPU quantizes every matmul's activations to Q8_0 per 32-element block; that noise
//       e1 (measured on this model's output head) dominates the GPU's own (fp16 activations and
//       weights, 2^-11 relative per operand): max|gpu - cpu| <= 4 e1 sqrt(stages) max|logit|,
//       stages = 1 + 5 * n_layers, floor 1%.
//   GpuPrefill.MatchesDecodeSteps       against the same engine's decode steps (float32
//       activations): the difference is the prefill's fp16 rounding alone. Its noise e_h (relative
//       RMS error of the head's dots with fp16-rounded activations and weights) gives the bound
//       4 e_h sqrt(stages) max|logit| (floor 0.2%); a prompt may exceed it up to 4x (a router
//       near-tie flips an expert: seen in the decode test), at most one of the prompts.
//   GpuPrefill.DecodeAfterPrefill        greedy tokens after prefill = after decode steps, and
//       position() / the device position agree.
//   GpuPrefill.ChunkingIsBitIdentical    chunks of 64, 16, 7 and 1 tokens give the same bits
//       (every kernel computes a token's row independently of the rest of its chunk).
//   GpuPrefill.AfterDecodeAndErrors      prefill at a position > 0; context overflow refused
//       before anything runs; n = 0 does nothing.
//   GpuPrefillHybrid.*                   experts on the CPU: chunks of >= min_staged tokens
//       stage the CPU experts on the GPU, bit-identical to the all-GPU engine (registered host
//       memory and the bounce-buffer fallback); shorter chunks run decode steps, bit-identical
//       to decode steps; a mixed prompt stays within the CPU tolerance.
//   GpuPrefill.DeviceBytesWithinPlan     what the engine allocates fits in what the memory planner
//       plans for the same placement (all on GPU; experts on the CPU with staging).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gpu/engine_test_util.h"
#include "gpu/gpu_test_util.h"
#include "ktune/engine/cpu_engine.h"
#include "ktune/engine/error.h"
#include "ktune/engine/gpu_engine.h"
#include "ktune/engine/memory_plan.h"
#include "ktune/engine/placement.h"
#include "ktune/engine/quant.h"
#include "ktune/engine/synthetic.h"

namespace ktune {
namespace {

using test::tiny;

std::vector<int32_t> prompt(int64_t n, uint32_t seed, int64_t vocab) {
  std::mt19937 gen(seed);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = static_cast<int32_t>(gen() % static_cast<uint32_t>(vocab));
  return t;
}

// Sets an environment variable for the scope (the engine reads its prefill knobs at
// construction).
struct ScopedEnv {
  std::string name;
  ScopedEnv(const char* n, const char* v) : name(n) { setenv(n, v, 1); }
  ~ScopedEnv() { unsetenv(name.c_str()); }
};

GpuEngineOptions gpu_opt(int64_t chunk = 16) {
  GpuEngineOptions o{64, false, MoeKernel::Fused};
  o.max_prefill_chunk = chunk;
  return o;
}

std::vector<float> gpu_prefill(const ModelWeights& m, const GpuEngineOptions& o,
                               const std::vector<int32_t>& toks) {
  GpuEngine e(m, o);
  std::vector<float> lg;
  e.prefill(toks.data(), static_cast<int64_t>(toks.size()), &lg);
  EXPECT_EQ(e.position(), static_cast<int64_t>(toks.size()));
  return lg;
}

std::vector<float> gpu_decode_steps(const ModelWeights& m, const GpuEngineOptions& o,
                                    const std::vector<int32_t>& toks) {
  GpuEngine e(m, o);
  std::vector<float> lg;
  for (size_t i = 0; i < toks.size(); ++i) e.decode(toks[i], i + 1 == toks.size() ? &lg : nullptr);
  return lg;
}

// Relative RMS error of the output head's dots when activations are rounded by `round_x` and
// weights by `round_w` (random normal activations, the model's own weight rows).
template <class RX, class RW>
double head_noise(const ModelWeights& m, RX round_x, RW round_w) {
  const TensorView& w = m.output.data ? m.output : m.tok_embd;
  const int64_t n = w.row_len();
  std::mt19937 gen(7);
  std::normal_distribution<float> nd;
  std::vector<float> x(static_cast<size_t>(n)), xr(x.size()), row(x.size());
  double se = 0, sr = 0;
  for (int trial = 0; trial < 4; ++trial) {
    for (auto& v : x) v = nd(gen);
    round_x(x, xr);
    for (int64_t r = 0; r < std::min<int64_t>(w.n_rows(), 256); ++r) {
      dequantize_row(w.type, w.row(r), row.data(), n);
      double a = 0, b = 0;
      for (int64_t c = 0; c < n; ++c) {
        a += double(row[c]) * x[c];
        b += double(round_w(row[c])) * xr[c];
      }
      se += (a - b) * (a - b);
      sr += a * a;
    }
  }
  return std::sqrt(se / sr);
}

double q8_noise(const ModelWeights& m) {
  return head_noise(
      m,
      [](const std::vector<float>& x, std::vector<float>& xr) {
        std::vector<uint8_t> q(static_cast<size_t>(row_bytes(QuantType::Q8_0, int64_t(x.size()))));
        quantize_row(QuantType::Q8_0, x.data(), q.data(), int64_t(x.size()));
        dequantize_row(QuantType::Q8_0, q.data(), xr.data(), int64_t(x.size()));
      },
      [](float w) { return w; });
}

double fp16_noise(const ModelWeights& m) {
  return head_noise(
      m,
      [](const std::vector<float>& x, std::vector<float>& xr) {
        for (size_t i = 0; i < x.size(); ++i) xr[i] = fp16_to_fp32(fp32_to_fp16(x[i]));
      },
      [](float w) { return fp16_to_fp32(fp32_to_fp16(w)); });
}

double rel_diff(const std::vector<float>& a, const std::vector<float>& ref, double* mx_out) {
  double mx = 0, err = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    mx = std::max(mx, double(std::fabs(ref[i])));
    err = std::max(err, double(std::fabs(a[i] - ref[i])));
  }
  if (mx_out) *mx_out = mx;
  return err / mx;
}

// ---------------------------------------------------------------------------------------------

void check_against_cpu(QuantType qt) {
  const ModelWeights& m = tiny(qt);
  const auto toks = prompt(37, 11, m.cfg.vocab);
  CpuEngineOptions co;
  co.threads = 4;
  co.max_context = 64;
  co.pin_threads = false;
  CpuEngine cpu(m, co);
  std::vector<float> ref;
  cpu.prefill(toks.data(), static_cast<int64_t>(toks.size()), &ref, false);
  const auto got = gpu_prefill(m, gpu_opt(16), toks);
  ASSERT_EQ(got.size(), ref.size());
  const double e1 = q8_noise(m);
  const double stages = 1.0 + 5.0 * static_cast<double>(m.cfg.n_layers);
  const double tol = std::max(0.01, 4.0 * e1 * std::sqrt(stages));
  double mx = 0;
  const double rel = rel_diff(got, ref, &mx);
  const int32_t ac = CpuEngine::argmax(ref.data(), static_cast<int64_t>(ref.size()));
  const int32_t ag = CpuEngine::argmax(got.data(), static_cast<int64_t>(got.size()));
  std::printf(
      "[GpuPrefill %s] 37 tokens in chunks of 16: max|gpu-cpu| %.4g of max|cpu logit| %.4g "
      "(%.4f%%), tolerance %.3f%% (Q8 noise e1 %.4f%%); argmax cpu %d gpu %d\n",
      quant_name(qt), rel * mx, mx, 100 * rel, 100 * tol, 100 * e1, ac, ag);
  EXPECT_LE(rel, tol);
}

TEST(GpuPrefill, LogitsMatchCpuEngineF32) {
  KTUNE_REQUIRE_GPU();
  check_against_cpu(QuantType::F32);
}
TEST(GpuPrefill, LogitsMatchCpuEngineBF16) {
  KTUNE_REQUIRE_GPU();
  check_against_cpu(QuantType::BF16);
}
TEST(GpuPrefill, LogitsMatchCpuEngineQ8_0) {
  KTUNE_REQUIRE_GPU();
  check_against_cpu(QuantType::Q8_0);
}
TEST(GpuPrefill, LogitsMatchCpuEngineQ4_0) {
  KTUNE_REQUIRE_GPU();
  check_against_cpu(QuantType::Q4_0);
}

TEST(GpuPrefill, MatchesDecodeSteps) {
  KTUNE_REQUIRE_GPU();
  for (QuantType qt : {QuantType::Q8_0, QuantType::Q4_0, QuantType::F32}) {
    const ModelWeights& m = tiny(qt);
    const double eh = fp16_noise(m);
    const double stages = 1.0 + 5.0 * static_cast<double>(m.cfg.n_layers);
    const double tol = std::max(0.002, 4.0 * eh * std::sqrt(stages));
    int outliers = 0;
    for (uint32_t seed : {1u, 2u, 3u}) {
      const auto toks = prompt(29 + 6 * seed, seed, m.cfg.vocab);
      const auto a = gpu_prefill(m, gpu_opt(16), toks);
      const auto b = gpu_decode_steps(m, gpu_opt(16), toks);
      double mx = 0;
      const double rel = rel_diff(a, b, &mx);
      std::printf(
          "[GpuPrefill %s] prompt %zu: max|prefill - decode steps| %.4f%% of max|logit| %.4g, "
          "tolerance %.3f%% (fp16 noise e_h %.4f%%)\n",
          quant_name(qt), toks.size(), 100 * rel, mx, 100 * tol, 100 * eh);
      if (rel > tol) {
        ++outliers;
        EXPECT_LE(rel, 4 * tol) << quant_name(qt) << " prompt " << toks.size();
      }
    }
    EXPECT_LE(outliers, 1) << quant_name(qt);
  }
}

TEST(GpuPrefill, DecodeAfterPrefill) {
  KTUNE_REQUIRE_GPU();
  for (QuantType qt : {QuantType::Q8_0, QuantType::Q4_0}) {
    const ModelWeights& m = tiny(qt);
    const auto toks = prompt(37, 5, m.cfg.vocab);
    for (bool graph : {false, true}) {
      GpuEngineOptions o = gpu_opt(16);
      o.cuda_graph = graph;
      GpuEngine a(m, o), b(m, o);
      std::vector<float> la, lb;
      a.prefill(toks.data(), static_cast<int64_t>(toks.size()), &la);
      for (size_t i = 0; i < toks.size(); ++i) {
        b.decode(toks[i], i + 1 == toks.size() ? &lb : nullptr);
      }
      EXPECT_EQ(a.position(), b.position());
      const int32_t ta = CpuEngine::argmax(la.data(), static_cast<int64_t>(la.size()));
      const int32_t tb = CpuEngine::argmax(lb.data(), static_cast<int64_t>(lb.size()));
      EXPECT_EQ(ta, tb);
      const auto ga = a.generate_greedy(ta, 16);
      const auto gb = b.generate_greedy(tb, 16);
      EXPECT_EQ(ga, gb) << quant_name(qt) << (graph ? " graph" : " no graph");
      EXPECT_EQ(a.position(), static_cast<int64_t>(toks.size()) + 16);
      std::string s;
      for (int32_t t : ga) s += std::to_string(t) + " ";
      std::printf("[GpuPrefill %s graph %s] greedy after prefill = after decode steps: %s| %s\n",
                  quant_name(qt), graph ? "on" : "off", ga == gb ? "yes" : "no", s.c_str());
      // And one more teacher-forced step from both, from the same token.
      std::vector<float> na, nb;
      a.decode(7, &na);
      b.decode(7, &nb);
      double mx = 0;
      EXPECT_LE(rel_diff(na, nb, &mx), 0.05);
    }
  }
}

TEST(GpuPrefill, ChunkingIsBitIdentical) {
  KTUNE_REQUIRE_GPU();
  for (QuantType qt : {QuantType::Q8_0, QuantType::Q4_0}) {
    const ModelWeights& m = tiny(qt);
    const auto toks = prompt(41, 9, m.cfg.vocab);
    const auto whole = gpu_prefill(m, gpu_opt(64), toks);
    for (int64_t chunk : {16, 7, 1}) {
      const auto part = gpu_prefill(m, gpu_opt(chunk), toks);
      EXPECT_EQ(std::memcmp(whole.data(), part.data(), whole.size() * 4), 0)
          << quant_name(qt) << " chunk " << chunk;
    }
    // One token.
    const std::vector<int32_t> one = {toks[0]};
    const auto p1 = gpu_prefill(m, gpu_opt(64), one);
    const auto d1 = gpu_decode_steps(m, gpu_opt(64), one);
    double mx = 0;
    const double rel = rel_diff(p1, d1, &mx);
    std::printf("[GpuPrefill %s] one token: max|prefill - decode| %.4f%%\n", quant_name(qt),
                100 * rel);
    EXPECT_LE(rel, 0.02);
  }
}

TEST(GpuPrefill, AfterDecodeAndErrors) {
  KTUNE_REQUIRE_GPU();
  const ModelWeights& m = tiny(QuantType::Q8_0);
  const auto toks = prompt(23, 4, m.cfg.vocab);
  GpuEngine a(m, gpu_opt(16)), b(m, gpu_opt(16));
  for (int32_t t : {3, 99, 512}) {
    a.decode(t, nullptr);
    b.decode(t, nullptr);
  }
  std::vector<float> la, lb;
  a.prefill(toks.data(), static_cast<int64_t>(toks.size()), &la);
  for (size_t i = 0; i < toks.size(); ++i) b.decode(toks[i], i + 1 == toks.size() ? &lb : nullptr);
  EXPECT_EQ(a.position(), 26);
  double mx = 0;
  const double rel = rel_diff(la, lb, &mx);
  std::printf("[GpuPrefill] prefill at position 3: max|prefill - decode steps| %.4f%%\n",
              100 * rel);
  EXPECT_LE(rel, 0.02);
  // 26 + 39 > 64: refused before anything runs.
  const auto more = prompt(39, 8, m.cfg.vocab);
  EXPECT_THROW(a.prefill(more.data(), 39, nullptr), Error);
  EXPECT_EQ(a.position(), 26);
  a.prefill(more.data(), 0, nullptr);
  EXPECT_EQ(a.position(), 26);
  a.prefill(more.data(), 38, nullptr);  // exactly fills the context
  EXPECT_EQ(a.position(), 64);
  EXPECT_THROW(a.decode(1, nullptr), Error);
  a.reset();
  EXPECT_EQ(a.position(), 0);
  // A bad chunk size is a usage error.
  GpuEngineOptions bad = gpu_opt(0);
  EXPECT_THROW(GpuEngine(m, bad), Error);
}

// ---------------------------------------------------------------------------------------------
// Hybrid placements.

using test::Split;
using test::split_name;

GpuEngineOptions hybrid_opt(const ModelWeights& m, Split split) {
  GpuEngineOptions o = gpu_opt(16);
  o.cpu_threads = 3;
  o.pin_threads = false;
  o.expert_on_gpu = test::expert_map(m.cfg, split);
  return o;
}

TEST(GpuPrefillHybrid, StagedExpertsEqualAllGpu) {
  KTUNE_REQUIRE_GPU();
  ScopedEnv min_staged("KTUNE_PREFILL_MIN_STAGED", "1");
  for (QuantType qt : {QuantType::Q8_0, QuantType::Q4_0}) {
    const ModelWeights& m = tiny(qt);
    const auto toks = prompt(37, 3, m.cfg.vocab);
    const auto all_gpu = gpu_prefill(m, gpu_opt(16), toks);
    for (Split sp : {Split::EvenOnGpu, Split::AllOnCpu, Split::FirstHalfLayersOnGpu}) {
      const auto h = gpu_prefill(m, hybrid_opt(m, sp), toks);
      EXPECT_EQ(std::memcmp(h.data(), all_gpu.data(), h.size() * 4), 0)
          << quant_name(qt) << " " << split_name(sp);
      {
        ScopedEnv no_pin("KTUNE_PREFILL_PIN", "0");  // bounce buffers
        const auto hb = gpu_prefill(m, hybrid_opt(m, sp), toks);
        EXPECT_EQ(std::memcmp(hb.data(), all_gpu.data(), hb.size() * 4), 0)
            << quant_name(qt) << " " << split_name(sp) << " bounce";
      }
      std::printf("[GpuPrefillHybrid %s] %s: staged prefill = all-GPU prefill bit for bit\n",
                  quant_name(qt), split_name(sp));
    }
    // Two engines on the same weights at once (the second finds the memory registered).
    GpuEngine a(m, hybrid_opt(m, Split::AllOnCpu)), b(m, hybrid_opt(m, Split::AllOnCpu));
    std::vector<float> la, lb;
    a.prefill(toks.data(), 37, &la);
    b.prefill(toks.data(), 37, &lb);
    EXPECT_EQ(std::memcmp(la.data(), all_gpu.data(), la.size() * 4), 0);
    EXPECT_EQ(std::memcmp(lb.data(), all_gpu.data(), lb.size() * 4), 0);
  }
}

TEST(GpuPrefillHybrid, ShortChunksRunDecodeSteps) {
  KTUNE_REQUIRE_GPU();
  const ModelWeights& m = tiny(QuantType::Q8_0);
  const auto toks = prompt(37, 6, m.cfg.vocab);
  {
    ScopedEnv min_staged("KTUNE_PREFILL_MIN_STAGED", "1000");
    const auto p = gpu_prefill(m, hybrid_opt(m, Split::EvenOnGpu), toks);
    const auto d = gpu_decode_steps(m, hybrid_opt(m, Split::EvenOnGpu), toks);
    EXPECT_EQ(std::memcmp(p.data(), d.data(), p.size() * 4), 0);
  }
  // Chunks 16, 16 staged, the last 5 tokens as decode steps (CPU experts, Q8_0 activations):
  // within the CPU engine's tolerance, and greedy decoding continues like decode steps.
  ScopedEnv min_staged("KTUNE_PREFILL_MIN_STAGED", "8");
  CpuEngineOptions co;
  co.threads = 4;
  co.max_context = 64;
  co.pin_threads = false;
  CpuEngine cpu(m, co);
  std::vector<float> ref;
  cpu.prefill(toks.data(), 37, &ref, false);
  GpuEngine a(m, hybrid_opt(m, Split::AllOnCpu)), b(m, hybrid_opt(m, Split::AllOnCpu));
  std::vector<float> la, lb;
  a.prefill(toks.data(), 37, &la);
  for (size_t i = 0; i < toks.size(); ++i) b.decode(toks[i], i + 1 == toks.size() ? &lb : nullptr);
  const double e1 = q8_noise(m);
  const double tol = std::max(0.01, 4.0 * e1 * std::sqrt(1.0 + 5.0 * m.cfg.n_layers));
  double mx = 0;
  const double rel = rel_diff(la, ref, &mx);
  std::printf("[GpuPrefillHybrid] mixed staged + decode steps vs CpuEngine: %.4f%% (tol %.3f%%)\n",
              100 * rel, 100 * tol);
  EXPECT_LE(rel, tol);
  const int32_t ta = CpuEngine::argmax(la.data(), 1024), tb = CpuEngine::argmax(lb.data(), 1024);
  EXPECT_EQ(ta, tb);
  EXPECT_EQ(a.generate_greedy(ta, 12), b.generate_greedy(tb, 12));
}

TEST(GpuPrefill, DeviceBytesWithinPlan) {
  KTUNE_REQUIRE_GPU();
  const ModelWeights& m = tiny(QuantType::Q8_0);
  Budgets budgets;
  budgets.bytes["cuda:0"] = 80 * kGiB;
  for (bool hybrid : {false, true}) {
    Placement p =
        make_uniform_placement(m.cfg, Device::cuda(0), hybrid ? Device::cpu() : Device::cuda(0));
    p.runtime.context = 64;
    p.runtime.cuda_graph = false;
    const MemoryPlan plan = plan_memory(m, p, budgets);
    const DeviceUse& g = plan.per_device.at("cuda:0");
    GpuEngineOptions o = hybrid ? hybrid_opt(m, Split::AllOnCpu) : gpu_opt(512);
    o.max_context = 64;
    GpuEngine e(m, o);
    // The plan's context reserve is the CUDA context's, not the engine's allocations.
    const int64_t planned = g.total - kGpuContextReserve;
    std::printf("[GpuPrefill] %s: engine %lld bytes, plan %lld (staging %lld)\n",
                hybrid ? "experts on cpu" : "all on gpu", static_cast<long long>(e.device_bytes()),
                static_cast<long long>(planned), static_cast<long long>(g.staging));
    EXPECT_LE(e.device_bytes(), planned);
  }
}

}  // namespace
}  // namespace ktune
