// Host spans, NVTX ranges and graph-capture tags (ktune/engine/trace.h).
#include "ktune/engine/trace.h"

#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <mutex>

#if KTUNE_WITH_CUDA
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>
#endif

namespace ktune::trace {

namespace detail {
std::atomic<bool> g_enabled{false};
thread_local void* t_capture = nullptr;
}  // namespace detail

namespace {

constexpr const char* kPhaseNames[kPhaseCount] = {
    "decode_step", "prefill_step", "attention", "router", "moe_gpu",
    "moe_cpu",     "transfer",     "sampling",  "other"};

// One thread's spans of one collection. The owning thread appends; collect() reads after the
// recording threads are quiet (count published with release/acquire).
struct ThreadBuffer {
  std::unique_ptr<HostSpan[]> spans;
  size_t capacity = 0;
  std::atomic<size_t> count{0};
  std::atomic<uint64_t> dropped{0};
  int64_t os_tid = 0;
  uint64_t pthread_id = 0;
  std::string name;
  uint32_t index = 0;
};

struct Registry {
  std::mutex mu;
  std::vector<std::unique_ptr<ThreadBuffer>> buffers;
  std::atomic<uint64_t> generation{0};
  size_t capacity = Options{}.spans_per_thread;
};
Registry& registry() {
  static Registry* r = new Registry;  // never destroyed: threads may outlive static destructors
  return *r;
}

thread_local ThreadBuffer* t_buffer = nullptr;
thread_local int t_node = -1;
thread_local uint64_t t_generation = ~uint64_t{0};

ThreadBuffer* this_thread_buffer() {
  Registry& r = registry();
  const uint64_t gen = r.generation.load(std::memory_order_acquire);
  if (t_buffer != nullptr && t_generation == gen) return t_buffer;
  std::lock_guard<std::mutex> lock(r.mu);
  auto b = std::make_unique<ThreadBuffer>();
  b->capacity = r.capacity;
  b->spans.reset(new (std::nothrow) HostSpan[b->capacity]);
  if (!b->spans) b->capacity = 0;
  b->os_tid = static_cast<int64_t>(syscall(SYS_gettid));
  b->pthread_id = static_cast<uint64_t>(pthread_self());
  b->index = static_cast<uint32_t>(r.buffers.size());
  t_buffer = b.get();
  t_generation = gen;
  r.buffers.push_back(std::move(b));
  return t_buffer;
}

// Graph tags and the node-id resolver.
struct TagTable {
  std::mutex mu;
  std::vector<GraphNodeTag> tags;
  uint32_t captures = 0;
};
TagTable& tag_table() {
  static TagTable* t = new TagTable;
  return *t;
}
std::atomic<NodeIdFn> g_resolver{nullptr};

#if KTUNE_WITH_CUDA
nvtxDomainHandle_t ktune_domain() {
  static nvtxDomainHandle_t d = nvtxDomainCreateA("ktune");
  return d;
}
#endif

}  // namespace

const char* phase_name(Phase p) {
  const int i = static_cast<int>(p);
  return i >= 0 && i < kPhaseCount ? kPhaseNames[i] : "other";
}

bool phase_from_name(const std::string& name, Phase* out) {
  for (int i = 0; i < kPhaseCount; ++i) {
    if (name == kPhaseNames[i]) {
      *out = static_cast<Phase>(i);
      return true;
    }
  }
  return false;
}

void start(const Options& opt) {
  Registry& r = registry();
  {
    std::lock_guard<std::mutex> lock(r.mu);
    r.buffers.clear();
    r.capacity = std::max<size_t>(opt.spans_per_thread, 1);
    r.generation.fetch_add(1, std::memory_order_acq_rel);
  }
  detail::g_enabled.store(true, std::memory_order_release);
}

void stop() { detail::g_enabled.store(false, std::memory_order_release); }

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void record_span(Phase p, int32_t arg, int64_t begin_ns, int64_t end_ns) noexcept {
  if (!enabled()) return;
  ThreadBuffer* b;
  try {
    b = this_thread_buffer();
  } catch (...) {
    return;  // no memory for a buffer: the span is lost, nothing else
  }
  const size_t n = b->count.load(std::memory_order_relaxed);
  if (n >= b->capacity) {
    b->dropped.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  HostSpan& s = b->spans[n];
  s.begin_ns = begin_ns;
  s.end_ns = end_ns;
  s.arg = arg;
  s.phase = p;
  s.thread = b->index;
  s.node = t_node;
  b->count.store(n + 1, std::memory_order_release);
}

void set_thread_node(int node) noexcept { t_node = node; }
int thread_node() noexcept { return t_node; }

void name_thread(const char* prefix, int index) noexcept {
  if (!enabled()) return;
  try {
    ThreadBuffer* b = this_thread_buffer();
    if (!b->name.empty()) return;
    b->name = index >= 0 ? std::string(prefix) + " " + std::to_string(index) : prefix;
  } catch (...) {
  }
}

Collected collect() {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  Collected c;
  size_t total = 0;
  for (const auto& b : r.buffers) total += b->count.load(std::memory_order_acquire);
  c.spans.reserve(total);
  for (const auto& b : r.buffers) {
    const size_t n = b->count.load(std::memory_order_acquire);
    c.spans.insert(c.spans.end(), b->spans.get(), b->spans.get() + n);
    ThreadInfo t;
    t.os_tid = b->os_tid;
    t.pthread_id = b->pthread_id;
    t.name = b->name.empty() ? "thread " + std::to_string(b->os_tid) : b->name;
    t.dropped = b->dropped.load(std::memory_order_relaxed);
    c.dropped += t.dropped;
    c.threads.push_back(std::move(t));
  }
  return c;
}

void nvtx_push(Phase p, int32_t layer) noexcept {
#if KTUNE_WITH_CUDA
  nvtxEventAttributes_t a{};
  a.version = NVTX_VERSION;
  a.size = NVTX_EVENT_ATTRIB_STRUCT_SIZE;
  a.messageType = NVTX_MESSAGE_TYPE_ASCII;
  a.message.ascii = phase_name(p);
  a.payloadType = NVTX_PAYLOAD_TYPE_INT32;
  a.payload.iValue = layer;
  nvtxDomainRangePushEx(ktune_domain(), &a);
#else
  (void)p;
  (void)layer;
#endif
}

void nvtx_pop() noexcept {
#if KTUNE_WITH_CUDA
  nvtxDomainRangePop(ktune_domain());
#endif
}

void Scope::capture_enter() noexcept {
  try {
    static_cast<GraphCapture*>(detail::t_capture)->enter(arg_, phase_);
  } catch (...) {
  }
}
void Scope::capture_leave() noexcept {
  try {
    static_cast<GraphCapture*>(detail::t_capture)->leave();
  } catch (...) {
  }
}

// ---- graph capture ----

GraphCapture::GraphCapture(CUstream_st* stream) : stream_(stream) {
#if KTUNE_WITH_CUDA
  {
    TagTable& t = tag_table();
    std::lock_guard<std::mutex> lock(t.mu);
    capture_ = ++t.captures;
  }
  prev_ = detail::t_capture;
  detail::t_capture = this;
#endif
}

GraphCapture::~GraphCapture() {
  if (detail::t_capture == this) detail::t_capture = prev_;
}

void GraphCapture::tag_new_nodes(CUgraph_st* graph) {
#if KTUNE_WITH_CUDA
  cudaGraph_t g = graph;
  if (g == nullptr) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    if (cudaStreamGetCaptureInfo(stream_, &status, nullptr, &g) != cudaSuccess ||
        status != cudaStreamCaptureStatusActive || g == nullptr) {
      return;
    }
  }
  size_t n = 0;
  if (cudaGraphGetNodes(g, nullptr, &n) != cudaSuccess || n == 0) return;
  std::vector<cudaGraphNode_t> nodes(n);
  if (cudaGraphGetNodes(g, nodes.data(), &n) != cudaSuccess) return;
  nodes.resize(n);
  const NodeIdFn resolve = g_resolver.load(std::memory_order_acquire);
  std::vector<const void*> fresh;
  for (cudaGraphNode_t node : nodes) {
    const void* p = node;
    if (std::binary_search(seen_.begin(), seen_.end(), p)) continue;
    fresh.push_back(p);
    GraphNodeTag t;
    t.node = p;
    t.node_id = resolve ? resolve(p) : 0;
    t.capture = capture_;
    t.layer = current_.layer;
    t.phase = current_.phase;
    t.order = static_cast<uint32_t>(tags_.size());
    tags_.push_back(t);
  }
  if (!fresh.empty()) {
    seen_.insert(seen_.end(), fresh.begin(), fresh.end());
    std::sort(seen_.begin(), seen_.end());
  }
#else
  (void)graph;
#endif
}

void GraphCapture::mark(int32_t layer, Phase p) {
  tag_new_nodes(nullptr);
  current_ = {layer, p};
}

void GraphCapture::enter(int32_t layer, Phase p) {
  tag_new_nodes(nullptr);
  stack_.push_back(current_);
  // A step scope has no layer of its own: keep the enclosing layer for its untagged nodes.
  current_ = {is_step_phase(p) ? current_.layer : layer, p};
}

void GraphCapture::leave() {
  tag_new_nodes(nullptr);
  if (!stack_.empty()) {
    current_ = stack_.back();
    stack_.pop_back();
  }
}

void GraphCapture::finish(CUgraph_st* graph) {
  if (finished_) return;
  finished_ = true;
  tag_new_nodes(graph);
  if (detail::t_capture == this) detail::t_capture = prev_;
  TagTable& t = tag_table();
  std::lock_guard<std::mutex> lock(t.mu);
  t.tags.insert(t.tags.end(), tags_.begin(), tags_.end());
}

void set_node_id_resolver(NodeIdFn fn) { g_resolver.store(fn, std::memory_order_release); }

std::vector<GraphNodeTag> graph_node_tags() {
  TagTable& t = tag_table();
  std::lock_guard<std::mutex> lock(t.mu);
  return t.tags;
}

void clear_graph_node_tags() {
  TagTable& t = tag_table();
  std::lock_guard<std::mutex> lock(t.mu);
  t.tags.clear();
}

}  // namespace ktune::trace
