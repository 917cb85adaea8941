// deepseek2 in the model layer: presets and their parameter counts, llama.cpp's tensor names,
// shapes and metadata, GGUF round trips in both attn_kv_b layouts, Hugging Face configs, YaRN,
// the routing op, the memory planner's sizes and `ktune info`.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "ktune/engine/error.h"
#include "ktune/engine/gguf.h"
#include "ktune/engine/hf_checkpoint.h"
#include "ktune/engine/memory_plan.h"
#include "ktune/engine/model.h"
#include "ktune/engine/placement.h"
#include "ktune/engine/synthetic.h"
#include "runtime/cpu_engine_deepseek.h"
#include "runtime/cpu_ops.h"
#include "subprocess.h"

namespace fs = std::filesystem;

namespace ktune {
namespace {

class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    path_ = fs::temp_directory_path() /
            ("ktune_test_ds_" + std::to_string(getpid()) + "_" + std::to_string(counter++));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

#define EXPECT_HAS(text, part)                               \
  EXPECT_NE(std::string(text).find(part), std::string::npos) \
      << "expected to find [" << (part) << "] in [" << (text) << "]"

const ModelConfig& preset(const char* name) { return *find_preset(name); }

// A V2-Lite-like variant of tiny-deepseek: uncompressed queries (attn_q), softmax routing
// without bias or groups, weights not normalized, two shared experts, one attn_kv_b.
ModelConfig tiny_v2_style() {
  ModelConfig c = preset("tiny-deepseek");
  c.q_lora_rank = 0;
  c.gating = ExpertGating::Softmax;
  c.expert_score_bias = false;
  c.n_expert_groups = c.n_groups_used = 1;
  c.norm_topk_prob = false;
  c.expert_weights_scale = 1.0f;
  c.n_shared_experts = 2;
  c.split_kv_b = false;
  c.yarn_mscale = c.yarn_mscale_all_dim = 0.707f;
  return c;
}

// ---------------------------------------------------------------------------------------------
// Presets and counts

TEST(DeepseekPresets, ShapesOfTheRealModels) {
  const ModelConfig& v3 = preset("deepseek-v3");
  EXPECT_EQ(v3.arch, "deepseek2");
  EXPECT_EQ(v3.hidden, 7168);
  EXPECT_EQ(v3.n_layers, 61);
  EXPECT_EQ(v3.n_heads, 128);
  EXPECT_EQ(v3.q_lora_rank, 1536);
  EXPECT_EQ(v3.kv_lora_rank, 512);
  EXPECT_EQ(v3.qk_nope_dim(), 128);
  EXPECT_EQ(v3.rope_dim, 64);
  EXPECT_EQ(v3.v_head_dim, 128);
  EXPECT_EQ(v3.n_experts, 256);
  EXPECT_EQ(v3.n_experts_used, 8);
  EXPECT_EQ(v3.n_shared_experts, 1);
  EXPECT_EQ(v3.n_expert_groups, 8);
  EXPECT_EQ(v3.n_groups_used, 4);
  EXPECT_EQ(v3.n_dense_lead, 3);
  EXPECT_EQ(v3.dense_ffn, 18432);
  EXPECT_EQ(v3.expert_ffn, 2048);
  EXPECT_EQ(v3.vocab, 129280);
  EXPECT_EQ(v3.gating, ExpertGating::Sigmoid);
  EXPECT_TRUE(v3.expert_score_bias);
  EXPECT_TRUE(v3.norm_topk_prob);
  EXPECT_FLOAT_EQ(v3.expert_weights_scale, 2.5f);
  EXPECT_EQ(v3.kv_cache_values(), 576);
  const ModelConfig& lite = preset("deepseek-v2-lite");
  EXPECT_EQ(lite.q_lora_rank, 0);
  EXPECT_EQ(lite.n_experts, 64);
  EXPECT_EQ(lite.n_experts_used, 6);
  EXPECT_EQ(lite.n_shared_experts, 2);
  EXPECT_EQ(lite.expert_ffn, 1408);
  EXPECT_EQ(lite.gating, ExpertGating::Softmax);
  EXPECT_FALSE(lite.norm_topk_prob);
  for (const char* n : {"tiny-deepseek", "deepseek-v2-lite", "deepseek-v3"}) {
    EXPECT_NO_THROW(preset(n).validate(n)) << n;
  }
  EXPECT_NO_THROW(tiny_v2_style().validate("v2 style"));
}

// The model cards: DeepSeek-V3 671 B total, 37 B activated; DeepSeek-V2-Lite 15.7 B total,
// 2.4 B activated (without the embedding table: ours counts it, 0.21 B).
TEST(DeepseekPresets, ParameterCountsMatchTheModelCards) {
  const ModelConfig& v3 = preset("deepseek-v3");
  EXPECT_NEAR(v3.params_total() / 671e9, 1.0, 0.002);
  EXPECT_NEAR(v3.params_active_per_token() / 37.5e9, 1.0, 0.02);
  const ModelConfig& lite = preset("deepseek-v2-lite");
  EXPECT_NEAR(lite.params_total() / 15.7e9, 1.0, 0.005);
  EXPECT_NEAR((lite.params_active_per_token() - lite.hidden * lite.vocab) / 2.4e9, 1.0, 0.03);
}

// The counts equal the elements of the tensors the layout lists (an independent path), and
// the active count replaces the routed experts by the top-k's share.
TEST(DeepseekPresets, CountsEqualTheTensorList) {
  for (const ModelConfig& c : {preset("tiny-deepseek"), preset("deepseek-v2-lite"),
                               preset("deepseek-v3"), tiny_v2_style()}) {
    int64_t total = 0, experts = 0;
    for (const TensorSpec& s : model_tensor_specs(c)) {
      const int64_t n = s.ne[0] * s.ne[1] * s.ne[2];
      total += n;
      if (s.role == TensorRole::Experts) experts += n;
    }
    EXPECT_EQ(c.params_total(), total) << c.name;
    EXPECT_EQ(c.params_active_per_token(),
              total - experts + experts / c.n_experts * c.n_experts_used)
        << c.name;
  }
}

TEST(DeepseekPresets, ValidateNamesTheProblem) {
  ModelConfig c = preset("tiny-deepseek");
  c.n_groups_used = 5;
  EXPECT_HAS(error_of([&] { c.validate("x.gguf"); }), "expert_group_used_count 5");
  c = preset("tiny-deepseek");
  c.n_expert_groups = 3;
  EXPECT_HAS(error_of([&] { c.validate("x.gguf"); }), "does not divide 16 experts");
  c = preset("tiny-deepseek");
  c.n_groups_used = 1;  // one group of 4 experts cannot hold a top-5
  c.n_experts_used = 5;
  EXPECT_HAS(error_of([&] { c.validate("x.gguf"); }), "hold fewer than 5 experts");
  c = preset("tiny-deepseek");
  c.rope_dim = 48;
  EXPECT_HAS(error_of([&] { c.validate("x.gguf"); }), "not below the key head");
  c = preset("tiny-deepseek");
  c.n_dense_lead = 1;
  c.dense_ffn = 0;
  EXPECT_HAS(error_of([&] { c.validate("x.gguf"); }), "feed_forward_length is 0");
  c = preset("deepseek-v3");
  c.hidden = int64_t(1) << 40;
  EXPECT_HAS(error_of([&] { c.validate("m.gguf"); }), "more than 2^53");
}

// ---------------------------------------------------------------------------------------------
// Tensor layout (llama.cpp's names and ggml shapes, src/models/deepseek2.cpp)

TEST(DeepseekTensors, LlamaCppNamesAndShapes) {
  const ModelConfig& c = preset("deepseek-v3");
  const auto specs = model_tensor_specs(c);
  auto find = [&](const std::string& name) -> const TensorSpec* {
    for (const TensorSpec& s : specs) {
      if (s.name == name) return &s;
    }
    return nullptr;
  };
  using A = std::array<int64_t, 3>;
  auto shape = [&](const std::string& name) {
    const TensorSpec* s = find(name);
    EXPECT_NE(s, nullptr) << name;
    return s ? s->ne : A{0, 0, 0};
  };
  EXPECT_EQ(shape("blk.0.attn_q_a.weight"), (A{7168, 1536, 1}));
  EXPECT_EQ(shape("blk.0.attn_q_a_norm.weight"), (A{1536, 1, 1}));
  EXPECT_EQ(shape("blk.0.attn_q_b.weight"), (A{1536, 128 * 192, 1}));
  EXPECT_EQ(shape("blk.0.attn_kv_a_mqa.weight"), (A{7168, 576, 1}));
  EXPECT_EQ(shape("blk.0.attn_kv_a_norm.weight"), (A{512, 1, 1}));
  EXPECT_EQ(shape("blk.0.attn_k_b.weight"), (A{128, 512, 128}));
  EXPECT_EQ(shape("blk.0.attn_v_b.weight"), (A{512, 128, 128}));
  EXPECT_EQ(shape("blk.0.attn_output.weight"), (A{128 * 128, 7168, 1}));
  EXPECT_EQ(shape("blk.2.ffn_gate.weight"), (A{7168, 18432, 1}));
  EXPECT_EQ(shape("blk.2.ffn_down.weight"), (A{18432, 7168, 1}));
  EXPECT_EQ(find("blk.2.ffn_gate_inp.weight"), nullptr);  // dense layer
  EXPECT_EQ(find("blk.3.ffn_gate.weight"), nullptr);      // MoE layer
  EXPECT_EQ(shape("blk.3.ffn_gate_inp.weight"), (A{7168, 256, 1}));
  EXPECT_EQ(shape("blk.3.exp_probs_b.bias"), (A{256, 1, 1}));
  EXPECT_EQ(shape("blk.3.ffn_up_exps.weight"), (A{7168, 2048, 256}));
  EXPECT_EQ(shape("blk.3.ffn_down_exps.weight"), (A{2048, 7168, 256}));
  EXPECT_EQ(shape("blk.60.ffn_gate_shexp.weight"), (A{7168, 2048, 1}));
  EXPECT_EQ(shape("blk.60.ffn_down_shexp.weight"), (A{2048, 7168, 1}));
  EXPECT_EQ(find("blk.0.attn_q.weight"), nullptr);
  EXPECT_EQ(find("blk.61.attn_norm.weight"), nullptr);
  // Per layer: 10 attention and norm tensors, then 3 dense or 8 MoE ones.
  EXPECT_EQ(specs.size(), 3u + 61u * 10u + 3u * 3u + 58u * 8u);
  // V2-Lite: attn_q instead of the compressed pair; no selection bias; older files: attn_kv_b.
  ModelConfig lite = preset("deepseek-v2-lite");
  lite.split_kv_b = false;
  const auto ls = model_tensor_specs(lite);
  auto has = [&](const std::string& n) {
    return std::any_of(ls.begin(), ls.end(), [&](const TensorSpec& s) { return s.name == n; });
  };
  EXPECT_TRUE(has("blk.0.attn_q.weight"));
  EXPECT_FALSE(has("blk.0.attn_q_a.weight"));
  EXPECT_TRUE(has("blk.1.attn_kv_b.weight"));
  EXPECT_FALSE(has("blk.1.attn_k_b.weight"));
  EXPECT_FALSE(has("blk.1.exp_probs_b.bias"));
}

TEST(DeepseekTensors, SlotsFollowTheSpecs) {
  for (const ModelConfig& c : {preset("tiny-deepseek"), tiny_v2_style()}) {
    ModelWeights w;
    w.cfg = c;
    const auto specs = model_tensor_specs(c);
    const auto slots = w.tensor_slots();
    ASSERT_EQ(slots.size(), specs.size());
    // Every slot is a distinct field, and tensor_list() gives the same fields read-only.
    std::vector<const TensorView*> sorted(slots.begin(), slots.end());
    std::sort(sorted.begin(), sorted.end());
    EXPECT_EQ(std::adjacent_find(sorted.begin(), sorted.end()), sorted.end());
    const auto list = w.tensor_list();
    ASSERT_EQ(list.size(), slots.size());
    for (size_t i = 0; i < list.size(); ++i) EXPECT_EQ(list[i], slots[i]) << specs[i].name;
    EXPECT_EQ(slots[1], &w.layers[0].attn_norm);
  }
}

// ---------------------------------------------------------------------------------------------
// GGUF

SynthOptions synth(const ModelConfig& shape, QuantType q, uint64_t seed = 1) {
  SynthOptions o;
  o.preset = shape.name;
  o.shape = shape;
  o.quant = q;
  o.seed = seed;
  return o;
}

void expect_same_config(const ModelConfig& a, const ModelConfig& b) {
  EXPECT_EQ(a.arch, b.arch);
  EXPECT_EQ(a.n_layers, b.n_layers);
  EXPECT_EQ(a.hidden, b.hidden);
  EXPECT_EQ(a.n_heads, b.n_heads);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.q_lora_rank, b.q_lora_rank);
  EXPECT_EQ(a.kv_lora_rank, b.kv_lora_rank);
  EXPECT_EQ(a.rope_dim, b.rope_dim);
  EXPECT_EQ(a.v_head_dim, b.v_head_dim);
  EXPECT_EQ(a.n_dense_lead, b.n_dense_lead);
  EXPECT_EQ(a.dense_ffn, b.dense_ffn);
  EXPECT_EQ(a.n_experts, b.n_experts);
  EXPECT_EQ(a.n_experts_used, b.n_experts_used);
  EXPECT_EQ(a.expert_ffn, b.expert_ffn);
  EXPECT_EQ(a.n_shared_experts, b.n_shared_experts);
  EXPECT_EQ(a.n_expert_groups, b.n_expert_groups);
  EXPECT_EQ(a.n_groups_used, b.n_groups_used);
  EXPECT_EQ(a.gating, b.gating);
  EXPECT_EQ(a.expert_score_bias, b.expert_score_bias);
  EXPECT_EQ(a.norm_topk_prob, b.norm_topk_prob);
  EXPECT_FLOAT_EQ(a.expert_weights_scale, b.expert_weights_scale);
  EXPECT_EQ(a.split_kv_b, b.split_kv_b);
  EXPECT_EQ(a.rope_scaling, b.rope_scaling);
  EXPECT_FLOAT_EQ(a.rope_factor, b.rope_factor);
  EXPECT_EQ(a.rope_orig_context, b.rope_orig_context);
  EXPECT_NEAR(a.yarn_mscale, b.yarn_mscale, 1e-6);
  EXPECT_NEAR(a.yarn_mscale_all_dim, b.yarn_mscale_all_dim, 1e-6);
  EXPECT_FLOAT_EQ(a.rope_theta, b.rope_theta);
  EXPECT_EQ(a.vocab, b.vocab);
  EXPECT_EQ(a.context_length, b.context_length);
}

TEST(DeepseekGguf, RoundTripsBothLayoutsWithTheSameBytes) {
  TempDir dir;
  for (const ModelConfig& c : {preset("tiny-deepseek"), tiny_v2_style()}) {
    for (QuantType q : {QuantType::F32, QuantType::Q8_0}) {
      const std::string path = dir.file(c.name + ".gguf");
      write_synthetic_gguf(synth(c, q), path);
      const ModelWeights file = load_model(path);
      const ModelWeights mem = make_synthetic_model(synth(c, q));
      expect_same_config(file.cfg, mem.cfg);
      EXPECT_EQ(file.quant, q);
      const auto a = file.tensor_list(), b = mem.tensor_list();
      ASSERT_EQ(a.size(), b.size());
      for (size_t i = 0; i < a.size(); ++i) {
        ASSERT_EQ(a[i]->name, b[i]->name);
        EXPECT_EQ(a[i]->type, b[i]->type) << a[i]->name;
        EXPECT_EQ(a[i]->ne, b[i]->ne) << a[i]->name;
        EXPECT_EQ(std::memcmp(a[i]->data, b[i]->data, static_cast<size_t>(a[i]->nbytes())), 0)
            << a[i]->name;
      }
      EXPECT_EQ(file.weight_bytes(), mem.weight_bytes());
      EXPECT_EQ(file.bytes_per_token_decode(), mem.bytes_per_token_decode());
    }
  }
}

// The keys llama.cpp's converter writes (conversion/deepseek.py) and its loader reads.
TEST(DeepseekGguf, MetadataIsWhatLlamaCppWrites) {
  TempDir dir;
  const std::string path = dir.file("t.gguf");
  write_synthetic_gguf(synth(preset("tiny-deepseek"), QuantType::Q8_0), path);
  const auto f = gguf::File::open(path);
  const std::string a = "deepseek2.";
  EXPECT_EQ(f.get_string("general.architecture"), "deepseek2");
  EXPECT_EQ(f.get_uint(a + "block_count"), 3u);
  EXPECT_EQ(f.get_uint(a + "attention.head_count"), 4u);
  EXPECT_EQ(f.get_uint(a + "attention.head_count_kv"), 1u);
  EXPECT_EQ(f.get_uint(a + "attention.key_length"), 64u + 16u);  // latent + rope: the cache row
  EXPECT_EQ(f.get_uint(a + "attention.value_length"), 64u);
  EXPECT_EQ(f.get_uint(a + "attention.key_length_mla"), 48u);
  EXPECT_EQ(f.get_uint(a + "attention.value_length_mla"), 32u);
  EXPECT_EQ(f.get_uint(a + "attention.q_lora_rank"), 64u);
  EXPECT_EQ(f.get_uint(a + "attention.kv_lora_rank"), 64u);
  EXPECT_EQ(f.get_uint(a + "rope.dimension_count"), 16u);
  EXPECT_EQ(f.get_uint(a + "leading_dense_block_count"), 1u);
  EXPECT_EQ(f.get_uint(a + "feed_forward_length"), 256u);
  EXPECT_EQ(f.get_uint(a + "expert_feed_forward_length"), 32u);
  EXPECT_EQ(f.get_uint(a + "expert_shared_count"), 1u);
  EXPECT_EQ(f.get_uint(a + "expert_gating_func"), 2u);  // sigmoid
  EXPECT_EQ(f.get_uint(a + "expert_group_count"), 4u);
  EXPECT_EQ(f.get_uint(a + "expert_group_used_count"), 2u);
  EXPECT_TRUE(f.get_bool(a + "expert_weights_norm"));
  EXPECT_FLOAT_EQ(static_cast<float>(f.get_float(a + "expert_weights_scale")), 2.5f);
  EXPECT_EQ(f.get_string(a + "rope.scaling.type"), "yarn");
  EXPECT_FLOAT_EQ(static_cast<float>(f.get_float(a + "rope.scaling.factor")), 4.0f);
  EXPECT_EQ(f.get_uint(a + "rope.scaling.original_context_length"), 1024u);
  EXPECT_NEAR(f.get_float(a + "rope.scaling.yarn_log_multiplier"), 0.1, 1e-7);
  ASSERT_NE(f.find_tensor("blk.1.exp_probs_b.bias"), nullptr);
  EXPECT_EQ(f.find_tensor("blk.1.exp_probs_b.bias")->quant(), QuantType::F32);
  // attn_k_b rows are qk_nope (32) long: Q8_0 blocks fit them.
  EXPECT_EQ(f.find_tensor("blk.0.attn_k_b.weight")->quant(), QuantType::Q8_0);
  EXPECT_EQ(f.find_tensor("blk.0.attn_kv_b.weight"), nullptr);
}

TEST(DeepseekGguf, BrokenFilesAreCleanErrors) {
  TempDir dir;
  const std::string path = dir.file("t.gguf");
  write_synthetic_gguf(synth(preset("tiny-deepseek"), QuantType::Q8_0), path);
  const auto f = gguf::File::open(path);
  // Rewrite the file without one tensor, or with a norm stored quantized.
  auto rewrite = [&](const std::string& out, const std::string& drop, bool quantize_norm) {
    gguf::Writer w;
    for (const auto& [k, v] : f.metadata()) w.set(k, v);
    std::vector<const gguf::TensorInfo*> kept;
    for (const auto& t : f.tensors()) {
      if (t.name == drop) continue;
      QuantType type = t.quant();
      if (quantize_norm && t.name == "blk.0.attn_kv_a_norm.weight") type = QuantType::Q8_0;
      w.add_tensor(t.name, t.ne, type);
      kept.push_back(&t);
    }
    w.write(out, [&](size_t i, const gguf::TensorInfo& info, gguf::ByteSink& sink) {
      std::vector<uint8_t> bytes(info.nbytes, 0);
      std::memcpy(bytes.data(), kept[i]->data, std::min<size_t>(info.nbytes, kept[i]->nbytes));
      sink.write(bytes.data(), bytes.size());
    });
  };
  rewrite(dir.file("missing.gguf"), "blk.2.ffn_up_shexp.weight", false);
  EXPECT_HAS(error_of([&] { load_model(dir.file("missing.gguf")); }),
             "tensor blk.2.ffn_up_shexp.weight is missing");
  rewrite(dir.file("qnorm.gguf"), "", true);
  EXPECT_HAS(error_of([&] { load_model(dir.file("qnorm.gguf")); }),
             "norm weights and biases must be F32");
}

// ---------------------------------------------------------------------------------------------
// Hugging Face configs

const char* kV3Config = R"({
  "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
  "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
  "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
  "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
  "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
  "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8,
  "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": true,
  "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_interleave": true,
  "rope_parameters": {"rope_theta": 10000, "rope_type": "yarn", "factor": 40,
    "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
    "mscale_all_dim": 1.0},
  "tie_word_embeddings": false, "attention_bias": false})";

