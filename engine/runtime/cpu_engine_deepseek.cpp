// The deepseek2 CPU engine (see cpu_engine_deepseek.h for the method and its choices).
//
// One forward pass runs T tokens (a prefill chunk, or T = 1 for decode) in ONE parallel region.
// Per layer:
//   attention: norm + activation forms per token | q_a (or q) and kv_a rows | q_a norm, latent
//   norm + roped key into the cache | q_b rows | absorbed attention over (token, heads) items |
//   output activation forms | attn_output rows, added to the residual
//   FFN: norm + forms | router and shared-expert gate/up rows (or the dense gate/up) | routing
//   and SwiGLU | grouping by expert | gathered expert inputs | expert gate/up + SwiGLU over
//   (expert, row unit) items | down rows of the experts, shared expert (or dense FFN), summed
//   into the residual
// with a barrier between phases. Matrix phases split rows into fixed ranges per thread; each
// output element is computed by one thread in a fixed order.
#include "runtime/cpu_engine_deepseek.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <string>

#include "ktune/engine/error.h"
#include "ktune/engine/thread_pool.h"
#include "runtime/act_buffers.h"
#include "runtime/grouped_moe.h"
#include "runtime/cpu_ops.h"
#include "runtime/prefill_chunks.h"

namespace ktune {

namespace {

constexpr int64_t kRowAlign = 16;  // rows per unit of a thread's share of a matrix
constexpr double kPi = 3.14159265358979323846;

// mscale of YaRN (Hugging Face's yarn_get_mscale / get_mscale).
double yarn_mscale(double factor, double m) {
  return factor <= 1.0 ? 1.0 : 0.1 * m * std::log(factor) + 1.0;
}

// One input (T rows of n floats) in every activation form its consumers multiply with.
using ActForms = rt::ActBuffers;

// One matrix of a list of matrices that read the same input, each writing its own output.
struct Seg {
  const TensorView* t = nullptr;
  float* y = nullptr;
  int64_t ldy = 0;
};

}  // namespace

DeepseekRope deepseek_rope(const ModelConfig& c) {
  DeepseekRope r;
  const int64_t d = c.rope_dim, half = d / 2;
  r.inv_freq.resize(static_cast<size_t>(half));
  const float base = c.rope_theta;
  std::vector<float> pos_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    // torch: base ** (arange(0, d, 2).float() / d), all in float32.
    pos_freq[i] = std::pow(base, static_cast<float>(2 * i) / static_cast<float>(d));
    r.inv_freq[i] = 1.0f / pos_freq[i];
  }
  double scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));
  if (c.rope_scaling == RopeScaling::Yarn) {
    const double f = c.rope_factor;
    // Correction range: the dims whose wavelength fits beta_fast (low) and beta_slow (high)
    // rotations in the original context, floored and ceiled, clamped to [0, d - 1].
    auto correction_dim = [&](double rotations) {
      return (static_cast<double>(d) *
              std::log(static_cast<double>(c.rope_orig_context) / (rotations * 2.0 * kPi))) /
             (2.0 * std::log(static_cast<double>(base)));
    };
    double low = std::max(0.0, std::floor(correction_dim(c.yarn_beta_fast)));
    double high = std::min(static_cast<double>(d - 1), std::ceil(correction_dim(c.yarn_beta_slow)));
    if (low == high) high += 0.001;
    for (int64_t i = 0; i < half; ++i) {
      const float ramp =
          std::clamp(static_cast<float>((static_cast<float>(i) - low) / (high - low)), 0.0f, 1.0f);
      const float extrapolate = 1.0f - ramp;  // weight of the unscaled frequency
      const float interpolated = 1.0f / (static_cast<float>(f) * pos_freq[i]);
      r.inv_freq[i] = interpolated * (1.0f - extrapolate) + r.inv_freq[i] * extrapolate;
    }
    const double af = c.yarn_mscale != 0.0f && c.yarn_mscale_all_dim != 0.0f
                          ? yarn_mscale(f, c.yarn_mscale) / yarn_mscale(f, c.yarn_mscale_all_dim)
                          : yarn_mscale(f, 1.0);
    r.cos_sin_scale = static_cast<float>(af);
    if (c.yarn_mscale_all_dim != 0.0f) {
      const double m = yarn_mscale(f, c.yarn_mscale_all_dim);
      scale *= m * m;
    }
  }
  r.softmax_scale = static_cast<float>(scale);
  return r;
}

struct DeepseekCpuEngine::Impl {
  const ModelWeights& w;
  const ModelConfig& c;
  CpuEngineOptions opt;
  cpu::Isa isa;
  cpu_ops::VecOps ops;
  std::unique_ptr<ThreadPool> pool;
  int nth = 1;

