// The cost model on hand-made cases with known answers: what a graph saves, what a hand-off
// costs, the expectation over routing, the CPU engine, prefill's copy-or-compute choice, layer
// order in the prefill pipeline, the separable tables against the exact prediction, context.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>

#include "ktune/engine/memory_plan.h"
#include "search/cost_model.h"
#include "test_search_util.h"

namespace ktune::search {
namespace {

ModelInfo tiny_q8() {
  return model_info(*find_preset("tiny"), QuantType::Q8_0, QuantType::Q8_0, "synth:tiny:q8_0");
}
ModelInfo qwen30_q4() {
  return model_info(*find_preset("qwen3-30b-a3b"), QuantType::Q4_0, QuantType::Q4_0,
                    "synth:qwen3-30b-a3b:q4_0");
}

CostModel make(const ModelInfo& mi, const std::string& workload, const std::string& assume = "",
               profile::ProfileSummary s = test::h100_profile()) {
  return CostModel(machine_costs(s, parse_assumptions(assume)), mi, uniform_router(mi.cfg),
                   parse_workload(workload));
}

std::vector<LayerSplit> hottest(const CostModel& cm, const std::vector<int64_t>& counts) {
  std::vector<LayerSplit> out;
  for (size_t l = 0; l < counts.size(); ++l) out.push_back(cm.hottest_split(int64_t(l), counts[l]));
  return out;
}

EngineSettings settings(bool graph, MoeKernel k = MoeKernel::Fused,
                        CpuHandoff h = CpuHandoff::Flags) {
  EngineSettings e;
  e.cuda_graph = graph;
  e.kernel = k;
  e.handoff = h;
  e.cpu_threads = 16;
  return e;
}

double step_us(const CostModel& cm, const std::vector<LayerSplit>& s, const EngineSettings& e,
               double ctx) {
  double t = cm.decode_step_fixed_us(e);
  for (int64_t l = 0; l < cm.n_layers(); ++l) t += cm.decode_layer_us(l, s[size_t(l)], e, ctx);
  return t;
}

TEST(SearchCostModel, AGraphSavesTheLaunchOverheadOfEveryKernel) {
  const ModelInfo mi = qwen30_q4();
  const CostModel cm = make(mi, "prompt=512,gen=128");
  const auto all_gpu = hottest(cm, std::vector<int64_t>(48, 128));
  const double graph = step_us(cm, all_gpu, settings(true), 1000);
  const double eager = step_us(cm, all_gpu, settings(false), 1000);
  // 6 kernels per layer (q/k/v, attention, o, router; the two fused MoE launches) and 2 per step
  // (embedding, head + argmax) each cost launch_eager_us instead of graph_node_us (the test
  // profile has no eager gap); the graph itself is launched once per step.
  const double L = 3.3, g = 1.0;
  EXPECT_NEAR(eager - graph, (6 * 48 + 2) * (L - g) - L, 1e-6);
}

TEST(SearchCostModel, AHandOffCostsWhatTheProfileSaysPerHybridLayer) {
  const ModelInfo mi = qwen30_q4();
  const CostModel cm = make(mi, "prompt=512,gen=128");
  // Layer 0 with every expert on the CPU: every selected expert runs there (q = 1).
  const LayerSplit cpu = cm.hottest_split(0, 0);
  const double flags = cm.decode_layer_us(0, cpu, settings(true), 1000);
  const double host =
      cm.decode_layer_us(0, cpu, settings(true, MoeKernel::Fused, CpuHandoff::HostNode), 1000);
  // The host-node hand-off posts and waits through two host nodes where flags take one trip.
  EXPECT_NEAR(host - flags, 2 * 27.0 - 3.4, 1e-9);
  // And the CPU part is the top-k experts' bytes at CpuMoe's bandwidth (68 GB/s at 16 threads,
  // below the DRAM read of 110); a rate given with --assume is taken as it is.
  const CostModel fast = make(mi, "prompt=512,gen=128", "cpu_moe_gb_s=136");
  const double faster = fast.decode_layer_us(0, cpu, settings(true), 1000);
  const double cpu_us = 8.0 * double(mi.bytes.expert[0]) / (68 * 1e3);
  EXPECT_NEAR(flags - faster, cpu_us / 2, 1e-6);
}

TEST(SearchCostModel, HybridLayerIsTheExpectationOverRouting) {
  // GPU experts nearly free (their two kernels cost 2 graph nodes) and a negligible flag trip: a
  // graph-mode hybrid layer then costs its fixed kernels and the hand-off on every token, plus
  // max(GPU experts, CPU experts) with j ~ Binomial(k, CPU share) CPU experts: j of them cost the
  // CpuMoe call's fixed cost f and their bytes, j = 0 leaves the empty GPU kernels.
  const ModelInfo mi = qwen30_q4();
  const CostModel cm =
      make(mi, "prompt=512,gen=128", "moe_fused_gb_s=1e12,flag_handoff_us=1e-9,cpu_call_us=5");
  const double k = 8, g = 1.0, f = 5.0;
  const double c = double(mi.bytes.expert[0]) / (68 * 1e3);  // µs per CPU expert
  // Every expert on the CPU: j = k always.
  const double t_all = cm.decode_layer_us(0, cm.hottest_split(0, 0), settings(true), 0);
  for (int64_t m : {16, 64, 112}) {
    const double q = 1.0 - double(m) / 128;  // uniform routing: the share on the CPU
    const double p0 = std::pow(1 - q, k);    // no CPU expert selected
    const double t = cm.decode_layer_us(0, cm.hottest_split(0, m), settings(true), 0);
    const double expected = t_all - k * c * (1 - q) + p0 * (2 * g - f);
    EXPECT_NEAR(t, expected, 1e-6) << m;
  }
}

// A profile with kernel-time curves, an eager gap and a measured hand-off, numbers chosen for
// hand arithmetic: a matvec costs 3 µs + 1 µs per MB, the fused MoE 5 µs + 1 µs per MB.
profile::ProfileSummary curved_profile() {
  profile::ProfileSummary s = test::h100_profile();
  profile::GpuCosts& c = s.gpu_costs[0];
  c.matvec_us = {{1e6, 4}, {101e6, 104}};
  c.router_us = {{1048576, 11}};
  c.moe_fused_us = {{10e6, 15}, {30e6, 35}};
  c.moe_unfused_us = {{1e6, 3}};
  c.eager_gap_us = 2;
  c.handoff_us = 9;
  s.cpu_costs.moe_call_us = 6;
  return s;
}

TEST(SearchCostModel, KernelsArePricedFromTheProfileCurves) {
  const ModelInfo mi = qwen30_q4();
  const CostModel cm = make(mi, "prompt=1,gen=64", "", curved_profile());
  // qwen3-30b-a3b Q4_0: q/k/v 5898240 bytes, o 4718592, router (F32) 1048576, 8 experts 21233664.
  const double qkv = 3 + 5.898240, o = 3 + 4.718592, router = 11, attn = 6;  // attention at ctx 0
  const double moe = 5 + 21.233664;
  const double g = 1.0;
  const LayerSplit gpu = cm.hottest_split(0, 128);
  EXPECT_NEAR(cm.decode_layer_us(0, gpu, settings(true), 0), qkv + o + router + attn + moe + 6 * g,
              1e-6);
  // Without a graph each of these kernels (all longer than launch_eager_us - eager_gap_us) adds
  // the eager gap (2 µs) instead of a graph node (1 µs).
  EXPECT_NEAR(cm.decode_layer_us(0, gpu, settings(false), 0) -
                  cm.decode_layer_us(0, gpu, settings(true), 0),
              6 * (2 - g), 1e-6);
  // The step's own kernels: the embedding (empty: its launch, host-bound without a graph:
  // max(0 + 2, 3.3)) and the head (151936 x 2048 Q4_0, 175.0 MB), plus the graph launch.
  const double head_mb = double(mi.bytes.head) / 1e6;
  EXPECT_NEAR(cm.decode_step_fixed_us(settings(true)), g + (3 + head_mb + g) + 3.3, 1e-6);
  EXPECT_NEAR(cm.decode_step_fixed_us(settings(false)), 3.3 + (3 + head_mb + 2), 1e-6);
  // Every expert on the CPU: the fixed kernels, the measured hand-off (9 µs) and one CpuMoe call
  // (6 µs) over the 8 experts at 68 GB/s; the host-node hand-off two host nodes for the flag trip.
  const LayerSplit cpu = cm.hottest_split(0, 0);
  const double cpu_us = 6 + 21233664 / (68 * 1e3);
  const double pre = qkv + o + router + attn + 4 * g;
  EXPECT_NEAR(cm.decode_layer_us(0, cpu, settings(true), 0), pre + 9 + cpu_us, 1e-6);
  EXPECT_NEAR(
      cm.decode_layer_us(0, cpu, settings(true, MoeKernel::Fused, CpuHandoff::HostNode), 0),
      pre + 9 + 2 * 27 - 3.4 + cpu_us, 1e-6);
  // Eagerly launched: the pre-MoE kernels and the hand-off's two kernels each add 2 - 1 µs more.
  EXPECT_NEAR(cm.decode_layer_us(0, cpu, settings(false), 0),
              pre + 4 * (2 - g) + 9 + 2 * (3.3 - g) + cpu_us, 1e-6);
}

TEST(SearchCostModel, GpuExpertsOverlapTheCpuExpertsOfTheirLayer) {
  // Half the experts on the GPU, uniform routing: per token j ~ Binomial(8, 1/2) CPU experts,
  // and the layer waits for the slower side: max(fused MoE of 8 - j experts, CpuMoe of j).
  const ModelInfo mi = qwen30_q4();
  const CostModel cm = make(mi, "prompt=1,gen=64", "", curved_profile());
  const double eb = double(mi.bytes.expert[0]);
  const double pre = (3 + 5.898240) + (3 + 4.718592) + 11 + 6 + 4 * 1.0;
  double expected = 0;
  for (int j = 0; j <= 8; ++j) {
    double choose = 1;
    for (int i = 0; i < j; ++i) choose = choose * (8 - i) / (i + 1);
    const double p = choose / 256.0;
    // Fused MoE of n experts: the curve's line (5 µs + 1 µs per MB; below its first point, 10 MB,
    // never under that point's proportional share) and its two graph nodes.
    const double mb = (8 - j) * eb / 1e6;
    const double gpu = (mb < 10 ? std::max(5 + mb, 15 * mb / 10) : 5 + mb) + 2 * 1.0;
    const double cpu = j > 0 ? 6 + j * eb / (68 * 1e3) : 0.0;
    expected += p * (pre + 9 + std::max(gpu, cpu));
  }
  EXPECT_NEAR(cm.decode_layer_us(0, cm.hottest_split(0, 64), settings(true), 0), expected, 1e-6);
}

// PCIe assist: of a token's 8 CPU experts the GPU reads floor(8 * 0.375) = 3 over PCIe (three
// graph nodes: the map and the two fused launches) while CpuMoe computes 5 at its rate beside
// those reads; the layer waits for the slower side. Without the profile's probe (or with the
// unfused kernel) the setting prices as no assist.
TEST(SearchCostModel, PcieAssistSplitsTheCpuExpertsOfALayer) {
  profile::ProfileSummary s = curved_profile();
  s.cpu_costs.pcie_assist_gb_s = 40;
  s.cpu_costs.moe_pcie_ratio = 0.9;
  const ModelInfo mi = qwen30_q4();
  const CostModel cm = make(mi, "prompt=1,gen=64", "", s);
  const CostModel unprobed = make(mi, "prompt=1,gen=64", "", curved_profile());
  const LayerSplit cpu = cm.hottest_split(0, 0);
  const double eb = double(mi.bytes.expert[0]);
  const double pre = (3 + 5.898240) + (3 + 4.718592) + 11 + 6 + 4 * 1.0;
  EngineSettings a = settings(true);
  a.pcie_assist_permille = 375;
  const double gpu = 3 * 1.0 + 3 * eb / (40 * 1e3);
  const double cpu5 = 6 + 5 * eb / (68 * 0.9 * 1e3);
  EXPECT_NEAR(cm.decode_layer_us(0, cpu, a, 0), pre + 9 + std::max(gpu, cpu5), 1e-6);
  const double none = cm.decode_layer_us(0, cpu, settings(true), 0);
  EXPECT_NEAR(none, pre + 9 + 6 + 8 * eb / (68 * 1e3), 1e-6);
  EXPECT_LT(cm.decode_layer_us(0, cpu, a, 0), none);
  EXPECT_NEAR(unprobed.decode_layer_us(0, cpu, a, 0), none, 1e-6);
  EngineSettings unfused = settings(true, MoeKernel::Unfused);
  unfused.pcie_assist_permille = 375;
  EXPECT_NEAR(cm.decode_layer_us(0, cpu, unfused, 0),
              cm.decode_layer_us(0, cpu, settings(true, MoeKernel::Unfused), 0), 1e-6);
  // Too big a share moves the bottleneck to PCIe: 0.75 (6 of 8 over PCIe) is slower than 0.375.
  a.pcie_assist_permille = 750;
  EXPECT_GT(cm.decode_layer_us(0, cpu, a, 0), pre + 9 + std::max(gpu, cpu5));
}

TEST(SearchCostModel, CpuExpertsNeverStreamFasterThanDram) {
  // A CpuMoe probe above the DRAM read (its small working set cached): decode takes the read.
  profile::ProfileSummary s = curved_profile();
  s.cpu_costs.moe_decode_gb_s = {{1, 8}, {16, 200}};  // read: 110 at 16 threads
  const ModelInfo mi = qwen30_q4();
  const CostModel capped = make(mi, "prompt=1,gen=64", "", s);
  const CostModel plain = make(mi, "prompt=1,gen=64", "", curved_profile());
  const LayerSplit cpu = capped.hottest_split(0, 0);
  const double eb8 = 21233664;
  EXPECT_NEAR(capped.decode_layer_us(0, cpu, settings(true), 0) -
                  plain.decode_layer_us(0, cpu, settings(true), 0),
              eb8 / (110 * 1e3) - eb8 / (68 * 1e3), 1e-6);
}

TEST(SearchCostModel, CpuEngineDecodeIsBytesOverBandwidth) {
  const ModelInfo mi = tiny_q8();
  const CostModel cm = make(mi, "prompt=64,gen=16");
  EngineSettings e;
  e.gpu = false;
  e.cpu_threads = 8;  // read 85 GB/s, CpuMoe 50 GB/s in the test profile
  const auto splits = hottest(cm, {0, 0, 0, 0});
  const double ctx = 100;
  double expected = double(mi.bytes.head) / (85 * 1e3);
  const ModelConfig& c = mi.cfg;
  for (int l = 0; l < 4; ++l) {
    const double kv = 2 * ctx * double(c.n_kv_heads * c.head_dim) * 4;
    expected += (double(mi.bytes.attention[size_t(l)]) + kv) / (85 * 1e3) +
                2.0 * double(mi.bytes.expert[size_t(l)]) / (50 * 1e3);
  }
  EXPECT_NEAR(step_us(cm, splits, e, ctx), expected, 1e-9);
}

TEST(SearchCostModel, LaunchBoundWithoutGraphFewerGpuExpertsAreFaster) {
  // ktransformers#561's case: per-expert launches from the host at 40 µs each; a layer's
  // decode cost then grows with the experts it keeps on the GPU.
  const ModelInfo mi = qwen30_q4();
  const CostModel cm = make(mi, "prompt=64,gen=512", "launch_eager_us=40");
  const EngineSettings unfused = settings(false, MoeKernel::Unfused);
  const auto t = cm.layer_tables(unfused);
  EXPECT_LT(t[0][0], t[0][64]);
  EXPECT_LT(t[0][64], t[0][128]);
  // With a graph and the fused kernels the same GPU experts pay: more on the GPU is faster.
  const auto g = cm.layer_tables(settings(true));
  EXPECT_GT(g[0][0], g[0][64]);
  EXPECT_GT(g[0][64], g[0][128]);
}

TEST(SearchCostModel, ShortHybridPromptRunsAsDecodeSteps) {
  // The engine runs a hybrid placement's chunk shorter than hybrid_prefill_min_staged() as
  // decode steps (each decode() copies its token in, runs the step and synchronises), then
  // syncs once more; from there on it copies every hybrid layer's CPU experts to the GPU and
  // runs batched. 128 experts top-8 at the engine's 85 GB/s CPU / 45 GB/s copy: 31 tokens.
  const ModelInfo mi = qwen30_q4();
  const CostModel cm = make(mi, "prompt=30,gen=1;prompt=31,gen=1");
  EXPECT_EQ(cm.prefill_min_staged(), 31);
  EXPECT_EQ(cm.prefill_min_staged(),
            hybrid_prefill_min_staged(128.0 * double(mi.bytes.expert[0]),
                                      8.0 * double(mi.bytes.expert[0])));
  const EngineSettings e = settings(true);
  const auto half = hottest(cm, std::vector<int64_t>(48, 64));
  const double L = 3.3, sync = 8;  // the test profile: no eager gap, so a copy is one launch
  double expected = sync;
  for (int i = 0; i < 30; ++i) expected += step_us(cm, half, e, i) + L + sync;
  int copies = -1;
  EXPECT_NEAR(cm.prefill_s(half, e, 30, &copies), expected * 1e-6, 1e-12);
  EXPECT_EQ(copies, 0);
  cm.prefill_s(half, e, 31, &copies);
  EXPECT_EQ(copies, 48);
  // A chunk of 31 moves 48 x 64 experts over PCIe (52 GB/s): at least that long.
  EXPECT_GT(cm.prefill_s(half, e, 31), 48 * 64 * double(mi.bytes.expert[0]) / 52e9);
}

TEST(SearchCostModel, BatchedPrefillLayerIsFlopsAtTheGpuRate) {
  // qwen3-30b-a3b, a chunk of 512 tokens at position 0, every expert on the GPU: hand-computed.
  // Dense q/k/v/o: 2048 x (4096 + 2 x 512) + 4096 x 2048 = 18874368 parameters, 2 FLOPs each per
  // token; the router 2 x 2048 x 128 per token; causal attention 4 x 512 x 256.5 x 4096:
  //   2 x 512 x 18874368 + 2 x 512 x 2048 x 128 + 4 x 512 x 256.5 x 4096 = 21747466240 FLOPs;
  // experts: 512 tokens x 8 x 6 x 2048 x 768 = 38654705664 FLOPs; both at 50000 GFLOP/s (their
  // bytes at 3000 GB/s take less), plus 14 eager launches of 3.3 µs (no eager gap).
  const ModelInfo mi = qwen30_q4();
  const CostModel cm = make(mi, "prompt=512,gen=1");
  const auto pl = cm.prefill_layer(0, cm.hottest_split(0, 128), settings(true), 0, 512, 0);
  const double att = 21747466240.0 / 50000e3, exp = 38654705664.0 / 50000e3;
  EXPECT_NEAR(pl.gpu_us, att + exp + 14 * 3.3, 1e-6);
  EXPECT_NEAR(pl.pre_us, att + 11 * 3.3, 1e-6);
  EXPECT_FALSE(pl.copies);
  // Half the experts on the CPU: the same compute (staged experts run on the same kernels), and
  // the layer's 64 CPU experts copied whatever the routing.
  const auto hy = cm.prefill_layer(0, cm.hottest_split(0, 64), settings(true), 0, 512, 0);
  EXPECT_NEAR(hy.gpu_us, pl.gpu_us, 1e-9);
  EXPECT_TRUE(hy.copies);
  EXPECT_NEAR(hy.copy_us, 64.0 * double(mi.bytes.expert[0]) / (52 * 1e3), 1e-6);
}

TEST(SearchCostModel, CopyBoundPrefillIsTheCopiesBackToBack) {
  // Every expert on the CPU, a 512-token prompt: each layer's copy (128 experts over PCIe) takes
  // far longer than its compute, so the copy engine never waits for a staging buffer; the prompt
  // takes the 48 copies, the last layer's expert matmuls after its copy, and the fixed parts.
  const ModelInfo mi = qwen30_q4();
  const CostModel cm = make(mi, "prompt=512,gen=1");
  const EngineSettings e = settings(true);
  const auto none = hottest(cm, std::vector<int64_t>(48, 0));
  const auto pl = cm.prefill_layer(47, none[47], e, 0, 512, 0);
  ASSERT_GT(pl.copy_us, pl.gpu_us);
  const double expected =
      48 * pl.copy_us + (pl.gpu_us - pl.pre_us) + cm.prefill_fixed_us(e, 512, true);
  EXPECT_NEAR(cm.prefill_s(none, e, 512), expected * 1e-6, 1e-12);
  EXPECT_NEAR(48 * pl.copy_us, 48 * 128 * double(mi.bytes.expert[0]) / (52 * 1e3), 1e-6);
}

TEST(SearchCostModel, LayerOrderMattersForPrefill) {
  // Half the layers' experts on the GPU. Copy-bound prefill: a layer whose CPU experts are
  // copied overlaps its copy with the layer before it; interleaving GPU-held layers between
  // copied ones hides the copies, a block of copied layers cannot.
  const ModelInfo mi = qwen30_q4();
  const CostModel cm = make(mi, "prompt=4096,gen=16");
  std::vector<int64_t> front(48, 0), interleaved(48, 0);
  for (int l = 0; l < 24; ++l) front[size_t(l)] = 128;
  for (int l = 0; l < 48; l += 2) interleaved[size_t(l)] = 128;
  const Prediction a = cm.predict(hottest(cm, front), settings(true));
  const Prediction b = cm.predict(hottest(cm, interleaved), settings(true));
  EXPECT_EQ(a.copy_layers, 24);
  EXPECT_EQ(b.copy_layers, 24);
  EXPECT_NEAR(a.decode_s, b.decode_s, 1e-12);  // decode does not care (uniform routing)
  EXPECT_LT(b.prefill_s, a.prefill_s * 0.95);
  std::printf("[ layer order ] prefill 4096 tokens: GPU layers first %.3f s, interleaved %.3f s\n",
              a.prefill_s, b.prefill_s);
}

TEST(SearchCostModel, TablesSumToThePredictionWhenNothingIsCopied) {
  // Prompts under 31 tokens of a hybrid placement run as decode steps, so each layer's prefill
  // is independent and predict() equals the constant plus the tables' entries exactly.
  const ModelInfo mi = qwen30_q4();
  for (const EngineSettings& e :
       {settings(true), settings(false), settings(false, MoeKernel::Unfused)}) {
    const CostModel cm = make(mi, "prompt=8,gen=100;prompt=15,gen=7,weight=2");
    const auto t = cm.layer_tables(e);
    std::vector<int64_t> counts(48);
    double sum = cm.constant_s(e);
    for (int l = 0; l < 48; ++l) {
      counts[size_t(l)] = (l * 37) % 129;
      sum += t[size_t(l)][size_t(counts[size_t(l)])];
    }
    const Prediction p = cm.predict(hottest(cm, counts), e);
    EXPECT_EQ(p.copy_layers, 0);
    EXPECT_NEAR(p.request_s, sum, 1e-9 * sum) << e.describe();
  }
}

TEST(SearchCostModel, LongerContextSlowsDecode) {
  const ModelInfo mi = qwen30_q4();
  const CostModel cm = make(mi, "prompt=512,gen=128");
  const auto s = hottest(cm, std::vector<int64_t>(48, 64));
  const double short_ctx = step_us(cm, s, settings(true), 1000);
  const double long_ctx = step_us(cm, s, settings(true), 33000);
  // attention_us_per_1k_ctx = 1.5 per layer.
  EXPECT_NEAR(long_ctx - short_ctx, 48 * 1.5 * 32, 1e-6);
}

TEST(SearchCostModel, HottestSplitEqualsTheSetOfTheHottestExperts) {
  const ModelInfo mi = tiny_q8();
  std::vector<std::vector<int64_t>> counts(4, {10, 400, 30, 250, 5, 900, 205, 200});
  const RouterModel r = router_from_counts(counts, 1000, mi.cfg);
  const CostModel cm(machine_costs(test::h100_profile(), {}), mi, r,
                     parse_workload("prompt=700,gen=3"));
  const LayerSplit h = cm.hottest_split(2, 3);  // experts 5, 1, 3
  std::vector<bool> set(8, false);
  set[5] = set[1] = set[3] = true;
  const LayerSplit s = cm.split_of(2, set);
  EXPECT_EQ(h.n_gpu, 3);
  EXPECT_EQ(s.n_cpu, 5);
  EXPECT_NEAR(h.gpu_mass, s.gpu_mass, 1e-12);
  EXPECT_NEAR(h.gpu_mass, 2.0 * (900 + 400 + 250 + 1.5) / (2000 + 4), 1e-12);
  ASSERT_EQ(h.cpu_distinct.size(), s.cpu_distinct.size());
  for (size_t c = 0; c < h.cpu_distinct.size(); ++c) {
    EXPECT_NEAR(h.cpu_distinct[c], s.cpu_distinct[c], 1e-9);
    EXPECT_NEAR(h.gpu_distinct[c], s.gpu_distinct[c], 1e-9);
  }
}

// ---------------------------------------------------------------------------------- deepseek2 --

ModelInfo v2lite_q4() {
  return model_info(*find_preset("deepseek-v2-lite"), QuantType::Q4_0, QuantType::Q4_0,
                    "synth:deepseek-v2-lite:q4_0");
}

TEST(SearchCostModel, MlaLaunchBytesAreTheLayersTensors) {
  // DeepSeek-V2-Lite Q4_0 (18 bytes per 32 values): hidden 2048, 16 heads x (128 + 64), values
  // 128, kv_lora_rank 512, no q compression, 64 experts, 2 shared of 1408, dense FFN 10944.
  const ModelInfo mi = v2lite_q4();
  ASSERT_EQ(mi.mla.size(), 27u);
  const MlaLayerBytes& b = mi.mla[1];
  EXPECT_EQ(b.q_in, 1152.0 * 3072);  // attn_q: 3072 rows of 2048
  EXPECT_EQ(b.kv_a, 1152.0 * 576);   // attn_kv_a_mqa: 512 + 64 rows
  EXPECT_FALSE(b.kv_a_apart);
  EXPECT_EQ(b.q_b, 0.0);
  EXPECT_EQ(b.k_b, 72.0 * 512 * 16);    // attn_k_b: rows of 128, 512 per head
  EXPECT_EQ(b.v_b, 288.0 * 128 * 16);   // attn_v_b: rows of 512, 128 per head
  EXPECT_EQ(b.o, 1152.0 * 2048);        // attn_output: 2048 rows of 16 x 128
  EXPECT_EQ(b.router, 4.0 * 2048 * 64);
  EXPECT_EQ(b.ffn, 3.0 * 1152 * 2816);  // shared gate, up (2816 rows of 2048), down (2048 of 2816)
  EXPECT_EQ(mi.mla[0].router, 0.0);     // the dense layer
  EXPECT_EQ(mi.mla[0].ffn, 3.0 * 1152 * 10944);
  // With the norms they are every byte the planner counts with the layer's attention.
  for (size_t l : {size_t(0), size_t(1)}) {
    const MlaLayerBytes& x = mi.mla[l];
    const double norms = 4.0 * (2 * 2048 + 512);
    EXPECT_EQ(x.q_in + x.kv_a + x.q_b + x.k_b + x.v_b + x.o + x.router + x.ffn + norms,
              double(mi.bytes.attention[l]))
        << l;
  }
}

TEST(SearchCostModel, MlaAttentionReadsTheLatentCacheOncePerHeadGroup) {
  // 4096 cached positions of 512 + 64 float32 values; V2-Lite's 16 heads are one group, V3's 128
  // are 8 groups of 16. FLOPs: per position and head, the score over 576 values and the weighted
  // sum of 512: 2 x 4096 x 16 x 1088.
  const ModelInfo lite = v2lite_q4();
  const CostModel cm = make(lite, "prompt=16,gen=16");
  EXPECT_EQ(cm.mla_attention_bytes(4096), 4096.0 * 576 * 4);
  EXPECT_EQ(cm.mla_attention_flops(4096), 2.0 * 4096 * 16 * 1088);
  const ModelInfo v3 = model_info(*find_preset("deepseek-v3"), QuantType::Q4_0, QuantType::Q4_0,
                                  "synth:deepseek-v3:q4_0");
  const CostModel cm3 = make(v3, "prompt=16,gen=16");
  EXPECT_EQ(cm3.mla_attention_bytes(4096), 8.0 * 4096 * 576 * 4);
  // The context's cost: the FLOPs at the MLA rate (5000 GFLOP/s, slower here than the cache's
  // 9.4 MB at 3000 GB/s), on top of the same launches.
  const double growth = cm.mla_attention_us(1, 4096, true) - cm.mla_attention_us(1, 0, true);
  EXPECT_NEAR(growth, 2.0 * 4096 * 16 * 1088 / 5000e3, 1e-6);
  const CostModel fast = make(lite, "prompt=16,gen=16", "mla_attention_gflop_s=1e9");
  EXPECT_NEAR(fast.mla_attention_us(1, 4096, true) - fast.mla_attention_us(1, 0, true),
              4096.0 * 576 * 4 / 3000e3, 1e-6);
}

TEST(SearchCostModel, MlaLayerPricesItsOwnLaunches) {
  // Curves for hand arithmetic: a matvec 3 µs + 1 µs per MB, the fused MoE 5 µs + 1 µs per MB
  // (never below 1.5 µs per MB under 10 MB), the router 11 µs per MiB (one point: proportional;
  // V2-Lite's is half a MiB), attention 6 µs at context 0, graph nodes 1 µs. A V2-Lite MoE layer
  // with every expert on the GPU at context 0:
  //   q + kv_a (one launch), RoPE, k_b, attention + merge, v_b, o; router + router kernel;
  //   shared experts (9.73 MB) and 6 routed experts (6 x 4.87 MB) on the fused kernels.
  const ModelInfo mi = v2lite_q4();
  const CostModel cm = make(mi, "prompt=1,gen=16", "", curved_profile());
  const MlaLayerBytes& b = mi.mla[1];
  auto mv = [](double bytes) { return 3 + bytes / 1e6 + 1; };
  auto moe = [](double bytes) {
    const double mb = bytes / 1e6;
    return (mb < 10 ? std::max(5 + mb, 1.5 * mb) : 5 + mb) + 2;  // two launches, two nodes
  };
  const double attention =
      mv(b.q_in + b.kv_a) + 1 + mv(b.k_b) + (6 + 1) + 1 + mv(b.v_b) + mv(b.o);
  EXPECT_NEAR(cm.mla_attention_us(1, 0, true), attention, 1e-6);
  const double eb = double(mi.bytes.expert[1]);
  const double gpu = cm.decode_layer_us(1, cm.hottest_split(1, 64), settings(true), 0);
  EXPECT_NEAR(gpu, attention + (5.5 + 1) + 1 + moe(b.ffn) + moe(6 * eb), 1e-6);
  // The dense layer: attention, ffn_norm, the dense FFN; no routed expert, no hand-off, whatever
  // its (empty) expert slots say.
  const double dense = attention - mv(b.q_in + b.kv_a) - mv(b.k_b) - mv(b.v_b) - mv(b.o) +
                       mv(mi.mla[0].q_in + mi.mla[0].kv_a) + mv(mi.mla[0].k_b) +
                       mv(mi.mla[0].v_b) + mv(mi.mla[0].o) + 1 + moe(mi.mla[0].ffn);
  EXPECT_NEAR(cm.decode_layer_us(0, cm.hottest_split(0, 0), settings(true), 0), dense, 1e-6);
  EXPECT_NEAR(cm.decode_layer_us(0, cm.hottest_split(0, 64), settings(true), 0), dense, 1e-6);
  // Every routed expert on the CPU: the hand-off (9 µs) and one CpuMoe call over 6 experts at
  // 68 GB/s, overlapped with the shared experts on the GPU.
  const double cpu = 6 + 6 * eb / (68 * 1e3);
  EXPECT_NEAR(cm.decode_layer_us(1, cm.hottest_split(1, 0), settings(true), 0),
              attention + 6.5 + 1 + 9 + std::max(moe(b.ffn), cpu), 1e-6);
}

TEST(SearchCostModel, DeepseekPrefillIsDecodeStepsTokenByToken) {
  // The deepseek2 GPU engine prefills through its decode step: per token a copy of the token on
  // the stream (one eager launch) and the step; one synchronisation at the end. Hybrid or not.
  const ModelInfo mi = v2lite_q4();
  const CostModel cm = make(mi, "prompt=40,gen=1");
  for (int64_t m : {64, 32}) {
    const auto s = hottest(cm, std::vector<int64_t>(27, m));
    for (const EngineSettings& e : {settings(true), settings(false)}) {
      double expected = 8;  // sync_us
      for (int i = 0; i < 40; ++i) expected += step_us(cm, s, e, i) + 3.3;
      int copies = -1;
      EXPECT_NEAR(cm.prefill_s(s, e, 40, &copies), expected * 1e-6, 1e-12) << m;
      EXPECT_EQ(copies, 0);
    }
  }
}

TEST(SearchCostModel, DeepseekTablesSumToThePrediction) {
  const ModelInfo mi = v2lite_q4();
  const CostModel cm = make(mi, "prompt=700,gen=30;prompt=20,gen=9,weight=3");
  for (const EngineSettings& e : {settings(true), settings(false, MoeKernel::Unfused)}) {
    const auto t = cm.layer_tables(e);
    std::vector<int64_t> counts(27);
    double sum = cm.constant_s(e);
    for (int l = 0; l < 27; ++l) {
      counts[size_t(l)] = (l * 23) % 65;
      sum += t[size_t(l)][size_t(counts[size_t(l)])];
    }
    const Prediction p = cm.predict(hottest(cm, counts), e);
    EXPECT_NEAR(p.request_s, sum, 1e-9 * sum) << e.describe();
  }
}

}  // namespace
}  // namespace ktune::search
