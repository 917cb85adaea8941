// The CPU engine for qwen3moe (semantics of Hugging Face's Qwen3MoeForCausalLM).
//
// Decode (one token) runs as ONE parallel region per step; inside it each layer needs six
// barriers:
//   1. every thread: RMSNorm(x) and the activation quantization (redundantly, each its own copy:
//      cheaper than a barrier); QKV rows of the three matrices as one work list      -> barrier
//   2. per kv group of q heads: q/k norm, RoPE, attention reading each cache row once for the
//      group (the current token's k/v are recomputed locally; the kv head's owner writes them to
//      the cache); Wo's activation quantized per head                                -> barrier
//   3. Wo rows, each thread adding its rows into x                                   -> barrier
//   4. every thread: RMSNorm + quantization; router rows                             -> barrier
//   5. every thread: softmax/top-k (redundant, tiny); gate+up over (expert, 32-row unit) work,
//      SwiGLU and the down activation's quantization of the same unit                 -> barrier
//   6. down rows over all selected experts, each thread summing its rows into x       -> barrier
// (plus one more after attention only when head_dim is not a whole number of Q8_0 blocks).
// Every output element is computed by exactly one thread in a fixed order, so logits are
// bit-identical whatever the thread count. Nothing is allocated after construction.
// The matrix phases (QKV, Wo, router, gate/up, down, output head) hand out row chunks through
// an atomic ticket per (layer, phase) instead of fixed per-thread ranges, so threads slowed by
// memory contention take less (24.0 -> 21.9 ms/step on a 16-core Sapphire Rapids); which thread
// computes a row never changes its value. Threads waiting at a barrier prefetch what they read
// next (their first chunk of the next phase; the KV rows before attention).
//
// Prefill (T tokens) uses the same structure with matmul_rows (weights read once per tile of
// tokens) and groups tokens by expert for the MoE layer (about ten barriers per layer).
//
// Several sequences (options.max_sequences) each have their own KV cache region. A batched
// decode step (decode_batch: one token of each of B sequences) runs the prefill region over the
// B tokens, each with its own sequence and position (PSEQ, PPOS): the experts any of them
// selected are read once for all (tokens grouped by expert), attention reads each token's own
// cache.
//
// KTUNE_CPU_PHASES=1 prints where decode time goes (per phase, at engine destruction).
#include "ktune/engine/cpu_engine.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <string>

#include "ktune/engine/error.h"
#include "ktune/engine/thread_pool.h"
#include "ktune/engine/trace.h"
#include "runtime/act_buffers.h"
#include "runtime/cpu_engine_deepseek.h"
#include "runtime/cpu_ops.h"
#include "runtime/grouped_moe.h"
#include "runtime/prefill_chunks.h"

namespace ktune {
namespace {

constexpr int64_t kRowAlign = 16;  // rows per work unit of a matrix-vector product
using rt::kCacheLine;

using rt::ActBuffers;
using rt::Buf;

// One matrix of a concatenated work list (Wq|Wk|Wv): rows [row0, row0 + rows) of the list.
struct Segment {
  const TensorView* w = nullptr;
  int64_t row0 = 0;
};

std::vector<float> norm_weights(const TensorView& t, int64_t n, const std::string& what) {
  if (t.data == nullptr || t.row_len() != n) {
    throw Error(t.name.empty() ? what : t.name,
                "missing or has " + std::to_string(t.row_len()) + " elements, expected " +
                    std::to_string(n),
                "use a qwen3moe model whose norm weights match its hidden/head dimensions");
  }
  std::vector<float> v(n);
  dequantize_row(t.type, t.data, v.data(), n);
  return v;
}

void check_matrix(const TensorView& t, int64_t row_len, int64_t rows, const std::string& what,
                  cpu::Isa isa) {
  if (t.data == nullptr || t.row_len() != row_len || t.n_rows() != rows) {
    throw Error(t.name.empty() ? what : t.name,
                "missing or shaped [" + std::to_string(t.ne[0]) + ", " + std::to_string(t.ne[1]) +
                    ", " + std::to_string(t.ne[2]) + "], expected " + std::to_string(row_len) +
                    " x " + std::to_string(rows),
                "use a qwen3moe model whose tensors match its configuration");
  }
  cpu::vec_dot(t.type, isa);  // throws for a type the CPU kernels cannot multiply
}

}  // namespace

struct CpuEngine::Impl {
  const ModelWeights& w;
  const ModelConfig& cfg;
  CpuEngineOptions opt;
  cpu::Isa isa;
  cpu_ops::VecOps ops;
  std::unique_ptr<ThreadPool> pool;
  int nth = 1;

  // Dimensions.
  int64_t hidden, n_heads, n_kv, hd, nq, nkv_rows, nqkv, n_exp, top_k, ffn, vocab, layers;
  int64_t group;  // q heads per kv head
  float scale;
  int64_t max_ctx, max_batch;
  int64_t pos = 0;  // position of the current sequence `cur` (seq_pos[cur] is stale meanwhile)
  int64_t max_seq = 1, cur = 0;
  std::vector<int64_t> seq_pos;
  int64_t seq_stride = 0;  // floats of one sequence's cache per layer (n_kv * max_ctx * hd)

  const TensorView* out_w = nullptr;  // output, or token_embd when tied

  std::vector<float> inv_freq;
  std::vector<float> out_norm;
  struct LayerNorms {
    std::vector<float> attn, q, k, ffn;
  };
  std::vector<LayerNorms> norms;

  // [layer][n_kv][max_ctx][hd]: head-major, so attention streams one kv head's rows
  // contiguously (the prefetchers' best case) instead of hopping n_kv * hd floats per position.
  std::vector<std::unique_ptr<float[]>> k_cache, v_cache;
  std::vector<std::vector<uint64_t>> counts;

  // Work units for gate/up: `unit` ffn rows (a multiple of the down activation's block, so each
  // unit quantizes its own blocks).
  int64_t unit = 32, units_per_expert = 1;
  bool attn_q_by_head = true;  // Wo's activation blocks never straddle two heads

  // ---- decode work distribution ----
  // The matrix phases of decode hand out row chunks (units for gate/up) dynamically: chunk ith
  // is thread ith's first, the rest go to whoever asks next (an atomic ticket per (layer,
  // phase), zeroed before each step), so a thread slowed by memory contention takes fewer.
  // Chunks shrink towards the end of a phase (guided: a fixed share of what is left, down to
  // about kMinChunkBytes), so threads finish within a small chunk of each other. Any row split
  // gives the same numbers (matvec_rows is bit-identical per row), so results do not depend on
  // the schedule. KTUNE_CPU_SCHED=static restores one fixed range per thread.
  // While waiting at a barrier, a thread prefetches the start of its first chunk of the next
  // matrix phase (KTUNE_CPU_PREFETCH_KB per thread, 0 = off), so DRAM stays busy across it.
  enum Work { kQkv = 0, kWo, kRouter, kGateUp, kDown, kOut, kWorkKinds };
  static constexpr int kLayerWork = 5;      // tickets per layer (all kinds but kOut)
  std::vector<int64_t> chunks[kWorkKinds];  // chunk c = [chunks[k][c], chunks[k][c + 1])
  struct alignas(64) Ticket {
    std::atomic<int64_t> next{0};
  };
  std::unique_ptr<Ticket[]> tickets;
  int64_t n_tickets = 0;
  bool dynamic_sched = true;
  int64_t prefetch_bytes = 16 * 1024;
  // KTUNE_CPU_LOOKAHEAD_KB: inside a chunk, a software prefetch stream runs this far ahead of
  // the kernel (whose own prefetch reaches only the next 4-row tile) over the chunk's regions in
  // the order they are read; the rows go to the kernel a few KiB at a time. 0 = off (default:
  // 16 and 32 KiB measured no better on the 16-core Sapphire Rapids).
  int64_t lookahead_bytes = 0;
  // KTUNE_CPU_KV_PREFETCH_KB: at the QKV barrier, prefetch this much of the thread's kv group's
  // cached K then V rows (attention reads them next; they are evicted from the caches by the
  // weights streamed since the last step). 0 = off. 128 KiB cut attention from 0.93 to 0.72
  // ms/step on qwen3-30b-a3b (16-core Sapphire Rapids, 128 tokens).
  int64_t kv_prefetch_bytes = 128 * 1024;

