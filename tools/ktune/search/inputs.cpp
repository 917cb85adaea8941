// The search's inputs (search/inputs.h): workload and assumption parsing, the machine's costs
// from a profile, the model's shape, the router model, and SHA-256 for router digests.
#include "search/inputs.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <numeric>

#include "ktune/engine/error.h"
#include "ktune/engine/synthetic.h"

namespace ktune::search {
namespace {

std::string trim(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t") - b + 1);
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (true) {
    const size_t at = s.find(sep, pos);
    out.push_back(trim(s.substr(pos, at == std::string::npos ? std::string::npos : at - pos)));
    if (at == std::string::npos) break;
    pos = at + 1;
  }
  return out;
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// A whole number in [lo, hi], or a usage error naming the flag and the key.
int64_t parse_count(const std::string& v, const std::string& flag, const std::string& key,
                    int64_t lo, int64_t hi, const std::string& fix) {
  if (v.empty() || v.size() > 12 || !std::all_of(v.begin(), v.end(), [](char c) {
        return std::isdigit(static_cast<unsigned char>(c)) != 0;
      })) {
    throw_usage(flag, fmt::format("{}=`{}` is not a whole number", key, v), fix);
  }
  const int64_t n = std::stoll(v);
  if (n < lo || n > hi) {
    throw_usage(flag, fmt::format("{}={} is out of range ({}..{})", key, n, lo, hi), fix);
  }
  return n;
}

double parse_positive(const std::string& v, const std::string& where, const std::string& fix) {
  char* end = nullptr;
  const double x = v.empty() ? NAN : std::strtod(v.c_str(), &end);
  if (v.empty() || end != v.c_str() + v.size() || !std::isfinite(x) || x <= 0 || x > 1e15) {
    throw_usage(where, "`" + v + "` is not a positive number", fix);
  }
  return x;
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace

// ---------------------------------------------------------------------------------- workload --

double Workload::total_weight() const {
  double w = 0;
  for (const Request& r : requests) w += r.weight;
  return w;
}

std::string Workload::describe() const {
  std::string s = name + ": ";
  const double tw = total_weight();
  for (size_t i = 0; i < requests.size(); ++i) {
    const Request& r = requests[i];
    s += fmt::format("{}prompt {} + gen {}", i ? ", " : "", r.prompt, r.gen);
    if (requests.size() > 1) s += fmt::format(" ({:.0f}%)", 100.0 * r.weight / tw);
  }
  s += fmt::format("; context {}", context);
  if (batch > 1) s += fmt::format("; batch {}", batch);
  return s;
}

Workload chat_workload() {
  Workload w;
  w.name = "chat";
  // A chat-like mix (an assumption, documented in docs/search.md): mostly short turns, some
  // pasted documents, a few long contexts; the KV cache sized for the longest.
  w.requests = {{512, 256, 0.5}, {2048, 512, 0.3}, {6144, 1024, 0.2}};
  w.context = 8192;
  return w;
}

Workload parse_workload(const std::string& text, const std::string& flag) {
  const std::string fix =
      "write chat, or prompt=N,gen=N[,context=N][,weight=W][,batch=B], requests joined by ';' "
      "(e.g. prompt=2048,gen=256,context=8192; chat,batch=8)";
  const std::string t = trim(text);
  if (lower(t) == "chat") return chat_workload();
  if (t.empty()) throw_usage(flag, "is empty", fix);
  constexpr int64_t kMaxBatch = 4096;  // runtime.batch's range in placements
  if (lower(t).rfind("chat,", 0) == 0) {
    Workload w = chat_workload();
    for (const std::string& item : split(t.substr(5), ',')) {
      const size_t eq = item.find('=');
      const std::string key = eq == std::string::npos ? "" : lower(trim(item.substr(0, eq)));
      if (key != "batch") throw_usage(flag, "`" + item + "`: chat takes only batch=B", fix);
      w.batch = parse_count(trim(item.substr(eq + 1)), flag, key, 1, kMaxBatch, fix);
    }
    return w;
  }
  Workload w;
  w.name = "custom";
  int64_t context = 0;
  constexpr int64_t kMaxTokens = 16777216;  // runtime.context's range in placements
  for (const std::string& part : split(t, ';')) {
    if (part.empty()) throw_usage(flag, "`" + text + "` has an empty request", fix);
    Request r;
    bool has_prompt = false, has_gen = false, has_weight = false;
    for (const std::string& item : split(part, ',')) {
      const size_t eq = item.find('=');
      if (eq == std::string::npos) {
        throw_usage(flag, "`" + item + "` is not key=value", fix);
      }
      const std::string key = lower(trim(item.substr(0, eq)));
      const std::string val = trim(item.substr(eq + 1));
      auto once = [&](bool& seen) {
        if (seen) throw_usage(flag, key + " is given twice in one request", fix);
        seen = true;
      };
      if (key == "prompt") {
        once(has_prompt);
        r.prompt = parse_count(val, flag, key, 1, kMaxTokens, fix);
      } else if (key == "gen") {
        once(has_gen);
        r.gen = parse_count(val, flag, key, 0, kMaxTokens, fix);
      } else if (key == "context") {
        context = std::max(context, parse_count(val, flag, key, 1, kMaxTokens, fix));
      } else if (key == "weight") {
        once(has_weight);
        r.weight = parse_positive(val, flag + " weight", fix);
      } else if (key == "batch") {
        w.batch = std::max(w.batch, parse_count(val, flag, key, 1, kMaxBatch, fix));
      } else {
        throw_usage(flag, "unknown key `" + key + "`",
                    "keys: prompt, gen, context, weight, batch");
      }
    }
    if (!has_prompt || !has_gen) {
      throw_usage(flag, "`" + part + "` needs both prompt= and gen=", fix);
    }
    w.requests.push_back(r);
  }
  int64_t longest = 0;
  for (const Request& r : w.requests) longest = std::max(longest, r.prompt + r.gen);
  if (context == 0) {
    context = std::min(kMaxTokens, round_up(longest, 256));
  } else if (context < longest) {
    throw_usage(
        flag,
        fmt::format("context={} is shorter than a request's prompt + gen ({})", context, longest),
        fmt::format("give context={} or more, or shorter requests", longest));
  }
  w.context = context;
  return w;
}

void check_workload_for_model(const Workload& w, const ModelConfig& cfg, const std::string& flag) {
  if (cfg.context_length > 0 && w.context > cfg.context_length) {
    throw_usage(flag,
                fmt::format("context {} exceeds the model's trained context of {}", w.context,
                            cfg.context_length),
                fmt::format("give context={} or less", cfg.context_length));
  }
}

// ------------------------------------------------------------------------------- assumptions --

const std::vector<AssumptionKey>& assumption_keys() {
  static const std::vector<AssumptionKey> keys = {
      {"launch_eager_us", "host cost of one kernel launch without a graph"},
      {"graph_node_us", "cost of one small kernel node in a replayed graph"},
      {"host_node_us", "CPU hand-off through a graph host node, per hybrid layer (default 27)"},
      {"flag_handoff_us", "CPU hand-off through mapped flags, per hybrid layer (default 3.4)"},
      {"sync_us", "stream synchronisation round trip (default 10)"},
      {"handoff_host_thread_us",
       "unused (accepted for old scripts): the engine's prefill no longer hands experts to the "
       "host thread"},
      {"cpu_call_us",
       "fixed cost of one CpuMoe call per hybrid layer with CPU experts selected (default 8)"},
      {"pcie_assist_gb_s",
       "GPU read rate of host memory while CpuMoe runs, for the PCIe assist (0: leave it off)"},
      {"moe_pcie_ratio", "CpuMoe's rate beside the PCIe assist's reads, relative to alone"},
      {"kernel_fixed_us", "latency each kernel adds to its time (default 0)"},
      {"eager_gap_us",
       "GPU-side gap of a queued eager kernel (default: the profile's, else launch_eager_us is "
       "charged per kernel)"},
      {"handoff_us",
       "one layer's flag hand-off with the engine's kernels, graph replay (default: the "
       "profile's, else composed from flag_handoff_us)"},
      {"matvec_gb_s", "GPU attention/router/head matvec bandwidth (replaces the kernel curve)"},
      {"moe_fused_gb_s", "GPU fused MoE kernel bandwidth (replaces the kernel curve)"},
      {"moe_unfused_gb_s", "GPU per-expert MoE kernel bandwidth (replaces the kernel curve)"},
      {"h2d_gb_s", "host-to-device copy bandwidth"},
      {"gpu_prefill_gflop_s",
       "GPU batched prefill rate, effective (default 75400: qwen3-30b-a3b pp512 on an H100)"},
      {"mla_attention_gflop_s",
       "deepseek2 MLA decode attention over the latent cache (default 5000, an estimate)"},
      {"cpu_prefill_gflop_s_per_thread", "CPU batched matmul rate per thread (default 40)"},
      {"cpu_moe_gb_s", "CPU expert bandwidth at every thread count (flattens the curve)"},
      {"peer_gb_s", "inter-GPU bandwidth of every GPU pair (default: the profile's, else 20)"},
      {"peer_latency_us", "inter-GPU latency per transfer (default: the profile's, else 15)"},
  };
  return keys;
}

Assumptions parse_assumptions(const std::string& text, const std::string& flag) {
  Assumptions a;
  if (trim(text).empty()) return a;
  std::string names;
  for (const AssumptionKey& k : assumption_keys())
    names += (names.empty() ? "" : ", ") + std::string(k.key);
  for (const std::string& item : split(text, ',')) {
    const size_t eq = item.find('=');
    if (eq == std::string::npos) {
      throw_usage(flag, "`" + item + "` is not key=value", "e.g. " + flag + " launch_eager_us=10");
    }
    const std::string key = trim(item.substr(0, eq));
    bool known = false;
    for (const AssumptionKey& k : assumption_keys()) known = known || key == k.key;
    if (!known) throw_usage(flag, "unknown key `" + key + "`", "keys: " + names);
    a.values[key] = parse_positive(trim(item.substr(eq + 1)), flag + " " + key,
                                   "give a positive number in the key's unit");
  }
  return a;
}

// ---------------------------------------------------------------------------------- profile --

std::string find_profile(const std::string& arg) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_regular_file(arg, ec) || arg.find('/') != std::string::npos || arg.empty()) {
    return arg;  // a path: read_profile_summary reports a missing file itself
  }
  std::vector<fs::path> dirs;
  if (const char* env = std::getenv("KTUNE_PROFILES"); env != nullptr && *env != '\0') {
    dirs.emplace_back(env);
  }
  dirs.emplace_back("profiles");
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) dirs.push_back(exe.parent_path().parent_path().parent_path() / "profiles");
  std::string tried, found;
  for (const fs::path& d : dirs) {
    for (const std::string& name : {arg, arg + ".json"}) {
      const fs::path p = d / name;
      if (fs::is_regular_file(p, ec)) return p.lexically_normal().string();
    }
    tried += (tried.empty() ? "" : ", ") + d.lexically_normal().string();
    for (const auto& e : fs::directory_iterator(d, ec)) {
      if (e.path().extension() == ".json") {
        found += (found.empty() ? "" : ", ") + e.path().stem().string();
      }
    }
  }
  throw Error(arg, "no such profile file, nor a profile of that name in " + tried,
              found.empty() ? "record one with `ktune profile -o profile.json`"
                            : "profiles found: " + found);
}

// ---------------------------------------------------------------------------------- machine --

double MachineCosts::cpu_moe_at(int t) const { return profile::rate_at(cpu_moe_gb_s, t); }
double MachineCosts::cpu_read_at(int t) const { return profile::rate_at(cpu_read_gb_s, t); }
double MachineCosts::cpu_prefill_at(int t) const {
  return profile::rate_at(cpu_prefill_gflop_s, t);
}

MachineCosts machine_costs(const profile::ProfileSummary& s, const Assumptions& a) {
  MachineCosts m;
  auto given = [&](const char* key) -> const double* {
    auto it = a.values.find(key);
    return it == a.values.end() ? nullptr : &it->second;
  };
  // A value from --assume wins; else the profile's when measured (> 0); else the default, noted.
  auto pick = [&](const char* key, double profiled, double fallback, const char* what) {
    if (const double* v = given(key)) {
      m.notes.push_back(fmt::format("{} = {} (--assume)", key, *v));
      return *v;
    }
    if (profiled > 0) return profiled;
    m.notes.push_back(
        fmt::format("{} not measured in the profile: assumed {} ({}; --assume {}=...)", key,
                    fallback, what, key));
    return fallback;
  };

  m.cpu_name = s.cpu.name;
  m.physical_cores = s.cpu.physical_cores;
  m.cpu_read_gb_s = s.cpu.read_gb_s;
  m.cpu_moe_gb_s = s.cpu_costs.moe_decode_gb_s;
  if (const double* v = given("cpu_moe_gb_s")) {
    for (auto& r : m.cpu_moe_gb_s) r.value = *v;
    m.cpu_moe_assumed = true;
    m.notes.push_back(fmt::format("cpu_moe_gb_s = {} at every thread count (--assume)", *v));
  }
  m.cpu_prefill_gflop_s = s.cpu_costs.prefill_gflop_s;
  if (const double* v = given("cpu_prefill_gflop_s_per_thread")) {
    m.cpu_prefill_gflop_s = {{1, *v}, {m.physical_cores, *v * m.physical_cores}};
    m.notes.push_back(fmt::format("cpu prefill {} GFLOP/s per thread (--assume)", *v));
  } else if (m.cpu_prefill_gflop_s.empty()) {
    m.cpu_prefill_gflop_s = {{1, 40.0}, {m.physical_cores, 40.0 * m.physical_cores}};
    m.notes.push_back(
        "cpu prefill not measured in the profile: assumed 40 GFLOP/s per thread "
        "(--assume cpu_prefill_gflop_s_per_thread=...)");
  }
  if (m.cpu_prefill_gflop_s.size() == 2 &&
      m.cpu_prefill_gflop_s[0].threads >= m.cpu_prefill_gflop_s[1].threads) {
    m.cpu_prefill_gflop_s.resize(1);  // one core: a single point
  }
  // Kept for old scripts (--assume still takes it) but priced nowhere: the engine's prefill
  // copies CPU experts to the GPU or runs decode steps; no host thread computes them.
  m.handoff_host_thread_us = s.cpu_costs.handoff_host_thread_us;
  if (const double* v = given("handoff_host_thread_us")) m.handoff_host_thread_us = *v;
  // bench_cpu_moe on the H100 machine (b10cc68): waking the spinning pool ~2 µs, quantizing h
  // ~3, the uneven finish and return ~3-4 per call, whatever the bytes.
  m.cpu_call_us = pick("cpu_call_us", s.cpu_costs.moe_call_us, 8.0,
                       "waking the pool, quantizing h, uneven finish");
  m.cpu_mem_available_bytes = s.cpu.mem_available_bytes;
  m.pcie_assist_gb_s = s.cpu_costs.pcie_assist_gb_s;
  m.moe_pcie_ratio = s.cpu_costs.moe_pcie_ratio;
  if (const double* v = given("pcie_assist_gb_s")) m.pcie_assist_gb_s = *v;
  if (const double* v = given("moe_pcie_ratio")) m.moe_pcie_ratio = *v;
  if (m.pcie_assist_gb_s > 0 && m.moe_pcie_ratio <= 0) m.moe_pcie_ratio = 1.0;

  m.n_gpus = static_cast<int>(s.gpus.size());
  if (!s.gpus.empty()) {
    const profile::GpuInfo& g = s.gpus[0];
    const profile::GpuCosts& c = s.gpu_costs[0];
    m.has_gpu = true;
    m.gpu_device = g.device;
    m.gpu_name = g.name;
    m.gpu_mem_bytes = g.mem_bytes;
    m.gpu_read_gb_s = g.read_gb_s;
    m.h2d_gb_s = pick("h2d_gb_s", g.h2d_gb_s, 25.0, "PCIe");
    m.d2h_gb_s = g.d2h_gb_s;
    m.launch_eager_us = pick("launch_eager_us", c.launch_eager_us, 3.3, "design §3");
    m.graph_node_us = pick("graph_node_us", c.graph_node_us, 1.0, "design §3");
    m.host_node_us = pick("host_node_us", c.host_node_us, 27.0, "H100, design §3");
    m.flag_handoff_us = pick("flag_handoff_us", c.flag_handoff_us, 3.4, "H100, design §3");
    m.sync_us = pick("sync_us", c.sync_us, 10.0, "stream sync round trip");
    m.matvec_gb_s = pick("matvec_gb_s", c.matvec_gb_s, 500.0, "");
    m.moe_fused_gb_s = pick("moe_fused_gb_s", c.moe_fused_gb_s, 500.0, "");
    m.moe_unfused_gb_s = pick("moe_unfused_gb_s", c.moe_unfused_gb_s, 200.0, "");
    // Kernel times by bytes: the profile's curves, unless --assume gives that kernel's bandwidth
    // (then bytes / bandwidth, as profiles without curves are priced).
    auto curve = [&](const char* key, const std::vector<profile::BytesTime>& pts, double gb_s) {
      KernelCurve k;
      k.gb_s = gb_s;
      if (given(key) == nullptr) k.points = pts;
      return k;
    };
    m.matvec = curve("matvec_gb_s", c.matvec_us, m.matvec_gb_s);
    m.moe_fused = curve("moe_fused_gb_s", c.moe_fused_us, m.moe_fused_gb_s);
    m.moe_unfused = curve("moe_unfused_gb_s", c.moe_unfused_us, m.moe_unfused_gb_s);
    // Without its own curve the router is priced as a matvec of its bytes.
    m.router = c.router_us.empty() || given("matvec_gb_s") ? m.matvec
                                                           : curve("", c.router_us, m.matvec_gb_s);
    if (c.matvec_us.empty() && c.moe_fused_us.empty()) {
      m.notes.push_back(
          "the profile has no kernel times by size (recorded before they were measured): "
          "kernels priced as bytes / one bandwidth each (re-record with `ktune profile "
          "--hardware`)");
    }
    m.eager_gap_us = c.eager_gap_us;
    m.handoff_us = c.handoff_us;
    if (const double* v = given("eager_gap_us")) {
      m.eager_gap_us = *v;
      m.notes.push_back(fmt::format("eager_gap_us = {} (--assume)", *v));
    }
    if (const double* v = given("handoff_us")) {
      m.handoff_us = *v;
      m.notes.push_back(fmt::format("handoff_us = {} (--assume)", *v));
    }
    m.attention_us = c.attention_us;
    m.attention_us_per_1k_ctx = c.attention_us_per_1k_ctx;
    m.gpu_prefill_gflop_s = pick("gpu_prefill_gflop_s", c.prefill_gflop_s,
                                 kDefaultGpuPrefillGflopS,
                                 "ktune's batched prefill, qwen3-30b-a3b pp512 on an H100");
    // Noted by the cost model, and only for a deepseek2 model (nothing else uses it).
    m.mla_attention_gflop_s = kDefaultMlaAttentionGflopS;
    if (const double* v = given("mla_attention_gflop_s")) {
      m.mla_attention_gflop_s = *v;
      m.mla_attention_assumed = true;
    }
    // The profile's kernel bandwidths already include a kernel's fixed latency at the sizes it
    // measured; this adds more (a what-if, or shapes far from the profiled model's).
    if (const double* v = given("kernel_fixed_us")) {
      m.kernel_fixed_us = *v;
      m.notes.push_back(fmt::format("kernel_fixed_us = {} (--assume)", *v));
    }
  }
  for (const profile::GpuInfo& gi : s.gpus) m.gpus.push_back({gi.device, gi.name, gi.mem_bytes});
  const size_t ng = s.gpus.size();
  m.link_gb_s.assign(ng, std::vector<double>(ng, 0.0));
  m.link_latency_us.assign(ng, std::vector<double>(ng, 0.0));
  if (ng > 1) {
    const double* bw = given("peer_gb_s");
    const double* lat = given("peer_latency_us");
    int defaulted = 0;
    for (size_t i = 0; i < ng; ++i) {
      for (size_t j = 0; j < ng; ++j) {
        if (i == j) continue;
        double b = 0, l = 0;
        if (const profile::GpuLink* k = profile::find_link(s, s.gpus[i].device, s.gpus[j].device)) {
          // The engine moves activations with NCCL send/recv; peer copies where NCCL is absent.
          if (k->nccl_gb_s > 0) {
            b = k->nccl_gb_s;
            l = k->nccl_latency_us;
          } else if (k->peer_gb_s > 0) {
            b = k->peer_gb_s;
            l = k->peer_latency_us;
          }
        }
        if (b <= 0) {
          b = kDefaultPeerGbS;
          l = kDefaultPeerUs;
          ++defaulted;
        }
        m.link_gb_s[i][j] = bw ? *bw : b;
        m.link_latency_us[i][j] = lat ? *lat : l;
      }
    }
    if (bw) m.notes.push_back(fmt::format("peer_gb_s = {} on every GPU pair (--assume)", *bw));
    if (lat) m.notes.push_back(fmt::format("peer_latency_us = {} (--assume)", *lat));
    if (defaulted > 0 && (!bw || !lat)) {
      m.notes.push_back(fmt::format(
          "{} GPU links not measured in the profile: assumed {} GB/s and {} us per transfer "
          "(PCIe through the host; `ktune profile --hardware` measures them; --assume "
          "peer_gb_s=...,peer_latency_us=...)",
          defaulted, kDefaultPeerGbS, kDefaultPeerUs));
    }
  }
  return m;
}

double KernelCurve::us(double bytes) const {
  const auto& p = points;
  if (p.empty()) return gb_s > 0 ? bytes / (gb_s * 1e3) : 0.0;
  if (p.size() == 1) return p[0].us * bytes / p[0].bytes;
  // The segment that holds `bytes`, or the end segment it extends.
  size_t i = 1;
  while (i + 1 < p.size() && bytes > p[i].bytes) ++i;
  const double slope = (p[i].us - p[i - 1].us) / (p[i].bytes - p[i - 1].bytes);
  if (bytes >= p.back().bytes) {
    // Beyond the largest point: its segment's marginal rate, or its average rate when the
    // points are noisy enough to slope down.
    return p.back().us + (bytes - p.back().bytes) * (slope > 0 ? slope : p.back().us / p.back().bytes);
  }
  const double t = p[i - 1].us + (bytes - p[i - 1].bytes) * slope;
  // Below the smallest point: the first segment's line down to its latency, never below the
  // first point's proportional share (a steep first segment would cross zero).
  return bytes < p[0].bytes ? std::max(t, p[0].us * bytes / p[0].bytes) : t;
}

double MachineCosts::transfer_us(int i, int j, double bytes) const {
  if (i == j || i < 0 || j < 0) return 0;
  const double bw = link_gb_s[size_t(i)][size_t(j)];
  return link_latency_us[size_t(i)][size_t(j)] + (bw > 0 ? bytes / (bw * 1e3) : 0);
}

// ------------------------------------------------------------------------------------ model --

namespace {

// deepseek2's per-launch bytes from the shape, every matrix `dt` (or the type a synthetic model
// falls back to for rows that do not fill its blocks), as weight_bytes(cfg, et, dt) counts them.
std::vector<MlaLayerBytes> mla_from_shape(const ModelConfig& c, QuantType dt) {
  auto mat = [&](int64_t row_len, int64_t rows) {
    return double(row_bytes(synthetic_row_type(dt, row_len), row_len) * rows);
  };
  const int64_t H = c.hidden, nh = c.n_heads, rq = c.q_lora_rank, rkv = c.kv_lora_rank;
  const int64_t dn = c.qk_nope_dim(), dv = c.v_head_dim;
  MlaLayerBytes b;
  b.q_in = rq > 0 ? mat(H, rq) : mat(H, nh * c.head_dim);
  b.kv_a = mat(H, rkv + c.rope_dim);
  b.q_b = rq > 0 ? mat(rq, nh * c.head_dim) : 0.0;
  if (c.split_kv_b) {
    b.k_b = mat(dn, rkv * nh);
    b.v_b = mat(rkv, dv * nh);
  } else {
    const double kv_b = mat(rkv, nh * (dn + dv));
    b.k_b = kv_b * double(dn) / double(dn + dv);
    b.v_b = kv_b - b.k_b;
  }
  b.o = mat(nh * dv, H);
  std::vector<MlaLayerBytes> out;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    MlaLayerBytes x = b;
    if (c.is_dense_layer(l)) {
      x.ffn = 2 * mat(H, c.dense_ffn) + mat(c.dense_ffn, H);
    } else {
      x.router = double(row_bytes(QuantType::F32, H) * c.n_experts);
      x.ffn = c.n_shared_experts > 0 ? 2 * mat(H, c.shared_ffn()) + mat(c.shared_ffn(), H) : 0.0;
    }
    out.push_back(x);
  }
  return out;
}

// A tensor the layer does not have is an unnamed view (weight_bytes counts the same way).
double nbytes_or_0(const TensorView& t) { return t.name.empty() ? 0.0 : double(t.nbytes()); }

}  // namespace

