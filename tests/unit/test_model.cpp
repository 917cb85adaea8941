// Model presets, the GGUF model loader, synthetic models and Hugging Face checkpoints.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "ktune/engine/error.h"
#include "ktune/engine/gguf.h"
#include "ktune/engine/hf_checkpoint.h"
#include "ktune/engine/model.h"
#include "ktune/engine/quant.h"
#include "ktune/engine/synthetic.h"

namespace fs = std::filesystem;
using ktune::ModelConfig;
using ktune::ModelWeights;
using ktune::QuantType;
using ktune::SynthOptions;
using ktune::TensorView;

namespace {

// A fresh folder under the system temp dir, removed with everything in it.
class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    path_ = fs::temp_directory_path() /
            ("ktune_test_model_" + std::to_string(getpid()) + "_" + std::to_string(counter++));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const ktune::Error& e) {
    return e.what();
  }
  return "(no error)";
}

int exit_code_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const ktune::Error& e) {
    return e.exit_code();
  }
  return 0;
}

bool same_bytes(const TensorView& a, const TensorView& b) {
  return a.type == b.type && a.ne == b.ne && a.nbytes() == b.nbytes() &&
         std::memcmp(a.data, b.data, static_cast<size_t>(a.nbytes())) == 0;
}

std::vector<float> dequantize(const TensorView& t) {
  std::vector<float> out(static_cast<size_t>(t.ne[0] * t.n_rows()));
  for (int64_t r = 0; r < t.n_rows(); ++r) {
    ktune::dequantize_row(t.type, t.row(r), out.data() + r * t.ne[0], t.ne[0]);
  }
  return out;
}

SynthOptions tiny(QuantType q, uint64_t seed = 1, double zipf = 0.0) {
  SynthOptions o;
  o.preset = "tiny";
  o.quant = q;
  o.seed = seed;
  o.zipf_s = zipf;
  return o;
}

// ---------------------------------------------------------------------------------------------
// Presets

TEST(ModelPresets, AllValidateAndAreFoundCaseInsensitively) {
  const std::vector<std::string> names = ktune::preset_names();
  ASSERT_EQ(names, (std::vector<std::string>{"tiny", "qwen3-30b-a3b", "qwen3-235b-a22b",
                                             "tiny-deepseek", "deepseek-v2-lite", "deepseek-v3"}));
  for (const std::string& n : names) {
    const ModelConfig* c = ktune::find_preset(n);
    ASSERT_NE(c, nullptr) << n;
    EXPECT_EQ(c->name, n);
    EXPECT_NO_THROW(c->validate(n));
  }
  EXPECT_EQ(ktune::find_preset("TINY"), ktune::find_preset("tiny"));
  EXPECT_EQ(ktune::find_preset("Qwen3-30B-A3B"), ktune::find_preset("qwen3-30b-a3b"));
  EXPECT_EQ(ktune::find_preset("qwen3"), nullptr);
}

TEST(ModelPresets, ShapesMatchTheRealModels) {
  const ModelConfig& t = *ktune::find_preset("tiny");
  EXPECT_EQ(t.hidden, 256);
  EXPECT_EQ(t.n_layers, 4);
  EXPECT_EQ(t.n_heads * t.head_dim % 256, 0);
  EXPECT_EQ(t.expert_ffn % 256, 0);
  const ModelConfig& q = *ktune::find_preset("qwen3-30b-a3b");
  EXPECT_EQ(q.hidden, 2048);
  EXPECT_EQ(q.n_layers, 48);
  EXPECT_EQ(q.n_heads, 32);
  EXPECT_EQ(q.n_kv_heads, 4);
  EXPECT_EQ(q.head_dim, 128);
  EXPECT_EQ(q.n_experts, 128);
  EXPECT_EQ(q.n_experts_used, 8);
  EXPECT_EQ(q.expert_ffn, 768);
  EXPECT_EQ(q.vocab, 151936);
  EXPECT_FLOAT_EQ(q.rope_theta, 1e6f);
  const ModelConfig& b = *ktune::find_preset("qwen3-235b-a22b");
  EXPECT_EQ(b.hidden, 4096);
  EXPECT_EQ(b.n_layers, 94);
  EXPECT_EQ(b.n_heads, 64);
  EXPECT_EQ(b.expert_ffn, 1536);
}

TEST(ModelPresets, ParameterCountsMatchTheModelCards) {
  const ModelConfig& q = *ktune::find_preset("qwen3-30b-a3b");
  EXPECT_NEAR(q.params_total() / 30.5e9, 1.0, 0.03);
  EXPECT_NEAR(q.params_active_per_token() / 3.3e9, 1.0, 0.05);
  const ModelConfig& b = *ktune::find_preset("qwen3-235b-a22b");
  EXPECT_NEAR(b.params_total() / 235e9, 1.0, 0.03);
  EXPECT_NEAR(b.params_active_per_token() / 22e9, 1.0, 0.05);
}

TEST(ModelPresets, ValidateNamesTheProblem) {
  ModelConfig c = *ktune::find_preset("tiny");
  c.n_kv_heads = 3;
  EXPECT_NE(error_of([&] { c.validate("x.gguf"); }).find("not a multiple of n_kv_heads"),
            std::string::npos);
  c = *ktune::find_preset("tiny");
  c.n_experts_used = 9;
  EXPECT_NE(error_of([&] { c.validate("x.gguf"); }).find("exceeds n_experts"), std::string::npos);
  c = *ktune::find_preset("tiny");
  c.hidden = 0;
  EXPECT_NE(error_of([&] { c.validate("x.gguf"); }).find("x.gguf: hidden"), std::string::npos);
}

// Found by tests/fuzz/fuzz_hf_config: dimensions of 2^40 overflowed params_total() (signed
// overflow, undefined behaviour); validate() now refuses them.
TEST(ModelPresets, ValidateRefusesShapesWhoseCountsOverflow) {
  ModelConfig c = *ktune::find_preset("tiny");
  c.hidden = int64_t(1) << 40;
  c.expert_ffn = int64_t(1) << 40;
  const std::string e = error_of([&] { c.validate("m.gguf"); });
  EXPECT_NE(e.find("m.gguf: the shape implies "), std::string::npos) << e;
  EXPECT_NE(e.find("parameters (more than 2^53)"), std::string::npos) << e;
  for (const char* name : {"qwen3-30b-a3b", "qwen3-235b-a22b"}) {
    EXPECT_NO_THROW(ktune::find_preset(name)->validate(name));
  }
}

