// Multi-GPU placement as one optimisation: the layer split (a contiguous range of layers per
// GPU, which runs their attention and holds their GPU experts) and the GPU experts per layer,
// together, under one memory budget per GPU (docs/search.md, "Several GPUs").
//
//   minimise   sum_l cost[l][m_l] + pipeline(GPUs used, in order)
//   subject to ranges [a_g, b_g) contiguous, in GPU order, covering every layer (a GPU may hold
//              none), and for every GPU g holding layers:
//              sum_{l in g} (layer_bytes[l] + m_l * unit_bytes[l])
//                + [g holds layer 0] first_bytes + [g holds the last layer] last_bytes
//                + [some m_l > 0 on g] expert_ws
//                + staging_buffers * staging_cap * max_{l in g} unit_bytes[l]  <= budget[g]
//              and m_l >= n_experts - staging_cap (at most staging_cap CPU experts per layer).
//
// The decode part of the cost is separable over layers; the pipeline term depends only on which
// GPUs are used and in which order. So a dynamic programme over (GPU, last layer) with the best
// cost of each (GPU, range) is exact given exact range costs. Range costs come from a knapsack
// per range: exact (the exhaustive/DP solvers of optimizers.h, for tests and small cases) or the
// greedy walk along the layers' convex hulls (fast: every range of a 94-layer model in tens of
// milliseconds), after which the chosen ranges are solved again with the full solvers.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "search/optimizers.h"

namespace ktune::search {

struct SplitProblem {
  std::vector<std::vector<double>> cost;  // cost[l][m], m = 0..E; kInfeasible: not allowed
  std::vector<int64_t> unit_bytes;        // one expert of layer l
  std::vector<int64_t> layer_bytes;       // what layer l puts on its GPU besides experts
  int64_t n_experts = 0;
  std::vector<int64_t> budget;  // per GPU, after its fixed reserve; < 0: the GPU is not usable
  int64_t first_bytes = 0;      // on the GPU of layer 0 (embedding)
  int64_t last_bytes = 0;       // on the GPU of the last layer (head, logits)
  int64_t expert_ws = 0;        // on a GPU that holds any expert
  int64_t staging_cap = 0;      // CPU experts per layer at most (staging buffers sized for it)
  int64_t staging_buffers = 2;  // staging buffers per GPU (0: none, deepseek2)
  // Pipeline costs (in cost's unit): a boundary from GPU i to the next GPU j, and, when more
  // than one GPU is used, the loop back from the last GPU to the first (the sampled token).
  // nullptr: 0.
  std::function<double(int, int)> boundary;
  std::function<double(int, int)> loopback;
  // The pipeline term of the GPUs used, in order.
  double pipeline_cost(const std::vector<int>& gpus) const;
};

struct SplitSolution {
  std::vector<int> stage_of;  // per layer: its GPU (non-decreasing)
  std::vector<int64_t> m;     // GPU experts per layer
  double cost = kInfeasible;  // objective (sum of cost + pipeline)
  std::string method;
  bool feasible() const { return !m.empty() && cost < kInfeasible; }
};

// GPU bytes of g under an assignment (what the constraint above adds up); 0 when g holds no layer.
int64_t split_gpu_bytes(const SplitProblem& p, const std::vector<int>& stage_of,
                        const std::vector<int64_t>& m, int g);
// Objective of an assignment; kInfeasible when it breaks a constraint.
double split_evaluate(const SplitProblem& p, const std::vector<int>& stage_of,
                      const std::vector<int64_t>& m);

// exact_ranges: solve every range's knapsack exactly (exhaustive when small, else DP), else
// the greedy hull walk; the chosen ranges are then re-solved (greedy and DP, the better).
SplitSolution solve_split(const SplitProblem& p, bool exact_ranges = false);
// Best m for one GPU's given range [a, b) (the driver's even-split baseline and its boundary
// refinement use it): greedy alone, greedy and DP (the better), or exact.
enum class RangeSolver { Greedy, Full, Exact };
Solution solve_range(const SplitProblem& p, int g, int64_t a, int64_t b, RangeSolver how);
// Every split and every m (tests): throws nothing, returns infeasible when too large.
SplitSolution solve_split_exhaustive(const SplitProblem& p, double max_states = 5e6);

}  // namespace ktune::search