// DeepSeek-V2-Lite's config.json (transformers 4 spelling: rope_theta + rope_scaling).
const char* kV2LiteConfig = R"({
  "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
  "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
  "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
  "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
  "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": null,
  "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 1,
  "topk_group": 1, "topk_method": "greedy", "scoring_func": "softmax",
  "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
  "norm_topk_prob": false, "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
  "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32,
    "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
    "original_max_position_embeddings": 4096},
  "tie_word_embeddings": false, "attention_bias": false})";

TEST(DeepseekHfConfig, V3AndV2LiteConfigsGiveThePresetShapes) {
  ModelConfig v3 = parse_hf_config(kV3Config, "/x/DeepSeek-V3/config.json");
  ModelConfig want = preset("deepseek-v3");
  want.split_kv_b = false;  // checkpoints keep kv_b_proj whole
  expect_same_config(v3, want);
  EXPECT_EQ(v3.name, "DeepSeek-V3");
  ModelConfig lite = parse_hf_config(kV2LiteConfig, "/x/DeepSeek-V2-Lite/config.json");
  ModelConfig want_lite = preset("deepseek-v2-lite");
  want_lite.split_kv_b = false;
  expect_same_config(lite, want_lite);
}

TEST(DeepseekHfConfig, RefusesWhatKtuneDoesNotImplement) {
  auto with = [](const char* base, const std::string& key, const nlohmann::json& value) {
    nlohmann::json j = nlohmann::json::parse(base);
    j[key] = value;
    return j.dump();
  };
  // One group: nothing to limit, so group_limited_greedy is plain greedy.
  EXPECT_NO_THROW(
      parse_hf_config(with(kV2LiteConfig, "topk_method", "group_limited_greedy"), "c.json"));
  nlohmann::json g = nlohmann::json::parse(kV2LiteConfig);
  g["topk_method"] = "group_limited_greedy";
  g["n_group"] = 8;
  g["topk_group"] = 3;
  g["n_routed_experts"] = 64;
  EXPECT_HAS(error_of([&] { parse_hf_config(g.dump(), "c.json"); }), "group_limited_greedy");
  EXPECT_HAS(
      error_of([&] { parse_hf_config(with(kV3Config, "rope_interleave", false), "c.json"); }),
      "rope_interleave is false");
  EXPECT_HAS(error_of([&] { parse_hf_config(with(kV3Config, "attention_bias", true), "c.json"); }),
             "attention_bias is true");
  EXPECT_HAS(error_of([&] {
               parse_hf_config(with(kV3Config, "max_position_embeddings", 8192), "c.json");
             }),
             "differs from max_position_embeddings");
  nlohmann::json r = nlohmann::json::parse(kV3Config);
  r["rope_parameters"]["rope_type"] = "linear";
  EXPECT_HAS(error_of([&] { parse_hf_config(r.dump(), "c.json"); }), "rope type 'linear'");
}

