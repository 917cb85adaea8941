// CUPTI activity tracing (profiler/cupti_activity.h). Every CUPTI call is checked; a failure
// turns the session off with the call named in error(), never an exception or an abort.
#include "profiler/cupti_activity.h"

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "inject/string_intern.h"
#include "ktune/engine/trace.h"

#if KTUNE_WITH_CUPTI
#include <cuda.h>
#include <cuda_runtime.h>
#include <cupti.h>
#include <cxxabi.h>
#include <dlfcn.h>

#include "inject/activity_buffers.h"
#include "inject/cupti_names.h"
#include "inject/trace_level_cupti.h"
#endif
#if KTUNE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace ktune::profiler {

CuptiAvailability cupti_availability() {
  CuptiAvailability a;
#if KTUNE_WITH_CUPTI
  a.built = true;
  // The switch for a machine where CUPTI misbehaves or another tool owns it: host spans only.
  if (const char* off = std::getenv("KTUNE_NO_CUPTI");
      off != nullptr && *off != 0 && std::string(off) != "0") {
    a.reason = "CUPTI switched off (KTUNE_NO_CUPTI=" + std::string(off) + ")";
    return a;
  }
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    a.reason = std::string("no GPU (cudaGetDeviceCount: ") + cudaGetErrorString(e) + ")";
    cudaGetLastError();
  } else if (n == 0) {
    a.reason = "no GPU (cudaGetDeviceCount found none)";
  } else {
    a.usable = true;
  }
#elif KTUNE_WITH_CUDA
  a.reason = "this build has no CUPTI (CMake found no CUDA::cupti)";
#else
  a.reason = "this build has no CUDA backend";
#endif
  return a;
}

#if KTUNE_WITH_CUPTI

namespace {

// Records parsed as buffers complete (CUPTI's thread) and handed over in drain_into.
struct Parsed {
  std::vector<GpuOp> ops;
  std::vector<ApiCall> api;
  std::vector<SyncEvent> syncs;
  struct MarkerEnd {
    uint32_t id;
    int64_t time;
  };
  std::vector<Marker> marker_starts;  // end filled from marker_ends by id
  std::vector<uint32_t> marker_ids;
  std::vector<MarkerEnd> marker_ends;
  std::unordered_map<uint32_t, int64_t> marker_payload;
  std::map<uint64_t, uint64_t> clone_of;
  std::vector<std::string> strings;
  std::unordered_map<std::string, int32_t> string_index;
  uint64_t dropped = 0;
  int64_t overhead_ns = 0;
  int32_t intern(const std::string& s) {
    return exec_capture::intern_string(strings, string_index, s);
  }
};

}  // namespace

struct CuptiSession::State {
  explicit State(const CuptiOptions& o)
      : opt(o),
        level(o.level),
        buffers(std::make_shared<exec_capture::ActivityBufferPool>(o.buffer_bytes, o.max_buffers,
                                                                   o.kept_buffers)) {}
  CuptiOptions opt;
  trace_level::Level level;
  std::string error;
  std::string notes;
  bool ok = true;
  bool enabled = false;
  bool flush_pending = false;  // disable() turned the kinds off; their records are not flushed
  CUpti_SubscriberHandle subscriber = nullptr;
  std::mutex mu;
  Parsed parsed;
  std::unordered_map<const char*, int32_t> kernel_name_cache;  // CUPTI-owned name pointers
  std::unordered_map<uint64_t, int32_t> api_name_cache;        // (domain << 32 | cbid) -> name
  // Shared with g_pool: the callbacks take and zero buffers without holding g_state_mu.
  std::shared_ptr<exec_capture::ActivityBufferPool> buffers;
  std::vector<CUpti_ActivityKind> kinds;  // enabled now

  bool check(CUptiResult r, const char* call) {
    if (r == CUPTI_SUCCESS) return true;
    const char* s = nullptr;
    cuptiGetResultString(r, &s);
    if (ok) error = std::string(call) + ": " + (s ? s : "unknown CUPTI error");
    ok = false;
    return false;
  }
  void parse(uint8_t* buffer, size_t valid);
};

