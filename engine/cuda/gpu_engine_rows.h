// The activations of n token rows that the layer pieces of gpu_engine_rows.cpp read and write:
// the tokens of a prefill chunk (PrefillState) or one token of each sequence of a batched decode
// step (BatchState). Private to the engine: nothing outside engine/cuda includes it.
#pragma once

#include <cstdint>

namespace ktune::gpu_detail {

struct TokenRows {
  int32_t* tokens = nullptr;  // [n]
  float* x = nullptr;         // [n][hidden] residual stream
  uint16_t* h16 = nullptr;    // [n][hidden] fp16 normed input of the q/k/v and expert matmuls
  float* hn = nullptr;        // [n][hidden] float32 normed input of the router (and CPU experts)
  float *qf = nullptr, *kf = nullptr, *vf = nullptr;   // [n][nq], [n][nkv], [n][nkv]
  uint16_t* a16 = nullptr;                             // [n][nq] fp16 attention output
  float* rlog = nullptr;                               // [n][n_experts]
  int32_t* ids = nullptr;                              // [n][top_k]
  float* wts = nullptr;                                // [n][top_k]
  int32_t *sorted_tok = nullptr, *pair_pos = nullptr;  // [n * top_k] grouped by expert
  int32_t *tiles = nullptr, *n_tiles = nullptr;        // [max_tiles][4], 1
  int64_t max_tiles = 0;
  uint16_t* act16 = nullptr;  // [n * top_k][ffn] SwiGLU output, grouped order
  float* ye = nullptr;        // [n * top_k][hidden] expert outputs, grouped order
  // Per layer, per expert: device pointers to its gate, up and down matrices:
  // table + (layer * 3 + {0, 1, 2}) * n_experts.
  const void** expert_table = nullptr;
};

}  // namespace ktune::gpu_detail