TEST(ModelTensors, LlamaCppNamesAndOrder) {
  EXPECT_EQ(ktune::tensor_name_global("token_embd"), "token_embd.weight");
  EXPECT_EQ(ktune::tensor_name_layer(3, "ffn_gate_exps"), "blk.3.ffn_gate_exps.weight");
  const ModelConfig& t = *ktune::find_preset("tiny");
  const auto specs = ktune::model_tensor_specs(t);
  ASSERT_EQ(specs.size(), static_cast<size_t>(3 + 12 * t.n_layers));
  EXPECT_EQ(specs.front().name, "token_embd.weight");
  EXPECT_EQ(specs[1].name, "blk.0.attn_norm.weight");
  EXPECT_EQ(specs[specs.size() - 2].name, "output_norm.weight");
  EXPECT_EQ(specs.back().name, "output.weight");
  for (const auto& s : specs) {
    if (s.base == "ffn_down_exps") {
      EXPECT_EQ(s.ne, (std::array<int64_t, 3>{256, 256, 8}));
    }
    if (s.base == "attn_output") {
      EXPECT_EQ(s.ne, (std::array<int64_t, 3>{256, 256, 1}));
    }
    if (s.base == "attn_k") {
      EXPECT_EQ(s.ne, (std::array<int64_t, 3>{256, 128, 1}));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Synthetic specs

TEST(SynthSpec, ParsesPresetAndQuantCaseInsensitively) {
  SynthOptions o = ktune::parse_synth_spec("synth:tiny");
  EXPECT_EQ(o.preset, "tiny");
  EXPECT_EQ(o.quant, QuantType::Q8_0);
  EXPECT_EQ(o.seed, 1u);
  EXPECT_EQ(o.zipf_s, 0.0);
  o = ktune::parse_synth_spec("synth:tiny:q4_0");
  EXPECT_EQ(o.quant, QuantType::Q4_0);
  o = ktune::parse_synth_spec("synth:TINY:Q8_0");
  EXPECT_EQ(o.preset, "tiny");
  EXPECT_EQ(o.quant, QuantType::Q8_0);
  o = ktune::parse_synth_spec("synth:Qwen3-30B-A3B:bf16");
  EXPECT_EQ(o.preset, "qwen3-30b-a3b");
  EXPECT_EQ(o.quant, QuantType::BF16);
}

TEST(SynthSpec, ErrorsAreUsageErrorsThatListChoices) {
  const std::string unknown = error_of([] { ktune::parse_synth_spec("synth:qwen9"); });
  EXPECT_NE(unknown.find("unknown preset 'qwen9'"), std::string::npos) << unknown;
  EXPECT_NE(unknown.find("tiny, qwen3-30b-a3b, qwen3-235b-a22b"), std::string::npos) << unknown;
  EXPECT_EQ(exit_code_of([] { ktune::parse_synth_spec("synth:qwen9"); }), 2);
  EXPECT_EQ(exit_code_of([] { ktune::parse_synth_spec("synth:tiny:q3_k"); }), 2);
  EXPECT_EQ(exit_code_of([] { ktune::parse_synth_spec("synth:"); }), 2);
  EXPECT_EQ(exit_code_of([] { ktune::parse_synth_spec("synth:tiny:q4_0:x"); }), 2);
  EXPECT_EQ(exit_code_of([] { ktune::parse_synth_spec("tiny"); }), 2);
}

TEST(SynthSpec, RouterSkew) {
  EXPECT_DOUBLE_EQ(ktune::parse_router_skew("zipf:1.1", "--router-skew"), 1.1);
  EXPECT_DOUBLE_EQ(ktune::parse_router_skew("ZIPF:0.5", "--router-skew"), 0.5);
  EXPECT_DOUBLE_EQ(ktune::parse_router_skew("none", "--router-skew"), 0.0);
  for (const char* bad : {"zipf:", "zipf:-1", "zipf:abc", "zipf:1.1x", "gauss:1", "1.1"}) {
    const std::string e = error_of([&] { ktune::parse_router_skew(bad, "--router-skew"); });
    EXPECT_EQ(e.rfind("--router-skew: ", 0), 0u) << bad << ": " << e;
    EXPECT_EQ(exit_code_of([&] { ktune::parse_router_skew(bad, "--router-skew"); }), 2) << bad;
  }
}

// ---------------------------------------------------------------------------------------------
// Synthetic models

TEST(SynthModel, SameSeedSameBytesOtherSeedOtherBytes) {
  const ModelWeights a = ktune::make_synthetic_model(tiny(QuantType::Q4_0, 7));
  const ModelWeights b = ktune::make_synthetic_model(tiny(QuantType::Q4_0, 7));
  const ModelWeights c = ktune::make_synthetic_model(tiny(QuantType::Q4_0, 8));
  const auto la = a.tensor_list(), lb = b.tensor_list(), lc = c.tensor_list();
  ASSERT_EQ(la.size(), lb.size());
  for (size_t i = 0; i < la.size(); ++i) {
    EXPECT_TRUE(same_bytes(*la[i], *lb[i])) << la[i]->name;
    const bool is_norm = la[i]->name.find("norm") != std::string::npos;
    if (!is_norm) {
      EXPECT_FALSE(same_bytes(*la[i], *lc[i])) << la[i]->name;
    }
  }
  EXPECT_EQ(a.source, "synth:tiny:q4_0");
  EXPECT_EQ(a.quant, QuantType::Q4_0);
}

TEST(SynthModel, TypesAndShapes) {
  const ModelWeights m = ktune::make_synthetic_model(tiny(QuantType::Q8_0));
  ASSERT_EQ(m.layers.size(), 4u);
  EXPECT_EQ(m.tok_embd.type, QuantType::Q8_0);
  EXPECT_EQ(m.output.type, QuantType::Q8_0);
  EXPECT_EQ(m.output_norm.type, QuantType::F32);
  for (const auto& l : m.layers) {
    EXPECT_EQ(l.router.type, QuantType::F32);
    EXPECT_EQ(l.attn_norm.type, QuantType::F32);
    EXPECT_EQ(l.q_norm.type, QuantType::F32);
    EXPECT_EQ(l.k_norm.type, QuantType::F32);
    EXPECT_EQ(l.ffn_norm.type, QuantType::F32);
    EXPECT_EQ(l.wq.type, QuantType::Q8_0);
    EXPECT_EQ(l.down_exps.type, QuantType::Q8_0);
    EXPECT_EQ(l.gate_exps.ne, (std::array<int64_t, 3>{256, 256, 8}));
    EXPECT_EQ(l.router.ne, (std::array<int64_t, 3>{256, 8, 1}));
  }
}

TEST(SynthModel, WeightStatistics) {
  // Zero-mean everywhere, std 1/sqrt(fan_in) for matrices (0.2/sqrt(fan_in) for attn_output),
  // 1 for embeddings, norms exactly 1 (2 for q/k norms), after the round trip through each
  // storage type.
  for (QuantType q : {QuantType::F32, QuantType::BF16, QuantType::Q8_0, QuantType::Q4_0}) {
    const ModelWeights m = ktune::make_synthetic_model(tiny(q));
    for (const TensorView* t : m.tensor_list()) {
      const std::vector<float> v = dequantize(*t);
      double sum = 0, sq = 0;
      for (float x : v) {
        sum += x;
        sq += static_cast<double>(x) * x;
      }
      const double mean = sum / v.size();
      const double std = std::sqrt(sq / v.size() - mean * mean);
      const bool qk_norm = t->name.find("attn_q_norm") != std::string::npos ||
                           t->name.find("attn_k_norm") != std::string::npos;
      if (t->name.find("norm") != std::string::npos) {
        // q/k norm weights of 2 keep attention peaked (synthetic.cpp, "Depth").
        for (float x : v) ASSERT_EQ(x, qk_norm ? 2.0f : 1.0f) << t->name;
        continue;
      }
      double want = t->name == "token_embd.weight" ? 1.0 : 1.0 / std::sqrt(t->ne[0]);
      if (t->name.find("attn_output") != std::string::npos) want *= 0.2;  // "Depth" again
      EXPECT_NEAR(std / want, 1.0, 0.05) << t->name << " " << ktune::quant_name(q);
      // The mean of n values of std s has std s/sqrt(n); allow 5 of those.
      EXPECT_LT(std::abs(mean), 5 * want / std::sqrt(static_cast<double>(v.size())) + 1e-4 * want)
          << t->name << " " << ktune::quant_name(q);
    }
  }
}

// Routing of token states through a layer's router: how many times each expert is in the top k.
std::vector<int> route_embeddings(const ModelWeights& m, int64_t layer, int tokens) {
  const auto& c = m.cfg;
  const std::vector<float> router = dequantize(m.layers[layer].router);
  std::vector<int> counts(static_cast<size_t>(c.n_experts));
  std::vector<float> x(static_cast<size_t>(c.hidden));
  for (int t = 0; t < tokens; ++t) {
    ktune::dequantize_row(m.tok_embd.type, m.tok_embd.row(t * 7 % c.vocab), x.data(), c.hidden);
    double ss = 0;
    for (float v : x) ss += static_cast<double>(v) * v;
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / c.hidden));
    for (float& v : x) v *= inv;
    std::vector<std::pair<float, int>> logits;
    for (int64_t e = 0; e < c.n_experts; ++e) {
      float dot = 0;
      for (int64_t j = 0; j < c.hidden; ++j) dot += router[e * c.hidden + j] * x[j];
      logits.push_back({dot, static_cast<int>(e)});
    }
    std::partial_sort(logits.begin(), logits.begin() + c.n_experts_used, logits.end(),
                      [](auto& a, auto& b) { return a.first > b.first; });
    for (int64_t k = 0; k < c.n_experts_used; ++k) counts[logits[k].second]++;
  }
  return counts;
}

TEST(SynthModel, RoutingOfTokenStatesIsNearUniformWithoutSkew) {
  const ModelWeights m = ktune::make_synthetic_model(tiny(QuantType::Q8_0));
  for (int64_t l = 0; l < m.cfg.n_layers; ++l) {
    const std::vector<int> counts = route_embeddings(m, l, 64);
    // 128 picks over 8 experts: 16 each on average; every expert is picked, none dominates.
    for (int c : counts) {
      EXPECT_GT(c, 4) << "layer " << l;
      EXPECT_LT(c, 40) << "layer " << l;
    }
  }
}

TEST(SynthModel, ZipfSkewUsesTheBiasChannel) {
  const ModelWeights m = ktune::make_synthetic_model(tiny(QuantType::F32, 1, 1.2));
  const auto& c = m.cfg;
  // Every token carries the constant in hidden dimension 0.
  for (int64_t t = 0; t < c.vocab; ++t) {
    ASSERT_EQ(reinterpret_cast<const float*>(m.tok_embd.row(t))[0], 1.0f);
  }
  for (const auto& l : m.layers) {
    // No layer writes dimension 0: row 0 of attn_output and of every expert's down matrix is 0.
    const float* wo0 = reinterpret_cast<const float*>(l.wo.row(0));
    EXPECT_TRUE(std::all_of(wo0, wo0 + l.wo.ne[0], [](float v) { return v == 0.0f; }));
    for (int64_t e = 0; e < c.n_experts; ++e) {
      const float* d0 = reinterpret_cast<const float*>(l.down_exps.row(e * c.hidden));
      EXPECT_TRUE(std::all_of(d0, d0 + c.expert_ffn, [](float v) { return v == 0.0f; }));
      const float* d1 = reinterpret_cast<const float*>(l.down_exps.row(e * c.hidden + 1));
      EXPECT_FALSE(std::all_of(d1, d1 + c.expert_ffn, [](float v) { return v == 0.0f; }));
    }
    // Router column 0 holds distinct non-positive offsets (rank 1 gets 0).
    std::set<float> offsets;
    for (int64_t e = 0; e < c.n_experts; ++e) {
      offsets.insert(reinterpret_cast<const float*>(l.router.row(e))[0]);
    }
    EXPECT_EQ(offsets.size(), static_cast<size_t>(c.n_experts));
    EXPECT_EQ(*offsets.rbegin(), 0.0f);
  }
  // Routing of layer-0 token states follows the offsets: the top-ranked expert is picked far
  // more often than the bottom-ranked one.
  const std::vector<int> counts = route_embeddings(m, 0, 256);
  const float* r = reinterpret_cast<const float*>(m.layers[0].router.data);
  int top = 0, bottom = 0;
  for (int64_t e = 1; e < c.n_experts; ++e) {
    if (r[e * c.hidden] > r[top * c.hidden]) top = static_cast<int>(e);
    if (r[e * c.hidden] < r[bottom * c.hidden]) bottom = static_cast<int>(e);
  }
  EXPECT_GT(counts[top], 4 * std::max(1, counts[bottom]));
  // Without skew, dimension 0 is an ordinary dimension.
  const ModelWeights plain = ktune::make_synthetic_model(tiny(QuantType::F32, 1, 0.0));
  std::set<float> dim0;
  for (int64_t t = 0; t < 16; ++t) {
    dim0.insert(reinterpret_cast<const float*>(plain.tok_embd.row(t))[0]);
  }
  EXPECT_GT(dim0.size(), 10u);
}

TEST(SynthModel, ByteCounts) {
  const ModelWeights m = ktune::make_synthetic_model(tiny(QuantType::Q8_0));
  int64_t all = 0;
  for (const TensorView* t : m.tensor_list()) all += t->nbytes();
  EXPECT_EQ(m.weight_bytes(), all);
  const auto& c = m.cfg;
  const int64_t q8_row = 256 / 32 * 34;  // every Q8_0 row here has 256 values
  const int64_t expert = 3 * 256 * q8_row;
  int64_t per_layer = 0;
  const auto& l = m.layers[0];
  for (const TensorView* t : {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.q_norm, &l.k_norm,
                              &l.ffn_norm, &l.router}) {
    per_layer += t->nbytes();
  }
  const int64_t want = q8_row + m.output_norm.nbytes() + m.output.nbytes() +
                       c.n_layers * (per_layer + c.n_experts_used * expert);
  EXPECT_EQ(m.bytes_per_token_decode(), want);
  EXPECT_LT(m.bytes_per_token_decode(), m.weight_bytes());
}

// ---------------------------------------------------------------------------------------------
// Synthetic GGUF files

TEST(SynthGguf, FileHoldsTheSameBytesAsTheInMemoryModel) {
  TempDir dir;
  for (QuantType q :
       {QuantType::F32, QuantType::F16, QuantType::BF16, QuantType::Q8_0, QuantType::Q4_0}) {
    const SynthOptions opt = tiny(q, 42, q == QuantType::Q4_0 ? 1.1 : 0.0);
    const std::string path = dir.file(std::string("tiny_") + ktune::quant_name(q) + ".gguf");
    uint64_t last_done = 0, last_total = 0;
    int calls = 0;
    ktune::write_synthetic_gguf(opt, path, [&](uint64_t done, uint64_t total) {
      EXPECT_GE(done, last_done);
      last_done = done;
      last_total = total;
      ++calls;
    });
    EXPECT_GT(calls, 0);
    EXPECT_EQ(last_done, last_total);
    EXPECT_EQ(last_total, fs::file_size(path));
    const ModelWeights file = ktune::load_gguf_model(path);
    const ModelWeights mem = ktune::make_synthetic_model(opt);
    const auto lf = file.tensor_list(), lm = mem.tensor_list();
    ASSERT_EQ(lf.size(), lm.size());
    for (size_t i = 0; i < lf.size(); ++i) {
      EXPECT_EQ(lf[i]->name, lm[i]->name);
      EXPECT_TRUE(same_bytes(*lf[i], *lm[i])) << lf[i]->name << " " << ktune::quant_name(q);
    }
    EXPECT_EQ(file.quant, q);
    EXPECT_EQ(file.cfg.hidden, mem.cfg.hidden);
    EXPECT_EQ(file.cfg.n_layers, mem.cfg.n_layers);
    EXPECT_EQ(file.cfg.vocab, mem.cfg.vocab);
    EXPECT_EQ(file.cfg.n_experts_used, mem.cfg.n_experts_used);
    EXPECT_EQ(file.cfg.head_dim, mem.cfg.head_dim);
    EXPECT_EQ(file.cfg.context_length, mem.cfg.context_length);
    EXPECT_FLOAT_EQ(file.cfg.rope_theta, mem.cfg.rope_theta);
    EXPECT_FLOAT_EQ(file.cfg.rms_eps, mem.cfg.rms_eps);
    EXPECT_TRUE(file.cfg.norm_topk_prob);
    EXPECT_EQ(file.weight_bytes(), mem.weight_bytes());
  }
}

TEST(SynthGguf, MetadataIsWhatLlamaCppWrites) {
  TempDir dir;
  const std::string path = dir.file("tiny.gguf");
  ktune::write_synthetic_gguf(tiny(QuantType::Q4_0, 5, 1.1), path);
  const auto f = ktune::gguf::File::open(path);
  EXPECT_EQ(f.get_string("general.architecture"), "qwen3moe");
  EXPECT_EQ(f.get_string("general.name"), "ktune synthetic tiny");
  EXPECT_EQ(f.get_uint("general.file_type"), 2u);
  EXPECT_EQ(f.get_uint("general.quantization_version"), 2u);
  EXPECT_EQ(f.get_string("tokenizer.ggml.model"), "no_vocab");
  EXPECT_EQ(f.get_uint("qwen3moe.vocab_size"), 1024u);
  EXPECT_EQ(f.get_uint("qwen3moe.block_count"), 4u);
  EXPECT_EQ(f.get_uint("qwen3moe.embedding_length"), 256u);
  EXPECT_EQ(f.get_uint("qwen3moe.attention.head_count"), 4u);
  EXPECT_EQ(f.get_uint("qwen3moe.attention.head_count_kv"), 2u);
  EXPECT_EQ(f.get_uint("qwen3moe.attention.key_length"), 64u);
  EXPECT_EQ(f.get_uint("qwen3moe.expert_count"), 8u);
  EXPECT_EQ(f.get_uint("qwen3moe.expert_used_count"), 2u);
  EXPECT_EQ(f.get_uint("qwen3moe.expert_feed_forward_length"), 256u);
  EXPECT_EQ(f.get_uint("qwen3moe.feed_forward_length"), 1024u);
  EXPECT_EQ(f.get_uint("qwen3moe.context_length"), 4096u);
  EXPECT_DOUBLE_EQ(f.get_float("qwen3moe.rope.freq_base"), 1e6);
  EXPECT_NEAR(f.get_float("qwen3moe.attention.layer_norm_rms_epsilon"), 1e-6, 1e-12);
  EXPECT_TRUE(f.get_bool("qwen3moe.expert_weights_norm"));
  EXPECT_EQ(f.get_uint("ktune.synthetic.seed"), 5u);
  EXPECT_EQ(f.get_string("ktune.synthetic.preset"), "tiny");
  EXPECT_DOUBLE_EQ(f.get_float("ktune.synthetic.router_skew"), 1.1);
  ASSERT_EQ(f.tensors().size(), 3u + 12u * 4u);
  EXPECT_EQ(f.tensors().front().name, "token_embd.weight");
  EXPECT_EQ(f.tensors().back().name, "output.weight");
  for (const auto& t : f.tensors()) EXPECT_EQ(t.offset % f.alignment(), 0u) << t.name;
}

// Records the size of every write, so the test can see that tensors arrive in bounded chunks.
class RecordingSink : public ktune::gguf::ByteSink {
 public:
  void write(const void* data, size_t n) override {
    sizes.push_back(n);
    const auto* p = static_cast<const uint8_t*>(data);
    bytes.insert(bytes.end(), p, p + n);
  }
  std::vector<size_t> sizes;
  std::vector<uint8_t> bytes;
};

TEST(SynthGguf, StreamsTensorsInBoundedChunks) {
  // F32 makes tiny's expert tensors 2 MiB, larger than one chunk, so they must be split.
  const ktune::SyntheticGenerator gen(tiny(QuantType::F32, 3, 1.1));
  const ModelWeights mem = ktune::make_synthetic_model(tiny(QuantType::F32, 3, 1.1));
  const auto views = mem.tensor_list();
  size_t split_tensors = 0;
  for (size_t i = 0; i < gen.tensors().size(); ++i) {
    RecordingSink sink;
    gen.stream(i, sink);
    const int64_t row = ktune::row_bytes(gen.type(i), gen.tensors()[i].ne[0]);
    for (size_t n : sink.sizes) {
      EXPECT_LE(n, std::max<size_t>(ktune::kSynthChunkBytes, static_cast<size_t>(row)));
    }
    split_tensors += sink.sizes.size() > 1;
    ASSERT_EQ(static_cast<int64_t>(sink.bytes.size()), gen.tensor_bytes(i));
    EXPECT_EQ(std::memcmp(sink.bytes.data(), views[i]->data, sink.bytes.size()), 0)
        << gen.tensors()[i].name;
  }
  EXPECT_GE(split_tensors, 3u * 4u);  // gate/up/down of every layer
}

// ---------------------------------------------------------------------------------------------
// GGUF loader errors. The files are tiny's layout with one thing changed.

struct Variant {
  std::string arch = "qwen3moe";
  std::string skip;                  // tensor left out
  std::string reshape;               // tensor whose ne[1] is halved
  std::string retype;                // tensor stored with `type`
  uint32_t type = 0;
  uint32_t block_count = 0;          // metadata override when non-zero
};

std::string write_variant(const TempDir& dir, const Variant& v) {
  const ModelConfig& c = *ktune::find_preset("tiny");
  ktune::gguf::Writer w;
  ktune::set_gguf_model_metadata(w, c, QuantType::F32);
  w.set("general.architecture", ktune::gguf::Value::string(v.arch));
  if (v.block_count) w.set("qwen3moe.block_count", ktune::gguf::Value::u32(v.block_count));
  for (const auto& s : ktune::model_tensor_specs(c)) {
    if (s.name == v.skip) continue;
    std::vector<int64_t> ne(s.ne.begin(), s.ne.begin() + s.n_dims);
    if (s.name == v.reshape) ne[1] /= 2;
    QuantType t = QuantType::F32;
    if (s.name == v.retype) t = static_cast<QuantType>(v.type);
    w.add_tensor(s.name, ne, t);
  }
  const std::string path = dir.file("variant.gguf");
  w.write(path, [](size_t, const ktune::gguf::TensorInfo& info, ktune::gguf::ByteSink& out) {
    const std::vector<uint8_t> zeros(static_cast<size_t>(info.nbytes));
    out.write(zeros.data(), zeros.size());
  });
  return path;
}

TEST(ModelGgufLoader, LoadsAValidFileAndTiesAMissingOutputHead) {
  TempDir dir;
  Variant v;
  v.skip = "output.weight";
  const ModelWeights m = ktune::load_gguf_model(write_variant(dir, v));
  EXPECT_EQ(m.output.data, m.tok_embd.data);
  EXPECT_EQ(m.cfg.vocab, 1024);
  int64_t untied = 0;
  for (const TensorView* t : m.tensor_list()) untied += t->nbytes();
  EXPECT_EQ(m.weight_bytes(), untied - m.output.nbytes());  // tied bytes counted once
}

TEST(ModelGgufLoader, WrongArchitecture) {
  TempDir dir;
  Variant v;
  v.arch = "llama";
  const std::string e = error_of([&] { ktune::load_gguf_model(write_variant(dir, v)); });
  EXPECT_NE(e.find("unknown architecture llama; ktune supports qwen3moe"), std::string::npos) << e;
}

TEST(ModelGgufLoader, MissingTensor) {
  TempDir dir;
  Variant v;
  v.skip = "blk.2.attn_k.weight";
  const std::string e = error_of([&] { ktune::load_gguf_model(write_variant(dir, v)); });
  EXPECT_NE(e.find("tensor blk.2.attn_k.weight is missing"), std::string::npos) << e;
}

TEST(ModelGgufLoader, WrongShapeNamesExpectedAndActual) {
  TempDir dir;
  Variant v;
  v.reshape = "blk.1.attn_q.weight";
  const std::string e = error_of([&] { ktune::load_gguf_model(write_variant(dir, v)); });
  EXPECT_NE(e.find("tensor blk.1.attn_q.weight has shape [256, 128], expected [256, 256]"),
            std::string::npos)
      << e;
}

TEST(ModelGgufLoader, UnsupportedTypeListsSupportedOnes) {
  TempDir dir;
  Variant v;
  v.retype = "blk.0.ffn_up_exps.weight";
  v.type = 16;  // ggml's IQ2_XXS
  const std::string e = error_of([&] { ktune::load_gguf_model(write_variant(dir, v)); });
  EXPECT_NE(e.find("tensor blk.0.ffn_up_exps.weight has type IQ2_XXS, which ktune does not "
                   "support yet; supported: F32, F16, "),
            std::string::npos)
      << e;
  for (const char* t : {"BF16", "Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"}) {
    EXPECT_NE(e.find(t), std::string::npos) << e;
  }
}

TEST(ModelGgufLoader, NormWeightsMustBeF32) {
  TempDir dir;
  Variant v;
  v.retype = "blk.0.attn_norm.weight";
  v.type = static_cast<uint32_t>(QuantType::F16);
  const std::string e = error_of([&] { ktune::load_gguf_model(write_variant(dir, v)); });
  EXPECT_NE(e.find("blk.0.attn_norm.weight has type F16; norm weights must be F32"),
            std::string::npos)
      << e;
}

// Found by tests/fuzz/fuzz_gguf: a block_count of millions made the loader build millions of
// expected tensor names before finding the first one missing (seconds, and memory).
TEST(ModelGgufLoader, BlockCountTheFileCannotHoldIsRefusedAtOnce) {
  TempDir dir;
  Variant v;
  v.block_count = 4000000000u;
  const std::string e = error_of([&] { ktune::load_gguf_model(write_variant(dir, v)); });
  EXPECT_NE(e.find("block_count 4000000000 needs at least 48000000002 tensors, the file holds 51"),
            std::string::npos)
      << e;
}

TEST(ModelLoad, DispatchesOnTheSpec) {
  const ModelWeights s = ktune::load_model("synth:tiny:f16");
  EXPECT_EQ(s.source, "synth:tiny:f16");
  EXPECT_EQ(s.quant, QuantType::F16);
  const std::string missing = error_of([] { ktune::load_model("/nonexistent/model.gguf"); });
  EXPECT_NE(missing.find("/nonexistent/model.gguf: no such file or directory"),
            std::string::npos)
      << missing;
  EXPECT_NE(missing.find("synth:PRESET"), std::string::npos);
  TempDir dir;
  const std::string path = dir.file("m.gguf");
  ktune::write_synthetic_gguf(tiny(QuantType::Q8_0), path);
  const ModelWeights g = ktune::load_model(path);
  EXPECT_EQ(g.source, path);
  EXPECT_EQ(g.cfg.name, "ktune synthetic tiny");
}

// ---------------------------------------------------------------------------------------------
// Hugging Face checkpoints, written by hand: a minimal safetensors writer and a tiny config.

struct StTensor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> values;
  std::string dtype = "F32";  // F32 or BF16
};