  // ---- decode scratch (shared; each element written by one thread) ----
  Buf<float> x, qkv, attn, rlog, g, u, y, rope_cs;
  ActBuffers attn_act;  // Wo input
  ActBuffers act_d;     // down input, k rows of ffn
  // ---- decode scratch, per thread ----
  struct Local {
    Buf<float> h, h2, q, k, scores, probs, wsel, hf;
    Buf<int32_t> sel;
    std::vector<const float*> qp;  // query heads of one kv group
    std::vector<float*> op;        // their outputs
    ActBuffers h_act, h2_act, hf_act;
  };
  std::vector<Local> local;

  // ---- prefill scratch ----
  Buf<float> PX, PH, PQKV, PATT, PRL, PG, PU, PY, PCS, PW;
  Buf<int32_t> PSEL, PSLOT, PTOK, PBEGIN, PUNIT;  // PUNIT: unit-range start per thread
  Buf<int64_t> PSEQ, PPOS;  // sequence and position of each token of the chunk
  ActBuffers p_h_act, p_att_act, p_h2_act, p_gh_act, p_a_act, p_out_act;
  Buf<float> PGH;  // gathered float rows, only when gate/up multiply F32 activations
  std::vector<int32_t> cursor_;
  int64_t p_n_active = 0;
  Buf<int32_t> PACTIVE;  // active experts of the layer, ascending

  Impl(const ModelWeights& weights, const CpuEngineOptions& o)
      : w(weights), cfg(weights.cfg), opt(o), isa(o.isa), ops(cpu_ops::vec_ops(o.isa)) {
    cfg.validate("model " + w.source);
    hidden = cfg.hidden;
    n_heads = cfg.n_heads;
    n_kv = cfg.n_kv_heads;
    hd = cfg.head_dim;
    nq = n_heads * hd;
    nkv_rows = n_kv * hd;
    nqkv = nq + 2 * nkv_rows;
    n_exp = cfg.n_experts;
    top_k = cfg.n_experts_used;
    ffn = cfg.expert_ffn;
    vocab = cfg.vocab;
    layers = cfg.n_layers;
    if (n_heads % n_kv != 0 || hd % 2 != 0 || top_k > n_exp) {
      throw Error("model " + w.source,
                  "unsupported attention/router shape (heads " + std::to_string(n_heads) +
                      ", kv heads " + std::to_string(n_kv) + ", head_dim " + std::to_string(hd) +
                      ", top-k " + std::to_string(top_k) + " of " + std::to_string(n_exp) + ")",
                  "use a qwen3moe model with heads divisible by kv heads and an even head_dim");
    }
    group = n_heads / n_kv;
    scale = 1.0f / std::sqrt(static_cast<float>(hd));
    max_ctx = std::max<int64_t>(1, opt.max_context);
    max_batch = std::max<int64_t>(1, std::min(opt.max_batch, max_ctx));
    if (opt.max_sequences < 1 || opt.max_sequences > 4096) {
      throw Error("max_sequences", std::to_string(opt.max_sequences) + " is not 1..4096",
                  "ask for 1 to 4096 sequences");
    }
    max_seq = opt.max_sequences;
    max_batch = std::max(max_batch, max_seq);  // a batched decode step is one chunk
    seq_pos.assign(static_cast<size_t>(max_seq), 0);
    if (static_cast<int64_t>(w.layers.size()) != layers) {
      throw Error("model " + w.source,
                  "has " + std::to_string(w.layers.size()) +
                      " layers, "
                      "config says " +
                      std::to_string(layers),
                  "use a complete model");
    }

    // Shapes and kernel support are checked once here, so the hot loops cannot throw.
    if (w.tok_embd.data == nullptr || w.tok_embd.row_len() != hidden ||
        w.tok_embd.n_rows() != vocab) {
      throw Error("token_embd", "missing or not [hidden, vocab]",
                  "use a qwen3moe model whose tensors match its configuration");
    }
    out_w = w.output.data ? &w.output : &w.tok_embd;
    check_matrix(*out_w, hidden, vocab, "output", isa);
    out_norm = norm_weights(w.output_norm, hidden, "output_norm");
    norms.resize(layers);
    for (int64_t l = 0; l < layers; ++l) {
      const LayerWeights& L = w.layers[l];
      const std::string blk = "blk." + std::to_string(l) + ".";
      norms[l].attn = norm_weights(L.attn_norm, hidden, blk + "attn_norm");
      norms[l].q = norm_weights(L.q_norm, hd, blk + "attn_q_norm");
      norms[l].k = norm_weights(L.k_norm, hd, blk + "attn_k_norm");
      norms[l].ffn = norm_weights(L.ffn_norm, hidden, blk + "ffn_norm");
      check_matrix(L.wq, hidden, nq, blk + "attn_q", isa);
      check_matrix(L.wk, hidden, nkv_rows, blk + "attn_k", isa);
      check_matrix(L.wv, hidden, nkv_rows, blk + "attn_v", isa);
      check_matrix(L.wo, nq, hidden, blk + "attn_output", isa);
      check_matrix(L.router, hidden, n_exp, blk + "ffn_gate_inp", isa);
      check_matrix(L.gate_exps, hidden, ffn * n_exp, blk + "ffn_gate_exps", isa);
      check_matrix(L.up_exps, hidden, ffn * n_exp, blk + "ffn_up_exps", isa);
      check_matrix(L.down_exps, ffn, hidden * n_exp, blk + "ffn_down_exps", isa);
    }

    inv_freq.resize(hd / 2);
    for (int64_t i = 0; i < hd / 2; ++i) {
      // As Hugging Face: 1 / theta^(2i/d) with the exponent and power in float32.
      const float e = static_cast<float>(2 * i) / static_cast<float>(hd);
      inv_freq[i] = 1.0f / std::pow(cfg.rope_theta, e);
    }

    // Allocated, not zeroed: the cache pages are touched only as positions are filled.
    seq_stride = max_ctx * nkv_rows;
    const int64_t cache_elems = seq_stride * max_seq;
    for (int64_t l = 0; l < layers; ++l) {
      k_cache.emplace_back(new float[cache_elems]);
      v_cache.emplace_back(new float[cache_elems]);
    }
    counts.assign(layers, std::vector<uint64_t>(n_exp, 0));

    const char* phases = std::getenv("KTUNE_CPU_PHASES");
    profile = phases != nullptr && phases[0] == '1';
    const char* sched = std::getenv("KTUNE_CPU_SCHED");
    dynamic_sched = !(sched != nullptr && std::string(sched) == "static");
    if (const char* pf = std::getenv("KTUNE_CPU_PREFETCH_KB")) {
      prefetch_bytes = std::max<int64_t>(0, std::atoll(pf)) * 1024;
    }
    if (const char* la = std::getenv("KTUNE_CPU_LOOKAHEAD_KB")) {
      lookahead_bytes = std::max<int64_t>(0, std::atoll(la)) * 1024;
    }
    if (const char* kv = std::getenv("KTUNE_CPU_KV_PREFETCH_KB")) {
      kv_prefetch_bytes = std::max<int64_t>(0, std::atoll(kv)) * 1024;
    }
    pool = std::make_unique<ThreadPool>(opt.threads, opt.pin_threads);
    nth = pool->size();
    allocate_scratch();
    plan_chunks();
  }

