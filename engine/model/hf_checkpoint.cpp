// Hugging Face qwen3_moe and deepseek_v3 / deepseek_v2 checkpoints -> ggml-layout tensors (in
// memory as F32, or a GGUF file).
//
// Layout: PyTorch stores a Linear weight as [out, in], row-major, which is exactly ggml's
// ne = {in, out} (ne[0] contiguous), so matrices are copied without a transpose. Expert tensors
// are stacked along ggml's ne[2] (PyTorch's leading dimension).
//
// RoPE: Qwen3 applies rotate_half (NEOX style: dimension i pairs with i + head_dim/2) to q and k
// in their natural layout, and llama.cpp runs qwen3moe with NEOX rope and converts q_proj/k_proj
// without the row permutation it applies to LLaMA. So q and k are copied as they are here too.
//
// DeepSeek: the roped tail of each query head (q_b_proj / q_proj rows) and of kv_a_proj_with_mqa
// is stored interleaved (pairs 2i, 2i+1 share a frequency); transformers de-interleaves it at run
// time (rope_interleave) and llama.cpp rotates adjacent pairs (GGML_ROPE_TYPE_NORM) on the
// tensors converted without a permutation, as ktune's engine does: copied as they are.
// kv_b_proj is kept whole (attn_kv_b, the layout of GGUFs from before its split).
#include "ktune/engine/hf_checkpoint.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "ktune/engine/error.h"
#include "ktune/engine/gguf.h"
#include "ktune/engine/safetensors.h"

namespace ktune {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

const char* kCheckpointFix =
    "a Hugging Face checkpoint folder holds config.json and model*.safetensors of a qwen3_moe, "
    "deepseek_v3 or deepseek_v2 model (e.g. Qwen/Qwen3-30B-A3B)";

json read_json(const fs::path& path) {
  std::ifstream in(path);
  if (!in) throw Error(path.string(), "cannot open the file", kCheckpointFix);
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    throw Error(path.string(), std::string("invalid JSON: ") + e.what(),
                "repair or re-download the file");
  }
}

int64_t get_int(const json& j, const std::string& key, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    throw Error(where, "key " + key + " is missing", "a qwen3_moe config.json sets it");
  }
  if (!it->is_number_integer()) {
    throw Error(where, "key " + key + " is not an integer (" + it->dump() + ")",
                "fix config.json");
  }
  return it->get<int64_t>();
}

int64_t get_int_or(const json& j, const std::string& key, int64_t fallback,
                   const std::string& where) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  return get_int(j, key, where);
}

double get_float_or(const json& j, const std::string& key, double fallback,
                    const std::string& where) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_number()) {
    throw Error(where, "key " + key + " is not a number (" + it->dump() + ")", "fix config.json");
  }
  return it->get<double>();
}

std::string get_string_or(const json& j, const std::string& key, const std::string& fallback,
                          const std::string& where) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_string()) {
    throw Error(where, "key " + key + " is not a string (" + it->dump() + ")", "fix config.json");
  }
  return it->get<std::string>();
}

bool get_bool_or(const json& j, const std::string& key, bool fallback, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) {
    throw Error(where, "key " + key + " is not true/false (" + it->dump() + ")",
                "fix config.json");
  }
  return it->get<bool>();
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

// An opened checkpoint: its config and every tensor of every safetensors file, by name.
class Checkpoint {
 public:
  explicit Checkpoint(const std::string& dir) : dir_(dir) {
    cfg_ = read_hf_config(dir);
    const json config = read_json(fs::path(dir) / "config.json");
    tied_ = get_bool_or(config, "tie_word_embeddings", false, where("config.json"));
    open_files();
    // Every layer has several tensors: a layer count the checkpoint cannot hold is refused
    // before the loops over layers below (4 billion layers would take hours to look up).
    const int64_t n_tensors = static_cast<int64_t>(by_name_.size());
    if (cfg_.n_layers > n_tensors) {
      throw Error(where("config.json"),
                  "num_hidden_layers is " + std::to_string(cfg_.n_layers) +
                      " but the checkpoint holds only " + std::to_string(n_tensors) + " tensors",
                  "config.json does not match the weights; download the checkpoint again");
    }
    for (int64_t l = 0; l < cfg_.n_layers && !fused_; ++l) {
      fused_ = has(layer_name(l, "mlp.experts.gate_up_proj")) ||
               has(layer_name(l, "mlp.experts.gate_up_proj.weight"));
    }
    if (!tied_ && !has("lm_head.weight")) {
      throw Error(dir_, "lm_head.weight is missing and tie_word_embeddings is false",
                  "the checkpoint is incomplete; re-download it");
    }
  }

