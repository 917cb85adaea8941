// CpuMoe (the CPU half of a hybrid MoE layer): partial sums over a subset of a token's experts
// and its complement add up to the full MoE output, which agrees with a naive scalar reference;
// results do not depend on the thread count.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "ktune/engine/cpu_kernels.h"
#include "ktune/engine/cpu_moe.h"
#include "ktune/engine/error.h"
#include "ktune/engine/model.h"
#include "ktune/engine/quant.h"
#include "ktune/engine/thread_pool.h"
#include "runtime/cpu_ops.h"

namespace ktune {
namespace {

const ModelWeights& tiny(QuantType q) {
  static const ModelWeights q8 = load_model("synth:tiny:q8_0");
  static const ModelWeights q4 = load_model("synth:tiny:q4_0");
  static const ModelWeights q4k = load_model("synth:tiny:q4_k");  // Q8_K activations
  return q == QuantType::Q8_0 ? q8 : q == QuantType::Q4_K ? q4k : q4;
}

// A hidden state like the engine's MoE input: RMS-normed random values times the layer's norm.
std::vector<float> hidden_state(const ModelWeights& w, int64_t layer, std::mt19937_64& rng) {
  const int64_t H = w.cfg.hidden;
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(H), nw(H), h(H);
  for (auto& v : x) v = nd(rng);
  dequantize_row(w.layers[layer].ffn_norm.type, w.layers[layer].ffn_norm.data, nw.data(), H);
  cpu_ops::rmsnorm(x.data(), nw.data(), w.cfg.rms_eps, H, h.data());
  return h;
}

// The token's top-k experts by the model's own router (ids ascending, weights renormalized as
// the engine does), computed in float from the same h.
void route(const ModelWeights& w, int64_t layer, const std::vector<float>& h,
           std::vector<int32_t>* ids, std::vector<float>* weights) {
  const ModelConfig& c = w.cfg;
  const TensorView& R = w.layers[layer].router;
  std::vector<float> row(c.hidden), logits(c.n_experts), probs(c.n_experts);
  for (int64_t e = 0; e < c.n_experts; ++e) {
    dequantize_row(R.type, R.row(e), row.data(), c.hidden);
    double s = 0;
    for (int64_t i = 0; i < c.hidden; ++i) s += double(row[i]) * h[i];
    logits[e] = static_cast<float>(s);
  }
  ids->resize(c.n_experts_used);
  weights->resize(c.n_experts_used);
  cpu_ops::route_topk(logits.data(), c.n_experts, c.n_experts_used, c.norm_topk_prob, probs.data(),
                      ids->data(), weights->data());
}

// Naive scalar reference: dequantized weights, dot products in double; the activations that the
// kernels multiply as Q8_0 (h for gate/up, the SwiGLU output for down) are rounded through Q8_0
// first, as the engine does.
std::vector<double> reference(const ModelWeights& w, int64_t layer, const std::vector<float>& h,
                              const std::vector<int32_t>& ids, const std::vector<float>& wts) {
  const ModelConfig& c = w.cfg;
  const LayerWeights& L = w.layers[layer];
  auto round_act = [](QuantType wt, std::vector<float> v) {
    const QuantType a = cpu::activation_type(wt);
    if (a == QuantType::F32) return v;
    std::vector<uint8_t> q(row_bytes(a, static_cast<int64_t>(v.size())));
    quantize_row(a, v.data(), q.data(), static_cast<int64_t>(v.size()));
    dequantize_row(a, q.data(), v.data(), static_cast<int64_t>(v.size()));
    return v;
  };
  auto dot_row = [](const TensorView& t, const uint8_t* m, int64_t r, const std::vector<float>& x) {
    std::vector<float> row(t.row_len());
    dequantize_row(t.type, m + r * t.row_stride(), row.data(), t.row_len());
    double s = 0;
    for (int64_t i = 0; i < t.row_len(); ++i) s += double(row[i]) * x[i];
    return s;
  };
  const std::vector<float> hg = round_act(L.gate_exps.type, h);
  const std::vector<float> hu = round_act(L.up_exps.type, h);
  std::vector<double> y(c.hidden, 0.0);
  for (size_t j = 0; j < ids.size(); ++j) {
    std::vector<float> a(c.expert_ffn);
    for (int64_t r = 0; r < c.expert_ffn; ++r) {
      const double gv = dot_row(L.gate_exps, L.gate_exps.matrix(ids[j]), r, hg);
      const double uv = dot_row(L.up_exps, L.up_exps.matrix(ids[j]), r, hu);
      a[r] = static_cast<float>(gv / (1.0 + std::exp(-gv)) * uv);
    }
    a = round_act(L.down_exps.type, a);
    for (int64_t r = 0; r < c.hidden; ++r) {
      y[r] += double(wts[j]) * dot_row(L.down_exps, L.down_exps.matrix(ids[j]), r, a);
    }
  }
  return y;
}

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, double(std::fabs(x)));
  return m;
}