  // Chunk boundaries of `total` items (aligned to `align`) for nth threads. Static: nth ranges
  // as cpu_ops::split. Dynamic (guided): each chunk is 1/(2 nth) of what is left, at least
  // min_items, so the first nth chunks hold about 40 % of the work and the last are small.
  std::vector<int64_t> make_chunks(int64_t total, int64_t align, int64_t min_items) const {
    std::vector<int64_t> b{0};
    if (!dynamic_sched || nth == 1) {
      for (int i = 0; i < nth; ++i) {
        int64_t s0, s1;
        cpu_ops::split(total, i, nth, align, &s0, &s1);
        b.push_back(std::max(s1, b.back()));
      }
      return b;
    }
    min_items = std::max<int64_t>(align, (min_items + align - 1) / align * align);
    while (b.back() < total) {
      const int64_t left = total - b.back();
      int64_t c = (left / (2 * nth) + align - 1) / align * align;
      c = std::min(left, std::max(c, min_items));
      b.push_back(b.back() + c);
    }
    return b;
  }

  void plan_chunks() {
    constexpr int64_t kMinChunkBytes = 16 * 1024;
    auto rows_for = [&](int64_t row_bytes_all) {
      return std::max<int64_t>(1, (kMinChunkBytes + row_bytes_all - 1) / row_bytes_all);
    };
    // Row bytes of the first layer stand for all (types rarely differ per layer).
    const LayerWeights& L0 = w.layers[0];
    chunks[kQkv] = make_chunks(nqkv, 4, rows_for(L0.wq.row_stride()));
    chunks[kWo] = make_chunks(hidden, 4, rows_for(L0.wo.row_stride()));
    chunks[kRouter] = make_chunks(n_exp, 1, rows_for(L0.router.row_stride()));
    chunks[kGateUp] = make_chunks(top_k * units_per_expert, 1, 1);
    chunks[kDown] = make_chunks(hidden, 4, rows_for(top_k * L0.down_exps.row_stride()));
    chunks[kOut] = make_chunks(vocab, 4, rows_for(out_w->row_stride()));
    n_tickets = layers * kLayerWork + 1;
    tickets.reset(new Ticket[n_tickets]);
  }

  // Calls fn(begin, end) for every chunk of kind k this thread takes; t is the phase's ticket.
  template <class F>
  void for_chunks(int k, Ticket& t, int ith, int n, F&& fn) {
    const std::vector<int64_t>& b = chunks[k];
    const int64_t nc = static_cast<int64_t>(b.size()) - 1;
    if (ith < nc && b[ith + 1] > b[ith]) fn(b[ith], b[ith + 1]);
    if (nc <= n) return;
    for (;;) {
      const int64_t c = n + t.next.fetch_add(1, std::memory_order_relaxed);
      if (c >= nc) return;
      fn(b[c], b[c + 1]);
    }
  }
  Ticket& ticket(int64_t l, int k) { return tickets[l * kLayerWork + k]; }

  // A software prefetch stream over byte regions read in order (see lookahead_bytes).
  struct Lookahead {
    static constexpr int kMax = 16;
    const uint8_t* p[kMax];
    int64_t len[kMax];
    int n = 0;
    int ri = 0;  // prefetch cursor: region ri, byte off
    int64_t off = 0;
    int64_t issued = 0;    // bytes the cursor has covered
    int64_t consumed = 0;  // bytes handed to the kernel
    int64_t distance = 0;
    void add(const uint8_t* q, int64_t bytes) {
      if (bytes > 0 && n < kMax) {
        p[n] = q;
        len[n] = bytes;
        ++n;
      }
    }
    // The kernel is about to read `bytes` more: keep the cursor `distance` past their end.
    void ahead(int64_t bytes) {
      const int64_t target = consumed + bytes + distance;
      while (issued < target && ri < n) {
        __builtin_prefetch(p[ri] + off, 0, 2);
        off += kCacheLine;
        issued += kCacheLine;
        if (off >= len[ri]) {
          issued -= off - len[ri];
          ++ri;
          off = 0;
        }
      }
      consumed += bytes;
    }
  };
  // matvec of rows [a, b) (yout at row a); with a lookahead stream, a few KiB of rows per call.
  void matvec_la(const TensorView& t, const uint8_t* W, int64_t a, int64_t b, const void* act,
                 float* yout, Lookahead& la) const {
    if (b <= a) return;
    if (la.distance <= 0) {
      matvec(t, W, a, b, act, yout);
      return;
    }
    const int64_t rb = t.row_stride();
    const int64_t step = std::max<int64_t>(4, (4096 / rb) / 4 * 4);
    for (int64_t r = a; r < b; r += step) {
      const int64_t e = std::min(b, r + step);
      la.ahead((e - r) * rb);
      matvec(t, W, r, e, act, yout + (r - a));
    }
  }

  // Prefetches (into L2) up to `budget` bytes from p, in order; returns what is left.
  static int64_t prefetch(const uint8_t* p, int64_t bytes, int64_t budget) {
    const int64_t nb = std::min(bytes, budget);
    for (int64_t off = 0; off < nb; off += kCacheLine) __builtin_prefetch(p + off, 0, 2);
    return budget - nb;
  }
  int64_t prefetch_rows(const TensorView& t, const uint8_t* W, int64_t r0, int64_t r1,
                        int64_t budget) const {
    if (r1 <= r0 || budget <= 0) return budget;
    const int64_t rb = t.row_stride();
    return prefetch(W + r0 * rb, (r1 - r0) * rb, budget);
  }
  // This thread's first chunk of kind k (layer l); down uses sel.
  void prefetch_first(int k, int64_t l, int ith, const int32_t* sel, int64_t budget) const {
    const std::vector<int64_t>& b = chunks[k];
    if (budget <= 0 || ith + 1 >= static_cast<int64_t>(b.size())) return;
    const int64_t r0 = b[ith], r1 = b[ith + 1];
    if (k == kOut) {
      prefetch_rows(*out_w, out_w->data, r0, r1, budget);
      return;
    }
    const LayerWeights& L = w.layers[l];
    switch (k) {
      case kQkv: {
        const Segment segs[3] = {{&L.wq, 0}, {&L.wk, nq}, {&L.wv, nq + nkv_rows}};
        for (const Segment& s : segs) {
          const int64_t a = std::max(r0, s.row0) - s.row0;
          const int64_t e = std::min(r1, s.row0 + s.w->n_rows()) - s.row0;
          budget = prefetch_rows(*s.w, s.w->data, a, e, budget);
        }
        break;
      }
      case kWo:
        prefetch_rows(L.wo, L.wo.data, r0, r1, budget);
        break;
      case kRouter:
        prefetch_rows(L.router, L.router.data, r0, r1, budget);
        break;
      case kDown:
        // Consumed expert by expert: the first rows of each, a share of the budget apiece.
        for (int64_t j = 0; j < top_k; ++j) {
          prefetch_rows(L.down_exps, L.down_exps.matrix(sel[j]), r0, r1, budget / top_k);
        }
        break;
      default:
        break;
    }
  }

