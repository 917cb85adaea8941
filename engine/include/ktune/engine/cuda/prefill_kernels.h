// Launchers of the batched prefill kernels (engine/cuda/prefill_*.cu, one op per file), used by
// GpuEngine::prefill for a chunk of T tokens at positions pos0 .. pos0 + T - 1.
//
// Same launcher shape as kernels.h: device pointers, workspace from the caller, a stream last;
// nothing allocated, nothing synchronised, cudaErrorInvalidValue (before launching) for
// arguments a kernel cannot handle. Every output element is computed by one thread in a fixed
// order (no float atomics), so results are bit-identical run to run, and a token's result does
// not depend on which other tokens share its chunk (rows are independent everywhere), so
// chunking a prompt differently gives bit-identical logits.
//
// Precision: the matrix products run on tensor cores with fp16 inputs and fp32 accumulation.
// Activations are rounded to fp16 (relative error <= 2^-11; values beyond 65504 overflow to inf,
// far above what these layers produce); quantized weights are dequantized exactly to integers
// and scaled in fp16 (Q4_0 / Q8_0: d * q rounded once, relative <= 2^-11), BF16 and F32 weights
// rounded to fp16. The router logits are computed in float32 (its top-k decides routing). The
// residual stream, norms, RoPE, softmax statistics and all accumulations are float32.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "ktune/engine/quant.h"

