// GpuEngine::Deepseek (gpu_engine_deepseek.h): construction and the public API. Memory: one
// arena for the weights (sized from the tensor list; a hybrid layer's GPU experts compacted),
// one for the latent cache, activations and workspace; both allocated here, nothing after.
#include "cuda/gpu_engine_deepseek.h"

#include <cuda_runtime.h>
#include <sched.h>

#include <algorithm>
#include <cstring>
#include <string>

#include "ktune/engine/cuda/kernels.h"
#include "ktune/engine/cuda/mla_kernels.h"
#include "ktune/engine/error.h"
#include "ktune/engine/trace.h"

namespace ktune {

using gpu_detail::align_up;
using gpu_detail::kAlign;

namespace {

const char* const kFix = "use a deepseek2 model whose tensors match its configuration";

// Matrix types the GPU kernels multiply (matvec_fused, the MoE kernels, head_matvec).
bool gpu_matrix_type(QuantType t) {
  return t == QuantType::Q4_0 || t == QuantType::Q8_0 || t == QuantType::BF16 ||
         t == QuantType::F32;
}

std::string shape_of(const TensorView& t) {
  return "[" + std::to_string(t.ne[0]) + ", " + std::to_string(t.ne[1]) + ", " +
         std::to_string(t.ne[2]) + "]";
}

// matrix: multiplied by the GPU kernels; embedding: rows looked up (launch_embedding's types);
// else a norm or bias vector (F32).
void check_tensor(const TensorView& t, int64_t row_len, int64_t rows, bool matrix,
                  const std::string& what, bool embedding = false) {
  const std::string name = t.name.empty() ? what : t.name;
  if (t.data == nullptr) throw Error(name, "tensor missing", kFix);
  if (t.row_len() != row_len || t.n_rows() != rows) {
    throw Error(name,
                "shaped " + shape_of(t) + ", expected " + std::to_string(row_len) + " x " +
                    std::to_string(rows),
                kFix);
  }
  if (matrix && !gpu_matrix_type(t.type)) {
    throw Error(name,
                std::string("type ") + quant_name(t.type) + " not supported by the GPU engine",
                "use Q4_0, Q8_0, BF16 or F32 matrices for deepseek2 on the GPU (K-quants run on "
                "the CPU engine)");
  }
  if (matrix && row_len % 32 != 0) {
    throw Error(name, "rows of " + std::to_string(row_len) + " values (not a multiple of 32)",
                "the GPU kernels take rows of whole 32-value blocks");
  }
  if (embedding) {
    if (!gpu_matrix_type(t.type) && t.type != QuantType::F16) {
      throw Error(name,
                  std::string("type ") + quant_name(t.type) +
                      " not supported by the GPU "
                      "embedding lookup",
                  "use F32, F16, BF16, Q8_0 or Q4_0 token embeddings");
    }
    return;
  }
  if (!matrix && t.type != QuantType::F32) {
    throw Error(name, std::string("type ") + quant_name(t.type) + " for a norm or bias vector",
                "norm and bias vectors must be F32");
  }
}

void check_limit(bool ok, const std::string& what, const std::string& problem) {
  if (!ok) {
    throw Error("gpu engine", "deepseek2: " + what + " " + problem,
                "run this model on the CPU engine (a plain --model run)");
  }
}

}  // namespace

void check_deepseek_gpu_support(const ModelWeights& w, const GpuEngineOptions& opt) {
  const ModelConfig& c = w.cfg;
  c.validate("model " + w.source);
  if (std::any_of(opt.layer_device.begin(), opt.layer_device.end(), [](int d) { return d != 0; })) {
    throw Error("gpu engine",
                "deepseek2 models run on one GPU (cuda:0) for now; a layer split over several "
                "GPUs (or a GPU other than cuda:0) is not implemented for them",
                "put every layer's attention and GPU experts on cuda:0 (experts may stay on cpu)",
                ErrorKind::Usage);
  }
  if (opt.handoff_timeout_ms < 1 || opt.handoff_timeout_ms > 3600 * 1000) {
    throw Error("gpu engine",
                "handoff_timeout_ms " + std::to_string(opt.handoff_timeout_ms) + " out of range",
                "use 1..3600000", ErrorKind::Usage);
  }
  if (opt.max_context < 1 || opt.max_context > (int64_t{1} << 24)) {
    throw Error("gpu engine", "max_context " + std::to_string(opt.max_context) + " out of range",
                "use 1..16777216", ErrorKind::Usage);
  }
  if (!opt.expert_on_gpu.empty()) {
    bool ok = static_cast<int64_t>(opt.expert_on_gpu.size()) == c.n_layers;
    for (const auto& row : opt.expert_on_gpu)
      ok = ok && static_cast<int64_t>(row.size()) == c.n_experts;
    if (!ok) {
      throw Error("gpu engine",
                  "expert placement map is not " + std::to_string(c.n_layers) + " layers x " +
                      std::to_string(c.n_experts) + " experts",
                  "pass one device flag per expert of every layer", ErrorKind::Usage);
    }
  }
  const int64_t H = c.hidden, nh = c.n_heads, dq = c.head_dim, dr = c.rope_dim,
                dn = c.qk_nope_dim(), dv = c.v_head_dim, rq = c.q_lora_rank, rkv = c.kv_lora_rank,
                E = c.n_experts, F = c.expert_ffn, Fs = c.shared_ffn(), Fd = c.dense_ffn;
  // Limits of the kernels (mla_kernels.h, kernels.h: matvec_fused takes rows of <= 16384).
  check_limit(H <= 16384, "hidden " + std::to_string(H), "is over 16384");
  check_limit(rq <= 16384, "q_lora_rank " + std::to_string(rq), "is over 16384");
  check_limit(nh * dv <= 16384, "n_heads * v_head_dim " + std::to_string(nh * dv), "is over 16384");
  check_limit(rkv + dr <= 1024 && rkv <= 1024,
              "kv_lora_rank + rope_dim " + std::to_string(rkv + dr), "is over 1024");
  check_limit(dr >= 2 && dr % 2 == 0 && dr <= 1024, "rope_dim " + std::to_string(dr),
              "is not an even number in 2..1024");
  check_limit(nh <= 65535, "n_heads " + std::to_string(nh), "is over 65535");
  // Per-head inputs of the head matvecs start 16-byte aligned (q heads, latent contexts).
  check_limit(dq % 4 == 0 && rkv % 32 == 0 && dn % 32 == 0,
              "head_dim " + std::to_string(dq) + ", qk_nope " + std::to_string(dn) +
                  ", kv_lora_rank " + std::to_string(rkv),
              "are not multiples of 4, 32 and 32");
  check_limit(E <= 1024 && c.n_experts_used <= 64,
              std::to_string(E) + " experts, top-" + std::to_string(c.n_experts_used),
              "exceed the router kernel's 1024 experts / top-64");
  check_limit(
      F % 32 == 0 && Fs % 32 == 0 && Fd % 32 == 0,
      "FFN widths " + std::to_string(F) + "/" + std::to_string(Fs) + "/" + std::to_string(Fd),
      "are not multiples of 32");
  if (static_cast<int64_t>(w.layers.size()) != c.n_layers) {
    throw Error(
        "model " + w.source,
        "has " + std::to_string(w.layers.size()) + " layers, config " + std::to_string(c.n_layers),
        "use a complete deepseek2 model");
  }
  check_tensor(w.tok_embd, H, c.vocab, false, "token_embd", /*embedding=*/true);
  check_tensor(w.output_norm, H, 1, false, "output_norm");
  check_tensor(w.output.data ? w.output : w.tok_embd, H, c.vocab, true, "output");
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const LayerWeights& t = w.layers[static_cast<size_t>(l)];
    const std::string b = "blk." + std::to_string(l) + ".";
    check_tensor(t.attn_norm, H, 1, false, b + "attn_norm");
    check_tensor(t.kv_a_norm, rkv, 1, false, b + "attn_kv_a_norm");
    check_tensor(t.ffn_norm, H, 1, false, b + "ffn_norm");
    if (rq > 0) {
      check_tensor(t.wq_a, H, rq, true, b + "attn_q_a");
      check_tensor(t.q_a_norm, rq, 1, false, b + "attn_q_a_norm");
      check_tensor(t.wq_b, rq, nh * dq, true, b + "attn_q_b");
    } else {
      check_tensor(t.wq, H, nh * dq, true, b + "attn_q");
    }
    check_tensor(t.wkv_a, H, rkv + dr, true, b + "attn_kv_a_mqa");
    if (c.split_kv_b) {
      check_tensor(t.wk_b, dn, rkv * nh, true, b + "attn_k_b");
      check_tensor(t.wv_b, rkv, dv * nh, true, b + "attn_v_b");
    } else {
      check_tensor(t.wkv_b, rkv, nh * (dn + dv), true, b + "attn_kv_b");
    }
    check_tensor(t.wo, nh * dv, H, true, b + "attn_output");
    if (c.is_dense_layer(l)) {
      check_tensor(t.ffn_gate, H, Fd, true, b + "ffn_gate");
      check_tensor(t.ffn_up, H, Fd, true, b + "ffn_up");
      check_tensor(t.ffn_down, Fd, H, true, b + "ffn_down");
      continue;
    }
    check_tensor(t.router, H, E, true, b + "ffn_gate_inp");
    if (c.expert_score_bias) check_tensor(t.exp_probs_b, E, 1, false, b + "exp_probs_b");
    check_tensor(t.gate_exps, H, F * E, true, b + "ffn_gate_exps");
    check_tensor(t.up_exps, H, F * E, true, b + "ffn_up_exps");
    check_tensor(t.down_exps, F, H * E, true, b + "ffn_down_exps");
    if (t.gate_exps.type != t.up_exps.type) {
      throw Error(b + "ffn_gate_exps",
                  std::string("type ") + quant_name(t.gate_exps.type) +
                      " differs from ffn_up_exps' " + quant_name(t.up_exps.type),
                  "the fused MoE kernel reads gate and up of one type");
    }
    if (Fs > 0) {
      check_tensor(t.gate_shexp, H, Fs, true, b + "ffn_gate_shexp");
      check_tensor(t.up_shexp, H, Fs, true, b + "ffn_up_shexp");
      check_tensor(t.down_shexp, Fs, H, true, b + "ffn_down_shexp");
    }
  }
}

