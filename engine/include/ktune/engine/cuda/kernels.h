// Launchers of the CUDA backend's kernels, one op per engine/cuda/*.cu file.
//
// Every launcher has one shape: device pointers in, device pointers out, workspace from the
// caller, a stream last; it allocates nothing, synchronises nothing and returns the launch status
// (cudaErrorInvalidValue for arguments it cannot handle, checked before launching). Values that
// change per token (position, token id) are read from device memory so a captured CUDA graph can
// replay the launch. Every reduction has a fixed order (warp butterflies and shared-memory trees
// of a fixed block size, no float atomics): the same inputs give bit-identical outputs on every
// run, graph or not.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "ktune/engine/quant.h"

namespace ktune::cuda {

// y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, for `rows` rows of n floats (row-major, contiguous).
// Same order of operations as cpu_ops::rmsnorm (w * (x * r)), float32 throughout.
cudaError_t launch_rmsnorm(const float* x, const float* w, float eps, int64_t rows, int64_t n,
                           float* y, cudaStream_t stream);

// NEOX RoPE in place on v[rows][heads][head_dim] (float32): for i < hd/2 the pair (i, i + hd/2)
// is rotated by angle = float(pos[row]) * inv_freq[i] (float32, as the CPU engine and Hugging
// Face), with cos/sin of that float angle computed in double and rounded, as cpu_ops::rope_table.
// pos: `rows` int32 in device memory. inv_freq: hd/2 floats in device memory (rope_inv_freq).
cudaError_t launch_rope_neox(float* v, const int32_t* pos, const float* inv_freq, int64_t rows,
                             int64_t heads, int64_t head_dim, cudaStream_t stream);
// inv_freq[i] = 1 / theta^(2i/hd), in float32 exactly as the CPU engine computes it (host side;
// upload once at load).
std::vector<float> rope_inv_freq(float theta, int64_t head_dim);

// Decode matvec: y[r] = dot(W row r, x) for r < rows, W rows of `cols` elements stored back to
// back in ggml layout (row_bytes(type, cols) bytes each), x and y float32. Weights are read once
// and dequantized in registers; x stays float32 (no activation quantization), so the only error
// against the float64 reference is float32 accumulation. Supported: Q4_0, Q8_0, BF16, and the
// K-quants Q4_K, Q5_K, Q6_K (kquant_kernels.h; cols % 256 == 0, W 4- / 2-byte aligned).
// cols must be a multiple of 32 for Q4_0/Q8_0; x must be 16-byte aligned for Q4_0/Q8_0 (arena
// slices are); W 2-byte aligned. Fastest when rows start 4-byte (quant) / 16-byte (BF16) aligned.
cudaError_t launch_matvec(QuantType type, const void* w, const float* x, int64_t rows, int64_t cols,
                          float* y, cudaStream_t stream);
// The per-type launchers behind launch_matvec.
cudaError_t launch_matvec_q4_0(const void* w, const float* x, int64_t rows, int64_t cols, float* y,
                               cudaStream_t stream);
cudaError_t launch_matvec_q8_0(const void* w, const float* x, int64_t rows, int64_t cols, float* y,
                               cudaStream_t stream);
cudaError_t launch_matvec_bf16(const void* w, const float* x, int64_t rows, int64_t cols, float* y,
                               cudaStream_t stream);

// Router: for each of n_tokens rows of n_experts logits, softmax, then the k largest
// probabilities (ties: lower expert index), renormalized to sum 1 when norm_topk_prob.
// Outputs ids[t][k] (int32) and weights[t][k] (float) sorted by expert id, the order of
// cpu_ops::route_topk; probs[t][n_experts] (the full softmax, for router statistics) when
// non-null. n_experts <= 1024, 1 <= k <= min(n_experts, 64).
cudaError_t launch_router_topk(const float* logits, int64_t n_tokens, int64_t n_experts, int64_t k,
                               bool norm_topk_prob, int32_t* ids, float* weights, float* probs,
                               cudaStream_t stream);

// Greedy sampling: out[r] = argmax of logits[r][0..n) (ties: lowest index; NaN never wins; a
// row of only NaN gives -1), for `rows` rows.
cudaError_t launch_argmax(const float* logits, int64_t rows, int64_t n, int32_t* out,
                          cudaStream_t stream);

// out[t][0..n_embd) = dequantized row tokens[t] of the embedding table (n_vocab rows of n_embd
// elements of `type`: F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K or Q6_K). Token ids are read from
// device memory; an id outside [0, n_vocab) gives a row of NaN rather than a wild read.
// n_tokens <= 65535.
cudaError_t launch_embedding(QuantType type, const void* table, int64_t n_vocab, int64_t n_embd,
                             const int32_t* tokens, int64_t n_tokens, float* out,
                             cudaStream_t stream);

// Decode attention for one query token with grouped-query heads.
//   q:       [n_heads][hd] float32 (after q-norm and RoPE)
//   k_new, v_new: [n_kv][hd] float32, this token's key and value
//   k_cache, v_cache: [n_kv][max_ctx][hd] fp16 (uint16 bits), preallocated
//   pos:     one int32 in device memory: this token's position (0-based); positions < pos are
//            in the cache, k_new/v_new are stored at pos and attended in float32 (as the CPU
//            engine attends its current token before the cache holds it)
//   out:     [n_heads][hd] float32
// scale = 1/sqrt(hd); softmax with max subtraction. Split-K over the sequence in chunks of
// kAttnChunk positions, grid sized for max_ctx so the launch is graph-replayable; the partial
// results are combined in split order (deterministic). workspace: attention_decode_workspace_bytes.
// Requirements: hd even and <= 256, n_heads % n_kv == 0, max_ctx <= 2^24, 0 <= pos < max_ctx (a
// pos outside that range writes NaN to out and stores nothing).
constexpr int kAttnChunk = 256;
size_t attention_decode_workspace_bytes(int64_t n_heads, int64_t head_dim, int64_t max_ctx);
cudaError_t launch_attention_decode(const float* q, const float* k_new, const float* v_new,
                                    uint16_t* k_cache, uint16_t* v_cache, const int32_t* pos,
                                    int64_t n_heads, int64_t n_kv, int64_t head_dim,
                                    int64_t max_ctx, void* workspace, float* out,
                                    cudaStream_t stream);

// Busy-waits one GPU thread for `ns` nanoseconds (benchmarks: queue work behind it so it starts
// without host submission gaps).
cudaError_t launch_spin(uint64_t ns, cudaStream_t stream);

// ---- MoE (moe_fused.cu, matvec_rowwarp.cu, moe_elementwise.cu) ----
// One warp per row: y[r] = dot(W row r, x); F32, BF16, Q8_0, Q4_0 (cols % 32 == 0, x 16-byte
// aligned, W 2-byte (quant) or 16-byte (F32/BF16) aligned) and Q4_K, Q5_K, Q6_K (cols % 256 == 0,
// W 4-byte (Q4_K, Q5_K) or 2-byte (Q6_K) aligned); the MoE launchers below take the same types. The router (F32) and the unfused MoE
// path use it; its row dot is the fused MoE kernels' own, so both paths agree bit for bit.
cudaError_t launch_matvec_rowwarp(QuantType type, const void* w, const float* x, int64_t rows,
                                  int64_t cols, float* y, cudaStream_t stream);

// Fused MoE, one token, routing from device memory (graph-capturable). Expert e's matrices
// start at base + e * expert_bytes (3-D ggml expert tensors: expert_bytes = rows * row bytes).
// expert_slot (optional, device memory, n_experts int32): a hybrid placement's map from expert
// id to its index in the compacted GPU copy (base + slot * expert_bytes), -1 for an expert kept
// elsewhere (the CPU): such slots are skipped (act[j] = 0, no dot, not summed), so x receives
// the sum over the GPU experts only, still in slot order. nullptr = every expert here, slot = id.
// (a) act[j][r] = silu(gate_{ids[j]}[r] . x) * (up_{ids[j]}[r] . x), j < k, r < ffn; one launch.
cudaError_t launch_moe_gate_up_swiglu(QuantType type, const void* gate, const void* up,
                                      int64_t expert_bytes, const int32_t* ids, int64_t k,
                                      int64_t n_experts, const float* x, int64_t ffn,
                                      int64_t hidden, float* act, cudaStream_t stream,
                                      const int32_t* expert_slot = nullptr);
// (b) x[r] += sum_{j=0..k-1} weights[j] * (down_{ids[j]}[r] . act[j]), r < hidden; one warp per
// output row sums the k experts in slot order (no atomics). ffn % 32 == 0.
cudaError_t launch_moe_down_sum(QuantType type, const void* down, int64_t expert_bytes,
                                const int32_t* ids, const float* weights, int64_t k,
                                int64_t n_experts, const float* act, int64_t hidden, int64_t ffn,
                                float* x, cudaStream_t stream,
                                const int32_t* expert_slot = nullptr);
// ---- decode engine fusions (matvec_fused.cu, attention_decode.cu) ----
// One matvec launch over up to three matrices of the same type and width (rows of segment i go
// to seg[i].y), with optional fusions:
//   norm_w      x is replaced by rmsnorm(x) * norm_w (launch_rmsnorm's arithmetic, eps) before
//               the dots; norm_out (optional) receives that normalized x.
//   accumulate  y[r] = y[r] + dot (the residual add), else y[r] = dot.
//   topk_ids    router tail: after all rows, softmax top-k of segment 0's outputs (n_experts =
//               seg[0].rows <= 1024, 1 <= topk_k <= 64) as launch_router_topk writes them
//               (ids/weights sorted by expert id, renormalized when topk_norm); topk_counts
//               (optional, seg[0].rows int32): += 1 for each chosen expert. Needs counter: one
//               zero-initialized unsigned in device memory per concurrent launch (reset by the
//               kernel, so a captured graph replays it).
//   argmax_out  greedy tail: *argmax_out = index of the largest output over all rows (ties: the
//               lowest index; NaN never wins; -1 when every output is NaN), as launch_argmax.
//               Needs counter (as above) and argmax_key: one zero-initialized 64-bit word in
//               device memory (reset by the kernel). With advance_pos: then, as
//               launch_decode_advance, advance_history[*advance_pos] = token (when *advance_pos <
//               advance_len) and ++*advance_pos. Not with topk_ids.
// Types: Q4_0, Q8_0, BF16, F32 (cols % 32 == 0), Q4_K, Q5_K, Q6_K (cols % 256 == 0); cols <=
// 16384; weights aligned as launch_matvec_rowwarp's (16-byte rows stream fastest); x any float
// alignment. Each row's dot is a
// fixed-order sum (rowwarp_dot.cuh layout, rows and x staged in shared memory): deterministic.
// With KTUNE_PDL=1, launched with programmatic dependent launch on a non-default stream
// (common.cuh): the weights are copied before the kernel waits for the previous launch.
// rows_per_warp: 0 = by row count; 1, 2 or 4 force it (benchmarks).
struct MatvecSegment {
  const void* w = nullptr;
  float* y = nullptr;
  int64_t rows = 0;
};
struct MatvecFused {
  QuantType type = QuantType::F32;
  int64_t cols = 0;
  MatvecSegment seg[3];
  int n_seg = 1;
  const float* x = nullptr;
  const float* norm_w = nullptr;
  float eps = 0.0f;
  float* norm_out = nullptr;
  bool accumulate = false;
  int32_t* topk_ids = nullptr;
  float* topk_w = nullptr;
  int64_t topk_k = 0;
  bool topk_norm = false;
  int32_t* topk_counts = nullptr;
  unsigned* counter = nullptr;
  unsigned long long* argmax_key = nullptr;
  int32_t* argmax_out = nullptr;
  int32_t* advance_pos = nullptr;
  int32_t* advance_history = nullptr;
  int64_t advance_len = 0;
  int rows_per_warp = 0;
};
cudaError_t launch_matvec_fused(const MatvecFused& args, cudaStream_t stream);
// Queries the SM count and occupancy launch_matvec_fused sizes its grid from (once per process);
// call before capturing a graph (the first launch does it otherwise).
cudaError_t matvec_fused_prepare();

// launch_attention_decode with the q/k head RMSNorm and NEOX RoPE folded in: q_raw [n_heads][hd]
// and k_raw [n_kv][hd] straight from the projections; each block normalizes (w * (x * r), r =
// 1/sqrt(mean(x^2) + eps), q_norm / k_norm: hd floats) and rotates its heads (launch_rope_neox's
// arithmetic, position *pos, inv_freq: hd/2 floats) in shared memory; the cache receives the
// normalized, rotated k. Same workspace and requirements as launch_attention_decode. On sm_90
// with head_dim % 64 == 0 and n_heads / n_kv <= 16 it is one launch (a thread-block cluster per
// kv head, partial results merged through distributed shared memory; the workspace is unused).
cudaError_t launch_attention_decode_qknorm_rope(const float* q_raw, const float* k_raw,
                                                const float* v_new, const float* q_norm,
                                                const float* k_norm, float eps,
                                                const float* inv_freq, uint16_t* k_cache,
                                                uint16_t* v_cache, const int32_t* pos,
                                                int64_t n_heads, int64_t n_kv, int64_t head_dim,
                                                int64_t max_ctx, void* workspace, float* out,
                                                cudaStream_t stream);

// Unfused-path and engine helpers: out = silu(g) * u; acc = acc + w * y (rounded multiply, then
// add: the fused combine); x = x + y; end of a decode step: history[*pos] = *token (when
// *pos < history_len), then ++*pos.
cudaError_t launch_swiglu(const float* g, const float* u, int64_t n, float* out,
                          cudaStream_t stream);
cudaError_t launch_axpy_accumulate(float w, const float* y, int64_t n, float* acc,
                                   cudaStream_t stream);
cudaError_t launch_add_inplace(float* x, const float* y, int64_t n, cudaStream_t stream);
cudaError_t launch_decode_advance(int32_t* pos, const int32_t* token, int32_t* history,
                                  int64_t history_len, cudaStream_t stream);

}  // namespace ktune::cuda