void write_safetensors(const std::string& path, const std::vector<StTensor>& tensors) {
  nlohmann::json header = nlohmann::json::object();
  std::string data;
  for (const StTensor& t : tensors) {
    const size_t begin = data.size();
    for (float v : t.values) {
      if (t.dtype == "BF16") {
        const uint16_t h = ktune::fp32_to_bf16(v);
        data.append(reinterpret_cast<const char*>(&h), 2);
      } else {
        data.append(reinterpret_cast<const char*>(&v), 4);
      }
    }
    header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {begin, data.size()}}};
  }
  header["__metadata__"] = {{"format", "pt"}};
  std::string h = header.dump();
  while (h.size() % 8 != 0) h += ' ';
  const uint64_t n = h.size();
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << h << data;
}

// Distinct, exactly representable (in BF16 too) values: tensor k, element i.
std::vector<float> values_for(int k, int64_t n) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    v[i] = static_cast<float>(((k * 131 + i * 7) % 255) - 127) / 128.0f;
  }
  return v;
}

struct HfShape {
  int64_t hidden = 64, layers = 2, heads = 2, kv = 1, head_dim = 32, experts = 4, top_k = 2,
          ffn = 32, vocab = 50;
};

nlohmann::json hf_config(bool v5, bool tied) {
  HfShape s;
  nlohmann::json j = {
      {"architectures", {"Qwen3MoeForCausalLM"}},
      {"model_type", "qwen3_moe"},
      {"hidden_size", s.hidden},
      {"num_hidden_layers", s.layers},
      {"num_attention_heads", s.heads},
      {"num_key_value_heads", s.kv},
      {"head_dim", s.head_dim},
      {"num_experts_per_tok", s.top_k},
      {"moe_intermediate_size", s.ffn},
      {"intermediate_size", 128},
      {"vocab_size", s.vocab},
      {"max_position_embeddings", 2048},
      {"rms_norm_eps", 1e-6},
      {"norm_topk_prob", true},
      {"tie_word_embeddings", tied},
      {"decoder_sparse_step", 1},
      {"mlp_only_layers", nlohmann::json::array()},
  };
  if (v5) {
    j["num_local_experts"] = s.experts;
    j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 1000000.0}};
  } else {
    j["num_experts"] = s.experts;
    j["rope_theta"] = 1000000.0;
  }
  return j;
}

