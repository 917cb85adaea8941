// libktune_inject.so: profiles any CUDA program for `ktune profile --exec` (docs/exec.md).
//
// Loaded twice by name, one library:
//   - CUDA_INJECTION64_PATH: the CUDA driver calls InitializeInjection() inside cuInit, so CUPTI
//     activity tracing starts before the program's first kernel. What it records is the trace
//     level in $KTUNE_EXEC_TRACE_LEVEL (inject/trace_level.h): `light` (the default) kernels,
//     copies, memsets, device names and only the runtime calls that launch, copy or block;
//     `full` also every runtime API call, synchronizations and CUPTI's overhead records;
//   - NVTX_INJECTION64_PATH: NVTX v3 (header-only, compiled into the program or into PyTorch)
//     calls InitializeInjectionNvtx2() on the program's first NVTX call; we fill NVTX's function
//     tables (export table NVTX_ETID_CALLBACKS, modules CORE and CORE2) with recorders for
//     push/pop and start/end ranges. Ranges are timed on CLOCK_MONOTONIC and shifted onto
//     CUPTI's clock at the flush; thread ids are OS thread ids, as CUPTI's API records
//     (cuptiSetThreadIdType SYSTEM), so a kernel is matched to the range around its launch.
//
// Why not the profiler's CuptiSession (profiler/cupti_activity.h): it calls the CUDA runtime
// (device count, synchronize, properties), which must not run inside cuInit nor be linked into
// someone else's process (their runtime may differ), and it depends on the engine's trace
// hooks. This file uses CUPTI and libc only; the file it writes has the columns of the
// profiler's timeline, so everything after it (analysis, report, trace) is the profiler's.
//
// The capture is written once (inject/flush_trigger.h): at exit, on SIGINT/SIGTERM, or when
// KTUNE_EXEC_DURATION_MS passes; to $KTUNE_EXEC_OUT_DIR/ktune-exec-<pid>.json. Children inherit
// the variables: each child that initializes CUDA (or calls NVTX) writes its own file.
#include <cupti.h>
#include <cxxabi.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#define NVTX_NO_IMPL
#include <nvtx3/nvToolsExt.h>

#include "inject/activity_buffers.h"
#include "inject/cupti_names.h"
#include "inject/exec_capture.h"
#include "inject/flush_trigger.h"
#include "inject/string_intern.h"
#include "inject/trace_level.h"
#include "inject/trace_level_cupti.h"

namespace {

using ktune::exec_capture::Capture;

constexpr size_t kBufferBytes = size_t{8} << 20;
constexpr size_t kMaxBuffers = 512;  // 4 GiB of records at most; then CUPTI drops and counts
constexpr size_t kKeptBuffers = 16;  // zeroed buffers kept for reuse (inject/activity_buffers.h)

int64_t mono_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}
uint64_t os_tid() { return static_cast<uint64_t>(syscall(SYS_gettid)); }

// ---- state (leaked on purpose: it must outlive static destructors at exit) ----
struct State {
  std::mutex mu;  // guards capture
  Capture capture;
  std::unordered_map<const char*, int32_t> kernel_names;  // CUPTI-owned name pointers
  std::unordered_map<uint32_t, int32_t> api_names;        // runtime cbid -> interned name
  ktune::exec_capture::ActivityBufferPool buffers{kBufferBytes, kMaxBuffers, kKeptBuffers};
  std::atomic<bool> cupti_on{false};
  std::vector<CUpti_ActivityKind> kinds;
  std::vector<CUpti_CallbackId> runtime_ids;  // light: the runtime calls recorded one by one
  std::string out_dir;
  int64_t duration_ms = 0;
};
State& S() {
  static State* s = new State();
  return *s;
}

// ---- NVTX ranges ----
struct RangeRec {
  int32_t name;
  int32_t domain;
  int64_t start;  // CLOCK_MONOTONIC until the flush
  int64_t end;
  int64_t payload;
  bool has_payload;
  uint64_t thread;
};
struct ThreadRanges {
  std::mutex mu;
  std::vector<RangeRec> done;
  std::vector<RangeRec> stack;  // push/pop ranges open on this thread (all domains)
  uint64_t tid = 0;
};
struct NvtxState {
  std::mutex mu;  // names, domains, threads, start/end ranges
  std::vector<std::string> names;
  std::unordered_map<std::string, int32_t> name_index;
  std::vector<ThreadRanges*> threads;
  std::map<uint64_t, RangeRec> started;  // start/end ranges by id
  std::atomic<uint64_t> next_id{1};
  std::atomic<bool> enabled{true};  // false after the flush
};
NvtxState& N() {
  static NvtxState* n = new NvtxState();
  return *n;
}

