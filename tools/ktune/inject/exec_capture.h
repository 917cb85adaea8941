// What the injection library (libktune_inject.so, `ktune profile --exec`) records in a profiled
// process, and the file it writes at the end: plain C++, no CUDA, so the writer, the
// flush-once gate and the file name rules are tested without a GPU (tests/unit/test_exec_*.cpp).
//
// The file is {"ktune_exec_capture": 1, "process": {...}, "timeline": {...}} where "timeline"
// has exactly the columns of profile.json's timeline (docs/profile-format.md), so ktune reads it
// with timeline_from_json and analyzes it with the engine profile's code.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace ktune::exec_capture {

struct Op {  // kernel (kind 0), memcpy (1), memset (2)
  uint8_t kind = 0;
  int32_t device = 0;
  uint32_t stream = 0;
  int64_t start = 0;  // ns, CUPTI's clock
  int64_t end = 0;
  uint32_t correlation = 0;
  uint32_t graph_id = 0;
  uint64_t graph_node_id = 0;
  int32_t name = -1;
  int64_t bytes = 0;
};
struct Api {
  int32_t name = -1;
  uint64_t thread = 0;  // OS thread id (CUPTI thread id type SYSTEM)
  int64_t start = 0;
  int64_t end = 0;
  uint32_t correlation = 0;
};
struct Sync {
  int32_t name = -1;
  uint32_t stream = 0;
  int64_t start = 0;
  int64_t end = 0;
  uint32_t correlation = 0;
};
struct Range {  // an NVTX push/pop or start/end range
  int32_t name = -1;
  int32_t domain = -1;  // -1: the default domain
  uint64_t thread = 0;  // OS thread id that opened it
  int64_t start = 0;
  int64_t end = 0;
  int64_t payload = 0;
  bool has_payload = false;
};

struct Capture {
  std::vector<std::string> strings;
  std::unordered_map<std::string, int32_t> string_index;
  std::vector<Op> ops;
  std::vector<Api> api;
  std::vector<Sync> syncs;
  std::vector<Range> ranges;
  std::vector<std::pair<int32_t, std::string>> gpus;  // CUDA device index, name

  // The process and how the capture ended.
  int64_t pid = 0;
  int64_t ppid = 0;
  std::string command;            // /proc/self/cmdline, arguments joined by spaces
  std::string flush_reason;       // "exit" | "signal SIGINT" | "signal SIGTERM" | "duration"
  bool cuda_initialized = false;  // InitializeInjection ran (the process called cuInit)
  bool cupti_ok = false;
  std::string cupti_error;  // why tracing did not work, when !cupti_ok
  std::string notes;        // what worked only in part (an optional CUPTI kind refused, ...)
  std::string trace_level = "light";  // what was recorded: "light" | "full" (trace_level.h)
  int64_t trace_start = 0;  // ns, CUPTI's clock: tracing on
  int64_t trace_end = 0;    // flush time
  uint64_t dropped_records = 0;
  int64_t cupti_overhead_ns = 0;
  int64_t open_ranges = 0;  // NVTX ranges still open at the flush (not written)

  int32_t intern(const std::string& s);
};

// The file's JSON text. Times are written as microseconds relative to the earliest event
// (origin_ns), with exact 3-decimal nanoseconds; records with end < start are dropped.
std::string to_json(const Capture& c);

// Escapes s for a JSON string (without the quotes); control bytes become \u00XX.
std::string json_escape(const std::string& s);

// "<dir>/ktune-exec-<pid>.json": one file per process, so children that initialize CUDA write
// their own beside the parent's.
std::string file_name(const std::string& dir, int64_t pid);
// True for names file_name() makes (what `ktune profile --exec` lists).
bool is_capture_file_name(const std::string& base_name);

// Writes text to path through path + ".tmp" and rename (POSIX calls only: usable at exit).
// Returns "" or the reason it failed.
std::string write_file(const std::string& path, const std::string& text);

}  // namespace ktune::exec_capture