class CpuMoeTest : public ::testing::TestWithParam<QuantType> {};

// Splitting a token's experts into a CPU subset and its complement: the two partial sums add up
// to the full output within 1e-6 of its largest element (they differ only by the float summation
// order of the weighted sum). Checked with the router's real top-k and with wider random sets.
TEST_P(CpuMoeTest, SubsetAndComplementAddUpToTheFullOutput) {
  const ModelWeights& w = tiny(GetParam());
  const ModelConfig& c = w.cfg;
  ThreadPool pool(3, false);
  CpuMoe moe(w, pool);
  std::mt19937_64 rng(11);
  int checked = 0;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    for (int trial = 0; trial < 6; ++trial) {
      const std::vector<float> h = hidden_state(w, l, rng);
      std::vector<int32_t> ids;
      std::vector<float> wts;
      if (trial < 2) {
        route(w, l, h, &ids, &wts);
      } else {  // a wider set: 2..n_experts distinct experts, random weights
        std::vector<int32_t> all(c.n_experts);
        std::iota(all.begin(), all.end(), 0);
        std::shuffle(all.begin(), all.end(), rng);
        const int64_t k = 2 + static_cast<int64_t>(rng() % (c.n_experts - 1));
        ids.assign(all.begin(), all.begin() + k);
        std::sort(ids.begin(), ids.end());
        std::uniform_real_distribution<float> ud(0.05f, 1.0f);
        for (size_t j = 0; j < ids.size(); ++j) wts.push_back(ud(rng));
      }
      const int k = static_cast<int>(ids.size());
      std::vector<float> full(c.hidden), ya(c.hidden), yb(c.hidden);
      moe.compute(l, h.data(), ids.data(), wts.data(), k, full.data());
      // Every split of the k experts (k <= 8): subset A by bit mask, B its complement.
      for (uint32_t mask = 0; mask < (1u << k); ++mask) {
        std::vector<int32_t> ia, ib;
        std::vector<float> wa, wb;
        for (int j = 0; j < k; ++j) {
          if (mask >> j & 1u) {
            ia.push_back(ids[j]);
            wa.push_back(wts[j]);
          } else {
            ib.push_back(ids[j]);
            wb.push_back(wts[j]);
          }
        }
        moe.compute(l, h.data(), ia.data(), wa.data(), static_cast<int>(ia.size()), ya.data());
        moe.compute(l, h.data(), ib.data(), wb.data(), static_cast<int>(ib.size()), yb.data());
        const double scale = max_abs(full);
        ASSERT_GT(scale, 0.0);
        for (int64_t r = 0; r < c.hidden; ++r) {
          ASSERT_LE(std::fabs(double(ya[r]) + double(yb[r]) - double(full[r])), 1e-6 * scale)
              << "layer " << l << " trial " << trial << " mask " << mask << " row " << r;
        }
        ++checked;
      }
    }
  }
  EXPECT_GT(checked, 100);
}

