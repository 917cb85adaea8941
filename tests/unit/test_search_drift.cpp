// Routing drift: a placement searched on one model's routing, run on a model routed elsewhere,
// is flagged with the numbers; the same model's routing is not.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "ktune/engine/cpu_engine.h"
#include "ktune/engine/error.h"
#include "ktune/engine/synthetic.h"
#include "search/drift.h"
#include "search/search.h"
#include "test_search_util.h"

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

  // A short run of the same model (6 tokens against 512 searched) differs by sampling alone:
  // its raw distance is large, not drift.
  const RoutingDrift brief = routing_drift(p, stats, live_counts(3, 1.5, 6));
  std::printf("[ drift ] 6 tokens: distance %.3f, sampling %.3f\n", brief.distance,
              brief.sampling_distance);
  EXPECT_GT(brief.distance, 0.15);
  EXPECT_GT(brief.sampling_distance, 0.1);
  EXPECT_FALSE(brief.drifted) << brief.message;

  // Statistics other than the ones named in the placement.
  profile::RouterStats other = stats;
  other.counts[0][0] += 1;
  other.counts[0][1] -= 1;
  EXPECT_FALSE(routing_drift(p, other, searched_live).digest_matches);
  // Shapes that disagree are an error, not a verdict.
  other.counts.pop_back();
  EXPECT_THROW(routing_drift(p, other, searched_live), Error);
}

// `ktune run --config` (run_bench.cpp): the profile the placement names is read from disk, as
// written or beside the placement's file; a run routed elsewhere gets one warning line.
TEST(SearchDrift, RunWarningReadsTheProfileThePlacementNames) {
  const ModelConfig cfg = *find_preset("tiny");
  const auto searched_live = live_counts(3, 1.5, 512);
  profile::ProfileSummary prof = test::h100_profile();
  prof.kind = "model";
  prof.model = {"tiny", "q8_0", cfg.n_layers, cfg.n_experts, cfg.n_experts_used, 1000};
  prof.router.tokens = 512;
  for (const auto& row : searched_live) prof.router.counts.emplace_back(row.begin(), row.end());
  const std::string dir = ::testing::TempDir() + "drift_" + std::to_string(getpid()) + "/";
  std::filesystem::create_directories(dir);
  {
    nlohmann::json doc;
    doc["ktune_profile"] = profile::kProfileSchemaVersion;
    doc["summary"] = prof;
    std::ofstream(dir + "searched.json") << doc.dump();
  }
  const RouterModel r = router_from_counts(prof.router.counts, prof.router.tokens, cfg);
  const ModelInfo mi = model_info(cfg, QuantType::Q8_0, QuantType::Q8_0, "synth:tiny");
  Placement p = make_placement(mi, EngineSettings{}, hottest_sets(r, std::vector<int64_t>(4, 3)),
                               4096);
  EXPECT_FALSE(wants_drift_check(p));  // not searched: nothing to count
  EXPECT_EQ(drift_warning(p, searched_live), "");
  p.searched_on = SearchedOn{"searched.json", r.digest};
  p.file = dir + "best.yaml";  // the profile beside the placement
  EXPECT_TRUE(wants_drift_check(p));
  EXPECT_EQ(drift_warning(p, live_counts(3, 1.5, 512)), "");
  const std::string moved = drift_warning(p, live_counts(4, 1.5, 512));
  EXPECT_NE(moved.find("routing drifted"), std::string::npos) << moved;
  EXPECT_EQ(drift_warning(p, {}), "");  // no live counts (an engine that does not count)
  p.searched_on->profile = dir + "missing.json";
  EXPECT_NE(drift_warning(p, searched_live).find("not checked"), std::string::npos);
  p.searched_on->router_stats = "uniform";  // searched without statistics: nothing to compare
  EXPECT_FALSE(wants_drift_check(p));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace ktune::search
