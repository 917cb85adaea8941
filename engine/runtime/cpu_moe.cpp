// CpuMoe: the CPU experts of one token and layer in one parallel region (see cpu_moe.h).
//
// Why no barrier: a token's experts are ~21 MB of weights (qwen3-30b-a3b, Q4_0, 8 experts), about
// 200 µs of DRAM time on 16 cores, and the call repeats 48 times per token. A barrier between the
// gate/up and down phases idles every thread until the slowest finishes its last gate/up item
// (tens of KB), and the memory pipeline drains and refills around it. Down rows of expert j only
// need expert j's gate/up output, so each thread's list runs gate/up items in expert order first
// and down items in expert order after: by the time a thread reaches expert j's down rows, that
// expert's gate/up items (spread over all threads' first items) finished long ago.
//
// Who does what: thread t's own list is gate/up items t, t + nth, t + 2 nth, ... (expert-major,
// so expert 0's units are everyone's first items), then for each expert in order its own block
// of output rows (row chunks [C t / nth, C (t + 1) / nth) of C chunks), a few chunks per expert.
// Each list has its own claim counter on its own cache line, so claiming costs no contended
// atomic until the end, when threads that ran out take items from the others' lists (in list
// order, so a stolen down item's gate/up inputs are done or in progress). The counters carry the
// call's epoch in their high half, so they need no reset: the first claim of a call (by the
// owner or a thief) opens a list. A thread that starts late (a futex wake-up in a VM can take
// a millisecond, a vCPU can be descheduled) therefore holds up nobody: its list is taken by
// the others, and a thread waiting for an expert's gate/up items does unclaimed ones meanwhile.
// What stays exposed is an item a descheduled thread has claimed and not finished.
#include "ktune/engine/cpu_moe.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "ktune/engine/error.h"
#include "ktune/engine/thread_pool.h"
#include "runtime/cpu_ops.h"