// The full output against the naive reference: within 1e-5 of the output's largest element
// (measured: 1.2e-7 for Q8_0, 1.5e-7 for Q4_0 with AVX-512 VNNI). The reference rounds the same
// activations through Q8_0, so what is left is float vs double accumulation. A SwiGLU value that
// lands on the other side of a Q8_0 rounding step (1/127 of its block's largest value) because
// its float gate/up differ in the last bits would cost ~1e-3; the inputs are seeded, so that
// would show at once as a fixed failure, not a flaky one.
TEST_P(CpuMoeTest, MatchesNaiveScalarReference) {
  const ModelWeights& w = tiny(GetParam());
  const ModelConfig& c = w.cfg;
  ThreadPool pool(2, false);
  CpuMoe moe(w, pool);
  std::mt19937_64 rng(5);
  double worst = 0;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    for (int trial = 0; trial < 3; ++trial) {
      const std::vector<float> h = hidden_state(w, l, rng);
      std::vector<int32_t> ids;
      std::vector<float> wts;
      route(w, l, h, &ids, &wts);
      if (trial == 2) {  // all experts, uniform weights
        ids.resize(c.n_experts);
        std::iota(ids.begin(), ids.end(), 0);
        wts.assign(c.n_experts, 1.0f / c.n_experts);
      }
      std::vector<float> y(c.hidden);
      moe.compute(l, h.data(), ids.data(), wts.data(), static_cast<int>(ids.size()), y.data());
      const std::vector<double> ref = reference(w, l, h, ids, wts);
      double scale = 0, err = 0;
      for (int64_t r = 0; r < c.hidden; ++r) {
        scale = std::max(scale, std::fabs(ref[r]));
        err = std::max(err, std::fabs(ref[r] - y[r]));
      }
      ASSERT_GT(scale, 0.0);
      worst = std::max(worst, err / scale);
      EXPECT_LE(err, 1e-5 * scale) << "layer " << l << " trial " << trial;
    }
  }
  RecordProperty("worst_relative_error", std::to_string(worst));
  std::printf("[          ] worst |y - ref| / max|ref| = %.3g\n", worst);
}

// Any thread count gives bit-identical output (each row is computed by one thread, in order).
TEST_P(CpuMoeTest, BitIdenticalForAnyThreadCount) {
  const ModelWeights& w = tiny(GetParam());
  const ModelConfig& c = w.cfg;
  std::mt19937_64 rng(3);
  const std::vector<float> h = hidden_state(w, 1, rng);
  const std::vector<int32_t> ids = {0, 2, 3, 5, 7};
  const std::vector<float> wts = {0.1f, 0.3f, 0.2f, 0.25f, 0.15f};
  std::vector<std::vector<float>> outs;
  for (int t : {1, 2, 5}) {
    ThreadPool pool(t, false);
    CpuMoe moe(w, pool);
    std::vector<float> y(c.hidden);
    moe.compute(1, h.data(), ids.data(), wts.data(), 5, y.data());
    outs.push_back(y);
  }
  EXPECT_EQ(outs[0], outs[1]);
  EXPECT_EQ(outs[0], outs[2]);
}

// Sets environment variables for the lifetime of the object (CpuMoe reads its tuning knobs at
// construction), restoring unset ones afterwards.
class ScopedEnv {
 public:
  explicit ScopedEnv(const std::vector<std::pair<std::string, std::string>>& vars) {
    for (const auto& kv : vars) {
      setenv(kv.first.c_str(), kv.second.c_str(), 1);
      names_.push_back(kv.first);
    }
  }
  ~ScopedEnv() {
    for (const std::string& n : names_) unsetenv(n.c_str());
  }

 private:
  std::vector<std::string> names_;
};

