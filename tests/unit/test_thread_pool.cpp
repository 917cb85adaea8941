#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "ktune/engine/thread_pool.h"

namespace ktune {
namespace {

TEST(ThreadPool, PhysicalCoreCountIsPositive) {
  EXPECT_GE(physical_core_count(), 1);
  ThreadPool pool(0, false);
  EXPECT_EQ(pool.size(), physical_core_count());
}

TEST(ThreadPool, EveryThreadRunsOncePerRun) {
  for (int n : {1, 2, 3, 5}) {
    ThreadPool pool(n);
    ASSERT_EQ(pool.size(), n);
    for (int rep = 0; rep < 50; ++rep) {
      std::vector<int> hits(n, 0);  // each thread writes its own slot only
      std::atomic<int> bad_nth{0};
      pool.run([&](int ith, int nth) {
        if (nth != n) bad_nth.fetch_add(1);
        ++hits[ith];
      });
      EXPECT_EQ(bad_nth.load(), 0);
      for (int i = 0; i < n; ++i) ASSERT_EQ(hits[i], 1) << "thread " << i << " rep " << rep;
    }
  }
}

TEST(ThreadPool, WorkIsVisibleToTheCallerAfterRun) {
  ThreadPool pool(4);
  std::vector<int64_t> out(4000, 0);
  for (int rep = 1; rep <= 20; ++rep) {
    pool.run([&](int ith, int nth) {
      for (size_t i = ith; i < out.size(); i += nth) out[i] = static_cast<int64_t>(i) * rep;
    });
    for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(out[i], static_cast<int64_t>(i) * rep);
  }
}

TEST(ThreadPool, ExceptionPropagatesToCaller) {
  ThreadPool pool(3);
  for (int thrower : {0, 1, 2}) {
    EXPECT_THROW(pool.run([&](int ith, int) {
      if (ith == thrower) throw std::runtime_error("boom");
    }),
                 std::runtime_error);
    // The pool stays usable afterwards.
    std::atomic<int> ran{0};
    pool.run([&](int, int) { ran.fetch_add(1); });
    EXPECT_EQ(ran.load(), 3);
  }
}

TEST(ThreadPool, ExceptionBeforeBarrierDoesNotHang) {
  ThreadPool pool(4);
  for (int rep = 0; rep < 20; ++rep) {
    try {
      pool.run([&](int ith, int) {
        if (ith == rep % 4) throw std::logic_error("first");
        for (int i = 0; i < 3; ++i) pool.barrier();
      });
      FAIL() << "no exception";
    } catch (const std::logic_error& e) {
      EXPECT_STREQ(e.what(), "first");
    }
  }
  std::atomic<int> ran{0};
  pool.run([&](int, int) {
    pool.barrier();
    ran.fetch_add(1);
  });
  EXPECT_EQ(ran.load(), 4);
}

// Phase p: every thread writes its slot, barrier, every thread checks all slots of phase p,
// barrier. A broken barrier lets a fast thread overwrite slots before a slow one reads them.
TEST(ThreadPool, BarrierSeparatesPhases) {
  for (int n : {2, 3, 4}) {
    ThreadPool pool(n);
    constexpr int kPhases = 2000;
    std::vector<int> slot(n, -1);
    std::atomic<int> errors{0};
    pool.run([&](int ith, int nth) {
      for (int p = 0; p < kPhases; ++p) {
        slot[ith] = p;
        pool.barrier();
        for (int j = 0; j < nth; ++j) {
          if (slot[j] != p) errors.fetch_add(1);
        }
        pool.barrier();
      }
    });
    EXPECT_EQ(errors.load(), 0) << n << " threads";
  }
}

TEST(ThreadPool, OversubscribedPoolFinishesQuickly) {
  // 8 threads on a machine that may have 2 cores: waiters must sleep rather than spin their
  // whole time slice.
  ThreadPool pool(8);
  std::atomic<int64_t> sum{0};
  const auto t0 = std::chrono::steady_clock::now();
  for (int rep = 0; rep < 1000; ++rep) {
    pool.run([&](int ith, int) { sum.fetch_add(ith); });
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(sum.load(), 1000 * 28);
  EXPECT_LT(s, 10.0) << "1000 runs of an 8-thread pool took " << s << " s";
  // And with barriers inside.
  const auto t1 = std::chrono::steady_clock::now();
  for (int rep = 0; rep < 200; ++rep) {
    pool.run([&](int, int) {
      for (int i = 0; i < 5; ++i) pool.barrier();
    });
  }
  const double s2 = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  EXPECT_LT(s2, 10.0) << "200 runs x 5 barriers took " << s2 << " s";
}

// The spin setting changes only how waiters wait: with no spinning (sleep at once), a short
// spin that runs out between runs, and a long one that outlasts the gaps, every task still runs
// once per run, barriers still separate phases, and exceptions still reach the caller.
TEST(ThreadPool, SpinSettingKeepsRunsBarriersAndExceptions) {
  for (int64_t spin : {int64_t{0}, int64_t{5}, int64_t{200'000}}) {
    ThreadPool pool(4);
    pool.set_spin_us(spin);
    EXPECT_EQ(pool.spin_us(), spin);
    for (int rep = 0; rep < 40; ++rep) {
      std::vector<int> hits(4, 0);
      std::vector<int> slot(4, -1);
      std::atomic<int> errors{0};
      pool.run([&](int ith, int nth) {
        ++hits[ith];
        for (int p = 0; p < 3; ++p) {
          slot[ith] = p;
          pool.barrier();
          for (int j = 0; j < nth; ++j) {
            if (slot[j] != p) errors.fetch_add(1);
          }
          pool.barrier();
        }
      });
      for (int i = 0; i < 4; ++i) ASSERT_EQ(hits[i], 1) << "spin " << spin << " rep " << rep;
      ASSERT_EQ(errors.load(), 0) << "spin " << spin << " rep " << rep;
      // Gaps longer than the short spin, so its waiters go to sleep between runs.
      if (rep % 8 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    for (int thrower : {0, 3}) {
      EXPECT_THROW(pool.run([&](int ith, int) {
        if (ith == thrower) throw std::runtime_error("boom");
        pool.barrier();
      }),
                   std::runtime_error);
      std::atomic<int> ran{0};
      pool.run([&](int, int) { ran.fetch_add(1); });
      EXPECT_EQ(ran.load(), 4) << "spin " << spin;
    }
  }
}

TEST(ThreadPool, SpinSettingIsClamped) {
  ThreadPool pool(2);
  EXPECT_EQ(pool.spin_us(), 100);  // the default
  pool.set_spin_us(-5);
  EXPECT_EQ(pool.spin_us(), 0);
  pool.set_spin_us(int64_t{1} << 62);
  EXPECT_EQ(pool.spin_us(), 60'000'000);
  std::atomic<int> ran{0};
  pool.run([&](int, int) { ran.fetch_add(1); });
  EXPECT_EQ(ran.load(), 2);
}

TEST(ThreadPool, PinnedCpusAreDistinct) {
  ThreadPool pool(physical_core_count(), true);
  const auto& cpus = pool.pinned_cpus();
  ASSERT_EQ(static_cast<int>(cpus.size()), pool.size());
  EXPECT_EQ(cpus[0], -1);  // the caller is never pinned
  for (size_t i = 1; i < cpus.size(); ++i) {
    for (size_t j = i + 1; j < cpus.size(); ++j) {
      if (cpus[i] >= 0) {
        EXPECT_NE(cpus[i], cpus[j]);
      }
    }
  }
}

// Timing, not a check (--gtest_also_run_disabled_tests): cost of one barrier and of one empty
// run() for each pool size in KTUNE_BENCH_THREADS (default 2).
TEST(ThreadPool, DISABLED_BarrierCost) {
  const char* env = std::getenv("KTUNE_BENCH_THREADS");
  const std::string list = env ? env : "2";
  size_t p = 0;
  while (p < list.size()) {
    size_t q = list.find(',', p);
    if (q == std::string::npos) q = list.size();
    const int n = std::stoi(list.substr(p, q - p));
    p = q + 1;
    ThreadPool pool(n);
    constexpr int kIters = 20000;
    auto t0 = std::chrono::steady_clock::now();
    pool.run([&](int, int) {
      for (int i = 0; i < kIters; ++i) pool.barrier();
    });
    const double barrier_us =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / kIters * 1e6;
    t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < kIters; ++i) pool.run([](int, int) {});
    const double run_us =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / kIters * 1e6;
    std::printf("threads %2d: barrier %.2f us, empty run %.2f us\n", n, barrier_us, run_us);
  }
}

}  // namespace
}  // namespace ktune
