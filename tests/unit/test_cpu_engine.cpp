// CpuEngine against a naive reference forward written here: scalar loops in double over the
// dequantized weights, no kernels, no threads, one token at a time with a KV cache.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "ktune/engine/cpu_engine.h"
#include "ktune/engine/cpu_kernels.h"
#include "ktune/engine/error.h"
#include "ktune/engine/host_info.h"
#include "ktune/engine/synthetic.h"
#include "ktune/engine/thread_pool.h"

namespace ktune {
namespace {

// The reference. With emulate_act_quant, every input of a matrix whose kernel multiplies Q8_0
// activations is rounded through Q8_0 (quantize_row then dequantize_row) first, which is the
// only approximation the engine makes on purpose; without it the reference is the exact model.
class Reference {
 public:
  Reference(const ModelWeights& w, bool emulate_act_quant)
      : w_(w), c_(w.cfg), emulate_(emulate_act_quant) {
    const int64_t kv = c_.n_kv_heads * c_.head_dim;
    k_.assign(c_.n_layers, {});
    v_.assign(c_.n_layers, {});
    (void)kv;
  }

  std::vector<double> step(int32_t token) {
    const int64_t H = c_.hidden, hd = c_.head_dim, nh = c_.n_heads, nkv = c_.n_kv_heads;
    const int64_t pos = pos_++;
    std::vector<double> x = row(w_.tok_embd, token);
    for (int64_t l = 0; l < c_.n_layers; ++l) {
      const LayerWeights& L = w_.layers[l];
      std::vector<double> h = rmsnorm(x, vec(L.attn_norm));
      std::vector<double> q = matvec(L.wq, 0, h);
      std::vector<double> k = matvec(L.wk, 0, h);
      std::vector<double> v = matvec(L.wv, 0, h);
      const std::vector<double> qn = vec(L.q_norm), kn = vec(L.k_norm);
      for (int64_t i = 0; i < nh; ++i) head_norm_rope(&q[i * hd], qn, pos);
      for (int64_t i = 0; i < nkv; ++i) head_norm_rope(&k[i * hd], kn, pos);
      k_[l].insert(k_[l].end(), k.begin(), k.end());
      v_[l].insert(v_[l].end(), v.begin(), v.end());
      std::vector<double> att(nh * hd, 0.0);
      const int64_t n = pos + 1;
      for (int64_t i = 0; i < nh; ++i) {
        const int64_t g = i / (nh / nkv);
        std::vector<double> s(n);
        double mx = -1e300;
        for (int64_t p = 0; p < n; ++p) {
          double d = 0;
          for (int64_t j = 0; j < hd; ++j) d += q[i * hd + j] * k_[l][(p * nkv + g) * hd + j];
          s[p] = d / std::sqrt(static_cast<double>(hd));
          mx = std::max(mx, s[p]);
        }
        double sum = 0;
        for (double& e : s) sum += (e = std::exp(e - mx));
        for (int64_t p = 0; p < n; ++p) {
          for (int64_t j = 0; j < hd; ++j) {
            att[i * hd + j] += s[p] / sum * v_[l][(p * nkv + g) * hd + j];
          }
        }
      }
      std::vector<double> o = matvec(L.wo, 0, att);
      for (int64_t i = 0; i < H; ++i) x[i] += o[i];

      std::vector<double> h2 = rmsnorm(x, vec(L.ffn_norm));
      std::vector<double> logits = matvec(L.router, 0, h2);
      const int64_t E = c_.n_experts, K = c_.n_experts_used;
      std::vector<double> p(E);
      double mx = *std::max_element(logits.begin(), logits.end()), sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(logits[e] - mx));
      for (double& e : p) e /= sum;
      std::vector<int> idx(E);
      for (int e = 0; e < E; ++e) idx[e] = e;
      std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return p[a] > p[b]; });
      idx.resize(K);
      double wsum = 0;
      for (int e : idx) wsum += p[e];
      std::sort(idx.begin(), idx.end());
      std::vector<double> moe(H, 0.0);
      for (int e : idx) {
        const double we = c_.norm_topk_prob ? p[e] / wsum : p[e];
        std::vector<double> g = matvec(L.gate_exps, e, h2);
        std::vector<double> u = matvec(L.up_exps, e, h2);
        for (size_t i = 0; i < g.size(); ++i) g[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
        std::vector<double> y = matvec(L.down_exps, e, g);
        for (int64_t i = 0; i < H; ++i) moe[i] += we * y[i];
      }
      for (int64_t i = 0; i < H; ++i) x[i] += moe[i];
    }
    std::vector<double> h = rmsnorm(x, vec(w_.output_norm));
    return matvec(w_.output.data ? w_.output : w_.tok_embd, 0, h);
  }