// The same weights in both spellings: v4 one tensor per expert, v5 fused expert tensors.
std::vector<StTensor> hf_tensors(bool v5, bool tied) {
  HfShape s;
  const int64_t q = s.heads * s.head_dim, kv = s.kv * s.head_dim;
  std::vector<StTensor> t;
  int k = 0;
  auto add = [&](const std::string& name, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    t.push_back({name, shape, values_for(k++, n)});
  };
  add("model.embed_tokens.weight", {s.vocab, s.hidden});
  for (int64_t l = 0; l < s.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {s.hidden});
    add(p + "self_attn.q_proj.weight", {q, s.hidden});
    add(p + "self_attn.k_proj.weight", {kv, s.hidden});
    add(p + "self_attn.v_proj.weight", {kv, s.hidden});
    add(p + "self_attn.o_proj.weight", {s.hidden, q});
    add(p + "self_attn.q_norm.weight", {s.head_dim});
    add(p + "self_attn.k_norm.weight", {s.head_dim});
    add(p + "post_attention_layernorm.weight", {s.hidden});
    add(p + "mlp.gate.weight", {s.experts, s.hidden});
    // Expert e: gate, up, down with values from tensor ids 1000 + 3e + {0, 1, 2} (per layer).
    std::vector<float> gate_up, down;
    for (int64_t e = 0; e < s.experts; ++e) {
      const int base = static_cast<int>(1000 + 100 * l + 3 * e);
      const auto g = values_for(base, s.ffn * s.hidden);
      const auto u = values_for(base + 1, s.ffn * s.hidden);
      const auto d = values_for(base + 2, s.hidden * s.ffn);
      const std::string pe = p + "mlp.experts." + std::to_string(e) + ".";
      if (!v5) {
        t.push_back({pe + "gate_proj.weight", {s.ffn, s.hidden}, g});
        t.push_back({pe + "up_proj.weight", {s.ffn, s.hidden}, u});
        t.push_back({pe + "down_proj.weight", {s.hidden, s.ffn}, d});
      }
      gate_up.insert(gate_up.end(), g.begin(), g.end());  // gate rows first, then up rows
      gate_up.insert(gate_up.end(), u.begin(), u.end());
      down.insert(down.end(), d.begin(), d.end());
    }
    if (v5) {
      t.push_back({p + "mlp.experts.gate_up_proj", {s.experts, 2 * s.ffn, s.hidden}, gate_up});
      t.push_back({p + "mlp.experts.down_proj", {s.experts, s.hidden, s.ffn}, down});
    }
  }
  add("model.norm.weight", {s.hidden});
  if (!tied) add("lm_head.weight", {s.vocab, s.hidden});
  if (v5) t[0].dtype = "BF16";  // values are exact in BF16: loads must still agree with v4
  return t;
}