  int64_t H, nh, dq, dn, dr, dv, rq, rkv, lat, E, K, F, Fs, Fd, V, L;
  int64_t Fmax;  // rows of G and U (and of act_d): the dense FFN's or the shared experts' width
  int64_t max_ctx, B, S;  // S: (token, expert) slots of a chunk
  int64_t pos = 0;  // of the current sequence `cur` (seq_pos[cur] is stale meanwhile)
  int64_t max_seq = 1, cur = 0;
  std::vector<int64_t> seq_pos;
  std::vector<int64_t> TSEQ, TPOS;  // sequence and position of each token of the chunk
  DeepseekRope rope;
  const TensorView* out_w = nullptr;

  struct LayerConst {
    std::vector<float> attn_norm, ffn_norm, q_a_norm, kv_a_norm, bias;
  };
  std::vector<LayerConst> lc;
  std::vector<float> out_norm;
  std::vector<std::vector<float>> cache;  // [layer][sequence][position][latent | roped key]
  std::vector<std::vector<uint64_t>> counts;

  // Chunk scratch (B tokens, S slots); each element written by one thread per phase.
  std::vector<float> X, HN, QA, Q, KVA, CS, O, Y, RL, G, U, PW, PGH, PG, PU, PY;
  std::vector<int32_t> PSEL, PSLOT, PTOK, PBEGIN, PACTIVE;
  int64_t n_active = 0;
  ActForms act_h, act_qa, act_o, act_f, act_d, act_g, act_e;
  int64_t unit = 32, units_per_expert = 1;  // expert gate/up work items

  struct Local {
    std::vector<float> qh, out, scores, tmp, route;
    std::vector<uint8_t> qn_act, ctx_act;
    std::vector<int32_t> cursor;
    std::vector<const float*> qp;
    std::vector<float*> op;
  };
  std::vector<Local> local;

  Impl(const ModelWeights& weights, const CpuEngineOptions& o)
      : w(weights), c(weights.cfg), opt(o), isa(o.isa), ops(cpu_ops::vec_ops(o.isa)) {
    c.validate("model " + w.source);
    H = c.hidden;
    nh = c.n_heads;
    dq = c.head_dim;
    dr = c.rope_dim;
    dn = dq - dr;
    dv = c.v_head_dim;
    rq = c.q_lora_rank;
    rkv = c.kv_lora_rank;
    lat = rkv + dr;
    E = c.n_experts;
    K = c.n_experts_used;
    F = c.expert_ffn;
    Fs = c.shared_ffn();
    Fd = c.dense_ffn;
    Fmax = std::max<int64_t>(1, std::max(Fd, Fs));
    V = c.vocab;
    L = c.n_layers;
    max_ctx = std::max<int64_t>(1, opt.max_context);
    B = std::max<int64_t>(1, std::min(opt.max_batch, max_ctx));
    if (opt.max_sequences < 1 || opt.max_sequences > 4096) {
      throw Error("max_sequences", std::to_string(opt.max_sequences) + " is not 1..4096",
                  "ask for 1 to 4096 sequences");
    }
    max_seq = opt.max_sequences;
    B = std::max(B, max_seq);  // a batched decode step is one chunk
    seq_pos.assign(static_cast<size_t>(max_seq), 0);
    TSEQ.assign(static_cast<size_t>(B), 0);
    TPOS.assign(static_cast<size_t>(B), 0);
    S = B * std::max<int64_t>(K, 1);
    if (static_cast<int64_t>(w.layers.size()) != L) {
      throw Error(
          "model " + w.source,
          "has " + std::to_string(w.layers.size()) + " layers, config says " + std::to_string(L),
          "use a complete model");
    }
    check_shapes();
    rope = deepseek_rope(c);
    cache.resize(static_cast<size_t>(L));
    for (auto& layer : cache) layer.resize(static_cast<size_t>(max_seq * max_ctx * lat));
    counts.assign(static_cast<size_t>(L), std::vector<uint64_t>(static_cast<size_t>(E), 0));
    pool = std::make_unique<ThreadPool>(opt.threads, opt.pin_threads);
    nth = pool->size();
    allocate();
  }

  // ---- construction ----

  std::vector<float> vec_of(const TensorView& t, int64_t n, const std::string& what) const {
    if (t.data == nullptr || t.row_len() != n || t.n_rows() != 1) {
      throw Error(t.name.empty() ? what : t.name,
                  "missing or has " + std::to_string(t.row_len()) + " elements, expected " +
                      std::to_string(n),
                  "use a deepseek2 model whose tensors match its configuration");
    }
    std::vector<float> v(static_cast<size_t>(n));
    dequantize_row(t.type, t.data, v.data(), n);
    return v;
  }

