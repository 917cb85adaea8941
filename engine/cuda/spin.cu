// A one-thread kernel that keeps the stream busy for a given time (global timer). Benchmarks
// queue it first so that the events and kernels queued behind it start back to back on the GPU:
// without it, a kernel of a few microseconds is timed together with the host's submission gap.
#include "ktune/engine/cuda/kernels.h"

namespace ktune::cuda {
namespace {

__global__ void spin_kernel(uint64_t ns) {
  uint64_t t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (t - t0 < ns);
}

}  // namespace

cudaError_t launch_spin(uint64_t ns, cudaStream_t stream) {
  spin_kernel<<<1, 1, 0, stream>>>(ns);
  return cudaGetLastError();
}

}  // namespace ktune::cuda