int32_t nvtx_intern(const std::string& s) {
  NvtxState& n = N();
  std::lock_guard<std::mutex> l(n.mu);
  return ktune::exec_capture::intern_string(n.names, n.name_index, s);
}

// Names repeat (one per step, per layer): a per-thread cache keeps the lock off the hot path.
int32_t name_id(const char* s) {
  thread_local std::unordered_map<std::string, int32_t> cache;
  thread_local std::string key;
  key.assign(s != nullptr ? s : "");
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  const int32_t id = nvtx_intern(key);
  cache.emplace(key, id);
  return id;
}
std::string narrow(const wchar_t* w) {
  std::string s;
  for (; w != nullptr && *w != 0; ++w) s += (*w > 0 && *w < 128) ? static_cast<char>(*w) : '?';
  return s;
}

ThreadRanges& my_ranges() {
  thread_local ThreadRanges* t = nullptr;
  if (t == nullptr) {
    t = new ThreadRanges();  // leaked: read at the flush, possibly after the thread ended
    t->tid = os_tid();
    NvtxState& n = N();
    std::lock_guard<std::mutex> l(n.mu);
    n.threads.push_back(t);
  }
  return *t;
}

// Registered strings and domains are handed out as pointers to interned ids.
struct Handle {
  int32_t id;
};
Handle* new_handle(int32_t id) { return new Handle{id}; }  // leaked: NVTX handles live forever

int32_t message_id(const nvtxEventAttributes_t* a) {
  if (a == nullptr) return name_id("");
  switch (a->messageType) {
    case NVTX_MESSAGE_TYPE_ASCII:
      return name_id(a->message.ascii);
    case NVTX_MESSAGE_TYPE_UNICODE:
      return name_id(narrow(a->message.unicode).c_str());
    case NVTX_MESSAGE_TYPE_REGISTERED:
      return a->message.registered != nullptr
                 ? reinterpret_cast<const Handle*>(a->message.registered)->id
                 : name_id("");
    default:
      return name_id("");
  }
}
bool payload_of(const nvtxEventAttributes_t* a, int64_t* v) {
  if (a == nullptr) return false;
  switch (a->payloadType) {
    case NVTX_PAYLOAD_TYPE_UNSIGNED_INT64:
      *v = static_cast<int64_t>(a->payload.ullValue);
      return true;
    case NVTX_PAYLOAD_TYPE_INT64:
      *v = a->payload.llValue;
      return true;
    case NVTX_PAYLOAD_TYPE_DOUBLE:
      *v = static_cast<int64_t>(a->payload.dValue);
      return true;
    case NVTX_PAYLOAD_TYPE_UNSIGNED_INT32:
      *v = a->payload.uiValue;
      return true;
    case NVTX_PAYLOAD_TYPE_INT32:
      *v = a->payload.iValue;
      return true;
    case NVTX_PAYLOAD_TYPE_FLOAT:
      *v = static_cast<int64_t>(a->payload.fValue);
      return true;
    default:
      return false;
  }
}
int32_t domain_id(nvtxDomainHandle_t d) {
  return d != nullptr ? reinterpret_cast<const Handle*>(d)->id : -1;
}

