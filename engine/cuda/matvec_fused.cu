// The decode engine's matvec (launch_matvec_fused, kernels.h): up to three matrices of one type
// and width as one launch over their concatenated rows (q/k/v), an optional RMSNorm prologue
// (x -> w * (x * r), the same arithmetic as launch_rmsnorm), an optional residual epilogue
// (y[r] = y[r] + dot), an optional router tail (the last block to finish runs softmax top-k over
// the logits just produced) and an optional greedy tail (argmax of the outputs, then the end-of-
// step advance), so a layer's attention input, o projection + residual and ffn norm + router +
// top-k, and the step's output head + sampling, are one launch each.
//
// Why this shape: a decode matvec moves 1-10 MB, a few microseconds of HBM time, so what costs is
// latency: the launch, the round trips of dependent loads, the tail. Here
//  - each block owns a contiguous range of rows (one block per SM for the small matrices), and
//    copies them to shared memory with cp.async (all bytes in flight at once; row tiles through
//    a 3-stage ring when they do not fit, the output head);
//  - those copies are issued before pdl_wait() (common.cuh): weights do not depend on the previous
//    kernel, so with programmatic dependent launch they stream while it finishes;
//  - only then is x read (normalized when norm_w) into shared memory, and each warp computes R
//    rows at a time from shared memory with the rowwarp_dot.cuh layout.
// Fixed-order sums (per-lane fmaf chain, warp butterfly): deterministic; a row's value does not
// depend on R, the grid or the other rows.
//
// Tails: each block fences its writes and bumps a device counter; the block that sees
// gridDim.x - 1 finishes the job and resets the counter to 0 (so a captured graph replays it).
// Router: router_topk.cuh's block version over the logits (read through L2). Greedy: every block
// folds its rows into one 64-bit key (value bits in total order, then the complemented index, so
// integer max = largest value, lowest index on ties; NaN = 0, never chosen) with atomicMax;
// the last block decodes it (-1 when every value was NaN), writes the token, records it in the
// history at *pos and bumps *pos. Integer atomics only: deterministic.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>

#include "cuda/common.cuh"
#include "cuda/per_device.cuh"
#include "cuda/router_topk.cuh"
#include "cuda/rowwarp_dot.cuh"
#include "ktune/engine/cuda/kernels.h"