  const ModelConfig& config() const { return cfg_; }
  bool tied() const { return tied_; }

  // The F32 data of ggml tensor `s` (the layout model_tensor_specs describes).
  std::vector<float> build(const TensorSpec& s) const {
    if (cfg_.is_deepseek2()) return build_deepseek(s);
    const ModelConfig& c = cfg_;
    const int64_t q = c.n_heads * c.head_dim;
    const int64_t kv = c.n_kv_heads * c.head_dim;
    const int64_t l = s.layer;
    const std::string& b = s.base;
    if (b == "token_embd") return read("model.embed_tokens.weight", {c.vocab, c.hidden});
    if (b == "output_norm") return read("model.norm.weight", {c.hidden});
    if (b == "output") {
      return read(tied_ ? "model.embed_tokens.weight" : "lm_head.weight", {c.vocab, c.hidden});
    }
    if (b == "attn_norm") return read(layer_name(l, "input_layernorm.weight"), {c.hidden});
    if (b == "attn_q") return read(layer_name(l, "self_attn.q_proj.weight"), {q, c.hidden});
    if (b == "attn_k") return read(layer_name(l, "self_attn.k_proj.weight"), {kv, c.hidden});
    if (b == "attn_v") return read(layer_name(l, "self_attn.v_proj.weight"), {kv, c.hidden});
    if (b == "attn_output") return read(layer_name(l, "self_attn.o_proj.weight"), {c.hidden, q});
    if (b == "attn_q_norm") return read(layer_name(l, "self_attn.q_norm.weight"), {c.head_dim});
    if (b == "attn_k_norm") return read(layer_name(l, "self_attn.k_norm.weight"), {c.head_dim});
    if (b == "ffn_norm") return read(layer_name(l, "post_attention_layernorm.weight"), {c.hidden});
    if (b == "ffn_gate_inp") {
      return read(layer_name(l, "mlp.gate.weight"), {c.n_experts, c.hidden});
    }
    if (b == "ffn_gate_exps" || b == "ffn_up_exps" || b == "ffn_down_exps") {
      return experts(l, b);
    }
    throw Error(dir_, "internal: no source for tensor " + s.name, "report this as a ktune bug");
  }

 private:
  std::string where(const std::string& file) const { return (fs::path(dir_) / file).string(); }

