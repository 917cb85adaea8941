// The search's inputs: workload and --assume parsing, router statistics, machine costs from a
// profile (defaults named), thread candidates, SHA-256.
#include <gtest/gtest.h>

#include <numeric>

#include "ktune/engine/error.h"
#include "search/cost_model.h"
#include "search/inputs.h"
#include "test_search_util.h"

namespace ktune::search {
namespace {

TEST(SearchWorkload, ChatIsTheDefaultMix) {
  const Workload w = parse_workload("chat");
  EXPECT_EQ(w.name, "chat");
  ASSERT_EQ(w.requests.size(), 3u);
  int64_t longest = 0;
  for (const Request& r : w.requests) longest = std::max(longest, r.prompt + r.gen);
  EXPECT_GE(w.context, longest);
  EXPECT_NEAR(w.total_weight(), 1.0, 1e-12);
}

TEST(SearchWorkload, KeyValueRequests) {
  Workload w = parse_workload("prompt=2048,gen=256,context=8192");
  ASSERT_EQ(w.requests.size(), 1u);
  EXPECT_EQ(w.requests[0].prompt, 2048);
  EXPECT_EQ(w.requests[0].gen, 256);
  EXPECT_EQ(w.context, 8192);
  // Context defaults to the longest request rounded up to 256.
  w = parse_workload("prompt=1000,gen=30");
  EXPECT_EQ(w.context, 1280);
  w = parse_workload("prompt=512,gen=256,weight=3; prompt=8192,gen=128");
  ASSERT_EQ(w.requests.size(), 2u);
  EXPECT_DOUBLE_EQ(w.requests[0].weight, 3);
  EXPECT_EQ(w.context, 8448);
}

TEST(SearchWorkload, BadTextIsAUsageErrorNamingTheFlag) {
  for (const char* bad :
       {"", "prompt=abc,gen=1", "prompt=0,gen=1", "prompt=10", "gen=5", "prompt=10,gen=5,context=8",
        "prompt=1,gen=1,colour=red", "prompt=1,gen=1,weight=-2", "prompt=1,prompt=2,gen=1",
        "prompt 5", "prompt=1,gen=1;;prompt=2,gen=2", "prompt=99999999999,gen=1"}) {
    try {
      parse_workload(bad);
      ADD_FAILURE() << "accepted: " << bad;
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::Usage) << bad;
      EXPECT_EQ(e.where().rfind("--workload", 0), 0u) << bad;
    }
  }
}

TEST(SearchWorkload, ContextBeyondTheModelIsRefused) {
  const ModelConfig cfg = *find_preset("tiny");  // trained context 4096
  EXPECT_NO_THROW(check_workload_for_model(parse_workload("prompt=1000,gen=100"), cfg));
  EXPECT_THROW(check_workload_for_model(parse_workload("chat"), cfg), Error);
}

TEST(SearchAssumptions, KnownKeysOnly) {
  const Assumptions a = parse_assumptions("launch_eager_us=10, gpu_prefill_gflop_s=8e4");
  EXPECT_DOUBLE_EQ(a.values.at("launch_eager_us"), 10);
  EXPECT_DOUBLE_EQ(a.values.at("gpu_prefill_gflop_s"), 8e4);
  EXPECT_TRUE(parse_assumptions("").values.empty());
  for (const char* bad : {"bogus=1", "launch_eager_us", "launch_eager_us=0", "sync_us=fast"}) {
    EXPECT_THROW(parse_assumptions(bad), Error) << bad;
  }
}

TEST(SearchMachine, ProfileNumbersAssumptionsAndNamedDefaults) {
  profile::ProfileSummary s = test::h100_profile();
  s.gpu_costs[0].host_node_us = 0;  // not measured
  s.cpu_costs.prefill_gflop_s.clear();
  const MachineCosts m = machine_costs(s, parse_assumptions("launch_eager_us=12"));
  EXPECT_TRUE(m.has_gpu);
  EXPECT_DOUBLE_EQ(m.launch_eager_us, 12);            // --assume wins
  EXPECT_DOUBLE_EQ(m.flag_handoff_us, 3.4);           // the profile's
  EXPECT_DOUBLE_EQ(m.host_node_us, 27);               // default for 0
  EXPECT_DOUBLE_EQ(m.cpu_prefill_at(16), 40.0 * 16);  // default per thread
  auto mentions = [&](const char* key) {
    for (const std::string& n : m.notes) {
      if (n.find(key) != std::string::npos) return true;
    }
    return false;
  };
  EXPECT_TRUE(mentions("host_node_us"));
  EXPECT_TRUE(mentions("launch_eager_us"));
  EXPECT_TRUE(mentions("cpu prefill"));
  EXPECT_FALSE(mentions("flag_handoff_us"));
}

TEST(SearchMachine, KernelCurvesInterpolateAndExtrapolateAlongTheirEnds) {
  KernelCurve k;
  k.points = {{1e6, 5}, {3e6, 7}, {5e6, 11}};  // 1 µs per MB, then 2 µs per MB
  EXPECT_DOUBLE_EQ(k.us(2e6), 6);
  EXPECT_DOUBLE_EQ(k.us(4e6), 9);
  EXPECT_DOUBLE_EQ(k.us(6e6), 13);   // beyond: the last segment's rate
  EXPECT_DOUBLE_EQ(k.us(0.5e6), 4.5);  // below: the first segment down towards its latency
  EXPECT_DOUBLE_EQ(k.us(0), 4);
  k.points = {{1e6, 2}, {2e6, 10}};  // a steep first segment would cross zero below 1 MB
  EXPECT_DOUBLE_EQ(k.us(0.5e6), 1);  // floored at the first point's proportional share
  k.points = {{1e6, 5}, {2e6, 4}};   // noise sloping down: beyond, the last point's average rate
  EXPECT_DOUBLE_EQ(k.us(3e6), 6);
  k.points = {{2e6, 4}};  // one point: proportional
  EXPECT_DOUBLE_EQ(k.us(1e6), 2);
  k.points.clear();  // none: bytes / the single bandwidth
  k.gb_s = 500;
  EXPECT_DOUBLE_EQ(k.us(1e6), 2);
}

TEST(SearchMachine, KernelCurvesComeFromTheProfileUnlessABandwidthIsAssumed) {
  profile::ProfileSummary s = test::h100_profile();
  auto mentions = [](const MachineCosts& m, const char* what) {
    for (const std::string& n : m.notes) {
      if (n.find(what) != std::string::npos) return true;
    }
    return false;
  };
  // An older profile: no curves, bandwidths only, and a note saying so; the CpuMoe call's cost
  // assumed.
  const MachineCosts old = machine_costs(s, {});
  EXPECT_TRUE(old.matvec.points.empty());
  EXPECT_DOUBLE_EQ(old.matvec.us(44e6), 100);  // 440 GB/s
  EXPECT_DOUBLE_EQ(old.router.us(44e6), 100);  // the router as a matvec
  EXPECT_DOUBLE_EQ(old.eager_gap_us, 0);
  EXPECT_DOUBLE_EQ(old.handoff_us, 0);
  EXPECT_DOUBLE_EQ(old.cpu_call_us, 8);
  EXPECT_TRUE(mentions(old, "no kernel times by size"));
  EXPECT_TRUE(mentions(old, "cpu_call_us"));
  // A newer one: its curves, gap, hand-off and CpuMoe call cost.
  s.gpu_costs[0].matvec_us = {{1e6, 4}, {101e6, 104}};
  s.gpu_costs[0].router_us = {{1e6, 10}};
  s.gpu_costs[0].moe_fused_us = {{1e6, 6}, {2e6, 7}};
  s.gpu_costs[0].eager_gap_us = 2.5;
  s.gpu_costs[0].handoff_us = 9;
  s.cpu_costs.moe_call_us = 7;
  const MachineCosts m = machine_costs(s, {});
  EXPECT_DOUBLE_EQ(m.matvec.us(51e6), 54);
  EXPECT_DOUBLE_EQ(m.router.us(2e6), 20);
  EXPECT_DOUBLE_EQ(m.moe_fused.us(3e6), 8);
  EXPECT_DOUBLE_EQ(m.moe_unfused.us(3.7e6), 10);  // no curve: 370 GB/s
  EXPECT_DOUBLE_EQ(m.eager_gap_us, 2.5);
  EXPECT_DOUBLE_EQ(m.handoff_us, 9);
  EXPECT_DOUBLE_EQ(m.cpu_call_us, 7);
  EXPECT_FALSE(mentions(m, "no kernel times by size"));
  EXPECT_FALSE(mentions(m, "cpu_call_us"));
  // --assume of a bandwidth replaces that kernel's curve (a what-if).
  const MachineCosts a = machine_costs(s, parse_assumptions("moe_fused_gb_s=1000,handoff_us=4"));
  EXPECT_DOUBLE_EQ(a.moe_fused.us(3e6), 3);
  EXPECT_DOUBLE_EQ(a.matvec.us(51e6), 54);
  EXPECT_DOUBLE_EQ(a.handoff_us, 4);
}

TEST(SearchMachine, ThreadCandidatesNeverExceedCoresAndDropDominated) {
  profile::ProfileSummary s = test::h100_profile();
  s.cpu.physical_cores = 12;
  // Bandwidth peaks at 8 threads and falls after (contention); prefill keeps rising to 12.
  s.cpu_costs.moe_decode_gb_s = {{1, 8}, {4, 30}, {8, 60}, {12, 50}, {32, 40}};
  s.cpu_costs.prefill_gflop_s = {{1, 40}, {12, 480}};
  s.cpu.read_gb_s = {{1, 10}, {8, 80}, {12, 80}};
  const ModelInfo mi =
      model_info(*find_preset("tiny"), QuantType::Q8_0, QuantType::Q8_0, "synth:tiny");
  const CostModel cm(machine_costs(s, {}), mi, uniform_router(mi.cfg),
                     parse_workload("prompt=64,gen=8"));
  const std::vector<int> t = cm.thread_candidates();
  for (int x : t) EXPECT_LE(x, 12);
  EXPECT_NE(std::find(t.begin(), t.end(), 8), t.end());   // best decode bandwidth
  EXPECT_NE(std::find(t.begin(), t.end(), 12), t.end());  // best prefill
  EXPECT_EQ(std::find(t.begin(), t.end(), 4), t.end());   // beaten by 8 on every curve
  EXPECT_EQ(std::find(t.begin(), t.end(), 1), t.end());
}

TEST(SearchRouter, CountsBecomeProbabilitiesThatSumToTopK) {
  ModelConfig cfg = *find_preset("tiny");  // 4 layers x 8 experts, top-2
  std::vector<std::vector<int64_t>> counts(4, std::vector<int64_t>(8, 0));
  const int64_t tokens = 1000;
  for (auto& row : counts) {
    row = {600, 500, 300, 200, 200, 100, 100, 0};  // sums to 2000 = tokens x top-2
  }
  const RouterModel r = router_from_counts(counts, tokens, cfg);
  EXPECT_TRUE(r.measured);
  for (const auto& p : r.p) {
    EXPECT_NEAR(std::accumulate(p.begin(), p.end(), 0.0), 2.0, 1e-9);
    EXPECT_GT(p[7], 0.0);  // unseen is not never
    EXPECT_LT(p[7], 0.001);
  }
  EXPECT_EQ(r.hot[0][0], 0);
  EXPECT_EQ(r.hot[0][1], 1);
  EXPECT_EQ(r.hot[0][7], 7);
  EXPECT_NEAR(r.hot_share(0, 2), 1100.0 / 2000.0, 1e-3);
  EXPECT_EQ(r.digest.rfind("sha256:", 0), 0u);
  EXPECT_EQ(r.digest.size(), 7u + 64u);
  // A different count changes the digest; uniform has none.
  counts[0][0] = 599;
  counts[0][7] = 1;
  EXPECT_NE(router_from_counts(counts, tokens, cfg).digest, r.digest);
  EXPECT_EQ(uniform_router(cfg).digest, "uniform");
}

TEST(SearchRouter, ProfileStatisticsOfAnotherShapeFallBackToUniform) {
  profile::ProfileSummary s = test::h100_profile();
  s.kind = "model";
  s.model = {"qwen3-30b-a3b", "q4_0", 48, 128, 8, 2654208};
  s.router.tokens = 10;
  s.router.counts.assign(48, std::vector<int64_t>(128, 0));
  for (auto& row : s.router.counts) {
    for (int e = 0; e < 80; ++e) row[size_t(e)] = 1;
  }
  const RouterModel r = router_from_profile(s, *find_preset("tiny"));
  EXPECT_FALSE(r.measured);
  EXPECT_NE(r.note.find("uniform"), std::string::npos);
  const RouterModel same = router_from_profile(s, *find_preset("qwen3-30b-a3b"));
  EXPECT_TRUE(same.measured);
  EXPECT_NE(same.note.find("small samples"), std::string::npos);  // 10 tokens
}

TEST(SearchSha256, KnownVectors) {
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

// deepseek2's dense leading layers route nothing: no routing mass in their expert slots (uniform
// or measured), so the search counts and shares only the MoE layers' experts.
TEST(SearchRouter, DenseLeadingLayersCarryNoMass) {
  const ModelConfig cfg = *find_preset("deepseek-v3");
  ASSERT_GT(cfg.n_dense_lead, 0);
  const RouterModel u = uniform_router(cfg);
  std::vector<std::vector<int64_t>> counts(size_t(cfg.n_layers),
                                           std::vector<int64_t>(size_t(cfg.n_experts), 3));
  const RouterModel m = router_from_counts(counts, 100, cfg);
  for (const RouterModel* r : {&u, &m}) {
    for (int64_t l = 0; l < cfg.n_layers; ++l) {
      const double mass = std::accumulate(r->p[size_t(l)].begin(), r->p[size_t(l)].end(), 0.0);
      if (cfg.is_dense_layer(l)) {
        EXPECT_EQ(mass, 0.0) << l;
        EXPECT_EQ(r->hot_share(l, cfg.n_experts), 0.0) << l;
      } else {
        EXPECT_NEAR(mass, double(cfg.n_experts_used), 1e-9) << l;
      }
    }
  }
}

}  // namespace
}  // namespace ktune::search
