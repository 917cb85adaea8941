// Shared by the CUDA kernel tests: a seeded random source (KTUNE_TEST_SEED reproduces a run) and
// a device copy of a host vector.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "ktune/engine/cuda/cuda_check.h"

namespace ktune::cuda::test {

inline unsigned test_seed() {
  if (const char* s = std::getenv("KTUNE_TEST_SEED")) return static_cast<unsigned>(std::atol(s));
  return std::random_device{}();
}

struct Rng {
  unsigned seed = test_seed();
  std::mt19937 gen{seed};
  std::string trace() const { return "seed " + std::to_string(seed); }
  std::vector<float> normal(size_t n, float sd = 1.0f, float mean = 0.0f) {
    std::normal_distribution<float> d(mean, sd);
    std::vector<float> v(n);
    for (auto& x : v) x = d(gen);
    return v;
  }
  int uniform_int(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(gen); }
};

// A device copy of a host vector (16 spare bytes past the end for vector loads). A sized one
// starts poisoned (0xFF bytes: NaN floats), so an output a kernel forgets to write shows.
// upload/poison/download synchronise the device: tests launch on other streams too.
template <class T>
struct Dev {
  DeviceBuffer buf;
  size_t n = 0;
  Dev() = default;
  explicit Dev(size_t count) : buf(count * sizeof(T) + 16), n(count) { poison(); }
  explicit Dev(const std::vector<T>& h) : buf(h.size() * sizeof(T) + 16), n(h.size()) { upload(h); }
  T* ptr() const { return buf.as<T>(); }
  void upload(const std::vector<T>& h) {
    KTUNE_CUDA_CHECK(cudaMemcpy(ptr(), h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    KTUNE_CUDA_CHECK(cudaDeviceSynchronize());
  }
  void poison() {
    KTUNE_CUDA_CHECK(cudaMemset(ptr(), 0xFF, n * sizeof(T)));
    KTUNE_CUDA_CHECK(cudaDeviceSynchronize());
  }
  std::vector<T> download() const {
    std::vector<T> h(n);
    KTUNE_CUDA_CHECK(cudaDeviceSynchronize());
    KTUNE_CUDA_CHECK(cudaMemcpy(h.data(), ptr(), n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
};

}  // namespace ktune::cuda::test
