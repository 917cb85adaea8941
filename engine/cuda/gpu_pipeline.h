// GpuEngine::Pipeline: the multi-GPU layer split for one sequence (design §3, issue 7). One
// GpuEngine::Impl per GPU ("stage", gpu_detail::StageSpec) over a contiguous range of layers,
// planned by plan_gpu_stages (ktune/engine/gpu_stages.h); the embedding on stage 0, the output
// norm + head + greedy sampling on the last stage.
//
// A decode step, all enqueued from the calling thread without a host synchronisation:
//   stage 0: launch (its CUDA graph, or eager launches)
//   x(0) -> x(1) over the link (ktune/engine/cuda/gpu_link.h: NCCL send/recv or peer copy)
//   stage 1: launch ...
//   token(last) -> token(0): the sampled token goes back to stage 0's device memory, so the
//   next step's embedding reads it there (generate_greedy never syncs between steps).
// Each stage has its own stream and, with cuda_graph, its own graph of its part of the step,
// captured on first use; the transfers sit between the graph launches (NCCL advises against
// capturing NCCL when one thread drives several GPUs). Prefill moves each chunk's activations
// (chunk x hidden floats) between the stages the same way, and the last chunk's token back.
//
// CPU experts: one ThreadPool, one CpuMoe and one CpuExpertDriver for every stage, and one
// mapped hand-off block (stage 0's; every stage's kernels reach it, mapped pinned memory being
// portable under unified addressing). Layers run in order across the stages, so the protocol is
// the single-GPU one (cpu_expert_driver.h); the hand-off kernels of a layer run on its GPU.
//
// Transport: GpuEngineOptions::gpu_transport; Auto builds both and keeps the faster of a short
// measurement at load (hops of one hidden state along the chain).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cuda/gpu_engine_impl.h"
#include "ktune/engine/cuda/gpu_link.h"
#include "ktune/engine/gpu_stages.h"

namespace ktune {

struct GpuEngine::Pipeline {
  Pipeline(const ModelWeights& w, const GpuEngineOptions& options, const GpuStagePlan& plan);
  ~Pipeline();

  void reset();
  int64_t position() const { return host_pos; }
  void decode(int32_t token, std::vector<float>* logits);
  void prefill(const int32_t* tokens, int64_t n, std::vector<float>* logits);
  std::vector<int32_t> generate_greedy(int32_t first_token, int64_t n);
  const GpuEngineOptions& options() const { return opt; }
  int64_t device_bytes() const;
  std::string describe() const;
  bool hybrid() const { return is_hybrid; }

  GpuEngineOptions opt;
  GpuStagePlan plan;
  std::vector<std::unique_ptr<Impl>> stages;
  // The CPU side shared by every stage (hybrid placements).
  std::unique_ptr<ThreadPool> pool;
  std::unique_ptr<CpuMoe> cpu_moe;
  std::unique_ptr<CpuExpertDriver> driver;
  std::unique_ptr<cuda::GpuLink> link;  // null with one stage
  std::string link_note;                // how auto chose (measured microseconds per hop)
  bool is_hybrid = false;
  int64_t cpu_experts_total = 0;
  int64_t host_pos = 0;
  uint32_t host_epoch = 1;

  void set_device(size_t i) const;
  void sync_stream(size_t i);  // sleeps on hybrid stages (the CPU experts need the cores)
  void sync();                 // every stream, then the driver and the error word (stage 0)
  void set_token(int32_t t);
  void run_step();
  void hop_hidden(size_t to, const float* src, float* dst, int64_t rows);
  void return_token();
  void choose_link(size_t max_bytes);
};

}  // namespace ktune