namespace ktune::cuda {

namespace detail {

bool pdl_enabled(cudaStream_t stream) {
  if (stream == nullptr) return false;
  // Opt-in (KTUNE_PDL=1): on the H100 the whole decode step measured slower with it (267.5 vs
  // 286.0 tok/s, qwen3-30b-a3b Q4_0, commit 5b41d24), so plain stream order is the default.
  static const bool allowed = [] {
    const char* e = std::getenv("KTUNE_PDL");
    return e != nullptr && e[0] == '1';
  }();
  if (!allowed) return false;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  // Per device: 0 = not asked yet, 1 = no (before sm_90), 2 = yes.
  static std::atomic<int> cache[64];
  int c = cache[dev].load(std::memory_order_relaxed);
  if (c == 0) {
    int major = 0;
    c = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                major >= 9
            ? 2
            : 1;
    cache[dev].store(c, std::memory_order_relaxed);
  }
  return c == 2;
}

}  // namespace detail

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / detail::kWarp;
constexpr int kStages = 3;
// One tile per block up to this many bytes of rows; beyond it tiles of kTileBytes in the ring.
constexpr int64_t kSingleTileBytes = 64 * 1024;
constexpr int64_t kTileBytes = 40 * 1024;
constexpr int kMaxSmemBytes = 200 * 1024;

struct MvParams {
  const uint8_t* w[3];
  float* y[3];
  int rows_end[3];  // cumulative row counts of the segments
  int total_rows;
  int cols;
  int nb;
  int row_bytes;
  int rows_per_block;
  int tile_rows;
  int stage_bytes;  // tile_rows * row_bytes rounded up to 16
  int n_stages;     // stage buffers in shared memory: min(tiles of a block, kStages)
  const float* x;
  const float* norm_w;
  float eps;
  float* norm_out;
  int accumulate;
  int32_t* topk_ids;
  float* topk_w;
  int topk_k;
  int topk_norm;
  int32_t* topk_counts;
  unsigned* counter;
  unsigned long long* argmax_key;
  int32_t* argmax_out;
  int32_t* advance_pos;
  int32_t* advance_history;
  int advance_len;
};

// Total order on floats as unsigned (larger value -> larger key); NaN -> 0.
__device__ __forceinline__ unsigned long long argmax_key(float v, int idx) {
  if (v != v) return 0ull;
  if (v == 0.0f) v = 0.0f;  // -0 and +0 tie, as the float comparison of launch_argmax
  const uint32_t b = __float_as_uint(v);
  const uint32_t o = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return (static_cast<unsigned long long>(o) << 32) |
         static_cast<unsigned long long>(0xffffffffu - static_cast<uint32_t>(idx));
}

// Issues the cp.async copies of tile t (rows [r0 + t*tile_rows, ...) of this block) into `dst`.
__device__ __forceinline__ void issue_tile(const MvParams& p, int r_begin, int r_end, int t,
                                           uint8_t* dst) {
  const int a0 = r_begin + t * p.tile_rows;
  const int a1 = min(a0 + p.tile_rows, r_end);
  int seg_start = 0;
  for (int si = 0; si < 3; ++si) {
    const int seg_end = p.rows_end[si];
    const int a = max(a0, seg_start), b = min(a1, seg_end);
    if (a < b) {
      detail::copy_to_smem_async(dst + static_cast<int64_t>(a - a0) * p.row_bytes,
                                 p.w[si] + static_cast<int64_t>(a - seg_start) * p.row_bytes,
                                 static_cast<int64_t>(b - a) * p.row_bytes);
    }
    seg_start = seg_end;
  }
}

template <QuantType T, int R>
__global__ void __launch_bounds__(kThreads) matvec_fused_kernel(const MvParams p) {
  extern __shared__ float4 smem4[];
  uint8_t* stages = reinterpret_cast<uint8_t*>(smem4);
  float* sx = reinterpret_cast<float*>(stages + static_cast<int64_t>(p.n_stages) * p.stage_bytes);
  __shared__ float red[32];
  __shared__ int32_t sel_id[detail::kRouterMaxK];
  __shared__ float sel_w[detail::kRouterMaxK];
  __shared__ unsigned long long warp_key[kWarps];
  __shared__ int is_last;

  const int r_begin = blockIdx.x * p.rows_per_block;
  const int r_end = min(r_begin + p.rows_per_block, p.total_rows);
  const int nrows = max(0, r_end - r_begin);
  const int ntiles = (nrows + p.tile_rows - 1) / p.tile_rows;

  // ---- weights first: they do not depend on the previous kernel ----
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < ntiles) issue_tile(p, r_begin, r_end, t, stages + t * p.stage_bytes);
    detail::cp_async_commit();
  }
  detail::pdl_wait();

  // ---- stage x (normalized when norm_w), permuted for conflict-free reads ----
  detail::stage_x_perm<T>(sx, p.x, p.cols, p.cols, p.norm_w, p.eps,
                          blockIdx.x == 0 ? p.norm_out : nullptr, red);

  // ---- rows, tile by tile ----
  const int warp = threadIdx.x / detail::kWarp;
  const int lane = threadIdx.x % detail::kWarp;
  unsigned long long best = 0ull;
  for (int t = 0; t < ntiles; ++t) {
    if (t + kStages - 1 < ntiles) {
      issue_tile(p, r_begin, r_end, t + kStages - 1,
                 stages + ((t + kStages - 1) % kStages) * p.stage_bytes);
    }
    detail::cp_async_commit();
    detail::cp_async_wait<kStages - 1>();
    __syncthreads();  // tile t (and, the first time, sx) visible to every warp
    const uint8_t* base = stages + (t % kStages) * p.stage_bytes;
    const int t0 = r_begin + t * p.tile_rows;
    const int tn = min(p.tile_rows, r_end - t0);
    for (int g = warp * R; g < tn; g += kWarps * R) {
      const uint8_t* rows[R];
      const float* xv[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        rows[r] = base + static_cast<int64_t>(min(g + r, tn - 1)) * p.row_bytes;
        xv[r] = sx;
      }
      float out[R];
      detail::warp_rows_dot_smem<T, R, true>(rows, xv, p.nb, out);
      if (lane == 0) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (g + r >= tn) break;
          const int rr = t0 + g + r;
          const int si = rr < p.rows_end[0] ? 0 : (rr < p.rows_end[1] ? 1 : 2);
          float* y = p.y[si] + (rr - (si == 0 ? 0 : p.rows_end[si - 1]));
          const float v = p.accumulate ? __fadd_rn(*y, out[r]) : out[r];
          *y = v;
          if (p.argmax_key != nullptr) best = max(best, argmax_key(v, rr));
        }
      }
    }
    __syncthreads();  // everyone is done with this stage before it is refilled
  }
  // The next launch may start now (its weight copies overlap this kernel's tail).
  detail::pdl_trigger();

  if (p.counter == nullptr) return;  // uniform over the grid
  if (p.argmax_key != nullptr) {
    if (lane == 0) warp_key[warp] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned long long b = 0ull;
      for (int w = 0; w < kWarps; ++w) b = max(b, warp_key[w]);
      if (b != 0ull) atomicMax(p.argmax_key, b);
    }
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(p.counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  if (p.topk_ids != nullptr) {  // the whole (last) block: is_last is uniform over it
    detail::block_router_topk(p.y[0], p.rows_end[0], p.topk_k, p.topk_norm != 0, p.topk_ids,
                              p.topk_w, sx + p.cols, sel_id, sel_w, p.topk_counts);
  }
  if (threadIdx.x == 0) {
    if (p.argmax_key != nullptr) {
      const unsigned long long key = atomicExch(p.argmax_key, 0ull);
      const int32_t tok =
          key == 0ull ? -1 : static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(key));
      *p.argmax_out = tok;
      if (p.advance_pos != nullptr) {
        const int pos = *p.advance_pos;
        if (pos >= 0 && pos < p.advance_len) p.advance_history[pos] = tok;
        *p.advance_pos = pos + 1;
      }
    }
    *p.counter = 0u;
  }
}

