// Softmax top-k of one token's router logits by one warp (router_topk.cu's kernel and the
// router tail of matvec_fused): the contract of cpu_ops::route_topk (ties: lower index; ids and
// weights sorted by expert id; renormalized when norm). Call from exactly the 32 lanes of one
// warp. p: n floats of scratch shared memory, sel_id/sel_w: k entries of shared memory.
// Logits are read with ld.global.cg (L2), so the caller may pass values that other blocks of the
// same kernel wrote before a __threadfence.
#pragma once

#include <cstdint>

#include "cuda/common.cuh"

namespace ktune::cuda::detail {

constexpr int kRouterMaxK = 64;

// Softmax of n logits into p (shared memory) by one warp; probs (global, optional) gets a copy.
// Both top-k versions below share it, so their probabilities are the same bits.
__device__ __forceinline__ void warp_router_softmax(const float* l, int n,
                                                    float* __restrict__ probs, float* p) {
  const int lane = threadIdx.x % kWarp;
  // The logits into p first, 8 loads per lane in flight (a load-store loop would serialize the
  // L2 round trips: p may alias l as far as the compiler knows).
  for (int base = 0; base < n; base += 8 * 32) {
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int e = base + lane + 32 * i;
      v[i] = e < n ? __ldcg(l + e) : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int e = base + lane + 32 * i;
      if (e < n) p[e] = v[i];
    }
  }
  __syncwarp();
  float mx = -INFINITY;
  for (int e = lane; e < n; e += 32) mx = fmaxf(mx, p[e]);
  mx = warp_max(mx);
  float sum = 0.0f;
  for (int e = lane; e < n; e += 32) {
    const float v = expf(p[e] - mx);
    p[e] = v;
    sum += v;
  }
  sum = warp_sum(sum);
  const float inv = 1.0f / sum;
  for (int e = lane; e < n; e += 32) {
    p[e] *= inv;
    if (probs) probs[e] = p[e];
  }
  __syncwarp();
}

__device__ __forceinline__ void warp_router_topk(const float* l, int n, int k, bool norm,
                                                 int32_t* __restrict__ ids,
                                                 float* __restrict__ weights,
                                                 float* __restrict__ probs, float* p,
                                                 int32_t* sel_id, float* sel_w) {
  const int lane = threadIdx.x % kWarp;
  warp_router_softmax(l, n, probs, p);

  for (int j = 0; j < k; ++j) {
    // Each lane scans its experts in increasing order with a strict '>', so it keeps its lowest
    // index on ties; the butterfly then prefers the lower index on equal values.
    float bv = -2.0f;  // chosen experts are marked -1, never chosen again
    int bi = 0x7fffffff;
    for (int e = lane; e < n; e += 32) {
      if (p[e] >= 0.0f && p[e] > bv) {
        bv = p[e];
        bi = e;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
      }
    }
    if (lane == 0) {
      sel_id[j] = bi;
      sel_w[j] = p[bi];
      p[bi] = -1.0f;
    }
    __syncwarp();
  }

  if (lane == 0) {
    if (norm) {
      float s = 0.0f;
      for (int j = 0; j < k; ++j) s += sel_w[j];
      for (int j = 0; j < k; ++j) sel_w[j] /= s;
    }
    for (int a = 1; a < k; ++a) {  // insertion sort by expert id, as the CPU engine
      const int32_t id = sel_id[a];
      const float w = sel_w[a];
      int b = a;
      for (; b > 0 && sel_id[b - 1] > id; --b) {
        sel_id[b] = sel_id[b - 1];
        sel_w[b] = sel_w[b - 1];
      }
      sel_id[b] = id;
      sel_w[b] = w;
    }
  }
  __syncwarp();
  for (int j = lane; j < k; j += 32) {
    ids[j] = sel_id[j];
    weights[j] = sel_w[j];
  }
}

// The same contract by a whole block (every thread calls it; blockDim.x a multiple of 32):
// warp 0 computes the probabilities as above, then every expert's rank (how many experts beat
// it: a larger probability, or an equal one at a lower index) is counted by its own thread in
// one pass over shared memory, instead of k dependent rounds of a warp's arg-max (8 rounds of
// shuffles were ~3 µs of the ~11 µs router launch on the H100). Rank < k is chosen, with the
// same order (by value, then index) as warp_router_topk, so the renormalizing sum adds the same
// values in the same order and the results are the same bits. A NaN ranks below everything
// (warp_router_topk never picks one). sel_id/sel_w: k entries of shared memory.
// counts (optional, n int32 in device memory): counts[id] += 1 for each chosen expert (router
// statistics; integer atomics, so the totals are exact and order-independent).
__device__ __forceinline__ void block_router_topk(const float* l, int n, int k, bool norm,
                                                  int32_t* __restrict__ ids,
                                                  float* __restrict__ weights, float* p,
                                                  int32_t* sel_id, float* sel_w,
                                                  int32_t* counts = nullptr) {
  if (threadIdx.x < kWarp) warp_router_softmax(l, n, nullptr, p);
  __syncthreads();
  // `sub` neighbouring lanes (a power of two, within one warp) share an expert, each counting
  // over every sub-th other expert, then add their counts with shuffles: with 512 threads and
  // 128 experts a 32-step loop instead of 128 (this runs in the one block left at the end of the
  // router launch, so every step is on the critical path). Integer counts: same ranks, same bits.
  int sub = 1;
  while (sub < kWarp && 2 * sub * n <= static_cast<int>(blockDim.x)) sub *= 2;
  for (int base = 0; base < n * sub; base += blockDim.x) {  // the same trip count in every thread
    const int t = base + static_cast<int>(threadIdx.x);
    const int e = t / sub, part = t % sub;
    int rank = 0;
    float pe = -1.0f;
    if (e < n) {
      pe = p[e] == p[e] ? p[e] : -1.0f;
      for (int f = part; f < n; f += sub) {
        const float pf = p[f] == p[f] ? p[f] : -1.0f;
        rank += (pf > pe) | ((pf == pe) & (f < e));
      }
    }
    for (int o = sub / 2; o > 0; o >>= 1) rank += __shfl_xor_sync(0xffffffffu, rank, o);
    if (e < n && part == 0 && rank < k) {
      sel_id[rank] = e;
      sel_w[rank] = p[e];
    }
  }
  __syncthreads();
  if (threadIdx.x < k) {
    const int j = threadIdx.x;
    const int32_t id = sel_id[j];
    int pos = 0;
    for (int i = 0; i < k; ++i) pos += sel_id[i] < id;
    float w = sel_w[j];
    if (norm) {
      float s = 0.0f;
      for (int i = 0; i < k; ++i) s += sel_w[i];
      w /= s;
    }
    ids[pos] = id;
    weights[pos] = w;
    if (counts != nullptr) atomicAdd(counts + id, 1);
  }
}

}  // namespace ktune::cuda::detail
