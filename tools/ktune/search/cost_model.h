// The cost model of `ktune search`: from the machine's costs (a profile), a model's shape and
// bytes, the router model and a workload, it predicts the prefill and decode speed of any expert
// placement, for each engine setting (CUDA graph on/off, fused/unfused MoE, CPU hand-off kind,
// CPU threads). It models ktune's own engine: its launches per layer, its synchronisation
// points, where CPU experts run and how prefill moves them. Equations: docs/search.md.
//
// A placement is described to the model per layer by a LayerSplit (how many experts each side
// holds and how much of the routing mass and of a prefill chunk's activated experts fall on the
// GPU). Two ways to score:
//   predict()       exact for the model: decode as expected step time over the routing
//                   distribution, prefill as a simulation of the double-buffered pipeline that
//                   copies CPU-resident experts to the GPU (so layer order matters);
//   layer_tables()  the same costs made separable per layer (each layer's prefill priced as if
//                   its copies overlapped perfectly), for the optimizers: tables[l][m] is layer
//                   l's share of the mean request time with its m hottest experts on the GPU.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "ktune/engine/placement.h"
#include "search/inputs.h"

namespace ktune::search {

// The GPU engine's prefill (engine/cuda/gpu_engine_prefill.cpp): with a hybrid placement a chunk
// shorter than hybrid_prefill_min_staged() (memory_plan.h) runs as decode steps (CpuMoe per
// token); a longer one copies every hybrid layer's CPU experts to the GPU and runs batched. The
// engine prices copy bytes against the CPU reads of uniform routing, so with one expert size the
// threshold is ceil(E/k * cpu/pcie), whatever the placement: 31 tokens for 128 experts top-8.
// Launches of one layer of a batched prefill chunk (rmsnorm, q, k, v, q/k norm + RoPE,
// attention, o, rmsnorm, router, top-k, grouping, gate/up, down, combine), all eager; the
// first 11 come before the expert matmuls, which alone wait for a staged copy.
constexpr int kPrefillLaunchesPerLayer = 14;
constexpr int kPrefillLaunchesBeforeExperts = 11;
// The MLA attention kernel reads every cached row once per group of at most this many heads
// (kMlaHeads, engine/include/ktune/engine/cuda/mla_kernels.h; fewer when shared memory is short).
constexpr int64_t kMlaHeadsPerBlock = 16;

struct EngineSettings {
  bool gpu = true;  // attention on the GPU (hybrid engine); false: everything on the CPU engine
  bool cuda_graph = true;
  MoeKernel kernel = MoeKernel::Fused;
  CpuHandoff handoff = CpuHandoff::Flags;
  int cpu_threads = 1;
  // PCIe assist (RuntimeOptions::pcie_assist_permille; fused MoE only): the GPU computes
  // pcie_assist_count(n, permille, 1000) of a token's n CPU experts from host memory.
  int pcie_assist_permille = 0;

  // "graph on, fused, flags, 16 threads" / "cpu engine, 16 threads"
  std::string describe() const;
  std::string key() const;  // stable identity for caches and dedup
};
bool operator==(const EngineSettings& a, const EngineSettings& b);

// One layer's expert split, as the cost model needs it.
struct LayerSplit {
  int64_t n_gpu = 0;    // experts resident on the GPU
  int64_t n_cpu = 0;    // experts resident on the CPU
  double gpu_mass = 0;  // expected selected experts per token that are GPU-resident (<= top-k)
  // Per prefill chunk size (CostModel::chunk_sizes()): expected distinct experts a chunk of
  // that many tokens activates among the GPU- / CPU-resident experts.
  std::vector<double> gpu_distinct, cpu_distinct;
};

struct Prediction {
  double request_s = 0;      // mean time of one request of the workload's mix (batch B: machine
                             // time per request, B requests sharing each decode step)
  double prefill_s = 0;      // of which prefill
  double decode_s = 0;       // of which decode
  double prefill_tok_s = 0;  // prompt tokens / prefill time over the mix
  double decode_tok_s = 0;   // generated tokens / decode time over the mix (all sequences)
  double decode_ms = 0;      // one decode step at the mix's mean decode context
  double gpu_mass = 0;       // share of the routing mass on GPU-resident experts (coverage)
  int64_t gpu_experts = 0;
  int hybrid_layers = 0;  // layers with experts on both sides
  int cpu_layers = 0;     // layers with every expert on the CPU
  int copy_layers = 0;    // layers whose CPU experts prefill copies to the GPU (full chunks)
};

// Multi-GPU layer split: stage_of[l] = index (into MachineCosts::gpus) of the GPU that runs
// layer l's attention and holds its GPU experts. Contiguous ranges: one sequence's activations
// flow through the GPUs in layer order (a pipeline). Empty = every layer on gpus[0].
using Stages = std::vector<int>;
// Contiguous ranges from split points: counts[g] layers on GPU g, in GPU order (0 = unused).
Stages stages_from_counts(const std::vector<int64_t>& layers_per_gpu);
// The GPUs used, in pipeline order (each once), e.g. {0, 1, 3}.
std::vector<int> stage_gpus(const Stages& st);

class CostModel {
 public:
  CostModel(MachineCosts machine, ModelInfo model, RouterModel router, Workload workload);