std::vector<MlaLayerBytes> mla_layer_bytes(const ModelWeights& w) {
  const ModelConfig& c = w.cfg;
  std::vector<MlaLayerBytes> out;
  if (!c.is_deepseek2()) return out;
  const double dn = double(c.qk_nope_dim()), dv = double(c.v_head_dim);
  for (const LayerWeights& l : w.layers) {
    MlaLayerBytes b;
    const TensorView& first = c.q_lora_rank > 0 ? l.wq_a : l.wq;
    b.q_in = nbytes_or_0(first);
    b.kv_a = nbytes_or_0(l.wkv_a);
    b.kv_a_apart = first.type != l.wkv_a.type;
    b.q_b = c.q_lora_rank > 0 ? nbytes_or_0(l.wq_b) : 0.0;
    if (c.split_kv_b) {
      b.k_b = nbytes_or_0(l.wk_b);
      b.v_b = nbytes_or_0(l.wv_b);
    } else {
      const double kv_b = nbytes_or_0(l.wkv_b);
      b.k_b = kv_b * dn / (dn + dv);
      b.v_b = kv_b - b.k_b;
    }
    b.o = nbytes_or_0(l.wo);
    b.router = nbytes_or_0(l.router);
    b.ffn = nbytes_or_0(l.ffn_gate) + nbytes_or_0(l.ffn_up) + nbytes_or_0(l.ffn_down) +
            nbytes_or_0(l.gate_shexp) + nbytes_or_0(l.up_shexp) + nbytes_or_0(l.down_shexp);
    out.push_back(b);
  }
  return out;
}

