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
  bool digest_matches = true;  // the statistics are the ones the placement names (sha256)
  bool drifted = false;        // share moved by more than 5 points or distance above 0.15
  std::string message;         // one line with the numbers (empty when nothing to say)
};

// `searched` are the profile's statistics (same shape as the placement), `live` the run's counts
// per layer and expert. Throws ktune::Error when the shapes disagree.
RoutingDrift routing_drift(const Placement& p, const profile::RouterStats& searched,
                           const std::vector<std::vector<uint64_t>>& live);

}  // namespace ktune::search
