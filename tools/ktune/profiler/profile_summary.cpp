// profile.json's summary (profiler/profile_summary.h): writer and validating reader.
#include "profiler/profile_summary.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "ktune/engine/error.h"

namespace ktune::profile {
namespace {

using nlohmann::json;

// A cursor into the JSON document that knows its path, so every error names the field.
class Field {
 public:
  Field(const json& j, std::string path, const std::string& file)
      : j_(j), path_(std::move(path)), file_(file) {}

  [[noreturn]] void fail(const std::string& problem) const {
    throw Error(file_ + ": " + path_, problem,
                "re-record the profile with `ktune profile`, or fix the field by hand");
  }
  const json& raw() const { return j_; }
  const std::string& path() const { return path_; }

  Field at(const char* key) const {
    if (!j_.is_object()) fail("must be an object");
    auto it = j_.find(key);
    if (it == j_.end()) Field(j_, path_ + "." + key, file_).fail("missing");
    return Field(*it, path_ + "." + key, file_);
  }
  bool has(const char* key) const { return j_.is_object() && j_.contains(key); }
  Field at(size_t i) const { return Field(j_[i], path_ + "[" + std::to_string(i) + "]", file_); }
  size_t array_size() const {
    if (!j_.is_array()) fail("must be an array");
    return j_.size();
  }
  std::string str() const {
    if (!j_.is_string()) fail("must be a string");
    return j_.get<std::string>();
  }
  double num(double lo, double hi) const {
    if (!j_.is_number()) fail("must be a number");
    const double v = j_.get<double>();
    if (!std::isfinite(v) || v < lo || v > hi) {
      std::ostringstream os;
      os << v << " is out of range [" << lo << ", " << hi << "]";
      fail(os.str());
    }
    return v;
  }
  int64_t integer(int64_t lo, int64_t hi) const {
    if (!j_.is_number_integer()) fail("must be an integer");
    // Unsigned values above INT64_MAX are out of every range used here.
    if (j_.is_number_unsigned() && j_.get<uint64_t>() > static_cast<uint64_t>(hi)) {
      fail(std::to_string(j_.get<uint64_t>()) + " is out of range");
    }
    const int64_t v = j_.get<int64_t>();
    if (v < lo || v > hi) {
      fail(std::to_string(v) + " is out of range [" + std::to_string(lo) + ", " +
           std::to_string(hi) + "]");
    }
    return v;
  }

