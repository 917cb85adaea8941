// deepseek2 model layer: tensor layout, checks, counts and GGUF metadata (see deepseek2.h).
//
// Metadata, as llama.cpp's converter writes it for DeepSeek-V2/V3 (conversion/deepseek.py) and
// reads it (src/models/deepseek2.cpp):
//   * attention.key_length / value_length describe the cache seen as one shared head
//     (kv_lora_rank + rope, kv_lora_rank); key_length_mla / value_length_mla are the real
//     query/key and value heads. Files from before the split of attn_kv_b have no *_mla keys and
//     carry the real heads in key_length / value_length: both are read.
//   * head_count_kv is 1 in current files (n_heads in older ones); ktune ignores it.
//   * expert_gating_func: 1 softmax, 2 sigmoid; absent means softmax (older V2 files).
//   * expert_weights_norm absent means false; expert_weights_scale absent means 1.
//   * rope.scaling.yarn_log_multiplier holds 0.1 * mscale_all_dim; llama.cpp then takes
//     mscale = mscale_all_dim, which makes the cos/sin factor 1 (true of every DeepSeek config).
#include "model/deepseek2.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "ktune/engine/error.h"

namespace ktune::deepseek2 {
namespace {

const char* const kFixMeta = "the model's metadata is incomplete or inconsistent; re-convert it";

std::string dims_str(const std::vector<int64_t>& ne) {
  std::string s = "[";
  for (size_t i = 0; i < ne.size(); ++i) s += (i ? ", " : "") + std::to_string(ne[i]);
  return s + "]";
}

std::vector<int64_t> without_trailing_ones(std::vector<int64_t> ne) {
  while (ne.size() > 1 && ne.back() == 1) ne.pop_back();
  return ne;
}

std::string type_word(uint32_t id) {
  std::string n = ggml_type_name(id);
  const size_t p = n.find(" (");
  return p == std::string::npos ? n : n.substr(0, p);
}

// Per-layer parameter counts (one layer's attention with its norms; FFN parts separately).
int64_t attention_params(const ModelConfig& c) {
  const int64_t H = c.hidden, nh = c.n_heads, dq = c.head_dim;
  const int64_t q =
      c.q_lora_rank > 0 ? H * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * nh * dq : H * nh * dq;
  const int64_t kv = H * (c.kv_lora_rank + c.rope_dim) + c.kv_lora_rank +
                     c.kv_lora_rank * nh * (c.qk_nope_dim() + c.v_head_dim);
  return 2 * H + q + kv + nh * c.v_head_dim * H;  // attn_norm and ffn_norm, q, kv, output
}
int64_t expert_params(const ModelConfig& c) { return 3 * c.hidden * c.expert_ffn; }
int64_t moe_fixed_params(const ModelConfig& c) {  // router, bias, shared experts
  return c.hidden * c.n_experts + (c.expert_score_bias ? c.n_experts : 0) +
         3 * c.hidden * c.shared_ffn();
}
int64_t dense_params(const ModelConfig& c) { return 3 * c.hidden * c.dense_ffn; }

int64_t params(const ModelConfig& c, int64_t experts_counted) {
  const int64_t dense_layers = std::min(c.n_dense_lead, c.n_layers);
  const int64_t moe_layers = c.n_layers - dense_layers;
  return c.n_layers * attention_params(c) + dense_layers * dense_params(c) +
         moe_layers * (moe_fixed_params(c) + experts_counted * expert_params(c)) +
         2 * c.hidden * c.vocab + c.hidden;  // embedding, output head, output_norm
}

}  // namespace

std::vector<TensorSpec> tensor_specs(const ModelConfig& c) {
  std::vector<TensorSpec> specs;
  const int64_t H = c.hidden, nh = c.n_heads, dq = c.head_dim, dv = c.v_head_dim;
  const int64_t rq = c.q_lora_rank, rkv = c.kv_lora_rank, dn = c.qk_nope_dim();
  auto global = [&](const char* base, std::array<int64_t, 3> ne, int n_dims, TensorRole role) {
    specs.push_back({tensor_name_global(base), ne, n_dims, role, -1, base});
  };
  auto layer = [&](int64_t l, const char* base, std::array<int64_t, 3> ne, int n_dims,
                   TensorRole role) {
    specs.push_back({tensor_name_layer(l, base), ne, n_dims, role, l, base});
  };
  global("token_embd", {H, c.vocab, 1}, 2, TensorRole::Embedding);
  for (int64_t l = 0; l < c.n_layers; ++l) {
    layer(l, "attn_norm", {H, 1, 1}, 1, TensorRole::Norm);
    if (rq > 0) {
      layer(l, "attn_q_a", {H, rq, 1}, 2, TensorRole::Matrix);
      layer(l, "attn_q_a_norm", {rq, 1, 1}, 1, TensorRole::Norm);
      layer(l, "attn_q_b", {rq, nh * dq, 1}, 2, TensorRole::Matrix);
    } else {
      layer(l, "attn_q", {H, nh * dq, 1}, 2, TensorRole::Matrix);
    }
    layer(l, "attn_kv_a_mqa", {H, rkv + c.rope_dim, 1}, 2, TensorRole::Matrix);
    layer(l, "attn_kv_a_norm", {rkv, 1, 1}, 1, TensorRole::Norm);
    if (c.split_kv_b) {
      layer(l, "attn_k_b", {dn, rkv, nh}, 3, TensorRole::Matrix);
      layer(l, "attn_v_b", {rkv, dv, nh}, 3, TensorRole::Matrix);
    } else {
      layer(l, "attn_kv_b", {rkv, nh * (dn + dv), 1}, 2, TensorRole::Matrix);
    }
    layer(l, "attn_output", {nh * dv, H, 1}, 2, TensorRole::Matrix);
    layer(l, "ffn_norm", {H, 1, 1}, 1, TensorRole::Norm);
    if (c.is_dense_layer(l)) {
      layer(l, "ffn_gate", {H, c.dense_ffn, 1}, 2, TensorRole::Matrix);
      layer(l, "ffn_up", {H, c.dense_ffn, 1}, 2, TensorRole::Matrix);
      layer(l, "ffn_down", {c.dense_ffn, H, 1}, 2, TensorRole::Matrix);
      continue;
    }
    layer(l, "ffn_gate_inp", {H, c.n_experts, 1}, 2, TensorRole::Router);
    if (c.expert_score_bias) {
      // llama.cpp names this one ".bias", not ".weight".
      specs.push_back({"blk." + std::to_string(l) + ".exp_probs_b.bias",
                       {c.n_experts, 1, 1},
                       1,
                       TensorRole::Bias,
                       l,
                       "exp_probs_b"});
    }
    layer(l, "ffn_gate_exps", {H, c.expert_ffn, c.n_experts}, 3, TensorRole::Experts);
    layer(l, "ffn_up_exps", {H, c.expert_ffn, c.n_experts}, 3, TensorRole::Experts);
    layer(l, "ffn_down_exps", {c.expert_ffn, H, c.n_experts}, 3, TensorRole::Experts);
    if (c.n_shared_experts > 0) {
      layer(l, "ffn_gate_shexp", {H, c.shared_ffn(), 1}, 2, TensorRole::Matrix);
      layer(l, "ffn_up_shexp", {H, c.shared_ffn(), 1}, 2, TensorRole::Matrix);
      layer(l, "ffn_down_shexp", {c.shared_ffn(), H, 1}, 2, TensorRole::Matrix);
    }
  }
  global("output_norm", {H, 1, 1}, 1, TensorRole::Norm);
  global("output", {H, c.vocab, 1}, 2, TensorRole::Matrix);
  return specs;
}

namespace {

// The field of L that holds the layer tensor named `base` in tensor_specs.
const TensorView* layer_field(const LayerWeights& L, const std::string& b) {
  return b == "attn_norm"        ? &L.attn_norm
         : b == "attn_q_a"       ? &L.wq_a
         : b == "attn_q_a_norm"  ? &L.q_a_norm
         : b == "attn_q_b"       ? &L.wq_b
         : b == "attn_q"         ? &L.wq
         : b == "attn_kv_a_mqa"  ? &L.wkv_a
         : b == "attn_kv_a_norm" ? &L.kv_a_norm
         : b == "attn_k_b"       ? &L.wk_b
         : b == "attn_v_b"       ? &L.wv_b
         : b == "attn_kv_b"      ? &L.wkv_b
         : b == "attn_output"    ? &L.wo
         : b == "ffn_norm"       ? &L.ffn_norm
         : b == "ffn_gate"       ? &L.ffn_gate
         : b == "ffn_up"         ? &L.ffn_up
         : b == "ffn_down"       ? &L.ffn_down
         : b == "ffn_gate_inp"   ? &L.router
         : b == "exp_probs_b"    ? &L.exp_probs_b
         : b == "ffn_gate_exps"  ? &L.gate_exps
         : b == "ffn_up_exps"    ? &L.up_exps
         : b == "ffn_down_exps"  ? &L.down_exps
         : b == "ffn_gate_shexp" ? &L.gate_shexp
         : b == "ffn_up_shexp"   ? &L.up_shexp
                                 : &L.down_shexp;
}

const TensorView* global_field(const ModelWeights& w, const std::string& b) {
  return b == "token_embd" ? &w.tok_embd : b == "output_norm" ? &w.output_norm : &w.output;
}

}  // namespace

std::vector<const TensorView*> tensor_list(const ModelWeights& w) {
  std::vector<const TensorView*> list;
  for (const TensorSpec& s : tensor_specs(w.cfg)) {
    if (s.layer < 0) {
      list.push_back(global_field(w, s.base));
    } else if (s.layer < static_cast<int64_t>(w.layers.size())) {
      list.push_back(layer_field(w.layers[static_cast<size_t>(s.layer)], s.base));
    }
  }
  return list;
}

std::vector<TensorView*> tensor_slots(ModelWeights& w) {
  w.layers.resize(static_cast<size_t>(w.cfg.n_layers));
  std::vector<TensorView*> slots;
  // The list's pointers are to w's own (non-const) fields.
  for (const TensorView* t : tensor_list(w)) slots.push_back(const_cast<TensorView*>(t));
  return slots;
}

void validate(const ModelConfig& c, const std::string& where) {
  struct Dim {
    const char* name;
    int64_t value;
  };
  const Dim dims[] = {
      {"n_layers (block_count)", c.n_layers},
      {"hidden (embedding_length)", c.hidden},
      {"n_heads (attention.head_count)", c.n_heads},
      {"head_dim (attention.key_length_mla)", c.head_dim},
      {"kv_lora_rank (attention.kv_lora_rank)", c.kv_lora_rank},
      {"rope_dim (rope.dimension_count)", c.rope_dim},
      {"v_head_dim (attention.value_length_mla)", c.v_head_dim},
      {"vocab (vocab_size)", c.vocab},
      {"context_length", c.context_length},
  };
  for (const Dim& d : dims) {
    if (d.value <= 0) {
      throw Error(where,
                  std::string(d.name) + " is " + std::to_string(d.value) + ", must be positive",
                  kFixMeta);
    }
  }
  auto need = [&](bool ok, const std::string& problem, const std::string& why = "") {
    if (!ok) throw Error(where, problem, why.empty() ? kFixMeta : why + "; " + kFixMeta);
  };
  need(c.rope_dim % 2 == 0, "rope.dimension_count " + std::to_string(c.rope_dim) + " is odd",
       "RoPE rotates pairs of dimensions");
  need(c.rope_dim < c.head_dim,
       "rope.dimension_count " + std::to_string(c.rope_dim) + " is not below the key head " +
           std::to_string(c.head_dim),
       "each key head is a decompressed part plus the roped part");
  need(c.q_lora_rank >= 0, "q_lora_rank is negative");
  need(c.n_dense_lead >= 0 && c.n_dense_lead <= c.n_layers,
       "leading_dense_block_count " + std::to_string(c.n_dense_lead) + " is outside [0, " +
           std::to_string(c.n_layers) + "]");
  if (c.n_dense_lead > 0) {
    need(c.dense_ffn > 0, "feed_forward_length is " + std::to_string(c.dense_ffn) +
                              " but the first " + std::to_string(c.n_dense_lead) +
                              " layers have a dense FFN");
  }
  if (c.n_dense_lead < c.n_layers) {
    need(c.n_experts > 0, "expert_count is " + std::to_string(c.n_experts) + ", but layers from " +
                              std::to_string(c.n_dense_lead) + " are MoE");
    need(c.expert_ffn > 0, "expert_feed_forward_length is " + std::to_string(c.expert_ffn));
    need(c.n_experts_used > 0 && c.n_experts_used <= c.n_experts,
         "expert_used_count " + std::to_string(c.n_experts_used) + " is outside [1, " +
             std::to_string(c.n_experts) + "]");
    need(c.n_shared_experts >= 0, "expert_shared_count is negative");
    need(c.n_expert_groups >= 1 && c.n_experts % c.n_expert_groups == 0,
         "expert_group_count " + std::to_string(c.n_expert_groups) + " does not divide " +
             std::to_string(c.n_experts) + " experts");
    need(c.n_groups_used >= 1 && c.n_groups_used <= c.n_expert_groups,
         "expert_group_used_count " + std::to_string(c.n_groups_used) + " is outside [1, " +
             std::to_string(c.n_expert_groups) + "]");
    need(c.n_groups_used * (c.n_experts / c.n_expert_groups) >= c.n_experts_used,
         "the " + std::to_string(c.n_groups_used) + " chosen expert groups hold fewer than " +
             std::to_string(c.n_experts_used) + " experts");
    need(c.gating == ExpertGating::Softmax || c.gating == ExpertGating::Sigmoid,
         "unknown expert_gating_func");
    need(std::isfinite(c.expert_weights_scale) && c.expert_weights_scale > 0.0f,
         "expert_weights_scale must be positive");
  }
  need(c.rope_theta > 0.0f, "rope theta must be positive");
  need(c.rms_eps > 0.0f, "rms_norm epsilon must be positive");
  if (c.rope_scaling == RopeScaling::Yarn) {
    need(std::isfinite(c.rope_factor) && c.rope_factor > 0.0f, "rope.scaling.factor must be > 0");
    need(c.rope_orig_context > 0, "rope.scaling.original_context_length must be positive");
    need(c.yarn_beta_fast > 0.0f && c.yarn_beta_slow > 0.0f, "YaRN betas must be positive");
  }
  // Parameter counts are int64: refuse shapes whose count does not fit with a wide margin
  // (estimated in double, as params_total would overflow on exactly those shapes).
  const double h = double(c.hidden), nh = double(c.n_heads);
  const double per_layer =
      h * (double(c.q_lora_rank) + nh * double(c.head_dim) + double(c.kv_lora_rank + c.rope_dim)) +
      double(c.q_lora_rank) * nh * double(c.head_dim) +
      double(c.kv_lora_rank) * nh * double(c.head_dim + c.v_head_dim) +
      nh * double(c.v_head_dim) * h + 3.0 * h * double(c.dense_ffn) +
      h * double(c.n_experts) * (1.0 + 3.0 * double(c.expert_ffn)) +
      3.0 * h * double(c.n_shared_experts) * double(c.expert_ffn);
  const double total = double(c.n_layers) * per_layer + 2.0 * h * double(c.vocab) + h;
  if (!(total < 9007199254740992.0)) {
    char n[32];
    std::snprintf(n, sizeof n, "%.3g", total);
    throw Error(where, std::string("the shape implies ") + n + " parameters (more than 2^53)",
                kFixMeta);
  }
}

int64_t params_total(const ModelConfig& c) { return params(c, c.n_experts); }
int64_t params_active_per_token(const ModelConfig& c) { return params(c, c.n_experts_used); }

int64_t bytes_per_token_decode(const ModelWeights& w) {
  int64_t total = w.tok_embd.row_stride() + w.output_norm.nbytes() + w.output.nbytes();
  for (const LayerWeights& l : w.layers) {
    for (const TensorView* t :
         {&l.attn_norm, &l.wq,          &l.wq_a,       &l.q_a_norm, &l.wq_b,
          &l.wkv_a,     &l.kv_a_norm,   &l.wkv_b,      &l.wk_b,     &l.wv_b,
          &l.wo,        &l.ffn_norm,    &l.ffn_gate,   &l.ffn_up,   &l.ffn_down,
          &l.router,    &l.exp_probs_b, &l.gate_shexp, &l.up_shexp, &l.down_shexp}) {
      if (!t->name.empty()) total += t->nbytes();  // absent tensors have no name
    }
    if (l.gate_exps.name.empty()) continue;  // a dense layer
    const int64_t per_expert = l.gate_exps.ne[1] * l.gate_exps.row_stride() +
                               l.up_exps.ne[1] * l.up_exps.row_stride() +
                               l.down_exps.ne[1] * l.down_exps.row_stride();
    total += w.cfg.n_experts_used * per_expert;
  }
  return total;
}

void set_gguf_metadata(gguf::Writer& w, const ModelConfig& c, QuantType quant) {
  using gguf::Value;
  auto u32 = [](int64_t v) { return Value::u32(static_cast<uint32_t>(v)); };
  const std::string a = "deepseek2.";
  w.set("general.architecture", Value::string("deepseek2"));
  w.set("general.name", Value::string(c.name));
  w.set("general.file_type", Value::u32(llama_file_type(quant)));
  w.set("general.quantization_version", Value::u32(2));
  w.set(a + "block_count", u32(c.n_layers));
  w.set(a + "context_length", u32(c.context_length));
  w.set(a + "embedding_length", u32(c.hidden));
  w.set(a + "feed_forward_length", u32(c.dense_ffn));
  w.set(a + "attention.head_count", u32(c.n_heads));
  if (c.split_kv_b) {
    // The cache seen as one shared head, and the real heads in the *_mla keys.
    w.set(a + "attention.head_count_kv", u32(1));
    w.set(a + "attention.key_length", u32(c.kv_lora_rank + c.rope_dim));
    w.set(a + "attention.value_length", u32(c.kv_lora_rank));
    w.set(a + "attention.key_length_mla", u32(c.head_dim));
    w.set(a + "attention.value_length_mla", u32(c.v_head_dim));
  } else {
    // The layout of files written before attn_kv_b was split (llama.cpp still reads them).
    w.set(a + "attention.head_count_kv", u32(c.n_heads));
    w.set(a + "attention.key_length", u32(c.head_dim));
    w.set(a + "attention.value_length", u32(c.v_head_dim));
  }
  w.set(a + "attention.layer_norm_rms_epsilon", Value::f32(c.rms_eps));
  if (c.q_lora_rank > 0) w.set(a + "attention.q_lora_rank", u32(c.q_lora_rank));
  w.set(a + "attention.kv_lora_rank", u32(c.kv_lora_rank));
  w.set(a + "rope.dimension_count", u32(c.rope_dim));
  w.set(a + "rope.freq_base", Value::f32(c.rope_theta));
  if (c.rope_scaling == RopeScaling::Yarn) {
    if (c.yarn_mscale_all_dim != 0.0f && c.yarn_mscale != c.yarn_mscale_all_dim) {
      throw Error(c.name,
                  "YaRN mscale " + std::to_string(c.yarn_mscale) + " differs from mscale_all_dim " +
                      std::to_string(c.yarn_mscale_all_dim),
                  "GGUF (llama.cpp) can only express mscale == mscale_all_dim; run the "
                  "checkpoint from its folder instead of converting it");
    }
    w.set(a + "rope.scaling.type", Value::string("yarn"));
    w.set(a + "rope.scaling.factor", Value::f32(c.rope_factor));
    w.set(a + "rope.scaling.original_context_length", u32(c.rope_orig_context));
    w.set(a + "rope.scaling.yarn_beta_fast", Value::f32(c.yarn_beta_fast));
    w.set(a + "rope.scaling.yarn_beta_slow", Value::f32(c.yarn_beta_slow));
    if (c.yarn_mscale_all_dim != 0.0f) {
      w.set(a + "rope.scaling.yarn_log_multiplier", Value::f32(0.1f * c.yarn_mscale_all_dim));
    }
  }
  w.set(a + "leading_dense_block_count", u32(c.n_dense_lead));
  w.set(a + "expert_count", u32(c.n_experts));
  w.set(a + "expert_used_count", u32(c.n_experts_used));
  w.set(a + "expert_feed_forward_length", u32(c.expert_ffn));
  w.set(a + "expert_shared_count", u32(c.n_shared_experts));
  w.set(a + "expert_weights_scale", Value::f32(c.expert_weights_scale));
  w.set(a + "expert_weights_norm", Value::boolean(c.norm_topk_prob));
  w.set(a + "expert_gating_func", Value::u32(static_cast<uint32_t>(c.gating)));
  if (c.n_expert_groups > 1) {
    w.set(a + "expert_group_count", u32(c.n_expert_groups));
    w.set(a + "expert_group_used_count", u32(c.n_groups_used));
  }
  w.set(a + "vocab_size", u32(c.vocab));
  w.set("tokenizer.ggml.model", Value::string("no_vocab"));
}

namespace {

ModelConfig config_from_gguf(const gguf::File& f, const std::string& path) {
  const std::string a = "deepseek2.";
  auto num = [&](const std::string& key) { return static_cast<int64_t>(f.get_uint(a + key)); };
  auto num_or = [&](const std::string& key, int64_t fallback) {
    return static_cast<int64_t>(f.get_uint_or(a + key, static_cast<uint64_t>(fallback)));
  };
  ModelConfig c;
  c.arch = "deepseek2";
  if (const gguf::Value* n = f.find("general.name"); n && n->type == gguf::ValueType::STRING) {
    c.name = n->s;
  } else {
    c.name = std::filesystem::path(path).stem().string();
  }
  // Multi-token-prediction blocks (nextn) follow the trunk's layers; ktune runs the trunk.
  c.n_layers = num("block_count") - num_or("nextn_predict_layers", 0);
  c.hidden = num("embedding_length");
  c.n_heads = num("attention.head_count");
  c.n_kv_heads = 1;
  c.context_length = num("context_length");
  c.dense_ffn = num_or("feed_forward_length", 0);
  c.q_lora_rank = num_or("attention.q_lora_rank", 0);
  c.kv_lora_rank = num("attention.kv_lora_rank");
  c.rope_dim = num("rope.dimension_count");
  if (f.find(a + "attention.key_length_mla")) {
    c.head_dim = num("attention.key_length_mla");
    c.v_head_dim = num("attention.value_length_mla");
  } else {
    c.head_dim = num("attention.key_length");
    c.v_head_dim = num("attention.value_length");
  }
  c.n_dense_lead = num_or("leading_dense_block_count", 0);
  c.n_experts = num_or("expert_count", 0);
  c.n_experts_used = num_or("expert_used_count", 0);
  c.expert_ffn = num_or("expert_feed_forward_length", 0);
  c.n_shared_experts = num_or("expert_shared_count", 0);
  c.n_expert_groups = std::max<int64_t>(1, num_or("expert_group_count", 1));
  c.n_groups_used = c.n_expert_groups > 1 ? num_or("expert_group_used_count", 0) : 1;
  const int64_t gating = num_or("expert_gating_func", 1);
  if (gating != 1 && gating != 2) {
    throw Error(path, "expert_gating_func " + std::to_string(gating) + " is not supported",
                "ktune implements softmax (1) and sigmoid (2) routing, as DeepSeek-V2/V3 use");
  }
  c.gating = static_cast<ExpertGating>(gating);
  const double scale = f.get_float_or(a + "expert_weights_scale", 1.0);
  c.expert_weights_scale = static_cast<float>(scale == 0.0 ? 1.0 : scale);  // llama.cpp: 0 = none
  c.norm_topk_prob = f.find(a + "expert_weights_norm") && f.get_bool(a + "expert_weights_norm");
  c.rope_theta = static_cast<float>(f.get_float_or(a + "rope.freq_base", 10000.0));
  c.rms_eps = static_cast<float>(f.get_float(a + "attention.layer_norm_rms_epsilon"));
  if (const gguf::Value* t = f.find(a + "rope.scaling.type")) {
    const std::string type = t->type == gguf::ValueType::STRING ? t->s : "?";
    if (type == "yarn") {
      c.rope_scaling = RopeScaling::Yarn;
      c.rope_factor = static_cast<float>(f.get_float(a + "rope.scaling.factor"));
      c.rope_orig_context = num("rope.scaling.original_context_length");
      c.yarn_beta_fast = static_cast<float>(f.get_float_or(a + "rope.scaling.yarn_beta_fast", 32));
      c.yarn_beta_slow = static_cast<float>(f.get_float_or(a + "rope.scaling.yarn_beta_slow", 1));
      const double log_mul = f.get_float_or(a + "rope.scaling.yarn_log_multiplier", 0.0);
      c.yarn_mscale_all_dim = static_cast<float>(log_mul / 0.1);
      c.yarn_mscale = c.yarn_mscale_all_dim;  // llama.cpp's reading (see the top of this file)
    } else if (type != "none") {
      throw Error(path, "rope.scaling.type '" + type + "' is not supported",
                  "ktune implements YaRN (DeepSeek-V2/V3) and unscaled RoPE");
    }
  }
  if (f.get_float_or(a + "rope.scaling.attn_factor", 1.0) != 1.0) {
    throw Error(path, "rope.scaling.attn_factor is not 1",
                "ktune implements the attention factor DeepSeek's YaRN derives, no extra one");
  }
  const gguf::TensorInfo* embd = f.find_tensor("token_embd.weight");
  if (f.find(a + "vocab_size")) {
    c.vocab = num("vocab_size");
  } else if (const gguf::Value* toks = f.find("tokenizer.ggml.tokens");
             toks && toks->type == gguf::ValueType::ARRAY) {
    c.vocab = static_cast<int64_t>(toks->array.size());
  } else if (embd && embd->ne.size() >= 2) {
    c.vocab = embd->ne[1];
  }
  // Layout facts the metadata does not state: split attn_k_b/attn_v_b, and the selection bias.
  c.split_kv_b = f.find_tensor("blk.0.attn_kv_b.weight") == nullptr;
  c.expert_score_bias =
      f.find_tensor("blk." + std::to_string(c.n_dense_lead) + ".exp_probs_b.bias") != nullptr;
  return c;
}

}  // namespace

ModelWeights load_gguf(const std::shared_ptr<gguf::File>& file, const std::string& path) {
  const gguf::File& f = *file;
  const ModelConfig c = config_from_gguf(f, path);
  validate(c, path);
  // Every layer has at least 9 tensors: refuse a block_count the file cannot hold before
  // building the list of expected tensors (which is as long as that).
  const int64_t n_tensors = static_cast<int64_t>(f.tensors().size());
  if (c.n_layers > n_tensors / 9) {
    throw Error(path,
                "block_count " + std::to_string(c.n_layers) + " is more than " +
                    std::to_string(n_tensors) + " tensors can hold",
                "the file does not match its own metadata; re-convert the model");
  }
  ModelWeights w;
  w.cfg = c;
  w.source = path;
  const std::vector<TensorSpec> specs = tensor_specs(c);
  const std::vector<TensorView*> slots = tensor_slots(w);
  for (size_t i = 0; i < specs.size(); ++i) {
    const TensorSpec& s = specs[i];
    const gguf::TensorInfo* t = f.find_tensor(s.name);
    if (t == nullptr) {
      if (s.base == "output") continue;  // tied to token_embd below
      throw Error(path, "tensor " + s.name + " is missing",
                  "the file is incomplete or its metadata does not match its tensors; "
                  "re-download or re-convert it");
    }
    const std::vector<int64_t> expected(s.ne.begin(), s.ne.begin() + s.n_dims);
    if (without_trailing_ones(t->ne) != without_trailing_ones(expected)) {
      throw Error(path,
                  "tensor " + s.name + " has shape " + dims_str(t->ne) + ", expected " +
                      dims_str(expected) + " (ggml order, ne[0] first)",
                  "the file does not match its own metadata; re-convert the model");
    }
    if (!is_supported_quant(t->type)) {
      std::string have;
      for (uint32_t id = 0; id < 64; ++id) {
        if (is_supported_quant(id)) have += (have.empty() ? "" : ", ") + type_word(id);
      }
      throw Error(path,
                  "tensor " + s.name + " has type " + type_word(t->type) +
                      ", which ktune does not support yet",
                  "supported: " + have);
    }
    if ((s.role == TensorRole::Norm || s.role == TensorRole::Bias) &&
        t->quant() != QuantType::F32) {
      throw Error(path,
                  "tensor " + s.name + " has type " + type_word(t->type) +
                      "; norm weights and biases must be F32",
                  "re-convert the model keeping them in F32, as llama.cpp does");
    }
    TensorView& v = *slots[i];
    v.name = s.name;
    v.type = t->quant();
    v.ne = s.ne;
    v.data = t->data;
  }
  if (w.output.data == nullptr) w.output = w.tok_embd;  // tied embeddings
  w.quant = w.tok_embd.type;
  for (const LayerWeights& l : w.layers) {
    if (l.up_exps.data != nullptr) {
      w.quant = l.up_exps.type;
      break;
    }
  }
  w.storage.push_back(file);
  return w;
}

}  // namespace ktune::deepseek2
