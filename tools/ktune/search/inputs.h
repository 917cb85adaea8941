// What `ktune search` prices placements with, read and checked before any search work: the
// workload (what the user will run), the machine (profile.json's summary plus documented
// assumptions for numbers a profile lacks), the model's shape and bytes (no weights read), and
// the router model (expert activation probabilities per layer, from the profile's router
// statistics, uniform when absent). docs/search.md explains every number.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "ktune/engine/memory_plan.h"
#include "ktune/engine/model.h"
#include "ktune/engine/quant.h"
#include "profiler/profile_summary.h"

namespace ktune::search {

// ---------------------------------------------------------------------------------- workload --

// One kind of request: a prompt of `prompt` tokens, then `gen` generated tokens.
struct Request {
  int64_t prompt = 0;
  int64_t gen = 0;
  double weight = 1;  // share of the mix (normalised when used)
};

struct Workload {
  std::string name;               // "chat", or "custom" for key=value text
  std::vector<Request> requests;  // at least one
  int64_t context = 0;            // KV cache length per sequence (runtime.context)
  // Sequences decoded together (runtime.batch): each decode step serves `batch` requests, so
  // the experts any of their tokens select are read once per step.
  int64_t batch = 1;

  std::string describe() const;  // "chat: 512+256 (50%), 2048+512 (30%), ...; context 8192"
  double total_weight() const;
};

// The default: a chat-like mix (docs/search.md, "Workload"): short, medium and long prompts.
Workload chat_workload();
// Parses `chat`, or `prompt=2048,gen=256[,context=8192][,weight=W][,batch=B]`, several requests
// joined by `;` (`prompt=512,gen=256,weight=3;prompt=8192,gen=128`); `chat,batch=8` is the chat
// mix decoded 8 sequences at a time. context defaults to the longest prompt + gen rounded up to
// a multiple of 256; batch (1..4096, for the whole workload) to 1. Throws a usage error naming
// `flag`.
Workload parse_workload(const std::string& text, const std::string& flag = "--workload");
// Usage error when the workload's context exceeds the model's trained context.
void check_workload_for_model(const Workload& w, const ModelConfig& cfg,
                              const std::string& flag = "--workload");

// ------------------------------------------------------------------------------- assumptions --

// Cost-model numbers given with --assume key=value (what-if overrides, or numbers the profile
// lacks). Keys and meanings: assumption_keys().
struct Assumptions {
  std::map<std::string, double> values;
};
struct AssumptionKey {
  const char* key;
  const char* meaning;
};
const std::vector<AssumptionKey>& assumption_keys();
// "launch_eager_us=10,gpu_prefill_gflop_s=80000"; throws a usage error naming `flag` for an
// unknown key (listing the valid ones) or a value that is not a positive number.
Assumptions parse_assumptions(const std::string& text, const std::string& flag = "--assume");

// ---------------------------------------------------------------------------------- profile --

// The profile file for --profile: the path as given when it exists; a bare name (no '/') is also
// looked up, with and without ".json", in $KTUNE_PROFILES, ./profiles and the profiles/ folder of
// the source tree the binary was built in (the binary's ../../profiles). Throws ktune::Error
// naming the places tried and the profiles found there.
std::string find_profile(const std::string& arg);

// ---------------------------------------------------------------------------------- machine --

// GPU time of one kernel launch as a function of the weight bytes it reads (docs/search.md,
// "Kernels"): the profile's measured points, interpolated linearly, and beyond them extrapolated
// along the end segments (latency + bytes / bandwidth of that stretch), never below the
// proportional share of the first point; one point scales proportionally; no points: bytes /
// gb_s (profiles recorded before the curves, or an --assume override).
struct KernelCurve {
  std::vector<profile::BytesTime> points;  // increasing bytes
  double gb_s = 0;                         // the single bandwidth, when there are no points
  double us(double bytes) const;
};

// The machine's costs as the cost model uses them: the profile's numbers, with --assume values
// applied over them and documented defaults for numbers the profile did not measure (0 / empty);
// every default used is named in `notes`.
struct MachineCosts {
  // CPU
  std::string cpu_name;
  int physical_cores = 1;
  std::vector<profile::ThreadRate> cpu_read_gb_s;        // DRAM read by threads
  std::vector<profile::ThreadRate> cpu_moe_gb_s;         // CpuMoe decode bandwidth by threads
  bool cpu_moe_assumed = false;  // --assume cpu_moe_gb_s: taken as given (not capped by DRAM)
  std::vector<profile::ThreadRate> cpu_prefill_gflop_s;  // batched CPU matmul by threads
  double handoff_host_thread_us = 0;  // unused by the model (the engine no longer does this)
  double cpu_call_us = 0;  // fixed cost of one CpuMoe call (wake, quantize h, uneven finish)
  // The PCIe assist (profile cpu_costs.pcie_assist_gb_s / moe_pcie_ratio): the GPU's read rate of
  // host memory while CpuMoe runs, and CpuMoe's rate meanwhile relative to alone. 0: not known,
  // the search leaves the assist off.
  double pcie_assist_gb_s = 0, moe_pcie_ratio = 0;
  int64_t cpu_mem_available_bytes = 0;