void write_checkpoint(const fs::path& dir, bool v5, bool tied, bool sharded = false,
                      const std::function<void(nlohmann::json&)>& edit = {}) {
  fs::create_directories(dir);
  nlohmann::json cfg = hf_config(v5, tied);
  if (edit) edit(cfg);
  std::ofstream(dir / "config.json") << cfg.dump(2);
  std::vector<StTensor> t = hf_tensors(v5, tied);
  if (!sharded) {
    write_safetensors((dir / "model.safetensors").string(), t);
    return;
  }
  const size_t half = t.size() / 2;
  const std::vector<StTensor> a(t.begin(), t.begin() + half), b(t.begin() + half, t.end());
  write_safetensors((dir / "model-00001-of-00002.safetensors").string(), a);
  write_safetensors((dir / "model-00002-of-00002.safetensors").string(), b);
  nlohmann::json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", nlohmann::json::object()}};
  for (const auto& x : a) index["weight_map"][x.name] = "model-00001-of-00002.safetensors";
  for (const auto& x : b) index["weight_map"][x.name] = "model-00002-of-00002.safetensors";
  std::ofstream(dir / "model.safetensors.index.json") << index.dump(2);
}

float at(const TensorView& t, int64_t i) { return reinterpret_cast<const float*>(t.data)[i]; }

