// The prefill MoE grouped by expert, shared by the CPU engines (cpu_engine.cpp for qwen3moe,
// cpu_engine_deepseek.cpp for deepseek2). For T tokens with K experts each, the (token, expert)
// pairs are grouped so that each active expert's tokens sit in contiguous "slots"; each expert's
// weights are then read once per tile of rows for all of its tokens (matmul_rows) instead of
// once per token. The engines keep their own buffers, thread splits and barriers; these are the
// steps between the barriers, in the order the engines call them:
//   group_by_expert (one thread) -> gather_slot_rows -> gate_up_items -> down_rows -> combine_rows.
// Every output element is computed by one thread in a fixed order: the results do not depend on
// the thread count. Private to engine/runtime.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "runtime/act_buffers.h"
#include "runtime/cpu_ops.h"
#include "ktune/engine/model.h"

namespace ktune::rt {

// Where each pair goes: slots of expert e are begin[e]..begin[e+1) with tokens ascending;
// slot[t*K + j] is where token t's j-th expert's output lands and token[s] is slot s's token;
// active[0..n_active) the experts with at least one slot, ascending. Also adds each expert's
// count to counts[e]. Sizes: begin E+1, active E, slot and token T*K, cursor E. Returns
// n_active. Serial, O(T*K + E).
inline int64_t group_by_expert(const int32_t* sel, int64_t T, int64_t K, int64_t E,
                               int32_t* begin, int32_t* active, int32_t* slot, int32_t* token,
                               int32_t* cursor, uint64_t* counts) {
  std::fill(begin, begin + E + 1, 0);
  for (int64_t i = 0; i < T * K; ++i) ++begin[sel[i] + 1];
  int64_t n_active = 0;
  for (int64_t e = 0; e < E; ++e) {
    counts[e] += static_cast<uint64_t>(begin[e + 1]);
    if (begin[e + 1] > 0) active[n_active++] = static_cast<int32_t>(e);
    begin[e + 1] += begin[e];
  }
  std::copy(begin, begin + E, cursor);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < K; ++j) {
      const int32_t s = cursor[sel[t * K + j]]++;
      slot[t * K + j] = s;
      token[s] = static_cast<int32_t>(t);
    }
  }
  return n_active;
}

// Slots [s0, s1): slot s's input row (token[s]'s row of `in`, `hidden` floats) quantized into
// act's row s for the gate/up weights, and copied to f32_rows (when not null: F32 weights read
// the floats).
inline void gather_slot_rows(int64_t s0, int64_t s1, const int32_t* token, const float* in,
                             int64_t hidden, ActBuffers& act, float* f32_rows, cpu::Isa isa) {
  for (int64_t s = s0; s < s1; ++s) {
    const float* h = in + token[s] * hidden;
    act.quantize_row(h, s, isa);
    if (f32_rows != nullptr) std::memcpy(f32_rows + s * hidden, h, hidden * sizeof(float));
  }
}

// The grouped MoE of one layer: its expert tensors and the grouping of its slots.
struct GroupedExperts {
  const TensorView* gate;
  const TensorView* up;
  const TensorView* down;
  const int32_t* begin;   // group_by_expert's
  const int32_t* active;  // group_by_expert's
  int64_t ffn;            // rows of gate/up (the expert width)
  int64_t unit;           // rows per gate/up item
  int64_t units_per_expert;
};

// Gate + up + SwiGLU over items [it0, it1) (item it = active expert it / units_per_expert, rows
// unit * (it % units_per_expert) .. +unit): G and U hold ffn floats per slot; act_in/in_f32 are
// gather_slot_rows' outputs; each slot's SwiGLU rows are quantized into act_out (the down
// weights' forms). mm(t, W, r0, r1, act, act_stride, T, Y, ldy) is the engine's matmul.
template <class MatMul>
void gate_up_items(const GroupedExperts& g, int64_t it0, int64_t it1, const ActBuffers& act_in,
                   const float* in_f32, float* G, float* U, ActBuffers& act_out, cpu::Isa isa,
                   MatMul&& mm) {
  const int64_t F = g.ffn;
  const uint8_t* gbase = act_in.rows(g.gate->type, in_f32);
  const uint8_t* ubase = act_in.rows(g.up->type, in_f32);
  const int64_t gstride = act_in.stride(g.gate->type);
  const int64_t ustride = act_in.stride(g.up->type);
  for (int64_t it = it0; it < it1; ++it) {
    const int64_t e = g.active[it / g.units_per_expert];
    const int64_t a = (it % g.units_per_expert) * g.unit;
    const int64_t b = std::min(F, a + g.unit);
    const int64_t sb = g.begin[e], ne = g.begin[e + 1] - sb;
    float* gs0 = G + sb * F;
    float* us0 = U + sb * F;
    mm(*g.gate, g.gate->matrix(e), a, b, gbase + sb * gstride, gstride, ne, gs0, F);
    mm(*g.up, g.up->matrix(e), a, b, ubase + sb * ustride, ustride, ne, us0, F);
    for (int64_t s = 0; s < ne; ++s) {
      float* gs = gs0 + s * F;
      const float* us = us0 + s * F;
      for (int64_t i = a; i < b; ++i) gs[i] = cpu_ops::silu(gs[i]) * us[i];
      act_out.quantize(gs + a, sb + s, a, b, isa);
    }
  }
}

// Down rows [r0, r1) of every active expert for all of its slots: Y holds `hidden` floats per
// slot; act_out/G are gate_up_items' outputs.
template <class MatMul>
void down_rows(const GroupedExperts& g, int64_t n_active, int64_t r0, int64_t r1,
               const ActBuffers& act_out, const float* G, int64_t hidden, float* Y, MatMul&& mm) {
  const int64_t astride = act_out.stride(g.down->type);
  const uint8_t* abase = act_out.rows(g.down->type, G);
  for (int64_t i = 0; i < n_active; ++i) {
    const int64_t e = g.active[i];
    const int64_t sb = g.begin[e];
    mm(*g.down, g.down->matrix(e), r0, r1, abase + sb * astride, astride, g.begin[e + 1] - sb,
       Y + sb * hidden, hidden);
  }
}

// Rows [r0, r1) of each token's output: x[t][r] += sum_j w[t][j] * Y[slot[t][j]][r] (slot order,
// as the decode path), plus extra[t][r] (the shared experts; may be null) into the same sum.
inline void combine_rows(int64_t T, int64_t K, int64_t hidden, int64_t r0, int64_t r1,
                         const float* w, const int32_t* slot, const float* Y, const float* extra,
                         float* X) {
  for (int64_t t = 0; t < T; ++t) {
    const float* wt = w + t * K;
    const int32_t* st = slot + t * K;
    float* xt = X + t * hidden;
    for (int64_t r = r0; r < r1; ++r) {
      float s = 0.0f;
      for (int64_t j = 0; j < K; ++j) s += wt[j] * Y[st[j] * hidden + r];
      if (extra != nullptr) s += extra[t * hidden + r];
      xt[r] += s;
    }
  }
}

}  // namespace ktune::rt