  // Types of the weights consuming each input, over all layers (types may differ per layer).
  std::vector<QuantType> types_of(std::initializer_list<TensorView LayerWeights::*> members) {
    std::vector<QuantType> t;
    for (const LayerWeights& L : w.layers) {
      for (auto m : members) t.push_back((L.*m).type);
    }
    return t;
  }

  void allocate_scratch() {
    const auto qkv_types = types_of({&LayerWeights::wq, &LayerWeights::wk, &LayerWeights::wv});
    const auto wo_types = types_of({&LayerWeights::wo});
    const auto ffn_in_types =
        types_of({&LayerWeights::router, &LayerWeights::gate_exps, &LayerWeights::up_exps});
    const auto gu_types = types_of({&LayerWeights::gate_exps, &LayerWeights::up_exps});
    const auto down_types = types_of({&LayerWeights::down_exps});

    attn_act.init(wo_types, nq, 1);
    attn_q_by_head = hd % std::max<int64_t>(attn_act.block(), 1) == 0;
    act_d.init(down_types, ffn, top_k);
    // A unit of gate/up rows covers whole blocks of the down activation.
    const int64_t blk = act_d.block();
    unit = std::max<int64_t>(32, blk);
    unit = (unit / blk) * blk;
    units_per_expert = (ffn + unit - 1) / unit;

    x.resize(hidden);
    qkv.resize(nqkv);
    attn.resize(nq);
    rlog.resize(n_exp);
    g.resize(top_k * ffn);
    u.resize(top_k * ffn);
    y.resize(top_k * hidden);
    rope_cs.resize(hd);

    local.resize(nth);
    for (Local& t : local) {
      t.h.resize(hidden);
      t.h2.resize(hidden);
      t.hf.resize(hidden);
      t.q.resize(group * hd);
      t.k.resize(hd);
      t.scores.resize(group * (max_ctx + 1));
      t.qp.resize(group);
      t.op.resize(group);
      t.probs.resize(n_exp);
      t.wsel.resize(top_k);
      t.sel.resize(top_k);
      t.h_act.init(qkv_types, hidden, 1);
      t.h2_act.init(ffn_in_types, hidden, 1);
      t.hf_act.init({out_w->type}, hidden, 1);
    }

    const int64_t B = max_batch;
    const int64_t S = B * top_k;  // (token, expert) slots
    PX.resize(B * hidden);
    PH.resize(B * hidden);
    PQKV.resize(B * nqkv);
    PATT.resize(B * nq);
    PRL.resize(B * n_exp);
    PG.resize(S * ffn);
    PU.resize(S * ffn);
    PY.resize(S * hidden);
    PCS.resize(B * hd);
    PSEQ.resize(B);
    PPOS.resize(B);
    PW.resize(S);
    PSEL.resize(S);
    PSLOT.resize(S);
    PTOK.resize(S);
    PBEGIN.resize(n_exp + 1);
    PACTIVE.resize(n_exp);
    PUNIT.resize(nth + 1);
    p_h_act.init(qkv_types, hidden, B);
    p_att_act.init(wo_types, nq, B);
    p_h2_act.init(ffn_in_types, hidden, B);
    p_gh_act.init(gu_types, hidden, S);
    p_a_act.init(down_types, ffn, S);
    p_out_act.init({out_w->type}, hidden, B);
    bool gu_f32 = false;
    for (QuantType t : gu_types) gu_f32 = gu_f32 || cpu::activation_type(t) == QuantType::F32;
    if (gu_f32) PGH.resize(S * hidden);
    cursor_.assign(n_exp, 0);
  }

  float* k_base(int64_t l, int64_t seq) { return k_cache[l].get() + seq * seq_stride; }
  float* v_base(int64_t l, int64_t seq) { return v_cache[l].get() + seq * seq_stride; }

  void embed(int32_t token, float* dst) const {
    if (token < 0 || token >= vocab) {
      throw Error("token " + std::to_string(token),
                  "outside the vocabulary [0, " + std::to_string(vocab) + ")",
                  "pass token ids the model knows");
    }
    dequantize_row(w.tok_embd.type, w.tok_embd.row(token), dst, hidden);
  }

  void matvec(const TensorView& t, const uint8_t* W, int64_t r0, int64_t r1, const void* act,
              float* yout) const {
    if (r1 > r0) cpu::matvec_rows(t.type, isa, W, t.row_len(), r0, r1, act, yout);
  }

  // ------------------------------------------------------------------------------------------
  // Decode: one parallel region for the whole step.
  // ------------------------------------------------------------------------------------------
  void decode(int32_t token, float* logits) {
    if (pos >= max_ctx) {
      throw Error("decode",
                  "position " + std::to_string(pos) + " is past the KV cache (" +
                      std::to_string(max_ctx) + " positions)",
                  "raise max_context or call reset()");
    }
    embed(token, x.data());
    cpu_ops::rope_table(pos, inv_freq.data(), hd, rope_cs.data());
    // run() publishes these (its hand-off is sequentially consistent).
    for (int64_t i = 0; i < n_tickets; ++i) tickets[i].next.store(0, std::memory_order_relaxed);
    trace::Scope step(trace::Phase::DecodeStep, 1);
    pool->run([&](int ith, int n) { decode_region(ith, n, logits); });
    profiled_steps += profile ? 1 : 0;
    ++pos;
  }

  // Phase timing of decode (KTUNE_CPU_PHASES=1): thread 0 stamps the clock after each barrier,
  // so a phase's time includes waiting for its slowest thread. Printed when the engine is
  // destroyed. Off by default: the clock read costs ~20 ns per barrier.
  static constexpr int kPhases = 8;
  static constexpr const char* kPhaseNames[kPhases] = {
      "qkv", "attention", "attn-quant", "wo", "router", "gate-up+swiglu", "down+sum", "output"};
  bool profile = false;
  int64_t phase_ns[kPhases] = {};
  int64_t profiled_steps = 0;
  std::chrono::steady_clock::time_point phase_t0;

  void sync(int ith, int phase) {
    pool->barrier();
    if (profile && ith == 0) stamp(phase);
  }
  // A barrier during which this thread prefetches its first chunk of kind k (layer l).
  void sync_prefetch(int ith, int phase, int k, int64_t l, const int32_t* sel = nullptr) {
    const uint32_t token = pool->barrier_arrive();
    prefetch_first(k, l, ith, sel, prefetch_bytes);
    pool->barrier_wait(token);
    if (profile && ith == 0) stamp(phase);
  }
  void stamp(int phase) {
    const auto now = std::chrono::steady_clock::now();
    phase_ns[phase] += std::chrono::duration_cast<std::chrono::nanoseconds>(now - phase_t0).count();
    phase_t0 = now;
  }
  void print_phases() const {
    if (!profile || profiled_steps == 0) return;
    int64_t total = 0;
    for (int64_t v : phase_ns) total += v;
    std::fprintf(stderr, "cpu engine decode phases over %ld steps (%.3f ms/step):\n",
                 static_cast<long>(profiled_steps), total / 1e6 / profiled_steps);
    for (int i = 0; i < kPhases; ++i) {
      std::fprintf(stderr, "  %-16s %8.3f ms/step %5.1f %%\n", kPhaseNames[i],
                   phase_ns[i] / 1e6 / profiled_steps, 100.0 * phase_ns[i] / total);
    }
  }
  ~Impl() { print_phases(); }

