// GpuEngine (ktune/engine/gpu_engine.h): qwen3moe decode entirely on cuda:0, built from the
// CUDA backend's launchers. Memory: one arena for the weights (sized from the tensor list), one
// for the KV cache, activations and workspace; both allocated at construction, nothing after.
#include "ktune/engine/gpu_engine.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>

#include "ktune/engine/cpu_moe.h"
#include "ktune/engine/cuda/cuda_check.h"
#include "ktune/engine/cuda/kernels.h"
#include "ktune/engine/error.h"
#include "ktune/engine/thread_pool.h"

namespace ktune {

// moe_kernel_name() is defined once, in runtime/placement.cpp (placement.h declares the same
// MoeKernel); a second definition here breaks linking anything that uses both.

namespace {

constexpr size_t kAlign = 256;

size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// A weight tensor on the device.
struct DevTensor {
  QuantType type = QuantType::F32;
  const void* data = nullptr;
  int64_t row_len = 0;
  int64_t rows = 0;          // all rows (experts: ne[1] * ne[2])
  int64_t matrix_bytes = 0;  // one expert's matrix (ne[1] rows)
};

struct DevLayer {
  DevTensor attn_norm, wq, wk, wv, wo, q_norm, k_norm, ffn_norm, router, gate, up, down;
  // Hybrid: experts of this layer on the GPU (gate/up/down hold only those, compacted) and on
  // the CPU; slot_map (device, n_experts int32: slot or -1) when the layer mixes, else nullptr.
  int64_t n_gpu_experts = 0;
  int64_t n_cpu_experts = 0;
  const int32_t* slot_map = nullptr;
  std::vector<int32_t> host_slot;  // the same map on the host (unfused path); empty: slot = id
  uint16_t* k_cache = nullptr;
  uint16_t* v_cache = nullptr;
};

void check_launch(cudaError_t err, const char* what) { cuda::check(err, what, __FILE__, __LINE__); }

}  // namespace

struct GpuEngine::Impl {
  const ModelConfig cfg;
  GpuEngineOptions opt;
  std::string device_name;
  int64_t hidden, n_heads, n_kv, hd, nq, nkv_rows, n_exp, top_k, ffn, vocab, layers, max_ctx;

  cuda::DeviceArena weights_arena;
  cuda::DeviceArena work_arena;
  cuda::Stream stream;

  DevTensor tok_embd, output_norm, output;
  std::vector<DevLayer> L;

  // Activations and per-step state (device).
  float *x, *h, *q, *k, *v, *qn, *kn, *attn, *o, *rlog, *wts, *act, *g, *u, *ye, *acc, *logits,
      *inv_freq;
  int32_t *ids, *token, *pos, *history;
  unsigned* router_counter = nullptr;  // launch_matvec_fused's router tail (self-resetting)
  void* attn_ws = nullptr;
  // KTUNE_GPU_LEGACY=1: the step as one launch per op (separate norms, rope, residual adds,
  // router top-k; launch_matvec), for A/B timing against the fused step.
  bool legacy = false;

  // Routing staging, device and pinned host, one contiguous block so one copy moves it:
  // [h: hidden floats][ids: top_k int32][wts: top_k floats]. h, ids, wts point into it.
  void* stage = nullptr;
  size_t stage_bytes = 0, stage_ids_off = 0;
  // Pinned host staging: the token written by decode(), the routing block (unfused path, CPU
  // experts), the CPU experts' partial sum.
  int32_t* h_token = nullptr;
  uint8_t* h_stage = nullptr;
  float* h_h = nullptr;
  int32_t* h_ids = nullptr;
  float* h_wts = nullptr;
  float* h_ycpu = nullptr;

  // Hybrid mode (some expert on the CPU).
  bool is_hybrid = false;
  int64_t cpu_experts_total = 0;
  std::unique_ptr<ThreadPool> pool;
  std::unique_ptr<CpuMoe> cpu_moe;
  std::vector<int32_t> sel_ids;
  std::vector<float> sel_w;
  float* ycpu = nullptr;  // device copy of the CPU partial sum
  std::unique_ptr<cuda::Event> ev_route;  // routing block copied (hybrid)

  cudaGraph_t graph = nullptr;
  cudaGraphExec_t graph_exec = nullptr;
  int64_t host_pos = 0;

