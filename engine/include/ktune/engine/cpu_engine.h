// The CPU engine for qwen3moe: embeddings, RMSNorm, GQA attention with q/k RMSNorm and NEOX
// RoPE, a KV cache, router softmax top-k (renormalized when norm_topk_prob), SwiGLU experts and
// the output head. Prefill runs a batch of tokens; decode runs one token. A MoE layer runs all of
// a token's experts in one parallel region. deepseek2 models (MLA attention, shared experts,
// dense leading layers, grouped sigmoid/softmax routing) run on DeepseekCpuEngine
// (engine/runtime/cpu_engine_deepseek.h) behind the same interface.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "ktune/engine/cpu_kernels.h"
#include "ktune/engine/model.h"

namespace ktune {

class ThreadPool;
class DeepseekCpuEngine;

struct CpuEngineOptions {
  int threads = 0;            // <= 0: one per physical core
  int64_t max_context = 4096; // KV cache length
  int64_t max_batch = 512;    // prefill tokens per forward chunk
  cpu::Isa isa = cpu::detect_isa();
  bool pin_threads = true;
};

class CpuEngine {
 public:
  CpuEngine(const ModelWeights& weights, const CpuEngineOptions& opt);  // weights must outlive
  ~CpuEngine();

  void reset();                 // empties the KV cache; position() becomes 0
  int64_t position() const;

  // Runs tokens at positions position()..position()+n-1. When logits is non-null it receives
  // n * vocab floats (every position) if all_positions, else vocab floats (last position).
  void prefill(const int32_t* tokens, int64_t n, std::vector<float>* logits, bool all_positions);
  // One decode step; logits (vocab floats) when non-null.
  void decode(int32_t token, std::vector<float>* logits);

  static int32_t argmax(const float* logits, int64_t n);

  int threads() const;
  cpu::Isa isa() const;
  const ModelWeights& weights() const;
  // Router statistics: times expert e of layer l was selected, since construction.
  const std::vector<std::vector<uint64_t>>& expert_counts() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::unique_ptr<DeepseekCpuEngine> deepseek_;  // set instead of impl_ for deepseek2 models
};

}  // namespace ktune