  void decode_region(int ith, int n, float* logits) {
    Local& me = local[ith];
    if (profile && ith == 0) phase_t0 = std::chrono::steady_clock::now();
    // Host spans per worker, layer and phase (trace.h; one atomic load each when not tracing).
    // A span ends after the phase's closing barrier, so a worker's spans tile the step.
    trace::name_thread("cpu worker", ith);
    for (int64_t l = 0; l < layers; ++l) {
      {
        trace::Scope s(trace::Phase::Attention, static_cast<int32_t>(l));
        decode_attention(l, ith, n, me);
      }
      decode_moe(l, ith, n, me);
    }
    if (logits == nullptr) return;
    trace::Scope head(trace::Phase::Sampling);  // the output head
    cpu_ops::rmsnorm(x.data(), out_norm.data(), cfg.rms_eps, hidden, me.hf.data());
    me.hf_act.quantize_row(me.hf.data(), 0, isa);
    const uint8_t* act = me.hf_act.rows(out_w->type, me.hf.data());
    for_chunks(kOut, tickets[n_tickets - 1], ith, n, [&](int64_t r0, int64_t r1) {
      matvec(*out_w, out_w->data, r0, r1, act, logits + r0);
    });
    if (profile) sync(ith, 7);
  }

  void decode_attention(int64_t l, int ith, int n, Local& me) {
    const LayerWeights& L = w.layers[l];
    // 1. Norm + quantization, redundantly per thread; then Wq|Wk|Wv as one row list.
    cpu_ops::rmsnorm(x.data(), norms[l].attn.data(), cfg.rms_eps, hidden, me.h.data());
    me.h_act.quantize_row(me.h.data(), 0, isa);
    const Segment segs[3] = {{&L.wq, 0}, {&L.wk, nq}, {&L.wv, nq + nkv_rows}};
    for_chunks(kQkv, ticket(l, kQkv), ith, n, [&](int64_t r0, int64_t r1) {
      Lookahead la;
      la.distance = lookahead_bytes;
      for (const Segment& s : segs) {
        const int64_t a = std::max(r0, s.row0) - s.row0;
        const int64_t b = std::min(r1, s.row0 + s.w->n_rows()) - s.row0;
        if (b > a) la.add(s.w->data + a * s.w->row_stride(), (b - a) * s.w->row_stride());
      }
      for (const Segment& s : segs) {
        const int64_t a = std::max(r0, s.row0) - s.row0;
        const int64_t b = std::min(r1, s.row0 + s.w->n_rows()) - s.row0;
        matvec_la(*s.w, s.w->data, a, b, me.h_act.rows(s.w->type, me.h.data()),
                  qkv.data() + s.row0 + a, la);
      }
    });
    {
      const uint32_t token = pool->barrier_arrive();
      if (kv_prefetch_bytes > 0 && pos > 0) {
        // The cached K then V rows of this thread's first kv group, read by attention next.
        int64_t ha, hb;
        cpu_ops::split(n_heads, ith, n, 1, &ha, &hb);
        if (hb > ha) {
          const int64_t kvh = ha / group;
          const int64_t bytes = pos * hd * static_cast<int64_t>(sizeof(float));
          const auto* kp = reinterpret_cast<const uint8_t*>(k_base(l, cur) + kvh * max_ctx * hd);
          const auto* vp = reinterpret_cast<const uint8_t*>(v_base(l, cur) + kvh * max_ctx * hd);
          const int64_t left = prefetch(kp, bytes, kv_prefetch_bytes / 2);
          prefetch(vp, bytes, kv_prefetch_bytes / 2 + left);
        }
      }
      prefetch_first(kWo, l, ith, nullptr, prefetch_bytes);
      pool->barrier_wait(token);
      if (profile && ith == 0) stamp(0);  // qkv
    }

    // 2. Heads. The current token's k (normed, roped) and v are needed by every q head of the
    // group: each head's thread recomputes k locally (hd elements), and the thread that owns
    // the kv head by index stores k and v into the cache for the next steps.
    float* kc = k_base(l, cur);
    float* vc = v_base(l, cur);
    int64_t h0, h1;
    cpu_ops::split(n_heads, ith, n, 1, &h0, &h1);
    // This thread's heads, one kv group at a time so each cache row is read once per group.
    for (int64_t h = h0; h < h1;) {
      const int64_t kvh = h / group;
      const int64_t he = std::min(h1, (kvh + 1) * group);
      const int m = static_cast<int>(he - h);
      float* k = me.k.data();
      cpu_ops::rmsnorm(qkv.data() + nq + kvh * hd, norms[l].k.data(), cfg.rms_eps, hd, k);
      cpu_ops::rope_neox(k, rope_cs.data(), hd);
      for (int j = 0; j < m; ++j) {
        float* q = me.q.data() + j * hd;
        cpu_ops::rmsnorm(qkv.data() + (h + j) * hd, norms[l].q.data(), cfg.rms_eps, hd, q);
        cpu_ops::rope_neox(q, rope_cs.data(), hd);
        me.qp[j] = q;
        me.op[j] = attn.data() + (h + j) * hd;
      }
      const float* v = qkv.data() + nq + nkv_rows + kvh * hd;
      cpu_ops::attend_group(ops, me.qp.data(), m, kc + kvh * max_ctx * hd, vc + kvh * max_ctx * hd,
                            hd, pos, k, v, hd, scale, me.scores.data(), me.op.data());
      if (attn_q_by_head) attn_act.quantize(attn.data() + h * hd, 0, h * hd, he * hd, isa);
      h = he;
    }
    int64_t g0, g1;
    cpu_ops::split(n_kv, ith, n, 1, &g0, &g1);
    for (int64_t kvh = g0; kvh < g1; ++kvh) {
      float* kdst = kc + (kvh * max_ctx + pos) * hd;
      cpu_ops::rmsnorm(qkv.data() + nq + kvh * hd, norms[l].k.data(), cfg.rms_eps, hd, kdst);
      cpu_ops::rope_neox(kdst, rope_cs.data(), hd);
      std::memcpy(vc + (kvh * max_ctx + pos) * hd, qkv.data() + nq + nkv_rows + kvh * hd,
                  hd * sizeof(float));
    }
    sync(ith, 1);  // attention
    if (!attn_q_by_head) {
      // Head dims that are not whole blocks: quantize by block ranges after all heads are done.
      const int64_t blk = attn_act.block();
      int64_t c0, c1;
      cpu_ops::split(nq, ith, n, blk, &c0, &c1);
      if (c1 > c0) attn_act.quantize(attn.data() + c0, 0, c0, c1, isa);
      sync(ith, 2);  // attn-quant
    }

    // 3. Wo; each thread adds its own rows into the residual.
    const uint8_t* wo_act = attn_act.rows(L.wo.type, attn.data());
    for_chunks(kWo, ticket(l, kWo), ith, n, [&](int64_t r0, int64_t r1) {
      float* o = y.data();  // y is free until the MoE's down projection
      Lookahead la;
      la.distance = lookahead_bytes;
      la.add(L.wo.data + r0 * L.wo.row_stride(), (r1 - r0) * L.wo.row_stride());
      matvec_la(L.wo, L.wo.data, r0, r1, wo_act, o + r0, la);
      for (int64_t r = r0; r < r1; ++r) x[r] += o[r];
    });
    sync_prefetch(ith, 3, kRouter, l);  // wo
  }