 private:
  const json& j_;
  std::string path_;
  const std::string& file_;
};

constexpr double kHuge = 1e12;
constexpr int64_t kMaxBytes = int64_t{1} << 52;

std::vector<ThreadRate> curve(const Field& f, bool required) {
  std::vector<ThreadRate> out;
  const size_t n = f.array_size();
  if (required && n == 0) f.fail("must have at least one point");
  for (size_t i = 0; i < n; ++i) {
    Field p = f.at(i);
    ThreadRate r;
    r.threads = static_cast<int>(p.at("threads").integer(1, 4096));
    r.value = p.at("value").num(0, kHuge);
    if (r.value <= 0) p.at("value").fail("must be > 0");
    if (!out.empty() && r.threads <= out.back().threads) {
      p.at("threads").fail("thread counts must increase along the curve");
    }
    out.push_back(r);
  }
  return out;
}

json curve_json(const std::vector<ThreadRate>& c) {
  json a = json::array();
  for (const ThreadRate& r : c) a.push_back({{"threads", r.threads}, {"value", r.value}});
  return a;
}

// A kernel-time curve: points of strictly increasing bytes, each time > 0 (may be empty).
std::vector<BytesTime> bytes_curve(const Field& f) {
  std::vector<BytesTime> out;
  for (size_t i = 0; i < f.array_size(); ++i) {
    Field p = f.at(i);
    BytesTime b;
    b.bytes = p.at("bytes").num(1, 1e15);
    b.us = p.at("us").num(0, 1e7);
    if (b.us <= 0) p.at("us").fail("must be > 0");
    if (!out.empty() && b.bytes <= out.back().bytes) {
      p.at("bytes").fail("bytes must increase along the curve");
    }
    out.push_back(b);
  }
  return out;
}

json bytes_curve_json(const std::vector<BytesTime>& c) {
  json a = json::array();
  for (const BytesTime& b : c) a.push_back({{"bytes", b.bytes}, {"us", b.us}});
  return a;
}

}  // namespace

void to_json(json& j, const ProfileSummary& s) {
  j = json::object();
  j["kind"] = s.kind;
  j["ktune_version"] = s.ktune_version;
  j["commit"] = s.commit;
  j["created"] = s.created;
  j["cpu"] = {{"name", s.cpu.name},
              {"physical_cores", s.cpu.physical_cores},
              {"logical_cpus", s.cpu.logical_cpus},
              {"numa_nodes", s.cpu.numa_nodes},
              {"isa", s.cpu.isa},
              {"mem_bytes", s.cpu.mem_bytes},
              {"mem_available_bytes", s.cpu.mem_available_bytes},
              {"read_gb_s", curve_json(s.cpu.read_gb_s)}};
  j["cpu_costs"] = {{"moe_decode_gb_s", curve_json(s.cpu_costs.moe_decode_gb_s)},
                    {"prefill_gflop_s", curve_json(s.cpu_costs.prefill_gflop_s)},
                    {"handoff_host_thread_us", s.cpu_costs.handoff_host_thread_us}};
  if (s.cpu_costs.moe_call_us > 0) j["cpu_costs"]["moe_call_us"] = s.cpu_costs.moe_call_us;
  if (s.cpu_costs.pcie_assist_gb_s > 0 && s.cpu_costs.moe_pcie_ratio > 0) {
    j["cpu_costs"]["pcie_assist_gb_s"] = s.cpu_costs.pcie_assist_gb_s;
    j["cpu_costs"]["moe_pcie_ratio"] = s.cpu_costs.moe_pcie_ratio;
  }
  j["cpu_costs"]["moe_decode_gb_s_per_node"] = json::array();
  for (const CpuCosts::NodeCurve& n : s.cpu_costs.moe_decode_gb_s_per_node) {
    j["cpu_costs"]["moe_decode_gb_s_per_node"].push_back(
        {{"node", n.node}, {"gb_s", curve_json(n.gb_s)}});
  }
  j["gpus"] = json::array();
  for (const GpuInfo& g : s.gpus) {
    j["gpus"].push_back({{"device", g.device},
                         {"name", g.name},
                         {"sm", g.sm},
                         {"mem_bytes", g.mem_bytes},
                         {"mem_free_bytes", g.mem_free_bytes},
                         {"read_gb_s", g.read_gb_s},
                         {"h2d_gb_s", g.h2d_gb_s},
                         {"d2h_gb_s", g.d2h_gb_s},
                         {"pcie_gen", g.pcie_gen},
                         {"pcie_width", g.pcie_width}});
  }
  j["gpu_costs"] = json::array();
  for (const GpuCosts& c : s.gpu_costs) {
    json k = json::object();
    for (const auto& [name, curve] :
         {std::pair{"matvec", &c.matvec_us}, std::pair{"router", &c.router_us},
          std::pair{"moe_fused", &c.moe_fused_us}, std::pair{"moe_unfused", &c.moe_unfused_us}}) {
      if (!curve->empty()) k[name] = bytes_curve_json(*curve);
    }
    j["gpu_costs"].push_back({{"device", c.device},
                              {"launch_eager_us", c.launch_eager_us},
                              {"graph_node_us", c.graph_node_us},
                              {"host_node_us", c.host_node_us},
                              {"flag_handoff_us", c.flag_handoff_us},
                              {"sync_us", c.sync_us},
                              {"matvec_gb_s", c.matvec_gb_s},
                              {"moe_fused_gb_s", c.moe_fused_gb_s},
                              {"moe_unfused_gb_s", c.moe_unfused_gb_s},
                              {"attention_us", c.attention_us},
                              {"attention_us_per_1k_ctx", c.attention_us_per_1k_ctx},
                              {"prefill_gflop_s", c.prefill_gflop_s}});
    // Optional fields: written only when measured, so older readers see what they know.
    json& last = j["gpu_costs"].back();
    if (!k.empty()) last["kernel_us_by_bytes"] = k;
    if (c.eager_gap_us > 0) last["eager_gap_us"] = c.eager_gap_us;
    if (c.handoff_us > 0) last["handoff_us"] = c.handoff_us;
  }
  j["interconnect"] = json::array();
  for (const GpuLink& l : s.interconnect) {
    j["interconnect"].push_back({{"src", l.src},
                                 {"dst", l.dst},
                                 {"peer_access", l.peer_access},
                                 {"peer_gb_s", l.peer_gb_s},
                                 {"peer_latency_us", l.peer_latency_us},
                                 {"nccl_gb_s", l.nccl_gb_s},
                                 {"nccl_latency_us", l.nccl_latency_us}});
  }
  j["model"] = {{"name", s.model.name},
                {"quant", s.model.quant},
                {"n_layers", s.model.n_layers},
                {"n_experts", s.model.n_experts},
                {"n_experts_used", s.model.n_experts_used},
                {"expert_bytes", s.model.expert_bytes}};
  j["router"] = {{"tokens", s.router.tokens}, {"counts", s.router.counts}};
}

ProfileSummary summary_from_json(const json& summary, const std::string& file, int version) {
  const Field root(summary, "summary", file);
  ProfileSummary s;
  s.kind = root.at("kind").str();
  if (s.kind == "exec") {
    root.at("kind").fail("is \"exec\": a profile of another program (ktune profile --exec) has no "
                         "machine costs; use a model or --hardware profile here");
  }
  if (s.kind != "model" && s.kind != "hardware") {
    root.at("kind").fail("\"" + s.kind + "\" is neither \"model\" nor \"hardware\"");
  }
  s.ktune_version = root.at("ktune_version").str();
  s.commit = root.at("commit").str();
  s.created = root.at("created").str();

  const Field cpu = root.at("cpu");
  s.cpu.name = cpu.at("name").str();
  s.cpu.physical_cores = static_cast<int>(cpu.at("physical_cores").integer(1, 65536));
  s.cpu.logical_cpus = static_cast<int>(cpu.at("logical_cpus").integer(1, 65536));
  if (s.cpu.logical_cpus < s.cpu.physical_cores) {
    cpu.at("logical_cpus").fail("is below physical_cores");
  }
  s.cpu.numa_nodes = static_cast<int>(cpu.at("numa_nodes").integer(1, 1024));
  s.cpu.isa = cpu.at("isa").str();
  if (s.cpu.isa != "scalar" && s.cpu.isa != "avx2" && s.cpu.isa != "avx512" &&
      s.cpu.isa != "avx512vnni") {
    cpu.at("isa").fail("\"" + s.cpu.isa + "\" is not scalar|avx2|avx512|avx512vnni");
  }
  s.cpu.mem_bytes = cpu.at("mem_bytes").integer(1, kMaxBytes);
  s.cpu.mem_available_bytes = cpu.at("mem_available_bytes").integer(0, s.cpu.mem_bytes);
  s.cpu.read_gb_s = curve(cpu.at("read_gb_s"), true);

  const Field cc = root.at("cpu_costs");
  s.cpu_costs.moe_decode_gb_s = curve(cc.at("moe_decode_gb_s"), true);
  s.cpu_costs.prefill_gflop_s = curve(cc.at("prefill_gflop_s"), false);
  s.cpu_costs.handoff_host_thread_us = cc.at("handoff_host_thread_us").num(0, 1e6);
  if (cc.has("moe_call_us")) s.cpu_costs.moe_call_us = cc.at("moe_call_us").num(0, 1e6);
  if (cc.has("pcie_assist_gb_s") || cc.has("moe_pcie_ratio")) {  // both or neither
    s.cpu_costs.pcie_assist_gb_s = cc.at("pcie_assist_gb_s").num(1e-3, kHuge);
    s.cpu_costs.moe_pcie_ratio = cc.at("moe_pcie_ratio").num(0.01, 2.0);
  }
  if (version >= 2 || cc.has("moe_decode_gb_s_per_node")) {
    const Field pn = cc.at("moe_decode_gb_s_per_node");
    for (size_t i = 0; i < pn.array_size(); ++i) {
      const Field n = pn.at(i);
      CpuCosts::NodeCurve nc;
      nc.node = static_cast<int>(n.at("node").integer(0, 1023));
      if (nc.node >= s.cpu.numa_nodes) {
        n.at("node").fail("names a node the cpu (" + std::to_string(s.cpu.numa_nodes) +
                          " numa_nodes) does not have");
      }
      for (const auto& prev : s.cpu_costs.moe_decode_gb_s_per_node) {
        if (prev.node == nc.node) n.at("node").fail("repeats node " + std::to_string(nc.node));
      }
      nc.gb_s = curve(n.at("gb_s"), true);
      s.cpu_costs.moe_decode_gb_s_per_node.push_back(std::move(nc));
    }
  }

  const Field gpus = root.at("gpus");
  for (size_t i = 0; i < gpus.array_size(); ++i) {
    const Field g = gpus.at(i);
    GpuInfo gi;
    gi.device = g.at("device").str();
    if (gi.device != "cuda:" + std::to_string(i)) {
      g.at("device").fail("\"" + gi.device + "\" out of order; expected cuda:" + std::to_string(i));
    }
    gi.name = g.at("name").str();
    gi.sm = g.at("sm").str();
    gi.mem_bytes = g.at("mem_bytes").integer(1, kMaxBytes);
    gi.mem_free_bytes = g.at("mem_free_bytes").integer(0, gi.mem_bytes);
    gi.read_gb_s = g.at("read_gb_s").num(1e-3, kHuge);
    gi.h2d_gb_s = g.at("h2d_gb_s").num(1e-3, kHuge);
    gi.d2h_gb_s = g.at("d2h_gb_s").num(1e-3, kHuge);
    gi.pcie_gen = static_cast<int>(g.at("pcie_gen").integer(0, 64));
    gi.pcie_width = static_cast<int>(g.at("pcie_width").integer(0, 64));
    s.gpus.push_back(gi);
  }
  const Field gcs = root.at("gpu_costs");
  if (gcs.array_size() != s.gpus.size()) {
    gcs.fail("has " + std::to_string(gcs.array_size()) + " entries for " +
             std::to_string(s.gpus.size()) + " gpus");
  }
  for (size_t i = 0; i < gcs.array_size(); ++i) {
    const Field c = gcs.at(i);
    GpuCosts gc;
    gc.device = c.at("device").str();
    if (gc.device != s.gpus[i].device) {
      c.at("device").fail("\"" + gc.device + "\" does not match gpus[" + std::to_string(i) + "] (" +
                          s.gpus[i].device + ")");
    }
    gc.launch_eager_us = c.at("launch_eager_us").num(1e-3, 1e6);
    gc.graph_node_us = c.at("graph_node_us").num(1e-3, 1e6);
    gc.host_node_us = c.at("host_node_us").num(0, 1e6);
    gc.flag_handoff_us = c.at("flag_handoff_us").num(0, 1e6);
    gc.sync_us = c.at("sync_us").num(0, 1e6);
    gc.matvec_gb_s = c.at("matvec_gb_s").num(1e-3, kHuge);
    gc.moe_fused_gb_s = c.at("moe_fused_gb_s").num(1e-3, kHuge);
    gc.moe_unfused_gb_s = c.at("moe_unfused_gb_s").num(1e-3, kHuge);
    gc.attention_us = c.at("attention_us").num(0, 1e6);
    gc.attention_us_per_1k_ctx = c.at("attention_us_per_1k_ctx").num(0, 1e6);
    gc.prefill_gflop_s = c.at("prefill_gflop_s").num(0, kHuge);
    // Optional in every version (older files do not have them).
    if (c.has("kernel_us_by_bytes")) {
      const Field k = c.at("kernel_us_by_bytes");
      if (!k.raw().is_object()) k.fail("must be an object");
      for (const auto& [name, curve] :
           {std::pair{"matvec", &gc.matvec_us}, std::pair{"router", &gc.router_us},
            std::pair{"moe_fused", &gc.moe_fused_us},
            std::pair{"moe_unfused", &gc.moe_unfused_us}}) {
        if (k.has(name)) *curve = bytes_curve(k.at(name));
      }
    }
    if (c.has("eager_gap_us")) gc.eager_gap_us = c.at("eager_gap_us").num(0, 1e6);
    if (c.has("handoff_us")) gc.handoff_us = c.at("handoff_us").num(0, 1e6);
    s.gpu_costs.push_back(gc);
  }

  if (version >= 2 || root.has("interconnect")) {
    const Field ic = root.at("interconnect");
    auto is_gpu = [&](const std::string& d) {
      for (const GpuInfo& g : s.gpus) {
        if (g.device == d) return true;
      }
      return false;
    };
    for (size_t i = 0; i < ic.array_size(); ++i) {
      const Field l = ic.at(i);
      GpuLink gl;
      gl.src = l.at("src").str();
      gl.dst = l.at("dst").str();
      if (!is_gpu(gl.src)) l.at("src").fail("\"" + gl.src + "\" is not one of summary.gpus");
      if (!is_gpu(gl.dst)) l.at("dst").fail("\"" + gl.dst + "\" is not one of summary.gpus");
      if (gl.src == gl.dst) l.at("dst").fail("equals src");
      for (const GpuLink& prev : s.interconnect) {
        if (prev.src == gl.src && prev.dst == gl.dst) {
          l.fail("repeats the link " + gl.src + " -> " + gl.dst);
        }
      }
      if (!l.at("peer_access").raw().is_boolean())
        l.at("peer_access").fail("must be true or false");
      gl.peer_access = l.at("peer_access").raw().get<bool>();
      gl.peer_gb_s = l.at("peer_gb_s").num(0, kHuge);
      gl.peer_latency_us = l.at("peer_latency_us").num(0, 1e6);
      gl.nccl_gb_s = l.at("nccl_gb_s").num(0, kHuge);
      gl.nccl_latency_us = l.at("nccl_latency_us").num(0, 1e6);
      s.interconnect.push_back(gl);
    }
  }

  const Field m = root.at("model");
  s.model.name = m.at("name").str();
  s.model.quant = m.at("quant").str();
  const bool has_model = !s.model.name.empty();
  const int64_t lo = has_model ? 1 : 0;
  s.model.n_layers = m.at("n_layers").integer(lo, 100000);
  s.model.n_experts = m.at("n_experts").integer(lo, 100000);
  s.model.n_experts_used = m.at("n_experts_used").integer(lo, s.model.n_experts);
  s.model.expert_bytes = m.at("expert_bytes").integer(lo, kMaxBytes);
  if (s.kind == "model" && !has_model) m.at("name").fail("is empty in a profile of kind model");

  const Field r = root.at("router");
  s.router.tokens = r.at("tokens").integer(0, int64_t{1} << 50);
  const Field counts = r.at("counts");
  const size_t nl = counts.array_size();
  if (s.router.tokens > 0 && (!has_model || nl != static_cast<size_t>(s.model.n_layers))) {
    counts.fail("has " + std::to_string(nl) + " layers; the model has " +
                std::to_string(s.model.n_layers));
  }
  if (s.router.tokens == 0 && nl != 0) counts.fail("must be empty when tokens is 0");
  for (size_t l = 0; l < nl; ++l) {
    const Field row = counts.at(l);
    if (row.array_size() != static_cast<size_t>(s.model.n_experts)) {
      row.fail("has " + std::to_string(row.array_size()) + " experts; the model has " +
               std::to_string(s.model.n_experts));
    }
    std::vector<int64_t> c(row.array_size());
    int64_t sum = 0;
    for (size_t e = 0; e < c.size(); ++e) {
      c[e] = row.at(e).integer(0, s.router.tokens);
      sum += c[e];
    }
    if (sum != s.router.tokens * s.model.n_experts_used) {
      row.fail("counts sum to " + std::to_string(sum) + ", expected tokens x n_experts_used = " +
               std::to_string(s.router.tokens * s.model.n_experts_used));
    }
    s.router.counts.push_back(std::move(c));
  }
  return s;
}

void check_json_depth(const std::string& text, const std::string& file, int max_depth) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') {
        ++i;  // skip the escaped character
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth) {
        throw Error(file, "JSON nested deeper than " + std::to_string(max_depth) + " levels",
                    "pass a profile.json written by `ktune profile`");
      }
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
}

