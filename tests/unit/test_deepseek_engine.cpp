// The deepseek2 CPU engine against a float64 forward written here from the model's definition:
// MLA with the keys and values decompressed per head and position (the engine absorbs the
// decompression into the query instead), Hugging Face's rope on de-interleaved pairs, routing
// by sorting, shared experts and dense layers; no kernels, no threads, one token at a time.
// Also: prefill against decode, thread counts and chunk sizes (bit-identical), quantized
// weights, routing statistics of synthetic models, and a Hugging Face folder written here.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "ktune/engine/cpu_engine.h"
#include "ktune/engine/cpu_kernels.h"
#include "ktune/engine/error.h"
#include "ktune/engine/model.h"
#include "ktune/engine/synthetic.h"

namespace fs = std::filesystem;

namespace ktune {
namespace {

using Vec = std::vector<double>;

// ---------------------------------------------------------------------------------------------
// The float64 reference

class Reference {
 public:
  explicit Reference(const ModelWeights& w) : w_(w), c_(w.cfg) {
    latent_.resize(c_.n_layers);
    kpe_.resize(c_.n_layers);
    // YaRN as Hugging Face's _compute_yarn_parameters defines it, in double.
    const double d = static_cast<double>(c_.rope_dim), base = c_.rope_theta;
    const double f = c_.rope_scaling == RopeScaling::Yarn ? c_.rope_factor : 1.0;
    double low = 0, high = 1;
    if (c_.rope_scaling == RopeScaling::Yarn) {
      auto dim_for = [&](double rot) {
        return d * std::log(c_.rope_orig_context / (rot * 2 * 3.141592653589793)) /
               (2 * std::log(base));
      };
      low = std::max(0.0, std::floor(dim_for(c_.yarn_beta_fast)));
      high = std::min(d - 1, std::ceil(dim_for(c_.yarn_beta_slow)));
    }
    for (int64_t i = 0; i < c_.rope_dim / 2; ++i) {
      const double theta = std::pow(base, -2.0 * i / d);
      double ramp = 0;  // 0: the original frequency; 1: interpolated (divided by the factor)
      if (c_.rope_scaling == RopeScaling::Yarn)
        ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
      inv_freq_.push_back(theta / f * ramp + theta * (1 - ramp));
    }
    auto m = [&](double s) { return f <= 1 ? 1.0 : 0.1 * s * std::log(f) + 1.0; };
    cs_scale_ = 1;
    scale_ = 1 / std::sqrt(static_cast<double>(c_.head_dim));
    if (c_.rope_scaling == RopeScaling::Yarn) {
      cs_scale_ = c_.yarn_mscale != 0 && c_.yarn_mscale_all_dim != 0
                      ? m(c_.yarn_mscale) / m(c_.yarn_mscale_all_dim)
                      : m(1.0);
      if (c_.yarn_mscale_all_dim != 0)
        scale_ *= m(c_.yarn_mscale_all_dim) * m(c_.yarn_mscale_all_dim);
    }
  }

