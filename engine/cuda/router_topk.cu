// MoE router on device: softmax over each token's n_experts logits, the k most probable experts
// (ties: lower index), optional renormalization (norm_topk_prob), ids and weights written sorted
// by expert id, exactly the contract of cpu_ops::route_topk, so a fused MoE kernel and a CUDA
// graph can read the routing without a host round trip.
//
// One block = one warp per token: n_experts is 128..256 for the target models, so the token's
// probabilities sit in shared memory and every reduction is a warp butterfly (fixed order).
// Top-k is k rounds of a warp argmax with the (value, lower index) order; k is small (8).
#include "cuda/common.cuh"
#include "ktune/engine/cuda/kernels.h"

namespace ktune::cuda {
namespace {

constexpr int kMaxK = 64;

__global__ void router_topk_kernel(const float* __restrict__ logits, int n, int k, bool norm,
                                   int32_t* __restrict__ ids, float* __restrict__ weights,
                                   float* __restrict__ probs) {
  extern __shared__ float p[];  // n floats
  __shared__ int32_t sel_id[kMaxK];
  __shared__ float sel_w[kMaxK];
  const int lane = threadIdx.x;
  const int64_t t = blockIdx.x;
  const float* l = logits + t * n;

  float mx = -INFINITY;
  for (int e = lane; e < n; e += 32) mx = fmaxf(mx, l[e]);
  mx = detail::warp_max(mx);
  float sum = 0.0f;
  for (int e = lane; e < n; e += 32) {
    const float v = expf(l[e] - mx);
    p[e] = v;
    sum += v;
  }
  sum = detail::warp_sum(sum);
  const float inv = 1.0f / sum;
  for (int e = lane; e < n; e += 32) {
    p[e] *= inv;
    if (probs) probs[t * n + e] = p[e];
  }
  __syncwarp();

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
    ids[t * k + j] = sel_id[j];
    weights[t * k + j] = sel_w[j];
  }
}

}  // namespace

cudaError_t launch_router_topk(const float* logits, int64_t n_tokens, int64_t n_experts, int64_t k,
                               bool norm_topk_prob, int32_t* ids, float* weights, float* probs,
                               cudaStream_t stream) {
  if (n_tokens < 0 || n_tokens > 0x7fffffff || n_experts <= 0 || n_experts > 1024 || k < 1 ||
      k > kMaxK || k > n_experts) {
    return cudaErrorInvalidValue;
  }
  if (n_tokens == 0) return cudaSuccess;
  router_topk_kernel<<<static_cast<unsigned>(n_tokens), 32, n_experts * sizeof(float), stream>>>(
      logits, static_cast<int>(n_experts), static_cast<int>(k), norm_topk_prob, ids, weights,
      probs);
  return cudaGetLastError();
}

}  // namespace ktune::cuda
