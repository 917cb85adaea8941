// Chrome trace writer (profiler/chrome_trace.h).
#include "profiler/chrome_trace.h"

#include <fmt/format.h>

#include <algorithm>
#include <map>
#include <set>
#include <unordered_map>

#include "ktune/engine/atomic_file.h"

namespace ktune::profiler {
namespace {

// Kineto's string hygiene: backslashes become '/', quotes escaped, control characters dropped.
std::string clean(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '\\') {
      out += '/';
    } else if (c == '"') {
      out += "\\\"";
    } else if (u < 0x20 || u == 0x7f) {
      continue;
    } else {
      out += c;
    }
  }
  return out.empty() ? "unknown" : out;
}

class Writer {
 public:
  explicit Writer(int64_t origin) : origin_(origin) {}
  std::string ts(int64_t t) const {
    const int64_t d = std::max<int64_t>(t - origin_, 0);
    return fmt::format("{}.{:03d}", d / 1000, static_cast<int>(d % 1000));
  }
  std::string dur(int64_t a, int64_t b) const {
    const int64_t d = std::max<int64_t>(b - a, 0);
    return fmt::format("{}.{:03d}", d / 1000, static_cast<int>(d % 1000));
  }
  void event(const std::string& body) {
    out_ += first_ ? "\n  {" : ",\n  {";
    out_ += body;
    out_ += "}";
    first_ = false;
  }
  void meta(const char* what, int64_t pid, int64_t tid, const std::string& arg_key,
            const std::string& value, bool quoted) {
    event(fmt::format(R"J("ph": "M", "name": "{}", "pid": {}, "tid": {}, "ts": 0, "args": {{"{}": {}}})J",
                      what, pid, tid, arg_key, quoted ? "\"" + clean(value) + "\"" : value));
  }
  std::string& text() { return out_; }

 private:
  int64_t origin_;
  std::string out_;
  bool first_ = true;
};

constexpr int64_t kPhaseTidBase = int64_t{1} << 20;
constexpr int64_t kSyncTidBase = int64_t{1} << 21;
constexpr int64_t kWindowsTid = 1;

std::string span_name(const HostSpan& s) {
  switch (s.phase) {
    case Phase::DecodeStep: return "decode step";
    case Phase::PrefillStep: return fmt::format("prefill step ({} tokens)", s.arg);
    default: break;
  }
  return s.arg >= 0 ? fmt::format("L{} {}", s.arg, phase_name(s.phase)) : phase_name(s.phase);
}

}  // namespace