template <QuantType T, int R>
void* kernel_ptr() {
  return reinterpret_cast<void*>(&matvec_fused_kernel<T, R>);
}

// SM count and the shared-memory opt-in of each instantiation, once (outside any capture:
// matvec_fused_prepare, or the first launch).
struct Setup {
  std::once_flag once;
  cudaError_t err = cudaSuccess;
  int sms = 0;
  int smem_limit = 0;  // dynamic shared memory per block the kernels may ask for
};
// One Setup per device (the opt-in is per device context; cuda/per_device.cuh).
Setup& setup() {
  static Setup s[detail::kMaxSetupDevices];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= detail::kMaxSetupDevices) {
    cudaGetLastError();
    dev = detail::kMaxSetupDevices - 1;
  }
  return s[dev];
}

cudaError_t run_setup() {
  Setup& s = setup();
  std::call_once(s.once, [&s] {
    int dev = 0;
    s.err = cudaGetDevice(&dev);
    if (s.err == cudaSuccess) {
      s.err = cudaDeviceGetAttribute(&s.sms, cudaDevAttrMultiProcessorCount, dev);
    }
    int optin = 0;
    if (s.err == cudaSuccess) {
      s.err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    }
    s.smem_limit = std::min(kMaxSmemBytes, optin - 2048);  // static shared memory beside it
    void* fns[] = {kernel_ptr<QuantType::Q8_0, 1>(), kernel_ptr<QuantType::Q8_0, 2>(),
                   kernel_ptr<QuantType::Q8_0, 4>(), kernel_ptr<QuantType::Q4_0, 1>(),
                   kernel_ptr<QuantType::Q4_0, 2>(), kernel_ptr<QuantType::Q4_0, 4>(),
                   kernel_ptr<QuantType::BF16, 1>(), kernel_ptr<QuantType::BF16, 2>(),
                   kernel_ptr<QuantType::BF16, 4>(), kernel_ptr<QuantType::F32, 1>(),
                   kernel_ptr<QuantType::F32, 2>(),  kernel_ptr<QuantType::F32, 4>(),
                   kernel_ptr<QuantType::Q4_K, 1>(), kernel_ptr<QuantType::Q4_K, 2>(),
                   kernel_ptr<QuantType::Q4_K, 4>(), kernel_ptr<QuantType::Q5_K, 1>(),
                   kernel_ptr<QuantType::Q5_K, 2>(), kernel_ptr<QuantType::Q5_K, 4>(),
                   kernel_ptr<QuantType::Q6_K, 1>(), kernel_ptr<QuantType::Q6_K, 2>(),
                   kernel_ptr<QuantType::Q6_K, 4>()};
    for (void* f : fns) {
      if (s.err != cudaSuccess) break;
      s.err = cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, s.smem_limit);
    }
  });
  return s.err;
}

template <int R>
cudaError_t launch_r(QuantType type, unsigned grid, size_t smem, const MvParams& p,
                     cudaStream_t st) {
  return detail::with_rowdot_type(type, [&](auto tag) {
    return detail::launch_kernel(&matvec_fused_kernel<decltype(tag)::value, R>, grid, kThreads,
                                 smem, st, 1, p);
  });
}

}  // namespace

cudaError_t matvec_fused_prepare() { return run_setup(); }

