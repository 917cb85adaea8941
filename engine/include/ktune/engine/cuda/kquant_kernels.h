// Decode matvec for the K-quant weight formats (Q4_K, Q5_K, Q6_K; layouts in quant.h), in
// engine/cuda/matvec_kquant.cu. Same contract as kernels.h's launch_matvec: y[r] = dot(W row r,
// x) for r < rows, weights read once and dequantized in registers, x and y float32 (no
// activation quantization), fixed-order reductions (bit-identical on every run), nothing
// allocated or synchronised, cudaErrorInvalidValue for arguments the kernels cannot take.
//
// Requirements: cols a multiple of 256 (one super-block); x 16-byte aligned; W 4-byte aligned
// for Q4_K and Q5_K (32-bit loads), 2-byte aligned for Q6_K (210-byte blocks: 16-bit loads).
// GGUF tensor data and arena slices satisfy these. The row dot is engine/cuda/rowdot_kquant.cuh's,
// shared with the engine's fused matvec and MoE kernels (launch_matvec_fused,
// launch_moe_gate_up_swiglu, ... take these types too).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ktune/engine/quant.h"

namespace ktune::cuda {

cudaError_t launch_matvec_q4_k(const void* w, const float* x, int64_t rows, int64_t cols,
                               float* y, cudaStream_t stream);
cudaError_t launch_matvec_q5_k(const void* w, const float* x, int64_t rows, int64_t cols,
                               float* y, cudaStream_t stream);
cudaError_t launch_matvec_q6_k(const void* w, const float* x, int64_t rows, int64_t cols,
                               float* y, cudaStream_t stream);
// Dispatches on type (Q4_K, Q5_K, Q6_K; cudaErrorInvalidValue for any other).
cudaError_t launch_matvec_kquant(QuantType type, const void* w, const float* x, int64_t rows,
                                 int64_t cols, float* y, cudaStream_t stream);

}  // namespace ktune::cuda
