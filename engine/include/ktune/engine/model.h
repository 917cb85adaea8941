// Model shapes, compiled-in presets, and the weights the engine computes with.
//
// A model comes from one of three places, all named by one string ("model spec"):
//   path/to/model.gguf          GGUF file (mmap, llama.cpp tensor names)
//   synth:PRESET[:QUANT]        synthetic random-weight model built in memory (no file)
//   path/to/hf_checkpoint_dir/  config.json + *.safetensors (Hugging Face layout)
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ktune/engine/quant.h"

namespace ktune {

namespace gguf {
class Writer;
}

// How a deepseek2 router turns its logits into expert scores (GGUF expert_gating_func values).
enum class ExpertGating { Softmax = 1, Sigmoid = 2 };
// RoPE frequency scaling (GGUF rope.scaling.type; Hugging Face rope_type).
enum class RopeScaling { None, Yarn };

// The shape and hyper-parameters of a model. Fields below the deepseek2 line are read only for
// arch "deepseek2" (docs/models.md, "deepseek2"); qwen3moe ignores them.
struct ModelConfig {
  std::string arch = "qwen3moe";
  std::string name;             // preset or file name, for reports
  int64_t n_layers = 0;
  int64_t hidden = 0;           // embedding_length
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;         // attention.key_length (= value_length)
  int64_t n_experts = 0;
  int64_t n_experts_used = 0;   // top-k
  int64_t expert_ffn = 0;       // expert_feed_forward_length
  int64_t dense_ffn = 0;        // feed_forward_length (metadata only for qwen3moe)
  int64_t vocab = 0;
  int64_t context_length = 0;
  float rope_theta = 1e6f;
  float rms_eps = 1e-6f;
  bool norm_topk_prob = true;   // Qwen3: renormalize the top-k router weights to sum to 1

  // ---- deepseek2 (DeepSeek-V2, V2-Lite, V3, R1) ----
  // Multi-head latent attention: head_dim is the query/key head (qk_nope + rope_dim, GGUF
  // key_length_mla); keys and values are decompressed per head from a cached latent of
  // kv_lora_rank values plus one shared roped key of rope_dim values. n_kv_heads is 1 (the
  // cache is one "head" shared by all query heads, as llama.cpp writes it).
  int64_t q_lora_rank = 0;       // attention.q_lora_rank; 0: queries straight from attn_q (V2-Lite)
  int64_t kv_lora_rank = 0;      // attention.kv_lora_rank
  int64_t rope_dim = 0;          // rope.dimension_count: the roped tail of each query/key head
  int64_t v_head_dim = 0;        // attention.value_length_mla
  int64_t n_dense_lead = 0;      // leading_dense_block_count: first layers with a dense FFN
  int64_t n_shared_experts = 0;  // expert_shared_count: one always-on SwiGLU of that many experts
  int64_t n_expert_groups = 1;   // expert_group_count: > 1 limits the top-k to the best groups
  int64_t n_groups_used = 1;     // expert_group_used_count
  ExpertGating gating = ExpertGating::Softmax;  // expert_gating_func (V2 softmax, V3 sigmoid)
  bool expert_score_bias = false;  // exp_probs_b present: added to scores for selection only (V3)
  float expert_weights_scale = 1.0f;  // expert_weights_scale (routed_scaling_factor)
  // attn_k_b + attn_v_b (llama.cpp's converter since 2025) or one attn_kv_b (older GGUFs and
  // Hugging Face checkpoints): the same numbers, two layouts.
  bool split_kv_b = true;
  // YaRN (Hugging Face semantics; GGUF rope.scaling.*): inv_freq blends interpolated and
  // extrapolated frequencies between the beta_fast/beta_slow correction dims; cos/sin are scaled
  // by mscale(factor, yarn_mscale) / mscale(factor, yarn_mscale_all_dim) when both are set
  // (non-zero), else by mscale(factor, 1); the attention softmax scale is multiplied by
  // mscale(factor, yarn_mscale_all_dim)^2 when that is set. mscale(s, m) = 1 + 0.1 m ln s (s > 1).
  RopeScaling rope_scaling = RopeScaling::None;
  float rope_factor = 1.0f;          // rope.scaling.factor
  int64_t rope_orig_context = 0;     // rope.scaling.original_context_length
  float yarn_beta_fast = 32.0f;      // rope.scaling.yarn_beta_fast
  float yarn_beta_slow = 1.0f;       // rope.scaling.yarn_beta_slow
  float yarn_mscale = 0.0f;          // 0: not set
  float yarn_mscale_all_dim = 0.0f;  // 0: not set; GGUF rope.scaling.yarn_log_multiplier / 0.1