 private:
  std::vector<double> row(const TensorView& t, int64_t r) const {
    std::vector<float> f(t.row_len());
    dequantize_row(t.type, t.row(r), f.data(), t.row_len());
    return std::vector<double>(f.begin(), f.end());
  }
  std::vector<double> vec(const TensorView& t) const { return row(t, 0); }

  std::vector<double> rmsnorm(const std::vector<double>& x, const std::vector<double>& w) const {
    double ss = 0;
    for (double v : x) ss += v * v;
    const double r = 1.0 / std::sqrt(ss / x.size() + c_.rms_eps);
    std::vector<double> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = w[i] * x[i] * r;
    return y;
  }

  void head_norm_rope(double* v, const std::vector<double>& w, int64_t pos) const {
    const int64_t d = c_.head_dim, half = d / 2;
    std::vector<double> x(v, v + d);
    x = rmsnorm(x, w);
    for (int64_t i = 0; i < half; ++i) {
      // Angles as Hugging Face computes them: inv_freq and pos * inv_freq in float32.
      const float inv = 1.0f / std::pow(c_.rope_theta, static_cast<float>(2 * i) / d);
      const double a = static_cast<double>(static_cast<float>(pos) * inv);
      v[i] = x[i] * std::cos(a) - x[half + i] * std::sin(a);
      v[half + i] = x[half + i] * std::cos(a) + x[i] * std::sin(a);
    }
  }

  // y = M_e x for matrix e of a (possibly 3-D) tensor.
  std::vector<double> matvec(const TensorView& t, int64_t e, const std::vector<double>& x) const {
    const int64_t n = t.row_len(), rows = t.ne[1];
    std::vector<double> a = x;
    const QuantType at = cpu::activation_type(t.type);  // Q8_0, or Q8_K for K-quant weights
    if (emulate_ && at != QuantType::F32) {
      std::vector<float> f(x.begin(), x.end()), back(n);
      std::vector<uint8_t> q(row_bytes(at, n));
      quantize_row(at, f.data(), q.data(), n);
      dequantize_row(at, q.data(), back.data(), n);
      a.assign(back.begin(), back.end());
    }
    std::vector<double> y(rows);
    std::vector<float> wr(n);
    for (int64_t r = 0; r < rows; ++r) {
      dequantize_row(t.type, t.matrix(e) + r * t.row_stride(), wr.data(), n);
      double s = 0;
      for (int64_t i = 0; i < n; ++i) s += wr[i] * a[i];
      y[r] = s;
    }
    return y;
  }

  const ModelWeights& w_;
  const ModelConfig& c_;
  bool emulate_;
  int64_t pos_ = 0;
  std::vector<std::vector<double>> k_, v_;
};

const std::vector<int32_t> kPrompt = {5, 77, 200, 31, 142, 9, 250, 1000};
const std::vector<int32_t> kContinuation = {17, 230, 64, 3, 1023};

