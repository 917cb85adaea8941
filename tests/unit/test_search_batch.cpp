// The search's workload batch: parsing, a decode step of B sequences priced by the distinct
// experts its B tokens select (E(1 - (1 - k/E)^B) under uniform routing), machine time per
// request shared by the batch, and the tables still summing to the prediction.
#include <gtest/gtest.h>

#include <cmath>

#include "ktune/engine/error.h"
#include "search/cost_model.h"
#include "search/search.h"
#include "test_search_util.h"

namespace ktune::search {
namespace {

CostModel make(const ModelInfo& mi, const std::string& workload) {
  return CostModel(machine_costs(test::h100_profile(), parse_assumptions("")), mi,
                   uniform_router(mi.cfg), parse_workload(workload));
}

TEST(SearchBatch, WorkloadParsesBatch) {
  EXPECT_EQ(parse_workload("prompt=512,gen=128").batch, 1);
  const Workload w = parse_workload("prompt=512,gen=128,batch=8");
  EXPECT_EQ(w.batch, 8);
  EXPECT_NE(w.describe().find("batch 8"), std::string::npos) << w.describe();
  const Workload c = parse_workload("chat,batch=4");
  EXPECT_EQ(c.batch, 4);
  EXPECT_EQ(c.requests.size(), chat_workload().requests.size());
  EXPECT_THROW(parse_workload("prompt=512,gen=128,batch=0"), Error);
  EXPECT_THROW(parse_workload("chat,gen=5"), Error);
}

TEST(SearchBatch, CpuStepReadsTheDistinctExpertsOfTheBatch) {
  const ModelInfo mi =
      model_info(*find_preset("qwen3-30b-a3b"), QuantType::Q4_0, QuantType::Q4_0, "synth:q");
  const CostModel one = make(mi, "prompt=64,gen=64");
  const CostModel eight = make(mi, "prompt=64,gen=64,batch=8");
  EngineSettings e;
  e.gpu = false;
  e.cpu_threads = 8;  // read 85 GB/s, CpuMoe 50 GB/s in the test profile
  const LayerSplit s1 = one.hottest_split(0, 0), s8 = eight.hottest_split(0, 0);
  const ModelConfig& c = mi.cfg;
  const double ctx = 100, eb = double(mi.bytes.expert[0]);
  const double kv = 2 * ctx * double(c.n_kv_heads * c.head_dim) * 4;
  const double distinct = 128 * (1 - std::pow(1 - 8.0 / 128, 8));  // 51.6 of 128
  const double want =
      (double(mi.bytes.attention[0]) + 8 * kv) / (85 * 1e3) + distinct * eb / (50 * 1e3);
  EXPECT_NEAR(eight.decode_layer_us(0, s8, e, ctx), want, 1e-6 * want);
  // Batch 1 reads k experts per token; batch 8 reads 51 per step for 8 tokens: faster per token.
  const double per_token_1 = one.decode_layer_us(0, s1, e, ctx);
  const double per_token_8 = eight.decode_layer_us(0, s8, e, ctx) / 8;
  EXPECT_LT(per_token_8, per_token_1);
  std::vector<LayerSplit> a, b;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    a.push_back(one.hottest_split(l, 0));
    b.push_back(eight.hottest_split(l, 0));
  }
  const Prediction p1 = one.predict(a, e), p8 = eight.predict(b, e);
  EXPECT_GT(p8.decode_tok_s, 1.3 * p1.decode_tok_s);  // ~51 experts per 8 tokens, not 64
  EXPECT_NEAR(p8.prefill_s, p1.prefill_s, 1e-12);     // prefill is per request either way
}

TEST(SearchBatch, GpuExpertsPayOffMoreAtLargerBatches) {
  // Moving half the experts of every layer to the GPU saves more per request at batch 16
  // than at batch 1 relative to all on the CPU (more distinct experts per step).
  const ModelInfo mi =
      model_info(*find_preset("qwen3-30b-a3b"), QuantType::Q4_0, QuantType::Q4_0, "synth:q");
  EngineSettings e;
  e.cpu_threads = 16;
  auto gain = [&](const std::string& w) {
    const CostModel cm = make(mi, w);
    std::vector<LayerSplit> none, half;
    for (int64_t l = 0; l < mi.cfg.n_layers; ++l) {
      none.push_back(cm.hottest_split(l, 0));
      half.push_back(cm.hottest_split(l, 64));
    }
    return cm.predict(none, e).decode_s / cm.predict(half, e).decode_s;
  };
  EXPECT_GT(gain("prompt=64,gen=256,batch=16"), gain("prompt=64,gen=256"));
}

TEST(SearchBatch, TablesSumToThePrediction) {
  const ModelInfo mi =
      model_info(*find_preset("qwen3-30b-a3b"), QuantType::Q4_0, QuantType::Q4_0, "synth:q");
  const CostModel cm = make(mi, "prompt=8,gen=100;prompt=12,gen=7,weight=2,batch=4");
  EngineSettings e;
  e.cpu_threads = 16;
  const auto t = cm.layer_tables(e);
  std::vector<LayerSplit> splits;
  double sum = cm.constant_s(e);
  for (int64_t l = 0; l < 48; ++l) {
    const int64_t m = (l * 37) % 129;
    splits.push_back(cm.hottest_split(l, m));
    sum += t[size_t(l)][size_t(m)];
  }
  EXPECT_NEAR(cm.predict(splits, e).request_s, sum, 1e-9 * sum);
}

TEST(SearchBatch, PlacementsPlanTheKvCachePerSequence) {
  const ModelInfo mi =
      model_info(*find_preset("qwen3-30b-a3b"), QuantType::Q4_0, QuantType::Q4_0, "synth:q");
  EngineSettings e;
  const std::vector<std::vector<bool>> none(48, std::vector<bool>(128, false));
  const Placement p = make_placement(mi, e, none, 4096, "cuda:0", 8);
  EXPECT_EQ(p.runtime.batch, 8);
  const MemoryModel m1 = memory_model(mi, true, 4096),
                    m8 = memory_model(mi, true, 4096, "cuda:0", 8);
  // f16 K and V of 48 layers x 4096 positions x 512 values, 7 more sequences.
  EXPECT_GE(m8.gpu_fixed - m1.gpu_fixed, int64_t{7} * 48 * 2 * 4096 * 512 * 2);
}

}  // namespace
}  // namespace ktune::search
