// A pinned thread pool for the CPU engine. run() executes a task on every worker and the caller
// (thread 0) and returns when all are done. Workers spin for a while waiting for work (spin_us,
// 100 µs by default), then sleep on a futex-like condition, so an oversubscribed machine does
// not stall. A caller that runs short tasks at a steady pace with gaps longer than that (the
// hybrid decode: the CPU experts of a layer, then the GPU's attention of the next) raises
// spin_us so the next run() finds its workers awake instead of paying a futex wake-up each.
//
// Inside one run(), barrier() synchronizes all n threads of the pool, so a whole layer (or a whole
// decode step) can be one parallel region with a few barriers instead of many run() calls.
#pragma once

#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace ktune {

int physical_core_count();  // from /sys topology; falls back to hardware_concurrency
// The CPU-expert pool size of a hybrid (GPU + CPU experts) engine when none is given: one core
// fewer than physical_core_count(), at least 1. The host thread that launches the GPU's work and
// CUDA's own threads need a core: measured on the H100 + 16-core Xeon (bf3f0f1), a pool of all
// 16 cores made each layer's CPU experts take 650 µs instead of 265 µs with graph on, because the
// pool's workers wait on each other's progress and one of them shared its core.
int hybrid_cpu_threads_default();

class ThreadPool {
 public:
  // n_threads <= 0: one per physical core. pin: bind worker i to one CPU of core i.
  explicit ThreadPool(int n_threads = 0, bool pin = true);
  // One thread per entry of `cpus` (at least one): worker i bound to cpus[i] when pin; cpus[0]
  // is where the caller (thread 0) should run, it is not pinned here. For a NUMA node's worker
  // group (engine/runtime/cpu_moe_numa.h). [issue 7 NUMA: added constructor]
  explicit ThreadPool(const std::vector<int>& cpus, bool pin = true);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // How long a waiting thread (a worker between runs, the caller for its workers, a barrier)
  // spins with pause instructions before it sleeps. Takes effect at the next wait; safe to call
  // between runs. Spinning costs a whole core per waiting thread: keep it short on a machine
  // shared with other work. 0 sleeps at once.
  void set_spin_us(int64_t us);
  int64_t spin_us() const { return spin_ns_.load(std::memory_order_relaxed) / 1000; }

  // Calls fn(thread_index, n_threads) on every thread (the caller is index 0). The first exception
  // a task throws is rethrown here once every thread has finished. Not reentrant: a task must not
  // call run() on the same pool.
  template <class F>
  void run(F&& fn) {
    using Fn = std::remove_reference_t<F>;
    auto thunk = [](void* ctx, int ith, int nth) { (*static_cast<Fn*>(ctx))(ith, nth); };
    run_raw(thunk, const_cast<void*>(static_cast<const void*>(&fn)));
  }

  using RawFn = void (*)(void* ctx, int ith, int nth);
  void run_raw(RawFn fn, void* ctx);

  // Waits until all n threads of the pool have called barrier() (only valid inside run(); every
  // thread must call it the same number of times). Spins briefly, then sleeps. When another
  // thread's task has thrown, barrier() throws too so that no thread waits forever for it.
  void barrier();
  // barrier() in two halves: barrier_arrive() counts this thread in and returns a token;
  // barrier_wait(token) returns once every thread has arrived. Between the two the thread may do
  // work that no other thread waits for (e.g. prefetch what it reads next). barrier() is
  // barrier_wait(barrier_arrive()).
  uint32_t barrier_arrive();
  void barrier_wait(uint32_t token);
  // Index of the calling thread within the run() it executes (0 outside any run).
  static int current_thread_index();

  // Logical CPUs the workers are pinned to (-1: not pinned), for reports and tests.
  const std::vector<int>& pinned_cpus() const { return pinned_cpus_; }

 private:
  void start(int n_threads, const std::vector<int>& cpus);
  void worker_loop(int index);
  void run_task(int ith);
  int n_threads_ = 1;
  std::atomic<int64_t> spin_ns_{100'000};
  std::vector<std::thread> workers_;
  std::vector<int> pinned_cpus_;
  // Fields the caller writes and workers read, apart from the completion and barrier counters
  // (which every thread writes) so that spinning readers do not bounce the writers' lines.
  struct alignas(64) Shared {
    std::atomic<uint32_t> generation{0};  // 32-bit: it is also a futex word
    std::atomic<bool> stop{false};
    std::atomic<int> sleepers{0};
  } shared_;
  struct alignas(64) Done {
    std::atomic<uint32_t> remaining{0};  // futex word the caller sleeps on
    std::atomic<int> sleepers{0};
  } done_;
  // Two-level barrier: threads arrive on their group's counter (kBarrierGroup threads each, own
  // cache line), the last of a group on the top counter, so at most a few RMWs serialize on any
  // one line instead of n.
  static constexpr int kBarrierGroup = 4;
  struct alignas(64) Counter {
    std::atomic<int> arrived{0};
  };
  std::vector<Counter> group_arrived_;
  struct alignas(64) Barrier {
    std::atomic<int> arrived{0};     // groups complete
    std::atomic<uint32_t> phase{0};  // futex word
    std::atomic<int> sleepers{0};
  } barrier_;
  alignas(64) std::atomic<bool> failed_{false};
  RawFn fn_ = nullptr;
  void* ctx_ = nullptr;
  std::mutex error_mu_;
  std::exception_ptr error_;
};

}  // namespace ktune
