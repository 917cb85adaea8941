// MoE router on device: softmax over each token's n_experts logits, the k most probable experts
// (ties: lower index), optional renormalization (norm_topk_prob), ids and weights written sorted
// by expert id, exactly the contract of cpu_ops::route_topk, so a fused MoE kernel and a CUDA
// graph can read the routing without a host round trip.
//
// One block = one warp per token: n_experts is 128..256 for the target models, so the token's
// probabilities sit in shared memory and every reduction is a warp butterfly (fixed order).
// Top-k is k rounds of a warp argmax with the (value, lower index) order; k is small (8).
#include "cuda/common.cuh"
#include "cuda/router_topk.cuh"
#include "ktune/engine/cuda/kernels.h"

namespace ktune::cuda {
namespace {

__global__ void router_topk_kernel(const float* __restrict__ logits, int n, int k, bool norm,
                                   int32_t* __restrict__ ids, float* __restrict__ weights,
                                   float* __restrict__ probs) {
  extern __shared__ float p[];  // n floats
  __shared__ int32_t sel_id[detail::kRouterMaxK];
  __shared__ float sel_w[detail::kRouterMaxK];
  const int64_t t = blockIdx.x;
  detail::warp_router_topk(logits + t * n, n, k, norm, ids + t * k, weights + t * k,
                           probs ? probs + t * n : nullptr, p, sel_id, sel_w);
}

}  // namespace

cudaError_t launch_router_topk(const float* logits, int64_t n_tokens, int64_t n_experts, int64_t k,
                               bool norm_topk_prob, int32_t* ids, float* weights, float* probs,
                               cudaStream_t stream) {
  if (n_tokens < 0 || n_tokens > 0x7fffffff || n_experts <= 0 || n_experts > 1024 || k < 1 ||
      k > detail::kRouterMaxK || k > n_experts) {
    return cudaErrorInvalidValue;
  }
  if (n_tokens == 0) return cudaSuccess;
  router_topk_kernel<<<static_cast<unsigned>(n_tokens), 32, n_experts * sizeof(float), stream>>>(
      logits, static_cast<int>(n_experts), static_cast<int>(k), norm_topk_prob, ids, weights,
      probs);
  return cudaGetLastError();
}

}  // namespace ktune::cuda