  std::vector<float> build_deepseek(const TensorSpec& s) const {
    const ModelConfig& c = cfg_;
    const int64_t H = c.hidden, nh = c.n_heads, dq = c.head_dim, dv = c.v_head_dim;
    const int64_t rq = c.q_lora_rank, rkv = c.kv_lora_rank, F = c.dense_ffn, Fs = c.shared_ffn();
    const int64_t l = s.layer;
    const std::string& b = s.base;
    auto at = [&](const char* rest) { return layer_name(l, rest); };
    if (b == "token_embd") return read("model.embed_tokens.weight", {c.vocab, H});
    if (b == "output_norm") return read("model.norm.weight", {H});
    if (b == "output")
      return read(tied_ ? "model.embed_tokens.weight" : "lm_head.weight", {c.vocab, H});
    if (b == "attn_norm") return read(at("input_layernorm.weight"), {H});
    if (b == "ffn_norm") return read(at("post_attention_layernorm.weight"), {H});
    if (b == "attn_q_a") return read(at("self_attn.q_a_proj.weight"), {rq, H});
    if (b == "attn_q_a_norm") return read(at("self_attn.q_a_layernorm.weight"), {rq});
    if (b == "attn_q_b") return read(at("self_attn.q_b_proj.weight"), {nh * dq, rq});
    if (b == "attn_q") return read(at("self_attn.q_proj.weight"), {nh * dq, H});
    if (b == "attn_kv_a_mqa") {
      return read(at("self_attn.kv_a_proj_with_mqa.weight"), {rkv + c.rope_dim, H});
    }
    if (b == "attn_kv_a_norm") return read(at("self_attn.kv_a_layernorm.weight"), {rkv});
    if (b == "attn_kv_b") {
      return read(at("self_attn.kv_b_proj.weight"), {nh * (c.qk_nope_dim() + dv), rkv});
    }
    if (b == "attn_output") return read(at("self_attn.o_proj.weight"), {H, nh * dv});
    if (b == "ffn_gate") return read(at("mlp.gate_proj.weight"), {F, H});
    if (b == "ffn_up") return read(at("mlp.up_proj.weight"), {F, H});
    if (b == "ffn_down") return read(at("mlp.down_proj.weight"), {H, F});
    if (b == "ffn_gate_inp") return read(at("mlp.gate.weight"), {c.n_experts, H});
    if (b == "exp_probs_b") return read(at("mlp.gate.e_score_correction_bias"), {c.n_experts});
    if (b == "ffn_gate_shexp") return read(at("mlp.shared_experts.gate_proj.weight"), {Fs, H});
    if (b == "ffn_up_shexp") return read(at("mlp.shared_experts.up_proj.weight"), {Fs, H});
    if (b == "ffn_down_shexp") return read(at("mlp.shared_experts.down_proj.weight"), {H, Fs});
    if (b == "ffn_gate_exps" || b == "ffn_up_exps" || b == "ffn_down_exps") return experts(l, b);
    throw Error(dir_, "internal: no source for tensor " + s.name, "report this as a ktune bug");
  }

  static std::string layer_name(int64_t l, const std::string& rest) {
    return "model.layers." + std::to_string(l) + "." + rest;
  }

  void open_files() {
    std::vector<fs::path> paths;
    const fs::path index = fs::path(dir_) / "model.safetensors.index.json";
    if (fs::exists(index)) {
      const json j = read_json(index);
      auto map = j.find("weight_map");
      if (map == j.end() || !map->is_object()) {
        throw Error(index.string(), "no weight_map object", "re-download the checkpoint");
      }
      std::set<std::string> names;
      for (auto it = map->begin(); it != map->end(); ++it) {
        if (!it->is_string()) {
          throw Error(index.string(), "weight_map entry " + it.key() + " is not a file name",
                      "re-download the checkpoint");
        }
        names.insert(it->get<std::string>());
      }
      for (const std::string& n : names) {
        const fs::path p = fs::path(dir_) / n;
        if (!fs::exists(p)) {
          throw Error(index.string(), "names shard " + n + ", which is not in the folder",
                      "download every shard of the checkpoint");
        }
        paths.push_back(p);
      }
    } else {
      for (const auto& e : fs::directory_iterator(dir_)) {
        if (e.is_regular_file() && e.path().extension() == ".safetensors") {
          paths.push_back(e.path());
        }
      }
      std::sort(paths.begin(), paths.end());
    }
    if (paths.empty()) throw Error(dir_, "no *.safetensors files", kCheckpointFix);
    for (const fs::path& p : paths) {
      files_.push_back(std::make_unique<safetensors::File>(safetensors::File::open(p.string())));
      const size_t fi = files_.size() - 1;
      for (const safetensors::Tensor& t : files_.back()->tensors()) {
        if (!by_name_.emplace(t.name, fi).second) {
          throw Error(p.string(), "tensor " + t.name + " also appears in another shard",
                      "keep one copy of the checkpoint in the folder");
        }
      }
    }
  }

