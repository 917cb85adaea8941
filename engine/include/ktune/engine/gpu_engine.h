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
//   Unfused without a graph: routing copied to pinned host memory and the stream synchronised,
//           then for each selected expert separate gate, up, SwiGLU, down and weighted-add
//           launches (the per-expert pattern of Python frameworks). In a graph: the same five
//           launches for each of the top-k slots, each reading its expert from device memory
//           (hybrid_kernels.h), so the step can be captured. Same row dots and summation order
//           as Fused: bit-identical logits.
// CUDA Graph (cuda_graph): the whole decode step, CPU experts included, is captured once (first
// step) and replayed for every token; position, token and hand-off sequence numbers live in
// device memory.
//
// Hybrid placements (GpuEngineOptions::expert_on_gpu with some expert on the CPU): attention,
// router and head stay on cuda:0; only the GPU-resident experts' matrices are copied to the
// device (compacted per layer, an expert id -> slot map in device memory); the CPU experts are
// computed from the host ModelWeights by CpuMoe on an owned ThreadPool, driven by one host
// thread (engine/cuda/cpu_expert_driver.h). Per layer with CPU experts, after the router: the
// routing block (normed h, top-k ids and weights) goes to mapped pinned memory and a request
// word is raised, either by a one-block kernel (cpu_handoff flags) or by a host node
// (host_node: a memcpy node + cudaLaunchHostFunc); the GPU experts' kernels run while the CPU
// computes; then a one-block kernel waits for the done word (host_node: after a second host
// node that blocks until it) and adds the CPU sum. So x = (x + sum over GPU slots) + sum over
// CPU slots, identical run to run, graph or not, fused or unfused. The same hand-off runs
// without a graph (the host thread enqueues the whole step without waiting), except for the
// host-driven unfused step, which computes the CPU experts on the calling thread after its
// routing sync. A stalled side never hangs: both sides give up after handoff_timeout_ms and the
// next synchronising call throws ktune::Error. In hybrid mode `weights` must outlive the engine.
//
// Multi-GPU (GpuEngineOptions::layer_device naming several GPUs): a pipeline for one sequence,
// one stage per GPU with its own stream and graph, the hidden state moved between them by NCCL
// or peer copies (engine/cuda/gpu_pipeline.h); tokens and logits equal the one-GPU engine's.
//
// deepseek2 (DeepSeek-V2/V2-Lite/V3/R1, MLA): its own step behind the same API
// (engine/cuda/gpu_engine_deepseek.h): absorbed MLA over a float32 latent cache, the deepseek
// router on the device, shared experts and dense layers on the GPU, routed experts on cuda:0 or
// the CPU as for qwen3moe; one GPU only, prefill token by token.
//
// Prefill runs batched (engine/cuda/gpu_engine_prefill.cpp): chunks of up to max_prefill_chunk
// tokens through tensor-core matmuls, a causal attention kernel and expert-grouped MoE matmuls;
// with a hybrid placement, chunks of 16+ tokens copy the CPU experts' weights to the GPU, shorter
// ones run decode steps.
//
// Concurrent sequences (GpuEngineOptions::max_sequences > 1; engine/cuda/gpu_engine_batch.cpp):
// each sequence has its own KV cache region and position. decode(), prefill() and
// generate_greedy() work on the current sequence (set_sequence); decode_batch() and
// generate_greedy_batch() advance sequences 0..B-1 by one token per step, as a prefill chunk of B
// tokens at B positions of B caches: the prefill's tensor-core matmuls (every weight read once
// per step), the decode attention with a batch dimension (each query over its own cache), the
// expert-grouped MoE (an expert read once for all tokens that chose it; CPU experts of a hybrid
// placement grouped the same way by the driver thread), greedy sampling per sequence on the
// device; one CUDA graph per batch size. Each sequence's tokens and logits do not depend on
// which other sequences share the step (B sequences give the bits each gives alone, B = 1); they
// differ from decode()'s by the prefill's fp16 rounding. One GPU only (no layer split).
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
  int cpu_threads = 0;      // CpuMoe's ThreadPool size in hybrid mode (0 = hybrid_cpu_threads_default())
  bool pin_threads = true;  // pin that pool's threads to cores
  CpuHandoff cpu_handoff = CpuHandoff::Flags;  // how CPU experts are handed over (see above)
  // PCIe assist (RuntimeOptions::pcie_assist_permille): the GPU computes this many thousandths
  // (rounded down per token) of each layer's CPU experts from host memory over PCIe, while the
  // CPU computes the rest. Needs the fused MoE and one GPU; otherwise off, and describe() says
  // why. KTUNE_PCIE_ASSIST=share (or off) overrides it.
  int pcie_assist_permille = 0;
  int64_t handoff_timeout_ms = 10000;          // either side gives up after this long
  int64_t max_prefill_chunk = 512;  // prefill runs in chunks of at most this many tokens
  // Multi-GPU layer split (ktune/engine/gpu_stages.h): the CUDA device of each layer's attention
  // (n_layers entries; each GPU one contiguous range). Empty = every layer on cuda:0. A layer's
  // GPU experts (expert_on_gpu) live on its device.
  std::vector<int> layer_device;
  GpuTransport gpu_transport = GpuTransport::Auto;  // how activations move between the GPUs
  // Sequences with their own KV cache (max_context positions each) for decode_batch (1..4096;
  // > 1 needs one GPU). The memory planner counts the cache per sequence (runtime.batch).
  int64_t max_sequences = 1;
  // Router statistics (expert_counts()): each decode step's selected experts counted per layer on
  // the device, in the router's top-k tail (integer atomics). Off: nothing counted, no cost.
  bool count_experts = false;
};