// A sequence of calls like a hybrid decode's: layers in turn, each with a different number of
// experts (1..n_experts) in a different order, the call after a full one with fewer experts
// (the flow schedule's counters carry over from call to call).
struct Call {
  int64_t layer;
  std::vector<float> h;
  std::vector<int32_t> ids;
  std::vector<float> wts;
};
std::vector<Call> call_sequence(const ModelWeights& w, int count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Call> calls;
  std::uniform_real_distribution<float> ud(0.05f, 1.0f);
  for (int i = 0; i < count; ++i) {
    Call c;
    c.layer = i % w.cfg.n_layers;
    c.h = hidden_state(w, c.layer, rng);
    std::vector<int32_t> all(w.cfg.n_experts);
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    const int64_t k = 1 + (i * 5) % w.cfg.n_experts;
    c.ids.assign(all.begin(), all.begin() + k);
    for (int64_t j = 0; j < k; ++j) c.wts.push_back(ud(rng));
    calls.push_back(std::move(c));
  }
  return calls;
}

std::vector<std::vector<float>> run_calls(CpuMoe& moe, const ModelWeights& w,
                                          const std::vector<Call>& calls) {
  std::vector<std::vector<float>> out;
  for (const Call& c : calls) {
    std::vector<float> y(w.cfg.hidden, -1.0f);
    moe.compute(c.layer, c.h.data(), c.ids.data(), c.wts.data(), static_cast<int>(c.ids.size()),
                y.data());
    out.push_back(std::move(y));
  }
  return out;
}

// Every schedule and work split gives the same bits as one thread: the barrier schedule, down
// items of 4 rows and of more rows than some threads get (threads with no down rows of their
// own), gate/up items of 64 rows, gate then up instead of interleaved tiles, prefetching; pools
// larger than this machine (threads descheduled mid-call, so lists are stolen from before their
// owners start). Each over a sequence of calls with varying expert counts.
TEST_P(CpuMoeTest, ScheduleAndWorkSplitNeverChangeTheOutput) {
  const ModelWeights& w = tiny(GetParam());
  const std::vector<Call> calls = call_sequence(w, 24, 17);
  std::vector<std::vector<float>> ref;
  {
    ThreadPool pool(1, false);
    CpuMoe moe(w, pool);
    ref = run_calls(moe, w, calls);
  }
  const std::vector<std::vector<std::pair<std::string, std::string>>> variants = {
      {},
      {{"KTUNE_CPU_MOE_SCHED", "barrier"}},
      {{"KTUNE_CPU_MOE_DOWN_ROWS", "4"}},
      {{"KTUNE_CPU_MOE_DOWN_ROWS", "100"}},
      {{"KTUNE_CPU_MOE_UNIT_ROWS", "64"}, {"KTUNE_CPU_MOE_INTERLEAVE", "0"}},
      {{"KTUNE_CPU_MOE_PREFETCH_KB", "4"}},
  };
  for (size_t v = 0; v < variants.size(); ++v) {
    for (int t : {1, 2, 3, 7}) {
      std::unique_ptr<CpuMoe> moe;
      ThreadPool pool(t, false);
      {
        ScopedEnv env(variants[v]);
        moe = std::make_unique<CpuMoe>(w, pool);
      }
      const std::vector<std::vector<float>> out = run_calls(*moe, w, calls);
      for (size_t i = 0; i < calls.size(); ++i) {
        ASSERT_EQ(out[i], ref[i]) << "variant " << v << ", " << t << " threads, call " << i;
      }
    }
  }
}

// Timing adds up the calls and resets; components are non-negative.
TEST_P(CpuMoeTest, TimingCountsCalls) {
  const ModelWeights& w = tiny(GetParam());
  ThreadPool pool(3, false);
  CpuMoe moe(w, pool);
  const std::vector<Call> calls = call_sequence(w, 5, 3);
  run_calls(moe, w, calls);
  EXPECT_EQ(moe.timing().calls, 0);
  moe.set_timing(true);
  run_calls(moe, w, calls);
  const CpuMoe::Timing t = moe.timing();
  EXPECT_EQ(t.calls, 5);
  EXPECT_GT(t.total_us, 0.0);
  for (double v :
       {t.wake_us, t.quant_us, t.work_us, t.gate_up_us, t.wait_us, t.tail_us, t.exit_us}) {
    EXPECT_GE(v, 0.0);
  }
  moe.reset_timing();
  EXPECT_EQ(moe.timing().calls, 0);
  EXPECT_EQ(moe.timing().total_us, 0.0);
}

