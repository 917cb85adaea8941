// Device helpers shared by the kernels: fixed-order warp/block reductions and half/bfloat16
// conversions from raw uint16 bits (the weight formats store bits, as ggml does).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

namespace ktune::cuda::detail {

constexpr int kWarp = 32;

// Butterfly sum: every lane ends with the same value, and the order of additions is fixed by
// the lane pattern, so the result is deterministic.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
// `red` is shared scratch of >= 32 floats. Contains __syncthreads: call from all threads.
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // red may still be read by a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < nwarps ? red[lane] : 0.0f;
  return warp_sum(t);
}

__device__ __forceinline__ float block_max(float v, float* red) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = lane < nwarps ? red[lane] : -INFINITY;
  return warp_max(t);
}

__device__ __forceinline__ float fp16_bits_to_float(uint16_t h) {
  return __half2float(__ushort_as_half(h));
}
__device__ __forceinline__ float bf16_bits_to_float(uint16_t h) {
  return __uint_as_float(static_cast<uint32_t>(h) << 16);
}

// ---- programmatic dependent launch (PDL) and asynchronous copies --------------------------------
//
// With KTUNE_PDL=1 the decode step launches its kernels with
// cudaLaunchAttributeProgrammaticStreamSerialization (launch_kernel below), so the next kernel's
// blocks start while the previous kernel is still running: they issue the loads that do not depend on it (weights, the KV cache of earlier
// positions) and then block in pdl_wait() until the previous grid has completed and its writes
// are visible. Every such kernel follows two rules:
//   1. it calls pdl_wait() in every block before it reads anything the previous kernel writes,
//      and before it writes anything at all;
//   2. it calls pdl_trigger() (let the next kernel launch) only after its own pdl_wait().
// Rule 2 makes "kernel N has launched" imply "kernel N-2 has completed and flushed", so the
// pre-wait part of a kernel may also read outputs of the launch before the previous one (the MoE
// down kernel prefetches the experts the router chose). Without the launch attribute (or before
// sm_90) both calls are no-ops and ordinary stream order holds.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1 and the registers (cp.async, sm_80+); both
// addresses 16-byte aligned. Completion: cp_async_commit() closes a group, cp_async_wait<N>()
// waits until at most N groups are pending (then __syncthreads() publishes the data).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_u32(smem)), "l"(gmem)
               : "memory");
#else
  *reinterpret_cast<uint4*>(smem) = *reinterpret_cast<const uint4*>(gmem);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// Copies `bytes` (even) from global `src` to shared `dst` by all threads of the block: 16-byte
// cp.async when both ends and the length allow it, else 2-byte loads and stores (synchronous; odd
// shapes only). The caller commits, waits and synchronises.
__device__ __forceinline__ void copy_to_smem_async(uint8_t* dst, const uint8_t* src, int64_t bytes) {
  if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) |
        static_cast<uintptr_t>(bytes)) &
       15u) == 0) {
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * 16; i < bytes;
         i += static_cast<int64_t>(blockDim.x) * 16) {
      cp_async16(dst + i, src + i);
    }
  } else {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
    for (int64_t i = threadIdx.x; i < bytes / 2; i += blockDim.x) d[i] = __ldg(s + i);
  }
}

}  // namespace ktune::cuda::detail

// ---- host side: the one launch path of the decode kernels -------------------------------------
#include <cuda_runtime.h>

#include <utility>

namespace ktune::cuda::detail {

// Whether launches on `stream` get the programmatic-serialization attribute: with KTUNE_PDL=1, a
// non-default stream on a device of compute capability 9.0 or newer (off by default: measured
// slower for the decode step on the H100, see matvec_fused.cu).
bool pdl_enabled(cudaStream_t stream);

// kernel<<<grid, block, smem, stream>>>(args...) through cudaLaunchKernelEx, with the PDL
// attribute when pdl_enabled(stream) and a thread-block cluster of `cluster` blocks along x when
// cluster > 1. Returns the launch status.
template <class... KArgs, class... Args>
cudaError_t launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, unsigned cluster, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  unsigned n = 0;
  if (pdl_enabled(stream)) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  if (cluster > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = cluster;
    attr[n].val.clusterDim.y = 1;
    attr[n].val.clusterDim.z = 1;
    ++n;
  }
  cfg.attrs = attr;
  cfg.numAttrs = n;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace ktune::cuda::detail