namespace ktune {
namespace {

constexpr int64_t kCacheLine = 64;
constexpr int64_t kBarrierDownChunkBytes = 16 * 1024;  // barrier schedule: down bytes per item
constexpr uint64_t kPosMask = 0xFFFFFFFFull;           // claim counter: low half = position
constexpr int64_t kSpinUs = 1000;                      // the pool spin CpuMoe asks for (µs)

void check_expert_tensor(const TensorView& t, int64_t row_len, int64_t rows,
                         const std::string& what, cpu::Isa isa) {
  if (t.data == nullptr || t.row_len() != row_len || t.n_rows() != rows) {
    throw Error(t.name.empty() ? what : t.name,
                "missing or shaped [" + std::to_string(t.ne[0]) + ", " + std::to_string(t.ne[1]) +
                    ", " + std::to_string(t.ne[2]) + "], expected " + std::to_string(row_len) +
                    " x " + std::to_string(rows),
                "use a MoE model whose expert tensors match its configuration");
  }
  cpu::vec_dot(t.type, isa);  // throws for a type the CPU kernels cannot multiply
}

// Bytes of the activation row that weights of type w multiply with (0 for F32: the floats).
int64_t act_row_bytes(QuantType w, int64_t n) {
  const QuantType a = cpu::activation_type(w);
  return a == QuantType::F32 ? 0 : row_bytes(a, n);
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// An integer knob from the environment, clamped to [lo, hi]; `fallback` when unset or empty.
int64_t env_knob(const char* name, int64_t fallback, int64_t lo, int64_t hi) {
  const char* v = std::getenv(name);
  if (v == nullptr || v[0] == '\0') return fallback;
  return std::clamp<int64_t>(std::atoll(v), lo, hi);
}

inline void cpu_pause() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Software prefetch of the first `bytes` at p into L2 (the item's own reads bring them to L1).
inline void prefetch_l2(const uint8_t* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += kCacheLine) __builtin_prefetch(p + off, 0, 2);
}

struct alignas(64) Counter {
  std::atomic<int64_t> next{0};
};
struct alignas(64) Progress {
  std::atomic<uint64_t> v{0};
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
  int nth = 1;

  // ---- knobs (cpu_moe.h) ----
  bool flow = true;   // false: the barrier schedule
  int64_t unit = 32;  // ffn rows per gate/up item (whole blocks of the down activation)
  int64_t units_per_expert = 1;
  int64_t down_rows = 32;      // output rows per down item (flow), a multiple of the 4-row tile
  int64_t n_chunks = 1;        // down row chunks: ceil(hidden / down_rows)
  int64_t prefetch_bytes = 0;  // software prefetch of the next item, per item
  int64_t start_bytes = 4096;  // software prefetch of the first item before quantizing h
  bool interleave = false;     // gate/up rows in alternating 4-row tiles (one stream per matrix)

  // ---- scratch ----
  // Per thread: h quantized for gate (offset 0) and up (offset ua_off), act_stride bytes apart.
  std::unique_ptr<uint8_t, AlignedFree<uint8_t>> act;
  int64_t act_stride = 0, ua_off = 0;
  // Shared: the down activation per expert, per-expert g/u (ffn floats each) and per-expert down
  // outputs (hidden floats each).
  std::unique_ptr<uint8_t, AlignedFree<uint8_t>> down_act;
  int64_t down_act_stride = 0;  // bytes per expert row of down_act (0: F32, the floats of g)
  std::unique_ptr<float, AlignedFree<float>> g, u, yd;

  // ---- flow schedule state ----
  // own[t]: claim counter of thread t's list, (epoch << 32) | next position. gu_done[j] and
  // d_done[c] count finished gate/up items of expert slot j and down items of row chunk c over
  // all calls; gu_target / d_target are their values once this call's items are done (written
  // by the caller before run(), which publishes them).
  std::unique_ptr<Progress[]> own, gu_done, d_done;
  std::vector<uint64_t> gu_target;
  uint64_t d_target = 0;
  uint32_t epoch = 0;
  std::atomic<bool> aborted{false};  // a task threw: waiters give up

  // ---- barrier schedule state ----
  Counter gu_next, down_next;
  int64_t barrier_down_rows = 4;

  // ---- the call being run (set by compute before pool.run) ----
  const TensorView* G = nullptr;
  const TensorView* U = nullptr;
  const TensorView* D = nullptr;
  const int32_t* sel = nullptr;
  const float* wsel = nullptr;
  const float* h = nullptr;
  int64_t n = 0;
  float* y = nullptr;

  // ---- timing ----
  struct alignas(64) Slot {
    const uint8_t* ga = nullptr;  // this thread's activations of h for gate and up
    const uint8_t* ua = nullptr;
    int64_t begin = 0, quant_end = 0, gu_end = 0, end = 0, wait_ns = 0;
  };
  std::vector<Slot> slots;
  bool timing = false;
  Timing sums;

  Impl(const ModelWeights& weights, ThreadPool& p, cpu::Isa i) : w(weights), pool(p), isa(i) {
    const ModelConfig& c = w.cfg;
    hidden = c.hidden;
    ffn = c.expert_ffn;
    n_exp = c.n_experts;
    k_max = n_exp;  // a subset of the top-k in practice; any list of experts is computed
    layers = c.n_layers;
    nth = pool.size();
    if (static_cast<int64_t>(w.layers.size()) != layers || c.n_experts_used < 1 ||
        c.n_experts_used > n_exp) {
      throw Error("model " + w.source, "has no usable MoE layers for the CPU experts",
                  "use a MoE model with n_experts_used in 1..n_experts");
    }
    int64_t ga_bytes = 0, ua_bytes = 0, da_bytes = 0;
    int64_t da_block = 1;  // largest block of the down activations (32 Q8_0, 256 Q8_K)
    bool down_f32 = false;
    for (int64_t l = 0; l < layers; ++l) {
      if (c.is_dense_layer(l)) continue;  // deepseek2's leading dense layers have no experts
      const LayerWeights& L = w.layers[l];
      const std::string blk = "blk." + std::to_string(l) + ".";
      check_expert_tensor(L.gate_exps, hidden, ffn * n_exp, blk + "ffn_gate_exps", isa);
      check_expert_tensor(L.up_exps, hidden, ffn * n_exp, blk + "ffn_up_exps", isa);
      check_expert_tensor(L.down_exps, ffn, hidden * n_exp, blk + "ffn_down_exps", isa);
      ga_bytes = std::max(ga_bytes, act_row_bytes(L.gate_exps.type, hidden));
      ua_bytes = std::max(ua_bytes, act_row_bytes(L.up_exps.type, hidden));
      da_bytes = std::max(da_bytes, act_row_bytes(L.down_exps.type, ffn));
      down_f32 = down_f32 || cpu::activation_type(L.down_exps.type) == QuantType::F32;
      da_block = std::max(da_block, block_elems(cpu::activation_type(L.down_exps.type)));
    }

    const char* sched = std::getenv("KTUNE_CPU_MOE_SCHED");
    flow = !(sched != nullptr && std::string(sched) == "barrier");
    // A gate/up item quantizes whole blocks of the down activation (32 for Q8_0, 256 for Q8_K).
    const int64_t blk = down_f32 && da_bytes == 0 ? 1 : std::max<int64_t>(32, da_block);
    unit = round_up(env_knob("KTUNE_CPU_MOE_UNIT_ROWS", 64, 1, 1 << 20), blk);
    units_per_expert = (ffn + unit - 1) / unit;
    down_rows = round_up(env_knob("KTUNE_CPU_MOE_DOWN_ROWS", 32, 1, 1 << 20), 4);
    n_chunks = (hidden + down_rows - 1) / down_rows;
    prefetch_bytes = env_knob("KTUNE_CPU_MOE_PREFETCH_KB", 0, 0, 1 << 16) * 1024;
    start_bytes = env_knob("KTUNE_CPU_MOE_START_KB", 4, 0, 1 << 16) * 1024;
    interleave = env_knob("KTUNE_CPU_MOE_INTERLEAVE", 0, 0, 1) != 0;
    // Workers that sleep between calls cost a futex wake-up each (tens of µs to ms in a VM,
    // and a late thread stretches the call): keep them spinning across the GPU's part of a
    // layer. Only raised, never lowered below what the pool's owner chose, and not for a pool
    // with more threads than cores, where spinners would take turns away from workers.
    const int64_t spin = env_knob("KTUNE_CPU_MOE_SPIN_US", kSpinUs, 0, 60'000'000);
    bool own_cores = true;  // every worker pinned to a core of its own
    for (int t = 1; t < nth; ++t) own_cores = own_cores && pool.pinned_cpus()[t] >= 0;
    if (!own_cores) own_cores = nth <= physical_core_count();
    if (pool.spin_us() < spin && own_cores) pool.set_spin_us(spin);

    ua_off = round_up(ga_bytes, kCacheLine);
    act_stride = std::max<int64_t>(kCacheLine, ua_off + round_up(ua_bytes, kCacheLine));
    act = aligned_alloc_n<uint8_t>(act_stride * nth);
    down_act_stride = round_up(da_bytes, kCacheLine);  // each expert's row on its own lines
    down_act = aligned_alloc_n<uint8_t>(down_act_stride * k_max);
    g = aligned_alloc_n<float>(k_max * ffn);
    u = aligned_alloc_n<float>(k_max * ffn);
    yd = aligned_alloc_n<float>(k_max * hidden);

    own.reset(new Progress[static_cast<size_t>(nth)]);
    gu_done.reset(new Progress[static_cast<size_t>(k_max)]);
    d_done.reset(new Progress[static_cast<size_t>(n_chunks)]);
    gu_target.assign(static_cast<size_t>(k_max), 0);
    slots.resize(static_cast<size_t>(nth));
  }

  // Zeroes the flow schedule's counters and targets (after a task threw mid-call, the counters
  // no longer match the targets).
  void reset_flow() {
    for (int t = 0; t < nth; ++t) own[t].v.store(0, std::memory_order_relaxed);
    for (int64_t j = 0; j < k_max; ++j) gu_done[j].v.store(0, std::memory_order_relaxed);
    for (int64_t c = 0; c < n_chunks; ++c) d_done[c].v.store(0, std::memory_order_relaxed);
    std::fill(gu_target.begin(), gu_target.end(), 0);
    d_target = 0;
    aborted.store(false, std::memory_order_relaxed);
  }

  // h in the activation forms of gate and up, into buf (or h itself for F32 activations).
  void quantize_input(uint8_t* buf, const uint8_t** ga, const uint8_t** ua) const {
    const QuantType gt = cpu::activation_type(G->type);
    const QuantType ut = cpu::activation_type(U->type);
    if (gt == QuantType::F32) {
      *ga = reinterpret_cast<const uint8_t*>(h);
    } else {
      cpu::quantize_activation(G->type, h, buf, hidden, isa);
      *ga = buf;
    }
    if (ut == QuantType::F32) {
      *ua = reinterpret_cast<const uint8_t*>(h);
    } else if (ut == gt) {
      *ua = *ga;
    } else {
      cpu::quantize_activation(U->type, h, buf + ua_off, hidden, isa);
      *ua = buf + ua_off;
    }
  }

  // Gate + up + SwiGLU of rows [a, b) of expert slot j, and the down activation's blocks of
  // those rows. Interleaved: gate and up in alternating 4-row tiles, so each matrix is one
  // sequential stream that the kernel's next-tile prefetch covers.
  void gate_up_rows(int64_t j, int64_t a, int64_t b, const uint8_t* ga, const uint8_t* ua) {
    float* gj = g.get() + j * ffn;
    float* uj = u.get() + j * ffn;
    const uint8_t* Gm = G->matrix(sel[j]);
    const uint8_t* Um = U->matrix(sel[j]);
    if (interleave) {
      for (int64_t r = a; r < b; r += 4) {
        const int64_t e = std::min(b, r + 4);
        cpu::matvec_rows(G->type, isa, Gm, hidden, r, e, ga, gj + r);
        cpu::matvec_rows(U->type, isa, Um, hidden, r, e, ua, uj + r);
      }
    } else {
      cpu::matvec_rows(G->type, isa, Gm, hidden, a, b, ga, gj + a);
      cpu::matvec_rows(U->type, isa, Um, hidden, a, b, ua, uj + a);
    }
    for (int64_t i = a; i < b; ++i) gj[i] = cpu_ops::silu(gj[i]) * uj[i];
    const QuantType da = cpu::activation_type(D->type);
    if (da != QuantType::F32) {
      uint8_t* dst = down_act.get() + j * down_act_stride + row_bytes(da, a);
      cpu::quantize_activation(D->type, gj + a, dst, b - a, isa);
    }
  }

  const uint8_t* down_input(int64_t j) const {
    if (cpu::activation_type(D->type) == QuantType::F32) {
      return reinterpret_cast<const uint8_t*>(g.get() + j * ffn);
    }
    return down_act.get() + j * down_act_stride;
  }

  // y[r] = sum_j wsel[j] * y_j[r] for r in [r0, r1), experts in the given order.
  void sum_rows(int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float s = 0.0f;
      for (int64_t j = 0; j < n; ++j) s += wsel[j] * yd.get()[j * hidden + r];
      y[r] = s;
    }
  }

  // ------------------------------------------------------------------------------------------
  // Flow schedule.
  // ------------------------------------------------------------------------------------------
  int64_t gu_items() const { return n * units_per_expert; }
  int64_t gu_count(int s) const {
    const int64_t total = gu_items();
    return s < total ? (total - s + nth - 1) / nth : 0;
  }
  void chunk_range(int s, int64_t* c0, int64_t* c1) const {
    *c0 = n_chunks * s / nth;
    *c1 = n_chunks * (s + 1) / nth;
  }
  int64_t list_len(int s) const {
    int64_t c0, c1;
    chunk_range(s, &c0, &c1);
    return gu_count(s) + n * (c1 - c0);
  }

  // Prefetches the first `bytes` of the weights item p of list s reads.
  void prefetch_item(int s, int64_t p, int64_t bytes) const {
    const int64_t ngu = gu_count(s);
    if (p < ngu) {
      const int64_t i = s + p * nth;
      const int64_t j = i / units_per_expert;
      const int64_t a = (i - j * units_per_expert) * unit;
      const int64_t b = std::min(ffn, a + unit);
      const int64_t half = interleave ? bytes / 2 : bytes;
      prefetch_l2(G->matrix(sel[j]) + a * G->row_stride(),
                  std::min(half, (b - a) * G->row_stride()));
      if (interleave) {
        prefetch_l2(U->matrix(sel[j]) + a * U->row_stride(),
                    std::min(half, (b - a) * U->row_stride()));
      }
      return;
    }
    int64_t c0, c1;
    chunk_range(s, &c0, &c1);
    const int64_t q = p - ngu;
    const int64_t j = q / (c1 - c0);
    const int64_t c = c0 + q - j * (c1 - c0);
    const int64_t r0 = c * down_rows;
    const int64_t r1 = std::min(hidden, r0 + down_rows);
    prefetch_l2(D->matrix(sel[j]) + r0 * D->row_stride(),
                std::min(bytes, (r1 - r0) * D->row_stride()));
  }

  // Claims the next item of list s: its position, or -1 when the list has none left. A list
  // nobody has claimed from in this call still holds an older epoch: the first claimer (owner
  // or not) opens it with a compare-exchange that also takes item 0, so a thread that starts
  // late (descheduled, or a slow futex wake-up) holds up nobody.
  int64_t claim(int s, int64_t len) {
    std::atomic<uint64_t>& ctr = own[s].v;
    const uint64_t ep = epoch;
    uint64_t cur = ctr.load(std::memory_order_relaxed);
    while ((cur >> 32) != ep) {
      if (len == 0) return -1;
      if (ctr.compare_exchange_weak(cur, (ep << 32) | 1, std::memory_order_relaxed)) return 0;
    }
    if (static_cast<int64_t>(cur & kPosMask) >= len) return -1;
    const int64_t p = static_cast<int64_t>(ctr.fetch_add(1, std::memory_order_relaxed) & kPosMask);
    return p < len ? p : -1;
  }
  // Claims list s's next item only if it is a gate/up item (which never waits): its position,
  // or -1.
  int64_t claim_gate_up(int s) {
    const int64_t ngu = gu_count(s);
    if (ngu == 0) return -1;
    std::atomic<uint64_t>& ctr = own[s].v;
    const uint64_t ep = epoch;
    uint64_t cur = ctr.load(std::memory_order_relaxed);
    for (;;) {
      int64_t p = 0;
      uint64_t next = (ep << 32) | 1;
      if ((cur >> 32) == ep) {
        p = static_cast<int64_t>(cur & kPosMask);
        if (p >= ngu) return -1;
        next = cur + 1;
      }
      if (ctr.compare_exchange_weak(cur, next, std::memory_order_relaxed)) return p;
    }
  }

  // Waits until expert slot j's gate/up items are all done, meanwhile doing gate/up items
  // nobody has claimed yet (a late thread's). False when another task threw.
  bool wait_gate_up(int64_t j, int ith, Slot& me) {
    const std::atomic<uint64_t>& done = gu_done[j].v;
    const uint64_t target = gu_target[static_cast<size_t>(j)];
    if (done.load(std::memory_order_acquire) >= target) return true;
    const int64_t t0 = timing ? now_ns() : 0;
    bool unclaimed = true;  // gate/up items may be left unclaimed (only ever fewer)
    int64_t helped_ns = 0;  // of the wait, doing gate/up items (counted as work)
    for (int i = 0;; ++i) {
      if (done.load(std::memory_order_acquire) >= target) break;
      if (aborted.load(std::memory_order_relaxed)) return false;
      if (unclaimed) {
        unclaimed = false;
        for (int k = 0; k < nth && !unclaimed; ++k) {
          const int s = (ith + k) % nth;
          const int64_t p = claim_gate_up(s);
          if (p >= 0) {
            const int64_t h0 = timing ? now_ns() : 0;
            gate_up_item(s, p, me);
            if (timing) helped_ns += now_ns() - h0;
            unclaimed = true;
          }
        }
        continue;
      }
      // Spin while the producers are surely running; yield once one may be descheduled (a
      // pool larger than the machine), so it gets the core.
      if (i < 4096) {
        cpu_pause();
      } else {
        std::this_thread::yield();
      }
    }
    if (timing) me.wait_ns += now_ns() - t0 - helped_ns;
    return true;
  }

  void gate_up_item(int s, int64_t p, Slot& me) {
    const int64_t i = s + p * nth;
    const int64_t j = i / units_per_expert;
    const int64_t a = (i - j * units_per_expert) * unit;
    gate_up_rows(j, a, std::min(ffn, a + unit), me.ga, me.ua);
    gu_done[j].v.fetch_add(1, std::memory_order_release);
  }

  // Item p of list s, run by thread ith. False when another task threw.
  bool flow_item(int s, int64_t p, int ith, Slot& me) {
    const int64_t ngu = gu_count(s);
    if (p < ngu) {
      gate_up_item(s, p, me);
      return true;
    }
    int64_t c0, c1;
    chunk_range(s, &c0, &c1);
    const int64_t q = p - ngu;
    const int64_t j = q / (c1 - c0);
    const int64_t c = c0 + q - j * (c1 - c0);
    if (!wait_gate_up(j, ith, me)) return false;
    const int64_t r0 = c * down_rows;
    const int64_t r1 = std::min(hidden, r0 + down_rows);
    cpu::matvec_rows(D->type, isa, D->matrix(sel[j]), ffn, r0, r1, down_input(j),
                     yd.get() + j * hidden + r0);
    // The expert that completes chunk c sums it (acq_rel: sees the other experts' rows).
    if (d_done[c].v.fetch_add(1, std::memory_order_acq_rel) + 1 == d_target) sum_rows(r0, r1);
    return true;
  }

  void flow_region(int ith) {
    Slot& me = slots[static_cast<size_t>(ith)];
    if (timing) {
      me.begin = now_ns();
      me.wait_ns = 0;
    }
    const int64_t len = list_len(ith);
    if (start_bytes > 0 && len > 0) prefetch_item(ith, 0, start_bytes);
    quantize_input(act.get() + ith * act_stride, &me.ga, &me.ua);
    if (timing) me.quant_end = me.gu_end = now_ns();
    const int64_t ngu = gu_count(ith);
    bool gu_stamped = !timing;
    try {
      bool ok = true;
      for (;;) {
        const int64_t p = claim(ith, len);
        if (!gu_stamped && (p < 0 || p >= ngu)) {
          me.gu_end = now_ns();
          gu_stamped = true;
        }
        if (p < 0) break;
        if (prefetch_bytes > 0 && p + 1 < len) prefetch_item(ith, p + 1, prefetch_bytes);
        if (!(ok = flow_item(ith, p, ith, me))) break;
      }
      // Out of own items: help the others, each list from its front.
      for (int k = 1; ok && k < nth; ++k) {
        const int s = (ith + k) % nth;
        const int64_t ls = list_len(s);
        for (int64_t p; ok && (p = claim(s, ls)) >= 0;) ok = flow_item(s, p, ith, me);
      }
    } catch (...) {
      aborted.store(true, std::memory_order_relaxed);
      throw;
    }
    if (timing) me.end = now_ns();
  }

  // ------------------------------------------------------------------------------------------
  // Barrier schedule (the CpuEngine's): shared tickets, gate/up items, one barrier, then down
  // items of a few rows over all experts each.
  // ------------------------------------------------------------------------------------------
  void down_all_experts(int64_t r0, int64_t r1) {
    for (int64_t j = 0; j < n; ++j) {
      cpu::matvec_rows(D->type, isa, D->matrix(sel[j]), ffn, r0, r1, down_input(j),
                       yd.get() + j * hidden + r0);
    }
    sum_rows(r0, r1);
  }

  void barrier_region(int ith) {
    Slot& me = slots[static_cast<size_t>(ith)];
    const Slot& first = slots[0];  // thread 0 quantized h before run()
    if (timing) {
      me.begin = now_ns();
      me.quant_end = me.begin;
    }
    const int64_t items = gu_items();
    for (int64_t v = ith; v < items;) {
      const int64_t j = v / units_per_expert;
      const int64_t a = (v - j * units_per_expert) * unit;
      gate_up_rows(j, a, std::min(ffn, a + unit), first.ga, first.ua);
      v = nth + gu_next.next.fetch_add(1, std::memory_order_relaxed);
    }
    const int64_t t0 = timing ? now_ns() : 0;
    pool.barrier();
    if (timing) {
      me.gu_end = t0;
      me.wait_ns = now_ns() - t0;
    }
    const int64_t chunks = (hidden + barrier_down_rows - 1) / barrier_down_rows;
    for (int64_t c = ith; c < chunks;) {
      down_all_experts(c * barrier_down_rows, std::min(hidden, (c + 1) * barrier_down_rows));
      c = nth + down_next.next.fetch_add(1, std::memory_order_relaxed);
    }
    if (timing) me.end = now_ns();
  }

  void add_timing(int64_t enter, int64_t exit) {
    int64_t max_begin = enter, min_end = exit, max_end = enter;
    double quant = 0, work = 0, wait = 0, gate_up = 0;
    for (const Slot& s : slots) {
      gate_up += static_cast<double>(s.gu_end - s.quant_end);
      max_begin = std::max(max_begin, s.begin);
      min_end = std::min(min_end, s.end);
      max_end = std::max(max_end, s.end);
      quant += static_cast<double>(s.quant_end - s.begin);
      wait += static_cast<double>(s.wait_ns);
      work += static_cast<double>(s.end - s.quant_end - s.wait_ns);
    }
    sums.calls += 1;
    sums.total_us += (exit - enter) / 1e3;
    sums.wake_us += (max_begin - enter) / 1e3;
    sums.quant_us += quant / nth / 1e3;
    sums.work_us += work / nth / 1e3;
    sums.gate_up_us += gate_up / nth / 1e3;
    sums.wait_us += wait / nth / 1e3;
    sums.tail_us += (max_end - min_end) / 1e3;
    sums.exit_us += (exit - max_end) / 1e3;
  }
};

CpuMoe::CpuMoe(const ModelWeights& weights, ThreadPool& pool, cpu::Isa isa)
    : impl_(std::make_unique<Impl>(weights, pool, isa)) {}
CpuMoe::~CpuMoe() = default;

int CpuMoe::max_experts() const { return static_cast<int>(impl_->k_max); }

void CpuMoe::keep_warm() {
  if (impl_->pool.size() > 1) impl_->pool.run([](int, int) {});
}

int64_t CpuMoe::keep_warm_interval_us() const {
  // Half the spin: a worker that finished the last region is still spinning when the next starts.
  return impl_->pool.size() > 1 ? impl_->pool.spin_us() / 2 : 0;
}
cpu::Isa CpuMoe::isa() const { return impl_->isa; }

void CpuMoe::set_timing(bool on) { impl_->timing = on; }
CpuMoe::Timing CpuMoe::timing() const { return impl_->sums; }
void CpuMoe::reset_timing() { impl_->sums = Timing{}; }

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
  if (m.w.cfg.is_dense_layer(layer)) {
    throw Error("cpu moe", "layer " + std::to_string(layer) + " is a dense layer (no experts)",
                "pass a MoE layer");
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
  const int64_t enter = m.timing ? now_ns() : 0;
  const LayerWeights& L = m.w.layers[layer];
  m.G = &L.gate_exps;
  m.U = &L.up_exps;
  m.D = &L.down_exps;
  m.sel = experts;
  m.wsel = weights;
  m.h = h;
  m.n = n;
  m.y = y;
  // run() publishes everything written here (its hand-off is sequentially consistent).
  if (m.flow) {
    ++m.epoch;
    for (int j = 0; j < n; ++j) m.gu_target[static_cast<size_t>(j)] += m.units_per_expert;
    m.d_target += static_cast<uint64_t>(n);
    try {
      m.pool.run([&m](int ith, int) { m.flow_region(ith); });
    } catch (...) {
      m.reset_flow();
      throw;
    }
  } else {
    m.quantize_input(m.act.get(), &m.slots[0].ga, &m.slots[0].ua);
    // Down work items of about kBarrierDownChunkBytes over all n experts, whole 4-row tiles.
    const int64_t per_row = std::max<int64_t>(1, n * L.down_exps.row_stride());
    m.barrier_down_rows = std::max<int64_t>(4, (kBarrierDownChunkBytes / per_row) / 4 * 4);
    m.gu_next.next.store(0, std::memory_order_relaxed);
    m.down_next.next.store(0, std::memory_order_relaxed);
    m.pool.run([&m](int ith, int) { m.barrier_region(ith); });
  }
  if (m.timing) m.add_timing(enter, now_ns());
}

}  // namespace ktune