// ---------------------------------------------------------------------------------------------
// YaRN, against the formulas written out here in double (Hugging Face's
// _compute_yarn_parameters and DeepseekV3Attention's softmax scale).

TEST(DeepseekRope, YarnMatchesTheFormulas) {
  for (const ModelConfig& c : {preset("tiny-deepseek"), preset("deepseek-v3"),
                               preset("deepseek-v2-lite"), tiny_v2_style()}) {
    const DeepseekRope r = deepseek_rope(c);
    const double d = static_cast<double>(c.rope_dim), base = c.rope_theta, f = c.rope_factor;
    auto dim_for = [&](double rot) {
      return d * std::log(c.rope_orig_context / (rot * 2 * 3.141592653589793)) /
             (2 * std::log(base));
    };
    const double low = std::max(0.0, std::floor(dim_for(c.yarn_beta_fast)));
    const double high = std::min(d - 1, std::ceil(dim_for(c.yarn_beta_slow)));
    ASSERT_EQ(r.inv_freq.size(), static_cast<size_t>(c.rope_dim / 2));
    int extrapolated = 0, interpolated = 0;
    for (int i = 0; i < c.rope_dim / 2; ++i) {
      const double theta = std::pow(base, -2.0 * i / d);
      const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
      const double want = theta / f * ramp + theta * (1 - ramp);
      EXPECT_NEAR(r.inv_freq[i] / want, 1.0, 1e-6) << c.name << " pair " << i;
      extrapolated += ramp == 0.0;
      interpolated += ramp == 1.0;
    }
    if (c.name == "tiny-deepseek") {  // the preset's reason to be: all three regimes occur
      EXPECT_GT(extrapolated, 0);
      EXPECT_GT(interpolated, 0);
      EXPECT_LT(extrapolated + interpolated, c.rope_dim / 2);
    }
    auto m = [&](double mscale) { return 0.1 * mscale * std::log(f) + 1.0; };
    EXPECT_NEAR(r.cos_sin_scale, m(c.yarn_mscale) / m(c.yarn_mscale_all_dim), 1e-6) << c.name;
    const double scale =
        m(c.yarn_mscale_all_dim) * m(c.yarn_mscale_all_dim) / std::sqrt(c.head_dim);
    EXPECT_NEAR(r.softmax_scale / scale, 1.0, 1e-6) << c.name;
  }
  // DeepSeek-V3: 1/sqrt(192) * (1 + 0.1 ln 40)^2 = 0.13523.
  EXPECT_NEAR(deepseek_rope(preset("deepseek-v3")).softmax_scale, 0.135233, 1e-5);
  // Without mscale_all_dim, Hugging Face scales cos/sin by mscale(factor) and not the softmax.
  ModelConfig c = preset("tiny-deepseek");
  c.yarn_mscale = c.yarn_mscale_all_dim = 0.0f;
  const DeepseekRope r = deepseek_rope(c);
  EXPECT_NEAR(r.cos_sin_scale, 1.0 + 0.1 * std::log(4.0), 1e-6);
  EXPECT_NEAR(r.softmax_scale, 1.0 / std::sqrt(48.0), 1e-7);
  c.rope_scaling = RopeScaling::None;
  const DeepseekRope plain = deepseek_rope(c);
  EXPECT_FLOAT_EQ(plain.inv_freq[3], static_cast<float>(std::pow(10000.0, -6.0 / 16.0)));
  EXPECT_FLOAT_EQ(plain.cos_sin_scale, 1.0f);
}