  void check(const TensorView& t, int64_t row_len, int64_t rows, const std::string& what) const {
    if (t.data == nullptr || t.row_len() != row_len || t.n_rows() != rows) {
      throw Error(t.name.empty() ? what : t.name,
                  "missing or shaped [" + std::to_string(t.ne[0]) + ", " + std::to_string(t.ne[1]) +
                      ", " + std::to_string(t.ne[2]) + "], expected " + std::to_string(row_len) +
                      " x " + std::to_string(rows),
                  "use a deepseek2 model whose tensors match its configuration");
    }
    cpu::vec_dot(t.type, isa);  // throws for a type the CPU kernels cannot multiply
  }

  void check_shapes() {
    if (w.tok_embd.data == nullptr || w.tok_embd.row_len() != H || w.tok_embd.n_rows() != V) {
      throw Error("token_embd", "missing or not [hidden, vocab]",
                  "use a deepseek2 model whose tensors match its configuration");
    }
    out_w = w.output.data ? &w.output : &w.tok_embd;
    check(*out_w, H, V, "output");
    out_norm = vec_of(w.output_norm, H, "output_norm");
    lc.resize(static_cast<size_t>(L));
    for (int64_t l = 0; l < L; ++l) {
      const LayerWeights& t = w.layers[l];
      const std::string b = "blk." + std::to_string(l) + ".";
      LayerConst& k = lc[l];
      k.attn_norm = vec_of(t.attn_norm, H, b + "attn_norm");
      k.ffn_norm = vec_of(t.ffn_norm, H, b + "ffn_norm");
      k.kv_a_norm = vec_of(t.kv_a_norm, rkv, b + "attn_kv_a_norm");
      if (rq > 0) {
        k.q_a_norm = vec_of(t.q_a_norm, rq, b + "attn_q_a_norm");
        check(t.wq_a, H, rq, b + "attn_q_a");
        check(t.wq_b, rq, nh * dq, b + "attn_q_b");
      } else {
        check(t.wq, H, nh * dq, b + "attn_q");
      }
      check(t.wkv_a, H, lat, b + "attn_kv_a_mqa");
      if (c.split_kv_b) {
        check(t.wk_b, dn, rkv * nh, b + "attn_k_b");
        check(t.wv_b, rkv, dv * nh, b + "attn_v_b");
      } else {
        check(t.wkv_b, rkv, nh * (dn + dv), b + "attn_kv_b");
      }
      check(t.wo, nh * dv, H, b + "attn_output");
      if (c.is_dense_layer(l)) {
        check(t.ffn_gate, H, Fd, b + "ffn_gate");
        check(t.ffn_up, H, Fd, b + "ffn_up");
        check(t.ffn_down, Fd, H, b + "ffn_down");
        continue;
      }
      check(t.router, H, E, b + "ffn_gate_inp");
      if (c.expert_score_bias) k.bias = vec_of(t.exp_probs_b, E, b + "exp_probs_b");
      check(t.gate_exps, H, F * E, b + "ffn_gate_exps");
      check(t.up_exps, H, F * E, b + "ffn_up_exps");
      check(t.down_exps, F, H * E, b + "ffn_down_exps");
      if (Fs > 0) {
        check(t.gate_shexp, H, Fs, b + "ffn_gate_shexp");
        check(t.up_shexp, H, Fs, b + "ffn_up_shexp");
        check(t.down_shexp, Fs, H, b + "ffn_down_shexp");
      }
    }
  }

  // Types of the weights that read an input, over all layers (they may differ per layer).
  std::vector<QuantType> types(std::initializer_list<TensorView LayerWeights::*> members) const {
    std::vector<QuantType> t;
    for (const LayerWeights& l : w.layers) {
      for (auto m : members) {
        if ((l.*m).data != nullptr) t.push_back((l.*m).type);
      }
    }
    return t;
  }

