// Small scalar operations of the CPU engine (norms, RoPE, attention for one query, router
// softmax/top-k, SwiGLU) and the work-splitting helpers. All are deterministic: the result
// depends only on the inputs, never on which thread runs them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "ktune/engine/cpu_kernels.h"

namespace ktune::cpu_ops {

// y = w * (x / sqrt(mean(x^2) + eps)), as Hugging Face's Qwen3MoeRMSNorm (float32 math).
void rmsnorm(const float* x, const float* w, float eps, int64_t n, float* y);

// NEOX RoPE (rotate halves) on one head of d elements, in place; cs holds cos[0..d/2) then
// sin[0..d/2) for this position.
void rope_neox(float* v, const float* cs, int64_t d);
// cos/sin of pos * inv_freq[i] for i < d/2 into cs (layout of rope_neox), float32 angles like
// Hugging Face (angle = float(pos) * inv_freq in float, cos/sin accurate to the float result).
void rope_table(int64_t pos, const float* inv_freq, int64_t d, float* cs);
// The same with cos and sin multiplied by `scale` (YaRN's attention factor).
void rope_table_scaled(int64_t pos, const float* inv_freq, int64_t d, float scale, float* cs);
// RoPE on adjacent pairs (v[2i], v[2i+1]) rotated by frequency i (ggml's "normal" mode; what
// llama.cpp runs for deepseek2, and Hugging Face's DeepSeek rope_interleave), in place; cs as for
// rope_neox.
void rope_pairs(float* v, const float* cs, int64_t d);

// The two inner loops of attention, per ISA (scalar, AVX2, AVX-512); each has a fixed summation
// order, so a given ISA gives the same result whichever thread calls it.
struct VecOps {
  float (*dot)(const float* a, const float* b, int64_t n);
  void (*axpy)(float a, const float* x, float* y, int64_t n);  // y += a * x
};
// The best ops for `isa`, never above what this CPU runs.
VecOps vec_ops(cpu::Isa isa);

float dot(const float* a, const float* b, int64_t n);
void axpy(float a, const float* x, float* y, int64_t n);
namespace avx2 {
float dot(const float* a, const float* b, int64_t n);
void axpy(float a, const float* x, float* y, int64_t n);
}  // namespace avx2
namespace avx512 {
float dot(const float* a, const float* b, int64_t n);
void axpy(float a, const float* x, float* y, int64_t n);
}  // namespace avx512

// Causal attention of m query heads q[j] that share one kv head, over n_cached positions of the
// cache (k and v rows `stride` floats apart) plus, when k_last is non-null, one extra position
// given directly (the current token during decode, before the cache holds it). Each k and v row
// is loaded once for all m heads; each head's result is computed exactly as if alone.
// scores: m * (n_cached + 1) floats.
void attend_group(const VecOps& ops, const float* const* q, int m, const float* k_cache,
                  const float* v_cache, int64_t stride, int64_t n_cached, const float* k_last,
                  const float* v_last, int64_t d, float scale, float* scores, float* const* out);

// Router: probs = softmax(logits) over n experts; the k largest probabilities (ties: lower
// index first), renormalized to sum 1 when norm. ids/weights come out sorted by expert id, the
// order in which Hugging Face adds the experts' outputs.
void route_topk(const float* logits, int64_t n, int64_t k, bool norm, float* probs,
                int32_t* ids, float* weights);

// deepseek2 routing (llama.cpp's build_moe_ffn; Hugging Face's DeepseekV3MoE): scores =
// softmax(logits) or sigmoid(logits). Experts are chosen by scores + bias (bias may be null: no
// bias) and, when groups > 1, only within the groups_used groups (of n / groups consecutive
// experts) whose two best biased scores sum highest. The k chosen experts' weights are their
// unbiased scores, divided by their sum when norm, times scale. Ties go to the lower index. ids
// and weights come out sorted by expert id. scratch: 2 * n + groups floats.
void route_grouped(const float* logits, int64_t n, int64_t k, bool sigmoid, const float* bias,
                   int64_t groups, int64_t groups_used, bool norm, float scale, float* scratch,
                   int32_t* ids, float* weights);

inline float silu(float x) { return x / (1.0f + std::exp(-x)); }

// Splits [0, n) into nth ranges of whole `align`-sized units (the last may be short).
inline void split(int64_t n, int ith, int nth, int64_t align, int64_t* begin, int64_t* end) {
  const int64_t units = (n + align - 1) / align;
  const int64_t u0 = units * ith / nth;
  const int64_t u1 = units * (ith + 1) / nth;
  *begin = std::min(n, u0 * align);
  *end = std::min(n, u1 * align);
}

}  // namespace ktune::cpu_ops