ModelInfo model_info(const ModelConfig& cfg, QuantType et, QuantType dt, const std::string& spec) {
  ModelInfo m;
  m.spec = spec;
  m.path = spec;
  m.cfg = cfg;
  m.bytes = weight_bytes(cfg, et, dt);
  m.quant = lower(quant_name(et));
  if (cfg.is_deepseek2()) m.mla = mla_from_shape(cfg, dt);
  return m;
}

ModelInfo load_model_info(const std::string& spec) {
  if (spec.rfind("synth:", 0) == 0) {
    const SynthOptions so = parse_synth_spec(spec);  // usage error on a bad preset or quant
    const ModelConfig* c = find_preset(so.preset);
    if (so.mix != QuantMix::None) {  // types per tensor: the shape's own sizes (no data built)
      ModelInfo m = model_info(*c, so.quant, so.quant, spec);
      const ModelWeights shape = synthetic_model_shape(so);
      m.bytes = weight_bytes(shape);
      m.mla = mla_layer_bytes(shape);
      m.quant = synth_quant_label(so);
      return m;
    }
    return model_info(*c, so.quant, so.quant, spec);
  }
  // A file or folder: opened (mmap), never read beyond its headers.
  const ModelWeights w = load_model(spec);
  ModelInfo m;
  m.spec = spec;
  std::error_code ec;
  const std::filesystem::path abs = std::filesystem::absolute(spec, ec);
  m.path = ec ? spec : abs.lexically_normal().string();
  m.cfg = w.cfg;
  m.bytes = weight_bytes(w);
  m.mla = mla_layer_bytes(w);
  m.quant = lower(quant_name(w.quant));
  return m;
}

