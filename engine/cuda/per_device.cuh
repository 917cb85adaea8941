// Setup that must run once per CUDA device, not once per process: cudaFuncSetAttribute (the
// shared-memory opt-in of a kernel) and device attributes belong to the current device's
// context, so a process that runs kernels on cuda:1 after cuda:0 (the multi-GPU layer split)
// needs them set there too. PerDevice<T>::get(init) runs init(device) once for the current
// device (thread-safe) and returns its cached result.
#pragma once

#include <cuda_runtime.h>

#include <mutex>

namespace ktune::cuda::detail {

constexpr int kMaxSetupDevices = 64;

template <class T>
class PerDevice {
 public:
  // Devices beyond kMaxSetupDevices (or a failing cudaGetDevice) share the last slot's
  // setup; an error there surfaces at the first launch.
  template <class Init>
  const T& get(Init init) {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxSetupDevices) {
      cudaGetLastError();
      dev = kMaxSetupDevices - 1;
    }
    std::call_once(once_[dev], [&] { value_[dev] = init(dev); });
    return value_[dev];
  }

 private:
  std::once_flag once_[kMaxSetupDevices];
  T value_[kMaxSetupDevices]{};
};

}  // namespace ktune::cuda::detail
