// The cost model (search/cost_model.h). Units inside: microseconds, bytes, FLOPs; a rate of
// X GB/s moves X * 1e3 bytes per µs, X GFLOP/s does X * 1e3 FLOPs per µs. docs/search.md
// writes the same equations out; keep the two in step.
#include "search/cost_model.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <set>

#include "ktune/engine/memory_plan.h"
#include "ktune/engine/pcie_assist.h"

namespace ktune::search {
namespace {

double us_for_bytes(double bytes, double gb_s) { return bytes / (gb_s * 1e3); }
double us_for_flops(double flops, double gflop_s) { return flops / (gflop_s * 1e3); }

// P(j of k draws fall on the CPU), each draw independently with probability q: the routing of
// one token, with q the share of the layer's routing mass on CPU experts.
void binomial(int k, double q, std::vector<double>& out) {
  out.assign(static_cast<size_t>(k) + 1, 0.0);
  if (q <= 0) {
    out[0] = 1;
    return;
  }
  if (q >= 1) {
    out[static_cast<size_t>(k)] = 1;
    return;
  }
  double c = 1;  // C(k, j)
  for (int j = 0; j <= k; ++j) {
    out[static_cast<size_t>(j)] = c * std::pow(q, j) * std::pow(1 - q, k - j);
    c = c * (k - j) / (j + 1);
  }
}

}  // namespace

std::string EngineSettings::describe() const {
  if (!gpu) return fmt::format("cpu engine, {} threads", cpu_threads);
  std::string s = fmt::format("graph {}, {}", cuda_graph ? "on" : "off", moe_kernel_name(kernel));
  if (cuda_graph) s += fmt::format(", {} hand-off", cpu_handoff_name(handoff));
  if (pcie_assist_permille > 0) s += ", pcie assist " + pcie_assist_text(pcie_assist_permille);
  return s + fmt::format(", {} threads", cpu_threads);
}

std::string EngineSettings::key() const {
  return fmt::format("{}{}{}{}{}a{}", gpu ? 'g' : 'c', cuda_graph ? 1 : 0,
                     kernel == MoeKernel::Fused ? 'f' : 'u',
                     handoff == CpuHandoff::Flags ? 'F' : 'H', cpu_threads, pcie_assist_permille);
}

bool operator==(const EngineSettings& a, const EngineSettings& b) { return a.key() == b.key(); }

CostModel::CostModel(MachineCosts machine, ModelInfo model, RouterModel router, Workload workload)
    : m_(std::move(machine)),
      model_(std::move(model)),
      router_(std::move(router)),
      w_(std::move(workload)) {
  const ModelConfig& c = model_.cfg;
  // Prefill runs in chunks of at most kPrefillChunkTokens (the memory planner's chunk).
  std::set<int64_t> sizes;
  for (const Request& r : w_.requests) {
    if (r.prompt >= kPrefillChunkTokens) sizes.insert(kPrefillChunkTokens);
    if (r.prompt % kPrefillChunkTokens != 0) sizes.insert(r.prompt % kPrefillChunkTokens);
  }
  // A batched decode step is priced like a chunk of `batch` tokens: its distinct experts.
  if (w_.batch > 1) sizes.insert(w_.batch);
  chunk_sizes_.assign(sizes.begin(), sizes.end());
  for (int64_t n : chunk_sizes_) {
    std::vector<std::vector<double>> per_layer;
    for (int64_t l = 0; l < c.n_layers; ++l) {
      const auto& p = router_.p[size_t(l)];
      const auto& hot = router_.hot[size_t(l)];
      std::vector<double> pre(hot.size() + 1, 0.0);
      for (size_t i = 0; i < hot.size(); ++i) {
        // A chunk's tokens route independently: expert e is activated unless all n miss it.
        const double pe = std::min(1.0, p[size_t(hot[i])]);
        pre[i + 1] = pre[i] + 1.0 - std::pow(1.0 - pe, static_cast<double>(n));
      }
      per_layer.push_back(std::move(pre));
    }
    distinct_prefix_.push_back(std::move(per_layer));
  }
  const double q = double(c.n_heads * c.head_dim), kv = double(c.n_kv_heads * c.head_dim);
  const double h = double(c.hidden);
  attn_params_ = h * (q + 2 * kv) + q * h;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const double total = double(model_.bytes.attention[size_t(l)]);
    const double router = 4.0 * h * double(c.n_experts);
    const double norms = 2 * 4 * h + 2 * 4 * double(c.head_dim);
    const double matrices = std::max(0.0, total - router - norms);
    qkv_bytes_.push_back(matrices * (q + 2 * kv) / (2 * q + 2 * kv));
    o_bytes_.push_back(matrices * q / (2 * q + 2 * kv));
    router_bytes_.push_back(router);
  }
  mla_ = c.is_deepseek2() && model_.mla.size() == size_t(c.n_layers);
  if (mla_ && m_.has_gpu && !m_.mla_attention_assumed) {
    m_.notes.push_back(fmt::format(
        "mla_attention_gflop_s not measured (no probe yet): assumed {} for deepseek2's MLA "
        "attention over the latent cache (--assume mla_attention_gflop_s=...)",
        m_.mla_attention_gflop_s));
  }
}

