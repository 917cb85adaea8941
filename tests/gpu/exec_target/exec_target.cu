// A CUDA program with a known launch pattern, profiled by tests/gpu/test_exec_profile_gpu.cpp
// under `ktune profile --exec` (it is a separate program, so it lives outside the test glob).
//
//   ktune_exec_target STEPS KERNELS SLEEP_US [EXIT_CODE]
//
// One warm-up kernel (outside any range), then STEPS steps, each an NVTX range "step" (push/pop)
// holding KERNELS launches of a tiny kernel; after each launch the host synchronizes and sleeps
// SLEEP_US, so consecutive kernels are at least SLEEP_US apart on the GPU. Inside each step the
// last launch sits in an inner start/end range "moe_experts" (a phase name by keyword). Exits with
// EXIT_CODE (default 0) after the last step.
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

__global__ void tiny_kernel(float* x) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  x[i] = x[i] * 0.5f + 1.0f;
}

#define CHECK(call)                                                                 \
  do {                                                                              \
    const cudaError_t e_ = (call);                                                  \
    if (e_ != cudaSuccess) {                                                        \
      std::fprintf(stderr, "exec_target: %s: %s\n", #call, cudaGetErrorString(e_)); \
      return 2;                                                                     \
    }                                                                               \
  } while (0)

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s STEPS KERNELS SLEEP_US [EXIT_CODE]\n", argv[0]);
    return 2;
  }
  const int steps = std::atoi(argv[1]);
  const int kernels = std::atoi(argv[2]);
  const int sleep_us = std::atoi(argv[3]);
  const int exit_code = argc > 4 ? std::atoi(argv[4]) : 0;
  float* x = nullptr;
  CHECK(cudaMalloc(&x, 256 * sizeof(float)));
  CHECK(cudaMemset(x, 0, 256 * sizeof(float)));
  tiny_kernel<<<1, 256>>>(x);  // warm-up: module load, first-launch costs
  CHECK(cudaDeviceSynchronize());
  for (int s = 0; s < steps; ++s) {
    nvtxRangePushA("step");
    for (int k = 0; k < kernels; ++k) {
      nvtxRangeId_t inner = 0;
      if (k == kernels - 1) inner = nvtxRangeStartA("moe_experts");
      tiny_kernel<<<1, 256>>>(x);
      CHECK(cudaGetLastError());
      if (k == kernels - 1) nvtxRangeEnd(inner);
      CHECK(cudaStreamSynchronize(0));
      std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
    }
    nvtxRangePop();
  }
  CHECK(cudaFree(x));
  std::printf("exec_target: %d steps x %d kernels done\n", steps, kernels);
  return exit_code;
}
