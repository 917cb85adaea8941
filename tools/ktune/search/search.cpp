// The search driver (search/search.h).
#include "search/search.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <numeric>
#include <set>
#include <tuple>

#include "ktune/engine/error.h"

namespace ktune::search {

// ------------------------------------------------------------------------------ memory model --

int64_t MemoryModel::gpu_need(const std::vector<int64_t>& counts) const {
  int64_t need = gpu_fixed, largest_cpu = 0;
  bool any_gpu = false;
  for (size_t l = 0; l < counts.size(); ++l) {
    need += counts[l] * expert_bytes[l];
    any_gpu = any_gpu || counts[l] > 0;
    largest_cpu = std::max(largest_cpu, (n_experts - counts[l]) * expert_bytes[l]);
  }
  // Prefill staging: two buffers of the largest set of CPU-resident experts of one layer.
  return need + (any_gpu ? gpu_expert_ws : 0) + staging_buffers * largest_cpu;
}

int64_t MemoryModel::cpu_need(const std::vector<int64_t>& counts) const {
  int64_t need = 0;
  for (size_t l = 0; l < counts.size(); ++l) need += (n_experts - counts[l]) * expert_bytes[l];
  return need > 0 ? need + cpu_expert_ws : 0;
}

Placement make_placement(const ModelInfo& model, const EngineSettings& s,
                         const std::vector<std::vector<bool>>& on_gpu, int64_t context,
                         const std::string& gpu, int64_t batch) {
  const Device dev = Device::parse(gpu, "search");
  Placement p;
  p.model_path = model.path;
  p.model_resolved = model.path;
  p.arch = model.cfg.arch;
  p.runtime.cuda_graph = s.gpu && s.cuda_graph;
  p.runtime.moe_kernel = s.kernel;
  p.runtime.cpu_handoff = s.handoff;
  p.runtime.pcie_assist_permille = s.gpu ? s.pcie_assist_permille : 0;
  p.runtime.cpu_threads = s.cpu_threads;
  p.runtime.context = context;
  p.runtime.batch = batch;
  for (int64_t l = 0; l < model.cfg.n_layers; ++l) {
    LayerPlacement lp;
    lp.attention = s.gpu ? dev : Device::cpu();
    for (int64_t e = 0; e < model.cfg.n_experts; ++e) {
      lp.experts.push_back(s.gpu && on_gpu[size_t(l)][size_t(e)] ? dev : Device::cpu());
    }
    p.layers.push_back(std::move(lp));
  }
  return p;
}

MemoryModel memory_model(const ModelInfo& model, bool cuda_graph, int64_t context,
                         const std::string& gpu, int64_t batch) {
  const ModelConfig& c = model.cfg;
  MemoryModel mm;
  mm.gpu = gpu;
  mm.n_experts = c.n_experts;
  mm.expert_bytes = model.bytes.expert;
  EngineSettings s;
  s.cuda_graph = cuda_graph;
  const auto all = [&](bool v) {
    return std::vector<std::vector<bool>>(size_t(c.n_layers),
                                          std::vector<bool>(size_t(c.n_experts), v));
  };
  const Budgets none;
  const MemoryPlan pg =
      plan_memory(c, model.bytes, make_placement(model, s, all(true), context, gpu, batch), none);
  const MemoryPlan pc =
      plan_memory(c, model.bytes, make_placement(model, s, all(false), context, gpu, batch), none);
  const DeviceUse& ug = pg.per_device.at(gpu);
  const DeviceUse& uc = pc.per_device.at(gpu);
  int64_t all_experts = 0;
  for (int64_t b : model.bytes.expert) all_experts += b * c.n_experts;
  mm.gpu_fixed = uc.total - uc.staging;
  mm.staging_buffers = uc.staging > 0 ? 2 : 0;  // the planner's: none for deepseek2
  mm.gpu_expert_ws = ug.total - mm.gpu_fixed - all_experts;
  mm.cpu_expert_ws = pc.per_device.at("cpu").total - all_experts;
  return mm;
}

Placement make_pipeline_placement(const ModelInfo& model, const EngineSettings& s,
                                  const std::vector<std::vector<bool>>& on_gpu, int64_t context,
                                  const std::vector<std::string>& gpus, const Stages& stages,
                                  int64_t batch) {
  Placement p = make_placement(model, s, on_gpu, context, gpus.at(0), batch);
  if (!s.gpu || stages.empty()) return p;
  for (size_t l = 0; l < p.layers.size(); ++l) {
    const Device dev = Device::parse(gpus.at(size_t(stages.at(l))), "search");
    LayerPlacement& lp = p.layers[l];
    lp.attention = dev;
    for (Device& d : lp.experts) {
      if (d.is_gpu()) d = dev;
    }
  }
  return p;
}

std::vector<int64_t> even_split(int64_t n_layers, int n) {
  std::vector<int64_t> out(size_t(std::max(n, 1)), n_layers / std::max(n, 1));
  for (int64_t i = 0; i < n_layers % std::max(n, 1); ++i) out[size_t(i)] += 1;
  return out;
}

int64_t PipelineMemoryModel::gpu_need(const Stages& st, const std::vector<int64_t>& counts,
                                      int g) const {
  int64_t a = -1, b = -1;
  for (size_t l = 0; l < st.size(); ++l) {
    if (st[l] != g) continue;
    if (a < 0) a = int64_t(l);
    b = int64_t(l) + 1;
  }
  if (a < 0) return 0;
  int64_t need = base, largest_cpu = 0;
  bool any = false;
  for (int64_t l = a; l < b; ++l) {
    need += layer_bytes[size_t(l)] + counts[size_t(l)] * expert_bytes[size_t(l)];
    any = any || counts[size_t(l)] > 0;
    largest_cpu = std::max(largest_cpu, (n_experts - counts[size_t(l)]) * expert_bytes[size_t(l)]);
  }
  if (a == 0) need += first_bytes;
  if (b == int64_t(st.size())) need += last_bytes;
  if (a == 0 && b == int64_t(st.size())) need -= single_gpu_saving;
  return need + (any ? expert_ws : 0) + staging_buffers * largest_cpu;
}

int64_t PipelineMemoryModel::cpu_need(const std::vector<int64_t>& counts) const {
  int64_t need = 0;
  for (size_t l = 0; l < counts.size(); ++l) need += (n_experts - counts[l]) * expert_bytes[l];
  return need > 0 ? need + cpu_expert_ws : 0;
}

PipelineMemoryModel pipeline_memory_model(const ModelInfo& model, bool cuda_graph,
                                          int64_t context) {
  const ModelConfig& c = model.cfg;
  PipelineMemoryModel pm;
  pm.n_experts = c.n_experts;
  pm.expert_bytes = model.bytes.expert;
  if (c.n_layers < 2) return pm;
  EngineSettings s;
  s.cuda_graph = cuda_graph;
  const auto all = [&](bool v) {
    return std::vector<std::vector<bool>>(size_t(c.n_layers),
                                          std::vector<bool>(size_t(c.n_experts), v));
  };
  // Reference: layer 0 on cuda:0, the rest on cuda:1; every expert on the CPU, then on its GPU.
  Stages st(size_t(c.n_layers), 1);
  st[0] = 0;
  const std::vector<std::string> gpus = {"cuda:0", "cuda:1"};
  const Budgets none;
  const MemoryPlan pc = plan_memory(
      c, model.bytes, make_pipeline_placement(model, s, all(false), context, gpus, st), none);
  const MemoryPlan pg = plan_memory(
      c, model.bytes, make_pipeline_placement(model, s, all(true), context, gpus, st), none);
  const DeviceUse& c0 = pc.per_device.at("cuda:0");
  const DeviceUse& c1 = pc.per_device.at("cuda:1");
  const DeviceUse& g0 = pg.per_device.at("cuda:0");
  const int64_t kv_layer = c0.kv_cache;  // every layer caches the same
  for (int64_t l = 0; l < c.n_layers; ++l) {
    pm.layer_bytes.push_back(model.bytes.attention[size_t(l)] + kv_layer);
  }
  pm.first_bytes = model.bytes.embedding;
  pm.base = c0.total - c0.staging - c0.weights - c0.kv_cache;
  const int64_t base_last = c1.total - c1.staging - c1.weights - c1.kv_cache;
  pm.last_bytes = model.bytes.head + (base_last - pm.base);
  pm.expert_ws = (g0.total - g0.weights - g0.kv_cache) - pm.base;
  pm.single_gpu_saving = kGpuCommReserve + model.bytes.head_shared;
  int64_t all_experts = 0;
  for (int64_t b : model.bytes.expert) all_experts += b * c.n_experts;
  pm.cpu_expert_ws = pc.per_device.at("cpu").total - all_experts;
  pm.staging_buffers = c0.staging + c1.staging > 0 ? 2 : 0;  // the planner's: none for deepseek2
  return pm;
}

std::vector<std::vector<bool>> hottest_sets(const RouterModel& router,
                                            const std::vector<int64_t>& counts) {
  std::vector<std::vector<bool>> sets;
  for (size_t l = 0; l < counts.size(); ++l) {
    std::vector<bool> s(router.hot[l].size(), false);
    for (int64_t i = 0; i < counts[l]; ++i) s[size_t(router.hot[l][size_t(i)])] = true;
    sets.push_back(std::move(s));
  }
  return sets;
}

// ------------------------------------------------------------------------------------ driver --

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Caps on the CPU experts of any layer: the planner's staging (two buffers of the largest CPU
// set of one layer) couples the layers, so the search fixes the largest CPU set per solve.
std::vector<int64_t> staging_caps(int64_t e) {
  std::set<int64_t> caps = {0, e};
  for (int64_t v : {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512}) {
    if (v < e) caps.insert(v);
  }
  return {caps.begin(), caps.end()};
}

class Driver {
 public:
  explicit Driver(const SearchOptions& opt)
      : opt_(opt),
        cm_(machine_costs(opt.profile, opt.assumptions), opt.model,
            router_from_profile(opt.profile, opt.model.cfg), opt.workload) {}

