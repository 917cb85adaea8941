// CPU-only build: GpuEngine exists so callers link, and refuses to start.
#include "ktune/engine/gpu_engine.h"

#include "ktune/engine/error.h"

namespace ktune {

// moe_kernel_name() is defined once, in runtime/placement.cpp (placement.h declares the same
// MoeKernel); a second definition here breaks linking anything that uses both.

struct GpuEngine::Impl {
  GpuEngineOptions opt;
};
struct GpuEngine::Pipeline {};
struct GpuEngine::Deepseek {};

GpuEngine::GpuEngine(const ModelWeights&, const GpuEngineOptions&) {
  throw Error("gpu engine", "this ktune was built without CUDA (KTUNE_CUDA=OFF)",
              "rebuild with -DKTUNE_CUDA=ON on a machine with the CUDA toolkit");
}
GpuEngine::~GpuEngine() = default;
void GpuEngine::reset() {}
int64_t GpuEngine::position() const { return 0; }
void GpuEngine::decode(int32_t, std::vector<float>*) {}
void GpuEngine::prefill(const int32_t*, int64_t, std::vector<float>*) {}
std::vector<int32_t> GpuEngine::generate_greedy(int32_t, int64_t) { return {}; }
int64_t GpuEngine::max_sequences() const { return 1; }
void GpuEngine::set_sequence(int64_t) {}
int64_t GpuEngine::sequence() const { return 0; }
int64_t GpuEngine::position(int64_t) const { return 0; }
void GpuEngine::decode_batch(const int32_t*, int64_t, std::vector<float>*) {}
std::vector<int32_t> GpuEngine::generate_greedy_batch(const int32_t*, int64_t, int64_t) {
  return {};
}
const GpuEngineOptions& GpuEngine::options() const { return impl_->opt; }
int64_t GpuEngine::device_bytes() const { return 0; }
std::string GpuEngine::describe() const { return "no CUDA"; }
bool GpuEngine::hybrid() const { return false; }
std::vector<std::vector<uint64_t>> GpuEngine::expert_counts() const { return {}; }

}  // namespace ktune
