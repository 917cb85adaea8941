// The CUPTI activity layer (design §4): the only code of ktune's CLI that includes cupti.h. It
// records, at the trace level asked for (inject/trace_level.h), kernels, memcpy, memset, runtime
// API calls (light: only those that launch, copy or block), and at level full also
// synchronizations, NVTX ranges (as marker records) and CUPTI's own overhead, with per-node
// kernel records for graph replays (graphNodeId), through
// CUPTI's buffer request/complete callbacks; records are parsed as buffers complete and moved
// into a Timeline (timeline.h) by drain_into().
//
// Optional twice: a build without CUPTI (CMake found no CUDA::cupti) and a machine without a
// usable GPU (cudaGetDeviceCount fails or finds none) both report "not available" with the
// reason, and the profiler falls back to host spans only. It never throws for CUPTI failures:
// ok() turns false and error() says why (the profiler warns and degrades, as Kineto does).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "inject/trace_level.h"
#include "profiler/timeline.h"

namespace ktune::profiler {

struct CuptiAvailability {
  bool built = false;   // this binary has CUPTI
  bool usable = false;  // and this machine has a GPU CUPTI can trace
  std::string reason;   // why not, when !usable
};
CuptiAvailability cupti_availability();

// Points NVTX (header-only NVTX v3) at the libcupti this binary uses, via NVTX_INJECTION64_PATH,
// unless the variable is set already. NVTX reads it on the process's FIRST NVTX call, so call
// this before any engine code runs. Returns the path in effect ("" when none).
std::string setup_nvtx_injection();

struct CuptiOptions {
  // What enable() records (inject/trace_level.h): light = kernels, copies, memsets and the
  // runtime calls; full = also synchronizations, NVTX markers and CUPTI's overhead records.
  trace_level::Level level = trace_level::Level::Full;
  size_t buffer_bytes = size_t{8} << 20;
  size_t max_buffers = 256;  // beyond this many buffers in flight, records are dropped (counted)
  size_t kept_buffers = 16;  // zeroed buffers kept for reuse (inject/activity_buffers.h)
};

class CuptiSession {
 public:
  // Subscribes to graph-node callbacks and installs CUPTI's node-id function as trace.h's
  // resolver, so capture tags carry CUPTI's ids. Create it before the engine captures graphs.
  explicit CuptiSession(const CuptiOptions& opt = {});
  ~CuptiSession();
  CuptiSession(const CuptiSession&) = delete;
  CuptiSession& operator=(const CuptiSession&) = delete;

  bool ok() const;
  const std::string& error() const;

  void enable();  // activity kinds of the options' level on (start of a traced window)
  // The kinds of `level` on: a session may trace one window at one level and the next at another
  // (`ktune profile --trace-level both`).
  void enable(trace_level::Level level);
  // The level of the last enable(); what was degraded (e.g. light could not select runtime
  // calls and recorded all of them), "" when nothing.
  trace_level::Level level() const;
  const std::string& notes() const;
  // Synchronizes the device and turns the kinds off, leaving the records in CUPTI's buffers
  // until disable_and_flush(): the untraced steps after a traced window do not wait for the
  // last buffers to be handed over and parsed.
  void disable();
  // Synchronizes the device, turns the kinds off (if disable() has not) and forces CUPTI to hand
  // over every buffer.
  void disable_and_flush();
  // Detaches CUPTI from the process (cuptiFinalize) after a forced flush; drain_into() the
  // records first (what is still buffered is dropped). Why: disabling the activity kinds leaves
  // CUPTI's launch hooks in place, and eager launches after a traced window stay slower (an
  // unfused eager step of qwen3-30b-a3b ran 8.5 % below its untraced speed after a light window,
  // H100); only a detached CUPTI costs nothing. The session records nothing afterwards (ok()
  // turns false, error() says why). Returns false, with error() set, when CUPTI refused.
  bool detach();
  // Moves what was recorded into t: GPU ops, API calls, syncs, markers, the graph-node clone
  // map, dropped-record and overhead counts. Sets t.cupti and the device list.
  void drain_into(Timeline& t);

  // CUPTI's clock (ns) now; 0 without CUPTI.
  static int64_t timestamp();
  // offset with cupti_time = steady_time + offset (best of a few paired reads); 0 without CUPTI.
  static int64_t steady_to_cupti_offset();

  struct State;

 private:
  std::unique_ptr<State> state_;
};

}  // namespace ktune::profiler
