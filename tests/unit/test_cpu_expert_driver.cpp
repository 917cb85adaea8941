// The CPU half of the GPU engine's CPU-expert hand-off (engine/cuda/cpu_expert_driver.h), run
// without a GPU: a test thread plays the GPU side of the mapped-memory protocol (write the
// routing, raise the request word, wait for the done word) and the host-node callbacks are
// called directly. Checks the driver's sums against CpuMoe over the same experts, that GPU
// experts are skipped, steps and epochs in order, and that every stall ends in an error report
// instead of a hang. Built with the CUDA backend only (the driver lives in engine/cuda).
#include <gtest/gtest.h>

#if defined(KTUNE_WITH_CUDA)

#include <algorithm>
#include <chrono>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "cuda/cpu_expert_driver.h"
#include "ktune/engine/cpu_moe.h"
#include "ktune/engine/model.h"
#include "ktune/engine/thread_pool.h"
#include "runtime/cpu_moe_batch.h"

namespace ktune {
namespace {

struct Fixture {
  const ModelWeights& w;
  int64_t hidden, top_k, n_exp, layers;
  std::vector<cuda::HandoffWords> words;
  std::vector<float> h, wts, y;
  std::vector<int32_t> ids;
  uint32_t error = 0;
  std::vector<std::vector<int32_t>> slot;  // per layer: expert -> GPU slot or -1
  explicit Fixture(const ModelWeights& m)
      : w(m),
        hidden(m.cfg.hidden),
        top_k(m.cfg.n_experts_used),
        n_exp(m.cfg.n_experts),
        layers(m.cfg.n_layers),
        words(static_cast<size_t>(m.cfg.n_layers)),
        h(static_cast<size_t>(m.cfg.hidden)),
        wts(static_cast<size_t>(m.cfg.n_experts_used)),
        y(static_cast<size_t>(m.cfg.hidden)),
        ids(static_cast<size_t>(m.cfg.n_experts_used)) {
    // Even experts on the "GPU" (slot = id / 2), odd ones on the CPU.
    for (int64_t l = 0; l < layers; ++l) {
      std::vector<int32_t> s(static_cast<size_t>(n_exp));
      for (int64_t e = 0; e < n_exp; ++e) s[static_cast<size_t>(e)] = e % 2 == 0 ? e / 2 : -1;
      slot.push_back(s);
    }
  }
  CpuExpertDriver::Shared shared() {
    return {words.data(), h.data(), ids.data(), wts.data(), y.data(), &error};
  }
  std::vector<CpuExpertDriver::Layer> hybrid_layers() {
    std::vector<CpuExpertDriver::Layer> v;
    for (int64_t l = 0; l < layers; ++l) v.push_back({l, &slot[static_cast<size_t>(l)]});
    return v;
  }
};

// The driver's CpuMoe (2 threads) and a one-thread CpuMoe for the reference sums.
struct Moes {
  ThreadPool pool{2, false};
  CpuMoe moe;
  ThreadPool ref_pool{1, false};
  CpuMoe ref;
  explicit Moes(const ModelWeights& m) : moe(m, pool), ref(m, ref_pool) {}
};

const ModelWeights& tiny() {
  static const ModelWeights m = load_model("synth:tiny:q8_0");
  return m;
}

bool wait_for(const uint64_t* word, uint64_t v, std::chrono::milliseconds limit) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (__atomic_load_n(word, __ATOMIC_ACQUIRE) != v) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::yield();
  }
  return true;
}