// Logits of every prompt position (prefill, all positions) then of each continuation token.
std::vector<std::vector<float>> run_engine(const ModelWeights& w, int threads,
                                           int64_t max_batch = 512) {
  CpuEngineOptions opt;
  opt.threads = threads;
  opt.max_context = 64;
  opt.max_batch = max_batch;
  CpuEngine eng(w, opt);
  std::vector<std::vector<float>> out;
  std::vector<float> logits;
  eng.prefill(kPrompt.data(), static_cast<int64_t>(kPrompt.size()), &logits, true);
  const int64_t V = w.cfg.vocab;
  EXPECT_EQ(static_cast<int64_t>(logits.size()), V * static_cast<int64_t>(kPrompt.size()));
  for (size_t t = 0; t < kPrompt.size(); ++t) {
    out.emplace_back(logits.begin() + t * V, logits.begin() + (t + 1) * V);
  }
  for (int32_t tok : kContinuation) {
    eng.decode(tok, &logits);
    out.push_back(logits);
  }
  EXPECT_EQ(eng.position(), static_cast<int64_t>(kPrompt.size() + kContinuation.size()));
  return out;
}

std::vector<std::vector<double>> run_reference(const ModelWeights& w, bool emulate) {
  Reference ref(w, emulate);
  std::vector<std::vector<double>> out;
  for (int32_t t : kPrompt) out.push_back(ref.step(t));
  for (int32_t t : kContinuation) out.push_back(ref.step(t));
  return out;
}

// max |a - b| / max |b| over one position.
double rel_err(const std::vector<float>& a, const std::vector<double>& b) {
  double diff = 0, mag = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    diff = std::max(diff, std::abs(a[i] - b[i]));
    mag = std::max(mag, std::abs(b[i]));
  }
  return diff / mag;
}

void expect_close(const std::vector<std::vector<float>>& got,
                  const std::vector<std::vector<double>>& want, double tol, const char* what) {
  ASSERT_EQ(got.size(), want.size());
  std::vector<double> errs;
  for (size_t t = 0; t < got.size(); ++t) {
    const double e = rel_err(got[t], want[t]);
    errs.push_back(e);
    EXPECT_LE(e, tol) << what << ": position " << t;
  }
  std::sort(errs.begin(), errs.end());
  std::printf("[ %s ] relative error median %.3g, worst %.3g (tolerance %.3g)\n", what,
              errs[errs.size() / 2], errs.back(), tol);
}

void expect_bit_identical(const std::vector<std::vector<float>>& a,
                          const std::vector<std::vector<float>>& b, const char* what) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t t = 0; t < a.size(); ++t) {
    ASSERT_EQ(a[t].size(), b[t].size());
    EXPECT_EQ(std::memcmp(a[t].data(), b[t].data(), a[t].size() * sizeof(float)), 0)
        << what << ": position " << t;
  }
}

ModelWeights tiny(QuantType q, uint64_t seed = 7, double zipf = 0.0) {
  SynthOptions o;
  o.preset = "tiny";
  o.quant = q;
  o.seed = seed;
  o.zipf_s = zipf;
  return make_synthetic_model(o);
}

TEST(CpuEngine, F32MatchesNaiveReferenceAndIsThreadCountInvariant) {
  const ModelWeights w = tiny(QuantType::F32);
  const auto want = run_reference(w, false);
  const auto t1 = run_engine(w, 1);
  expect_close(t1, want, 1e-4, "F32 1 thread");
  const auto t2 = run_engine(w, 2);
  const auto t3 = run_engine(w, 3);
  expect_bit_identical(t1, t2, "F32 1 vs 2 threads");
  expect_bit_identical(t1, t3, "F32 1 vs 3 threads");
}

