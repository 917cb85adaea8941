// The engine's instrumentation hooks for the profiler (design §4). The engine knows nothing about
// the profiler: it only says what it is doing, and the profiler (tools/ktune/profiler) collects.
//
// Three mechanisms, all behind one RAII object, trace::Scope(phase, layer):
//   1. NVTX ranges in the domain "ktune" (message = phase name, int32 payload = layer), so
//      Nsight Systems and CUPTI (when NVTX_INJECTION64_PATH names libcupti) see them. Without
//      the CUDA backend they compile to nothing.
//   2. Host spans: [begin, end) on a steady clock into a preallocated per-thread buffer while a
//      collection is on (start() .. stop()); otherwise one relaxed atomic load. Cheap enough to
//      stay in the CPU engine's hot loop (two clock reads per span when on). CPU work that CUPTI
//      cannot see (CPU experts, host functions of a graph) is timed this way.
//   3. Graph-capture tags: NVTX ranges do not fire inside a replayed CUDA graph, so while a
//      stream is captured (a trace::GraphCapture object alive on this thread) each Scope marks
//      which captured nodes belong to which (layer, phase). The profiler maps kernel records of
//      graph replays (they carry graph node ids) through this table.
//
// Nothing here includes CUDA headers: streams and graphs are passed as the opaque CUDA handle
// types declared below (a cudaStream_t is a CUstream_st*).
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

struct CUstream_st;
struct CUgraph_st;

