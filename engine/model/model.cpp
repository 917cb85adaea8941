// Model tensor layout (llama.cpp names and ggml shapes), byte counts, the model-spec dispatcher and
// the GGUF loader.
#include "ktune/engine/model.h"

#include <cstdint>
#include <filesystem>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "ktune/engine/error.h"
#include "ktune/engine/gguf.h"
#include "ktune/engine/hf_checkpoint.h"
#include "ktune/engine/synthetic.h"
#include "model/deepseek2.h"

namespace ktune {

std::string tensor_name_global(const std::string& base) { return base + ".weight"; }

std::string tensor_name_layer(int64_t layer, const std::string& base) {
  return "blk." + std::to_string(layer) + "." + base + ".weight";
}

std::vector<TensorSpec> model_tensor_specs(const ModelConfig& c) {
  if (c.is_deepseek2()) return deepseek2::tensor_specs(c);
  std::vector<TensorSpec> specs;
  const int64_t q = c.n_heads * c.head_dim;
  const int64_t kv = c.n_kv_heads * c.head_dim;
  auto global = [&](const char* base, std::array<int64_t, 3> ne, int n_dims, TensorRole role) {
    specs.push_back({tensor_name_global(base), ne, n_dims, role, -1, base});
  };
  auto layer = [&](int64_t l, const char* base, std::array<int64_t, 3> ne, int n_dims,
                   TensorRole role) {
    specs.push_back({tensor_name_layer(l, base), ne, n_dims, role, l, base});
  };
  global("token_embd", {c.hidden, c.vocab, 1}, 2, TensorRole::Embedding);
  for (int64_t l = 0; l < c.n_layers; ++l) {
    // The order of LayerWeights' fields; tensor_slots() relies on it.
    layer(l, "attn_norm", {c.hidden, 1, 1}, 1, TensorRole::Norm);
    layer(l, "attn_q", {c.hidden, q, 1}, 2, TensorRole::Matrix);
    layer(l, "attn_k", {c.hidden, kv, 1}, 2, TensorRole::Matrix);
    layer(l, "attn_v", {c.hidden, kv, 1}, 2, TensorRole::Matrix);
    layer(l, "attn_output", {q, c.hidden, 1}, 2, TensorRole::Matrix);
    layer(l, "attn_q_norm", {c.head_dim, 1, 1}, 1, TensorRole::Norm);
    layer(l, "attn_k_norm", {c.head_dim, 1, 1}, 1, TensorRole::Norm);
    layer(l, "ffn_norm", {c.hidden, 1, 1}, 1, TensorRole::Norm);
    layer(l, "ffn_gate_inp", {c.hidden, c.n_experts, 1}, 2, TensorRole::Router);
    layer(l, "ffn_gate_exps", {c.hidden, c.expert_ffn, c.n_experts}, 3, TensorRole::Experts);
    layer(l, "ffn_up_exps", {c.hidden, c.expert_ffn, c.n_experts}, 3, TensorRole::Experts);
    layer(l, "ffn_down_exps", {c.expert_ffn, c.hidden, c.n_experts}, 3, TensorRole::Experts);
  }
  global("output_norm", {c.hidden, 1, 1}, 1, TensorRole::Norm);
  global("output", {c.hidden, c.vocab, 1}, 2, TensorRole::Matrix);
  return specs;
}

std::vector<TensorView*> ModelWeights::tensor_slots() {
  if (cfg.is_deepseek2()) return deepseek2::tensor_slots(*this);
  layers.resize(static_cast<size_t>(cfg.n_layers));
  std::vector<TensorView*> slots;
  slots.push_back(&tok_embd);
  for (LayerWeights& l : layers) {
    for (TensorView* t : {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.q_norm, &l.k_norm,
                          &l.ffn_norm, &l.router, &l.gate_exps, &l.up_exps, &l.down_exps}) {
      slots.push_back(t);
    }
  }
  slots.push_back(&output_norm);
  slots.push_back(&output);
  return slots;
}

std::vector<const TensorView*> ModelWeights::tensor_list() const {
  if (cfg.is_deepseek2()) return deepseek2::tensor_list(*this);
  std::vector<const TensorView*> list;
  list.push_back(&tok_embd);
  for (const LayerWeights& l : layers) {
    for (const TensorView* t : {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.q_norm, &l.k_norm,
                                &l.ffn_norm, &l.router, &l.gate_exps, &l.up_exps, &l.down_exps}) {
      list.push_back(t);
    }
  }
  list.push_back(&output_norm);
  list.push_back(&output);
  return list;
}

int64_t ModelWeights::weight_bytes() const {
  // A tied output head shares token_embd's bytes: count each buffer once.
  std::set<const uint8_t*> seen;
  int64_t total = 0;
  for (const TensorView* t : tensor_list()) {
    if (t->data != nullptr && !seen.insert(t->data).second) continue;
    total += t->nbytes();
  }
  return total;
}

int64_t ModelWeights::bytes_per_token_decode() const {
  // What one decode step streams from memory: one embedding row, every attention and norm
  // weight, the router, the output head, and the gate/up/down matrices of the top-k experts of
  // each layer (which experts varies, how many does not).
  if (cfg.is_deepseek2()) return deepseek2::bytes_per_token_decode(*this);
  int64_t total = tok_embd.row_stride() + output_norm.nbytes() + output.nbytes();
  for (const LayerWeights& l : layers) {
    total += l.attn_norm.nbytes() + l.wq.nbytes() + l.wk.nbytes() + l.wv.nbytes() +
             l.wo.nbytes() + l.q_norm.nbytes() + l.k_norm.nbytes() + l.ffn_norm.nbytes() +
             l.router.nbytes();
    const int64_t per_expert = l.gate_exps.ne[1] * l.gate_exps.row_stride() +
                               l.up_exps.ne[1] * l.up_exps.row_stride() +
                               l.down_exps.ne[1] * l.down_exps.row_stride();
    total += cfg.n_experts_used * per_expert;
  }
  return total;
}

uint32_t llama_file_type(QuantType quant) {
  switch (quant) {  // LLAMA_FTYPE_* values of llama.h
    case QuantType::F32: return 0;
    case QuantType::F16: return 1;
    case QuantType::Q4_0: return 2;
    case QuantType::Q8_0: return 7;
    case QuantType::BF16: return 32;
    case QuantType::Q4_K: return 14;  // Q4_K_S: every matrix Q4_K (Q4_K_M is 15)
    case QuantType::Q5_K: return 16;  // Q5_K_S (Q5_K_M is 17)
    case QuantType::Q6_K: return 18;
    case QuantType::Q8_K: return 0;   // not a weight type
  }
  return 0;
}

void set_gguf_model_metadata(gguf::Writer& w, const ModelConfig& c, QuantType quant) {
  if (c.is_deepseek2()) return deepseek2::set_gguf_metadata(w, c, quant);
  using gguf::Value;
  const std::string a = "qwen3moe.";
  w.set("general.architecture", Value::string("qwen3moe"));
  w.set("general.name", Value::string(c.name));
  w.set("general.file_type", Value::u32(llama_file_type(quant)));
  w.set("general.quantization_version", Value::u32(2));
  w.set(a + "block_count", Value::u32(static_cast<uint32_t>(c.n_layers)));
  w.set(a + "context_length", Value::u32(static_cast<uint32_t>(c.context_length)));
  w.set(a + "embedding_length", Value::u32(static_cast<uint32_t>(c.hidden)));
  w.set(a + "feed_forward_length", Value::u32(static_cast<uint32_t>(c.dense_ffn)));
  w.set(a + "attention.head_count", Value::u32(static_cast<uint32_t>(c.n_heads)));
  w.set(a + "attention.head_count_kv", Value::u32(static_cast<uint32_t>(c.n_kv_heads)));
  w.set(a + "attention.key_length", Value::u32(static_cast<uint32_t>(c.head_dim)));
  w.set(a + "attention.value_length", Value::u32(static_cast<uint32_t>(c.head_dim)));
  w.set(a + "rope.freq_base", Value::f32(c.rope_theta));
  w.set(a + "attention.layer_norm_rms_epsilon", Value::f32(c.rms_eps));
  w.set(a + "expert_count", Value::u32(static_cast<uint32_t>(c.n_experts)));
  w.set(a + "expert_used_count", Value::u32(static_cast<uint32_t>(c.n_experts_used)));
  w.set(a + "expert_feed_forward_length", Value::u32(static_cast<uint32_t>(c.expert_ffn)));
  w.set(a + "expert_weights_norm", Value::boolean(c.norm_topk_prob));
  w.set(a + "vocab_size", Value::u32(static_cast<uint32_t>(c.vocab)));
  // No tokenizer travels with ktune's files; llama.cpp's spelling for "none" keeps them loadable.
  w.set("tokenizer.ggml.model", Value::string("no_vocab"));
}

namespace {

std::string shape_str(const std::vector<int64_t>& ne) {
  std::string s = "[";
  for (size_t i = 0; i < ne.size(); ++i) s += (i ? ", " : "") + std::to_string(ne[i]);
  return s + "]";
}

// ggml writers may or may not keep trailing 1-sized dimensions; compare without them.
std::vector<int64_t> trim_shape(std::vector<int64_t> ne) {
  while (ne.size() > 1 && ne.back() == 1) ne.pop_back();
  return ne;
}

// "Q4_K (ggml type 12)" -> "Q4_K": the short name reads better inside a sentence.
std::string short_type_name(uint32_t id) {
  std::string n = ggml_type_name(id);
  const size_t p = n.find(" (");
  return p == std::string::npos ? n : n.substr(0, p);
}

std::string supported_types() {
  std::string s;
  for (uint32_t id = 0; id < 64; ++id) {
    if (is_supported_quant(id)) s += (s.empty() ? "" : ", ") + short_type_name(id);
  }
  return s;
}

int64_t meta_int(const gguf::File& f, const std::string& key) {
  return static_cast<int64_t>(f.get_uint(key));
}

}  // namespace

ModelWeights load_gguf_model(const std::string& path) {
  // A split model (NAME-00001-of-0000N.gguf ...) loads from its first part.
  auto file = std::make_shared<gguf::File>(gguf::File::open_split(path));
  const gguf::File& f = *file;

  const std::string arch = f.get_string("general.architecture");
  if (arch == "deepseek2") return deepseek2::load_gguf(file, path);
  if (arch != "qwen3moe") {
    throw Error(path, "unknown architecture " + arch, "ktune supports qwen3moe and deepseek2");
  }
  const std::string a = "qwen3moe.";
  ModelConfig c;
  c.arch = arch;
  if (const gguf::Value* n = f.find("general.name"); n && n->type == gguf::ValueType::STRING) {
    c.name = n->s;
  } else {
    c.name = std::filesystem::path(path).stem().string();
  }
  c.n_layers = meta_int(f, a + "block_count");
  c.hidden = meta_int(f, a + "embedding_length");
  c.n_heads = meta_int(f, a + "attention.head_count");
  c.n_kv_heads = meta_int(f, a + "attention.head_count_kv");
  c.head_dim = static_cast<int64_t>(
      f.get_uint_or(a + "attention.key_length",
                    c.n_heads > 0 ? static_cast<uint64_t>(c.hidden / c.n_heads) : 0));
  c.n_experts = meta_int(f, a + "expert_count");
  c.n_experts_used = meta_int(f, a + "expert_used_count");
  c.expert_ffn = meta_int(f, a + "expert_feed_forward_length");
  c.dense_ffn = static_cast<int64_t>(f.get_uint_or(a + "feed_forward_length", 0));
  c.context_length = meta_int(f, a + "context_length");
  c.rope_theta = static_cast<float>(f.get_float_or(a + "rope.freq_base", 1e6));
  c.rms_eps = static_cast<float>(f.get_float(a + "attention.layer_norm_rms_epsilon"));
  if (f.find(a + "expert_weights_norm")) c.norm_topk_prob = f.get_bool(a + "expert_weights_norm");

  // Vocabulary: the explicit key, else the tokenizer's token list, else the embedding's shape.
  const gguf::TensorInfo* embd = f.find_tensor("token_embd.weight");
  if (f.find(a + "vocab_size")) {
    c.vocab = meta_int(f, a + "vocab_size");
  } else if (const gguf::Value* toks = f.find("tokenizer.ggml.tokens");
             toks && toks->type == gguf::ValueType::ARRAY) {
    c.vocab = static_cast<int64_t>(toks->array.size());
  } else if (embd && embd->ne.size() >= 2) {
    c.vocab = embd->ne[1];
  }
  c.validate(path);
  // Each layer has 12 tensors besides the 2 or 3 global ones: a block_count the file cannot hold
  // is refused before the loader builds the list of expected tensors (which is as long as that).
  const int64_t n_tensors = static_cast<int64_t>(f.tensors().size());
  if (n_tensors < 2 || c.n_layers > (n_tensors - 2) / 12) {
    throw Error(path,
                "block_count " + std::to_string(c.n_layers) + " needs at least " +
                    (c.n_layers <= (INT64_MAX - 2) / 12 ? std::to_string(12 * c.n_layers + 2)
                                                        : std::string("more")) +
                    " tensors, the file holds " + std::to_string(n_tensors),
                "the file does not match its own metadata; re-convert the model");
  }

  ModelWeights w;
  w.cfg = c;
  w.source = path;
  const std::vector<TensorSpec> specs = model_tensor_specs(c);
  const std::vector<TensorView*> slots = w.tensor_slots();
  const std::string fix_bad = "the file does not match its own metadata; re-convert the model";
  for (size_t i = 0; i < specs.size(); ++i) {
    const TensorSpec& s = specs[i];
    const gguf::TensorInfo* t = f.find_tensor(s.name);
    if (t == nullptr) {
      if (s.base == "output") continue;  // tied to token_embd below
      throw Error(path, "tensor " + s.name + " is missing",
                  "the file is incomplete or not a qwen3moe model; re-download or re-convert it");
    }
    const std::vector<int64_t> expected(s.ne.begin(), s.ne.begin() + s.n_dims);
    if (trim_shape(t->ne) != trim_shape(expected)) {
      throw Error(path,
                  "tensor " + s.name + " has shape " + shape_str(t->ne) + ", expected " +
                      shape_str(expected) + " (ggml order, ne[0] first)",
                  fix_bad);
    }
    if (!is_supported_quant(t->type)) {
      throw Error(path,
                  "tensor " + s.name + " has type " + short_type_name(t->type) +
                      ", which ktune does not support yet",
                  "supported: " + supported_types());
    }
    if (s.role == TensorRole::Norm && t->quant() != QuantType::F32) {
      throw Error(path,
                  "tensor " + s.name + " has type " + short_type_name(t->type) +
                      "; norm weights must be F32",
                  "re-convert the model keeping norm weights in F32, as llama.cpp does");
    }
    TensorView& v = *slots[i];
    v.name = s.name;
    v.type = t->quant();
    v.ne = s.ne;
    v.data = t->data;
  }
  if (w.output.data == nullptr) {  // tied embeddings: the head reads token_embd's rows
    w.output = w.tok_embd;
  }
  w.quant = w.layers.empty() ? w.tok_embd.type : w.layers[0].up_exps.type;
  w.storage.push_back(file);  // keeps the mapping that every TensorView points into alive
  return w;
}

ModelWeights load_model(const std::string& spec) {
  if (spec.rfind("synth:", 0) == 0) {
    ModelWeights w = make_synthetic_model(parse_synth_spec(spec));
    w.source = spec;
    return w;
  }
  std::error_code ec;
  const std::filesystem::path p(spec);
  if (std::filesystem::is_directory(p, ec)) {
    ModelWeights w = load_hf_checkpoint(spec);
    w.source = spec;
    return w;
  }
  if (!std::filesystem::exists(p, ec)) {
    std::string presets;
    for (const std::string& n : preset_names()) presets += (presets.empty() ? "" : ", ") + n;
    throw Error(spec, "no such file or directory",
                "pass a .gguf file, a Hugging Face checkpoint folder, or synth:PRESET[:QUANT] "
                "(presets: " + presets + ")");
  }
  return load_gguf_model(spec);
}

}  // namespace ktune