  // The GPU the search places on (cuda:0); absent on a CPU-only profile.
  bool has_gpu = false;
  std::string gpu_device;
  std::string gpu_name;
  int64_t gpu_mem_bytes = 0;
  double gpu_read_gb_s = 0, h2d_gb_s = 0, d2h_gb_s = 0;
  double launch_eager_us = 0, graph_node_us = 0, host_node_us = 0, flag_handoff_us = 0;
  double sync_us = 0;
  double matvec_gb_s = 0, moe_fused_gb_s = 0, moe_unfused_gb_s = 0;
  double attention_us = 0, attention_us_per_1k_ctx = 0;
  double gpu_prefill_gflop_s = 0;  // the batched prefill's matmuls (tensor cores), effective
  // deepseek2's MLA decode attention: FLOPs over the latent cache (f32 dot products); no probe
  // measures it yet (kDefaultMlaAttentionGflopS unless --assume mla_attention_gflop_s).
  double mla_attention_gflop_s = 0;
  bool mla_attention_assumed = false;  // given with --assume
  double kernel_fixed_us = 0;  // latency every kernel adds to bytes / bandwidth (default 0)
  // Kernel times by bytes (the profile's curves; bandwidth-only without them).
  KernelCurve matvec, router, moe_fused, moe_unfused;
  // GPU-side gap of a queued eager kernel; 0: not measured, an eager kernel costs
  // launch_eager_us on top of its time (the older model).
  double eager_gap_us = 0;
  // One layer's flag hand-off with the engine's kernels (signal, CPU answer, wait + add), graph
  // replay; 0: not measured (composed from flag_handoff_us, a D2H and an H2D copy and an add).
  double handoff_us = 0;
  int n_gpus = 0;              // GPUs in the profile

  // Every GPU of the profile, in order (gpus[0] is the one above). The search prices every GPU
  // with gpus[0]'s kernel costs (the machines ktune targets have identical GPUs) and gives each
  // its own memory budget.
  struct Gpu {
    std::string device;  // "cuda:1"
    std::string name;
    int64_t mem_bytes = 0;
  };
  std::vector<Gpu> gpus;
  // Inter-GPU link i -> j: bandwidth (GB/s) and per-transfer latency (µs). From the profile's
  // interconnect (NCCL send/recv when measured, else peer copies), --assume peer_gb_s /
  // peer_latency_us over them, else the documented defaults (kDefaultPeerGbS, kDefaultPeerUs).
  std::vector<std::vector<double>> link_gb_s, link_latency_us;
  // Time (µs) to move `bytes` from GPU i to GPU j: latency + bytes / bandwidth (0 when i == j).
  double transfer_us(int i, int j, double bytes) const;

  std::vector<std::string> notes;  // assumptions used, one line each

