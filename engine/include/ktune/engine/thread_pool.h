// A pinned thread pool for the CPU engine. run() executes a task on every worker and the caller
// (thread 0) and returns when all are done. Workers spin briefly waiting for work, then sleep
// on a futex-like condition, so an oversubscribed machine does not stall.
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace ktune {

int physical_core_count();  // from /sys topology; falls back to hardware_concurrency

class ThreadPool {
 public:
  // n_threads <= 0: one per physical core. pin: bind worker i to one CPU of core i.
  explicit ThreadPool(int n_threads = 0, bool pin = true);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // Calls fn(thread_index, n_threads) on every thread (the caller is index 0).
  template <class F>
  void run(F&& fn) {
    auto thunk = [](void* ctx, int ith, int nth) { (*static_cast<F*>(ctx))(ith, nth); };
    run_raw(thunk, &fn);
  }

  using RawFn = void (*)(void* ctx, int ith, int nth);
  void run_raw(RawFn fn, void* ctx);

 private:
  void worker_loop(int index);
  int n_threads_ = 1;
  std::vector<std::thread> workers_;
  struct alignas(64) Shared {
    std::atomic<uint64_t> generation{0};
    std::atomic<int> remaining{0};
    std::atomic<bool> stop{false};
    std::atomic<int> sleepers{0};
  } shared_;
  RawFn fn_ = nullptr;
  void* ctx_ = nullptr;
};

}  // namespace ktune