  bool has(const std::string& name) const { return by_name_.count(name) != 0; }

  const safetensors::Tensor& tensor(const std::string& name) const {
    auto it = by_name_.find(name);
    if (it == by_name_.end()) {
      throw Error(dir_, "tensor " + name + " is missing from the checkpoint",
                  "the checkpoint is incomplete or not a qwen3_moe model; re-download it");
    }
    return *files_[it->second]->find(name);
  }

  std::vector<float> read(const std::string& name, const std::vector<int64_t>& shape) const {
    const safetensors::Tensor& t = tensor(name);
    if (t.shape != shape) {
      throw Error(dir_,
                  "tensor " + name + " has shape " + shape_str(t.shape) + ", expected " +
                      shape_str(shape) + " from config.json",
                  "config.json does not match the weights; re-download the checkpoint");
    }
    return files_[by_name_.at(name)]->read_f32(name, shape);
  }

  // Stacks the experts of layer l for one of gate/up/down into ggml's {in, out, n_experts}.
  std::vector<float> experts(int64_t l, const std::string& base) const {
    const ModelConfig& c = cfg_;
    const int64_t E = c.n_experts, F = c.expert_ffn, H = c.hidden;
    const bool down = base == "ffn_down_exps";
    const int64_t per = F * H;  // elements of one expert's matrix (either orientation)
    std::vector<float> out(static_cast<size_t>(E * per));
    if (!fused_) {
      // transformers 4: one Linear per expert.
      const char* proj = down ? "down_proj" : base == "ffn_gate_exps" ? "gate_proj" : "up_proj";
      for (int64_t e = 0; e < E; ++e) {
        const std::string name =
            layer_name(l, "mlp.experts." + std::to_string(e) + "." + proj + ".weight");
        const std::vector<float> m =
            read(name, down ? std::vector<int64_t>{H, F} : std::vector<int64_t>{F, H});
        std::copy(m.begin(), m.end(), out.begin() + e * per);
      }
      return out;
    }
    // transformers 5 (Qwen3MoeExperts): gate_up_proj [E, 2F, H] and down_proj [E, H, F], used as
    //   gate, up = linear(x, gate_up_proj[e]).chunk(2, dim=-1)
    // so rows 0..F-1 of each expert are the gate projection and rows F..2F-1 the up projection.
    auto fused_name = [&](const std::string& n) {
      const std::string plain = layer_name(l, "mlp.experts." + n);
      return has(plain) ? plain : plain + ".weight";
    };
    if (down) return read(fused_name("down_proj"), {E, H, F});
    const std::string name = fused_name("gate_up_proj");
    const safetensors::Tensor& t = tensor(name);
    if (t.shape == std::vector<int64_t>{E, H, 2 * F} && H != 2 * F) {
      throw Error(dir_,
                  "tensor " + name + " has shape " + shape_str(t.shape) +
                      " (hidden before 2*ffn), a transposed layout ktune does not read",
                  "save the checkpoint with transformers' Qwen3MoeExperts layout [E, 2*ffn, "
                  "hidden] or per-expert gate_proj/up_proj tensors");
    }
    const std::vector<float> gu = read(name, {E, 2 * F, H});
    const int64_t skip = base == "ffn_gate_exps" ? 0 : per;
    for (int64_t e = 0; e < E; ++e) {
      const auto src = gu.begin() + e * 2 * per + skip;
      std::copy(src, src + per, out.begin() + e * per);
    }
    return out;
  }

  std::string dir_;
  ModelConfig cfg_;
  bool tied_ = false;
  bool fused_ = false;
  std::vector<std::unique_ptr<safetensors::File>> files_;
  std::map<std::string, size_t> by_name_;
};

QuantType storage_type(const TensorSpec& s, QuantType quant) {
  return s.role == TensorRole::Norm || s.role == TensorRole::Router || s.role == TensorRole::Bias
             ? QuantType::F32
             : quant;
}

