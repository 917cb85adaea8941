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
//
// The decode engine's shape (staged kernels, used whenever their shared memory fits): one block
// of kStagedThreads per SM owns a contiguous range of work units - (expert slot j, ffn row r) for
// gate/up, output row r (all k experts) for down - and copies the units' weight rows to shared
// memory with cp.async, all of a tile's bytes in flight at once, tiles through a 3-stage ring;
// warps then compute from shared memory (warp_rows_dot_smem: the same per-lane order as
// warp_rows_dot, so fused == unfused still holds bit for bit). Programmatic dependent launch
// (common.cuh): gate/up can only start copying once the router's ids are visible (after
// pdl_wait), but down copies its rows before pdl_wait, while gate/up runs, from the ids the
// router wrote one launch earlier; after the wait it re-reads them and copies again if they
// changed (only possible when the caller launched something else in between), so it is correct
// whatever the launch order.
#include <algorithm>
#include <cstdlib>
#include <mutex>

#include "cuda/common.cuh"
#include "cuda/per_device.cuh"
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


// ---- staged kernels -------------------------------------------------------------------------

constexpr int kStagedThreads = 512;
constexpr int kStagedWarps = kStagedThreads / detail::kWarp;
constexpr int kStages = 3;
constexpr int64_t kSingleTileBytes = 64 * 1024;
constexpr int64_t kTileBytes = 32 * 1024;
constexpr int kMaxSmem = 200 * 1024;

struct Tiling {
  int per_block = 0, tile = 0, stage_bytes = 0, n_stages = 0, grid = 0;
};

// Units of unit_bytes each, split over one block per SM; units per block and per tile are
// multiples of `gran` (rowwarp_dot.cuh's rows_per_16_bytes), so the runs of rows the tiles copy
// start 16-byte aligned and move by cp.async.
Tiling make_tiling(int64_t units, int64_t unit_bytes, int sms, int64_t gran) {
  Tiling t;
  int64_t grid = std::min<int64_t>(units, std::max(1, sms));
  const int64_t per = ((units + grid - 1) / grid + gran - 1) / gran * gran;
  grid = (units + per - 1) / per;
  const int64_t tile =
      per * unit_bytes <= kSingleTileBytes
          ? per
          : std::min(per, std::max<int64_t>(gran, kTileBytes / unit_bytes / gran * gran));
  const int64_t tiles = (per + tile - 1) / tile;
  t.per_block = static_cast<int>(per);
  t.tile = static_cast<int>(tile);
  t.stage_bytes = static_cast<int>((tile * unit_bytes + 15) / 16 * 16);
  t.n_stages = static_cast<int>(std::min<int64_t>(tiles, kStages));
  t.grid = static_cast<int>(grid);
  return t;
}

struct GuParams {
  const uint8_t* gate;
  const uint8_t* up;
  int64_t expert_bytes;
  const int32_t* ids;
  const int32_t* slot_of;
  int k, n_experts, ffn, hidden, nb, row_bytes;
  const float* x;
  float* act;
  Tiling tl;
};

__device__ __forceinline__ int expert_slot(int id, int n_experts, const int32_t* slot_of) {
  if (id < 0 || id >= n_experts) return -2;  // bad id
  return slot_of ? slot_of[id] : id;         // -1: kept elsewhere
}

// Tile t of the block's units [u_begin, u_end): gate rows at stage, up rows at stage + tile*rb.
__device__ __forceinline__ void issue_gu_tile(const GuParams& p, int u_begin, int u_end, int t,
                                              uint8_t* stage) {
  const int a0 = u_begin + t * p.tl.tile;
  const int a1 = min(a0 + p.tl.tile, u_end);
  for (int j = a0 / p.ffn; j * p.ffn < a1; ++j) {
    const int a = max(a0, j * p.ffn), b = min(a1, (j + 1) * p.ffn);
    const int slot = expert_slot(p.ids[j], p.n_experts, p.slot_of);
    if (slot < 0) continue;
    const int64_t off = slot * p.expert_bytes + static_cast<int64_t>(a - j * p.ffn) * p.row_bytes;
    const int64_t len = static_cast<int64_t>(b - a) * p.row_bytes;
    uint8_t* dst = stage + static_cast<int64_t>(a - a0) * p.row_bytes;
    detail::copy_to_smem_async(dst, p.gate + off, len);
    detail::copy_to_smem_async(dst + static_cast<int64_t>(p.tl.tile) * p.row_bytes, p.up + off,
                               len);
  }
}

