// Kernels of the deepseek2 decode step on the GPU (engine/cuda/gpu_engine_deepseek.cpp), one op
// per engine/cuda/*.cu file, with kernels.h's launcher shape: device pointers in and out,
// workspace from the caller, stream last; no allocation, no synchronisation; the launch status
// (cudaErrorInvalidValue, checked before launching, for arguments a launcher cannot handle).
// The position is read from device memory, so a captured CUDA graph replays every launch. No
// float atomics: each output element is summed by one thread (or one warp's butterfly) in a
// fixed order, so results are bit-identical run to run, graph or not.
//
// MLA in its absorbed form (runtime/cpu_engine_deepseek.h explains the choice): the cache holds,
// per position, the normalized latent c (kv_lora_rank floats) and the roped shared key k_pe
// (rope_dim floats), lat = kv_lora_rank + rope_dim floats in all, float32 as the CPU engine
// stores it (so both engines attend over the same numbers). Per token and layer:
//   launch_mla_rope_store   latent norm + k_pe RoPE into the cache row at *pos; q_pe RoPE of
//                           every head into the tail of its absorbed query
//   launch_head_matvec(_t)  q_abs[h] = W_kb[h]^T q_nope[h] (into the head of the absorbed query),
//                           and after attention o[h] = W_vb[h] ctx[h]
//   launch_mla_attention    ctx[h] = sum_p softmax_p(scale * q_abs[h] . cache_p) * c_p
// RoPE is ggml's "normal" mode on adjacent pairs (cpu_ops::rope_pairs), with YaRN's frequencies
// and cos/sin factor computed on the host (runtime/cpu_engine_deepseek.h deepseek_rope).
//
// The router (deepseek_router.cu): sigmoid or softmax scores, the selection bias, group-limited
// top-k, normalization and scaling, as cpu_ops::route_grouped.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "ktune/engine/quant.h"