std::vector<int> CostModel::thread_candidates() const {
  const int cores = std::max(1, m_.physical_cores);
  std::set<int> ts = {cores};
  for (const auto* curve : {&m_.cpu_moe_gb_s, &m_.cpu_prefill_gflop_s, &m_.cpu_read_gb_s}) {
    for (const profile::ThreadRate& r : *curve) {
      if (r.threads <= cores) ts.insert(r.threads);
    }
  }
  std::vector<int> all(ts.begin(), ts.end()), out;
  for (int t : all) {
    bool dominated = false;
    for (int u : all) {
      if (u == t) continue;
      const double dm = cpu_expert_gb_s(u) - cpu_expert_gb_s(t);
      const double dp = m_.cpu_prefill_at(u) - m_.cpu_prefill_at(t);
      const double dr = m_.cpu_read_at(u) - m_.cpu_read_at(t);
      const bool ge = dm >= 0 && dp >= 0 && dr >= 0;
      const bool better = dm > 0 || dp > 0 || dr > 0;
      // Beaten on every curve, or equal everywhere with fewer threads (cores left free).
      if (ge && (better || u < t)) dominated = true;
    }
    if (!dominated) out.push_back(t);
  }
  return out;
}

size_t CostModel::chunk_index(int64_t n) const {
  return static_cast<size_t>(std::lower_bound(chunk_sizes_.begin(), chunk_sizes_.end(), n) -
                             chunk_sizes_.begin());
}

LayerSplit CostModel::hottest_split(int64_t l, int64_t m) const {
  LayerSplit s;
  const int64_t e = n_experts();
  s.n_gpu = m;
  s.n_cpu = e - m;
  s.gpu_mass = router_.prefix[size_t(l)][size_t(m)];
  for (const auto& dp : distinct_prefix_) {
    const auto& pre = dp[size_t(l)];
    s.gpu_distinct.push_back(pre[size_t(m)]);
    s.cpu_distinct.push_back(pre.back() - pre[size_t(m)]);
  }
  return s;
}

LayerSplit CostModel::split_of(int64_t l, const std::vector<bool>& on_gpu) const {
  LayerSplit s;
  const auto& p = router_.p[size_t(l)];
  s.gpu_distinct.assign(chunk_sizes_.size(), 0.0);
  s.cpu_distinct.assign(chunk_sizes_.size(), 0.0);
  for (size_t e = 0; e < on_gpu.size(); ++e) {
    const double pe = std::min(1.0, p[e]);
    if (on_gpu[e]) {
      ++s.n_gpu;
      s.gpu_mass += pe;
    } else {
      ++s.n_cpu;
    }
    for (size_t c = 0; c < chunk_sizes_.size(); ++c) {
      const double d = 1.0 - std::pow(1.0 - pe, static_cast<double>(chunk_sizes_[c]));
      (on_gpu[e] ? s.gpu_distinct : s.cpu_distinct)[c] += d;
    }
  }
  return s;
}

// ------------------------------------------------------------------------------------ decode --

double CostModel::kernel_us(double work_us, bool graph) const {
  // A kernel costs its GPU time plus a per-launch overhead: a graph node's; without a graph the
  // host enqueues ahead, so a queued kernel adds the GPU's gap between eager kernels, and the
  // host's launch rate bounds a run of short ones (max). Profiles without the eager gap: the
  // eager launch cost on top of every kernel.
  const double fixed = m_.kernel_fixed_us;
  if (graph) return work_us + fixed + m_.graph_node_us;
  if (m_.eager_gap_us > 0) return std::max(work_us + m_.eager_gap_us, m_.launch_eager_us) + fixed;
  return work_us + fixed + m_.launch_eager_us;
}

double CostModel::cpu_expert_gb_s(int threads) const {
  // CpuMoe streams the experts' weights from DRAM: never faster than the read probe at the same
  // threads (the CpuMoe probe's small working set partly stays in the last-level cache). A rate
  // given with --assume is taken as it is.
  if (m_.cpu_moe_assumed) return m_.cpu_moe_at(threads);
  return std::min(m_.cpu_moe_at(threads), m_.cpu_read_at(threads));
}

double CostModel::pre_gpu_us(int64_t l, double ctx, bool graph) const {
  if (mla_) {
    // MLA, then the router logits (ffn_norm prologue) and the one-warp deepseek router kernel;
    // a dense layer's ffn_norm instead.
    const double router = model_.mla[size_t(l)].router;
    return mla_attention_us(l, ctx, graph) +
           (router > 0 ? kernel_us(m_.router.us(router), graph) + kernel_us(0, graph)
                       : kernel_us(0, graph));
  }
  const double attn = m_.attention_us + m_.attention_us_per_1k_ctx * ctx / 1000.0;
  // The engine's 4 launches before the MoE: q/k/v (norm prologue), attention (q/k norms and
  // RoPE folded in), o + residual, norm + router + top-k.
  return kernel_us(m_.matvec.us(qkv_bytes_[size_t(l)]), graph) + kernel_us(attn, graph) +
         kernel_us(m_.matvec.us(o_bytes_[size_t(l)]), graph) +
         kernel_us(m_.router.us(router_bytes_[size_t(l)]), graph);
}

double CostModel::fused_moe_us(double bytes, bool graph) const {
  // The layer's two fused launches (gate/up/SwiGLU, down/sum): the curve gives their GPU time
  // together; 2/3 of it to the first (gate and up: 2 of the 3 matrices), 1/3 to the second.
  const double t = m_.moe_fused.us(bytes);
  return kernel_us(t * 2 / 3, graph) + kernel_us(t / 3, graph);
}