template <QuantType T>
__global__ void __launch_bounds__(kStagedThreads) moe_gate_up_staged(const GuParams p) {
  extern __shared__ float4 smem4[];
  uint8_t* stages = reinterpret_cast<uint8_t*>(smem4);
  float* sx = reinterpret_cast<float*>(stages + static_cast<int64_t>(p.tl.n_stages) *
                                                    p.tl.stage_bytes);
  const int total = p.k * p.ffn;
  const int u_begin = blockIdx.x * p.tl.per_block;
  const int u_end = min(u_begin + p.tl.per_block, total);
  const int ntiles = (u_end - u_begin + p.tl.tile - 1) / p.tl.tile;

  detail::pdl_wait();  // ids and x come from the router launch
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < ntiles) issue_gu_tile(p, u_begin, u_end, t, stages + t * p.tl.stage_bytes);
    detail::cp_async_commit();
  }
  __shared__ float red[32];
  detail::stage_x_perm<T>(sx, p.x, p.hidden, p.hidden, nullptr, 0.0f, nullptr, red);

  const int warp = threadIdx.x / detail::kWarp;
  const int lane = threadIdx.x % detail::kWarp;
  for (int t = 0; t < ntiles; ++t) {
    if (t + kStages - 1 < ntiles) {
      issue_gu_tile(p, u_begin, u_end, t + kStages - 1,
                    stages + ((t + kStages - 1) % kStages) * p.tl.stage_bytes);
    }
    detail::cp_async_commit();
    detail::cp_async_wait<kStages - 1>();
    __syncthreads();
    const uint8_t* base = stages + (t % kStages) * p.tl.stage_bytes;
    const int a0 = u_begin + t * p.tl.tile;
    const int tn = min(p.tl.tile, u_end - a0);
    for (int lu = warp; lu < tn; lu += kStagedWarps) {
      const int u = a0 + lu;
      const int j = u / p.ffn;
      const int slot = expert_slot(p.ids[j], p.n_experts, p.slot_of);
      float v;
      if (slot == -2) {
        v = __int_as_float(0x7fc00000);
      } else if (slot < 0) {
        v = 0.0f;
      } else {
        const uint8_t* const rows[2] = {base + static_cast<int64_t>(lu) * p.row_bytes,
                                        base + static_cast<int64_t>(p.tl.tile + lu) * p.row_bytes};
        const float* const xs[2] = {sx, sx};
        float gu[2];
        detail::warp_rows_dot_smem<T, 2, true>(rows, xs, p.nb, gu);
        v = detail::swiglu(gu[0], gu[1]);
      }
      if (lane == 0) p.act[u] = v;
    }
    __syncthreads();
  }
  detail::pdl_trigger();
}

struct DnParams {
  const uint8_t* down;
  int64_t expert_bytes;
  const int32_t* ids;
  const float* wts;
  const int32_t* slot_of;
  int k, n_experts, hidden, ffn, nb, row_bytes;
  const float* act;
  float* x;
  Tiling tl;
};

// Tile t of the block's output rows: expert slot j's rows at stage + j * tile * rb.
__device__ __forceinline__ void issue_dn_tile(const DnParams& p, const int* sslot, int r_begin,
                                              int r_end, int t, uint8_t* stage) {
  const int a0 = r_begin + t * p.tl.tile;
  const int a1 = min(a0 + p.tl.tile, r_end);
  for (int j = 0; j < p.k; ++j) {
    const int slot = sslot[j];
    if (slot < 0) continue;
    detail::copy_to_smem_async(
        stage + static_cast<int64_t>(j) * p.tl.tile * p.row_bytes,
        p.down + slot * p.expert_bytes + static_cast<int64_t>(a0) * p.row_bytes,
        static_cast<int64_t>(a1 - a0) * p.row_bytes);
  }
}