namespace ktune::trace {

// What a span or a captured node is doing. The names (phase_name) are those of profile.json.
enum class Phase : uint8_t {
  DecodeStep = 0,  // one decode step (arg = tokens, 1)
  PrefillStep,     // one prefill chunk (arg = tokens)
  Attention,       // norms, q/k/v, attention, o projection
  Router,          // router matvec + top-k
  MoeGpu,          // experts computed on a GPU
  MoeCpu,          // experts computed on the CPU
  Transfer,        // host <-> device copies and hand-offs
  Sampling,        // output head, argmax
  Other,
};
constexpr int kPhaseCount = 9;
const char* phase_name(Phase p);  // "decode_step", "prefill_step", "attention", ...
// Parses a phase_name; false when unknown.
bool phase_from_name(const std::string& name, Phase* out);
// True for the two step phases (they contain the others).
inline bool is_step_phase(Phase p) { return p == Phase::DecodeStep || p == Phase::PrefillStep; }

constexpr int32_t kNoLayer = -1;

// ---- collection (called by the profiler between engine calls, never during one) ----
struct Options {
  size_t spans_per_thread = size_t{1} << 17;  // a full buffer drops further spans (counted)
};
void start(const Options& opt = {});  // clears what an earlier collection left
void stop();

namespace detail {
extern std::atomic<bool> g_enabled;
extern thread_local void* t_capture;  // the GraphCapture alive on this thread, if any
}  // namespace detail
inline bool enabled() { return detail::g_enabled.load(std::memory_order_relaxed); }

int64_t now_ns();  // steady clock (CLOCK_MONOTONIC), nanoseconds

struct HostSpan {
  int64_t begin_ns = 0;  // steady clock
  int64_t end_ns = 0;
  int32_t arg = kNoLayer;  // layer for layer phases, tokens for step phases
  Phase phase = Phase::Other;
  uint32_t thread = 0;  // index into Collected::threads
  int32_t node = -1;    // the NUMA node the thread works for (set_thread_node); -1: all nodes
};
struct ThreadInfo {
  int64_t os_tid = 0;        // gettid()
  uint64_t pthread_id = 0;   // pthread_self() (CUPTI's API records name threads by one of the two)
  std::string name;          // "main", "cpu worker 3", ...
  uint64_t dropped = 0;      // spans lost to a full buffer
};
struct Collected {
  std::vector<HostSpan> spans;  // per thread in recording order, threads one after another
  std::vector<ThreadInfo> threads;
  uint64_t dropped = 0;
};
// Everything recorded since start(). Call after stop() (or between engine calls).
Collected collect();

// Records a finished span on this thread (when enabled).
void record_span(Phase p, int32_t arg, int64_t begin_ns, int64_t end_ns) noexcept;
// Tags this thread's spans from now on with a NUMA node (the worker group of NumaCpuMoe that
// serves node N calls it on its threads); -1 (the default): the span is for all nodes. Works
// whether or not a collection is on (a thread-local int).
void set_thread_node(int node) noexcept;
int thread_node() noexcept;

// Names this thread in traces ("cpu worker" + index -> "cpu worker 3"); cheap after the first
// call per collection. Only while enabled.
void name_thread(const char* prefix, int index = -1) noexcept;

// NVTX range in the "ktune" domain (no-op without CUDA).
void nvtx_push(Phase p, int32_t layer) noexcept;
void nvtx_pop() noexcept;

class GraphCapture;

// The one object the engine uses: NVTX range + host span + capture tag for [ctor, dtor).
class Scope {
 public:
  explicit Scope(Phase p, int32_t arg = kNoLayer) noexcept : phase_(p), arg_(arg) {
    nvtx_push(p, arg);
    if (detail::t_capture != nullptr) capture_enter();
    begin_ = enabled() ? now_ns() : -1;
  }
  ~Scope() {
    if (begin_ >= 0) record_span(phase_, arg_, begin_, now_ns());
    if (detail::t_capture != nullptr) capture_leave();
    nvtx_pop();
  }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  void capture_enter() noexcept;
  void capture_leave() noexcept;
  Phase phase_;
  int32_t arg_;
  int64_t begin_;
};

// ---- graph capture tags ----
struct GraphNodeTag {
  const void* node = nullptr;  // cudaGraphNode_t of the captured graph (valid while it lives)
  uint64_t node_id = 0;        // the id the installed resolver gave (CUPTI's), 0 without one
  uint32_t capture = 0;        // which capture (1, 2, ... in this process)
  int32_t layer = kNoLayer;
  Phase phase = Phase::Other;
  uint32_t order = 0;          // position in the capture (creation order as tagged)
};

// Tags nodes of one stream capture. Construct right after cudaStreamBeginCapture(stream) on the
// capturing thread; Scopes on this thread then tag the nodes enqueued inside them (innermost
// scope wins; nodes outside any scope get Phase::Other). Call finish(graph) right after
// cudaStreamEndCapture; destroying it without finish() (an exception) keeps nothing. Tags
// accumulate in a process-wide table (graph_node_tags()), also when no collection is on, since
// graphs are usually captured before the profiled window. No-op without CUDA.
class GraphCapture {
 public:
  explicit GraphCapture(CUstream_st* stream);
  ~GraphCapture();
  GraphCapture(const GraphCapture&) = delete;
  GraphCapture& operator=(const GraphCapture&) = delete;

  // Explicit mark: nodes enqueued from now on belong to (layer, phase) (until the next mark or
  // scope boundary).
  void mark(int32_t layer, Phase p);
  void finish(CUgraph_st* graph);
  size_t tagged() const { return tags_.size(); }

  // Used by Scope.
  void enter(int32_t layer, Phase p);
  void leave();

 private:
  void tag_new_nodes(CUgraph_st* graph);  // nodes not yet seen get the current tag
  struct Tag {
    int32_t layer;
    Phase phase;
  };
  CUstream_st* stream_;
  uint32_t capture_ = 0;
  void* prev_ = nullptr;
  std::vector<Tag> stack_;
  Tag current_{kNoLayer, Phase::Other};
  std::vector<GraphNodeTag> tags_;
  std::vector<const void*> seen_;  // sorted
  bool finished_ = false;
};

// The profiler installs CUPTI's node-id function here (the engine has no CUPTI). Tags recorded
// while one is installed carry node_id.
using NodeIdFn = uint64_t (*)(const void* node);
void set_node_id_resolver(NodeIdFn fn);
std::vector<GraphNodeTag> graph_node_tags();
void clear_graph_node_tags();

}  // namespace ktune::trace