// The rope settings of a config.json: transformers 4 writes rope_theta and rope_scaling,
// transformers 5 rope_parameters (rope_theta, rope_type and the scaling fields together).
void read_deepseek_rope(const json& j, const std::string& where, ModelConfig& c) {
  const json* scaling = nullptr;
  double theta = get_float_or(j, "rope_theta", 0.0, where);
  if (auto rp = j.find("rope_parameters"); rp != j.end() && rp->is_object()) {
    if (theta == 0.0) theta = get_float_or(*rp, "rope_theta", 0.0, where);
    scaling = &*rp;
  }
  if (auto rs = j.find("rope_scaling"); rs != j.end() && rs->is_object()) scaling = &*rs;
  c.rope_theta = static_cast<float>(theta == 0.0 ? 10000.0 : theta);
  if (scaling == nullptr) return;
  std::string type = get_string_or(*scaling, "rope_type", "", where);
  if (type.empty()) type = get_string_or(*scaling, "type", "default", where);
  if (type == "default") return;
  if (type != "yarn") {
    throw Error(where, "rope type '" + type + "' is not supported",
                "ktune implements YaRN (DeepSeek-V2/V3) and unscaled RoPE");
  }
  if (scaling->contains("attention_factor") && !(*scaling)["attention_factor"].is_null()) {
    throw Error(where, "the YaRN attention_factor is set explicitly",
                "ktune derives it from mscale and mscale_all_dim, as DeepSeek's configs do");
  }
  c.rope_scaling = RopeScaling::Yarn;
  c.rope_factor = static_cast<float>(get_float_or(*scaling, "factor", 0.0, where));
  c.rope_orig_context = get_int_or(*scaling, "original_max_position_embeddings", 0, where);
  c.yarn_beta_fast = static_cast<float>(get_float_or(*scaling, "beta_fast", 32.0, where));
  c.yarn_beta_slow = static_cast<float>(get_float_or(*scaling, "beta_slow", 1.0, where));
  c.yarn_mscale = static_cast<float>(get_float_or(*scaling, "mscale", 0.0, where));
  c.yarn_mscale_all_dim = static_cast<float>(get_float_or(*scaling, "mscale_all_dim", 0.0, where));
  // Some transformers versions take the factor as max_position_embeddings divided by
  // original_max_position_embeddings instead of `factor`; DeepSeek's configs agree on both.
  if (c.rope_orig_context > 0 && c.context_length > 0) {
    const double ratio = double(c.context_length) / double(c.rope_orig_context);
    if (std::abs(ratio - c.rope_factor) > 1e-6 * c.rope_factor) {
      throw Error(where,
                  "YaRN factor " + std::to_string(c.rope_factor) +
                      " differs from max_position_embeddings / original_max_position_embeddings",
                  "transformers versions disagree on which of the two they use; make them agree");
    }
  }
}

