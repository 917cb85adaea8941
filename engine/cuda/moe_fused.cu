// Fused MoE for one token, routing read from device memory (router_topk's ids and weights), so
// the whole sequence is graph-capturable: no host read, no host sync.
//
//   launch_moe_gate_up_swiglu: grid (ffn rows / 4 warps, k experts); warp = (expert slot j, row r)
//     computes gate·x and up·x of expert ids[j] interleaved (two rows in flight) and writes
//     act[j][r] = silu(gate) * up. The expert's matrix starts at base + ids[j] * expert_bytes.
//   launch_moe_down_sum: grid (hidden rows / 4); two warps per output row r, each computing the
//     down rows r of half of the k experts (4 at a time, interleaved) against act[j]; then one
//     thread sums s = sum_j w[j] * dot_j in slot order (j = 0..k-1, as the CPU engine) and
//     x[r] += s. No atomics, deterministic.
//
// Every dot uses rowwarp_dot.cuh, as launch_matvec_rowwarp does, and the combine uses rounded
// (non-contractible) multiply/add, so the unfused path (per-expert matvec_rowwarp + swiglu +
// axpy launches) gives bit-identical results. An id outside [0, n_experts) gives NaN outputs.
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/rowwarp_dot.cuh"
#include "ktune/engine/cuda/kernels.h"