TEST(HfCheckpoint, LoadsTransformers4Spelling) {
  TempDir dir;
  write_checkpoint(dir.path() / "v4", false, false);
  const ModelWeights m = ktune::load_hf_checkpoint((dir.path() / "v4").string());
  HfShape s;
  EXPECT_EQ(m.cfg.name, "v4");
  EXPECT_EQ(m.cfg.hidden, s.hidden);
  EXPECT_EQ(m.cfg.n_layers, s.layers);
  EXPECT_EQ(m.cfg.n_heads, s.heads);
  EXPECT_EQ(m.cfg.n_kv_heads, s.kv);
  EXPECT_EQ(m.cfg.head_dim, s.head_dim);
  EXPECT_EQ(m.cfg.n_experts, s.experts);
  EXPECT_EQ(m.cfg.n_experts_used, s.top_k);
  EXPECT_EQ(m.cfg.expert_ffn, s.ffn);
  EXPECT_EQ(m.cfg.dense_ffn, 128);
  EXPECT_EQ(m.cfg.vocab, s.vocab);
  EXPECT_EQ(m.cfg.context_length, 2048);
  EXPECT_FLOAT_EQ(m.cfg.rope_theta, 1e6f);
  EXPECT_TRUE(m.cfg.norm_topk_prob);
  EXPECT_EQ(m.quant, QuantType::F32);
  // Layouts: PyTorch [out, in] is ggml {in, out}; expert e of layer l is matrix e.
  const auto embed = values_for(0, s.vocab * s.hidden);
  EXPECT_EQ(at(m.tok_embd, 5 * s.hidden + 3), embed[5 * s.hidden + 3]);
  const auto& l1 = m.layers[1];
  EXPECT_EQ(l1.gate_exps.ne, (std::array<int64_t, 3>{s.hidden, s.ffn, s.experts}));
  EXPECT_EQ(l1.down_exps.ne, (std::array<int64_t, 3>{s.ffn, s.hidden, s.experts}));
  const int64_t e = 2, f = 7, h = 11;
  EXPECT_EQ(at(l1.gate_exps, (e * s.ffn + f) * s.hidden + h),
            values_for(1000 + 100 + 3 * e, s.ffn * s.hidden)[f * s.hidden + h]);
  EXPECT_EQ(at(l1.up_exps, (e * s.ffn + f) * s.hidden + h),
            values_for(1000 + 100 + 3 * e + 1, s.ffn * s.hidden)[f * s.hidden + h]);
  EXPECT_EQ(at(l1.down_exps, (e * s.hidden + h) * s.ffn + f),
            values_for(1000 + 100 + 3 * e + 2, s.hidden * s.ffn)[h * s.ffn + f]);
  EXPECT_NE(m.output.data, m.tok_embd.data);
}