cudaError_t launch_matvec_fused(const MatvecFused& a, cudaStream_t stream) {
  if (!detail::rowdot_supported(a.type) || !detail::rowdot_cols_ok(a.type, a.cols) ||
      a.cols > 16384 || a.n_seg < 1 || a.n_seg > 3 || a.x == nullptr ||
      (a.norm_out != nullptr && a.norm_w == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const bool topk = a.topk_ids != nullptr;
  const bool greedy = a.argmax_out != nullptr;
  if (topk && (a.topk_w == nullptr || a.counter == nullptr || a.topk_k < 1 ||
               a.topk_k > detail::kRouterMaxK || a.topk_k > a.seg[0].rows || a.seg[0].rows > 1024 ||
               a.accumulate || greedy)) {
    return cudaErrorInvalidValue;
  }
  if (greedy && (a.argmax_key == nullptr || a.counter == nullptr ||
                 (a.advance_pos != nullptr &&
                  (a.advance_history == nullptr || a.advance_len < 0 ||
                   a.advance_len > 0x7fffffff)))) {
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
  if (total == 0) return greedy || topk ? cudaErrorInvalidValue : cudaSuccess;
  if (cudaError_t e = run_setup(); e != cudaSuccess) return e;
  const int64_t rb = row_bytes(a.type, a.cols);

  // One block per SM (fewer for few rows); rows split evenly; one tile per block when its rows
  // fit kSingleTileBytes, else tiles of up to kTileBytes through the ring. Rows per block and
  // per tile are multiples of `gran`, so every run of rows copied starts 16-byte aligned and
  // moves by cp.async (Q6_K rows of 630 bytes would otherwise take the 2-byte copy path).
  const int64_t gran = detail::rows_per_16_bytes(rb);
  const int64_t sms = std::max(1, setup().sms);
  int64_t grid = std::min<int64_t>(total, sms);
  const int64_t rpb = ((total + grid - 1) / grid + gran - 1) / gran * gran;
  grid = (total + rpb - 1) / rpb;
  const int64_t x_bytes = 4 * (a.cols + (topk ? a.seg[0].rows : 0));
  const int64_t avail = setup().smem_limit - x_bytes;
  int64_t tile_rows =
      rpb * rb + 15 <= std::min(kSingleTileBytes, avail)
          ? rpb
          : std::max<int64_t>(gran, std::min(kTileBytes, avail / kStages - 15) / rb / gran * gran);
  tile_rows = std::min(tile_rows, rpb);
  // Streaming tiles: a whole number of 2-row groups per warp when they are that large.
  if (tile_rows < rpb && tile_rows >= 2 * kWarps) tile_rows -= tile_rows % (2 * kWarps);
  const int64_t tiles = (rpb + tile_rows - 1) / tile_rows;
  const int64_t stage_bytes = (tile_rows * rb + 15) / 16 * 16;
  const int64_t n_stages = std::min<int64_t>(tiles, kStages);
  const int64_t smem = n_stages * stage_bytes + x_bytes;
  if (smem > setup().smem_limit) return cudaErrorInvalidValue;

  p.total_rows = static_cast<int>(total);
  p.cols = static_cast<int>(a.cols);
  p.nb = static_cast<int>(a.cols / 32);
  p.row_bytes = static_cast<int>(rb);
  p.rows_per_block = static_cast<int>(rpb);
  p.tile_rows = static_cast<int>(tile_rows);
  p.stage_bytes = static_cast<int>(stage_bytes);
  p.n_stages = static_cast<int>(n_stages);
  p.x = a.x;
  p.norm_w = a.norm_w;
  p.eps = a.eps;
  p.norm_out = a.norm_out;
  p.accumulate = a.accumulate ? 1 : 0;
  p.topk_ids = a.topk_ids;
  p.topk_w = a.topk_w;
  p.topk_k = static_cast<int>(a.topk_k);
  p.topk_norm = a.topk_norm ? 1 : 0;
  p.topk_counts = topk ? a.topk_counts : nullptr;
  p.counter = topk || greedy ? a.counter : nullptr;
  p.argmax_key = greedy ? a.argmax_key : nullptr;
  p.argmax_out = a.argmax_out;
  p.advance_pos = greedy ? a.advance_pos : nullptr;
  p.advance_history = a.advance_history;
  p.advance_len = static_cast<int>(a.advance_len);

  int R = a.rows_per_warp;
  if (R != 1 && R != 2 && R != 4) R = tile_rows >= 2 * kWarps ? 2 : 1;
  const unsigned g = static_cast<unsigned>(grid);
  const size_t sm = static_cast<size_t>(smem);
  if (R == 1) return launch_r<1>(a.type, g, sm, p, stream);
  if (R == 2) return launch_r<2>(a.type, g, sm, p, stream);
  return launch_r<4>(a.type, g, sm, p, stream);
}

}  // namespace ktune::cuda
