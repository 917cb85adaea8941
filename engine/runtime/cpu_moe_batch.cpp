// CpuMoeBatch (cpu_moe_batch.h): the CPU experts of several tokens, grouped by expert.
#include "runtime/cpu_moe_batch.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "ktune/engine/error.h"
#include "ktune/engine/thread_pool.h"
#include "runtime/act_buffers.h"
#include "runtime/cpu_ops.h"

namespace ktune {
namespace {

constexpr int64_t kRowAlign = 16;  // down rows per thread start on whole 4-row tiles
constexpr int64_t kUnitRows = 64;  // ffn rows per gate/up work item (CpuMoe's default)

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

}  // namespace

struct CpuMoeBatch::Impl {
  const ModelWeights& w;
  ThreadPool& pool;
  cpu::Isa isa;
  int64_t hidden, ffn, n_exp, layers, max_tok, max_k, max_pairs;
  int64_t unit = kUnitRows, units_per_expert = 1;
  bool gu_f32 = false;  // some layer's gate or up multiplies float activations: gather floats

  rt::ActBuffers gu_act;        // [pair] h of the pair's token in the gate/up activation forms
  rt::ActBuffers down_act;      // [pair] SwiGLU output in the down activation forms
  rt::Buf<float> h_pairs;       // [pair][hidden] floats (only when gu_f32)
  rt::Buf<float> g, u, yd;      // [pair][ffn], [pair][ffn], [pair][hidden]
  std::vector<int32_t> begin;   // [n_exp + 1] first pair of each expert
  std::vector<int32_t> active;  // experts with pairs, ascending
  std::vector<int32_t> cursor;
  std::vector<int32_t> pair_token;  // [pair] token
  std::vector<int32_t> slot;        // [t * max_k + j] pair of token t's j-th listed expert
  std::atomic<int64_t> next_item{0};
  int64_t n_active = 0;

  // The call being run.
  const TensorView* G = nullptr;
  const TensorView* U = nullptr;
  const TensorView* D = nullptr;
  const float* h = nullptr;
  const float* wts = nullptr;
  const int32_t* counts = nullptr;
  int64_t ld = 0, T = 0, P = 0;
  float* y = nullptr;

  Impl(const ModelWeights& weights, ThreadPool& p, int64_t tokens, int64_t per_token, cpu::Isa i)
      : w(weights), pool(p), isa(i) {
    const ModelConfig& c = w.cfg;
    hidden = c.hidden;
    ffn = c.expert_ffn;
    n_exp = c.n_experts;
    layers = c.n_layers;
    if (tokens < 1 || per_token < 1 || per_token > n_exp || tokens > (int64_t{1} << 20)) {
      throw Error("cpu moe batch",
                  std::to_string(tokens) + " tokens of " + std::to_string(per_token) +
                      " experts (the model has " + std::to_string(n_exp) + " per layer)",
                  "size it for 1.. tokens of 1..n_experts experts each", ErrorKind::Usage);
    }
    if (static_cast<int64_t>(w.layers.size()) != layers) {
      throw Error("model " + w.source, "has no usable MoE layers for the CPU experts",
                  "use a qwen3moe model");
    }
    max_tok = tokens;
    max_k = per_token;
    max_pairs = tokens * per_token;
    std::vector<QuantType> gu_types, d_types;
    int64_t da_block = 1;
    bool down_f32 = true;
    for (int64_t l = 0; l < layers; ++l) {
      const LayerWeights& L = w.layers[static_cast<size_t>(l)];
      const std::string blk = "blk." + std::to_string(l) + ".";
      for (const auto& [t, rl, rows, name] :
           {std::tuple{&L.gate_exps, hidden, ffn * n_exp, "ffn_gate_exps"},
            std::tuple{&L.up_exps, hidden, ffn * n_exp, "ffn_up_exps"},
            std::tuple{&L.down_exps, ffn, hidden * n_exp, "ffn_down_exps"}}) {
        if (t->data == nullptr || t->row_len() != rl || t->n_rows() != rows) {
          throw Error(t->name.empty() ? blk + name : t->name, "missing or misshaped",
                      "use a qwen3moe model whose expert tensors match its configuration");
        }
        cpu::vec_dot(t->type, isa);  // throws for a type the CPU kernels cannot multiply
      }
      gu_types.push_back(L.gate_exps.type);
      gu_types.push_back(L.up_exps.type);
      d_types.push_back(L.down_exps.type);
      for (const TensorView* t : {&L.gate_exps, &L.up_exps}) {
        gu_f32 = gu_f32 || cpu::activation_type(t->type) == QuantType::F32;
      }
      const QuantType da = cpu::activation_type(L.down_exps.type);
      if (da != QuantType::F32) {
        down_f32 = false;
        da_block = std::max(da_block, block_elems(da));
      }
    }
    // A gate/up item quantizes whole blocks of the down activation (32 for Q8_0, 256 for Q8_K).
    unit = round_up(kUnitRows, down_f32 ? 1 : std::max<int64_t>(32, da_block));
    units_per_expert = (ffn + unit - 1) / unit;
    gu_act.init(gu_types, hidden, max_pairs);
    down_act.init(d_types, ffn, max_pairs);
    if (gu_f32) h_pairs.resize(max_pairs * hidden);
    g.resize(max_pairs * ffn);
    u.resize(max_pairs * ffn);
    yd.resize(max_pairs * hidden);
    begin.assign(static_cast<size_t>(n_exp + 1), 0);
    cursor.assign(static_cast<size_t>(n_exp), 0);
    active.assign(static_cast<size_t>(n_exp), 0);
    pair_token.assign(static_cast<size_t>(max_pairs), 0);
    slot.assign(static_cast<size_t>(max_pairs), 0);
  }

