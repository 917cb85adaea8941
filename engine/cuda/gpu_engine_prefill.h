// The batched prefill's state (GpuEngine::Impl::prefill_state; engine/cuda/gpu_engine_prefill.cpp
// explains the step). Private to the engine: nothing outside engine/cuda includes it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ktune/engine/cuda/cuda_check.h"

namespace ktune {

struct PrefillState {
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

  // Activations of one chunk (T = chunk rows each; P = T * top_k grouped rows).
  int32_t* tokens = nullptr;  // [T]
  float* x = nullptr;         // [T][hidden] residual stream
  uint16_t* h16 = nullptr;    // [T][hidden] fp16 normed input of the q/k/v and expert matmuls
  float* hn = nullptr;        // [T][hidden] float32 normed input of the router
  float *qf = nullptr, *kf = nullptr, *vf = nullptr;   // [T][nq], [T][nkv], [T][nkv]
  uint16_t *q16 = nullptr, *a16 = nullptr;             // [T][nq] rotated queries, attention out
  float* rlog = nullptr;                               // [T][n_experts]
  int32_t* ids = nullptr;                              // [T][top_k]
  float* wts = nullptr;                                // [T][top_k]
  int32_t *sorted_tok = nullptr, *pair_pos = nullptr;  // [P]
  int32_t *tiles = nullptr, *n_tiles = nullptr;        // [max_tiles][4], 1
  int64_t max_tiles = 0;
  uint16_t* act16 = nullptr;  // [P][ffn] SwiGLU output, grouped order
  float* ye = nullptr;        // [P][hidden] expert outputs, grouped order
  // Per layer, per expert: device pointers to its gate, up and down matrices (resident copy or
  // its place in a staging buffer): table + (layer * 3 + {0, 1, 2}) * n_experts.
  const void** expert_table = nullptr;

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