  void allocate() {
    using LW = LayerWeights;
    X.resize(B * H);
    HN.resize(B * H);
    QA.resize(B * std::max<int64_t>(rq, 1));
    Q.resize(B * nh * dq);
    KVA.resize(B * lat);
    CS.resize(B * dr);
    O.resize(B * nh * dv);
    Y.resize(B * H);
    RL.resize(B * std::max<int64_t>(E, 1));
    G.resize(B * Fmax);
    U.resize(B * Fmax);
    PW.resize(S);
    PSEL.resize(S);
    PSLOT.resize(S);
    PTOK.resize(S);
    PBEGIN.resize(E + 1);
    PACTIVE.resize(std::max<int64_t>(E, 1));
    PG.resize(S * std::max<int64_t>(F, 1));
    PU.resize(S * std::max<int64_t>(F, 1));
    PY.resize(S * H);

    act_h.init(types({&LW::wq, &LW::wq_a, &LW::wkv_a}), H, B);
    act_qa.init(types({&LW::wq_b}), std::max<int64_t>(rq, 1), B);
    act_o.init(types({&LW::wo}), nh * dv, B);
    // The normed FFN input; the output head reads its forms too (rows of the final norm).
    std::vector<QuantType> f_types =
        types({&LW::router, &LW::gate_shexp, &LW::up_shexp, &LW::ffn_gate, &LW::ffn_up});
    f_types.push_back(out_w->type);
    act_f.init(f_types, H, B);
    act_d.init(types({&LW::down_shexp, &LW::ffn_down}), Fmax, B);
    const std::vector<QuantType> gu = types({&LW::gate_exps, &LW::up_exps});
    act_g.init(gu, H, S);
    bool gu_f32 = false;
    for (QuantType t : gu) gu_f32 = gu_f32 || cpu::activation_type(t) == QuantType::F32;
    if (gu_f32) PGH.resize(S * H);
    act_e.init(types({&LW::down_exps}), std::max<int64_t>(F, 1), S);
    // A unit of expert gate/up rows covers whole blocks of the down activation.
    const int64_t blk = act_e.block();
    unit = std::max<int64_t>(32, blk) / blk * blk;
    units_per_expert = F > 0 ? (F + unit - 1) / unit : 0;

    // Per-thread scratch for absorbed attention and routing. An activation form never takes
    // more than 4 bytes a value (F32; Q8 forms take ~1.1), so 4 bytes a value always suffice.
    local.resize(static_cast<size_t>(nth));
    for (Local& t : local) {
      t.qh.resize(nh * lat);
      t.out.resize(nh * lat);
      t.scores.resize(nh * (max_ctx + 1));
      t.tmp.resize(std::max(rkv, dr));
      t.route.resize(2 * E + std::max<int64_t>(c.n_expert_groups, 1));
      t.cursor.resize(E);  // group_by_expert's (thread 0's is used)
      // Q8 forms are larger than the floats' row; F32 ones are the floats (4 bytes a value).
      t.qn_act.resize(static_cast<size_t>(4 * dn + 64));
      t.ctx_act.resize(static_cast<size_t>(4 * rkv + 64));
      t.qp.resize(nh);
      t.op.resize(nh);
    }
  }

  // ---- helpers ----

  void embed(int32_t token, float* dst) const {
    if (token < 0 || token >= V) {
      throw Error("token " + std::to_string(token),
                  "outside the vocabulary [0, " + std::to_string(V) + ")",
                  "pass token ids the model knows");
    }
    dequantize_row(w.tok_embd.type, w.tok_embd.row(token), dst, H);
  }

  // Rows [r0, r1) of t (matrix W) for T activation rows; Y[t * ldy + r]. T = 1 uses the matvec
  // kernel (same numbers, faster for one row).
  void mm(const TensorView& t, const uint8_t* W, int64_t r0, int64_t r1, const uint8_t* act,
          int64_t act_stride, int64_t T, float* Yout, int64_t ldy) const {
    if (r1 <= r0 || T <= 0) return;
    if (T == 1) {
      cpu::matvec_rows(t.type, isa, W, t.row_len(), r0, r1, act, Yout + r0);
    } else {
      cpu::matmul_rows(t.type, isa, W, t.row_len(), r0, r1, act, act_stride, T, Yout, ldy);
    }
  }

  // This thread's share of the concatenated rows of `segs`, all reading input `in` (floats in
  // `f32`, ld floats apart).
  void mm_segments(const Seg* segs, int count, const ActForms& in, const float* f32, int64_t T,
                   int ith, int n) const {
    int64_t total = 0;
    for (int i = 0; i < count; ++i) total += segs[i].t->n_rows();
    int64_t r0, r1;
    cpu_ops::split(total, ith, n, kRowAlign, &r0, &r1);
    int64_t base = 0;
    for (int i = 0; i < count; ++i) {
      const Seg& s = segs[i];
      const int64_t rows = s.t->n_rows();
      const int64_t a = std::max(r0, base) - base, b = std::min(r1, base + rows) - base;
      if (b > a) {
        mm(*s.t, s.t->data, a, b, in.rows(s.t->type, f32), in.stride(s.t->type), T, s.y, s.ldy);
      }
      base += rows;
    }
  }

