// Metrics over a timeline (profiler/analysis.h; definitions in docs/metrics.md).
#include "profiler/analysis.h"

#include <algorithm>
#include <cctype>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <unordered_map>

namespace ktune::profiler {

using nlohmann::json;

const char* tag_source_name(TagSource s) {
  switch (s) {
    case TagSource::None: return "none";
    case TagSource::GraphNode: return "graph_node";
    case TagSource::HostSpan: return "host_span";
    case TagSource::Name: return "kernel_name";
    case TagSource::Copy: return "copy";
  }
  return "none";
}

bool phase_from_kernel_name(const std::string& name, Phase* out) {
  std::string n(name);
  for (char& c : n) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  auto has = [&](const char* s) { return n.find(s) != std::string::npos; };
  if (has("nccl")) {
    *out = Phase::Transfer;
  } else if (has("moe") || has("expert")) {
    *out = Phase::MoeGpu;
  } else if (has("attention") || has("attn")) {
    *out = Phase::Attention;
  } else if (has("router") || has("topk")) {
    *out = Phase::Router;
  } else if (has("argmax") || has("sampl")) {
    *out = Phase::Sampling;
  } else {
    return false;
  }
  return true;
}

bool is_cpu_wait_kernel(const std::string& name) {
  return name.find("handoff_wait") != std::string::npos;
}

bool is_peer_transfer(const Timeline& t, const GpuOp& op) {
  if (op.kind == GpuOpKind::Memcpy) return op.peer_device >= 0 || t.str(op.name) == "Memcpy PtoP";
  if (op.kind != GpuOpKind::Kernel) return false;
  const std::string& n = t.str(op.name);
  for (size_t i = 0; i + 4 <= n.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(n[i])) == 'n' &&
        std::tolower(static_cast<unsigned char>(n[i + 1])) == 'c' &&
        std::tolower(static_cast<unsigned char>(n[i + 2])) == 'c' &&
        std::tolower(static_cast<unsigned char>(n[i + 3])) == 'l') {
      return true;
    }
  }
  return false;
}

namespace {

bool is_layer_phase(Phase p) { return !trace::is_step_phase(p) && p != Phase::Other; }

// Which Timeline::threads entry a CUPTI API thread id names (-1: none).
std::unordered_map<uint64_t, int> host_thread_index(const Timeline& t) {
  std::unordered_map<uint64_t, int> m;
  for (size_t i = 0; i < t.threads.size(); ++i) {
    const HostThread& h = t.threads[i];
    m[static_cast<uint64_t>(h.os_tid)] = static_cast<int>(i);
    m[h.pthread_id] = static_cast<int>(i);
    m[h.pthread_id & 0xffffffffu] = static_cast<int>(i);
  }
  return m;
}

}  // namespace

