// Shared by the GPU tests: skip with the reason when this machine has no usable GPU (CI, the
// build machine), so a skipped test says why.
#pragma once

#include <gtest/gtest.h>

#include "ktune/engine/gpu_info.h"

namespace ktune::test {

inline const GpuInfo& gpus() {
  static const GpuInfo info = query_gpus();
  return info;
}

}  // namespace ktune::test

#define KTUNE_REQUIRE_GPU()                                     \
  do {                                                          \
    if (::ktune::test::gpus().devices.empty()) {                \
      GTEST_SKIP() << ::ktune::test::gpus().unavailable_reason; \
    }                                                           \
  } while (0)
