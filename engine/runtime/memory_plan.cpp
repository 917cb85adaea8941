// The memory planner (formulas documented in docs/placement.md, "Memory planner").
#include "ktune/engine/memory_plan.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <limits>
#include <set>

#include "ktune/engine/error.h"
#include "ktune/engine/gpu_info.h"
#include "ktune/engine/host_info.h"
#include "ktune/engine/synthetic.h"
#include "ktune/engine/numa.h"

namespace ktune {

bool DeviceNameLess::operator()(const std::string& a, const std::string& b) const {
  const std::optional<Device> da = Device::try_parse(a), db = Device::try_parse(b);
  if (da && db) return *da < *db;
  if (da || db) return da.has_value();  // devices first
  return a < b;
}

// ----------------------------------------------------------------------------- weight bytes --

namespace {

// deepseek2: everything of a layer but its routed experts goes with the layer's attention (MLA
// projections, norms, router and selection bias, shared experts, the dense FFN of the leading
// layers), since all of it runs for every token; a dense layer has no expert bytes.
WeightBytes deepseek2_weight_bytes(const ModelConfig& c, QuantType et, QuantType dt) {
  auto mat = [&](QuantType t, int64_t row_len, int64_t rows) {
    return row_bytes(synthetic_row_type(t, row_len), row_len) * rows;
  };
  const int64_t H = c.hidden, nh = c.n_heads, dq = c.head_dim, dv = c.v_head_dim;
  const int64_t rq = c.q_lora_rank, rkv = c.kv_lora_rank, dn = c.qk_nope_dim();
  const int64_t f32 = row_bytes(QuantType::F32, 1);
  int64_t attention = f32 * (2 * H + rq + rkv);  // attn/ffn norms, q_a/kv_a norms
  attention += rq > 0 ? mat(dt, H, rq) + mat(dt, rq, nh * dq) : mat(dt, H, nh * dq);
  attention += mat(dt, H, rkv + c.rope_dim);
  attention +=
      c.split_kv_b ? mat(dt, dn, rkv * nh) + mat(dt, rkv, dv * nh) : mat(dt, rkv, nh * (dn + dv));
  attention += mat(dt, nh * dv, H);
  const int64_t dense = 2 * mat(dt, H, c.dense_ffn) + mat(dt, c.dense_ffn, H);
  const int64_t moe_fixed =
      f32 * H * c.n_experts + (c.expert_score_bias ? f32 * c.n_experts : 0) +
      (c.n_shared_experts > 0 ? 2 * mat(dt, H, c.shared_ffn()) + mat(dt, c.shared_ffn(), H) : 0);
  const int64_t expert = 2 * mat(et, H, c.expert_ffn) + mat(et, c.expert_ffn, H);
  WeightBytes b;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const bool d = c.is_dense_layer(l);
    b.attention.push_back(attention + (d ? dense : moe_fixed));
    b.expert.push_back(d ? 0 : expert);
  }
  b.embedding = mat(dt, H, c.vocab);
  b.head = f32 * H + mat(dt, H, c.vocab);
  return b;
}

}  // namespace

WeightBytes weight_bytes(const ModelConfig& cfg, QuantType et, QuantType dt) {
  if (cfg.is_deepseek2()) return deepseek2_weight_bytes(cfg, et, dt);
  const int64_t q = cfg.n_heads * cfg.head_dim, kv = cfg.n_kv_heads * cfg.head_dim;
  const int64_t f32_hidden = row_bytes(QuantType::F32, cfg.hidden);
  const int64_t norms = 2 * f32_hidden + 2 * row_bytes(QuantType::F32, cfg.head_dim);
  const int64_t router = f32_hidden * cfg.n_experts;
  const int64_t matrices = row_bytes(dt, cfg.hidden) * (q + 2 * kv) + row_bytes(dt, q) * cfg.hidden;
  const int64_t expert =
      2 * row_bytes(et, cfg.hidden) * cfg.expert_ffn + row_bytes(et, cfg.expert_ffn) * cfg.hidden;
  WeightBytes b;
  b.attention.assign(static_cast<size_t>(cfg.n_layers), norms + router + matrices);
  b.expert.assign(static_cast<size_t>(cfg.n_layers), expert);
  b.embedding = row_bytes(dt, cfg.hidden) * cfg.vocab;
  b.head = f32_hidden + row_bytes(dt, cfg.hidden) * cfg.vocab;
  return b;
}

