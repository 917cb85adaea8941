// How many untraced decode steps `ktune profile` runs after the traced window so that the whole
// profiling run (traced window + untraced padding, one stretch of decode) stays close to the
// untraced speed (docs/metrics.md "Tracing overhead"). Pure functions: no engine, no clock.
//
// The traced steps are slower than untraced ones by the dilation d = 1 - traced / untraced tok/s
// (CUPTI's cost per launch: large when the engine launches thousands of kernels per token
// eagerly). W traced steps at u·(1 - d) steps/s and P untraced steps at u steps/s take
// W / (u·(1 - d)) + P / u seconds for W + P steps, so the run's overhead is
//   1 - (W + P) / (W / (1 - d) + P) = d·W / (W + P·(1 - d)),
// and it is at most `target` when P >= W·(d / target - 1) / (1 - d).
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace ktune::profiler {

// `ktune profile --trace-padding auto`: the run's overhead target (below the 3 % asked of a
// profile, with a margin for noise) and the caps on the padding (about 20 s of decode at most).
constexpr double kPaddingTargetFraction = 0.02;
constexpr double kPaddingMaxExtraSeconds = 20.0;
constexpr int64_t kPaddingMaxWindowFactor = 16;
// Above this dilation the report says that the gaps and idle time of the traced steps include it.
constexpr double kDilationNoteFraction = 0.10;

// The run's overhead fraction with W traced steps of dilation d and P untraced steps (above).
// d <= 0 (tracing cost nothing measurable) gives d; W < 1 gives 0.
inline double amortised_overhead(double dilation, int64_t window_steps, int64_t padding_steps) {
  if (window_steps < 1 || !std::isfinite(dilation)) return 0;
  if (dilation <= 0) return dilation;
  const double d = std::min(dilation, 0.999999);
  const double w = static_cast<double>(window_steps);
  const double p = static_cast<double>(std::max<int64_t>(padding_steps, 0));
  return d * w / (w + p * (1 - d));
}

struct PaddingChoice {
  int64_t steps = 0;             // untraced steps to run after the traced window
  int64_t steps_for_target = 0;  // what the target needs, before the caps
  double run_overhead = 0;       // amortised_overhead(d, W, steps): the expected run overhead
  bool capped = false;           // the caps left the run above the target
};

// The padding that brings the run's overhead to `target` (e.g. 0.025), capped at
// `max_window_factor` × W steps and at `max_extra_s` seconds of untraced decode (at
// `untraced_steps_per_s`; <= 0: unknown, the step cap alone). No padding when d <= target (or d
// is not a number).
inline PaddingChoice choose_untraced_padding(double dilation, int64_t window_steps,
                                             double untraced_steps_per_s, double target,
                                             double max_extra_s, int64_t max_window_factor = 16) {
  PaddingChoice c;
  if (window_steps < 1 || !std::isfinite(dilation) || !(target > 0)) return c;
  c.run_overhead = amortised_overhead(dilation, window_steps, 0);
  if (dilation <= target) return c;
  const double d = std::min(dilation, 0.999999);
  const double w = static_cast<double>(window_steps);
  // A hair below the quotient: an exact one (d = 0.5, target 0.25, W = 10: 20 steps) is not
  // rounded up by its last bit.
  const double need = std::ceil(w * (d / target - 1) / (1 - d) - 1e-9);
  int64_t cap = std::max<int64_t>(max_window_factor, 0) * window_steps;
  if (untraced_steps_per_s > 0 && std::isfinite(untraced_steps_per_s) && max_extra_s >= 0) {
    const double by_time = std::floor(max_extra_s * untraced_steps_per_s);
    if (by_time < static_cast<double>(cap)) cap = static_cast<int64_t>(by_time);
  }
  c.steps_for_target = need >= 1e15 ? int64_t{1'000'000'000'000'000} : static_cast<int64_t>(need);
  c.steps = std::min(c.steps_for_target, cap);
  c.capped = c.steps < c.steps_for_target;
  c.run_overhead = amortised_overhead(dilation, window_steps, c.steps);
  return c;
}

// The notes a profile carries about its tracing overhead: the padding's cap when it left the run
// above the target (auto only), and, when the traced steps are more than kDilationNoteFraction
// slower, that their gaps and idle time include the dilation (with CUPTI: its cost per launch,
// `launches_per_token` when > 0).
// The padding's untraced speed further than this from the baseline windows' gets a note.
constexpr double kPaddingDriftNoteFraction = 0.05;

inline std::vector<std::string> tracing_overhead_notes(double dilation, const PaddingChoice& p,
                                                       bool auto_padding, bool cupti,
                                                       double launches_per_token) {
  std::vector<std::string> notes;
  if (auto_padding && p.capped) {
    notes.push_back(fmt::format(
        "--trace-padding auto could not meet its {:.1f} % target: the traced steps are {:.1f} % "
        "slower than untraced and need {} untraced steps after them, but the padding stops at "
        "{} × the window or {:.0f} s of decode; its {} steps leave the profiling run {:.1f} % "
        "slower (expected). Pass --trace-padding N for more, or launch fewer kernels per token "
        "(CUDA graph on, fused MoE kernel)",
        100 * kPaddingTargetFraction, 100 * dilation, p.steps_for_target, kPaddingMaxWindowFactor,
        kPaddingMaxExtraSeconds, p.steps, 100 * p.run_overhead));
  }
  if (dilation > kDilationNoteFraction) {
    const std::string why =
        !cupti ? std::string("host spans")
        : launches_per_token > 0
            ? fmt::format("CUPTI's cost per launch, {:.0f} launches per token", launches_per_token)
            : std::string("CUPTI's cost per launch");
    notes.push_back(fmt::format(
        "the traced steps are {:.1f} % slower than untraced ({}): the {} measured in them "
        "include that dilation",
        100 * dilation, why, cupti ? "GPU gaps and idle time" : "phase times"));
  }
  return notes;
}

}  // namespace ktune::profiler