  // The activation for a weight row of type wt from floats x[0..n): x itself, or quantized into
  // buf.
  const void* as_act(QuantType wt, const float* x, int64_t n, uint8_t* buf) const {
    if (cpu::activation_type(wt) == QuantType::F32) return x;
    cpu::quantize_activation(wt, x, buf, n, isa);
    return buf;
  }

  // q_abs = W_kb[h]^T q_nope (kv_lora_rank values).
  void absorb(const LayerWeights& t, int64_t h, const float* qn, float* qabs, Local& me) const {
    if (c.split_kv_b) {  // attn_k_b: head h is kv_lora_rank rows of qk_nope values
      const void* a = as_act(t.wk_b.type, qn, dn, me.qn_act.data());
      cpu::matvec_rows(t.wk_b.type, isa, t.wk_b.matrix(h), dn, 0, rkv, a, qabs);
      return;
    }
    // attn_kv_b: head h's first qk_nope rows (kv_lora_rank values each) make its keys, so the
    // absorbed query is the sum of those rows weighted by q_nope.
    std::fill(qabs, qabs + rkv, 0.0f);
    float* row = me.tmp.data();
    for (int64_t i = 0; i < dn; ++i) {
      dequantize_row(t.wkv_b.type, t.wkv_b.row(h * (dn + dv) + i), row, rkv);
      ops.axpy(qn[i], row, qabs, rkv);
    }
  }

  // o = W_vb[h] ctx (v_head_dim values).
  void unabsorb(const LayerWeights& t, int64_t h, const float* ctx, float* o, Local& me) const {
    const TensorView& m = c.split_kv_b ? t.wv_b : t.wkv_b;
    const void* a = as_act(m.type, ctx, rkv, me.ctx_act.data());
    if (c.split_kv_b) {
      cpu::matvec_rows(m.type, isa, m.matrix(h), rkv, 0, dv, a, o);
    } else {
      const int64_t r0 = h * (dn + dv) + dn;
      cpu::matvec_rows(m.type, isa, m.data, rkv, r0, r0 + dv, a, o);
    }
  }

  // ---- the forward pass of one chunk ----

  // T tokens of the current sequence (batch false), or token t of sequence t (batch true).
  void forward(const int32_t* tokens, int64_t T, float* logits, bool all_positions,
               bool batch = false) {
    for (int64_t t = 0; t < T; ++t) {
      embed(tokens[t], X.data() + t * H);
      TSEQ[size_t(t)] = batch ? t : cur;
      TPOS[size_t(t)] = batch ? seq_pos[size_t(t)] : pos + t;
      cpu_ops::rope_table_scaled(TPOS[size_t(t)], rope.inv_freq.data(), dr, rope.cos_sin_scale,
                                 CS.data() + t * dr);
    }
    pool->run([&](int ith, int n) { region(T, logits, all_positions, ith, n); });
    if (batch) {
      for (int64_t t = 0; t < T; ++t) ++seq_pos[size_t(t)];
      pos = seq_pos[size_t(cur)];
    } else {
      pos += T;
    }
  }
  float* cache_of(int64_t l, int64_t i) {
    return cache[size_t(l)].data() + TSEQ[size_t(i)] * max_ctx * lat;
  }

  void region(int64_t T, float* logits, bool all_positions, int ith, int n) {
    for (int64_t l = 0; l < L; ++l) {
      attention(l, T, ith, n);
      if (c.is_dense_layer(l)) {
        dense_ffn(l, T, ith, n);
      } else {
        moe(l, T, ith, n);
      }
    }
    if (logits == nullptr) return;
    const int64_t first = all_positions ? 0 : T - 1;
    const int64_t rows = T - first;
    int64_t t0, t1;
    cpu_ops::split(rows, ith, n, 1, &t0, &t1);
    for (int64_t t = t0; t < t1; ++t) {
      cpu_ops::rmsnorm(X.data() + (first + t) * H, out_norm.data(), c.rms_eps, H,
                       HN.data() + t * H);
      act_f.quantize_row(HN.data() + t * H, t, isa);
    }
    pool->barrier();
    const ActForms& in = act_f;  // its forms include the head's (see allocate)
    int64_t r0, r1;
    cpu_ops::split(V, ith, n, kRowAlign, &r0, &r1);
    mm(*out_w, out_w->data, r0, r1, in.rows(out_w->type, HN.data()), in.stride(out_w->type), rows,
       logits, V);
  }