  Vec step(int32_t token) {
    const int64_t H = c_.hidden, nh = c_.n_heads, dq = c_.head_dim, dr = c_.rope_dim;
    const int64_t dn = dq - dr, dv = c_.v_head_dim, rkv = c_.kv_lora_rank;
    const int64_t pos = pos_++;
    Vec x = row(w_.tok_embd, token);
    for (int64_t l = 0; l < c_.n_layers; ++l) {
      const LayerWeights& L = w_.layers[l];
      const Vec h = rmsnorm(x, vec(L.attn_norm));
      const Vec q = c_.q_lora_rank > 0
                        ? matvec(L.wq_b, 0, rmsnorm(matvec(L.wq_a, 0, h), vec(L.q_a_norm)))
                        : matvec(L.wq, 0, h);
      const Vec kv = matvec(L.wkv_a, 0, h);
      latent_[l].push_back(rmsnorm(Vec(kv.begin(), kv.begin() + rkv), vec(L.kv_a_norm)));
      kpe_[l].push_back(rope(Vec(kv.begin() + rkv, kv.end()), pos));
      const int64_t n = pos + 1;
      Vec att(nh * dv, 0.0);
      for (int64_t hd = 0; hd < nh; ++hd) {
        const Vec qn(q.begin() + hd * dq, q.begin() + hd * dq + dn);
        const Vec qr = rope(Vec(q.begin() + hd * dq + dn, q.begin() + (hd + 1) * dq), pos);
        // Decompress this head's key and value at every position.
        std::vector<Vec> keys(n), values(n);
        for (int64_t p = 0; p < n; ++p) {
          keys[p] = head_key(L, hd, latent_[l][p]);
          values[p] = head_value(L, hd, latent_[l][p]);
        }
        Vec s(n);
        double mx = -1e300;
        for (int64_t p = 0; p < n; ++p) {
          double dot = 0;
          for (int64_t i = 0; i < dn; ++i) dot += qn[i] * keys[p][i];
          for (int64_t i = 0; i < dr; ++i) dot += qr[i] * kpe_[l][p][i];
          s[p] = dot * scale_;
          mx = std::max(mx, s[p]);
        }
        double sum = 0;
        for (double& e : s) sum += (e = std::exp(e - mx));
        for (int64_t p = 0; p < n; ++p) {
          for (int64_t i = 0; i < dv; ++i) att[hd * dv + i] += s[p] / sum * values[p][i];
        }
      }
      const Vec o = matvec(L.wo, 0, att);
      for (int64_t i = 0; i < H; ++i) x[i] += o[i];

      const Vec h2 = rmsnorm(x, vec(L.ffn_norm));
      Vec y(H, 0.0);
      if (c_.is_dense_layer(l)) {
        y = swiglu(L.ffn_gate, L.ffn_up, L.ffn_down, 0, h2);
      } else {
        for (const auto& [e, wt] : route(L, matvec(L.router, 0, h2))) {
          const Vec ye = swiglu(L.gate_exps, L.up_exps, L.down_exps, e, h2);
          for (int64_t i = 0; i < H; ++i) y[i] += wt * ye[i];
        }
        if (c_.n_shared_experts > 0) {
          const Vec ys = swiglu(L.gate_shexp, L.up_shexp, L.down_shexp, 0, h2);
          for (int64_t i = 0; i < H; ++i) y[i] += ys[i];
        }
      }
      for (int64_t i = 0; i < H; ++i) x[i] += y[i];
    }
    return matvec(w_.output.data ? w_.output : w_.tok_embd, 0, rmsnorm(x, vec(w_.output_norm)));
  }

 private:
  // Hugging Face's rope_interleave: pairs (2i, 2i+1) are gathered into halves, rotated with
  // rotate_half and left in that order (the dot products do not depend on the order, as long as
  // queries and keys agree).
  Vec rope(const Vec& v, int64_t pos) const {
    const int64_t d = static_cast<int64_t>(v.size()), half = d / 2;
    Vec a(d), out(d);
    for (int64_t i = 0; i < half; ++i) {
      a[i] = v[2 * i];
      a[half + i] = v[2 * i + 1];
    }
    for (int64_t i = 0; i < half; ++i) {
      const double ang = static_cast<double>(pos) * inv_freq_[i];
      const double cs = std::cos(ang) * cs_scale_, sn = std::sin(ang) * cs_scale_;
      out[i] = a[i] * cs - a[half + i] * sn;
      out[half + i] = a[half + i] * cs + a[i] * sn;
    }
    return out;
  }

  // The key (qk_nope values) and value (v_head_dim) of head h from a latent, through kv_b in
  // either layout: attn_kv_b rows [h * (nope + v), ...) are the key rows then the value rows;
  // attn_k_b holds the key rows transposed, attn_v_b the value rows.
  Vec head_key(const LayerWeights& L, int64_t h, const Vec& lat) const {
    const int64_t dn = c_.qk_nope_dim(), dv = c_.v_head_dim, rkv = c_.kv_lora_rank;
    Vec k(dn, 0.0);
    if (c_.split_kv_b) {
      const Vec kb = matrix(L.wk_b, h);  // rkv rows of dn
      for (int64_t j = 0; j < rkv; ++j) {
        for (int64_t i = 0; i < dn; ++i) k[i] += kb[j * dn + i] * lat[j];
      }
    } else {
      for (int64_t i = 0; i < dn; ++i) k[i] = dot(row(L.wkv_b, h * (dn + dv) + i), lat);
    }
    return k;
  }
  Vec head_value(const LayerWeights& L, int64_t h, const Vec& lat) const {
    const int64_t dn = c_.qk_nope_dim(), dv = c_.v_head_dim;
    Vec v(dv);
    for (int64_t i = 0; i < dv; ++i) {
      v[i] = c_.split_kv_b ? dot(row(L.wv_b, h * dv + i), lat)
                           : dot(row(L.wkv_b, h * (dn + dv) + dn + i), lat);
    }
    return v;
  }

