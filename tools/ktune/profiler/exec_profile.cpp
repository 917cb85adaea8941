// `ktune profile --exec` (profiler/exec_profile.h; user guide docs/exec.md).
#include "profiler/exec_profile.h"

#include <dirent.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <sstream>
#include <set>
#include <unordered_map>

#include "inject/exec_capture.h"
#include "ktune/engine/atomic_file.h"
#include "ktune/engine/build_info.h"
#include "ktune/engine/error.h"
#include "ktune/engine/interrupt.h"
#include "profiler/chrome_trace.h"
#include "profiler/cupti_activity.h"
#include "profiler/profile_run.h"
#include "profiler/report.h"
#include "profiler/topology.h"

namespace ktune::profiler {

using nlohmann::json;

// ---- reading captures ----

ExecCapture parse_exec_capture(const std::string& text, const std::string& path) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw Error(path, std::string("not valid JSON (") + e.what() + ")",
                "the program may have been killed while writing it; run it again");
  }
  if (!j.is_object() || !j.contains("ktune_exec_capture") || !j.contains("timeline") ||
      !j.contains("process") || !j["process"].is_object()) {
    throw Error(path, "not a ktune exec capture (no \"ktune_exec_capture\" key)",
                "pass a file written by libktune_inject.so under `ktune profile --exec`");
  }
  if (!j["ktune_exec_capture"].is_number_integer() || j["ktune_exec_capture"].get<int>() != 1) {
    throw Error(path + ": ktune_exec_capture", "unsupported version",
                "use the ktune that wrote it");
  }
  ExecCapture c;
  c.path = path;
  const json& p = j["process"];
  try {
    c.pid = p.value("pid", int64_t{0});
    c.ppid = p.value("ppid", int64_t{0});
    c.command = p.value("command", std::string());
    c.flush_reason = p.value("flush_reason", std::string());
    c.cuda_initialized = p.value("cuda_initialized", false);
    c.cupti_ok = p.value("cupti_ok", false);
    c.cupti_error = p.value("cupti_error", std::string());
    c.notes = p.value("notes", std::string());
    c.trace_level = p.value("trace_level", std::string("full"));
    c.open_ranges = p.value("open_ranges", int64_t{0});
  } catch (const json::exception& e) {
    throw Error(path + ": process", std::string("bad field (") + e.what() + ")",
                "run the program again under `ktune profile --exec`");
  }
  c.timeline = timeline_from_json(j["timeline"], path);
  auto abs_ns = [&](const char* key) -> int64_t {
    if (!p.contains(key) || !p[key].is_number()) return 0;
    return c.timeline.origin + static_cast<int64_t>(std::llround(p[key].get<double>() * 1000.0));
  };
  c.trace_start = abs_ns("trace_start_us");
  c.trace_end = abs_ns("trace_end_us");
  return c;
}

ExecCapture read_exec_capture(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path, "cannot open", "check the path");
  std::ostringstream s;
  s << in.rdbuf();
  return parse_exec_capture(s.str(), path);
}

// ---- NVTX structure ----

