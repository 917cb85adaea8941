// The CPU half of a hybrid MoE layer: for ONE token and one layer, the weighted sum of a given
// subset of the token's selected experts (the ones the placement keeps in host memory),
//   y = sum_j weights[j] * down_{e_j}( silu(gate_{e_j}(h)) * up_{e_j}(h) ),
// from an already-normed float hidden state h into a float buffer y (hidden floats; overwritten,
// not added to any residual). The GPU computes the complement and adds both to the residual.
//
// It uses the CpuEngine's kernels (engine/runtime/cpu_engine.cpp, decode_moe) in one parallel
// region of the pool, with no barrier: every thread quantizes h itself, then works through its
// own list of work items and, once that is empty, takes items from the other threads' lists.
// Gate+up+SwiGLU items are (expert, `unit` ffn rows) and quantize their blocks of the down
// activation; down items are (expert, a run of output rows) and wait only for their own
// expert's gate/up items; the last down item of a run of rows sums that run over the experts
// in the order given (s = 0; s += w_j * y_j[r]). Every output element is computed by one thread
// in a fixed order, so y is bit-identical for any thread count and schedule, and equals the
// CpuEngine's MoE term for the same experts in the same order. Nothing is allocated in
// compute(). Not thread-safe (one compute() at a time per object).
//
// Tuning knobs, read at construction (A/B runs; defaults are the measured best):
// KTUNE_CPU_MOE_SCHED=flow|barrier (barrier: the CpuEngine's two phases with shared tickets),
// KTUNE_CPU_MOE_UNIT_ROWS (ffn rows per gate/up item, a multiple of 32; 64),
// KTUNE_CPU_MOE_DOWN_ROWS (output rows per down item; 32), KTUNE_CPU_MOE_INTERLEAVE=0|1 (gate
// and up in alternating 4-row tiles; 0), KTUNE_CPU_MOE_PREFETCH_KB (software prefetch of a
// thread's next item while it works on one; 0), KTUNE_CPU_MOE_START_KB (prefetch of its first
// item before it quantizes h; 4), KTUNE_CPU_MOE_SPIN_US (see the constructor; 1000). On the
// 16-core Xeon of the H100 machine (tests/bench/bench_cpu_moe.cpp) the schedule and the spin
// matter (a futex wake-up cost ~25 µs per call); the other knobs measured within noise.
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
  // missing, misshaped or of a type the CPU kernels cannot multiply. Raises the pool's spin_us
  // to KTUNE_CPU_MOE_SPIN_US (1000) if lower and the pool has no more threads than the machine
  // has cores: calls come once per layer with the GPU's work in between, and a worker that went
  // to sleep costs a futex wake-up at the next call.
  CpuMoe(const ModelWeights& weights, ThreadPool& pool, cpu::Isa isa = cpu::detect_isa());
  ~CpuMoe();
  CpuMoe(const CpuMoe&) = delete;
  CpuMoe& operator=(const CpuMoe&) = delete;

  // y[0..hidden) = sum over j < n of weights[j] * expert_{experts[j]}(h) for layer `layer`.
  // 0 <= n <= max_experts(); n == 0 writes zeros. Throws ktune::Error (before any work) on a
  // layer or expert id out of range or n out of range. Runs on the pool (the caller is thread 0).
  void compute(int64_t layer, const float* h, const int32_t* experts, const float* weights, int n,
               float* y);

  // Keeps the pool's workers spinning through a wait longer than their spin (the GPU's half of
  // a hybrid step: 1.7 ms for 24 GPU layers of qwen3-30b-a3b on the H100): a no-op parallel
  // region restarts their spin, so the next compute() does not pay a futex wake-up per worker
  // (slow in a VM). A caller that waits calls it every keep_warm_interval_us(); 0 = never (a pool
  // that does not spin).
  void keep_warm();
  int64_t keep_warm_interval_us() const;

  // Most experts one compute() takes: the model's experts per layer (n_experts; a hybrid step
  // passes a subset of the top-k). Scratch is sized for this many.
  int max_experts() const;
  cpu::Isa isa() const;

  // Where compute()'s time goes, for benchmarks: with timing on, each call reads the clock a
  // few times per thread (~20 ns each). Sums over the calls since the last reset, µs.
  struct Timing {
    int64_t calls = 0;
    double total_us = 0;    // compute(), entry to return
    double wake_us = 0;     // entry until the last thread has started its task
    double quant_us = 0;    // per thread (mean): quantizing the activation of h
    double work_us = 0;     // per thread (mean): computing its work items
    double gate_up_us = 0;  // per thread (mean): of work_us, until its gate/up items were done
    double wait_us = 0;     // per thread (mean): waiting for other threads' results
    double tail_us = 0;     // first thread's finish to last thread's finish
    double exit_us = 0;     // last thread's finish until compute() returns
  };
  void set_timing(bool on);
  Timing timing() const;
  void reset_timing();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ktune
