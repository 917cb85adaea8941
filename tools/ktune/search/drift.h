// Routing drift (issue 6 item 3): compares the routing a run sees with the router statistics a
// placement was searched on, so `ktune run --config` can warn, with the numbers, when the hot
// experts on the GPU are no longer the hot ones. Pure function; the run wires live counts in.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ktune/engine/placement.h"
#include "profiler/profile_summary.h"

namespace ktune::search {

struct RoutingDrift {
  double searched_gpu_share = 0;  // routing share on the placement's GPU experts, searched stats
  double live_gpu_share = 0;      // the same share in the live counts
  double distance = 0;  // mean over layers of the total-variation distance of the selection shares
  // The part of `distance` two samples of these sizes show with nothing changed (expected value
  // under the searched shares).
  double sampling_distance = 0;
  double sampling_share = 0;  // standard deviation of the GPU share's difference by sampling
  bool digest_matches = true;  // the statistics are the ones the placement names (sha256)
  // share moved by more than 5 points + 2 sampling_share, or distance beyond the sampling
  // distance above 0.15
  bool drifted = false;
  std::string message;         // one line with the numbers (empty when nothing to say)
};

// `searched` are the profile's statistics (same shape as the placement), `live` the run's counts
// per layer and expert. Throws ktune::Error when the shapes disagree.
RoutingDrift routing_drift(const Placement& p, const profile::RouterStats& searched,
                           const std::vector<std::vector<uint64_t>>& live);

// `ktune run --config`: whether a run of p should count its routing (p was searched on measured
// router statistics, searched_on.router_stats "sha256:...").
bool wants_drift_check(const Placement& p);
// The run's live counts against the statistics of the profile p names (searched_on.profile: as
// written, else beside p's file). Empty when there is nothing to compare or nothing to say;
// otherwise one line: the drift message, or why the statistics could not be compared.
std::string drift_warning(const Placement& p, const std::vector<std::vector<uint64_t>>& live);

}  // namespace ktune::search