int push(int32_t name, int32_t domain, const nvtxEventAttributes_t* a) {
  if (!N().enabled.load(std::memory_order_relaxed)) return 0;
  ThreadRanges& t = my_ranges();
  RangeRec r{name, domain, mono_ns(), 0, 0, false, t.tid};
  r.has_payload = payload_of(a, &r.payload);
  std::lock_guard<std::mutex> l(t.mu);
  t.stack.push_back(r);
  return static_cast<int>(t.stack.size()) - 1;
}
int pop(int32_t domain) {
  const int64_t now = mono_ns();
  if (!N().enabled.load(std::memory_order_relaxed)) return -1;
  ThreadRanges& t = my_ranges();
  std::lock_guard<std::mutex> l(t.mu);
  // The innermost open range of this domain (NVTX keeps one stack per domain and thread).
  for (size_t i = t.stack.size(); i-- > 0;) {
    if (t.stack[i].domain != domain) continue;
    RangeRec r = t.stack[i];
    t.stack.erase(t.stack.begin() + static_cast<std::ptrdiff_t>(i));
    r.end = now;
    t.done.push_back(r);
    return static_cast<int>(i);
  }
  return -1;
}
nvtxRangeId_t start(int32_t name, int32_t domain, const nvtxEventAttributes_t* a) {
  NvtxState& n = N();
  if (!n.enabled.load(std::memory_order_relaxed)) return 0;
  RangeRec r{name, domain, mono_ns(), 0, 0, false, os_tid()};
  r.has_payload = payload_of(a, &r.payload);
  const uint64_t id = n.next_id.fetch_add(1);
  std::lock_guard<std::mutex> l(n.mu);
  n.started.emplace(id, r);
  return id;
}
void end(nvtxRangeId_t id) {
  const int64_t now = mono_ns();
  NvtxState& n = N();
  RangeRec r{};
  {
    std::lock_guard<std::mutex> l(n.mu);
    auto it = n.started.find(id);
    if (it == n.started.end()) return;
    r = it->second;
    n.started.erase(it);
  }
  r.end = now;
  ThreadRanges& t = my_ranges();
  std::lock_guard<std::mutex> l(t.mu);
  t.done.push_back(r);
}

// NVTX entry points (default domain, then CORE2's domain versions).
int NVTX_API push_a(const char* m) { return push(name_id(m), -1, nullptr); }
int NVTX_API push_w(const wchar_t* m) { return push(name_id(narrow(m).c_str()), -1, nullptr); }
int NVTX_API push_ex(const nvtxEventAttributes_t* a) { return push(message_id(a), -1, a); }
int NVTX_API pop_default() { return pop(-1); }
nvtxRangeId_t NVTX_API start_a(const char* m) { return start(name_id(m), -1, nullptr); }
nvtxRangeId_t NVTX_API start_w(const wchar_t* m) {
  return start(name_id(narrow(m).c_str()), -1, nullptr);
}
nvtxRangeId_t NVTX_API start_ex(const nvtxEventAttributes_t* a) {
  return start(message_id(a), -1, a);
}
void NVTX_API end_default(nvtxRangeId_t id) { end(id); }
int NVTX_API domain_push_ex(nvtxDomainHandle_t d, const nvtxEventAttributes_t* a) {
  return push(message_id(a), domain_id(d), a);
}
int NVTX_API domain_pop(nvtxDomainHandle_t d) { return pop(domain_id(d)); }
nvtxRangeId_t NVTX_API domain_start_ex(nvtxDomainHandle_t d, const nvtxEventAttributes_t* a) {
  return start(message_id(a), domain_id(d), a);
}
void NVTX_API domain_end(nvtxDomainHandle_t, nvtxRangeId_t id) { end(id); }
nvtxDomainHandle_t NVTX_API domain_create_a(const char* name) {
  return reinterpret_cast<nvtxDomainHandle_t>(new_handle(name_id(name)));
}
nvtxDomainHandle_t NVTX_API domain_create_w(const wchar_t* name) {
  return reinterpret_cast<nvtxDomainHandle_t>(new_handle(name_id(narrow(name).c_str())));
}
nvtxStringHandle_t NVTX_API register_string_a(nvtxDomainHandle_t, const char* s) {
  return reinterpret_cast<nvtxStringHandle_t>(new_handle(name_id(s)));
}
nvtxStringHandle_t NVTX_API register_string_w(nvtxDomainHandle_t, const wchar_t* s) {
  return reinterpret_cast<nvtxStringHandle_t>(new_handle(name_id(narrow(s).c_str())));
}

// ---- CUPTI ----