class GpuEngine {
 public:
  GpuEngine(const ModelWeights& weights, const GpuEngineOptions& opt);  // copies the weights
  ~GpuEngine();
  GpuEngine(const GpuEngine&) = delete;
  GpuEngine& operator=(const GpuEngine&) = delete;

  void reset();  // every sequence at position 0 (caches are overwritten as positions are reached)
  int64_t position() const;  // of the current sequence

  // Concurrent sequences (see above). set_sequence throws for a sequence outside
  // [0, max_sequences()).
  int64_t max_sequences() const;
  void set_sequence(int64_t seq);
  int64_t sequence() const;
  int64_t position(int64_t seq) const;
  // One decode step of sequences 0..n-1 at once (n <= max_sequences): tokens[b] goes to sequence
  // b at its own position. logits (n * vocab floats, row b for sequence b) when non-null.
  // Synchronises before returning. On an engine made for one sequence, n = 1 is decode() on
  // sequence 0.
  void decode_batch(const int32_t* tokens, int64_t n, std::vector<float>* logits);
  // Greedy generation of sequences 0..n-1: `steps` batched steps from first_tokens[b], each
  // sequence's next token chosen on the device; read back once at the end. Returns n * steps
  // tokens, sequence b's at [b * steps, (b + 1) * steps). Throws before running when a sequence
  // would pass max_context.
  std::vector<int32_t> generate_greedy_batch(const int32_t* first_tokens, int64_t n, int64_t steps);

  // One decode step on `token` at position(); logits (vocab floats) copied to the host only when
  // non-null. Synchronises the stream before returning.
  void decode(int32_t token, std::vector<float>* logits);
  // Runs tokens at positions position()..position()+n-1 (batched), leaving the engine as if
  // they had been decoded one by one; logits (vocab floats) of the last token when non-null.
  // Synchronises the stream before returning.
  void prefill(const int32_t* tokens, int64_t n, std::vector<float>* logits);
  // Greedy generation: decodes first_token, then each chosen token, n steps in all; tokens are
  // chosen on the device and read back once at the end (the benchmark path). Returns n tokens.
  std::vector<int32_t> generate_greedy(int32_t first_token, int64_t n);

  const GpuEngineOptions& options() const;
  int64_t device_bytes() const;  // weights + KV cache + workspace on the device
  // "cuda:0 NAME, moe fused, graph on[, up to B sequences per step][, N/M experts on cpu (T
  // threads, handoff flags)]"; with
  // several GPUs "cuda:0 NAME + cuda:1 NAME (cuda:0 layers 0-23 -> cuda:1 layers 24-47,
  // transport nccl [auto: ...]), moe fused, graph on (one per GPU)[, ...]"
  std::string describe() const;
  bool hybrid() const;           // some expert computed on the CPU
  // With count_experts: times expert e of layer l was selected by a decode step since
  // construction (n_layers x n_experts; prefill chunks run batched are not counted, nor the
  // KTUNE_GPU_LEGACY=1 step). Empty when not counting. Synchronises the streams.
  std::vector<std::vector<uint64_t>> expert_counts() const;

 private:
  struct Impl;
  struct Pipeline;                  // several GPUs (or one other than cuda:0)
  struct Deepseek;                  // deepseek2 models (engine/cuda/gpu_engine_deepseek.h)
  std::unique_ptr<Impl> impl_;      // set for the one-GPU engine on cuda:0
  std::unique_ptr<Pipeline> pipe_;  // else this
  std::unique_ptr<Deepseek> ds_;    // or this, for deepseek2 (one GPU)
};


}  // namespace ktune
