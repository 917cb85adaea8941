// deepseek2 routing of one token on the device (launch_deepseek_router, mla_kernels.h), step for
// step as cpu_ops::route_grouped: scores (sigmoid, or softmax with the sum of exponentials in
// double), biased choice values, group scores (sum of the two best choice values of each group),
// the groups_used best groups kept (rank by score, ties to the lower group), k rounds of "the
// largest choice value, lowest index on ties", weights from the unbiased scores summed in
// selection order, normalized and scaled, then sorted by expert id. One warp: lane l owns experts
// l, l + 32, ...; every reduction is a fixed butterfly, so the result is deterministic. Reads the
// logits from device memory (graph-capturable).
#include <cmath>

#include "cuda/common.cuh"
#include "ktune/engine/cuda/mla_kernels.h"

namespace ktune::cuda {
namespace {

constexpr int kMaxExperts = 1024;
constexpr int kMaxK = 64;

// (value, index) of the better of two candidates: larger value, then lower index. NaN counts as
// -inf (the CPU's strict '>' never picks a NaN either).
__device__ __forceinline__ void better(float& v, int& i, float v2, int i2) {
  if (v2 > v || (v2 == v && i2 < i)) {
    v = v2;
    i = i2;
  }
}

__global__ void __launch_bounds__(32)
    deepseek_router_kernel(const float* __restrict__ logits, int n, int k, bool sigmoid,
                           const float* __restrict__ bias, int groups, int groups_used, bool norm,
                           float scale, int32_t* __restrict__ ids, float* __restrict__ weights) {
  __shared__ float score[kMaxExperts];
  __shared__ float choice[kMaxExperts];
  __shared__ float gscore[kMaxExperts];
  __shared__ int sel[kMaxK];
  __shared__ float wsel[kMaxK];
  const int lane = threadIdx.x;
  if (sigmoid) {
    for (int e = lane; e < n; e += 32) score[e] = 1.0f / (1.0f + expf(-logits[e]));
  } else {
    float mx = -INFINITY;
    for (int e = lane; e < n; e += 32) mx = fmaxf(mx, logits[e]);
    mx = detail::warp_max(mx);
    double sum = 0.0;
    for (int e = lane; e < n; e += 32) {
      const float v = expf(logits[e] - mx);
      score[e] = v;
      sum += v;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float inv = static_cast<float>(1.0 / sum);
    for (int e = lane; e < n; e += 32) score[e] *= inv;
  }
  for (int e = lane; e < n; e += 32) choice[e] = bias ? score[e] + bias[e] : score[e];
  __syncwarp();
  if (groups > 1 && groups_used < groups) {
    const int per = n / groups;
    for (int g = lane; g < groups; g += 32) {
      const float* c = choice + g * per;
      float top1 = -INFINITY, top2 = -INFINITY;
      for (int i = 0; i < per; ++i) {
        if (c[i] > top1) {
          top2 = top1;
          top1 = c[i];
        } else if (c[i] > top2) {
          top2 = c[i];
        }
      }
      gscore[g] = per > 1 ? top1 + top2 : top1;
    }
    __syncwarp();
    for (int g = lane; g < groups; g += 32) {
      int rank = 0;
      for (int h = 0; h < groups; ++h) {
        rank += gscore[h] > gscore[g] || (gscore[h] == gscore[g] && h < g);
      }
      if (rank >= groups_used) {
        for (int i = 0; i < per; ++i) choice[g * per + i] = -INFINITY;
      }
    }
    __syncwarp();
  }
  for (int j = 0; j < k; ++j) {
    float v = -INFINITY;
    int best = 0x7fffffff;
    for (int e = lane; e < n; e += 32) better(v, best, choice[e], e);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float v2 = __shfl_xor_sync(0xffffffffu, v, o);
      const int i2 = __shfl_xor_sync(0xffffffffu, best, o);
      better(v, best, v2, i2);
    }
    // Every candidate -inf (or NaN): the CPU's argmax keeps index 0.
    if (best == 0x7fffffff) best = 0;
    __syncwarp();
    if (lane == 0) {
      sel[j] = best;
      wsel[j] = score[best];
      choice[best] = -INFINITY;
    }
    __syncwarp();
  }
  if (lane == 0) {
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) sum += wsel[j];
    const float f = norm ? scale / sum : scale;
    for (int j = 0; j < k; ++j) wsel[j] *= f;
    // Insertion sort by expert id, as the CPU (ties cannot occur: ids are distinct).
    for (int a = 1; a < k; ++a) {
      const int id = sel[a];
      const float wt = wsel[a];
      int b = a;
      for (; b > 0 && sel[b - 1] > id; --b) {
        sel[b] = sel[b - 1];
        wsel[b] = wsel[b - 1];
      }
      sel[b] = id;
      wsel[b] = wt;
    }
  }
  __syncwarp();
  for (int j = lane; j < k; j += 32) {
    ids[j] = sel[j];
    weights[j] = wsel[j];
  }
}

}  // namespace

cudaError_t launch_deepseek_router(const float* logits, int64_t n_experts, int64_t k, bool sigmoid,
                                   const float* bias, int64_t groups, int64_t groups_used,
                                   bool norm, float scale, int32_t* ids, float* weights,
                                   cudaStream_t stream) {
  if (logits == nullptr || ids == nullptr || weights == nullptr || n_experts < 1 ||
      n_experts > kMaxExperts || k < 1 || k > kMaxK || k > n_experts || groups < 1 ||
      groups > n_experts || n_experts % groups != 0 || groups_used < 1) {
    return cudaErrorInvalidValue;
  }
  deepseek_router_kernel<<<1, 32, 0, stream>>>(
      logits, static_cast<int>(n_experts), static_cast<int>(k), sigmoid, bias,
      static_cast<int>(groups), static_cast<int>(groups_used), norm, scale, ids, weights);
  return cudaGetLastError();
}

}  // namespace ktune::cuda