// ----------------------------------------------------------------------------------- router --

double RouterModel::hot_share(int64_t l, int64_t m) const {
  const std::vector<double>& pre = prefix[static_cast<size_t>(l)];
  return pre.back() > 0 ? pre[static_cast<size_t>(m)] / pre.back() : 0.0;
}

namespace {

void finish_router(RouterModel& r) {
  r.hot.clear();
  r.prefix.clear();
  for (const std::vector<double>& p : r.p) {
    std::vector<int32_t> ids(p.size());
    std::iota(ids.begin(), ids.end(), 0);
    std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return p[a] > p[b]; });
    std::vector<double> pre(p.size() + 1, 0.0);
    for (size_t i = 0; i < ids.size(); ++i) pre[i + 1] = pre[i] + p[static_cast<size_t>(ids[i])];
    r.hot.push_back(std::move(ids));
    r.prefix.push_back(std::move(pre));
  }
}

}  // namespace

RouterModel uniform_router(const ModelConfig& cfg) {
  RouterModel r;
  r.digest = "uniform";
  const double p = static_cast<double>(cfg.n_experts_used) / static_cast<double>(cfg.n_experts);
  r.p.assign(static_cast<size_t>(cfg.n_layers), std::vector<double>(size_t(cfg.n_experts), p));
  // A dense leading layer (deepseek2) routes nothing: its expert slots carry no mass.
  for (int64_t l = 0; l < cfg.n_layers; ++l) {
    if (cfg.is_dense_layer(l)) std::fill(r.p[size_t(l)].begin(), r.p[size_t(l)].end(), 0.0);
  }
  finish_router(r);
  return r;
}

