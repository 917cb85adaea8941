// The multi-GPU layer split planned without CUDA (ktune/engine/gpu_stages.h): which layers each
// GPU runs, where the hidden state moves, which placements are refused and why; the quick split
// of `ktune run --gpus N [--experts-on-gpu K]`; runtime.gpu_transport in the YAML; the engine
// choice and the memory plan of split placements (qwen3-235b-a22b over 4 GPUs).
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <string>
#include <vector>

#include "ktune/engine/error.h"
#include "ktune/engine/gpu_info.h"
#include "ktune/engine/gpu_stages.h"
#include "ktune/engine/memory_plan.h"
#include "ktune/engine/model.h"
#include "ktune/engine/placement.h"
#include "run_bench.h"
#include "subprocess.h"

namespace ktune {
namespace {

const ModelConfig& preset(const char* name) {
  const ModelConfig* c = find_preset(name);
  EXPECT_NE(c, nullptr) << name;
  return *c;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(GpuStages, ConsecutiveLayersOfOneGpuFormAStage) {
  const GpuStagePlan p = plan_gpu_stages({0, 0, 0, 1, 1, 2, 2, 2}, "x");
  ASSERT_EQ(p.stages.size(), 3u);
  EXPECT_EQ(p.stages[0].device, 0);
  EXPECT_EQ(p.stages[0].first_layer, 0);
  EXPECT_EQ(p.stages[0].end_layer, 3);
  EXPECT_EQ(p.stages[1].device, 1);
  EXPECT_EQ(p.stages[1].first_layer, 3);
  EXPECT_EQ(p.stages[1].end_layer, 5);
  EXPECT_EQ(p.stages[2].device, 2);
  EXPECT_EQ(p.stages[2].n_layers(), 3);
  // Embedding on the first stage, head on the last, nothing else.
  EXPECT_TRUE(p.stages[0].embedding);
  EXPECT_FALSE(p.stages[0].head);
  EXPECT_FALSE(p.stages[1].embedding);
  EXPECT_FALSE(p.stages[1].head);
  EXPECT_TRUE(p.stages[2].head);
  EXPECT_FALSE(p.stages[2].embedding);
  // The hidden state leaves after the last layer of each stage but the last.
  EXPECT_EQ(p.transfer_after, (std::vector<int64_t>{2, 4}));
  EXPECT_EQ(p.stage_of_layer, (std::vector<int>{0, 0, 0, 1, 1, 2, 2, 2}));
  EXPECT_EQ(p.devices(), (std::vector<int>{0, 1, 2}));
  EXPECT_TRUE(p.multi_gpu());
  EXPECT_EQ(p.describe(), "cuda:0 layers 0-2 -> cuda:1 layers 3-4 -> cuda:2 layers 5-7");
}

TEST(GpuStages, OneGpuIsOneStageWithEmbeddingAndHead) {
  const GpuStagePlan p = plan_gpu_stages({3, 3, 3}, "x");
  ASSERT_EQ(p.stages.size(), 1u);
  EXPECT_EQ(p.stages[0].device, 3);
  EXPECT_TRUE(p.stages[0].embedding && p.stages[0].head);
  EXPECT_TRUE(p.transfer_after.empty());
  EXPECT_FALSE(p.multi_gpu());
  // Any GPU order is fine as long as each GPU has one range (cuda:1 first, then cuda:0).
  const GpuStagePlan q = plan_gpu_stages({1, 1, 0}, "x");
  EXPECT_EQ(q.devices(), (std::vector<int>{1, 0}));
  EXPECT_EQ(q.describe(), "cuda:1 layers 0-1 -> cuda:0 layer 2");
}

TEST(GpuStages, AGpuWithTwoSeparateRangesIsRefused) {
  const std::string m = error_of([] { plan_gpu_stages({0, 0, 1, 1, 0}, "p.yaml"); });
  EXPECT_NE(m.find("p.yaml: cuda:0 runs layers 0-1 and again layer 4"), std::string::npos) << m;
  EXPECT_NE(m.find("give each GPU one contiguous range of layers"), std::string::npos) << m;
  EXPECT_NE(error_of([] { plan_gpu_stages(std::vector<int>{}, "x"); }), "");
  EXPECT_NE(error_of([] { plan_gpu_stages({0, -1}, "x"); }).find("layer 1 has no GPU"),
            std::string::npos);
}

TEST(GpuStages, PlacementWithExpertsOnTheLayersGpuOrCpuIsAccepted) {
  const ModelConfig& c = preset("tiny");
  Placement p = make_uniform_placement(c, Device::cuda(0), Device::cpu());
  const int64_t half = c.n_layers / 2;
  for (int64_t l = half; l < c.n_layers; ++l) p.layers[size_t(l)].attention = Device::cuda(1);
  // Some experts on the layer's own GPU, the rest on cpu.
  p.layers[0].experts[0] = Device::cuda(0);
  p.layers[size_t(half)].experts[1] = Device::cuda(1);
  const GpuStagePlan plan = plan_gpu_stages(p, "p.yaml");
  ASSERT_EQ(plan.stages.size(), 2u);
  EXPECT_EQ(plan.stages[1].first_layer, half);
  EXPECT_EQ(layer_devices(p)[size_t(half)], 1);
  const auto m = experts_on_gpu_map(p);
  EXPECT_TRUE(m[0][0]);
  EXPECT_FALSE(m[0][1]);
  EXPECT_TRUE(m[size_t(half)][1]);
  EXPECT_EQ(cli::choose_engine(p, "p.yaml"), cli::EngineKind::Hybrid);
}

TEST(GpuStages, ExpertsOnAnotherGpuThanTheirAttentionAreRefusedNamingLayersAndFix) {
  const ModelConfig& c = preset("tiny");
  Placement p = make_uniform_placement(c, Device::cuda(0), Device::cuda(0));
  p.layers[1].experts[2] = Device::cuda(1);
  p.layers[2].experts[0] = Device::cuda(1);
  const std::string m = error_of([&] { plan_gpu_stages(p, "p.yaml"); });
  EXPECT_NE(m.find("p.yaml: layers 1-2 run attention on cuda:0 but have experts on cuda:1"),
            std::string::npos)
      << m;
  EXPECT_NE(m.find("put a layer's GPU experts on the GPU that runs its attention (cuda:0) or "
                   "on cpu"),
            std::string::npos)
      << m;
  EXPECT_EQ(m.find('\n'), std::string::npos) << m;
  // choose_engine (ktune run) refuses it the same way, before anything is loaded.
  EXPECT_THROW(cli::choose_engine(p, "p.yaml"), Error);
}

TEST(GpuStages, AttentionOnTheCpuIsRefused) {
  const ModelConfig& c = preset("tiny");
  Placement p = make_uniform_placement(c, Device::cuda(0), Device::cpu());
  p.layers[1].attention = Device::cpu();
  const std::string m = error_of([&] { plan_gpu_stages(p, "p.yaml"); });
  EXPECT_NE(m.find("layers 1 have it on the CPU"), std::string::npos) << m;
}

TEST(GpuStages, QuickSplitSpreadsLayersAndGpuExpertsEvenly) {
  const ModelConfig& c = preset("qwen3-30b-a3b");  // 48 layers
  // --gpus 2: layers 0-23 on cuda:0, 24-47 on cuda:1, every expert on its layer's GPU.
  Placement p = make_gpu_split(c, 2, c.n_layers);
  EXPECT_EQ(plan_gpu_stages(p, "x").describe(), "cuda:0 layers 0-23 -> cuda:1 layers 24-47");
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const Device g = Device::cuda(l < 24 ? 0 : 1);
    EXPECT_EQ(p.layers[size_t(l)].attention, g);
    for (const Device& d : p.layers[size_t(l)].experts) EXPECT_EQ(d, g);
  }
  EXPECT_EQ(cli::choose_engine(p, "x"), cli::EngineKind::Gpu);
  // --gpus 4 --experts-on-gpu 10: 12 layers each; the first 3, 3, 2, 2 layers of each GPU keep
  // their experts there.
  p = make_gpu_split(c, 4, 10);
  std::vector<int64_t> gpu_layers;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const LayerPlacement& lp = p.layers[size_t(l)];
    EXPECT_EQ(lp.attention, Device::cuda(int(l / 12)));
    const bool on_gpu = lp.experts.front().is_gpu();
    for (const Device& d : lp.experts) EXPECT_EQ(d, on_gpu ? lp.attention : Device::cpu());
    if (on_gpu) gpu_layers.push_back(l);
  }
  EXPECT_EQ(gpu_layers, (std::vector<int64_t>{0, 1, 2, 12, 13, 14, 24, 25, 36, 37}));
  EXPECT_EQ(cli::choose_engine(p, "x"), cli::EngineKind::Hybrid);
  // Uneven: 48 layers over 5 GPUs -> 10, 10, 10, 9, 9.
  p = make_gpu_split(c, 5, 0);
  const GpuStagePlan plan = plan_gpu_stages(p, "x");
  ASSERT_EQ(plan.stages.size(), 5u);
  EXPECT_EQ(plan.stages[2].end_layer, 30);
  EXPECT_EQ(plan.stages[4].n_layers(), 9);
  // One GPU is make_layer_split.
  EXPECT_EQ(make_gpu_split(c, 1, 24).layers, make_layer_split(c, 24, Device::cuda(0)).layers);
  // K = every layer with uneven ranges still puts every expert on a GPU.
  p = make_gpu_split(c, 5, c.n_layers);
  for (const LayerPlacement& lp : p.layers) {
    for (const Device& d : lp.experts) EXPECT_EQ(d, lp.attention);
  }
  // Bad counts are usage errors.
  EXPECT_THROW(make_gpu_split(c, 0, 0), Error);
  EXPECT_THROW(make_gpu_split(c, 49, 0), Error);
  EXPECT_THROW(make_gpu_split(c, 2, 49), Error);
  try {
    make_gpu_split(c, 0, 0);
  } catch (const Error& e) {
    EXPECT_EQ(e.exit_code(), 2);
  }
}

TEST(GpuStages, TransportIsAYamlFieldWrittenOnlyWhenSet) {
  const ModelConfig& c = preset("tiny");
  const std::string yaml =
      "ktune: 1\nmodel: {path: synth:tiny}\nruntime: {gpu_transport: peer}\nlayers: []\n";
  Placement p = parse_placement(yaml, "p.yaml", &c);
  EXPECT_EQ(p.runtime.gpu_transport, GpuTransport::Peer);
  const std::string w = write_placement(p);
  EXPECT_NE(w.find("gpu_transport: peer"), std::string::npos) << w;
  EXPECT_EQ(parse_placement(w, "p.yaml", &c), p);
  p.runtime.gpu_transport = GpuTransport::Auto;
  EXPECT_EQ(write_placement(p).find("gpu_transport"), std::string::npos);
  const std::string m = error_of([&] {
    parse_placement("ktune: 1\nmodel: {path: m}\nruntime: {gpu_transport: tcp}\nlayers: []\n",
                    "p.yaml");
  });
  EXPECT_NE(m.find("p.yaml:3"), std::string::npos) << m;
  EXPECT_NE(m.find("runtime.gpu_transport"), std::string::npos) << m;
  EXPECT_NE(m.find("write auto, nccl or peer"), std::string::npos) << m;
  EXPECT_EQ(parse_gpu_transport("nccl", "x"), GpuTransport::Nccl);
  EXPECT_STREQ(gpu_transport_name(GpuTransport::Peer), "peer");
  EXPECT_THROW(parse_gpu_transport("NCCL", "x"), Error);
}

TEST(GpuStages, RunOverridesSetTheTransportAndTheSummaryNamesStages) {
  const ModelConfig& c = preset("tiny");
  Placement p = make_gpu_split(c, 2, c.n_layers);
  cli::apply_runtime_overrides(p, cli::parse_runtime_overrides("", "", "", "nccl"));
  EXPECT_EQ(p.runtime.gpu_transport, GpuTransport::Nccl);
  EXPECT_THROW(cli::parse_runtime_overrides("", "", "", "tcp"), Error);
  Budgets b;
  b.bytes["cuda:0"] = 80 * kGiB;
  b.bytes["cuda:1"] = 80 * kGiB;
  const MemoryPlan plan = plan_memory(c, QuantType::Q8_0, QuantType::Q8_0, p, b);
  const cli::PlacementSummary s = cli::summarize_placement("x", p, plan, cli::EngineKind::Gpu);
  const std::string line = s.line();
  EXPECT_NE(line.find("| transport nccl | stages cuda:0 layers 0-"), std::string::npos) << line;
  EXPECT_NE(line.find("cuda:1"), std::string::npos) << line;
  // One GPU: no transport in the line.
  Placement one = make_gpu_split(c, 1, c.n_layers);
  const MemoryPlan plan1 = plan_memory(c, QuantType::Q8_0, QuantType::Q8_0, one, b);
  EXPECT_EQ(cli::summarize_placement("x", one, plan1, cli::EngineKind::Gpu).line().find("transport"),
            std::string::npos);
}

// The real target of the split: qwen3-235b-a22b (94 layers, 128 experts) at Q4_0 over the
// 4-GPU machine's 4 x 80 GB: every GPU gets its layers, KV cache and the embedding or the
// head, each well within its budget; on one GPU it does not fit and the error names cuda:0.
TEST(GpuStages, Qwen3_235bFitsOnFourGpusNotOne) {
  const ModelConfig& c = preset("qwen3-235b-a22b");
  ASSERT_EQ(c.n_layers, 94);
  ASSERT_EQ(c.n_experts, 128);
  ASSERT_EQ(c.hidden, 4096);
  ASSERT_EQ(c.expert_ffn, 1536);
  Budgets b;
  for (int g = 0; g < 4; ++g) b.bytes[Device::cuda(g).to_string()] = 80 * kGiB - 256 * kMiB;
  Placement p = make_gpu_split(c, 4, c.n_layers);
  const MemoryPlan plan = plan_memory(c, QuantType::Q4_0, QuantType::Q4_0, p, b);
  ASSERT_EQ(plan.per_device.size(), 4u);
  int64_t experts = 0;
  for (const auto& [dev, u] : plan.per_device) {
    EXPECT_LT(u.total, u.budget) << dev << ": " << u.breakdown();
    EXPECT_GT(u.weights, 25 * kGiB) << dev;
    EXPECT_GT(u.kv_cache, 0) << dev;
    experts += u.experts;
  }
  EXPECT_EQ(experts, 94 * 128);
  EXPECT_NO_THROW(check_fits(plan));
  Placement one = make_gpu_split(c, 1, c.n_layers);
  const std::string m = error_of([&] {
    check_fits(plan_memory(c, QuantType::Q4_0, QuantType::Q4_0, one, b));
  });
  EXPECT_NE(m.find("cuda:0: the plan needs"), std::string::npos) << m;
}

// The flags on the command line: bad values are usage errors (exit 2) naming the flag; a split
// over more GPUs than this machine has is refused before anything is loaded, naming the GPU.
TEST(GpuStagesCli, GpusAndTransportFlags) {
  using test::run_ktune;
  auto r = run_ktune({"run", "--model", "synth:tiny", "--gpus", "0", "-p", "8", "-n", "4"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("--gpus: 0 is not a number of GPUs"), std::string::npos) << r.err;
  r = run_ktune({"run", "--model", "synth:tiny", "--gpus", "2", "--gpu-transport", "tcp"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("--gpu-transport: `tcp` is not a GPU transport"), std::string::npos)
      << r.err;
  r = run_ktune({"run", "--model", "synth:tiny", "--gpus", "5"});  // tiny has 4 layers
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_NE(r.err.find("--gpus: 5 GPUs for a model of 4 layers"), std::string::npos) << r.err;
  // 4 GPUs with a budget each: the plan passes and, on a machine with fewer GPUs, the GPU
  // check refuses the first one it lacks (exit 1, one line) before the model is loaded.
  std::string mem;
  for (int g = 0; g < 4; ++g) mem += (g ? "," : "") + std::string("cuda:") + std::to_string(g) + "=80GiB";
  r = run_ktune({"run", "--model", "synth:tiny", "--gpus", "4", "--gpu-mem", mem, "-p", "8", "-n",
                 "4", "-r", "1", "--no-probe"});
  if (query_gpus().devices.size() < 4) {
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_NE(r.err.find("ktune: error: cuda:"), std::string::npos) << r.err;
    EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << r.err;  // one line
  }
}

}  // namespace
}  // namespace ktune