  SearchResult run() {
    const double t0 = now_s();
    const ModelConfig& c = opt_.model.cfg;
    res_.machine = cm_.machine();
    res_.router = cm_.router();
    res_.notes = cm_.machine().notes;
    for (const std::string& n : opt_.notes) res_.notes.push_back(n);
    if (!cm_.router().note.empty()) res_.notes.push_back(cm_.router().note);
    res_.threads_tried = cm_.thread_candidates();
    cpu_budget_ = budget_of("cpu");
    if (cm_.machine().has_gpu && cm_.machine().pcie_assist_gb_s <= 0) {
      res_.notes.push_back(
          "the profile has no PCIe assist probe (cpu_costs.pcie_assist_gb_s): placements are "
          "searched without it; record the machine again with ktune profile --hardware");
    }

    const MachineCosts& m = cm_.machine();
    int64_t gpu_budget = -1;
    if (m.has_gpu) gpu_budget = budget_of(m.gpu_device);
    if (m.has_gpu && gpu_budget < 0) {
      res_.notes.push_back(
          fmt::format("no budget for {}: only the CPU engine is searched", m.gpu_device));
    }
    if (m.has_gpu && gpu_budget >= 0) {
      for (bool graph : {true, false}) search_gpu(graph, gpu_budget);
    }
    if (m.gpus.size() > 1 && opt_.model.cfg.n_layers >= 2) {
      for (bool graph : {true, false}) search_multi(graph);
    }
    for (int t : res_.threads_tried) {
      EngineSettings s;
      s.gpu = false;
      s.cuda_graph = false;
      s.cpu_threads = t;
      add_candidate(s, std::vector<int64_t>(size_t(c.n_layers), 0), "search (cpu engine)");
    }
    if (pool_.empty()) throw_nothing_fits(gpu_budget);
    rank();
    baselines();
    res_.seconds = now_s() - t0;
    return std::move(res_);
  }

 private:
  int64_t budget_of(const std::string& dev) const {
    auto it = opt_.budgets.bytes.find(dev);
    return it == opt_.budgets.bytes.end() ? -1 : it->second;
  }

  // A hybrid engine leaves one core to the host thread that drives the GPU (thread_pool.h,
  // hybrid_cpu_threads_default: with every core the CPU experts ran 2.5x slower on the H100
  // machine), so on the profile's machine its pool is at most physical cores - 1.
  int hybrid_thread_cap() const { return std::max(1, cm_.machine().physical_cores - 1); }

  std::vector<EngineSettings> settings_for(bool graph) const {
    std::vector<EngineSettings> out;
    const int cap = hybrid_thread_cap();
    std::set<int> hybrid_threads;
    for (int t : res_.threads_tried) hybrid_threads.insert(std::min(t, cap));
    for (int t : hybrid_threads) {
      EngineSettings s;
      s.cuda_graph = graph;
      s.cpu_threads = t;
      if (graph) {
        for (CpuHandoff h : {CpuHandoff::Flags, CpuHandoff::HostNode}) {
          s.handoff = h;
          out.push_back(s);
        }
      } else {
        for (MoeKernel k : {MoeKernel::Fused, MoeKernel::Unfused}) {
          s.kernel = k;
          out.push_back(s);
        }
      }
      // The PCIe assist with fused MoE and flags (one GPU): the share that is fastest for a
      // layer with every expert on the CPU, as one more setting.
      EngineSettings a = s;
      a.kernel = MoeKernel::Fused;
      a.handoff = CpuHandoff::Flags;
      a.pcie_assist_permille = best_pcie_assist(a);
      if (a.pcie_assist_permille > 0) out.push_back(a);
    }
    return out;
  }

  // The share (thousandths) of a token's CPU experts the GPU should read over PCIe, judged on a
  // MoE layer with every expert on the CPU at an empty context; 0 when no share beats none by
  // 1 %, or the profile did not measure the assist.
  int best_pcie_assist(EngineSettings s) const {
    const MachineCosts& m = cm_.machine();
    if (m.pcie_assist_gb_s <= 0 || !m.has_gpu) return 0;
    int64_t l = 0;
    while (l + 1 < cm_.n_layers() && opt_.model.cfg.is_dense_layer(l)) ++l;
    const LayerSplit all_cpu = cm_.hottest_split(l, 0);
    s.pcie_assist_permille = 0;
    const double none = cm_.decode_layer_one_us(l, all_cpu, s, 0.0);
    double best = none * 0.99;
    int pick = 0;
    for (int permille = 125; permille <= 750; permille += 125) {
      s.pcie_assist_permille = permille;
      const double t = cm_.decode_layer_one_us(l, all_cpu, s, 0.0);
      if (t < best) {
        best = t;
        pick = permille;
      }
    }
    return pick;
  }