std::string chrome_trace(const Timeline& t, const std::vector<OpTag>& tags,
                         const std::string& trace_name) {
  const int64_t origin = t.origin != 0 ? t.origin : t.first_time();
  Writer w(origin);
  std::string head = "{\n";
  head += "\"schemaVersion\": 1,\n";
  head += "\"deviceProperties\": [";
  for (size_t i = 0; i < t.gpus.size(); ++i) {
    head += fmt::format("{}{{\"id\": {}, \"name\": \"{}\"}}", i ? ", " : "", t.gpus[i].index,
                        clean(t.gpus[i].name));
  }
  head += "],\n";
  head += "\"distributedInfo\": {\"rank\": 0},\n";
  head += fmt::format("\"traceName\": \"{}\",\n", clean(trace_name));
  head += "\"displayTimeUnit\": \"ms\",\n";
  head += fmt::format("\"baseTimeNanoseconds\": {},\n", origin);
  head += fmt::format("\"otherData\": {{\"source\": \"ktune profile\", \"cupti\": {}, "
                      "\"note\": \"{}\", \"dropped_records\": {}, \"dropped_spans\": {}}},\n",
                      t.cupti ? "true" : "false", clean(t.source_note), t.dropped_records,
                      t.dropped_spans);
  head += "\"traceEvents\": [";
  w.text() = head;

  // Host threads: CUPTI's thread ids mapped to the engine's threads when they match.
  std::unordered_map<uint64_t, int64_t> cupti_tid;
  for (const HostThread& h : t.threads) {
    cupti_tid[static_cast<uint64_t>(h.os_tid)] = h.os_tid;
    cupti_tid[h.pthread_id] = h.os_tid;
    cupti_tid[h.pthread_id & 0xffffffffu] = h.os_tid;
  }
  auto host_tid = [&](uint64_t cupti_thread) -> int64_t {
    auto it = cupti_tid.find(cupti_thread);
    return it != cupti_tid.end() ? it->second : static_cast<int64_t>(cupti_thread & 0x7fffffff);
  };

  // ---- metadata ----
  std::set<int32_t> devices;
  for (const GpuDevice& g : t.gpus) devices.insert(g.index);
  for (const GpuOp& o : t.ops) devices.insert(o.device);
  std::map<int32_t, std::set<uint32_t>> streams;
  for (const GpuOp& o : t.ops) streams[o.device].insert(o.stream);
  for (int32_t d : devices) {
    std::string name = fmt::format("cuda:{}", d);
    for (const GpuDevice& g : t.gpus) {
      if (g.index == d) name += " " + g.name;
    }
    w.meta("process_name", d, 0, "name", name, true);
    w.meta("process_labels", d, 0, "labels", fmt::format("GPU {}", d), true);
    w.meta("process_sort_index", d, 0, "sort_index", std::to_string(d + 16), false);
    for (uint32_t s : streams[d]) {
      w.meta("thread_name", d, s, "name", fmt::format("stream {}", s), true);
      w.meta("thread_sort_index", d, s, "sort_index", std::to_string(s * 3), false);
      w.meta("thread_name", d, kPhaseTidBase + s, "name", fmt::format("stream {} phases", s),
             true);
      w.meta("thread_sort_index", d, kPhaseTidBase + s, "sort_index", std::to_string(s * 3 + 1),
             false);
    }
  }
  w.meta("process_name", kHostPid, 0, "name", "cpu (ktune)", true);
  w.meta("process_labels", kHostPid, 0, "labels", "CPU", true);
  w.meta("process_sort_index", kHostPid, 0, "sort_index", "0", false);
  w.meta("thread_name", kHostPid, kWindowsTid, "name", "profiled windows", true);
  w.meta("thread_sort_index", kHostPid, kWindowsTid, "sort_index", "0", false);
  std::set<int64_t> named;
  for (size_t i = 0; i < t.threads.size(); ++i) {
    const HostThread& h = t.threads[i];
    if (!named.insert(h.os_tid).second) continue;
    w.meta("thread_name", kHostPid, h.os_tid, "name", h.name, true);
    w.meta("thread_sort_index", kHostPid, h.os_tid, "sort_index", std::to_string(i + 1), false);
  }
  for (const ApiCall& a : t.api) {
    const int64_t tid = host_tid(a.thread);
    if (named.insert(tid).second) {
      w.meta("thread_name", kHostPid, tid, "name", fmt::format("thread {}", tid), true);
    }
  }

  // ---- windows ----
  for (const Window& win : t.windows) {
    w.event(fmt::format(R"J("ph": "X", "cat": "user_annotation", "name": "{} window ({} tokens)", "pid": {}, "tid": {}, "ts": {}, "dur": {}, "args": {{"tokens": {}}})J",
                        win.kind, win.tokens, kHostPid, kWindowsTid, w.ts(win.start),
                        w.dur(win.start, win.end), win.tokens));
  }

  // ---- host spans ----
  for (const HostSpan& s : t.spans) {
    const int64_t tid = s.thread < t.threads.size() ? t.threads[s.thread].os_tid : 0;
    w.event(fmt::format(R"J("ph": "X", "cat": "user_annotation", "name": "{}", "pid": {}, "tid": {}, "ts": {}, "dur": {}, "args": {{"phase": "{}", "{}": {}}})J",
                        clean(span_name(s)), kHostPid, tid, w.ts(s.start), w.dur(s.start, s.end),
                        phase_name(s.phase), trace::is_step_phase(s.phase) ? "tokens" : "layer",
                        s.arg));
  }

  // ---- NVTX ranges of other programs' domains (ktune's own are the host spans above) ----
  for (const Marker& m : t.markers) {
    if (t.str(m.domain) == "ktune" && !t.spans.empty()) continue;
    w.event(fmt::format(R"J("ph": "X", "cat": "user_annotation", "name": "{}", "pid": {}, "tid": {}, "ts": {}, "dur": {}, "args": {{"domain": "{}", "payload": {}}})J",
                        clean(t.str(m.name)), kHostPid, host_tid(m.thread), w.ts(m.start),
                        w.dur(m.start, m.end), clean(t.str(m.domain)), m.payload));
  }

  // ---- runtime API calls and the flow starts ----
  std::unordered_map<uint32_t, const ApiCall*> api_by_corr;
  for (const ApiCall& a : t.api) {
    if (a.correlation != 0) api_by_corr[a.correlation] = &a;
    w.event(fmt::format(R"J("ph": "X", "cat": "cuda_runtime", "name": "{}", "pid": {}, "tid": {}, "ts": {}, "dur": {}, "args": {{"correlation": {}, "external id": 0, "stream": -1}})J",
                        clean(t.str(a.name)), kHostPid, host_tid(a.thread), w.ts(a.start),
                        w.dur(a.start, a.end), a.correlation));
  }

  // ---- GPU ops, per-stream phase runs, flows ----
  std::vector<size_t> order(t.ops.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return t.ops[a].start < t.ops[b].start; });
  std::unordered_map<uint32_t, size_t> first_op;  // correlation -> first op (flow end)
  for (size_t i : order) {
    const uint32_t c = t.ops[i].correlation;
    if (c != 0 && first_op.find(c) == first_op.end()) first_op[c] = i;
  }
  struct Run {
    int64_t start = 0, end = 0;
    int32_t layer = -1;
    Phase phase = Phase::Other;
    int64_t kernels = 0;
    bool open = false;
  };
  std::map<std::pair<int32_t, uint32_t>, Run> runs;
  auto close_run = [&](int32_t dev, uint32_t stream, Run& r) {
    if (!r.open) return;
    const std::string name = r.layer >= 0 ? fmt::format("L{} {}", r.layer, phase_name(r.phase))
                                          : std::string(phase_name(r.phase));
    w.event(fmt::format(R"J("ph": "X", "cat": "gpu_user_annotation", "name": "{}", "pid": {}, "tid": {}, "ts": {}, "dur": {}, "args": {{"layer": {}, "phase": "{}", "kernels": {}}})J",
                        name, dev, kPhaseTidBase + stream, w.ts(r.start), w.dur(r.start, r.end),
                        r.layer, phase_name(r.phase), r.kernels));
    r.open = false;
  };
  for (size_t i : order) {
    const GpuOp& o = t.ops[i];
    const OpTag tag = i < tags.size() ? tags[i] : OpTag{};
    const char* cat = o.kind == GpuOpKind::Kernel   ? "kernel"
                      : o.kind == GpuOpKind::Memcpy ? "gpu_memcpy"
                                                    : "gpu_memset";
    std::string args = fmt::format(
        R"J("device": {}, "stream": {}, "correlation": {}, "external id": 0, "layer": {}, "phase": "{}", "tagged by": "{}")J",
        o.device, o.stream, o.correlation, tag.layer, phase_name(tag.phase),
        tag_source_name(tag.source));
    if (o.graph_node_id != 0) {
      args += fmt::format(R"J(, "graph id": {}, "graph node id": {})J", o.graph_id, o.graph_node_id);
    }
    if (o.kind != GpuOpKind::Kernel) args += fmt::format(R"J(, "bytes": {})J", o.bytes);
    w.event(fmt::format(R"J("ph": "X", "cat": "{}", "name": "{}", "pid": {}, "tid": {}, "ts": {}, "dur": {}, "args": {{{}}})J",
                        cat, clean(t.str(o.name)), o.device, o.stream, w.ts(o.start),
                        w.dur(o.start, o.end), args));
    if (o.kind == GpuOpKind::Kernel) {
      Run& r = runs[{o.device, o.stream}];
      if (r.open && (r.layer != tag.layer || r.phase != tag.phase)) close_run(o.device, o.stream, r);
      if (!r.open) {
        r = Run{o.start, o.end, tag.layer, tag.phase, 0, true};
      }
      r.end = std::max(r.end, o.end);
      ++r.kernels;
    }
    auto a = api_by_corr.find(o.correlation);
    if (o.correlation != 0 && a != api_by_corr.end() && first_op[o.correlation] == i) {
      w.event(fmt::format(R"J("ph": "s", "id": {}, "pid": {}, "tid": {}, "ts": {}, "cat": "ac2g", "name": "ac2g")J",
                          o.correlation, kHostPid, host_tid(a->second->thread),
                          w.ts(a->second->start)));
      w.event(fmt::format(R"J("ph": "f", "id": {}, "pid": {}, "tid": {}, "ts": {}, "cat": "ac2g", "name": "ac2g", "bp": "e")J",
                          o.correlation, o.device, o.stream, w.ts(o.start)));
    }
  }
  for (auto& [key, r] : runs) close_run(key.first, key.second, r);

  // ---- synchronizations ----
  for (const SyncEvent& s : t.syncs) {
    int32_t dev = t.gpus.empty() ? 0 : t.gpus.front().index;
    w.event(fmt::format(R"J("ph": "X", "cat": "cuda_sync", "name": "{}", "pid": {}, "tid": {}, "ts": {}, "dur": {}, "args": {{"stream": {}, "correlation": {}}})J",
                        clean(t.str(s.name)), dev, kSyncTidBase + s.stream, w.ts(s.start),
                        w.dur(s.start, s.end), s.stream, s.correlation));
  }
  w.text() += "\n]\n}\n";
  return std::move(w.text());
}

void write_chrome_trace(const std::string& path, const Timeline& t, const std::string& trace_name) {
  write_file_atomic(path, chrome_trace(t, attribute_ops(t), trace_name));
}

}  // namespace ktune::profiler