  void attention(int64_t l, int64_t T, int ith, int n) {
    const LayerWeights& t = w.layers[l];
    const LayerConst& k = lc[l];
    int64_t t0, t1;
    cpu_ops::split(T, ith, n, 1, &t0, &t1);
    for (int64_t i = t0; i < t1; ++i) {
      cpu_ops::rmsnorm(X.data() + i * H, k.attn_norm.data(), c.rms_eps, H, HN.data() + i * H);
      act_h.quantize_row(HN.data() + i * H, i, isa);
    }
    pool->barrier();

    // Compressed query (or the query) and the latent + roped key, from the normed input.
    const Seg in_segs[2] = {rq > 0 ? Seg{&t.wq_a, QA.data(), rq} : Seg{&t.wq, Q.data(), nh * dq},
                            Seg{&t.wkv_a, KVA.data(), lat}};
    mm_segments(in_segs, 2, act_h, HN.data(), T, ith, n);
    pool->barrier();

    for (int64_t i = t0; i < t1; ++i) {
      float* row = cache_of(l, i) + TPOS[size_t(i)] * lat;
      const float* kva = KVA.data() + i * lat;
      cpu_ops::rmsnorm(kva, k.kv_a_norm.data(), c.rms_eps, rkv, row);
      std::memcpy(row + rkv, kva + rkv, dr * sizeof(float));
      cpu_ops::rope_pairs(row + rkv, CS.data() + i * dr, dr);
      if (rq > 0) {
        float* qa = QA.data() + i * rq;
        cpu_ops::rmsnorm(qa, k.q_a_norm.data(), c.rms_eps, rq, qa);
        act_qa.quantize_row(qa, i, isa);
      }
    }
    pool->barrier();
    if (rq > 0) {
      const Seg qb{&t.wq_b, Q.data(), nh * dq};
      mm_segments(&qb, 1, act_qa, QA.data(), T, ith, n);
      pool->barrier();
    }

    // Absorbed attention over (token, run of heads) items: with fewer tokens than threads the
    // heads of a token are split, else each item is a whole token. Items interleave across
    // threads so that long (late) and short (early) tokens mix.
    const int64_t per_token = T >= n ? 1 : std::min<int64_t>(nh, (n + T - 1) / T);
    const int64_t hc = (nh + per_token - 1) / per_token;  // heads per item
    Local& me = local[ith];
    for (int64_t it = ith; it < T * per_token; it += n) {
      const int64_t i = it / per_token;
      const int64_t h0 = (it % per_token) * hc, h1 = std::min(nh, h0 + hc);
      if (h1 <= h0) continue;
      const float* cs = CS.data() + i * dr;
      for (int64_t h = h0; h < h1; ++h) {
        const float* q = Q.data() + i * nh * dq + h * dq;
        float* qh = me.qh.data() + (h - h0) * lat;
        absorb(t, h, q, qh, me);
        std::memcpy(qh + rkv, q + dn, dr * sizeof(float));
        cpu_ops::rope_pairs(qh + rkv, cs, dr);
        me.qp[h - h0] = qh;
        me.op[h - h0] = me.out.data() + (h - h0) * lat;
      }
      // The cache is one head shared by every query head (MQA in the latent space): keys are
      // whole rows, values their latent part (the output's last rope_dim values are unused).
      const float* kv_cache = cache_of(l, i);
      cpu_ops::attend_group(ops, me.qp.data(), static_cast<int>(h1 - h0), kv_cache, kv_cache, lat,
                            TPOS[size_t(i)] + 1, nullptr, nullptr, lat, rope.softmax_scale,
                            me.scores.data(), me.op.data());
      for (int64_t h = h0; h < h1; ++h) {
        unabsorb(t, h, me.op[h - h0], O.data() + i * nh * dv + h * dv, me);
      }
    }
    pool->barrier();
    for (int64_t i = t0; i < t1; ++i) act_o.quantize_row(O.data() + i * nh * dv, i, isa);
    pool->barrier();

    // attn_output; each thread adds its rows into the residual of every token.
    int64_t r0, r1;
    cpu_ops::split(H, ith, n, kRowAlign, &r0, &r1);
    mm(t.wo, t.wo.data, r0, r1, act_o.rows(t.wo.type, O.data()), act_o.stride(t.wo.type), T,
       Y.data(), H);
    for (int64_t i = 0; i < T; ++i) {
      for (int64_t r = r0; r < r1; ++r) X[i * H + r] += Y[i * H + r];
    }
    pool->barrier();
  }

  void ffn_norm(int64_t l, int64_t T, int ith, int n) {
    int64_t t0, t1;
    cpu_ops::split(T, ith, n, 1, &t0, &t1);
    for (int64_t i = t0; i < t1; ++i) {
      cpu_ops::rmsnorm(X.data() + i * H, lc[l].ffn_norm.data(), c.rms_eps, H, HN.data() + i * H);
      act_f.quantize_row(HN.data() + i * H, i, isa);
    }
    pool->barrier();
  }