TEST(CpuExpertDriver, FlagProtocolGivesCpuMoeSumsOfTheCpuExperts) {
  const ModelWeights& m = tiny();
  Fixture f(m);
  Moes mo(m);
  CpuMoe& ref = mo.ref;
  CpuExpertDriver driver(mo.moe, f.shared(), f.hybrid_layers(), f.top_k, f.n_exp,
                         std::chrono::milliseconds(5000));
  std::mt19937 gen(11);
  std::normal_distribution<float> nd;
  for (uint64_t epoch = 1; epoch <= 2; ++epoch) {
    for (uint32_t pos = 0; pos < 3; ++pos) {
      const uint64_t seq = (epoch << 32) | pos;
      driver.arm(seq);
      for (int64_t l = 0; l < f.layers; ++l) {
        // The "GPU": routing of this layer into the stage, then the request word.
        for (float& v : f.h) v = nd(gen);
        std::vector<int32_t> all(static_cast<size_t>(f.n_exp));
        for (int64_t e = 0; e < f.n_exp; ++e) all[static_cast<size_t>(e)] = static_cast<int32_t>(e);
        std::shuffle(all.begin(), all.end(), gen);
        std::sort(all.begin(), all.begin() + f.top_k);
        for (int64_t j = 0; j < f.top_k; ++j) {
          f.ids[static_cast<size_t>(j)] = all[static_cast<size_t>(j)];
          f.wts[static_cast<size_t>(j)] = 0.1f + 0.2f * static_cast<float>(j);
        }
        __atomic_store_n(&f.words[static_cast<size_t>(l)].request, seq, __ATOMIC_RELEASE);
        ASSERT_TRUE(
            wait_for(&f.words[static_cast<size_t>(l)].done, seq, std::chrono::milliseconds(5000)))
            << "epoch " << epoch << " pos " << pos << " layer " << l;
        // The reference: CpuMoe over the odd (CPU) experts of the routing, in slot order.
        std::vector<int32_t> cpu_ids;
        std::vector<float> cpu_w;
        for (int64_t j = 0; j < f.top_k; ++j) {
          if (f.ids[static_cast<size_t>(j)] % 2 == 1) {
            cpu_ids.push_back(f.ids[static_cast<size_t>(j)]);
            cpu_w.push_back(f.wts[static_cast<size_t>(j)]);
          }
        }
        EXPECT_EQ(f.words[static_cast<size_t>(l)].n_cpu, cpu_ids.size());
        if (!cpu_ids.empty()) {
          std::vector<float> want(static_cast<size_t>(f.hidden));
          ref.compute(l, f.h.data(), cpu_ids.data(), cpu_w.data(), static_cast<int>(cpu_ids.size()),
                      want.data());
          EXPECT_EQ(std::memcmp(want.data(), f.y.data(), want.size() * 4), 0)
              << "layer " << l << ": the driver's sum differs from CpuMoe's";
        }
      }
    }
  }
  EXPECT_EQ(driver.finish(), "");
  EXPECT_EQ(f.error, 0u);
}

// PCIe assist: the driver leaves the last pcie_assist_count(n_cpu) CPU experts of a token (in
// top-k order) to the GPU and sums only the others; n_cpu still says whether to add at all.
TEST(CpuExpertDriver, PcieAssistSkipsTheGpusShareOfTheCpuExperts) {
  const ModelWeights& m = tiny();
  Fixture f(m);
  for (auto& s : f.slot) std::fill(s.begin(), s.end(), -1);  // every expert on the CPU
  Moes mo(m);
  CpuMoe& ref = mo.ref;
  CpuExpertDriver driver(mo.moe, f.shared(), f.hybrid_layers(), f.top_k, f.n_exp,
                         std::chrono::milliseconds(5000));
  driver.set_pcie_assist(500, 1000);
  ASSERT_EQ(f.top_k, 2);  // synth:tiny: top-2, so the GPU takes the second of each token's two
  std::mt19937 gen(5);
  std::normal_distribution<float> nd;
  const uint64_t seq = (uint64_t{1} << 32) | 0;
  driver.arm(seq);
  for (int64_t l = 0; l < f.layers; ++l) {
    for (float& v : f.h) v = nd(gen);
    f.ids = {static_cast<int32_t>(l % f.n_exp), static_cast<int32_t>((l + 3) % f.n_exp)};
    f.wts = {0.7f, 0.3f};
    __atomic_store_n(&f.words[static_cast<size_t>(l)].request, seq, __ATOMIC_RELEASE);
    ASSERT_TRUE(
        wait_for(&f.words[static_cast<size_t>(l)].done, seq, std::chrono::milliseconds(5000)));
    EXPECT_EQ(f.words[static_cast<size_t>(l)].n_cpu, 1u) << "layer " << l;
    std::vector<float> want(static_cast<size_t>(f.hidden));
    ref.compute(l, f.h.data(), f.ids.data(), f.wts.data(), 1, want.data());
    EXPECT_EQ(std::memcmp(want.data(), f.y.data(), want.size() * 4), 0)
        << "layer " << l << ": the driver's sum is not CpuMoe's over the first expert alone";
  }
  EXPECT_EQ(driver.finish(), "");
  // The rule itself: rounded down, nothing for a share of 0.
  EXPECT_EQ(pcie_assist_count(8, 375, 1000), 3);
  EXPECT_EQ(pcie_assist_count(8, 250, 1000), 2);
  EXPECT_EQ(pcie_assist_count(3, 375, 1000), 1);
  EXPECT_EQ(pcie_assist_count(2, 375, 1000), 0);
  EXPECT_EQ(pcie_assist_count(8, 0, 1000), 0);
}