std::vector<OpTag> attribute_ops(const Timeline& t) {
  std::vector<OpTag> tags(t.ops.size());
  std::unordered_map<uint64_t, const GraphNode*> nodes;
  for (const GraphNode& g : t.graph_nodes) nodes[g.node_id] = &g;
  std::unordered_map<uint32_t, const ApiCall*> api_by_corr;
  for (const ApiCall& a : t.api) {
    if (a.correlation != 0) api_by_corr[a.correlation] = &a;
  }
  // Host spans per thread, sorted by start, for "innermost span containing t".
  std::vector<std::vector<const HostSpan*>> by_thread(t.threads.size());
  for (const HostSpan& s : t.spans) {
    if (s.thread < by_thread.size() && is_layer_phase(s.phase)) by_thread[s.thread].push_back(&s);
  }
  for (auto& v : by_thread) {
    std::sort(v.begin(), v.end(), [](const HostSpan* a, const HostSpan* b) {
      return a->start < b->start;
    });
  }
  const auto thread_of = host_thread_index(t);
  // ktune's NVTX ranges by CUPTI thread (used when the engine's spans were not collected).
  std::unordered_map<uint64_t, std::vector<const Marker*>> markers;
  for (const Marker& m : t.markers) {
    Phase p;
    if (t.str(m.domain) == "ktune" && phase_from_name(t.str(m.name), &p) && is_layer_phase(p)) {
      markers[m.thread].push_back(&m);
    }
  }
  for (auto& [k, v] : markers) {
    std::sort(v.begin(), v.end(), [](const Marker* a, const Marker* b) { return a->start < b->start; });
  }

  for (size_t i = 0; i < t.ops.size(); ++i) {
    const GpuOp& op = t.ops[i];
    OpTag& tag = tags[i];
    if (op.graph_node_id != 0) {
      uint64_t id = op.graph_node_id;
      auto it = nodes.find(id);
      for (int hop = 0; it == nodes.end() && hop < 8; ++hop) {
        auto c = t.node_clone_of.find(id);
        if (c == t.node_clone_of.end()) break;
        id = c->second;
        it = nodes.find(id);
      }
      if (it != nodes.end() && it->second->phase != Phase::Other &&
          !trace::is_step_phase(it->second->phase)) {
        tag = {it->second->layer, it->second->phase, TagSource::GraphNode};
        continue;
      }
    } else if (op.correlation != 0) {
      auto a = api_by_corr.find(op.correlation);
      if (a != api_by_corr.end()) {
        const int64_t at = a->second->start;
        const HostSpan* best = nullptr;
        auto th = thread_of.find(a->second->thread);
        if (th != thread_of.end()) {
          const auto& v = by_thread[static_cast<size_t>(th->second)];
          // Innermost = the containing span that started last.
          auto ub = std::upper_bound(v.begin(), v.end(), at,
                                     [](int64_t x, const HostSpan* s) { return x < s->start; });
          for (auto k = ub; k != v.begin();) {
            --k;
            if ((*k)->end >= at) {
              best = *k;
              break;
            }
            if (at - (*k)->start > int64_t{10} * 1000 * 1000 * 1000) break;
          }
        }
        if (best != nullptr) {
          tag = {best->arg, best->phase, TagSource::HostSpan};
          continue;
        }
        auto mk = markers.find(a->second->thread);
        if (mk != markers.end()) {
          const Marker* bm = nullptr;
          for (const Marker* m : mk->second) {
            if (m->start > at) break;
            if (m->end >= at) bm = m;
          }
          if (bm != nullptr) {
            Phase p = Phase::Other;
            phase_from_name(t.str(bm->name), &p);
            tag = {bm->has_payload ? static_cast<int32_t>(bm->payload) : -1, p,
                   TagSource::HostSpan};
            continue;
          }
        }
      }
    }
    if (op.kind != GpuOpKind::Kernel) {
      tag = {-1, Phase::Transfer, TagSource::Copy};
      continue;
    }
    Phase p;
    if (phase_from_kernel_name(t.str(op.name), &p)) tag = {-1, p, TagSource::Name};
  }
  return tags;
}

std::vector<Interval> merge_intervals(std::vector<Interval> v) {
  v.erase(std::remove_if(v.begin(), v.end(), [](const Interval& i) { return i.end <= i.start; }),
          v.end());
  std::sort(v.begin(), v.end(), [](const Interval& a, const Interval& b) {
    return a.start < b.start || (a.start == b.start && a.end < b.end);
  });
  std::vector<Interval> out;
  for (const Interval& i : v) {
    if (!out.empty() && i.start <= out.back().end) {
      out.back().end = std::max(out.back().end, i.end);
    } else {
      out.push_back(i);
    }
  }
  return out;
}

int64_t total_length(const std::vector<Interval>& m) {
  int64_t s = 0;
  for (const Interval& i : m) s += i.end - i.start;
  return s;
}

int64_t intersection_length(const std::vector<Interval>& a, const std::vector<Interval>& b) {
  int64_t s = 0;
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    const int64_t lo = std::max(a[i].start, b[j].start);
    const int64_t hi = std::min(a[i].end, b[j].end);
    if (hi > lo) s += hi - lo;
    if (a[i].end < b[j].end) {
      ++i;
    } else {
      ++j;
    }
  }
  return s;
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  // Nearest rank: the smallest value with at least p % of the values <= it.
  const double rank = std::ceil(p / 100.0 * static_cast<double>(v.size()));
  const size_t idx = static_cast<size_t>(std::clamp(rank, 1.0, static_cast<double>(v.size()))) - 1;
  return v[idx];
}