namespace {

// Nesting depth of each marker among the markers of its thread (0: top level).
std::vector<int> marker_depths(const Timeline& t) {
  std::vector<int> depth(t.markers.size(), 0);
  std::unordered_map<uint64_t, std::vector<size_t>> by_thread;
  for (size_t i = 0; i < t.markers.size(); ++i) by_thread[t.markers[i].thread].push_back(i);
  for (auto& [th, v] : by_thread) {
    std::sort(v.begin(), v.end(), [&](size_t a, size_t b) {
      const Marker& x = t.markers[a];
      const Marker& y = t.markers[b];
      return x.start < y.start || (x.start == y.start && x.end > y.end) ||
             (x.start == y.start && x.end == y.end && a < b);
    });
    std::vector<int64_t> open_ends;
    for (size_t i : v) {
      const Marker& m = t.markers[i];
      while (!open_ends.empty() && open_ends.back() <= m.start) open_ends.pop_back();
      // A range that starts inside another but outlives it (start/end ranges may) is not nested.
      while (!open_ends.empty() && open_ends.back() < m.end) open_ends.pop_back();
      depth[i] = static_cast<int>(open_ends.size());
      open_ends.push_back(m.end);
    }
  }
  return depth;
}

// Per GPU op, the innermost marker (index) on the launching thread around the launch call, or
// -1. Markers named `skip` (the step range) are passed over so inner ranges win; when no other
// range holds the launch, the step range itself is returned.
std::vector<int> innermost_marker(const Timeline& t, const std::string& skip) {
  std::vector<int> out(t.ops.size(), -1);
  std::unordered_map<uint32_t, const ApiCall*> api_by_corr;
  for (const ApiCall& a : t.api) {
    if (a.correlation != 0) api_by_corr[a.correlation] = &a;
  }
  std::unordered_map<uint64_t, std::vector<size_t>> by_thread;
  for (size_t i = 0; i < t.markers.size(); ++i) by_thread[t.markers[i].thread].push_back(i);
  // Per thread, markers by start and the latest end among the first k: the backward search for
  // an enclosing range stops where no earlier range reaches the launch (keeps it O(depth)).
  std::unordered_map<uint64_t, std::vector<int64_t>> reach;
  for (auto& [th, v] : by_thread) {
    std::sort(v.begin(), v.end(),
              [&](size_t a, size_t b) { return t.markers[a].start < t.markers[b].start; });
    std::vector<int64_t>& r = reach[th];
    int64_t m = std::numeric_limits<int64_t>::min();
    for (size_t k : v) r.push_back(m = std::max(m, t.markers[k].end));
  }
  for (size_t i = 0; i < t.ops.size(); ++i) {
    const GpuOp& op = t.ops[i];
    if (op.correlation == 0) continue;
    auto a = api_by_corr.find(op.correlation);
    if (a == api_by_corr.end()) continue;
    auto th = by_thread.find(a->second->thread);
    if (th == by_thread.end()) continue;
    const int64_t at = a->second->start;
    const auto& v = th->second;
    const auto& r = reach[th->first];
    auto ub = std::upper_bound(v.begin(), v.end(), at,
                               [&](int64_t x, size_t k) { return x < t.markers[k].start; });
    int fallback = -1;
    for (auto k = ub; k != v.begin();) {
      --k;
      if (r[static_cast<size_t>(k - v.begin())] < at) break;  // nothing earlier reaches `at`
      const Marker& m = t.markers[*k];
      if (m.end < at) continue;
      if (!skip.empty() && t.str(m.name) == skip) {
        if (fallback < 0) fallback = static_cast<int>(*k);
        continue;
      }
      out[i] = static_cast<int>(*k);
      break;
    }
    if (out[i] < 0) out[i] = fallback;
  }
  return out;
}

bool phase_of_range_name(const std::string& name, Phase* p) {
  if (phase_from_name(name, p) && !trace::is_step_phase(*p)) return true;
  return phase_from_kernel_name(name, p);
}

}  // namespace

