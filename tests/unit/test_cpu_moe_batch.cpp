// CpuMoeBatch (the CPU experts of a batched hybrid decode step): each token's sum equals
// CpuMoe::compute on that token alone with the same expert list, bit for bit, whatever the
// batch, the other tokens' lists (shared experts, empty lists) and the thread count; an expert
// that several tokens chose is read once (its grouped work); bad input is refused.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "ktune/engine/cpu_moe.h"
#include "ktune/engine/error.h"
#include "ktune/engine/model.h"
#include "ktune/engine/quant.h"
#include "ktune/engine/thread_pool.h"
#include "runtime/cpu_moe_batch.h"
#include "runtime/cpu_ops.h"

namespace ktune {
namespace {

const ModelWeights& tiny(QuantType q) {
  static const ModelWeights q8 = load_model("synth:tiny:q8_0");
  static const ModelWeights q4 = load_model("synth:tiny:q4_0");
  static const ModelWeights f32 = load_model("synth:tiny:f32");
  static const ModelWeights q4k = load_model("synth:tiny:q4_k");  // Q8_K activations
  switch (q) {
    case QuantType::Q8_0:
      return q8;
    case QuantType::F32:
      return f32;
    case QuantType::Q4_K:
      return q4k;
    default:
      return q4;
  }
}

struct Batch {
  int64_t T = 0, ld = 0;
  std::vector<float> h, w;
  std::vector<int32_t> ids, counts;
};

// T tokens of RMS-normed random states; token t lists up to `ld` distinct experts (some none),
// drawn from a few experts so that tokens share them.
Batch make_batch(const ModelWeights& m, int64_t layer, int64_t T, int64_t ld, uint64_t seed) {
  const int64_t H = m.cfg.hidden, E = m.cfg.n_experts;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> nw(static_cast<size_t>(H)), x(static_cast<size_t>(H));
  dequantize_row(m.layers[layer].ffn_norm.type, m.layers[layer].ffn_norm.data, nw.data(), H);
  Batch b;
  b.T = T;
  b.ld = ld;
  b.h.resize(static_cast<size_t>(T * H));
  b.ids.assign(static_cast<size_t>(T * ld), -7);
  b.w.assign(static_cast<size_t>(T * ld), 0.0f);
  b.counts.resize(static_cast<size_t>(T));
  std::vector<int32_t> all(static_cast<size_t>(E));
  std::iota(all.begin(), all.end(), 0);
  for (int64_t t = 0; t < T; ++t) {
    for (auto& v : x) v = nd(rng);
    cpu_ops::rmsnorm(x.data(), nw.data(), m.cfg.rms_eps, H, b.h.data() + t * H);
    std::shuffle(all.begin(), all.end(), rng);
    const int64_t n = (t % 5 == 3) ? 0 : 1 + static_cast<int64_t>(rng() % ld);
    b.counts[static_cast<size_t>(t)] = static_cast<int32_t>(n);
    for (int64_t j = 0; j < n; ++j) {
      b.ids[static_cast<size_t>(t * ld + j)] = all[static_cast<size_t>(j)];
      b.w[static_cast<size_t>(t * ld + j)] = 0.1f + 0.8f * static_cast<float>(rng() % 1000) / 1000;
    }
  }
  return b;
}

std::vector<float> per_token_reference(const ModelWeights& m, int64_t layer, const Batch& b,
                                       int threads) {
  ThreadPool pool(threads, false);
  CpuMoe moe(m, pool);
  const int64_t H = m.cfg.hidden;
  std::vector<float> y(static_cast<size_t>(b.T * H));
  for (int64_t t = 0; t < b.T; ++t) {
    moe.compute(layer, b.h.data() + t * H, b.ids.data() + t * b.ld, b.w.data() + t * b.ld,
                b.counts[static_cast<size_t>(t)], y.data() + t * H);
  }
  return y;
}

std::vector<float> batched(const ModelWeights& m, int64_t layer, const Batch& b, int threads,
                           int64_t* active = nullptr) {
  ThreadPool pool(threads, false);
  CpuMoeBatch moe(m, pool, std::max<int64_t>(b.T, 1), b.ld);
  std::vector<float> y(static_cast<size_t>(b.T * m.cfg.hidden), 12345.0f);
  moe.compute(layer, b.T, b.h.data(), b.ids.data(), b.w.data(), b.counts.data(), b.ld, y.data());
  if (active) *active = moe.last_active_experts();
  return y;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

TEST(CpuMoeBatch, EachTokenEqualsCpuMoeAloneBitForBit) {
  for (QuantType q : {QuantType::Q8_0, QuantType::Q4_0, QuantType::F32, QuantType::Q4_K}) {
    const ModelWeights& m = tiny(q);
    for (int64_t T : {1, 5, 32}) {
      const int64_t layer = T % m.cfg.n_layers;
      const Batch b = make_batch(m, layer, T, 4, 100 + static_cast<uint64_t>(T));
      const auto ref = per_token_reference(m, layer, b, 2);
      for (int threads : {1, 3}) {
        EXPECT_TRUE(same_bits(batched(m, layer, b, threads), ref))
            << quant_name(q) << " T " << T << " threads " << threads;
      }
    }
  }
}

TEST(CpuMoeBatch, RowsDoNotDependOnTheOtherTokens) {
  const ModelWeights& m = tiny(QuantType::Q4_0);
  const int64_t H = m.cfg.hidden;
  const Batch b = make_batch(m, 1, 9, 3, 7);
  const auto all = batched(m, 1, b, 3);
  for (int64_t t = 0; t < b.T; ++t) {
    Batch one;
    one.T = 1;
    one.ld = b.ld;
    one.h.assign(b.h.begin() + t * H, b.h.begin() + (t + 1) * H);
    one.ids.assign(b.ids.begin() + t * b.ld, b.ids.begin() + (t + 1) * b.ld);
    one.w.assign(b.w.begin() + t * b.ld, b.w.begin() + (t + 1) * b.ld);
    one.counts = {b.counts[static_cast<size_t>(t)]};
    const std::vector<float> row(all.begin() + t * H, all.begin() + (t + 1) * H);
    EXPECT_TRUE(same_bits(batched(m, 1, one, 2), row)) << "token " << t;
    if (one.counts[0] == 0) {
      EXPECT_TRUE(std::all_of(row.begin(), row.end(), [](float v) { return v == 0.0f; }));
    }
  }
}

TEST(CpuMoeBatch, SharedExpertsAreGroupedAndNoPairsGiveZeros) {
  const ModelWeights& m = tiny(QuantType::Q8_0);
  const int64_t H = m.cfg.hidden;
  Batch b = make_batch(m, 0, 6, 2, 3);
  for (int64_t t = 0; t < b.T; ++t) {  // every token: experts 5 then 2
    b.counts[static_cast<size_t>(t)] = 2;
    b.ids[static_cast<size_t>(t * 2)] = 5;
    b.ids[static_cast<size_t>(t * 2 + 1)] = 2;
    b.w[static_cast<size_t>(t * 2)] = 0.75f;
    b.w[static_cast<size_t>(t * 2 + 1)] = 0.25f;
  }
  int64_t active = 0;
  const auto y = batched(m, 0, b, 2, &active);
  EXPECT_EQ(active, 2);
  EXPECT_TRUE(same_bits(y, per_token_reference(m, 0, b, 1)));
  std::fill(b.counts.begin(), b.counts.end(), 0);
  const auto z = batched(m, 0, b, 2, &active);
  EXPECT_EQ(active, 0);
  EXPECT_EQ(z.size(), static_cast<size_t>(b.T * H));
  EXPECT_TRUE(std::all_of(z.begin(), z.end(), [](float v) { return v == 0.0f; }));
}

TEST(CpuMoeBatch, RefusesBadInput) {
  const ModelWeights& m = tiny(QuantType::Q4_0);
  ThreadPool pool(1, false);
  CpuMoeBatch moe(m, pool, 4, 2);
  const int64_t H = m.cfg.hidden;
  std::vector<float> h(static_cast<size_t>(5 * H), 0.1f), y(h.size()), w(10, 0.5f);
  std::vector<int32_t> ids(10, 1), counts(5, 1);
  auto message = [&](auto&& call) {
    try {
      call();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message([&] {
              moe.compute(99, 1, h.data(), ids.data(), w.data(), counts.data(), 2, y.data());
            }).find("layer 99"),
            std::string::npos);
  EXPECT_NE(message([&] {
              moe.compute(0, 5, h.data(), ids.data(), w.data(), counts.data(), 2, y.data());
            }).find("5 tokens"),
            std::string::npos);
  ids[1] = 8;  // tiny has experts 0..7
  EXPECT_NE(message([&] {
              moe.compute(0, 1, h.data(), ids.data(), w.data(), counts.data(), 2, y.data());
            }).find("no error"),
            std::string::npos);  // counts[0] = 1: the bad id is not listed
  counts[0] = 2;
  EXPECT_NE(message([&] {
              moe.compute(0, 1, h.data(), ids.data(), w.data(), counts.data(), 2, y.data());
            }).find("expert id 8"),
            std::string::npos);
  counts[0] = 3;
  EXPECT_NE(message([&] {
              moe.compute(0, 1, h.data(), ids.data(), w.data(), counts.data(), 2, y.data());
            }).find("lists 3 experts"),
            std::string::npos);
  EXPECT_THROW(CpuMoeBatch(m, pool, 0, 2), Error);
  EXPECT_THROW(CpuMoeBatch(m, pool, 4, 9), Error);
}

}  // namespace
}  // namespace ktune
