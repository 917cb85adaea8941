// Optimizers over expert placement under a GPU memory budget. The search reduces per-expert
// placement to one number per layer, m_l = how many of layer l's experts sit on the GPU (always
// its m_l hottest: for a given m that puts the most routing mass on the GPU for the bytes, see
// docs/search.md), with a cost table per layer from the cost model. Three solvers of
//   minimise sum_l cost[l][m_l]  subject to  sum_l m_l * unit_bytes[l] <= budget
//                                            (and >= min_bytes: host memory)
// greedy by marginal gain per byte (on each layer's lower convex hull, so non-convex costs such
// as a hand-off saved only when a layer's last CPU expert leaves are handled), dynamic
// programming over layers with a quantised budget (then filled greedily with the exact bytes
// left), and exhaustive enumeration for small instances (to prove the other two).
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace ktune::search {

constexpr double kInfeasible = std::numeric_limits<double>::infinity();

struct Problem {
  std::vector<std::vector<double>> cost;  // cost[l][m], m = 0..E; kInfeasible = not allowed
  std::vector<int64_t> unit_bytes;        // bytes of one GPU expert of layer l
  int64_t budget = 0;                     // bytes available for GPU experts
  int64_t min_bytes = 0;                  // GPU expert bytes needed at least (0: none)
};

struct Solution {
  std::vector<int64_t> m;  // GPU experts per layer (empty: no feasible solution)
  double cost = kInfeasible;
  int64_t bytes = 0;
  std::string method;  // "greedy" | "dp" | "exhaustive"
  bool feasible() const { return !m.empty() && cost < kInfeasible; }
};

// Cost and bytes of an assignment (kInfeasible when a choice is not allowed or the budget or
// the minimum is broken).
double evaluate(const Problem& p, const std::vector<int64_t>& m, int64_t* bytes = nullptr);

Solution solve_greedy(const Problem& p);
// max_units: the budget is divided into at most this many units; each layer's bytes are rounded
// up to whole units (so the DP never overspends), then the bytes left are filled greedily.
Solution solve_dp(const Problem& p, int64_t max_units = 2048);
// Every assignment within the budget (depth-first with pruning). Returns an infeasible Solution
// with method "exhaustive (too large)" when the product of the layers' choices exceeds
// max_states.
Solution solve_exhaustive(const Problem& p, double max_states = 2e6);
// Product of the layers' allowed choices.
double exhaustive_size(const Problem& p);

}  // namespace ktune::search