  Impl(const ModelWeights& w, const GpuEngineOptions& options) : cfg(w.cfg), opt(options) {
    if (opt.cuda_graph && opt.moe_kernel == MoeKernel::Unfused) {
      throw Error("gpu engine",
                  "cuda_graph with moe_kernel unfused is not possible: the unfused "
                  "path copies routing to the host and synchronises in the middle of the step",
                  "use moe_kernel fused with the graph, or turn cuda_graph off", ErrorKind::Usage);
    }
    const bool want_map = !opt.expert_on_gpu.empty();
    if (want_map) {
      bool ok = static_cast<int64_t>(opt.expert_on_gpu.size()) == cfg.n_layers;
      for (const auto& row : opt.expert_on_gpu) {
        ok = ok && static_cast<int64_t>(row.size()) == cfg.n_experts;
        for (bool b : row) is_hybrid = is_hybrid || !b;
      }
      if (!ok) {
        throw Error("gpu engine",
                    "expert placement map is not " + std::to_string(cfg.n_layers) + " layers x " +
                        std::to_string(cfg.n_experts) + " experts",
                    "pass one device flag per expert of every layer", ErrorKind::Usage);
      }
    }
    if (is_hybrid && opt.cuda_graph) {
      throw Error("gpu engine",
                  "cuda_graph with experts on the CPU is not implemented yet: the hybrid step "
                  "hands CPU experts over on the host thread (the graph hand-offs through host "
                  "nodes or mapped flags are still to come)",
                  "turn cuda_graph off for placements with CPU experts", ErrorKind::Usage);
    }
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count < 1) {
      cudaGetLastError();
      throw Error("gpu engine", "no usable CUDA device", "run on a machine with an NVIDIA GPU");
    }
    KTUNE_CUDA_CHECK(cudaSetDevice(0));
    cudaDeviceProp prop{};
    KTUNE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    device_name = prop.name;

    hidden = cfg.hidden;
    n_heads = cfg.n_heads;
    n_kv = cfg.n_kv_heads;
    hd = cfg.head_dim;
    nq = n_heads * hd;
    nkv_rows = n_kv * hd;
    n_exp = cfg.n_experts;
    top_k = cfg.n_experts_used;
    ffn = cfg.expert_ffn;
    vocab = cfg.vocab;
    layers = cfg.n_layers;
    max_ctx = opt.max_context;
    if (max_ctx < 1 || max_ctx > (int64_t{1} << 24)) {
      throw Error("gpu engine", "max_context " + std::to_string(max_ctx) + " out of range",
                  "use 1..16777216", ErrorKind::Usage);
    }
    if (static_cast<int64_t>(w.layers.size()) != layers) {
      throw Error("gpu engine",
                  "model has " + std::to_string(w.layers.size()) + " layers, config " +
                      std::to_string(layers),
                  "use a complete qwen3moe model");
    }