// The same model with token_embd replaced by an F32 copy whose values are jittered by up to
// 1e-3 relative. Why: Q4_0 embedding values are multiples of d_block with max |x| = 8 d, so after
// RMSNorm x/max|x| = k/8 and Q8_0 rounding of 127 k/8 lands exactly on .5 ties (k = +-4, 63.5)
// in layer 0; float-vs-double noise then decides them, which says nothing about correctness.
ModelWeights jitter_embeddings(const ModelWeights& src) {
  ModelWeights w = src;
  const TensorView& t = src.tok_embd;
  auto buf = std::make_shared<std::vector<float>>(t.row_len() * t.n_rows());
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-1e-3f, 1e-3f);
  for (int64_t r = 0; r < t.n_rows(); ++r) {
    float* row = buf->data() + r * t.row_len();
    dequantize_row(t.type, t.row(r), row, t.row_len());
    for (int64_t i = 0; i < t.row_len(); ++i) row[i] *= 1.0f + u(rng);
  }
  w.tok_embd.type = QuantType::F32;
  w.tok_embd.data = reinterpret_cast<const uint8_t*>(buf->data());
  w.storage.push_back(buf);
  return w;
}

// Quantized weights. The engine rounds each matrix input to Q8_0 (per 32 values, step
// max|x|/127), as ggml does.
// * Against a reference that does the same rounding, what is left is float-vs-double summation
//   (measured ~1e-7 of max |logit|) and rounding flips: a value within ~1e-6 of a Q8_0 rounding
//   boundary may round one way in the engine and the other in the reference. With ~5000
//   roundings per token such a flip happens in roughly every other run (seed/ISA); one flip
//   moves the logits by up to ~1.5e-2 of max |logit| once it has gone through the KV cache and
//   later layers (measured over 12 seeds x 2 ISAs). Hence 3e-2: one flip passes, while a wrong
//   row, rope, norm or routing gives errors of order 1e-1..1.
// * Against the exact model (no activation rounding) the difference is Q8_0 noise (uniform,
//   std step/sqrt(12) ~ 0.23 % of a block's max) through 4 layers, plus top-2 routing flips where
//   two experts' probabilities differ by less than that noise, which change a layer's MoE output
//   outright (measured median 1e-2..1.3e-1, worst up to 0.44 over 12 seeds). That comparison is
//   a sanity check with loose bounds (median 5e-2, worst 0.5 at this seed), not a precision claim.
void check_quantized(QuantType q, double exact_median_tol = 5e-2) {
  const ModelWeights w = jitter_embeddings(tiny(q));
  const auto got = run_engine(w, 1);
  expect_close(got, run_reference(w, true), 3e-2, "emulated activation rounding");
  const auto exact = run_reference(w, false);
  std::vector<double> errs;
  for (size_t t = 0; t < got.size(); ++t) errs.push_back(rel_err(got[t], exact[t]));
  std::sort(errs.begin(), errs.end());
  std::printf("[ exact activations ] median relative error %.3g, worst %.3g\n",
              errs[errs.size() / 2], errs.back());
  EXPECT_LE(errs[errs.size() / 2], exact_median_tol);
  EXPECT_LE(errs.back(), 0.5);
  expect_bit_identical(got, run_engine(w, 2), "1 vs 2 threads");
  expect_bit_identical(got, run_engine(w, 3), "1 vs 3 threads");
}

TEST(CpuEngine, Q8_0MatchesReference) { check_quantized(QuantType::Q8_0); }
TEST(CpuEngine, Q4_0MatchesReference) { check_quantized(QuantType::Q4_0); }
// K-quants multiply Q8_K activations: the same two kinds of error as Q8_0 above, so the same
// 3e-2 against the emulating reference (measured 2-4e-7). Against the exact model the step is
// coarser (max|x|/127 over 256 values instead of 32: about 1.4x for Gaussian activations), so
// more routing flips: measured median 7.5e-2 for Q4_K at this seed (1.6e-2 for Q5_K/Q6_K),
// hence a median bound of 1.5e-1 for the sanity check.
TEST(CpuEngine, Q4_KMatchesReference) { check_quantized(QuantType::Q4_K, 1.5e-1); }
TEST(CpuEngine, Q5_KMatchesReference) { check_quantized(QuantType::Q5_K, 1.5e-1); }
TEST(CpuEngine, Q6_KMatchesReference) { check_quantized(QuantType::Q6_K, 1.5e-1); }