// deepseek_v3 (DeepSeek-V3, R1) and deepseek_v2 (V2, V2-Lite) configs as ktune's deepseek2.
ModelConfig parse_deepseek_config(const json& j, const std::string& model_type,
                                  const std::string& where) {
  const bool v3 = model_type == "deepseek_v3";
  ModelConfig c;
  c.arch = "deepseek2";
  c.name = fs::path(where).parent_path().filename().string();
  c.hidden = get_int(j, "hidden_size", where);
  c.n_layers = get_int(j, "num_hidden_layers", where);
  c.n_heads = get_int(j, "num_attention_heads", where);
  c.n_kv_heads = 1;
  c.q_lora_rank = get_int_or(j, "q_lora_rank", 0, where);
  c.kv_lora_rank = get_int(j, "kv_lora_rank", where);
  c.rope_dim = get_int(j, "qk_rope_head_dim", where);
  const int64_t nope = get_int(j, "qk_nope_head_dim", where);
  if (nope < 0 || nope > (int64_t{1} << 30) || c.rope_dim < 0 || c.rope_dim > (int64_t{1} << 30)) {
    throw Error(where, "qk_nope_head_dim or qk_rope_head_dim is out of range",
                "fix config.json");  // before adding them: no overflow on any input
  }
  c.head_dim = nope + c.rope_dim;
  c.v_head_dim = get_int(j, "v_head_dim", where);
  if (j.contains("n_routed_experts") && !j["n_routed_experts"].is_null()) {
    c.n_experts = get_int(j, "n_routed_experts", where);
  } else {
    c.n_experts = get_int_or(j, "num_local_experts", 0, where);
  }
  c.n_experts_used = get_int_or(j, "num_experts_per_tok", 0, where);
  c.expert_ffn = get_int_or(j, "moe_intermediate_size", 0, where);
  c.dense_ffn = get_int_or(j, "intermediate_size", 0, where);
  c.n_shared_experts = get_int_or(j, "n_shared_experts", 0, where);
  c.n_dense_lead = get_int_or(j, "first_k_dense_replace", 0, where);
  c.vocab = get_int(j, "vocab_size", where);
  c.context_length = get_int_or(j, "max_position_embeddings", 4096, where);
  c.rms_eps = static_cast<float>(get_float_or(j, "rms_norm_eps", 1e-6, where));
  c.expert_weights_scale = static_cast<float>(get_float_or(j, "routed_scaling_factor", 1.0, where));
  c.norm_topk_prob = get_bool_or(j, "norm_topk_prob", v3, where);
  c.n_expert_groups = get_int_or(j, "n_group", 1, where);
  c.n_groups_used = get_int_or(j, "topk_group", 1, where);
  c.split_kv_b = false;
  if (get_int_or(j, "moe_layer_freq", 1, where) != 1) {
    throw Error(where, "moe_layer_freq is not 1 (dense layers between MoE layers)",
                "ktune supports DeepSeek checkpoints whose layers after the dense ones are MoE");
  }
  if (get_bool_or(j, "attention_bias", false, where)) {
    throw Error(where, "attention_bias is true", "DeepSeek-V2/V3 attention has no biases");
  }
  if (!get_bool_or(j, "rope_interleave", true, where)) {
    throw Error(where, "rope_interleave is false",
                "ktune rotates adjacent pairs of the roped dimensions, as DeepSeek's checkpoints "
                "are stored (rope_interleave true)");
  }
  if (v3) {  // transformers' DeepseekV3: sigmoid scores, selection bias, top-2-sum groups
    c.gating = ExpertGating::Sigmoid;
    c.expert_score_bias = true;
  } else {
    const std::string scoring = get_string_or(j, "scoring_func", "softmax", where);
    if (scoring != "softmax" && scoring != "sigmoid") {
      throw Error(where, "scoring_func '" + scoring + "' is not supported",
                  "ktune implements softmax and sigmoid routing");
    }
    c.gating = scoring == "sigmoid" ? ExpertGating::Sigmoid : ExpertGating::Softmax;
    const std::string method = get_string_or(j, "topk_method", "greedy", where);
    if (method == "greedy") {
      c.n_expert_groups = c.n_groups_used = 1;
    } else if (method == "noaux_tc") {
      c.expert_score_bias = true;
    } else if (method == "group_limited_greedy" && c.n_expert_groups > 1) {
      throw Error(where, "topk_method group_limited_greedy (groups scored by their best expert)",
                  "ktune scores groups by the sum of their top two experts (DeepSeek-V3, "
                  "llama.cpp); this DeepSeek-V2 routing is not implemented");
    } else if (method != "group_limited_greedy") {
      throw Error(where, "topk_method '" + method + "' is not supported",
                  "ktune implements greedy and noaux_tc top-k");
    }
  }
  read_deepseek_rope(j, where, c);
  c.validate(where);
  return c;
}

}  // namespace

ModelConfig read_hf_config(const std::string& dir) {
  const fs::path path = fs::path(dir) / "config.json";
  if (!fs::exists(path)) throw Error(dir, "no config.json in the folder", kCheckpointFix);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path.string(), "cannot open the file", kCheckpointFix);
  std::ostringstream text;
  text << in.rdbuf();
  return parse_hf_config(text.str(), path.string());
}