    // ---- weights: size, allocate once, copy ----
    std::vector<const TensorView*> all;
    all.push_back(&w.tok_embd);
    all.push_back(&w.output_norm);
    if (w.output.data) all.push_back(&w.output);
    for (const LayerWeights& lw : w.layers) {
      for (const TensorView* t :
           {&lw.attn_norm, &lw.wq, &lw.wk, &lw.wv, &lw.wo, &lw.q_norm, &lw.k_norm, &lw.ffn_norm,
            &lw.router, &lw.gate_exps, &lw.up_exps, &lw.down_exps}) {
        all.push_back(t);
      }
    }
    auto on_gpu = [&](int64_t l, int64_t e) {
      return !want_map || opt.expert_on_gpu[static_cast<size_t>(l)][static_cast<size_t>(e)];
    };
    auto gpu_count = [&](int64_t l) {
      int64_t n = 0;
      for (int64_t e = 0; e < cfg.n_experts; ++e) n += on_gpu(l, e) ? 1 : 0;
      return n;
    };
    size_t wbytes = 0;
    // Expert tensors: only the GPU experts' matrices (compacted), plus a slot map for a layer
    // that mixes; the full tensor is counted below and taken back here.
    for (int64_t l = 0; l < static_cast<int64_t>(w.layers.size()); ++l) {
      const LayerWeights& lw = w.layers[static_cast<size_t>(l)];
      const int64_t ng = gpu_count(l);
      for (const TensorView* t : {&lw.gate_exps, &lw.up_exps, &lw.down_exps}) {
        if (t->data == nullptr) continue;
        wbytes -= align_up(static_cast<size_t>(t->nbytes()));
        if (ng > 0) wbytes += align_up(static_cast<size_t>(ng * t->ne[1] * t->row_stride()));
      }
      if (ng > 0 && ng < cfg.n_experts) {
        wbytes += align_up(static_cast<size_t>(cfg.n_experts) * sizeof(int32_t));
      }
    }
    for (const TensorView* t : all) {
      if (t->data == nullptr) {
        throw Error(t->name.empty() ? "gpu engine" : t->name, "tensor missing",
                    "use a complete qwen3moe model");
      }
      wbytes += align_up(static_cast<size_t>(t->nbytes()));
    }
    weights_arena = cuda::DeviceArena(wbytes, "gpu engine weights");
    auto upload = [&](const TensorView& t) {
      DevTensor d;
      d.type = t.type;
      d.row_len = t.row_len();
      d.rows = t.n_rows();
      d.matrix_bytes = t.ne[1] * t.row_stride();
      void* p = weights_arena.alloc(static_cast<size_t>(t.nbytes()), kAlign);
      KTUNE_CUDA_CHECK(
          cudaMemcpy(p, t.data, static_cast<size_t>(t.nbytes()), cudaMemcpyHostToDevice));
      d.data = p;
      return d;
    };
    auto check_shape = [&](const TensorView& t, int64_t row_len, int64_t rows, bool matrix,
                           const std::string& what) {
      if (t.row_len() != row_len || t.n_rows() != rows) {
        throw Error(t.name.empty() ? what : t.name,
                    "shaped [" + std::to_string(t.ne[0]) + ", " + std::to_string(t.ne[1]) + ", " +
                        std::to_string(t.ne[2]) + "], expected " + std::to_string(row_len) + " x " +
                        std::to_string(rows),
                    "use a qwen3moe model whose tensors match its configuration");
      }
      const bool ok = matrix ? (t.type == QuantType::Q4_0 || t.type == QuantType::Q8_0 ||
                                t.type == QuantType::BF16 || t.type == QuantType::F32)
                             : t.type == QuantType::F32;
      if (!ok) {
        throw Error(t.name.empty() ? what : t.name,
                    std::string("type ") + quant_name(t.type) + " not supported by the GPU engine",
                    matrix ? "use Q4_0, Q8_0, BF16 or F32 matrices" : "norm weights must be F32");
      }
    };
    tok_embd = upload(w.tok_embd);
    check_shape(w.output_norm, hidden, 1, false, "output_norm");
    output_norm = upload(w.output_norm);
    const TensorView& out_w = w.output.data ? w.output : w.tok_embd;
    check_shape(out_w, hidden, vocab, true, "output");
    output = w.output.data ? upload(w.output) : tok_embd;
    L.resize(static_cast<size_t>(layers));
    for (int64_t l = 0; l < layers; ++l) {
      const LayerWeights& lw = w.layers[static_cast<size_t>(l)];
      const std::string blk = "blk." + std::to_string(l) + ".";
      check_shape(lw.attn_norm, hidden, 1, false, blk + "attn_norm");
      check_shape(lw.q_norm, hd, 1, false, blk + "attn_q_norm");
      check_shape(lw.k_norm, hd, 1, false, blk + "attn_k_norm");
      check_shape(lw.ffn_norm, hidden, 1, false, blk + "ffn_norm");
      check_shape(lw.wq, hidden, nq, true, blk + "attn_q");
      check_shape(lw.wk, hidden, nkv_rows, true, blk + "attn_k");
      check_shape(lw.wv, hidden, nkv_rows, true, blk + "attn_v");
      check_shape(lw.wo, nq, hidden, true, blk + "attn_output");
      check_shape(lw.router, hidden, n_exp, true, blk + "ffn_gate_inp");
      check_shape(lw.gate_exps, hidden, ffn * n_exp, true, blk + "ffn_gate_exps");
      check_shape(lw.up_exps, hidden, ffn * n_exp, true, blk + "ffn_up_exps");
      check_shape(lw.down_exps, ffn, hidden * n_exp, true, blk + "ffn_down_exps");
      DevLayer& d = L[static_cast<size_t>(l)];
      d.attn_norm = upload(lw.attn_norm);
      d.wq = upload(lw.wq);
      d.wk = upload(lw.wk);
      d.wv = upload(lw.wv);
      d.wo = upload(lw.wo);
      d.q_norm = upload(lw.q_norm);
      d.k_norm = upload(lw.k_norm);
      d.ffn_norm = upload(lw.ffn_norm);
      d.router = upload(lw.router);
      d.n_gpu_experts = gpu_count(l);
      d.n_cpu_experts = n_exp - d.n_gpu_experts;
      cpu_experts_total += d.n_cpu_experts;
      if (d.n_cpu_experts == 0) {
        d.gate = upload(lw.gate_exps);
        d.up = upload(lw.up_exps);
        d.down = upload(lw.down_exps);
      } else {
        // Compacted: slot s holds the s-th GPU expert (in id order).
        d.host_slot.assign(static_cast<size_t>(n_exp), -1);
        int32_t next = 0;
        for (int64_t e = 0; e < n_exp; ++e) {
          if (on_gpu(l, e)) d.host_slot[static_cast<size_t>(e)] = next++;
        }
        auto upload_experts = [&](const TensorView& t) {
          DevTensor dt;
          dt.type = t.type;
          dt.row_len = t.row_len();
          dt.rows = t.ne[1] * d.n_gpu_experts;
          dt.matrix_bytes = t.ne[1] * t.row_stride();
          if (d.n_gpu_experts == 0) return dt;
          auto* p = static_cast<uint8_t*>(weights_arena.alloc(
              static_cast<size_t>(d.n_gpu_experts * dt.matrix_bytes), kAlign));
          for (int64_t e = 0; e < n_exp; ++e) {
            const int32_t sl = d.host_slot[static_cast<size_t>(e)];
            if (sl < 0) continue;
            KTUNE_CUDA_CHECK(cudaMemcpy(p + sl * dt.matrix_bytes, t.matrix(e),
                                        static_cast<size_t>(dt.matrix_bytes),
                                        cudaMemcpyHostToDevice));
          }
          dt.data = p;
          return dt;
        };
        d.gate = upload_experts(lw.gate_exps);
        d.up = upload_experts(lw.up_exps);
        d.down = upload_experts(lw.down_exps);
        if (d.n_gpu_experts > 0) {
          auto* m = static_cast<int32_t*>(
              weights_arena.alloc(static_cast<size_t>(n_exp) * sizeof(int32_t), kAlign));
          KTUNE_CUDA_CHECK(cudaMemcpy(m, d.host_slot.data(),
                                      static_cast<size_t>(n_exp) * sizeof(int32_t),
                                      cudaMemcpyHostToDevice));
          d.slot_map = m;
        }
      }
    }