TEST(CpuExpertDriver, HostNodeCallbacksPostAndWait) {
  const ModelWeights& m = tiny();
  Fixture f(m);
  ThreadPool pool(2, false);
  CpuMoe moe(m, pool);
  CpuExpertDriver driver(moe, f.shared(), f.hybrid_layers(), f.top_k, f.n_exp,
                         std::chrono::milliseconds(5000));
  const uint64_t seq = (uint64_t{1} << 32) | 5u;
  driver.arm(seq);
  for (int64_t l = 0; l < f.layers; ++l) {
    for (int64_t j = 0; j < f.top_k; ++j) {
      f.ids[static_cast<size_t>(j)] = static_cast<int32_t>(2 * j + 1);  // CPU experts
      f.wts[static_cast<size_t>(j)] = 0.5f;
    }
    std::fill(f.h.begin(), f.h.end(), 0.25f);
    // What the stream runs: the post callback, (GPU experts), the wait callback.
    CpuExpertDriver::host_post(driver.host_node_ctx(l));
    EXPECT_EQ(f.words[static_cast<size_t>(l)].request, seq);
    CpuExpertDriver::host_wait(driver.host_node_ctx(l));
    EXPECT_EQ(f.words[static_cast<size_t>(l)].done, seq) << "layer " << l;
    EXPECT_EQ(f.words[static_cast<size_t>(l)].n_cpu, static_cast<uint32_t>(f.top_k));
  }
  EXPECT_EQ(driver.finish(), "");
  EXPECT_EQ(f.error, 0u);
}

TEST(CpuExpertDriver, StallsEndInErrorsNotHangs) {
  const ModelWeights& m = tiny();
  {
    // The GPU never hands over: the driver gives up after its timeout and says so.
    Fixture f(m);
    ThreadPool pool(1, false);
    CpuMoe moe(m, pool);
    CpuExpertDriver driver(moe, f.shared(), f.hybrid_layers(), f.top_k, f.n_exp,
                           std::chrono::milliseconds(50));
    driver.arm((uint64_t{1} << 32) | 0u);
    const std::string e = driver.finish();
    EXPECT_NE(e.find("did not hand the CPU experts over within 50 ms"), std::string::npos) << e;
    EXPECT_EQ(driver.finish(), "");  // reported once
  }
  {
    // Nothing answers a host_wait (the step was never armed, so host_post posts nothing): it
    // gives up and writes the host-wait error code for the layer.
    Fixture f(m);
    ThreadPool pool(1, false);
    CpuMoe moe(m, pool);
    CpuExpertDriver driver(moe, f.shared(), f.hybrid_layers(), f.top_k, f.n_exp,
                           std::chrono::milliseconds(50));
    CpuExpertDriver::host_post(driver.host_node_ctx(1));
    EXPECT_EQ(f.words[1].request, 0u);
    f.words[1].done = 12345;  // stale
    CpuExpertDriver::host_wait(driver.host_node_ctx(1));
    EXPECT_EQ(f.error, CpuExpertDriver::kErrorHostWait + 1u);
  }
  {
    // The host cancels armed steps it could not launch: no error, the driver is idle again.
    Fixture f(m);
    ThreadPool pool(1, false);
    CpuMoe moe(m, pool);
    CpuExpertDriver driver(moe, f.shared(), f.hybrid_layers(), f.top_k, f.n_exp,
                           std::chrono::milliseconds(2000));
    driver.arm((uint64_t{1} << 32) | 0u);
    driver.cancel();
    EXPECT_EQ(driver.finish(), "");
  }
  {
    // A bad expert id (a router fed NaN) is an error report; the layer is still published
    // with no CPU contribution so the GPU side does not wait for nothing.
    Fixture f(m);
    ThreadPool pool(1, false);
    CpuMoe moe(m, pool);
    CpuExpertDriver driver(moe, f.shared(), f.hybrid_layers(), f.top_k, f.n_exp,
                           std::chrono::milliseconds(2000));
    const uint64_t seq = (uint64_t{2} << 32) | 0u;
    driver.arm(seq);
    for (int64_t l = 0; l < f.layers; ++l) {
      std::fill(f.ids.begin(), f.ids.end(), l == 0 ? -7 : 1);
      __atomic_store_n(&f.words[static_cast<size_t>(l)].request, seq, __ATOMIC_RELEASE);
      ASSERT_TRUE(
          wait_for(&f.words[static_cast<size_t>(l)].done, seq, std::chrono::milliseconds(2000)));
      if (l == 0) {
        EXPECT_EQ(f.words[0].n_cpu, 0u);
      }
    }
    const std::string e = driver.finish();
    EXPECT_NE(e.find("router chose expert -7"), std::string::npos) << e;
  }
}

