// The CPU half of a hybrid MoE layer for SEVERAL tokens at once (the GPU engine's batched decode
// step: one token of each of B sequences): for each token t, the weighted sum of a given subset
// of its selected experts (the ones the placement keeps in host memory),
//   y_t = sum_j weights[t][j] * down_{e_tj}( silu(gate_{e_tj}(h_t)) * up_{e_tj}(h_t) ),
// into y_t (hidden floats, overwritten; zeros for a token with no expert in its list).
//
// Unlike CpuMoe (one token), the (token, expert) pairs are grouped by expert, as the CpuEngine's
// prefill does, so an expert that several tokens selected is read from memory once per call:
// one parallel region on the pool with two barriers (pairs' inputs quantized | gate/up + SwiGLU
// over (expert, rows) items | down rows of every active expert and the per-token sums). The
// kernels are CpuMoe's (cpu_kernels.h: a row's dot does not depend on how rows and tokens are
// tiled), the SwiGLU and the sum in list order are its arithmetic, so y_t is bit-identical to
// CpuMoe::compute on token t alone with the same list, whatever the other tokens, the thread
// count or the schedule. Nothing is allocated in compute(). Not thread-safe. Private to the
// engine (engine/cuda/cpu_expert_driver.cpp runs it for batched steps).
#pragma once

#include <cstdint>
#include <memory>

#include "ktune/engine/cpu_kernels.h"
#include "ktune/engine/model.h"

namespace ktune {

class ThreadPool;

class CpuMoeBatch {
 public:
  // Up to max_tokens tokens of up to max_per_token experts each (the router's top-k). weights
  // and pool must outlive this object. Throws ktune::Error like CpuMoe for expert tensors the
  // CPU kernels cannot multiply, and for max_tokens / max_per_token < 1.
  CpuMoeBatch(const ModelWeights& weights, ThreadPool& pool, int64_t max_tokens,
              int64_t max_per_token, cpu::Isa isa = cpu::detect_isa());
  ~CpuMoeBatch();
  CpuMoeBatch(const CpuMoeBatch&) = delete;
  CpuMoeBatch& operator=(const CpuMoeBatch&) = delete;

  // Token t (t < tokens) is h + t * hidden; its experts experts[t * ld + j] with weights
  // weights[t * ld + j] for j < counts[t] (counts[t] <= max_per_token <= ld); y + t * hidden
  // receives its sum. Throws ktune::Error (before any work) on a layer, token count, expert
  // count or expert id out of range. Runs on the pool (the caller is thread 0).
  void compute(int64_t layer, int64_t tokens, const float* h, const int32_t* experts,
               const float* weights, const int32_t* counts, int64_t ld, float* y);

  int64_t max_tokens() const;
  // Distinct experts the last compute() read (its grouped work), for statistics and tests.
  int64_t last_active_experts() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ktune
