// CPU-only build (KTUNE_CUDA=OFF or no nvcc): there is never a GPU.
#include "ktune/engine/build_info.h"
#include "ktune/engine/gpu_info.h"

namespace ktune {

bool build_has_cuda() { return false; }

GpuInfo query_gpus() {
  GpuInfo info;
  info.unavailable_reason = "no usable GPU: this ktune was built without CUDA (KTUNE_CUDA=OFF)";
  return info;
}

}  // namespace ktune
