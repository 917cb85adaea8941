// The deepseek2 decode step's launches (GpuEngine::Deepseek, gpu_engine_deepseek.h).
#include <string>

#include "cuda/gpu_engine_deepseek.h"
#include "ktune/engine/cuda/hybrid_kernels.h"
#include "ktune/engine/cuda/kernels.h"
#include "ktune/engine/cuda/mla_kernels.h"
#include "ktune/engine/trace.h"

namespace ktune {

using gpu_detail::check_launch;

// The decode step for the token in `token` at position `pos` (both device memory).
void GpuEngine::Deepseek::enqueue_step() {
  cudaStream_t s = stream;
  check_launch(cuda::launch_embedding(tok_embd.type, tok_embd.data, V, H, token, 1, x, s),
               "launch_embedding");
  for (int64_t l = 0; l < L; ++l) {
    const Layer& d = layers[static_cast<size_t>(l)];
    attention(d, l);
    if (d.dense) {
      trace::Scope ffn(trace::Phase::Other, static_cast<int32_t>(l));
      check_launch(cuda::launch_rmsnorm(x, static_cast<const float*>(d.ffn_norm.data), cfg.rms_eps,
                                        1, H, h, s),
                   "launch_rmsnorm ffn");
      dense_ffn(d.ffn_gate, d.ffn_up, d.ffn_down, Fd);
    } else {
      moe(d, l);
    }
  }
  trace::Scope sampling(trace::Phase::Sampling);
  cuda::MatvecFused head;
  head.type = output.type;
  head.cols = H;
  head.x = x;
  head.norm_w = static_cast<const float*>(output_norm.data);
  head.eps = cfg.rms_eps;
  head.seg[0] = {output.data, logits, V};
  head.argmax_key = head_key;
  head.counter = head_counter;
  head.argmax_out = token;
  head.advance_pos = pos;
  head.advance_history = history;
  head.advance_len = max_ctx;
  check_launch(cuda::launch_matvec_fused(head, s), "launch_matvec_fused output");
}

// MLA, absorbed: 8 launches (7 with q_lora_rank 0).
void GpuEngine::Deepseek::attention(const Layer& d, int64_t l) {
  trace::Scope scope(trace::Phase::Attention, static_cast<int32_t>(l));
  cudaStream_t s = stream;
  const float eps = cfg.rms_eps;
  // The compressed query (or the query) and the latent + unroped key, from the normed input.
  const DevTensor& first = rq > 0 ? d.wq_a : d.wq;
  float* first_out = rq > 0 ? qa : q;
  const int64_t first_rows = rq > 0 ? rq : nh * dq;
  cuda::MatvecFused in;
  in.cols = H;
  in.x = x;
  in.norm_w = static_cast<const float*>(d.attn_norm.data);
  in.eps = eps;
  if (first.type == d.wkv_a.type) {
    in.type = first.type;
    in.seg[0] = {first.data, first_out, first_rows};
    in.seg[1] = {d.wkv_a.data, kva, lat};
    in.n_seg = 2;
    check_launch(cuda::launch_matvec_fused(in, s), "launch_matvec_fused q_a/kv_a");
  } else {
    in.type = first.type;
    in.seg[0] = {first.data, first_out, first_rows};
    check_launch(cuda::launch_matvec_fused(in, s), "launch_matvec_fused q_a");
    in.type = d.wkv_a.type;
    in.seg[0] = {d.wkv_a.data, kva, lat};
    check_launch(cuda::launch_matvec_fused(in, s), "launch_matvec_fused kv_a");
  }
  if (rq > 0) {
    cuda::MatvecFused qb;
    qb.type = d.wq_b.type;
    qb.cols = rq;
    qb.x = qa;
    qb.norm_w = static_cast<const float*>(d.q_a_norm.data);
    qb.eps = eps;
    qb.seg[0] = {d.wq_b.data, q, nh * dq};
    check_launch(cuda::launch_matvec_fused(qb, s), "launch_matvec_fused q_b");
  }
  // Latent norm + k_pe RoPE into the cache row at pos; q_pe RoPE into the absorbed queries' tails.
  check_launch(cuda::launch_mla_rope_store(kva, static_cast<const float*>(d.kv_a_norm.data), eps, q,
                                           dq, dn, inv_freq, rope.cos_sin_scale, pos, nh, rkv, dr,
                                           max_ctx, d.cache, qabs, lat, s),
               "launch_mla_rope_store");
  // q_abs[h] = W_kb[h]^T q_nope[h] into the absorbed queries' heads.
  if (cfg.split_kv_b) {
    check_launch(cuda::launch_head_matvec(d.wk_b.type, d.wk_b.data, rkv, 0, rkv, dn, nh, q, dq,
                                          qabs, lat, s),
                 "launch_head_matvec k_b");
  } else {
    check_launch(cuda::launch_head_matvec_t(d.wkv_b.type, d.wkv_b.data, dn + dv, 0, dn, rkv, nh, q,
                                            dq, qabs, lat, s),
                 "launch_head_matvec_t kv_b");
  }
  check_launch(cuda::launch_mla_attention(qabs, lat, d.cache, pos, nh, rkv, dr, max_ctx,
                                          rope.softmax_scale, attn_ws, ctx, rkv, s),
               "launch_mla_attention");
  // o[h] = W_vb[h] ctx[h].
  if (cfg.split_kv_b) {
    check_launch(
        cuda::launch_head_matvec(d.wv_b.type, d.wv_b.data, dv, 0, dv, rkv, nh, ctx, rkv, o, dv, s),
        "launch_head_matvec v_b");
  } else {
    check_launch(cuda::launch_head_matvec(d.wkv_b.type, d.wkv_b.data, dn + dv, dn, dv, rkv, nh, ctx,
                                          rkv, o, dv, s),
                 "launch_head_matvec kv_b values");
  }
  cuda::MatvecFused wo;
  wo.type = d.wo.type;
  wo.cols = nh * dv;
  wo.x = o;
  wo.seg[0] = {d.wo.data, x, H};
  wo.accumulate = true;
  check_launch(cuda::launch_matvec_fused(wo, s), "launch_matvec_fused attn_output");
}

// The fused MoE kernels with one expert always selected (id 0 of a one-expert "layer", weight
// 1.0: the combine adds 1.0 * dot, exactly the dot): gate/up/SwiGLU, then down + residual. Gate
// and up of different types (mixed-quant files) go through two matvecs and a SwiGLU launch.
void GpuEngine::Deepseek::dense_ffn(const DevTensor& gate, const DevTensor& up,
                                    const DevTensor& down, int64_t ffn) {
  cudaStream_t s = stream;
  if (gate.type == up.type) {
    check_launch(cuda::launch_moe_gate_up_swiglu(gate.type, gate.data, up.data,
                                                 ffn * row_bytes(gate.type, H), one_id, 1, 1, h,
                                                 ffn, H, act_ffn, s),
                 "launch_moe_gate_up_swiglu (dense)");
  } else {
    cuda::MatvecFused mv;
    mv.cols = H;
    mv.x = h;
    mv.type = gate.type;
    mv.seg[0] = {gate.data, act_ffn, ffn};
    check_launch(cuda::launch_matvec_fused(mv, s), "launch_matvec_fused gate (dense)");
    mv.type = up.type;
    mv.seg[0] = {up.data, up_ffn, ffn};
    check_launch(cuda::launch_matvec_fused(mv, s), "launch_matvec_fused up (dense)");
    check_launch(cuda::launch_swiglu(act_ffn, up_ffn, ffn, act_ffn, s), "launch_swiglu (dense)");
  }
  check_launch(cuda::launch_moe_down_sum(down.type, down.data, H * row_bytes(down.type, ffn),
                                         one_id, one_weight, 1, 1, act_ffn, H, ffn, x, s),
               "launch_moe_down_sum (dense)");
}

void GpuEngine::Deepseek::moe(const Layer& d, int64_t l) {
  cudaStream_t s = stream;
  {
    trace::Scope routing(trace::Phase::Router, static_cast<int32_t>(l));
    cuda::MatvecFused router;
    router.type = d.router.type;
    router.cols = H;
    router.x = x;
    router.norm_w = static_cast<const float*>(d.ffn_norm.data);
    router.eps = cfg.rms_eps;
    router.norm_out = h;
    router.seg[0] = {d.router.data, rlog, E};
    check_launch(cuda::launch_matvec_fused(router, s), "launch_matvec_fused router");
    check_launch(cuda::launch_deepseek_router(
                     rlog, E, K, cfg.gating == ExpertGating::Sigmoid,
                     static_cast<const float*>(d.bias.data), cfg.n_expert_groups, cfg.n_groups_used,
                     cfg.norm_topk_prob, cfg.expert_weights_scale, ids, wts, s),
                 "launch_deepseek_router");
  }
  // CPU experts: routing handed over first, so the CPU computes while the GPU works.
  if (d.n_cpu_experts > 0) begin_handoff(l);
  if (Fs > 0) {
    trace::Scope shared(trace::Phase::Other, static_cast<int32_t>(l));
    dense_ffn(d.gate_sh, d.up_sh, d.down_sh, Fs);
  }
  if (d.n_gpu_experts > 0) {
    trace::Scope gpu_experts(trace::Phase::MoeGpu, static_cast<int32_t>(l));
    if (opt.moe_kernel == MoeKernel::Unfused) {
      routed_unfused(d, l);
    } else {
      check_launch(
          cuda::launch_moe_gate_up_swiglu(d.gate.type, d.gate.data, d.up.data, d.gate.matrix_bytes,
                                          ids, K, E, h, F, H, act, s, d.slot_map),
          "launch_moe_gate_up_swiglu");
      check_launch(cuda::launch_moe_down_sum(d.down.type, d.down.data, d.down.matrix_bytes, ids,
                                             wts, K, E, act, H, F, x, s, d.slot_map),
                   "launch_moe_down_sum");
    }
  }
  if (d.n_cpu_experts > 0) end_handoff(l);
}

// The per-expert launch pattern (gate, up, SwiGLU, down, weighted add for each selected slot),
// each launch reading its expert from device memory (a CPU expert's slot is a no-op), so it is
// graph-capturable; with the graph off it runs the same launches eagerly (no host-synchronised
// routing for deepseek2). Same row dots and sum order as the fused kernels: bit-identical.
void GpuEngine::Deepseek::routed_unfused(const Layer& d, int64_t) {
  cudaStream_t s = stream;
  KTUNE_CUDA_CHECK(cudaMemsetAsync(acc, 0, static_cast<size_t>(H) * sizeof(float), s));
  for (int64_t j = 0; j < K; ++j) {
    float* a = act + j * F;
    check_launch(cuda::launch_matvec_rowwarp_slot(d.gate.type, d.gate.data, d.gate.matrix_bytes,
                                                  ids, j, d.slot_map, h, F, H, g, s),
                 "gate slot");
    check_launch(cuda::launch_matvec_rowwarp_slot(d.up.type, d.up.data, d.up.matrix_bytes, ids, j,
                                                  d.slot_map, h, F, H, u, s),
                 "up slot");
    check_launch(cuda::launch_swiglu_slot(ids, j, d.slot_map, g, u, F, a, s), "swiglu slot");
    check_launch(cuda::launch_matvec_rowwarp_slot(d.down.type, d.down.data, d.down.matrix_bytes,
                                                  ids, j, d.slot_map, a, H, F, ye, s),
                 "down slot");
    check_launch(cuda::launch_axpy_slot(ids, j, d.slot_map, wts, ye, H, acc, s), "axpy slot");
  }
  check_launch(cuda::launch_add_inplace(x, acc, H, s), "launch_add_inplace moe");
}

}  // namespace ktune
