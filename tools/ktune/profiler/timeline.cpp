// Timeline helpers and its compact JSON form (profiler/timeline.h).
#include "profiler/timeline.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>

#include "ktune/engine/error.h"

namespace ktune::profiler {

using nlohmann::json;

const char* gpu_op_kind_name(GpuOpKind k) {
  switch (k) {
    case GpuOpKind::Kernel: return "kernel";
    case GpuOpKind::Memcpy: return "memcpy";
    case GpuOpKind::Memset: return "memset";
  }
  return "kernel";
}

int32_t Timeline::intern(std::string_view s) {
  // Linear probing through a side index would be faster; profiles intern a few hundred names.
  for (size_t i = strings.size(); i-- > 0;) {
    if (strings[i] == s) return static_cast<int32_t>(i);
  }
  strings.emplace_back(s);
  return static_cast<int32_t>(strings.size() - 1);
}

const std::string& Timeline::str(int32_t i) const {
  static const std::string empty;
  return i >= 0 && static_cast<size_t>(i) < strings.size() ? strings[static_cast<size_t>(i)]
                                                            : empty;
}

int64_t Timeline::first_time() const {
  int64_t t = std::numeric_limits<int64_t>::max();
  for (const GpuOp& o : ops) t = std::min(t, o.start);
  for (const ApiCall& a : api) t = std::min(t, a.start);
  for (const SyncEvent& s : syncs) t = std::min(t, s.start);
  for (const Marker& m : markers) t = std::min(t, m.start);
  for (const HostSpan& s : spans) t = std::min(t, s.start);
  for (const Window& w : windows) t = std::min(t, w.start);
  return t == std::numeric_limits<int64_t>::max() ? 0 : t;
}

void add_host_spans(Timeline& t, const trace::Collected& c, int64_t offset_ns) {
  const uint32_t base = static_cast<uint32_t>(t.threads.size());
  for (const trace::ThreadInfo& th : c.threads) {
    t.threads.push_back({th.os_tid, th.pthread_id, th.name});
  }
  t.spans.reserve(t.spans.size() + c.spans.size());
  for (const trace::HostSpan& s : c.spans) {
    HostSpan h;
    h.thread = base + s.thread;
    h.phase = s.phase;
    h.arg = s.arg;
    h.node = s.node;
    h.start = s.begin_ns + offset_ns;
    h.end = s.end_ns + offset_ns;
    t.spans.push_back(h);
  }
  t.dropped_spans += c.dropped;
}

void add_graph_tags(Timeline& t, const std::vector<trace::GraphNodeTag>& tags) {
  for (const trace::GraphNodeTag& g : tags) {
    if (g.node_id == 0) continue;
    t.graph_nodes.push_back({g.node_id, g.layer, g.phase});
  }
}

namespace {

double rel_us(int64_t t, int64_t origin) {
  return std::round(static_cast<double>(t - origin)) / 1000.0;
}
double dur_us(int64_t a, int64_t b) { return std::round(static_cast<double>(b - a)) / 1000.0; }

[[noreturn]] void bad(const std::string& file, const std::string& where, const std::string& what) {
  throw Error(file + ": timeline." + where, what,
              "re-record the profile with `ktune profile` (the timeline is written by it)");
}

int64_t to_ns(const json& v, int64_t origin, const std::string& file, const std::string& where) {
  if (!v.is_number()) bad(file, where, "must be a number");
  const double us = v.get<double>();
  if (!std::isfinite(us) || std::fabs(us) > 1e13) bad(file, where, "is out of range");
  return origin + static_cast<int64_t>(std::llround(us * 1000.0));
}

// Rows of `width` values; newer writers may add columns up to max_width (0: exactly width).
const json& rows_of(const json& j, const char* key, const std::string& file, size_t width,
                    size_t max_width = 0) {
  static const json empty = json::array();
  if (!j.contains(key)) return empty;
  const json& t = j.at(key);
  if (!t.is_object() || !t.contains("rows") || !t.at("rows").is_array()) {
    bad(file, key, "must be an object with a \"rows\" array");
  }
  for (size_t i = 0; i < t.at("rows").size(); ++i) {
    const json& r = t.at("rows")[i];
    if (!r.is_array() || r.size() < width || r.size() > std::max(width, max_width)) {
      bad(file, std::string(key) + ".rows[" + std::to_string(i) + "]",
          "must be an array of " + std::to_string(width) +
              (max_width > width ? " to " + std::to_string(max_width) : std::string()) +
              " values");
    }
    for (const json& v : r) {
      if (!v.is_number()) {
        bad(file, std::string(key) + ".rows[" + std::to_string(i) + "]", "must hold numbers");
      }
    }
  }
  return t.at("rows");
}

template <class T>
T num(const json& v) {
  return static_cast<T>(v.get<double>());
}
uint64_t u64(const json& v) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer()) return static_cast<uint64_t>(std::max<int64_t>(v.get<int64_t>(), 0));
  return static_cast<uint64_t>(std::max(v.get<double>(), 0.0));
}

}  // namespace

