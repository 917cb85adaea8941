// Groups a prefill chunk's (token, slot) pairs by expert on the device, so the expert matmuls
// can run over each expert's rows: a stable counting sort in one block of 1024 threads.
//   1. counts per expert (integer shared-memory atomics: the counts do not depend on order);
//   2. exclusive prefix sums (one warp): each expert's first grouped row and first tile;
//   3. the tile list {expert, first row, rows} for launch_prefill_matmul;
//   4. ranks, 1024 pairs per round: within a warp, lanes holding the same expert find each
//      other with __match_any_sync and rank by lane; per-warp counts are prefix-summed in warp
//      order per expert. So pairs of one expert keep their pair order (token-major, then slot):
//      the grouped order, and with it every result, is a function of the routing alone.
#include "cuda/common.cuh"
#include "ktune/engine/cuda/prefill_kernels.h"

namespace ktune::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxExperts = 256;

__global__ void __launch_bounds__(kThreads)
    prefill_moe_route_kernel(const int32_t* __restrict__ ids, int pairs, int k, int n_exp,
                             int tile_m, int32_t* __restrict__ sorted_tok,
                             int32_t* __restrict__ pair_pos, int4* __restrict__ tiles,
                             int32_t* __restrict__ n_tiles, int32_t* __restrict__ counts) {
  __shared__ int cnt[kMaxExperts];
  __shared__ int next[kMaxExperts];  // next grouped row of each expert
  __shared__ int tile0[kMaxExperts];
  __shared__ int wcnt[kWarps][kMaxExperts];
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  for (int e = tid; e < n_exp; e += kThreads) cnt[e] = 0;
  __syncthreads();
  for (int p = tid; p < pairs; p += kThreads) {
    const int e = ids[p];
    if (e >= 0 && e < n_exp) atomicAdd(&cnt[e], 1);
  }
  __syncthreads();
  if (warp == 0) {
    const int per = (n_exp + 31) / 32;
    const int e0 = min(lane * per, n_exp), e1 = min(e0 + per, n_exp);
    int rows = 0, tls = 0;
    for (int e = e0; e < e1; ++e) {
      rows += cnt[e];
      tls += (cnt[e] + tile_m - 1) / tile_m;
    }
    int rows_incl = rows, tls_incl = tls;  // inclusive warp scans
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int ro = __shfl_up_sync(0xffffffffu, rows_incl, o);
      const int to = __shfl_up_sync(0xffffffffu, tls_incl, o);
      if (lane >= o) {
        rows_incl += ro;
        tls_incl += to;
      }
    }
    int r = rows_incl - rows, tt = tls_incl - tls;
    for (int e = e0; e < e1; ++e) {
      next[e] = r;
      tile0[e] = tt;
      r += cnt[e];
      tt += (cnt[e] + tile_m - 1) / tile_m;
    }
    if (lane == 31) *n_tiles = tls_incl;
  }
  __syncthreads();
  for (int e = tid; e < n_exp; e += kThreads) {
    const int c = cnt[e];
    for (int i = 0; i * tile_m < c; ++i) {
      tiles[tile0[e] + i] = make_int4(e, next[e] + i * tile_m, min(tile_m, c - i * tile_m), 0);
    }
    if (counts) counts[e] = c;
  }
  for (int round = 0; round * kThreads < pairs; ++round) {
    for (int i = tid; i < kWarps * n_exp; i += kThreads) wcnt[i / n_exp][i % n_exp] = 0;
    __syncthreads();
    const int p = round * kThreads + tid;
    const int e = p < pairs ? ids[p] : -1;
    const bool valid = p < pairs && e >= 0 && e < n_exp;
    const unsigned same = __match_any_sync(0xffffffffu, valid ? e : -1);
    const int rank = __popc(same & ((1u << lane) - 1u));
    if (valid && rank == 0) wcnt[warp][e] = __popc(same);
    __syncthreads();
    for (int x = tid; x < n_exp; x += kThreads) {
      int acc = next[x];
      for (int w = 0; w < kWarps; ++w) {
        const int c = wcnt[w][x];
        wcnt[w][x] = acc;
        acc += c;
      }
      next[x] = acc;
    }
    __syncthreads();
    if (valid) {
      const int pos = wcnt[warp][e] + rank;
      sorted_tok[pos] = p / k;
      pair_pos[p] = pos;
    } else if (p < pairs) {
      pair_pos[p] = -1;
    }
    __syncthreads();  // wcnt is cleared for the next round
  }
}

}  // namespace

int64_t prefill_moe_max_tiles(int64_t pairs, int64_t n_experts, int64_t tile_m) {
  return tile_m > 0 ? pairs / tile_m + n_experts : 0;
}

cudaError_t launch_prefill_moe_route(const int32_t* ids, int64_t tokens, int64_t k,
                                     int64_t n_experts, int64_t tile_m, int32_t* sorted_tok,
                                     int32_t* pair_pos, int32_t* tiles, int32_t* n_tiles,
                                     int32_t* counts, cudaStream_t stream) {
  if (tokens < 0 || k < 1 || k > 64 || n_experts < 1 || n_experts > kMaxExperts || tile_m < 1 ||
      tokens * k > (int64_t{1} << 30) || n_tiles == nullptr) {
    return cudaErrorInvalidValue;
  }
  prefill_moe_route_kernel<<<1, kThreads, 0, stream>>>(
      ids, static_cast<int>(tokens * k), static_cast<int>(k), static_cast<int>(n_experts),
      static_cast<int>(tile_m), sorted_tok, pair_pos, reinterpret_cast<int4*>(tiles), n_tiles,
      counts);
  return cudaGetLastError();
}

}  // namespace ktune::cuda
