// The CPU engine for deepseek2 (DeepSeek-V2, V2-Lite, V3, R1; semantics of Hugging Face's
// DeepseekV3ForCausalLM / llama.cpp's deepseek2 graph). CpuEngine runs it for models of that
// architecture; the interface is CpuEngine's.
//
// Attention is MLA in its absorbed form, as llama.cpp runs it: the cache holds, per position and
// layer, the normalized latent c (kv_lora_rank values) and the roped shared key k_pe (rope_dim);
// each query head h is turned into the latent space once per token, q_abs = W_kb[h]^T q_nope,
// so that its score against position p is q_abs . c_p + q_pe . k_pe_p (equal to
// q_nope . (W_kb[h] c_p) + q_pe . k_pe_p, the decompressed key, in exact arithmetic); the
// attention-weighted sum of latents is decompressed once per head, o_h = W_vb[h] sum_p a_p c_p.
// Why not the naive form (decompress K and V per cached position): a decode step would multiply
// every cached latent by W_kb and W_vb for every head (n_heads * (qk_nope + v_head_dim) *
// kv_lora_rank per position and layer: 16.8 M multiply-adds at DeepSeek-V3's shape, versus
// n_heads * (kv_lora_rank + rope_dim) = 74 k absorbed), or cache the decompressed K and V
// (n_heads * (head_dim + v_head_dim) = 40960 values per position and layer instead of 576),
// which undoes what MLA is for. The absorbed form reads 576 values per position for all heads.
//
// Routing: softmax or sigmoid scores; the selection bias (exp_probs_b) is added for choosing
// only; group-limited top-k; weights normalized when expert_weights_norm, then scaled. Shared
// experts (one SwiGLU of n_shared * expert_ffn) are added to the routed sum; leading layers run a
// dense SwiGLU instead. Prefill and decode are one code path over a chunk of T tokens (T = 1 for
// decode; matvec kernels then, which give the same numbers as the matmul kernels): every output
// element is computed by one thread in a fixed order, so results do not depend on the thread
// count.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "ktune/engine/cpu_engine.h"
#include "ktune/engine/model.h"

namespace ktune {

// RoPE of a deepseek2 model, as Hugging Face computes it (float32 frequencies; YaRN per
// ModelConfig's comment): inv_freq of the rope_dim/2 rotated pairs, the factor cos and sin are
// multiplied by, and the attention softmax scale (1/sqrt(head_dim), times YaRN's mscale^2).
struct DeepseekRope {
  std::vector<float> inv_freq;
  float cos_sin_scale = 1.0f;
  float softmax_scale = 1.0f;
};
DeepseekRope deepseek_rope(const ModelConfig& c);

class DeepseekCpuEngine {
 public:
  DeepseekCpuEngine(const ModelWeights& weights, const CpuEngineOptions& opt);
  ~DeepseekCpuEngine();

  void reset();  // every sequence
  int64_t position() const;  // of the current sequence
  int64_t position(int64_t seq) const;
  int64_t max_sequences() const;
  void set_sequence(int64_t seq);  // the sequence prefill/decode work on (checked by CpuEngine)
  void prefill(const int32_t* tokens, int64_t n, std::vector<float>* logits, bool all_positions);
  void decode(int32_t token, std::vector<float>* logits);
  // One token for each of the sequences 0..n-1 in one forward pass (see CpuEngine).
  void decode_batch(const int32_t* tokens, int64_t n, std::vector<float>* logits);

  int threads() const;
  cpu::Isa isa() const;
  const ModelWeights& weights() const;
  const std::vector<std::vector<uint64_t>>& expert_counts() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ktune