double CostModel::handoff_us(const EngineSettings& e, bool graph) const {
  const ModelConfig& c = model_.cfg;
  const bool host_node = e.handoff == CpuHandoff::HostNode;
  if (m_.handoff_us > 0) {
    // Measured with the engine's signal and wait kernels in a graph; eager launches add their
    // overhead over a node's to both; host nodes post and wait instead of the flag trip.
    double h = m_.handoff_us;
    if (!graph) h += 2 * (kernel_us(0, false) - kernel_us(0, true));
    if (host_node) h += 2 * m_.host_node_us - m_.flag_handoff_us;
    return h;
  }
  // Composed: the routing block (h, top-k ids and weights) to pinned memory, the trip (a flag
  // round trip, or a host node to post and one to wait), the CPU sum back and added.
  const double d2h = kernel_us(
      us_for_bytes((double(c.hidden) + 2.0 * double(c.n_experts_used)) * 4.0,
                   m_.d2h_gb_s > 0 ? m_.d2h_gb_s : 1.0),
      graph);
  const double merge =
      kernel_us(us_for_bytes(double(c.hidden) * 4.0, m_.h2d_gb_s), graph) + kernel_us(0, graph);
  return d2h + (host_node ? 2 * m_.host_node_us : m_.flag_handoff_us) + merge;
}

double CostModel::decode_layer_us(int64_t l, const LayerSplit& s, const EngineSettings& e,
                                  double ctx) const {
  if (w_.batch > 1) return decode_layer_batch_us(l, s, e, ctx);
  return decode_layer_one_us(l, s, e, ctx);
}

double CostModel::decode_layer_one_us(int64_t l, const LayerSplit& s, const EngineSettings& e,
                                      double ctx) const {
  const ModelConfig& c = model_.cfg;
  const double eb = double(model_.bytes.expert[size_t(l)]);
  const int k = static_cast<int>(c.n_experts_used);
  const double cpu_bw = cpu_expert_gb_s(e.cpu_threads);
  if (!e.gpu) {
    // The CPU engine: attention weights and the f32 KV cache at DRAM speed, the token's experts
    // at CpuMoe's bandwidth (deepseek2: the latent cache; its attention bytes hold the dense
    // FFN or shared experts; a dense layer has no expert bytes).
    const double kv = ctx * double(c.kv_cache_values()) * 4.0;
    return us_for_bytes(double(model_.bytes.attention[size_t(l)]) + kv,
                        m_.cpu_read_at(e.cpu_threads)) +
           us_for_bytes(k * eb, cpu_bw);
  }
  if (mla_) return decode_layer_mla_us(l, s, e, ctx);
  // The engine captures both MoE paths: fused, and unfused as per-slot graph nodes that read the
  // expert id from device memory (no host read, so no sync).
  const bool graph = e.cuda_graph;
  const double L = m_.launch_eager_us;
  const double pre = pre_gpu_us(l, ctx, graph);
  const bool has_gpu = s.n_gpu > 0, has_cpu = s.n_cpu > 0;
  // j of the token's experts on the CPU: one CpuMoe call (its fixed cost) and their bytes, at
  // `share` of CpuMoe's rate (below 1 beside the PCIe assist's reads of the same DRAM).
  auto cpu_experts = [&](int j, double share = 1.0) {
    return j > 0 ? m_.cpu_call_us + j * us_for_bytes(eb, cpu_bw * share) : 0.0;
  };
  // Fused GPU experts, n of the token's: the layer's two launches (they run, empty, when none of
  // the token's experts is on the GPU).
  auto fused = [&](double n) { return has_gpu ? fused_moe_us(n * eb, graph) : 0.0; };
  // Unfused in a graph: memset, 5 nodes for every top-k slot (a slot whose expert is on the CPU
  // runs them empty), the add; the GPU slots' three matrices at the per-expert kernel's time.
  const double unfused_matrix = m_.moe_unfused.us(eb / 3);
  auto unfused_graph = [&](double n) {
    if (!has_gpu) return 0.0;
    return 2 * kernel_us(0, true) + k * (3 * kernel_us(0, true) + 2 * kernel_us(0, true)) +
           n * 3 * unfused_matrix;
  };
  auto gpu_moe = [&](double n) {
    return e.kernel == MoeKernel::Fused ? fused(n) : unfused_graph(n);
  };
  const bool host_synced = e.kernel == MoeKernel::Unfused && !graph;
  if (!has_cpu && !host_synced) return pre + gpu_moe(k);
  // PCIe assist: a of the token's j CPU experts read by the GPU from host memory after its own
  // experts, while CpuMoe computes the other j - a, slowed by the GPU's reads of the same DRAM.
  // The map launch and the two fused launches run on every token, assisted experts or not: the
  // fused pair costs at least its latency (the curve at 0 bytes; ~8 µs a layer on the H100,
  // where a skewed placement with few CPU experts per token lost 16 % to them).
  const bool assist = e.pcie_assist_permille > 0 && e.kernel == MoeKernel::Fused && has_cpu &&
                      m_.pcie_assist_gb_s > 0;
  auto assist_us = [&](int a) {
    const double reads = a > 0 ? us_for_bytes(a * eb, m_.pcie_assist_gb_s) : 0.0;
    return kernel_us(0, graph) + std::max(fused_moe_us(0, graph), 2 * kernel_us(0, graph) + reads);
  };

  const double q = has_gpu ? std::clamp(1.0 - s.gpu_mass / k, 0.0, 1.0) : 1.0;
  std::vector<double> pj;
  binomial(k, has_cpu ? q : 0.0, pj);
  // The hand-off runs on every token in a layer holding CPU experts, whether or not the token
  // selected one of them (the CPU side answers "nothing to add").
  const double h = has_cpu && !host_synced ? handoff_us(e, graph) : 0.0;
  // Unfused without a graph: routing copied to the host and the stream synchronised, the GPU
  // experts launched one matrix at a time, then the host runs the CPU experts and enqueues their
  // copy and add.
  const double d2h = kernel_us(
      us_for_bytes((double(c.hidden) + 2.0 * k) * 4.0, m_.d2h_gb_s > 0 ? m_.d2h_gb_s : 1.0),
      false);
  const double merge =
      kernel_us(us_for_bytes(double(c.hidden) * 4.0, m_.h2d_gb_s), false) + kernel_us(0, false);
  const double unfused_expert = 3 * kernel_us(unfused_matrix, false) + 2 * kernel_us(0, false);
  double expected = 0;
  for (int j = 0; j <= k; ++j) {
    const double pr = pj[size_t(j)];
    if (pr == 0) continue;
    const double ng = has_gpu ? double(k - j) : 0.0;
    double t = 0;
    if (assist) {
      const int a = pcie_assist_count(j, e.pcie_assist_permille, 1000);
      t = pre + h + std::max(gpu_moe(ng) + assist_us(a), cpu_experts(j - a, m_.moe_pcie_ratio));
    } else if (!host_synced) {
      const double cpu = cpu_experts(j);
      // GPU experts run while the CPU computes its own; the wait kernel joins them.
      t = pre + h + std::max(gpu_moe(ng), cpu);
    } else {
      // Sync to sync: the host enqueues this layer's GPU experts, runs the CPU experts, enqueues
      // their merge, then the next layer's kernels and routing copy, and synchronises.
      double gpu_end = 0, host_free = 0;
      if (has_gpu) {
        gpu_end = 2 * kernel_us(0, false) + ng * unfused_expert;
        host_free = (2 + 5 * ng) * L;
      }
      t = gpu_end;
      if (j > 0) t = std::max(gpu_end, host_free + cpu_experts(j)) + merge;
      t += pre + d2h + m_.sync_us;
    }
    expected += pr * t;
  }
  return expected;
}

