// Everything `ktune profile` writes into profile.json (docs/profile-format.md) and the sinks
// read: the summary for the search (profile_summary.h), what was run, the metrics of each
// window, router statistics, the tracing overhead, the topology check, the verdict and the
// timeline (compact in profile.json, complete in a file beside it).
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "profiler/analysis.h"
#include "profiler/profile_summary.h"
#include "profiler/timeline.h"
#include "profiler/topology.h"

namespace ktune::profiler {

struct RunInfo {
  std::string command;  // the command line
  std::string model;    // model spec or path
  std::string placement;   // placement label ("--experts-on-gpu 48", a YAML path, "all on cpu")
  std::string engine;      // "cpu" | "gpu" | "hybrid"
  std::string engine_description;
  bool cuda_graph = false;
  std::string moe_kernel;  // "fused" | "unfused"
  double pcie_assist = 0;  // runtime.pcie_assist of the placement (0: off)
  int threads = 0;         // CPU threads of the engine (0: none)
  int64_t prompt = 0;      // prefill tokens profiled
  int64_t gen = 0;         // decode tokens per window
  int64_t batch = 1;       // sequences decoded together (a window has gen steps of batch tokens)
  int64_t warmup = 0;      // decode tokens before the measured windows
  std::string trace_mode;  // "cupti (...)" | "host spans only (...)"
  std::string trace_level = "none";  // light | full: what CUPTI recorded; none: no CUPTI
};

// Decode speed with and without tracing, measured side by side in one process. The top-level
// figures are the analyzed window's level; `levels` has one entry per traced level measured
// (`--trace-level both`: light, then full), the analyzed one first.
struct Overhead {
  std::vector<double> untraced_tok_s;  // per window
  std::vector<double> traced_tok_s;
  double untraced_median = 0;
  double traced_median = 0;
  double overhead_fraction = 0;  // 1 - traced / untraced
  std::string mode;  // what the traced windows recorded
  std::string trace_level = "none";       // light | full; none: no CUPTI (host spans only)
  std::vector<std::string> not_recorded;  // what that level leaves out (trace_level.h)
  struct Level {
    std::string trace_level;
    std::vector<double> traced_tok_s;
    double traced_median = 0;
    double overhead_fraction = 0;
  };
  std::vector<Level> levels;
  // The profiling run: the analyzed traced decode window followed by untraced padding steps
  // (`--trace-padding`, trace_padding.h), timed from the window's start to the padding's end.
  // The fields above are the traced steps' dilation; these are what profiling cost the decode.
  // profile_run_tok_s 0: not measured (--exec).
  double profile_run_tok_s = 0;              // (window + padding tokens) / that wall
  // 1 - profile_run_tok_s / the untraced speed: untraced_pooled_tok_s when there was padding,
  // else untraced_median.
  double profile_run_overhead_fraction = 0;
  // Every untraced step of the run (the baseline windows and the padding, interleaved) over
  // their summed wall: hundreds of steps instead of three short windows, so a noisy engine's
  // (a hybrid's) window-to-window spread does not decide the figure. 0: no padding.
  double untraced_pooled_tok_s = 0;
  int64_t untraced_padding_steps = 0;        // P (decode steps of `batch` tokens)
  // The padding's own untraced speed (0 without padding): far from untraced_median, the engine's
  // speed moved during the run, and the run's overhead against the baseline windows shows it.
  double padding_tok_s = 0;
  std::string trace_padding;                 // how P was chosen: auto | off | N
};

struct Verdict {
  std::string headline;              // one plain-language sentence
  std::vector<std::string> reasons;  // supporting facts and topology findings
};

struct ProfileDoc {
  profile::ProfileSummary summary;
  RunInfo run;
  Topology topology;
  std::vector<WindowMetrics> windows;  // prefill first (when profiled), then decode
  RouterMetrics router;
  Overhead overhead;
  Verdict verdict;
  std::vector<std::string> notes;  // e.g. "host spans only: no GPU (...)"
  Timeline timeline;
  std::string timeline_file;  // the complete timeline beside profile.json ("" if none)
  nlohmann::json hardware;    // --hardware: the raw probe results (null otherwise)
  nlohmann::json exec;        // profile --exec: the program, steps, NVTX ranges (null otherwise)
};

// Writes profile.json atomically: {"ktune_profile": 1, "summary": ..., "run": ..., ...,
// "timeline": compact}. The compact timeline keeps at most `inline_events` ops/spans/API calls.
void write_profile_json(const std::string& path, const ProfileDoc& doc,
                        size_t inline_events = 3000);
// Writes the complete timeline as {"ktune_timeline": 1, "timeline": ...} atomically.
void write_timeline_json(const std::string& path, const Timeline& t);

// Reads a profile's timeline for `ktune trace`: the file named by "timeline_file" (relative to
// the profile's folder) when it exists, else the compact one inside. Throws ktune::Error.
Timeline read_profile_timeline(const std::string& profile_path, std::string* which = nullptr);

}  // namespace ktune::profiler
