// The tokenizer of a --model spec: a GGUF's own vocabulary (tokenizer.ggml.*), or ktune's
// synthetic vocabulary for models that carry none (synth: presets, gen-model files). Nothing
// but metadata is read.
#pragma once

#include <string>

#include "ktune/engine/tokenizer.h"

namespace ktune::cli {

struct ModelTokenizer {
  Tokenizer tokenizer;
  bool synthetic = false;  // ktune's synthetic vocabulary (the model has none of its own)
  std::string source;      // "GGUF metadata (qwen2)" / "synthetic vocabulary (...)"
};

// Throws ktune::Error: a Hugging Face folder (ktune reads tokenizers from GGUF only), malformed
// tokenizer metadata (naming the key), or a vocabulary larger than the model's embedding table.
ModelTokenizer load_model_tokenizer(const std::string& spec);

}  // namespace ktune::cli