// ------------------------------------------------------------------------------- deepseek2 --

double CostModel::mla_attention_bytes(double ctx) const {
  const ModelConfig& c = model_.cfg;
  const double groups = std::ceil(double(c.n_heads) / double(kMlaHeadsPerBlock));
  return groups * ctx * double(c.kv_cache_values()) * 4.0;  // f32 latent + roped key rows
}

double CostModel::mla_attention_flops(double ctx) const {
  const ModelConfig& c = model_.cfg;
  // Per position and head: the score over the latent and the roped key, and the weighted sum of
  // the latent (kv_lora_rank values), two FLOPs per multiply-add.
  return 2.0 * ctx * double(c.n_heads) * double(c.kv_cache_values() + c.kv_lora_rank);
}

double CostModel::mla_attention_us(int64_t l, double ctx, bool graph) const {
  const MlaLayerBytes& b = model_.mla[size_t(l)];
  auto mv = [&](double bytes) { return kernel_us(m_.matvec.us(bytes), graph); };
  // attn_norm-prologue matvec of q_a (or q) and kv_a, one launch when their types agree.
  double t = b.kv_a_apart ? mv(b.q_in) + mv(b.kv_a) : mv(b.q_in + b.kv_a);
  if (b.q_b > 0) t += mv(b.q_b);
  t += kernel_us(0, graph);  // latent norm + RoPE into the cache row, q_pe RoPE
  t += mv(b.k_b);            // q_abs = W_kb^T q_nope, per head
  // The attention over the cache (split in spans, head groups) and the merge of the spans: the
  // probe's attention kernel time at context 0 as the fixed part, the cache at the GPU's read
  // bandwidth or its FLOPs at the MLA rate, whichever is slower.
  const double cache = std::max(us_for_bytes(mla_attention_bytes(ctx), m_.gpu_read_gb_s),
                                us_for_flops(mla_attention_flops(ctx), m_.mla_attention_gflop_s));
  t += kernel_us(m_.attention_us + cache, graph) + kernel_us(0, graph);
  t += mv(b.v_b);  // o_h = W_vb ctx_h
  t += mv(b.o);    // attn_output + residual
  return t;
}

double CostModel::decode_layer_mla_us(int64_t l, const LayerSplit& s, const EngineSettings& e,
                                      double ctx) const {
  // engine/cuda/gpu_engine_deepseek_step.cpp: every launch is captured (graph on), or enqueued
  // eagerly (graph off); the unfused routed experts are per-slot launches either way (deepseek2
  // has no host-synchronised routing).
  const ModelConfig& c = model_.cfg;
  const bool graph = e.cuda_graph;
  const MlaLayerBytes& b = model_.mla[size_t(l)];
  const double pre = pre_gpu_us(l, ctx, graph);
  const double eb = double(model_.bytes.expert[size_t(l)]);
  // The dense FFN (and a MoE layer's shared experts) runs on the fused MoE kernels as one
  // always-selected expert: their two launches at its bytes.
  const double ffn = b.ffn > 0 ? fused_moe_us(b.ffn, graph) : 0.0;
  if (c.is_dense_layer(l) || eb == 0) return pre + ffn;
  const int k = static_cast<int>(c.n_experts_used);
  const bool has_gpu = s.n_gpu > 0, has_cpu = s.n_cpu > 0;
  const double unfused_matrix = m_.moe_unfused.us(eb / 3);
  // The GPU side of the layer: shared experts, then the routed GPU experts (n of the token's).
  auto gpu_side = [&](double n) {
    if (!has_gpu) return ffn;
    if (e.kernel == MoeKernel::Fused) return ffn + fused_moe_us(n * eb, graph);
    return ffn + 2 * kernel_us(0, graph) + k * 5 * kernel_us(0, graph) + n * 3 * unfused_matrix;
  };
  if (!has_cpu) return pre + gpu_side(k);
  const double q = has_gpu ? std::clamp(1.0 - s.gpu_mass / k, 0.0, 1.0) : 1.0;
  std::vector<double> pj;
  binomial(k, q, pj);
  // The routing block goes to the CPU before the shared experts: the CPU computes its experts
  // while the GPU runs the shared and its own routed experts; the wait kernel joins them.
  const double h = handoff_us(e, graph);
  const double cpu_bw = cpu_expert_gb_s(e.cpu_threads);
  double expected = 0;
  for (int j = 0; j <= k; ++j) {
    const double pr = pj[size_t(j)];
    if (pr == 0) continue;
    const double cpu = j > 0 ? m_.cpu_call_us + j * us_for_bytes(eb, cpu_bw) : 0.0;
    expected += pr * (pre + h + std::max(gpu_side(double(k - j)), cpu));
  }
  return expected;
}

