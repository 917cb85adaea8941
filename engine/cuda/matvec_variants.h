// Internal knobs of the matvec kernels, for tests and benchmarks only (the engine calls
// launch_matvec). rows_per_warp: 1 or 2 selects the 32-bit paired-block path with that many rows
// per warp; 3 = 2 rows per warp with conversion-free (byte-permute) dequantization; 0 forces the
// generic one-block-per-lane path.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ktune::cuda {

cudaError_t launch_matvec_q4_0_variant(const void* w, const float* x, int64_t rows, int64_t cols,
                                       float* y, int rows_per_warp, cudaStream_t stream);
cudaError_t launch_matvec_q8_0_variant(const void* w, const float* x, int64_t rows, int64_t cols,
                                       float* y, int rows_per_warp, cudaStream_t stream);

}  // namespace ktune::cuda
