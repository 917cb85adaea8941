// The CPU half of a hybrid MoE layer: for ONE token and one layer, the weighted sum of a given
// subset of the token's selected experts (the ones the placement keeps in host memory),
//   y = sum_j weights[j] * down_{e_j}( silu(gate_{e_j}(h)) * up_{e_j}(h) ),
// from an already-normed float hidden state h into a float buffer y (hidden floats; overwritten,
// not added to any residual). The GPU computes the complement and adds both to the residual.
//
// It uses the CpuEngine's kernels and work split (engine/runtime/cpu_engine.cpp, decode_moe):
// h is quantized once into the activation type of the gate/up weights; all experts run in ONE
// parallel region of the pool: gate+up+SwiGLU over (expert, unit of `unit` ffn rows) work items
// with the down activation quantized per unit, one barrier, then down rows over all experts,
// each output row summed over the experts in the order given (s = 0; s += w_j * y_j[r]).
// Every output element is computed by one thread in a fixed order, so y is bit-identical for any
// thread count, and equals the CpuEngine's MoE term for the same experts in the same order.
// Nothing is allocated in compute(). Not thread-safe (one compute() at a time per object).
#pragma once

#include <cstdint>
#include <memory>

#include "ktune/engine/cpu_kernels.h"
#include "ktune/engine/model.h"

namespace ktune {

class ThreadPool;

class CpuMoe {
 public:
  // weights and pool must outlive this object. Throws ktune::Error when the expert tensors are
  // missing, misshaped or of a type the CPU kernels cannot multiply.
  CpuMoe(const ModelWeights& weights, ThreadPool& pool, cpu::Isa isa = cpu::detect_isa());
  ~CpuMoe();
  CpuMoe(const CpuMoe&) = delete;
  CpuMoe& operator=(const CpuMoe&) = delete;

  // y[0..hidden) = sum over j < n of weights[j] * expert_{experts[j]}(h) for layer `layer`.
  // 0 <= n <= max_experts(); n == 0 writes zeros. Throws ktune::Error (before any work) on a
  // layer or expert id out of range or n out of range. Runs on the pool (the caller is thread 0).
  void compute(int64_t layer, const float* h, const int32_t* experts, const float* weights, int n,
               float* y);

  // Most experts one compute() takes: the model's experts per layer (n_experts; a hybrid step
  // passes a subset of the top-k). Scratch is sized for this many.
  int max_experts() const;
  cpu::Isa isa() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ktune