TEST(HfCheckpoint, Transformers5SpellingGivesTheSameWeights) {
  TempDir dir;
  write_checkpoint(dir.path() / "v4", false, false);
  write_checkpoint(dir.path() / "v5", true, false);
  const ModelWeights a = ktune::load_hf_checkpoint((dir.path() / "v4").string());
  const ModelWeights b = ktune::load_hf_checkpoint((dir.path() / "v5").string());
  EXPECT_EQ(b.cfg.n_experts, a.cfg.n_experts);
  EXPECT_FLOAT_EQ(b.cfg.rope_theta, 1e6f);
  const auto la = a.tensor_list(), lb = b.tensor_list();
  ASSERT_EQ(la.size(), lb.size());
  for (size_t i = 0; i < la.size(); ++i) EXPECT_TRUE(same_bytes(*la[i], *lb[i])) << la[i]->name;
}

TEST(HfCheckpoint, ShardedWithIndexAndTiedEmbeddings) {
  TempDir dir;
  write_checkpoint(dir.path() / "tied", false, true, /*sharded=*/true);
  const ModelWeights m = ktune::load_model((dir.path() / "tied").string());
  EXPECT_EQ(m.output.data, m.tok_embd.data);
  EXPECT_EQ(m.layers.size(), 2u);
  EXPECT_EQ(at(m.output_norm, 3), values_for(1 + 9 * 2, 64)[3]);
}