// The checks run first, before the members (the stream among them) touch the GPU, so a refusal
// reads the same on a machine without one.
GpuEngine::Deepseek::Deepseek(const ModelWeights& w, const GpuEngineOptions& options)
    : cfg((check_deepseek_gpu_support(w, options), w.cfg)), opt(options) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count < 1) {
    cudaGetLastError();
    throw Error("gpu engine", "no usable CUDA device", "run on a machine with an NVIDIA GPU");
  }
  KTUNE_CUDA_CHECK(cudaSetDevice(0));
  cudaDeviceProp prop{};
  KTUNE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  device_name = prop.name;
  stream = cuda::Stream();

  H = cfg.hidden;
  nh = cfg.n_heads;
  dq = cfg.head_dim;
  dr = cfg.rope_dim;
  dn = dq - dr;
  dv = cfg.v_head_dim;
  rq = cfg.q_lora_rank;
  rkv = cfg.kv_lora_rank;
  lat = rkv + dr;
  E = cfg.n_experts;
  K = cfg.n_experts_used;
  F = cfg.expert_ffn;
  Fs = cfg.shared_ffn();
  Fd = cfg.dense_ffn;
  V = cfg.vocab;
  L = cfg.n_layers;
  max_ctx = opt.max_context;
  rope = deepseek_rope(cfg);

  // Dense layers have no experts: their entries of the placement map mean nothing.
  const bool want_map = !opt.expert_on_gpu.empty();
  auto on_gpu = [&](int64_t l, int64_t e) {
    return !want_map || opt.expert_on_gpu[static_cast<size_t>(l)][static_cast<size_t>(e)];
  };
  auto gpu_count = [&](int64_t l) {
    int64_t n = 0;
    for (int64_t e = 0; e < E; ++e) n += on_gpu(l, e) ? 1 : 0;
    return n;
  };

  // ---- weights: size, allocate once, copy ----
  std::vector<const TensorView*> all;
  const bool tied = w.output.data == nullptr;
  all.push_back(&w.tok_embd);
  all.push_back(&w.output_norm);
  if (!tied) all.push_back(&w.output);
  size_t wbytes = 2 * kAlign;  // the always-on expert's id and weight
  for (int64_t l = 0; l < L; ++l) {
    const LayerWeights& t = w.layers[static_cast<size_t>(l)];
    for (const TensorView* v :
         {&t.attn_norm, &t.wq,          &t.wq_a,       &t.q_a_norm, &t.wq_b,
          &t.wkv_a,     &t.kv_a_norm,   &t.wk_b,       &t.wv_b,     &t.wkv_b,
          &t.wo,        &t.ffn_norm,    &t.ffn_gate,   &t.ffn_up,   &t.ffn_down,
          &t.router,    &t.exp_probs_b, &t.gate_shexp, &t.up_shexp, &t.down_shexp}) {
      if (v->data != nullptr) all.push_back(v);
    }
    if (cfg.is_dense_layer(l)) continue;
    const int64_t ng = gpu_count(l);
    for (const TensorView* v : {&t.gate_exps, &t.up_exps, &t.down_exps}) {
      if (ng > 0) wbytes += align_up(static_cast<size_t>(ng * v->ne[1] * v->row_stride()));
    }
    if (ng > 0 && ng < E) wbytes += align_up(static_cast<size_t>(E) * sizeof(int32_t));
  }
  for (const TensorView* t : all) wbytes += align_up(static_cast<size_t>(t->nbytes()));
  weights_arena = cuda::DeviceArena(wbytes, "gpu engine weights (deepseek2)");
  auto upload = [&](const TensorView& t) {
    DevTensor d;
    if (t.data == nullptr) return d;
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
  tok_embd = upload(w.tok_embd);
  output_norm = upload(w.output_norm);
  output = tied ? tok_embd : upload(w.output);
  {
    one_id = weights_arena.alloc_n<int32_t>(1);
    one_weight = weights_arena.alloc_n<float>(1);
    const int32_t zero = 0;
    const float unit = 1.0f;
    KTUNE_CUDA_CHECK(cudaMemcpy(one_id, &zero, sizeof zero, cudaMemcpyHostToDevice));
    KTUNE_CUDA_CHECK(cudaMemcpy(one_weight, &unit, sizeof unit, cudaMemcpyHostToDevice));
  }
  layers.resize(static_cast<size_t>(L));
  for (int64_t l = 0; l < L; ++l) {
    const LayerWeights& t = w.layers[static_cast<size_t>(l)];
    Layer& d = layers[static_cast<size_t>(l)];
    d.dense = cfg.is_dense_layer(l);
    d.attn_norm = upload(t.attn_norm);
    d.wq = upload(t.wq);
    d.wq_a = upload(t.wq_a);
    d.q_a_norm = upload(t.q_a_norm);
    d.wq_b = upload(t.wq_b);
    d.wkv_a = upload(t.wkv_a);
    d.kv_a_norm = upload(t.kv_a_norm);
    d.wk_b = upload(t.wk_b);
    d.wv_b = upload(t.wv_b);
    d.wkv_b = upload(t.wkv_b);
    d.wo = upload(t.wo);
    d.ffn_norm = upload(t.ffn_norm);
    if (d.dense) {
      d.ffn_gate = upload(t.ffn_gate);
      d.ffn_up = upload(t.ffn_up);
      d.ffn_down = upload(t.ffn_down);
      continue;
    }
    d.router = upload(t.router);
    if (cfg.expert_score_bias) d.bias = upload(t.exp_probs_b);
    if (Fs > 0) {
      d.gate_sh = upload(t.gate_shexp);
      d.up_sh = upload(t.up_shexp);
      d.down_sh = upload(t.down_shexp);
    }
    d.n_gpu_experts = gpu_count(l);
    d.n_cpu_experts = E - d.n_gpu_experts;
    cpu_experts_total += d.n_cpu_experts;
    is_hybrid = is_hybrid || d.n_cpu_experts > 0;
    d.host_slot.assign(static_cast<size_t>(E), -1);
    int32_t next = 0;
    for (int64_t e = 0; e < E; ++e) {
      if (on_gpu(l, e)) d.host_slot[static_cast<size_t>(e)] = next++;
    }
    // Slot s holds the s-th GPU expert in id order (all experts: slot = id, no map needed).
    auto upload_experts = [&](const TensorView& v) {
      DevTensor dt;
      dt.type = v.type;
      dt.row_len = v.row_len();
      dt.matrix_bytes = v.ne[1] * v.row_stride();
      dt.rows = v.ne[1] * d.n_gpu_experts;
      if (d.n_gpu_experts == 0) return dt;
      auto* p = static_cast<uint8_t*>(
          weights_arena.alloc(static_cast<size_t>(d.n_gpu_experts * dt.matrix_bytes), kAlign));
      for (int64_t e = 0; e < E; ++e) {
        const int32_t sl = d.host_slot[static_cast<size_t>(e)];
        if (sl < 0) continue;
        KTUNE_CUDA_CHECK(cudaMemcpy(p + sl * dt.matrix_bytes, v.matrix(e),
                                    static_cast<size_t>(dt.matrix_bytes), cudaMemcpyHostToDevice));
      }
      dt.data = p;
      return dt;
    };
    d.gate = upload_experts(t.gate_exps);
    d.up = upload_experts(t.up_exps);
    d.down = upload_experts(t.down_exps);
    if (d.n_gpu_experts > 0 && d.n_cpu_experts > 0) {
      auto* m = weights_arena.alloc_n<int32_t>(static_cast<size_t>(E));
      KTUNE_CUDA_CHECK(cudaMemcpy(m, d.host_slot.data(), static_cast<size_t>(E) * sizeof(int32_t),
                                  cudaMemcpyHostToDevice));
      d.slot_map = m;
    }
  }

  // ---- latent cache, activations, workspace: one arena ----
  const size_t f = sizeof(float);
  const size_t cache_bytes = static_cast<size_t>(max_ctx * lat) * f;
  const size_t ws_bytes = cuda::mla_attention_workspace_bytes(nh, rkv, max_ctx);
  const int64_t ffn_max = std::max<int64_t>({Fd, Fs, F, 1});
  stage_ids_off = static_cast<size_t>(H) * f;
  stage_wts_off = stage_ids_off + (static_cast<size_t>(K) * 4 + 15) / 16 * 16;
  stage_bytes = stage_wts_off + static_cast<size_t>(K) * 4;
  size_t work =
      static_cast<size_t>(L) * align_up(cache_bytes) + align_up(ws_bytes) + align_up(stage_bytes);
  const std::vector<int64_t> float_bufs = {H,        std::max<int64_t>(rq, 1),
                                           nh * dq,  lat,
                                           nh * lat, nh * rkv,
                                           nh * dv,  E,
                                           K * F,    ffn_max,
                                           ffn_max,  F,
                                           F,        H,
                                           H,        V,
                                           dr / 2};
  for (int64_t n : float_bufs) work += align_up(static_cast<size_t>(n) * f);
  // token, pos, epoch, head_key[2]; history and the prompt staging (max_ctx int32 each).
  work += 5 * kAlign + 2 * align_up(static_cast<size_t>(max_ctx) * 4);
  work_arena = cuda::DeviceArena(work, "gpu engine workspace (deepseek2)");
  for (Layer& d : layers) d.cache = static_cast<float*>(work_arena.alloc(cache_bytes));
  attn_ws = work_arena.alloc(std::max<size_t>(ws_bytes, 1));
  stage = work_arena.alloc(stage_bytes);
  h = static_cast<float*>(stage);
  ids = reinterpret_cast<int32_t*>(static_cast<uint8_t*>(stage) + stage_ids_off);
  wts = reinterpret_cast<float*>(static_cast<uint8_t*>(stage) + stage_wts_off);
  auto fl = [&](int64_t n) { return work_arena.alloc_n<float>(static_cast<size_t>(n)); };
  x = fl(H);
  qa = fl(std::max<int64_t>(rq, 1));
  q = fl(nh * dq);
  kva = fl(lat);
  qabs = fl(nh * lat);
  ctx = fl(nh * rkv);
  o = fl(nh * dv);
  rlog = fl(E);
  act = fl(K * F);
  act_ffn = fl(ffn_max);
  up_ffn = fl(ffn_max);
  g = fl(F);
  u = fl(F);
  ye = fl(H);
  acc = fl(H);
  logits = fl(V);
  inv_freq = fl(dr / 2);
  token = work_arena.alloc_n<int32_t>(1);
  pos = work_arena.alloc_n<int32_t>(1);
  epoch = work_arena.alloc_n<uint32_t>(1);
  head_key = work_arena.alloc_n<unsigned long long>(2);
  head_counter = reinterpret_cast<unsigned*>(head_key + 1);
  history = work_arena.alloc_n<int32_t>(static_cast<size_t>(max_ctx));
  prompt = work_arena.alloc_n<int32_t>(static_cast<size_t>(max_ctx));
  KTUNE_CUDA_CHECK(cudaMemset(head_key, 0, 2 * sizeof(unsigned long long)));
  KTUNE_CUDA_CHECK(cudaMemset(pos, 0, sizeof(int32_t)));
  KTUNE_CUDA_CHECK(cudaMemset(token, 0, sizeof(int32_t)));
  KTUNE_CUDA_CHECK(cudaMemset(history, 0xff, static_cast<size_t>(max_ctx) * 4));
  KTUNE_CUDA_CHECK(
      cudaMemcpy(inv_freq, rope.inv_freq.data(), rope.inv_freq.size() * f, cudaMemcpyHostToDevice));
  KTUNE_CUDA_CHECK(cuda::matvec_fused_prepare());

  KTUNE_CUDA_CHECK(cudaMallocHost(&h_token, sizeof(int32_t)));
  // Mapped pinned block: [error word][HandoffWords per layer][routing stage][CPU experts' sum].
  const size_t words_off = 64;
  const size_t stage_off = words_off + static_cast<size_t>(L) * sizeof(cuda::HandoffWords);
  const size_t y_off = stage_off + (stage_bytes + 63) / 64 * 64;
  const size_t mapped_bytes = y_off + static_cast<size_t>(H) * f;
  KTUNE_CUDA_CHECK(cudaHostAlloc(&mapped, mapped_bytes, cudaHostAllocMapped));
  std::memset(mapped, 0, mapped_bytes);
  uint8_t* dmapped = nullptr;
  KTUNE_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&dmapped), mapped, 0));
  h_error = reinterpret_cast<uint32_t*>(mapped);
  d_error = reinterpret_cast<uint32_t*>(dmapped);
  h_words = reinterpret_cast<cuda::HandoffWords*>(mapped + words_off);
  d_words = reinterpret_cast<cuda::HandoffWords*>(dmapped + words_off);
  h_stage = mapped + stage_off;
  d_stage_mapped = dmapped + stage_off;
  d_ycpu_mapped = reinterpret_cast<float*>(dmapped + y_off);
  // Epoch 0 would make seq 0 match the zeroed words before any hand-off: start at 1.
  KTUNE_CUDA_CHECK(cudaMemcpy(epoch, &host_epoch, sizeof(uint32_t), cudaMemcpyHostToDevice));

  if (is_hybrid) {
    pool = std::make_unique<ThreadPool>(
        opt.cpu_threads > 0 ? opt.cpu_threads : hybrid_cpu_threads_default(), opt.pin_threads);
    cpu_moe = std::make_unique<CpuMoe>(w, *pool);
    ev_sleep_sync = std::make_unique<cuda::Event>(false, true);
    std::vector<CpuExpertDriver::Layer> hl;
    for (int64_t l = 0; l < L; ++l) {
      const Layer& d = layers[static_cast<size_t>(l)];
      if (!d.dense && d.n_cpu_experts > 0) hl.push_back({l, &d.host_slot});
    }
    auto* h_h = reinterpret_cast<const float*>(h_stage);
    auto* h_ids = reinterpret_cast<const int32_t*>(h_stage + stage_ids_off);
    auto* h_wts = reinterpret_cast<const float*>(h_stage + stage_wts_off);
    auto* h_y = reinterpret_cast<float*>(mapped + y_off);
    CpuExpertDriver::Shared sh{h_words, h_h, h_ids, h_wts, h_y, h_error};
    // The driver is the pool's thread 0: the core the pinned workers left free, if pinned.
    int free_cpu = -1;
    cpu_set_t allowed;
    if (opt.pin_threads && sched_getaffinity(0, sizeof(allowed), &allowed) == 0) {
      const std::vector<int>& taken = pool->pinned_cpus();
      for (int c = 0; c < CPU_SETSIZE && free_cpu < 0; ++c) {
        if (CPU_ISSET(c, &allowed) && std::find(taken.begin(), taken.end(), c) == taken.end()) {
          free_cpu = c;
        }
      }
    }
    driver = std::make_unique<CpuExpertDriver>(*cpu_moe, sh, std::move(hl), K, E,
                                               std::chrono::milliseconds(opt.handoff_timeout_ms),
                                               free_cpu);
  }
}