template <QuantType T>
__global__ void __launch_bounds__(kStagedThreads) moe_down_staged(const DnParams p) {
  extern __shared__ float4 smem4[];
  uint8_t* stages = reinterpret_cast<uint8_t*>(smem4);
  float* sact = reinterpret_cast<float*>(stages + static_cast<int64_t>(p.tl.n_stages) *
                                                      p.tl.stage_bytes);
  float* dots = sact + p.k * p.ffn;                               // [warps][k]
  float* swts = dots + kStagedWarps * p.k;                        // [k]
  int* sids = reinterpret_cast<int*>(swts + p.k);                 // [k]
  int* sslot = sids + p.k;                                        // [k]
  const int r_begin = blockIdx.x * p.tl.per_block;
  const int r_end = min(r_begin + p.tl.per_block, p.hidden);
  const int ntiles = (r_end - r_begin + p.tl.tile - 1) / p.tl.tile;

  // ---- before the wait: the experts the router chose one launch earlier (checked below) ----
  for (int j = threadIdx.x; j < p.k; j += kStagedThreads) {
    sids[j] = __ldcg(p.ids + j);
    sslot[j] = expert_slot(sids[j], p.n_experts, p.slot_of);
  }
  __syncthreads();
#pragma unroll
  for (int t = 0; t < kStages - 1; ++t) {
    if (t < ntiles) issue_dn_tile(p, sslot, r_begin, r_end, t, stages + t * p.tl.stage_bytes);
    detail::cp_async_commit();
  }
  detail::pdl_wait();
  // The slot map is checked too: the PCIe assist's map is rewritten per layer by the launch
  // before gate/up, for the same ids.
  int changed = 0;
  for (int j = threadIdx.x; j < p.k; j += kStagedThreads) {
    changed |= p.ids[j] != sids[j] || expert_slot(p.ids[j], p.n_experts, p.slot_of) != sslot[j];
  }
  if (__syncthreads_or(changed)) {  // ids or slots rewritten after the prefetch: copy again
    detail::cp_async_wait<0>();
    __syncthreads();
    for (int j = threadIdx.x; j < p.k; j += kStagedThreads) {
      sids[j] = p.ids[j];
      sslot[j] = expert_slot(sids[j], p.n_experts, p.slot_of);
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kStages - 1; ++t) {
      if (t < ntiles) issue_dn_tile(p, sslot, r_begin, r_end, t, stages + t * p.tl.stage_bytes);
      detail::cp_async_commit();
    }
  }
  for (int j = threadIdx.x; j < p.k; j += kStagedThreads) swts[j] = p.wts[j];
  __shared__ float red[32];
  detail::stage_x_perm<T>(sact, p.act, p.k * p.ffn, p.ffn, nullptr, 0.0f, nullptr, red);
  // (the tile loop's first __syncthreads publishes swts and the staged act)

  const int warp = threadIdx.x / detail::kWarp;
  const int lane = threadIdx.x % detail::kWarp;
  float* dw = dots + warp * p.k;
  for (int t = 0; t < ntiles; ++t) {
    if (t + kStages - 1 < ntiles) {
      issue_dn_tile(p, sslot, r_begin, r_end, t + kStages - 1,
                    stages + ((t + kStages - 1) % kStages) * p.tl.stage_bytes);
    }
    detail::cp_async_commit();
    detail::cp_async_wait<kStages - 1>();
    __syncthreads();
    const uint8_t* base = stages + (t % kStages) * p.tl.stage_bytes;
    const int a0 = r_begin + t * p.tl.tile;
    const int tn = min(p.tl.tile, r_end - a0);
    bool bad = false;
    for (int j = 0; j < p.k; ++j) bad = bad || sslot[j] == -2;
    for (int lr = warp; lr < tn; lr += kStagedWarps) {
      // This expert slots' dots of row a0 + lr, 4 at a time (slot order; the grouping does not
      // change any dot).
      int j = 0;
      while (j < p.k) {
        int js[4], cnt = 0;
        for (; j < p.k && cnt < 4; ++j) {
          if (sslot[j] >= 0) js[cnt++] = j;
        }
        if (cnt == 4) {
          const uint8_t* rows[4];
          const float* xs[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            rows[i] = base + (static_cast<int64_t>(js[i]) * p.tl.tile + lr) * p.row_bytes;
            xs[i] = sact + js[i] * p.ffn;
          }
          float d[4];
          detail::warp_rows_dot_smem<T, 4, false>(rows, xs, p.nb, d);
          if (lane == 0) {
#pragma unroll
            for (int i = 0; i < 4; ++i) dw[js[i]] = d[i];
          }
        } else {
          for (int i = 0; i < cnt; ++i) {
            const uint8_t* const rows[1] = {
                base + (static_cast<int64_t>(js[i]) * p.tl.tile + lr) * p.row_bytes};
            const float* const xs[1] = {sact + js[i] * p.ffn};
            float d[1];
            detail::warp_rows_dot_smem<T, 1, true>(rows, xs, p.nb, d);
            if (lane == 0) dw[js[i]] = d[0];
          }
        }
      }
      if (lane == 0) {
        float s = 0.0f;
        for (int jj = 0; jj < p.k; ++jj) {
          if (sslot[jj] < 0) continue;
          s = __fadd_rn(s, __fmul_rn(swts[jj], dw[jj]));
        }
        float* xo = p.x + a0 + lr;
        *xo = bad ? __int_as_float(0x7fc00000) : __fadd_rn(*xo, s);
      }
      __syncwarp();
    }
    __syncthreads();
  }
  detail::pdl_trigger();
}

