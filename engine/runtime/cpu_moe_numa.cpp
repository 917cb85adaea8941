// CpuMoe per NUMA node (the design and the summation order are in cpu_moe_numa.h).
#include "ktune/engine/cpu_moe_numa.h"

#include <algorithm>
#include <cstring>

#include "ktune/engine/cpu_moe.h"
#include "ktune/engine/error.h"
#include "ktune/engine/thread_pool.h"
#include "ktune/engine/trace.h"

namespace ktune {

struct NumaCpuMoe::Impl {
  struct Group {
    int node = -1;
    std::unique_ptr<ThreadPool> pool;
    std::unique_ptr<CpuMoe> moe;
    int caller_cpu = -1;
    // Per-call scratch, sized at construction.
    std::vector<int32_t> ids;
    std::vector<float> wts;
    std::vector<float> y;
    int n = 0;
  };
  const ModelWeights* w = nullptr;
  int64_t hidden = 0;
  int64_t n_experts = 0;
  std::vector<Group> groups;
  // group_of[layer * n_experts + e]: the group computing expert e of the layer, -1 off the CPU.
  std::vector<int8_t> group_of;
  std::unique_ptr<ThreadPool> drivers;  // one thread per group (thread 0: the caller)
  NumaBindReport bind;
  // The call being run, for the drivers.
  int64_t layer = 0;
  const float* h = nullptr;
};

NumaCpuMoe::NumaCpuMoe(const ModelWeights& weights, const Placement& p, const NumaTopology& topo,
                       const NumaCpuMoeOptions& opt)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.w = &weights;
  m.hidden = weights.cfg.hidden;
  m.n_experts = weights.cfg.n_experts;
  const std::string where = p.file.empty() ? "placement" : p.file;
  if (!p.resolved() || p.n_layers() != weights.cfg.n_layers ||
      p.n_experts() != weights.cfg.n_experts) {
    throw Error(where, "does not match the model", "resolve the placement against this model");
  }
  const std::vector<int> nodes = placement_numa_nodes(p);
  const bool split = !nodes.empty() && topo.size() > 1;
  if (split) {
    check_numa_nodes_present(p, topo);
    if (nodes.size() > 127) throw Error(where, "names too many NUMA nodes", "use at most 127");
    for (int64_t l = 0; l < p.n_layers(); ++l) {
      for (const Device& d : p.layers[size_t(l)].experts) {
        if (d == Device::cpu()) {
          throw Error(where,
                      "layer " + std::to_string(l) + " puts experts on plain cpu while other " +
                          "experts name NUMA nodes (" + topo.device_names() + " here)",
                      "name a node (cpu:N) for every CPU expert, or use plain cpu throughout");
        }
      }
    }
    for (int id : nodes) {
      const NumaNode& node = *topo.find(id);
      const int t = opt.threads > 0 ? opt.threads : std::max(1, node.physical_cores);
      std::vector<int> cpus(static_cast<size_t>(t));
      for (int i = 0; i < t; ++i) cpus[size_t(i)] = node.cpus[size_t(i) % node.cpus.size()];
      Impl::Group g;
      g.node = id;
      g.caller_cpu = cpus[0];
      g.pool = std::make_unique<ThreadPool>(cpus, opt.pin);
      m.groups.push_back(std::move(g));
    }
  } else {
    Impl::Group g;
    g.pool = std::make_unique<ThreadPool>(opt.threads, opt.pin);
    m.groups.push_back(std::move(g));
  }
  for (Impl::Group& g : m.groups) {
    g.moe = std::make_unique<CpuMoe>(weights, *g.pool, opt.isa);
    g.ids.resize(size_t(g.moe->max_experts()));
    g.wts.resize(size_t(g.moe->max_experts()));
    g.y.resize(size_t(m.hidden));
  }
  m.group_of.assign(size_t(p.n_layers() * m.n_experts), int8_t(-1));
  for (int64_t l = 0; l < p.n_layers(); ++l) {
    for (int64_t e = 0; e < m.n_experts; ++e) {
      const Device d = p.layers[size_t(l)].experts[size_t(e)];
      if (!d.is_cpu()) continue;
      int g = 0;
      if (split) g = int(std::find(nodes.begin(), nodes.end(), d.index) - nodes.begin());
      m.group_of[size_t(l * m.n_experts + e)] = int8_t(g);
    }
  }
  if (m.groups.size() > 1) {
    std::vector<int> driver_cpus;
    for (const Impl::Group& g : m.groups) driver_cpus.push_back(g.caller_cpu);
    m.drivers = std::make_unique<ThreadPool>(driver_cpus, opt.pin);
    int64_t spin = m.groups[0].pool->spin_us();
    for (const Impl::Group& g : m.groups) spin = std::min(spin, g.pool->spin_us());
    m.drivers->set_spin_us(spin);
  }
  if (split && opt.bind_memory) m.bind = bind_experts_to_nodes(weights, p, topo, opt.mbind);
}