GpuEngine::Deepseek::~Deepseek() {
  // Nothing may still run on the stream (host nodes call into the driver) or in the driver
  // (it reads the mapped block and runs CpuMoe) when their memory goes.
  cudaStreamSynchronize(stream);
  driver.reset();
  if (graph_exec) cudaGraphExecDestroy(graph_exec);
  if (graph) cudaGraphDestroy(graph);
  if (h_token) cudaFreeHost(h_token);
  if (mapped) cudaFreeHost(mapped);
}

void GpuEngine::Deepseek::run_step() {
  if (host_pos >= max_ctx) {
    throw Error("gpu engine", "context full (" + std::to_string(max_ctx) + " positions)",
                "raise max_context or reset()");
  }
  trace::Scope step(trace::Phase::DecodeStep, 1);
  if (driver) driver->arm(step_seq());
  try {
    launch_step();
  } catch (...) {
    if (driver) driver->cancel();
    throw;
  }
  ++host_pos;
}

void GpuEngine::Deepseek::launch_step() {
  if (!opt.cuda_graph) {
    enqueue_step();
    return;
  }
  if (graph_exec == nullptr) {
    KTUNE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    // Tags each captured node with its layer and phase, so the profiler can attribute kernel
    // records of graph replays (NVTX does not fire there).
    trace::GraphCapture capture(stream);
    try {
      enqueue_step();
    } catch (...) {
      cudaGraph_t broken = nullptr;
      cudaStreamEndCapture(stream, &broken);
      if (broken) cudaGraphDestroy(broken);
      throw;
    }
    KTUNE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    capture.finish(graph);
    KTUNE_CUDA_CHECK(cudaGraphInstantiate(&graph_exec, graph, 0));
  }
  KTUNE_CUDA_CHECK(cudaGraphLaunch(graph_exec, stream));
}

