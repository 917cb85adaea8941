// The profiler's metrics: pure functions over a Timeline (docs/metrics.md defines each one).
// Nothing here reads a clock or a device, so tests build timelines by hand with known answers.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "profiler/timeline.h"

namespace ktune::profiler {

// ---- attribution: which layer and phase each GPU op belongs to ----
enum class TagSource : uint8_t {
  None,       // unknown: counted as phase "other"
  GraphNode,  // the engine's capture tags, through the kernel record's graph node id
  HostSpan,   // the host span (or ktune NVTX range) enclosing the launching API call
  Name,       // the kernel's name (fallback: "moe" -> moe_gpu, "attention" -> attention, ...)
  Copy,       // a memcpy/memset outside any tagged range: transfer
};
const char* tag_source_name(TagSource s);
struct OpTag {
  int32_t layer = -1;
  Phase phase = Phase::Other;
  TagSource source = TagSource::None;
};
// One tag per t.ops entry (same order).
std::vector<OpTag> attribute_ops(const Timeline& t);
// The fallback by name alone (exposed for tests): false when the name says nothing.
bool phase_from_kernel_name(const std::string& name, Phase* out);
// A kernel that spins until the CPU experts' result arrives (the engine's flag hand-off,
// handoff_wait_add_kernel): the GPU is waiting, not computing, while it runs. The analysis counts
// its time as GPU idle behind CPU experts (budget category cpu_experts), not as busy or transfer.
bool is_cpu_wait_kernel(const std::string& name);
// An inter-GPU transfer rather than compute: a peer copy (Memcpy PtoP, peer_device set) or an
// NCCL kernel (ncclDevKernel_SendRecv, ncclKernel_SendRecv_*, any "nccl" kernel).
bool is_peer_transfer(const Timeline& t, const GpuOp& op);

// ---- statistics helpers ----
struct Interval {
  int64_t start = 0;
  int64_t end = 0;
};
// Sorted, merged union of intervals (empty ones dropped).
std::vector<Interval> merge_intervals(std::vector<Interval> v);
int64_t total_length(const std::vector<Interval>& merged);
// Length of the intersection of two merged interval lists.
int64_t intersection_length(const std::vector<Interval>& a, const std::vector<Interval>& b);
// Nearest-rank percentile (p in [0, 100]) of unsorted values; 0 for none.
double percentile(std::vector<double> v, double p);

struct HistogramBin {
  double lo_us = 0;
  double hi_us = 0;  // +inf for the last bin (written as null)
  int64_t count = 0;
  double sum_us = 0;
};
// Bins: [0,1) [1,2) [2,5) [5,10) [10,20) [20,50) [50,100) [100,1000) [1000,inf) microseconds.
std::vector<HistogramBin> gap_histogram(const std::vector<double>& gaps_us);

struct Gap {
  double start_us = 0;  // relative to the window's start
  double length_us = 0;
  std::string before;   // kernel that ended it... (names, may be empty)
  std::string after;
  Phase phase_before = Phase::Other;
  Phase phase_after = Phase::Other;
};

struct GapStats {
  int64_t count = 0;
  double sum_us = 0;
  double median_us = 0;
  double p90_us = 0;
  double max_us = 0;
  std::vector<HistogramBin> histogram;
  std::vector<Gap> biggest;  // up to 5, longest first
};

struct PhaseTime {
  double wall_us = 0;    // union of the phase's intervals
  int64_t count = 0;     // kernels (GPU) or spans (CPU)
  double thread_us = 0;  // CPU: summed over workers (0 for GPUs)
};

struct GpuMetrics {
  int32_t device = 0;
  double wall_us = 0;
  double busy_us = 0;  // union of compute kernel intervals (NCCL kernels are transfers)
  double idle_fraction = 0;
  double copy_us = 0;  // union of memcpy/memset intervals
  double first_kernel_to_last_us = 0;  // HTA's "kernel_time" span
  GapStats gaps;
  int64_t kernels = 0;
  int64_t launches = 0;  // API calls with GPU work on this device, + host functions
  double kernels_per_token = 0;
  double launches_per_token = 0;
  int64_t graph_launches = 0;
  int64_t latency_samples = 0;
  double launch_latency_median_us = 0;  // API call start -> kernel start
  double launch_latency_p90_us = 0;
  double launch_delay_median_us = 0;    // HTA: API call end -> kernel start, clipped at 0
  double launch_call_median_us = 0;     // duration of the launching API call (host cost)
  std::map<Phase, PhaseTime> phases;
  std::map<TagSource, int64_t> tagged_by;  // how many kernels each attribution source tagged
  // Several GPUs (docs/metrics.md, "Several GPUs"):
  double peer_transfer_us = 0;  // union of NCCL kernels and peer copies on this GPU
  int64_t peer_bytes = 0;       // bytes of its peer copies (NCCL kernels carry none)
  int pipeline_stage = -1;      // position in the pipeline order (-1: one GPU computed)
  double bubble_us = 0;          // no compute here while a GPU before it in the pipeline computes
  double downstream_wait_us = 0; // no compute here while only GPUs after it compute
};

struct CpuMetrics {
  int workers = 0;        // threads with spans in the window
  double busy_us = 0;     // union of all non-step spans
  std::map<Phase, PhaseTime> phases;
  // moe_cpu wall time of the spans tagged with a NUMA node (NumaCpuMoe's node groups).
  std::map<int, double> moe_cpu_wall_us_by_node;
};

struct ExpertBandwidth {
  std::string device;     // "cpu", "cuda:0"
  double bytes = 0;       // expert weight bytes read in the window (input)
  double phase_wall_us = 0;
  double gb_s = 0;        // bytes / phase wall (0 when the phase was not seen)
  std::string note;       // why gb_s is 0, when it is
};

struct BudgetItem {
  std::string name;
  double us_per_token = 0;
  double fraction = 0;  // of the window's wall time
};

struct WindowMetrics {
  std::string kind;  // "decode" | "prefill"
  int64_t tokens = 0;
  double wall_us = 0;
  double tok_s = 0;
  std::vector<GpuMetrics> gpus;
  CpuMetrics cpu;
  std::vector<ExpertBandwidth> expert_bandwidth;
  double overlap_us = 0;  // GPU kernels running while CPU experts run
  double overlap_fraction_of_cpu_experts = 0;
  std::vector<BudgetItem> budget;  // sums to wall_us / tokens
  std::vector<int32_t> pipeline_order;  // GPUs by the first layer they compute (>= 2 GPUs)
  double peer_transfer_us = 0;          // union of inter-GPU transfers over all GPUs
};

struct AnalysisInputs {
  // Expert weight bytes read per device in the window, by device name ("cpu", "cuda:0", and
  // "cpu:N" for the experts of NUMA node N, whose phase wall is that node's tagged moe_cpu spans).
  std::map<std::string, double> expert_bytes;
};

// Metrics of one window (tags from attribute_ops(t)).
WindowMetrics analyze_window(const Timeline& t, const std::vector<OpTag>& tags, const Window& w,
                             const AnalysisInputs& in);

// Router statistics from per-layer, per-expert selection counts.
struct RouterLayer {
  int64_t layer = 0;
  int64_t experts_for_90 = 0;  // fewest experts whose counts cover 90 % of the selections
  double top_share = 0;        // the most selected expert's share of selections
};
struct RouterMetrics {
  int64_t tokens = 0;
  int64_t n_experts = 0;
  int64_t n_used = 0;
  std::vector<RouterLayer> layers;
  double mean_share_for_90 = 0;  // mean over layers of experts_for_90 / n_experts
  int64_t tokens_needed = 0;     // tokens for ~20 expected selections per expert
  std::string warning;           // set when tokens < tokens_needed
};
RouterMetrics analyze_router(const std::vector<std::vector<int64_t>>& counts, int64_t tokens,
                             int64_t n_used);

nlohmann::json to_json(const WindowMetrics& m);
nlohmann::json to_json(const RouterMetrics& m);

}  // namespace ktune::profiler