RouterModel router_from_counts(const std::vector<std::vector<int64_t>>& counts, int64_t tokens,
                               const ModelConfig& cfg) {
  RouterModel r;
  r.measured = true;
  r.tokens = tokens;
  const double k = static_cast<double>(cfg.n_experts_used);
  const double alpha = 0.5;  // add-half smoothing per expert
  std::string raw;
  for (const auto& row : counts) {
    if (cfg.is_dense_layer(static_cast<int64_t>(r.p.size()))) {  // routes nothing
      r.p.emplace_back(row.size(), 0.0);
      for (int64_t c : row) raw.append(reinterpret_cast<const char*>(&c), sizeof c);
      continue;
    }
    double sum = 0;
    for (int64_t c : row) sum += static_cast<double>(c);
    std::vector<double> p(row.size());
    for (size_t e = 0; e < row.size(); ++e) {
      p[e] = std::min(1.0, k * (static_cast<double>(row[e]) + alpha) /
                               (sum + alpha * static_cast<double>(row.size())));
      const int64_t c = row[e];
      raw.append(reinterpret_cast<const char*>(&c), sizeof c);
    }
    r.p.push_back(std::move(p));
  }
  r.digest = "sha256:" + sha256_hex(raw);
  finish_router(r);
  if (tokens < 1000) {
    r.note = fmt::format(
        "router statistics from {} tokens only: small samples overstate skew (profile a longer "
        "run for a reliable hot set)",
        tokens);
  }
  return r;
}