uint64_t GpuEngine::Deepseek::step_seq() const {
  return (static_cast<uint64_t>(host_epoch) << 32) | static_cast<uint32_t>(host_pos);
}

void GpuEngine::Deepseek::sync() {
  cudaError_t err = cudaSuccess;
  if (ev_sleep_sync) {
    // Sleep, not spin: the CPU experts need the cores.
    err = cudaEventRecord(*ev_sleep_sync, stream);
    if (err == cudaSuccess) err = cudaEventSynchronize(*ev_sleep_sync);
  } else {
    err = cudaStreamSynchronize(stream);
  }
  const std::string cpu_side = driver ? driver->finish() : std::string();
  raise_step_errors(err, h_error, cpu_side, opt.handoff_timeout_ms);
}

void GpuEngine::Deepseek::set_token(int32_t t) {
  sync();  // h_token may still be read by a copy
  *h_token = t;
  KTUNE_CUDA_CHECK(
      cudaMemcpyAsync(token, h_token, sizeof(int32_t), cudaMemcpyHostToDevice, stream));
}

void GpuEngine::Deepseek::reset() {
  sync();
  // A new epoch: hand-off words left from before never match the new steps' seq.
  ++host_epoch;
  KTUNE_CUDA_CHECK(
      cudaMemcpyAsync(epoch, &host_epoch, sizeof(uint32_t), cudaMemcpyHostToDevice, stream));
  KTUNE_CUDA_CHECK(cudaMemsetAsync(pos, 0, sizeof(int32_t), stream));
  KTUNE_CUDA_CHECK(cudaStreamSynchronize(stream));
  host_pos = 0;
}

