// Trace levels of `ktune profile` (the engine's CuptiSession) and `ktune profile --exec` (the
// injection library): which CUPTI activity kinds and which runtime API calls each level records
// (docs/metrics.md "Trace levels"). Plain C++, header-only, no CUPTI: the selection is a pure
// function tested without a GPU (tests/unit/test_trace_level.cpp); profiler/cupti_activity.cpp
// and inject/ktune_inject.cpp map it onto CUPTI's enums.
//
// Why two levels: tracing every runtime API call costs the traced program ~1-2 µs per call on
// its own thread, and an eager PyTorch step makes several calls per launch (cudaGetDevice,
// cudaStreamIsCapturing, cudaGetLastError, event records for the caching allocator...). The
// analysis needs only the calls that put work into a stream (launch count, launch latency, the
// launching thread for NVTX phases) plus the GPU records themselves, so `light` records those and
// nothing else; `full` records everything (the Chrome trace then shows every call and every
// synchronization).
#pragma once

#include <string>
#include <vector>

namespace ktune::trace_level {

enum class Level { Light, Full };

inline const char* level_name(Level l) { return l == Level::Light ? "light" : "full"; }

// "light" | "full" -> *out; false (and *out untouched) for anything else.
inline bool parse_level(const std::string& text, Level* out) {
  if (text == "light") {
    *out = Level::Light;
  } else if (text == "full") {
    *out = Level::Full;
  } else {
    return false;
  }
  return true;
}

// CUPTI activity kinds, named as CUPTI names them (CUPTI_ACTIVITY_KIND_<name>).
enum class Kind {
  ConcurrentKernel,  // kernels; CONCURRENT_KERNEL does not serialize them (KIND_KERNEL would)
  Memcpy,
  MemcpyPeer,  // MEMCPY2: copies between GPUs
  Memset,
  Runtime,  // every runtime API call
  Synchronization,
  Marker,  // NVTX ranges reaching CUPTI (the engine's NVTX_INJECTION64_PATH = libcupti)
  MarkerData,
  Overhead,  // CUPTI's own overhead records
  Device,    // device names (one record per GPU)
};

inline const char* kind_name(Kind k) {
  switch (k) {
    case Kind::ConcurrentKernel: return "CONCURRENT_KERNEL";
    case Kind::Memcpy: return "MEMCPY";
    case Kind::MemcpyPeer: return "MEMCPY2";
    case Kind::Memset: return "MEMSET";
    case Kind::Runtime: return "RUNTIME";
    case Kind::Synchronization: return "SYNCHRONIZATION";
    case Kind::Marker: return "MARKER";
    case Kind::MarkerData: return "MARKER_DATA";
    case Kind::Overhead: return "OVERHEAD";
    case Kind::Device: return "DEVICE";
  }
  return "?";
}

// Who traces: ktune's own engine under `ktune profile` (host spans carry the phases, NVTX reaches
// CUPTI as marker records), or another program under libktune_inject.so (NVTX ranges are
// recorded by the library itself, not by CUPTI, at every level).
enum class Tracer { Engine, Injection };

struct Selection {
  Level level = Level::Light;
  std::vector<Kind> kinds;  // activity kinds enabled whole
  // Runtime API records only for the calls keep_runtime_api() accepts (enabled one callback id
  // at a time, cuptiActivityEnableRuntimeApi); Kind::Runtime is then not in `kinds`.
  bool runtime_api_subset = false;
  // What this level leaves out, one phrase each (profile.json, notes of the report).
  std::vector<std::string> not_recorded;
};

inline Selection select_kinds(Level level, Tracer tracer) {
  Selection s;
  s.level = level;
  s.kinds = {Kind::ConcurrentKernel, Kind::Memcpy, Kind::Memset};
  if (tracer == Tracer::Engine) s.kinds.push_back(Kind::MemcpyPeer);
  if (tracer == Tracer::Injection) s.kinds.push_back(Kind::Device);
  if (level == Level::Full) {
    s.kinds.push_back(Kind::Runtime);
    s.kinds.push_back(Kind::Synchronization);
    s.kinds.push_back(Kind::Overhead);
    if (tracer == Tracer::Engine) {
      s.kinds.push_back(Kind::Marker);
      s.kinds.push_back(Kind::MarkerData);
    }
    return s;
  }
  if (tracer == Tracer::Engine) {
    // The engine makes few runtime calls besides its launches, and on the H100 its per-call
    // selection (cuptiActivityEnableRuntimeApi after the context exists) recorded no calls at
    // all, where the injection's (at CUDA's initialization) works: all runtime calls, as at full.
    s.kinds.push_back(Kind::Runtime);
  } else {
    s.runtime_api_subset = true;
    s.not_recorded.push_back(
        "runtime API calls other than launches, copies, memsets and blocking synchronizations "
        "(cudaGetDevice, cudaEventRecord, cudaStreamIsCapturing, ... are not in the trace)");
  }
  s.not_recorded.push_back("synchronization records (no cuda_sync tracks in the Chrome trace)");
  s.not_recorded.push_back("CUPTI's own overhead records (timeline cupti_overhead_us is 0)");
  if (tracer == Tracer::Engine) {
    s.not_recorded.push_back(
        "the engine's NVTX ranges as CUPTI markers (its host spans carry the same phases)");
  }
  return s;
}

// A runtime API callback name as CUPTI gives it ("cudaLaunchKernel_v7000",
// "cudaMemcpyAsync_ptsz_v7000", "__cudaLaunchKernel_v13000") without the leading underscores, the
// _vNNNN version and the per-thread-stream suffix (_ptsz, _ptds): "cudaLaunchKernel".
inline std::string runtime_api_base(const std::string& callback_name) {
  std::string s = callback_name;
  size_t lead = 0;
  while (lead < s.size() && s[lead] == '_') ++lead;
  s.erase(0, lead);
  const size_t v = s.rfind("_v");
  if (v != std::string::npos && v + 2 < s.size() &&
      s.find_first_not_of("0123456789", v + 2) == std::string::npos) {
    s.resize(v);
  }
  for (const char* suffix : {"_ptsz", "_ptds"}) {
    const std::string x = suffix;
    if (s.size() > x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0) {
      s.resize(s.size() - x.size());
    }
  }
  return s;
}

// Light level: the runtime calls whose records the analysis uses. Those that put work into a
// stream: kernel, cooperative, graph and host-function launches, copies and memsets (launches
// per step, launch latency and call time, and the launching thread that places a kernel inside
// the program's NVTX ranges); and the blocking synchronizations (where the host waits for the
// GPU, drawn in the Chrome trace; a few per step at most).
inline bool keep_runtime_api(const std::string& callback_name) {
  const std::string b = runtime_api_base(callback_name);
  auto starts = [&](const char* p) { return b.rfind(p, 0) == 0; };
  if (starts("cudaLaunch")) return true;  // Kernel, KernelExC, CooperativeKernel*, HostFunc
  if (b == "cudaGraphLaunch") return true;
  if (starts("cudaMemcpy") || starts("cudaMemset")) return true;  // not cudaMemSetMemPool
  return b == "cudaDeviceSynchronize" || b == "cudaStreamSynchronize" ||
         b == "cudaEventSynchronize" || b == "cudaThreadSynchronize";
}

// The environment variable `ktune profile --exec` passes the level to the injection library in.
inline constexpr const char* kExecEnvVar = "KTUNE_EXEC_TRACE_LEVEL";

}  // namespace ktune::trace_level