    // ---- KV cache, activations, workspace: one arena ----
    const size_t kv_bytes = static_cast<size_t>(n_kv * max_ctx * hd) * sizeof(uint16_t);
    const size_t ws_bytes = cuda::attention_decode_workspace_bytes(n_heads, hd, max_ctx);
    const size_t f = sizeof(float);
    size_t work = 2 * static_cast<size_t>(layers) * align_up(kv_bytes) + align_up(ws_bytes);
    stage_ids_off = static_cast<size_t>(hidden) * f;
    stage_bytes = stage_ids_off + (static_cast<size_t>(top_k) * 4 + 15) / 16 * 16 +
                  static_cast<size_t>(top_k) * 4;
    for (int64_t n : {hidden, nq, nkv_rows, nkv_rows, nq, nkv_rows, nq, hidden, n_exp,
                      top_k * ffn, ffn, ffn, hidden, hidden, vocab, hd / 2, hidden}) {
      work += align_up(static_cast<size_t>(n) * f);
    }
    work += align_up(stage_bytes) + 3 * kAlign + align_up(static_cast<size_t>(max_ctx) * 4);
    work_arena = cuda::DeviceArena(work, "gpu engine workspace");
    for (DevLayer& d : L) {
      d.k_cache = static_cast<uint16_t*>(work_arena.alloc(kv_bytes));
      d.v_cache = static_cast<uint16_t*>(work_arena.alloc(kv_bytes));
    }
    attn_ws = work_arena.alloc(std::max<size_t>(ws_bytes, 1));
    auto fl = [&](int64_t n) { return work_arena.alloc_n<float>(static_cast<size_t>(n)); };
    x = fl(hidden);
    stage = work_arena.alloc(stage_bytes);
    h = static_cast<float*>(stage);
    ids = reinterpret_cast<int32_t*>(static_cast<uint8_t*>(stage) + stage_ids_off);
    wts = reinterpret_cast<float*>(static_cast<uint8_t*>(stage) + stage_ids_off +
                                   (static_cast<size_t>(top_k) * 4 + 15) / 16 * 16);
    ycpu = fl(hidden);
    q = fl(nq);
    k = fl(nkv_rows);
    v = fl(nkv_rows);
    qn = fl(nq);
    kn = fl(nkv_rows);
    attn = fl(nq);
    o = fl(hidden);
    rlog = fl(n_exp);
    act = fl(top_k * ffn);
    g = fl(ffn);
    u = fl(ffn);
    ye = fl(hidden);
    acc = fl(hidden);
    logits = fl(vocab);
    inv_freq = fl(hd / 2);
    token = work_arena.alloc_n<int32_t>(1);
    pos = work_arena.alloc_n<int32_t>(1);
    history = work_arena.alloc_n<int32_t>(static_cast<size_t>(max_ctx));
    router_counter = work_arena.alloc_n<unsigned>(1);
    KTUNE_CUDA_CHECK(cudaMemset(router_counter, 0, sizeof(unsigned)));
    KTUNE_CUDA_CHECK(cuda::matvec_fused_prepare());
    if (const char* e = std::getenv("KTUNE_GPU_LEGACY")) legacy = e[0] != '\0' && e[0] != '0';
    if (is_hybrid) legacy = false;  // the one-launch-per-op step has no hybrid MoE
    const std::vector<float> freq = cuda::rope_inv_freq(cfg.rope_theta, hd);
    KTUNE_CUDA_CHECK(cudaMemcpy(inv_freq, freq.data(), freq.size() * f, cudaMemcpyHostToDevice));
    KTUNE_CUDA_CHECK(cudaMemset(pos, 0, sizeof(int32_t)));
    KTUNE_CUDA_CHECK(cudaMemset(history, 0xff, static_cast<size_t>(max_ctx) * 4));