WeightBytes weight_bytes(const ModelWeights& w) {
  WeightBytes b;
  if (w.cfg.is_deepseek2()) {
    // Every tensor of a layer but the routed experts (see deepseek2_weight_bytes); the views a
    // layer does not have are unnamed.
    for (const LayerWeights& l : w.layers) {
      int64_t att = 0;
      for (const TensorView* t :
           {&l.attn_norm, &l.wq,          &l.wq_a,       &l.q_a_norm, &l.wq_b,
            &l.wkv_a,     &l.kv_a_norm,   &l.wkv_b,      &l.wk_b,     &l.wv_b,
            &l.wo,        &l.ffn_norm,    &l.ffn_gate,   &l.ffn_up,   &l.ffn_down,
            &l.router,    &l.exp_probs_b, &l.gate_shexp, &l.up_shexp, &l.down_shexp}) {
        if (!t->name.empty()) att += t->nbytes();
      }
      b.attention.push_back(att);
      const bool moe = !l.gate_exps.name.empty();
      b.expert.push_back(moe ? (l.gate_exps.nbytes() + l.up_exps.nbytes() + l.down_exps.nbytes()) /
                                   std::max<int64_t>(1, w.cfg.n_experts)
                             : 0);
    }
    b.embedding = w.tok_embd.nbytes();
    b.head = w.output_norm.nbytes() + w.output.nbytes();
    if (w.output.data != nullptr && w.output.data == w.tok_embd.data)
      b.head_shared = w.output.nbytes();
    return b;
  }
  const int64_t ne = std::max<int64_t>(1, w.cfg.n_experts);
  for (const LayerWeights& l : w.layers) {
    int64_t att = 0;
    for (const TensorView* t :
         {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.q_norm, &l.k_norm, &l.ffn_norm, &l.router}) {
      att += t->nbytes();
    }

    b.attention.push_back(att);
    b.expert.push_back((l.gate_exps.nbytes() + l.up_exps.nbytes() + l.down_exps.nbytes()) / ne);
  }
  b.embedding = w.tok_embd.nbytes();
  b.head = w.output_norm.nbytes() + w.output.nbytes();
  if (w.output.data != nullptr && w.output.data == w.tok_embd.data) {
    b.head_shared = w.output.nbytes();  // tied embeddings: one copy serves both on one device
  }
  return b;
}

// ----------------------------------------------------------------------------------- plan -----

namespace {

// Bytes of activations for `tokens` tokens on a device that runs attention (and the router).
int64_t attention_activation_bytes(const ModelConfig& c, int64_t tokens) {
  if (c.is_deepseek2()) {
    // f32: residual, normed input, layer output; compressed query; query heads; latent + roped
    // key; absorbed query heads (latent + rope wide); attention output; the dense or shared
    // FFN's gate and up; router logits; top-k ids and weights. Q8 copies of the matrix inputs.
    const int64_t lat = c.kv_lora_rank + c.rope_dim;
    const int64_t ffn = std::max(c.dense_ffn, c.shared_ffn());
    const int64_t floats = 3 * c.hidden + c.q_lora_rank + c.n_heads * c.head_dim + lat +
                           c.n_heads * lat + c.n_heads * c.v_head_dim + 2 * ffn + c.n_experts +
                           2 * c.n_experts_used;
    const int64_t q8 =
        (2 * c.hidden + c.q_lora_rank + c.n_heads * (c.v_head_dim + c.kv_lora_rank) + ffn) * 34 /
        32;
    return tokens * (4 * floats + q8);
  }
  const int64_t q = c.n_heads * c.head_dim, kv = c.n_kv_heads * c.head_dim;
  // f32: residual, normed input, layer output; q, k, v; attention output; router logits; top-k
  // ids and weights. Q8 copies (34 bytes per 32 values) of the inputs of the q/k/v and o
  // matrices.
  const int64_t floats = 3 * c.hidden + q + 2 * kv + q + c.n_experts + 2 * c.n_experts_used;
  const int64_t q8 = (c.hidden + q) * 34 / 32;
  return tokens * (4 * floats + q8);
}

// Bytes of activations for `tokens` tokens on a device holding experts: per selected expert, gate
// and up outputs and its own down output (kept apart so the weighted sum runs in a fixed order:
// no float atomics), and Q8 copies of the expert inputs.
int64_t expert_activation_bytes(const ModelConfig& c, int64_t tokens) {
  const int64_t k = c.n_experts_used;
  const int64_t floats = k * (2 * c.expert_ffn + c.hidden);
  const int64_t q8 = (c.hidden + k * c.expert_ffn) * 34 / 32;
  return tokens * (4 * floats + q8);
}

}  // namespace