// SM count and the shared-memory opt-in of the staged kernels, once per device.
struct StagedSetup {
  cudaError_t err = cudaSuccess;
  int sms = 0;
  // Two blocks per SM: one block's warps compute while the other's copies land (one block of 512
  // threads left the SMs at 25 % occupancy, latency-bound in the dequantize + FMA phase). H100,
  // qwen3-30b-a3b Q4_0, tg128, same machine twice: all on GPU 322.1 -> 323.3 tok/s, experts of
  // 24 layers on CPU 114.1 -> 122.8. KTUNE_MOE_BPS=1..4 overrides it for experiments.
  int blocks_per_sm = 2;
  int smem_limit = 0;  // dynamic shared memory per block the staged kernels may ask for
};

const StagedSetup& staged_setup() {
  // Per device: the opt-in belongs to each device's context (cuda/per_device.cuh).
  static detail::PerDevice<StagedSetup> per_device;
  return per_device.get([](int dev) {
    StagedSetup s;
    s.err = cudaDeviceGetAttribute(&s.sms, cudaDevAttrMultiProcessorCount, dev);
    int optin = 0;
    if (s.err == cudaSuccess) {
      s.err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    }
    s.smem_limit = std::min(kMaxSmem, optin - 1024);
    if (const char* e = std::getenv("KTUNE_MOE_BPS"); e != nullptr && e[0] >= '1' && e[0] <= '4') {
      s.blocks_per_sm = e[0] - '0';
    }
    const void* fns[] = {reinterpret_cast<const void*>(&moe_gate_up_staged<QuantType::Q8_0>),
                         reinterpret_cast<const void*>(&moe_gate_up_staged<QuantType::Q4_0>),
                         reinterpret_cast<const void*>(&moe_gate_up_staged<QuantType::BF16>),
                         reinterpret_cast<const void*>(&moe_gate_up_staged<QuantType::F32>),
                         reinterpret_cast<const void*>(&moe_gate_up_staged<QuantType::Q4_K>),
                         reinterpret_cast<const void*>(&moe_gate_up_staged<QuantType::Q5_K>),
                         reinterpret_cast<const void*>(&moe_gate_up_staged<QuantType::Q6_K>),
                         reinterpret_cast<const void*>(&moe_down_staged<QuantType::Q8_0>),
                         reinterpret_cast<const void*>(&moe_down_staged<QuantType::Q4_0>),
                         reinterpret_cast<const void*>(&moe_down_staged<QuantType::BF16>),
                         reinterpret_cast<const void*>(&moe_down_staged<QuantType::F32>),
                         reinterpret_cast<const void*>(&moe_down_staged<QuantType::Q4_K>),
                         reinterpret_cast<const void*>(&moe_down_staged<QuantType::Q5_K>),
                         reinterpret_cast<const void*>(&moe_down_staged<QuantType::Q6_K>)};
    for (const void* f : fns) {
      if (s.err != cudaSuccess) break;
      s.err = cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, s.smem_limit);
    }
    return s;
  });
}

bool moe_args_ok(QuantType type, const void* w, int64_t expert_bytes, const float* x, int64_t k,
                 int64_t n_experts, int64_t rows, int64_t cols) {
  return detail::rowdot_supported(type) && w != nullptr && detail::rowdot_aligned(type, w) &&
         (reinterpret_cast<uintptr_t>(x) & 15u) == 0 && k >= 1 && k <= 65535 && n_experts >= 1 &&
         rows >= 1 && rows <= 0x7fffffff && detail::rowdot_cols_ok(type, cols) &&
         cols <= (1 << 28) && expert_bytes >= rows * row_bytes(type, cols) &&
         detail::rowdot_aligned(type, reinterpret_cast<const void*>(expert_bytes));
}