StepChoice choose_steps(const Timeline& t, const std::string& requested) {
  StepChoice c;
  const std::vector<int> depth = marker_depths(t);
  auto steps_named = [&](const std::string& name) {
    std::vector<Interval> v;
    for (const Marker& m : t.markers) {
      if (t.str(m.name) == name) v.push_back({m.start, m.end});
    }
    std::sort(v.begin(), v.end(), [](const Interval& a, const Interval& b) {
      return a.start < b.start || (a.start == b.start && a.end > b.end);
    });
    std::vector<Interval> kept;  // drop ranges nested in a range of the same name
    for (const Interval& i : v) {
      if (kept.empty() || i.end > kept.back().end) kept.push_back(i);  // not contained
    }
    return kept;
  };
  if (!requested.empty()) {
    c.name = requested;
    c.steps = steps_named(requested);
    if (c.steps.empty()) {
      std::map<std::string, int64_t> counts;
      for (const Marker& m : t.markers) counts[t.str(m.name)] += 1;
      std::vector<std::pair<int64_t, std::string>> top;
      for (const auto& [n, k] : counts) top.push_back({k, n});
      std::sort(top.rbegin(), top.rend());
      std::string names;
      for (size_t i = 0; i < top.size() && i < 8; ++i) {
        names += (i ? ", " : "") + fmt::format("\"{}\" ({}x)", top[i].second, top[i].first);
      }
      throw Error("--step-range " + requested, "the program emitted no NVTX range of that name",
                  names.empty() ? "the program emitted no NVTX ranges at all: add "
                                  "torch.cuda.nvtx.range_push/range_pop (or nvtxRangePush) around "
                                  "each step, or drop --step-range"
                                : "its ranges: " + names);
    }
    c.why = fmt::format("NVTX range \"{}\" (--step-range): {} steps", requested, c.steps.size());
    return c;
  }
  // The shallowest depth at which some name repeats; there the most repeated name (ties: the
  // larger total time).
  for (int d = 0; d <= 4; ++d) {
    std::map<std::string, std::pair<int64_t, int64_t>> stat;  // name -> count, total ns
    for (size_t i = 0; i < t.markers.size(); ++i) {
      if (depth[i] != d) continue;
      auto& s = stat[t.str(t.markers[i].name)];
      s.first += 1;
      s.second += t.markers[i].end - t.markers[i].start;
    }
    std::string best;
    std::pair<int64_t, int64_t> bs{0, 0};
    for (const auto& [n, s] : stat) {
      if (s.first >= 2 && (s.first > bs.first || (s.first == bs.first && s.second > bs.second))) {
        best = n;
        bs = s;
      }
    }
    if (!best.empty()) {
      c.name = best;
      c.auto_detected = true;
      c.steps = steps_named(best);
      c.why = fmt::format(
          "NVTX range \"{}\" (auto: the most repeated range at nesting depth {}; --step-range "
          "NAME chooses another): {} steps",
          best, d, c.steps.size());
      return c;
    }
  }
  c.why = t.markers.empty()
              ? "no NVTX ranges: the whole traced run is one window (emit a range per step, or "
                "pass --step-range, for per-step numbers)"
              : "no NVTX range repeats: the whole traced run is one window (--step-range NAME "
                "picks a range)";
  return c;
}

std::vector<RangeStat> nvtx_range_stats(const Timeline& t, const Window& w) {
  std::map<std::pair<std::string, std::string>, RangeStat> by;
  std::map<std::pair<std::string, std::string>, std::vector<Interval>> kern;
  auto key = [&](const Marker& m) { return std::make_pair(t.str(m.name), t.str(m.domain)); };
  for (const Marker& m : t.markers) {
    if (m.start < w.start || m.start >= w.end) continue;
    RangeStat& s = by[key(m)];
    s.count += 1;
    s.host_us += static_cast<double>(m.end - m.start) / 1000.0;
  }
  const std::vector<int> inner = innermost_marker(t, "");
  for (size_t i = 0; i < t.ops.size(); ++i) {
    const GpuOp& o = t.ops[i];
    if (inner[i] < 0 || o.kind != GpuOpKind::Kernel || o.start < w.start || o.start >= w.end) {
      continue;
    }
    const auto k = key(t.markers[static_cast<size_t>(inner[i])]);
    by[k].kernels += 1;
    kern[k].push_back({std::max(o.start, w.start), std::min(o.end, w.end)});
  }
  std::vector<RangeStat> out;
  for (auto& [k, s] : by) {
    s.name = k.first;
    s.domain = k.second;
    s.gpu_busy_us = static_cast<double>(total_length(merge_intervals(kern[k]))) / 1000.0;
    out.push_back(s);
  }
  std::sort(out.begin(), out.end(), [](const RangeStat& a, const RangeStat& b) {
    return a.gpu_busy_us > b.gpu_busy_us ||
           (a.gpu_busy_us == b.gpu_busy_us && a.host_us > b.host_us);
  });
  return out;
}

int pick_main_capture(const std::vector<ExecCapture>& caps, int64_t launched_pid) {
  int best = -1;
  size_t best_ops = 0;
  for (size_t i = 0; i < caps.size(); ++i) {
    const size_t n = caps[i].timeline.ops.size();
    if (n == 0) continue;
    if (caps[i].pid == launched_pid) return static_cast<int>(i);
    if (n > best_ops) {
      best = static_cast<int>(i);
      best_ops = n;
    }
  }
  return best;
}

