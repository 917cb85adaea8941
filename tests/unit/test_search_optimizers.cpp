// The optimizers: greedy and DP within 1 % of exhaustive enumeration on random small instances
// (random tables, and tables from the cost model), restrictions and budgets respected.
#include <gtest/gtest.h>

#include <random>

#include "search/cost_model.h"
#include "search/optimizers.h"
#include "search/search.h"
#include "test_search_util.h"

namespace ktune::search {
namespace {

// A random table per layer: decreasing with noise, a saving when the last CPU expert leaves
// (the hand-off), and sometimes an increase (GPU experts that cost more than they save).
Problem random_problem(std::mt19937_64& rng, int layers, int experts) {
  std::uniform_real_distribution<double> u(0, 1);
  Problem p;
  for (int l = 0; l < layers; ++l) {
    std::vector<double> row(size_t(experts) + 1);
    const double slope = u(rng) * 2 - 0.4;  // mostly improving, sometimes worsening
    const double curve = u(rng);
    for (int m = 0; m <= experts; ++m) {
      const double x = double(m) / experts;
      row[size_t(m)] = 10 - slope * (x + curve * x * x) * 5 + u(rng) * 0.3;
    }
    row[size_t(experts)] -= u(rng) * 2;                        // the hand-off saved
    if (u(rng) < 0.2) row[size_t(experts / 2)] = kInfeasible;  // a disallowed point
    p.cost.push_back(row);
    p.unit_bytes.push_back(1 + int64_t(rng() % 3));
  }
  int64_t all = 0;
  for (int64_t b : p.unit_bytes) all += b * experts;
  p.budget = int64_t(u(rng) * double(all));
  return p;
}

TEST(SearchOptimizers, GreedyAndDpWithinOnePercentOfExhaustiveOnRandomInstances) {
  std::mt19937_64 rng(20261127);
  int compared = 0, greedy_exact = 0, dp_exact = 0;
  double worst_greedy = 0, worst_dp = 0;
  for (int trial = 0; trial < 300; ++trial) {
    const int layers = 2 + int(rng() % 4), experts = 2 + int(rng() % 6);
    const Problem p = random_problem(rng, layers, experts);
    const Solution ex = solve_exhaustive(p);
    const Solution g = solve_greedy(p);
    const Solution d = solve_dp(p);
    if (!ex.feasible()) {
      EXPECT_FALSE(g.feasible());
      EXPECT_FALSE(d.feasible());
      continue;
    }
    ASSERT_TRUE(g.feasible()) << trial;
    ASSERT_TRUE(d.feasible()) << trial;
    EXPECT_LE(g.bytes, p.budget);
    EXPECT_LE(d.bytes, p.budget);
    EXPECT_DOUBLE_EQ(evaluate(p, g.m), g.cost);
    EXPECT_GE(g.cost, ex.cost - 1e-9);  // nothing beats exhaustive
    EXPECT_GE(d.cost, ex.cost - 1e-9);
    worst_greedy = std::max(worst_greedy, g.cost / ex.cost - 1);
    worst_dp = std::max(worst_dp, d.cost / ex.cost - 1);
    greedy_exact += g.cost <= ex.cost + 1e-9;
    dp_exact += d.cost <= ex.cost + 1e-9;
    ++compared;
  }
  std::printf(
      "[ random instances ] %d compared: greedy exact in %d (worst +%.3f %%), DP exact in "
      "%d (worst +%.3f %%)\n",
      compared, greedy_exact, 100 * worst_greedy, dp_exact, 100 * worst_dp);
  EXPECT_GT(compared, 200);
  EXPECT_LE(worst_greedy, 0.01);
  EXPECT_LE(worst_dp, 0.01);
}

TEST(SearchOptimizers, WithinOnePercentOnCostModelTables) {
  // Small models, random budgets and machines: the tables the search actually solves.
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> u(0, 1);
  int compared = 0;
  for (int trial = 0; trial < 40; ++trial) {
    ModelConfig cfg = *find_preset("tiny");
    cfg.n_layers = 2 + int64_t(rng() % 3);
    cfg.n_experts = 4 + int64_t(rng() % 3);
    cfg.n_experts_used = 2;
    profile::ProfileSummary s = test::h100_profile();
    s.gpu_costs[0].launch_eager_us = 1 + u(rng) * 60;
    s.cpu_costs.moe_decode_gb_s = {{16, 5 + u(rng) * 100}};
    const ModelInfo mi = model_info(cfg, QuantType::Q8_0, QuantType::Q8_0, "synth:tiny");
    std::vector<std::vector<int64_t>> counts(size_t(cfg.n_layers),
                                             std::vector<int64_t>(size_t(cfg.n_experts)));
    const int64_t tokens = 1000;
    for (auto& row : counts) {
      for (int64_t& c : row) c = int64_t(rng() % uint64_t(tokens));  // skewed at random
    }
    const CostModel cm(machine_costs(s, {}), mi, router_from_counts(counts, tokens, cfg),
                       parse_workload("prompt=600,gen=200"));
    EngineSettings e;
    e.cuda_graph = rng() % 2 == 0;
    e.kernel = !e.cuda_graph && rng() % 2 ? MoeKernel::Unfused : MoeKernel::Fused;
    e.cpu_threads = 16;
    Problem p;
    p.cost = cm.layer_tables(e);
    p.unit_bytes = mi.bytes.expert;
    p.budget = int64_t(u(rng) * double(mi.bytes.expert[0] * cfg.n_experts * cfg.n_layers));
    const Solution ex = solve_exhaustive(p);
    ASSERT_TRUE(ex.feasible());
    const Solution g = solve_greedy(p), d = solve_dp(p);
    ASSERT_TRUE(g.feasible() && d.feasible());
    EXPECT_LE(g.cost, ex.cost * 1.01) << trial;
    EXPECT_LE(d.cost, ex.cost * 1.01) << trial;
    ++compared;
  }
  EXPECT_EQ(compared, 40);
}

TEST(SearchOptimizers, QuantisedDpFillsWhatRoundingLeft) {
  // 50 layers x 64 experts, budget of 1000 experts: with max_units 400 each unit is 3 experts
  // (layers round up to whole units); the greedy fill after the DP uses the bytes rounding left,
  // so the result stays close to the unquantised DP.
  Problem p;
  for (int l = 0; l < 50; ++l) {
    std::vector<double> row(65);
    for (int m = 0; m <= 64; ++m) row[size_t(m)] = 100.0 / (1 + m + 0.1 * l);
    p.cost.push_back(row);
    p.unit_bytes.push_back(1000);
  }
  p.budget = 1000 * 1000 + 999;
  const Solution coarse = solve_dp(p, 400), fine = solve_dp(p, 1 << 20);
  ASSERT_TRUE(coarse.feasible() && fine.feasible());
  EXPECT_LE(coarse.bytes, p.budget);
  EXPECT_EQ(fine.bytes, 1000 * 1000);  // every expert the budget allows
  EXPECT_LE(coarse.cost, fine.cost * 1.01);
  EXPECT_GT(coarse.bytes, p.budget - 3 * 1000);  // little left unused
}

TEST(SearchOptimizers, MinimumBytesForcesExpertsOntoTheGpu) {
  // The host cannot hold everything: at least 3 experts' bytes must go to the GPU even though
  // GPU experts cost more here.
  Problem p;
  for (int l = 0; l < 2; ++l) p.cost.push_back({1.0, 2.0, 3.0, 4.0});
  p.unit_bytes = {10, 10};
  p.budget = 60;
  p.min_bytes = 30;
  for (const Solution& s : {solve_greedy(p), solve_dp(p), solve_exhaustive(p)}) {
    ASSERT_TRUE(s.feasible()) << s.method;
    EXPECT_EQ(s.bytes, 30) << s.method;
    EXPECT_DOUBLE_EQ(s.cost, 5.0) << s.method;
  }
  p.budget = 20;  // cannot meet the minimum
  EXPECT_FALSE(solve_greedy(p).feasible());
  EXPECT_FALSE(solve_dp(p).feasible());
  EXPECT_FALSE(solve_exhaustive(p).feasible());
}

TEST(SearchOptimizers, ExhaustiveRefusesLargeInstances) {
  Problem p;
  p.cost.assign(20, std::vector<double>(129, 1.0));
  p.unit_bytes.assign(20, 1);
  p.budget = 100;
  const Solution s = solve_exhaustive(p);
  EXPECT_FALSE(s.feasible());
  EXPECT_EQ(s.method, "exhaustive (too large)");
}

}  // namespace
}  // namespace ktune::search
