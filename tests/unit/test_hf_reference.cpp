// Correctness against a reference nobody here wrote: a tiny random Qwen3MoeForCausalLM saved by
// Hugging Face transformers (tests/reference/make_qwen3moe_reference.py, run on the GPU machine
// with torch 2.11 / transformers 5.17), with its float64 logits for a prompt (every position)
// and for continuation tokens decoded one at a time with the KV cache.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "ktune/engine/cpu_engine.h"
#include "ktune/engine/hf_checkpoint.h"
#include "ktune/engine/model.h"
#include "subprocess.h"

namespace fs = std::filesystem;

namespace {

const std::string kCheckpoint = std::string(KTUNE_TEST_DATA) + "/qwen3moe-tiny-hf";

struct Reference {
  std::vector<int32_t> prompt, continuation;
  std::vector<std::vector<double>> prefill, decode;
};

Reference load_reference() {
  std::ifstream in(kCheckpoint + "/reference.json");
  nlohmann::json j = nlohmann::json::parse(in);
  Reference r;
  r.prompt = j["prompt"].get<std::vector<int32_t>>();
  r.continuation = j["continuation"].get<std::vector<int32_t>>();
  r.prefill = j["prefill"].get<std::vector<std::vector<double>>>();
  r.decode = j["decode"].get<std::vector<std::vector<double>>>();
  return r;
}

// max_i |a_i - b_i| / max_i |b_i|: the error relative to the largest logit of that row.
double rel_error(const float* a, const std::vector<double>& b) {
  double max_ref = 0, max_diff = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    max_ref = std::max(max_ref, std::abs(b[i]));
    max_diff = std::max(max_diff, std::abs(static_cast<double>(a[i]) - b[i]));
  }
  return max_diff / max_ref;
}

struct Errors {
  double worst_prefill = 0, worst_decode = 0;
  int argmax_mismatches = 0;
};

Errors compare_engine(const ktune::ModelWeights& model, const Reference& ref, int threads) {
  ktune::CpuEngineOptions opt;
  opt.threads = threads;
  opt.max_context = 64;
  ktune::CpuEngine engine(model, opt);
  const int64_t vocab = model.cfg.vocab;
  std::vector<float> pre;
  engine.prefill(ref.prompt.data(), static_cast<int64_t>(ref.prompt.size()), &pre, true);
  Errors e;
  auto check_argmax = [&](const float* a, const std::vector<double>& b) {
    const auto ib = std::max_element(b.begin(), b.end()) - b.begin();
    e.argmax_mismatches += ktune::CpuEngine::argmax(a, vocab) != ib;
  };
  for (size_t p = 0; p < ref.prompt.size(); ++p) {
    e.worst_prefill = std::max(e.worst_prefill, rel_error(&pre[p * vocab], ref.prefill[p]));
    check_argmax(&pre[p * vocab], ref.prefill[p]);
  }
  std::vector<float> step;
  for (size_t d = 0; d < ref.continuation.size(); ++d) {
    engine.decode(ref.continuation[d], &step);
    e.worst_decode = std::max(e.worst_decode, rel_error(step.data(), ref.decode[d]));
    check_argmax(step.data(), ref.decode[d]);
  }
  return e;
}

TEST(HfReference, CheckpointLoadsWithTransformers5Spelling) {
  ktune::ModelWeights m = ktune::load_model(kCheckpoint);
  EXPECT_EQ(m.cfg.n_layers, 3);
  EXPECT_EQ(m.cfg.n_experts, 8);  // config.json says num_local_experts (transformers 5)
  EXPECT_EQ(m.cfg.n_experts_used, 2);
  EXPECT_FLOAT_EQ(m.cfg.rope_theta, 1e6f);  // rope_parameters.rope_theta (transformers 5)
  EXPECT_EQ(m.cfg.head_dim, 16);
}

TEST(HfReference, F32LogitsMatchTransformersAtEveryPosition) {
  const Reference ref = load_reference();
  ktune::ModelWeights m = ktune::load_model(kCheckpoint);
  for (int threads : {1, 2}) {
    Errors e = compare_engine(m, ref, threads);
    EXPECT_LT(e.worst_prefill, 1e-4) << "threads " << threads;
    EXPECT_LT(e.worst_decode, 1e-4) << "threads " << threads;
    EXPECT_EQ(e.argmax_mismatches, 0);
    std::printf("F32 vs transformers (threads %d): prefill %.3g, decode %.3g of max |logit|\n",
                threads, e.worst_prefill, e.worst_decode);
  }
}

