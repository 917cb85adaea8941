// The human side of a profile: the verdict (one plain-language sentence on what limits decode,
// with the facts behind it), the terminal report, and the self-contained HTML report.
#pragma once

#include <string>

#include "profiler/profile_doc.h"

namespace ktune::profiler {

// Pure: from the decode window's metrics, the run settings and the topology check. Rules (in
// order, docs/metrics.md "verdict"): no decode window; CPU-only run; GPU idle > 50 % ->
// what fills the idle time (waits for CPU experts, transfers, launch gaps -> launch-bound with
// the fix that fits the settings); 15-50 % idle -> partly bound; < 15 % -> the GPU is busy, and
// which phase dominates. Topology warnings are appended as reasons.
Verdict make_verdict(const ProfileDoc& doc);

// The terminal report: settings, per-window table (tok/s, idle, gaps, kernels/launches per
// token), the per-token budget, expert bandwidths, biggest gaps, router statistics, overhead,
// topology and, last, the verdict.
std::string terminal_report(const ProfileDoc& doc);

// One HTML file, no network: summary tables, the per-token budget and idle as SVG bars, and a
// timeline (canvas) of the first part of the decode window drawn from embedded data.
std::string html_report(const ProfileDoc& doc);

}  // namespace ktune::profiler