TEST_P(CpuMoeTest, EmptySubsetGivesZerosAndBadInputThrows) {
  const ModelWeights& w = tiny(GetParam());
  const ModelConfig& c = w.cfg;
  ThreadPool pool(2, false);
  CpuMoe moe(w, pool);
  std::vector<float> h(c.hidden, 0.5f), y(c.hidden, 7.0f);
  moe.compute(0, h.data(), nullptr, nullptr, 0, y.data());
  EXPECT_EQ(max_abs(y), 0.0);
  const int32_t bad_id[] = {static_cast<int32_t>(c.n_experts)};
  const int32_t ok_id[] = {0};
  const float one[] = {1.0f};
  EXPECT_THROW(moe.compute(0, h.data(), bad_id, one, 1, y.data()), Error);
  EXPECT_THROW(moe.compute(c.n_layers, h.data(), ok_id, one, 1, y.data()), Error);
  EXPECT_THROW(moe.compute(-1, h.data(), ok_id, one, 1, y.data()), Error);
  EXPECT_THROW(moe.compute(0, h.data(), ok_id, one, moe.max_experts() + 1, y.data()), Error);
}

// CpuMoe keeps the pool's workers spinning between calls (KTUNE_CPU_MOE_SPIN_US, 1000 µs), but
// never lowers a longer spin the pool's owner chose, and leaves a pool with more threads than
// cores (whose spinners would steal turns from working threads) as it is.
TEST(CpuMoeSpin, RaisesThePoolSpinOnlyForWorkersWithCoresOfTheirOwn) {
  const ModelWeights& w = tiny(QuantType::Q8_0);
  {
    ThreadPool pool(1, false);
    ASSERT_EQ(pool.spin_us(), 100);
    CpuMoe moe(w, pool);
    EXPECT_EQ(pool.spin_us(), 1000);
  }
  {
    ThreadPool pool(1, false);
    pool.set_spin_us(5000);
    CpuMoe moe(w, pool);
    EXPECT_EQ(pool.spin_us(), 5000);
  }
  {
    ScopedEnv env(
        std::vector<std::pair<std::string, std::string>>{{"KTUNE_CPU_MOE_SPIN_US", "300"}});
    ThreadPool pool(1, false);
    CpuMoe moe(w, pool);
    EXPECT_EQ(pool.spin_us(), 300);
  }
  {
    ThreadPool pool(physical_core_count() + 1, false);
    CpuMoe moe(w, pool);
    EXPECT_EQ(pool.spin_us(), 100);
  }
}

// keep_warm() runs an empty region on every worker (their spin restarts) and changes no result;
// the driver calls it every half spin while it waits for the GPU.
TEST(CpuMoeSpin, KeepWarmRunsAnEmptyRegionAndLeavesResultsAlone) {
  const ModelWeights& w = tiny(QuantType::Q8_0);
  ThreadPool pool(3, false);
  CpuMoe moe(w, pool);
  EXPECT_EQ(moe.keep_warm_interval_us(), pool.spin_us() / 2);
  const std::vector<Call> calls = call_sequence(w, 4, 3);
  const auto before = run_calls(moe, w, calls);
  for (int i = 0; i < 3; ++i) moe.keep_warm();
  EXPECT_EQ(run_calls(moe, w, calls), before);
  ThreadPool one(1, false);
  CpuMoe single(w, one);
  EXPECT_EQ(single.keep_warm_interval_us(), 0);  // no workers to keep awake
  single.keep_warm();
}

INSTANTIATE_TEST_SUITE_P(CpuMoe, CpuMoeTest,
                         ::testing::Values(QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_K),
                         [](const ::testing::TestParamInfo<QuantType>& i) {
                           return std::string(quant_name(i.param));
                         });

}  // namespace
}  // namespace ktune