// Batched steps (GpuEngine::decode_batch): the "GPU" writes B tokens' routing into the batch
// blocks; the driver's per-token sums equal CpuMoe's over each token's CPU experts, n_cpu counts
// the (token, CPU expert) pairs, and single-token steps still work between batched ones.
TEST(CpuExpertDriver, BatchedStepsGiveCpuMoeSumsPerToken) {
  const ModelWeights& m = tiny();
  Fixture f(m);
  const int64_t T = 5;
  ThreadPool pool(2, false);
  CpuMoe moe(m, pool);
  CpuMoeBatch batch_moe(m, pool, T, f.top_k);
  ThreadPool ref_pool(1, false);
  CpuMoe ref(m, ref_pool);
  std::vector<float> bh(static_cast<size_t>(T * f.hidden)), bw(static_cast<size_t>(T * f.top_k));
  std::vector<float> by(static_cast<size_t>(T * f.hidden));
  std::vector<int32_t> bids(static_cast<size_t>(T * f.top_k));
  CpuExpertDriver driver(moe, f.shared(), f.hybrid_layers(), f.top_k, f.n_exp,
                         std::chrono::milliseconds(5000));
  driver.enable_batch({bh.data(), bids.data(), bw.data(), by.data(), f.hidden, T}, &batch_moe);
  std::mt19937 gen(5);
  std::normal_distribution<float> nd;
  uint32_t step = 0x40000000u;
  for (int round = 0; round < 2; ++round) {
    for (int64_t n : {int64_t{T}, int64_t{2}}) {
      const uint64_t seq = (uint64_t{1} << 32) | step++;
      driver.arm(seq, n);
      for (int64_t l = 0; l < f.layers; ++l) {
        for (float& v : bh) v = nd(gen);
        for (int64_t t = 0; t < n; ++t) {
          std::vector<int32_t> all(static_cast<size_t>(f.n_exp));
          for (int64_t e = 0; e < f.n_exp; ++e) all[static_cast<size_t>(e)] = int32_t(e);
          std::shuffle(all.begin(), all.end(), gen);
          std::sort(all.begin(), all.begin() + f.top_k);
          for (int64_t j = 0; j < f.top_k; ++j) {
            bids[static_cast<size_t>(t * f.top_k + j)] = all[static_cast<size_t>(j)];
            bw[static_cast<size_t>(t * f.top_k + j)] = 0.3f + 0.1f * static_cast<float>(j + t);
          }
        }
        __atomic_store_n(&f.words[static_cast<size_t>(l)].request, seq, __ATOMIC_RELEASE);
        ASSERT_TRUE(
            wait_for(&f.words[static_cast<size_t>(l)].done, seq, std::chrono::milliseconds(5000)))
            << "batch of " << n << ", layer " << l;
        uint32_t pairs = 0;
        for (int64_t t = 0; t < n; ++t) {
          std::vector<int32_t> cpu_ids;
          std::vector<float> cpu_w;
          for (int64_t j = 0; j < f.top_k; ++j) {
            const int32_t id = bids[static_cast<size_t>(t * f.top_k + j)];
            if (id % 2 == 1) {
              cpu_ids.push_back(id);
              cpu_w.push_back(bw[static_cast<size_t>(t * f.top_k + j)]);
            }
          }
          pairs += static_cast<uint32_t>(cpu_ids.size());
          if (cpu_ids.empty()) continue;
          std::vector<float> want(static_cast<size_t>(f.hidden));
          ref.compute(l, bh.data() + t * f.hidden, cpu_ids.data(), cpu_w.data(),
                      static_cast<int>(cpu_ids.size()), want.data());
          EXPECT_EQ(std::memcmp(want.data(), by.data() + t * f.hidden, want.size() * 4), 0)
              << "batch of " << n << ", layer " << l << ", token " << t;
        }
        EXPECT_EQ(f.words[static_cast<size_t>(l)].n_cpu, pairs);
      }
    }
    // A single-token step between batched ones: the single blocks.
    const uint64_t seq = (uint64_t{2} << 32) | static_cast<uint32_t>(round);
    driver.arm(seq);
    for (int64_t l = 0; l < f.layers; ++l) {
      for (float& v : f.h) v = nd(gen);
      f.ids[0] = 1;
      f.ids[1] = 4;
      f.wts[0] = 0.6f;
      f.wts[1] = 0.4f;
      __atomic_store_n(&f.words[static_cast<size_t>(l)].request, seq, __ATOMIC_RELEASE);
      ASSERT_TRUE(
          wait_for(&f.words[static_cast<size_t>(l)].done, seq, std::chrono::milliseconds(5000)));
      EXPECT_EQ(f.words[static_cast<size_t>(l)].n_cpu, 1u);
    }
  }
  EXPECT_EQ(driver.finish(), "");
  EXPECT_EQ(f.error, 0u);
}

}  // namespace
}  // namespace ktune

#else

TEST(CpuExpertDriver, NeedsTheCudaBackend) { GTEST_SKIP() << "built without the CUDA backend"; }

#endif
