// A trace level's selection (inject/trace_level.h) applied to CUPTI: shared by the engine's
// CuptiSession (profiler/cupti_activity.cpp) and the injection library (inject/ktune_inject.cpp).
// Include only where cupti.h is available.
#pragma once

#include <cupti.h>

#include <cstdint>
#include <string>
#include <vector>

#include "inject/trace_level.h"

namespace ktune::trace_level {

inline CUpti_ActivityKind to_cupti(Kind k) {
  switch (k) {
    case Kind::ConcurrentKernel:
      return CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL;
    case Kind::Memcpy:
      return CUPTI_ACTIVITY_KIND_MEMCPY;
    case Kind::MemcpyPeer:
      return CUPTI_ACTIVITY_KIND_MEMCPY2;
    case Kind::Memset:
      return CUPTI_ACTIVITY_KIND_MEMSET;
    case Kind::Runtime:
      return CUPTI_ACTIVITY_KIND_RUNTIME;
    case Kind::Synchronization:
      return CUPTI_ACTIVITY_KIND_SYNCHRONIZATION;
    case Kind::Marker:
      return CUPTI_ACTIVITY_KIND_MARKER;
    case Kind::MarkerData:
      return CUPTI_ACTIVITY_KIND_MARKER_DATA;
    case Kind::Overhead:
      return CUPTI_ACTIVITY_KIND_OVERHEAD;
    case Kind::Device:
      return CUPTI_ACTIVITY_KIND_DEVICE;
  }
  return CUPTI_ACTIVITY_KIND_INVALID;
}

// The runtime API callback ids keep_runtime_api() accepts, by the names this CUPTI gives them
// (so new versions of a launch call, e.g. CUDA 13's __cudaLaunchKernel, are found by name).
inline std::vector<CUpti_CallbackId> kept_runtime_api_ids() {
  std::vector<CUpti_CallbackId> ids;
  for (uint32_t cbid = 1; cbid < static_cast<uint32_t>(CUPTI_RUNTIME_TRACE_CBID_SIZE); ++cbid) {
    const char* name = nullptr;
    if (cuptiGetCallbackName(CUPTI_CB_DOMAIN_RUNTIME_API, cbid, &name) != CUPTI_SUCCESS ||
        name == nullptr) {
      continue;
    }
    if (keep_runtime_api(name)) ids.push_back(cbid);
  }
  return ids;
}

// Turns the runtime API records of `ids` on or off one by one. Returns "" or the first refusal
// (CUPTI older than 12.x has no per-call selection).
inline std::string enable_runtime_api_ids(const std::vector<CUpti_CallbackId>& ids, bool on) {
  for (CUpti_CallbackId id : ids) {
    const CUptiResult r = cuptiActivityEnableRuntimeApi(id, on ? 1 : 0);
    if (r != CUPTI_SUCCESS) {
      const char* m = nullptr;
      cuptiGetResultString(r, &m);
      return std::string("cuptiActivityEnableRuntimeApi: ") + (m != nullptr ? m : "error");
    }
  }
  return "";
}

// Tells CUPTI that the buffers it gets are zeroed already (inject/activity_buffers.h zeroes them
// on CUPTI's worker thread), so it does not zero them on the program's threads. Returns whether
// CUPTI took the setting (the buffers are zeroed either way).
inline bool promise_zeroed_buffers() {
  uint8_t on = 1;
  size_t size = sizeof on;
  return cuptiActivitySetAttribute(CUPTI_ACTIVITY_ATTR_ZEROED_OUT_ACTIVITY_BUFFER, &size, &on) ==
         CUPTI_SUCCESS;
}

}  // namespace ktune::trace_level
