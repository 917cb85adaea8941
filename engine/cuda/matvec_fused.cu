// The decode engine's matvec (launch_matvec_fused, kernels.h): up to three matrices of one type
// and width as one launch over their concatenated rows (q/k/v), an optional RMSNorm prologue
// (x -> w * (x * r), the same arithmetic as launch_rmsnorm), an optional residual epilogue
// (y[r] = y[r] + dot) and an optional router tail (the last block to finish runs softmax top-k
// over the logits it just produced), so a layer's attention input, o projection + residual and
// ffn norm + router + top-k are one launch each.
//
// Shape: a persistent grid (blocks per SM from the occupancy calculator) of 8-warp blocks; x (or
// its normalized form) is staged once per block in shared memory; a warp owns R consecutive rows
// (R = 1, 2 or 4 by the row count) and computes them with the rowwarp_dot.cuh layout (lane 4j+s
// takes slice s of block j of each 8-block step), issuing the weight loads of kUnroll steps x R
// rows before the first multiply; x comes from shared memory once per step for all R rows.
// Groups of R rows go round-robin over the blocks (group g -> block g % grid), so every SM gets
// the same share of a small matrix. Fixed-order sums (per-lane fmaf chain, warp butterfly):
// deterministic; a row's value does not depend on R, the grid or the other rows.
//
// Router tail: each block fences its writes and bumps a device counter; the block that sees
// gridDim.x - 1 reads the logits through L2 and runs router_topk.cuh with one warp, then resets
// the counter to 0 (so a captured graph replays it). Integer atomics only: deterministic.
#include <algorithm>
#include <mutex>

#include "cuda/common.cuh"
#include "cuda/router_topk.cuh"
#include "cuda/rowwarp_dot.cuh"
#include "ktune/engine/cuda/kernels.h"