std::vector<HistogramBin> gap_histogram(const std::vector<double>& gaps_us) {
  static const double edges[] = {0, 1, 2, 5, 10, 20, 50, 100, 1000};
  constexpr size_t n = sizeof(edges) / sizeof(edges[0]);
  std::vector<HistogramBin> bins(n);
  for (size_t i = 0; i < n; ++i) {
    bins[i].lo_us = edges[i];
    bins[i].hi_us = i + 1 < n ? edges[i + 1] : std::numeric_limits<double>::infinity();
  }
  for (double g : gaps_us) {
    size_t b = n - 1;
    for (size_t i = 0; i + 1 < n; ++i) {
      if (g < edges[i + 1]) {
        b = i;
        break;
      }
    }
    bins[b].count += 1;
    bins[b].sum_us += g;
  }
  return bins;
}

namespace {

double us(int64_t ns) { return static_cast<double>(ns) / 1000.0; }

// Budget categories: a sweep over the window gives each instant to the active category with
// the highest priority (lowest index).
enum Cat : int {
  kCatMoeGpu,
  kCatAttention,
  kCatRouter,
  kCatSampling,
  kCatOtherKernels,
  kCatTransfer,
  kCatCpuExperts,  // GPU idle while CPU experts run (with GPUs), or CPU expert work (CPU only)
  kCatCpuAttention,
  kCatCpuRouter,
  kCatCpuSampling,
  kCatCpuOther,
  kCatCount
};

}  // namespace

