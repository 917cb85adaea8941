// The decode step's launches (GpuEngine::Impl, engine/cuda/gpu_engine_impl.h).
#include <tuple>

#include "cuda/gpu_engine_impl.h"
#include "ktune/engine/cuda/kernels.h"
#include "ktune/engine/trace.h"

namespace ktune {

using gpu_detail::check_launch;

void GpuEngine::Impl::matvec(const DevTensor& t, const float* in, float* out, int64_t rows) {
  if (t.type == QuantType::F32) {
    check_launch(cuda::launch_matvec_rowwarp(t.type, t.data, in, rows, t.row_len, out, stream),
                 "launch_matvec_rowwarp");
  } else {
    check_launch(cuda::launch_matvec(t.type, t.data, in, rows, t.row_len, out, stream),
                 "launch_matvec");
  }
}

// The decode step for the token in `token` at position `pos` (both device memory).
void GpuEngine::Impl::enqueue_step() {
  if (legacy) {
    enqueue_step_legacy();
  } else {
    enqueue_step_fused();
  }
}

// Per layer 6 launches: q/k/v matvec with the attention RMSNorm as prologue; attention with the
// q/k head norms and RoPE folded in (one cluster launch on sm_90); o matvec + residual; ffn
// RMSNorm + router matvec + softmax top-k (writes h for the MoE); gate/up/SwiGLU; down + weighted
// sum + residual. Then the output head with the final RMSNorm as prologue and the greedy tail
// (argmax, history, position). With KTUNE_PDL=1 every launch is programmatic-dependent
// (common.cuh): each kernel copies its weights while the previous one finishes (measured slower
// on the H100, hence opt-in).
void GpuEngine::Impl::enqueue_step_fused() {
  cudaStream_t s = stream;
  const float eps = cfg.rms_eps;
  if (spec.embedding) {  // a later pipeline stage receives x from the previous GPU instead
    check_launch(
        cuda::launch_embedding(tok_embd.type, tok_embd.data, vocab, hidden, token, 1, x, s),
        "launch_embedding");
  }
  for (int64_t l = lb; l < le; ++l) {
    const DevLayer& d = L[static_cast<size_t>(l)];
    const int32_t layer = static_cast<int32_t>(l);
    {
      trace::Scope attention(trace::Phase::Attention, layer);
      const bool same_qkv = d.wk.type == d.wq.type && d.wv.type == d.wq.type;
      cuda::MatvecFused qkv;
      qkv.type = d.wq.type;
      qkv.cols = hidden;
      qkv.x = x;
      qkv.norm_w = static_cast<const float*>(d.attn_norm.data);
      qkv.eps = eps;
      if (same_qkv) {
        qkv.seg[0] = {d.wq.data, q, nq};
        qkv.seg[1] = {d.wk.data, k, nkv_rows};
        qkv.seg[2] = {d.wv.data, v, nkv_rows};
        qkv.n_seg = 3;
        check_launch(cuda::launch_matvec_fused(qkv, s), "launch_matvec_fused qkv");
      } else {
        for (const auto& [t, y, rows] : {std::tuple{&d.wq, q, nq}, std::tuple{&d.wk, k, nkv_rows},
                                         std::tuple{&d.wv, v, nkv_rows}}) {
          qkv.type = t->type;
          qkv.seg[0] = {t->data, y, rows};
          qkv.n_seg = 1;
          check_launch(cuda::launch_matvec_fused(qkv, s), "launch_matvec_fused q/k/v");
        }
      }
      check_launch(cuda::launch_attention_decode_qknorm_rope(
                       q, k, v, static_cast<const float*>(d.q_norm.data),
                       static_cast<const float*>(d.k_norm.data), eps, inv_freq, d.k_cache,
                       d.v_cache, pos, n_heads, n_kv, hd, max_ctx, attn_ws, attn, s),
                   "launch_attention_decode_qknorm_rope");
      cuda::MatvecFused wo;
      wo.type = d.wo.type;
      wo.cols = nq;
      wo.x = attn;
      wo.seg[0] = {d.wo.data, x, hidden};
      wo.accumulate = true;
      check_launch(cuda::launch_matvec_fused(wo, s), "launch_matvec_fused o");
    }
    {
      trace::Scope routing(trace::Phase::Router, layer);
      cuda::MatvecFused router;
      router.type = d.router.type;
      router.cols = hidden;
      router.x = x;
      router.norm_w = static_cast<const float*>(d.ffn_norm.data);
      router.eps = eps;
      router.norm_out = h;
      router.seg[0] = {d.router.data, rlog, n_exp};
      router.topk_ids = ids;
      router.topk_w = wts;
      router.topk_k = top_k;
      router.topk_norm = cfg.norm_topk_prob;
      router.counter = router_counter;
      router.topk_counts = expert_counts_d != nullptr ? expert_counts_d + (l - lb) * n_exp : nullptr;
      check_launch(cuda::launch_matvec_fused(router, s), "launch_matvec_fused router");
    }
    moe(d, l);
  }
  if (!spec.head) {
    // A pipeline stage without the head only moves its own position on (its attention reads
    // it); its token and history are unused.
    check_launch(cuda::launch_decode_advance(pos, token, history, max_ctx, s),
                 "launch_decode_advance (stage)");
    return;
  }
  trace::Scope sampling(trace::Phase::Sampling);
  cuda::MatvecFused head;
  head.type = output.type;
  head.cols = hidden;
  head.x = x;
  head.norm_w = static_cast<const float*>(output_norm.data);
  head.eps = eps;
  head.seg[0] = {output.data, logits, vocab};
  head.argmax_key = head_key;
  head.counter = head_counter;
  head.argmax_out = token;
  head.advance_pos = pos;
  head.advance_history = history;
  head.advance_len = max_ctx;
  check_launch(cuda::launch_matvec_fused(head, s), "launch_matvec_fused output");
}

void GpuEngine::Impl::enqueue_step_legacy() {
  cudaStream_t s = stream;
  const float eps = cfg.rms_eps;
  check_launch(cuda::launch_embedding(tok_embd.type, tok_embd.data, vocab, hidden, token, 1, x, s),
               "launch_embedding");
  for (int64_t l = 0; l < layers; ++l) {
    const DevLayer& d = L[static_cast<size_t>(l)];
    check_launch(
        cuda::launch_rmsnorm(x, static_cast<const float*>(d.attn_norm.data), eps, 1, hidden, h, s),
        "launch_rmsnorm");
    matvec(d.wq, h, q, nq);
    matvec(d.wk, h, k, nkv_rows);
    matvec(d.wv, h, v, nkv_rows);
    check_launch(
        cuda::launch_rmsnorm(q, static_cast<const float*>(d.q_norm.data), eps, n_heads, hd, qn, s),
        "launch_rmsnorm q");
    check_launch(
        cuda::launch_rmsnorm(k, static_cast<const float*>(d.k_norm.data), eps, n_kv, hd, kn, s),
        "launch_rmsnorm k");
    check_launch(cuda::launch_rope_neox(qn, pos, inv_freq, 1, n_heads, hd, s), "launch_rope q");
    check_launch(cuda::launch_rope_neox(kn, pos, inv_freq, 1, n_kv, hd, s), "launch_rope k");
    check_launch(cuda::launch_attention_decode(qn, kn, v, d.k_cache, d.v_cache, pos, n_heads, n_kv,
                                               hd, max_ctx, attn_ws, attn, s),
                 "launch_attention_decode");
    matvec(d.wo, attn, o, hidden);
    check_launch(cuda::launch_add_inplace(x, o, hidden, s), "launch_add_inplace");
    check_launch(
        cuda::launch_rmsnorm(x, static_cast<const float*>(d.ffn_norm.data), eps, 1, hidden, h, s),
        "launch_rmsnorm ffn");
    matvec(d.router, h, rlog, n_exp);
    check_launch(
        cuda::launch_router_topk(rlog, 1, n_exp, top_k, cfg.norm_topk_prob, ids, wts, nullptr, s),
        "launch_router_topk");
    if (opt.moe_kernel == MoeKernel::Fused) {
      check_launch(
          cuda::launch_moe_gate_up_swiglu(d.gate.type, d.gate.data, d.up.data, d.gate.matrix_bytes,
                                          ids, top_k, n_exp, h, ffn, hidden, act, s),
          "launch_moe_gate_up_swiglu");
      check_launch(cuda::launch_moe_down_sum(d.down.type, d.down.data, d.down.matrix_bytes, ids,
                                             wts, top_k, n_exp, act, hidden, ffn, x, s),
                   "launch_moe_down_sum");
    } else {
      moe_unfused(d, l);
    }
  }
  check_launch(
      cuda::launch_rmsnorm(x, static_cast<const float*>(output_norm.data), eps, 1, hidden, h, s),
      "launch_rmsnorm output");
  matvec(output, h, logits, vocab);
  check_launch(cuda::launch_argmax(logits, 1, vocab, token, s), "launch_argmax");
  check_launch(cuda::launch_decode_advance(pos, token, history, max_ctx, s),
               "launch_decode_advance");
}

}  // namespace ktune