  void decode_moe(int64_t l, int ith, int n, Local& me) {
    const LayerWeights& L = w.layers[l];
    {
      trace::Scope s(trace::Phase::Router, static_cast<int32_t>(l));
      // 4. Norm + quantization (router and experts' forms) per thread; router rows.
      cpu_ops::rmsnorm(x.data(), norms[l].ffn.data(), cfg.rms_eps, hidden, me.h2.data());
      me.h2_act.quantize_row(me.h2.data(), 0, isa);
      const uint8_t* r_act = me.h2_act.rows(L.router.type, me.h2.data());
      for_chunks(kRouter, ticket(l, kRouter), ith, n, [&](int64_t r0, int64_t r1) {
        matvec(L.router, L.router.data, r0, r1, r_act, rlog.data() + r0);
      });
      sync(ith, 4);  // router
    }
    trace::Scope experts(trace::Phase::MoeCpu, static_cast<int32_t>(l));

    // 5. Top-k (each thread its own identical copy), then gate+up+SwiGLU over (expert, unit).
    int32_t* sel = me.sel.data();
    float* wsel = me.wsel.data();
    cpu_ops::route_topk(rlog.data(), n_exp, top_k, cfg.norm_topk_prob, me.probs.data(), sel, wsel);
    if (ith == 0) {
      for (int64_t j = 0; j < top_k; ++j) ++counts[l][sel[j]];
    }
    const uint8_t* gate_act = me.h2_act.rows(L.gate_exps.type, me.h2.data());
    const uint8_t* up_act = me.h2_act.rows(L.up_exps.type, me.h2.data());
    for_chunks(kGateUp, ticket(l, kGateUp), ith, n, [&](int64_t u0, int64_t u1) {
      Lookahead la;
      la.distance = lookahead_bytes;
      for (int64_t v0 = u0; la.distance > 0 && v0 < u1;) {
        const int64_t j = v0 / units_per_expert;
        const int64_t ve = std::min(u1, (j + 1) * units_per_expert);
        const int64_t a = (v0 - j * units_per_expert) * unit;
        const int64_t b = std::min(ffn, (ve - j * units_per_expert) * unit);
        la.add(L.gate_exps.matrix(sel[j]) + a * L.gate_exps.row_stride(),
               (b - a) * L.gate_exps.row_stride());
        la.add(L.up_exps.matrix(sel[j]) + a * L.up_exps.row_stride(),
               (b - a) * L.up_exps.row_stride());
        v0 = ve;
      }
      while (u0 < u1) {
        // The units of one expert in this thread's range, as one row range.
        const int64_t j = u0 / units_per_expert;
        const int64_t ue = std::min(u1, (j + 1) * units_per_expert);
        const int64_t a = (u0 - j * units_per_expert) * unit;
        const int64_t b = std::min(ffn, (ue - j * units_per_expert) * unit);
        float* gj = g.data() + j * ffn;
        float* uj = u.data() + j * ffn;
        matvec_la(L.gate_exps, L.gate_exps.matrix(sel[j]), a, b, gate_act, gj + a, la);
        matvec_la(L.up_exps, L.up_exps.matrix(sel[j]), a, b, up_act, uj + a, la);
        for (int64_t i = a; i < b; ++i) gj[i] = cpu_ops::silu(gj[i]) * uj[i];
        act_d.quantize(gj + a, j, a, b, isa);
        u0 = ue;
      }
    });
    sync_prefetch(ith, 5, kDown, l, sel);  // gate-up

    // 6. Down rows of every selected expert; each thread sums its rows into x in expert order.
    for_chunks(kDown, ticket(l, kDown), ith, n, [&](int64_t r0, int64_t r1) {
      Lookahead la;
      la.distance = lookahead_bytes;
      const int64_t rb = L.down_exps.row_stride();
      for (int64_t j = 0; j < top_k; ++j) {
        la.add(L.down_exps.matrix(sel[j]) + r0 * rb, (r1 - r0) * rb);
      }
      for (int64_t j = 0; j < top_k; ++j) {
        const uint8_t* a = act_d.rows(L.down_exps.type, g.data());
        a += j * act_d.stride(L.down_exps.type);
        matvec_la(L.down_exps, L.down_exps.matrix(sel[j]), r0, r1, a, y.data() + j * hidden + r0,
                  la);
      }
      for (int64_t r = r0; r < r1; ++r) {
        float s = 0.0f;
        for (int64_t j = 0; j < top_k; ++j) s += wsel[j] * y[j * hidden + r];
        x[r] += s;
      }
    });
    if (l + 1 < layers) {
      sync_prefetch(ith, 6, kQkv, l + 1);  // down
    } else {
      sync_prefetch(ith, 6, kOut, l);
    }
  }

  // ------------------------------------------------------------------------------------------
  // Prefill: T <= max_batch tokens at positions pos..pos+T-1, one parallel region.
  // ------------------------------------------------------------------------------------------
  void prefill_chunk(const int32_t* tokens, int64_t T, float* logits, bool all_positions) {
    for (int64_t t = 0; t < T; ++t) {
      embed(tokens[t], PX.data() + t * hidden);
      PSEQ[t] = cur;
      PPOS[t] = pos + t;
      cpu_ops::rope_table(pos + t, inv_freq.data(), hd, PCS.data() + t * hd);
    }
    trace::Scope step(trace::Phase::PrefillStep, static_cast<int32_t>(T));
    pool->run([&](int ith, int n) { prefill_region(T, logits, all_positions, ith, n); });
    pos += T;
  }

  // One token for each of the sequences 0..B-1, through the prefill region.
  void decode_batch(const int32_t* tokens, int64_t B, float* logits) {
    if (B < 1 || B > max_seq) {
      throw Error("decode_batch",
                  std::to_string(B) + " sequences, but the engine has " +
                      std::to_string(max_seq),
                  "create the engine with max_sequences >= the batch");
    }
    seq_pos[static_cast<size_t>(cur)] = pos;
    for (int64_t b = 0; b < B; ++b) {
      if (seq_pos[static_cast<size_t>(b)] >= max_ctx) {
        throw Error("decode_batch",
                    "sequence " + std::to_string(b) + " is at position " +
                        std::to_string(seq_pos[static_cast<size_t>(b)]) +
                        ", past the KV cache (" + std::to_string(max_ctx) + " positions)",
                    "raise max_context or call reset()");
      }
      embed(tokens[b], PX.data() + b * hidden);  // throws for a token outside the vocabulary
    }
    for (int64_t b = 0; b < B; ++b) {
      PSEQ[b] = b;
      PPOS[b] = seq_pos[static_cast<size_t>(b)];
      cpu_ops::rope_table(PPOS[b], inv_freq.data(), hd, PCS.data() + b * hd);
    }
    trace::Scope step(trace::Phase::DecodeStep, static_cast<int32_t>(B));
    pool->run([&](int ith, int n) { prefill_region(B, logits, true, ith, n); });
    for (int64_t b = 0; b < B; ++b) ++seq_pos[static_cast<size_t>(b)];
    pos = seq_pos[static_cast<size_t>(cur)];
  }