namespace ktune::cuda {

// Rows per tile of the tensor-core matmul: grouped (MoE) tiles hold at most this many rows of
// one expert.
constexpr int kPrefillTileM = 64;

// RMSNorm of `rows` rows of n floats (launch_rmsnorm's arithmetic, float32), written as float32
// to y (optional) and as fp16 (round to nearest even) to y16 (optional).
cudaError_t launch_prefill_rmsnorm(const float* x, const float* w, float eps, int64_t rows,
                                   int64_t n, float* y, uint16_t* y16, cudaStream_t stream);

// Tensor-core matmul Y = A · W^T for prefill.
//   A: fp16 rows of k elements, row r at a + row(r) * lda, row(r) = a_rows ? a_rows[r] : r.
//   W: n rows of k elements in ggml layout (Q4_0, Q8_0, BF16 or F32), as the decode kernels read.
//   Output (float32) y[r * ldy + c], = or += (accumulate) the dot; with SwiGLU (w2 = the up
//   matrix, w = gate): y16[r * ldy + c] = fp16(silu(g) * u) instead.
// Dense: m rows, tiles of kPrefillTileM rows. Grouped (MoE): tiles (device memory, written by
// launch_prefill_moe_route) list {expert, first row, rows} per tile, *n_tiles of them (at most
// max_tiles, the grid's size); the weights of tile's expert e are w_table[e] (and w2_table[e]),
// device arrays of device pointers; rows r index the tile's rows in the grouped order.
// Requirements: k % 64 == 0, lda % 8 == 0, a 16-byte aligned; weights 4-byte aligned with
// row_bytes(type, k) % 4 == 0 (true for k % 64 == 0); n >= 1 (any n; partial column tiles are
// masked); ldy even; y / y16 8-byte / 4-byte aligned.
struct PrefillMatmul {
  QuantType type = QuantType::Q4_0;
  int64_t m = 0, n = 0, k = 0;
  const uint16_t* a = nullptr;
  int64_t lda = 0;
  const int32_t* a_rows = nullptr;
  const void* w = nullptr;                // dense
  const void* w2 = nullptr;               // dense SwiGLU: up
  const void* const* w_table = nullptr;   // grouped: per expert
  const void* const* w2_table = nullptr;  // grouped SwiGLU: up, per expert
  const int32_t* tiles = nullptr;         // grouped: [max_tiles][4] {expert, row0, rows, 0}
  const int32_t* n_tiles = nullptr;
  int64_t max_tiles = 0;
  float* y = nullptr;
  uint16_t* y16 = nullptr;
  int64_t ldy = 0;
  bool accumulate = false;
  bool swiglu = false;
};
cudaError_t launch_prefill_matmul(const PrefillMatmul& args, cudaStream_t stream);

// float32 matmul on CUDA cores (the router, whose logits pick experts): y[r][c] = sum_k x[r][k] *
// w[c][k] summed in k order; x: m rows of k floats (ld k), w: n rows of k floats, y: m rows of n;
// k % 32 == 0, x and w 16-byte aligned.
cudaError_t launch_prefill_matmul_f32(const float* x, const float* w, int64_t m, int64_t n,
                                      int64_t k, float* y, cudaStream_t stream);

// Q/K head RMSNorm + NEOX RoPE + KV store for T tokens at positions pos0 + t:
//   q16[t][h] = fp16(rope(rmsnorm(q[t][h]) * q_norm)), h < n_heads;
//   k_cache[kv][pos0 + t] = fp16(rope(rmsnorm(k[t][kv]) * k_norm)), v_cache[kv][pos0 + t] =
//   fp16(v[t][kv]), kv < n_kv (caches [n_kv][max_ctx][hd], as the decode attention keeps them).
// Arithmetic of launch_attention_decode_qknorm_rope (float angle, double sin/cos).
// q: [T][n_heads * hd], k, v: [T][n_kv * hd] float32. pos0 + T <= max_ctx; hd even, <= 256.
cudaError_t launch_prefill_qk_norm_rope(const float* q, const float* k, const float* v,
                                        const float* q_norm, const float* k_norm, float eps,
                                        const float* inv_freq, int64_t tokens, int64_t pos0,
                                        int64_t n_heads, int64_t n_kv, int64_t head_dim,
                                        int64_t max_ctx, uint16_t* q16, uint16_t* k_cache,
                                        uint16_t* v_cache, cudaStream_t stream);

// Causal attention of T query tokens (positions pos0 + t) over the fp16 KV cache positions
// 0 .. pos0 + t (the chunk's own keys must already be stored): tensor cores for Q·K^T and P·V
// (P rounded to fp16), online softmax in float32, key tiles in increasing order. q16:
// [T][n_heads][hd] fp16, out16: [T][n_heads][hd] fp16. head_dim 64 or 128; n_heads % n_kv == 0.
cudaError_t launch_prefill_attention(const uint16_t* q16, const uint16_t* k_cache,
                                     const uint16_t* v_cache, int64_t tokens, int64_t pos0,
                                     int64_t n_heads, int64_t n_kv, int64_t head_dim,
                                     int64_t max_ctx, uint16_t* out16, cudaStream_t stream);

// Groups the T * k (token, slot) pairs of ids [T][k] by expert, stably (a counting sort: pairs of
// one expert keep their pair order): sorted_tok[p] = token of the p-th pair in grouped order,
// pair_pos[t * k + j] = its grouped position (-1 for an id outside [0, n_experts)), and the
// tile list of launch_prefill_matmul: tiles [tile][4] = {expert, first row, rows <= tile_m, 0}
// for each expert's rows cut into tiles of tile_m, *n_tiles of them (<= T * k / tile_m +
// n_experts). counts (optional): pairs per expert. One block; n_experts <= 256.
int64_t prefill_moe_max_tiles(int64_t pairs, int64_t n_experts, int64_t tile_m);
cudaError_t launch_prefill_moe_route(const int32_t* ids, int64_t tokens, int64_t k,
                                     int64_t n_experts, int64_t tile_m, int32_t* sorted_tok,
                                     int32_t* pair_pos, int32_t* tiles, int32_t* n_tiles,
                                     int32_t* counts, cudaStream_t stream);

// x[t][c] = x[t][c] + s, s = sum over j = 0..k-1 (slot order) of weights[t][j] * ye[pair_pos[t *
// k + j]][c] (rounded multiply, then add, from s = 0): the decode combine's order. A pair with
// pair_pos -1 (bad expert id) gives NaN.
cudaError_t launch_prefill_moe_combine(const float* ye, const int32_t* pair_pos,
                                       const float* weights, int64_t tokens, int64_t k,
                                       int64_t hidden, float* x, cudaStream_t stream);

}  // namespace ktune::cuda
