// Routing drift: a placement searched on one model's routing, run on a model routed elsewhere,
// is flagged with the numbers; the same model's routing is not.
#include <gtest/gtest.h>

#include <random>

#include "ktune/engine/cpu_engine.h"
#include "ktune/engine/error.h"
#include "ktune/engine/synthetic.h"
#include "search/drift.h"
#include "search/search.h"

namespace ktune::search {
namespace {

std::vector<std::vector<uint64_t>> live_counts(uint64_t seed, double zipf, int tokens) {
  SynthOptions so;
  so.preset = "tiny";
  so.seed = seed;
  so.zipf_s = zipf;
  const ModelWeights w = make_synthetic_model(so);
  CpuEngineOptions eo;
  eo.threads = 1;
  eo.max_context = tokens + 8;
  eo.pin_threads = false;
  CpuEngine engine(w, eo);
  std::vector<int32_t> t(static_cast<size_t>(tokens));
  std::mt19937 rng(uint32_t(seed) + 11);
  for (auto& x : t) x = int32_t(rng() % uint32_t(w.cfg.vocab));
  engine.prefill(t.data(), tokens, nullptr, false);
  return engine.expert_counts();
}

TEST(SearchDrift, FlagsRoutingThatMovedAwayFromTheSearchedStatistics) {
  const ModelConfig cfg = *find_preset("tiny");
  // Searched on a skewed model: its hottest 3 experts per layer on the GPU.
  const auto searched_live = live_counts(3, 1.5, 512);
  profile::RouterStats stats;
  stats.tokens = 512;
  for (const auto& row : searched_live) stats.counts.emplace_back(row.begin(), row.end());
  const RouterModel r = router_from_counts(stats.counts, stats.tokens, cfg);
  const ModelInfo mi = model_info(cfg, QuantType::Q8_0, QuantType::Q8_0, "synth:tiny");
  EngineSettings s;
  Placement p = make_placement(mi, s, hottest_sets(r, std::vector<int64_t>(4, 3)), 4096);
  p.searched_on = SearchedOn{"profile.json", r.digest};

  // The same model, another prompt: no drift.
  const RoutingDrift same = routing_drift(p, stats, live_counts(3, 1.5, 512));
  EXPECT_TRUE(same.digest_matches);
  EXPECT_FALSE(same.drifted) << same.message;
  EXPECT_GT(same.searched_gpu_share, 3.0 / 8 + 0.1);  // the hot set took more than its share

  // A model whose popular experts are others (another seed's permutation): flagged.
  const RoutingDrift moved = routing_drift(p, stats, live_counts(4, 1.5, 512));
  EXPECT_TRUE(moved.drifted);
  EXPECT_LT(moved.live_gpu_share, moved.searched_gpu_share - 0.05);
  EXPECT_NE(moved.message.find("re-profile"), std::string::npos);
  EXPECT_NE(moved.message.find(" %"), std::string::npos);
  std::printf("[ drift ] %s\n", moved.message.c_str());

  // Statistics other than the ones named in the placement.
  profile::RouterStats other = stats;
  other.counts[0][0] += 1;
  other.counts[0][1] -= 1;
  EXPECT_FALSE(routing_drift(p, other, searched_live).digest_matches);
  // Shapes that disagree are an error, not a verdict.
  other.counts.pop_back();
  EXPECT_THROW(routing_drift(p, other, searched_live), Error);
}

}  // namespace
}  // namespace ktune::search