// What kernel, memcpy and memset records share (they name those fields alike).
template <typename Record>
ktune::exec_capture::Op gpu_op(const Record* r, uint8_t kind) {
  ktune::exec_capture::Op op;
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
// The interval and correlation of an API call or synchronization record.
template <typename Out, typename Record>
Out timed(const Record* r) {
  Out x;
  x.start = static_cast<int64_t>(r->start);
  x.end = static_cast<int64_t>(r->end);
  x.correlation = r->correlationId;
  return x;
}

void parse(uint8_t* buffer, size_t valid) {
  State& s = S();
  Capture& c = s.capture;
  CUpti_Activity* rec = nullptr;
  std::lock_guard<std::mutex> lock(s.mu);
  while (cuptiActivityGetNextRecord(buffer, valid, &rec) == CUPTI_SUCCESS) {
    switch (rec->kind) {
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
        const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(rec);
        ktune::exec_capture::Op op = gpu_op(k, 0);
        auto it = s.kernel_names.find(k->name);
        if (it == s.kernel_names.end()) {
          it = s.kernel_names
                   .emplace(k->name, c.intern(ktune::cupti_names::short_kernel_name(k->name)))
                   .first;
        }
        op.name = it->second;
        c.ops.push_back(op);
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMCPY: {
        const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(rec);
        ktune::exec_capture::Op op = gpu_op(m, 1);
        op.bytes = static_cast<int64_t>(m->bytes);
        op.name = c.intern(ktune::cupti_names::copy_kind_name(m->copyKind));
        c.ops.push_back(op);
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMSET: {
        const auto* m = reinterpret_cast<const CUpti_ActivityMemset4*>(rec);
        ktune::exec_capture::Op op = gpu_op(m, 2);
        op.bytes = static_cast<int64_t>(m->bytes);
        op.name = c.intern("Memset");
        c.ops.push_back(op);
        break;
      }
      case CUPTI_ACTIVITY_KIND_RUNTIME: {
        const auto* a = reinterpret_cast<const CUpti_ActivityAPI*>(rec);
        auto x = timed<ktune::exec_capture::Api>(a);
        auto it = s.api_names.find(a->cbid);
        if (it == s.api_names.end()) {
          it = s.api_names
                   .emplace(a->cbid, c.intern(ktune::cupti_names::api_name(
                                         CUPTI_CB_DOMAIN_RUNTIME_API, a->cbid)))
                   .first;
        }
        x.name = it->second;
        x.thread = a->threadId;
        c.api.push_back(x);
        break;
      }
      case CUPTI_ACTIVITY_KIND_SYNCHRONIZATION: {
        const auto* y = reinterpret_cast<const CUpti_ActivitySynchronization2*>(rec);
        auto x = timed<ktune::exec_capture::Sync>(y);
        x.name = c.intern(ktune::cupti_names::sync_name(y->type));
        x.stream = y->streamId;
        c.syncs.push_back(x);
        break;
      }
      case CUPTI_ACTIVITY_KIND_OVERHEAD: {
        const auto* o = reinterpret_cast<const CUpti_ActivityOverhead3*>(rec);
        if (o->end > o->start) c.cupti_overhead_ns += static_cast<int64_t>(o->end - o->start);
        break;
      }
      case CUPTI_ACTIVITY_KIND_DEVICE: {
        const auto* d = reinterpret_cast<const CUpti_ActivityDevice5*>(rec);
        bool seen = false;
        for (const auto& g : c.gpus) seen = seen || g.first == static_cast<int32_t>(d->id);
        if (!seen) c.gpus.emplace_back(static_cast<int32_t>(d->id), d->name ? d->name : "");
        break;
      }
      default:
        break;
    }
  }
}

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  State& s = S();
  *max_records = 0;
  *buffer = s.buffers.take();  // nullptr: CUPTI drops the records and counts them
  *size = *buffer != nullptr ? s.buffers.bytes() : 0;
}

void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t* buffer, size_t,
                               size_t valid) {
  State& s = S();
  if (buffer != nullptr) {
    parse(buffer, valid);
    size_t dropped = 0;
    if (cuptiActivityGetNumDroppedRecords(ctx, stream, &dropped) == CUPTI_SUCCESS && dropped > 0) {
      std::lock_guard<std::mutex> l(s.mu);
      s.capture.dropped_records += dropped;
    }
  }
  s.buffers.give_back(buffer);
}

std::string cupti_error(CUptiResult r, const char* call) {
  const char* m = nullptr;
  cuptiGetResultString(r, &m);
  return std::string(call) + ": " + (m != nullptr ? m : "unknown CUPTI error");
}

