// The memory planner against hand computations (docs/placement.md gives the formulas), budgets
// and their overrides, and check_fits' messages.
#include <gtest/gtest.h>

#include <string>

#include "ktune/engine/error.h"
#include "ktune/engine/memory_plan.h"
#include "ktune/engine/model.h"
#include "ktune/engine/placement.h"
#include "ktune/engine/synthetic.h"

namespace {

using ktune::Device;
using ktune::QuantType;

const ktune::ModelConfig& qwen() { return *ktune::find_preset("qwen3-30b-a3b"); }
const ktune::ModelConfig& tiny() { return *ktune::find_preset("tiny"); }

#define EXPECT_HAS(text, part)                               \
  EXPECT_NE(std::string(text).find(part), std::string::npos) \
      << "expected to find [" << (part) << "] in [" << (text) << "]"

std::string fits_error(const ktune::MemoryPlan& plan) {
  try {
    ktune::check_fits(plan);
  } catch (const ktune::Error& e) {
    EXPECT_EQ(e.exit_code(), 1);
    return e.what();
  }
  ADD_FAILURE() << "the plan fits:\n" << plan.summary();
  return "";
}

ktune::Budgets budgets(int64_t gpu0, int64_t cpu) {
  ktune::Budgets b;
  b.bytes["cuda:0"] = gpu0;
  b.bytes["cpu"] = cpu;
  return b;
}

// qwen3-30b-a3b at Q4_0 (every matrix; norms and router F32), by hand:
constexpr int64_t kExpert = 3 * 768 * 2048 / 32 * 18;  // gate + up + down = 2,654,208
constexpr int64_t kAllExperts = 48 * 128 * kExpert;    // 16,307,453,952
constexpr int64_t kAttentionLayer =
    2 * 2048 * 4 + 2 * 128 * 4               // attn/ffn norms, q/k norms
    + 2048 * 4 * 128                         // router, F32
    + (4096 + 512 + 512) * (2048 / 32 * 18)  // q, k, v: rows x Q4_0 row of 2048
    + 2048 * (4096 / 32 * 18);               // o: 2048 rows of 4096
constexpr int64_t kEmbedding = 151936 * (2048 / 32 * 18);
constexpr int64_t kHead = 2048 * 4 + kEmbedding;
constexpr int64_t kKvGpu = 48 * 2 * 4096 * (4 * 128) * 2;  // f16 K and V, context 4096
// Workspace for a 512-token chunk (docs/placement.md):
constexpr int64_t kAttnAct =
    512 * (4 * (3 * 2048 + 4096 + 2 * 512 + 4096 + 128 + 2 * 8) + (2048 + 4096) * 34 / 32);
constexpr int64_t kScores = 4 * 32 * 4096;
constexpr int64_t kExpertAct = 512 * (4 * 8 * (2 * 768 + 2048) + (2048 + 8 * 768) * 34 / 32);
constexpr int64_t kLogits = 4 * 151936;
// The GPU engine's batched prefill workspace for a 512-token chunk (4096 expert pairs, 192
// tiles; prefill_workspace_bytes): token ids, residual f32, normed fp16 and f32, q, k, v f32,
// q and attention output fp16, router logits, ids and weights, grouping, SwiGLU fp16, expert
// outputs f32, per-expert pointers of 48 layers.
constexpr int64_t kPrefillWs = 4 * 512 + 4 * 512 * 2048 + 2 * 512 * 2048 + 4 * 512 * 2048 +
                               4 * 512 * 4096 + 2 * 4 * 512 * 512 + 2 * 2 * 512 * 4096 +
                               4 * 512 * 128 + 4 * 4 * 4096 + 16 * 192 + 256 +
                               2 * 4096 * 768 + 4 * 4096 * 2048 + 8 * 3 * 128 * 48;
static_assert(kPrefillWs < kAttnAct + kExpertAct, "all on GPU: the per-token estimate covers it");

TEST(MemoryPlanWeights, QwenShapesByHand) {
  static_assert(kExpert == 2654208, "hand computation");
  static_assert(kAttentionLayer == 11682816, "hand computation");
  const ktune::WeightBytes b = ktune::weight_bytes(qwen(), QuantType::Q4_0, QuantType::Q4_0);
  ASSERT_EQ(b.expert.size(), 48u);
  EXPECT_EQ(b.expert[0], kExpert);
  EXPECT_EQ(b.attention[47], kAttentionLayer);
  EXPECT_EQ(b.embedding, kEmbedding);
  EXPECT_EQ(b.head, kHead);
  EXPECT_EQ(b.head_shared, 0);
  // Q8_0 experts with BF16 dense matrices.
  const ktune::WeightBytes c = ktune::weight_bytes(qwen(), QuantType::Q8_0, QuantType::BF16);
  EXPECT_EQ(c.expert[0], 3 * 768 * 2048 / 32 * 34);
  EXPECT_EQ(c.embedding, 151936 * 2048 * 2);
}

// For a synthetic model, the byte counts from its real tensors equal those from its shape.
TEST(MemoryPlanWeights, MatchesLoadedSyntheticModel) {
  ktune::SynthOptions o;
  o.preset = "tiny";
  o.quant = QuantType::Q8_0;
  const ktune::ModelWeights w = ktune::make_synthetic_model(o);
  const ktune::WeightBytes real = ktune::weight_bytes(w);
  const ktune::WeightBytes shape = ktune::weight_bytes(tiny(), QuantType::Q8_0, QuantType::Q8_0);
  EXPECT_EQ(real.attention, shape.attention);
  EXPECT_EQ(real.expert, shape.expert);
  EXPECT_EQ(real.embedding, shape.embedding);
  EXPECT_EQ(real.head, shape.head);
  // Everything on the CPU: the plan's weights are every byte of the model.
  const ktune::Placement p = ktune::make_uniform_placement(tiny(), Device::cpu(), Device::cpu());
  const ktune::MemoryPlan plan = ktune::plan_memory(w, p, budgets(0, int64_t(1) << 40));
  ASSERT_EQ(plan.per_device.size(), 1u);
  EXPECT_EQ(plan.per_device.at("cpu").weights, w.weight_bytes());
  // Tied embeddings: one copy serves both on one device, two copies on two devices.
  ktune::ModelWeights tied = ktune::make_synthetic_model(o);
  tied.output = tied.tok_embd;
  const ktune::WeightBytes t = ktune::weight_bytes(tied);
  EXPECT_EQ(t.head_shared, tied.tok_embd.nbytes());
  const auto one = ktune::plan_memory(tied, p, budgets(0, 0));
  EXPECT_EQ(one.per_device.at("cpu").weights, w.weight_bytes() - w.output.nbytes());
  ktune::Placement split = p;
  split.layers[3].attention = Device::cuda(0);
  const auto two = ktune::plan_memory(tied, split, budgets(0, 0));
  EXPECT_EQ(two.per_device.at("cpu").weights + two.per_device.at("cuda:0").weights,
            w.weight_bytes());
}

TEST(MemoryPlan, QwenAllOnGpuByHand) {
  const auto p = ktune::make_uniform_placement(qwen(), Device::cuda(0), Device::cuda(0));
  const auto plan = ktune::plan_memory(qwen(), QuantType::Q4_0, QuantType::Q4_0, p,
                                       budgets(80 * ktune::kGiB, 100 * ktune::kGiB));
  ASSERT_EQ(plan.per_device.size(), 1u);
  const ktune::DeviceUse& g = plan.per_device.at("cuda:0");
  EXPECT_EQ(g.weights, kAllExperts + 48 * kAttentionLayer + kEmbedding + kHead);
  EXPECT_EQ(g.weights, 17218297856);
  EXPECT_EQ(g.kv_cache, kKvGpu);
  EXPECT_EQ(g.staging, 0);
  EXPECT_EQ(g.workspace, kAttnAct + kScores + kExpertAct + kLogits + ktune::kGpuContextReserve);
  EXPECT_EQ(g.graph_pool, 64 * ktune::kMiB);
  EXPECT_EQ(g.total, g.weights + g.kv_cache + g.workspace + g.graph_pool);
  EXPECT_EQ(g.total, 18324334080);
  EXPECT_EQ(g.experts, 48 * 128);
  EXPECT_TRUE(g.attention);
  EXPECT_EQ(g.budget, 80 * ktune::kGiB);
  EXPECT_NO_THROW(ktune::check_fits(plan));
  EXPECT_EQ(g.breakdown(),
            "17.1 GiB (weights 16.0, KV cache 0.4, workspace 0.6, graph 0.1) of 80.0 GiB");
}

TEST(MemoryPlan, QwenExpertsOnCpuByHand) {
  const auto p = ktune::make_uniform_placement(qwen(), Device::cuda(0), Device::cpu());
  const auto plan = ktune::plan_memory(qwen(), QuantType::Q4_0, QuantType::Q4_0, p,
                                       budgets(80 * ktune::kGiB, 100 * ktune::kGiB));
  const ktune::DeviceUse& g = plan.per_device.at("cuda:0");
  const ktune::DeviceUse& c = plan.per_device.at("cpu");
  EXPECT_EQ(g.weights, 48 * kAttentionLayer + kEmbedding + kHead);
  EXPECT_EQ(g.staging, 2 * 128 * kExpert);  // one layer's CPU experts, double-buffered
  // The GPU computes the staged experts too, so the prefill workspace (larger than the
  // attention estimate) is what it needs.
  EXPECT_EQ(ktune::prefill_workspace_bytes(qwen(), 512), kPrefillWs);
  EXPECT_EQ(g.workspace, kPrefillWs + kScores + kLogits + ktune::kGpuContextReserve + g.staging);
  EXPECT_EQ(g.total, 2667772672);
  EXPECT_EQ(g.experts, 0);
  EXPECT_EQ(c.weights, kAllExperts);
  EXPECT_EQ(c.kv_cache, 0);
  EXPECT_EQ(c.workspace, kExpertAct);
  EXPECT_EQ(c.graph_pool, 0);
  EXPECT_FALSE(c.attention);
  EXPECT_EQ(c.experts, 48 * 128);
  // Without staging for prefill the GPU needs only its share.
  ktune::PlanOptions o;
  o.stage_cpu_experts_for_prefill = false;
  const auto lean = ktune::plan_memory(qwen(), QuantType::Q4_0, QuantType::Q4_0, p,
                                       budgets(80 * ktune::kGiB, 100 * ktune::kGiB), o);
  EXPECT_EQ(lean.per_device.at("cuda:0").total, g.total - g.staging);
}

TEST(MemoryPlan, LayerSplitAndRuntimeTerms) {
  auto p = ktune::make_layer_split(qwen(), 24, Device::cuda(0));
  p.runtime.context = 32768;
  p.runtime.batch = 2;
  p.runtime.cuda_graph = false;
  const auto plan = ktune::plan_memory(qwen(), QuantType::Q4_0, QuantType::Q4_0, p,
                                       budgets(80 * ktune::kGiB, 100 * ktune::kGiB));
  const ktune::DeviceUse& g = plan.per_device.at("cuda:0");
  EXPECT_EQ(g.weights, 24 * 128 * kExpert + 48 * kAttentionLayer + kEmbedding + kHead);
  EXPECT_EQ(g.kv_cache, kKvGpu * 8 * 2);  // 8x context, 2 sequences
  EXPECT_EQ(g.graph_pool, 0);
  // With 2 sequences the GPU adds the batched decode step's state.
  EXPECT_EQ(g.workspace, kAttnAct + 4 * 32 * 32768 * 2 + kExpertAct + 2 * kLogits +
                             ktune::kGpuContextReserve + 2 * 128 * kExpert +
                             ktune::batch_decode_workspace_bytes(qwen(), 2, 32768));
  EXPECT_EQ(plan.per_device.at("cpu").weights, 24 * 128 * kExpert);

  // Attention on the CPU: K and V in f32 there; no graph pool, no GPU reserve.
  const auto cpu = ktune::make_uniform_placement(qwen(), Device::cpu(), Device::cpu());
  const auto cp = ktune::plan_memory(qwen(), QuantType::Q4_0, QuantType::Q4_0, cpu,
                                     budgets(0, 100 * ktune::kGiB));
  EXPECT_EQ(cp.per_device.size(), 1u);
  EXPECT_EQ(cp.per_device.at("cpu").kv_cache, kKvGpu * 2);
  EXPECT_EQ(cp.per_device.at("cpu").workspace, kAttnAct + kScores + kExpertAct + kLogits);
}

TEST(MemoryPlan, MultiGpuEmbeddingHeadAndNumaNodes) {
  // Layers 0-23 on cuda:0, 24-47 on cuda:1, a few experts on NUMA node 1: the embedding goes
  // with layer 0, the head with layer 47, cpu:1 counts under its own pool (NUMA, issue 7).
  auto p = ktune::make_uniform_placement(qwen(), Device::cuda(0), Device::cuda(0));
  for (int l = 24; l < 48; ++l) {
    p.layers[l].attention = Device::cuda(1);
    std::fill(p.layers[l].experts.begin(), p.layers[l].experts.end(), Device::cuda(1));
  }
  p.layers[47].experts[0] = Device{Device::Cpu, 1};
  auto b = budgets(80 * ktune::kGiB, 100 * ktune::kGiB);
  b.bytes["cuda:1"] = 80 * ktune::kGiB;
  const auto plan = ktune::plan_memory(qwen(), QuantType::Q4_0, QuantType::Q4_0, p, b);
  ASSERT_EQ(plan.per_device.size(), 3u);
  EXPECT_EQ(plan.per_device.begin()->first, "cpu:1");
  const auto& g0 = plan.per_device.at("cuda:0");
  const auto& g1 = plan.per_device.at("cuda:1");
  EXPECT_EQ(g0.weights, 24 * 128 * kExpert + 24 * kAttentionLayer + kEmbedding);
  EXPECT_EQ(g1.weights, (24 * 128 - 1) * kExpert + 24 * kAttentionLayer + kHead);
  EXPECT_EQ(plan.per_device.at("cpu:1").weights, kExpert);
  EXPECT_EQ(g0.kv_cache, kKvGpu / 2);
  EXPECT_EQ(g0.workspace,
            kAttnAct + kScores + kExpertAct + ktune::kGpuContextReserve + ktune::kGpuCommReserve);
  EXPECT_EQ(g1.staging, 2 * kExpert);
  EXPECT_NO_THROW(ktune::check_fits(plan));
}

TEST(MemoryPlan, CheckFitsMessages) {
  const auto p = ktune::make_uniform_placement(qwen(), Device::cuda(0), Device::cuda(0));
  auto plan = ktune::plan_memory(qwen(), QuantType::Q4_0, QuantType::Q4_0, p,
                                 budgets(16 * ktune::kGiB, 100 * ktune::kGiB));
  std::string m = fits_error(plan);
  EXPECT_EQ(m,
            "cuda:0: the plan needs 17.1 GiB (weights 16.0, KV cache 0.4, workspace 0.6, "
            "graph 0.1) but the budget is 16.0 GiB; put fewer experts on cuda:0, lower "
            "runtime.context, or raise --gpu-mem");
  // Need and budget that round alike get more decimals.
  plan = ktune::plan_memory(qwen(), QuantType::Q4_0, QuantType::Q4_0, p,
                            budgets(18324334080 - 1000, 100 * ktune::kGiB));
  m = fits_error(plan);
  EXPECT_HAS(m, "the plan needs 17.066 GiB");
  EXPECT_HAS(m, "but the budget is 17.066 GiB");
  // The host.
  const auto cpu = ktune::make_uniform_placement(qwen(), Device::cuda(0), Device::cpu());
  plan = ktune::plan_memory(qwen(), QuantType::Q4_0, QuantType::Q4_0, cpu,
                            budgets(80 * ktune::kGiB, 8 * ktune::kGiB));
  m = fits_error(plan);
  EXPECT_HAS(m, "cpu: the plan needs 15.2 GiB (weights 15.2, KV cache 0.0, workspace 0.1)");
  EXPECT_HAS(m, "put fewer experts on cpu, lower runtime.context, or raise --cpu-mem");
  // Unknown host memory is not checked.
  ktune::Budgets gpu_only;
  gpu_only.bytes["cuda:0"] = 80 * ktune::kGiB;
  EXPECT_NO_THROW(ktune::check_fits(
      ktune::plan_memory(qwen(), QuantType::Q4_0, QuantType::Q4_0, cpu, gpu_only)));
}

TEST(MemoryPlan, NoSuchDevice) {
  const auto p = ktune::make_uniform_placement(qwen(), Device::cuda(3), Device::cpu());
  std::string m = fits_error(ktune::plan_memory(qwen(), QuantType::Q4_0, QuantType::Q4_0, p,
                                                budgets(80 * ktune::kGiB, 100 * ktune::kGiB)));
  EXPECT_HAS(m, "cuda:3: no such device here (GPUs: cuda:0); ");
  EXPECT_HAS(m, "--gpu-mem cuda:3=SIZE");
  ktune::Budgets none;
  none.bytes["cpu"] = 100 * ktune::kGiB;
  none.gpu_note = "no usable GPU: this ktune was built without CUDA (KTUNE_CUDA=OFF)";
  m = fits_error(ktune::plan_memory(qwen(), QuantType::Q4_0, QuantType::Q4_0, p, none));
  EXPECT_HAS(m, "cuda:3: no such device here (no GPU: no usable GPU: this ktune was built");
}

TEST(MemoryPlan, RejectsUnresolvedOrOtherShape) {
  ktune::Placement unresolved;
  EXPECT_THROW(
      ktune::plan_memory(qwen(), QuantType::Q4_0, QuantType::Q4_0, unresolved, budgets(1, 1)),
      ktune::Error);
  const auto t = ktune::make_uniform_placement(tiny(), Device::cpu(), Device::cpu());
  EXPECT_THROW(ktune::plan_memory(qwen(), QuantType::Q4_0, QuantType::Q4_0, t, budgets(1, 1)),
               ktune::Error);
}

TEST(MemoryPlanBudgets, ParsesSizes) {
  EXPECT_EQ(ktune::parse_byte_size("70GiB", "f"), 70 * ktune::kGiB);
  EXPECT_EQ(ktune::parse_byte_size("20000MiB", "f"), 20000 * ktune::kMiB);
  EXPECT_EQ(ktune::parse_byte_size("1.5 gib", "f"), 3 * ktune::kGiB / 2);
  EXPECT_EQ(ktune::parse_byte_size("80G", "f"), 80 * ktune::kGiB);
  EXPECT_EQ(ktune::parse_byte_size("80GB", "f"), 80000000000);
  EXPECT_EQ(ktune::parse_byte_size("0GiB", "f"), 0);
  EXPECT_EQ(ktune::parse_byte_size("4096b", "f"), 4096);
  for (const char* bad :
       {"512", "-5GiB", "abc", "GiB", "5 PiB", "2000TiB", "1e3GiB", "5GiB x", "1..5GiB", ""}) {
    try {
      ktune::parse_byte_size(bad, "--gpu-mem");
      ADD_FAILURE() << "accepted " << bad;
    } catch (const ktune::Error& e) {
      EXPECT_EQ(e.exit_code(), 2) << bad;
      EXPECT_HAS(e.what(), "--gpu-mem: ");
    }
  }
}

TEST(MemoryPlanBudgets, Overrides) {
  auto list = ktune::parse_budget_overrides("cuda:0=70GiB, cuda:1=20000MiB", "--gpu-mem");
  ASSERT_EQ(list.size(), 2u);
  EXPECT_EQ(list[0], (std::pair<std::string, int64_t>{"cuda:0", 70 * ktune::kGiB}));
  EXPECT_EQ(list[1], (std::pair<std::string, int64_t>{"cuda:1", 20000 * ktune::kMiB}));

  ktune::Budgets b;
  b.bytes["cuda:0"] = 79 * ktune::kGiB;
  b.bytes["cuda:1"] = 79 * ktune::kGiB;
  b.bytes["cpu"] = 500 * ktune::kGiB;
  ktune::apply_budget_overrides(b, "70GiB", "--gpu-mem", Device::Cuda);
  EXPECT_EQ(b.bytes["cuda:0"], 70 * ktune::kGiB);
  EXPECT_EQ(b.bytes["cuda:1"], 70 * ktune::kGiB);
  ktune::apply_budget_overrides(b, "cuda:1=20000MiB,cuda:3=1GiB", "--gpu-mem", Device::Cuda);
  EXPECT_EQ(b.bytes["cuda:1"], 20000 * ktune::kMiB);
  EXPECT_EQ(b.bytes["cuda:3"], ktune::kGiB);  // planning for another machine is allowed
  ktune::apply_budget_overrides(b, "100GiB", "--cpu-mem", Device::Cpu);
  EXPECT_EQ(b.bytes["cpu"], 100 * ktune::kGiB);
  ktune::apply_budget_overrides(b, "cpu=90GiB", "--cpu-mem", Device::Cpu);
  EXPECT_EQ(b.bytes["cpu"], 90 * ktune::kGiB);

  for (const char* bad :
       {"cuda:x=5GiB", "cuda:0=", "=5GiB", "cuda:0=5GiB,,", "cuda:0=-1GiB", "  "}) {
    ktune::Budgets c = b;
    try {
      ktune::apply_budget_overrides(c, bad, "--gpu-mem", Device::Cuda);
      ADD_FAILURE() << "accepted " << bad;
    } catch (const ktune::Error& e) {
      EXPECT_EQ(e.exit_code(), 2) << bad;
      EXPECT_HAS(e.what(), "--gpu-mem");
    }
  }
  ktune::Budgets no_gpu;
  try {
    ktune::apply_budget_overrides(no_gpu, "70GiB", "--gpu-mem", Device::Cuda);
    ADD_FAILURE();
  } catch (const ktune::Error& e) {
    EXPECT_HAS(e.what(), "--gpu-mem: there is no GPU here to give 70.0 GiB to");
  }
}

TEST(MemoryPlanBudgets, DefaultsAndDeviceOrder) {
  const ktune::Budgets b = ktune::default_budgets();
  for (const auto& [name, bytes] : b.bytes) EXPECT_GE(bytes, 0) << name;
  if (b.bytes.count("cuda:0") == 0) {
    EXPECT_FALSE(b.gpu_note.empty());
  }
  ktune::DeviceNameLess less;
  EXPECT_TRUE(less("cpu", "cuda:0"));
  EXPECT_TRUE(less("cuda:2", "cuda:10"));
  EXPECT_FALSE(less("cuda:10", "cuda:2"));
  EXPECT_TRUE(less("cuda:10", "zzz"));
}

// Hybrid prefill's staging threshold: the copy's time against n decode steps' CPU reads.
TEST(HybridPrefillPolicy, StagesOnceDecodeStepsReadLongerThanTheCopy) {
  // qwen3-30b-a3b Q4_0, 2987 of 6144 experts on the CPU (the H100 verify run): 7.93 GB to copy;
  // a decode step reads 8 * 2987/6144 experts of 2.654 MB in each of 48 layers.
  const double eb = 2654208.0;
  const double copy = 2987 * eb;
  const double per_token = 48 * 8.0 * (2987.0 / 6144.0) * eb;
  // (copy / 45 GB/s) / (per_token / 85 GB/s) = 2987 * 85 / (45 * 48 * 8 * 2987 / 6144) = 30.2.
  EXPECT_EQ(ktune::hybrid_prefill_min_staged(copy, per_token), 31);
  // Twice the copy bandwidth halves the threshold; an exact ratio is not rounded up.
  EXPECT_EQ(ktune::hybrid_prefill_min_staged(100, 10, 10, 10), 10);
  EXPECT_EQ(ktune::hybrid_prefill_min_staged(100, 10, 20, 10), 5);
  EXPECT_EQ(ktune::hybrid_prefill_min_staged(100, 30, 10, 10), 4);  // 3.33 -> 4
  // Nothing on the CPU to copy: every chunk stages (there is nothing to stage).
  EXPECT_EQ(ktune::hybrid_prefill_min_staged(0, 0), 1);
  // Huge CPU reads per token: even one token stages.
  EXPECT_EQ(ktune::hybrid_prefill_min_staged(1e6, 1e12), 1);
  // Decode steps that read nothing never lose to a copy.
  EXPECT_GT(ktune::hybrid_prefill_min_staged(1e9, 0), int64_t{1} << 30);
}

}  // namespace