namespace {

CuptiSession::State* g_state = nullptr;  // CUPTI's callbacks are plain functions
std::mutex g_state_mu;
// The session's buffers, behind their own lock: a buffer request (from an engine thread whose
// buffer filled) never waits behind a parse, which holds g_state_mu on CUPTI's worker thread.
std::shared_ptr<exec_capture::ActivityBufferPool> g_pool;
std::mutex g_pool_mu;

std::shared_ptr<exec_capture::ActivityBufferPool> current_pool() {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  return g_pool;
}

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = nullptr;
  *size = 0;
  *max_records = 0;
  const std::shared_ptr<exec_capture::ActivityBufferPool> pool = current_pool();
  if (pool == nullptr) return;
  *buffer = pool->take();  // zeroed; nullptr: CUPTI drops the records and counts them
  if (*buffer != nullptr) *size = pool->bytes();
}

void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t* buffer, size_t,
                               size_t valid) {
  {
    std::lock_guard<std::mutex> lock(g_state_mu);
    CuptiSession::State* s = g_state;
    if (s != nullptr && buffer != nullptr) {
      s->parse(buffer, valid);
      size_t dropped = 0;
      if (cuptiActivityGetNumDroppedRecords(ctx, stream, &dropped) == CUPTI_SUCCESS) {
        std::lock_guard<std::mutex> l2(s->mu);
        s->parsed.dropped += dropped;
      }
    }
  }
  const std::shared_ptr<exec_capture::ActivityBufferPool> pool = current_pool();
  if (pool != nullptr && buffer != nullptr) {
    pool->give_back(buffer);  // zeroed for reuse, outside g_state_mu
  } else {
    std::free(buffer);  // the session ended: a late buffer is freed unparsed
  }
}

void CUPTIAPI resource_callback(void*, CUpti_CallbackDomain domain, CUpti_CallbackId cbid,
                                const void* cbdata) {
  if (domain != CUPTI_CB_DOMAIN_RESOURCE || cbid != CUPTI_CBID_RESOURCE_GRAPHNODE_CLONED) return;
  const auto* rd = static_cast<const CUpti_ResourceData*>(cbdata);
  const auto* gd = static_cast<const CUpti_GraphData*>(rd->resourceDescriptor);
  if (gd == nullptr || gd->node == nullptr || gd->originalNode == nullptr) return;
  uint64_t id = 0, orig = 0;
  if (cuptiGetGraphNodeId(gd->node, &id) != CUPTI_SUCCESS) return;
  if (cuptiGetGraphNodeId(gd->originalNode, &orig) != CUPTI_SUCCESS) return;
  std::lock_guard<std::mutex> lock(g_state_mu);
  if (g_state != nullptr && id != orig) {
    std::lock_guard<std::mutex> l2(g_state->mu);
    g_state->parsed.clone_of[id] = orig;
  }
}

uint64_t resolve_node_id(const void* node) {
  uint64_t id = 0;
  if (cuptiGetGraphNodeId(static_cast<CUgraphNode>(const_cast<void*>(node)), &id) !=
      CUPTI_SUCCESS) {
    return 0;
  }
  return id;
}

// What kernel, memcpy and memset records share (they name those fields alike).
template <typename Record>
GpuOp gpu_op(const Record* r, GpuOpKind kind) {
  GpuOp op;
  op.kind = kind;
  op.device = static_cast<int32_t>(r->deviceId);
  op.stream = r->streamId;
  op.start = static_cast<int64_t>(r->start);
  op.end = static_cast<int64_t>(r->end);
  op.correlation = r->correlationId;
  op.graph_id = r->graphId;
  op.graph_node_id = r->graphNodeId;
  return op;
}

}  // namespace