namespace {

std::string utc_now() {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const std::string& x : v) s += (s.empty() ? "" : " ") + x;
  return s;
}

}  // namespace

ProfileDoc analyze_exec_capture(ExecCapture cap, const std::string& step_range,
                                const ExecRunInfo& run) {
  ProfileDoc doc;
  Timeline& t = cap.timeline;
  // The injection lists every GPU of the machine; a program that used one of eight would read
  // as seven GPUs idle 100 % of the time. Keep the GPUs it ran work on (all when it ran none).
  {
    std::set<int32_t> used;
    for (const GpuOp& o : t.ops) used.insert(o.device);
    if (!used.empty()) {
      t.gpus.erase(std::remove_if(t.gpus.begin(), t.gpus.end(),
                                  [&](const GpuDevice& g) { return used.count(g.index) == 0; }),
                   t.gpus.end());
    }
  }
  const StepChoice steps = choose_steps(t, step_range);

  // The window: the steps (extended to the end of the GPU work they launched), or the whole run.
  Window w;
  std::unordered_map<uint32_t, const ApiCall*> api_by_corr;
  for (const ApiCall& a : t.api) {
    if (a.correlation != 0) api_by_corr[a.correlation] = &a;
  }
  if (!steps.steps.empty()) {
    w.kind = "steps";
    w.tokens = static_cast<int64_t>(steps.steps.size());
    w.start = steps.steps.front().start;
    w.end = steps.steps.back().end;
    const int64_t last_end = w.end;
    for (const GpuOp& o : t.ops) {
      auto a = api_by_corr.find(o.correlation);
      if (a != api_by_corr.end() && a->second->start >= w.start && a->second->start <= last_end) {
        w.end = std::max(w.end, o.end);
      }
    }
  } else {
    w.kind = "run";
    w.tokens = 0;
    int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
    for (const GpuOp& o : t.ops) {
      lo = std::min(lo, o.start);
      hi = std::max(hi, o.end);
    }
    for (const ApiCall& a : t.api) {
      lo = std::min(lo, a.start);
      hi = std::max(hi, a.end);
    }
    if (lo > hi) lo = hi = 0;
    w.start = lo;
    w.end = hi;
  }
  t.windows.clear();
  t.windows.push_back(w);

  // Tags: the profiler's rules, then the program's NVTX range around each launch when its name
  // says a phase ("attention", "router", "moe"/"expert", "sampling", or a ktune phase name).
  std::vector<OpTag> tags = attribute_ops(t);
  const std::vector<int> inner = innermost_marker(t, steps.name);
  for (size_t i = 0; i < t.ops.size(); ++i) {
    if (inner[i] < 0) continue;
    const Marker& m = t.markers[static_cast<size_t>(inner[i])];
    Phase p;
    if (t.str(m.name) != steps.name && phase_of_range_name(t.str(m.name), &p)) {
      tags[i] = {m.has_payload ? static_cast<int32_t>(m.payload) : -1, p, TagSource::HostSpan};
    }
  }
  WindowMetrics wm = analyze_window(t, tags, w, AnalysisInputs{});
  // Whole-run numbers when there are no steps: "per token" means per run.
  doc.windows.push_back(wm);

  // Step durations.
  std::vector<double> step_ms;
  for (const Interval& s : steps.steps)
    step_ms.push_back(static_cast<double>(s.end - s.start) / 1e6);
  const std::vector<RangeStat> ranges = nvtx_range_stats(t, w);

  // run / summary
  doc.summary.kind = "exec";
  doc.summary.ktune_version = build_version();
  doc.summary.commit = build_commit();
  doc.summary.created = utc_now();
  for (const GpuDevice& g : t.gpus) {
    profile::GpuInfo gi;
    gi.device = fmt::format("cuda:{}", g.index);
    gi.name = g.name;
    doc.summary.gpus.push_back(gi);
  }
  RunInfo& r = doc.run;
  r.command = run.command.empty() ? cap.command : join(run.command);
  r.engine = "exec";
  r.engine_description =
      fmt::format("program pid {}, {}", cap.pid,
                  run.exit_description.empty() ? "exit status unknown" : run.exit_description);
  int64_t graph_launches = 0;
  for (const GpuMetrics& g : wm.gpus) graph_launches += g.graph_launches;
  r.cuda_graph = graph_launches > 0;
  r.moe_kernel = "";
  r.gen = w.tokens;
  r.trace_level = t.cupti ? cap.trace_level : "none";
  r.trace_mode = t.cupti ? "cupti level " + cap.trace_level +
                               " (injection: libktune_inject.so) + the program's NVTX ranges"
                         : "none (" + t.source_note + ")";
  // What the level leaves out (no overhead is measured here: one run of the program).
  trace_level::Level level = trace_level::Level::Full;
  std::vector<std::string> not_recorded;
  if (t.cupti && trace_level::parse_level(cap.trace_level, &level)) {
    not_recorded = trace_level::select_kinds(level, trace_level::Tracer::Injection).not_recorded;
  }
  doc.overhead.trace_level = r.trace_level;
  doc.overhead.not_recorded = not_recorded;
  doc.overhead.mode = r.trace_mode;

  // Notes: what is missing and why.
  auto& n = doc.notes;
  n.push_back("steps: " + steps.why);
  if (run.partial) n.push_back("partial profile: " + run.partial_reason);
  if (run.stopped_by_duration) {
    n.push_back(
        fmt::format("tracing stopped after --duration {:g} s; ktune then stopped the "
                    "program",
                    run.duration_s));
  }
  if (!cap.notes.empty()) n.push_back("injection: " + cap.notes);
  if (!not_recorded.empty()) {
    std::string what;
    for (const std::string& x : not_recorded) what += (what.empty() ? "" : "; ") + x;
    n.push_back("trace level " + r.trace_level +
                ": every metric of this report is measured; not recorded: " + what +
                " (--trace-level full records them)");
  }
  if (cap.open_ranges > 0) {
    n.push_back(
        fmt::format("{} NVTX ranges were still open when the trace was written (left "
                    "out)",
                    cap.open_ranges));
  }
  if (t.dropped_records > 0) {
    n.push_back(
        fmt::format("CUPTI dropped {} records (buffers full): counts are low", t.dropped_records));
  }
  n.push_back(
      "unavailable: expert effective bandwidth (needs the model's expert bytes, which "
      "only ktune's engine knows)");
  n.push_back(
      "unavailable: router statistics (the program's routing decisions are not visible "
      "to CUPTI)");
  n.push_back(
      "unavailable: CPU phases, CPU/GPU overlap and the cpu_experts_wait budget item "
      "(they need the engine's host spans; the program's NVTX ranges are listed per name "
      "instead)");
  n.push_back(
      "unavailable: tracing overhead (no untraced run in the same process; time the "
      "program without ktune to compare)");
  if (!steps.steps.empty() && steps.steps.size() < 5) {
    n.push_back(fmt::format("only {} steps: medians over so few are noisy", steps.steps.size()));
  }
  bool any_phase = false;
  for (const OpTag& tg : tags) any_phase = any_phase || tg.source == TagSource::HostSpan;
  if (!any_phase) {
    n.push_back(
        "phases: no NVTX range around the launches names a phase (attention, router, "
        "moe/expert, sampling): per-phase GPU time comes from kernel names only");
  }
  for (const ExecCapture& o : run.others) {
    n.push_back(fmt::format(
        "other process pid {} ({}): {} GPU ops, {} NVTX ranges, not analyzed "
        "(its capture: {})",
        o.pid, o.command.substr(0, 60), o.timeline.ops.size(), o.timeline.markers.size(), o.path));
  }

  // The exec section of profile.json.
  json e;
  e["pid"] = cap.pid;
  e["command"] = r.command;
  e["exit_code"] = run.exit_code;
  e["exit"] = run.exit_description;
  e["partial"] = run.partial;
  e["partial_reason"] = run.partial_reason;
  e["flush_reason"] = cap.flush_reason;
  e["duration_s"] = run.duration_s;
  e["trace_level"] = r.trace_level;
  e["not_recorded"] = not_recorded;
  e["step_range"] = steps.name;
  e["step_range_auto"] = steps.auto_detected;
  e["steps"] = static_cast<int64_t>(steps.steps.size());
  e["steps_per_s"] = wm.tok_s;
  e["step_ms"] = {
      {"median", percentile(step_ms, 50)},
      {"p90", percentile(step_ms, 90)},
      {"min", step_ms.empty() ? 0.0 : *std::min_element(step_ms.begin(), step_ms.end())},
      {"max", step_ms.empty() ? 0.0 : *std::max_element(step_ms.begin(), step_ms.end())}};
  json rj = json::array();
  for (size_t i = 0; i < ranges.size() && i < 40; ++i) {
    const RangeStat& s = ranges[i];
    rj.push_back({{"name", s.name},
                  {"domain", s.domain},
                  {"count", s.count},
                  {"host_us", s.host_us},
                  {"kernels", s.kernels},
                  {"gpu_busy_us", s.gpu_busy_us}});
  }
  e["nvtx_ranges"] = rj;
  json procs = json::array();
  procs.push_back({{"pid", cap.pid},
                   {"ppid", cap.ppid},
                   {"command", cap.command},
                   {"analyzed", true},
                   {"gpu_ops", t.ops.size()},
                   {"nvtx_ranges", t.markers.size()},
                   {"capture", cap.path}});
  for (const ExecCapture& o : run.others) {
    procs.push_back({{"pid", o.pid},
                     {"ppid", o.ppid},
                     {"command", o.command},
                     {"analyzed", false},
                     {"gpu_ops", o.timeline.ops.size()},
                     {"nvtx_ranges", o.timeline.markers.size()},
                     {"capture", o.path}});
  }
  e["processes"] = procs;
  e["children"] =
      "followed: every process that inherits the environment and initializes CUDA "
      "writes its own capture; the launched process (or, if it ran no GPU work, the "
      "one with the most GPU ops) is analyzed, the others are listed";
  e["unavailable"] = {"expert_bandwidth", "router", "cpu_phases", "cpu_gpu_overlap", "overhead"};
  doc.exec = e;

  doc.timeline = std::move(cap.timeline);
  doc.verdict = make_verdict(doc);
  return doc;
}

