// Layer split and expert placement over several GPUs (search/split.h).
#include "search/split.h"

#include <algorithm>
#include <functional>
#include <limits>

namespace ktune::search {
namespace {

int64_t first_allowed(const SplitProblem& p, size_t l) {
  for (size_t x = 0; x < p.cost[l].size(); ++x) {
    if (p.cost[l][x] < kInfeasible) return int64_t(x);
  }
  return -1;
}

struct RangeInfo {
  int64_t fixed = 0;     // layer bytes + first/last + staging
  bool zero_ok = false;  // every layer allows m = 0
  double zero_cost = 0;  // sum of cost[l][0]
};

RangeInfo range_info(const SplitProblem& p, int64_t a, int64_t b) {
  RangeInfo r;
  const int64_t nl = int64_t(p.cost.size());
  int64_t largest = 0;
  r.zero_ok = true;
  for (int64_t l = a; l < b; ++l) {
    r.fixed += p.layer_bytes[size_t(l)];
    largest = std::max(largest, p.unit_bytes[size_t(l)]);
    const double c0 = p.cost[size_t(l)][0];
    if (c0 >= kInfeasible) r.zero_ok = false;
    r.zero_cost += c0;
  }
  if (a == 0) r.fixed += p.first_bytes;
  if (b == nl) r.fixed += p.last_bytes;
  r.fixed += p.staging_buffers * std::min(p.staging_cap, p.n_experts) * largest;
  return r;
}

// One hull step of a layer: from hull vertex v to v + 1.
struct Step {
  double ratio;  // cost decrease per byte
  int64_t layer;
  int64_t from, to;
  double gain;
};

bool step_before(const Step& x, const Step& y) {
  if (x.ratio != y.ratio) return x.ratio > y.ratio;
  if (x.layer != y.layer) return x.layer < y.layer;
  return x.from < y.from;
}

// Per layer: its smallest allowed m and the improving steps along its lower convex hull.
struct Hulls {
  std::vector<int64_t> start;
  std::vector<std::vector<Step>> steps;
};

Hulls make_hulls(const SplitProblem& p) {
  Hulls h;
  const size_t nl = p.cost.size();
  h.start.assign(nl, -1);
  h.steps.resize(nl);
  for (size_t l = 0; l < nl; ++l) {
    const int64_t s = first_allowed(p, l);
    h.start[l] = s;
    if (s < 0) continue;
    std::vector<int64_t> v;
    for (int64_t x = s; x < int64_t(p.cost[l].size()); ++x) {
      const double y = p.cost[l][size_t(x)];
      if (y >= kInfeasible) continue;
      while (v.size() >= 2) {
        const int64_t a = v[v.size() - 2], b = v.back();
        const double ya = p.cost[l][size_t(a)], yb = p.cost[l][size_t(b)];
        if ((yb - ya) * double(x - a) >= (y - ya) * double(b - a)) {
          v.pop_back();
        } else {
          break;
        }
      }
      v.push_back(x);
    }
    for (size_t i = 0; i + 1 < v.size(); ++i) {
      const double gain = p.cost[l][size_t(v[i])] - p.cost[l][size_t(v[i + 1])];
      const double bytes = double((v[i + 1] - v[i]) * p.unit_bytes[l]);
      if (gain <= 0 || bytes <= 0) break;  // convex: later steps gain less
      h.steps[l].push_back({gain / bytes, int64_t(l), v[i], v[i + 1], gain});
    }
  }
  return h;
}

// The greedy walk over a range's merged steps with `avail` bytes for experts (expert workspace
// already taken off). Returns the cost (kInfeasible when even the smallest m do not fit).
double walk(const SplitProblem& p, const Hulls& h, const std::vector<Step>& merged, int64_t a,
            int64_t b, int64_t avail, std::vector<int64_t>* m_out) {
  double cost = 0;
  int64_t bytes = 0;
  std::vector<int64_t> m(size_t(b - a));
  for (int64_t l = a; l < b; ++l) {
    const int64_t s = h.start[size_t(l)];
    if (s < 0) return kInfeasible;
    m[size_t(l - a)] = s;
    cost += p.cost[size_t(l)][size_t(s)];
    bytes += s * p.unit_bytes[size_t(l)];
  }
  if (bytes > avail) return kInfeasible;
  std::vector<char> blocked(size_t(b - a), 0);
  for (const Step& st : merged) {
    const size_t i = size_t(st.layer - a);
    if (blocked[i] || m[i] != st.from) continue;
    const int64_t db = (st.to - st.from) * p.unit_bytes[size_t(st.layer)];
    if (bytes + db > avail) {
      blocked[i] = 1;
      continue;
    }
    bytes += db;
    cost -= st.gain;
    m[i] = st.to;
  }
  if (m_out != nullptr) *m_out = std::move(m);
  return cost;
}

Problem range_problem(const SplitProblem& p, int64_t a, int64_t b, int64_t avail) {
  Problem q;
  for (int64_t l = a; l < b; ++l) {
    q.cost.push_back(p.cost[size_t(l)]);
    q.unit_bytes.push_back(p.unit_bytes[size_t(l)]);
  }
  q.budget = avail;
  return q;
}

}  // namespace

double SplitProblem::pipeline_cost(const std::vector<int>& gpus) const {
  double c = 0;
  for (size_t i = 1; i < gpus.size(); ++i) c += boundary ? boundary(gpus[i - 1], gpus[i]) : 0.0;
  if (gpus.size() > 1 && loopback) c += loopback(gpus.back(), gpus.front());
  return c;
}

int64_t split_gpu_bytes(const SplitProblem& p, const std::vector<int>& stage_of,
                        const std::vector<int64_t>& m, int g) {
  int64_t a = -1, b = -1, experts = 0;
  for (size_t l = 0; l < stage_of.size(); ++l) {
    if (stage_of[l] != g) continue;
    if (a < 0) a = int64_t(l);
    b = int64_t(l) + 1;
    experts += m[l] * p.unit_bytes[l];
  }
  if (a < 0) return 0;
  bool any = false;
  for (int64_t l = a; l < b; ++l) any = any || m[size_t(l)] > 0;
  return range_info(p, a, b).fixed + experts + (any ? p.expert_ws : 0);
}

double split_evaluate(const SplitProblem& p, const std::vector<int>& stage_of,
                      const std::vector<int64_t>& m) {
  const size_t nl = p.cost.size();
  if (stage_of.size() != nl || m.size() != nl || nl == 0) return kInfeasible;
  std::vector<int> used;
  double cost = 0;
  for (size_t l = 0; l < nl; ++l) {
    if (l > 0 && stage_of[l] < stage_of[l - 1]) return kInfeasible;
    const int g = stage_of[l];
    if (g < 0 || g >= int(p.budget.size()) || p.budget[size_t(g)] < 0) return kInfeasible;
    if (m[l] < 0 || m[l] >= int64_t(p.cost[l].size())) return kInfeasible;
    if (m[l] < p.n_experts - p.staging_cap) return kInfeasible;
    cost += p.cost[l][size_t(m[l])];
    if (used.empty() || used.back() != g) used.push_back(g);
  }
  for (int g : used) {
    if (split_gpu_bytes(p, stage_of, m, g) > p.budget[size_t(g)]) return kInfeasible;
  }
  return cost >= kInfeasible ? kInfeasible : cost + p.pipeline_cost(used);
}

namespace {

Solution solve_range_budget(const SplitProblem& p, int64_t budget, int64_t a, int64_t b,
                            RangeSolver how) {
  Solution best;
  const RangeInfo ri = range_info(p, a, b);
  const int64_t avail = budget - ri.fixed;
  if (ri.zero_ok && avail >= 0) {
    best = Solution{std::vector<int64_t>(size_t(b - a), 0), ri.zero_cost, 0, "no gpu experts"};
  }
  const Problem q = range_problem(p, a, b, avail - p.expert_ws);
  if (q.budget < 0) return best;
  std::vector<Solution> tries;
  if (how == RangeSolver::Exact) {
    tries.push_back(exhaustive_size(q) <= 2e6 ? solve_exhaustive(q, 2e6) : solve_dp(q, 4096));
  } else {
    tries.push_back(solve_greedy(q));
    if (how == RangeSolver::Full) tries.push_back(solve_dp(q));
  }
  for (Solution& s : tries) {
    if (s.feasible() && s.cost < best.cost - 1e-15) best = std::move(s);
  }
  return best;
}

}  // namespace

Solution solve_range(const SplitProblem& p, int g, int64_t a, int64_t b, RangeSolver how) {
  if (g < 0 || g >= int(p.budget.size()) || p.budget[size_t(g)] < 0 || a >= b) return {};
  return solve_range_budget(p, p.budget[size_t(g)], a, b, how);
}

SplitSolution solve_split(const SplitProblem& p, bool exact_ranges) {
  const int64_t nl = int64_t(p.cost.size());
  const int ng = int(p.budget.size());
  SplitSolution out;
  out.method = exact_ranges ? "split dp (exact ranges)" : "split dp (greedy ranges)";
  if (nl == 0 || ng == 0) return out;
  const Hulls hulls = make_hulls(p);
  // range[c][a][b - a - 1]: best cost of layers [a, b) on a GPU of budget class c.
  std::vector<int64_t> classes;
  std::vector<int> class_of(size_t(ng), -1);
  for (int g = 0; g < ng; ++g) {
    if (p.budget[size_t(g)] < 0) continue;
    auto it = std::find(classes.begin(), classes.end(), p.budget[size_t(g)]);
    class_of[size_t(g)] = int(it - classes.begin());
    if (it == classes.end()) classes.push_back(p.budget[size_t(g)]);
  }
  std::vector<std::vector<std::vector<double>>> range(classes.size());
  for (size_t c = 0; c < classes.size(); ++c) {
    range[c].resize(size_t(nl));
    for (int64_t a = 0; a < nl; ++a) {
      range[c][size_t(a)].assign(size_t(nl - a), kInfeasible);
      std::vector<Step> merged, next;
      for (int64_t b = a + 1; b <= nl; ++b) {
        const RangeInfo ri = range_info(p, a, b);
        const int64_t avail = classes[c] - ri.fixed;
        if (avail < 0) break;  // longer ranges only need more
        double best = ri.zero_ok ? ri.zero_cost : kInfeasible;
        if (exact_ranges) {
          best = std::min(best, solve_range_budget(p, classes[c], a, b, RangeSolver::Exact).cost);
        } else {
          const auto& add = hulls.steps[size_t(b - 1)];
          next.resize(merged.size() + add.size());
          std::merge(merged.begin(), merged.end(), add.begin(), add.end(), next.begin(),
                     step_before);
          merged.swap(next);
          if (avail - p.expert_ws >= 0) {
            best = std::min(best, walk(p, hulls, merged, a, b, avail - p.expert_ws, nullptr));
          }
        }
        range[c][size_t(a)][size_t(b - a - 1)] = best;
      }
    }
  }
  auto rcost = [&](int g, int64_t a, int64_t b) {
    const int c = class_of[size_t(g)];
    return c < 0 ? kInfeasible : range[size_t(c)][size_t(a)][size_t(b - a - 1)];
  };
  // For each first GPU f: F[g][b] = best cost of layers [0, b) with GPU g holding the range that
  // ends at b; the pipeline's boundaries as edges, the loop back added at the end.
  struct From {
    int g = -1;
    int64_t a = -1;
  };
  double best_total = kInfeasible;
  std::vector<std::pair<int, std::pair<int64_t, int64_t>>> best_ranges;  // (gpu, [a, b))
  for (int f = 0; f < ng; ++f) {
    if (class_of[size_t(f)] < 0) continue;
    std::vector<std::vector<double>> F(size_t(ng),
                                       std::vector<double>(size_t(nl) + 1, kInfeasible));
    std::vector<std::vector<From>> from(size_t(ng), std::vector<From>(size_t(nl) + 1));
    for (int64_t b = 1; b <= nl; ++b) F[size_t(f)][size_t(b)] = rcost(f, 0, b);
    for (int g = f + 1; g < ng; ++g) {
      if (class_of[size_t(g)] < 0) continue;
      for (int gp = f; gp < g; ++gp) {
        if (class_of[size_t(gp)] < 0) continue;
        const double edge = p.boundary ? p.boundary(gp, g) : 0.0;
        for (int64_t a = 1; a < nl; ++a) {
          const double base = F[size_t(gp)][size_t(a)];
          if (base >= kInfeasible) continue;
          for (int64_t b = a + 1; b <= nl; ++b) {
            const double r = rcost(g, a, b);
            if (r >= kInfeasible) break;  // longer ranges need more bytes
            const double v = base + edge + r;
            if (v < F[size_t(g)][size_t(b)]) {
              F[size_t(g)][size_t(b)] = v;
              from[size_t(g)][size_t(b)] = {gp, a};
            }
          }
        }
      }
    }
    for (int g = f; g < ng; ++g) {
      double v = F[size_t(g)][size_t(nl)];
      if (v >= kInfeasible) continue;
      if (g != f && p.loopback) v += p.loopback(g, f);
      if (v < best_total) {
        best_total = v;
        best_ranges.clear();
        int cg = g;
        int64_t b = nl;
        while (cg >= 0) {
          const From fr = from[size_t(cg)][size_t(b)];
          const int64_t a = fr.g < 0 ? 0 : fr.a;
          best_ranges.push_back({cg, {a, b}});
          if (fr.g < 0) break;
          cg = fr.g;
          b = a;
        }
        std::reverse(best_ranges.begin(), best_ranges.end());
      }
    }
  }
  if (best_total >= kInfeasible) return out;
  // The chosen ranges solved again with the full solvers (exact ones for exact_ranges).
  out.stage_of.assign(size_t(nl), 0);
  out.m.assign(size_t(nl), 0);
  for (const auto& [g, ab] : best_ranges) {
    const auto [a, b] = ab;
    const Solution s =
        solve_range(p, g, a, b, exact_ranges ? RangeSolver::Exact : RangeSolver::Full);
    std::vector<int64_t> wm;
    double wc = kInfeasible;
    if (!exact_ranges) {
      std::vector<Step> merged;
      for (int64_t l = a; l < b; ++l) {
        std::vector<Step> next(merged.size() + hulls.steps[size_t(l)].size());
        std::merge(merged.begin(), merged.end(), hulls.steps[size_t(l)].begin(),
                   hulls.steps[size_t(l)].end(), next.begin(), step_before);
        merged.swap(next);
      }
      const int64_t avail = p.budget[size_t(g)] - range_info(p, a, b).fixed - p.expert_ws;
      if (avail >= 0) wc = walk(p, hulls, merged, a, b, avail, &wm);
    }
    if (!s.feasible() && wc >= kInfeasible) {
      out.m.clear();  // cannot happen: the range's table entry came from the same solvers
      out.cost = kInfeasible;
      return out;
    }
    for (int64_t l = a; l < b; ++l) {
      out.stage_of[size_t(l)] = g;
      out.m[size_t(l)] = wc < s.cost ? wm[size_t(l - a)] : s.m[size_t(l - a)];
    }
  }
  out.cost = split_evaluate(p, out.stage_of, out.m);
  if (out.cost >= kInfeasible) out.m.clear();
  return out;
}

SplitSolution solve_split_exhaustive(const SplitProblem& p, double max_states) {
  const size_t nl = p.cost.size();
  const int ng = int(p.budget.size());
  SplitSolution best;
  best.method = "split exhaustive";
  if (nl == 0 || ng == 0) return best;
  double per_split = 1;
  for (size_t l = 0; l < nl; ++l) per_split *= double(p.cost[l].size());
  double splits = 1;  // non-decreasing sequences: C(nl + ng - 1, ng - 1)
  for (int i = 1; i < ng; ++i) splits = splits * double(nl + size_t(i)) / double(i);
  if (per_split * splits > max_states) {
    best.method = "split exhaustive (too large)";
    return best;
  }
  std::vector<int> st(nl, 0);
  std::vector<int64_t> m(nl, 0);
  std::function<void(size_t)> over_m = [&](size_t l) {
    if (l == nl) {
      const double c = split_evaluate(p, st, m);
      if (c < best.cost) {
        best.cost = c;
        best.stage_of = st;
        best.m = m;
      }
      return;
    }
    for (int64_t x = 0; x < int64_t(p.cost[l].size()); ++x) {
      if (p.cost[l][size_t(x)] >= kInfeasible) continue;
      m[l] = x;
      over_m(l + 1);
    }
  };
  std::function<void(size_t, int)> over_split = [&](size_t l, int lo) {
    if (l == nl) {
      over_m(0);
      return;
    }
    for (int g = lo; g < ng; ++g) {
      st[l] = g;
      over_split(l + 1, g);
    }
  };
  over_split(0, 0);
  return best;
}

}  // namespace ktune::search
