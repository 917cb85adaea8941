// Per-slot MoE launches (hybrid_kernels.h): the unfused path's gate/up/SwiGLU/down/weighted-add
// for selected slot j, with the expert read from device memory so a CUDA graph can replay them.
// Rows use rowwarp_dot.cuh exactly as matvec_rowwarp.cu does (bit-identical to fused/unfused).
#include "cuda/common.cuh"
#include "cuda/rowwarp_dot.cuh"
#include "ktune/engine/cuda/hybrid_kernels.h"

namespace ktune::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 256;

__device__ __forceinline__ int slot_of(const int32_t* ids, int j, const int32_t* slot_map) {
  const int id = ids[j];
  return slot_map ? slot_map[id] : id;
}

template <QuantType T>
__global__ void matvec_slot_kernel(const uint8_t* __restrict__ base, int64_t matrix_bytes,
                                   const int32_t* __restrict__ ids, int j,
                                   const int32_t* __restrict__ slot_map,
                                   const float* __restrict__ x, int rows, int nb, int64_t row_bytes,
                                   float* __restrict__ y) {
  const int slot = slot_of(ids, j, slot_map);
  if (slot < 0) return;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / detail::kWarp;
  if (r >= rows) return;
  const uint8_t* const rp[1] = {base + slot * matrix_bytes + r * row_bytes};
  const float* const xp[1] = {x};
  float out[1];
  detail::warp_rows_dot<T, 1>(rp, xp, nb, out);
  if (threadIdx.x % detail::kWarp == 0) y[r] = out[0];
}

__global__ void swiglu_slot_kernel(const int32_t* __restrict__ ids, int j,
                                   const int32_t* __restrict__ slot_map,
                                   const float* __restrict__ g, const float* __restrict__ u, int n,
                                   float* __restrict__ out) {
  if (slot_of(ids, j, slot_map) < 0) return;
  const int i = blockIdx.x * kThreads + threadIdx.x;
  if (i < n) out[i] = detail::swiglu(g[i], u[i]);
}

__global__ void axpy_slot_kernel(const int32_t* __restrict__ ids, int j,
                                 const int32_t* __restrict__ slot_map,
                                 const float* __restrict__ weights, const float* __restrict__ y,
                                 int n, float* __restrict__ acc) {
  if (slot_of(ids, j, slot_map) < 0) return;
  const float w = weights[j];
  const int i = blockIdx.x * kThreads + threadIdx.x;
  if (i < n) acc[i] = __fadd_rn(acc[i], __fmul_rn(w, y[i]));
}

unsigned blocks(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

bool slot_args_ok(const int32_t* ids, int64_t j) { return ids != nullptr && j >= 0 && j < 1024; }

__global__ void pcie_assist_map_kernel(const int32_t* __restrict__ ids,
                                       const float* __restrict__ wts, int k, int n_experts,
                                       const int32_t* __restrict__ slot_map, int num, int den,
                                       int32_t* __restrict__ map, int32_t* __restrict__ cids,
                                       float* __restrict__ cwts, int k_assist) {
  for (int e = threadIdx.x; e < n_experts; e += blockDim.x) map[e] = -1;
  __syncthreads();
  if (threadIdx.x != 0) return;
  auto on_cpu = [&](int id) {
    return id >= 0 && id < n_experts && (!slot_map || slot_map[id] < 0);
  };
  int n_cpu = 0;
  for (int j = 0; j < k; ++j) n_cpu += on_cpu(ids[j]) ? 1 : 0;
  const int take = min(pcie_assist_count(n_cpu, num, den), k_assist);
  // The last `take` CPU experts in top-k order: skip the first n_cpu - take of them.
  int skip = n_cpu - take, n = 0, pad = 0;
  bool have_pad = false;
  for (int j = 0; j < k; ++j) {
    const int id = ids[j];
    const bool mine = on_cpu(id) && skip-- <= 0;
    if (mine) {
      map[id] = id;
      cids[n] = id;
      cwts[n] = wts[j];
      ++n;
    } else if (!have_pad && id >= 0 && id < n_experts) {
      pad = id;  // a valid id the map leaves at -1: padded entries compute nothing
      have_pad = true;
    }
  }
  for (int j = n; j < k_assist; ++j) {
    cids[j] = pad;
    cwts[j] = 0.0f;
  }
}

}  // namespace

