// What `ktune search` writes: the native placement YAML with a comment header (the prediction,
// the workload, the command to run it), and exports for engines that place whole layers'
// expert tensors: ktransformers optimize rules (legacy engine, qwen3moe) and llama.cpp's
// --override-tensor (-ot) list. Each export has a reader for the subset it writes, so tests can
// check that what was written means what the plan says.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "search/search.h"

namespace ktune::search {

// Comment lines (each starting "# ") describing a candidate for the YAML header.
std::vector<std::string> candidate_comments(const Candidate& c, const SearchOptions& opt,
                                            const std::string& run_command);
// The standard-form placement (write_placement) under those comment lines.
std::string placement_yaml(const Candidate& c, const std::vector<std::string>& comments);

// ktransformers optimize rules for a whole-layer candidate: layers whose experts are all on the
// GPU get KExpertsMarlin on their GPU, the rest KExpertsCPU (out on the layer's GPU). Several
// GPUs: one rule per GPU and module family over its layer range, the model container
// (KQwen2MoeModel, as ktransformers' Qwen3 rules use) with transfer_map {first layer: GPU}. Throws
// ktune::Error when the candidate splits a layer (round it first).
std::string ktransformers_rules(const ModelInfo& model, const Candidate& whole_layers);
// llama.cpp -ot: "blk\.(3|4|9)\.ffn_(up|down|gate)_exps\.weight=CPU" for the layers whose experts
// stay on the CPU (one line; empty when every expert is on the GPU).
std::string llama_cpp_overrides(const Candidate& whole_layers);

// Several GPUs: line 1 the -ot list (each GPU's expert layers =CUDAn, the rest =CPU), line 2
// the --tensor-split shares (layers per GPU, the last GPU +1 for the output layer).
// read_llama_cpp_placement reads both forms as llama.cpp would place them (-ngl 999, split
// mode layer): per layer the device of its layer and of its experts ("cuda:N", "cpu").
struct LlamaCppPlacement {
  std::vector<std::string> layers;
  std::vector<std::string> experts;
};
LlamaCppPlacement read_llama_cpp_placement(const std::string& text, int64_t n_layers);

// Readers of what the writers above produce (round trips in tests; ktune::Error otherwise).
// Per layer: true when the layer's experts are on the CPU.
std::vector<bool> read_llama_cpp_overrides(const std::string& text, int64_t n_layers);
// Per layer: the generate_device of the first rule matching model.layers.L.mlp.experts, as
// ktransformers' loader would pick it (rules tried in file order, first match wins).
std::vector<std::string> read_ktransformers_expert_devices(const std::string& yaml_text,
                                                           int64_t n_layers);
// Per layer: the generate_device of the first class-less rule matching model.layers.L.self_attn
// (where the layer's attention runs; "cuda:0" when none matches, as in the one-GPU rules).
std::vector<std::string> read_ktransformers_layer_devices(const std::string& yaml_text,
                                                          int64_t n_layers);
// The regex subset the rules use (literals, \., ., *, ^, $, groups with |), matched against the
// whole name as Python's re.search would with the anchors given.
bool rule_pattern_matches(const std::string& pattern, const std::string& name);

}  // namespace ktune::search