// ---------------------------------------------------------------------------------------------
// Routing, against a selection written differently: sort by score, groups by sorting.

struct Routed {
  std::vector<int32_t> ids;
  std::vector<double> weights;
};

Routed route_by_sorting(const std::vector<float>& logits, int64_t k, bool sigmoid,
                        const std::vector<float>& bias, int64_t groups, int64_t used, bool norm,
                        double scale) {
  const int64_t n = static_cast<int64_t>(logits.size());
  std::vector<double> score(n), choice(n);
  double mx = *std::max_element(logits.begin(), logits.end()), sum = 0;
  for (int64_t e = 0; e < n; ++e) {
    score[e] = sigmoid ? 1 / (1 + std::exp(-double(logits[e]))) : std::exp(logits[e] - mx);
    sum += score[e];
  }
  for (int64_t e = 0; e < n; ++e) {
    if (!sigmoid) score[e] /= sum;
    choice[e] = score[e] + (bias.empty() ? 0.0 : bias[e]);
  }
  std::vector<bool> allowed(n, true);
  if (groups > 1) {
    const int64_t per = n / groups;
    std::vector<std::pair<double, int64_t>> gs;
    for (int64_t g = 0; g < groups; ++g) {
      std::vector<double> v(choice.begin() + g * per, choice.begin() + (g + 1) * per);
      std::sort(v.rbegin(), v.rend());
      gs.push_back({-(v[0] + (per > 1 ? v[1] : 0.0)), g});
    }
    std::sort(gs.begin(), gs.end());
    std::fill(allowed.begin(), allowed.end(), false);
    for (int64_t j = 0; j < used; ++j) {
      for (int64_t i = 0; i < per; ++i) allowed[gs[j].second * per + i] = true;
    }
  }
  std::vector<std::pair<double, int32_t>> cand;
  for (int64_t e = 0; e < n; ++e) {
    if (allowed[e]) cand.push_back({-choice[e], static_cast<int32_t>(e)});
  }
  std::sort(cand.begin(), cand.end());
  Routed r;
  double wsum = 0;
  for (int64_t j = 0; j < k; ++j) {
    r.ids.push_back(cand[j].second);
    wsum += score[cand[j].second];
  }
  std::sort(r.ids.begin(), r.ids.end());
  for (int32_t e : r.ids) r.weights.push_back(score[e] * (norm ? scale / wsum : scale));
  return r;
}

