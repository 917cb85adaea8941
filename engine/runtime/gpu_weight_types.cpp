// The GPU engine's tensor type rules (ktune/engine/gpu_weight_types.h).
#include "ktune/engine/gpu_weight_types.h"

#include <string>

#include "ktune/engine/error.h"

namespace ktune {

bool gpu_matrix_type_supported(QuantType t) {
  switch (t) {
    case QuantType::Q4_0:
    case QuantType::Q8_0:
    case QuantType::Q4_K:
    case QuantType::Q5_K:
    case QuantType::Q6_K:
    case QuantType::BF16:
    case QuantType::F32:
      return true;
    default:
      return false;
  }
}

bool gpu_embedding_type_supported(QuantType t) {
  return gpu_matrix_type_supported(t) || t == QuantType::F16;
}

const char* gpu_matrix_type_list() { return "Q4_0, Q8_0, Q4_K, Q5_K, Q6_K, BF16 or F32"; }

namespace {

std::string name_of(const TensorView& t, const std::string& fallback) {
  return t.name.empty() ? fallback : t.name;
}

[[noreturn]] void refuse(const TensorView& t, const std::string& fallback,
                         const std::string& what) {
  throw Error(name_of(t, fallback),
              std::string("type ") + ggml_type_name(static_cast<uint32_t>(t.type)) +
                  " not supported by the GPU engine",
              what);
}

void check_matrix(const TensorView& t, const std::string& fallback) {
  if (gpu_matrix_type_supported(t.type)) return;
  refuse(t, fallback,
         std::string("use ") + gpu_matrix_type_list() +
             " matrices (e.g. `ktune quantize IN.gguf OUT.gguf --mixed q4_k_m`), or run on the "
             "CPU engine");
}

void check_norm(const TensorView& t, const std::string& fallback) {
  if (t.type == QuantType::F32) return;
  refuse(t, fallback, "norm weights must be F32");
}

}  // namespace

void check_gpu_tensor_types(const ModelWeights& w, int64_t first_layer, int64_t end_layer,
                            bool embedding, bool head) {
  if (embedding && !gpu_embedding_type_supported(w.tok_embd.type)) {
    refuse(w.tok_embd, "token_embd",
           std::string("use an F16 or ") + gpu_matrix_type_list() +
               " embedding table, or run on the CPU engine");
  }
  if (head) {
    check_norm(w.output_norm, "output_norm");
    // Tied embeddings: no output tensor (by data, or by name for a shape without data).
    const bool own_head = w.output.data != nullptr || !w.output.name.empty();
    check_matrix(own_head ? w.output : w.tok_embd, "output");
  }
  for (int64_t l = first_layer; l < end_layer && l < static_cast<int64_t>(w.layers.size()); ++l) {
    const LayerWeights& lw = w.layers[static_cast<size_t>(l)];
    const std::string blk = "blk." + std::to_string(l) + ".";
    check_norm(lw.attn_norm, blk + "attn_norm");
    check_norm(lw.q_norm, blk + "attn_q_norm");
    check_norm(lw.k_norm, blk + "attn_k_norm");
    check_norm(lw.ffn_norm, blk + "ffn_norm");
    check_matrix(lw.wq, blk + "attn_q");
    check_matrix(lw.wk, blk + "attn_k");
    check_matrix(lw.wv, blk + "attn_v");
    check_matrix(lw.wo, blk + "attn_output");
    check_matrix(lw.router, blk + "ffn_gate_inp");
    check_matrix(lw.gate_exps, blk + "ffn_gate_exps");
    check_matrix(lw.up_exps, blk + "ffn_up_exps");
    check_matrix(lw.down_exps, blk + "ffn_down_exps");
    if (lw.gate_exps.type != lw.up_exps.type) {
      throw Error(name_of(lw.up_exps, blk + "ffn_up_exps"),
                  std::string("type ") + quant_name(lw.up_exps.type) + " differs from " +
                      name_of(lw.gate_exps, blk + "ffn_gate_exps") + "'s " +
                      quant_name(lw.gate_exps.type) +
                      "; the GPU engine computes a layer's gate and up experts together",
                  "re-quantize the model so both have one type (`ktune quantize IN.gguf OUT.gguf "
                  "--mixed q4_k_m`), or run on the CPU engine");
    }
  }
}

}  // namespace ktune