  // SwiGLU of the gate and up outputs of tokens [t0, t1) (ff of the Fmax values of a row), into
  // act_d.
  void swiglu_rows(int64_t t0, int64_t t1, int64_t ff) {
    for (int64_t i = t0; i < t1; ++i) {
      float* g = G.data() + i * Fmax;
      const float* u = U.data() + i * Fmax;
      for (int64_t j = 0; j < ff; ++j) g[j] = cpu_ops::silu(g[j]) * u[j];
      act_d.quantize(g, i, 0, ff, isa);
    }
  }

  void dense_ffn(int64_t l, int64_t T, int ith, int n) {
    const LayerWeights& t = w.layers[l];
    ffn_norm(l, T, ith, n);
    const Seg segs[2] = {{&t.ffn_gate, G.data(), Fmax}, {&t.ffn_up, U.data(), Fmax}};
    mm_segments(segs, 2, act_f, HN.data(), T, ith, n);
    pool->barrier();
    int64_t t0, t1;
    cpu_ops::split(T, ith, n, 1, &t0, &t1);
    swiglu_rows(t0, t1, Fd);
    pool->barrier();
    int64_t r0, r1;
    cpu_ops::split(H, ith, n, kRowAlign, &r0, &r1);
    mm(t.ffn_down, t.ffn_down.data, r0, r1, act_d.rows(t.ffn_down.type, G.data()),
       act_d.stride(t.ffn_down.type), T, Y.data(), H);
    for (int64_t i = 0; i < T; ++i) {
      for (int64_t r = r0; r < r1; ++r) X[i * H + r] += Y[i * H + r];
    }
    pool->barrier();
  }

  void moe(int64_t l, int64_t T, int ith, int n) {
    const LayerWeights& t = w.layers[l];
    const LayerConst& k = lc[l];
    ffn_norm(l, T, ith, n);

    // Router logits and the shared experts' gate/up rows: all read the normed input.
    const Seg segs[3] = {
        {&t.router, RL.data(), E}, {&t.gate_shexp, G.data(), Fmax}, {&t.up_shexp, U.data(), Fmax}};
    mm_segments(segs, Fs > 0 ? 3 : 1, act_f, HN.data(), T, ith, n);
    pool->barrier();

    int64_t t0, t1;
    cpu_ops::split(T, ith, n, 1, &t0, &t1);
    for (int64_t i = t0; i < t1; ++i) {
      cpu_ops::route_grouped(RL.data() + i * E, E, K, c.gating == ExpertGating::Sigmoid,
                             k.bias.empty() ? nullptr : k.bias.data(), c.n_expert_groups,
                             c.n_groups_used, c.norm_topk_prob, c.expert_weights_scale,
                             local[ith].route.data(), PSEL.data() + i * K, PW.data() + i * K);
    }
    if (Fs > 0) swiglu_rows(t0, t1, Fs);
    pool->barrier();

    if (ith == 0) {
      n_active = rt::group_by_expert(PSEL.data(), T, K, E, PBEGIN.data(), PACTIVE.data(),
                                     PSLOT.data(), PTOK.data(), local[0].cursor.data(),
                                     counts[l].data());
    }
    pool->barrier();

    // Each slot's input rows (gate/up forms), so that an expert's tokens are contiguous.
    float* gh = PGH.empty() ? nullptr : PGH.data();
    int64_t s0, s1;
    cpu_ops::split(T * K, ith, n, 1, &s0, &s1);
    rt::gather_slot_rows(s0, s1, PTOK.data(), HN.data(), H, act_g, gh, isa);
    pool->barrier();

    // Gate + up + SwiGLU over (active expert, unit of rows) items, a fixed share per thread
    // (runtime/grouped_moe.h).
    const rt::GroupedExperts g{&t.gate_exps,    &t.up_exps, &t.down_exps, PBEGIN.data(),
                               PACTIVE.data(), F,          unit,         units_per_expert};
    auto mmf = [this](auto&&... a) { mm(a...); };
    int64_t i0, i1;
    cpu_ops::split(n_active * units_per_expert, ith, n, 1, &i0, &i1);
    rt::gate_up_items(g, i0, i1, act_g, gh, PG.data(), PU.data(), act_e, isa, mmf);
    pool->barrier();

    // Down rows of every active expert and of the shared experts; then each thread sums its
    // rows: routed experts (weighted, in selection order), then the shared experts, into the
    // residual.
    int64_t r0, r1;
    cpu_ops::split(H, ith, n, kRowAlign, &r0, &r1);
    if (r1 > r0) {
      rt::down_rows(g, n_active, r0, r1, act_e, PG.data(), H, PY.data(), mmf);
      if (Fs > 0) {
        mm(t.down_shexp, t.down_shexp.data, r0, r1, act_d.rows(t.down_shexp.type, G.data()),
           act_d.stride(t.down_shexp.type), T, Y.data(), H);
      }
      rt::combine_rows(T, K, H, r0, r1, PW.data(), PSLOT.data(), PY.data(),
                       Fs > 0 ? Y.data() : nullptr, X.data());
    }
    pool->barrier();
  }

