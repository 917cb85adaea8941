// Deterministic random-weight models of a preset's real shape. The statistics that decide speed
// are kept: weights are zero-mean with scales that keep activations bounded through every layer,
// so that, without skew, routing is near-uniform; with --router-skew zipf:S, each layer's expert
// popularity follows a Zipf law of exponent S (a per-layer permutation decides which experts are
// popular). Same preset + quant + seed + skew => the same bytes, in a file or in memory.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "ktune/engine/model.h"

namespace ktune {

struct SynthOptions {
  std::string preset = "tiny";
  QuantType quant = QuantType::Q8_0;  // type of the big matrices; norms stay F32, router F32
  uint64_t seed = 1;
  double zipf_s = 0.0;                // 0 = no skew
};

// Parses "zipf:1.1" (or "none"); throws a usage error naming `where` otherwise.
double parse_router_skew(const std::string& text, const std::string& where);

// Builds the model in memory.
ModelWeights make_synthetic_model(const SynthOptions& opt);

// Writes the same model as a GGUF file, streaming (memory stays small), atomically, with
// standard llama.cpp metadata (tokenizer.ggml.model = "no_vocab", qwen3moe.vocab_size).
using ProgressFn = std::function<void(uint64_t done, uint64_t total)>;
void write_synthetic_gguf(const SynthOptions& opt, const std::string& path,
                          const ProgressFn& progress = {});

// Parses "synth:PRESET[:QUANT]" into options (seed 1, no skew). Throws on a bad spec.
SynthOptions parse_synth_spec(const std::string& spec);

}  // namespace ktune