json timeline_to_json(const Timeline& t, const TimelineLimits& lim) {
  const int64_t origin = t.origin;
  json j;
  j["clock"] = t.cupti ? "cupti" : "steady";
  j["origin_ns"] = origin;
  j["time_unit"] = "us relative to origin_ns";
  j["cupti"] = t.cupti;
  j["source_note"] = t.source_note;
  j["dropped_records"] = t.dropped_records;
  j["dropped_spans"] = t.dropped_spans;
  j["cupti_overhead_us"] = static_cast<double>(t.cupti_overhead_ns) / 1000.0;
  j["strings"] = t.strings;
  json phases = json::array();
  for (int i = 0; i < trace::kPhaseCount; ++i) phases.push_back(phase_name(static_cast<Phase>(i)));
  j["phases"] = phases;
  j["gpus"] = json::array();
  for (const GpuDevice& g : t.gpus) j["gpus"].push_back({{"index", g.index}, {"name", g.name}});

  auto earliest = [](auto v, size_t cap) {
    if (v.size() > cap) {
      std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(cap), v.end(),
                       [](const auto& a, const auto& b) { return a.start < b.start; });
      v.resize(cap);
    }
    std::sort(v.begin(), v.end(), [](const auto& a, const auto& b) { return a.start < b.start; });
    return v;
  };
  json truncated = json::object();

  const auto ops = earliest(t.ops, lim.max_ops);
  if (ops.size() < t.ops.size()) truncated["ops"] = {{"kept", ops.size()}, {"of", t.ops.size()}};
  json rows = json::array();
  for (const GpuOp& o : ops) {
    rows.push_back({static_cast<int>(o.kind), o.device, o.stream, rel_us(o.start, origin),
                    dur_us(o.start, o.end), o.correlation, o.graph_id, o.graph_node_id, o.name,
                    o.bytes, o.peer_device});
  }
  j["ops"] = {{"columns",
               {"kind", "device", "stream", "start_us", "dur_us", "correlation", "graph_id",
                "graph_node_id", "name", "bytes", "peer_device"}},
              {"rows", std::move(rows)}};

  const auto api = earliest(t.api, lim.max_api);
  if (api.size() < t.api.size()) truncated["api"] = {{"kept", api.size()}, {"of", t.api.size()}};
  rows = json::array();
  for (const ApiCall& a : api) {
    rows.push_back(
        {a.name, a.thread, rel_us(a.start, origin), dur_us(a.start, a.end), a.correlation});
  }
  j["api"] = {{"columns", {"name", "thread", "start_us", "dur_us", "correlation"}},
              {"rows", std::move(rows)}};

  rows = json::array();
  for (const SyncEvent& s : earliest(t.syncs, lim.max_api)) {
    rows.push_back(
        {s.name, s.stream, rel_us(s.start, origin), dur_us(s.start, s.end), s.correlation});
  }
  j["syncs"] = {{"columns", {"name", "stream", "start_us", "dur_us", "correlation"}},
                {"rows", std::move(rows)}};

  rows = json::array();
  for (const Marker& m : earliest(t.markers, lim.max_spans)) {
    rows.push_back({m.name, m.domain, m.thread, rel_us(m.start, origin), dur_us(m.start, m.end),
                    m.payload, m.has_payload ? 1 : 0});
  }
  j["markers"] = {
      {"columns", {"name", "domain", "thread", "start_us", "dur_us", "payload", "has_payload"}},
      {"rows", std::move(rows)}};

  j["threads"] = json::array();
  for (const HostThread& h : t.threads) {
    j["threads"].push_back({{"os_tid", h.os_tid}, {"pthread_id", h.pthread_id}, {"name", h.name}});
  }
  const auto spans = earliest(t.spans, lim.max_spans);
  if (spans.size() < t.spans.size()) {
    truncated["spans"] = {{"kept", spans.size()}, {"of", t.spans.size()}};
  }
  rows = json::array();
  for (const HostSpan& s : spans) {
    rows.push_back({s.thread, static_cast<int>(s.phase), s.arg, rel_us(s.start, origin),
                    dur_us(s.start, s.end), s.node});
  }
  j["spans"] = {{"columns", {"thread", "phase", "arg", "start_us", "dur_us", "node"}},
                {"rows", std::move(rows)}};

  j["windows"] = json::array();
  for (const Window& w : t.windows) {
    j["windows"].push_back({{"kind", w.kind},
                            {"tokens", w.tokens},
                            {"start_us", rel_us(w.start, origin)},
                            {"dur_us", dur_us(w.start, w.end)}});
  }
  rows = json::array();
  for (const GraphNode& g : t.graph_nodes) {
    rows.push_back({g.node_id, g.layer, static_cast<int>(g.phase)});
  }
  j["graph_nodes"] = {{"columns", {"node_id", "layer", "phase"}}, {"rows", std::move(rows)}};
  rows = json::array();
  for (const auto& [clone, orig] : t.node_clone_of) rows.push_back({clone, orig});
  j["node_clone_of"] = {{"columns", {"clone", "original"}}, {"rows", std::move(rows)}};
  j["truncated"] = truncated;
  return j;
}