RouterModel router_from_profile(const profile::ProfileSummary& s, const ModelConfig& cfg) {
  if (s.router.tokens <= 0) {
    RouterModel r = uniform_router(cfg);
    r.note = "the profile has no router statistics: uniform routing assumed";
    return r;
  }
  const profile::ModelShape& pm = s.model;
  if (pm.n_layers != cfg.n_layers || pm.n_experts != cfg.n_experts ||
      pm.n_experts_used != cfg.n_experts_used) {
    RouterModel r = uniform_router(cfg);
    r.note = fmt::format(
        "the profile's router statistics are for {} ({} layers x {} experts, top-{}), not this "
        "model ({} x {}, top-{}): uniform routing assumed",
        pm.name, pm.n_layers, pm.n_experts, pm.n_experts_used, cfg.n_layers, cfg.n_experts,
        cfg.n_experts_used);
    return r;
  }
  RouterModel r = router_from_counts(s.router.counts, s.router.tokens, cfg);
  if (lower(pm.name) != lower(cfg.name)) {
    const std::string same =
        fmt::format("router statistics recorded with {} (same shape as {}): used as they are",
                    pm.name, cfg.name);
    r.note = r.note.empty() ? same : same + "; " + r.note;
  }
  return r;
}

// ----------------------------------------------------------------------------------- sha256 --