void GpuEngine::Deepseek::decode(int32_t t, std::vector<float>* out) {
  set_token(t);
  run_step();
  if (out) {
    out->resize(static_cast<size_t>(V));
    KTUNE_CUDA_CHECK(cudaMemcpyAsync(out->data(), logits, static_cast<size_t>(V) * sizeof(float),
                                     cudaMemcpyDeviceToHost, stream));
  }
  sync();
}

// Token by token through the decode step (no batched MLA prefill yet): the tokens go to device
// memory once, each step's token is copied from there on the stream, so the steps run without a
// host synchronisation between them.
void GpuEngine::Deepseek::prefill(const int32_t* tokens, int64_t n, std::vector<float>* out) {
  if (n <= 0) return;
  if (tokens == nullptr) {
    throw Error("gpu engine", "prefill of " + std::to_string(n) + " tokens from a null pointer",
                "pass the prompt's tokens");
  }
  if (host_pos + n > max_ctx) {
    throw Error("gpu engine",
                "prefill of " + std::to_string(n) + " tokens at position " +
                    std::to_string(host_pos) + " exceeds max_context " + std::to_string(max_ctx),
                "raise max_context or reset()");
  }
  for (int64_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= V) {
      throw Error("gpu engine",
                  "token " + std::to_string(tokens[i]) + " outside the vocabulary (" +
                      std::to_string(V) + ")",
                  "pass token ids of this model");
    }
  }
  sync();
  KTUNE_CUDA_CHECK(
      cudaMemcpy(prompt, tokens, static_cast<size_t>(n) * sizeof(int32_t), cudaMemcpyHostToDevice));
  for (int64_t i = 0; i < n; ++i) {
    KTUNE_CUDA_CHECK(
        cudaMemcpyAsync(token, prompt + i, sizeof(int32_t), cudaMemcpyDeviceToDevice, stream));
    run_step();
  }
  if (out) {
    out->resize(static_cast<size_t>(V));
    KTUNE_CUDA_CHECK(cudaMemcpyAsync(out->data(), logits, static_cast<size_t>(V) * sizeof(float),
                                     cudaMemcpyDeviceToHost, stream));
  }
  sync();
}