// ---- running the program ----

std::string find_inject_library() {
  if (const char* e = std::getenv("KTUNE_INJECT_LIBRARY"); e != nullptr && *e != 0) {
    if (access(e, R_OK) != 0) {
      throw Error(std::string("KTUNE_INJECT_LIBRARY=") + e, "cannot be read",
                  "point it at libktune_inject.so, or unset it");
    }
    return e;
  }
  char self[4096];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
  std::string dir = ".";
  if (n > 0) {
    self[n] = 0;
    dir = self;
    dir = dir.substr(0, dir.rfind('/'));
  }
  for (const std::string& p : {dir + "/libktune_inject.so", dir + "/../lib/libktune_inject.so"}) {
    if (access(p.c_str(), R_OK) == 0) return p;
  }
  throw Error("profile --exec", "libktune_inject.so was not found beside " + dir + "/ktune",
              "this ktune was built without CUPTI (it is built only when CMake finds CUDA and "
              "CUPTI), or set KTUNE_INJECT_LIBRARY to its path");
}

namespace {

std::string describe_status(int status, int* code, bool* signalled) {
  *signalled = false;
  if (WIFEXITED(status)) {
    *code = WEXITSTATUS(status);
    return fmt::format("exit code {}", *code);
  }
  if (WIFSIGNALED(status)) {
    *signalled = true;
    *code = 128 + WTERMSIG(status);
    return fmt::format("killed by {}", signal_name(WTERMSIG(status)));
  }
  *code = 1;
  return "ended (unknown status)";
}

std::vector<std::string> list_captures(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return out;
  while (dirent* e = readdir(d)) {
    if (exec_capture::is_capture_file_name(e->d_name)) out.push_back(dir + "/" + e->d_name);
  }
  closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

void remove_dir(const std::string& dir) {
  DIR* d = opendir(dir.c_str());
  if (d != nullptr) {
    while (dirent* e = readdir(d)) {
      const std::string n = e->d_name;
      if (n != "." && n != "..") unlink((dir + "/" + n).c_str());
    }
    closedir(d);
  }
  rmdir(dir.c_str());
}

double now_s() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

}  // namespace

ProfileDoc run_exec_profile(const ExecOptions& opt, bool* never_cuda) {
  *never_cuda = false;
  if (opt.command.empty()) {
    throw_usage("--exec", "needs the program to run after --",
                "ktune profile --exec -o p.json "
                "-- python3 script.py");
  }
  if (opt.duration_s < 0) throw_usage("--duration", "must be >= 0", "pass e.g. --duration 30s");
  const std::string lib = opt.inject_library.empty() ? find_inject_library() : opt.inject_library;
  const CuptiAvailability av = cupti_availability();
  if (!av.usable) {
    throw Error("profile --exec", av.reason,
                "run it on a machine with an NVIDIA GPU and driver (CUPTI traces GPUs only)");
  }

  char tmpl[] = "/tmp/ktune-exec-XXXXXX";
  if (mkdtemp(tmpl) == nullptr) {
    throw Error("/tmp", std::string("cannot create a folder: ") + std::strerror(errno),
                "check /tmp's space and permissions");
  }
  const std::string dir = tmpl;

  // Everything the child needs is built before fork: between fork and exec only
  // async-signal-safe calls (the CUDA runtime has started threads in this process).
  std::vector<std::string> env_store;
  const std::pair<const char*, std::string> ours[] = {
      {"CUDA_INJECTION64_PATH", lib},
      {"NVTX_INJECTION64_PATH", lib},
      {"KTUNE_EXEC_OUT_DIR", dir},
      {"KTUNE_EXEC_DURATION_MS", std::to_string(static_cast<int64_t>(opt.duration_s * 1000.0))},
      {trace_level::kExecEnvVar, trace_level::level_name(opt.level)}};
  for (char** e = environ; *e != nullptr; ++e) {
    bool replaced = false;
    for (const auto& [k, v] : ours) {
      const size_t n = std::strlen(k);
      replaced = replaced || (std::strncmp(*e, k, n) == 0 && (*e)[n] == '=');
    }
    if (!replaced) env_store.emplace_back(*e);
  }
  for (const auto& [k, v] : ours) env_store.push_back(std::string(k) + "=" + v);
  std::vector<char*> envp;
  for (std::string& e : env_store) envp.push_back(e.data());
  envp.push_back(nullptr);
  std::vector<char*> argv;
  for (const std::string& a : opt.command) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);

