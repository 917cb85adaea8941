// The exports: llama.cpp -ot and ktransformers rules written for whole-layer placements read
// back to the same layers (first matching rule wins, as ktransformers' loader applies them), the
// rule-pattern subset matches like Python's re.search, and split layers are refused.
#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include "ktune/engine/error.h"
#include "search/emit.h"
#include "test_search_util.h"

namespace ktune::search {
namespace {

Candidate whole_layer_candidate(const ModelInfo& mi, const std::vector<bool>& gpu_layers) {
  Candidate c;
  c.settings.cpu_threads = 16;
  for (bool g : gpu_layers) {
    c.on_gpu.emplace_back(size_t(mi.cfg.n_experts), g);
    c.gpu_counts.push_back(g ? mi.cfg.n_experts : 0);
  }
  c.placement = make_placement(mi, c.settings, c.on_gpu, 4096);
  c.plan = plan_memory(mi.cfg, mi.bytes, c.placement, Budgets{});
  return c;
}

ModelInfo qwen30() {
  return model_info(*find_preset("qwen3-30b-a3b"), QuantType::Q4_0, QuantType::Q4_0,
                    "synth:qwen3-30b-a3b:q4_0");
}

TEST(SearchEmit, RulePatternsMatchLikePythonReSearch) {
  EXPECT_TRUE(rule_pattern_matches("^model\\.layers\\.(0|1|12)\\.mlp\\.experts$",
                                   "model.layers.12.mlp.experts"));
  EXPECT_FALSE(rule_pattern_matches("^model\\.layers\\.(0|1|12)\\.mlp\\.experts$",
                                    "model.layers.2.mlp.experts"));
  EXPECT_FALSE(rule_pattern_matches("^model\\.layers\\.(1)\\.mlp\\.experts$",
                                    "model.layers.12.mlp.experts"));  // the trailing \. matters
  EXPECT_TRUE(
      rule_pattern_matches("^model\\.layers\\..*\\.mlp\\.experts$", "model.layers.47.mlp.experts"));
  EXPECT_FALSE(rule_pattern_matches("^model\\.layers\\..*\\.mlp$", "model.layers.4.mlp.experts"));
  EXPECT_TRUE(rule_pattern_matches("^model\\.embed_tokens", "model.embed_tokens"));
  EXPECT_TRUE(rule_pattern_matches("layers", "model.layers.3"));  // unanchored: search
  EXPECT_FALSE(rule_pattern_matches("^layers", "model.layers.3"));
  EXPECT_THROW(rule_pattern_matches("^model\\.layers\\.([0-9])\\.", "x"), Error);  // not ours
  EXPECT_THROW(rule_pattern_matches("(a|b", "a"), Error);
}

TEST(SearchEmit, LlamaCppOverridesRoundTrip) {
  const ModelInfo mi = qwen30();
  std::vector<bool> gpu(48, false);
  for (int l : {0, 1, 2, 5, 9, 10, 47}) gpu[size_t(l)] = true;
  const Candidate c = whole_layer_candidate(mi, gpu);
  const std::string ot = llama_cpp_overrides(c);
  EXPECT_EQ(ot.rfind("blk\\.(3|4|6|7|8|11|12|", 0), 0u) << ot;
  EXPECT_NE(ot.find(")\\.ffn_(up|down|gate)_exps\\.weight=CPU"), std::string::npos);
  const std::vector<bool> cpu = read_llama_cpp_overrides(ot + "\n", 48);
  for (int l = 0; l < 48; ++l) EXPECT_EQ(cpu[size_t(l)], !gpu[size_t(l)]) << l;
  // All on the GPU: nothing to override.
  EXPECT_EQ(llama_cpp_overrides(whole_layer_candidate(mi, std::vector<bool>(48, true))), "");
  EXPECT_THROW(read_llama_cpp_overrides("blk\\.(3|99)\\.ffn_(up|down|gate)_exps\\.weight=CPU", 48),
               Error);
  EXPECT_THROW(read_llama_cpp_overrides("exps=CPU", 48), Error);
}

TEST(SearchEmit, KtransformersRulesRoundTripAndParse) {
  const ModelInfo mi = qwen30();
  for (int pattern = 0; pattern < 3; ++pattern) {
    std::vector<bool> gpu(48);
    for (int l = 0; l < 48; ++l) gpu[size_t(l)] = pattern == 0 ? l % 3 == 0 : pattern == 1;
    const Candidate c = whole_layer_candidate(mi, gpu);
    const std::string rules = ktransformers_rules(mi, c);
    const std::vector<std::string> dev = read_ktransformers_expert_devices(rules, 48);
    for (int l = 0; l < 48; ++l) {
      EXPECT_EQ(dev[size_t(l)], gpu[size_t(l)] ? "cuda:0" : "cpu") << pattern << " layer " << l;
    }
    // Every rule has match + replace, the experts rules do not recurse, graph advice present
    // when experts are on the GPU.
    const YAML::Node doc = YAML::Load(rules);
    ASSERT_TRUE(doc.IsSequence());
    int experts_rules = 0;
    for (const YAML::Node& r : doc) {
      ASSERT_TRUE(r["match"] && r["replace"] && r["replace"]["class"]);
      const std::string cls = r["replace"]["class"].as<std::string>();
      if (cls == "ktransformers.operators.experts.KTransformersExperts") {
        ++experts_rules;
        EXPECT_FALSE(r["recursive"].as<bool>());
        EXPECT_EQ(r["replace"]["kwargs"]["out_device"].as<std::string>(), "cuda:0");
      }
    }
    EXPECT_EQ(experts_rules, pattern == 2 ? 1 : 2);
    EXPECT_EQ(rules.find("use_cuda_graph") != std::string::npos, pattern != 2);
  }
}

TEST(SearchEmit, SplitLayersAreRefusedByTheExports) {
  const ModelInfo mi = qwen30();
  Candidate c = whole_layer_candidate(mi, std::vector<bool>(48, false));
  c.on_gpu[3][7] = true;
  c.gpu_counts[3] = 1;
  EXPECT_THROW(llama_cpp_overrides(c), Error);
  EXPECT_THROW(ktransformers_rules(mi, c), Error);
}

TEST(SearchEmit, PlacementYamlKeepsItsCommentsOutOfTheData) {
  const ModelInfo mi = qwen30();
  Candidate c = whole_layer_candidate(mi, std::vector<bool>(48, true));
  Predicted p;
  p.decode_tok_s = 201.5;
  p.prefill_tok_s = 8000;
  p.memory_gib[Device::cuda(0)] = 17.4;
  c.placement.predicted = p;
  c.placement.searched_on = SearchedOn{"profiles/x.json", "uniform"};
  const std::string text = placement_yaml(c, {"line one", "Run it: ktune run --config best.yaml"});
  EXPECT_EQ(text.rfind("# line one\n# Run it: ktune run --config best.yaml\nktune: 1\n", 0), 0u)
      << text;
  const Placement back = parse_placement(text, "best.yaml", &mi.cfg);
  EXPECT_TRUE(back == c.placement);
  ASSERT_TRUE(back.predicted.has_value());
  EXPECT_DOUBLE_EQ(*back.predicted->decode_tok_s, 201.5);
  EXPECT_EQ(back.searched_on->profile, "profiles/x.json");
}

}  // namespace
}  // namespace ktune::search