// Prefill of all positions must equal feeding the same tokens one at a time.
void check_prefill_equals_decode(QuantType q) {
  const ModelWeights w = tiny(q, 3);
  CpuEngineOptions opt;
  opt.threads = 2;
  opt.max_context = 32;
  opt.max_batch = 5;  // several chunks, the last one short
  CpuEngine a(w, opt);
  CpuEngine b(w, opt);
  std::vector<int32_t> toks = kPrompt;
  toks.insert(toks.end(), kContinuation.begin(), kContinuation.end());
  std::vector<float> all, one;
  a.prefill(toks.data(), static_cast<int64_t>(toks.size()), &all, true);
  const int64_t V = w.cfg.vocab;
  for (size_t t = 0; t < toks.size(); ++t) {
    b.decode(toks[t], &one);
    std::vector<double> ref(one.begin(), one.end());
    std::vector<float> pre(all.begin() + t * V, all.begin() + (t + 1) * V);
    EXPECT_LE(rel_err(pre, ref), 1e-4) << quant_name(q) << " position " << t;
  }
  // Last-position-only prefill returns the last row.
  CpuEngine c(w, opt);
  std::vector<float> last;
  c.prefill(toks.data(), static_cast<int64_t>(toks.size()), &last, false);
  ASSERT_EQ(static_cast<int64_t>(last.size()), V);
  EXPECT_EQ(std::memcmp(last.data(), all.data() + (toks.size() - 1) * V, V * sizeof(float)), 0);
}

TEST(CpuEngine, PrefillEqualsDecodeF32) { check_prefill_equals_decode(QuantType::F32); }
TEST(CpuEngine, PrefillEqualsDecodeQ4_0) { check_prefill_equals_decode(QuantType::Q4_0); }
TEST(CpuEngine, PrefillEqualsDecodeQ4_K) { check_prefill_equals_decode(QuantType::Q4_K); }

struct RoutingStats {
  std::vector<double> top_share;  // per layer: picks of the most popular expert / all picks
  int64_t min_well_used = 0;      // min over layers of experts with >= 1/4 of a uniform share
};

// Routes 64 random tokens (one prefill) and summarizes the router statistics.
RoutingStats routing_stats(const ModelWeights& w, const char* label) {
  CpuEngineOptions opt;
  opt.threads = 2;
  opt.max_context = 128;
  CpuEngine eng(w, opt);
  std::mt19937 rng(42);
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(w.cfg.vocab - 1));
  std::vector<int32_t> toks(64);
  for (int32_t& t : toks) t = tok(rng);
  eng.prefill(toks.data(), 64, nullptr, false);
  RoutingStats st;
  st.min_well_used = w.cfg.n_experts;
  const uint64_t picks = 64u * w.cfg.n_experts_used;
  for (const auto& layer : eng.expert_counts()) {
    uint64_t total = 0, top = 0;
    int64_t well_used = 0;
    for (uint64_t c : layer) {
      total += c;
      top = std::max(top, c);
      well_used += c * 4 * w.cfg.n_experts >= picks;
    }
    EXPECT_EQ(total, picks);
    st.top_share.push_back(static_cast<double>(top) / static_cast<double>(total));
    st.min_well_used = std::min(st.min_well_used, well_used);
  }
  std::printf("[ %s ] top expert share per layer:", label);
  for (double sh : st.top_share) std::printf(" %.3f", sh);
  std::printf(" (experts with >= 1/4 uniform share: at least %ld of %ld)\n",
              static_cast<long>(st.min_well_used), static_cast<long>(w.cfg.n_experts));
  return st;
}

double mean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return s / static_cast<double>(v.size());
}