  Problem make_problem(const std::vector<std::vector<double>>& tables, const MemoryModel& mm,
                       int64_t gpu_budget, int64_t cap, bool whole_layers) const {
    const int64_t e = cm_.n_experts();
    Problem p;
    p.cost = tables;
    int64_t largest = 0;
    for (size_t l = 0; l < p.cost.size(); ++l) {
      for (int64_t x = 0; x <= e; ++x) {
        const bool allowed = x >= e - cap && (!whole_layers || x == 0 || x == e);
        if (!allowed) p.cost[l][size_t(x)] = kInfeasible;
      }
      largest = std::max(largest, std::min(cap, e) * mm.expert_bytes[l]);
    }
    p.unit_bytes = mm.expert_bytes;
    p.budget = gpu_budget - mm.gpu_fixed - mm.gpu_expert_ws - mm.staging_buffers * largest;
    if (cpu_budget_ >= 0) {
      int64_t all = 0;
      for (int64_t b : mm.expert_bytes) all += b * e;
      p.min_bytes = std::max<int64_t>(0, all + mm.cpu_expert_ws - cpu_budget_);
    }
    return p;
  }

  Solution solve(const Problem& p, const std::string& solver) {
    ++res_.solves;
    if (solver == "greedy") return solve_greedy(p);
    if (solver == "dp") return solve_dp(p);
    if (solver == "exhaustive") return solve_exhaustive(p, 1e7);
    if (exhaustive_size(p) <= 2e5) return solve_exhaustive(p);
    return solve_greedy(p);
  }

  // Solves at a staging cap, then again at the largest CPU set the solution has: the staging
  // reserve shrinks to what is used, which frees bytes for more GPU experts (a few rounds).
  Solution solve_at_cap(const std::vector<std::vector<double>>& tables, const MemoryModel& mm,
                        int64_t gpu_budget, int64_t cap, const std::string& solver) {
    Solution best;
    for (int round = 0; round < 8; ++round) {
      const Problem p = make_problem(tables, mm, gpu_budget, cap, false);
      if (p.budget < 0) break;
      Solution sol = solve(p, solver);
      if (!sol.feasible()) break;
      int64_t largest = 0;
      for (int64_t m : sol.m) largest = std::max(largest, cm_.n_experts() - m);
      if (sol.cost < best.cost) best = std::move(sol);
      if (largest >= cap) break;
      cap = largest;
    }
    return best;
  }

  void search_gpu(bool graph, int64_t gpu_budget) {
    const MemoryModel mm =
        memory_model(opt_.model, graph, opt_.workload.context, cm_.machine().gpu_device,
                     opt_.workload.batch);
    const int64_t e = cm_.n_experts();
    const std::vector<int64_t> caps = staging_caps(e);
    struct Best {
      EngineSettings s;
      size_t cap_index = 0;
      Solution sol;
      double objective = kInfeasible;
      std::vector<std::vector<double>> tables;
    };
    std::vector<Best> per_settings;
    for (const EngineSettings& s : settings_for(graph)) {
      Best b;
      b.s = s;
      b.tables = tables_for(s);
      const double constant = cm_.constant_s(s);
      for (size_t ci = 0; ci < caps.size(); ++ci) {
        Solution sol = solve_at_cap(b.tables, mm, gpu_budget, caps[ci], opt_.solver);
        if (sol.feasible() && sol.cost + constant < b.objective) {
          b.objective = sol.cost + constant;
          b.sol = std::move(sol);
          b.cap_index = ci;
        }
      }
      // Attention on the GPU with every expert on the CPU (the expert workspace the problems
      // reserve is not needed then).
      const std::vector<int64_t> none(size_t(cm_.n_layers()), 0);
      if (mm.gpu_need(none) <= gpu_budget &&
          (cpu_budget_ < 0 || mm.cpu_need(none) <= cpu_budget_)) {
        double cost = cm_.constant_s(s);
        for (size_t l = 0; l < none.size(); ++l) cost += b.tables[l][0];
        if (cost < b.objective) {
          b.objective = cost;
          b.sol = Solution{none, cost - constant, 0, "all experts on cpu"};
          b.cap_index = caps.size() - 1;
        }
      }
      if (b.sol.feasible()) per_settings.push_back(std::move(b));
    }
    if (per_settings.empty()) {
      res_.notes.push_back(
          fmt::format("graph {}: no hybrid placement fits {} ({} needed before any expert)",
                      graph ? "on" : "off", cm_.machine().gpu_device,
                      format_gib(mm.gpu_need(std::vector<int64_t>(size_t(cm_.n_layers()), 0)))));
      return;
    }
    std::sort(per_settings.begin(), per_settings.end(),
              [](const Best& a, const Best& b) { return a.objective < b.objective; });
    // DP refinement of the two best settings, at their best cap and its neighbours.
    if (opt_.solver == "auto") {
      for (size_t i = 0; i < std::min<size_t>(2, per_settings.size()); ++i) {
        Best& b = per_settings[i];
        if (b.sol.method == "exhaustive") continue;
        const double constant = cm_.constant_s(b.s);
        const size_t lo = b.cap_index > 0 ? b.cap_index - 1 : 0;
        const size_t hi = std::min(caps.size() - 1, b.cap_index + 1);
        for (size_t ci = lo; ci <= hi; ++ci) {
          Solution sol = solve_at_cap(b.tables, mm, gpu_budget, caps[ci], "dp");
          if (sol.feasible() && sol.cost + constant < b.objective - 1e-12) {
            b.objective = sol.cost + constant;
            b.sol = std::move(sol);
            b.cap_index = ci;
          }
        }
      }
      std::sort(per_settings.begin(), per_settings.end(),
                [](const Best& a, const Best& b) { return a.objective < b.objective; });
    }
    for (size_t i = 0; i < std::min<size_t>(2, per_settings.size()); ++i) {
      top_settings_[graph ? 1 : 0].push_back(per_settings[i].s);
    }
    for (size_t i = 0; i < per_settings.size(); ++i) {
      const Best& b = per_settings[i];
      Candidate* cand = add_candidate(b.s, b.sol.m, "search (" + b.sol.method + ")");
      if (i == 0 && cand != nullptr) reorder(*cand, mm, gpu_budget);
    }
    // Whole-layer placement at the best settings (what llama.cpp and ktransformers express).
    const Best& top = per_settings.front();
    Solution whole;
    double whole_obj = kInfeasible;
    for (int64_t cap : {e, int64_t{0}}) {
      const Problem p = make_problem(top.tables, mm, gpu_budget, cap, true);
      if (p.budget < 0) continue;
      ++res_.solves;
      Solution sol = exhaustive_size(p) <= 2e5 ? solve_exhaustive(p) : solve_dp(p);
      if (sol.feasible() && sol.cost < whole_obj) {
        whole_obj = sol.cost;
        whole = std::move(sol);
      }
    }
    if (whole.feasible()) {
      Candidate c = make_candidate(top.s, whole.m, "whole layers (" + whole.method + ")");
      if (fits(c)) {
        reorder(c, mm, gpu_budget);
        c.whole_layers = true;
        res_.whole_layer.push_back(std::move(c));
      }
    }
  }

