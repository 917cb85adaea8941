// The machine-describing part of profile.json (docs/profile-format.md): what `ktune profile`
// measures and `ktune search` prices placements with. A profile describes the machine as costs
// per byte, per FLOP and per launch/sync so that one profile serves any model shape; the model
// it was recorded with (if any) and its router statistics ride along.
//
// This struct is the contract between the profiler (which fills and writes it) and the search
// (which reads it). It lives in profile.json under the top level:
//   { "ktune_profile": 1, "summary": { ...this struct... }, <the profiler's metric sections> }
// read_profile_summary() validates everything it reads (types, ranges, consistency) and throws
// ktune::Error naming the file and the JSON path of the first bad field, before any other work.
// Unknown keys are ignored (newer writers may add fields); a missing required key is an error.
// Units are in the names: _bytes, _gb_s (1e9 bytes/s), _gflop_s, _us (microseconds).
#pragma once

#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

namespace ktune::profile {

// 2: summary.interconnect (GPU pair links), summary.cpu_costs.moe_decode_gb_s_per_node and the
// multi-GPU window metrics (pipeline bubbles, inter-GPU transfers). Version 1 files still read:
// their missing fields are empty.
constexpr int kProfileSchemaVersion = 2;

// One point of a measured scaling curve.
struct ThreadRate {
  int threads = 0;
  double value = 0;  // GB/s or GFLOP/s, as the field's name says
};

struct CpuInfo {
  std::string name;  // "Intel(R) Xeon(R) ..."
  int physical_cores = 0;
  int logical_cpus = 0;
  int numa_nodes = 1;
  std::string isa;  // best kernel ISA: scalar | avx2 | avx512 | avx512vnni
  int64_t mem_bytes = 0;
  int64_t mem_available_bytes = 0;
  std::vector<ThreadRate> read_gb_s;  // DRAM read probe by thread count (required, >= 1 point)
};

// One point of a kernel-time curve: the GPU time of one launch that reads `bytes` of weights.
struct BytesTime {
  double bytes = 0;
  double us = 0;
};

struct CpuCosts {
  // CpuMoe (one token's selected experts of one layer) effective bandwidth: expert weight bytes
  // read ÷ wall time of compute(), by thread count, at the model's top-k (or 8 on --hardware).
  std::vector<ThreadRate> moe_decode_gb_s;  // required, >= 1 point
  std::vector<ThreadRate> prefill_gflop_s;  // batched CPU matmul; empty if not measured
  double handoff_host_thread_us = 0;  // per layer: event sync + wake pool + enqueue (no graph)
  // CPU expert bandwidth of the worker group of each NUMA node (node -> curve), when measured
  // per node; empty: one curve for the whole host (moe_decode_gb_s).
  struct NodeCurve {
    int node = 0;
    std::vector<ThreadRate> gb_s;
  };
  std::vector<NodeCurve> moe_decode_gb_s_per_node;
  // Fixed cost of one CpuMoe call at the full thread count (waking the pool, quantizing h, the
  // uneven finish): the intercept of call time against selected experts. 0: not measured.
  double moe_call_us = 0;
  // The PCIe assist (runtime.pcie_assist), measured with cuda:0 at the hybrid engine's thread
  // count: a GPU kernel reading pinned host memory while CpuMoe runs reads pcie_assist_gb_s, and
  // CpuMoe meanwhile runs at moe_pcie_ratio x its rate alone (both read the same DRAM). 0: not
  // measured (the search then leaves the assist off).
  double pcie_assist_gb_s = 0;
  double moe_pcie_ratio = 0;
};

struct GpuInfo {
  std::string device;  // "cuda:0" (placement YAML device names)
  std::string name;    // "NVIDIA H100 80GB HBM3"
  std::string sm;      // "9.0"
  int64_t mem_bytes = 0;
  int64_t mem_free_bytes = 0;
  double read_gb_s = 0;  // device-memory read probe
  double h2d_gb_s = 0;   // pinned host -> device copy
  double d2h_gb_s = 0;
  int pcie_gen = 0;  // 0 = unknown
  int pcie_width = 0;
};

struct GpuCosts {
  std::string device;  // matches a GpuInfo::device
  // Overheads measured with ktune's own kernels on this GPU.
  double launch_eager_us = 0;  // one small kernel launched from the host, back to back
  double graph_node_us = 0;    // one small kernel node of a replayed graph
  double host_node_us = 0;     // cudaLaunchHostFunc hand-off round trip inside a graph
  double flag_handoff_us = 0;  // mapped-memory flag round trip to the CPU pool
  double sync_us = 0;          // cudaStreamSynchronize / event sync round trip (eager)
  // Effective bandwidths of ktune's decode kernels (weight bytes ÷ kernel time, gaps excluded).
  double matvec_gb_s = 0;              // attention/router/head matvecs (fused matvec kernels)
  double moe_fused_gb_s = 0;           // fused MoE kernels over top-k experts
  double moe_unfused_gb_s = 0;         // one expert matrix per launch
  double attention_us = 0;             // attention kernel per layer at context ~0 (graph replay)
  double attention_us_per_1k_ctx = 0;  // its growth with context
  double prefill_gflop_s = 0;          // batched expert/attention matmuls (0 = not measured)
  // Optional (absent in older files, then empty / 0, and the search uses the single bandwidths
  // above as bytes ÷ bandwidth): GPU time of one launch by the weight bytes it reads, points of
  // increasing bytes, measured in a replayed graph less one graph node (docs/profile-format.md).
  //   matvec       a dense decode matvec (launch_matvec_fused, RMSNorm prologue, Q4_0)
  //   router       the router matvec (F32) with the softmax top-k tail
  //   moe_fused    one layer's fused MoE: gate/up/SwiGLU + down/sum over the selected experts
  //                (two launches together), by the selected experts' bytes
  //   moe_unfused  one expert matrix of the per-slot path (launch_matvec_rowwarp_slot)
  std::vector<BytesTime> matvec_us, router_us, moe_fused_us, moe_unfused_us;
  // GPU-side gap between eager kernels already queued (the host ahead): what an eager launch adds
  // to a kernel of non-trivial length. 0: not measured (the search charges launch_eager_us).
  double eager_gap_us = 0;
  // The CPU hand-off of one layer as the engine runs it with mapped flags, inside a graph: the
  // signal kernel (routing block to mapped memory), the CPU side answering at once, the wait +
  // add kernel. 0: not measured (the search composes it from flag_handoff_us and copies).
  double handoff_us = 0;
};

// One directed GPU pair's link, measured by `ktune profile --hardware` on machines with more
// than one GPU (version 2). Bandwidths of 0 mean "not measured" (the search assumes a default).
struct GpuLink {
  std::string src;             // "cuda:0"
  std::string dst;             // "cuda:1"
  bool peer_access = false;    // cudaDeviceCanAccessPeer
  double peer_gb_s = 0;        // cudaMemcpyPeerAsync of 256 MiB
  double peer_latency_us = 0;  // a 4-byte peer copy, round trip / 2 of back-to-back copies
  double nccl_gb_s = 0;        // NCCL send/recv of 256 MiB (0: NCCL not available)
  double nccl_latency_us = 0;  // NCCL send/recv of 4 bytes
};

struct ModelShape {   // the model a profile was recorded with (empty name: --hardware)
  std::string name;   // "qwen3-30b-a3b"
  std::string quant;  // "q4_0"
  int64_t n_layers = 0;
  int64_t n_experts = 0;
  int64_t n_experts_used = 0;
  int64_t expert_bytes = 0;  // one expert's gate+up+down bytes
};

struct RouterStats {   // empty (tokens == 0) when not measured
  int64_t tokens = 0;  // decode tokens whose routing was counted
  // counts[layer][expert]: how many of those tokens selected the expert (each token selects
  // n_experts_used per layer). n_layers x n_experts of ModelShape.
  std::vector<std::vector<int64_t>> counts;
};

struct ProfileSummary {
  std::string kind = "model";  // "model" (engine) | "hardware" | "exec" (--exec: not for search)
  std::string ktune_version;
  std::string commit;
  std::string created;  // ISO 8601 UTC
  CpuInfo cpu;
  CpuCosts cpu_costs;
  std::vector<GpuInfo> gpus;          // may be empty (CPU-only machine)
  std::vector<GpuCosts> gpu_costs;    // one per GpuInfo, same order and devices
  std::vector<GpuLink> interconnect;  // GPU pairs (both directions); empty with < 2 GPUs or v1
  ModelShape model;
  RouterStats router;
};

// Serialise into / parse from the "summary" object. from_json validates; `file` names the
// source in errors ("profile.json: summary.gpus[0].read_gb_s: must be > 0; ...").
void to_json(nlohmann::json& j, const ProfileSummary& s);
// `version` is the document's ktune_profile: fields added after it may be absent (then empty);
// from the version that added them on, they are required.
ProfileSummary summary_from_json(const nlohmann::json& summary, const std::string& file,
                                 int version = kProfileSchemaVersion);

// Reads profile.json (any size the profiler writes), checks "ktune_profile" (a newer schema is
// refused with the version numbers), and returns its validated summary. Throws ktune::Error.
ProfileSummary read_profile_summary(const std::string& path);
// The whole profile.json document, checked up to its schema version (not the summary): the
// depth guard, JSON syntax, "ktune_profile" present and not newer than this ktune reads.
nlohmann::json read_profile_document(const std::string& path);
// The validated summary of a document read_profile_document returned (`path` names it in errors):
// for a caller that needs the summary and other parts of one file without reading it twice.
ProfileSummary summary_of(const nlohmann::json& doc, const std::string& path);
nlohmann::json parse_profile_document(const std::string& text, const std::string& file);
// The same from the file's text (`file` names it in errors). JSON nested deeper than
// kMaxJsonDepth is refused before parsing, so a nesting bomb costs neither stack nor memory.
ProfileSummary parse_profile_summary(const std::string& text, const std::string& file);
constexpr int kMaxJsonDepth = 64;
// Throws ktune::Error naming `file` when `text` nests arrays/objects deeper than max_depth
// (brackets inside strings do not count). Linear, no allocation.
void check_json_depth(const std::string& text, const std::string& file, int max_depth);

// Interpolated value of a scaling curve at `threads` (clamped to the measured range; linear
// between points). The curve must be non-empty.
double rate_at(const std::vector<ThreadRate>& curve, int threads);

// The link from src to dst (nullptr when the profile has none).
const GpuLink* find_link(const ProfileSummary& s, const std::string& src, const std::string& dst);

}  // namespace ktune::profile
