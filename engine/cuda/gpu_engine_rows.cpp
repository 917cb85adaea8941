// The layer pieces over n token rows that the batched prefill (gpu_engine_prefill.cpp) and the
// batched decode step (gpu_engine_batch.cpp) both run: the tensor-core matmul of a dense weight,
// the attention's input (norm, q/k/v), the router (norm, router matmul, top-k) and the experts
// grouped by expert (gate/up with SwiGLU, down). What differs between the two steps (attention
// over one cache or B caches, CPU experts staged or handed off) stays with them.
#include "cuda/gpu_engine_rows.h"

#include <cuda_runtime.h>

#include <string>

#include "cuda/gpu_engine_impl.h"
#include "ktune/engine/cuda/kernels.h"
#include "ktune/engine/cuda/prefill_kernels.h"

namespace ktune {

namespace {

// check_launch with the step's suffix (" (batch)") appended to the launch's name; the name is
// only built when the launch failed.
void check_rows(cudaError_t err, const char* what, const char* sfx) {
  if (err == cudaSuccess) return;
  cuda::check(err, (std::string(what) + sfx).c_str(), __FILE__, __LINE__);
}

}  // namespace

void GpuEngine::Impl::rows_matmul(const DevTensor& t, int64_t n, const uint16_t* a, float* y,
                                  bool accumulate, const char* what, const char* sfx) {
  cuda::PrefillMatmul p;
  p.type = t.type;
  p.m = n;
  p.n = t.rows;
  p.k = t.row_len;
  p.a = a;
  p.lda = t.row_len;
  p.w = t.data;
  p.y = y;
  p.ldy = t.rows;
  p.accumulate = accumulate;
  check_rows(cuda::launch_prefill_matmul(p, stream), what, sfx);
}

void GpuEngine::Impl::rows_qkv(const DevLayer& d, const gpu_detail::TokenRows& r, int64_t n,
                               const char* sfx) {
  check_rows(cuda::launch_prefill_rmsnorm(r.x, static_cast<const float*>(d.attn_norm.data),
                                          cfg.rms_eps, n, hidden, nullptr, r.h16, stream),
             "launch_prefill_rmsnorm attn", sfx);
  rows_matmul(d.wq, n, r.h16, r.qf, false, "launch_prefill_matmul q", sfx);
  rows_matmul(d.wk, n, r.h16, r.kf, false, "launch_prefill_matmul k", sfx);
  rows_matmul(d.wv, n, r.h16, r.vf, false, "launch_prefill_matmul v", sfx);
}

void GpuEngine::Impl::rows_router(const DevLayer& d, const gpu_detail::TokenRows& r, int64_t n,
                                  const char* sfx) {
  check_rows(cuda::launch_prefill_rmsnorm(r.x, static_cast<const float*>(d.ffn_norm.data),
                                          cfg.rms_eps, n, hidden, r.hn, r.h16, stream),
             "launch_prefill_rmsnorm ffn", sfx);
  check_rows(cuda::launch_prefill_matmul_f32(r.hn, static_cast<const float*>(d.router.data), n,
                                             n_exp, hidden, r.rlog, stream),
             "launch_prefill_matmul_f32 router", sfx);
  check_rows(cuda::launch_router_topk(r.rlog, n, n_exp, top_k, cfg.norm_topk_prob, r.ids, r.wts,
                                      nullptr, stream),
             "launch_router_topk", sfx);
}

void GpuEngine::Impl::rows_experts(const DevLayer& d, const gpu_detail::TokenRows& r, int64_t l,
                                   int64_t n, const char* sfx) {
  const void* const* tab = r.expert_table + l * 3 * n_exp;
  cuda::PrefillMatmul gu;
  gu.type = d.gate.type;
  gu.n = ffn;
  gu.k = hidden;
  gu.a = r.h16;
  gu.lda = hidden;
  gu.a_rows = r.sorted_tok;
  gu.w_table = tab;
  gu.w2_table = tab + n_exp;
  gu.tiles = r.tiles;
  gu.n_tiles = r.n_tiles;
  gu.max_tiles = cuda::prefill_moe_max_tiles(n * top_k, n_exp, cuda::kPrefillTileM);
  gu.y16 = r.act16;
  gu.ldy = ffn;
  gu.swiglu = true;
  check_rows(cuda::launch_prefill_matmul(gu, stream), "launch_prefill_matmul gate/up", sfx);
  cuda::PrefillMatmul dn;
  dn.type = d.down.type;
  dn.n = hidden;
  dn.k = ffn;
  dn.a = r.act16;
  dn.lda = ffn;
  dn.w_table = tab + 2 * n_exp;
  dn.tiles = r.tiles;
  dn.n_tiles = r.n_tiles;
  dn.max_tiles = gu.max_tiles;
  dn.y = r.ye;
  dn.ldy = hidden;
  check_rows(cuda::launch_prefill_matmul(dn, stream), "launch_prefill_matmul down", sfx);
}

}  // namespace ktune