double CostModel::decode_layer_batch_us(int64_t l, const LayerSplit& s, const EngineSettings& e,
                                        double ctx) const {
  // One step of B sequences (B tokens): weights are read once per step, each sequence's KV cache
  // once; the experts read are the distinct ones the B tokens select (from the router
  // statistics: E(1 - (1 - p_e)^B) summed per side; uniform routing gives E(1 - (1 - k/E)^B)).
  // Decode stays memory-bound at these batch sizes, so compute is not priced.
  const ModelConfig& c = model_.cfg;
  const double B = double(w_.batch);
  const double eb = double(model_.bytes.expert[size_t(l)]);
  const size_t ci = chunk_index(w_.batch);
  const double gpu_distinct = s.gpu_distinct[ci], cpu_distinct = s.cpu_distinct[ci];
  const double cpu_bw = cpu_expert_gb_s(e.cpu_threads);
  if (!e.gpu) {
    const double kv = B * ctx * double(c.kv_cache_values()) * 4.0;
    return us_for_bytes(double(model_.bytes.attention[size_t(l)]) + kv,
                        m_.cpu_read_at(e.cpu_threads)) +
           us_for_bytes((gpu_distinct + cpu_distinct) * eb, cpu_bw);
  }
  const bool graph = e.cuda_graph && e.kernel == MoeKernel::Fused;
  // Attention reads B caches: priced as one attention over B times the context.
  const double pre = pre_gpu_us(l, B * ctx, graph);
  const bool has_gpu = s.n_gpu > 0, has_cpu = s.n_cpu > 0;
  double gpu_us = 0;
  if (has_gpu) {
    gpu_us = e.kernel == MoeKernel::Fused
                 ? fused_moe_us(gpu_distinct * eb, graph)
                 : 2 * kernel_us(0, graph) +
                       gpu_distinct * 3 * kernel_us(m_.moe_unfused.us(eb / 3), graph);
  }
  if (!has_cpu) return pre + gpu_us;
  // One hand-off per layer for all B tokens (the routing block and the sum scale with B).
  const double cpu_us = m_.cpu_call_us + us_for_bytes(cpu_distinct * eb, cpu_bw);
  const double io = (B - 1) * (2.0 * double(c.hidden) + 2.0 * double(c.n_experts_used)) * 4.0;
  const double extra_io = us_for_bytes(io, m_.h2d_gb_s > 0 ? m_.h2d_gb_s : 1.0);
  return pre + handoff_us(e, graph) + extra_io + std::max(gpu_us, cpu_us);
}

double CostModel::decode_step_fixed_us(const EngineSettings& e) const {
  const double head = double(model_.bytes.head);
  if (!e.gpu) return us_for_bytes(head, m_.cpu_read_at(e.cpu_threads));
  const bool graph = e.cuda_graph;  // both MoE paths are captured (decode_layer_us)
  // The embedding, and the output head with its norm prologue and the greedy tail (argmax,
  // history, position) in one launch; a graph is one launch per step.
  return kernel_us(0, graph) + kernel_us(m_.matvec.us(head), graph) +
         (graph ? m_.launch_eager_us : 0.0);
}

// ----------------------------------------------------------------------------------- prefill --

double CostModel::eager_launches_us(double work_us, int count) const {
  // As kernel_us without a graph, for a run of launches queued back to back: the GPU pays a gap
  // per launch, the host's launch rate bounds a run of short ones.
  const double n = double(count), fixed = n * m_.kernel_fixed_us;
  if (m_.eager_gap_us > 0) {
    return std::max(work_us + n * m_.eager_gap_us, n * m_.launch_eager_us) + fixed;
  }
  return work_us + n * m_.launch_eager_us + fixed;
}

bool CostModel::hybrid(const std::vector<LayerSplit>& splits) const {
  for (size_t l = 0; l < splits.size(); ++l) {
    if (splits[l].n_cpu > 0 && model_.bytes.expert[l] > 0) return true;
  }
  return false;
}

bool CostModel::prefill_decode_steps(bool hybrid, const EngineSettings& e, int64_t n) const {
  if (!e.gpu) return false;  // the CPU engine's prefill
  if (model_.cfg.is_deepseek2()) return true;  // token by token (no batched MLA prefill yet)
  return hybrid && n < prefill_min_staged();
}

int64_t CostModel::prefill_min_staged() const {
  // One layer with every expert on the CPU stands for any placement: copy bytes and per-token
  // CPU bytes both scale with the CPU experts, so their ratio is the model's, not the split's.
  double eb = 0;
  for (double b : model_.bytes.expert) eb = std::max(eb, double(b));
  const double ne = double(model_.cfg.n_experts), k = double(model_.cfg.n_experts_used);
  return hybrid_prefill_min_staged(ne * eb, k * eb);
}

