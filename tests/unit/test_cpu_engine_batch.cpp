// Concurrent sequences on the CPU engine: a batched decode step (decode_batch) of B sequences
// with different prompts generates the same greedy tokens as B separate single-sequence runs,
// its logits agree with them up to float rounding, batching never mixes sequences (each row is
// bit-identical whatever else is in the batch), and bad batches are refused; qwen3moe and
// deepseek2.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "ktune/engine/cpu_engine.h"
#include "ktune/engine/error.h"
#include "ktune/engine/synthetic.h"

namespace ktune {
namespace {

ModelWeights tiny_model(QuantType q, const std::string& preset = "tiny") {
  SynthOptions o;
  o.preset = preset;
  o.quant = q;
  o.seed = 11;
  return make_synthetic_model(o);
}

const std::vector<std::vector<int32_t>> kPrompts = {
    {5, 77, 300, 12}, {900, 3}, {42, 42, 42, 42, 42, 7}, {1000, 1, 512}, {8},
};
constexpr int kGen = 6;

// The prompts within the model's vocabulary.
std::vector<int32_t> prompt_of(const ModelWeights& w, size_t b) {
  std::vector<int32_t> p = kPrompts[b];
  for (int32_t& t : p) t = static_cast<int32_t>(t % w.cfg.vocab);
  return p;
}

// Greedy generation of one sequence alone: prefill, then decode() token by token.
std::vector<int32_t> generate_alone(const ModelWeights& w, const std::vector<int32_t>& prompt,
                                    std::vector<std::vector<float>>* logits_out) {
  CpuEngineOptions opt;
  opt.threads = 2;
  opt.max_context = 32;
  CpuEngine eng(w, opt);
  std::vector<float> logits;
  eng.prefill(prompt.data(), static_cast<int64_t>(prompt.size()), &logits, false);
  std::vector<int32_t> out;
  for (int i = 0; i < kGen; ++i) {
    const int32_t tok = CpuEngine::argmax(logits.data(), w.cfg.vocab);
    out.push_back(tok);
    eng.decode(tok, &logits);
    if (logits_out) logits_out->push_back(logits);
  }
  return out;
}

// The same B sequences together: each prefilled alone, then decode_batch steps.
std::vector<std::vector<int32_t>> generate_batched(
    const ModelWeights& w, size_t B, int threads,
    std::vector<std::vector<std::vector<float>>>* logits_out) {
  CpuEngineOptions opt;
  opt.threads = threads;
  opt.max_context = 32;
  opt.max_sequences = static_cast<int64_t>(B);
  CpuEngine eng(w, opt);
  const int64_t V = w.cfg.vocab;
  std::vector<int32_t> next(B);
  std::vector<float> logits;
  for (size_t b = 0; b < B; ++b) {
    eng.set_sequence(static_cast<int64_t>(b));
    const std::vector<int32_t> p = prompt_of(w, b);
    eng.prefill(p.data(), static_cast<int64_t>(p.size()), &logits, false);
    next[b] = CpuEngine::argmax(logits.data(), V);
  }
  std::vector<std::vector<int32_t>> out(B);
  if (logits_out) logits_out->assign(B, {});
  for (int i = 0; i < kGen; ++i) {
    for (size_t b = 0; b < B; ++b) out[b].push_back(next[b]);
    eng.decode_batch(next.data(), static_cast<int64_t>(B), &logits);
    EXPECT_EQ(static_cast<int64_t>(logits.size()), static_cast<int64_t>(B) * V);
    for (size_t b = 0; b < B; ++b) {
      const float* row = logits.data() + b * V;
      next[b] = CpuEngine::argmax(row, V);
      if (logits_out) (*logits_out)[b].emplace_back(row, row + V);
      EXPECT_EQ(eng.position(static_cast<int64_t>(b)),
                static_cast<int64_t>(kPrompts[b].size()) + i + 1);
    }
  }
  return out;
}

double max_rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::fabs(double(a[i]) - double(b[i])));
    den = std::max(den, std::fabs(double(b[i])));
  }
  return num / std::max(den, 1e-30);
}

