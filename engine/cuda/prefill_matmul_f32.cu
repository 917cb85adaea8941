// float32 matmul on CUDA cores for a prefill chunk's router: y[r][c] = sum_k x[r][k] * w[c][k].
// The router's logits choose the experts, so they stay float32 (as the CPU engine computes them
// with F32 router weights) rather than going through the fp16 tensor-core path. The output is
// small (512 tokens x 128 experts) and k long (2048), so tiles are small to spread the work:
// 16 rows x 32 columns per block of 128 threads (2 x 2 outputs each; 128 blocks for 512 x 128),
// k staged 32 at a time through shared memory. Each output is one thread's fmaf chain in k
// order: deterministic. (64 x 64 tiles gave 16 blocks and ~170 us per layer on the H100.)
#include "cuda/common.cuh"
#include "ktune/engine/cuda/prefill_kernels.h"

namespace ktune::cuda {
namespace {

constexpr int kRows = 16;
constexpr int kCols = 32;
constexpr int kK = 32;
constexpr int kThreads = 128;

__global__ void __launch_bounds__(kThreads)
    prefill_matmul_f32_kernel(const float* __restrict__ x, const float* __restrict__ w, int m,
                              int n, int kdim, float* __restrict__ y) {
  __shared__ float xs[kK][kRows + 1];
  __shared__ float ws[kK][kCols + 1];
  const int tid = threadIdx.x;
  const int row0 = blockIdx.y * kRows, col0 = blockIdx.x * kCols;
  const int tx = tid % 16, ty = tid / 16;      // outputs: rows 2ty, 2ty+1; cols 2tx, 2tx+1
  const int lr = tid / 8, lk = (tid % 8) * 4;  // loader: row (x: 0..15; w: lr and lr + 16), k
  float acc[2][2] = {};
  for (int k0 = 0; k0 < kdim; k0 += kK) {
    float4 xv = make_float4(0.f, 0.f, 0.f, 0.f), w0 = xv, w1 = xv;
    if (row0 + lr < m) {
      xv = *reinterpret_cast<const float4*>(x + static_cast<int64_t>(row0 + lr) * kdim + k0 + lk);
    }
    if (col0 + lr < n) {
      w0 = *reinterpret_cast<const float4*>(w + static_cast<int64_t>(col0 + lr) * kdim + k0 + lk);
    }
    if (col0 + lr + 16 < n) {
      w1 = *reinterpret_cast<const float4*>(w + static_cast<int64_t>(col0 + lr + 16) * kdim + k0 +
                                            lk);
    }
    xs[lk][lr] = xv.x;
    xs[lk + 1][lr] = xv.y;
    xs[lk + 2][lr] = xv.z;
    xs[lk + 3][lr] = xv.w;
    ws[lk][lr] = w0.x;
    ws[lk + 1][lr] = w0.y;
    ws[lk + 2][lr] = w0.z;
    ws[lk + 3][lr] = w0.w;
    ws[lk][lr + 16] = w1.x;
    ws[lk + 1][lr + 16] = w1.y;
    ws[lk + 2][lr + 16] = w1.z;
    ws[lk + 3][lr + 16] = w1.w;
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kK; ++kk) {
      const float a0 = xs[kk][2 * ty], a1 = xs[kk][2 * ty + 1];
      const float b0 = ws[kk][2 * tx], b1 = ws[kk][2 * tx + 1];
      acc[0][0] = fmaf(a0, b0, acc[0][0]);
      acc[0][1] = fmaf(a0, b1, acc[0][1]);
      acc[1][0] = fmaf(a1, b0, acc[1][0]);
      acc[1][1] = fmaf(a1, b1, acc[1][1]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = row0 + 2 * ty + i;
    if (r >= m) continue;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int c = col0 + 2 * tx + j;
      if (c < n) y[static_cast<int64_t>(r) * n + c] = acc[i][j];
    }
  }
}

}  // namespace

cudaError_t launch_prefill_matmul_f32(const float* x, const float* w, int64_t m, int64_t n,
                                      int64_t k, float* y, cudaStream_t stream) {
  if (m < 0 || n <= 0 || k <= 0 || k % kK != 0 || m > int64_t{65535} * kRows ||
      n > (int64_t{1} << 30) || k > (int64_t{1} << 30) ||
      (reinterpret_cast<uintptr_t>(x) & 15) != 0 || (reinterpret_cast<uintptr_t>(w) & 15) != 0) {
    return cudaErrorInvalidValue;
  }
  if (m == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((n + kCols - 1) / kCols),
                  static_cast<unsigned>((m + kRows - 1) / kRows));
  prefill_matmul_f32_kernel<<<grid, kThreads, 0, stream>>>(
      x, w, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), y);
  return cudaGetLastError();
}

}  // namespace ktune::cuda
