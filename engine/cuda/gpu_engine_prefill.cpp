// Prefill (GpuEngine::Impl, engine/cuda/gpu_engine_impl.h). Not batched yet: one decode step
// per prompt token.
#include "cuda/gpu_engine_impl.h"

namespace ktune {

void GpuEngine::prefill(const int32_t* tokens, int64_t n, std::vector<float>* logits) {
  for (int64_t i = 0; i < n; ++i) decode(tokens[i], i + 1 == n ? logits : nullptr);
}

}  // namespace ktune
