// GpuEngine::Deepseek: the GPU engine for deepseek2 models (DeepSeek-V2, V2-Lite, V3, R1), behind
// the same GpuEngine API as qwen3moe's Impl (GpuEngine's constructor picks it by architecture).
// Private to engine/cuda; what it shares with the qwen3moe engine (device, arenas, hand-off
// block, graph, sync, decode) is gpu_detail::EngineCore's (gpu_engine_impl.h):
//   gpu_engine_deepseek.cpp       construction (weights, arenas), the public API
//   gpu_engine_deepseek_step.cpp  the decode step's launches
//
// The decode step, all on cuda:0, token and position in device memory (one CUDA graph):
//   embedding -> per layer:
//     attention (MLA, absorbed; runtime/cpu_engine_deepseek.h explains the form):
//       [attn_norm + q_a|q and kv_a] [q_a_norm + q_b] [latent norm + RoPE into the f32 latent
//       cache, q_pe RoPE] [q_abs = W_kb^T q_nope per head] [attention over the cache, 2 launches]
//       [o = W_vb ctx per head] [attn_output + residual]
//     dense layers: [ffn_norm] [gate/up/SwiGLU] [down + residual]
//     MoE layers: [ffn_norm + router logits] [deepseek router: scores, bias, groups, top-k]
//       then, with CPU experts, the routing block handed to the CPU side (flags or host node),
//       [shared experts gate/up/SwiGLU] [shared down + residual] [routed GPU experts: fused MoE,
//       2 launches, or the unfused per-slot launches], and the CPU experts' sum added last.
//   -> output norm + head + greedy tail (argmax, history, position).
// The shared experts and the dense FFN run on the fused MoE kernels as one always-selected
// expert (id 0, weight 1: the weighted sum adds exactly the down projection).
//
// Numbers: the latent cache is float32 like the CPU engine's, activations stay float32 (the CPU
// engine quantizes them to Q8_0 for Q8_0/Q4_0 weights; F32 and BF16 weights give the same
// arithmetic up to summation order). So x = ((x + shared) + sum over GPU experts) + sum over CPU
// experts per MoE layer, deterministic run to run, graph or not; fused and unfused agree bit for
// bit (same row dots, same slot-order sums).
//
// Prefill runs the decode step token by token (no batched MLA prefill kernels yet). Not for
// several GPUs (GpuEngine refuses a layer split of a deepseek2 model).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cuda/gpu_engine_impl.h"
#include "runtime/cpu_engine_deepseek.h"

namespace ktune {

struct GpuEngine::Deepseek : gpu_detail::EngineCore {
  using DevTensor = gpu_detail::DevTensor;

  struct Layer {
    bool dense = false;
    DevTensor attn_norm, wq, wq_a, q_a_norm, wq_b, wkv_a, kv_a_norm, wk_b, wv_b, wkv_b, wo;
    DevTensor ffn_norm, ffn_gate, ffn_up, ffn_down;   // dense layers
    DevTensor router, bias, gate_sh, up_sh, down_sh;  // MoE layers
    DevTensor gate, up, down;  // routed experts on the GPU (compacted when the layer mixes)
    int64_t n_gpu_experts = 0;
    int64_t n_cpu_experts = 0;
    const int32_t* slot_map = nullptr;  // device, expert id -> slot or -1; null: slot = id
    std::vector<int32_t> host_slot;     // the same on the host (the driver reads it)
    float* cache = nullptr;             // [max_ctx][kv_lora_rank + rope_dim] f32
  };

  Deepseek(const ModelWeights& w, const GpuEngineOptions& options);
  ~Deepseek() override;

  // decode, generate_greedy, the step's graph, launch and sync: EngineCore's.
  void reset();
  int64_t position() const { return host_pos; }
  void prefill(const int32_t* tokens, int64_t n, std::vector<float>* logits);
  const GpuEngineOptions& options() const { return opt; }
  int64_t device_bytes() const;
  std::string describe() const;
  bool hybrid() const { return is_hybrid; }

  // ---- state (the device, arenas, stream, stage, hand-off block and CPU side: EngineCore's) ----
  int64_t H, nh, dq, dn, dr, dv, rq, rkv, lat, E, K, F, Fs, Fd, V, L;
  DeepseekRope rope;

  DevTensor tok_embd, output_norm, output;
  std::vector<Layer> layers;

  // Device activations (x, the stage's h / ids / wts, logits, token, pos, history and epoch are
  // EngineCore's; the stage has CpuExpertDriver's layout, as the qwen3moe engine's).
  float *qa = nullptr, *q = nullptr, *kva = nullptr, *qabs = nullptr, *ctx = nullptr, *o = nullptr,
        *rlog = nullptr, *act = nullptr, *act_ffn = nullptr, *up_ffn = nullptr, *g = nullptr,
        *u = nullptr, *ye = nullptr, *acc = nullptr, *inv_freq = nullptr, *one_weight = nullptr;
  int32_t *one_id = nullptr, *prompt = nullptr;
  void* attn_ws = nullptr;
  unsigned long long* head_key = nullptr;  // launch_matvec_fused's greedy tail
  unsigned* head_counter = nullptr;

  // ---- gpu_engine_deepseek_step.cpp ----
  void enqueue_step() override;
  void attention(const Layer& d, int64_t l);
  // SwiGLU FFN of one always-on matrix triple on the normed h: x += down(silu(gate h) * up h).
  void dense_ffn(const DevTensor& gate, const DevTensor& up, const DevTensor& down, int64_t ffn);
  void moe(const Layer& d, int64_t l);
  void routed_unfused(const Layer& d, int64_t l);
};

// The checks GpuEngine makes before it touches a GPU for a deepseek2 model (unit-testable on a
// machine without one): options the deepseek2 engine does not support, shapes its kernels cannot
// take. Throws ktune::Error naming the option or tensor.
void check_deepseek_gpu_support(const ModelWeights& w, const GpuEngineOptions& opt);

}  // namespace ktune