json parse_profile_document(const std::string& text, const std::string& path) {
  // JSON text has no NUL byte: a binary file (a model, say) is named as such, not as deep JSON.
  if (text.find('\0') != std::string::npos) {
    std::string head = text.substr(0, 4);
    for (char& c : head) c = std::isprint(static_cast<unsigned char>(c)) ? c : '?';
    throw Error(path, "a binary file (it starts with '" + head + "'), not a ktune profile",
                "pass a profile.json written by `ktune profile`");
  }
  check_json_depth(text, path, kMaxJsonDepth);
  json doc;
  try {
    doc = json::parse(text, nullptr, true, false);
  } catch (const json::exception& e) {
    throw Error(path, std::string("not valid JSON (") + e.what() + ")",
                "re-record the profile with `ktune profile`");
  }
  if (!doc.is_object() || !doc.contains("ktune_profile")) {
    throw Error(path, "not a ktune profile (no \"ktune_profile\" key)",
                "pass a profile.json written by `ktune profile`");
  }
  const json& v = doc["ktune_profile"];
  if (!v.is_number_integer() || v.get<int64_t>() < 1) {
    throw Error(path + ": ktune_profile", "must be a positive integer schema version",
                "re-record the profile with `ktune profile`");
  }
  if (v.get<int64_t>() > kProfileSchemaVersion) {
    throw Error(path + ": ktune_profile",
                "schema version " + std::to_string(v.get<int64_t>()) +
                    " is newer than this ktune reads (" + std::to_string(kProfileSchemaVersion) +
                    ")",
                "update ktune, or re-record the profile with this version");
  }
  return doc;
}