// tiny: 8 experts, top-2, so 64 tokens make 128 picks per layer, 16 per expert (share 0.125)
// when uniform. The failure this guards against is a collapsed router (design §8), where a few
// experts take nearly all picks.
TEST(CpuEngine, RoutingIsNearUniformWithoutSkewAndSkewedWithZipf) {
  const ModelWeights plain = tiny(QuantType::Q8_0, 11);
  const int64_t E = plain.cfg.n_experts;
  const RoutingStats flat = routing_stats(plain, "no skew");
  // "Used" means at least 4 picks (1/4 of the uniform 16), not merely once: with 128 picks,
  // picked-once would pass for a router that sends 90 % of the tokens to two experts.
  EXPECT_GE(flat.min_well_used * 4, E * 3) << "fewer than 75 % of the experts are really used";
  for (size_t l = 0; l < flat.top_share.size(); ++l) {
    // Measured 0.16..0.31 over seeds: tokens of one prompt share their attention context, so
    // routing is not perfectly independent; 0.4 (3.2x uniform) marks a collapsing router.
    EXPECT_LT(flat.top_share[l], 0.4) << "layer " << l;
  }
  const RoutingStats skewed = routing_stats(tiny(QuantType::Q8_0, 11, 1.2), "zipf:1.2");
  for (size_t l = 0; l < skewed.top_share.size(); ++l) {
    // Zipf 1.2 over 8 experts gives the top expert ~43 % of single picks; top-2 saturation and
    // 64-token noise lower the share of picks to 0.22..0.47 (measured), always > 1.5x uniform.
    EXPECT_GT(skewed.top_share[l], 1.5 / E) << "layer " << l;
  }
  // On average over the layers the skew is unmistakable: measured +0.10..+0.17 over the flat
  // model and at least 2x uniform.
  EXPECT_GT(mean(skewed.top_share), mean(flat.top_share) + 0.05);
  EXPECT_GT(mean(skewed.top_share), 2.0 / E);
}

TEST(CpuEngine, ResetRestartsTheSequence) {
  const ModelWeights w = tiny(QuantType::Q8_0);
  CpuEngineOptions opt;
  opt.threads = 2;
  opt.max_context = 16;
  CpuEngine eng(w, opt);
  std::vector<float> first, again, step;
  eng.prefill(kPrompt.data(), 4, &first, false);
  eng.decode(3, &step);
  EXPECT_EQ(eng.position(), 5);
  eng.reset();
  EXPECT_EQ(eng.position(), 0);
  eng.prefill(kPrompt.data(), 4, &again, false);
  EXPECT_EQ(first, again);
  // Overflowing the cache is an error, not a crash; reset makes room again.
  std::vector<int32_t> many(16, 1);
  EXPECT_THROW(eng.prefill(many.data(), 16, nullptr, false), Error);
  eng.reset();
  EXPECT_NO_THROW(eng.prefill(many.data(), 16, nullptr, false));
  EXPECT_THROW(eng.decode(1, nullptr), Error);
  eng.reset();
  EXPECT_THROW(eng.decode(static_cast<int32_t>(w.cfg.vocab), nullptr), Error);
  EXPECT_THROW(eng.decode(-1, nullptr), Error);
  EXPECT_EQ(eng.position(), 0);
}

TEST(CpuEngine, ArgmaxTiesPickTheLowestIndex) {
  const float a[] = {1.0f, 3.0f, 3.0f, 2.0f};
  EXPECT_EQ(CpuEngine::argmax(a, 4), 1);
  const float b[] = {-2.0f, -2.0f, -2.0f};
  EXPECT_EQ(CpuEngine::argmax(b, 3), 0);
  const float c[] = {0.0f, -1.0f, 5.0f, 5.0f, 5.0f};
  EXPECT_EQ(CpuEngine::argmax(c, 5), 2);
}

TEST(CpuEngine, ReportsThreadsAndCounts) {
  const ModelWeights w = tiny(QuantType::Q4_0);
  CpuEngineOptions opt;
  opt.threads = 3;
  opt.max_context = 8;
  CpuEngine eng(w, opt);
  EXPECT_EQ(eng.threads(), 3);
  EXPECT_EQ(&eng.weights(), &w);
  ASSERT_EQ(static_cast<int64_t>(eng.expert_counts().size()), w.cfg.n_layers);
  eng.decode(1, nullptr);
  for (const auto& layer : eng.expert_counts()) {
    uint64_t total = 0;
    for (uint64_t c : layer) total += c;
    EXPECT_EQ(total, static_cast<uint64_t>(w.cfg.n_experts_used));
  }
}

