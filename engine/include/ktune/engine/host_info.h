// Facts about the host for self-describing reports, and the DRAM read-bandwidth probe that gives
// the memory-bound limit of CPU decode (bytes read per token ÷ bandwidth).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace ktune {

class ThreadPool;

std::string cpu_model_name();     // "Intel(R) Xeon(R) ..." from /proc/cpuinfo, or "unknown CPU"
int64_t host_memory_bytes();      // MemTotal
int64_t host_available_bytes();   // MemAvailable

struct BandwidthResult {
  double gb_per_s = 0;    // best repetition, 1e9 bytes per second
  double mean_gb_per_s = 0;
  int threads = 0;
  uint64_t bytes = 0;     // bytes read per repetition
  int repetitions = 0;
};

// STREAM-like read probe: every thread sums its slice of a buffer of `bytes` (pick several times
// the last-level cache), `reps` times; the buffer is written first so pages are real.
BandwidthResult measure_read_bandwidth(ThreadPool& pool, uint64_t bytes, int reps);
// A buffer size that defeats the caches here: 4 × L3 (from sysfs), at least 1 GiB, at most a
// quarter of available memory.
uint64_t default_probe_bytes();

}  // namespace ktune