  // Layer order changes prefill (a copied layer's transfer overlaps the previous layers'
  // compute) and, with skewed routing, which layers hold their hot sets: tries the optimizer's
  // order, GPU-light layers first / last / interleaved, then pairwise swaps.
  void reorder(Candidate& c, const MemoryModel& mm, int64_t gpu_budget) {
    if (c.pred.copy_layers == 0) return;  // decode alone is priced per layer already
    std::vector<int64_t> best = c.gpu_counts;
    double best_t = c.pred.request_s;
    auto eval = [&](const std::vector<int64_t>& counts) {
      std::vector<LayerSplit> splits;
      for (size_t l = 0; l < counts.size(); ++l)
        splits.push_back(cm_.hottest_split(int64_t(l), counts[l]));
      return cm_.predict(splits, c.settings).request_s;
    };
    std::vector<int64_t> sorted = best;
    std::sort(sorted.begin(), sorted.end());
    std::vector<std::vector<int64_t>> tries = {sorted, {sorted.rbegin(), sorted.rend()}};
    std::vector<int64_t> inter;
    for (size_t i = 0, j = sorted.size(); i < j;) {
      inter.push_back(sorted[--j]);
      if (i < j) inter.push_back(sorted[i++]);
    }
    tries.push_back(inter);
    for (const auto& t : tries) {
      const double v = eval(t);
      if (v < best_t) {
        best_t = v;
        best = t;
      }
    }
    // Swaps of layers with different counts, a bounded number of evaluations.
    const size_t n = best.size();
    int budget_evals = 600;
    for (bool improved = true; improved && budget_evals > 0;) {
      improved = false;
      for (size_t a = 0; a < n && budget_evals > 0; ++a) {
        for (size_t b = a + 1; b < n && budget_evals > 0; ++b) {
          if (best[a] == best[b]) continue;
          std::swap(best[a], best[b]);
          --budget_evals;
          const double v = eval(best);
          if (v < best_t * (1 - 1e-9)) {
            best_t = v;
            improved = true;
          } else {
            std::swap(best[a], best[b]);
          }
        }
      }
    }
    if (best != c.gpu_counts && mm.gpu_need(best) <= gpu_budget) {
      Candidate r = make_candidate(c.settings, best, c.label + " + layer order");
      if (fits(r)) c = std::move(r);
    }
  }

  const std::vector<std::vector<double>>& tables_for(const EngineSettings& s) {
    auto it = tables_.find(s.key());
    if (it == tables_.end()) it = tables_.emplace(s.key(), cm_.layer_tables(s)).first;
    return it->second;
  }

  std::vector<std::string> gpu_devices() const {
    std::vector<std::string> out;
    for (const MachineCosts::Gpu& g : cm_.machine().gpus) out.push_back(g.device);
    return out;
  }

  // Mean generated tokens per request: how often a decode step's transfers happen.
  double mean_gen() const {
    double g = 0;
    for (const Request& r : opt_.workload.requests) {
      g += r.weight / opt_.workload.total_weight() * double(r.gen);
    }
    return g;
  }

  SplitProblem make_split_problem(const std::vector<std::vector<double>>& tables,
                                  const PipelineMemoryModel& pm,
                                  const std::vector<int64_t>& budgets, int64_t cap,
                                  bool whole_layers, double host_price = 0) const {
    const int64_t e = cm_.n_experts();
    SplitProblem sp;
    sp.cost = tables;
    for (size_t l = 0; l < sp.cost.size(); ++l) {
      auto& row = sp.cost[l];
      for (int64_t x = 0; x <= e; ++x) {
        const bool allowed = x >= e - cap && (!whole_layers || x == 0 || x == e);
        if (!allowed) {
          row[size_t(x)] = kInfeasible;
        } else {
          // The host budget as a price on CPU-resident bytes (Lagrangian): GPU experts save it.
          row[size_t(x)] -= host_price * double(x * pm.expert_bytes[l]);
        }
      }
    }
    sp.unit_bytes = pm.expert_bytes;
    sp.layer_bytes = pm.layer_bytes;
    sp.n_experts = e;
    for (int64_t b : budgets) sp.budget.push_back(b < 0 || b < pm.base ? -1 : b - pm.base);
    sp.first_bytes = pm.first_bytes;
    sp.last_bytes = pm.last_bytes;
    sp.expert_ws = pm.expert_ws;
    sp.staging_cap = cap;
    sp.staging_buffers = pm.staging_buffers;
    const double gen = mean_gen();
    const double hidden_bytes = 4.0 * double(opt_.model.cfg.hidden);
    const MachineCosts& m = cm_.machine();
    sp.boundary = [&m, gen, hidden_bytes](int i, int j) {
      return gen * m.transfer_us(i, j, hidden_bytes) * 1e-6;
    };
    sp.loopback = [&m, gen](int i, int j) { return gen * m.transfer_us(i, j, 4.0) * 1e-6; };
    return sp;
  }

  bool host_fits(const PipelineMemoryModel& pm, const std::vector<int64_t>& m) const {
    return cpu_budget_ < 0 || pm.cpu_need(m) <= cpu_budget_;
  }

  // The split at a staging cap within the host budget too: the host's need falls as GPU experts
  // rise, which couples the GPUs, so a price per CPU-resident byte is bisected until the split
  // fits the host (the cheapest price that does); the cost is then that of the real tables.
  SplitSolution solve_split_host(const std::vector<std::vector<double>>& tables,
                                 const PipelineMemoryModel& pm, const std::vector<int64_t>& budgets,
                                 int64_t cap, bool whole_layers, double* price_out) {
    *price_out = 0;
    SplitSolution sol = solve_split_once(tables, pm, budgets, cap, whole_layers, 0);
    if (!sol.feasible() || host_fits(pm, sol.m)) return sol;
    // The host budget only adds cost: no need to price it when the free optimum already loses.
    if (sol.cost >= host_bound_) return SplitSolution{};
    double hi = 0;
    for (size_t l = 0; l < tables.size(); ++l) {
      double lo_c = kInfeasible, hi_c = -kInfeasible;
      for (double v : tables[l]) {
        if (v >= kInfeasible) continue;
        lo_c = std::min(lo_c, v);
        hi_c = std::max(hi_c, v);
      }
      if (hi_c >= lo_c) hi = std::max(hi, 2 * (hi_c - lo_c) / double(pm.expert_bytes[l]));
    }
    hi = std::max(hi, 1e-15);
    SplitSolution at_hi = solve_split_once(tables, pm, budgets, cap, whole_layers, hi);
    if (!at_hi.feasible() || !host_fits(pm, at_hi.m)) return SplitSolution{};
    double lo = 0;
    for (int it = 0; it < 10; ++it) {
      const double mid = (lo + hi) / 2;
      SplitSolution s = solve_split_once(tables, pm, budgets, cap, whole_layers, mid);
      if (s.feasible() && host_fits(pm, s.m)) {
        hi = mid;
        at_hi = std::move(s);
      } else {
        lo = mid;
      }
    }
    const SplitProblem plain = make_split_problem(tables, pm, budgets, cap, whole_layers);
    at_hi.cost = split_evaluate(plain, at_hi.stage_of, at_hi.m);
    at_hi.method += " + host price";
    *price_out = hi;
    return at_hi;
  }

