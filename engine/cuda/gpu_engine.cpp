// GpuEngine (ktune/engine/gpu_engine.h): qwen3moe decode entirely on cuda:0, built from the
// CUDA backend's launchers. Memory: one arena for the weights (sized from the tensor list), one
// for the KV cache, activations and workspace; both allocated at construction, nothing after.
#include "ktune/engine/gpu_engine.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "cuda/cpu_expert_driver.h"
#include "cuda/gpu_engine_deepseek.h"
#include "cuda/gpu_engine_batch.h"
#include "cuda/gpu_engine_impl.h"
#include "cuda/gpu_engine_prefill.h"
#include "cuda/gpu_pipeline.h"
#include "ktune/engine/cuda/kernels.h"
#include "ktune/engine/error.h"
#include "ktune/engine/gpu_weight_types.h"
#include "ktune/engine/gpu_stages.h"

namespace ktune {

// moe_kernel_name() is defined once, in runtime/placement.cpp (placement.h declares the same
// MoeKernel); a second definition here breaks linking anything that uses both.

using gpu_detail::align_up;
using gpu_detail::kAlign;

GpuEngine::Impl::Impl(const ModelWeights& w, const GpuEngineOptions& options,
                      const gpu_detail::StageSpec& stage_spec)
    : EngineCore(w.cfg, options), spec(stage_spec) {
  if (w.cfg.is_deepseek2()) {
    // GpuEngine hands deepseek2 to GpuEngine::Deepseek; this step is qwen3moe's.
    throw Error("gpu engine", "deepseek2 (MLA) models do not run on the qwen3moe step",
                "construct a GpuEngine, which picks the deepseek2 engine by architecture");
  }
  if (opt.handoff_timeout_ms < 1 || opt.handoff_timeout_ms > 3600 * 1000) {
    throw Error("gpu engine",
                "handoff_timeout_ms " + std::to_string(opt.handoff_timeout_ms) + " out of range",
                "use 1..3600000", ErrorKind::Usage);
  }
  lb = spec.first_layer;
  le = spec.end_layer < 0 ? cfg.n_layers : spec.end_layer;
  if (lb < 0 || lb >= le || le > cfg.n_layers) {
    throw Error("gpu engine",
                "stage layers " + std::to_string(lb) + ".." + std::to_string(le) + " of " +
                    std::to_string(cfg.n_layers),
                "give each GPU a non-empty range of the model's layers");
  }
  // Tensor types first (host only): a model the kernels cannot take fails here, naming the
  // tensor, before any device memory is touched.
  check_gpu_tensor_types(w, lb, le, spec.embedding || (spec.head && !w.output.data), spec.head);
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
  open_device(spec.device);
  if (want_map && (lb != 0 || le != cfg.n_layers)) {  // a stage: hybrid if its own layers are
    is_hybrid = false;
    for (int64_t l = lb; l < le; ++l) {
      for (bool b : opt.expert_on_gpu[static_cast<size_t>(l)]) is_hybrid = is_hybrid || !b;
    }
  }

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
  if (max_ctx < 1 || max_ctx > (int64_t{1} << 24)) {
    throw Error("gpu engine", "max_context " + std::to_string(max_ctx) + " out of range",
                "use 1..16777216", ErrorKind::Usage);
  }
  max_seq = opt.max_sequences;
  if (max_seq < 1 || max_seq > kMaxGpuSequences) {
    throw Error("gpu engine", "max_sequences " + std::to_string(max_seq) + " out of range",
                "use 1.." + std::to_string(kMaxGpuSequences), ErrorKind::Usage);
  }
  if (max_seq > 1 && (lb != 0 || le != layers || spec.device != 0)) {
    throw Error("gpu engine",
                std::to_string(max_seq) + " concurrent sequences on a layer split over GPUs",
                "decode several sequences on one GPU (cuda:0) for now", ErrorKind::Usage);
  }
  seq_pos.assign(static_cast<size_t>(max_seq), 0);
  if (static_cast<int64_t>(w.layers.size()) != layers) {
    throw Error("gpu engine",
                "model has " + std::to_string(w.layers.size()) + " layers, config " +
                    std::to_string(layers),
                "use a complete qwen3moe model");
  }

  // ---- weights: size, allocate once, copy ----
  // A stage holds the embedding only when it is first, the head only when it is last (a tied
  // head on a later stage gets its own copy of the embedding matrix).
  std::vector<const TensorView*> all;
  if (spec.embedding || (spec.head && !w.output.data)) all.push_back(&w.tok_embd);
  if (spec.head) all.push_back(&w.output_norm);
  if (spec.head && w.output.data) all.push_back(&w.output);
  for (int64_t li = lb; li < le; ++li) {
    const LayerWeights& lw = w.layers[static_cast<size_t>(li)];
    for (const TensorView* t :
         {&lw.attn_norm, &lw.wq, &lw.wk, &lw.wv, &lw.wo, &lw.q_norm, &lw.k_norm, &lw.ffn_norm,
          &lw.router, &lw.gate_exps, &lw.up_exps, &lw.down_exps}) {
      all.push_back(t);
    }
  }
  size_t wbytes = 0;
  // Expert tensors: only the GPU experts' matrices (compacted), plus a slot map for a layer
  // that mixes; the full tensor is counted below and taken back here.
  for (int64_t l = lb; l < le; ++l) {
    const LayerWeights& lw = w.layers[static_cast<size_t>(l)];
    const int64_t ng = gpu_expert_count(l);
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
  auto check_shape = [&](const TensorView& t, int64_t row_len, int64_t rows,
                         const std::string& what) {
    if (t.row_len() != row_len || t.n_rows() != rows) {
      throw Error(t.name.empty() ? what : t.name,
                  "shaped [" + std::to_string(t.ne[0]) + ", " + std::to_string(t.ne[1]) + ", " +
                      std::to_string(t.ne[2]) + "], expected " + std::to_string(row_len) + " x " +
                      std::to_string(rows),
                  "use a qwen3moe model whose tensors match its configuration");
    }
  };
  if (spec.embedding || (spec.head && !w.output.data)) tok_embd = upload(w.tok_embd);
  if (spec.head) {
    check_shape(w.output_norm, hidden, 1, "output_norm");
    output_norm = upload(w.output_norm);
    const TensorView& out_w = w.output.data ? w.output : w.tok_embd;
    check_shape(out_w, hidden, vocab, "output");
    output = w.output.data ? upload(w.output) : tok_embd;
  }
  L.resize(static_cast<size_t>(layers));
  for (int64_t l = lb; l < le; ++l) {
    const LayerWeights& lw = w.layers[static_cast<size_t>(l)];
    const std::string blk = "blk." + std::to_string(l) + ".";
    check_shape(lw.attn_norm, hidden, 1, blk + "attn_norm");
    check_shape(lw.q_norm, hd, 1, blk + "attn_q_norm");
    check_shape(lw.k_norm, hd, 1, blk + "attn_k_norm");
    check_shape(lw.ffn_norm, hidden, 1, blk + "ffn_norm");
    check_shape(lw.wq, hidden, nq, blk + "attn_q");
    check_shape(lw.wk, hidden, nkv_rows, blk + "attn_k");
    check_shape(lw.wv, hidden, nkv_rows, blk + "attn_v");
    check_shape(lw.wo, nq, hidden, blk + "attn_output");
    check_shape(lw.router, hidden, n_exp, blk + "ffn_gate_inp");
    check_shape(lw.gate_exps, hidden, ffn * n_exp, blk + "ffn_gate_exps");
    check_shape(lw.up_exps, hidden, ffn * n_exp, blk + "ffn_up_exps");
    check_shape(lw.down_exps, ffn, hidden * n_exp, blk + "ffn_down_exps");
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
    d.n_gpu_experts = gpu_expert_count(l);
    d.n_cpu_experts = n_exp - d.n_gpu_experts;
    cpu_experts_total += d.n_cpu_experts;
    if (d.n_cpu_experts == 0) {
      d.gate = upload(lw.gate_exps);
      d.up = upload(lw.up_exps);
      d.down = upload(lw.down_exps);
    } else {
      // Compacted: slot s holds the s-th GPU expert (in id order).
      d.host_slot = gpu_slots(l);
      d.gate = upload_experts(lw.gate_exps, d.host_slot, d.n_gpu_experts);
      d.up = upload_experts(lw.up_exps, d.host_slot, d.n_gpu_experts);
      d.down = upload_experts(lw.down_exps, d.host_slot, d.n_gpu_experts);
      if (d.n_gpu_experts > 0) d.slot_map = upload_slot_map(d.host_slot);
    }
  }

  // ---- KV cache (one region per sequence), activations, workspace: one arena ----
  kv_seq_elems = n_kv * max_ctx * hd;
  const size_t kv_bytes = static_cast<size_t>(kv_seq_elems * max_seq) * sizeof(uint16_t);
  const size_t ws_bytes = cuda::attention_decode_workspace_bytes(n_heads, hd, max_ctx);
  const size_t f = sizeof(float);
  size_t work = 2 * static_cast<size_t>(le - lb) * align_up(kv_bytes) + align_up(ws_bytes);
  plan_stage();
  for (int64_t n : {hidden, nq, nkv_rows, nkv_rows, nq, nkv_rows, nq, hidden, n_exp, top_k * ffn,
                    ffn, ffn, hidden, hidden, vocab, hd / 2, hidden, n_exp, top_k, top_k}) {
    work += align_up(static_cast<size_t>(n) * f);
  }
  // Small device words, one aligned slot each: token, pos, router_counter, epoch, head_key[2].
  constexpr size_t kSmallSlots = 5;
  work += align_up(stage_bytes) + kSmallSlots * kAlign + align_up(static_cast<size_t>(max_ctx) * 4);
  const size_t count_bytes =
      opt.count_experts ? static_cast<size_t>((le - lb) * n_exp) * sizeof(int32_t) : 0;
  work += count_bytes > 0 ? align_up(count_bytes) : 0;
  work_arena = cuda::DeviceArena(work, "gpu engine workspace");
  for (int64_t l = lb; l < le; ++l) {
    DevLayer& d = L[static_cast<size_t>(l)];
    d.k_seq0 = d.k_cache = static_cast<uint16_t*>(work_arena.alloc(kv_bytes));
    d.v_seq0 = d.v_cache = static_cast<uint16_t*>(work_arena.alloc(kv_bytes));
  }
  attn_ws = work_arena.alloc(std::max<size_t>(ws_bytes, 1));
  auto fl = [&](int64_t n) { return work_arena.alloc_n<float>(static_cast<size_t>(n)); };
  x = fl(hidden);
  bind_stage();
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
  pcie_map = work_arena.alloc_n<int32_t>(static_cast<size_t>(n_exp));
  pcie_ids = work_arena.alloc_n<int32_t>(static_cast<size_t>(top_k));
  pcie_wts = fl(top_k);
  token = work_arena.alloc_n<int32_t>(1);
  pos = work_arena.alloc_n<int32_t>(1);
  history = work_arena.alloc_n<int32_t>(static_cast<size_t>(max_ctx));
  router_counter = work_arena.alloc_n<unsigned>(1);
  epoch = work_arena.alloc_n<uint32_t>(1);
  KTUNE_CUDA_CHECK(cudaMemset(router_counter, 0, sizeof(unsigned)));
  head_key = work_arena.alloc_n<unsigned long long>(2);  // decode-speed: key, then the counter
  head_counter = reinterpret_cast<unsigned*>(head_key + 1);
  KTUNE_CUDA_CHECK(cudaMemset(head_key, 0, 2 * sizeof(unsigned long long)));
  if (count_bytes > 0) {
    expert_counts_d = static_cast<int32_t*>(work_arena.alloc(count_bytes));
    KTUNE_CUDA_CHECK(cudaMemset(expert_counts_d, 0, count_bytes));
  }
  KTUNE_CUDA_CHECK(cuda::matvec_fused_prepare());
  if (const char* e = std::getenv("KTUNE_GPU_LEGACY")) legacy = e[0] != '\0' && e[0] != '0';
  if (is_hybrid) legacy = false;  // the one-launch-per-op step has no hybrid MoE
  if (lb != 0 || le != layers) legacy = false;  // nor stages of a layer split
  const std::vector<float> freq = cuda::rope_inv_freq(cfg.rope_theta, hd);
  KTUNE_CUDA_CHECK(cudaMemcpy(inv_freq, freq.data(), freq.size() * f, cudaMemcpyHostToDevice));
  KTUNE_CUDA_CHECK(cudaMemset(pos, 0, sizeof(int32_t)));
  KTUNE_CUDA_CHECK(cudaMemset(history, 0xff, static_cast<size_t>(max_ctx) * 4));

  alloc_handoff_block();
  if (is_hybrid && spec.shared_cpu_side) {
    // The pipeline's CpuMoe and driver (gpu_pipeline.cpp); the host-driven unfused step still
    // selects this stage's CPU experts here.
    sel_ids.resize(static_cast<size_t>(top_k));
    sel_w.resize(static_cast<size_t>(top_k));
    ev_sleep_sync = std::make_unique<cuda::Event>(false, true);
  } else if (is_hybrid) {
    start_cpu_side(w);
    sel_ids.resize(static_cast<size_t>(top_k));
    sel_w.resize(static_cast<size_t>(top_k));
    // The host-driven unfused step (no graph) computes CPU experts on the calling thread; every
    // other hybrid step (batched steps too) hands them to the driver thread.
    single_handoff = opt.moe_kernel == MoeKernel::Fused || opt.cuda_graph;
    if (single_handoff || max_seq > 1) {
      std::vector<CpuExpertDriver::Layer> hl;
      for (int64_t l = 0; l < layers; ++l) {
        if (L[static_cast<size_t>(l)].n_cpu_experts > 0) {
          hl.push_back({l, &L[static_cast<size_t>(l)].host_slot});
        }
      }
      start_driver(std::move(hl));
    }
  }
  prefill_setup(w);  // prefill: its workspace arena, staging, pinned host ranges
  setup_pcie_assist(w);  // after prefill_setup, which registers the CPU experts' host ranges
  if (max_seq > 1) batch_setup(w);  // batched decode: its arena, mapped blocks, CpuMoeBatch
}

GpuEngine::Impl::~Impl() {
  // The driver reads the batch state's mapped blocks: it stops first (release() says why the
  // stream is drained first), then they go, then release() frees the rest.
  cudaStreamSynchronize(stream);
  driver.reset();
  batch_state.reset();  // its graphs and mapped blocks (the driver that read them is gone)
  release();
}

GpuEngine::GpuEngine(const ModelWeights& weights, const GpuEngineOptions& opt) {
  if (weights.cfg.is_deepseek2()) {  // its own step (gpu_engine_deepseek.h), one GPU
    if (!opt.layer_device.empty() &&
        static_cast<int64_t>(opt.layer_device.size()) != weights.cfg.n_layers) {
      throw Error("gpu engine",
                  "layer_device names " + std::to_string(opt.layer_device.size()) +
                      " layers, the model has " + std::to_string(weights.cfg.n_layers),
                  "give one CUDA device per layer", ErrorKind::Usage);
    }
    ds_ = std::make_unique<Deepseek>(weights, opt);
    return;
  }
  if (opt.layer_device.empty()) {
    impl_ = std::make_unique<Impl>(weights, opt);
    return;
  }
  if (static_cast<int64_t>(opt.layer_device.size()) != weights.cfg.n_layers) {
    throw Error("gpu engine",
                "layer_device names " + std::to_string(opt.layer_device.size()) +
                    " layers, the model has " + std::to_string(weights.cfg.n_layers),
                "give one CUDA device per layer", ErrorKind::Usage);
  }
  const GpuStagePlan plan = plan_gpu_stages(opt.layer_device, "gpu engine");
  if (plan.multi_gpu() || plan.stages.front().device != 0) {
    // Several GPUs, or one other than cuda:0: the pipeline (it sets each stage's device).
    pipe_ = std::make_unique<Pipeline>(weights, opt, plan);
    return;
  }
  impl_ = std::make_unique<Impl>(weights, opt);
}
GpuEngine::~GpuEngine() = default;

void GpuEngine::reset() {
  if (ds_) return ds_->reset();
  if (pipe_) return pipe_->reset();
  Impl& m = *impl_;
  m.sync();
  std::fill(m.seq_pos.begin(), m.seq_pos.end(), 0);
  m.single_pos_stale = false;
  m.rewind();
}

int64_t GpuEngine::position() const {
  if (ds_) return ds_->position();
  return pipe_ ? pipe_->position() : impl_->host_pos;
}

void GpuEngine::decode(int32_t token, std::vector<float>* logits) {
  if (ds_) return ds_->decode(token, logits);
  if (pipe_) return pipe_->decode(token, logits);
  impl_->decode(token, logits);
}

std::vector<int32_t> GpuEngine::generate_greedy(int32_t first_token, int64_t n) {
  if (ds_) return ds_->generate_greedy(first_token, n);
  if (pipe_) return pipe_->generate_greedy(first_token, n);
  return impl_->generate_greedy(first_token, n);
}

const GpuEngineOptions& GpuEngine::options() const {
  if (ds_) return ds_->options();
  return pipe_ ? pipe_->options() : impl_->opt;
}

int64_t GpuEngine::device_bytes() const {
  if (ds_) return ds_->device_bytes();
  if (pipe_) return pipe_->device_bytes();
  return static_cast<int64_t>(impl_->weights_arena.capacity() + impl_->work_arena.capacity() +
                              impl_->prefill_state->arena.capacity() +  // prefill
                              (impl_->batch_state ? impl_->batch_state->arena.capacity() : 0));
}

std::string GpuEngine::describe() const {
  if (ds_) return ds_->describe();
  if (pipe_) return pipe_->describe();
  const Impl& m = *impl_;
  std::string s = "cuda:" + std::to_string(m.spec.device) + " " + m.device_name + ", moe " + moe_kernel_name(m.opt.moe_kernel) +
                  ", graph " + (m.opt.cuda_graph ? "on" : "off");
  if (m.max_seq > 1) s += ", up to " + std::to_string(m.max_seq) + " sequences per step";
  if (m.is_hybrid) {
    s += m.describe_cpu_side(
        m.n_exp * m.layers, m.single_handoff ? cpu_handoff_name(m.opt.cpu_handoff) : "host thread");
    if (m.pcie_num > 0) {
      s += ", pcie assist: the GPU computes " + std::to_string(m.pcie_num * 100 / m.pcie_den) +
           " % of each token's CPU experts from host memory";
    } else if (!m.pcie_note.empty()) {
      s += ", " + m.pcie_note;
    }
  }
  return s;
}

bool GpuEngine::hybrid() const {
  if (ds_) return ds_->hybrid();
  return pipe_ ? pipe_->hybrid() : impl_->is_hybrid;
}

void GpuEngine::Impl::add_expert_counts(std::vector<std::vector<uint64_t>>& out) {
  if (expert_counts_d == nullptr || legacy) return;
  std::vector<int32_t> h(static_cast<size_t>((le - lb) * n_exp));
  KTUNE_CUDA_CHECK(cudaMemcpyAsync(h.data(), expert_counts_d, h.size() * sizeof(int32_t),
                                   cudaMemcpyDeviceToHost, stream));
  KTUNE_CUDA_CHECK(cudaStreamSynchronize(stream));
  for (int64_t l = lb; l < le; ++l) {
    for (int64_t e = 0; e < n_exp; ++e) {
      out[static_cast<size_t>(l)][static_cast<size_t>(e)] +=
          static_cast<uint64_t>(h[static_cast<size_t>((l - lb) * n_exp + e)]);
    }
  }
}

std::vector<std::vector<uint64_t>> GpuEngine::expert_counts() const {
  if (ds_) return {};  // the deepseek2 engine does not count its routing (yet)
  const GpuEngineOptions& o = options();
  const ModelConfig* cfg = pipe_ ? &pipe_->stages.front()->cfg : &impl_->cfg;
  if (!o.count_experts) return {};
  std::vector<std::vector<uint64_t>> out(static_cast<size_t>(cfg->n_layers),
                                         std::vector<uint64_t>(static_cast<size_t>(cfg->n_experts)));
  if (pipe_) {
    for (size_t i = 0; i < pipe_->stages.size(); ++i) {
      pipe_->set_device(i);
      pipe_->stages[i]->add_expert_counts(out);
    }
  } else {
    if (impl_->legacy) return {};
    impl_->add_expert_counts(out);
  }
  return out;
}

}  // namespace ktune
