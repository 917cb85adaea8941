// The optimizers (search/optimizers.h).
#include "search/optimizers.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <queue>

namespace ktune::search {
namespace {

int64_t n_choices(const Problem& p, size_t l) { return static_cast<int64_t>(p.cost[l].size()); }

// Smallest allowed m of a layer (-1: none).
int64_t first_allowed(const Problem& p, size_t l) {
  for (int64_t m = 0; m < n_choices(p, l); ++m) {
    if (p.cost[l][size_t(m)] < kInfeasible) return m;
  }
  return -1;
}

// Adds GPU experts one at a time, least cost increase per byte first, until `min_bytes` is met
// (the host cannot hold more CPU experts). Returns false when the budget runs out first.
bool meet_minimum(const Problem& p, std::vector<int64_t>& m, int64_t& bytes) {
  while (bytes < p.min_bytes) {
    size_t best_l = 0;
    int64_t best_m = -1;
    double best_ratio = kInfeasible;
    for (size_t l = 0; l < m.size(); ++l) {
      for (int64_t to = m[l] + 1; to < n_choices(p, l); ++to) {
        const double c = p.cost[l][size_t(to)];
        if (c >= kInfeasible) continue;
        const int64_t db = (to - m[l]) * p.unit_bytes[l];
        if (bytes + db > p.budget) break;
        const double ratio = (c - p.cost[l][size_t(m[l])]) / double(db);
        if (ratio < best_ratio) {
          best_ratio = ratio;
          best_l = l;
          best_m = to;
        }
        break;  // the next allowed step of this layer
      }
    }
    if (best_m < 0) return false;
    bytes += (best_m - m[best_l]) * p.unit_bytes[best_l];
    m[best_l] = best_m;
  }
  return true;
}

// With the bytes left, moves any layer up to the allowed m that lowers the total most, until
// nothing fits or improves (fixes the last partial step of greedy and the DP's rounding).
void fill(const Problem& p, std::vector<int64_t>& m, int64_t& bytes, size_t frozen = SIZE_MAX) {
  for (int iter = 0; iter < 4096; ++iter) {
    double best_gain = 0;
    size_t best_l = 0;
    int64_t best_m = -1;
    for (size_t l = 0; l < m.size(); ++l) {
      if (l == frozen) continue;
      const double now = p.cost[l][size_t(m[l])];
      for (int64_t to = m[l] + 1; to < n_choices(p, l); ++to) {
        const int64_t db = (to - m[l]) * p.unit_bytes[l];
        if (bytes + db > p.budget) break;
        const double gain = now - p.cost[l][size_t(to)];
        if (gain > best_gain * (1 + 1e-12) + 1e-15) {
          best_gain = gain;
          best_l = l;
          best_m = to;
        }
      }
    }
    if (best_m < 0) return;
    bytes += (best_m - m[best_l]) * p.unit_bytes[best_l];
    m[best_l] = best_m;
  }
}

// Local search over moves of two layers: take experts off layer a (or none), give the bytes
// freed plus those left to layer b's best point within them. Fixes what one-layer-at-a-time
// steps miss when a step is large against the budget (small instances); a move is kept only
// when it lowers the total. Cost per round: layers^2 x experts.
void exchange(const Problem& p, std::vector<int64_t>& m, int64_t& bytes) {
  const size_t nl = m.size();
  for (int round = 0; round < 200; ++round) {
    // up[b][k]: the cheapest allowed point of layer b within k more experts.
    std::vector<std::vector<std::pair<double, int64_t>>> up(nl);
    for (size_t b = 0; b < nl; ++b) {
      std::pair<double, int64_t> best{p.cost[b][size_t(m[b])], m[b]};
      for (int64_t y = m[b]; y < n_choices(p, b); ++y) {
        if (p.cost[b][size_t(y)] < best.first) best = {p.cost[b][size_t(y)], y};
        up[b].push_back(best);
      }
    }
    double best_gain = 1e-12;
    size_t ba = 0, bb = 0;
    int64_t bx = -1, by = -1;
    const int64_t left = p.budget - bytes;
    for (size_t a = 0; a < nl; ++a) {
      const double now_a = p.cost[a][size_t(m[a])];
      for (int64_t x = 0; x <= m[a]; ++x) {
        const double ca = p.cost[a][size_t(x)];
        if (ca >= kInfeasible) continue;
        const int64_t freed = (m[a] - x) * p.unit_bytes[a];
        const double loss = ca - now_a;
        if (x < m[a] && -loss > best_gain && bytes - freed >= p.min_bytes) {
          best_gain = -loss;
          ba = a, bx = x, bb = a, by = x;
        }
        for (size_t b = 0; b < nl; ++b) {
          if (b == a || p.unit_bytes[b] <= 0) continue;
          const int64_t k =
              std::min<int64_t>(int64_t(up[b].size()) - 1, (left + freed) / p.unit_bytes[b]);
          if (k <= 0) continue;
          const auto& [cb, y] = up[b][size_t(k)];
          const double gain = p.cost[b][size_t(m[b])] - cb - loss;
          const int64_t nb = bytes - freed + (y - m[b]) * p.unit_bytes[b];
          if (gain > best_gain && nb >= p.min_bytes) {
            best_gain = gain;
            ba = a, bx = x, bb = b, by = y;
          }
        }
      }
    }
    if (bx < 0) return;
    bytes += (bx - m[ba]) * p.unit_bytes[ba];
    m[ba] = bx;
    if (bb != ba) {
      bytes += (by - m[bb]) * p.unit_bytes[bb];
      m[bb] = by;
    }
  }
}

// Ruin and recreate for small instances: empties one layer, refills by gain, exchanges; kept
// when better. Reaches moves of three or more layers that pair exchanges cannot.
void improve_small(const Problem& p, std::vector<int64_t>& m, int64_t& bytes) {
  exchange(p, m, bytes);
  double best = evaluate(p, m);
  for (int round = 0; round < 20; ++round) {
    bool improved = false;
    for (size_t a = 0; a < m.size(); ++a) {
      std::vector<int64_t> m2 = m;
      int64_t b2 = bytes - (m2[a] - first_allowed(p, a)) * p.unit_bytes[a];
      m2[a] = first_allowed(p, a);
      if (!meet_minimum(p, m2, b2)) continue;
      fill(p, m2, b2, a);  // the others first, then the exchanges may give some back to a
      exchange(p, m2, b2);
      const double c = evaluate(p, m2);
      if (c < best - 1e-12) {
        best = c;
        m = std::move(m2);
        bytes = b2;
        improved = true;
      }
    }
    if (!improved) return;
  }
}

Solution finish(const Problem& p, std::vector<int64_t> m, const char* method) {
  Solution s;
  s.method = method;
  int64_t bytes = 0;
  for (size_t l = 0; l < m.size(); ++l) bytes += m[l] * p.unit_bytes[l];
  if (bytes > p.budget) return s;
  if (!meet_minimum(p, m, bytes)) return s;
  fill(p, m, bytes);
  // Small instances (where one step is large against the budget): two-layer exchanges.
  int64_t choices = 0;
  for (size_t l = 0; l < m.size(); ++l) choices += n_choices(p, l);
  if (double(choices) * double(m.size()) <= 2e4) improve_small(p, m, bytes);
  s.cost = evaluate(p, m, &s.bytes);
  if (s.cost < kInfeasible) s.m = std::move(m);
  return s;
}

}  // namespace

double evaluate(const Problem& p, const std::vector<int64_t>& m, int64_t* bytes_out) {
  if (m.size() != p.cost.size()) return kInfeasible;
  double c = 0;
  int64_t bytes = 0;
  for (size_t l = 0; l < m.size(); ++l) {
    if (m[l] < 0 || m[l] >= n_choices(p, l)) return kInfeasible;
    c += p.cost[l][size_t(m[l])];
    bytes += m[l] * p.unit_bytes[l];
  }
  if (bytes_out != nullptr) *bytes_out = bytes;
  if (bytes > p.budget || bytes < p.min_bytes) return kInfeasible;
  return c;
}

Solution solve_greedy(const Problem& p) {
  const size_t nl = p.cost.size();
  std::vector<int64_t> m(nl, 0);
  int64_t bytes = 0;
  // Each layer's lower convex hull over its allowed points, from its smallest allowed m.
  std::vector<std::vector<int64_t>> hull(nl);
  for (size_t l = 0; l < nl; ++l) {
    const int64_t start = first_allowed(p, l);
    if (start < 0) return Solution{{}, kInfeasible, 0, "greedy"};
    m[l] = start;
    bytes += start * p.unit_bytes[l];
    std::vector<int64_t>& h = hull[l];
    for (int64_t x = start; x < n_choices(p, l); ++x) {
      const double y = p.cost[l][size_t(x)];
      if (y >= kInfeasible) continue;
      while (h.size() >= 2) {
        const int64_t a = h[h.size() - 2], b = h.back();
        const double ya = p.cost[l][size_t(a)], yb = p.cost[l][size_t(b)];
        // Drop b when it lies on or above the segment a -> x.
        if ((yb - ya) * double(x - a) >= (y - ya) * double(b - a)) {
          h.pop_back();
        } else {
          break;
        }
      }
      h.push_back(x);
    }
  }
  if (bytes > p.budget) return Solution{{}, kInfeasible, 0, "greedy"};
  const std::vector<int64_t> start = m;
  // Steps along the hulls, best cost decrease per byte first.
  struct Step {
    double ratio;  // cost decrease per byte (> 0 improves)
    size_t layer;
    size_t vertex;  // step from hull[layer][vertex] to hull[layer][vertex + 1]
    bool operator<(const Step& o) const { return ratio < o.ratio; }
  };
  std::priority_queue<Step> queue;
  auto push = [&](size_t l, size_t v) {
    const std::vector<int64_t>& h = hull[l];
    if (v + 1 >= h.size() || p.unit_bytes[l] <= 0) return;
    const double dc = p.cost[l][size_t(h[v])] - p.cost[l][size_t(h[v + 1])];
    const double db = double((h[v + 1] - h[v]) * p.unit_bytes[l]);
    queue.push({dc / db, l, v});
  };
  for (size_t l = 0; l < nl; ++l) push(l, 0);
  while (!queue.empty()) {
    const Step s = queue.top();
    queue.pop();
    if (s.ratio <= 0) break;
    const std::vector<int64_t>& h = hull[s.layer];
    const int64_t from = h[s.vertex], to = h[s.vertex + 1];
    const int64_t db = (to - from) * p.unit_bytes[s.layer];
    if (bytes + db <= p.budget) {
      m[s.layer] = to;
      bytes += db;
      push(s.layer, s.vertex + 1);
      continue;
    }
    // The whole step does not fit: the best allowed point inside it that does.
    int64_t best = from;
    for (int64_t x = from + 1; x < to; ++x) {
      if ((x - from) * p.unit_bytes[s.layer] + bytes > p.budget) break;
      if (p.cost[s.layer][size_t(x)] < p.cost[s.layer][size_t(best)]) best = x;
    }
    bytes += (best - from) * p.unit_bytes[s.layer];
    m[s.layer] = best;
  }
  Solution best = finish(p, std::move(m), "greedy");
  // On small instances a step can be large against the budget, and the best use of the last
  // bytes is not the best ratio: also fill by absolute gain from the start, keep the better.
  int64_t choices = 0;
  for (size_t l = 0; l < nl; ++l) choices += n_choices(p, l);
  if (double(choices) * double(nl) <= 2e4) {
    Solution by_gain = finish(p, start, "greedy");
    if (by_gain.cost < best.cost) best = std::move(by_gain);
  }
  return best;
}

Solution solve_dp(const Problem& p, int64_t max_units) {
  const size_t nl = p.cost.size();
  if (nl == 0 || p.budget < 0) return Solution{{}, kInfeasible, 0, "dp"};
  // Unit size: bytes of one expert (the common case) when that keeps the budget within
  // max_units, else budget / max_units.
  int64_t unit = 1;
  for (size_t l = 0; l < nl; ++l) unit = std::max(unit, p.unit_bytes[l]);
  bool uniform = true;
  for (size_t l = 0; l < nl; ++l) uniform = uniform && p.unit_bytes[l] == unit;
  if (!uniform || p.budget / unit > max_units) {
    unit = std::max<int64_t>(1, (p.budget + max_units - 1) / std::max<int64_t>(1, max_units));
    if (uniform) unit = ((unit + p.unit_bytes[0] - 1) / p.unit_bytes[0]) * p.unit_bytes[0];
  }
  const int64_t units = p.budget / unit;
  // Per layer: for each unit count, the cheapest allowed m of that many units.
  struct Choice {
    int64_t w;
    double c;
    int64_t m;
  };
  std::vector<std::vector<Choice>> choices(nl);
  for (size_t l = 0; l < nl; ++l) {
    for (int64_t m = 0; m < n_choices(p, l); ++m) {
      const double c = p.cost[l][size_t(m)];
      if (c >= kInfeasible) continue;
      const int64_t w = (m * p.unit_bytes[l] + unit - 1) / unit;
      if (w > units) break;
      if (!choices[l].empty() && choices[l].back().w == w) {
        if (c < choices[l].back().c) choices[l].back() = {w, c, m};
      } else {
        choices[l].push_back({w, c, m});
      }
    }
    if (choices[l].empty()) return Solution{{}, kInfeasible, 0, "dp"};
  }
  // dp[u]: least cost of the layers so far using exactly u units.
  std::vector<double> dp(size_t(units) + 1, kInfeasible), next(size_t(units) + 1);
  std::vector<std::vector<int32_t>> pick(nl, std::vector<int32_t>(size_t(units) + 1, -1));
  dp[0] = 0;
  for (size_t l = 0; l < nl; ++l) {
    std::fill(next.begin(), next.end(), kInfeasible);
    for (int64_t u = 0; u <= units; ++u) {
      if (dp[size_t(u)] >= kInfeasible) continue;
      for (size_t i = 0; i < choices[l].size(); ++i) {
        const Choice& ch = choices[l][i];
        const int64_t v = u + ch.w;
        if (v > units) break;
        const double c = dp[size_t(u)] + ch.c;
        if (c < next[size_t(v)]) {
          next[size_t(v)] = c;
          pick[l][size_t(v)] = static_cast<int32_t>(i);
        }
      }
    }
    dp.swap(next);
  }
  // Cheapest end state whose exact bytes meet the minimum.
  std::vector<int64_t> order;
  for (int64_t u = 0; u <= units; ++u) {
    if (dp[size_t(u)] < kInfeasible) order.push_back(u);
  }
  std::sort(order.begin(), order.end(),
            [&](int64_t a, int64_t b) { return dp[size_t(a)] < dp[size_t(b)]; });
  Solution best{{}, kInfeasible, 0, "dp"};
  for (int64_t end : order) {
    std::vector<int64_t> m(nl);
    int64_t u = end;
    for (size_t l = nl; l-- > 0;) {
      const Choice& ch = choices[l][size_t(pick[l][size_t(u)])];
      m[l] = ch.m;
      u -= ch.w;
    }
    Solution s = finish(p, std::move(m), "dp");
    if (s.feasible() && s.cost < best.cost) best = std::move(s);
    if (p.min_bytes <= 0 || best.feasible()) break;
  }
  return best;
}

double exhaustive_size(const Problem& p) {
  double n = 1;
  for (size_t l = 0; l < p.cost.size(); ++l) {
    double allowed = 0;
    for (double c : p.cost[l]) allowed += c < kInfeasible ? 1 : 0;
    n *= allowed;
  }
  return n;
}

Solution solve_exhaustive(const Problem& p, double max_states) {
  Solution best{{}, kInfeasible, 0, "exhaustive"};
  if (exhaustive_size(p) > max_states) {
    best.method = "exhaustive (too large)";
    return best;
  }
  const size_t nl = p.cost.size();
  // Least bytes the remaining layers need (their smallest allowed m), for pruning.
  std::vector<int64_t> min_rest(nl + 1, 0);
  for (size_t l = nl; l-- > 0;) {
    const int64_t f = first_allowed(p, l);
    if (f < 0) return best;
    min_rest[l] = min_rest[l + 1] + f * p.unit_bytes[l];
  }
  std::vector<int64_t> m(nl, 0);
  auto rec = [&](auto&& self, size_t l, int64_t bytes, double cost) -> void {
    if (l == nl) {
      if (bytes >= p.min_bytes && cost < best.cost) {
        best.cost = cost;
        best.m = m;
        best.bytes = bytes;
      }
      return;
    }
    for (int64_t x = 0; x < n_choices(p, l); ++x) {
      const double c = p.cost[l][size_t(x)];
      if (c >= kInfeasible) continue;
      const int64_t b = bytes + x * p.unit_bytes[l];
      if (b + min_rest[l + 1] > p.budget) break;
      m[l] = x;
      self(self, l + 1, b, cost + c);
    }
  };
  rec(rec, 0, 0, 0.0);
  return best;
}

}  // namespace ktune::search
