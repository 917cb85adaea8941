// `ktune profile --exec -- CMD ARGS...`: profile any CUDA program (docs/exec.md). The program runs
// under libktune_inject.so (tools/ktune/inject/), which writes one capture per process that
// initialized CUDA or called NVTX; this file runs the program, reads the captures and turns the
// main one into the same ProfileDoc as an engine profile (metrics, report, verdict, Chrome
// trace), minus what needs the engine's knowledge (expert bytes, routing, host spans).
//
// Steps come from the program's NVTX ranges: --step-range NAME, or else the top-level range name
// that repeats most (ties: the larger total time). The analysis is pure (tests feed captures
// written by hand); only run_exec_profile starts a process.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "inject/trace_level.h"
#include "profiler/profile_doc.h"

namespace ktune::profiler {

// One process's capture file (inject/exec_capture.h), read back.
struct ExecCapture {
  std::string path;
  int64_t pid = 0;
  int64_t ppid = 0;
  std::string command;
  std::string flush_reason;  // exit | signal SIGINT | signal SIGTERM | duration
  bool cuda_initialized = false;
  bool cupti_ok = false;
  std::string cupti_error;
  std::string notes;  // the injection's: what worked only in part
  std::string trace_level = "full";  // what the injection recorded (older captures: full)
  int64_t open_ranges = 0;
  int64_t trace_start = 0;  // ns on the timeline's clock (0: unknown)
  int64_t trace_end = 0;
  Timeline timeline;
};
// Throws ktune::Error naming the file when it is not a capture.
ExecCapture read_exec_capture(const std::string& path);
ExecCapture parse_exec_capture(const std::string& text, const std::string& path);

// The steps: NVTX ranges of one name.
struct StepChoice {
  std::string name;  // "" when no step range was found
  bool auto_detected = false;
  std::string why;              // how it was chosen, for the report
  std::vector<Interval> steps;  // sorted by start
};
// requested: the --step-range name ("" = auto). Throws ktune::Error when a requested name has no
// range (the message lists the most frequent names).
StepChoice choose_steps(const Timeline& t, const std::string& requested);

// Per NVTX range name: time on the host and GPU work launched inside (innermost range of the
// launching thread), within a window.
struct RangeStat {
  std::string name;
  std::string domain;
  int64_t count = 0;
  double host_us = 0;      // summed durations (nested calls count each time)
  int64_t kernels = 0;     // kernels whose launch sits innermost in a range of this name
  double gpu_busy_us = 0;  // union of those kernels' intervals
};
std::vector<RangeStat> nvtx_range_stats(const Timeline& t, const Window& w);

// What the run of the program gave, for the document.
struct ExecRunInfo {
  std::vector<std::string> command;
  std::string exit_description;  // "exit code 0", "killed by SIGTERM", ...
  int exit_code = 0;             // the program's exit code (128 + signal when killed)
  bool partial = false;          // non-zero exit, a signal or the duration cut the run short
  std::string partial_reason;
  bool stopped_by_duration = false;
  double duration_s = 0;
  std::vector<ExecCapture> others;  // captures of other processes (children), not analyzed
};

// The profile of one capture (pure). Fills windows (kind "steps", or "run" without steps),
// notes on unavailable metrics, the verdict, and doc.exec (pid, steps, NVTX ranges, processes).
ProfileDoc analyze_exec_capture(ExecCapture cap, const std::string& step_range,
                                const ExecRunInfo& run);

// Which capture to analyze: the launched process's when it traced GPU work, else the one with
// the most GPU ops. -1 when none has any GPU op or CUDA never initialized anywhere.
int pick_main_capture(const std::vector<ExecCapture>& caps, int64_t launched_pid);

struct ExecOptions {
  std::vector<std::string> command;
  double duration_s = 0;  // 0: until the program ends
  std::string step_range;
  std::string out = "profile.json";
  std::string trace;
  std::string report;
  bool quiet = false;
  trace_level::Level level = trace_level::Level::Light;  // --trace-level: KTUNE_EXEC_TRACE_LEVEL
  std::string inject_library;  // "" = find it beside the ktune binary
  std::string command_line;
};

// Where libktune_inject.so is: $KTUNE_INJECT_LIBRARY, else beside the running ktune binary, else
// ../lib from it. Throws ktune::Error (exit 1) when none exists.
std::string find_inject_library();

// Runs the program under the injection, waits for it (forwarding SIGTERM; Ctrl-C reaches it from
// the terminal), reads every capture and writes profile.json (+ timeline beside it, --trace,
// --report). Returns the document; *program_never_used_cuda is set when no process initialized
// CUDA (then nothing is written). Throws ktune::Error without a GPU or CUPTI.
ProfileDoc run_exec_profile(const ExecOptions& opt, bool* program_never_used_cuda);

}  // namespace ktune::profiler