void CuptiSession::State::parse(uint8_t* buffer, size_t valid) {
  CUpti_Activity* rec = nullptr;
  std::lock_guard<std::mutex> lock(mu);
  Parsed& p = parsed;
  while (cuptiActivityGetNextRecord(buffer, valid, &rec) == CUPTI_SUCCESS) {
    switch (rec->kind) {
      case CUPTI_ACTIVITY_KIND_KERNEL:
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
        // Kernel10 in CUDA 13.0; later records extend it, so its fields stay readable.
        const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(rec);
        GpuOp op = gpu_op(k, GpuOpKind::Kernel);
        auto it = kernel_name_cache.find(k->name);
        if (it == kernel_name_cache.end()) {
          it = kernel_name_cache.emplace(k->name, p.intern(cupti_names::short_kernel_name(k->name)))
                   .first;
        }
        op.name = it->second;
        p.ops.push_back(op);
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMCPY: {
        const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(rec);
        GpuOp op = gpu_op(m, GpuOpKind::Memcpy);
        op.bytes = static_cast<int64_t>(m->bytes);
        op.name = p.intern(cupti_names::copy_kind_name(m->copyKind));
        p.ops.push_back(op);
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMCPY2: {
        // Peer copies between GPUs (cudaMemcpyPeer*): an inter-GPU transfer, not compute.
        const auto* m = reinterpret_cast<const CUpti_ActivityMemcpyPtoP4*>(rec);
        GpuOp op = gpu_op(m, GpuOpKind::Memcpy);
        op.peer_device =
            static_cast<int32_t>(m->srcDeviceId == m->deviceId ? m->dstDeviceId : m->srcDeviceId);
        op.bytes = static_cast<int64_t>(m->bytes);
        op.name = p.intern("Memcpy PtoP");
        p.ops.push_back(op);
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMSET: {
        const auto* m = reinterpret_cast<const CUpti_ActivityMemset4*>(rec);
        GpuOp op = gpu_op(m, GpuOpKind::Memset);
        op.bytes = static_cast<int64_t>(m->bytes);
        op.name = p.intern("Memset");
        p.ops.push_back(op);
        break;
      }
      case CUPTI_ACTIVITY_KIND_RUNTIME:
      case CUPTI_ACTIVITY_KIND_DRIVER: {
        const auto* a = reinterpret_cast<const CUpti_ActivityAPI*>(rec);
        const CUpti_CallbackDomain domain = rec->kind == CUPTI_ACTIVITY_KIND_RUNTIME
                                                ? CUPTI_CB_DOMAIN_RUNTIME_API
                                                : CUPTI_CB_DOMAIN_DRIVER_API;
        const uint64_t key = (static_cast<uint64_t>(domain) << 32) | a->cbid;
        auto it = api_name_cache.find(key);
        if (it == api_name_cache.end()) {
          it = api_name_cache.emplace(key, p.intern(cupti_names::api_name(domain, a->cbid))).first;
        }
        ApiCall c;
        c.name = it->second;
        c.thread = a->threadId;
        c.start = static_cast<int64_t>(a->start);
        c.end = static_cast<int64_t>(a->end);
        c.correlation = a->correlationId;
        p.api.push_back(c);
        break;
      }
      case CUPTI_ACTIVITY_KIND_SYNCHRONIZATION: {
        const auto* s = reinterpret_cast<const CUpti_ActivitySynchronization2*>(rec);
        SyncEvent e;
        e.name = p.intern(cupti_names::sync_name(s->type));
        e.stream = s->streamId;
        e.start = static_cast<int64_t>(s->start);
        e.end = static_cast<int64_t>(s->end);
        e.correlation = s->correlationId;
        p.syncs.push_back(e);
        break;
      }
      case CUPTI_ACTIVITY_KIND_MARKER: {
        const auto* m = reinterpret_cast<const CUpti_ActivityMarker2*>(rec);
        if ((m->flags & CUPTI_ACTIVITY_FLAG_MARKER_END) != 0) {
          p.marker_ends.push_back({m->id, static_cast<int64_t>(m->timestamp)});
        } else if ((m->flags & CUPTI_ACTIVITY_FLAG_MARKER_START) != 0 ||
                   (m->flags & CUPTI_ACTIVITY_FLAG_MARKER_INSTANTANEOUS) != 0) {
          Marker mk;
          mk.name = p.intern(m->name ? m->name : "");
          mk.domain = m->domain ? p.intern(m->domain) : -1;
          mk.thread = m->objectKind == CUPTI_ACTIVITY_OBJECT_THREAD ||
                              m->objectKind == CUPTI_ACTIVITY_OBJECT_PROCESS
                          ? m->objectId.pt.threadId
                          : 0;
          mk.start = static_cast<int64_t>(m->timestamp);
          mk.end = (m->flags & CUPTI_ACTIVITY_FLAG_MARKER_INSTANTANEOUS) != 0 ? mk.start : -1;
          p.marker_starts.push_back(mk);
          p.marker_ids.push_back(m->id);
        }
        break;
      }
      case CUPTI_ACTIVITY_KIND_MARKER_DATA: {
        const auto* d = reinterpret_cast<const CUpti_ActivityMarkerData2*>(rec);
        int64_t v = 0;
        if (d->payloadKind == CUPTI_METRIC_VALUE_KIND_INT64) {
          v = d->payload.metricValueInt64;
        } else if (d->payloadKind == CUPTI_METRIC_VALUE_KIND_UINT64) {
          v = static_cast<int64_t>(d->payload.metricValueUint64);
        } else if (d->payloadKind == CUPTI_METRIC_VALUE_KIND_DOUBLE) {
          v = static_cast<int64_t>(d->payload.metricValueDouble);
        } else {
          break;
        }
        p.marker_payload[d->id] = v;
        break;
      }
      case CUPTI_ACTIVITY_KIND_OVERHEAD: {
        const auto* o = reinterpret_cast<const CUpti_ActivityOverhead3*>(rec);
        if (o->end > o->start) p.overhead_ns += static_cast<int64_t>(o->end - o->start);
        break;
      }
      default:
        break;
    }
  }
}

CuptiSession::CuptiSession(const CuptiOptions& opt) : state_(std::make_unique<State>(opt)) {
  State& s = *state_;
  const CuptiAvailability a = cupti_availability();
  if (!a.usable) {
    s.ok = false;
    s.error = a.reason;
    return;
  }
  {
    std::lock_guard<std::mutex> lock(g_state_mu);
    if (g_state != nullptr) {
      s.ok = false;
      s.error = "another CUPTI session is active in this process";
      return;
    }
    g_state = &s;
  }
  // Subscribe first: CUPTI allows one subscriber per process, and when another profiler holds
  // it (Nsight Systems, Nsight Compute, compute-sanitizer, a test's subscriber) ktune must not
  // take over that profiler's activity buffers by registering its own callbacks.
  const CUptiResult sub = cuptiSubscribe(&s.subscriber, resource_callback, nullptr);
  if (sub != CUPTI_SUCCESS) s.subscriber = nullptr;
  if (!s.check(sub, "cuptiSubscribe")) {
    if (sub == CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED) {
      s.error +=
          " (another profiler is attached: Nsight Systems, Nsight Compute, "
          "compute-sanitizer or another CUPTI client)";
    }
    return;
  }
  s.check(cuptiEnableCallback(1, s.subscriber, CUPTI_CB_DOMAIN_RESOURCE,
                              CUPTI_CBID_RESOURCE_GRAPHNODE_CLONED),
          "cuptiEnableCallback(GRAPHNODE_CLONED)");
  {
    std::lock_guard<std::mutex> lock(g_pool_mu);
    g_pool = s.buffers;
  }
  if (!s.check(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed),
               "cuptiActivityRegisterCallbacks")) {
    return;
  }
  // Our buffers come zeroed (inject/activity_buffers.h): CUPTI need not zero them on the
  // engine's threads. Refused, CUPTI zeroes them itself; nothing else changes.
  trace_level::promise_zeroed_buffers();
  trace::set_node_id_resolver(resolve_node_id);
}

CuptiSession::~CuptiSession() {
  State& s = *state_;
  if (s.enabled || s.flush_pending) disable_and_flush();
  trace::set_node_id_resolver(nullptr);
  if (s.subscriber != nullptr) cuptiUnsubscribe(s.subscriber);
  std::lock_guard<std::mutex> lock(g_state_mu);
  if (g_state == &s) {
    // Late buffers (none expected after the forced flush) are freed without parsing.
    g_state = nullptr;
    std::lock_guard<std::mutex> pl(g_pool_mu);
    g_pool.reset();
  }
}

bool CuptiSession::detach() {
  State& s = *state_;
  if (!s.ok) return false;
  if (s.enabled || s.flush_pending) disable_and_flush();
  trace::set_node_id_resolver(nullptr);
  if (s.subscriber != nullptr) {
    cuptiUnsubscribe(s.subscriber);
    s.subscriber = nullptr;
  }
  cudaDeviceSynchronize();  // cuptiFinalize outside an API callback wants the device idle
  const CUptiResult r = cuptiFinalize();
  if (!s.check(r, "cuptiFinalize")) return false;
  s.ok = false;
  s.error = "detached (cuptiFinalize) after the traced windows";
  return true;
}

bool CuptiSession::ok() const { return state_->ok; }
const std::string& CuptiSession::error() const { return state_->error; }
trace_level::Level CuptiSession::level() const { return state_->level; }
const std::string& CuptiSession::notes() const { return state_->notes; }

void CuptiSession::enable() { enable(state_->opt.level); }

void CuptiSession::enable(trace_level::Level level) {
  State& s = *state_;
  if (!s.ok || s.enabled) return;
  s.level = level;
  const trace_level::Selection sel = trace_level::select_kinds(level, trace_level::Tracer::Engine);
  s.kinds.clear();
  // The engine's selection is whole activity kinds at every level (trace_level.h: per-call
  // runtime selection is the injection's alone).
  auto undo = [&] {
    for (CUpti_ActivityKind j : s.kinds) cuptiActivityDisable(j);
    s.kinds.clear();
  };
  for (trace_level::Kind k : sel.kinds) {
    if (!s.check(cuptiActivityEnable(trace_level::to_cupti(k)),
                 (std::string("cuptiActivityEnable(") + trace_level::kind_name(k) + ")").c_str())) {
      undo();
      return;
    }
    s.kinds.push_back(trace_level::to_cupti(k));
  }
  s.enabled = true;
}

void CuptiSession::disable() {
  State& s = *state_;
  if (!s.enabled) return;
  cudaDeviceSynchronize();  // the window's work is complete (and recorded) before the kinds go
  for (CUpti_ActivityKind k : s.kinds) cuptiActivityDisable(k);
  s.kinds.clear();
  s.enabled = false;
  s.flush_pending = true;
}

void CuptiSession::disable_and_flush() {
  State& s = *state_;
  if (!s.enabled && !s.flush_pending) return;
  disable();
  s.flush_pending = false;
  s.check(cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED), "cuptiActivityFlushAll");
}

