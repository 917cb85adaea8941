// Greedy sampling on device: out[r] = index of the largest logit of row r (ties: the lowest
// index; NaN never wins; a row of only NaN gives -1). Keeping the token on the device lets the
// next step's embedding read it without a host round trip, inside a CUDA graph.
// One block of 1024 threads per row (vocab ~150k floats = 600 KB): strided scan per thread, then
// a (value, index) reduction whose result does not depend on order (a total order), so it is
// deterministic by construction.
#include <climits>

#include "cuda/common.cuh"
#include "ktune/engine/cuda/kernels.h"

namespace ktune::cuda {
namespace {

__device__ __forceinline__ void take_better(float& bv, int& bi, float ov, int oi) {
  if (ov > bv || (ov == bv && oi < bi)) {
    bv = ov;
    bi = oi;
  }
}

__global__ void argmax_kernel(const float* __restrict__ logits, int64_t n,
                              int32_t* __restrict__ out) {
  __shared__ float sv[32];
  __shared__ int si[32];
  const float* l = logits + static_cast<int64_t>(blockIdx.x) * n;
  float bv = -INFINITY;
  int bi = INT_MAX;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
    take_better(bv, bi, l[i], static_cast<int>(i));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    take_better(bv, bi, __shfl_xor_sync(0xffffffffu, bv, o), __shfl_xor_sync(0xffffffffu, bi, o));
  }
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) {
    sv[warp] = bv;
    si[warp] = bi;
  }
  __syncthreads();
  if (warp == 0) {
    const int nw = blockDim.x / 32;
    bv = lane < nw ? sv[lane] : -INFINITY;
    bi = lane < nw ? si[lane] : INT_MAX;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      take_better(bv, bi, __shfl_xor_sync(0xffffffffu, bv, o), __shfl_xor_sync(0xffffffffu, bi, o));
    }
    if (lane == 0) out[blockIdx.x] = bi == INT_MAX ? -1 : bi;
  }
}

}  // namespace

cudaError_t launch_argmax(const float* logits, int64_t rows, int64_t n, int32_t* out,
                          cudaStream_t stream) {
  if (rows < 0 || rows > 0x7fffffff || n <= 0 || n >= INT_MAX) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  argmax_kernel<<<static_cast<unsigned>(rows), 1024, 0, stream>>>(logits, n, out);
  return cudaGetLastError();
}

}  // namespace ktune::cuda
