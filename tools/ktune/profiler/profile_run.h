// `ktune profile` as library code (cmd_profile.cpp only parses flags): runs the engine of one
// placement with tracing on for a window of steps and writes profile.json, the complete
// timeline beside it, and optionally a Chrome trace and an HTML report; or, with --hardware,
// measures the machine alone.
//
// A model profile, in order: CUPTI session (when the engine uses a GPU and CUPTI works here)
// created before the engine so graph capture is seen; the engine; `warmup` decode tokens (the
// graph is captured here); tracing on (host spans + CUPTI at the first trace level): a short
// traced warm-up, the prefill window (-p tokens, when > 0) and the decode window (n tokens);
// tracing off; with a second level (`--trace-level both`), a traced warm-up and decode window at
// that level, for its overhead only; CUPTI detached (cuptiFinalize: attached, even with every
// kind off, it slows eager launches); one untraced decode window of n tokens, then the profiling
// run's untraced padding steps (--trace-padding) with the other `untraced_windows` - 1 windows
// spread through them (the overhead baseline, not profiling at all, sampled over the same stretch
// as the padding so that the engine's own drift does not read as overhead); analysis of the
// first level's windows.
#pragma once

#include <string>
#include <vector>

#include "inject/trace_level.h"
#include "profiler/profile_doc.h"
#include "run_bench.h"

namespace ktune::profiler {

struct ProfileOptions {
  cli::RunOptions run;  // model, placement and runtime options; run.prompt / run.gen = tokens
  int64_t warmup = 8;
  int untraced_windows = 3;
  std::string out = "profile.json";
  std::string trace;   // Chrome trace path ("" = none)
  std::string report;  // HTML report path ("" = none)
  bool hardware = false;
  bool quick = false;  // --hardware: small buffers (tests)
  bool quiet = false;  // no terminal report
  bool gpu_probes = true;  // model profiles: measure the GPU costs for the summary
  // What CUPTI records in the traced windows (inject/trace_level.h), one traced decode window per
  // level: {light} (the default), {full}, or {light, full} (`--trace-level both`: the overhead of
  // each, measured back to back; the first level's window is the one analyzed).
  std::vector<trace_level::Level> trace_levels{trace_level::Level::Light};
  // Untraced decode steps after the analyzed traced window (`--trace-padding`): -1 = auto (enough
  // to bring the profiling run's overhead to kPaddingTargetFraction, capped; trace_padding.h),
  // 0 = off, N = N steps.
  int64_t trace_padding = -1;
  std::string command_line;
};

// Runs the profile and writes every output. Returns the document (for tests). Throws
// ktune::Error on bad options or inputs.
ProfileDoc run_profile(const ProfileOptions& opt);

// The file beside profile.json that holds the complete timeline: "x.json" -> "x.timeline.json".
std::string timeline_path_for(const std::string& profile_path);

}  // namespace ktune::profiler