CostModel::PrefillLayer CostModel::prefill_layer(int64_t l, const LayerSplit& s,
                                                 const EngineSettings& e, size_t ci, int64_t n,
                                                 int64_t c0, bool decode_steps) const {
  const ModelConfig& c = model_.cfg;
  const double eb = double(model_.bytes.expert[size_t(l)]);
  const double nd = double(n), h = double(c.hidden);
  const double k = double(c.n_experts_used);
  const double attn_bytes = double(model_.bytes.attention[size_t(l)]);
  // Dense matrices, router, and causal attention over the context so far (QK and PV).
  const double attn_flops = 2 * nd * attn_params_ + 2 * nd * h * double(c.n_experts) +
                            4 * nd * (double(c0) + (nd + 1) / 2) * double(c.n_heads * c.head_dim);
  const double expert_flops = 6 * h * double(c.expert_ffn);  // per token-expert pair
  PrefillLayer r;
  if (!e.gpu) {
    const double cpu_rate = m_.cpu_prefill_at(e.cpu_threads);
    const double kv = (double(c0) + nd) * double(c.kv_cache_values()) * 4.0;
    const double distinct = s.gpu_distinct[ci] + s.cpu_distinct[ci];
    r.gpu_us = std::max(us_for_flops(attn_flops, cpu_rate),
                        us_for_bytes(attn_bytes + kv, m_.cpu_read_at(e.cpu_threads))) +
               std::max(us_for_flops(nd * k * expert_flops, cpu_rate),
                        us_for_bytes(distinct * eb, cpu_expert_gb_s(e.cpu_threads)));
    r.isolated_us = r.pre_us = r.gpu_us;
    return r;
  }
  if (decode_steps) {
    // n decode steps at positions c0 .. c0 + n - 1: the layer's decode price is linear in the
    // context, so n times its price at the middle position.
    r.gpu_us = nd * decode_layer_one_us(l, s, e, double(c0) + (nd - 1) / 2);
    r.isolated_us = r.pre_us = r.gpu_us;
    return r;
  }
  // Batched (engine/cuda/gpu_engine_prefill.cpp): tensor-core matmuls for q/k/v/o, the causal
  // attention, the F32 router; then the grouped expert matmuls over every expert the chunk routes
  // to, resident or staged (one gate/up and one down launch), each expert's weights read once.
  const double g_rate = m_.gpu_prefill_gflop_s;
  const double t_att =
      std::max(us_for_flops(attn_flops, g_rate), us_for_bytes(attn_bytes, m_.gpu_read_gb_s));
  const double distinct = s.gpu_distinct[ci] + s.cpu_distinct[ci];
  const double t_exp = eb > 0 ? std::max(us_for_flops(nd * k * expert_flops, g_rate),
                                         us_for_bytes(distinct * eb, m_.gpu_read_gb_s))
                              : 0.0;
  r.gpu_us = eager_launches_us(t_att + t_exp, kPrefillLaunchesPerLayer);
  r.pre_us = eager_launches_us(t_att, kPrefillLaunchesBeforeExperts);
  r.isolated_us = r.gpu_us;
  if (s.n_cpu > 0 && eb > 0) {
    // A hybrid layer: all its CPU-resident experts are copied into a staging buffer (whole,
    // whatever the routing: the copy starts before the layer routes), double-buffered.
    r.copies = true;
    r.copy_us = us_for_bytes(double(s.n_cpu) * eb, m_.h2d_gb_s);
    r.isolated_us = std::max(r.copy_us, r.gpu_us);
  }
  return r;
}

double CostModel::prefill_fixed_us(const EngineSettings& e, int64_t prompt, bool hybrid) const {
  const double head = double(model_.bytes.head);
  if (!e.gpu) return us_for_bytes(head, m_.cpu_read_at(e.cpu_threads));
  const double eager0 = kernel_us(0, false);
  if (model_.cfg.is_deepseek2()) {
    // Each token copied on the stream into the step's token slot, then the step (its embedding,
    // head and graph launch); one synchronisation at the end.
    return double(prompt) * (eager0 + decode_step_fixed_us(e)) + m_.sync_us;
  }
  double t = m_.sync_us;  // prefill() synchronises once at the end
  bool last_batched = false;
  for (int64_t c0 = 0; c0 < prompt; c0 += kPrefillChunkTokens) {
    const int64_t n = std::min<int64_t>(kPrefillChunkTokens, prompt - c0);
    if (prefill_decode_steps(hybrid, e, n)) {
      // decode(): the token copied in, the step, a synchronisation.
      t += double(n) * (eager0 + decode_step_fixed_us(e) + m_.sync_us);
      last_batched = false;
    } else {
      t += 3 * eager0;  // the tokens and the position copied in, the embedding
      last_batched = true;
    }
  }
  // After the last batched chunk: the output head for the last position, argmax, position.
  if (last_batched) t += kernel_us(m_.matvec.us(head), false) + 2 * eager0;
  return t;
}

Stages stages_from_counts(const std::vector<int64_t>& layers_per_gpu) {
  Stages st;
  for (size_t g = 0; g < layers_per_gpu.size(); ++g) {
    for (int64_t i = 0; i < layers_per_gpu[g]; ++i) st.push_back(int(g));
  }
  return st;
}

std::vector<int> stage_gpus(const Stages& st) {
  std::vector<int> out;
  for (int g : st) {
    if (out.empty() || out.back() != g) out.push_back(g);
  }
  return out;
}

double CostModel::decode_transfer_us(const Stages& st) const {
  const std::vector<int> g = stage_gpus(st);
  if (g.size() < 2) return 0;
  const double hidden_bytes = 4.0 * double(model_.cfg.hidden);
  double t = 0;
  for (size_t i = 1; i < g.size(); ++i) t += m_.transfer_us(g[i - 1], g[i], hidden_bytes);
  return t + m_.transfer_us(g.back(), g.front(), 4.0);
}

