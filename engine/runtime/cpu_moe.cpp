// CpuMoe: the CPU experts of one token and layer in one parallel region (see cpu_moe.h).
#include "ktune/engine/cpu_moe.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "ktune/engine/error.h"
#include "ktune/engine/thread_pool.h"
#include "runtime/cpu_ops.h"

namespace ktune {
namespace {

constexpr int64_t kUnitRows = 32;               // gate/up rows per work item (whole Q8_0 blocks)
constexpr int64_t kDownChunkBytes = 16 * 1024;  // down: bytes per work item, over all experts

void check_expert_tensor(const TensorView& t, int64_t row_len, int64_t rows,
                         const std::string& what, cpu::Isa isa) {
  if (t.data == nullptr || t.row_len() != row_len || t.n_rows() != rows) {
    throw Error(t.name.empty() ? what : t.name,
                "missing or shaped [" + std::to_string(t.ne[0]) + ", " + std::to_string(t.ne[1]) +
                    ", " + std::to_string(t.ne[2]) + "], expected " + std::to_string(row_len) +
                    " x " + std::to_string(rows),
                "use a qwen3moe model whose expert tensors match its configuration");
  }
  cpu::vec_dot(t.type, isa);  // throws for a type the CPU kernels cannot multiply
}

// Bytes of the activation row that weights of type w multiply with (0 for F32: the floats).
int64_t act_row_bytes(QuantType w, int64_t n) {
  const QuantType a = cpu::activation_type(w);
  return a == QuantType::F32 ? 0 : row_bytes(a, n);
}

struct alignas(64) Counter {
  std::atomic<int64_t> next{0};
};

template <class T>
struct AlignedFree {
  void operator()(T* p) const { ::operator delete[](p, std::align_val_t(64)); }
};
template <class T>
std::unique_ptr<T, AlignedFree<T>> aligned_alloc_n(int64_t n) {
  const size_t bytes = static_cast<size_t>((std::max<int64_t>(n, 1) * sizeof(T) + 63) / 64 * 64);
  return std::unique_ptr<T, AlignedFree<T>>(
      static_cast<T*>(::operator new[](bytes, std::align_val_t(64))));
}

}  // namespace

struct CpuMoe::Impl {
  const ModelWeights& w;
  ThreadPool& pool;
  cpu::Isa isa;
  int64_t hidden, ffn, n_exp, k_max, layers;
  int64_t units_per_expert;

  // Scratch: activations of h for gate and up, per-expert g/u (ffn floats each), the down
  // activation per expert, per-expert down outputs (hidden floats each).
  std::unique_ptr<uint8_t, AlignedFree<uint8_t>> gate_act, up_act, down_act;
  int64_t down_act_stride = 0;  // bytes per expert row of down_act (0: F32, the floats of g)
  std::unique_ptr<float, AlignedFree<float>> g, u, yd;
  Counter gu_next, down_next;

  // The call being run (set by compute before pool.run).
  const TensorView* G = nullptr;
  const TensorView* U = nullptr;
  const TensorView* D = nullptr;
  const int32_t* sel = nullptr;
  const float* wsel = nullptr;
  int64_t n = 0;
  const uint8_t* ga = nullptr;
  const uint8_t* ua = nullptr;
  int64_t down_rows = 4;  // rows per down work item
  float* y = nullptr;

  Impl(const ModelWeights& weights, ThreadPool& p, cpu::Isa i) : w(weights), pool(p), isa(i) {
    const ModelConfig& c = w.cfg;
    hidden = c.hidden;
    ffn = c.expert_ffn;
    n_exp = c.n_experts;
    k_max = n_exp;  // a subset of the top-k in practice; any list of experts is computed
    layers = c.n_layers;
    if (static_cast<int64_t>(w.layers.size()) != layers || c.n_experts_used < 1 ||
        c.n_experts_used > n_exp) {
      throw Error("model " + w.source, "has no usable MoE layers for the CPU experts",
                  "use a qwen3moe model with n_experts_used in 1..n_experts");
    }
    int64_t ga_bytes = 0, ua_bytes = 0, da_bytes = 0;
    for (int64_t l = 0; l < layers; ++l) {
      const LayerWeights& L = w.layers[l];
      const std::string blk = "blk." + std::to_string(l) + ".";
      check_expert_tensor(L.gate_exps, hidden, ffn * n_exp, blk + "ffn_gate_exps", isa);
      check_expert_tensor(L.up_exps, hidden, ffn * n_exp, blk + "ffn_up_exps", isa);
      check_expert_tensor(L.down_exps, ffn, hidden * n_exp, blk + "ffn_down_exps", isa);
      ga_bytes = std::max(ga_bytes, act_row_bytes(L.gate_exps.type, hidden));
      ua_bytes = std::max(ua_bytes, act_row_bytes(L.up_exps.type, hidden));
      da_bytes = std::max(da_bytes, act_row_bytes(L.down_exps.type, ffn));
    }
    units_per_expert = (ffn + kUnitRows - 1) / kUnitRows;
    gate_act = aligned_alloc_n<uint8_t>(ga_bytes);
    up_act = aligned_alloc_n<uint8_t>(ua_bytes);
    down_act_stride = (da_bytes + 63) / 64 * 64;  // each expert's row on its own lines
    down_act = aligned_alloc_n<uint8_t>(down_act_stride * k_max);
    g = aligned_alloc_n<float>(k_max * ffn);
    u = aligned_alloc_n<float>(k_max * ffn);
    yd = aligned_alloc_n<float>(k_max * hidden);
  }

