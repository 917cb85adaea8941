// The search end to end, in-process: memory accounting equal to the planner's, every emitted
// placement passing the planner, budgets that force hybrid placements, the launch-bound case,
// hot experts first (router statistics, and a model made with --router-skew), the per-expert
// optimum on a tiny instance, baselines, and the time on the big shapes.
#include <gtest/gtest.h>

#include <chrono>
#include <random>

#include "ktune/engine/cpu_engine.h"
#include "ktune/engine/error.h"
#include "ktune/engine/synthetic.h"
#include "search/emit.h"
#include "search/search.h"
#include "test_search_util.h"

namespace ktune::search {
namespace {

ModelInfo qwen30_q4() {
  return model_info(*find_preset("qwen3-30b-a3b"), QuantType::Q4_0, QuantType::Q4_0,
                    "synth:qwen3-30b-a3b:q4_0");
}

SearchOptions options(const ModelInfo& mi, const std::string& gpu_mem,
                      const std::string& workload = "chat",
                      profile::ProfileSummary prof = test::h100_profile()) {
  return test::search_options(mi, prof, gpu_mem, workload);
}

std::vector<const Candidate*> everything(const SearchResult& r) {
  std::vector<const Candidate*> all;
  for (const auto* list : {&r.ranked, &r.baselines, &r.whole_layer}) {
    for (const Candidate& c : *list) all.push_back(&c);
  }
  return all;
}

void expect_no_internal_notes(const SearchResult& r) {
  for (const std::string& n : r.notes) EXPECT_EQ(n.find("internal"), std::string::npos) << n;
}

TEST(SearchDriver, MemoryModelAgreesWithThePlannerForDeepseek) {
  // deepseek2 prefills token by token on the GPU: the planner counts no staging buffers, and
  // neither may the search (12.7 GB on one DeepSeek-V3 layer's CPU experts otherwise).
  const ModelInfo mi = model_info(*find_preset("deepseek-v2-lite"), QuantType::Q4_0,
                                  QuantType::Q4_0, "synth:deepseek-v2-lite:q4_0");
  const int64_t nl = mi.cfg.n_layers, ne = mi.cfg.n_experts;
  std::mt19937_64 rng(5);
  for (bool graph : {true, false}) {
    const MemoryModel mm = memory_model(mi, graph, 4096);
    const PipelineMemoryModel pm = pipeline_memory_model(mi, graph, 4096);
    for (int trial = 0; trial < 10; ++trial) {
      std::vector<int64_t> counts(static_cast<size_t>(nl));
      for (auto& c : counts) {
        c = trial == 0 ? 0 : trial == 1 ? ne : static_cast<int64_t>(rng() % uint64_t(ne + 1));
      }
      EngineSettings s;
      s.cuda_graph = graph;
      const RouterModel r = uniform_router(mi.cfg);
      const Placement p = make_placement(mi, s, hottest_sets(r, counts), 4096);
      const MemoryPlan plan = plan_memory(mi.cfg, mi.bytes, p, Budgets{});
      EXPECT_EQ(mm.gpu_need(counts), plan.per_device.at("cuda:0").total) << trial;
      EXPECT_EQ(pm.gpu_need(Stages(size_t(nl), 0), counts, 0),
                plan.per_device.at("cuda:0").total)
          << trial;
    }
  }
}

TEST(SearchDriver, MemoryModelAgreesWithThePlannerByteForByte) {
  const ModelInfo mi = qwen30_q4();
  std::mt19937_64 rng(3);
  for (bool graph : {true, false}) {
    for (int64_t context : {1024, 40960}) {
      const MemoryModel mm = memory_model(mi, graph, context);
      for (int trial = 0; trial < 20; ++trial) {
        std::vector<int64_t> counts(48);
        for (auto& c : counts) c = trial == 0 ? 0 : trial == 1 ? 128 : int64_t(rng() % 129);
        EngineSettings s;
        s.cuda_graph = graph;
        const RouterModel r = uniform_router(mi.cfg);
        const Placement p = make_placement(mi, s, hottest_sets(r, counts), context);
        const MemoryPlan plan = plan_memory(mi.cfg, mi.bytes, p, Budgets{});
        EXPECT_EQ(mm.gpu_need(counts), plan.per_device.at("cuda:0").total) << trial;
        const auto cpu = plan.per_device.find("cpu");
        EXPECT_EQ(mm.cpu_need(counts), cpu == plan.per_device.end() ? 0 : cpu->second.total);
      }
    }
  }
}

TEST(SearchDriver, EveryEmittedPlacementPassesThePlannerAlsoAfterARoundTripThroughYaml) {
  const ModelInfo mi = qwen30_q4();
  for (const char* budget : {"6GiB", "10GiB", "20GiB", "70GiB"}) {
    for (const char* wl : {"chat", "prompt=8192,gen=64", "prompt=32,gen=2000,context=32768"}) {
      const SearchOptions opt = options(mi, std::string("cuda:0=") + budget, wl);
      const SearchResult r = run_search(opt);
      expect_no_internal_notes(r);
      ASSERT_FALSE(r.ranked.empty());
      for (const Candidate* c : everything(r)) {
        EXPECT_NO_THROW(check_fits(plan_memory(mi.cfg, mi.bytes, c->placement, opt.budgets)))
            << budget << " " << wl << " " << c->label;
        const std::string yaml = placement_yaml(*c, {"a comment"});
        const Placement back = parse_placement(yaml, "best.yaml", &mi.cfg);
        EXPECT_TRUE(back == c->placement) << c->label;
        EXPECT_NO_THROW(check_fits(plan_memory(mi.cfg, mi.bytes, back, opt.budgets)));
        EXPECT_EQ(back.runtime.context, opt.workload.context);
      }
    }
  }
}

TEST(SearchDriver, ABudgetThatForcesHybrid) {
  const ModelInfo mi = qwen30_q4();
  const SearchResult small = run_search(options(mi, "cuda:0=10GiB"));
  const Candidate& best = small.ranked[size_t(small.best_graph)];
  EXPECT_TRUE(best.settings.gpu);
  EXPECT_GT(best.pred.gpu_experts, 0);
  EXPECT_LT(best.pred.gpu_experts, 48 * 128);
  EXPECT_GT(best.pred.hybrid_layers + best.pred.cpu_layers, 0);
  EXPECT_LE(best.plan.per_device.at("cuda:0").total, int64_t{10} << 30);
  // The whole model fits 70 GiB: everything goes to the GPU.
  const SearchResult big = run_search(options(mi, "cuda:0=70GiB"));
  const Candidate& all = big.ranked[size_t(big.best_graph)];
  EXPECT_EQ(all.pred.gpu_experts, 48 * 128);
  EXPECT_EQ(all.plan.per_device.count("cpu"), 0u);
  EXPECT_GT(all.pred.decode_tok_s, best.pred.decode_tok_s);
}

// With the profile's PCIe assist probe, a budget that keeps most experts on the CPU picks the
// assist (written into the placement's runtime); without the probe it is never chosen and the
// notes say why.
TEST(SearchDriver, PcieAssistIsChosenOnlyWithItsProbe) {
  const ModelInfo mi = qwen30_q4();
  profile::ProfileSummary prof = test::h100_profile();
  prof.cpu_costs.pcie_assist_gb_s = 44;
  prof.cpu_costs.moe_pcie_ratio = 0.88;
  const SearchResult r = run_search(options(mi, "cuda:0=6GiB", "prompt=16,gen=128,context=4096", prof));
  ASSERT_GE(r.best_graph, 0);
  const Candidate& best = r.ranked[size_t(r.best_graph)];
  EXPECT_GT(best.settings.pcie_assist_permille, 0) << best.settings.describe();
  EXPECT_EQ(best.placement.runtime.pcie_assist_permille, best.settings.pcie_assist_permille);
  const SearchResult plain = run_search(options(mi, "cuda:0=6GiB", "prompt=16,gen=128,context=4096"));
  for (const Candidate* c : everything(plain)) EXPECT_EQ(c->settings.pcie_assist_permille, 0);
  bool noted = false;
  for (const std::string& n : plain.notes) noted = noted || n.find("PCIe assist") != std::string::npos;
  EXPECT_TRUE(noted);
  // And the assisted pick is predicted faster than the same run without it.
  EXPECT_GT(best.pred.decode_tok_s, plain.ranked[size_t(plain.best_graph)].pred.decode_tok_s);
}

TEST(SearchDriver, TheKvCacheCompetesWithExpertsForGpuMemory) {
  // Same budget, longer context: the KV cache takes GPU memory experts had.
  const ModelInfo mi = qwen30_q4();
  const SearchResult short_ctx =
      run_search(options(mi, "cuda:0=12GiB", "prompt=1024,gen=256,context=4096"));
  const SearchResult long_ctx =
      run_search(options(mi, "cuda:0=12GiB", "prompt=1024,gen=256,context=40960"));
  const Candidate& a = short_ctx.ranked[size_t(short_ctx.best_graph)];
  const Candidate& b = long_ctx.ranked[size_t(long_ctx.best_graph)];
  const int64_t kv_a = a.plan.per_device.at("cuda:0").kv_cache;
  const int64_t kv_b = b.plan.per_device.at("cuda:0").kv_cache;
  EXPECT_EQ(kv_b, 10 * kv_a);
  // Each expert is 2.53 MiB: the extra KV cache costs about that many experts.
  const double experts_lost = double(kv_b - kv_a) / double(mi.bytes.expert[0]);
  EXPECT_NEAR(double(a.pred.gpu_experts - b.pred.gpu_experts), experts_lost,
              0.1 * experts_lost + 8);
  EXPECT_GT(a.pred.decode_tok_s, b.pred.decode_tok_s);
}

TEST(SearchDriver, LaunchBoundGpuWithoutGraphKeepsFewerExpertsOnTheGpu) {
  // Host launches at 40 µs (a Python framework's per-expert loop): with the graph off, the
  // unfused path's best keeps far fewer experts on the GPU than the budget allows; with a graph
  // every expert that fits goes there.
  const ModelInfo mi = qwen30_q4();
  SearchOptions opt = options(mi, "cuda:0=70GiB", "prompt=64,gen=512");
  opt.assumptions = parse_assumptions("launch_eager_us=40");
  opt.top = 20;
  const SearchResult r = run_search(opt);
  const Candidate* unfused = nullptr;
  for (const Candidate& c : r.ranked) {
    if (c.settings.gpu && c.settings.kernel == MoeKernel::Unfused && unfused == nullptr)
      unfused = &c;
  }
  ASSERT_NE(unfused, nullptr);
  EXPECT_LT(unfused->pred.gpu_experts, 48 * 128 / 4);
  EXPECT_EQ(r.ranked[size_t(r.best_graph)].pred.gpu_experts, 48 * 128);
}

// Counts with a known hot set per layer: expert (l + 3 e) % E gets weight (e + 1)^-1.2.
std::vector<std::vector<int64_t>> zipf_counts(const ModelConfig& cfg, int64_t tokens) {
  std::vector<std::vector<int64_t>> counts(size_t(cfg.n_layers),
                                           std::vector<int64_t>(size_t(cfg.n_experts), 0));
  for (int64_t l = 0; l < cfg.n_layers; ++l) {
    double z = 0;
    for (int64_t e = 0; e < cfg.n_experts; ++e) z += std::pow(double(e + 1), -1.2);
    for (int64_t e = 0; e < cfg.n_experts; ++e) {
      const int64_t id = (l + 3 * e) % cfg.n_experts;
      counts[size_t(l)][size_t(id)] =
          int64_t(double(tokens * cfg.n_experts_used) * std::pow(double(e + 1), -1.2) / z);
    }
  }
  return counts;
}

TEST(SearchDriver, HotExpertsGoFirstWithASkewedRouter) {
  const ModelInfo mi = qwen30_q4();
  SearchOptions opt = options(mi, "cuda:0=8GiB");
  opt.profile.kind = "model";
  opt.profile.model = {"qwen3-30b-a3b", "q4_0", 48, 128, 8, mi.bytes.expert[0]};
  opt.profile.router.tokens = 100000;
  opt.profile.router.counts = zipf_counts(mi.cfg, opt.profile.router.tokens);
  const SearchResult skewed = run_search(opt);
  const Candidate& best = skewed.ranked[size_t(skewed.best_graph)];
  EXPECT_TRUE(skewed.router.measured);
  ASSERT_GT(best.pred.gpu_experts, 0);
  for (int64_t l = 0; l < 48; ++l) {
    const auto& row = opt.profile.router.counts[size_t(l)];
    // Every GPU expert is selected at least as often as every CPU expert of its layer.
    int64_t min_gpu = INT64_MAX, max_cpu = -1;
    for (int64_t e = 0; e < 128; ++e) {
      if (best.on_gpu[size_t(l)][size_t(e)]) {
        min_gpu = std::min(min_gpu, row[size_t(e)]);
      } else {
        max_cpu = std::max(max_cpu, row[size_t(e)]);
      }
    }
    if (best.gpu_counts[size_t(l)] > 0 && best.gpu_counts[size_t(l)] < 128) {
      EXPECT_GE(min_gpu, max_cpu) << l;
    }
  }
  // The same GPU bytes cover far more routing than under uniform statistics, and decode is
  // faster for it.
  const SearchResult uniform = run_search(options(mi, "cuda:0=8GiB"));
  const Candidate& ub = uniform.ranked[size_t(uniform.best_graph)];
  EXPECT_GT(best.pred.gpu_mass, ub.pred.gpu_mass + 0.2);
  EXPECT_GT(best.pred.decode_tok_s, ub.pred.decode_tok_s);
  EXPECT_EQ(best.placement.searched_on->router_stats, skewed.router.digest);
}

TEST(SearchDriver, RouterStatisticsOfAModelWithRouterSkew) {
  // The model `ktune gen-model --preset tiny --router-skew zipf:1.5` writes (built in memory here,
  // same bytes): count its routing on the CPU engine, then search with those statistics.
  SynthOptions so;
  so.preset = "tiny";
  so.quant = QuantType::Q8_0;
  so.seed = 5;
  so.zipf_s = 1.5;
  const ModelWeights w = make_synthetic_model(so);
  CpuEngineOptions eo;
  eo.threads = 1;
  eo.max_context = 600;
  eo.pin_threads = false;
  CpuEngine engine(w, eo);
  std::vector<int32_t> tokens(512);
  std::mt19937 rng(1);
  for (auto& t : tokens) t = int32_t(rng() % uint32_t(w.cfg.vocab));
  engine.prefill(tokens.data(), int64_t(tokens.size()), nullptr, false);
  profile::ProfileSummary prof = test::h100_profile();
  prof.kind = "model";
  prof.model = {"tiny", "q8_0", w.cfg.n_layers, w.cfg.n_experts, w.cfg.n_experts_used, 0};
  prof.router.tokens = int64_t(tokens.size());
  for (const auto& row : engine.expert_counts()) {
    prof.router.counts.emplace_back(row.begin(), row.end());
  }
  const ModelInfo mi = model_info(w.cfg, QuantType::Q8_0, QuantType::Q8_0, "synth:tiny");
  // Budget: the fixed part, staging for a whole layer, and 3 experts per layer.
  const MemoryModel mm = memory_model(mi, true, 1024);
  const int64_t budget =
      mm.gpu_fixed + mm.gpu_expert_ws + 2 * 8 * mi.bytes.expert[0] + 3 * 4 * mi.bytes.expert[0];
  SearchOptions opt = options(mi, "cuda:0=" + std::to_string(budget) + "B",
                              "prompt=256,gen=256,context=1024", prof);
  opt.top = 20;
  const SearchResult r = run_search(opt);
  ASSERT_TRUE(r.router.measured) << r.router.note;
  // A model this small runs fastest on the CPU engine; look at the best hybrid placement.
  const Candidate* hybrid = nullptr;
  for (const Candidate& c : r.ranked) {
    if (c.settings.gpu && hybrid == nullptr) hybrid = &c;
  }
  ASSERT_NE(hybrid, nullptr);
  const Candidate& best = *hybrid;
  int64_t gpu_selections = 0, all_selections = 0;
  for (int64_t l = 0; l < 4; ++l) {
    const auto& row = prof.router.counts[size_t(l)];
    for (int64_t e = 0; e < 8; ++e) {
      all_selections += row[size_t(e)];
      if (best.on_gpu[size_t(l)][size_t(e)]) gpu_selections += row[size_t(e)];
    }
  }
  const double share = double(gpu_selections) / double(all_selections);
  const double uniform_share = double(best.pred.gpu_experts) / 32.0;
  std::printf(
      "[ router skew ] %lld GPU experts of 32 take %.1f %% of the routing (uniform: %.1f %%)\n",
      static_cast<long long>(best.pred.gpu_experts), 100 * share, 100 * uniform_share);
  EXPECT_GT(share, uniform_share + 0.1);
  EXPECT_NEAR(best.pred.gpu_mass, share, 0.05);
}

TEST(SearchDriver, WithinOnePercentOfThePerExpertOptimumOnATinyInstance) {
  // 2 layers x 4 experts, skewed routing: every assignment of every expert to cpu or cuda:0, at
  // every engine setting the search considers, priced by the same model; the search's best must
  // be within 1 % of the best of all of them (and never better).
  ModelConfig cfg = *find_preset("tiny");
  cfg.n_layers = 2;
  cfg.n_experts = 4;
  cfg.n_experts_used = 2;
  const ModelInfo mi = model_info(cfg, QuantType::Q8_0, QuantType::Q8_0, "synth:tiny");
  const std::vector<std::vector<int64_t>> counts = {{700, 900, 100, 300}, {50, 150, 1000, 800}};
  for (const char* wl : {"prompt=512,gen=128", "prompt=2048,gen=16", "prompt=16,gen=400"}) {
    for (double cpu_bw : {5.0, 60.0}) {
      profile::ProfileSummary prof = test::h100_profile();
      prof.kind = "model";
      prof.model = {"tiny", "q8_0", 2, 4, 2, 0};
      prof.router.tokens = 1000;
      prof.router.counts = counts;
      prof.cpu_costs.moe_decode_gb_s = {{16, cpu_bw}};
      const MemoryModel mm = memory_model(mi, true, 4096);
      const int64_t budget =
          mm.gpu_fixed + mm.gpu_expert_ws + 2 * 2 * mi.bytes.expert[0] + 5 * mi.bytes.expert[0];
      SearchOptions opt = options(mi, "cuda:0=" + std::to_string(budget) + "B", wl, prof);
      const SearchResult r = run_search(opt);
      const double found = r.ranked.front().pred.request_s;

      const CostModel cm(machine_costs(prof, {}), mi, router_from_profile(prof, cfg), opt.workload);
      double best = kInfeasible;
      for (int t : cm.thread_candidates()) {
        std::vector<EngineSettings> all;
        for (int v = 0; v < 4; ++v) {
          EngineSettings e;
          e.cpu_threads = t;
          e.cuda_graph = v < 2;
          e.handoff = v == 1 ? CpuHandoff::HostNode : CpuHandoff::Flags;
          e.kernel = v == 3 ? MoeKernel::Unfused : MoeKernel::Fused;
          all.push_back(e);
        }
        for (const EngineSettings& e : all) {
          const MemoryModel m2 = memory_model(mi, e.cuda_graph, opt.workload.context);
          for (int bits = 0; bits < 256; ++bits) {
            std::vector<std::vector<bool>> sets(2, std::vector<bool>(4));
            std::vector<int64_t> n(2, 0);
            std::vector<LayerSplit> splits;
            for (int l = 0; l < 2; ++l) {
              for (int x = 0; x < 4; ++x) {
                sets[size_t(l)][size_t(x)] = (bits >> (4 * l + x)) & 1;
                n[size_t(l)] += sets[size_t(l)][size_t(x)];
              }
              splits.push_back(cm.split_of(l, sets[size_t(l)]));
            }
            if (m2.gpu_need(n) > opt.budgets.bytes.at("cuda:0")) continue;
            best = std::min(best, cm.predict(splits, e).request_s);
          }
        }
        EngineSettings cpu;
        cpu.gpu = false;
        cpu.cpu_threads = t;
        best = std::min(
            best, cm.predict({cm.hottest_split(0, 0), cm.hottest_split(1, 0)}, cpu).request_s);
      }
      EXPECT_GE(found, best * (1 - 1e-9)) << wl << " " << cpu_bw;
      EXPECT_LE(found, best * 1.01) << wl << " " << cpu_bw;
    }
  }
}

TEST(SearchDriver, NoWorseThanTheBaselinesItReports) {
  const ModelInfo mi = qwen30_q4();
  for (const char* budget : {"cuda:0=8GiB", "cuda:0=12GiB", "cuda:0=16GiB"}) {
    const SearchResult r = run_search(options(mi, budget));
    ASSERT_EQ(r.baselines.size(), 3u) << budget;
    const double best = r.ranked[size_t(r.best_graph)].pred.request_s;
    for (const Candidate& b : r.baselines) {
      EXPECT_LE(best, b.pred.request_s * 1.001) << budget << " " << b.label;
      EXPECT_TRUE(b.baseline);
    }
    ASSERT_FALSE(r.whole_layer.empty());
    for (const Candidate& w : r.whole_layer) {
      for (size_t l = 0; l < w.gpu_counts.size(); ++l) {
        EXPECT_TRUE(w.gpu_counts[l] == 0 || w.gpu_counts[l] == 128);
      }
    }
  }
}

TEST(SearchDriver, CpuOnlyProfileSearchesThreadsOnly) {
  const ModelInfo mi =
      model_info(*find_preset("tiny"), QuantType::Q8_0, QuantType::Q8_0, "synth:tiny");
  profile::ProfileSummary prof = test::cpu_only_profile();
  prof.cpu.physical_cores = 2;
  prof.cpu_costs.moe_decode_gb_s = {{1, 10}, {2, 18}, {4, 30}};
  SearchOptions opt = options(mi, "", "prompt=64,gen=16", prof);
  const SearchResult r = run_search(opt);
  ASSERT_FALSE(r.ranked.empty());
  for (const Candidate& c : r.ranked) {
    EXPECT_FALSE(c.settings.gpu);
    EXPECT_LE(c.settings.cpu_threads, 2);
    EXPECT_EQ(c.pred.gpu_experts, 0);
  }
  EXPECT_EQ(r.best_graph, r.best_nograph);
  EXPECT_TRUE(r.baselines.empty());
}

TEST(SearchDriver, NothingFitsIsOneClearError) {
  const ModelInfo mi = model_info(*find_preset("qwen3-235b-a22b"), QuantType::Q4_0, QuantType::Q4_0,
                                  "synth:qwen3-235b-a22b:q4_0");
  SearchOptions opt = options(mi, "cuda:0=1GiB");
  opt.budgets.bytes["cpu"] = int64_t{1} << 30;
  try {
    run_search(opt);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.exit_code(), 1);
    const std::string what = e.what();
    EXPECT_NE(what.find("cuda:0 needs at least"), std::string::npos) << what;
    EXPECT_NE(what.find("all on the CPU needs"), std::string::npos) << what;
  }
}

TEST(SearchDriver, TimeOnTheBigShapes) {
  // Printed, not asserted (no timed assertions): issue 6 asks for under 2 s on this machine.
  profile::ProfileSummary prof = test::h100_profile();
  prof.cpu.mem_available_bytes = int64_t{500} << 30;  // the 4-GPU machine's host
  const ModelInfo q235 = model_info(*find_preset("qwen3-235b-a22b"), QuantType::Q4_0,
                                    QuantType::Q4_0, "synth:qwen3-235b-a22b:q4_0");
  const ModelInfo ds = model_info(test::deepseek_v3_shape(), QuantType::Q4_0, QuantType::Q4_0,
                                  "deepseek-v3-shape (q4_0)");
  for (const ModelInfo* mi : {&q235, &ds}) {
    const auto t0 = std::chrono::steady_clock::now();
    const SearchResult r = run_search(options(*mi, "", "chat", prof));
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const Candidate& best = r.ranked[size_t(r.best_graph)];
    std::printf(
        "[ search time ] %s (%lld layers x %lld experts): %.2f s, %d solves; best: %lld GPU "
        "experts, decode %.2f tok/s, prefill %.0f tok/s\n",
        mi->spec.c_str(), static_cast<long long>(mi->cfg.n_layers),
        static_cast<long long>(mi->cfg.n_experts), s, r.solves,
        static_cast<long long>(best.pred.gpu_experts), best.pred.decode_tok_s,
        best.pred.prefill_tok_s);
    expect_no_internal_notes(r);
    EXPECT_GT(best.pred.gpu_experts, 0);
  }
}

TEST(SearchDriver, GreedyAndDpAgreeOnTheBigTables) {
  // Beyond exhaustive reach: greedy (no local search at this size) against the DP.
  const ModelInfo mi = model_info(*find_preset("qwen3-235b-a22b"), QuantType::Q4_0, QuantType::Q4_0,
                                  "synth:qwen3-235b-a22b:q4_0");
  profile::ProfileSummary prof = test::h100_profile();
  prof.kind = "model";
  prof.model = {"qwen3-235b-a22b", "q4_0", 94, 128, 8, mi.bytes.expert[0]};
  prof.router.tokens = 100000;
  prof.router.counts = zipf_counts(mi.cfg, prof.router.tokens);
  const CostModel cm(machine_costs(prof, {}), mi, router_from_profile(prof, mi.cfg),
                     chat_workload());
  for (bool graph : {true, false}) {
    EngineSettings e;
    e.cuda_graph = graph;
    e.cpu_threads = 16;
    Problem p;
    p.cost = cm.layer_tables(e);
    p.unit_bytes = mi.bytes.expert;
    p.budget = int64_t{60} << 30;
    const Solution g = solve_greedy(p), d = solve_dp(p);
    ASSERT_TRUE(g.feasible() && d.feasible());
    std::printf("[ big tables ] graph %s: greedy %.4f s, DP %.4f s per request (layers' share)\n",
                graph ? "on" : "off", g.cost, d.cost);
    EXPECT_LE(g.cost, d.cost * 1.005);
    EXPECT_LE(d.cost, g.cost * 1.005);
  }
}

}  // namespace
}  // namespace ktune::search
