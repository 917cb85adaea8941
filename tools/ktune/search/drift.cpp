// Routing drift (search/drift.h).
#include "search/drift.h"

#include <fmt/format.h>

#include <cmath>
#include <filesystem>

#include "ktune/engine/error.h"
#include "search/inputs.h"

namespace ktune::search {

RoutingDrift routing_drift(const Placement& p, const profile::RouterStats& searched,
                           const std::vector<std::vector<uint64_t>>& live) {
  const size_t nl = p.layers.size();
  if (searched.counts.size() != nl || live.size() != nl) {
    throw Error("routing drift",
                fmt::format("statistics for {} and {} layers, the placement has {}",
                            searched.counts.size(), live.size(), nl),
                "compare statistics of the model the placement is for");
  }
  RoutingDrift d;
  std::string raw;
  double s_gpu = 0, s_all = 0, l_gpu = 0, l_all = 0, tv = 0, noise = 0;
  for (size_t l = 0; l < nl; ++l) {
    const auto& sc = searched.counts[l];
    const auto& lc = live[l];
    const auto& ex = p.layers[l].experts;
    if (sc.size() != ex.size() || lc.size() != ex.size()) {
      throw Error("routing drift", fmt::format("layer {}: expert counts do not match", l),
                  "compare statistics of the model the placement is for");
    }
    double ss = 0, ls = 0;
    for (size_t e = 0; e < ex.size(); ++e) {
      ss += double(sc[e]);
      ls += double(lc[e]);
      raw.append(reinterpret_cast<const char*>(&sc[e]), sizeof(int64_t));
    }
    // Two samples of one distribution differ by sampling alone: the expected total-variation
    // distance of two multinomial samples of sizes ss and ls from shares a is about
    // 1/2 * sum_e sqrt(2/pi) * sqrt(a_e (1 - a_e) (1/ss + 1/ls)) (normal approximation). A run
    // of 64 tokens against 1024 profiled ones shows 0.10-0.15 with nothing changed, so only the
    // distance beyond that counts as drift.
    double layer_tv = 0, layer_noise = 0;
    const double inv_n = (ss > 0 ? 1 / ss : 0) + (ls > 0 ? 1 / ls : 0);
    for (size_t e = 0; e < ex.size(); ++e) {
      const double a = ss > 0 ? double(sc[e]) / ss : 0, b = ls > 0 ? double(lc[e]) / ls : 0;
      layer_tv += std::fabs(a - b) / 2;
      layer_noise += 0.5 * std::sqrt(2 / M_PI) * std::sqrt(a * (1 - a) * inv_n);
      if (ex[e].is_gpu()) {
        s_gpu += double(sc[e]);
        l_gpu += double(lc[e]);
      }
    }
    s_all += ss;
    l_all += ls;
    tv += layer_tv;
    noise += layer_noise;
  }
  d.searched_gpu_share = s_all > 0 ? s_gpu / s_all : 0;
  d.live_gpu_share = l_all > 0 ? l_gpu / l_all : 0;
  d.distance = nl > 0 ? tv / double(nl) : 0;
  d.sampling_distance = nl > 0 ? noise / double(nl) : 0;
  if (p.searched_on && p.searched_on->router_stats.rfind("sha256:", 0) == 0) {
    d.digest_matches = p.searched_on->router_stats == "sha256:" + sha256_hex(raw);
  }
  // The GPU share of a sample moves by sampling too: two standard deviations of the difference
  // of two binomial shares are allowed beyond the 5 points.
  const double g = d.searched_gpu_share;
  d.sampling_share = std::sqrt(g * (1 - g) *
                               ((s_all > 0 ? 1 / s_all : 0) + (l_all > 0 ? 1 / l_all : 0)));
  d.drifted = std::fabs(d.live_gpu_share - d.searched_gpu_share) > 0.05 + 2 * d.sampling_share ||
              d.distance - d.sampling_distance > 0.15;
  if (d.drifted || !d.digest_matches) {
    d.message = fmt::format(
        "routing drifted from the statistics this placement was searched on: GPU experts took "
        "{:.1f} % of the routing there, {:.1f} % in this run (mean per-layer distance {:.2f}, "
        "{:.2f} expected from the sample sizes alone){}; re-profile with this workload and "
        "search again",
        100 * d.searched_gpu_share, 100 * d.live_gpu_share, d.distance, d.sampling_distance,
        d.digest_matches ? "" : "; the profile's statistics also differ from the ones searched on");
  }
  return d;
}

bool wants_drift_check(const Placement& p) {
  return p.searched_on && p.searched_on->router_stats.rfind("sha256:", 0) == 0;
}

std::string drift_warning(const Placement& p, const std::vector<std::vector<uint64_t>>& live) {
  if (!wants_drift_check(p) || live.empty()) return "";
  namespace fs = std::filesystem;
  const std::string& named = p.searched_on->profile;
  std::string path = named;
  std::error_code ec;
  if (!fs::is_regular_file(path, ec) && !p.file.empty() && fs::path(named).is_relative()) {
    const fs::path beside = fs::path(p.file).parent_path() / named;
    if (fs::is_regular_file(beside, ec)) path = beside.string();
  }
  profile::ProfileSummary s;
  try {
    s = profile::read_profile_summary(path);
  } catch (const Error& e) {
    return fmt::format("routing drift not checked: the profile the placement was searched on "
                       "could not be read ({})",
                       e.what());
  }
  if (s.router.tokens <= 0 || s.router.counts.size() != p.layers.size() ||
      (!s.router.counts.empty() && s.router.counts[0].size() != p.layers[0].experts.size())) {
    return fmt::format("routing drift not checked: {} has no router statistics of this model's "
                       "shape",
                       path);
  }
  try {
    return routing_drift(p, s.router, live).message;
  } catch (const Error& e) {
    return fmt::format("routing drift not checked: {}", e.what());
  }
}

}  // namespace ktune::search