Timeline timeline_from_json(const json& j, const std::string& file) {
  if (!j.is_object()) bad(file, "", "must be an object");
  Timeline t;
  if (!j.contains("origin_ns") || !j.at("origin_ns").is_number_integer()) {
    bad(file, "origin_ns", "missing or not an integer");
  }
  t.origin = j.at("origin_ns").get<int64_t>();
  const int64_t o = t.origin;
  t.cupti = j.value("cupti", false);
  t.source_note = j.value("source_note", std::string());
  t.dropped_records = j.value("dropped_records", uint64_t{0});
  t.dropped_spans = j.value("dropped_spans", uint64_t{0});
  t.cupti_overhead_ns = static_cast<int64_t>(j.value("cupti_overhead_us", 0.0) * 1000.0);
  if (j.contains("strings")) {
    if (!j.at("strings").is_array()) bad(file, "strings", "must be an array");
    for (const json& s : j.at("strings")) {
      if (!s.is_string()) bad(file, "strings", "must hold strings");
      t.strings.push_back(s.get<std::string>());
    }
  }
  const auto n_strings = static_cast<int64_t>(t.strings.size());
  auto name_idx = [&](const json& v, const char* where) {
    const int64_t i = num<int64_t>(v);
    if (i < -1 || i >= n_strings) bad(file, where, "names string " + std::to_string(i) + " of " +
                                                       std::to_string(n_strings));
    return static_cast<int32_t>(i);
  };
  if (j.contains("gpus") && j.at("gpus").is_array()) {
    for (const json& g : j.at("gpus")) {
      t.gpus.push_back({g.value("index", 0), g.value("name", std::string())});
    }
  }
  for (const json& r : rows_of(j, "ops", file, 10, 11)) {
    GpuOp op;
    const int kind = num<int>(r[0]);
    if (kind < 0 || kind > 2) bad(file, "ops", "unknown op kind " + std::to_string(kind));
    op.kind = static_cast<GpuOpKind>(kind);
    op.device = num<int32_t>(r[1]);
    op.stream = num<uint32_t>(r[2]);
    op.start = to_ns(r[3], o, file, "ops");
    op.end = op.start + to_ns(r[4], 0, file, "ops");
    op.correlation = num<uint32_t>(r[5]);
    op.graph_id = num<uint32_t>(r[6]);
    op.graph_node_id = u64(r[7]);
    op.name = name_idx(r[8], "ops");
    op.bytes = num<int64_t>(r[9]);
    if (r.size() > 10) op.peer_device = num<int32_t>(r[10]);
    t.ops.push_back(op);
  }
  for (const json& r : rows_of(j, "api", file, 5)) {
    ApiCall a;
    a.name = name_idx(r[0], "api");
    a.thread = u64(r[1]);
    a.start = to_ns(r[2], o, file, "api");
    a.end = a.start + to_ns(r[3], 0, file, "api");
    a.correlation = num<uint32_t>(r[4]);
    t.api.push_back(a);
  }
  for (const json& r : rows_of(j, "syncs", file, 5)) {
    SyncEvent s;
    s.name = name_idx(r[0], "syncs");
    s.stream = num<uint32_t>(r[1]);
    s.start = to_ns(r[2], o, file, "syncs");
    s.end = s.start + to_ns(r[3], 0, file, "syncs");
    s.correlation = num<uint32_t>(r[4]);
    t.syncs.push_back(s);
  }
  for (const json& r : rows_of(j, "markers", file, 7)) {
    Marker m;
    m.name = name_idx(r[0], "markers");
    m.domain = name_idx(r[1], "markers");
    m.thread = u64(r[2]);
    m.start = to_ns(r[3], o, file, "markers");
    m.end = m.start + to_ns(r[4], 0, file, "markers");
    m.payload = num<int64_t>(r[5]);
    m.has_payload = num<int>(r[6]) != 0;
    t.markers.push_back(m);
  }
  if (j.contains("threads") && j.at("threads").is_array()) {
    for (const json& h : j.at("threads")) {
      t.threads.push_back({h.value("os_tid", int64_t{0}), h.value("pthread_id", uint64_t{0}),
                           h.value("name", std::string())});
    }
  }
  for (const json& r : rows_of(j, "spans", file, 5, 6)) {
    HostSpan s;
    s.thread = num<uint32_t>(r[0]);
    if (s.thread >= t.threads.size()) bad(file, "spans", "names an unknown thread");
    const int ph = num<int>(r[1]);
    if (ph < 0 || ph >= trace::kPhaseCount) bad(file, "spans", "unknown phase");
    s.phase = static_cast<Phase>(ph);
    s.arg = num<int32_t>(r[2]);
    s.start = to_ns(r[3], o, file, "spans");
    s.end = s.start + to_ns(r[4], 0, file, "spans");
    if (r.size() > 5) s.node = num<int32_t>(r[5]);
    t.spans.push_back(s);
  }
  if (j.contains("windows") && j.at("windows").is_array()) {
    for (const json& w : j.at("windows")) {
      Window win;
      win.kind = w.value("kind", std::string());
      if (win.kind != "decode" && win.kind != "prefill" && win.kind != "steps" &&
          win.kind != "run") {
        bad(file, "windows", "kind must be decode, prefill, steps or run");
      }
      win.tokens = w.value("tokens", int64_t{0});
      win.start = to_ns(w.value("start_us", json(0.0)), o, file, "windows");
      win.end = win.start + to_ns(w.value("dur_us", json(0.0)), 0, file, "windows");
      t.windows.push_back(win);
    }
  }
  for (const json& r : rows_of(j, "graph_nodes", file, 3)) {
    const int ph = num<int>(r[2]);
    if (ph < 0 || ph >= trace::kPhaseCount) bad(file, "graph_nodes", "unknown phase");
    t.graph_nodes.push_back({u64(r[0]), num<int32_t>(r[1]), static_cast<Phase>(ph)});
  }
  for (const json& r : rows_of(j, "node_clone_of", file, 2)) t.node_clone_of[u64(r[0])] = u64(r[1]);
  return t;
}

}  // namespace ktune::profiler