TEST(DeepseekRouting, GroupedTopKMatchesAReferenceSelection) {
  std::mt19937 rng(9);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  struct Case {
    int64_t n, k, groups, used;
    bool sigmoid, bias, norm;
    float scale;
  };
  const Case cases[] = {{256, 8, 8, 4, true, true, true, 2.5f},    // DeepSeek-V3
                        {64, 6, 1, 1, false, false, false, 1.0f},  // V2-Lite
                        {160, 6, 8, 3, false, false, true, 16.f},  // V2 (top-2 sum groups)
                        {16, 4, 4, 2, true, false, false, 1.5f},
                        {16, 4, 16, 4, true, true, true, 1.0f}};  // groups of one expert
  int differing_groups = 0;
  for (const Case& c : cases) {
    std::vector<float> scratch(2 * c.n + c.groups), w(c.k);
    std::vector<int32_t> ids(c.k);
    for (int trial = 0; trial < 200; ++trial) {
      std::vector<float> logits(c.n), bias;
      for (float& x : logits) x = nd(rng);
      if (c.bias) {
        for (int64_t e = 0; e < c.n; ++e) bias.push_back(0.3f * nd(rng));
      }
      cpu_ops::route_grouped(logits.data(), c.n, c.k, c.sigmoid, c.bias ? bias.data() : nullptr,
                             c.groups, c.used, c.norm, c.scale, scratch.data(), ids.data(),
                             w.data());
      const Routed want =
          route_by_sorting(logits, c.k, c.sigmoid, bias, c.groups, c.used, c.norm, c.scale);
      ASSERT_EQ(std::vector<int32_t>(ids.begin(), ids.end()), want.ids) << "case n=" << c.n;
      for (int64_t j = 0; j < c.k; ++j) EXPECT_NEAR(w[j], want.weights[j], 1e-5 * c.scale);
      // Group limiting matters: the plain top-k would differ in some trials.
      if (c.groups > 1 && c.used < c.groups) {
        const Routed plain = route_by_sorting(logits, c.k, c.sigmoid, bias, 1, 1, c.norm, c.scale);
        differing_groups += plain.ids != want.ids;
      }
    }
  }
  EXPECT_GT(differing_groups, 50);
}