  SplitSolution solve_split_once(const std::vector<std::vector<double>>& tables,
                                 const PipelineMemoryModel& pm, const std::vector<int64_t>& budgets,
                                 int64_t cap, bool whole_layers, double price) {
    const int64_t e = cm_.n_experts();
    const SplitProblem sp = make_split_problem(tables, pm, budgets, cap, whole_layers, price);
    ++res_.solves;
    SplitSolution sol;
    if (opt_.solver == "exhaustive") {
      sol = solve_split_exhaustive(sp, 1e7);
      // Too many splits to enumerate: the split DP with exact ranges where they are small.
      if (!sol.feasible() && sol.method.find("too large") != std::string::npos) {
        sol = solve_split(sp, cm_.n_layers() <= 8 && e <= 8);
      }
    } else {
      sol = solve_split(sp, (cm_.n_layers() <= 8 && e <= 8) || opt_.solver == "dp");
    }
    if (sol.feasible() && price > 0) {
      sol.cost = split_evaluate(make_split_problem(tables, pm, budgets, cap, whole_layers),
                                sol.stage_of, sol.m);
    }
    return sol;
  }

  // Solves at a staging cap, then again at the largest CPU set the solution has.
  SplitSolution solve_split_at_cap(const std::vector<std::vector<double>>& tables,
                                   const PipelineMemoryModel& pm,
                                   const std::vector<int64_t>& budgets, int64_t cap,
                                   bool whole_layers, double* price_out = nullptr) {
    SplitSolution best;
    double best_price = 0;
    const int64_t e = cm_.n_experts();
    for (int round = 0; round < 4; ++round) {
      double price = 0;
      SplitSolution sol = solve_split_host(tables, pm, budgets, cap, whole_layers, &price);
      if (!sol.feasible()) break;
      int64_t largest = 0;
      for (int64_t m : sol.m) largest = std::max(largest, e - m);
      if (sol.cost < best.cost) {
        best = std::move(sol);
        best_price = price;
      }
      if (largest >= cap) break;
      cap = largest;
    }
    if (price_out != nullptr) *price_out = best_price;
    return best;
  }

  static std::string layers_text(const Stages& st, int ng) {
    std::vector<int64_t> n(size_t(ng), 0);
    for (int g : st) n[size_t(g)] += 1;
    std::string s;
    for (int64_t x : n) s += (s.empty() ? "" : "/") + std::to_string(x);
    return s;
  }

  // Several GPUs: the layer split and each layer's GPU experts chosen together (search/split.h)
  // for the best settings of the one-GPU search, then compared with the even layer split.
  void search_multi(bool graph) {
    const MachineCosts& m = cm_.machine();
    const int ng = int(m.gpus.size());
    std::vector<int64_t> budgets;
    std::vector<int> usable;
    for (int g = 0; g < ng; ++g) {
      budgets.push_back(budget_of(m.gpus[size_t(g)].device));
      if (budgets.back() >= 0) usable.push_back(g);
    }
    if (usable.size() < 2) {
      if (graph) {
        res_.notes.push_back(fmt::format("{} GPUs in the profile but {} with a budget: no split",
                                         ng, usable.size()));
      }
      return;
    }
    const PipelineMemoryModel pm = pipeline_memory_model(opt_.model, graph, opt_.workload.context);
    // The layer split runs no PCIe assist (the engine's pipeline stages share one CPU side).
    std::vector<EngineSettings> sets;
    for (EngineSettings s : top_settings_[graph ? 1 : 0]) {
      s.pcie_assist_permille = 0;
      if (std::find(sets.begin(), sets.end(), s) == sets.end()) sets.push_back(s);
    }
    if (sets.empty()) {
      for (const EngineSettings& s : settings_for(graph)) {
        if (sets.size() < 2 && s.pcie_assist_permille == 0) sets.push_back(s);
      }
    }
    const int64_t e = cm_.n_experts();
    std::set<int64_t> caps_set = {0, e};
    for (int64_t v : {1, 2, 4, 8, 16, 32, 64}) {
      if (v < e) caps_set.insert(v);
    }
    struct Best {
      EngineSettings s;
      SplitSolution sol;
      int64_t cap = 0;
      double price = 0;  // the host-memory price the split needed (0: the host fits anyway)
      double objective = kInfeasible;
    };
    Best best;
    pm_now_ = &pm;
    struct Reset {
      const PipelineMemoryModel*& p;
      ~Reset() { p = nullptr; }
    } reset{pm_now_};
    for (const EngineSettings& s : sets) {
      const auto& tables = tables_for(s);
      const double constant = cm_.constant_s(s);
      for (int64_t cap : caps_set) {
        double price = 0;
        host_bound_ = best.objective - constant;
        SplitSolution sol = solve_split_at_cap(tables, pm, budgets, cap, false, &price);
        host_bound_ = kInfeasible;
        if (sol.feasible() && sol.cost + constant < best.objective) {
          best.objective = sol.cost + constant;
          best.s = s;
          best.sol = std::move(sol);
          best.cap = cap;
          best.price = price;
        }
      }
    }
    if (!best.sol.feasible()) {
      res_.notes.push_back(fmt::format("graph {}: no split over {} GPUs fits the budgets",
                                       graph ? "on" : "off", usable.size()));
      return;
    }
    // The DP prices prefill per layer, unpipelined; the pipeline overlaps chunks across GPUs,
    // which favours more GPUs and balanced stages: refine_split moves the boundaries under the
    // exact prediction.
    const auto& best_tables = tables_for(best.s);
    const SplitProblem sp_best =
        make_split_problem(best_tables, pm, budgets, best.cap, false, best.price);
    const Refined ref = refine_split(best.s, sp_best, best.sol, usable);
    const Stages best_st = ref.stages;
    const std::vector<int64_t> best_m = ref.m;
    const int used = int(stage_gpus(best_st).size());
    Candidate* cand =
        add_candidate_split(best.s, best_m, best_st,
                            fmt::format("search ({} of {} GPUs, layers {}; {} + boundaries)", used,
                                        ng, layers_text(best_st, ng), best.sol.method));
    const double split_t = cand != nullptr ? cand->pred.request_s : kInfeasible;

    // The even layer split over every GPU with a budget, experts per GPU by the same solvers.
    const auto& tables = tables_for(best.s);
    const std::vector<int64_t> per = even_split(cm_.n_layers(), int(usable.size()));
    Stages even;
    for (size_t i = 0; i < usable.size(); ++i) {
      for (int64_t k = 0; k < per[i]; ++k) even.push_back(usable[i]);
    }
    std::vector<int64_t> even_m(size_t(cm_.n_layers()), 0);
    bool even_ok = false;
    for (int64_t cap : caps_set) {
      const SplitProblem sp = make_split_problem(tables, pm, budgets, cap, false, best.price);
      std::vector<int64_t> mm(size_t(cm_.n_layers()), 0);
      bool ok = true;
      for (size_t i = 0, a = 0; i < usable.size() && ok; a += size_t(per[i]), ++i) {
        const Solution r =
            solve_range(sp, usable[i], int64_t(a), int64_t(a) + per[i],
                        cm_.n_layers() <= 8 ? RangeSolver::Exact : RangeSolver::Full);
        ok = r.feasible();
        for (int64_t k = 0; ok && k < per[i]; ++k) mm[a + size_t(k)] = r.m[size_t(k)];
      }
      if (!ok || !host_fits(pm, mm)) continue;
      // Each cap's solution fits under its own cap; the transfers are the same: compare the
      // tables' sums.
      auto sum = [&](const std::vector<int64_t>& v) {
        double t = 0;
        for (size_t l = 0; l < v.size(); ++l) t += tables[l][size_t(v[l])];
        return t;
      };
      if (!even_ok || sum(mm) < sum(even_m)) {
        even_m = mm;
        even_ok = true;
      }
    }
    SearchResult::SplitComparison cmp;
    cmp.settings = best.s.describe();
    const Stages& stage_of = best_st;
    cmp.gpus = int(usable.size());
    cmp.split_request_s = split_t;
    for (int g = 0; g < ng; ++g) {
      int64_t n = 0, ne = 0;
      for (int x : stage_of) n += x == g ? 1 : 0;
      for (int x : even) ne += x == g ? 1 : 0;
      cmp.layers_per_gpu.push_back(n);
      cmp.even_layers_per_gpu.push_back(ne);
    }
    if (even_ok) {
      Candidate c =
          make_candidate_sets(best.s, hottest_sets(cm_.router(), even_m),
                              fmt::format("baseline: even layer split ({} GPUs, layers {})",
                                          usable.size(), layers_text(even, ng)),
                              even);
      c.baseline = true;
      cmp.even_request_s = c.pred.request_s;
      if (fits(c)) res_.baselines.push_back(std::move(c));
    } else {
      res_.notes.push_back(
          fmt::format("graph {}: the even layer split over {} GPUs does not fit the budgets",
                      graph ? "on" : "off", usable.size()));
    }
    if (cand != nullptr) res_.split_vs_even.push_back(cmp);

    // Whole layers over the GPUs (the exports).
    SplitSolution whole;
    double whole_price = 0;
    for (int64_t cap : {e, int64_t{0}}) {
      double price = 0;
      SplitSolution sol = solve_split_at_cap(tables, pm, budgets, cap, true, &price);
      if (sol.feasible() && sol.cost < whole.cost) {
        whole = std::move(sol);
        whole_price = price;
      }
    }
    if (whole.feasible()) {
      int64_t cap = 0;
      for (int64_t m : whole.m) cap = std::max(cap, e - m);
      const Refined r = refine_split(
          best.s, make_split_problem(tables, pm, budgets, cap, true, whole_price), whole, usable);
      Candidate c =
          make_candidate(best.s, r.m,
                         fmt::format("whole layers ({} GPUs, layers {})",
                                     stage_gpus(r.stages).size(), layers_text(r.stages, ng)),
                         r.stages);
      c.whole_layers = true;
      if (fits(c)) {
        bool replaced = false;
        for (Candidate& w : res_.whole_layer) {
          if (w.settings.cuda_graph == c.settings.cuda_graph) {
            if (c.pred.request_s < w.pred.request_s) w = c;
            replaced = true;
          }
        }
        if (!replaced) res_.whole_layer.push_back(std::move(c));
      }
    }
  }