    KTUNE_CUDA_CHECK(cudaMallocHost(&h_token, sizeof(int32_t)));
    KTUNE_CUDA_CHECK(cudaMallocHost(&h_stage, stage_bytes));
    h_h = reinterpret_cast<float*>(h_stage);
    h_ids = reinterpret_cast<int32_t*>(h_stage + stage_ids_off);
    h_wts = reinterpret_cast<float*>(h_stage + (reinterpret_cast<uint8_t*>(wts) -
                                                static_cast<uint8_t*>(stage)));
    if (is_hybrid) {
      KTUNE_CUDA_CHECK(cudaMallocHost(&h_ycpu, static_cast<size_t>(hidden) * sizeof(float)));
      pool = std::make_unique<ThreadPool>(opt.cpu_threads, opt.pin_threads);
      cpu_moe = std::make_unique<CpuMoe>(w, *pool);
      ev_route = std::make_unique<cuda::Event>(false);
      sel_ids.resize(static_cast<size_t>(top_k));
      sel_w.resize(static_cast<size_t>(top_k));
    }
  }

  ~Impl() {
    if (graph_exec) cudaGraphExecDestroy(graph_exec);
    if (graph) cudaGraphDestroy(graph);
    if (h_token) cudaFreeHost(h_token);
    if (h_stage) cudaFreeHost(h_stage);
    if (h_ycpu) cudaFreeHost(h_ycpu);
  }

  void matvec(const DevTensor& t, const float* in, float* out, int64_t rows) {
    if (t.type == QuantType::F32) {
      check_launch(cuda::launch_matvec_rowwarp(t.type, t.data, in, rows, t.row_len, out, stream),
                   "launch_matvec_rowwarp");
    } else {
      check_launch(cuda::launch_matvec(t.type, t.data, in, rows, t.row_len, out, stream),
                   "launch_matvec");
    }
  }

  // The decode step for the token in `token` at position `pos` (both device memory).
  void enqueue_step() {
    if (legacy) {
      enqueue_step_legacy();
    } else {
      enqueue_step_fused();
    }
  }

