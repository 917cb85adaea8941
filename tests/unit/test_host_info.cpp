#include <gtest/gtest.h>

#include <numeric>
#include <random>
#include <vector>

#include "cpu/read_probe.h"
#include "ktune/engine/cpu_kernels.h"
#include "ktune/engine/host_info.h"
#include "ktune/engine/thread_pool.h"

namespace {

bool has(ktune::cpu::Isa isa) {
  for (auto a : ktune::cpu::available_isas()) {
    if (a == isa) return true;
  }
  return false;
}

// Every read loop of the probe must really read every word (the same sum as a plain loop), at
// any start alignment and length, or the bandwidth it reports means nothing.
TEST(HostInfo, ReadLoopsSumEveryWord) {
  std::mt19937_64 rng(3);
  std::vector<uint64_t> buf(4096 + 64);
  for (auto& w : buf) w = rng();
  for (size_t off : {0, 1, 3, 7, 8, 13}) {
    for (size_t n : {0, 1, 31, 32, 33, 100, 1000, 4096}) {
      const uint64_t want = std::accumulate(buf.begin() + off, buf.begin() + off + n, uint64_t(0));
      EXPECT_EQ(ktune::cpu::read_words_scalar(buf.data() + off, n), want);
      if (has(ktune::cpu::Isa::Avx2)) {
        EXPECT_EQ(ktune::cpu::read_words_avx2(buf.data() + off, n), want) << off << " " << n;
      }
      if (has(ktune::cpu::Isa::Avx512)) {
        EXPECT_EQ(ktune::cpu::read_words_avx512(buf.data() + off, n), want) << off << " " << n;
      }
    }
  }
}

TEST(HostInfo, ProbeReportsPositiveBandwidth) {
  ktune::ThreadPool pool(2);
  auto r = ktune::measure_read_bandwidth(pool, 64ull << 20, 2);
  EXPECT_GT(r.gb_per_s, 0.0);
  EXPECT_GE(r.gb_per_s, r.mean_gb_per_s);
  EXPECT_EQ(r.threads, 2);
  EXPECT_FALSE(ktune::cpu_model_name().empty());
  EXPECT_GT(ktune::host_memory_bytes(), 0);
}

}  // namespace