int64_t cupti_now() {
  uint64_t t = 0;
  return cuptiGetTimestamp(&t) == CUPTI_SUCCESS ? static_cast<int64_t>(t) : 0;
}

// CUPTI's clock minus CLOCK_MONOTONIC (best of a few paired reads).
int64_t mono_to_cupti() {
  int64_t best = INT64_MAX, off = 0;
  for (int i = 0; i < 9; ++i) {
    const int64_t a = mono_ns();
    const int64_t c = cupti_now();
    const int64_t b = mono_ns();
    if (c == 0) return 0;
    if (b - a < best) {
      best = b - a;
      off = c - (a + (b - a) / 2);
    }
  }
  return off;
}

std::string read_cmdline() {
  std::ifstream f("/proc/self/cmdline", std::ios::binary);
  std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  while (!s.empty() && s.back() == '\0') s.pop_back();
  for (char& ch : s) {
    if (ch == '\0') ch = ' ';
  }
  return s;
}

// The one flush (inject/flush_trigger.h): stop CUPTI, take every buffer, add the NVTX ranges,
// write the file.
void flush(const char* reason) {
  State& s = S();
  NvtxState& n = N();
  n.enabled.store(false);
  if (s.cupti_on.load()) {
    for (CUpti_ActivityKind k : s.kinds) cuptiActivityDisable(k);
    ktune::trace_level::enable_runtime_api_ids(s.runtime_ids, false);
    cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  }
  const int64_t off = mono_to_cupti();
  std::lock_guard<std::mutex> l(s.mu);
  Capture& c = s.capture;
  c.flush_reason = reason;
  c.pid = getpid();
  c.ppid = getppid();
  c.command = read_cmdline();
  c.trace_end = cupti_now();
  if (c.trace_end == 0) c.trace_end = mono_ns() + off;
  {
    std::lock_guard<std::mutex> nl(n.mu);
    std::vector<int32_t> remap(n.names.size());
    for (size_t i = 0; i < n.names.size(); ++i) remap[i] = c.intern(n.names[i]);
    auto rn = [&](int32_t i) { return i >= 0 ? remap[static_cast<size_t>(i)] : -1; };
    for (ThreadRanges* t : n.threads) {
      std::lock_guard<std::mutex> tl(t->mu);
      for (const RangeRec& r : t->done) {
        ktune::exec_capture::Range x;
        x.name = rn(r.name);
        x.domain = rn(r.domain);
        x.thread = r.thread;
        x.start = r.start + off;
        x.end = r.end + off;
        x.payload = r.payload;
        x.has_payload = r.has_payload;
        c.ranges.push_back(x);
      }
      c.open_ranges += static_cast<int64_t>(t->stack.size());
      t->done.clear();
    }
    c.open_ranges += static_cast<int64_t>(n.started.size());
  }
  const std::string path = ktune::exec_capture::file_name(s.out_dir, c.pid);
  const std::string err = ktune::exec_capture::write_file(path, ktune::exec_capture::to_json(c));
  if (!err.empty()) std::fprintf(stderr, "ktune inject: %s\n", err.c_str());
}

void at_exit() { ktune::inject::flush_once(flush, "exit"); }

// The level `ktune profile --exec --trace-level` asked for (inject/trace_level.h): light when the
// variable is unset; an unknown value (ktune checks it, so only a hand-set one) is noted.
ktune::trace_level::Level requested_level(std::string* note) {
  ktune::trace_level::Level l = ktune::trace_level::Level::Light;
  const char* v = std::getenv(ktune::trace_level::kExecEnvVar);
  if (v != nullptr && *v != 0 && !ktune::trace_level::parse_level(v, &l) && note != nullptr) {
    *note += std::string(ktune::trace_level::kExecEnvVar) + "=" + v +
             " is not a trace level: traced at level light; ";
  }
  return l;
}