// ---------------------------------------------------------------------------------------------
// Memory planner

TEST(DeepseekMemoryPlan, ShapeBytesMatchTheLoadedModelAndTheCacheIsTheLatent) {
  for (const ModelConfig& c : {preset("tiny-deepseek"), tiny_v2_style()}) {
    const ModelWeights m = make_synthetic_model(synth(c, QuantType::Q8_0));
    const WeightBytes shape = weight_bytes(c, QuantType::Q8_0, QuantType::Q8_0);
    const WeightBytes real = weight_bytes(m);
    EXPECT_EQ(shape.attention, real.attention) << c.name;
    EXPECT_EQ(shape.expert, real.expert) << c.name;
    EXPECT_EQ(shape.embedding, real.embedding);
    EXPECT_EQ(shape.head, real.head);
    EXPECT_EQ(real.expert[0], 0) << "layer 0 is dense: no expert bytes";
    // All bytes are accounted for: per-layer attention (with the shared experts and the dense
    // FFN), the routed experts, embedding and head.
    int64_t sum = real.embedding + real.head;
    for (int64_t l = 0; l < c.n_layers; ++l)
      sum += real.attention[l] + real.expert[l] * c.n_experts;
    EXPECT_EQ(sum, m.weight_bytes()) << c.name;
  }
  // DeepSeek-V3 at Q4_0 on one device, context 4096: the CPU cache holds 576 f32 per position
  // and layer (kv_lora_rank + rope), not heads x head_dim.
  const ModelConfig& v3 = preset("deepseek-v3");
  Placement p = make_uniform_placement(v3, Device::cpu(), Device::cpu());
  p.runtime.context = 4096;
  p.runtime.batch = 1;
  const MemoryPlan plan = plan_memory(v3, QuantType::Q4_0, QuantType::Q4_0, p, Budgets{});
  EXPECT_EQ(plan.per_device.at("cpu").kv_cache, int64_t{61} * 4096 * 576 * 4);
  const WeightBytes wb = weight_bytes(v3, QuantType::Q4_0, QuantType::Q4_0);
  EXPECT_EQ(wb.expert[2], 0);
  EXPECT_GT(wb.expert[3], 0);
  // Shared expert (Q4_0, 3 x 7168 x 2048) and the dense FFN (3 x 7168 x 18432) go with attention.
  EXPECT_EQ(wb.attention[2] - wb.attention[3],
            int64_t{3} * 7168 * 18432 / 32 * 18 -
                (int64_t{3} * 7168 * 2048 / 32 * 18 + 7168 * 256 * 4 + 256 * 4));
}

