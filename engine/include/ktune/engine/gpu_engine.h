// The all-on-GPU decode engine for qwen3moe (cuda:0): every weight copied once into one device
// arena at construction (no cudaMalloc afterwards), an fp16 KV cache, and a decode step that runs
// entirely on the device:
//   embedding (token id in device memory) -> per layer: RMSNorm, q/k/v matvecs, q/k head norms,
//   NEOX RoPE (position in device memory), attention over the KV cache (stores this token's k/v),
//   o matvec + residual, RMSNorm, router matvec (F32), softmax top-k on device, MoE + residual
//   -> final RMSNorm, output head, argmax on device (the next token stays in device memory), and
//   a one-thread kernel that records the token and increments the position.
//
// MoE paths (GpuEngineOptions::moe_kernel):
//   Fused   two launches per layer reading routing from device memory (moe_fused.cu).
//   Unfused routing copied to pinned host memory and the stream synchronised, then for each
//           selected expert separate gate, up, SwiGLU, down and weighted-add launches (the
//           per-expert pattern of Python frameworks). Same row dots and summation order as
//           Fused: bit-identical logits.
// CUDA Graph (cuda_graph): the whole decode step is captured once (first step) and replayed
// for every token. It needs the fused path: the unfused path reads routing on the host mid-step,
// which a graph cannot do, so cuda_graph with Unfused is refused at construction (ktune::Error).
//
// Hybrid placements (GpuEngineOptions::expert_on_gpu with some expert on the CPU): attention,
// router and head stay on cuda:0; only the GPU-resident experts' matrices are copied to the
// device (compacted per layer, an expert id -> slot map in device memory); the CPU experts are
// computed from the host ModelWeights by CpuMoe on an owned ThreadPool. Per layer with CPU
// experts, after the router launch: the normed MoE input h, the top-k ids and weights are copied
// (one cudaMemcpyAsync) to pinned host memory and an event is recorded; the GPU experts' kernels
// are enqueued (skipping CPU slots); the host thread waits on the event, runs CpuMoe over the
// selected CPU experts (slot order) into pinned memory, then enqueues the H2D copy and the add.
// So the GPU experts run while the CPU experts run, and the sum is fixed-order:
// x = (x + sum over GPU slots) + sum over CPU slots, identical run to run, fused or unfused.
// The host thread drives every layer (no graph): cuda_graph with a hybrid placement is refused
// at construction (ktune::Error); the host-node / mapped-flag hand-offs of design §3 are not
// implemented yet. In hybrid mode `weights` must outlive the engine (CPU experts read from it).
//
// Prefill is not implemented as a batched pass yet: prefill() runs one decode step per token.
// Not thread-safe. Throws ktune::Error (no GPU, unsupported tensor types, context exhausted).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ktune/engine/model.h"
#include "ktune/engine/placement.h"  // MoeKernel, moe_kernel_name

namespace ktune {

struct GpuEngineOptions {
  int64_t max_context = 4096;  // KV cache length (positions)
  bool cuda_graph = true;      // capture the decode step once, replay per token
  MoeKernel moe_kernel = MoeKernel::Fused;
  // Hybrid placement: expert_on_gpu[layer][expert] (n_layers x n_experts); false keeps the
  // expert in host memory and computes it on the CPU. Empty = every expert on cuda:0.
  std::vector<std::vector<bool>> expert_on_gpu;
  int cpu_threads = 0;      // CpuMoe's ThreadPool size in hybrid mode (0 = physical cores)
  bool pin_threads = true;  // pin that pool's threads to cores
};

class GpuEngine {
 public:
  GpuEngine(const ModelWeights& weights, const GpuEngineOptions& opt);  // copies the weights
  ~GpuEngine();
  GpuEngine(const GpuEngine&) = delete;
  GpuEngine& operator=(const GpuEngine&) = delete;

  void reset();  // position 0 (the KV cache is overwritten as positions are reached)
  int64_t position() const;

  // One decode step on `token` at position(); logits (vocab floats) copied to the host only when
  // non-null. Synchronises the stream before returning.
  void decode(int32_t token, std::vector<float>* logits);
  // Prefill as repeated decode steps (no batched kernels yet); logits of the last token.
  void prefill(const int32_t* tokens, int64_t n, std::vector<float>* logits);
  // Greedy generation: decodes first_token, then each chosen token, n steps in all; tokens are
  // chosen on the device and read back once at the end (the benchmark path). Returns n tokens.
  std::vector<int32_t> generate_greedy(int32_t first_token, int64_t n);

  const GpuEngineOptions& options() const;
  int64_t device_bytes() const;  // weights + KV cache + workspace on the device
  std::string describe() const;  // "cuda:0 NAME, moe fused, graph on[, N/M experts on cpu]"
  bool hybrid() const;           // some expert computed on the CPU

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};


}  // namespace ktune