  // (expert, weight) pairs: scores, selection by biased scores among the best groups.
  std::vector<std::pair<int64_t, double>> route(const LayerWeights& L, const Vec& logits) const {
    const int64_t E = c_.n_experts;
    Vec score(E), choice(E);
    const double mx = *std::max_element(logits.begin(), logits.end());
    double z = 0;
    for (int64_t e = 0; e < E; ++e) {
      score[e] = c_.gating == ExpertGating::Sigmoid ? 1 / (1 + std::exp(-logits[e]))
                                                    : std::exp(logits[e] - mx);
      z += score[e];
    }
    const Vec bias = c_.expert_score_bias ? vec(L.exp_probs_b) : Vec(E, 0.0);
    for (int64_t e = 0; e < E; ++e) {
      if (c_.gating == ExpertGating::Softmax) score[e] /= z;
      choice[e] = score[e] + bias[e];
    }
    const int64_t G = c_.n_expert_groups, per = E / G;
    std::vector<std::pair<double, int64_t>> groups;
    for (int64_t g = 0; g < G; ++g) {
      Vec v(choice.begin() + g * per, choice.begin() + (g + 1) * per);
      std::sort(v.rbegin(), v.rend());
      groups.push_back({-(v[0] + (per > 1 ? v[1] : 0.0)), g});
    }
    std::sort(groups.begin(), groups.end());
    std::vector<std::pair<double, int64_t>> cand;
    for (int64_t j = 0; j < c_.n_groups_used; ++j) {
      for (int64_t e = groups[j].second * per; e < (groups[j].second + 1) * per; ++e) {
        cand.push_back({-choice[e], e});
      }
    }
    std::sort(cand.begin(), cand.end());
    std::vector<std::pair<int64_t, double>> out;
    double sum = 0;
    for (int64_t j = 0; j < c_.n_experts_used; ++j) sum += score[cand[j].second];
    for (int64_t j = 0; j < c_.n_experts_used; ++j) {
      const int64_t e = cand[j].second;
      out.push_back({e, score[e] * (c_.norm_topk_prob ? 1 / sum : 1.0) * c_.expert_weights_scale});
    }
    return out;
  }

  Vec swiglu(const TensorView& gate, const TensorView& up, const TensorView& down, int64_t e,
             const Vec& x) const {
    Vec g = matvec(gate, e, x);
    const Vec u = matvec(up, e, x);
    for (size_t i = 0; i < g.size(); ++i) g[i] = g[i] / (1 + std::exp(-g[i])) * u[i];
    return matvec(down, e, g);
  }

  Vec row(const TensorView& t, int64_t r) const {
    std::vector<float> f(t.row_len());
    dequantize_row(t.type, t.row(r), f.data(), t.row_len());
    return Vec(f.begin(), f.end());
  }
  Vec vec(const TensorView& t) const { return row(t, 0); }
  Vec matrix(const TensorView& t, int64_t m) const {  // matrix m of a 3-D tensor, rows in order
    Vec out;
    for (int64_t r = 0; r < t.ne[1]; ++r) {
      const Vec v = row(t, m * t.ne[1] + r);
      out.insert(out.end(), v.begin(), v.end());
    }
    return out;
  }
  static double dot(const Vec& a, const Vec& b) {
    double s = 0;
    for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
    return s;
  }
  Vec rmsnorm(const Vec& x, const Vec& w) const {
    double ss = 0;
    for (double v : x) ss += v * v;
    const double r = 1 / std::sqrt(ss / static_cast<double>(x.size()) + c_.rms_eps);
    Vec y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = w[i] * x[i] * r;
    return y;
  }
  Vec matvec(const TensorView& t, int64_t e, const Vec& x) const {
    Vec y(t.ne[1]);
    for (int64_t r = 0; r < t.ne[1]; ++r) y[r] = dot(row(t, e * t.ne[1] + r), x);
    return y;
  }