  // Pairs grouped by expert (ascending id), tokens in ascending order within an expert.
  void group(const int32_t* experts) {
    std::fill(begin.begin(), begin.end(), 0);
    for (int64_t t = 0; t < T; ++t) {
      for (int32_t j = 0; j < counts[t]; ++j) ++begin[static_cast<size_t>(experts[t * ld + j]) + 1];
    }
    n_active = 0;
    for (int64_t e = 0; e < n_exp; ++e) {
      if (begin[static_cast<size_t>(e) + 1] > 0)
        active[static_cast<size_t>(n_active++)] = int32_t(e);
      begin[static_cast<size_t>(e) + 1] += begin[static_cast<size_t>(e)];
    }
    P = begin[static_cast<size_t>(n_exp)];
    std::copy(begin.begin(), begin.end() - 1, cursor.begin());
    for (int64_t t = 0; t < T; ++t) {
      for (int32_t j = 0; j < counts[t]; ++j) {
        const int32_t s = cursor[static_cast<size_t>(experts[t * ld + j])]++;
        slot[static_cast<size_t>(t * max_k + j)] = s;
        pair_token[static_cast<size_t>(s)] = static_cast<int32_t>(t);
      }
    }
  }

  void matmul(const TensorView& t, const uint8_t* W, int64_t r0, int64_t r1, const uint8_t* act,
              int64_t act_stride, int64_t n, float* Y, int64_t ldy) const {
    if (r1 > r0 && n > 0) {
      cpu::matmul_rows(t.type, isa, W, t.row_len(), r0, r1, act, act_stride, n, Y, ldy);
    }
  }