void CuptiSession::drain_into(Timeline& t) {
  State& s = *state_;
  Parsed p;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    p = std::move(s.parsed);
    s.parsed = Parsed{};
    s.kernel_name_cache.clear();
    s.api_name_cache.clear();
  }
  // Re-intern names into the timeline's table.
  std::vector<int32_t> remap(p.strings.size());
  for (size_t i = 0; i < p.strings.size(); ++i) remap[i] = t.intern(p.strings[i]);
  auto rn = [&](int32_t i) { return i >= 0 ? remap[static_cast<size_t>(i)] : -1; };
  for (GpuOp& o : p.ops) {
    o.name = rn(o.name);
    t.ops.push_back(o);
  }
  for (ApiCall& a : p.api) {
    a.name = rn(a.name);
    t.api.push_back(a);
  }
  for (SyncEvent& e : p.syncs) {
    e.name = rn(e.name);
    t.syncs.push_back(e);
  }
  std::unordered_map<uint32_t, int64_t> ends;
  for (const auto& e : p.marker_ends) ends[e.id] = e.time;
  for (size_t i = 0; i < p.marker_starts.size(); ++i) {
    Marker m = p.marker_starts[i];
    const uint32_t id = p.marker_ids[i];
    if (m.end < 0) {
      auto it = ends.find(id);
      if (it == ends.end()) continue;  // a range still open at the flush
      m.end = it->second;
    }
    auto pl = p.marker_payload.find(id);
    if (pl != p.marker_payload.end()) {
      m.payload = pl->second;
      m.has_payload = true;
    }
    m.name = rn(m.name);
    m.domain = rn(m.domain);
    t.markers.push_back(m);
  }
  for (const auto& [c, o] : p.clone_of) t.node_clone_of[c] = o;
  t.dropped_records += p.dropped;
  t.cupti_overhead_ns += p.overhead_ns;
  t.cupti = true;
  if (t.gpus.empty()) {
    int n = 0;
    if (cudaGetDeviceCount(&n) == cudaSuccess) {
      for (int d = 0; d < n; ++d) {
        cudaDeviceProp prop{};
        if (cudaGetDeviceProperties(&prop, d) == cudaSuccess) t.gpus.push_back({d, prop.name});
      }
    }
  }
}

