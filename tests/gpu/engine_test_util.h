// Shared by the GPU engine tests: the synthetic tiny model in each weight type (made once per
// process) and the expert placements the hybrid tests run.
#pragma once

#include <cstdint>
#include <vector>

#include "ktune/engine/model.h"
#include "ktune/engine/quant.h"
#include "ktune/engine/synthetic.h"

namespace ktune::test {

// synth:tiny, seed 1, in F32, BF16, Q8_0 or Q4_0 (any other type: Q8_0).
inline const ModelWeights& tiny(QuantType q) {
  static const ModelWeights f32 = make_synthetic_model({"tiny", QuantType::F32, 1});
  static const ModelWeights bf16 = make_synthetic_model({"tiny", QuantType::BF16, 1});
  static const ModelWeights q8 = make_synthetic_model({"tiny", QuantType::Q8_0, 1});
  static const ModelWeights q4 = make_synthetic_model({"tiny", QuantType::Q4_0, 1});
  switch (q) {
    case QuantType::F32:
      return f32;
    case QuantType::BF16:
      return bf16;
    case QuantType::Q4_0:
      return q4;
    default:
      return q8;
  }
}

enum class Split { EvenOnGpu, AllOnCpu, FirstHalfLayersOnGpu, AllOnGpu };

inline const char* split_name(Split s) {
  switch (s) {
    case Split::EvenOnGpu:
      return "even experts on gpu";
    case Split::AllOnCpu:
      return "all experts on cpu";
    case Split::FirstHalfLayersOnGpu:
      return "first half of the layers on gpu";
    default:
      return "all experts on gpu";
  }
}

// expert_on_gpu[layer][expert] for GpuEngineOptions: even expert ids on the GPU; none; the
// experts of the first half of the layers; all.
inline std::vector<std::vector<bool>> expert_map(const ModelConfig& c, Split s) {
  std::vector<std::vector<bool>> m(static_cast<size_t>(c.n_layers),
                                   std::vector<bool>(static_cast<size_t>(c.n_experts)));
  for (int64_t l = 0; l < c.n_layers; ++l) {
    for (int64_t e = 0; e < c.n_experts; ++e) {
      m[static_cast<size_t>(l)][static_cast<size_t>(e)] =
          s == Split::AllOnGpu || (s == Split::EvenOnGpu && e % 2 == 0) ||
          (s == Split::FirstHalfLayersOnGpu && l < c.n_layers / 2);
    }
  }
  return m;
}

}  // namespace ktune::test