cudaError_t launch_pcie_assist_map(const int32_t* ids, const float* wts, int64_t k,
                                   int64_t n_experts, const int32_t* slot_map, int num, int den,
                                   int32_t* map, int32_t* assist_ids, float* assist_wts,
                                   int64_t k_assist, cudaStream_t stream) {
  if (ids == nullptr || wts == nullptr || map == nullptr || assist_ids == nullptr ||
      assist_wts == nullptr || k < 1 || k > n_experts || n_experts > 0x7fffffff || num < 0 ||
      den < 1 || k_assist < 1 || k_assist > k) {
    return cudaErrorInvalidValue;
  }
  pcie_assist_map_kernel<<<1, 128, 0, stream>>>(
      ids, wts, static_cast<int>(k), static_cast<int>(n_experts), slot_map, num, den, map,
      assist_ids, assist_wts, static_cast<int>(k_assist));
  return cudaGetLastError();
}

cudaError_t launch_matvec_rowwarp_slot(QuantType type, const void* base, int64_t matrix_bytes,
                                       const int32_t* ids, int64_t j, const int32_t* slot_map,
                                       const float* x, int64_t rows, int64_t cols, float* y,
                                       cudaStream_t stream) {
  if (!detail::rowdot_supported(type) || !slot_args_ok(ids, j) || rows < 0 || rows > 0x7fffffff ||
      !detail::rowdot_cols_ok(type, cols) || cols > (1 << 28) ||
      !detail::rowdot_aligned(type, base) || (reinterpret_cast<uintptr_t>(x) & 15u) != 0 ||
      matrix_bytes < rows * row_bytes(type, cols) ||
      !detail::rowdot_aligned(
          type, reinterpret_cast<const void*>(static_cast<uintptr_t>(matrix_bytes)))) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  const int nb = static_cast<int>(cols / 32);
  const int64_t rb = row_bytes(type, cols);
  const auto* wb = static_cast<const uint8_t*>(base);
  const unsigned grid = static_cast<unsigned>((rows + kWarps - 1) / kWarps);
  const int r = static_cast<int>(rows);
  const int jj = static_cast<int>(j);
  detail::with_rowdot_type(type, [&](auto tag) {
    matvec_slot_kernel<decltype(tag)::value>
        <<<grid, 32 * kWarps, 0, stream>>>(wb, matrix_bytes, ids, jj, slot_map, x, r, nb, rb, y);
  });
  return cudaGetLastError();
}

cudaError_t launch_swiglu_slot(const int32_t* ids, int64_t j, const int32_t* slot_map,
                               const float* g, const float* u, int64_t n, float* out,
                               cudaStream_t stream) {
  if (!slot_args_ok(ids, j) || n < 0 || n > 0x7fffffff) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  swiglu_slot_kernel<<<blocks(n), kThreads, 0, stream>>>(ids, static_cast<int>(j), slot_map, g, u,
                                                         static_cast<int>(n), out);
  return cudaGetLastError();
}

cudaError_t launch_axpy_slot(const int32_t* ids, int64_t j, const int32_t* slot_map,
                             const float* weights, const float* y, int64_t n, float* acc,
                             cudaStream_t stream) {
  if (!slot_args_ok(ids, j) || weights == nullptr || n < 0 || n > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  if (n == 0) return cudaSuccess;
  axpy_slot_kernel<<<blocks(n), kThreads, 0, stream>>>(ids, static_cast<int>(j), slot_map, weights,
                                                       y, static_cast<int>(n), acc);
  return cudaGetLastError();
}

}  // namespace ktune::cuda