  const uint8_t* quantize_input(QuantType wt, const float* h, uint8_t* buf) const {
    if (cpu::activation_type(wt) == QuantType::F32) return reinterpret_cast<const uint8_t*>(h);
    cpu::quantize_activation(wt, h, buf, hidden, isa);
    return buf;
  }

  // Gate + up + SwiGLU of work item v (expert v / units_per_expert, one unit of rows), and the
  // down activation's blocks of that unit.
  void gate_up_item(int64_t v) {
    const int64_t j = v / units_per_expert;
    const int64_t a = (v - j * units_per_expert) * kUnitRows;
    const int64_t b = std::min(ffn, a + kUnitRows);
    float* gj = g.get() + j * ffn;
    float* uj = u.get() + j * ffn;
    cpu::matvec_rows(G->type, isa, G->matrix(sel[j]), hidden, a, b, ga, gj + a);
    cpu::matvec_rows(U->type, isa, U->matrix(sel[j]), hidden, a, b, ua, uj + a);
    for (int64_t i = a; i < b; ++i) gj[i] = cpu_ops::silu(gj[i]) * uj[i];
    if (cpu::activation_type(D->type) != QuantType::F32) {
      const QuantType da = cpu::activation_type(D->type);
      uint8_t* dst = down_act.get() + j * down_act_stride + row_bytes(da, a);
      cpu::quantize_activation(D->type, gj + a, dst, b - a, isa);
    }
  }

  // Down rows [r0, r1) of every expert, then y[r] = sum_j wsel[j] * y_j[r] in the given order.
  void down_item(int64_t r0, int64_t r1) {
    const bool f32 = cpu::activation_type(D->type) == QuantType::F32;
    for (int64_t j = 0; j < n; ++j) {
      const uint8_t* act = f32 ? reinterpret_cast<const uint8_t*>(g.get() + j * ffn)
                               : down_act.get() + j * down_act_stride;
      cpu::matvec_rows(D->type, isa, D->matrix(sel[j]), ffn, r0, r1, act,
                       yd.get() + j * hidden + r0);
    }
    for (int64_t r = r0; r < r1; ++r) {
      float s = 0.0f;
      for (int64_t j = 0; j < n; ++j) s += wsel[j] * yd.get()[j * hidden + r];
      y[r] = s;
    }
  }

  void region(int ith, int nth) {
    // gate+up: item ith first, then whatever is left, one item per ticket.
    const int64_t items = n * units_per_expert;
    for (int64_t v = ith; v < items;) {
      gate_up_item(v);
      v = nth + gu_next.next.fetch_add(1, std::memory_order_relaxed);
    }
    pool.barrier();
    const int64_t chunks = (hidden + down_rows - 1) / down_rows;
    for (int64_t c = ith; c < chunks;) {
      down_item(c * down_rows, std::min(hidden, (c + 1) * down_rows));
      c = nth + down_next.next.fetch_add(1, std::memory_order_relaxed);
    }
  }
};

CpuMoe::CpuMoe(const ModelWeights& weights, ThreadPool& pool, cpu::Isa isa)
    : impl_(std::make_unique<Impl>(weights, pool, isa)) {}
CpuMoe::~CpuMoe() = default;

int CpuMoe::max_experts() const { return static_cast<int>(impl_->k_max); }
cpu::Isa CpuMoe::isa() const { return impl_->isa; }

void CpuMoe::compute(int64_t layer, const float* h, const int32_t* experts, const float* weights,
                     int n, float* y) {
  Impl& m = *impl_;
  if (layer < 0 || layer >= m.layers) {
    throw Error("cpu moe",
                "layer " + std::to_string(layer) + " outside [0, " + std::to_string(m.layers) + ")",
                "pass a layer of the model");
  }
  if (n < 0 || n > m.k_max) {
    throw Error("cpu moe",
                std::to_string(n) + " experts for one token (at most " + std::to_string(m.k_max) +
                    ", the model's experts per layer)",
                "pass a subset of the token's selected experts");
  }
  for (int j = 0; j < n; ++j) {
    if (experts[j] < 0 || experts[j] >= m.n_exp) {
      throw Error("cpu moe",
                  "expert id " + std::to_string(experts[j]) + " outside [0, " +
                      std::to_string(m.n_exp) + ")",
                  "pass expert ids of the model");
    }
  }
  if (n == 0) {
    std::memset(y, 0, static_cast<size_t>(m.hidden) * sizeof(float));
    return;
  }
  const LayerWeights& L = m.w.layers[layer];
  m.G = &L.gate_exps;
  m.U = &L.up_exps;
  m.D = &L.down_exps;
  m.sel = experts;
  m.wsel = weights;
  m.n = n;
  m.y = y;
  m.ga = m.quantize_input(L.gate_exps.type, h, m.gate_act.get());
  m.ua = cpu::activation_type(L.up_exps.type) == cpu::activation_type(L.gate_exps.type) &&
                 cpu::activation_type(L.up_exps.type) != QuantType::F32
             ? m.ga
             : m.quantize_input(L.up_exps.type, h, m.up_act.get());
  // Down work items of about kDownChunkBytes over all n experts, whole 4-row tiles.
  const int64_t per_row = std::max<int64_t>(1, n * L.down_exps.row_stride());
  m.down_rows = std::max<int64_t>(4, (kDownChunkBytes / per_row) / 4 * 4);
  // run() publishes these (its hand-off is sequentially consistent).
  m.gu_next.next.store(0, std::memory_order_relaxed);
  m.down_next.next.store(0, std::memory_order_relaxed);
  m.pool.run([&m](int ith, int nth) { m.region(ith, nth); });
}

}  // namespace ktune