  const ModelWeights& w_;
  const ModelConfig& c_;
  int64_t pos_ = 0;
  Vec inv_freq_;
  double cs_scale_ = 1, scale_ = 1;
  std::vector<std::vector<Vec>> latent_, kpe_;  // [layer][position]
};

// ---------------------------------------------------------------------------------------------
// Models and runs

const ModelConfig& preset(const char* name) { return *find_preset(name); }

ModelConfig v2_style() {  // V2-Lite's choices on tiny dimensions (see test_deepseek_model.cpp)
  ModelConfig c = preset("tiny-deepseek");
  c.name = "tiny-deepseek-v2-style";
  c.q_lora_rank = 0;
  c.gating = ExpertGating::Softmax;
  c.expert_score_bias = false;
  c.n_expert_groups = c.n_groups_used = 1;
  c.norm_topk_prob = false;
  c.expert_weights_scale = 1.0f;
  c.n_shared_experts = 2;
  c.split_kv_b = false;
  c.yarn_mscale = c.yarn_mscale_all_dim = 0.707f;
  return c;
}

ModelConfig other_style() {  // no YaRN, no dense layer, sigmoid without bias, groups, scaled
  ModelConfig c = preset("tiny-deepseek");
  c.name = "tiny-deepseek-other";
  c.rope_scaling = RopeScaling::None;
  c.n_dense_lead = 0;
  c.expert_score_bias = false;
  c.norm_topk_prob = false;
  c.expert_weights_scale = 1.5f;
  c.n_shared_experts = 0;
  return c;
}

ModelWeights build(const ModelConfig& shape, QuantType q, uint64_t seed = 7) {
  SynthOptions o;
  o.preset = shape.name;
  o.shape = shape;
  o.quant = q;
  o.seed = seed;
  ModelWeights w = make_synthetic_model(o);
  // Synthetic selection biases are small (they must not skew routing); make them large enough
  // here that choosing by biased scores and weighting by unbiased ones both matter.
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::normal_distribution<float> nd(0.0f, 0.15f);
  for (LayerWeights& L : w.layers) {
    if (L.exp_probs_b.data == nullptr) continue;
    auto* b = reinterpret_cast<float*>(const_cast<uint8_t*>(L.exp_probs_b.data));
    for (int64_t e = 0; e < L.exp_probs_b.ne[0]; ++e) b[e] = nd(rng);
  }
  return w;
}

const std::vector<int32_t> kPrompt = {5, 77, 200, 31, 142, 9, 250, 100, 1, 0, 255};
const std::vector<int32_t> kContinuation = {17, 230, 64, 3, 128};

// Logits of every prompt position (one prefill) then of each continuation token (decode).
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

std::vector<Vec> run_reference(const ModelWeights& w) {
  Reference ref(w);
  std::vector<Vec> out;
  for (int32_t t : kPrompt) out.push_back(ref.step(t));
  for (int32_t t : kContinuation) out.push_back(ref.step(t));
  return out;
}

double rel_err(const std::vector<float>& a, const Vec& b) {
  double diff = 0, mag = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    diff = std::max(diff, std::abs(a[i] - b[i]));
    mag = std::max(mag, std::abs(b[i]));
  }
  return diff / mag;
}

std::vector<double> errors(const std::vector<std::vector<float>>& got,
                           const std::vector<Vec>& want) {
  std::vector<double> e;
  for (size_t t = 0; t < got.size(); ++t) e.push_back(rel_err(got[t], want[t]));
  return e;
}

void expect_bit_identical(const std::vector<std::vector<float>>& a,
                          const std::vector<std::vector<float>>& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t t = 0; t < a.size(); ++t) {
    ASSERT_EQ(a[t].size(), b[t].size());
    EXPECT_EQ(std::memcmp(a[t].data(), b[t].data(), a[t].size() * sizeof(float)), 0)
        << what << ": position " << t;
  }
}

// ---------------------------------------------------------------------------------------------
// Tests

// F32 weights: the engine's float32 arithmetic against the float64 model (measured ~1e-6 of
// max |logit|; a wrong rope pair, scale, norm, bias use or routing weight is 1e-2..1).
TEST(DeepseekEngine, F32MatchesTheFloat64ReferenceInEveryStyle) {
  for (const ModelConfig& shape : {preset("tiny-deepseek"), v2_style(), other_style()}) {
    const ModelWeights w = build(shape, QuantType::F32);
    const auto want = run_reference(w);
    const auto got = run_engine(w, 2);
    std::vector<double> e = errors(got, want);
    for (size_t t = 0; t < e.size(); ++t) EXPECT_LE(e[t], 1e-4) << shape.name << " position " << t;
    std::sort(e.begin(), e.end());
    std::printf("[ %s F32 ] relative error median %.3g, worst %.3g\n", shape.name.c_str(),
                e[e.size() / 2], e.back());
    expect_bit_identical(got, run_engine(w, 1), shape.name + " 2 vs 1 threads");
  }
}