namespace ktune::cuda {
namespace {

constexpr int kMvWarps = 8;
constexpr int kMvThreads = kMvWarps * detail::kWarp;
constexpr int kMaxSmemBytes = 48 * 1024;

struct MvParams {
  const uint8_t* w[3];
  float* y[3];
  int rows_end[3];  // cumulative row counts of the segments
  int total_rows;
  int cols;
  int nb;
  int64_t row_bytes;
  const float* x;
  const float* norm_w;
  float eps;
  float* norm_out;
  int accumulate;
  int32_t* topk_ids;
  float* topk_w;
  int topk_k;
  int topk_norm;
  unsigned* counter;
};

template <QuantType T, int R>
__global__ void __launch_bounds__(kMvThreads, 2) matvec_fused_kernel(const MvParams p) {
  using D = detail::RowDot<T>;
  constexpr int U = D::kUnroll;
  extern __shared__ float4 smem4[];
  float* sx = reinterpret_cast<float*>(smem4);  // cols floats (+ router scratch)
  __shared__ float red[32];
  __shared__ int32_t sel_id[detail::kRouterMaxK];
  __shared__ float sel_w[detail::kRouterMaxK];
  __shared__ int is_last;

  // ---- stage x (normalized when norm_w) ----
  if (p.norm_w != nullptr) {
    float ss = 0.0f;
    for (int i = threadIdx.x; i < p.cols; i += kMvThreads) ss = fmaf(p.x[i], p.x[i], ss);
    ss = detail::block_sum(ss, red);
    const float mean = ss / static_cast<float>(p.cols);
    const float r = 1.0f / sqrtf(mean + p.eps);
    const bool out = p.norm_out != nullptr && blockIdx.x == 0;
    for (int i = threadIdx.x; i < p.cols; i += kMvThreads) {
      const float v = p.norm_w[i] * (p.x[i] * r);
      sx[i] = v;
      if (out) p.norm_out[i] = v;
    }
  } else {
    for (int i = threadIdx.x; i < p.cols; i += kMvThreads) sx[i] = p.x[i];
  }
  __syncthreads();

  // ---- rows ----
  const int warp = threadIdx.x / detail::kWarp;
  const int lane = threadIdx.x % detail::kWarp;
  const int s = lane & 3;
  const int groups = (p.total_rows + R - 1) / R;
  for (int g = blockIdx.x + warp * gridDim.x; g < groups; g += gridDim.x * kMvWarps) {
    const uint8_t* rows[R];
    float* outp[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      int rr = g * R + r;
      const bool valid = rr < p.total_rows;
      if (!valid) rr = p.total_rows - 1;
      const int si = rr < p.rows_end[0] ? 0 : (rr < p.rows_end[1] ? 1 : 2);
      const int local = rr - (si == 0 ? 0 : p.rows_end[si - 1]);
      rows[r] = p.w[si] + static_cast<int64_t>(local) * p.row_bytes;
      outp[r] = valid ? p.y[si] + local : nullptr;
    }
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.0f;
    for (int b0 = lane >> 2; b0 < p.nb; b0 += 8 * U) {
      typename D::Frag f[U][R];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (b0 + 8 * u < p.nb) {
#pragma unroll
          for (int r = 0; r < R; ++r) f[u][r] = D::load(rows[r], b0 + 8 * u, s);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (b0 + 8 * u < p.nb) {
          float xv[8];
          detail::load_x8<T, false>(sx, b0 + 8 * u, s, xv);
#pragma unroll
          for (int r = 0; r < R; ++r) acc[r] = D::dot(acc[r], f[u][r], xv);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float v = detail::warp_sum(acc[r]);
      if (lane == 0 && outp[r] != nullptr) *outp[r] = p.accumulate ? __fadd_rn(*outp[r], v) : v;
    }
  }

  // ---- router tail: the last block runs top-k over segment 0's outputs ----
  if (p.counter == nullptr) return;  // uniform over the grid
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(p.counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  if (warp == 0) {
    detail::warp_router_topk(p.y[0], p.rows_end[0], p.topk_k, p.topk_norm != 0, p.topk_ids,
                             p.topk_w, nullptr, sx + p.cols, sel_id, sel_w);
  }
  if (threadIdx.x == 0) *p.counter = 0u;
}

template <QuantType T, int R>
void* kernel_ptr() {
  return reinterpret_cast<void*>(&matvec_fused_kernel<T, R>);
}

int type_index(QuantType t) {
  switch (t) {
    case QuantType::Q8_0:
      return 0;
    case QuantType::Q4_0:
      return 1;
    case QuantType::BF16:
      return 2;
    default:
      return 3;
  }
}
int r_index(int R) { return R == 1 ? 0 : (R == 2 ? 1 : 2); }

// SM count and resident blocks per SM of each instantiation, queried once (outside any capture:
// matvec_fused_prepare, or the first launch).
struct Occupancy {
  std::once_flag once;
  cudaError_t err = cudaSuccess;
  int sms = 0;
  int blocks[4][3] = {};
};
Occupancy& occupancy() {
  static Occupancy o;
  return o;
}

cudaError_t query_occupancy() {
  Occupancy& o = occupancy();
  std::call_once(o.once, [&o] {
    int dev = 0;
    o.err = cudaGetDevice(&dev);
    if (o.err == cudaSuccess) {
      o.err = cudaDeviceGetAttribute(&o.sms, cudaDevAttrMultiProcessorCount, dev);
    }
    void* fns[4][3] = {{kernel_ptr<QuantType::Q8_0, 1>(), kernel_ptr<QuantType::Q8_0, 2>(),
                        kernel_ptr<QuantType::Q8_0, 4>()},
                       {kernel_ptr<QuantType::Q4_0, 1>(), kernel_ptr<QuantType::Q4_0, 2>(),
                        kernel_ptr<QuantType::Q4_0, 4>()},
                       {kernel_ptr<QuantType::BF16, 1>(), kernel_ptr<QuantType::BF16, 2>(),
                        kernel_ptr<QuantType::BF16, 4>()},
                       {kernel_ptr<QuantType::F32, 1>(), kernel_ptr<QuantType::F32, 2>(),
                        kernel_ptr<QuantType::F32, 4>()}};
    for (int t = 0; t < 4 && o.err == cudaSuccess; ++t) {
      for (int r = 0; r < 3 && o.err == cudaSuccess; ++r) {
        // Sized for the largest staging the launcher allows, so the grid is always resident.
        o.err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&o.blocks[t][r], fns[t][r],
                                                              kMvThreads, 16 * 1024);
        o.blocks[t][r] = std::max(1, o.blocks[t][r]);
      }
    }
  });
  return o.err;
}

template <int R>
void launch_r(QuantType type, unsigned grid, size_t smem, const MvParams& p, cudaStream_t st) {
  switch (type) {
    case QuantType::Q8_0:
      matvec_fused_kernel<QuantType::Q8_0, R><<<grid, kMvThreads, smem, st>>>(p);
      break;
    case QuantType::Q4_0:
      matvec_fused_kernel<QuantType::Q4_0, R><<<grid, kMvThreads, smem, st>>>(p);
      break;
    case QuantType::BF16:
      matvec_fused_kernel<QuantType::BF16, R><<<grid, kMvThreads, smem, st>>>(p);
      break;
    default:
      matvec_fused_kernel<QuantType::F32, R><<<grid, kMvThreads, smem, st>>>(p);
      break;
  }
}

}  // namespace

cudaError_t matvec_fused_prepare() { return query_occupancy(); }

cudaError_t launch_matvec_fused(const MatvecFused& a, cudaStream_t stream) {
  if (!detail::rowdot_supported(a.type) || a.cols <= 0 || a.cols % 32 != 0 || a.n_seg < 1 ||
      a.n_seg > 3 || a.x == nullptr || (a.norm_out != nullptr && a.norm_w == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const bool topk = a.topk_ids != nullptr;
  if (topk && (a.topk_w == nullptr || a.counter == nullptr || a.topk_k < 1 ||
               a.topk_k > detail::kRouterMaxK || a.topk_k > a.seg[0].rows || a.seg[0].rows > 1024 ||
               a.accumulate)) {
    return cudaErrorInvalidValue;
  }
  const int64_t smem_floats = a.cols + (topk ? a.seg[0].rows : 0);
  if (smem_floats * 4 > kMaxSmemBytes) {
    return cudaErrorInvalidValue;
  }
  MvParams p{};
  int64_t total = 0;
  for (int i = 0; i < 3; ++i) {
    if (i < a.n_seg) {
      const MatvecSegment& sg = a.seg[i];
      if (sg.w == nullptr || sg.y == nullptr || sg.rows < 0 ||
          !detail::rowdot_aligned(a.type, sg.w)) {
        return cudaErrorInvalidValue;
      }
      p.w[i] = static_cast<const uint8_t*>(sg.w);
      p.y[i] = sg.y;
      total += sg.rows;
    } else {
      p.w[i] = p.w[0];
      p.y[i] = p.y[0];
    }
    if (total > 0x7ffffff0) return cudaErrorInvalidValue;
    p.rows_end[i] = static_cast<int>(total);
  }
  if (total == 0) return cudaSuccess;
  if (cudaError_t e = query_occupancy(); e != cudaSuccess) return e;
  p.total_rows = static_cast<int>(total);
  p.cols = static_cast<int>(a.cols);
  p.nb = static_cast<int>(a.cols / 32);
  p.row_bytes = row_bytes(a.type, a.cols);
  p.x = a.x;
  p.norm_w = a.norm_w;
  p.eps = a.eps;
  p.norm_out = a.norm_out;
  p.accumulate = a.accumulate ? 1 : 0;
  p.topk_ids = a.topk_ids;
  p.topk_w = a.topk_w;
  p.topk_k = static_cast<int>(a.topk_k);
  p.topk_norm = a.topk_norm ? 1 : 0;
  p.counter = topk ? a.counter : nullptr;

  int R = a.rows_per_warp;
  if (R != 1 && R != 2 && R != 4) R = total >= 32768 ? 4 : (total >= 4096 ? 2 : 1);
  const Occupancy& o = occupancy();
  const int64_t groups = (total + R - 1) / R;
  const int64_t resident = static_cast<int64_t>(o.sms) * o.blocks[type_index(a.type)][r_index(R)];
  const unsigned grid = static_cast<unsigned>(std::max<int64_t>(1, std::min(groups, resident)));
  const size_t smem = static_cast<size_t>(smem_floats) * sizeof(float);
  if (R == 1) {
    launch_r<1>(a.type, grid, smem, p, stream);
  } else if (R == 2) {
    launch_r<2>(a.type, grid, smem, p, stream);
  } else {
    launch_r<4>(a.type, grid, smem, p, stream);
  }
  return cudaGetLastError();
}

}  // namespace ktune::cuda