double CostModel::prefill_s(const std::vector<LayerSplit>& splits, const EngineSettings& e,
                            int64_t prompt, int* copy_layers, const Stages& stages) const {
  // Per GPU two engines: the compute stream and the copy engine; two staging buffers, the i-th
  // hybrid layer of a chunk using buffer i % 2. A copy starts when the copy engine and its
  // buffer are free (the buffer's last user has run its expert matmuls); a layer's attention and
  // routing run when the layer before it is done, its expert matmuls when its copy has arrived.
  // Several GPUs: a chunk enters a GPU when it has finished the previous chunk and the chunk's
  // activations arrived from the GPU before it. A chunk run as decode steps goes through every
  // layer (and GPU) token by token once everything before it is done.
  const std::vector<int> gpus_used = stage_gpus(stages);
  const size_t ns = std::max<size_t>(1, gpus_used.size());
  std::vector<double> gpu(ns, 0.0), copy_engine(ns, 0.0);
  std::vector<std::array<double, 2>> buf_free(ns, {0.0, 0.0});
  int copies_full_chunk = 0;
  const double hidden_bytes = 4.0 * double(model_.cfg.hidden);
  const bool hyb = hybrid(splits);
  if (e.gpu && model_.cfg.is_deepseek2() && prompt > 0) {
    // Token by token through the decode step: the prompt's tokens at their middle position (the
    // step's price is linear in the context).
    double t = double(prompt) * decode_transfer_us(stages);
    for (int64_t l = 0; l < n_layers(); ++l) {
      t += double(prompt) * decode_layer_one_us(l, splits[size_t(l)], e, double(prompt - 1) / 2);
    }
    if (copy_layers != nullptr) *copy_layers = 0;
    return (t + prefill_fixed_us(e, prompt, hyb)) * 1e-6;
  }
  for (int64_t c0 = 0; c0 < prompt; c0 += kPrefillChunkTokens) {
    const int64_t n = std::min<int64_t>(kPrefillChunkTokens, prompt - c0);
    const size_t ci = chunk_index(n);
    if (prefill_decode_steps(hyb, e, n)) {
      double t = double(n) * decode_transfer_us(stages);
      for (int64_t l = 0; l < n_layers(); ++l) {
        t += prefill_layer(l, splits[size_t(l)], e, ci, n, c0, true).gpu_us;
      }
      const double end = *std::max_element(gpu.begin(), gpu.end()) + t;
      std::fill(gpu.begin(), gpu.end(), end);
      continue;
    }
    int copies = 0;
    size_t s = 0;
    std::vector<int> next_buf(ns, 0);
    for (int64_t l = 0; l < n_layers(); ++l) {
      if (!stages.empty() && l > 0 && stages[size_t(l)] != stages[size_t(l) - 1]) {
        const double arrive =
            gpu[s] + m_.transfer_us(gpus_used[s], gpus_used[s + 1], double(n) * hidden_bytes);
        ++s;
        gpu[s] = std::max(gpu[s], arrive);
      }
      const PrefillLayer pl = prefill_layer(l, splits[size_t(l)], e, ci, n, c0);
      if (!pl.copies) {
        gpu[s] += pl.gpu_us;
        continue;
      }
      ++copies;
      const size_t b = size_t(next_buf[s]);
      const double start = std::max(copy_engine[s], buf_free[s][b]);
      copy_engine[s] = start + pl.copy_us;
      gpu[s] = std::max(gpu[s] + pl.pre_us, copy_engine[s]) + (pl.gpu_us - pl.pre_us);
      buf_free[s][b] = gpu[s];
      next_buf[s] ^= 1;
    }
    if (n == kPrefillChunkTokens || copies_full_chunk == 0) copies_full_chunk = copies;
  }
  if (copy_layers != nullptr) *copy_layers = copies_full_chunk;
  return (gpu[ns - 1] + prefill_fixed_us(e, prompt, hyb)) * 1e-6;
}

Prediction CostModel::predict(const std::vector<LayerSplit>& splits, const EngineSettings& e,
                              const Stages& stages) const {
  Prediction p;
  const double tw = w_.total_weight();
  double pre_w = 0, dec_w = 0, prompt_w = 0, gen_w = 0, ctx_gen_w = 0;
  // One sequence decodes through the GPUs one after another: the step is the sum of every
  // layer's time plus the transfers between GPUs (not the slowest GPU's share).
  const double fixed = decode_step_fixed_us(e) + (e.gpu ? decode_transfer_us(stages) : 0.0);
  for (const Request& r : w_.requests) {
    const double wt = r.weight / tw;
    int copies = 0;
    const double pre = prefill_s(splits, e, r.prompt, &copies, e.gpu ? stages : Stages{});
    p.copy_layers = std::max(p.copy_layers, copies);
    // Decode steps run at contexts prompt..prompt+gen-1; costs are close to linear in the
    // context, so the middle one stands for all.
    const double ctx = double(r.prompt) + double(r.gen) / 2;
    double step = fixed;
    for (int64_t l = 0; l < n_layers(); ++l) step += decode_layer_us(l, splits[size_t(l)], e, ctx);
    // With a batch, B requests share each step: machine time per request is step / B.
    const double dec = double(r.gen) * step * 1e-6 / double(w_.batch);
    pre_w += wt * pre;
    dec_w += wt * dec;
    prompt_w += wt * double(r.prompt);
    gen_w += wt * double(r.gen);
    ctx_gen_w += wt * double(r.gen) * ctx;
  }
  p.prefill_s = pre_w;
  p.decode_s = dec_w;
  p.request_s = pre_w + dec_w;
  p.prefill_tok_s = pre_w > 0 ? prompt_w / pre_w : 0;
  p.decode_tok_s = dec_w > 0 ? gen_w / dec_w : 0;
  const double mean_ctx = gen_w > 0 ? ctx_gen_w / gen_w : double(w_.requests[0].prompt);
  double step = fixed;
  double mass = 0, total_mass = 0;
  for (int64_t l = 0; l < n_layers(); ++l) {
    const LayerSplit& s = splits[size_t(l)];
    step += decode_layer_us(l, s, e, mean_ctx);
    if (model_.bytes.expert[size_t(l)] == 0) continue;  // a dense layer: no routed experts
    p.gpu_experts += s.n_gpu;
    if (s.n_gpu > 0 && s.n_cpu > 0) ++p.hybrid_layers;
    if (s.n_gpu == 0) ++p.cpu_layers;
    mass += e.gpu ? s.gpu_mass : 0.0;
    total_mass += double(model_.cfg.n_experts_used);
  }
  p.decode_ms = step * 1e-3;
  p.gpu_mass = total_mass > 0 ? mass / total_mass : 0;
  return p;
}