// The selection bias and the groups change which experts run (the reference would disagree
// with an engine that ignored them): with the bias removed, or without group limiting, the
// logits move by far more than the tolerance above.
TEST(DeepseekEngine, BiasAndGroupsMatter) {
  const ModelWeights w = build(preset("tiny-deepseek"), QuantType::F32);
  const auto base = run_engine(w, 2);
  ModelWeights no_groups = w;
  no_groups.cfg.n_groups_used = no_groups.cfg.n_expert_groups;
  ModelWeights no_bias = w;
  no_bias.cfg.expert_score_bias = false;
  for (const ModelWeights* m : {&no_groups, &no_bias}) {
    const auto other = run_engine(*m, 2);
    double worst = 0;
    for (size_t t = 0; t < base.size(); ++t) {
      worst = std::max(worst, rel_err(other[t], Vec(base[t].begin(), base[t].end())));
    }
    EXPECT_GT(worst, 1e-2);
  }
}

// Prefill of all positions, prefill in chunks (of 3, the last one short) and one token at a
// time give the same bits: every kernel computes a row the same way for any number of rows.
TEST(DeepseekEngine, PrefillChunksAndDecodeAreBitIdentical) {
  for (QuantType q : {QuantType::F32, QuantType::Q8_0}) {
    const ModelWeights w = build(preset("tiny-deepseek"), q, 3);
    const auto whole = run_engine(w, 2);
    expect_bit_identical(whole, run_engine(w, 3, 3), std::string(quant_name(q)) + " chunks of 3");
    CpuEngineOptions opt;
    opt.threads = 2;
    opt.max_context = 64;
    CpuEngine one(w, opt);
    std::vector<int32_t> toks = kPrompt;
    toks.insert(toks.end(), kContinuation.begin(), kContinuation.end());
    std::vector<float> logits;
    for (size_t t = 0; t < toks.size(); ++t) {
      one.decode(toks[t], &logits);
      ASSERT_EQ(logits.size(), whole[t].size());
      EXPECT_EQ(std::memcmp(logits.data(), whole[t].data(), logits.size() * sizeof(float)), 0)
          << quant_name(q) << " decode at position " << t;
    }
    // Last-position prefill returns that row; reset starts over.
    one.reset();
    EXPECT_EQ(one.position(), 0);
    one.prefill(toks.data(), static_cast<int64_t>(toks.size()), &logits, false);
    EXPECT_EQ(std::memcmp(logits.data(), whole.back().data(), logits.size() * sizeof(float)), 0);
  }
}

// Q8_0 weights: the reference uses the same (dequantized) weights, so what differs is the
// engine's Q8_0 rounding of every matrix input (and of the absorbed queries and latent sums),
// noise of ~0.2 % per operand compounding over 3 layers, plus routing flips where two experts'
// scores are closer than that noise.
TEST(DeepseekEngine, Q8_0WithinActivationRoundingNoise) {
  const ModelWeights w = build(preset("tiny-deepseek"), QuantType::Q8_0);
  std::vector<double> e = errors(run_engine(w, 2), run_reference(w));
  std::sort(e.begin(), e.end());
  std::printf("[ Q8_0 ] relative error median %.3g, worst %.3g\n", e[e.size() / 2], e.back());
  EXPECT_LE(e[e.size() / 2], 5e-2);
  EXPECT_LE(e.back(), 0.5);
}