int64_t CuptiSession::timestamp() {
  uint64_t ts = 0;
  if (cuptiGetTimestamp(&ts) != CUPTI_SUCCESS) return 0;
  return static_cast<int64_t>(ts);
}

int64_t CuptiSession::steady_to_cupti_offset() {
  int64_t best_gap = INT64_MAX, offset = 0;
  for (int i = 0; i < 9; ++i) {
    const int64_t a = trace::now_ns();
    const int64_t c = timestamp();
    const int64_t b = trace::now_ns();
    if (c == 0) return 0;
    if (b - a < best_gap) {
      best_gap = b - a;
      offset = c - (a + (b - a) / 2);
    }
  }
  return offset;
}

std::string setup_nvtx_injection() {
  if (const char* cur = std::getenv("NVTX_INJECTION64_PATH")) return cur;
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&cuptiActivityEnable), &info) == 0 ||
      info.dli_fname == nullptr) {
    return "";
  }
  setenv("NVTX_INJECTION64_PATH", info.dli_fname, 0);
  return info.dli_fname;
}

#else  // no CUPTI in this build: every session is unavailable, with the reason

struct CuptiSession::State {
  std::string error;
  std::string notes;
  trace_level::Level level = trace_level::Level::Full;
};

CuptiSession::CuptiSession(const CuptiOptions& opt) : state_(std::make_unique<State>()) {
  state_->error = cupti_availability().reason;
  state_->level = opt.level;
}
CuptiSession::~CuptiSession() = default;
bool CuptiSession::ok() const { return false; }
const std::string& CuptiSession::error() const { return state_->error; }
trace_level::Level CuptiSession::level() const { return state_->level; }
const std::string& CuptiSession::notes() const { return state_->notes; }
void CuptiSession::enable() {}
void CuptiSession::enable(trace_level::Level) {}
void CuptiSession::disable() {}
void CuptiSession::disable_and_flush() {}
bool CuptiSession::detach() { return false; }
void CuptiSession::drain_into(Timeline&) {}
int64_t CuptiSession::timestamp() { return 0; }
int64_t CuptiSession::steady_to_cupti_offset() { return 0; }
std::string setup_nvtx_injection() { return ""; }

#endif

}  // namespace ktune::profiler