  // Per layer 7 launches: q/k/v matvec with the attention RMSNorm as prologue; attention with the
  // q/k head norms and RoPE folded in (partial + combine); o matvec + residual; ffn RMSNorm +
  // router matvec + softmax top-k (writes h for the MoE); gate/up/SwiGLU; down + weighted sum +
  // residual. Then the output head with the final RMSNorm as prologue, argmax, advance.
  void enqueue_step_fused() {
    cudaStream_t s = stream;
    const float eps = cfg.rms_eps;
    check_launch(
        cuda::launch_embedding(tok_embd.type, tok_embd.data, vocab, hidden, token, 1, x, s),
        "launch_embedding");
    for (int64_t l = 0; l < layers; ++l) {
      const DevLayer& d = L[static_cast<size_t>(l)];
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
      check_launch(cuda::launch_matvec_fused(router, s), "launch_matvec_fused router");
      moe(d, l);
    }
    cuda::MatvecFused head;
    head.type = output.type;
    head.cols = hidden;
    head.x = x;
    head.norm_w = static_cast<const float*>(output_norm.data);
    head.eps = eps;
    head.seg[0] = {output.data, logits, vocab};
    check_launch(cuda::launch_matvec_fused(head, s), "launch_matvec_fused output");
    check_launch(cuda::launch_argmax(logits, 1, vocab, token, s), "launch_argmax");
    check_launch(cuda::launch_decode_advance(pos, token, history, max_ctx, s),
                 "launch_decode_advance");
  }

  void moe(const DevLayer& d, int64_t l) {
    cudaStream_t s = stream;
    if (opt.moe_kernel == MoeKernel::Unfused) {
      moe_unfused(d, l);
      return;
    }
    if (d.n_cpu_experts > 0) {
      // Routing block (h, ids, weights) to pinned memory; the GPU experts run meanwhile.
      KTUNE_CUDA_CHECK(cudaMemcpyAsync(h_stage, stage, stage_bytes, cudaMemcpyDeviceToHost, s));
      ev_route->record(s);
    }
    if (d.n_gpu_experts > 0) {
      check_launch(cuda::launch_moe_gate_up_swiglu(d.gate.type, d.gate.data, d.up.data,
                                                   d.gate.matrix_bytes, ids, top_k, n_exp, h, ffn,
                                                   hidden, act, s, d.slot_map),
                   "launch_moe_gate_up_swiglu");
      check_launch(cuda::launch_moe_down_sum(d.down.type, d.down.data, d.down.matrix_bytes, ids,
                                             wts, top_k, n_exp, act, hidden, ffn, x, s,
                                             d.slot_map),
                   "launch_moe_down_sum");
    }
    if (d.n_cpu_experts > 0) {
      ev_route->synchronize();
      cpu_experts(d, l);
    }
  }

  // The CPU experts of the routing in h_stage (copied and complete): CpuMoe over the selected
  // experts kept on the CPU, in slot order, into pinned memory; then the copy to the device and
  // x += y_cpu enqueued on the stream, after whatever GPU experts were enqueued before.
  void cpu_experts(const DevLayer& d, int64_t l) {
    int n = 0;
    for (int64_t j = 0; j < top_k; ++j) {
      const int32_t id = h_ids[j];
      if (id < 0 || id >= n_exp) {
        throw Error("gpu engine",
                    "router chose expert " + std::to_string(id) + " of " + std::to_string(n_exp),
                    "the model's router produced NaN logits");
      }
      if (d.host_slot[static_cast<size_t>(id)] >= 0) continue;  // a GPU expert
      sel_ids[static_cast<size_t>(n)] = id;
      sel_w[static_cast<size_t>(n)] = h_wts[j];
      ++n;
    }
    if (n == 0) return;
    cpu_moe->compute(l, h_h, sel_ids.data(), sel_w.data(), n, h_ycpu);
    cudaStream_t s = stream;
    KTUNE_CUDA_CHECK(cudaMemcpyAsync(ycpu, h_ycpu, static_cast<size_t>(hidden) * sizeof(float),
                                     cudaMemcpyHostToDevice, s));
    check_launch(cuda::launch_add_inplace(x, ycpu, hidden, s), "launch_add_inplace cpu experts");
  }