namespace ktune::cuda {

// RoPE and cache store of one token (mla_rope_store.cu). With p = *pos:
//   cache[p][0..rank) = rmsnorm(kv[0..rank)) * kv_norm_w  (launch_rmsnorm's arithmetic)
//   cache[p][rank..rank+rope) = rope_pairs(kv[rank..rank+rope))
//   q_out[h * q_out_stride + rank + i] = rope_pairs(q[h * q_stride + q_pe_off + i]), i < rope
// for h < n_heads. rope_pairs rotates (v[2i], v[2i+1]) by angle float(p) * inv_freq[i] (float32),
// cos and sin of that float in double, rounded to float, then multiplied by cs_scale (YaRN's
// attention factor), as cpu_ops::rope_table_scaled + rope_pairs, with rounded (non-contracted)
// multiplies and adds. inv_freq: rope/2 floats in device memory. A p outside [0, max_ctx) stores
// nothing and writes NaN into q_out's roped part (so the step's output is visibly wrong).
// rope even and <= 1024, rank <= 8192.
cudaError_t launch_mla_rope_store(const float* kv, const float* kv_norm_w, float eps,
                                  const float* q, int64_t q_stride, int64_t q_pe_off,
                                  const float* inv_freq, float cs_scale, const int32_t* pos,
                                  int64_t n_heads, int64_t rank, int64_t rope, int64_t max_ctx,
                                  float* cache, float* q_out, int64_t q_out_stride,
                                  cudaStream_t stream);

// Per-head matvec (mla_head_matvec.cu): for h < heads and r < rows,
//   y[h * y_stride + r] = dot(W row (h * head_rows + row0 + r), x + h * x_stride)
// W rows of `cols` elements of `type` (row_bytes(type, cols) bytes each, back to back). Every row
// dot is the warp-per-row dot of the MoE kernels (rowwarp_dot.cuh): Q4_0, Q8_0, BF16, F32;
// cols % 32 == 0; x and every x + h * x_stride 16-byte aligned; W 2-byte (quant) or 16-byte
// (BF16, F32) aligned. Serves attn_k_b (absorbing the query: head h is kv_lora_rank rows of
// qk_nope values), attn_v_b (head h: v_head_dim rows of kv_lora_rank) and the value rows of
// attn_kv_b (head h: rows h * (qk_nope + v_head) + qk_nope + r).
cudaError_t launch_head_matvec(QuantType type, const void* w, int64_t head_rows, int64_t row0,
                               int64_t rows, int64_t cols, int64_t heads, const float* x,
                               int64_t x_stride, float* y, int64_t y_stride, cudaStream_t stream);

// The transposed per-head matvec (mla_head_matvec_t.cu): for h < heads and c < cols,
//   y[h * y_stride + c] = sum_{i < rows} x[h * x_stride + i] * W[h * head_rows + row0 + i][c]
// summed in increasing i (one thread per output). For attn_kv_b, whose key rows (qk_nope per
// head, kv_lora_rank long) absorb the query as a weighted sum of rows (the CPU engine's axpy
// over dequantized rows). Types: F32, F16, BF16, Q8_0, Q4_0 (cols % 32 == 0 for the quants).
cudaError_t launch_head_matvec_t(QuantType type, const void* w, int64_t head_rows, int64_t row0,
                                 int64_t rows, int64_t cols, int64_t heads, const float* x,
                                 int64_t x_stride, float* y, int64_t y_stride, cudaStream_t stream);

// Absorbed MLA attention of one token over the latent cache (mla_attention.cu):
//   q:     [n_heads][q_stride] absorbed queries, lat = rank + rope values each (q_abs, then the
//          roped q_pe)
//   cache: [max_ctx][lat] float32; positions 0..*pos are attended (this token's row is stored)
//   out:   [n_heads][out_stride]: out[h][r] = sum_p a_hp * cache[p][r], r < rank,
//          a_hp = softmax over p of scale * (q[h] . cache[p])
// The sequence is split into at most 64 spans of whole kMlaChunk-position chunks (from *pos, on
// the device, so the launch replays in a graph), each span walked chunk by chunk with an online
// softmax; heads in groups of up to kMlaHeads per block (each cache row read once for the group);
// a second launch merges the spans in order. workspace: mla_attention_workspace_bytes. A *pos
// outside [0, max_ctx) writes NaN to out.
// Requirements: lat <= 1024, rank <= 1024, q_stride >= lat, out_stride >= rank, max_ctx <= 2^24.
constexpr int kMlaChunk = 256;
constexpr int kMlaHeads = 16;
size_t mla_attention_workspace_bytes(int64_t n_heads, int64_t rank, int64_t max_ctx);
cudaError_t launch_mla_attention(const float* q, int64_t q_stride, const float* cache,
                                 const int32_t* pos, int64_t n_heads, int64_t rank, int64_t rope,
                                 int64_t max_ctx, float scale, void* workspace, float* out,
                                 int64_t out_stride, cudaStream_t stream);

// deepseek2 routing of one token (deepseek_router.cu), cpu_ops::route_grouped's semantics:
// scores = sigmoid(logits) or softmax(logits); experts are chosen by scores + bias (bias: null
// for none) and, when groups > 1 and groups_used < groups, only within the groups_used groups
// (of n_experts / groups consecutive experts) whose two best biased scores sum highest; the k
// chosen experts' weights are their unbiased scores, divided by their sum when norm, times
// scale. Ties go to the lower index. ids[k] and weights[k] come out sorted by expert id. One warp.
// n_experts <= 1024, 1 <= k <= min(n_experts, 64), groups divides n_experts, groups <= 1024.
cudaError_t launch_deepseek_router(const float* logits, int64_t n_experts, int64_t k, bool sigmoid,
                                   const float* bias, int64_t groups, int64_t groups_used,
                                   bool norm, float scale, int32_t* ids, float* weights,
                                   cudaStream_t stream);

}  // namespace ktune::cuda