WindowMetrics analyze_window(const Timeline& t, const std::vector<OpTag>& tags, const Window& w,
                             const AnalysisInputs& in) {
  WindowMetrics m;
  m.kind = w.kind;
  m.tokens = w.tokens;
  const int64_t w0 = w.start, w1 = std::max(w.end, w.start);
  m.wall_us = us(w1 - w0);
  m.tok_s = w1 > w0 ? static_cast<double>(w.tokens) / (static_cast<double>(w1 - w0) * 1e-9) : 0;
  const double tokens = std::max<double>(1.0, static_cast<double>(w.tokens));
  auto clip = [&](int64_t a, int64_t b) {
    return Interval{std::max(a, w0), std::min(b, w1)};
  };
  auto in_window = [&](int64_t a) { return a >= w0 && a < w1; };

  // ---- GPUs ----
  std::set<int32_t> devices;
  for (const GpuDevice& g : t.gpus) devices.insert(g.index);
  for (const GpuOp& o : t.ops) {
    if (in_window(o.start)) devices.insert(o.device);
  }
  std::unordered_map<uint32_t, const ApiCall*> api_by_corr;
  for (const ApiCall& a : t.api) {
    if (a.correlation != 0) api_by_corr[a.correlation] = &a;
  }
  std::vector<Interval> all_kernels, all_copies, all_peer;
  std::map<int32_t, std::vector<Interval>> compute_by_device;  // merged compute kernels
  std::map<int32_t, int32_t> first_layer;                       // smallest layer computed
  std::vector<std::vector<Interval>> cat_iv(kCatCount);
  for (int32_t d : devices) {
    GpuMetrics g;
    g.device = d;
    g.wall_us = m.wall_us;
    std::vector<size_t> idx;
    for (size_t i = 0; i < t.ops.size(); ++i) {
      if (t.ops[i].device == d && in_window(t.ops[i].start)) idx.push_back(i);
    }
    std::sort(idx.begin(), idx.end(), [&](size_t a, size_t b) {
      return t.ops[a].start < t.ops[b].start;
    });
    std::vector<Interval> kern, copies, peer;
    std::map<Phase, std::vector<Interval>> by_phase;
    std::set<uint32_t> launch_corr;
    std::map<uint32_t, int64_t> first_start;  // per correlation: first op start
    int64_t kmin = std::numeric_limits<int64_t>::max(), kmax = std::numeric_limits<int64_t>::min();
    for (size_t i : idx) {
      const GpuOp& o = t.ops[i];
      const Interval iv = clip(o.start, o.end);
      if (o.correlation != 0) launch_corr.insert(o.correlation);
      if (o.kind == GpuOpKind::Kernel && is_cpu_wait_kernel(t.str(o.name))) {
        // Spinning on the CPU's flag: idle behind the CPU experts (is_cpu_wait_kernel).
        ++g.kernels;
        cat_iv[kCatCpuExperts].push_back(iv);
        continue;
      }
      const bool xfer = is_peer_transfer(t, o);
      if (xfer) {
        peer.push_back(iv);
        if (o.kind == GpuOpKind::Memcpy) g.peer_bytes += o.bytes;
      }
      if (o.kind == GpuOpKind::Kernel && xfer) {
        // An NCCL kernel: a transfer (it may spin waiting for its peer), not compute.
        ++g.kernels;
        g.phases[Phase::Transfer].count += 1;
        by_phase[Phase::Transfer].push_back(iv);
        g.tagged_by[tags[i].source] += 1;
        if (o.correlation != 0) {
          auto fs = first_start.find(o.correlation);
          if (fs == first_start.end() || o.start < fs->second) first_start[o.correlation] = o.start;
        }
        cat_iv[kCatTransfer].push_back(iv);
      } else if (o.kind == GpuOpKind::Kernel) {
        kern.push_back(iv);
        ++g.kernels;
        if (tags[i].layer >= 0) {
          auto fl = first_layer.find(d);
          if (fl == first_layer.end() || tags[i].layer < fl->second) first_layer[d] = tags[i].layer;
        }
        kmin = std::min(kmin, o.start);
        kmax = std::max(kmax, o.end);
        by_phase[tags[i].phase].push_back(iv);
        g.phases[tags[i].phase].count += 1;
        g.tagged_by[tags[i].source] += 1;
        if (o.correlation != 0) {
          auto fs = first_start.find(o.correlation);
          if (fs == first_start.end() || o.start < fs->second) first_start[o.correlation] = o.start;
        }
        int cat = kCatOtherKernels;
        switch (tags[i].phase) {
          case Phase::MoeGpu: cat = kCatMoeGpu; break;
          case Phase::Attention: cat = kCatAttention; break;
          case Phase::Router: cat = kCatRouter; break;
          case Phase::Sampling: cat = kCatSampling; break;
          case Phase::Transfer: cat = kCatTransfer; break;
          default: break;
        }
        cat_iv[static_cast<size_t>(cat)].push_back(iv);
      } else {
        copies.push_back(iv);
        cat_iv[kCatTransfer].push_back(iv);
      }
    }
    const auto merged = merge_intervals(kern);
    g.busy_us = us(total_length(merged));
    g.idle_fraction = m.wall_us > 0 ? std::clamp(1.0 - g.busy_us / m.wall_us, 0.0, 1.0) : 0;
    g.copy_us = us(total_length(merge_intervals(copies)));
    g.peer_transfer_us = us(total_length(merge_intervals(peer)));
    all_peer.insert(all_peer.end(), peer.begin(), peer.end());
    compute_by_device[d] = merged;
    g.first_kernel_to_last_us = g.kernels > 0 ? us(kmax - kmin) : 0;
    all_kernels.insert(all_kernels.end(), kern.begin(), kern.end());
    all_copies.insert(all_copies.end(), copies.begin(), copies.end());
    for (auto& [p, v] : by_phase) g.phases[p].wall_us = us(total_length(merge_intervals(v)));

    // Gaps between consecutive busy stretches, with the kernels around them.
    std::vector<double> gaps;
    std::vector<Gap> gap_list;
    {
      // The kernel ending last before each gap and the one starting it, for naming.
      std::vector<size_t> kidx;
      for (size_t i : idx) {
        if (t.ops[i].kind == GpuOpKind::Kernel && !is_peer_transfer(t, t.ops[i]) &&
            !is_cpu_wait_kernel(t.str(t.ops[i].name))) {
          kidx.push_back(i);
        }
      }
      int64_t busy_end = std::numeric_limits<int64_t>::min();
      size_t last = SIZE_MAX;
      for (size_t i : kidx) {
        const GpuOp& o = t.ops[i];
        if (last != SIZE_MAX && o.start > busy_end) {
          const double len = us(o.start - busy_end);
          gaps.push_back(len);
          Gap gp;
          gp.start_us = us(busy_end - w0);
          gp.length_us = len;
          gp.before = t.str(t.ops[last].name);
          gp.after = t.str(o.name);
          gp.phase_before = tags[last].phase;
          gp.phase_after = tags[i].phase;
          gap_list.push_back(std::move(gp));
        }
        if (o.end > busy_end) {
          busy_end = o.end;
          last = i;
        }
      }
    }
    g.gaps.count = static_cast<int64_t>(gaps.size());
    for (double x : gaps) {
      g.gaps.sum_us += x;
      g.gaps.max_us = std::max(g.gaps.max_us, x);
    }
    g.gaps.median_us = percentile(gaps, 50);
    g.gaps.p90_us = percentile(gaps, 90);
    g.gaps.histogram = gap_histogram(gaps);
    std::sort(gap_list.begin(), gap_list.end(),
              [](const Gap& a, const Gap& b) { return a.length_us > b.length_us; });
    if (gap_list.size() > 5) gap_list.resize(5);
    g.gaps.biggest = std::move(gap_list);

    // Launches and their latency (first op of each launching call).
    std::vector<double> lat, delay, call;
    for (uint32_t c : launch_corr) {
      auto a = api_by_corr.find(c);
      if (a == api_by_corr.end()) continue;
      ++g.launches;
      call.push_back(us(a->second->end - a->second->start));
      const std::string& name = t.str(a->second->name);
      if (name.find("GraphLaunch") != std::string::npos) ++g.graph_launches;
      auto fs = first_start.find(c);
      if (fs == first_start.end()) continue;
      lat.push_back(us(fs->second - a->second->start));
      delay.push_back(std::max(0.0, us(fs->second - a->second->end)));
    }
    for (const ApiCall& a : t.api) {
      if (in_window(a.start) && t.str(a.name).find("LaunchHostFunc") != std::string::npos) {
        ++g.launches;  // host functions put work in the stream without a GPU record
      }
    }
    g.latency_samples = static_cast<int64_t>(lat.size());
    g.launch_latency_median_us = percentile(lat, 50);
    g.launch_latency_p90_us = percentile(lat, 90);
    g.launch_delay_median_us = percentile(delay, 50);
    g.launch_call_median_us = percentile(call, 50);
    g.kernels_per_token = static_cast<double>(g.kernels) / tokens;
    g.launches_per_token = static_cast<double>(g.launches) / tokens;
    m.gpus.push_back(std::move(g));
  }

  // ---- several GPUs: pipeline order, bubbles, transfers ----
  m.peer_transfer_us = us(total_length(merge_intervals(all_peer)));
  {
    std::vector<int32_t> order;
    for (const auto& [d, v] : compute_by_device) {
      if (!v.empty()) order.push_back(d);
    }
    if (order.size() >= 2) {
      auto key = [&](int32_t d) {
        auto it = first_layer.find(d);
        return std::make_pair(it == first_layer.end() ? INT32_MAX : it->second, d);
      };
      std::sort(order.begin(), order.end(),
                [&](int32_t a, int32_t b) { return key(a) < key(b); });
      m.pipeline_order = order;
      for (size_t s = 0; s < order.size(); ++s) {
        std::vector<Interval> before, after;
        for (size_t k = 0; k < order.size(); ++k) {
          if (k == s) continue;
          const auto& v = compute_by_device[order[k]];
          std::vector<Interval>& dst = k < s ? before : after;
          dst.insert(dst.end(), v.begin(), v.end());
        }
        const auto& mine = compute_by_device[order[s]];
        const auto up = merge_intervals(before);
        const auto down = merge_intervals(after);
        std::vector<Interval> up_or_mine = up;
        up_or_mine.insert(up_or_mine.end(), mine.begin(), mine.end());
        const auto covered = merge_intervals(up_or_mine);
        for (GpuMetrics& g : m.gpus) {
          if (g.device != order[s]) continue;
          g.pipeline_stage = static_cast<int>(s);
          g.bubble_us = us(total_length(up) - intersection_length(up, mine));
          g.downstream_wait_us = us(total_length(down) - intersection_length(down, covered));
        }
      }
    }
  }

  // ---- CPU (host spans) ----
  std::map<Phase, std::vector<Interval>> cpu_phase;
  std::map<int, std::vector<Interval>> node_moe;
  std::vector<Interval> cpu_all;
  std::set<uint32_t> workers;
  for (const HostSpan& s : t.spans) {
    if (trace::is_step_phase(s.phase) || s.end <= w0 || s.start >= w1) continue;
    const Interval iv = clip(s.start, s.end);
    cpu_phase[s.phase].push_back(iv);
    cpu_all.push_back(iv);
    workers.insert(s.thread);
    if (s.phase == Phase::MoeCpu && s.node >= 0) node_moe[s.node].push_back(iv);
    PhaseTime& pt = m.cpu.phases[s.phase];
    pt.count += 1;
    pt.thread_us += us(iv.end - iv.start);
  }
  m.cpu.workers = static_cast<int>(workers.size());
  m.cpu.busy_us = us(total_length(merge_intervals(cpu_all)));
  for (auto& [p, v] : cpu_phase) m.cpu.phases[p].wall_us = us(total_length(merge_intervals(v)));
  for (auto& [n, v] : node_moe) m.cpu.moe_cpu_wall_us_by_node[n] = us(total_length(merge_intervals(v)));
  const bool gpu_work = !all_kernels.empty() || !all_copies.empty();
  {
    auto add = [&](Phase p, int cat) {
      auto it = cpu_phase.find(p);
      if (it != cpu_phase.end()) {
        auto& dst = cat_iv[static_cast<size_t>(cat)];
        dst.insert(dst.end(), it->second.begin(), it->second.end());
      }
    };
    add(Phase::MoeCpu, kCatCpuExperts);
    if (!gpu_work) {
      // A CPU-only window: the CPU's phases are the budget.
      add(Phase::Attention, kCatCpuAttention);
      add(Phase::Router, kCatCpuRouter);
      add(Phase::Sampling, kCatCpuSampling);
      add(Phase::MoeGpu, kCatCpuOther);
      add(Phase::Transfer, kCatCpuOther);
      add(Phase::Other, kCatCpuOther);
    }
  }

  // ---- expert bandwidth per device ----
  const auto cpu_moe = merge_intervals(cpu_phase[Phase::MoeCpu]);
  for (const auto& [dev, bytes] : in.expert_bytes) {
    ExpertBandwidth eb;
    eb.device = dev;
    eb.bytes = bytes;
    if (dev == "cpu") {
      eb.phase_wall_us = us(total_length(cpu_moe));
      if (eb.phase_wall_us <= 0) eb.note = "no moe_cpu spans in the window";
    } else if (dev.rfind("cpu:", 0) == 0) {
      const int node = std::atoi(dev.c_str() + 4);
      auto it = m.cpu.moe_cpu_wall_us_by_node.find(node);
      eb.phase_wall_us = it == m.cpu.moe_cpu_wall_us_by_node.end() ? 0 : it->second;
      if (eb.phase_wall_us <= 0) eb.note = "no moe_cpu spans tagged with node " + std::to_string(node);
    } else {
      for (const GpuMetrics& g : m.gpus) {
        if ("cuda:" + std::to_string(g.device) != dev) continue;
        auto it = g.phases.find(Phase::MoeGpu);
        if (it != g.phases.end()) eb.phase_wall_us = it->second.wall_us;
      }
      if (eb.phase_wall_us <= 0) eb.note = "no kernels attributed to moe_gpu on " + dev;
    }
    eb.gb_s = eb.phase_wall_us > 0 ? bytes / (eb.phase_wall_us * 1e-6) / 1e9 : 0;
    m.expert_bandwidth.push_back(std::move(eb));
  }

  // ---- CPU/GPU overlap ----
  const auto gpu_busy = merge_intervals(all_kernels);
  m.overlap_us = us(intersection_length(gpu_busy, cpu_moe));
  const double cpu_moe_us = us(total_length(cpu_moe));
  m.overlap_fraction_of_cpu_experts = cpu_moe_us > 0 ? m.overlap_us / cpu_moe_us : 0;

  // ---- per-token budget: each instant of the window to one category ----
  std::vector<std::pair<int64_t, int>> edges;  // (time, +/- (cat + 1))
  for (int c = 0; c < kCatCount; ++c) {
    for (const Interval& iv : merge_intervals(cat_iv[static_cast<size_t>(c)])) {
      edges.push_back({iv.start, c + 1});
      edges.push_back({iv.end, -(c + 1)});
    }
  }
  std::sort(edges.begin(), edges.end());
  std::vector<int64_t> cat_ns(kCatCount + 1, 0);  // last: nothing active
  int active[kCatCount] = {};
  int64_t prev = w0;
  auto account = [&](int64_t upto) {
    if (upto <= prev) return;
    int c = kCatCount;
    for (int k = 0; k < kCatCount; ++k) {
      if (active[k] > 0) {
        c = k;
        break;
      }
    }
    cat_ns[static_cast<size_t>(c)] += upto - prev;
    prev = upto;
  };
  for (const auto& [time, code] : edges) {
    account(std::clamp(time, w0, w1));
    const int k = std::abs(code) - 1;
    active[k] += code > 0 ? 1 : -1;
  }
  account(w1);
  static const char* gpu_names[kCatCount + 1] = {
      "gpu_experts", "attention", "router",        "sampling",      "other_kernels", "transfers",
      "cpu_experts_wait", "cpu_attention", "cpu_router", "cpu_sampling", "cpu_other", "launch_gaps"};
  static const char* cpu_names[kCatCount + 1] = {
      "gpu_experts", "attention", "router",   "sampling", "other_kernels", "transfers",
      "cpu_experts", "attention", "router",   "sampling", "other",         "host_overhead"};
  for (int c = 0; c <= kCatCount; ++c) {
    const int64_t ns = cat_ns[static_cast<size_t>(c)];
    if (ns == 0 && c != kCatCount) continue;
    BudgetItem b;
    b.name = gpu_work ? gpu_names[c] : cpu_names[c];
    b.us_per_token = us(ns) / tokens;
    b.fraction = w1 > w0 ? static_cast<double>(ns) / static_cast<double>(w1 - w0) : 0;
    m.budget.push_back(std::move(b));
  }
  return m;
}

