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

  // Throws ktune::Error naming `where` when a dimension is missing, non-positive or inconsistent.
  void validate(const std::string& where) const;
  // Parameter counts, for reports and the memory-bound limit.
  int64_t params_total() const;
  int64_t params_active_per_token() const;
};

// Presets compiled into the binary: "tiny", "qwen3-30b-a3b", "qwen3-235b-a22b".
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
enum class TensorRole { Embedding, Norm, Matrix, Router, Experts };

// One tensor of a qwen3moe model: llama.cpp name, ggml shape (ne[0] = row length; 1-D tensors
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
// output_norm, output.
std::vector<TensorSpec> model_tensor_specs(const ModelConfig& cfg);

// llama.cpp's tensor names for qwen3moe ("blk.3.ffn_gate_exps.weight", ...).
std::string tensor_name_global(const std::string& base);       // "token_embd" -> "token_embd.weight"
std::string tensor_name_layer(int64_t layer, const std::string& base);  // "blk.L.<base>.weight"

// Loads any model spec (see the top of this file). Throws ktune::Error on bad input.
ModelWeights load_model(const std::string& spec);
ModelWeights load_gguf_model(const std::string& path);

// llama.cpp's general.file_type (LLAMA_FTYPE) for a model whose matrices are `quant`.
uint32_t llama_file_type(QuantType quant);
// Sets the metadata llama.cpp writes for a qwen3moe model of `cfg` (general.*, qwen3moe.*,
// tokenizer.ggml.model = "no_vocab"), so GGUF writers of ktune agree on it.
void set_gguf_model_metadata(gguf::Writer& w, const ModelConfig& cfg, QuantType quant);

}  // namespace ktune