std::string sha256_hex(const std::string& bytes) {
  // FIPS 180-4: the first 32 bits of the fractional parts of the cube roots of the first 64
  // primes, and of the square roots of the first 8 primes.
  static const uint32_t K[64] = {
      0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
      0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
      0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
      0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
      0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
      0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
      0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
      0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
      0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
      0xc67178f2};
  uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  auto rotr = [](uint32_t x, int n) { return (x >> n) | (x << (32 - n)); };
  std::string msg = bytes;
  const uint64_t bit_len = static_cast<uint64_t>(bytes.size()) * 8;
  msg.push_back(static_cast<char>(0x80));
  while (msg.size() % 64 != 56) msg.push_back('\0');
  for (int i = 7; i >= 0; --i) msg.push_back(static_cast<char>((bit_len >> (8 * i)) & 0xff));
  for (size_t off = 0; off < msg.size(); off += 64) {
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) {
      const auto* b = reinterpret_cast<const unsigned char*>(msg.data() + off + 4 * i);
      w[i] = (uint32_t(b[0]) << 24) | (uint32_t(b[1]) << 16) | (uint32_t(b[2]) << 8) | b[3];
    }
    for (int i = 16; i < 64; ++i) {
      const uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      const uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; ++i) {
      const uint32_t S1 = rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25);
      const uint32_t ch = (e & f) ^ (~e & g);
      const uint32_t t1 = hh + S1 + ch + K[i] + w[i];
      const uint32_t S0 = rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22);
      const uint32_t maj = (a & b) ^ (a & c) ^ (b & c);
      const uint32_t t2 = S0 + maj;
      hh = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b;
      b = a;
      a = t1 + t2;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
    h[5] += f;
    h[6] += g;
    h[7] += hh;
  }
  std::string out;
  for (uint32_t x : h) out += fmt::format("{:08x}", x);
  return out;
}

}  // namespace ktune::search