  bool is_deepseek2() const { return arch == "deepseek2"; }
  // deepseek2's leading layers have a dense FFN (dense_ffn wide) instead of experts.
  bool is_dense_layer(int64_t layer) const { return is_deepseek2() && layer < n_dense_lead; }
  int64_t qk_nope_dim() const { return head_dim - rope_dim; }
  int64_t shared_ffn() const { return n_shared_experts * expert_ffn; }
  // Values the KV cache holds per position and layer: K and V of every kv head, or for
  // deepseek2 the latent plus the roped key (kv_lora_rank + rope_dim).
  int64_t kv_cache_values() const;

  // Throws ktune::Error naming `where` when a dimension is missing, non-positive or inconsistent.
  void validate(const std::string& where) const;
  // Parameter counts, for reports and the memory-bound limit.
  int64_t params_total() const;
  int64_t params_active_per_token() const;
};

// Presets compiled into the binary: "tiny", "qwen3-30b-a3b", "qwen3-235b-a22b", "tiny-deepseek",
// "deepseek-v2-lite", "deepseek-v3".
const ModelConfig* find_preset(const std::string& name);
std::vector<std::string> preset_names();

// A read-only view of one weight tensor, in ggml order (ne[0] = contiguous row length).
struct TensorView {
  std::string name;
  QuantType type = QuantType::F32;
  std::array<int64_t, 3> ne{1, 1, 1};
  const uint8_t* data = nullptr;

  int64_t row_len() const { return ne[0]; }
  int64_t n_rows() const { return ne[1] * ne[2]; }
  int64_t row_stride() const { return row_bytes(type, ne[0]); }  // bytes per row
  int64_t nbytes() const { return row_stride() * n_rows(); }
  const uint8_t* row(int64_t r) const { return data + r * row_stride(); }
  // For 3-D expert tensors: the matrix of expert e (ne[1] rows of ne[0]).
  const uint8_t* matrix(int64_t e) const { return data + e * ne[1] * row_stride(); }
};

struct LayerWeights {
  TensorView attn_norm;   // [hidden] F32
  TensorView wq;          // [hidden, n_heads*head_dim]
  TensorView wk;          // [hidden, n_kv_heads*head_dim]
  TensorView wv;          // [hidden, n_kv_heads*head_dim]
  TensorView wo;          // [n_heads*head_dim, hidden]
  TensorView q_norm;      // [head_dim] F32
  TensorView k_norm;      // [head_dim] F32
  TensorView ffn_norm;    // [hidden] F32
  TensorView router;      // ffn_gate_inp [hidden, n_experts] (F32 in llama.cpp files)
  TensorView gate_exps;   // [hidden, expert_ffn, n_experts]
  TensorView up_exps;     // [hidden, expert_ffn, n_experts]
  TensorView down_exps;   // [expert_ffn, hidden, n_experts]