ModelConfig parse_hf_config(const std::string& json_text, const std::string& name) {
  const std::string& where = name;
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    throw Error(where, std::string("invalid JSON: ") + e.what(), "repair or re-download the file");
  }
  if (!j.is_object()) throw Error(where, "the file is not a JSON object", kCheckpointFix);

  const std::string model_type = get_string_or(j, "model_type", "", where);
  if (model_type == "deepseek_v3" || model_type == "deepseek_v2") {
    return parse_deepseek_config(j, model_type, where);
  }
  if (model_type != "qwen3_moe") {
    throw Error(
        where, "model_type '" + model_type + "' is not supported",
        "ktune supports qwen3_moe (Qwen3-30B-A3B, Qwen3-235B-A22B), deepseek_v3 (DeepSeek-V3, "
        "R1) and deepseek_v2 (DeepSeek-V2-Lite) checkpoints");
  }
  const int64_t step = get_int_or(j, "decoder_sparse_step", 1, where);
  if (step != 1) {
    throw Error(where,
                "decoder_sparse_step is " + std::to_string(step) +
                    " (dense MLP layers between MoE layers)",
                "ktune supports only checkpoints where every layer is a MoE layer (1)");
  }
  if (auto it = j.find("mlp_only_layers"); it != j.end() && !it->is_null()) {
    if (!it->is_array() || !it->empty()) {
      throw Error(where, "mlp_only_layers is " + it->dump() + " (dense MLP layers)",
                  "ktune supports only checkpoints where every layer is a MoE layer ([])");
    }
  }
  if (get_bool_or(j, "attention_bias", false, where)) {
    throw Error(where, "attention_bias is true", "ktune's qwen3moe has no attention biases");
  }

  ModelConfig c;
  c.arch = "qwen3moe";
  c.name = fs::path(name).parent_path().filename().string();  // the checkpoint folder's name
  c.hidden = get_int(j, "hidden_size", where);
  c.n_layers = get_int(j, "num_hidden_layers", where);
  c.n_heads = get_int(j, "num_attention_heads", where);
  c.n_kv_heads = get_int_or(j, "num_key_value_heads", c.n_heads, where);
  c.head_dim = get_int_or(j, "head_dim", c.n_heads > 0 ? c.hidden / c.n_heads : 0, where);
  // transformers 4 spells it num_experts, 5 num_local_experts (some configs carry both).
  if (j.contains("num_experts") && !j["num_experts"].is_null()) {
    c.n_experts = get_int(j, "num_experts", where);
  } else if (j.contains("num_local_experts")) {
    c.n_experts = get_int(j, "num_local_experts", where);
  } else {
    throw Error(where, "neither num_experts nor num_local_experts is set",
                "a qwen3_moe config.json sets the expert count");
  }
  c.n_experts_used = get_int(j, "num_experts_per_tok", where);
  c.expert_ffn = get_int(j, "moe_intermediate_size", where);
  c.dense_ffn = get_int_or(j, "intermediate_size", 0, where);
  c.vocab = get_int(j, "vocab_size", where);
  c.context_length = get_int_or(j, "max_position_embeddings", 32768, where);
  c.rms_eps = static_cast<float>(get_float_or(j, "rms_norm_eps", 1e-6, where));
  // transformers 5 moved rope_theta into rope_parameters; the Qwen3MoeConfig default is 1e4.
  double theta = get_float_or(j, "rope_theta", 0.0, where);
  if (theta == 0.0) {
    if (auto rp = j.find("rope_parameters"); rp != j.end() && rp->is_object()) {
      theta = get_float_or(*rp, "rope_theta", 0.0, where);
      const std::string type = get_string_or(*rp, "rope_type", "default", where);
      if (type != "default") {
        throw Error(where, "rope_parameters.rope_type is '" + type + "'",
                    "ktune implements the default RoPE only (no scaling)");
      }
    }
  }
  if (auto rs = j.find("rope_scaling"); rs != j.end() && !rs->is_null()) {
    throw Error(where, "rope_scaling is set (" + rs->dump() + ")",
                "ktune implements the default RoPE only; remove rope_scaling");
  }
  c.rope_theta = static_cast<float>(theta == 0.0 ? 10000.0 : theta);
  // transformers' default is false; Qwen3 MoE checkpoints set true.
  c.norm_topk_prob = get_bool_or(j, "norm_topk_prob", false, where);
  c.validate(where);
  return c;
}