void check_batch_equals_alone(QuantType q, const std::string& preset = "tiny") {
  const ModelWeights w = tiny_model(q, preset);
  const size_t B = kPrompts.size();
  std::vector<std::vector<std::vector<float>>> batched_logits;
  const auto batched = generate_batched(w, B, 3, &batched_logits);
  for (size_t b = 0; b < B; ++b) {
    std::vector<std::vector<float>> alone_logits;
    EXPECT_EQ(batched[b], generate_alone(w, prompt_of(w, b), &alone_logits))
        << quant_name(q) << " sequence " << b;
    for (int i = 0; i < kGen; ++i) {
      EXPECT_LE(max_rel_diff(batched_logits[b][i], alone_logits[i]), 1e-4)
          << quant_name(q) << " sequence " << b << " step " << i;
    }
  }
  // Batching never mixes sequences: each sequence's rows are bit-identical with a batch of 2
  // (itself and sequence 0) and of all five, and with another thread count.
  std::vector<std::vector<std::vector<float>>> two, other_threads;
  generate_batched(w, 2, 2, &two);
  generate_batched(w, B, 1, &other_threads);
  for (int i = 0; i < kGen; ++i) {
    EXPECT_EQ(std::memcmp(two[1][i].data(), batched_logits[1][i].data(),
                          two[1][i].size() * sizeof(float)),
              0)
        << quant_name(q) << " step " << i;
    for (size_t b = 0; b < B; ++b) {
      EXPECT_EQ(std::memcmp(other_threads[b][i].data(), batched_logits[b][i].data(),
                            other_threads[b][i].size() * sizeof(float)),
                0)
          << quant_name(q) << " sequence " << b << " step " << i;
    }
  }
}

TEST(CpuEngineBatch, GreedyTokensEqualSeparateRunsF32) { check_batch_equals_alone(QuantType::F32); }
TEST(CpuEngineBatch, GreedyTokensEqualSeparateRunsQ8_0) {
  check_batch_equals_alone(QuantType::Q8_0);
}
TEST(CpuEngineBatch, GreedyTokensEqualSeparateRunsQ4_K) {
  check_batch_equals_alone(QuantType::Q4_K);
}
TEST(CpuEngineBatch, GreedyTokensEqualSeparateRunsDeepseekF32) {
  check_batch_equals_alone(QuantType::F32, "tiny-deepseek");
}
TEST(CpuEngineBatch, GreedyTokensEqualSeparateRunsDeepseekQ8_0) {
  check_batch_equals_alone(QuantType::Q8_0, "tiny-deepseek");
}

TEST(CpuEngineBatch, BadBatchesAreRefused) {
  const ModelWeights w = tiny_model(QuantType::Q8_0);
  CpuEngineOptions opt;
  opt.threads = 1;
  opt.max_context = 4;
  opt.max_sequences = 2;
  CpuEngine eng(w, opt);
  const int32_t toks[3] = {1, 2, 3};
  EXPECT_THROW(eng.decode_batch(toks, 3, nullptr), Error);  // more than max_sequences
  EXPECT_THROW(eng.set_sequence(2), Error);
  for (int i = 0; i < 4; ++i) eng.decode_batch(toks, 2, nullptr);
  EXPECT_EQ(eng.position(1), 4);
  EXPECT_THROW(eng.decode_batch(toks, 2, nullptr), Error);  // past the KV cache
  eng.reset();
  EXPECT_EQ(eng.position(1), 0);
  const int32_t bad[2] = {1, static_cast<int32_t>(w.cfg.vocab)};
  EXPECT_THROW(eng.decode_batch(bad, 2, nullptr), Error);
  EXPECT_EQ(eng.position(0), 0);  // a refused step changes nothing
  opt.max_sequences = 0;
  EXPECT_THROW(CpuEngine(w, opt), Error);
  const ModelWeights ds = tiny_model(QuantType::F32, "tiny-deepseek");
  EXPECT_THROW(CpuEngine(ds, opt), Error);
  opt.max_sequences = 2;
  CpuEngine d(ds, opt);
  EXPECT_THROW(d.decode_batch(toks, 3, nullptr), Error);
  for (int i = 0; i < 4; ++i) d.decode_batch(toks, 2, nullptr);
  EXPECT_THROW(d.decode_batch(toks, 2, nullptr), Error);  // past the KV cache
  d.reset();
  EXPECT_EQ(d.position(1), 0);
}

}  // namespace
}  // namespace ktune