// Q8_0 tolerance. Q8_0 rounds each weight to 1/127 of its 32-block's max |w| and the engine
// rounds each matrix input the same way: with Gaussian-like values (block max ≈ 2.2 σ) that is
// noise of about 0.5 % of σ per operand, ~1 % per matrix product, compounding over the layers.
// Measured on this checkpoint (docs/correctness.md): the row error, max |Δlogit| / max |logit|,
// is 1.7–6.5 % (median 4.5 %), except at one prompt position where the noise moves a token to
// another expert (a routing flip), which changes that row by 24 %. BF16 weights give 0.4–0.7 %.
// Synthetic models show the same picture (Q8_0 1.5–2.5 %, Q4_0 16–26 %). That the Q8_0 path
// computes its own arithmetic exactly is shown separately (CpuEngine tests against a scalar
// reference over the same quantized operands, ~1e-7). So the bounds: median row ≤ 8 %, every
// row ≤ 35 % (a flip), argmax equal on all but at most one row.
TEST(HfReference, Q8_0LogitsWithinStatedTolerance) {
  const Reference ref = load_reference();
  const fs::path out = fs::temp_directory_path() / ("ktune_q8_" + std::to_string(getpid()) + ".gguf");
  ktune::convert_hf_to_gguf(kCheckpoint, out.string(), ktune::QuantType::Q8_0, {});
  ktune::ModelWeights m = ktune::load_model(out.string());
  fs::remove(out);
  EXPECT_EQ(m.quant, ktune::QuantType::Q8_0);

  ktune::CpuEngineOptions opt;
  opt.threads = 2;
  opt.max_context = 64;
  ktune::CpuEngine engine(m, opt);
  const int64_t vocab = m.cfg.vocab;
  std::vector<float> pre, step;
  engine.prefill(ref.prompt.data(), static_cast<int64_t>(ref.prompt.size()), &pre, true);
  std::vector<double> row_errors;
  int argmax_mismatches = 0;
  auto check = [&](const float* a, const std::vector<double>& b) {
    row_errors.push_back(rel_error(a, b));
    argmax_mismatches +=
        ktune::CpuEngine::argmax(a, vocab) != std::max_element(b.begin(), b.end()) - b.begin();
  };
  for (size_t p = 0; p < ref.prompt.size(); ++p) check(&pre[p * vocab], ref.prefill[p]);
  for (size_t d = 0; d < ref.continuation.size(); ++d) {
    engine.decode(ref.continuation[d], &step);
    check(step.data(), ref.decode[d]);
  }
  std::vector<double> sorted = row_errors;
  std::sort(sorted.begin(), sorted.end());
  const double median = sorted[sorted.size() / 2];
  std::printf("Q8_0 vs transformers: median row %.3g, worst row %.3g of max |logit|\n", median,
              sorted.back());
  EXPECT_LT(median, 0.08);
  EXPECT_LT(sorted.back(), 0.35);
  EXPECT_LE(argmax_mismatches, 1);
}

TEST(HfReference, KtuneLogitsCommandOnConvertedGguf) {
  const Reference ref = load_reference();
  const fs::path out =
      fs::temp_directory_path() / ("ktune_f32_" + std::to_string(getpid()) + ".gguf");
  auto conv = ktune::test::run_ktune({"convert", kCheckpoint, "-o", out.string(), "-q"});
  ASSERT_EQ(conv.exit_code, 0) << conv.err;
  auto join = [](const std::vector<int32_t>& v) {
    std::string s;
    for (int32_t t : v) s += (s.empty() ? "" : ",") + std::to_string(t);
    return s;
  };
  auto r = ktune::test::run_ktune({"logits", "--model", out.string(), "--tokens", join(ref.prompt),
                                   "--then", join(ref.continuation), "--json"});
  fs::remove(out);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto doc = nlohmann::json::parse(r.out);
  ASSERT_EQ(doc["prefill"].size(), ref.prompt.size());
  ASSERT_EQ(doc["decode"].size(), ref.continuation.size());
  for (size_t p = 0; p < ref.prompt.size(); ++p) {
    auto row = doc["prefill"][p].get<std::vector<float>>();
    EXPECT_LT(rel_error(row.data(), ref.prefill[p]), 1e-4) << "prefill " << p;
  }
  for (size_t d = 0; d < ref.continuation.size(); ++d) {
    auto row = doc["decode"][d].get<std::vector<float>>();
    EXPECT_LT(rel_error(row.data(), ref.decode[d]), 1e-4) << "decode " << d;
  }
}

}  // namespace