ModelWeights load_hf_checkpoint(const std::string& dir) {
  const Checkpoint ck(dir);
  ModelWeights w;
  w.cfg = ck.config();
  w.source = dir;
  w.quant = QuantType::F32;
  const std::vector<TensorSpec> specs = model_tensor_specs(w.cfg);
  const std::vector<TensorView*> slots = w.tensor_slots();
  for (size_t i = 0; i < specs.size(); ++i) {
    const TensorSpec& s = specs[i];
    if (s.base == "output" && ck.tied()) continue;  // shares token_embd below
    auto data = std::make_shared<std::vector<float>>(ck.build(s));
    TensorView& v = *slots[i];
    v.name = s.name;
    v.type = QuantType::F32;
    v.ne = s.ne;
    v.data = reinterpret_cast<const uint8_t*>(data->data());
    w.storage.push_back(std::move(data));
  }
  if (ck.tied()) w.output = w.tok_embd;
  return w;
}

void convert_hf_to_gguf(const std::string& dir, const std::string& out_path, QuantType quant,
                        const ProgressFn& progress) {
  if (!is_supported_quant(static_cast<uint32_t>(quant))) {
    throw_usage("--quant", "unsupported type", "use f32, f16, bf16, q8_0 or q4_0");
  }
  const Checkpoint ck(dir);
  const ModelConfig& c = ck.config();
  gguf::Writer w;
  set_gguf_model_metadata(w, c, quant);
  std::vector<TensorSpec> specs;
  for (const TensorSpec& s : model_tensor_specs(c)) {
    if (s.base == "output" && ck.tied()) continue;  // llama.cpp omits a tied head as well
    const QuantType t = storage_type(s, quant);
    if (s.ne[0] % block_elems(t) != 0) {
      throw Error(dir,
                  "tensor " + s.name + " has rows of " + std::to_string(s.ne[0]) +
                      " values, not a multiple of " + std::to_string(block_elems(t)) +
                      ", so it cannot be stored as " + quant_name(t),
                  "convert with --quant f16, bf16 or f32");
    }
    w.add_tensor(s.name, std::vector<int64_t>(s.ne.begin(), s.ne.begin() + s.n_dims), t);
    specs.push_back(s);
  }
  w.write(
      out_path,
      [&](size_t index, const gguf::TensorInfo&, gguf::ByteSink& out) {
        // One tensor in memory at a time (F32), written in chunks as it is converted.
        const TensorSpec& s = specs[index];
        const QuantType t = storage_type(s, quant);
        const std::vector<float> data = ck.build(s);
        const int64_t n = s.ne[0];
        const int64_t rows = s.ne[1] * s.ne[2];
        const int64_t stride = row_bytes(t, n);
        const int64_t per_chunk = std::max<int64_t>(1, (int64_t{1} << 20) / stride);
        std::vector<uint8_t> buf;
        for (int64_t r0 = 0; r0 < rows; r0 += per_chunk) {
          const int64_t r1 = std::min(rows, r0 + per_chunk);
          buf.resize(static_cast<size_t>((r1 - r0) * stride));
          for (int64_t r = r0; r < r1; ++r) {
            quantize_row(t, data.data() + r * n, buf.data() + (r - r0) * stride, n);
          }
          out.write(buf.data(), buf.size());
        }
      },
      progress);
}

}  // namespace ktune