int64_t hybrid_prefill_min_staged(double copy_bytes, double cpu_bytes_per_token, double pcie_gb_s,
                                  double cpu_gb_s) {
  if (!(copy_bytes > 0)) return 1;  // nothing to copy: staging costs nothing
  if (!(cpu_bytes_per_token > 0) || !(pcie_gb_s > 0) || !(cpu_gb_s > 0)) {
    return std::numeric_limits<int32_t>::max();  // decode steps read nothing: never stage
  }
  const double n = (copy_bytes / pcie_gb_s) / (cpu_bytes_per_token / cpu_gb_s);
  if (!(n < 1e9)) return std::numeric_limits<int32_t>::max();
  return std::max<int64_t>(1, static_cast<int64_t>(std::ceil(n - 1e-9)));
}

int64_t prefill_workspace_bytes(const ModelConfig& c, int64_t tokens) {
  auto al = [](int64_t b) { return (b + 255) / 256 * 256; };  // arena slices are 256-aligned
  const int64_t t = tokens, h = c.hidden, e = c.n_experts;
  const int64_t q = c.n_heads * c.head_dim, kv = c.n_kv_heads * c.head_dim;
  const int64_t pairs = t * c.n_experts_used;
  const int64_t tiles = pairs / kPrefillTileRows + e;
  return al(4 * t)                                    // token ids
         + al(4 * t * h) + al(2 * t * h) + al(4 * t * h)  // residual, fp16 and f32 normed input
         + al(4 * t * q) + 2 * al(4 * t * kv)         // q, k, v projections
         + 2 * al(2 * t * q)                          // rotated queries, attention output (fp16)
         + al(4 * t * e) + 2 * al(4 * pairs)          // router logits, top-k ids and weights
         + 2 * al(4 * pairs) + al(16 * tiles) + al(4)  // grouping: tokens, positions, tiles
         + al(2 * pairs * c.expert_ffn)               // SwiGLU output (fp16)
         + al(4 * pairs * h)                          // each pair's expert output (f32)
         + al(8 * 3 * e * c.n_layers);                // per-expert matrix pointers
}

int64_t batch_decode_workspace_bytes(const ModelConfig& c, int64_t sequences, int64_t context) {
  auto al = [](int64_t b) { return (b + 255) / 256 * 256; };  // arena slices are 256-aligned
  const int64_t s = sequences, h = c.hidden, e = c.n_experts, k = c.n_experts_used;
  const int64_t q = c.n_heads * c.head_dim, kv = c.n_kv_heads * c.head_dim;
  const int64_t pairs = s * k;
  const int64_t tiles = pairs / kPrefillTileRows + e;
  const int64_t splits = (context + kAttnDecodeChunk - 1) / kAttnDecodeChunk;
  return al(4 * 2 * s) + al(4 * s * context) + al(4)         // tokens + positions, history, step
         + al(4 * s * h) + al(2 * s * h) + al(4 * s * h)     // residual, fp16 and f32 normed input
         + al(4 * s * q) + 2 * al(4 * s * kv)                // q, k, v projections
         + al(4 * s * q) + al(2 * s * q)                     // attention output (f32, fp16)
         + al(4 * s * e) + 3 * al(4 * pairs)                 // router logits, ids, weights, GPU ids
         + 2 * al(4 * pairs) + al(16 * tiles) + al(4)        // grouping: tokens, positions, tiles
         + al(2 * pairs * c.expert_ffn) + al(4 * pairs * h)  // SwiGLU output, expert outputs
         + al(4 * s * h)                                     // CPU experts' sums
         + al(4 * s * c.vocab)                               // logits
         + al(8 * 3 * e * c.n_layers) + al(4 * e)            // matrix pointers, all-CPU slot map
         + al(4 * s * c.n_heads * splits * (c.head_dim + 2));  // attention workspace
}

