// The profiler's device-agnostic timeline (design §4, convention 6): everything that happened in
// a profiled run as plain events on ONE clock, CUPTI's (nanoseconds; on a machine without CUPTI
// the host's steady clock stands in). The CUPTI layer (cupti_activity.h) and the engine's host
// spans (ktune/engine/trace.h) fill it; analysis (analysis.h) and the sinks only read it, so
// tests build timelines by hand.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "ktune/engine/trace.h"

namespace ktune::profiler {

using trace::Phase;

enum class GpuOpKind : uint8_t { Kernel, Memcpy, Memset };
const char* gpu_op_kind_name(GpuOpKind k);  // "kernel" | "memcpy" | "memset"

// A kernel, copy or memset that ran on a GPU.
struct GpuOp {
  GpuOpKind kind = GpuOpKind::Kernel;
  int32_t device = 0;     // CUDA device index (cuda:N)
  uint32_t stream = 0;    // CUPTI stream id
  int64_t start = 0;      // ns, timeline clock
  int64_t end = 0;
  uint32_t correlation = 0;  // the launching API call's correlation id (0: unknown)
  uint32_t graph_id = 0;     // 0 unless launched by a graph
  uint64_t graph_node_id = 0;
  int32_t name = -1;         // Timeline::strings index (kernel name, or "Memcpy HtoD" ...)
  int64_t bytes = 0;         // copies and memsets
  int32_t peer_device = -1;  // peer copies (Memcpy PtoP): the other GPU; -1 otherwise
  // Filled by the engine's graph-capture tags or attribute_ops (analysis.h); -1/Other: unknown.
};

// A CUDA runtime (or driver) API call on a host thread.
struct ApiCall {
  int32_t name = -1;     // "cudaLaunchKernel", "cudaGraphLaunch", ... (version suffix dropped)
  uint64_t thread = 0;   // CUPTI's thread id of the caller
  int64_t start = 0;
  int64_t end = 0;
  uint32_t correlation = 0;
};

// A CUDA synchronization (stream/event/context synchronize, stream wait event).
struct SyncEvent {
  int32_t name = -1;  // "stream synchronize", ...
  uint32_t stream = 0;
  int64_t start = 0;
  int64_t end = 0;
  uint32_t correlation = 0;
};

// An NVTX range CUPTI delivered as marker records (push/pop or start/end pairs).
struct Marker {
  int32_t name = -1;
  int32_t domain = -1;  // -1: default domain
  uint64_t thread = 0;
  int64_t start = 0;
  int64_t end = 0;
  int64_t payload = 0;
  bool has_payload = false;
};

// The engine's host spans (trace.h), converted to the timeline clock.
struct HostThread {
  int64_t os_tid = 0;
  uint64_t pthread_id = 0;
  std::string name;
};
struct HostSpan {
  uint32_t thread = 0;  // index into Timeline::threads
  Phase phase = Phase::Other;
  int32_t arg = -1;     // layer, or tokens for step phases
  int64_t start = 0;
  int64_t end = 0;
  int32_t node = -1;  // NUMA node of CPU expert work (trace::set_thread_node); -1: all nodes
};

// A stretch of the run the driver measured as a whole: the decode or prefill tokens of it.
struct Window {
  std::string kind;  // "decode" | "prefill" (engine); "steps" | "run" (profile --exec)
  int64_t tokens = 0;
  int64_t start = 0;
  int64_t end = 0;
};

// Which layer and phase a graph node was captured in (trace::GraphNodeTag, with CUPTI's id).
struct GraphNode {
  uint64_t node_id = 0;
  int32_t layer = -1;
  Phase phase = Phase::Other;
};

struct GpuDevice {
  int32_t index = 0;
  std::string name;
};

struct Timeline {
  std::vector<std::string> strings;
  std::vector<GpuDevice> gpus;
  std::vector<GpuOp> ops;
  std::vector<ApiCall> api;
  std::vector<SyncEvent> syncs;
  std::vector<Marker> markers;
  std::vector<HostThread> threads;
  std::vector<HostSpan> spans;
  std::vector<Window> windows;
  std::vector<GraphNode> graph_nodes;
  // CUPTI clones graph nodes when a graph is instantiated; kernel records of replays may carry
  // the clone's id. clone id -> original id (as CUPTI's resource callbacks reported).
  std::map<uint64_t, uint64_t> node_clone_of;

  bool cupti = false;       // GPU events came from CUPTI
  std::string source_note;  // "cupti" or why not ("host spans only: no GPU (...)")
  uint64_t dropped_records = 0;  // CUPTI records lost (buffers full)
  uint64_t dropped_spans = 0;    // host spans lost (per-thread buffers full)
  int64_t cupti_overhead_ns = 0; // CUPTI's own OVERHEAD records, summed
  int64_t origin = 0;            // a time before every event (sinks print times relative to it)

  int32_t intern(std::string_view s);
  const std::string& str(int32_t i) const;  // "" for -1 or out of range
  // Earliest start over all events (0 if empty).
  int64_t first_time() const;
};

// Appends the host spans of a collection, converting steady-clock times with
// timeline = steady + offset_ns.
void add_host_spans(Timeline& t, const trace::Collected& c, int64_t offset_ns);
// Appends graph-node tags (those with a node id).
void add_graph_tags(Timeline& t, const std::vector<trace::GraphNodeTag>& tags);

// Serialised form (profile.json "timeline", or the file beside it): columns of numbers with
// times in microseconds relative to `origin` (3 decimals). to_json keeps at most max_ops GPU
// ops, max_spans spans and max_api API calls, the earliest ones, and says so ("truncated").
struct TimelineLimits {
  size_t max_ops = SIZE_MAX;
  size_t max_spans = SIZE_MAX;
  size_t max_api = SIZE_MAX;
};
nlohmann::json timeline_to_json(const Timeline& t, const TimelineLimits& lim = {});
// Throws ktune::Error naming `file` on a malformed timeline.
Timeline timeline_from_json(const nlohmann::json& j, const std::string& file);

}  // namespace ktune::profiler
