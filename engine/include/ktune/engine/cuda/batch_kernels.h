// Launchers of the batched decode step (GpuEngine::decode_batch: one token of each of B
// sequences per step, engine/cuda/gpu_engine_batch.cpp). Same launcher shape as kernels.h:
// device pointers, workspace from the caller, a stream last; nothing allocated, nothing
// synchronised, cudaErrorInvalidValue (before launching) for arguments a kernel cannot handle.
// Row b of every batched input and output belongs to sequence b; no result of row b depends on
// another row (so B sequences decoded together give the bits each gives alone), and there are
// no float atomics.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace ktune::cuda {

// ---- attention (attention_decode.cu) ----
// launch_attention_decode / launch_attention_decode_qknorm_rope for `batch` sequences at once:
// row b of q / q_raw ([batch][n_heads][hd]), k_new / k_raw and v_new ([batch][n_kv][hd]) is
// sequence b's token at position pos[b] (device memory, `batch` int32), attended over sequence
// b's cache, which starts seq_stride elements after sequence b - 1's (each [n_kv][max_ctx][hd]
// fp16, seq_stride >= n_kv * max_ctx * hd); out is [batch][n_heads][hd]. Per row the arithmetic
// of the single-sequence launcher (the same kernels with a batch grid dimension), so row b
// equals what that launcher gives on sequence b's cache bit for bit. A pos[b] outside
// [0, max_ctx) writes NaN to row b and stores nothing. Workspace (when the two-launch path
// runs): attention_decode_batch_workspace_bytes. batch <= 65535.
size_t attention_decode_batch_workspace_bytes(int64_t batch, int64_t n_heads, int64_t head_dim,
                                              int64_t max_ctx);
cudaError_t launch_attention_decode_batch(const float* q, const float* k_new, const float* v_new,
                                          uint16_t* k_cache, uint16_t* v_cache, int64_t seq_stride,
                                          const int32_t* pos, int64_t batch, int64_t n_heads,
                                          int64_t n_kv, int64_t head_dim, int64_t max_ctx,
                                          void* workspace, float* out, cudaStream_t stream);
cudaError_t launch_attention_decode_qknorm_rope_batch(
    const float* q_raw, const float* k_raw, const float* v_new, const float* q_norm,
    const float* k_norm, float eps, const float* inv_freq, uint16_t* k_cache, uint16_t* v_cache,
    int64_t seq_stride, const int32_t* pos, int64_t batch, int64_t n_heads, int64_t n_kv,
    int64_t head_dim, int64_t max_ctx, void* workspace, float* out, cudaStream_t stream);

// ---- step helpers (batch_decode.cu) ----
// y16[i] = fp16(x[i]) (round to nearest even) for i < n: the attention output as the input of
// the o projection's tensor-core matmul (launch_prefill_matmul).
cudaError_t launch_f32_to_f16(const float* x, int64_t n, uint16_t* y16, cudaStream_t stream);

// Hybrid placements: gpu_ids[p] = ids[p] when that expert is on this GPU (slot_map[ids[p]] >=
// 0), -1 when it is on the CPU, and ids[p] unchanged when it is outside [0, n_experts) (the
// grouping and the combine treat it as a bad id). p < pairs.
cudaError_t launch_batch_gpu_ids(const int32_t* ids, int64_t pairs, const int32_t* slot_map,
                                 int64_t n_experts, int32_t* gpu_ids, cudaStream_t stream);

// The MoE combine of a batched step, per token t and column c:
//   s = 0; s = s + w_j * ye[pair_pos[t k + j]][c] over the slots j < k whose expert is on the GPU
//   (slot order; the decode combine's arithmetic: rounded multiply, then add);
//   x[t][c] = x[t][c] + s when the token has a GPU expert, then x[t][c] = x[t][c] + ycpu[t][c]
//   when it has a CPU expert -- the single-sequence hybrid step's order, (x + GPU) + CPU.
// slot_map (n_experts int32, -1 = on the CPU) and ycpu (the CPU experts' sums, [tokens][hidden])
// are null for a layer with every expert on the GPU. An id outside [0, n_experts), or a GPU
// expert's pair without a grouped row (pair_pos -1), gives NaN.
cudaError_t launch_batch_moe_combine(const float* ye, const int32_t* pair_pos, const int32_t* ids,
                                     const float* weights, const int32_t* slot_map,
                                     const float* ycpu, int64_t tokens, int64_t k,
                                     int64_t n_experts, int64_t hidden, float* x,
                                     cudaStream_t stream);

// End of a batched step, per sequence b < batch: history[b * history_len + pos[b]] = tokens[b]
// (when pos[b] < history_len), then ++pos[b]; and ++*step (the step counter the CPU-expert
// hand-off builds its sequence number from). One block.
cudaError_t launch_batch_advance(const int32_t* tokens, int32_t* pos, int32_t* history,
                                 int64_t history_len, int64_t batch, int32_t* step,
                                 cudaStream_t stream);

}  // namespace ktune::cuda