  struct Refined {
    Stages stages;
    std::vector<int64_t> m;
    double request_s = kInfeasible;
  };

  // Hill climbing on the layers per GPU (moves of 8, 4, 2, 1 layers between neighbouring GPUs,
  // an unused GPU included) under the exact prediction, each range's experts by the greedy
  // solver, from the DP's split and from even splits over the first 2..N usable GPUs; the result's
  // ranges once more with the full solvers.
  Refined refine_split(const EngineSettings& s, const SplitProblem& sp, const SplitSolution& dp,
                       const std::vector<int>& usable) {
    const int ng = int(sp.budget.size());
    Refined best;
    std::vector<int64_t> best_n(size_t(ng), 0);
    for (int g : dp.stage_of) best_n[size_t(g)] += 1;
    best.m = dp.m;
    best.request_s = predict_split(s, dp.m, dp.stage_of);
    std::map<std::tuple<int, int64_t, int64_t>, Solution> memo;
    std::vector<std::vector<int64_t>> starts = {best_n};
    for (size_t k = 2; k <= usable.size(); ++k) {
      const std::vector<int64_t> per = even_split(cm_.n_layers(), int(k));
      std::vector<int64_t> n(size_t(ng), 0);
      for (size_t i = 0; i < k; ++i) n[size_t(usable[i])] = per[i];
      starts.push_back(n);
    }
    int evals = 0;
    for (const auto& start : starts) {
      std::vector<int64_t> cur = start, cur_m;
      double cur_t = eval_counts(s, sp, cur, memo, &cur_m);
      ++evals;
      for (bool improved = true; improved && evals < 600;) {
        improved = false;
        for (int64_t d : {8, 4, 2, 1}) {
          for (int g = 0; g + 1 < ng; ++g) {
            for (int dir : {1, -1}) {
              std::vector<int64_t> n = cur;
              const size_t from = size_t(dir > 0 ? g : g + 1), to = size_t(dir > 0 ? g + 1 : g);
              if (n[from] < d) continue;
              n[from] -= d;
              n[to] += d;
              std::vector<int64_t> m;
              const double t = eval_counts(s, sp, n, memo, &m);
              ++evals;
              if (t < cur_t * (1 - 1e-9)) {
                cur = n;
                cur_t = t;
                cur_m = m;
                improved = true;
              }
            }
          }
        }
      }
      if (cur_t < best.request_s * (1 - 1e-9)) {
        best.request_s = cur_t;
        best_n = cur;
        best.m = cur_m;
      }
    }
    best.stages = stages_from_counts(best_n);
    std::vector<int64_t> m(size_t(cm_.n_layers()), 0);
    bool ok = true;
    int64_t a = 0;
    for (int g = 0; g < ng && ok; ++g) {
      if (best_n[size_t(g)] == 0) continue;
      const Solution r = solve_range(sp, g, a, a + best_n[size_t(g)],
                                     cm_.n_layers() <= 8 ? RangeSolver::Exact : RangeSolver::Full);
      ok = r.feasible();
      for (int64_t k = 0; ok && k < best_n[size_t(g)]; ++k) m[size_t(a + k)] = r.m[size_t(k)];
      a += best_n[size_t(g)];
    }
    if (ok && (pm_now_ == nullptr || host_fits(*pm_now_, m))) {
      const double t = predict_split(s, m, best.stages);
      if (t < best.request_s) {
        best.request_s = t;
        best.m = m;
      }
    }
    return best;
  }

  double predict_split(const EngineSettings& s, const std::vector<int64_t>& m,
                       const Stages& st) const {
    std::vector<LayerSplit> splits;
    for (size_t l = 0; l < m.size(); ++l) splits.push_back(cm_.hottest_split(int64_t(l), m[l]));
    return cm_.predict(splits, s, st).request_s;
  }

