// The memory planner: bytes per device of a placement (weights, KV cache, workspace, CUDA Graph
// pool), computed before anything is loaded, and the check that refuses a plan that does not
// fit its budgets, naming the device, the need and the budget. The formulas are in
// docs/placement.md; the engine allocates by the same numbers.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "ktune/engine/model.h"
#include "ktune/engine/placement.h"
#include "ktune/engine/quant.h"

namespace ktune {

constexpr int64_t kMiB = int64_t{1} << 20;
constexpr int64_t kGiB = int64_t{1} << 30;

// Fixed terms of the plan (docs/placement.md explains each).
constexpr int64_t kGpuContextReserve = 512 * kMiB;  // CUDA context, kernel images, libraries
constexpr int64_t kGpuGraphPool = 64 * kMiB;        // captured graphs, per GPU, when cuda_graph
constexpr int64_t kGpuCommReserve = 128 * kMiB;     // NCCL buffers, per GPU, when >1 GPU
constexpr int64_t kGpuBudgetHeadroom = 256 * kMiB;  // default budget = total - this
constexpr int64_t kHostBudgetHeadroom = 1 * kGiB;   // default budget = MemAvailable - this
constexpr int64_t kPrefillChunkTokens = 512;        // prefill runs in chunks of at most this
constexpr int64_t kPrefillTileRows = 64;            // rows per tile of the GPU prefill matmuls
constexpr int64_t kAttnDecodeChunk = 256;           // positions per split of the decode attention

// Orders device names as devices (cpu < cuda:0 < cuda:2 < cuda:10); unknown names last, by text.
struct DeviceNameLess {
  bool operator()(const std::string& a, const std::string& b) const;
};

// Bytes of the parts of a model that a placement puts somewhere.
struct WeightBytes {
  std::vector<int64_t> attention;  // per layer: norms, q/k/v/o, q/k norms, router
  std::vector<int64_t> expert;     // per layer: one expert's gate + up + down
  int64_t embedding = 0;           // token_embd
  int64_t head = 0;                // output_norm + output
  int64_t head_shared = 0;         // bytes of `head` that are token_embd's (tied embeddings)
};
// A model whose experts are `expert_type` and other matrices (embedding, attention, output)
// `dense_type`; norms and the router F32. This is what synthetic models and gen-model write.
WeightBytes weight_bytes(const ModelConfig& cfg, QuantType expert_type, QuantType dense_type);
// The actual types of a loaded model's tensors (mixed-type GGUFs included).
WeightBytes weight_bytes(const ModelWeights& w);

struct DeviceUse {
  int64_t weights = 0;
  int64_t kv_cache = 0;
  int64_t workspace = 0;  // activations, staging, fixed reserves
  int64_t staging = 0;    // part of workspace: buffers that stream CPU experts in for prefill
  int64_t graph_pool = 0;
  int64_t total = 0;
  int64_t budget = -1;     // -1: no budget known (not checked)
  int64_t experts = 0;     // experts held (all layers)
  bool attention = false;  // runs some layer's attention