template <bool Masked>
void launch_down(QuantType type, unsigned grid, size_t smem, cudaStream_t stream,
                 const uint8_t* d, int64_t expert_bytes, const int32_t* ids, const float* weights,
                 int kk, int ne, const float* act, int h, int f, int nb, int64_t rb, float* x,
                 const int32_t* slot) {
  detail::with_rowdot_type(type, [&](auto tag) {
    moe_down_kernel<decltype(tag)::value, Masked><<<grid, kDownThreads, smem, stream>>>(
        d, expert_bytes, ids, weights, kk, ne, act, h, f, nb, rb, x, slot);
  });
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
  const int nb = static_cast<int>(hidden / 32);
  const int64_t rb = row_bytes(type, hidden);
  const auto* g = static_cast<const uint8_t*>(gate);
  const auto* u = static_cast<const uint8_t*>(up);
  const int ne = static_cast<int>(std::min<int64_t>(n_experts, 0x7fffffff));
  const int f = static_cast<int>(ffn);
  if (k * ffn <= 0x7fffffff) {
    const StagedSetup& st = staged_setup();
    if (st.err != cudaSuccess) return st.err;
    GuParams p{};
    // Runs of one expert's rows start at unit j * ffn + a multiple of gran when ffn is one.
    const int64_t gran = detail::rows_per_16_bytes(rb);
    p.tl = make_tiling(k * ffn, 2 * rb, st.sms * st.blocks_per_sm, ffn % gran == 0 ? gran : 1);
    const int64_t smem = int64_t{p.tl.n_stages} * p.tl.stage_bytes + 4 * hidden;
    if (smem <= st.smem_limit) {
      p.gate = g;
      p.up = u;
      p.expert_bytes = expert_bytes;
      p.ids = ids;
      p.slot_of = expert_slot;
      p.k = static_cast<int>(k);
      p.n_experts = ne;
      p.ffn = f;
      p.hidden = static_cast<int>(hidden);
      p.nb = nb;
      p.row_bytes = static_cast<int>(rb);
      p.x = x;
      p.act = act;
      const dim3 sg(static_cast<unsigned>(p.tl.grid));
      const size_t sm = static_cast<size_t>(smem);
      return detail::with_rowdot_type(type, [&](auto tag) {
        return detail::launch_kernel(&moe_gate_up_staged<decltype(tag)::value>, sg, kStagedThreads,
                                     sm, stream, 1, p);
      });
    }
  }
  // Shapes whose staging does not fit shared memory: the one-warp-per-row kernel.
  const dim3 grid(static_cast<unsigned>((ffn + kWarps - 1) / kWarps), static_cast<unsigned>(k));
  detail::with_rowdot_type(type, [&](auto tag) {
    moe_gate_up_kernel<decltype(tag)::value><<<grid, 32 * kWarps, 0, stream>>>(
        g, u, expert_bytes, ids, ne, x, f, nb, rb, act, expert_slot);
  });
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
  const int nb = static_cast<int>(ffn / 32);
  const int64_t rb = row_bytes(type, ffn);
  const auto* d = static_cast<const uint8_t*>(down);
  const int ne = static_cast<int>(std::min<int64_t>(n_experts, 0x7fffffff));
  const int kk = static_cast<int>(k);
  const int h = static_cast<int>(hidden);
  const int f = static_cast<int>(ffn);
  {
    const StagedSetup& st = staged_setup();
    if (st.err != cudaSuccess) return st.err;
    DnParams p{};
    p.tl = make_tiling(hidden, k * rb, st.sms * st.blocks_per_sm, detail::rows_per_16_bytes(rb));
    const int64_t smem = int64_t{p.tl.n_stages} * p.tl.stage_bytes +
                         4 * (k * ffn + int64_t{kStagedWarps} * k + 3 * k);
    if (smem <= st.smem_limit && k * ffn <= 0x7fffffff) {
      p.down = d;
      p.expert_bytes = expert_bytes;
      p.ids = ids;
      p.wts = weights;
      p.slot_of = expert_slot;
      p.k = kk;
      p.n_experts = ne;
      p.hidden = h;
      p.ffn = f;
      p.nb = nb;
      p.row_bytes = static_cast<int>(rb);
      p.act = act;
      p.x = x;
      const dim3 sg(static_cast<unsigned>(p.tl.grid));
      const size_t sm = static_cast<size_t>(smem);
      return detail::with_rowdot_type(type, [&](auto tag) {
        return detail::launch_kernel(&moe_down_staged<decltype(tag)::value>, sg, kStagedThreads, sm,
                                     stream, 1, p);
      });
    }
  }
  // Shapes whose staging does not fit shared memory: the two-warps-per-row kernel.
  const unsigned grid = static_cast<unsigned>((hidden + kDownRows - 1) / kDownRows);
  const size_t smem = static_cast<size_t>(kDownRows * k) * sizeof(float);
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