  // deepseek2 only (empty views otherwise). wq is attn_q when q_lora_rank is 0; wo is
  // attn_output [n_heads*v_head_dim, hidden]; router and *_exps are empty in dense layers.
  TensorView wq_a;         // attn_q_a [hidden, q_lora_rank]
  TensorView q_a_norm;     // attn_q_a_norm [q_lora_rank] F32
  TensorView wq_b;         // attn_q_b [q_lora_rank, n_heads*head_dim]
  TensorView wkv_a;        // attn_kv_a_mqa [hidden, kv_lora_rank + rope_dim]
  TensorView kv_a_norm;    // attn_kv_a_norm [kv_lora_rank] F32
  TensorView wkv_b;        // attn_kv_b [kv_lora_rank, n_heads*(qk_nope + v_head_dim)] (!split_kv_b)
  TensorView wk_b;         // attn_k_b [qk_nope, kv_lora_rank, n_heads] (split_kv_b)
  TensorView wv_b;         // attn_v_b [kv_lora_rank, v_head_dim, n_heads] (split_kv_b)
  TensorView ffn_gate;     // dense layers: [hidden, dense_ffn]
  TensorView ffn_up;       // [hidden, dense_ffn]
  TensorView ffn_down;     // [dense_ffn, hidden]
  TensorView gate_shexp;   // MoE layers, shared experts: [hidden, n_shared*expert_ffn]
  TensorView up_shexp;     // [hidden, n_shared*expert_ffn]
  TensorView down_shexp;   // [n_shared*expert_ffn, hidden]
  TensorView exp_probs_b;  // [n_experts] F32, the selection bias (blk.N.exp_probs_b.bias)
};

struct ModelWeights {
  ModelConfig cfg;
  std::string source;       // the model spec it was loaded from
  QuantType quant = QuantType::F32;  // type of the big matrices (experts), for reports
  TensorView tok_embd;      // [hidden, vocab]
  TensorView output_norm;   // [hidden] F32
  TensorView output;        // [hidden, vocab]
  std::vector<LayerWeights> layers;
  std::vector<std::shared_ptr<void>> storage;  // keeps mmaps / buffers alive

  int64_t weight_bytes() const;           // all tensors
  int64_t bytes_per_token_decode() const; // bytes a decode step reads (active experts only)

  // Resizes `layers` to cfg.n_layers and returns the field of every tensor of
  // model_tensor_specs(cfg), in that order, so loaders fill a model by walking both lists.
  std::vector<TensorView*> tensor_slots();
  std::vector<const TensorView*> tensor_list() const;  // same order, read-only
};

// What a tensor is for; decides its storage type (norms and the router stay F32) and, in
// synthetic models, its statistics.
enum class TensorRole { Embedding, Norm, Matrix, Router, Experts, Bias };

// One tensor of a model: llama.cpp name, ggml shape (ne[0] = row length; 1-D tensors
// have n_dims 1), role, and the layer it belongs to (-1 for global tensors).
struct TensorSpec {
  std::string name;
  std::array<int64_t, 3> ne{1, 1, 1};
  int n_dims = 1;
  TensorRole role = TensorRole::Matrix;
  int64_t layer = -1;
  std::string base;  // "attn_q", "token_embd", ...
};

// Every tensor of a model of `cfg`, in llama.cpp file order: token_embd, blk.0.* ... blk.N-1.*,
// output_norm, output. deepseek2 layers list their own tensors (dense or MoE, per cfg).
std::vector<TensorSpec> model_tensor_specs(const ModelConfig& cfg);

// llama.cpp's tensor names for qwen3moe ("blk.3.ffn_gate_exps.weight", ...).
std::string tensor_name_global(const std::string& base);       // "token_embd" -> "token_embd.weight"
std::string tensor_name_layer(int64_t layer, const std::string& base);  // "blk.L.<base>.weight"

// Loads any model spec (see the top of this file). Throws ktune::Error on bad input.
ModelWeights load_model(const std::string& spec);
ModelWeights load_gguf_model(const std::string& path);

// llama.cpp's general.file_type (LLAMA_FTYPE) for a model whose matrices are `quant`.
uint32_t llama_file_type(QuantType quant);
// Sets the metadata llama.cpp writes for a model of `cfg` (general.*, qwen3moe.* or deepseek2.*,
// tokenizer.ggml.model = "no_vocab"), so GGUF writers of ktune agree on it.
void set_gguf_model_metadata(gguf::Writer& w, const ModelConfig& cfg, QuantType quant);

}  // namespace ktune