MemoryPlan plan_memory(const ModelConfig& cfg, const WeightBytes& bytes, const Placement& p,
                       const Budgets& budgets, const PlanOptions& opt) {
  if (!p.resolved() || p.n_layers() != cfg.n_layers || p.n_experts() != cfg.n_experts ||
      int64_t(bytes.attention.size()) != cfg.n_layers ||
      int64_t(bytes.expert.size()) != cfg.n_layers) {
    throw Error(p.file.empty() ? "placement" : p.file,
                "does not match the model (" + std::to_string(cfg.n_layers) + " layers of " +
                    std::to_string(cfg.n_experts) + " experts)",
                "resolve the placement against this model before planning memory");
  }
  MemoryPlan plan;
  plan.budgets = budgets;
  plan.batch = p.runtime.batch;
  // NUMA: a placement that names nodes counts each cpu:N in its own pool (docs/placement.md).
  const bool per_node = !placement_numa_nodes(p).empty();
  auto pool_of = [per_node](const Device& d) {
    return per_node && d.is_cpu() ? d.to_string() : d.memory_pool();
  };
  if (per_node) {
    std::vector<int64_t> plain;
    for (int64_t l = 0; l < cfg.n_layers; ++l) {
      const LayerPlacement& lp = p.layers[size_t(l)];
      bool any = lp.attention == Device::cpu();
      for (const Device& d : lp.experts) any = any || d == Device::cpu();
      if (any) plain.push_back(l);
    }
    if (!plain.empty()) {
      throw Error(p.file.empty() ? "placement" : p.file,
                  "names NUMA nodes (cpu:N) but also puts layers " + format_id_ranges(plain) +
                      " (attention or experts) on plain cpu, which is every node",
                  "name a node for everything on the CPU (experts an entry does not name go "
                  "to plain cpu: add e.g. `cpu:0: rest`), or use plain cpu throughout");
    }
  }
  auto use = [&](const Device& d) -> DeviceUse& { return plan.per_device[pool_of(d)]; };
  const RuntimeOptions& rt = p.runtime;
  // Values cached per position and layer: K and V of each kv head, or deepseek2's MLA latent
  // plus its roped key (kv_lora_rank + rope_dim; what llama.cpp and the CPU engine cache).
  const int64_t kv_values = cfg.kv_cache_values();
  std::set<Device> gpus;

  for (int64_t l = 0; l < cfg.n_layers; ++l) {
    const LayerPlacement& lp = p.layers[size_t(l)];
    DeviceUse& a = use(lp.attention);
    a.attention = true;
    a.weights += bytes.attention[size_t(l)];
    // Every position of every sequence: f16 on GPUs, f32 on the CPU (the CPU engine's cache);
    // deepseek2's latent cache is f32 on the GPU too (the GPU engine keeps the CPU engine's
    // numbers, engine/cuda/gpu_engine_deepseek.h).
    const int64_t elem = lp.attention.is_gpu() && !cfg.is_deepseek2() ? 2 : 4;
    a.kv_cache += rt.context * rt.batch * kv_values * elem;
    if (lp.attention.is_gpu()) gpus.insert(lp.attention);
    for (const Device& d : lp.experts) {
      DeviceUse& u = use(d);
      u.weights += bytes.expert[size_t(l)];
      u.experts += 1;
      if (d.is_gpu()) gpus.insert(d);
    }
  }
  // The hidden state starts where layer 0's attention runs and the head sits with the last
  // layer's attention: the token lookup and sampling stay on that device (inside the graph).
  const Device first = p.layers.front().attention, last = p.layers.back().attention;
  use(first).weights += bytes.embedding;
  use(last).weights += bytes.head - (pool_of(first) == pool_of(last) ? bytes.head_shared : 0);

  const int64_t tokens = std::max(rt.batch, opt.prefill_chunk);
  for (auto& [name, u] : plan.per_device) {
    const std::optional<Device> dev = Device::try_parse(name);
    const bool gpu = dev && dev->is_gpu();
    int64_t ws = 0;
    int64_t act = 0;
    if (u.attention) act += attention_activation_bytes(cfg, tokens);
    if (u.experts > 0) act += expert_activation_bytes(cfg, tokens);
    // A GPU that runs attention runs the batched prefill of its layers too, every expert of them
    // included (CPU-resident ones from staging): its workspace may exceed the estimate above.
    // deepseek2's GPU prefill runs the decode step token by token: no prefill workspace.
    const bool batched_prefill = gpu && u.attention && !cfg.is_deepseek2();
    if (batched_prefill) act = std::max(act, prefill_workspace_bytes(cfg, opt.prefill_chunk));
    ws += act;
    // Concurrent sequences: the batched decode step's own state, beside the prefill's.
    if (gpu && u.attention && rt.batch > 1) {
      ws += batch_decode_workspace_bytes(cfg, rt.batch, rt.context);
    }
    if (u.attention) ws += 4 * cfg.n_heads * rt.context * rt.batch;  // a row of scores per head
    if (gpu && u.attention && cfg.is_deepseek2()) {
      // The MLA attention's split partial sums (mla_attention_workspace_bytes: up to 64 spans of
      // kv_lora_rank + 2 floats per head).
      const int64_t spans = std::min<int64_t>(64, (rt.context + 255) / 256);
      ws += 4 * spans * cfg.n_heads * (cfg.kv_lora_rank + 2);
    }
    if (name == pool_of(last)) ws += 4 * cfg.vocab * rt.batch;  // logits
    if (gpu) {
      ws += kGpuContextReserve;
      if (gpus.size() > 1) ws += kGpuCommReserve;
      if (batched_prefill && opt.stage_cpu_experts_for_prefill) {
        int64_t largest = 0;
        for (int64_t l = 0; l < cfg.n_layers; ++l) {
          const LayerPlacement& lp = p.layers[size_t(l)];
          if (pool_of(lp.attention) != name) continue;
          const int64_t on_cpu = std::count_if(lp.experts.begin(), lp.experts.end(),
                                               [](const Device& d) { return d.is_cpu(); });
          largest = std::max(largest, on_cpu * bytes.expert[size_t(l)]);
        }
        u.staging = 2 * largest;  // double-buffered: copy layer l+1 while layer l computes
        ws += u.staging;
      }
      if (rt.cuda_graph) u.graph_pool = kGpuGraphPool;
    }
    u.workspace = ws;
    u.total = u.weights + u.kv_cache + u.workspace + u.graph_pool;
    auto b = budgets.bytes.find(name);
    u.budget = b == budgets.bytes.end() ? -1 : b->second;
  }
  return plan;
}