TEST(HfCheckpoint, ConvertsToGgufWithTheSameTensors) {
  TempDir dir;
  const std::string ck = (dir.path() / "v5").string();
  write_checkpoint(ck, true, false);
  const ModelWeights mem = ktune::load_hf_checkpoint(ck);
  const std::string f32 = dir.file("f32.gguf");
  ktune::convert_hf_to_gguf(ck, f32, QuantType::F32);
  const ModelWeights file = ktune::load_gguf_model(f32);
  const auto lm = mem.tensor_list(), lf = file.tensor_list();
  for (size_t i = 0; i < lm.size(); ++i) EXPECT_TRUE(same_bytes(*lm[i], *lf[i])) << lm[i]->name;
  EXPECT_EQ(file.cfg.n_experts, mem.cfg.n_experts);
  EXPECT_FLOAT_EQ(file.cfg.rope_theta, 1e6f);

  const std::string q8 = dir.file("q8.gguf");
  ktune::convert_hf_to_gguf(ck, q8, QuantType::Q8_0);
  const ModelWeights q = ktune::load_gguf_model(q8);
  EXPECT_EQ(q.quant, QuantType::Q8_0);
  EXPECT_EQ(q.layers[0].wq.type, QuantType::Q8_0);
  EXPECT_EQ(q.layers[0].router.type, QuantType::F32);
  EXPECT_EQ(q.layers[0].attn_norm.type, QuantType::F32);
  const std::vector<float> a = dequantize(mem.layers[1].down_exps);
  const std::vector<float> b = dequantize(q.layers[1].down_exps);
  for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], 0.01) << i;
}

TEST(HfCheckpoint, ParseHfConfigReadsTheTextLikeReadHfConfig) {
  const std::string dir = std::string(KTUNE_TEST_DATA) + "/qwen3moe-tiny-hf";
  std::ifstream in(dir + "/config.json");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const ModelConfig a = ktune::read_hf_config(dir);
  const ModelConfig b = ktune::parse_hf_config(text, dir + "/config.json");
  EXPECT_EQ(a.name, "qwen3moe-tiny-hf");
  EXPECT_EQ(b.name, a.name);
  EXPECT_EQ(b.params_total(), a.params_total());
  EXPECT_EQ(b.rope_theta, a.rope_theta);
  EXPECT_EQ(b.n_experts, a.n_experts);
}

// Found by tests/fuzz/fuzz_hf_config: a string key holding another type threw nlohmann's
// type_error instead of ktune::Error.
TEST(HfCheckpoint, WrongTypesAreKtuneErrors) {
  std::string e = error_of([] { ktune::parse_hf_config(R"({"model_type": 4})", "d/config.json"); });
  EXPECT_NE(e.find("d/config.json: key model_type is not a string (4)"), std::string::npos) << e;
  e = error_of([] {
    ktune::parse_hf_config(R"({"model_type": "qwen3_moe", "hidden_size": 64,
      "num_hidden_layers": 1, "num_attention_heads": 4, "num_experts": 4,
      "num_experts_per_tok": 2, "moe_intermediate_size": 8, "vocab_size": 16,
      "rope_parameters": {"rope_theta": 1e6, "rope_type": [1]}})", "d/config.json");
  });
  EXPECT_NE(e.find("key rope_type is not a string ([1])"), std::string::npos) << e;
  e = error_of([] { ktune::parse_hf_config("{\"model_type\": ", "d/config.json"); });
  EXPECT_NE(e.find("d/config.json: invalid JSON"), std::string::npos) << e;
}

TEST(HfCheckpoint, RejectsWhatKtuneCannotRun) {
  TempDir dir;
  int n = 0;
  auto error_with = [&](const std::function<void(nlohmann::json&)>& edit) {
    const fs::path p = dir.path() / ("bad" + std::to_string(n++));
    write_checkpoint(p, false, false, false, edit);
    return error_of([&] { ktune::load_hf_checkpoint(p.string()); });
  };
  std::string e = error_with([](nlohmann::json& j) { j["decoder_sparse_step"] = 2; });
  EXPECT_NE(e.find("decoder_sparse_step is 2"), std::string::npos) << e;
  e = error_with([](nlohmann::json& j) { j["mlp_only_layers"] = {1}; });
  EXPECT_NE(e.find("mlp_only_layers is [1]"), std::string::npos) << e;
  e = error_with([](nlohmann::json& j) { j["model_type"] = "llama"; });
  EXPECT_NE(e.find("model_type 'llama' is not supported"), std::string::npos) << e;
  e = error_with([](nlohmann::json& j) { j.erase("moe_intermediate_size"); });
  EXPECT_NE(e.find("key moe_intermediate_size is missing"), std::string::npos) << e;
  e = error_with([](nlohmann::json& j) { j["num_experts"] = 5; });
  EXPECT_NE(e.find("tensor model.layers.0.mlp.gate.weight has shape [4, 64], expected [5, 64]"),
            std::string::npos)
      << e;
  // A missing tensor is named.
  const fs::path p = dir.path() / "missing";
  write_checkpoint(p, false, false);
  std::vector<StTensor> t = hf_tensors(false, false);
  t.erase(std::remove_if(t.begin(), t.end(),
                         [](const StTensor& x) {
                           return x.name == "model.layers.1.mlp.experts.3.up_proj.weight";
                         }),
          t.end());
  write_safetensors((p / "model.safetensors").string(), t);
  e = error_of([&] { ktune::load_hf_checkpoint(p.string()); });
  EXPECT_NE(e.find("tensor model.layers.1.mlp.experts.3.up_proj.weight is missing"),
            std::string::npos)
      << e;
  e = error_of([&] { ktune::load_hf_checkpoint((dir.path() / "nothing").string()); });
  EXPECT_NE(e.find("no config.json"), std::string::npos) << e;
}

}  // namespace