  double cpu_moe_at(int threads) const;
  double cpu_read_at(int threads) const;
  double cpu_prefill_at(int threads) const;
};
MachineCosts machine_costs(const profile::ProfileSummary& s, const Assumptions& a);
// Inter-GPU link defaults when the profile has no measurement (PCIe-class, through the host).
constexpr double kDefaultPeerGbS = 20.0;
constexpr double kDefaultPeerUs = 15.0;
// The GPU's effective rate in ktune's batched prefill (tensor-core matmuls of the q/k/v/o
// projections, grouped expert matmuls, causal attention): calibrated on qwen3-30b-a3b Q4_0,
// pp512 all on one H100 (12742.6 tok/s, docs/search.md "Prefill"), used where the profile has
// no gpu_costs.prefill_gflop_s.
constexpr double kDefaultGpuPrefillGflopS = 75400.0;
// MLA decode attention (engine/cuda/mla_attention.cu): an estimate from the kernel's structure
// (DeepSeek-V2-Lite, 4096 positions: 16 spans x 2 head groups, ~30 us for 143 MFLOP), not
// measured; docs/search.md "deepseek2".
constexpr double kDefaultMlaAttentionGflopS = 5000.0;

// ------------------------------------------------------------------------------------ model --

// deepseek2: the weight bytes each launch of a layer's decode step reads (the GPU engine's
// launches, engine/cuda/gpu_engine_deepseek_step.cpp), so MLA and the dense / shared FFN are
// priced by their own shapes.
struct MlaLayerBytes {
  double q_in = 0;   // attn_q_a, or attn_q without q compression (V2-Lite)
  double kv_a = 0;   // attn_kv_a_mqa (the latent + roped key projection)
  bool kv_a_apart = false;  // q_in and kv_a of different types: two launches instead of one
  double q_b = 0;    // attn_q_b (0 without q compression)
  double k_b = 0;    // the absorption q_abs = W_kb^T q_nope: attn_k_b, or attn_kv_b's key rows
  double v_b = 0;    // o_h = W_vb ctx_h: attn_v_b, or attn_kv_b's value rows
  double o = 0;      // attn_output
  double router = 0; // ffn_gate_inp (F32; 0 in dense layers)
  double ffn = 0;    // the dense FFN (dense layers) or the shared experts (MoE layers)
};

struct ModelInfo {
  std::string spec;  // as given on the command line
  std::string path;  // for model.path in placements: absolute for files, the spec for synth:
  ModelConfig cfg;
  WeightBytes bytes;  // per layer attention / one expert, embedding, head
  std::string quant;  // expert type name, for reports ("q4_0")
  std::vector<MlaLayerBytes> mla;  // per layer, deepseek2 only (empty otherwise)
};
// The per-launch bytes of a deepseek2 model's layers from its tensors (files, mixed synth).
std::vector<MlaLayerBytes> mla_layer_bytes(const ModelWeights& w);
// synth:PRESET[:QUANT]: the preset's shape (nothing generated); a GGUF file or a Hugging Face
// folder: opened (mmap; no tensor data read). Throws ktune::Error.
ModelInfo load_model_info(const std::string& spec);
ModelInfo model_info(const ModelConfig& cfg, QuantType expert_type, QuantType dense_type,
                     const std::string& spec);

// ----------------------------------------------------------------------------------- router --

// Expert activation probabilities: p[l][e] = probability that a token selects expert e in layer
// l (so each layer's p sums to n_experts_used).
struct RouterModel {
  bool measured = false;
  int64_t tokens = 0;
  std::vector<std::vector<double>> p;
  std::vector<std::vector<int32_t>> hot;    // per layer: expert ids, most selected first (ties: id)
  std::vector<std::vector<double>> prefix;  // per layer: prefix[m] = sum of p over hot[0..m)
  std::string digest;                       // "uniform" or "sha256:<hex of the counts>"
  std::string note;  // why uniform, or sample-size caution; empty when nothing to say

  // Share of the routing mass on the m hottest experts of layer l (0..1).
  double hot_share(int64_t l, int64_t m) const;
};
RouterModel uniform_router(const ModelConfig& cfg);
// From counts[l][e] over `tokens` tokens (each selecting top-k per layer), with add-half
// smoothing so that an expert unseen in a small sample is not taken as never used.
RouterModel router_from_counts(const std::vector<std::vector<int64_t>>& counts, int64_t tokens,
                               const ModelConfig& cfg);
// The profile's statistics when they are for a model of this shape (layers, experts, top-k),
// else uniform with a note saying why.
RouterModel router_from_profile(const profile::ProfileSummary& s, const ModelConfig& cfg);

// SHA-256 of bytes, lower-case hex (identifies router statistics in placements).
std::string sha256_hex(const std::string& bytes);

}  // namespace ktune::search
