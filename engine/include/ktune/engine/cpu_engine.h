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
  // Sequences with their own KV cache (decode_batch); max_context positions each.
  int64_t max_sequences = 1;
  cpu::Isa isa = cpu::detect_isa();
  bool pin_threads = true;
};

class CpuEngine {
 public:
  CpuEngine(const ModelWeights& weights, const CpuEngineOptions& opt);  // weights must outlive
  ~CpuEngine();

  void reset();                 // empties every sequence's KV cache; positions become 0
  int64_t position() const;     // of the current sequence
  int64_t position(int64_t seq) const;
  int64_t max_sequences() const;
  // prefill() and decode() work on the current sequence (0 unless chosen here). Throws for a
  // sequence outside [0, max_sequences).
  void set_sequence(int64_t seq);

  // Runs tokens at positions position()..position()+n-1. When logits is non-null it receives
  // n * vocab floats (every position) if all_positions, else vocab floats (last position).
  void prefill(const int32_t* tokens, int64_t n, std::vector<float>* logits, bool all_positions);
  // One decode step; logits (vocab floats) when non-null.
  void decode(int32_t token, std::vector<float>* logits);
  // One decode step of sequences 0..n-1 at once (n <= max_sequences): tokens[b] goes to
  // sequence b at its own position. The n tokens go through each layer together, so every
  // expert selected by any of them is read once per step (tokens grouped by expert, as in
  // prefill). logits (n * vocab floats, row b for sequence b) when non-null. Each row equals
  // what decode() gives that sequence alone up to float rounding (prefill's kernels).
  void decode_batch(const int32_t* tokens, int64_t n, std::vector<float>* logits);

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
