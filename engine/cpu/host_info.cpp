#include "ktune/engine/host_info.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <vector>

#include "cpu/read_probe.h"
#include "ktune/engine/cpu_kernels.h"
#include "ktune/engine/error.h"
#include "ktune/engine/thread_pool.h"

namespace ktune {

std::string cpu_model_name() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      auto colon = line.find(':');
      if (colon != std::string::npos) {
        std::string name = line.substr(colon + 1);
        name.erase(0, name.find_first_not_of(" \t"));
        return name;
      }
    }
  }
  return "unknown CPU";
}

static int64_t meminfo_kib(const char* key) {
  std::ifstream in("/proc/meminfo");
  std::string k;
  int64_t v = 0;
  std::string unit;
  while (in >> k >> v >> unit) {
    if (k == key) return v;
  }
  return 0;
}

int64_t host_memory_bytes() { return meminfo_kib("MemTotal:") * 1024; }
int64_t host_available_bytes() { return meminfo_kib("MemAvailable:") * 1024; }

static uint64_t l3_bytes() {
  uint64_t best = 0;
  for (int idx = 0; idx < 8; ++idx) {
    std::ifstream in("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(idx) + "/size");
    std::string s;
    if (!(in >> s) || s.empty()) continue;
    uint64_t v = std::strtoull(s.c_str(), nullptr, 10);
    char unit = s.back();
    if (unit == 'K') v <<= 10;
    if (unit == 'M') v <<= 20;
    best = std::max(best, v);
  }
  return best;
}

uint64_t default_probe_bytes() {
  uint64_t bytes = std::max<uint64_t>(uint64_t(1) << 30, 4 * l3_bytes());
  const int64_t avail = host_available_bytes();
  if (avail > 0) bytes = std::min<uint64_t>(bytes, static_cast<uint64_t>(avail) / 4);
  return std::max<uint64_t>(bytes & ~uint64_t(4095), uint64_t(64) << 20);
}

namespace cpu {
// Scalar read loop: 8 independent lanes so the compiler vectorizes and the loads, not the
// additions, are the limit.
uint64_t read_words_scalar(const uint64_t* p, size_t n) {
  uint64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) acc[k] += p[i + k];
  }
  for (; i < n; ++i) acc[0] += p[i];
  uint64_t s = 0;
  for (uint64_t a : acc) s += a;
  return s;
}
}  // namespace cpu

// The widest read loop this CPU runs.
static uint64_t (*pick_read_loop())(const uint64_t*, size_t) {
  switch (cpu::detect_isa()) {
    case cpu::Isa::Avx512:
    case cpu::Isa::Avx512Vnni:
      return cpu::read_words_avx512;
    case cpu::Isa::Avx2:
      return cpu::read_words_avx2;
    default:
      return cpu::read_words_scalar;
  }
}

BandwidthResult measure_read_bandwidth(ThreadPool& pool, uint64_t bytes, int reps) {
  bytes &= ~uint64_t(4095);
  if (bytes < 4096 || reps < 1) {
    throw Error("probe", "buffer size or repetitions too small", "use at least 4 KiB and 1 rep");
  }
  void* mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) {
    throw Error("probe", "cannot allocate " + std::to_string(bytes >> 20) + " MiB",
                "free host memory (ktune probe --size-mib N measures with a smaller buffer)");
  }
  std::unique_ptr<void, std::function<void(void*)>> guard(mem, [bytes](void* m) {
    munmap(m, bytes);
  });
#ifdef MADV_HUGEPAGE
  madvise(mem, bytes, MADV_HUGEPAGE);
#endif
  auto* words = static_cast<uint64_t*>(mem);
  const size_t n_words = bytes / 8;
  const int nth = pool.size();
  // First touch by the thread that later reads the slice (node-local pages on NUMA machines).
  pool.run([&](int ith, int n) {
    const size_t b = n_words * ith / n, e = n_words * (ith + 1) / n;
    for (size_t i = b; i < e; ++i) words[i] = i * 0x9E3779B97F4A7C15ull;
  });
  std::vector<uint64_t> sink(static_cast<size_t>(nth) * 8, 0);
  const auto read_loop = pick_read_loop();
  BandwidthResult r;
  r.threads = nth;
  r.bytes = bytes;
  r.repetitions = reps;
  double total_gbps = 0;
  for (int rep = 0; rep < reps + 1; ++rep) {  // first pass is a warm-up
    auto t0 = std::chrono::steady_clock::now();
    pool.run([&](int ith, int n) {
      const size_t b = n_words * ith / n, e = n_words * (ith + 1) / n;
      sink[static_cast<size_t>(ith) * 8] += read_loop(words + b, e - b);
    });
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (rep == 0) continue;
    const double gbps = static_cast<double>(bytes) / s / 1e9;
    r.gb_per_s = std::max(r.gb_per_s, gbps);
    total_gbps += gbps;
  }
  r.mean_gb_per_s = total_gbps / reps;
  // Keep the sums observable so the reads are not optimized away.
  volatile uint64_t keep = 0;
  for (uint64_t v : sink) keep = keep + v;
  (void)keep;
  return r;
}

}  // namespace ktune
