// float32 matmul on CUDA cores for a prefill chunk's router: y[r][c] = sum_k x[r][k] * w[c][k].
// The router's logits choose the experts, so they stay float32 (as the CPU engine computes them
// with F32 router weights) rather than going through the fp16 tensor-core path. Tiles of 64 x 64
// outputs per block of 256 threads (4 x 4 each), k staged 16 at a time through shared memory;
// each output is one thread's fmaf chain in k order: deterministic. At 512 tokens x 128
// experts x 2048 this is ~0.13 GFLOP per layer, small next to the expert matmuls.
#include "cuda/common.cuh"
#include "ktune/engine/cuda/prefill_kernels.h"

namespace ktune::cuda {
namespace {

constexpr int kT = 64;
constexpr int kK = 16;

__global__ void __launch_bounds__(256)
    prefill_matmul_f32_kernel(const float* __restrict__ x, const float* __restrict__ w, int m,
                              int n, int kdim, float* __restrict__ y) {
  __shared__ float xs[kK][kT + 4];
  __shared__ float ws[kK][kT + 4];
  const int tid = threadIdx.x;
  const int row0 = blockIdx.y * kT, col0 = blockIdx.x * kT;
  const int tx = tid % 16, ty = tid / 16;
  const int lr = tid / 4, lk = (tid % 4) * 4;  // loader: row, first k of its float4
  float acc[4][4] = {};
  for (int k0 = 0; k0 < kdim; k0 += kK) {
    float4 xv = make_float4(0.f, 0.f, 0.f, 0.f), wv = xv;
    if (row0 + lr < m) {
      xv = *reinterpret_cast<const float4*>(x + static_cast<int64_t>(row0 + lr) * kdim + k0 + lk);
    }
    if (col0 + lr < n) {
      wv = *reinterpret_cast<const float4*>(w + static_cast<int64_t>(col0 + lr) * kdim + k0 + lk);
    }
    xs[lk][lr] = xv.x;
    xs[lk + 1][lr] = xv.y;
    xs[lk + 2][lr] = xv.z;
    xs[lk + 3][lr] = xv.w;
    ws[lk][lr] = wv.x;
    ws[lk + 1][lr] = wv.y;
    ws[lk + 2][lr] = wv.z;
    ws[lk + 3][lr] = wv.w;
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = xs[kk][ty * 4 + i];
        b[i] = ws[kk][tx * 4 + i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = row0 + ty * 4 + i;
    if (r >= m) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = col0 + tx * 4 + j;
      if (c < n) y[static_cast<int64_t>(r) * n + c] = acc[i][j];
    }
  }
}

}  // namespace

cudaError_t launch_prefill_matmul_f32(const float* x, const float* w, int64_t m, int64_t n,
                                      int64_t k, float* y, cudaStream_t stream) {
  if (m < 0 || n <= 0 || k <= 0 || k % kK != 0 || m > int64_t{65535} * kT ||
      n > (int64_t{1} << 30) || k > (int64_t{1} << 30) ||
      (reinterpret_cast<uintptr_t>(x) & 15) != 0 || (reinterpret_cast<uintptr_t>(w) & 15) != 0) {
    return cudaErrorInvalidValue;
  }
  if (m == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((n + kT - 1) / kT), static_cast<unsigned>((m + kT - 1) / kT));
  prefill_matmul_f32_kernel<<<grid, 256, 0, stream>>>(x, w, static_cast<int>(m),
                                                      static_cast<int>(n), static_cast<int>(k), y);
  return cudaGetLastError();
}

}  // namespace ktune::cuda