MemoryPlan plan_memory(const ModelConfig& cfg, QuantType expert_type, QuantType dense_type,
                       const Placement& p, const Budgets& budgets, const PlanOptions& opt) {
  return plan_memory(cfg, weight_bytes(cfg, expert_type, dense_type), p, budgets, opt);
}

MemoryPlan plan_memory(const ModelWeights& w, const Placement& p, const Budgets& budgets,
                       const PlanOptions& opt) {
  return plan_memory(w.cfg, weight_bytes(w), p, budgets, opt);
}

// --------------------------------------------------------------------------------- output -----

namespace {

std::string gib(int64_t bytes, int decimals) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, double(bytes) / double(kGiB));
  return buf;
}

}  // namespace

std::string format_gib(int64_t bytes) { return gib(bytes, 1) + " GiB"; }

std::string DeviceUse::breakdown() const {
  std::string s = format_gib(total) + " (weights " + gib(weights, 1) + ", KV cache " +
                  gib(kv_cache, 1) + ", workspace " + gib(workspace, 1);
  if (graph_pool > 0) s += ", graph " + gib(graph_pool, 1);
  s += ")";
  if (budget >= 0) s += " of " + format_gib(budget);
  return s;
}

std::string MemoryPlan::summary() const {
  std::string s;
  for (const auto& [name, u] : per_device) {
    s += name + ": " + u.breakdown() + ", " + std::to_string(u.experts) + " experts" +
         (u.attention ? ", attention" : "") + "\n";
  }
  return s;
}