  // Matrix rows [r0, r1) of t for T activation rows; Y rows ldy floats apart.
  void matmul(const TensorView& t, const uint8_t* W, int64_t r0, int64_t r1, const uint8_t* act,
              int64_t act_stride, int64_t T, float* Y, int64_t ldy) const {
    if (r1 > r0 && T > 0) {
      cpu::matmul_rows(t.type, isa, W, t.row_len(), r0, r1, act, act_stride, T, Y, ldy);
    }
  }

  void prefill_region(int64_t T, float* logits, bool all_positions, int ith, int n) {
    trace::name_thread("cpu worker", ith);
    for (int64_t l = 0; l < layers; ++l) {
      {
        trace::Scope s(trace::Phase::Attention, static_cast<int32_t>(l));
        prefill_attention(l, T, ith, n);
      }
      trace::Scope s(trace::Phase::MoeCpu, static_cast<int32_t>(l));  // router included
      prefill_moe(l, T, ith, n);
    }
    if (logits == nullptr) return;
    const int64_t first = all_positions ? 0 : T - 1;
    const int64_t rows = T - first;
    int64_t t0, t1;
    cpu_ops::split(rows, ith, n, 1, &t0, &t1);
    for (int64_t t = t0; t < t1; ++t) {
      float* h = PH.data() + t * hidden;
      cpu_ops::rmsnorm(PX.data() + (first + t) * hidden, out_norm.data(), cfg.rms_eps, hidden, h);
      p_out_act.quantize_row(h, t, isa);
    }
    pool->barrier();
    int64_t r0, r1;
    cpu_ops::split(vocab, ith, n, kRowAlign, &r0, &r1);
    matmul(*out_w, out_w->data, r0, r1, p_out_act.rows(out_w->type, PH.data()),
           p_out_act.stride(out_w->type), rows, logits, vocab);
  }

  void prefill_attention(int64_t l, int64_t T, int ith, int n) {
    const LayerWeights& L = w.layers[l];
    int64_t t0, t1;
    cpu_ops::split(T, ith, n, 1, &t0, &t1);
    for (int64_t t = t0; t < t1; ++t) {
      float* h = PH.data() + t * hidden;
      cpu_ops::rmsnorm(PX.data() + t * hidden, norms[l].attn.data(), cfg.rms_eps, hidden, h);
      p_h_act.quantize_row(h, t, isa);
    }
    pool->barrier();

    int64_t r0, r1;
    cpu_ops::split(nqkv, ith, n, kRowAlign, &r0, &r1);
    const Segment segs[3] = {{&L.wq, 0}, {&L.wk, nq}, {&L.wv, nq + nkv_rows}};
    for (const Segment& s : segs) {
      const int64_t a = std::max(r0, s.row0) - s.row0;
      const int64_t b = std::min(r1, s.row0 + s.w->n_rows()) - s.row0;
      matmul(*s.w, s.w->data, a, b, p_h_act.rows(s.w->type, PH.data()), p_h_act.stride(s.w->type),
             T, PQKV.data() + s.row0, nqkv);
    }
    pool->barrier();

    // q/k norms and RoPE over (token, head) items; k and v go to each token's sequence's cache.
    const int64_t heads_all = n_heads + n_kv;
    int64_t i0, i1;
    cpu_ops::split(T * heads_all, ith, n, 1, &i0, &i1);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / heads_all;
      const int64_t h = i % heads_all;
      float* row = PQKV.data() + t * nqkv;
      const float* cs = PCS.data() + t * hd;
      if (h < n_heads) {
        float* q = row + h * hd;
        cpu_ops::rmsnorm(q, norms[l].q.data(), cfg.rms_eps, hd, q);
        cpu_ops::rope_neox(q, cs, hd);
      } else {
        const int64_t kvh = h - n_heads;
        float* kdst = k_base(l, PSEQ[t]) + (kvh * max_ctx + PPOS[t]) * hd;
        cpu_ops::rmsnorm(row + nq + kvh * hd, norms[l].k.data(), cfg.rms_eps, hd, kdst);
        cpu_ops::rope_neox(kdst, cs, hd);
        std::memcpy(v_base(l, PSEQ[t]) + (kvh * max_ctx + PPOS[t]) * hd,
                    row + nq + nkv_rows + kvh * hd, hd * sizeof(float));
      }
    }
    pool->barrier();

    // Attention over (token, kv group) items, interleaved across threads so that long (late)
    // and short (early) tokens mix.
    Local& me = local[ith];
    for (int64_t i = ith; i < T * n_kv; i += n) {
      const int64_t t = i / n_kv;
      const int64_t kvh = i % n_kv;
      const int64_t h = kvh * group;
      for (int64_t j = 0; j < group; ++j) {
        me.qp[j] = PQKV.data() + t * nqkv + (h + j) * hd;
        me.op[j] = PATT.data() + t * nq + (h + j) * hd;
      }
      cpu_ops::attend_group(ops, me.qp.data(), static_cast<int>(group),
                            k_base(l, PSEQ[t]) + kvh * max_ctx * hd,
                            v_base(l, PSEQ[t]) + kvh * max_ctx * hd, hd, PPOS[t] + 1, nullptr,
                            nullptr, hd, scale, me.scores.data(), me.op.data());
      if (attn_q_by_head) {
        p_att_act.quantize(PATT.data() + t * nq + h * hd, t, h * hd, (h + group) * hd, isa);
      }
    }
    pool->barrier();
    if (!attn_q_by_head) {
      for (int64_t t = t0; t < t1; ++t) p_att_act.quantize_row(PATT.data() + t * nq, t, isa);
      pool->barrier();
    }

