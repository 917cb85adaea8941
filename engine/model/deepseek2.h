// The deepseek2 architecture's model layer (internal to the engine): tensor layout with
// llama.cpp's names and ggml shapes, checks and counts, GGUF metadata in both directions. The
// public entry points (model_tensor_specs, ModelWeights::tensor_slots, load_gguf_model,
// set_gguf_model_metadata, ModelConfig::validate, ...) dispatch here for arch "deepseek2".
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ktune/engine/gguf.h"
#include "ktune/engine/model.h"

namespace ktune::deepseek2 {

// Every tensor, in file order (see model_tensor_specs). Per layer: attn_norm, the query
// projections (attn_q_a, attn_q_a_norm, attn_q_b, or attn_q), attn_kv_a_mqa, attn_kv_a_norm,
// attn_k_b + attn_v_b (or attn_kv_b), attn_output, ffn_norm, then either the dense FFN
// (ffn_gate, ffn_up, ffn_down) or the MoE (ffn_gate_inp, exp_probs_b, ffn_{gate,up,down}_exps,
// ffn_{gate,up,down}_shexp).
std::vector<TensorSpec> tensor_specs(const ModelConfig& c);
// The fields of w that tensor_specs(w.cfg) describe, in the same order (resizes w.layers).
std::vector<TensorView*> tensor_slots(ModelWeights& w);
// The same, read-only, for the layers w holds.
std::vector<const TensorView*> tensor_list(const ModelWeights& w);

void validate(const ModelConfig& c, const std::string& where);
int64_t params_total(const ModelConfig& c);
int64_t params_active_per_token(const ModelConfig& c);
// One embedding row, every non-expert tensor (shared experts and dense layers included), the
// top-k experts of each MoE layer and the output head.
int64_t bytes_per_token_decode(const ModelWeights& w);

// GGUF metadata as llama.cpp's converter writes it (deepseek2.*).
void set_gguf_metadata(gguf::Writer& w, const ModelConfig& c, QuantType quant);
// Reads a deepseek2 GGUF (the file is already open); the model keeps `file` alive.
ModelWeights load_gguf(const std::shared_ptr<gguf::File>& file, const std::string& path);

}  // namespace ktune::deepseek2
