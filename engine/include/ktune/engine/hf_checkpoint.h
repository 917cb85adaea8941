// Hugging Face qwen3_moe checkpoints: a folder with config.json and *.safetensors (one file or
// shards, with or without model.safetensors.index.json). Both transformers 4 spellings (one
// tensor per expert) and transformers 5 spellings (fused expert tensors, rope_parameters) load.
#pragma once

#include <string>

#include "ktune/engine/model.h"
#include "ktune/engine/quant.h"
#include "ktune/engine/synthetic.h"  // ProgressFn

namespace ktune {

// Reads config.json into a ModelConfig (name = folder name). Throws ktune::Error naming the file
// and key on a missing or unsupported setting.
ModelConfig read_hf_config(const std::string& dir);
// The same from the text of a config.json; `name` is the file's path, used in messages, and its
// folder's name becomes the model's name (read_hf_config passes <dir>/config.json).
ModelConfig parse_hf_config(const std::string& json_text, const std::string& name);

// Loads the checkpoint into memory as F32 tensors in ggml layout (owned by ModelWeights::storage).
// Every tensor is converted, so memory is 4 bytes per parameter: meant for small checkpoints and
// correctness tests; convert large ones to GGUF with convert_hf_to_gguf.
ModelWeights load_hf_checkpoint(const std::string& dir);

// Writes the checkpoint as a GGUF file with llama.cpp's names and metadata, one tensor in memory
// at a time; matrices in `quant`, norms and the router F32. Atomic.
void convert_hf_to_gguf(const std::string& dir, const std::string& out_path, QuantType quant,
                        const ProgressFn& progress = {});

}  // namespace ktune