void check_fits(const MemoryPlan& plan) {
  for (const auto& [name, u] : plan.per_device) {
    const std::optional<Device> dev = Device::try_parse(name);
    const bool gpu = dev && dev->is_gpu();
    if (u.budget < 0 && dev && dev->is_cpu() && dev->index >= 0 &&
        !plan.budgets.numa_nodes.empty()) {
      std::string have;
      for (const auto& [id, total] : plan.budgets.numa_nodes) {
        have += (have.empty() ? "" : ", ") + Device{Device::Cpu, id}.to_string();
      }
      throw Error(name, "no such NUMA node here (this machine has " + have + ")",
                  "put the experts on the nodes this machine has or on plain cpu (all nodes), "
                  "or give " + name + " a budget (--cpu-mem " + name +
                      "=SIZE) to plan for another machine");
    }
    if (u.budget < 0) {
      if (!gpu) continue;  // host memory unknown here: nothing to check against
      std::string have;
      for (const auto& [b, bytes] : plan.budgets.bytes) {
        const std::optional<Device> d = Device::try_parse(b);
        if (d && d->is_gpu()) have += (have.empty() ? "" : ", ") + b;
      }
      if (have.empty()) {
        have = plan.budgets.gpu_note.empty() ? "no GPU" : "no GPU: " + plan.budgets.gpu_note;
      } else {
        have = "GPUs: " + have;
      }
      throw Error(name, "no such device here (" + have + ")",
                  "use the devices this machine has in the placement, or give " + name +
                      " a budget (--gpu-mem " + name + "=SIZE) to plan for another machine");
    }
    if (u.total <= u.budget) continue;
    // One decimal unless need and budget would print the same.
    const int dec = gib(u.total, 1) == gib(u.budget, 1) ? 3 : 1;
    std::string parts = "weights " + gib(u.weights, dec) + ", KV cache " + gib(u.kv_cache, dec) +
                        ", workspace " + gib(u.workspace, dec);
    if (gpu) parts += ", graph " + gib(u.graph_pool, dec);
    throw Error(name,
                "the plan needs " + gib(u.total, dec) + " GiB (" + parts + ") but the budget is " +
                    gib(u.budget, dec) + " GiB",
                "put fewer experts on " + name + ", lower runtime.context" +
                    (plan.batch > 1 ? " or the batch (runtime.batch " + std::to_string(plan.batch) +
                                          ", --batch)"
                                    : std::string()) +
                    ", or raise " + (gpu ? "--gpu-mem" : "--cpu-mem"));
  }
}

// -------------------------------------------------------------------------------- budgets -----

Budgets default_budgets() {
  Budgets b;
  const GpuInfo info = query_gpus();
  for (const GpuDevice& g : info.devices) {
    b.bytes[Device::cuda(g.index).to_string()] =
        std::max<int64_t>(0, g.total_bytes - kGpuBudgetHeadroom);
  }
  if (info.devices.empty()) b.gpu_note = info.unavailable_reason;
  const int64_t host = host_available_bytes();
  if (host > 0) b.bytes["cpu"] = std::max<int64_t>(0, host - kHostBudgetHeadroom);
  std::vector<std::pair<int, int64_t>> nodes;
  for (const NumaNode& n : host_numa_topology().nodes) nodes.emplace_back(n.id, n.mem_total_bytes);
  add_numa_budgets(b, nodes);
  return b;
}

namespace {

// cpu:N = `host` split over the nodes by MemTotal (equal shares when one is unknown).
void split_host_budget(Budgets& b, int64_t host) {
  const size_t n = b.numa_nodes.size();
  if (n == 0) return;
  double sum = 0;
  bool known = true;
  for (const auto& [id, total] : b.numa_nodes) {
    known = known && total > 0;
    sum += double(total);
  }
  int64_t given = 0;
  for (size_t i = 0; i < n; ++i) {
    const int id = b.numa_nodes[i].first;
    int64_t share = host - given;  // the last node takes the rounding remainder
    if (i + 1 < n) {
      const double f = known ? double(b.numa_nodes[i].second) / sum : 1.0 / double(n);
      share = static_cast<int64_t>(double(host) * f);
    }
    given += share;
    b.bytes[Device{Device::Cpu, id}.to_string()] = share;
  }
}

}  // namespace

void add_numa_budgets(Budgets& b, const std::vector<std::pair<int, int64_t>>& nodes) {
  b.numa_nodes = nodes;
  const auto host = b.bytes.find("cpu");
  if (host != b.bytes.end()) split_host_budget(b, host->second);
}

