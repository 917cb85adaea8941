// The GPU engine's router statistics (GpuEngineOptions::count_experts, GpuEngine::expert_counts):
// the selections counted on the device in the router's top-k tail, against the CPU engine's
// selection counts for the same tokens (per step and layer: the selected set), and identical
// across the GPU engine's own paths (graph on/off, fused/unfused, hybrid), which route with the
// same bits. `ktune run --config` compares them with the statistics a placement was searched on.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <vector>

#include "engine_test_util.h"
#include "gpu_test_util.h"
#include "ktune/engine/cpu_engine.h"
#include "ktune/engine/gpu_engine.h"

namespace ktune {
namespace {

using Counts = std::vector<std::vector<uint64_t>>;
using test::tiny;

// A fixed token sequence: both engines decode the same tokens whatever they would sample.
std::vector<int32_t> forced_tokens(int64_t n, int64_t vocab) {
  std::vector<int32_t> t;
  for (int64_t i = 0; i < n; ++i) t.push_back(static_cast<int32_t>((i * 389 + 17) % vocab));
  return t;
}

// Per decode step, the counts it added (the step's selections per layer and expert).
std::vector<Counts> per_step(const std::vector<Counts>& after) {
  std::vector<Counts> out;
  for (size_t s = 0; s < after.size(); ++s) {
    Counts d = after[s];
    if (s > 0) {
      for (size_t l = 0; l < d.size(); ++l) {
        for (size_t e = 0; e < d[l].size(); ++e) d[l][e] -= after[s - 1][l][e];
      }
    }
    out.push_back(std::move(d));
  }
  return out;
}

std::vector<Counts> gpu_step_counts(const ModelWeights& m, GpuEngineOptions o,
                                    const std::vector<int32_t>& toks) {
  o.count_experts = true;
  GpuEngine e(m, o);
  std::vector<Counts> after;
  for (int32_t t : toks) {
    e.decode(t, nullptr);
    after.push_back(e.expert_counts());
  }
  return per_step(after);
}

TEST(GpuExpertCounts, MatchTheCpuEnginesSelectionsForTheSameTokens) {
  KTUNE_REQUIRE_GPU();
  const ModelWeights& m = tiny(QuantType::Q8_0);
  const ModelConfig& c = m.cfg;
  const auto toks = forced_tokens(32, c.vocab);
  CpuEngineOptions co;
  co.threads = 4;
  co.max_context = 64;
  co.pin_threads = false;
  CpuEngine cpu(m, co);
  std::vector<Counts> cpu_after;
  for (int32_t t : toks) {
    cpu.decode(t, nullptr);
    cpu_after.push_back(cpu.expert_counts());
  }
  const std::vector<Counts> want = per_step(cpu_after);
  const std::vector<Counts> got = gpu_step_counts(m, {64, true, MoeKernel::Fused}, toks);
  ASSERT_EQ(got.size(), want.size());
  int same = 0, pairs = 0;
  for (size_t s = 0; s < got.size(); ++s) {
    ASSERT_EQ(got[s].size(), static_cast<size_t>(c.n_layers));
    for (size_t l = 0; l < got[s].size(); ++l) {
      ASSERT_EQ(got[s][l].size(), static_cast<size_t>(c.n_experts));
      uint64_t total = 0;
      for (uint64_t v : got[s][l]) {
        EXPECT_LE(v, 1u) << "an expert selected twice by one token";
        total += v;
      }
      EXPECT_EQ(total, static_cast<uint64_t>(c.n_experts_used)) << "step " << s << " layer " << l;
      ++pairs;
      same += got[s][l] == want[s][l];
    }
  }
  // The CPU engine routes from Q8_0 activations, the GPU from float32: a near-tie in a router
  // can pick another expert (and change the later layers of that token). Nearly every (token,
  // layer) must select the same set.
  std::printf("[ expert counts ] %d of %d (token, layer) selections equal to the CPU engine's\n",
              same, pairs);
  EXPECT_GE(same, pairs * 9 / 10);
}

TEST(GpuExpertCounts, IdenticalOnEveryGpuPathAndOffByDefault) {
  KTUNE_REQUIRE_GPU();
  const ModelWeights& m = tiny(QuantType::Q8_0);
  const auto toks = forced_tokens(24, m.cfg.vocab);
  const auto ref = gpu_step_counts(m, {64, true, MoeKernel::Fused}, toks);
  for (bool graph : {false, true}) {
    for (MoeKernel k : {MoeKernel::Fused, MoeKernel::Unfused}) {
      for (test::Split sp : {test::Split::AllOnGpu, test::Split::EvenOnGpu}) {
        GpuEngineOptions o{64, graph, k};
        if (sp != test::Split::AllOnGpu) {
          o.expert_on_gpu = test::expert_map(m.cfg, sp);
          o.cpu_threads = 2;
          o.pin_threads = false;
        }
        EXPECT_EQ(gpu_step_counts(m, o, toks), ref)
            << "graph " << graph << ", " << moe_kernel_name(k) << ", " << test::split_name(sp);
      }
    }
  }
  // Counts accumulate since construction (reset() keeps them), and nothing is counted unless
  // asked for.
  GpuEngineOptions o{64, true, MoeKernel::Fused};
  o.count_experts = true;
  GpuEngine e(m, o);
  for (int32_t t : toks) e.decode(t, nullptr);
  e.reset();
  for (int32_t t : toks) e.decode(t, nullptr);
  const Counts twice = e.expert_counts();
  uint64_t total = 0;
  for (const auto& row : twice) {
    for (uint64_t v : row) total += v;
  }
  EXPECT_EQ(total, 2 * toks.size() * static_cast<uint64_t>(m.cfg.n_layers * m.cfg.n_experts_used));
  GpuEngine off(m, {64, true, MoeKernel::Fused});
  off.decode(toks[0], nullptr);
  EXPECT_TRUE(off.expert_counts().empty());
}

}  // namespace
}  // namespace ktune