  void region(int ith, int nth) {
    // 1. each pair's input in the gate/up activation forms (and as floats where needed)
    int64_t p0, p1;
    cpu_ops::split(P, ith, nth, 1, &p0, &p1);
    for (int64_t p = p0; p < p1; ++p) {
      const float* ht = h + static_cast<int64_t>(pair_token[static_cast<size_t>(p)]) * hidden;
      gu_act.quantize_row(ht, p, isa);
      if (gu_f32) std::memcpy(h_pairs.data() + p * hidden, ht, static_cast<size_t>(hidden) * 4);
    }
    pool.barrier();

    // 2. gate + up + SwiGLU over (active expert, unit of ffn rows) items, and the down
    //    activation's blocks of those rows
    const uint8_t* gbase = gu_act.rows(G->type, h_pairs.data());
    const uint8_t* ubase = gu_act.rows(U->type, h_pairs.data());
    const int64_t gstride = gu_act.stride(G->type);
    const int64_t ustride = gu_act.stride(U->type);
    const int64_t items = n_active * units_per_expert;
    for (int64_t it = next_item.fetch_add(1, std::memory_order_relaxed); it < items;
         it = next_item.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t e = active[static_cast<size_t>(it / units_per_expert)];
      const int64_t a = (it % units_per_expert) * unit;
      const int64_t b = std::min(ffn, a + unit);
      const int64_t sb = begin[static_cast<size_t>(e)];
      const int64_t ne = begin[static_cast<size_t>(e) + 1] - sb;
      float* Gp = g.data() + sb * ffn;
      float* Up = u.data() + sb * ffn;
      matmul(*G, G->matrix(e), a, b, gbase + sb * gstride, gstride, ne, Gp, ffn);
      matmul(*U, U->matrix(e), a, b, ubase + sb * ustride, ustride, ne, Up, ffn);
      for (int64_t s = 0; s < ne; ++s) {
        float* gs = Gp + s * ffn;
        const float* us = Up + s * ffn;
        for (int64_t i = a; i < b; ++i) gs[i] = cpu_ops::silu(gs[i]) * us[i];
        down_act.quantize(gs + a, sb + s, a, b, isa);
      }
    }
    pool.barrier();

    // 3. down rows [r0, r1) of every active expert, then each token's sum of those rows in its
    //    list's order (CpuMoe's sum: s = 0; s += w_j * y_j[r])
    int64_t r0, r1;
    cpu_ops::split(hidden, ith, nth, kRowAlign, &r0, &r1);
    if (r1 <= r0) return;
    const int64_t dstride = down_act.stride(D->type);
    const uint8_t* dbase = down_act.rows(D->type, g.data());
    for (int64_t i = 0; i < n_active; ++i) {
      const int64_t e = active[static_cast<size_t>(i)];
      const int64_t sb = begin[static_cast<size_t>(e)];
      matmul(*D, D->matrix(e), r0, r1, dbase + sb * dstride, dstride,
             begin[static_cast<size_t>(e) + 1] - sb, yd.data() + sb * hidden, hidden);
    }
    for (int64_t t = 0; t < T; ++t) {
      const float* wt = wts + t * ld;
      const int32_t* sl = slot.data() + t * max_k;
      float* yt = y + t * hidden;
      for (int64_t r = r0; r < r1; ++r) {
        float s = 0.0f;
        for (int32_t j = 0; j < counts[t]; ++j) s += wt[j] * yd.data()[sl[j] * hidden + r];
        yt[r] = s;
      }
    }
  }
};

CpuMoeBatch::CpuMoeBatch(const ModelWeights& weights, ThreadPool& pool, int64_t max_tokens,
                         int64_t max_per_token, cpu::Isa isa)
    : impl_(std::make_unique<Impl>(weights, pool, max_tokens, max_per_token, isa)) {}
CpuMoeBatch::~CpuMoeBatch() = default;

int64_t CpuMoeBatch::max_tokens() const { return impl_->max_tok; }
int64_t CpuMoeBatch::last_active_experts() const { return impl_->n_active; }

void CpuMoeBatch::compute(int64_t layer, int64_t tokens, const float* h, const int32_t* experts,
                          const float* weights, const int32_t* counts, int64_t ld, float* y) {
  Impl& m = *impl_;
  if (layer < 0 || layer >= m.layers) {
    throw Error("cpu moe batch",
                "layer " + std::to_string(layer) + " outside [0, " + std::to_string(m.layers) + ")",
                "pass a layer of the model");
  }
  if (tokens < 0 || tokens > m.max_tok || ld < m.max_k) {
    throw Error("cpu moe batch",
                std::to_string(tokens) + " tokens with lists " + std::to_string(ld) +
                    " apart (sized for " + std::to_string(m.max_tok) + " tokens of " +
                    std::to_string(m.max_k) + ")",
                "pass at most max_tokens tokens, lists at least max_per_token apart");
  }
  for (int64_t t = 0; t < tokens; ++t) {
    if (counts[t] < 0 || counts[t] > m.max_k) {
      throw Error("cpu moe batch",
                  "token " + std::to_string(t) + " lists " + std::to_string(counts[t]) +
                      " experts (at most " + std::to_string(m.max_k) + ")",
                  "pass a subset of the token's selected experts");
    }
    for (int32_t j = 0; j < counts[t]; ++j) {
      const int32_t e = experts[t * ld + j];
      if (e < 0 || e >= m.n_exp) {
        throw Error(
            "cpu moe batch",
            "expert id " + std::to_string(e) + " outside [0, " + std::to_string(m.n_exp) + ")",
            "pass expert ids of the model");
      }
    }
  }
  const LayerWeights& L = m.w.layers[static_cast<size_t>(layer)];
  m.G = &L.gate_exps;
  m.U = &L.up_exps;
  m.D = &L.down_exps;
  m.h = h;
  m.wts = weights;
  m.counts = counts;
  m.ld = ld;
  m.T = tokens;
  m.y = y;
  m.group(experts);
  // Every token's rows are written by the down phase (a token without experts sums an empty
  // list: zeros); with no pair at all there is nothing to run.
  if (m.P == 0) {
    std::memset(y, 0, static_cast<size_t>(tokens * m.hidden) * sizeof(float));
    return;
  }
  m.next_item.store(0, std::memory_order_relaxed);
  // run() publishes everything written here (its hand-off is sequentially consistent).
  m.pool.run([&m](int ith, int nth) { m.region(ith, nth); });
}

}  // namespace ktune