int64_t parse_byte_size(const std::string& text, const std::string& where) {
  const std::string fix = "write a size with a unit, e.g. 70GiB, 20000MiB or 1.5TB";
  size_t i = 0;
  while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
  if (i < text.size() && text[i] == '-') {
    throw_usage(where, "`" + text + "` is negative", fix);
  }
  const size_t num_begin = i;
  bool dot = false, digit = false;
  while (i < text.size() &&
         (std::isdigit(static_cast<unsigned char>(text[i])) || (text[i] == '.' && !dot))) {
    dot = dot || text[i] == '.';
    digit = digit || text[i] != '.';
    ++i;
  }
  if (!digit) throw_usage(where, "`" + text + "` is not a size", fix);
  const double value = std::strtod(text.substr(num_begin, i - num_begin).c_str(), nullptr);
  while (i < text.size() && text[i] == ' ') ++i;
  std::string unit;
  for (; i < text.size(); ++i) {
    if (std::isspace(static_cast<unsigned char>(text[i]))) break;
    unit += static_cast<char>(std::tolower(static_cast<unsigned char>(text[i])));
  }
  while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
  if (i != text.size()) throw_usage(where, "`" + text + "` is not a size", fix);
  static const std::pair<const char*, double> units[] = {
      {"b", 1.0},    {"k", 0x1p10},   {"kib", 0x1p10}, {"m", 0x1p20},   {"mib", 0x1p20},
      {"g", 0x1p30}, {"gib", 0x1p30}, {"t", 0x1p40},   {"tib", 0x1p40}, {"kb", 1e3},
      {"mb", 1e6},   {"gb", 1e9},     {"tb", 1e12}};
  if (unit.empty()) throw_usage(where, "`" + text + "` has no unit", fix);
  double mult = 0;
  for (const auto& [u, m] : units) {
    if (unit == u) mult = m;
  }
  if (mult == 0) throw_usage(where, "`" + unit + "` in `" + text + "` is not a unit", fix);
  const double bytes = value * mult;
  if (!(bytes <= 0x1p50)) {
    throw_usage(where, "`" + text + "` is more than 1 PiB", "give the memory of one device");
  }
  return static_cast<int64_t>(std::llround(bytes));
}

std::vector<std::pair<std::string, int64_t>> parse_budget_overrides(const std::string& text,
                                                                    const std::string& flag) {
  std::vector<std::pair<std::string, int64_t>> out;
  size_t pos = 0;
  if (text.find_first_not_of(" \t") == std::string::npos) {
    throw_usage(flag, "is empty", "e.g. " + flag + " cuda:0=70GiB,cuda:1=20GiB");
  }
  while (pos <= text.size()) {
    size_t comma = text.find(',', pos);
    if (comma == std::string::npos) comma = text.size();
    std::string item = text.substr(pos, comma - pos);
    const size_t b = item.find_first_not_of(" \t"), e = item.find_last_not_of(" \t");
    item = b == std::string::npos ? "" : item.substr(b, e - b + 1);
    if (item.empty())
      throw_usage(flag, "`" + text + "` has an empty item", "remove the extra comma");
    const size_t eq = item.find('=');
    if (eq == std::string::npos) {
      out.emplace_back("", parse_byte_size(item, flag));
    } else {
      std::string dev = item.substr(0, eq);
      while (!dev.empty() && dev.back() == ' ') dev.pop_back();
      const Device d = Device::parse(dev, flag);
      out.emplace_back(d.to_string(), parse_byte_size(item.substr(eq + 1), flag + " " + dev));
    }
    pos = comma + 1;
  }
  return out;
}

void apply_budget_overrides(Budgets& b, const std::string& text, const std::string& flag,
                            Device::Kind bare_kind) {
  const auto items = parse_budget_overrides(text, flag);
  // Whole-host items first (they re-split the node budgets), then per-node ones.
  for (const auto& [dev, bytes] : items) {
    if (dev == "cpu" || (dev.empty() && bare_kind == Device::Cpu)) {
      b.bytes["cpu"] = bytes;
      split_host_budget(b, bytes);
    }
  }
  for (const auto& [dev, bytes] : items) {
    if (dev == "cpu" || (dev.empty() && bare_kind == Device::Cpu)) {
      continue;
    } else if (!dev.empty()) {
      b.bytes[dev] = bytes;
    } else {
      bool any = false;
      for (auto& [name, v] : b.bytes) {
        const std::optional<Device> d = Device::try_parse(name);
        if (d && d->is_gpu()) {
          v = bytes;
          any = true;
        }
      }
      if (!any) {
        throw_usage(flag, "there is no GPU here to give " + format_gib(bytes) + " to",
                    "name the device, e.g. " + flag + " cuda:0=" + text);
      }
    }
  }
}

}  // namespace ktune