  // "17.3 GiB (weights 15.2, KV cache 0.4, workspace 0.6, graph 0.1) of 79.4 GiB"
  std::string breakdown() const;
};

// Per-device budgets in bytes, keyed "cpu", "cpu:0", "cuda:0", ...
struct Budgets {
  std::map<std::string, int64_t, DeviceNameLess> bytes;
  std::string gpu_note;  // why there are no GPU budgets (no GPU here), for messages
  // This machine's NUMA nodes (the cpu:N pools it has) and each one's MemTotal (-1: unknown);
  // empty when unknown (a plan for another machine: cpu:N pools are then not checked unless
  // they have a budget). `cpu=SIZE` overrides split SIZE over them by MemTotal.
  std::vector<std::pair<int, int64_t>> numa_nodes;
};

struct MemoryPlan {
  // Pools of the devices the placement uses. A placement that names no NUMA node counts every
  // CPU device under "cpu" (the host's memory); one that names nodes counts each under its
  // cpu:N (node N's memory), and may not use plain cpu as well (plan_memory throws).
  std::map<std::string, DeviceUse, DeviceNameLess> per_device;
  Budgets budgets;              // what the plan was checked against (for check_fits' messages)
  int64_t batch = 1;            // the placement's runtime.batch (check_fits' advice)
  std::string summary() const;  // one line per device
};

// GPUs: total memory - kGpuBudgetHeadroom; host: MemAvailable - kHostBudgetHeadroom (absent
// when unknown); each NUMA node N of this machine: cpu:N = its MemTotal share of the host
// budget (add_numa_budgets).
Budgets default_budgets();
// Sets b.numa_nodes from `nodes` (id, MemTotal or -1) and, when b has a "cpu" budget, cpu:N =
// that budget * MemTotal(N) / sum of MemTotal (equal shares when any MemTotal is unknown; node
// order decides where the rounding remainder goes: the last node). One node gets "cpu" exactly.
void add_numa_budgets(Budgets& b, const std::vector<std::pair<int, int64_t>>& nodes);
// Parses "cuda:0=70GiB,cuda:1=20000MiB" / "cpu=100GiB" / "cpu:0=100GiB,cpu:1=90GiB" / "70GiB"
// (a bare size: every device of `bare_kind` in `b`; the cpu for Cpu). `cpu=SIZE` (or a bare
// size for Cpu) also re-splits the node budgets of b.numa_nodes by MemTotal; a cpu:N item sets
// that node's budget (after any cpu item of the same text, whatever the order). Units: B, KiB/MiB/GiB/TiB (also K/M/G/T), KB/MB/GB/TB
// (powers of 1000), case-insensitive; decimals allowed. Throws a usage error naming `flag` on a
// malformed, negative or absurd (> 1 PiB) value or a bad device.
std::vector<std::pair<std::string, int64_t>> parse_budget_overrides(const std::string& text,
                                                                    const std::string& flag);
void apply_budget_overrides(Budgets& b, const std::string& text, const std::string& flag,
                            Device::Kind bare_kind);
// "12GiB" -> bytes; throws a usage error naming `where`.
int64_t parse_byte_size(const std::string& text, const std::string& where);
// One decimal: "83.2 GiB".
std::string format_gib(int64_t bytes);

struct PlanOptions {
  // Reserve, on each GPU that runs attention, two buffers of the largest set of CPU-resident
  // experts of one of its layers, so prefill can stream them in (issue 4: "large batches may
  // copy CPU-resident experts to the GPU").
  bool stage_cpu_experts_for_prefill = true;
  int64_t prefill_chunk = kPrefillChunkTokens;
};

// Device bytes of the GPU engine's batched prefill workspace for chunks of `tokens` tokens:
// activations, the expert grouping, per-expert matrix pointers (each slice 256-byte aligned, as
// the engine allocates them); staging buffers not included (DeviceUse::staging).
int64_t prefill_workspace_bytes(const ModelConfig& cfg, int64_t tokens);

// Hybrid prefill (the GPU engine's choice, priced the same way by `ktune search`): a chunk of
// n tokens either copies its layers' CPU-resident experts to the GPU and computes them there
// (staged: the copy, about copy_bytes over PCIe, bounds the chunk) or runs n decode steps whose
// CPU experts read cpu_bytes_per_token from host memory each. Staging pays once n decode steps'
// CPU reads take longer than the copy:
//   min_staged = ceil((copy_bytes / pcie_gb_s) / (cpu_bytes_per_token / cpu_gb_s)),
// at least 1; chunks shorter than that run as decode steps. cpu_bytes_per_token counts the
// routed share of the CPU experts (uniform routing: k * n_cpu / n_experts per layer). Measured
// on the H100 machine (qwen3-30b-a3b Q4_0, 2987 of 6144 experts on the CPU): a 16-token staged
// chunk copied 7.8 GB in ~155 ms (~50 GB/s), 99 tok/s, where decode steps ran 16 tokens at
// 211-227 tok/s; the fixed threshold of 16 tokens this replaces staged it.
constexpr double kPrefillCopyGbS = 45;  // pinned host -> device copies, PCIe Gen5 x16 (derated)
constexpr double kPrefillCpuGbS = 85;   // CpuMoe's DRAM read on the 16-core machine
int64_t hybrid_prefill_min_staged(double copy_bytes, double cpu_bytes_per_token,
                                  double pcie_gb_s = kPrefillCopyGbS,
                                  double cpu_gb_s = kPrefillCpuGbS);

// Device bytes of the GPU engine's batched decode state for `sequences` concurrent sequences of
// `context` positions (GpuEngineOptions::max_sequences > 1): B rows of every activation, the
// expert grouping, logits, per-sequence token history, per-expert matrix pointers and the
// batched attention's workspace (each slice 256-byte aligned, as the engine allocates them).
// The KV cache is not included (DeviceUse::kv_cache counts it per sequence).
int64_t batch_decode_workspace_bytes(const ModelConfig& cfg, int64_t sequences, int64_t context);

// The plan for a resolved placement; budgets are copied into DeviceUse::budget. The KV cache is
// counted per sequence (runtime.batch x runtime.context positions of every layer), and with
// runtime.batch > 1 a GPU that runs attention adds batch_decode_workspace_bytes.
MemoryPlan plan_memory(const ModelConfig& cfg, const WeightBytes& bytes, const Placement& p,
                       const Budgets& budgets, const PlanOptions& opt = {});
MemoryPlan plan_memory(const ModelConfig& cfg, QuantType expert_type, QuantType dense_type,
                       const Placement& p, const Budgets& budgets, const PlanOptions& opt = {});
MemoryPlan plan_memory(const ModelWeights& w, const Placement& p, const Budgets& budgets,
                       const PlanOptions& opt = {});

// Throws ktune::Error (runtime) for the first device, in device order, that needs more than its
// budget, a GPU with no budget ("no such device here"), or a cpu:N pool that has no budget while
// the budgets know this machine's nodes ("cpu:1: no such NUMA node here (this machine has
// cpu:0)"). A CPU pool without a known budget is not checked otherwise.
void check_fits(const MemoryPlan& plan);

}  // namespace ktune