  // Exact request time of `n` layers per GPU, each range's experts by the greedy solver (memo:
  // a range's solution does not depend on the others).
  double eval_counts(const EngineSettings& s, const SplitProblem& sp, const std::vector<int64_t>& n,
                     std::map<std::tuple<int, int64_t, int64_t>, Solution>& memo,
                     std::vector<int64_t>* m_out) const {
    std::vector<int64_t> m(size_t(cm_.n_layers()), 0);
    int64_t a = 0;
    for (size_t g = 0; g < n.size(); ++g) {
      if (n[g] == 0) continue;
      const auto key = std::make_tuple(int(g), a, a + n[g]);
      auto it = memo.find(key);
      if (it == memo.end()) {
        it = memo.emplace(key, solve_range(sp, int(g), a, a + n[g], RangeSolver::Greedy)).first;
      }
      if (!it->second.feasible()) return kInfeasible;
      for (int64_t k = 0; k < n[g]; ++k) m[size_t(a + k)] = it->second.m[size_t(k)];
      a += n[g];
    }
    if (pm_now_ != nullptr && !host_fits(*pm_now_, m)) return kInfeasible;
    const double t = predict_split(s, m, stages_from_counts(n));
    if (m_out != nullptr) *m_out = std::move(m);
    return t;
  }

  Candidate* add_candidate_split(const EngineSettings& s, const std::vector<int64_t>& counts,
                                 const Stages& st, const std::string& label) {
    Candidate c = make_candidate(s, counts, label, st);
    if (!fits(c)) return nullptr;
    pool_.push_back(std::move(c));
    return &pool_.back();
  }

  Candidate make_candidate(const EngineSettings& s, const std::vector<int64_t>& counts,
                           const std::string& label, const Stages& st = {}) const {
    return make_candidate_sets(s, hottest_sets(cm_.router(), counts), label, st);
  }

  Candidate make_candidate_sets(const EngineSettings& s, std::vector<std::vector<bool>> on_gpu,
                                const std::string& label, const Stages& st = {}) const {
    Candidate c;
    c.label = label;
    c.settings = s;
    c.on_gpu = std::move(on_gpu);
    c.stages = s.gpu ? st : Stages{};
    std::vector<LayerSplit> splits;
    for (size_t l = 0; l < c.on_gpu.size(); ++l) {
      int64_t n = 0;
      for (bool b : c.on_gpu[l]) n += (b && s.gpu) ? 1 : 0;
      c.gpu_counts.push_back(n);
      splits.push_back(s.gpu ? cm_.split_of(int64_t(l), c.on_gpu[l])
                             : cm_.hottest_split(int64_t(l), 0));
    }
    c.pred = cm_.predict(splits, s, c.stages);
    c.placement = c.stages.empty()
                      ? make_placement(opt_.model, s, c.on_gpu, opt_.workload.context,
                                       s.gpu ? cm_.machine().gpu_device : "cuda:0",
                                       opt_.workload.batch)
                      : make_pipeline_placement(opt_.model, s, c.on_gpu, opt_.workload.context,
                                                gpu_devices(), c.stages, opt_.workload.batch);
    c.plan = plan_memory(opt_.model.cfg, opt_.model.bytes, c.placement, opt_.budgets);
    Predicted pr;
    pr.decode_tok_s = c.pred.decode_tok_s;
    pr.prefill_tok_s = c.pred.prefill_tok_s;
    for (const auto& [dev, u] : c.plan.per_device) {
      pr.memory_gib[Device::parse(dev, "plan")] = double(u.total) / double(kGiB);
    }
    c.placement.predicted = pr;
    c.placement.searched_on = SearchedOn{
        opt_.router_stats_path.empty() ? opt_.profile_path : opt_.router_stats_path,
        cm_.router().digest};
    return c;
  }

public:
  std::vector<Candidate> predict(const std::vector<Placement>& ps) const {
    const ModelConfig& c = opt_.model.cfg;
    const MachineCosts& m = cm_.machine();
    std::vector<Candidate> out;
    for (const Placement& p : ps) {
      const std::string where = p.file.empty() ? "placement" : p.file;
      if (p.n_layers() != c.n_layers || p.n_experts() != c.n_experts) {
        throw Error(where,
                    fmt::format("has {} layers x {} experts, the model {} x {}", p.n_layers(),
                                p.n_experts(), c.n_layers, c.n_experts),
                    "predict placements written for this model");
      }
      EngineSettings s;
      s.gpu = p.layers[0].attention.is_gpu();
      s.cuda_graph = p.runtime.cuda_graph;
      s.kernel = p.runtime.moe_kernel;
      s.handoff = p.runtime.cpu_handoff;
      s.pcie_assist_permille = p.runtime.pcie_assist_permille;
      s.cpu_threads = p.runtime.cpu_threads > 0 ? p.runtime.cpu_threads
                      : s.gpu                   ? hybrid_thread_cap()
                                                : std::max(1, m.physical_cores);
      std::vector<std::vector<bool>> on_gpu;
      Stages st;
      bool several = false;
      for (const LayerPlacement& lp : p.layers) {
        if (lp.attention.is_gpu() != s.gpu) {
          throw Error(where, "mixes CPU and GPU attention across layers",
                      "the cost model prices one engine per placement");
        }
        std::vector<bool> g;
        for (const Device& d : lp.experts) {
          if (d.is_gpu() && !(d == lp.attention)) {
            throw Error(where, "puts a layer's experts on another GPU than its attention",
                        "keep each layer's GPU experts on its attention GPU");
          }
          g.push_back(d.is_gpu());
        }
        on_gpu.push_back(std::move(g));
        int idx = 0;
        if (s.gpu) {
          idx = -1;
          for (size_t i = 0; i < m.gpus.size(); ++i) {
            if (m.gpus[i].device == lp.attention.to_string()) idx = int(i);
          }
          if (idx < 0 && m.gpus.empty() && lp.attention.to_string() == m.gpu_device) idx = 0;
          if (idx < 0) {
            throw Error(where, lp.attention.to_string() + " is not a GPU of the profile",
                        "use a profile recorded on the machine the placement is for");
          }
        }
        several = several || idx != 0;
        st.push_back(idx);
      }
      out.push_back(make_candidate_sets(s, std::move(on_gpu), where, several ? st : Stages{}));
    }
    return out;
  }

 private:
  // The planner's verdict: every candidate the search emits must pass it.
  bool fits(const Candidate& c) {
    try {
      check_fits(c.plan);
      return true;
    } catch (const Error& e) {
      if (!c.baseline) {
        res_.notes.push_back("internal: a searched placement failed the memory planner (" +
                             std::string(e.what()) + "); it was dropped");
      }
      return false;
    }
  }

  Candidate* add_candidate(const EngineSettings& s, const std::vector<int64_t>& counts,
                           const std::string& label) {
    Candidate c = make_candidate(s, counts, label);
    const DeviceUse* cpu = nullptr;
    if (auto it = c.plan.per_device.find("cpu"); it != c.plan.per_device.end()) cpu = &it->second;
    if (!s.gpu && cpu != nullptr && cpu->budget >= 0 && cpu->total > cpu->budget) return nullptr;
    if (!fits(c)) return nullptr;
    pool_.push_back(std::move(c));
    return &pool_.back();
  }

