// The batched prefill's state (GpuEngine::Impl::prefill_state; engine/cuda/gpu_engine_prefill.cpp
// explains the step). Private to the engine: nothing outside engine/cuda includes it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cuda/gpu_engine_rows.h"
#include "ktune/engine/cuda/cuda_check.h"

namespace ktune {

struct PrefillState : gpu_detail::TokenRows {
  PrefillState() = default;
  ~PrefillState();  // waits for the copy stream, unregisters host ranges, frees pinned buffers
  PrefillState(const PrefillState&) = delete;
  PrefillState& operator=(const PrefillState&) = delete;

  // Batched prefill works for this model (else prefill runs decode steps; reason says why).
  bool enabled = false;
  std::string reason;
  int64_t chunk = 0;  // tokens per chunk (<= max_prefill_chunk, <= max_context)
  // Hybrid placements: a chunk of at least this many tokens copies the layers' CPU experts to
  // the GPU and computes them there; a shorter one runs decode steps (CpuMoe per token).
  int64_t min_staged = 0;
  bool profile = false;  // KTUNE_PREFILL_PROFILE=1: per-phase GPU times on stderr

  cuda::DeviceArena arena;  // everything below that lives on the device, staging included

  // Activations of one chunk (gpu_detail::TokenRows: T = chunk rows each, P = T * top_k grouped
  // rows) are the base; the expert table points at a resident copy or a place in a staging
  // buffer. Only prefill's own: the rotated queries.
  uint16_t* q16 = nullptr;  // [T][nq]

  // Staging of CPU-resident experts (hybrid).
  struct CopyRun {
    size_t dst_offset;
    const uint8_t* src;
    size_t bytes;
  };
  struct StagedLayer {
    int64_t layer = 0;
    std::vector<CopyRun> runs;
  };
  std::vector<StagedLayer> staged;           // layers with CPU experts, in layer order
  std::vector<int64_t> staged_of;            // per layer: index into `staged`, or -1
  uint8_t* staging[2] = {nullptr, nullptr};  // the i-th staged layer uses staging[i % 2]
  size_t staging_bytes = 0;                  // each
  bool staging_ok = false;                   // the buffers exist (device memory allowed them)
  std::unique_ptr<cuda::Stream> copy_stream;
  std::unique_ptr<cuda::Event> copied[2], freed[2];
  // Host ranges this engine registered (cudaHostRegister), unregistered at destruction.
  std::vector<void*> registered;
  bool pinned = false;  // every copied host range is page-locked: direct async copies
  // Fallback when registration fails: copies go through two pinned bounce buffers.
  static constexpr size_t kBounceBytes = size_t{32} << 20;
  uint8_t* bounce[2] = {nullptr, nullptr};
  std::unique_ptr<cuda::Event> bounce_free[2];
  int bounce_next = 0;

  // Pinned host: the chunk's tokens, then one int32 slot for the position left on the device.
  int32_t* h_tokens = nullptr;
  std::unique_ptr<cuda::Event> tokens_copied;

  // KTUNE_PREFILL_PROFILE: events per layer (start, attention done, router done, MoE done) and
  // per staged layer (copy start, copy end), summed after each prefill.
  std::vector<std::unique_ptr<cuda::Event>> ev_layer, ev_copy;
  std::unique_ptr<cuda::Event> ev_begin, ev_end;
};

}  // namespace ktune