    // Wo; each thread adds its rows into the residual of every token.
    cpu_ops::split(hidden, ith, n, kRowAlign, &r0, &r1);
    matmul(L.wo, L.wo.data, r0, r1, p_att_act.rows(L.wo.type, PATT.data()),
           p_att_act.stride(L.wo.type), T, PH.data(), hidden);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t r = r0; r < r1; ++r) PX[t * hidden + r] += PH[t * hidden + r];
    }
    pool->barrier();
  }

  void prefill_moe(int64_t l, int64_t T, int ith, int n) {
    const LayerWeights& L = w.layers[l];
    int64_t t0, t1;
    cpu_ops::split(T, ith, n, 1, &t0, &t1);
    for (int64_t t = t0; t < t1; ++t) {
      float* h = PH.data() + t * hidden;
      cpu_ops::rmsnorm(PX.data() + t * hidden, norms[l].ffn.data(), cfg.rms_eps, hidden, h);
      p_h2_act.quantize_row(h, t, isa);
    }
    pool->barrier();

    int64_t r0, r1;
    cpu_ops::split(n_exp, ith, n, 1, &r0, &r1);
    matmul(L.router, L.router.data, r0, r1, p_h2_act.rows(L.router.type, PH.data()),
           p_h2_act.stride(L.router.type), T, PRL.data(), n_exp);
    pool->barrier();

    for (int64_t t = t0; t < t1; ++t) {
      cpu_ops::route_topk(PRL.data() + t * n_exp, n_exp, top_k, cfg.norm_topk_prob,
                          local[ith].probs.data(), PSEL.data() + t * top_k, PW.data() + t * top_k);
    }
    pool->barrier();

    // Group (token, expert) pairs by expert (runtime/grouped_moe.h), then balance the thread
    // ranges over (active expert, unit) items by token count.
    if (ith == 0) {
      p_n_active = rt::group_by_expert(PSEL.data(), T, top_k, n_exp, PBEGIN.data(),
                                       PACTIVE.data(), PSLOT.data(), PTOK.data(), cursor_.data(),
                                       counts[l].data());
      balance_units(n);
    }
    pool->barrier();

    // Gather each slot's activation rows (gate/up forms) so an expert's tokens are contiguous.
    float* gh = PGH.size() > 0 ? PGH.data() : nullptr;
    int64_t s0, s1;
    cpu_ops::split(T * top_k, ith, n, 1, &s0, &s1);
    rt::gather_slot_rows(s0, s1, PTOK.data(), PH.data(), hidden, p_gh_act, gh, isa);
    pool->barrier();

    // Gate+up over (active expert, unit) items, ranges weighted by the expert's token count.
    const rt::GroupedExperts g{&L.gate_exps, &L.up_exps,  &L.down_exps,  PBEGIN.data(),
                               PACTIVE.data(), ffn,         unit,          units_per_expert};
    auto mm = [this](auto&&... a) { matmul(a...); };
    rt::gate_up_items(g, PUNIT[ith], PUNIT[ith + 1], p_gh_act, gh, PG.data(), PU.data(), p_a_act,
                      isa, mm);
    pool->barrier();

    // Down over hidden rows for every active expert; then each thread combines its rows.
    cpu_ops::split(hidden, ith, n, kRowAlign, &r0, &r1);
    if (r1 > r0) {
      rt::down_rows(g, p_n_active, r0, r1, p_a_act, PG.data(), hidden, PY.data(), mm);
      rt::combine_rows(T, top_k, hidden, r0, r1, PW.data(), PSLOT.data(), PY.data(), nullptr,
                       PX.data());
    }
    pool->barrier();
  }

  // Thread ranges PUNIT[th]..PUNIT[th+1) over the (active expert, unit) items of the grouping,
  // balanced by the experts' token counts.
  void balance_units(int n) {
    const int32_t* begin = PBEGIN.data();
    const int64_t items = p_n_active * units_per_expert;
    int64_t total = 0;
    for (int64_t i = 0; i < p_n_active; ++i) {
      const int64_t e = PACTIVE[i];
      total += (begin[e + 1] - begin[e]) * units_per_expert;
    }
    int64_t acc = 0;
    int th = 0;
    PUNIT[0] = 0;
    for (int64_t it = 0; it < items; ++it) {
      const int64_t e = PACTIVE[it / units_per_expert];
      // Item `it` goes to the thread whose share contains the midpoint of its cost.
      const int64_t cost = begin[e + 1] - begin[e];
      const int64_t mid2 = 2 * acc + cost;  // 2 * midpoint
      while (th + 1 < n && mid2 * n >= 2 * total * (th + 1)) PUNIT[++th] = static_cast<int32_t>(it);
      acc += cost;
    }
    while (th < n) PUNIT[++th] = static_cast<int32_t>(items);
  }
  void prefill(const int32_t* tokens, int64_t n_tok, std::vector<float>* logits,
               bool all_positions) {
    rt::prefill_in_chunks(
        tokens, n_tok, pos, max_ctx, vocab, max_batch, logits, all_positions,
        [&](int32_t t) {
          if (t < 0 || t >= vocab) embed(t, PX.data());  // throws
        },
        [&](const int32_t* tk, int64_t T, float* out, bool all) {
          prefill_chunk(tk, T, out, all);
        });
  }
};

CpuEngine::CpuEngine(const ModelWeights& weights, const CpuEngineOptions& opt) {
  if (weights.cfg.is_deepseek2()) {
    deepseek_ = std::make_unique<DeepseekCpuEngine>(weights, opt);
  } else {
    impl_ = std::make_unique<Impl>(weights, opt);
  }
}

CpuEngine::~CpuEngine() = default;

void CpuEngine::reset() {
  if (deepseek_) return deepseek_->reset();
  impl_->pos = 0;
  std::fill(impl_->seq_pos.begin(), impl_->seq_pos.end(), 0);
}
int64_t CpuEngine::position() const { return deepseek_ ? deepseek_->position() : impl_->pos; }
int64_t CpuEngine::position(int64_t seq) const {
  if (deepseek_) return deepseek_->position(seq);
  if (seq == impl_->cur) return position();
  return impl_->seq_pos.at(static_cast<size_t>(seq));
}
int64_t CpuEngine::max_sequences() const {
  return deepseek_ ? deepseek_->max_sequences() : impl_->max_seq;
}

void CpuEngine::set_sequence(int64_t seq) {
  if (seq < 0 || seq >= max_sequences()) {
    throw Error("sequence " + std::to_string(seq),
                "outside [0, " + std::to_string(max_sequences()) + ")",
                "create the engine with more max_sequences");
  }
  if (deepseek_) return deepseek_->set_sequence(seq);
  Impl& m = *impl_;
  m.seq_pos[static_cast<size_t>(m.cur)] = m.pos;
  m.cur = seq;
  m.pos = m.seq_pos[static_cast<size_t>(seq)];
}

void CpuEngine::decode_batch(const int32_t* tokens, int64_t n, std::vector<float>* logits) {
  if (deepseek_) return deepseek_->decode_batch(tokens, n, logits);
  if (n == 1) {
    set_sequence(0);
    return decode(tokens[0], logits);
  }
  float* out = nullptr;
  if (logits) {
    logits->resize(static_cast<size_t>(n * impl_->vocab));
    out = logits->data();
  }
  impl_->decode_batch(tokens, n, out);
}

void CpuEngine::prefill(const int32_t* tokens, int64_t n, std::vector<float>* logits,
                        bool all_positions) {
  if (deepseek_) return deepseek_->prefill(tokens, n, logits, all_positions);
  impl_->prefill(tokens, n, logits, all_positions);
}

void CpuEngine::decode(int32_t token, std::vector<float>* logits) {
  if (deepseek_) return deepseek_->decode(token, logits);
  float* out = nullptr;
  if (logits) {
    logits->resize(impl_->vocab);  // no allocation once the caller's vector has the capacity
    out = logits->data();
  }
  impl_->decode(token, out);
}

int32_t CpuEngine::argmax(const float* logits, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i) {
    if (logits[i] > logits[best]) best = i;  // strict: ties keep the lowest index
  }
  return static_cast<int32_t>(best);
}

int CpuEngine::threads() const { return deepseek_ ? deepseek_->threads() : impl_->nth; }
cpu::Isa CpuEngine::isa() const { return deepseek_ ? deepseek_->isa() : impl_->isa; }
const ModelWeights& CpuEngine::weights() const {
  return deepseek_ ? deepseek_->weights() : impl_->w;
}
const std::vector<std::vector<uint64_t>>& CpuEngine::expert_counts() const {
  return deepseek_ ? deepseek_->expert_counts() : impl_->counts;
}

}  // namespace ktune