  static std::string signature(const Candidate& c) {
    std::string s = c.settings.key() + ":";
    for (int64_t n : c.gpu_counts) s += std::to_string(n) + ",";
    s += ":";
    for (int g : c.stages) s += std::to_string(g);
    return s;
  }

  void rank() {
    std::stable_sort(pool_.begin(), pool_.end(), [](const Candidate& a, const Candidate& b) {
      return a.pred.request_s < b.pred.request_s;
    });
    std::set<std::string> seen;
    std::vector<Candidate> distinct;
    for (Candidate& c : pool_) {
      if (seen.insert(signature(c)).second) distinct.push_back(std::move(c));
    }
    auto graph_ok = [](const Candidate& c) { return !c.settings.gpu || c.settings.cuda_graph; };
    auto nograph_ok = [](const Candidate& c) { return !c.settings.gpu || !c.settings.cuda_graph; };
    const size_t keep = static_cast<size_t>(std::max(1, opt_.top));
    for (size_t i = 0; i < distinct.size(); ++i) {
      const bool g = res_.best_graph < 0 && graph_ok(distinct[i]);
      const bool ng = res_.best_nograph < 0 && nograph_ok(distinct[i]);
      if (i < keep || g || ng) {
        res_.ranked.push_back(std::move(distinct[i]));
        if (g) res_.best_graph = int(res_.ranked.size()) - 1;
        if (ng) res_.best_nograph = int(res_.ranked.size()) - 1;
      }
    }
  }

  // What users have today, priced by the same model under the same budgets and at the settings
  // of the best graph-on placement: llama.cpp's --fit (memory only: whole layers' experts front
  // to back), the best --n-cpu-moe N of a sweep, and kt-kernel's uniform split (the same expert
  // ids on the GPU in every layer).
  void baselines() {
    if (res_.best_graph < 0) return;
    const EngineSettings s = res_.ranked[size_t(res_.best_graph)].settings;
    if (!s.gpu) return;
    const MemoryModel mm =
        memory_model(opt_.model, s.cuda_graph, opt_.workload.context, cm_.machine().gpu_device,
                     opt_.workload.batch);
    const int64_t gpu_budget = budget_of(cm_.machine().gpu_device);
    const int64_t nl = cm_.n_layers(), ne = cm_.n_experts();
    auto ok = [&](const std::vector<int64_t>& counts) {
      return mm.gpu_need(counts) <= gpu_budget &&
             (cpu_budget_ < 0 || mm.cpu_need(counts) <= cpu_budget_);
    };
    auto layers_split = [&](int64_t first_cpu, int64_t n_cpu) {
      std::vector<int64_t> counts(size_t(nl), ne);
      for (int64_t l = first_cpu; l < first_cpu + n_cpu; ++l) counts[size_t(l)] = 0;
      return counts;
    };
    auto push = [&](std::vector<std::vector<bool>> sets, const std::string& label) {
      Candidate c = make_candidate_sets(s, std::move(sets), label);
      c.baseline = true;
      if (fits(c)) res_.baselines.push_back(std::move(c));
    };
    auto whole = [&](const std::vector<int64_t>& counts) {
      std::vector<std::vector<bool>> sets;
      for (int64_t n : counts) sets.emplace_back(size_t(ne), n == ne);
      return sets;
    };
    for (int64_t n = nl; n >= 0; --n) {  // front to back: the first n layers' experts on the GPU
      const std::vector<int64_t> counts = layers_split(n, nl - n);
      if (ok(counts)) {
        push(whole(counts),
             fmt::format("baseline: llama.cpp --fit (experts of layers 0-{} on GPU)", n - 1));
        break;
      }
    }
    double best_t = kInfeasible;
    int64_t best_n = -1;
    for (int64_t n = 0; n <= nl; ++n) {  // --n-cpu-moe N: the first N layers' experts on the CPU
      const std::vector<int64_t> counts = layers_split(0, n);
      if (!ok(counts)) continue;
      std::vector<LayerSplit> splits;
      for (int64_t l = 0; l < nl; ++l) splits.push_back(cm_.hottest_split(l, counts[size_t(l)]));
      const double t = cm_.predict(splits, s).request_s;
      if (t < best_t) {
        best_t = t;
        best_n = n;
      }
    }
    if (best_n >= 0) {
      push(whole(layers_split(0, best_n)), fmt::format("baseline: best --n-cpu-moe ({})", best_n));
    }
    for (int64_t m = ne; m >= 0; --m) {  // uniform: experts 0..m-1 of every layer
      if (!ok(std::vector<int64_t>(size_t(nl), m))) continue;
      std::vector<std::vector<bool>> sets(size_t(nl), std::vector<bool>(size_t(ne), false));
      for (auto& row : sets) std::fill(row.begin(), row.begin() + m, true);
      push(std::move(sets), fmt::format("baseline: ktransformers uniform ({} per layer)", m));
      break;
    }
  }

  [[noreturn]] void throw_nothing_fits(int64_t gpu_budget) const {
    std::string problem = "no placement fits the budgets";
    const int64_t nl = cm_.n_layers();
    if (cm_.machine().has_gpu && gpu_budget >= 0) {
      const MemoryModel mm =
          memory_model(opt_.model, false, opt_.workload.context, cm_.machine().gpu_device,
                     opt_.workload.batch);
      problem += fmt::format(
          ": {} needs at least {} for attention, KV cache (context {}) and "
          "workspace, its budget is {}",
          cm_.machine().gpu_device, format_gib(mm.gpu_need(std::vector<int64_t>(size_t(nl), 0))),
          opt_.workload.context, format_gib(gpu_budget));
    }
    EngineSettings s;
    s.gpu = false;
    const Placement cpu = make_placement(opt_.model, s, {}, opt_.workload.context,
                                           cm_.machine().gpu_device, opt_.workload.batch);
    const MemoryPlan plan = plan_memory(opt_.model.cfg, opt_.model.bytes, cpu, opt_.budgets);
    const DeviceUse& u = plan.per_device.at("cpu");
    problem += fmt::format("; all on the CPU needs {}, the host budget is {}", format_gib(u.total),
                           u.budget >= 0 ? format_gib(u.budget) : std::string("unknown"));
    throw Error("ktune search", problem,
                "raise --gpu-mem / --cpu-mem, or lower the workload's context");
  }

  const SearchOptions& opt_;
  CostModel cm_;
  SearchResult res_;
  std::vector<Candidate> pool_;
  int64_t cpu_budget_ = -1;
  std::map<std::string, std::vector<std::vector<double>>> tables_;
  std::vector<EngineSettings> top_settings_[2];  // [graph]: best settings of the one-GPU search
  const PipelineMemoryModel* pm_now_ = nullptr;  // of the multi-GPU search under way
  double host_bound_ = kInfeasible;              // objective to beat when pricing the host budget
};

}  // namespace

SearchResult run_search(const SearchOptions& opt) { return Driver(opt).run(); }

std::vector<Candidate> predict_placements(const SearchOptions& opt,
                                          const std::vector<Placement>& placements) {
  return Driver(opt).predict(placements);
}

}  // namespace ktune::search
