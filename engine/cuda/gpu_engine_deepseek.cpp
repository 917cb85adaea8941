// GpuEngine::Deepseek (gpu_engine_deepseek.h): construction and the public API. Memory: one
// arena for the weights (sized from the tensor list; a hybrid layer's GPU experts compacted),
// one for the latent cache, activations and workspace; both allocated here, nothing after.
#include "cuda/gpu_engine_deepseek.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "ktune/engine/cuda/kernels.h"
#include "ktune/engine/cuda/mla_kernels.h"
#include "ktune/engine/error.h"

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

// The checks run first, before the base (its stream) touches the GPU, so a refusal reads the
// same on a machine without one.
GpuEngine::Deepseek::Deepseek(const ModelWeights& w, const GpuEngineOptions& options)
    : EngineCore((check_deepseek_gpu_support(w, options), w.cfg), options) {
  open_device(0);

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
  rope = deepseek_rope(cfg);

  // Dense layers have no experts: their entries of the placement map mean nothing.

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
    const int64_t ng = gpu_expert_count(l);
    for (const TensorView* v : {&t.gate_exps, &t.up_exps, &t.down_exps}) {
      if (ng > 0) wbytes += align_up(static_cast<size_t>(ng * v->ne[1] * v->row_stride()));
    }
    if (ng > 0 && ng < E) wbytes += align_up(static_cast<size_t>(E) * sizeof(int32_t));
  }
  for (const TensorView* t : all) wbytes += align_up(static_cast<size_t>(t->nbytes()));
  weights_arena = cuda::DeviceArena(wbytes, "gpu engine weights (deepseek2)");
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
    d.n_gpu_experts = gpu_expert_count(l);
    d.n_cpu_experts = E - d.n_gpu_experts;
    cpu_experts_total += d.n_cpu_experts;
    is_hybrid = is_hybrid || d.n_cpu_experts > 0;
    // Slot s holds the s-th GPU expert in id order (all experts: slot = id, no map needed).
    d.host_slot = gpu_slots(l);
    d.gate = upload_experts(t.gate_exps, d.host_slot, d.n_gpu_experts);
    d.up = upload_experts(t.up_exps, d.host_slot, d.n_gpu_experts);
    d.down = upload_experts(t.down_exps, d.host_slot, d.n_gpu_experts);
    if (d.n_gpu_experts > 0 && d.n_cpu_experts > 0) d.slot_map = upload_slot_map(d.host_slot);
  }

  // ---- latent cache, activations, workspace: one arena ----
  const size_t f = sizeof(float);
  const size_t cache_bytes = static_cast<size_t>(max_ctx * lat) * f;
  const size_t ws_bytes = cuda::mla_attention_workspace_bytes(nh, rkv, max_ctx);
  const int64_t ffn_max = std::max<int64_t>({Fd, Fs, F, 1});
  plan_stage();
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
  bind_stage();
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

  alloc_handoff_block();

  if (is_hybrid) {
    start_cpu_side(w);
    std::vector<CpuExpertDriver::Layer> hl;
    for (int64_t l = 0; l < L; ++l) {
      const Layer& d = layers[static_cast<size_t>(l)];
      if (!d.dense && d.n_cpu_experts > 0) hl.push_back({l, &d.host_slot});
    }
    start_driver(std::move(hl));
    single_handoff = true;  // every step hands its CPU experts to the driver
  }
}

GpuEngine::Deepseek::~Deepseek() { release(); }

void GpuEngine::Deepseek::reset() {
  sync();
  rewind();
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

int64_t GpuEngine::Deepseek::device_bytes() const {
  return static_cast<int64_t>(weights_arena.capacity() + work_arena.capacity());
}

std::string GpuEngine::Deepseek::describe() const {
  std::string s = "cuda:0 " + device_name + ", moe " + moe_kernel_name(opt.moe_kernel) +
                  ", graph " + (opt.cuda_graph ? "on" : "off");
  if (is_hybrid) {
    int64_t moe_layers = 0;
    for (const Layer& d : layers) moe_layers += d.dense ? 0 : 1;
    s += describe_cpu_side(E * moe_layers, cpu_handoff_name(opt.cpu_handoff));
  }
  return s + ", mla latent cache f32";
}

}  // namespace ktune
