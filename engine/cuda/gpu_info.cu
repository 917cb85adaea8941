// CUDA build: asks the runtime. Compiled by nvcc even on machines without a driver, where
// cudaGetDeviceCount fails and we report the reason.
#include <cuda_runtime.h>

#include "ktune/engine/build_info.h"
#include "ktune/engine/gpu_info.h"

namespace ktune {

bool build_has_cuda() { return true; }

GpuInfo query_gpus() {
  GpuInfo info;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    info.unavailable_reason = std::string("no usable GPU: ") + cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return info;
  }
  if (count == 0) {
    info.unavailable_reason = "no usable GPU: the CUDA runtime sees no device";
    return info;
  }
  cudaDriverGetVersion(&info.driver_version);
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    GpuDevice d;
    d.index = i;
    d.name = prop.name;
    d.total_bytes = static_cast<int64_t>(prop.totalGlobalMem);
    d.sm_major = prop.major;
    d.sm_minor = prop.minor;
    info.devices.push_back(d);
  }
  if (info.devices.empty()) info.unavailable_reason = "no usable GPU: device properties failed";
  return info;
}

}  // namespace ktune