  int errpipe[2];
  if (pipe2(errpipe, O_CLOEXEC) != 0) throw Error("pipe", std::strerror(errno), "retry");
  const pid_t pid = fork();
  if (pid < 0) throw Error("fork", std::strerror(errno), "free some memory or processes");
  if (pid == 0) {
    close(errpipe[0]);
    // Handlers are reset by exec; the program starts with default SIGINT/SIGTERM actions.
    execvpe(argv[0], argv.data(), envp.data());
    const int e = errno;
    (void)!write(errpipe[1], &e, sizeof e);
    _exit(127);
  }
  close(errpipe[1]);
  int exec_errno = 0;
  const ssize_t got = read(errpipe[0], &exec_errno, sizeof exec_errno);
  close(errpipe[0]);
  if (got == static_cast<ssize_t>(sizeof exec_errno)) {
    waitpid(pid, nullptr, 0);
    remove_dir(dir);
    throw Error(opt.command[0], std::string("cannot run: ") + std::strerror(exec_errno),
                "check the program's name and PATH");
  }

  // Wait. Ctrl-C reaches the program from the terminal by itself (same process group); a SIGTERM
  // sent to ktune is passed on. At --duration the injection writes its capture; then ktune stops
  // the program (SIGTERM, SIGKILL 10 s later).
  int status = 0;
  bool stopped_by_duration = false, forwarded = false;
  double term_sent_at = 0;
  for (;;) {
    const pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid) break;
    if (r < 0 && errno != EINTR) {
      status = 0;
      break;
    }
    const int sig = interrupt_signal();
    if (sig == SIGTERM && !forwarded) {
      kill(pid, SIGTERM);
      forwarded = true;
    }
    if (opt.duration_s > 0 && !stopped_by_duration) {
      // The writer puts "process" (with flush_reason) first: its head is enough to tell.
      for (const std::string& f : list_captures(dir)) {
        std::ifstream in(f, std::ios::binary);
        std::string head(4096, '\0');
        in.read(head.data(), static_cast<std::streamsize>(head.size()));
        head.resize(static_cast<size_t>(in.gcount()));
        if (head.find("\"flush_reason\": \"duration\"") != std::string::npos) {
          stopped_by_duration = true;
        }
      }
      if (stopped_by_duration) {
        kill(pid, SIGTERM);
        term_sent_at = now_s();
      }
    }
    if (term_sent_at > 0 && now_s() - term_sent_at > 10) {
      kill(pid, SIGKILL);
      term_sent_at = 0;
    }
    timespec ts{0, 50 * 1000 * 1000};
    nanosleep(&ts, nullptr);
  }
  ExecRunInfo run;
  run.command = opt.command;
  run.duration_s = opt.duration_s;
  run.stopped_by_duration = stopped_by_duration;
  bool signalled = false;
  run.exit_description = describe_status(status, &run.exit_code, &signalled);
  if (!stopped_by_duration && (run.exit_code != 0 || signalled)) {
    run.partial = true;
    run.partial_reason = "the program ended with " + run.exit_description;
  }

  std::vector<ExecCapture> caps;
  std::vector<std::string> bad;
  for (const std::string& f : list_captures(dir)) {
    try {
      caps.push_back(read_exec_capture(f));
    } catch (const Error& e) {
      bad.push_back(e.what());
    }
  }
  bool any_cuda = false;
  for (const ExecCapture& c : caps) any_cuda = any_cuda || c.cuda_initialized;
  const int main_idx = pick_main_capture(caps, pid);
  if (main_idx < 0) {
    std::string why;
    for (const ExecCapture& c : caps) {
      if (c.cuda_initialized && !c.cupti_ok) why = c.cupti_error;
    }
    remove_dir(dir);
    if (!any_cuda) {
      *never_cuda = true;
      std::cout << "ktune: " << opt.command[0] << " never initialized CUDA ("
                << run.exit_description
                << "): there is no GPU activity to profile; nothing was written\n";
      ProfileDoc empty;
      return empty;
    }
    throw Error("profile --exec",
                "the program initialized CUDA but no GPU work was traced" +
                    (why.empty() ? std::string(" (it launched no kernel or copy)")
                                 : " (CUPTI: " + why + ")") +
                    ", " + run.exit_description,
                why.empty()
                    ? "check that the program runs its GPU work"
                    : "check the driver and that no other profiler (nsys, ncu) is attached");
  }
  for (size_t i = 0; i < caps.size(); ++i) {
    if (static_cast<int>(i) != main_idx) run.others.push_back(caps[i]);
  }
  for (ExecCapture& o : run.others) o.path = "(removed)";
  ProfileDoc doc =
      analyze_exec_capture(std::move(caps[static_cast<size_t>(main_idx)]), opt.step_range, run);
  for (const std::string& b : bad) doc.notes.push_back("unreadable capture: " + b);
  remove_dir(dir);

  doc.run.command = opt.command_line;
  doc.topology = read_topology(0, {});
  doc.topology.warnings = topology_warnings(doc.topology);
  doc.verdict = make_verdict(doc);
  doc.timeline_file = timeline_path_for(opt.out);
  const std::string side = doc.timeline_file;
  write_timeline_json(side, doc.timeline);
  {
    const size_t slash = side.rfind('/');
    doc.timeline_file = slash == std::string::npos ? side : side.substr(slash + 1);
  }
  write_profile_json(opt.out, doc);
  if (!opt.trace.empty()) write_chrome_trace(opt.trace, doc.timeline, opt.out);
  if (!opt.report.empty()) write_file_atomic(opt.report, html_report(doc));
  if (!opt.quiet) std::cout << terminal_report(doc);
  std::cout << "wrote " << opt.out << " (timeline: " << side << ")"
            << (opt.trace.empty() ? "" : ", " + opt.trace)
            << (opt.report.empty() ? "" : ", " + opt.report) << "\n";
  return doc;
}

}  // namespace ktune::profiler
