// Shared by the GPU tests: skip with the reason when this machine has no usable GPU (CI, the
// build machine), so a skipped test says why.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "ktune/engine/gpu_info.h"

namespace ktune::test {

inline const GpuInfo& gpus() {
  static const GpuInfo info = query_gpus();
  return info;
}

}  // namespace ktune::test

// Every GPU test starts on cuda:0: a multi-GPU test before it may have left another device
// current (the profiler's tests then traced cuda:1's launches against cuda:0's analysis).
#define KTUNE_REQUIRE_GPU()                                     \
  do {                                                          \
    if (::ktune::test::gpus().devices.empty()) {                \
      GTEST_SKIP() << ::ktune::test::gpus().unavailable_reason; \
    }                                                           \
    cudaSetDevice(0);                                           \
  } while (0)