NumaCpuMoe::~NumaCpuMoe() = default;

void NumaCpuMoe::compute(int64_t layer, const float* h, const int32_t* experts,
                         const float* weights, int n, float* y) {
  Impl& m = *impl_;
  const int64_t n_layers = static_cast<int64_t>(m.group_of.size()) / std::max<int64_t>(1, m.n_experts);
  if (layer < 0 || layer >= n_layers) {
    throw Error("NumaCpuMoe", "layer " + std::to_string(layer) + " is out of range",
                "pass a layer below " + std::to_string(n_layers));
  }
  if (n < 0 || n > max_experts()) {
    throw Error("NumaCpuMoe", std::to_string(n) + " experts is out of range",
                "pass 0.." + std::to_string(max_experts()));
  }
  for (Impl::Group& g : m.groups) g.n = 0;
  for (int j = 0; j < n; ++j) {
    const int32_t e = experts[j];
    const int g = (e >= 0 && e < m.n_experts) ? m.group_of[size_t(layer * m.n_experts + e)] : -1;
    if (g < 0) {
      throw Error("NumaCpuMoe",
                  "expert " + std::to_string(e) + " of layer " + std::to_string(layer) +
                      " is not on a CPU device of the placement",
                  "pass only the layer's CPU experts");
    }
    Impl::Group& gr = m.groups[size_t(g)];
    gr.ids[size_t(gr.n)] = e;
    gr.wts[size_t(gr.n)] = weights[j];
    ++gr.n;
  }
  if (m.groups.size() == 1) {
    Impl::Group& g = m.groups[0];
    g.moe->compute(layer, h, g.ids.data(), g.wts.data(), g.n, y);
    return;
  }
  // Every driver runs its node's CpuMoe (nothing for a node without experts this call).
  // Each driver's span carries its node, so the profiler can give every node's expert
  // bandwidth (docs/metrics.md).
  m.drivers->run([&](int ith, int) {
    Impl::Group& g = m.groups[size_t(ith)];
    if (g.n == 0) return;
    const int prev = trace::thread_node();
    trace::set_thread_node(g.node);
    {
      trace::Scope span(trace::Phase::MoeCpu, static_cast<int32_t>(layer));
      g.moe->compute(layer, h, g.ids.data(), g.wts.data(), g.n, g.y.data());
    }
    trace::set_thread_node(prev);
  });
  // Fixed order: ascending node id.
  bool first = true;
  for (const Impl::Group& g : m.groups) {
    if (g.n == 0) continue;
    if (first) {
      std::memcpy(y, g.y.data(), sizeof(float) * size_t(m.hidden));
      first = false;
    } else {
      for (int64_t i = 0; i < m.hidden; ++i) y[i] += g.y[size_t(i)];
    }
  }
  if (first) std::memset(y, 0, sizeof(float) * size_t(m.hidden));
}

int NumaCpuMoe::max_experts() const { return impl_->groups[0].moe->max_experts(); }
int NumaCpuMoe::groups() const { return static_cast<int>(impl_->groups.size()); }
int NumaCpuMoe::group_node(int g) const { return impl_->groups.at(size_t(g)).node; }
ThreadPool& NumaCpuMoe::group_pool(int g) { return *impl_->groups.at(size_t(g)).pool; }
CpuMoe& NumaCpuMoe::group_moe(int g) { return *impl_->groups.at(size_t(g)).moe; }
int NumaCpuMoe::threads() const {
  int t = 0;
  for (const Impl::Group& g : impl_->groups) t += g.pool->size();
  return t;
}
int NumaCpuMoe::caller_cpu() const { return impl_->groups[0].caller_cpu; }
const NumaBindReport& NumaCpuMoe::bind_report() const { return impl_->bind; }

}  // namespace ktune