// Read bandwidth of this machine with `threads` threads (the engine's STREAM-like probe, the
// same one `ktune probe` runs), in bytes per second.
double read_bandwidth(int threads) {
  ThreadPool pool(threads);
  return measure_read_bandwidth(pool, default_probe_bytes(), 5).gb_per_s * 1e9;
}

std::vector<int> int_list(const std::string& t) {
  std::vector<int> v;
  size_t p = 0;
  while (p < t.size()) {
    size_t q = t.find(',', p);
    if (q == std::string::npos) q = t.size();
    v.push_back(std::stoi(t.substr(p, q - p)));
    p = q + 1;
  }
  return v;
}

// Timing, not a check: run with --gtest_also_run_disabled_tests. Environment:
// KTUNE_BENCH_PRESET (tiny), KTUNE_BENCH_QUANT (Q4_0), KTUNE_BENCH_THREADS (e.g. "8,16"; default
// 1,2), KTUNE_BENCH_TOKENS (decode steps, 64), KTUNE_BENCH_PP (prompt length, 128).
TEST(CpuEngine, DISABLED_DecodeSpeed) {
  auto env = [](const char* k, const char* d) {
    const char* v = std::getenv(k);
    return std::string(v ? v : d);
  };
  SynthOptions so;
  so.preset = env("KTUNE_BENCH_PRESET", "tiny");
  so.quant = parse_quant_or_throw(env("KTUNE_BENCH_QUANT", "Q4_0"), "KTUNE_BENCH_QUANT");
  const int n_tok = std::stoi(env("KTUNE_BENCH_TOKENS", "64"));
  const int pp = std::stoi(env("KTUNE_BENCH_PP", "128"));
  auto t0 = std::chrono::steady_clock::now();
  const ModelWeights w = make_synthetic_model(so);
  std::printf("model %s %s: %.2f GB, %.3f GB read per decode token, built in %.1f s, isa %s\n",
              so.preset.c_str(), quant_name(so.quant), w.weight_bytes() / 1e9,
              w.bytes_per_token_decode() / 1e9,
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
              cpu::isa_name(cpu::detect_isa()));
  for (int threads : int_list(env("KTUNE_BENCH_THREADS", "1,2"))) {
    const double bw = read_bandwidth(threads);
    CpuEngineOptions opt;
    opt.threads = threads;
    opt.max_context = pp + n_tok + 8;
    opt.max_batch = std::max(1, pp);
    CpuEngine eng(w, opt);
    std::vector<float> logits;
    std::vector<int32_t> prompt(pp);
    std::mt19937 rng(1);
    for (int32_t& t : prompt) t = static_cast<int32_t>(rng() % w.cfg.vocab);
    t0 = std::chrono::steady_clock::now();
    eng.prefill(prompt.data(), pp, &logits, false);
    const double tpp =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    eng.decode(CpuEngine::argmax(logits.data(), w.cfg.vocab), &logits);  // warm-up
    t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < n_tok; ++i) {
      eng.decode(CpuEngine::argmax(logits.data(), w.cfg.vocab), &logits);
    }
    const double tg =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double limit = bw / static_cast<double>(w.bytes_per_token_decode());
    std::printf("threads %2d: read %.1f GB/s -> memory-bound limit %.1f tok/s | pp%d %.1f tok/s | "
                "decode %.2f tok/s (%.3f ms/token, %.1f us/layer) = %.0f %% of the limit\n",
                threads, bw / 1e9, limit, pp, pp / tpp, n_tok / tg, tg / n_tok * 1e3,
                tg / n_tok * 1e6 / w.cfg.n_layers, 100.0 * n_tok / tg / limit);
  }
}

}  // namespace
}  // namespace ktune
