// The GPU half of the CPU-expert hand-off through flags in mapped pinned memory
// (hybrid_kernels.h; the CPU half is engine/cuda/cpu_expert_driver.cpp). One block each: the
// signal copies a few KB and publishes a word; the wait spins on one word, then adds `hidden`
// floats. System-scope release/acquire (PTX st.release.sys / ld.acquire.sys) orders the data
// against the flags in both directions.
#include "ktune/engine/cuda/hybrid_kernels.h"

namespace ktune::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ uint64_t step_seq(const int32_t* pos, const uint32_t* epoch) {
  return (static_cast<uint64_t>(*epoch) << 32) | static_cast<uint32_t>(*pos);
}

__device__ __forceinline__ void store_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void handoff_signal_kernel(const uint32_t* __restrict__ stage, int words,
                                      uint32_t* stage_mapped, const int32_t* pos,
                                      const uint32_t* epoch, HandoffWords* hw) {
  for (int i = threadIdx.x; i < words; i += kThreads) stage_mapped[i] = stage[i];
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) store_release_sys(&hw->request, step_seq(pos, epoch));
}

__global__ void handoff_wait_add_kernel(const HandoffWords* hw, const float* y_mapped,
                                        const int32_t* pos, const uint32_t* epoch, uint32_t* error,
                                        uint32_t error_code, uint64_t timeout_ns,
                                        float* __restrict__ x, int n) {
  __shared__ int add;
  if (threadIdx.x == 0) {
    const uint64_t seq = step_seq(pos, epoch);
    volatile uint32_t* err = error;
    int ok = 0;
    if (*err == 0) {
      const uint64_t t0 = global_ns();
      for (;;) {
        if (load_acquire_sys(&hw->done) == seq) {
          ok = 1;
          break;
        }
        if (*err != 0) break;
        if (global_ns() - t0 > timeout_ns) {
          *err = error_code;
          __threadfence_system();
          break;
        }
      }
    }
    add = ok && reinterpret_cast<const volatile HandoffWords*>(hw)->n_cpu > 0;
  }
  __syncthreads();
  if (!add) return;
  // y lives in host memory: every load is a PCIe round trip (~1 µs). Issue a thread's loads
  // together, then add, so the block pays about one round trip per kUnroll * kThreads floats
  // instead of one per kThreads (a load-add-store loop serializes them: x may alias y as far as
  // the compiler knows): 8 round trips per layer at hidden 2048 before.
  constexpr int kUnroll = 8;
  for (int base = 0; base < n; base += kUnroll * kThreads) {
    float v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kThreads + threadIdx.x;
      v[u] = i < n ? __ldcv(y_mapped + i) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kThreads + threadIdx.x;
      if (i < n) x[i] = __fadd_rn(x[i], v[u]);
    }
  }
}

}  // namespace

cudaError_t launch_handoff_signal(const void* stage, size_t stage_bytes, void* stage_mapped,
                                  const int32_t* pos, const uint32_t* epoch, HandoffWords* words,
                                  cudaStream_t stream) {
  if (stage == nullptr || stage_mapped == nullptr || pos == nullptr || epoch == nullptr ||
      words == nullptr || stage_bytes % 4 != 0 || stage_bytes > (size_t{1} << 30) ||
      (reinterpret_cast<uintptr_t>(stage) & 3u) != 0 ||
      (reinterpret_cast<uintptr_t>(stage_mapped) & 3u) != 0) {
    return cudaErrorInvalidValue;
  }
  handoff_signal_kernel<<<1, kThreads, 0, stream>>>(
      static_cast<const uint32_t*>(stage), static_cast<int>(stage_bytes / 4),
      static_cast<uint32_t*>(stage_mapped), pos, epoch, words);
  return cudaGetLastError();
}

cudaError_t launch_handoff_wait_add(const HandoffWords* words, const float* y_mapped,
                                    const int32_t* pos, const uint32_t* epoch, uint32_t* error,
                                    uint32_t error_code, uint64_t timeout_ns, float* x, int64_t n,
                                    cudaStream_t stream) {
  if (words == nullptr || y_mapped == nullptr || pos == nullptr || epoch == nullptr ||
      error == nullptr || error_code == 0 || x == nullptr || n < 0 || n > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  handoff_wait_add_kernel<<<1, kThreads, 0, stream>>>(
      words, y_mapped, pos, epoch, error, error_code, timeout_ns, x, static_cast<int>(n));
  return cudaGetLastError();
}

}  // namespace ktune::cuda