RouterMetrics analyze_router(const std::vector<std::vector<int64_t>>& counts, int64_t tokens,
                             int64_t n_used) {
  RouterMetrics r;
  r.tokens = tokens;
  r.n_used = n_used;
  r.n_experts = counts.empty() ? 0 : static_cast<int64_t>(counts.front().size());
  if (r.n_experts == 0 || n_used <= 0) return r;
  double share_sum = 0;
  for (size_t l = 0; l < counts.size(); ++l) {
    std::vector<int64_t> c = counts[l];
    std::sort(c.begin(), c.end(), std::greater<int64_t>());
    int64_t total = 0;
    for (int64_t x : c) total += x;
    RouterLayer rl;
    rl.layer = static_cast<int64_t>(l);
    if (total > 0) {
      int64_t acc = 0;
      for (size_t i = 0; i < c.size(); ++i) {
        acc += c[i];
        // Integer test of acc >= 0.9 * total.
        if (acc * 10 >= total * 9) {
          rl.experts_for_90 = static_cast<int64_t>(i) + 1;
          break;
        }
      }
      rl.top_share = static_cast<double>(c.front()) / static_cast<double>(total);
    }
    share_sum += static_cast<double>(rl.experts_for_90) / static_cast<double>(r.n_experts);
    r.layers.push_back(rl);
  }
  r.mean_share_for_90 = share_sum / static_cast<double>(counts.size());
  // ~20 expected selections per expert before a count means much.
  r.tokens_needed = (20 * r.n_experts + n_used - 1) / n_used;
  if (tokens < r.tokens_needed) {
    r.warning = "only " + std::to_string(tokens) + " tokens were profiled: each expert expects " +
                std::to_string(static_cast<double>(tokens * n_used) /
                               static_cast<double>(r.n_experts))
                    .substr(0, 4) +
                " selections, too few for its count to mean much; profile at least " +
                std::to_string(r.tokens_needed) + " tokens (-n " + std::to_string(r.tokens_needed) +
                ") for router statistics";
  }
  return r;
}