// Reads the variables `ktune profile --exec` sets and arms the triggers (once).
void arm() {
  static std::once_flag once;
  std::call_once(once, [] {
    State& s = S();
    {
      std::lock_guard<std::mutex> l(s.mu);
      s.capture.trace_level = ktune::trace_level::level_name(requested_level(nullptr));
    }
    const char* dir = std::getenv("KTUNE_EXEC_OUT_DIR");
    s.out_dir = dir != nullptr && *dir != 0 ? dir : ".";
    const char* dur = std::getenv("KTUNE_EXEC_DURATION_MS");
    s.duration_ms = dur != nullptr ? std::atoll(dur) : 0;
    std::atexit(at_exit);
    ktune::inject::TriggerOptions opt;
    opt.duration_ms = s.duration_ms;
    const std::string e = ktune::inject::start_flush_triggers(flush, opt);
    if (!e.empty())
      std::fprintf(stderr, "ktune inject: %s (the trace is written at exit only)\n", e.c_str());
  });
}

}  // namespace

extern "C" {

// Called by the CUDA driver inside cuInit (CUDA_INJECTION64_PATH). Returns 1 (success) even when
// CUPTI fails: the program must run on; the capture says why nothing was traced.
__attribute__((visibility("default"))) int InitializeInjection(void) {
  static std::atomic<bool> done{false};
  if (done.exchange(true)) return 1;
  State& s = S();
  {
    std::lock_guard<std::mutex> l(s.mu);
    s.capture.cuda_initialized = true;
  }
  std::string err, degraded;
  // OS thread ids in API records, as the NVTX recorders use; without it ranges and launches
  // cannot be matched (phases then come from kernel names only).
  CUptiResult r = cuptiSetThreadIdType(CUPTI_ACTIVITY_THREAD_ID_TYPE_SYSTEM);
  if (r != CUPTI_SUCCESS) degraded += cupti_error(r, "cuptiSetThreadIdType") + "; ";
  r = cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed);
  if (r != CUPTI_SUCCESS) err = cupti_error(r, "cuptiActivityRegisterCallbacks");
  namespace tl = ktune::trace_level;
  const tl::Selection sel = tl::select_kinds(requested_level(&degraded), tl::Tracer::Injection);
  // Before any kind is on: our buffers come zeroed (inject/activity_buffers.h).
  if (err.empty() && !tl::promise_zeroed_buffers()) {
    degraded += "CUPTI zeroes its activity buffers itself (ZEROED_OUT_ACTIVITY_BUFFER refused); ";
  }
  // Required: without kernels, copies, memsets and launch records there is nothing to analyze.
  // Optional (device names, synchronizations, CUPTI's overhead): a refusal is noted.
  auto required = [](tl::Kind k) {
    return k == tl::Kind::ConcurrentKernel || k == tl::Kind::Memcpy || k == tl::Kind::Memset ||
           k == tl::Kind::Runtime;
  };
  for (tl::Kind k : sel.kinds) {
    if (!err.empty() || !required(k)) continue;
    r = cuptiActivityEnable(tl::to_cupti(k));
    if (r != CUPTI_SUCCESS) {
      err = cupti_error(r, "cuptiActivityEnable") + " (" + tl::kind_name(k) + ")";
    } else {
      s.kinds.push_back(tl::to_cupti(k));
    }
  }
  if (err.empty() && sel.runtime_api_subset) {
    // Light: runtime API records for the launching, copying and blocking calls only. Without
    // per-call selection, every call is recorded (as at level full) rather than none.
    s.runtime_ids = tl::kept_runtime_api_ids();
    std::string e = s.runtime_ids.empty() ? "no runtime API callback names from CUPTI"
                                          : tl::enable_runtime_api_ids(s.runtime_ids, true);
    if (!e.empty()) {
      tl::enable_runtime_api_ids(s.runtime_ids, false);
      s.runtime_ids.clear();
      r = cuptiActivityEnable(CUPTI_ACTIVITY_KIND_RUNTIME);
      if (r != CUPTI_SUCCESS) {
        err = cupti_error(r, "cuptiActivityEnable") + " (RUNTIME)";
      } else {
        s.kinds.push_back(CUPTI_ACTIVITY_KIND_RUNTIME);
        degraded += "level light could not select runtime calls (" + e +
                    "): every runtime API call is recorded, as at level full; ";
      }
    }
  }
  if (!err.empty()) {
    for (CUpti_ActivityKind j : s.kinds) cuptiActivityDisable(j);
    s.kinds.clear();
    tl::enable_runtime_api_ids(s.runtime_ids, false);
    s.runtime_ids.clear();
  }
  for (tl::Kind k : sel.kinds) {
    if (!err.empty() || required(k)) continue;
    r = cuptiActivityEnable(tl::to_cupti(k));
    if (r == CUPTI_SUCCESS) {
      s.kinds.push_back(tl::to_cupti(k));
    } else {
      degraded += cupti_error(r, "cuptiActivityEnable") + " (" + tl::kind_name(k) + "); ";
    }
  }
  {
    std::lock_guard<std::mutex> l(s.mu);
    s.capture.trace_start = cupti_now();
    s.capture.cupti_ok = err.empty();
    s.capture.cupti_error = err;
    s.capture.notes = degraded;
  }
  s.cupti_on.store(err.empty());
  arm();
  // atexit runs handlers last-registered first: registering (again) after CUPTI and the CUDA
  // runtime set up theirs makes the flush run while both still work (a second flush is a no-op).
  std::atexit(at_exit);
  return 1;
}