  const MachineCosts& machine() const { return m_; }
  const ModelInfo& model() const { return model_; }
  const RouterModel& router() const { return router_; }
  const Workload& workload() const { return w_; }
  int64_t n_layers() const { return model_.cfg.n_layers; }
  int64_t n_experts() const { return model_.cfg.n_experts; }
  const std::vector<int64_t>& chunk_sizes() const { return chunk_sizes_; }

  // CPU thread counts worth trying: measured points of the profile's curves and the physical
  // core count, never more than the physical cores, without counts another beats on every curve.
  std::vector<int> thread_candidates() const;

  LayerSplit hottest_split(int64_t layer, int64_t m) const;  // the m hottest experts on the GPU
  LayerSplit split_of(int64_t layer, const std::vector<bool>& on_gpu) const;

  // Expected decode time (µs) of layer l's part of one step at KV context `ctx` (with the
  // workload's batch B > 1: one step of B sequences, see decode_layer_batch_us).
  double decode_layer_us(int64_t l, const LayerSplit& s, const EngineSettings& e, double ctx) const;
  // One sequence's step (whatever the workload's batch): what a prefill decode step costs.
  double decode_layer_one_us(int64_t l, const LayerSplit& s, const EngineSettings& e,
                             double ctx) const;
  // One step of the workload's B sequences: B KV caches, the distinct experts B tokens select
  // (GPU- and CPU-resident, from the router model), one hand-off per layer for all B.
  double decode_layer_batch_us(int64_t l, const LayerSplit& s, const EngineSettings& e,
                               double ctx) const;
  // The per-step part outside the layers (embedding, head, argmax, graph launch), µs.
  double decode_step_fixed_us(const EngineSettings& e) const;
  // A placement the engine runs hybrid: some MoE layer holds CPU experts.
  bool hybrid(const std::vector<LayerSplit>& splits) const;
  // Whether the engine runs a prefill chunk of n tokens as n decode steps: deepseek2 always
  // (token by token), a hybrid qwen3moe placement below the engine's staging threshold
  // (hybrid_prefill_min_staged); else batched.
  bool prefill_decode_steps(bool hybrid, const EngineSettings& e, int64_t n) const;
  int64_t prefill_min_staged() const;  // the engine's threshold for this model (tokens)
  // The parts of a prompt's prefill outside the layers (µs): per chunk the token copies and the
  // embedding, the output head for the last position, one synchronisation; for chunks run as
  // decode steps each step's fixed part and its own synchronisation (qwen3moe's decode() syncs,
  // deepseek2's prefill copies each token on the stream and syncs once).
  double prefill_fixed_us(const EngineSettings& e, int64_t prompt, bool hybrid) const;
  // Prefill of one prompt of `prompt` tokens (s): the pipeline simulation. copy_layers (when
  // non-null) receives the number of layers that copy CPU experts in a full chunk.
  // With stages, each GPU runs its layers' pipeline of copies and compute; chunk c starts on a
  // GPU when that GPU finished chunk c-1 and chunk c's activations arrived from the previous
  // GPU (latency + chunk tokens x hidden x 4 bytes over the link): a flow shop of chunks.
  double prefill_s(const std::vector<LayerSplit>& splits, const EngineSettings& e, int64_t prompt,
                   int* copy_layers = nullptr, const Stages& stages = {}) const;
  // Per decode step, the inter-GPU transfers of a split (µs): the hidden state (4 x hidden
  // bytes) at every boundary between consecutive GPUs, and the sampled token (4 bytes) from the
  // last GPU back to the first. 0 on one GPU.
  double decode_transfer_us(const Stages& stages) const;