  void enqueue_step_legacy() {
    cudaStream_t s = stream;
    const float eps = cfg.rms_eps;
    check_launch(
        cuda::launch_embedding(tok_embd.type, tok_embd.data, vocab, hidden, token, 1, x, s),
        "launch_embedding");
    for (int64_t l = 0; l < layers; ++l) {
      const DevLayer& d = L[static_cast<size_t>(l)];
      check_launch(cuda::launch_rmsnorm(x, static_cast<const float*>(d.attn_norm.data), eps, 1,
                                        hidden, h, s),
                   "launch_rmsnorm");
      matvec(d.wq, h, q, nq);
      matvec(d.wk, h, k, nkv_rows);
      matvec(d.wv, h, v, nkv_rows);
      check_launch(cuda::launch_rmsnorm(q, static_cast<const float*>(d.q_norm.data), eps, n_heads,
                                        hd, qn, s),
                   "launch_rmsnorm q");
      check_launch(
          cuda::launch_rmsnorm(k, static_cast<const float*>(d.k_norm.data), eps, n_kv, hd, kn, s),
          "launch_rmsnorm k");
      check_launch(cuda::launch_rope_neox(qn, pos, inv_freq, 1, n_heads, hd, s), "launch_rope q");
      check_launch(cuda::launch_rope_neox(kn, pos, inv_freq, 1, n_kv, hd, s), "launch_rope k");
      check_launch(cuda::launch_attention_decode(qn, kn, v, d.k_cache, d.v_cache, pos, n_heads,
                                                 n_kv, hd, max_ctx, attn_ws, attn, s),
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
        check_launch(cuda::launch_moe_gate_up_swiglu(d.gate.type, d.gate.data, d.up.data,
                                                     d.gate.matrix_bytes, ids, top_k, n_exp, h, ffn,
                                                     hidden, act, s),
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

  // The per-expert pattern: routing to the host (sync), then 5 launches per selected expert.
  // With CPU experts in the layer: the whole routing block (h too) comes over, the GPU experts
  // are launched first, then the CPU experts run while the GPU works (same sums as fused).
  void moe_unfused(const DevLayer& d, int64_t l) {
    cudaStream_t s = stream;
    if (d.n_cpu_experts > 0) {
      KTUNE_CUDA_CHECK(cudaMemcpyAsync(h_stage, stage, stage_bytes, cudaMemcpyDeviceToHost, s));
    } else {
      KTUNE_CUDA_CHECK(cudaMemcpyAsync(h_ids, ids, stage_bytes - stage_ids_off,
                                       cudaMemcpyDeviceToHost, s));
    }
    KTUNE_CUDA_CHECK(cudaStreamSynchronize(s));
    if (d.n_gpu_experts > 0) {
      KTUNE_CUDA_CHECK(cudaMemsetAsync(acc, 0, static_cast<size_t>(hidden) * sizeof(float), s));
    }
    for (int64_t j = 0; j < top_k && d.n_gpu_experts > 0; ++j) {
      const int32_t id = h_ids[j];
      if (id < 0 || id >= n_exp) {
        throw Error("gpu engine",
                    "router chose expert " + std::to_string(id) + " of " + std::to_string(n_exp),
                    "the model's router produced NaN logits");
      }
      const int64_t slot = d.host_slot.empty() ? id : d.host_slot[static_cast<size_t>(id)];
      if (slot < 0) continue;  // a CPU expert
      const auto* gb = static_cast<const uint8_t*>(d.gate.data) + slot * d.gate.matrix_bytes;
      const auto* ub = static_cast<const uint8_t*>(d.up.data) + slot * d.up.matrix_bytes;
      const auto* db = static_cast<const uint8_t*>(d.down.data) + slot * d.down.matrix_bytes;
      check_launch(cuda::launch_matvec_rowwarp(d.gate.type, gb, h, ffn, hidden, g, s), "gate");
      check_launch(cuda::launch_matvec_rowwarp(d.up.type, ub, h, ffn, hidden, u, s), "up");
      float* a = act + j * ffn;
      check_launch(cuda::launch_swiglu(g, u, ffn, a, s), "launch_swiglu");
      check_launch(cuda::launch_matvec_rowwarp(d.down.type, db, a, hidden, ffn, ye, s), "down");
      check_launch(cuda::launch_axpy_accumulate(h_wts[j], ye, hidden, acc, s), "axpy");
    }
    if (d.n_gpu_experts > 0) {
      check_launch(cuda::launch_add_inplace(x, acc, hidden, s), "launch_add_inplace moe");
    }
    if (d.n_cpu_experts > 0) cpu_experts(d, l);
  }

  void run_step() {
    if (host_pos >= max_ctx) {
      throw Error("gpu engine", "context full (" + std::to_string(max_ctx) + " positions)",
                  "raise max_context or reset()");
    }
    if (opt.cuda_graph) {
      if (graph_exec == nullptr) {
        KTUNE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
        try {
          enqueue_step();
        } catch (...) {
          cudaGraph_t broken = nullptr;
          cudaStreamEndCapture(stream, &broken);
          if (broken) cudaGraphDestroy(broken);
          throw;
        }
        KTUNE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
        KTUNE_CUDA_CHECK(cudaGraphInstantiate(&graph_exec, graph, 0));
      }
      KTUNE_CUDA_CHECK(cudaGraphLaunch(graph_exec, stream));
    } else {
      enqueue_step();
    }
    ++host_pos;
  }

  void set_token(int32_t t) {
    KTUNE_CUDA_CHECK(cudaStreamSynchronize(stream));  // h_token may still be read by a copy
    *h_token = t;
    KTUNE_CUDA_CHECK(
        cudaMemcpyAsync(token, h_token, sizeof(int32_t), cudaMemcpyHostToDevice, stream));
  }
};

GpuEngine::GpuEngine(const ModelWeights& weights, const GpuEngineOptions& opt)
    : impl_(std::make_unique<Impl>(weights, opt)) {}
GpuEngine::~GpuEngine() = default;

void GpuEngine::reset() {
  KTUNE_CUDA_CHECK(cudaMemsetAsync(impl_->pos, 0, sizeof(int32_t), impl_->stream));
  KTUNE_CUDA_CHECK(cudaStreamSynchronize(impl_->stream));
  impl_->host_pos = 0;
}

int64_t GpuEngine::position() const { return impl_->host_pos; }

void GpuEngine::decode(int32_t token, std::vector<float>* logits) {
  Impl& m = *impl_;
  m.set_token(token);
  m.run_step();
  if (logits) {
    logits->resize(static_cast<size_t>(m.vocab));
    KTUNE_CUDA_CHECK(cudaMemcpyAsync(logits->data(), m.logits,
                                     static_cast<size_t>(m.vocab) * sizeof(float),
                                     cudaMemcpyDeviceToHost, m.stream));
  }
  KTUNE_CUDA_CHECK(cudaStreamSynchronize(m.stream));
}

void GpuEngine::prefill(const int32_t* tokens, int64_t n, std::vector<float>* logits) {
  for (int64_t i = 0; i < n; ++i) decode(tokens[i], i + 1 == n ? logits : nullptr);
}

std::vector<int32_t> GpuEngine::generate_greedy(int32_t first_token, int64_t n) {
  Impl& m = *impl_;
  if (n <= 0) return {};
  if (m.host_pos + n > m.max_ctx) {
    throw Error("gpu engine",
                "generating " + std::to_string(n) + " tokens at position " +
                    std::to_string(m.host_pos) + " exceeds max_context " +
                    std::to_string(m.max_ctx),
                "raise max_context or reset()");
  }
  const int64_t p0 = m.host_pos;
  m.set_token(first_token);
  for (int64_t i = 0; i < n; ++i) m.run_step();
  std::vector<int32_t> out(static_cast<size_t>(n));
  KTUNE_CUDA_CHECK(cudaMemcpyAsync(out.data(), m.history + p0, static_cast<size_t>(n) * 4,
                                   cudaMemcpyDeviceToHost, m.stream));
  KTUNE_CUDA_CHECK(cudaStreamSynchronize(m.stream));
  return out;
}

const GpuEngineOptions& GpuEngine::options() const { return impl_->opt; }

int64_t GpuEngine::device_bytes() const {
  return static_cast<int64_t>(impl_->weights_arena.capacity() + impl_->work_arena.capacity());
}

std::string GpuEngine::describe() const {
  const Impl& m = *impl_;
  std::string s = "cuda:0 " + m.device_name + ", moe " + moe_kernel_name(m.opt.moe_kernel) +
                  ", graph " + (m.opt.cuda_graph ? "on" : "off");
  if (m.is_hybrid) {
    s += ", " + std::to_string(m.cpu_experts_total) + "/" + std::to_string(m.n_exp * m.layers) +
         " experts on cpu (" + std::to_string(m.pool->size()) + " threads)";
  }
  return s;
}

bool GpuEngine::hybrid() const { return impl_->is_hybrid; }

}  // namespace ktune