std::vector<int32_t> GpuEngine::Deepseek::generate_greedy(int32_t first_token, int64_t n) {
  if (n <= 0) return {};
  if (host_pos + n > max_ctx) {
    throw Error("gpu engine",
                "generating " + std::to_string(n) + " tokens at position " +
                    std::to_string(host_pos) + " exceeds max_context " + std::to_string(max_ctx),
                "raise max_context or reset()");
  }
  const int64_t p0 = host_pos;
  set_token(first_token);
  for (int64_t i = 0; i < n; ++i) run_step();
  std::vector<int32_t> out(static_cast<size_t>(n));
  KTUNE_CUDA_CHECK(cudaMemcpyAsync(out.data(), history + p0, static_cast<size_t>(n) * 4,
                                   cudaMemcpyDeviceToHost, stream));
  sync();
  return out;
}

int64_t GpuEngine::Deepseek::device_bytes() const {
  return static_cast<int64_t>(weights_arena.capacity() + work_arena.capacity());
}

std::string GpuEngine::Deepseek::describe() const {
  std::string s = "cuda:0 " + device_name + ", moe " + moe_kernel_name(opt.moe_kernel) +
                  ", graph " + (opt.cuda_graph ? "on" : "off");
  if (is_hybrid) {
    std::string cpus;
    int unpinned = 0;
    for (int c : pool->pinned_cpus()) {
      if (c < 0) {
        ++unpinned;
      } else {
        cpus += (cpus.empty() ? "" : ",") + std::to_string(c);
      }
    }
    int64_t moe_layers = 0;
    for (const Layer& d : layers) moe_layers += d.dense ? 0 : 1;
    s += ", " + std::to_string(cpu_experts_total) + "/" + std::to_string(E * moe_layers) +
         " experts on cpu (" + std::to_string(pool->size()) + " threads, workers on cpus " +
         (cpus.empty() ? "-" : cpus) +
         (unpinned > 0 ? " + " + std::to_string(unpinned) + " unpinned" : "") + ", handoff " +
         cpu_handoff_name(opt.cpu_handoff) + ")";
  }
  return s + ", mla latent cache f32";
}

}  // namespace ktune