namespace {

json phase_map_json(const std::map<Phase, PhaseTime>& m, bool cpu) {
  json j = json::object();
  for (const auto& [p, pt] : m) {
    json e = {{"wall_us", pt.wall_us}, {"count", pt.count}};
    if (cpu) e["thread_us"] = pt.thread_us;
    j[phase_name(p)] = e;
  }
  return j;
}

json hist_json(const std::vector<HistogramBin>& h) {
  json a = json::array();
  for (const HistogramBin& b : h) {
    a.push_back({{"lo_us", b.lo_us},
                 {"hi_us", std::isinf(b.hi_us) ? json(nullptr) : json(b.hi_us)},
                 {"count", b.count},
                 {"sum_us", b.sum_us}});
  }
  return a;
}

}  // namespace

json to_json(const WindowMetrics& m) {
  json j;
  j["tokens"] = m.tokens;
  j["wall_us"] = m.wall_us;
  j["tok_s"] = m.tok_s;
  j["gpus"] = json::array();
  for (const GpuMetrics& g : m.gpus) {
    json biggest = json::array();
    for (const Gap& gp : g.gaps.biggest) {
      biggest.push_back({{"start_us", gp.start_us},
                         {"length_us", gp.length_us},
                         {"after_kernel", gp.before},
                         {"before_kernel", gp.after},
                         {"phase_before", phase_name(gp.phase_before)},
                         {"phase_after", phase_name(gp.phase_after)}});
    }
    json tagged = json::object();
    for (const auto& [s, n] : g.tagged_by) tagged[tag_source_name(s)] = n;
    j["gpus"].push_back({{"device", "cuda:" + std::to_string(g.device)},
                         {"wall_us", g.wall_us},
                         {"busy_us", g.busy_us},
                         {"idle_fraction", g.idle_fraction},
                         {"copy_us", g.copy_us},
                         {"first_kernel_to_last_us", g.first_kernel_to_last_us},
                         {"gaps",
                          {{"count", g.gaps.count},
                           {"sum_us", g.gaps.sum_us},
                           {"median_us", g.gaps.median_us},
                           {"p90_us", g.gaps.p90_us},
                           {"max_us", g.gaps.max_us},
                           {"histogram", hist_json(g.gaps.histogram)},
                           {"biggest", biggest}}},
                         {"kernels", g.kernels},
                         {"launches", g.launches},
                         {"graph_launches", g.graph_launches},
                         {"kernels_per_token", g.kernels_per_token},
                         {"launches_per_token", g.launches_per_token},
                         {"launch_latency",
                          {{"samples", g.latency_samples},
                           {"median_us", g.launch_latency_median_us},
                           {"p90_us", g.launch_latency_p90_us},
                           {"delay_median_us", g.launch_delay_median_us},
                           {"call_median_us", g.launch_call_median_us}}},
                         {"phases", phase_map_json(g.phases, false)},
                         {"kernels_tagged_by", tagged},
                         {"peer_transfer_us", g.peer_transfer_us},
                         {"peer_bytes", g.peer_bytes},
                         {"pipeline_stage", g.pipeline_stage},
                         {"bubble_us", g.bubble_us},
                         {"downstream_wait_us", g.downstream_wait_us}});
  }
  j["cpu"] = {{"workers", m.cpu.workers},
              {"busy_us", m.cpu.busy_us},
              {"phases", phase_map_json(m.cpu.phases, true)}};
  j["cpu"]["moe_cpu_by_node"] = json::array();
  for (const auto& [n, w] : m.cpu.moe_cpu_wall_us_by_node) {
    j["cpu"]["moe_cpu_by_node"].push_back({{"node", n}, {"wall_us", w}});
  }
  json order = json::array();
  for (int32_t d : m.pipeline_order) order.push_back("cuda:" + std::to_string(d));
  double bubbles = 0;
  for (const GpuMetrics& g : m.gpus) bubbles += g.bubble_us;
  const double tok = std::max<double>(1.0, static_cast<double>(m.tokens));
  j["pipeline"] = {{"order", order},
                   {"bubble_us_per_token", bubbles / tok},
                   {"peer_transfer_us_per_token", m.peer_transfer_us / tok}};
  j["expert_bandwidth"] = json::array();
  for (const ExpertBandwidth& e : m.expert_bandwidth) {
    json x = {{"device", e.device},
              {"bytes", e.bytes},
              {"phase_wall_us", e.phase_wall_us},
              {"gb_s", e.gb_s}};
    if (!e.note.empty()) x["note"] = e.note;
    j["expert_bandwidth"].push_back(x);
  }
  j["cpu_gpu_overlap"] = {{"overlap_us", m.overlap_us},
                          {"fraction_of_cpu_experts", m.overlap_fraction_of_cpu_experts}};
  j["budget_us_per_token"] = json::array();
  for (const BudgetItem& b : m.budget) {
    j["budget_us_per_token"].push_back(
        {{"name", b.name}, {"us_per_token", b.us_per_token}, {"fraction", b.fraction}});
  }
  return j;
}

json to_json(const RouterMetrics& r) {
  json j;
  j["tokens"] = r.tokens;
  j["n_experts"] = r.n_experts;
  j["n_experts_used"] = r.n_used;
  j["mean_share_of_experts_for_90pct"] = r.mean_share_for_90;
  j["tokens_needed"] = r.tokens_needed;
  j["warning"] = r.warning;
  json layers = json::array();
  for (const RouterLayer& l : r.layers) {
    layers.push_back(
        {{"layer", l.layer}, {"experts_for_90pct", l.experts_for_90}, {"top_share", l.top_share}});
  }
  j["layers"] = layers;
  return j;
}

}  // namespace ktune::profiler