// Synthetic deepseek2 models route near-uniformly at every depth (design §8): a 24-layer stack
// with a dense first layer, a shared expert, sigmoid routing with 4 of 8 groups, and a softmax
// V2-style variant, 64 prompt tokens each.
TEST(DeepseekEngine, SyntheticRoutingStaysNearUniformWithDepth) {
  ModelConfig deep = preset("tiny-deepseek");
  deep.name = "deep";
  deep.n_layers = 24;
  deep.hidden = 256;
  deep.n_experts = 32;
  deep.n_expert_groups = 8;
  deep.n_groups_used = 4;
  ModelConfig deep_v2 = v2_style();
  deep_v2.name = "deep-v2";
  deep_v2.n_layers = 24;
  deep_v2.n_experts = 32;
  for (const ModelConfig& shape : {deep, deep_v2}) {
    SynthOptions o;
    o.preset = shape.name;
    o.shape = shape;
    o.quant = QuantType::Q8_0;
    o.seed = 11;
    const ModelWeights w = make_synthetic_model(o);
    CpuEngineOptions opt;
    opt.threads = 2;
    opt.max_context = 128;
    CpuEngine eng(w, opt);
    std::mt19937 rng(42);
    std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(shape.vocab - 1));
    std::vector<int32_t> toks(64);
    for (int32_t& t : toks) t = tok(rng);
    eng.prefill(toks.data(), 64, nullptr, false);
    const uint64_t picks = 64u * static_cast<uint64_t>(shape.n_experts_used);
    std::printf("[ %s ] experts with >= 1/4 of a uniform share, per MoE layer:",
                shape.name.c_str());
    for (int64_t l = 0; l < shape.n_layers; ++l) {
      const auto& counts = eng.expert_counts()[l];
      uint64_t total = 0, top = 0;
      int64_t well_used = 0;
      for (uint64_t c : counts) {
        total += c;
        top = std::max(top, c);
        well_used += c * 4 * static_cast<uint64_t>(shape.n_experts) >= picks;
      }
      if (shape.is_dense_layer(l)) {
        EXPECT_EQ(total, 0u) << "dense layer " << l;
        continue;
      }
      std::printf(" %ld", static_cast<long>(well_used));
      EXPECT_EQ(total, picks);
      EXPECT_GE(well_used * 4, shape.n_experts * 3) << shape.name << " layer " << l;
      EXPECT_LT(static_cast<double>(top) / static_cast<double>(total), 0.15)
          << shape.name << " layer " << l;  // uniform: 1/32
    }
    std::printf("\n");
  }
}

// --router-skew zipf:S on deepseek2: the most popular expert of each MoE layer takes a clearly
// larger share than without skew (sigmoid routing with groups, and softmax routing).
TEST(DeepseekEngine, ZipfSkewSkewsRouting) {
  for (const ModelConfig& shape : {preset("tiny-deepseek"), v2_style()}) {
    double share[2] = {0, 0};
    for (int skewed = 0; skewed < 2; ++skewed) {
      SynthOptions o;
      o.preset = shape.name;
      o.shape = shape;
      o.quant = QuantType::Q8_0;
      o.seed = 5;
      o.zipf_s = skewed ? 1.2 : 0.0;
      const ModelWeights w = make_synthetic_model(o);
      CpuEngineOptions opt;
      opt.threads = 2;
      opt.max_context = 128;
      CpuEngine eng(w, opt);
      std::mt19937 rng(42);
      std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(shape.vocab - 1));
      std::vector<int32_t> toks(64);
      for (int32_t& t : toks) t = tok(rng);
      eng.prefill(toks.data(), 64, nullptr, false);
      int moe_layers = 0;
      for (int64_t l = 0; l < shape.n_layers; ++l) {
        if (shape.is_dense_layer(l)) continue;
        const auto& counts = eng.expert_counts()[l];
        uint64_t total = 0, top = 0;
        for (uint64_t c : counts) {
          total += c;
          top = std::max(top, c);
        }
        share[skewed] += static_cast<double>(top) / static_cast<double>(total);
        ++moe_layers;
      }
      share[skewed] /= moe_layers;
    }
    std::printf(
        "[ %s ] mean top-expert share: %.3f without skew, %.3f with zipf:1.2 (uniform %.3f)\n",
        shape.name.c_str(), share[0], share[1], 1.0 / static_cast<double>(shape.n_experts));
    EXPECT_GT(share[1], share[0] + 0.05) << shape.name;
    EXPECT_GT(share[1], 2.0 / static_cast<double>(shape.n_experts)) << shape.name;
  }
}

TEST(DeepseekEngine, BadInputIsAnError) {
  const ModelWeights w = build(preset("tiny-deepseek"), QuantType::Q8_0);
  CpuEngineOptions opt;
  opt.threads = 1;
  opt.max_context = 4;
  CpuEngine eng(w, opt);
  std::vector<float> logits;
  EXPECT_THROW(eng.decode(256, &logits), Error);
  EXPECT_EQ(eng.position(), 0);
  const std::vector<int32_t> five = {1, 2, 3, 4, 5};
  EXPECT_THROW(eng.prefill(five.data(), 5, &logits, false), Error);
  ModelWeights broken = w;
  broken.layers[1].wkv_a = TensorView{};
  EXPECT_THROW({ CpuEngine bad(broken, opt); }, Error);
}

