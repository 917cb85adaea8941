// `ktune run` as library code: the benchmark of one model (plain --model runs on the CpuEngine),
// and the placement runs (--config a.yaml[,b.yaml] or --model with quick flags): each placement
// is resolved against the model, planned and checked against the memory budgets BEFORE the
// model is loaded, mapped to an engine (all on cpu -> CpuEngine, all on cuda:0 -> GpuEngine;
// hybrid placements are refused until the hybrid step lands), and the model is loaded once for
// the whole sweep. cmd_run.cpp only parses flags into RunOptions.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "bench_stats.h"
#include "ktune/engine/memory_plan.h"
#include "ktune/engine/model.h"
#include "ktune/engine/placement.h"

namespace ktune::cli {

constexpr int64_t kNotGiven = INT64_MIN;
constexpr int64_t kMaxBatch = 32;

// Expected distinct experts a decode step of `batch` tokens reads per layer of E experts with
// top-k routing, when every token picks uniformly: E * (1 - (1 - k/E)^batch).
double expected_distinct_experts(int64_t n_experts, int64_t top_k, int64_t batch);

struct RunOptions {
  std::string model = "synth:tiny";
  bool model_given = false;            // --model was on the command line
  std::vector<std::string> configs;    // --config a.yaml,b.yaml
  // Quick placements and runtime overrides; each may be a comma-separated list, and the run
  // sweeps the cross product (placements x graph x moe kernel x hand-off), model loaded once.
  std::vector<int64_t> experts_on_gpu;  // --experts-on-gpu N[,N...]
  std::string cuda_graph;              // --cuda-graph on|off[,...]; "": the placement's setting
  std::string moe_kernel;              // --moe-kernel fused|unfused[,...]; "": the placement's
  std::string cpu_handoff;             // --cpu-handoff flags|host_node[,...]; "": the placement's
  std::string pcie_assist;             // --pcie-assist off|SHARE[,...]; "": the placement's
  // --gpus N[,N...]: quick placement over the first N GPUs, layers split evenly (with
  // --experts-on-gpu K: the experts of K layers on their layer's GPU, spread over the GPUs;
  // without it: every expert on its layer's GPU).
  std::vector<int> gpus;
  std::string gpu_transport;           // --gpu-transport auto|nccl|peer[,...]; "": the placement's
  std::string gpu_mem;                 // --gpu-mem budget overrides ("" = defaults)
  std::string cpu_mem;                 // --cpu-mem
  int64_t prompt = 512;
  // --prompt TEXT (any value that is not a plain number) or --prompt-text: generate text from
  // these prompts instead of benchmarking (sequence b of a batch gets texts[b % size]).
  std::vector<std::string> texts;
  int64_t gen = 128;
  int64_t batch = 1;  // --batch: sequences decoded together (1..kMaxBatch; the largest of a list)
  // --batch B[,B...]: one tg row (set) per entry, the engine made for the largest; empty = {batch}
  std::vector<int64_t> batches;
  int reps = 5;
  std::vector<int> threads;
  bool json = false;
  bool probe = true;
  uint64_t seed = 42;
};

// The batch sizes of the tg rows: opt.batches, or {opt.batch} when that is empty.
std::vector<int64_t> batch_list(const RunOptions& opt);

// True when the run goes through placements (any of --config, --experts-on-gpu, --cuda-graph,
// --moe-kernel, --gpu-mem, --cpu-mem); a plain --model run keeps the CpuEngine-only table.
bool uses_placements(const RunOptions& opt);

// Runs the benchmark and prints the table (or JSON) on stdout. Throws ktune::Error.
void run_benchmark(const RunOptions& opt);

// ---- pieces of the placement path (tested in-process) ----

enum class EngineKind { Cpu, Gpu, Hybrid };
const char* engine_kind_name(EngineKind k);  // "cpu" | "gpu" | "hybrid"

// Which engine runs a resolved placement: every layer's attention and experts on CPU devices ->
// Cpu; every one on a GPU -> Gpu; every layer's attention on a GPU and experts on that GPU or
// cpu (some on cpu) -> Hybrid (the GpuEngine with CPU experts). Several GPUs: the layer split
// (ktune/engine/gpu_stages.h), whose rules plan_gpu_stages checks. Anything else throws
// ktune::Error (exit 1) naming `where`: attention on the CPU with experts on a GPU (naming the
// layers and the devices of every group of layers), a layer's experts on another GPU than its
// attention, a GPU with two separate ranges of layers.
// NUMA [issue 7]: a placement naming nodes (cpu:N) on a machine with several nodes is refused
// for now (`numa_nodes` = this machine's node count; <= 0: read it): the CpuEngine has one pool
// over the whole host and the GPU engine's CPU side does not use NumaCpuMoe yet. On one node,
// cpu:0 is plain cpu.
EngineKind choose_engine(const Placement& p, const std::string& where, int numa_nodes = 0);

// Runtime settings from the command line and the environment, applied over the placement's.
struct RuntimeOverrides {
  std::optional<bool> cuda_graph;       // --cuda-graph
  std::optional<MoeKernel> moe_kernel;  // --moe-kernel
  std::optional<CpuHandoff> cpu_handoff;  // --cpu-handoff
  std::optional<GpuTransport> gpu_transport;  // --gpu-transport
  std::optional<int> pcie_assist_permille;    // --pcie-assist
  bool env_graph_off = false;           // KTUNE_CUDA_GRAPH=0 (kill switch: wins over everything)
};
// Parses the flags (usage errors name the flag) and reads KTUNE_CUDA_GRAPH.
RuntimeOverrides parse_runtime_overrides(const std::string& cuda_graph,
                                         const std::string& moe_kernel,
                                         const std::string& cpu_handoff = "",
                                         const std::string& gpu_transport = "",
                                         const std::string& pcie_assist = "");
// Applies them. --moe-kernel unfused without --cuda-graph turns the graph off (the unfused path
// is meant to show the host-driven per-expert pattern; --cuda-graph on gives its graph form);
// KTUNE_CUDA_GRAPH=0 turns it off whatever else says.
void apply_runtime_overrides(Placement& p, const RuntimeOverrides& o);
// Throws ktune::Error naming the first GPU of `p` this machine does not have, with the reason
// (no driver, CPU-only build, fewer GPUs).
void check_gpus_present(const Placement& p);

// What the table's header and the JSON say about one placement.
struct PlacementSummary {
  std::string label;  // file name, or the quick flags
  EngineKind engine = EngineKind::Cpu;
  std::map<std::string, int64_t, DeviceNameLess> experts;  // experts per device (all layers)
  std::map<std::string, int64_t, DeviceNameLess> bytes;    // planned bytes per memory pool
  std::map<std::string, int64_t, DeviceNameLess> budget;   // budgets (-1: unknown)
  bool cuda_graph = false;                                 // as run (always off on the CpuEngine)
  MoeKernel moe_kernel = MoeKernel::Fused;
  std::optional<CpuHandoff> cpu_handoff;                   // hybrid placements only
  int pcie_assist_permille = 0;                            // hybrid placements only
  std::optional<GpuTransport> gpu_transport;               // several GPUs only
  std::string gpu_stages;  // several GPUs: "cuda:0 layers 0-23 -> cuda:1 layers 24-47"
  int cpu_threads = 0;
  int64_t context = 0;
  std::string line()
      const;  // "engine cpu | experts: cpu 32 | memory: cpu 0.0 GiB | graph off | moe fused"
              // (hybrid: "... | handoff flags"; several GPUs: "... | transport nccl | stages ...")
};
PlacementSummary summarize_placement(const std::string& label, const Placement& p,
                                     const MemoryPlan& plan, EngineKind engine);

// ---- entry point for `ktune search --verify` ----

struct MeasureSettings {
  int64_t prompt = 512;  // prefill tokens per repetition (0 skips)
  int64_t gen = 128;     // decode tokens per repetition (0 skips)
  int reps = 3;
  std::string gpu_mem, cpu_mem;  // budget overrides for the plan check ("" = this machine's)
  bool quiet = true;             // no progress lines
};
struct MeasuredPlacement {
  Stat prefill, decode;  // tok/s
  std::string engine;    // what ran ("cpu", or the GPU engine's description)
  int threads = 0;       // CPU engine threads (0 for GPU rows)
  bool graph = false;    // a CUDA graph was used
};
// Resolves, plans and checks every placement against this machine (budgets, GPUs, engine)
// before anything is loaded, throwing ktune::Error naming the first that cannot run here; then
// loads the model once and measures each as `ktune run --config` would. `labels` name the
// placements in errors.
std::vector<MeasuredPlacement> measure_placements(const std::string& model_spec,
                                                  std::vector<Placement> placements,
                                                  const std::vector<std::string>& labels,
                                                  const MeasureSettings& settings);

// "layers 0-23: attention cuda:0, experts cuda:0; layers 24-47: attention cuda:0, experts cpu"
// (consecutive layers with the same devices grouped; at most `max_groups`, then "...").
std::string describe_layer_devices(const Placement& p, int max_groups = 4);

}  // namespace ktune::cli

namespace ktune::cli {

// For `ktune profile` (added by the profiler): the ONE placement `opt` describes (a plain
// --model: all on cpu; --experts-on-gpu N; or one --config) resolved, with the runtime
// overrides applied, planned, checked against budgets and devices, its engine chosen, and the
// model loaded. Throws ktune::Error like run_benchmark.
struct PreparedRun {
  std::string label;
  Placement placement;
  EngineKind engine = EngineKind::Cpu;
  PlacementSummary summary;
  int64_t context = 0;
  int threads = 0;  // CPU threads of the engine (the CpuEngine, or the hybrid's CPU experts)
  ModelWeights model;
};
PreparedRun prepare_single_run(const RunOptions& opt);

}  // namespace ktune::cli
