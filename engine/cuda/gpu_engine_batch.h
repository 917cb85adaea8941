// The batched decode step's state (GpuEngine::Impl::batch_state; engine/cuda/gpu_engine_batch.cpp
// explains the step). Private to the engine: nothing outside engine/cuda includes it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "cuda/gpu_engine_rows.h"
#include "ktune/engine/cuda/cuda_check.h"
#include "runtime/cpu_moe_batch.h"

namespace ktune {

// GpuEngineOptions::max_sequences' upper bound.
constexpr int64_t kMaxGpuSequences = 4096;
// The hand-off sequence number of a batched step is (epoch << 32) | step, the step counter
// starting here: above every position (< 2^24), so it never equals a single step's.
constexpr uint32_t kBatchStepBase = 0x40000000u;

struct BatchState : gpu_detail::TokenRows {
  BatchState() = default;
  ~BatchState();  // destroys the graphs, frees the pinned and mapped host blocks
  BatchState(const BatchState&) = delete;
  BatchState& operator=(const BatchState&) = delete;

  int64_t S = 0;  // max_sequences: every buffer below holds S rows

  // The rows' activations (gpu_detail::TokenRows, S rows; tokens = io) are the base; the
  // expert table holds each expert's GPU copy (null for CPU experts). The step's own:
  cuda::DeviceArena arena;     // sized by batch_decode_workspace_bytes (memory_plan.h)
  int32_t* io = nullptr;       // [2S]: the tokens of the step (the sampled ones after it), then
  int32_t* pos = nullptr;      //       the positions: uploaded together from h_io
  int32_t* history = nullptr;  // [S][max_ctx] sampled tokens by position
  int32_t* step = nullptr;     // hand-off step counter (kBatchStepBase + steps run)
  float* attn = nullptr;       // [S][nq]
  int32_t* gpu_ids = nullptr;  // [S][top_k] hybrid: CPU experts as -1 for the grouping
  float* ycpu = nullptr;       // [S][hidden] CPU experts' sums, copied from the mapped y block
  float* logits = nullptr;     // [S][vocab]
  int32_t* all_cpu = nullptr;  // [n_experts] of -1: the slot map of a layer with no GPU expert
  void* attn_ws = nullptr;     // the batched attention's workspace (two-launch path)

  int32_t* h_io = nullptr;  // pinned [2S]
  // Hybrid: the mapped routing block [h: S * hidden][ids: S * top_k][wts: S * top_k] and y block
  // [S * hidden] (host views; d_* the device views), and the grouped CPU experts.
  uint8_t* mapped = nullptr;
  float* h_h = nullptr;
  int32_t* h_ids = nullptr;
  float* h_wts = nullptr;
  float* h_y = nullptr;
  std::unique_ptr<CpuMoeBatch> cpu_moe;
  uint32_t host_step = kBatchStepBase;

  struct Graph {
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
  };
  std::map<int64_t, Graph> graphs;  // by batch size
};

}  // namespace ktune