double CostModel::constant_s(const EngineSettings& e) const {
  // The tables price a chunk below the staging threshold as decode steps, as a hybrid
  // placement runs it: their fixed parts are here.
  const double tw = w_.total_weight();
  double s = 0;
  for (const Request& r : w_.requests) {
    s += r.weight / tw *
         (prefill_fixed_us(e, r.prompt, true) +
          double(r.gen) * decode_step_fixed_us(e) / double(w_.batch)) *
         1e-6;
  }
  return s;
}

double CostModel::transfer_constant_s(const Stages& stages) const {
  const double tw = w_.total_weight();
  const double per_step = decode_transfer_us(stages);
  double s = 0;
  for (const Request& r : w_.requests) s += r.weight / tw * double(r.gen) * per_step * 1e-6;
  return s;
}

const std::vector<std::vector<double>>& CostModel::prefill_table(int threads, bool gpu) const {
  // The GPU's batched chunks use no CPU thread: one table serves every thread count.
  const std::string key = gpu ? std::string("g") : fmt::format("c{}", threads);
  auto it = prefill_cache_.find(key);
  if (it != prefill_cache_.end()) return it->second;
  EngineSettings e;
  e.gpu = gpu;
  e.cpu_threads = threads;
  const double tw = w_.total_weight();
  const int64_t ne = n_experts();
  std::vector<std::vector<double>> t(size_t(n_layers()), std::vector<double>(size_t(ne) + 1, 0.0));
  for (int64_t l = 0; l < n_layers(); ++l) {
    for (int64_t m = 0; m <= ne; ++m) {
      const LayerSplit s = hottest_split(l, gpu ? m : 0);
      double sum = 0;
      for (const Request& r : w_.requests) {
        double us = 0;
        for (int64_t c0 = 0; c0 < r.prompt; c0 += kPrefillChunkTokens) {
          const int64_t n = std::min<int64_t>(kPrefillChunkTokens, r.prompt - c0);
          if (prefill_decode_steps(true, e, n)) continue;  // layer_tables prices these
          us += prefill_layer(l, s, e, chunk_index(n), n, c0).isolated_us;
        }
        sum += r.weight / tw * us * 1e-6;
      }
      t[size_t(l)][size_t(m)] = sum;
    }
  }
  return prefill_cache_.emplace(key, std::move(t)).first->second;
}

std::vector<std::vector<double>> CostModel::layer_tables(const EngineSettings& e) const {
  std::vector<std::vector<double>> t = prefill_table(e.cpu_threads, e.gpu);
  const double tw = w_.total_weight();
  const int64_t ne = n_experts();
  // Per request: the decode contexts, and the prompt's chunks run as decode steps (a hybrid
  // placement's short chunks; deepseek2's whole prompt): tokens and middle position of each.
  struct Steps {
    double weight, gen, ctx;
    std::vector<std::pair<double, double>> chunks;  // (tokens, middle position)
  };
  std::vector<Steps> req;
  for (const Request& r : w_.requests) {
    Steps st{r.weight / tw, double(r.gen), double(r.prompt) + double(r.gen) / 2, {}};
    if (e.gpu && model_.cfg.is_deepseek2()) {  // the whole prompt, as prefill_s prices it
      if (r.prompt > 0) st.chunks.emplace_back(double(r.prompt), double(r.prompt - 1) / 2);
      req.push_back(std::move(st));
      continue;
    }
    for (int64_t c0 = 0; c0 < r.prompt; c0 += kPrefillChunkTokens) {
      const int64_t n = std::min<int64_t>(kPrefillChunkTokens, r.prompt - c0);
      if (prefill_decode_steps(true, e, n)) {
        st.chunks.emplace_back(double(n), double(c0) + double(n - 1) / 2);
      }
    }
    req.push_back(std::move(st));
  }
  for (int64_t l = 0; l < n_layers(); ++l) {
    for (int64_t m = 0; m <= ne; ++m) {
      const LayerSplit s = hottest_split(l, e.gpu ? m : 0);
      double us = 0;
      for (const Steps& r : req) {
        double x = r.gen * decode_layer_us(l, s, e, r.ctx) / double(w_.batch);
        for (const auto& [n, mid] : r.chunks) x += n * decode_layer_one_us(l, s, e, mid);
        us += r.weight * x;
      }
      t[size_t(l)][size_t(m)] += us * 1e-6;
    }
  }
  return t;
}

}  // namespace ktune::search