  void prefill(const int32_t* tokens, int64_t n_tok, std::vector<float>* logits,
               bool all_positions) {
    rt::prefill_in_chunks(
        tokens, n_tok, pos, max_ctx, V, B, logits, all_positions,
        [&](int32_t t) {
          if (t < 0 || t >= V) embed(t, X.data());  // throws
        },
        [&](const int32_t* tk, int64_t T, float* out, bool all) { forward(tk, T, out, all); });
  }

  void decode(int32_t token, float* logits) {
    if (pos >= max_ctx) {
      throw Error("decode",
                  "position " + std::to_string(pos) + " is past the KV cache (" +
                      std::to_string(max_ctx) + " positions)",
                  "raise max_context or call reset()");
    }
    embed(token, X.data());  // throws before any state changes
    forward(&token, 1, logits, false);
  }

  void decode_batch(const int32_t* tokens, int64_t n, float* logits) {
    if (n < 1 || n > max_seq) {
      throw Error("decode_batch",
                  std::to_string(n) + " sequences, but the engine has " + std::to_string(max_seq),
                  "create the engine with max_sequences >= the batch");
    }
    seq_pos[size_t(cur)] = pos;
    for (int64_t b = 0; b < n; ++b) {
      if (seq_pos[size_t(b)] >= max_ctx) {
        throw Error("decode_batch",
                    "sequence " + std::to_string(b) + " is at position " +
                        std::to_string(seq_pos[size_t(b)]) + ", past the KV cache (" +
                        std::to_string(max_ctx) + " positions)",
                    "raise max_context or call reset()");
      }
      embed(tokens[b], X.data());  // throws before any state changes
    }
    forward(tokens, n, logits, true, true);
  }
};

DeepseekCpuEngine::DeepseekCpuEngine(const ModelWeights& weights, const CpuEngineOptions& opt)
    : impl_(std::make_unique<Impl>(weights, opt)) {}
DeepseekCpuEngine::~DeepseekCpuEngine() = default;
void DeepseekCpuEngine::reset() {
  impl_->pos = 0;
  std::fill(impl_->seq_pos.begin(), impl_->seq_pos.end(), 0);
}
int64_t DeepseekCpuEngine::position() const { return impl_->pos; }
int64_t DeepseekCpuEngine::position(int64_t seq) const {
  return seq == impl_->cur ? impl_->pos : impl_->seq_pos.at(size_t(seq));
}
int64_t DeepseekCpuEngine::max_sequences() const { return impl_->max_seq; }
void DeepseekCpuEngine::set_sequence(int64_t seq) {
  Impl& m = *impl_;
  m.seq_pos[size_t(m.cur)] = m.pos;
  m.cur = seq;
  m.pos = m.seq_pos[size_t(seq)];
}
void DeepseekCpuEngine::decode_batch(const int32_t* tokens, int64_t n,
                                     std::vector<float>* logits) {
  float* out = nullptr;
  if (logits) {
    logits->resize(size_t(n * impl_->V));
    out = logits->data();
  }
  impl_->decode_batch(tokens, n, out);
}
void DeepseekCpuEngine::prefill(const int32_t* tokens, int64_t n, std::vector<float>* logits,
                                bool all_positions) {
  impl_->prefill(tokens, n, logits, all_positions);
}
void DeepseekCpuEngine::decode(int32_t token, std::vector<float>* logits) {
  float* out = nullptr;
  if (logits) {
    logits->resize(impl_->V);
    out = logits->data();
  }
  impl_->decode(token, out);
}
int DeepseekCpuEngine::threads() const { return impl_->nth; }
cpu::Isa DeepseekCpuEngine::isa() const { return impl_->isa; }
const ModelWeights& DeepseekCpuEngine::weights() const { return impl_->w; }
const std::vector<std::vector<uint64_t>>& DeepseekCpuEngine::expert_counts() const {
  return impl_->counts;
}

}  // namespace ktune