// ---------------------------------------------------------------------------------------------
// A Hugging Face folder written here from a synthetic model (DeepseekV3ForCausalLM names and
// layouts, transformers 5 fused experts, kv_b_proj whole), loaded back: the same logits, through
// the other attn_kv_b layout.

class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    path_ = fs::temp_directory_path() /
            ("ktune_test_dse_" + std::to_string(getpid()) + "_" + std::to_string(counter++));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

struct StTensor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> data;
};

void write_safetensors(const fs::path& file, const std::vector<StTensor>& tensors) {
  nlohmann::json header = nlohmann::json::object();
  uint64_t offset = 0;
  for (const StTensor& t : tensors) {
    const uint64_t bytes = t.data.size() * sizeof(float);
    header[t.name] = {
        {"dtype", "F32"}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string h = header.dump();
  while (h.size() % 8) h += ' ';
  std::ofstream out(file, std::ios::binary);
  const uint64_t n = h.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out.write(h.data(), static_cast<std::streamsize>(h.size()));
  for (const StTensor& t : tensors) {
    out.write(reinterpret_cast<const char*>(t.data.data()),
              static_cast<std::streamsize>(t.data.size() * sizeof(float)));
  }
}

std::vector<float> floats(const TensorView& t) {
  std::vector<float> out(static_cast<size_t>(t.ne[0] * t.n_rows()));
  for (int64_t r = 0; r < t.n_rows(); ++r) {
    dequantize_row(t.type, t.row(r), out.data() + r * t.ne[0], t.ne[0]);
  }
  return out;
}

TEST(DeepseekEngine, HuggingFaceFolderGivesTheSameLogits) {
  const ModelWeights w = build(preset("tiny-deepseek"), QuantType::F32);
  const ModelConfig& c = w.cfg;
  const int64_t H = c.hidden, nh = c.n_heads, dn = c.qk_nope_dim(), dv = c.v_head_dim;
  const int64_t rkv = c.kv_lora_rank, E = c.n_experts, F = c.expert_ffn;
  std::vector<StTensor> ts;
  // A PyTorch Linear weight [out, in] is ggml's {in, out}: the same floats.
  auto add = [&](const std::string& name, const TensorView& t, std::vector<int64_t> shape) {
    ts.push_back({name, shape, floats(t)});
  };
  add("model.embed_tokens.weight", w.tok_embd, {c.vocab, H});
  add("model.norm.weight", w.output_norm, {H});
  add("lm_head.weight", w.output, {c.vocab, H});
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const LayerWeights& L = w.layers[l];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", L.attn_norm, {H});
    add(p + "post_attention_layernorm.weight", L.ffn_norm, {H});
    add(p + "self_attn.q_a_proj.weight", L.wq_a, {c.q_lora_rank, H});
    add(p + "self_attn.q_a_layernorm.weight", L.q_a_norm, {c.q_lora_rank});
    add(p + "self_attn.q_b_proj.weight", L.wq_b, {nh * c.head_dim, c.q_lora_rank});
    add(p + "self_attn.kv_a_proj_with_mqa.weight", L.wkv_a, {rkv + c.rope_dim, H});
    add(p + "self_attn.kv_a_layernorm.weight", L.kv_a_norm, {rkv});
    add(p + "self_attn.o_proj.weight", L.wo, {H, nh * dv});
    // kv_b_proj [nh * (nope + v), rkv]: per head the key rows (attn_k_b transposed back), then
    // the value rows (attn_v_b).
    const std::vector<float> kb = floats(L.wk_b), vb = floats(L.wv_b);
    std::vector<float> kvb;
    for (int64_t h = 0; h < nh; ++h) {
      for (int64_t i = 0; i < dn; ++i) {
        for (int64_t j = 0; j < rkv; ++j) kvb.push_back(kb[(h * rkv + j) * dn + i]);
      }
      kvb.insert(kvb.end(), vb.begin() + h * dv * rkv, vb.begin() + (h + 1) * dv * rkv);
    }
    ts.push_back({p + "self_attn.kv_b_proj.weight", {nh * (dn + dv), rkv}, kvb});
    if (c.is_dense_layer(l)) {
      add(p + "mlp.gate_proj.weight", L.ffn_gate, {c.dense_ffn, H});
      add(p + "mlp.up_proj.weight", L.ffn_up, {c.dense_ffn, H});
      add(p + "mlp.down_proj.weight", L.ffn_down, {H, c.dense_ffn});
      continue;
    }
    add(p + "mlp.gate.weight", L.router, {E, H});
    add(p + "mlp.gate.e_score_correction_bias", L.exp_probs_b, {E});
    const std::vector<float> g = floats(L.gate_exps), u = floats(L.up_exps);
    std::vector<float> gu;  // transformers 5: [E, 2F, H], gate rows then up rows per expert
    for (int64_t e = 0; e < E; ++e) {
      gu.insert(gu.end(), g.begin() + e * F * H, g.begin() + (e + 1) * F * H);
      gu.insert(gu.end(), u.begin() + e * F * H, u.begin() + (e + 1) * F * H);
    }
    ts.push_back({p + "mlp.experts.gate_up_proj", {E, 2 * F, H}, gu});
    add(p + "mlp.experts.down_proj", L.down_exps, {E, H, F});
    add(p + "mlp.shared_experts.gate_proj.weight", L.gate_shexp, {c.shared_ffn(), H});
    add(p + "mlp.shared_experts.up_proj.weight", L.up_shexp, {c.shared_ffn(), H});
    add(p + "mlp.shared_experts.down_proj.weight", L.down_shexp, {H, c.shared_ffn()});
  }
  TempDir dir;
  write_safetensors(dir.path() / "model.safetensors", ts);
  nlohmann::json cfg = {{"model_type", "deepseek_v3"},
                        {"vocab_size", c.vocab},
                        {"hidden_size", H},
                        {"intermediate_size", c.dense_ffn},
                        {"moe_intermediate_size", F},
                        {"num_hidden_layers", c.n_layers},
                        {"num_attention_heads", nh},
                        {"num_key_value_heads", nh},
                        {"n_shared_experts", c.n_shared_experts},
                        {"n_routed_experts", E},
                        {"routed_scaling_factor", c.expert_weights_scale},
                        {"kv_lora_rank", rkv},
                        {"q_lora_rank", c.q_lora_rank},
                        {"qk_rope_head_dim", c.rope_dim},
                        {"v_head_dim", dv},
                        {"qk_nope_head_dim", dn},
                        {"n_group", c.n_expert_groups},
                        {"topk_group", c.n_groups_used},
                        {"num_experts_per_tok", c.n_experts_used},
                        {"first_k_dense_replace", c.n_dense_lead},
                        {"norm_topk_prob", c.norm_topk_prob},
                        {"max_position_embeddings", c.context_length},
                        {"rms_norm_eps", c.rms_eps},
                        {"rope_interleave", true},
                        {"tie_word_embeddings", false},
                        {"attention_bias", false},
                        {"rope_parameters",
                         {{"rope_theta", c.rope_theta},
                          {"rope_type", "yarn"},
                          {"factor", c.rope_factor},
                          {"original_max_position_embeddings", c.rope_orig_context},
                          {"beta_fast", 32},
                          {"beta_slow", 1},
                          {"mscale", c.yarn_mscale},
                          {"mscale_all_dim", c.yarn_mscale_all_dim}}}};
  std::ofstream(dir.path() / "config.json") << cfg.dump(2);

  const ModelWeights hf = load_model(dir.path().string());
  EXPECT_EQ(hf.cfg.arch, "deepseek2");
  EXPECT_FALSE(hf.cfg.split_kv_b);
  ASSERT_NE(hf.layers[1].wkv_b.data, nullptr);
  const auto a = run_engine(w, 2), b = run_engine(hf, 2);
  const auto want = run_reference(hf);
  double worst = 0, worst_ref = 0;
  for (size_t t = 0; t < a.size(); ++t) {
    worst = std::max(worst, rel_err(b[t], Vec(a[t].begin(), a[t].end())));
    worst_ref = std::max(worst_ref, rel_err(b[t], want[t]));
  }
  std::printf("[ HF folder ] vs the synthetic model %.3g, vs the float64 reference %.3g\n", worst,
              worst_ref);
  EXPECT_LE(worst, 1e-5);  // two layouts of kv_b: float rounding only
  EXPECT_LE(worst_ref, 1e-4);
}

}  // namespace
}  // namespace ktune