json read_profile_document(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw Error(path, "cannot open",
                "check the path, or record one with `ktune profile -o " + path + "`");
  }
  std::ostringstream text;
  text << in.rdbuf();
  if (!in.good() && !in.eof()) {
    throw Error(path, "cannot read", "check the file's permissions");
  }
  return parse_profile_document(text.str(), path);
}

ProfileSummary summary_of(const json& doc, const std::string& path) {
  if (!doc.contains("summary")) {
    throw Error(path + ": summary", "missing", "re-record the profile with `ktune profile`");
  }
  return summary_from_json(doc["summary"], path, doc["ktune_profile"].get<int>());
}

ProfileSummary parse_profile_summary(const std::string& text, const std::string& path) {
  return summary_of(parse_profile_document(text, path), path);
}

ProfileSummary read_profile_summary(const std::string& path) {
  return summary_of(read_profile_document(path), path);
}

const GpuLink* find_link(const ProfileSummary& s, const std::string& src, const std::string& dst) {
  for (const GpuLink& l : s.interconnect) {
    if (l.src == src && l.dst == dst) return &l;
  }
  return nullptr;
}

double rate_at(const std::vector<ThreadRate>& c, int threads) {
  if (c.empty()) return 0;
  if (threads <= c.front().threads) return c.front().value;
  if (threads >= c.back().threads) return c.back().value;
  for (size_t i = 1; i < c.size(); ++i) {
    if (threads <= c[i].threads) {
      const double t = static_cast<double>(threads - c[i - 1].threads) /
                       static_cast<double>(c[i].threads - c[i - 1].threads);
      return c[i - 1].value + t * (c[i].value - c[i - 1].value);
    }
  }
  return c.back().value;
}

}  // namespace ktune::profile
