// Compiled-in model presets and the checks and counts every ModelConfig gets, whatever its source.
#include <algorithm>
#include <cctype>
#include <cstdio>
#include <string>
#include <vector>

#include "ktune/engine/error.h"
#include "ktune/engine/model.h"
#include "model/deepseek2.h"

namespace ktune {
namespace {

ModelConfig make_preset(const char* name, int64_t hidden, int64_t layers, int64_t heads,
                        int64_t kv_heads, int64_t head_dim, int64_t experts, int64_t used,
                        int64_t expert_ffn, int64_t dense_ffn, int64_t vocab, int64_t context) {
  ModelConfig c;
  c.arch = "qwen3moe";
  c.name = name;
  c.hidden = hidden;
  c.n_layers = layers;
  c.n_heads = heads;
  c.n_kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.n_experts = experts;
  c.n_experts_used = used;
  c.expert_ffn = expert_ffn;
  c.dense_ffn = dense_ffn;
  c.vocab = vocab;
  c.context_length = context;
  c.rope_theta = 1e6f;
  c.rms_eps = 1e-6f;
  c.norm_topk_prob = true;
  return c;
}

// DeepSeek shapes (deepseek2 as llama.cpp names the family). Real dimensions from the models'
// config.json; "tiny-deepseek" is V3-like (compressed queries, sigmoid routing with a selection
// bias, 4 groups of which 2 are searched, one shared expert, one dense leading layer, YaRN) with
// every row a multiple of 32 so Q8_0 and Q4_0 apply; the HF reference fixture has its shape.
ModelConfig deepseek_preset(const char* name, int64_t hidden, int64_t layers, int64_t heads,
                            int64_t q_lora, int64_t kv_lora, int64_t qk_nope, int64_t rope,
                            int64_t v_head, int64_t experts, int64_t used, int64_t shared,
                            int64_t groups, int64_t groups_used, int64_t expert_ffn,
                            int64_t dense_ffn, int64_t dense_lead, int64_t vocab) {
  ModelConfig c;
  c.arch = "deepseek2";
  c.name = name;
  c.hidden = hidden;
  c.n_layers = layers;
  c.n_heads = heads;
  c.n_kv_heads = 1;
  c.head_dim = qk_nope + rope;
  c.q_lora_rank = q_lora;
  c.kv_lora_rank = kv_lora;
  c.rope_dim = rope;
  c.v_head_dim = v_head;
  c.n_experts = experts;
  c.n_experts_used = used;
  c.n_shared_experts = shared;
  c.n_expert_groups = groups;
  c.n_groups_used = groups_used;
  c.expert_ffn = expert_ffn;
  c.dense_ffn = dense_ffn;
  c.n_dense_lead = dense_lead;
  c.vocab = vocab;
  c.context_length = 163840;
  c.rope_theta = 10000.0f;
  c.rms_eps = 1e-6f;
  c.split_kv_b = true;
  c.rope_scaling = RopeScaling::Yarn;
  c.rope_factor = 40.0f;
  c.rope_orig_context = 4096;
  return c;
}

ModelConfig deepseek_v3_style(ModelConfig c) {  // sigmoid routing with bias, normalized, x2.5
  c.gating = ExpertGating::Sigmoid;
  c.expert_score_bias = true;
  c.norm_topk_prob = true;
  c.expert_weights_scale = 2.5f;
  c.yarn_mscale = c.yarn_mscale_all_dim = 1.0f;
  return c;
}

ModelConfig deepseek_v2_lite() {  // softmax routing, no bias, not normalized, x1
  ModelConfig c = deepseek_preset("deepseek-v2-lite", 2048, 27, 16, 0, 512, 128, 64, 128, 64, 6, 2,
                                  1, 1, 1408, 10944, 1, 102400);
  c.gating = ExpertGating::Softmax;
  c.norm_topk_prob = false;
  c.yarn_mscale = c.yarn_mscale_all_dim = 0.707f;
  return c;
}

ModelConfig tiny_deepseek() {
  ModelConfig c = deepseek_v3_style(deepseek_preset("tiny-deepseek", 128, 3, 4, 64, 64, 32, 16, 32,
                                                    16, 4, 1, 4, 2, 32, 256, 1, 256));
  // Small enough that YaRN's ramp lands inside the 8 rotated frequencies (extrapolated,
  // blended and interpolated ones all occur).
  c.context_length = 4096;
  c.rope_factor = 4.0f;
  c.rope_orig_context = 1024;
  return c;
}

const std::vector<ModelConfig>& presets() {
  // `tiny` keeps every row length a multiple of 256 (hidden, heads*head_dim, expert_ffn), so
  // every block format, K-quants included, applies to every matrix; it weighs a few MB.
  static const std::vector<ModelConfig> all = {
      make_preset("tiny", 256, 4, 4, 2, 64, 8, 2, 256, 1024, 1024, 4096),
      make_preset("qwen3-30b-a3b", 2048, 48, 32, 4, 128, 128, 8, 768, 6144, 151936, 40960),
      make_preset("qwen3-235b-a22b", 4096, 94, 64, 4, 128, 128, 8, 1536, 12288, 151936, 40960),
      tiny_deepseek(),
      deepseek_v2_lite(),
      deepseek_v3_style(deepseek_preset("deepseek-v3", 7168, 61, 128, 1536, 512, 128, 64, 128, 256,
                                        8, 1, 8, 4, 2048, 18432, 3, 129280)),
  };
  return all;
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

}  // namespace

const ModelConfig* find_preset(const std::string& name) {
  // Case-insensitive: "synth:TINY" and "--preset Qwen3-30B-A3B" are what people type.
  const std::string key = lower(name);
  for (const ModelConfig& c : presets()) {
    if (c.name == key) return &c;
  }
  return nullptr;
}

std::vector<std::string> preset_names() {
  std::vector<std::string> names;
  for (const ModelConfig& c : presets()) names.push_back(c.name);
  return names;
}

void ModelConfig::validate(const std::string& where) const {
  const std::string fix = "the model's metadata is incomplete or inconsistent; re-convert it";
  if (is_deepseek2()) return deepseek2::validate(*this, where);
  if (arch != "qwen3moe") {
    throw Error(where, "unknown architecture " + arch, "ktune supports qwen3moe and deepseek2");
  }
  struct Dim {
    const char* name;
    int64_t value;
  };
  const Dim dims[] = {
      {"n_layers (block_count)", n_layers},
      {"hidden (embedding_length)", hidden},
      {"n_heads (attention.head_count)", n_heads},
      {"n_kv_heads (attention.head_count_kv)", n_kv_heads},
      {"head_dim (attention.key_length)", head_dim},
      {"n_experts (expert_count)", n_experts},
      {"n_experts_used (expert_used_count)", n_experts_used},
      {"expert_ffn (expert_feed_forward_length)", expert_ffn},
      {"vocab (vocab_size)", vocab},
      {"context_length", context_length},
  };
  for (const Dim& d : dims) {
    if (d.value <= 0) {
      throw Error(where, std::string(d.name) + " is " + std::to_string(d.value) +
                             ", must be positive", fix);
    }
  }
  if (dense_ffn < 0) {
    throw Error(where, "dense_ffn (feed_forward_length) is negative", fix);
  }
  if (n_heads % n_kv_heads != 0) {
    throw Error(where,
                "n_heads " + std::to_string(n_heads) + " is not a multiple of n_kv_heads " +
                    std::to_string(n_kv_heads),
                "grouped-query attention needs whole groups; " + fix);
  }
  if (head_dim % 2 != 0) {
    throw Error(where, "head_dim " + std::to_string(head_dim) + " is odd",
                "RoPE rotates pairs of dimensions; " + fix);
  }
  if (n_experts_used > n_experts) {
    throw Error(where,
                "n_experts_used " + std::to_string(n_experts_used) + " exceeds n_experts " +
                    std::to_string(n_experts),
                fix);
  }
  if (!(rope_theta > 0.0f)) throw Error(where, "rope theta must be positive", fix);
  if (!(rms_eps > 0.0f)) throw Error(where, "rms_norm epsilon must be positive", fix);
  // Every count below (parameters, bytes, tensor sizes) is int64: refuse shapes whose parameter
  // count does not fit comfortably (2^53, thousands of times the largest real model). Estimated
  // in double, as params_total() would overflow on exactly these shapes (found by fuzzing).
  const double h = double(hidden), hd = double(head_dim);
  const double per_layer = h * (2.0 * double(n_heads) + 2.0 * double(n_kv_heads)) * hd + 2.0 * hd +
                           2.0 * h + h * double(n_experts) +
                           double(n_experts) * 3.0 * h * double(expert_ffn);
  const double total = double(n_layers) * per_layer + 2.0 * h * double(vocab) + h;
  if (!(total < 9007199254740992.0)) {
    char n[32];
    std::snprintf(n, sizeof n, "%.3g", total);
    throw Error(where, std::string("the shape implies ") + n + " parameters (more than 2^53)", fix);
  }
}

namespace {

// Per-layer counts shared by params_total and params_active_per_token.
int64_t attention_params(const ModelConfig& c) {
  const int64_t q = c.n_heads * c.head_dim;
  const int64_t kv = c.n_kv_heads * c.head_dim;
  return c.hidden * q + 2 * c.hidden * kv + q * c.hidden  // q, k, v, o
         + 2 * c.head_dim                                  // q_norm, k_norm
         + 2 * c.hidden;                                   // attn_norm, ffn_norm
}
int64_t expert_params(const ModelConfig& c) { return 3 * c.hidden * c.expert_ffn; }

}  // namespace

int64_t ModelConfig::params_total() const {
  if (is_deepseek2()) return deepseek2::params_total(*this);
  const int64_t per_layer =
      attention_params(*this) + hidden * n_experts + n_experts * expert_params(*this);
  // Embedding and output head are counted separately (Qwen3-MoE does not tie them).
  return n_layers * per_layer + 2 * hidden * vocab + hidden;
}

int64_t ModelConfig::params_active_per_token() const {
  if (is_deepseek2()) return deepseek2::params_active_per_token(*this);
  const int64_t per_layer =
      attention_params(*this) + hidden * n_experts + n_experts_used * expert_params(*this);
  // Counted like the model cards' "activated parameters": the embedding table counts in full.
  return n_layers * per_layer + 2 * hidden * vocab + hidden;
}

int64_t ModelConfig::kv_cache_values() const {
  return is_deepseek2() ? kv_lora_rank + rope_dim : 2 * n_kv_heads * head_dim;
}

}  // namespace ktune