  Prediction predict(const std::vector<LayerSplit>& splits, const EngineSettings& e,
                     const Stages& stages = {}) const;

  // tables[l][m], m = 0..n_experts: layer l's share (s) of the mean request time with its m
  // hottest experts on the GPU (prefill priced per layer in isolation).
  std::vector<std::vector<double>> layer_tables(const EngineSettings& e) const;
  // What predict() adds to the sum of the tables' entries when no layer's prefill copies
  // experts (then predict == constant + sum of tables exactly).
  double constant_s(const EngineSettings& e) const;
  // The decode transfers of a split over the workload's mean request (s): what the tables leave
  // out on several GPUs (prefill is priced per layer in the tables, unpipelined).
  double transfer_constant_s(const Stages& stages) const;

  // Per-layer prefill cost of one chunk of n tokens starting at position c0 (µs): the pieces
  // the pipeline simulation and the tables use.
  struct PrefillLayer {
    double gpu_us = 0;       // GPU work of the layer (attention, router, all its experts)
    double pre_us = 0;       // of which before the expert matmuls (does not wait for the copy)
    double copy_us = 0;      // copy of the layer's CPU experts to the GPU (0 unless copying)
    bool copies = false;     // CPU experts copied to the GPU (a hybrid layer, batched chunk)
    double isolated_us = 0;  // the layer's cost if its copy overlapped perfectly
  };
  // decode_steps: the chunk runs as n decode steps (prefill_decode_steps): n times the layer's
  // decode price at the chunk's middle position.
  PrefillLayer prefill_layer(int64_t l, const LayerSplit& s, const EngineSettings& e,
                             size_t chunk_index, int64_t n, int64_t c0,
                             bool decode_steps = false) const;

  // deepseek2: MLA attention of one layer at KV context ctx (µs): its launches (q/kv_a, q_b,
  // RoPE + cache store, absorption, attention + merge, value heads, output) with the attention's
  // latent-cache bytes and FLOPs (mla_attention_bytes / _flops).
  double mla_attention_us(int64_t l, double ctx, bool graph) const;
  double mla_attention_bytes(double ctx) const;  // cached rows read, once per head group
  double mla_attention_flops(double ctx) const;  // scores and weighted latents, all heads

 private:
  double kernel_us(double work_us, bool graph) const;          // one kernel: work + launch overhead
  double pre_gpu_us(int64_t l, double ctx, bool graph) const;  // attention + router kernels, µs
  double fused_moe_us(double bytes, bool graph) const;  // the two fused MoE launches, µs
  // One layer's CPU hand-off (GPU side: signal, trip, wait + add), paid on every token by a layer
  // holding CPU experts.
  double handoff_us(const EngineSettings& e, bool graph) const;
  double cpu_expert_gb_s(int threads) const;  // CpuMoe's rate, capped by the DRAM read probe
  // `count` eager launches doing `work_us` of GPU work together (host-bound when short).
  double eager_launches_us(double work_us, int count) const;
  // deepseek2's decode layer (attention on the GPU): MLA, then the dense FFN, or the router,
  // shared experts, routed experts and the hand-off.
  double decode_layer_mla_us(int64_t l, const LayerSplit& s, const EngineSettings& e,
                             double ctx) const;
  size_t chunk_index(int64_t n) const;
  // Per layer and m: the batched (or CPU engine) chunks' prefill share of the mean request; the
  // chunks a hybrid placement runs as decode steps are priced in layer_tables (they depend on
  // the graph, kernel and hand-off settings).
  const std::vector<std::vector<double>>& prefill_table(int cpu_threads, bool gpu) const;

  MachineCosts m_;
  ModelInfo model_;
  RouterModel router_;
  Workload w_;
  std::vector<int64_t> chunk_sizes_;
  // distinct_prefix_[c][l][m]: expected distinct activated experts among the m hottest of layer l
  // in a chunk of chunk_sizes_[c] tokens.
  std::vector<std::vector<std::vector<double>>> distinct_prefix_;
  // Per layer: bytes of the q/k/v, o and router matvecs, and the layer's attention parameters.
  std::vector<double> qkv_bytes_, o_bytes_, router_bytes_;
  double attn_params_ = 0;
  bool mla_ = false;  // deepseek2 with its per-launch bytes (ModelInfo::mla): MLA pricing
  mutable std::map<std::string, std::vector<std::vector<double>>> prefill_cache_;
};

}  // namespace ktune::search
