// Re-quantizing a GGUF model (`ktune quantize`): every matrix to one type, or llama.cpp's
// "_M" mixes, which give the tensors that hurt most when coarse (the output head, attn_v and
// ffn_down of some layers) more bits. The bytes of each tensor are those of ggml's reference
// quantizer for its type (quant.h), so a tensor quantized by ktune and by llama-quantize
// (without an importance matrix) from the same F32 values is identical.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ktune/engine/quant.h"

namespace ktune {

enum class QuantMix { None, Q4_K_M, Q5_K_M };

// "q4_k_m" / "q5_k_m" (case-insensitive); nullopt otherwise.
std::optional<QuantMix> parse_quant_mix(std::string_view name);
const char* quant_mix_name(QuantMix mix);  // "Q4_K_M", "Q5_K_M", "none"
QuantType quant_mix_base(QuantMix mix);      // Q4_K, Q5_K (Q8_0 for None: unused)

// What the choice of a tensor's type depends on.
struct TensorTypeQuery {
  std::string name;          // llama.cpp name, "blk.7.ffn_down_exps.weight"
  std::vector<int64_t> ne;   // ggml shape
  QuantType source = QuantType::F32;
  int64_t n_layers = 0;      // <arch>.block_count
  int64_t n_experts = 0;     // <arch>.expert_count (0 for dense models)
  bool tied_embeddings = false;  // no output.weight: token_embd is also the head
};

// The type a tensor gets: 1-D tensors (norms, biases) and the MoE router (ffn_gate_inp) keep
// their type; everything else gets `base`, or with a mix, llama.cpp's choice for that mix (see
// docs/models.md). A type whose block does not divide the row length falls back to Q8_0 (rows
// of 32s) or F16.
QuantType choose_quant_type(const TensorTypeQuery& q, QuantType base, QuantMix mix);

struct QuantizeOptions {
  QuantType type = QuantType::Q4_K;  // the base type (the mix's own base when mix is set)
  QuantMix mix = QuantMix::None;
  int threads = 0;  // 0: all cores
};

struct QuantizeReport {
  int64_t tensors = 0;
  int64_t requantized = 0;  // tensors that were already quantized and got another type
  uint64_t bytes_in = 0, bytes_out = 0;
  std::map<std::string, int64_t> tensors_by_type;  // output type name -> count
};

using QuantizeProgress = std::function<void(uint64_t bytes_done, uint64_t bytes_total)>;

// Reads the GGUF `in` (a split model from its first part), writes `out` as one GGUF file
// (atomically: a temp file renamed into place) with the same metadata (split keys dropped,
// general.file_type set) and every tensor in its chosen type. Throws ktune::Error on bad input,
// naming the tensor for one ktune cannot read (IQ2_XXS, say).
QuantizeReport quantize_gguf(const std::string& in, const std::string& out,
                             const QuantizeOptions& opt, const QuantizeProgress& progress = {});

}  // namespace ktune