// The shape-only model (what `ktune info` reports synthetic models from) counts the same bytes
// as the built one.
TEST(DeepseekMemoryPlan, ShapeOnlyModelCountsTheSameBytes) {
  for (const ModelConfig& c : {preset("tiny-deepseek"), tiny_v2_style(), preset("tiny")}) {
    const ModelWeights built = make_synthetic_model(synth(c, QuantType::Q4_0));
    const ModelWeights shape = synthetic_model_shape(synth(c, QuantType::Q4_0));
    EXPECT_EQ(shape.weight_bytes(), built.weight_bytes()) << c.name;
    EXPECT_EQ(shape.bytes_per_token_decode(), built.bytes_per_token_decode()) << c.name;
    const WeightBytes a = weight_bytes(shape), b = weight_bytes(built);
    EXPECT_EQ(a.attention, b.attention) << c.name;
    EXPECT_EQ(a.expert, b.expert) << c.name;
  }
}

// ---------------------------------------------------------------------------------------------
// ktune info

TEST(DeepseekInfo, ShowsTheShapeOfDeepseekV3WithoutBuildingIt) {
  auto r = test::run_ktune({"info", "--model", "synth:deepseek-v3:q4_0", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto doc = nlohmann::json::parse(r.out);
  const auto& m = doc["model"];
  EXPECT_EQ(m["arch"], "deepseek2");
  EXPECT_EQ(m["layers"], 61);
  EXPECT_EQ(m["params_total"], preset("deepseek-v3").params_total());
  EXPECT_EQ(m["mla"]["kv_cache_values_per_token_layer"], 576);
  EXPECT_EQ(m["moe"]["groups"], 8);
  EXPECT_EQ(m["moe"]["gating"], "sigmoid");
  EXPECT_EQ(m["rope_scaling"]["type"], "yarn");
  EXPECT_GT(m["weight_bytes"].get<int64_t>(), int64_t{350} << 30);
  auto text = test::run_ktune({"info", "--model", "synth:deepseek-v3"});
  ASSERT_EQ(text.exit_code, 0) << text.err;
  EXPECT_HAS(text.out, "MLA: q_lora 1536, kv_lora 512");
  EXPECT_HAS(text.out, "in the best 4 of 8 groups");
}

}  // namespace
}  // namespace ktune