namespace ktune::cuda {
namespace {

constexpr int kWarps = 4;

template <QuantType T>
__global__ void moe_gate_up_kernel(const uint8_t* __restrict__ gate, const uint8_t* __restrict__ up,
                                   int64_t expert_bytes, const int32_t* __restrict__ ids,
                                   int n_experts, const float* __restrict__ x, int ffn, int nb,
                                   int64_t row_bytes, float* __restrict__ act,
                                   const int32_t* __restrict__ slot_of) {
  const int j = blockIdx.y;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / detail::kWarp;
  if (r >= ffn) return;
  const int id = ids[j];
  float* out = act + static_cast<int64_t>(j) * ffn + r;
  if (id < 0 || id >= n_experts) {
    if (threadIdx.x % detail::kWarp == 0) *out = __int_as_float(0x7fc00000);
    return;
  }
  const int slot = slot_of ? slot_of[id] : id;
  if (slot < 0) {  // an expert the placement keeps elsewhere (the CPU): not computed here
    if (threadIdx.x % detail::kWarp == 0) *out = 0.0f;
    return;
  }
  const int64_t off = slot * expert_bytes + r * row_bytes;
  const uint8_t* const rp[2] = {gate + off, up + off};
  const float* const xp[2] = {x, x};
  float gu[2];
  detail::warp_rows_dot<T, 2>(rp, xp, nb, gu);
  if (threadIdx.x % detail::kWarp == 0) *out = detail::swiglu(gu[0], gu[1]);
}

// Down + weighted sum: a block of 8 warps owns kDownRows = 4 output rows; warp w computes row
// w % 4 for the expert slots of half w / 4 (slots [0, k0) and [k0, k), k0 = ceil(k / 2)), 4 at a
// time, and parks the dots in shared memory; then one thread per row sums w[j] * dot_j in slot
// order (j = 0..k-1, rounded multiply then add, as the unfused axpy launches) and adds it to x.
constexpr int kDownRows = 4;
constexpr int kDownThreads = 2 * kDownRows * detail::kWarp;

template <QuantType T, bool Masked>
__global__ void __launch_bounds__(kDownThreads)
    moe_down_kernel(const uint8_t* __restrict__ down, int64_t expert_bytes,
                    const int32_t* __restrict__ ids, const float* __restrict__ wts, int k,
                    int n_experts, const float* __restrict__ act, int hidden, int ffn, int nb,
                    int64_t row_bytes, float* __restrict__ x, const int32_t* __restrict__ slot_of) {
  extern __shared__ float dots[];  // [kDownRows][k]
  const int warp = threadIdx.x / detail::kWarp;
  const int rl = warp % kDownRows;
  const int half = warp / kDownRows;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kDownRows + rl;
  const int k0 = (k + 1) / 2;
  const int jb = half == 0 ? 0 : k0;
  const int je = half == 0 ? k0 : k;
  if (Masked && r < hidden) {
    // Only the slots whose expert lives here (slot_of[id] >= 0), gathered 4 at a time in slot
    // order; the warp reads the same ids, so the control flow is warp-uniform.
    float* dr = dots + rl * k;
    int j = jb;
    while (j < je) {
      int js[4], ss[4], cnt = 0;
      for (; j < je && cnt < 4; ++j) {
        const int id = ids[j];
        const int sl = (id < 0 || id >= n_experts) ? -1 : slot_of[id];
        if (sl >= 0) {
          js[cnt] = j;
          ss[cnt] = sl;
          ++cnt;
        }
      }
      if (cnt == 4) {
        const uint8_t* rp[4];
        const float* xp[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          rp[i] = down + ss[i] * expert_bytes + r * row_bytes;
          xp[i] = act + static_cast<int64_t>(js[i]) * ffn;
        }
        float d[4];
        detail::warp_rows_dot<T, 4>(rp, xp, nb, d);
        if (threadIdx.x % detail::kWarp == 0) {
#pragma unroll
          for (int i = 0; i < 4; ++i) dr[js[i]] = d[i];
        }
      } else {
        for (int i = 0; i < cnt; ++i) {
          const uint8_t* const rp[1] = {down + ss[i] * expert_bytes + r * row_bytes};
          const float* const xp[1] = {act + static_cast<int64_t>(js[i]) * ffn};
          float d[1];
          detail::warp_rows_dot<T, 1>(rp, xp, nb, d);
          if (threadIdx.x % detail::kWarp == 0) dr[js[i]] = d[0];
        }
      }
    }
  }
  if (!Masked && r < hidden) {
    float* dr = dots + rl * k;
    int j = jb;
    for (; j + 4 <= je; j += 4) {
      const uint8_t* rp[4];
      const float* xp[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        int id = ids[j + i];
        if (id < 0 || id >= n_experts) id = 0;
        rp[i] = down + id * expert_bytes + r * row_bytes;
        xp[i] = act + static_cast<int64_t>(j + i) * ffn;
      }
      float d[4];
      detail::warp_rows_dot<T, 4>(rp, xp, nb, d);
      if (threadIdx.x % detail::kWarp == 0) {
#pragma unroll
        for (int i = 0; i < 4; ++i) dr[j + i] = d[i];
      }
    }
    for (; j < je; ++j) {
      int id = ids[j];
      if (id < 0 || id >= n_experts) id = 0;
      const uint8_t* const rp[1] = {down + id * expert_bytes + r * row_bytes};
      const float* const xp[1] = {act + static_cast<int64_t>(j) * ffn};
      float d[1];
      detail::warp_rows_dot<T, 1>(rp, xp, nb, d);
      if (threadIdx.x % detail::kWarp == 0) dr[j] = d[0];
    }
  }
  __syncthreads();
  if (threadIdx.x < kDownRows) {
    const int64_t ro = static_cast<int64_t>(blockIdx.x) * kDownRows + threadIdx.x;
    if (ro < hidden) {
      const float* dr = dots + threadIdx.x * k;
      float s = 0.0f;
      bool bad = false;
      for (int j = 0; j < k; ++j) {
        const int id = ids[j];
        const bool b = id < 0 || id >= n_experts;
        bad = bad || b;
        if (Masked && (b || slot_of[id] < 0)) continue;  // summed by the expert's own device
        s = __fadd_rn(s, __fmul_rn(wts[j], dr[j]));
      }
      x[ro] = bad ? __int_as_float(0x7fc00000) : __fadd_rn(x[ro], s);
    }
  }
}

bool moe_args_ok(QuantType type, const void* w, int64_t expert_bytes, const float* x, int64_t k,
                 int64_t n_experts, int64_t rows, int64_t cols) {
  return detail::rowdot_supported(type) && w != nullptr && detail::rowdot_aligned(type, w) &&
         (reinterpret_cast<uintptr_t>(x) & 15u) == 0 && k >= 1 && k <= 65535 && n_experts >= 1 &&
         rows >= 1 && rows <= 0x7fffffff && cols > 0 && cols % 32 == 0 && cols <= (1 << 28) &&
         expert_bytes >= rows * row_bytes(type, cols) &&
         detail::rowdot_aligned(type, reinterpret_cast<const void*>(expert_bytes));
}

template <bool Masked>
void launch_down(QuantType type, unsigned grid, size_t smem, cudaStream_t stream,
                 const uint8_t* d, int64_t expert_bytes, const int32_t* ids, const float* weights,
                 int kk, int ne, const float* act, int h, int f, int nb, int64_t rb, float* x,
                 const int32_t* slot) {
  switch (type) {
    case QuantType::Q8_0:
      moe_down_kernel<QuantType::Q8_0, Masked><<<grid, kDownThreads, smem, stream>>>(
          d, expert_bytes, ids, weights, kk, ne, act, h, f, nb, rb, x, slot);
      break;
    case QuantType::Q4_0:
      moe_down_kernel<QuantType::Q4_0, Masked><<<grid, kDownThreads, smem, stream>>>(
          d, expert_bytes, ids, weights, kk, ne, act, h, f, nb, rb, x, slot);
      break;
    case QuantType::BF16:
      moe_down_kernel<QuantType::BF16, Masked><<<grid, kDownThreads, smem, stream>>>(
          d, expert_bytes, ids, weights, kk, ne, act, h, f, nb, rb, x, slot);
      break;
    default:
      moe_down_kernel<QuantType::F32, Masked><<<grid, kDownThreads, smem, stream>>>(
          d, expert_bytes, ids, weights, kk, ne, act, h, f, nb, rb, x, slot);
      break;
  }
}

}  // namespace

cudaError_t launch_moe_gate_up_swiglu(QuantType type, const void* gate, const void* up,
                                      int64_t expert_bytes, const int32_t* ids, int64_t k,
                                      int64_t n_experts, const float* x, int64_t ffn,
                                      int64_t hidden, float* act, cudaStream_t stream,
                                      const int32_t* expert_slot) {
  if (!moe_args_ok(type, gate, expert_bytes, x, k, n_experts, ffn, hidden) || up == nullptr ||
      !detail::rowdot_aligned(type, up)) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(static_cast<unsigned>((ffn + kWarps - 1) / kWarps), static_cast<unsigned>(k));
  const int nb = static_cast<int>(hidden / 32);
  const int64_t rb = row_bytes(type, hidden);
  const auto* g = static_cast<const uint8_t*>(gate);
  const auto* u = static_cast<const uint8_t*>(up);
  const int ne = static_cast<int>(std::min<int64_t>(n_experts, 0x7fffffff));
  const int f = static_cast<int>(ffn);
  switch (type) {
    case QuantType::Q8_0:
      moe_gate_up_kernel<QuantType::Q8_0>
          <<<grid, 32 * kWarps, 0, stream>>>(g, u, expert_bytes, ids, ne, x, f, nb, rb, act,
                                                             expert_slot);
      break;
    case QuantType::Q4_0:
      moe_gate_up_kernel<QuantType::Q4_0>
          <<<grid, 32 * kWarps, 0, stream>>>(g, u, expert_bytes, ids, ne, x, f, nb, rb, act,
                                                             expert_slot);
      break;
    case QuantType::BF16:
      moe_gate_up_kernel<QuantType::BF16>
          <<<grid, 32 * kWarps, 0, stream>>>(g, u, expert_bytes, ids, ne, x, f, nb, rb, act,
                                                             expert_slot);
      break;
    default:
      moe_gate_up_kernel<QuantType::F32>
          <<<grid, 32 * kWarps, 0, stream>>>(g, u, expert_bytes, ids, ne, x, f, nb, rb, act,
                                                             expert_slot);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_moe_down_sum(QuantType type, const void* down, int64_t expert_bytes,
                                const int32_t* ids, const float* weights, int64_t k,
                                int64_t n_experts, const float* act, int64_t hidden, int64_t ffn,
                                float* x, cudaStream_t stream, const int32_t* expert_slot) {
  if (!moe_args_ok(type, down, expert_bytes, act, k, n_experts, hidden, ffn) || (ffn % 4) != 0) {
    return cudaErrorInvalidValue;
  }
  if (k > 2048) return cudaErrorInvalidValue;  // dots of 4 rows in shared memory
  const unsigned grid = static_cast<unsigned>((hidden + kDownRows - 1) / kDownRows);
  const size_t smem = static_cast<size_t>(kDownRows * k) * sizeof(float);
  const int nb = static_cast<int>(ffn / 32);
  const int64_t rb = row_bytes(type, ffn);
  const auto* d = static_cast<const uint8_t*>(down);
  const int ne = static_cast<int>(std::min<int64_t>(n_experts, 0x7fffffff));
  const int kk = static_cast<int>(k);
  const int h = static_cast<int>(hidden);
  const int f = static_cast<int>(ffn);
  if (expert_slot != nullptr) {
    launch_down<true>(type, grid, smem, stream, d, expert_bytes, ids, weights, kk, ne, act, h, f,
                      nb, rb, x, expert_slot);
  } else {
    launch_down<false>(type, grid, smem, stream, d, expert_bytes, ids, weights, kk, ne, act, h, f,
                       nb, rb, x, nullptr);
  }
  return cudaGetLastError();
}

}  // namespace ktune::cuda