// Called by NVTX on the program's first NVTX call (NVTX_INJECTION64_PATH). Returns 1 when our
// recorders are in NVTX's tables; NVTX makes every other entry point a no-op.
__attribute__((visibility("default"))) int InitializeInjectionNvtx2(
    NvtxGetExportTableFunc_t get_export_table) {
  if (get_export_table == nullptr) return 0;
  const auto* etbl =
      static_cast<const NvtxExportTableCallbacks*>(get_export_table(NVTX_ETID_CALLBACKS));
  if (etbl == nullptr || etbl->struct_size < sizeof(NvtxExportTableCallbacks) ||
      etbl->GetModuleFunctionTable == nullptr) {
    return 0;
  }
  auto fill = [&](NvtxCallbackModule module,
                  std::initializer_list<std::pair<unsigned, NvtxFunctionPointer>> fns) {
    NvtxFunctionTable table = nullptr;
    unsigned int last = 0;  // the highest valid callback id
    if (etbl->GetModuleFunctionTable(module, &table, &last) == 0 || table == nullptr) return false;
    for (const auto& [id, fn] : fns) {
      if (id <= last && table[id] != nullptr) *table[id] = fn;
    }
    return true;
  };
  using F = NvtxFunctionPointer;
  const bool core =
      fill(NVTX_CB_MODULE_CORE, {{NVTX_CBID_CORE_RangePushA, reinterpret_cast<F>(push_a)},
                                 {NVTX_CBID_CORE_RangePushW, reinterpret_cast<F>(push_w)},
                                 {NVTX_CBID_CORE_RangePushEx, reinterpret_cast<F>(push_ex)},
                                 {NVTX_CBID_CORE_RangePop, reinterpret_cast<F>(pop_default)},
                                 {NVTX_CBID_CORE_RangeStartA, reinterpret_cast<F>(start_a)},
                                 {NVTX_CBID_CORE_RangeStartW, reinterpret_cast<F>(start_w)},
                                 {NVTX_CBID_CORE_RangeStartEx, reinterpret_cast<F>(start_ex)},
                                 {NVTX_CBID_CORE_RangeEnd, reinterpret_cast<F>(end_default)}});
  fill(NVTX_CB_MODULE_CORE2,
       {{NVTX_CBID_CORE2_DomainRangePushEx, reinterpret_cast<F>(domain_push_ex)},
        {NVTX_CBID_CORE2_DomainRangePop, reinterpret_cast<F>(domain_pop)},
        {NVTX_CBID_CORE2_DomainRangeStartEx, reinterpret_cast<F>(domain_start_ex)},
        {NVTX_CBID_CORE2_DomainRangeEnd, reinterpret_cast<F>(domain_end)},
        {NVTX_CBID_CORE2_DomainCreateA, reinterpret_cast<F>(domain_create_a)},
        {NVTX_CBID_CORE2_DomainCreateW, reinterpret_cast<F>(domain_create_w)},
        {NVTX_CBID_CORE2_DomainRegisterStringA, reinterpret_cast<F>(register_string_a)},
        {NVTX_CBID_CORE2_DomainRegisterStringW, reinterpret_cast<F>(register_string_w)}});
  if (!core) return 0;
  arm();  // a program that uses NVTX but never CUDA still writes its (GPU-less) capture
  return 1;
}

}  // extern "C"
