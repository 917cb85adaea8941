// The pinned thread pool. Hand-offs use three 32-bit words (work generation, threads remaining,
// barrier phase): a waiter spins on the word for a bounded time (fast path on a dedicated core),
// then sleeps on it with a futex, so an oversubscribed machine (more threads than cores, CI)
// makes progress instead of burning whole time slices.
#include "ktune/engine/thread_pool.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <system_error>
#include <utility>

#if defined(__linux__)
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "ktune/engine/error.h"

namespace ktune {
namespace {

// Thrown by barrier() in threads whose task must stop because another task threw; never escapes
// the pool and is not reported (the first real exception is).
struct PoolAbort {};

// The index of the thread within the run() it is executing; barrier() uses it to pick the
// thread's group counter.
thread_local int tls_thread_index = 0;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#else
  std::this_thread::yield();
#endif
}

template <class Word>
void futex_wait(std::atomic<Word>* word, Word expected) {
  static_assert(sizeof(std::atomic<Word>) == 4, "futex words are 32 bits");
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT_PRIVATE,
          static_cast<uint32_t>(expected), nullptr, nullptr, 0);
#else
  (void)word;
  (void)expected;
  std::this_thread::yield();
#endif
}

template <class Word>
void futex_wake_all(std::atomic<Word>* word) {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr,
          nullptr, 0);
#else
  (void)word;
#endif
}

// Waits until `word` no longer holds `value`: spins for up to spin_ns, then sleeps. A waker
// changes the word first and then wakes sleepers when `sleepers` is non-zero; both sides use
// sequentially consistent operations, so either the waker sees the sleeper or the sleeper sees
// the new value (and the futex re-checks the value in the kernel).
template <class Word>
void wait_while_equal(std::atomic<Word>& word, Word value, std::atomic<int>& sleepers,
                      int64_t spin_ns) {
  if (word.load(std::memory_order_acquire) != value) return;
  const auto start = std::chrono::steady_clock::now();
  for (int i = 1; spin_ns > 0; ++i) {
    cpu_relax();
    if (word.load(std::memory_order_acquire) != value) return;
    if ((i & 63) == 0 && std::chrono::duration_cast<std::chrono::nanoseconds>(
                             std::chrono::steady_clock::now() - start)
                                 .count() > spin_ns) {
      break;
    }
  }
  for (;;) {
    sleepers.fetch_add(1, std::memory_order_seq_cst);
    if (word.load(std::memory_order_seq_cst) == value) futex_wait(&word, value);
    sleepers.fetch_sub(1, std::memory_order_seq_cst);
    if (word.load(std::memory_order_acquire) != value) return;
  }
}

template <class Word>
void wake_if_sleeping(std::atomic<Word>& word, std::atomic<int>& sleepers) {
  if (sleepers.load(std::memory_order_seq_cst) > 0) futex_wake_all(&word);
}

#if defined(__linux__)
// The CPUs this process may run on (a container or taskset may restrict them).
std::vector<int> allowed_cpus() {
  std::vector<int> cpus;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    for (int c = 0; c < CPU_SETSIZE; ++c) {
      if (CPU_ISSET(c, &set)) cpus.push_back(c);
    }
  }
  return cpus;
}

bool read_int(const std::string& path, long* value) {
  std::ifstream in(path);
  return static_cast<bool>(in >> *value);
}
#endif

// The first allowed logical CPU of each physical core, ordered by CPU number. Empty when the
// topology cannot be read.
std::vector<int> core_first_cpus() {
  std::vector<int> firsts;
#if defined(__linux__)
  std::map<std::pair<long, long>, int> first_of_core;
  for (int cpu : allowed_cpus()) {
    const std::string dir = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
    long package = 0;
    long core = 0;
    if (!read_int(dir + "physical_package_id", &package) || !read_int(dir + "core_id", &core)) {
      return {};
    }
    auto it = first_of_core.find({package, core});
    if (it == first_of_core.end()) {
      first_of_core.emplace(std::make_pair(package, core), cpu);
    } else {
      it->second = std::min(it->second, cpu);
    }
  }
  for (const auto& kv : first_of_core) firsts.push_back(kv.second);
  std::sort(firsts.begin(), firsts.end());
#endif
  return firsts;
}

bool pin_thread(std::thread& t, int cpu) {
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return pthread_setaffinity_np(t.native_handle(), sizeof(set), &set) == 0;
#else
  (void)t;
  (void)cpu;
  return false;
#endif
}

}  // namespace

int physical_core_count() {
  const size_t cores = core_first_cpus().size();
  if (cores > 0) return static_cast<int>(cores);
#if defined(__linux__)
  const size_t allowed = allowed_cpus().size();
  if (allowed > 0) return static_cast<int>(allowed);
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

int hybrid_cpu_threads_default() { return std::max(1, physical_core_count() - 1); }

ThreadPool::ThreadPool(int n_threads, bool pin) {
  start(n_threads > 0 ? n_threads : physical_core_count(),
        pin ? core_first_cpus() : std::vector<int>{});
}

ThreadPool::ThreadPool(const std::vector<int>& cpus, bool pin) {
  start(std::max<int>(1, static_cast<int>(cpus.size())), pin ? cpus : std::vector<int>{});
}

void ThreadPool::start(int n_threads, const std::vector<int>& cores) {
  n_threads_ = n_threads;
  group_arrived_ = std::vector<Counter>((n_threads_ + kBarrierGroup - 1) / kBarrierGroup);
  pinned_cpus_.assign(n_threads_, -1);
  workers_.reserve(n_threads_ - 1);
  for (int i = 1; i < n_threads_; ++i) {
    try {
      workers_.emplace_back([this, i] { worker_loop(i); });
    } catch (const std::system_error& e) {
      // The system refused a thread (address-space or process limits, memory pressure): stop
      // the threads already started, so the pool unwinds as an error instead of terminating.
      shared_.stop.store(true, std::memory_order_seq_cst);
      shared_.generation.fetch_add(1, std::memory_order_seq_cst);
      futex_wake_all(&shared_.generation);
      for (auto& t : workers_) t.join();
      workers_.clear();
      throw Error("threads",
                  "cannot start thread " + std::to_string(i + 1) + " of " +
                      std::to_string(n_threads_) + " (" + e.what() + ")",
                  "use fewer threads (this machine has " + std::to_string(physical_core_count()) +
                      " physical cores), or raise the process limits (ulimit -v, ulimit -u)");
    }
    // Thread i gets core i; core 0 is left to the caller (thread 0), which is not pinned because
    // threads it creates later would inherit the mask. Threads beyond the core count are left
    // to the scheduler. Failures (containers may forbid affinity) are not errors.
    if (static_cast<size_t>(i) < cores.size() && pin_thread(workers_.back(), cores[i])) {
      pinned_cpus_[i] = cores[i];
    }
  }
}

ThreadPool::~ThreadPool() {
  shared_.stop.store(true, std::memory_order_seq_cst);
  shared_.generation.fetch_add(1, std::memory_order_seq_cst);
  futex_wake_all(&shared_.generation);
  for (auto& t : workers_) t.join();
}

int ThreadPool::current_thread_index() { return tls_thread_index; }

void ThreadPool::set_spin_us(int64_t us) {
  constexpr int64_t kMaxUs = 60'000'000;  // a minute; keeps the nanoseconds far from overflow
  spin_ns_.store(std::clamp<int64_t>(us, 0, kMaxUs) * 1000, std::memory_order_relaxed);
}

void ThreadPool::run_task(int ith) {
  tls_thread_index = ith;
  try {
    fn_(ctx_, ith, n_threads_);
  } catch (const PoolAbort&) {
    // Another task threw first; its exception is the one reported.
  } catch (...) {
    {
      std::lock_guard<std::mutex> lock(error_mu_);
      if (!error_) error_ = std::current_exception();
    }
    // Release threads waiting in barrier() for this one: they see failed_ and abort.
    failed_.store(true, std::memory_order_seq_cst);
    barrier_.phase.fetch_add(1, std::memory_order_seq_cst);
    futex_wake_all(&barrier_.phase);
  }
}

void ThreadPool::worker_loop(int index) {
  uint32_t seen = 0;
  for (;;) {
    wait_while_equal(shared_.generation, seen, shared_.sleepers,
                     spin_ns_.load(std::memory_order_relaxed));
    seen = shared_.generation.load(std::memory_order_acquire);
    if (shared_.stop.load(std::memory_order_acquire)) return;
    run_task(index);
    if (done_.remaining.fetch_sub(1, std::memory_order_seq_cst) == 1) {
      wake_if_sleeping(done_.remaining, done_.sleepers);
    }
  }
}

void ThreadPool::run_raw(RawFn fn, void* ctx) {
  fn_ = fn;
  ctx_ = ctx;
  error_ = nullptr;
  failed_.store(false, std::memory_order_relaxed);
  barrier_.arrived.store(0, std::memory_order_relaxed);
  for (Counter& c : group_arrived_) c.arrived.store(0, std::memory_order_relaxed);
  if (n_threads_ > 1) {
    done_.remaining.store(static_cast<uint32_t>(n_threads_ - 1), std::memory_order_relaxed);
    // The release (seq_cst) increment publishes fn_, ctx_ and the counters above.
    shared_.generation.fetch_add(1, std::memory_order_seq_cst);
    wake_if_sleeping(shared_.generation, shared_.sleepers);
  }
  run_task(0);
  if (n_threads_ > 1) {
    for (;;) {
      const uint32_t left = done_.remaining.load(std::memory_order_acquire);
      if (left == 0) break;
      wait_while_equal(done_.remaining, left, done_.sleepers,
                       spin_ns_.load(std::memory_order_relaxed));
    }
  }
  if (error_) {
    std::exception_ptr e = std::move(error_);
    error_ = nullptr;
    std::rethrow_exception(e);
  }
}

void ThreadPool::barrier() {
  if (n_threads_ == 1) return;
  barrier_wait(barrier_arrive());
}

uint32_t ThreadPool::barrier_arrive() {
  if (n_threads_ == 1) return 0;
  if (failed_.load(std::memory_order_seq_cst)) throw PoolAbort{};
  const uint32_t phase = barrier_.phase.load(std::memory_order_seq_cst);
  // A failure between the check above and the load would have bumped the phase we just read and
  // would never bump it again: failed_ is stored before that bump, so it is visible now.
  if (failed_.load(std::memory_order_seq_cst)) throw PoolAbort{};
  const int ith = tls_thread_index;
  const int group = ith / kBarrierGroup;
  const int groups = static_cast<int>(group_arrived_.size());
  const int group_size = std::min(kBarrierGroup, n_threads_ - group * kBarrierGroup);
  std::atomic<int>& mine = group_arrived_[group].arrived;
  // Counters are reset by their last arriver before the phase opens, so a thread that races
  // ahead to the next barrier counts from zero (nobody can arrive again before the flip).
  if (mine.fetch_add(1, std::memory_order_acq_rel) == group_size - 1) {
    mine.store(0, std::memory_order_relaxed);
    if (barrier_.arrived.fetch_add(1, std::memory_order_acq_rel) == groups - 1) {
      barrier_.arrived.store(0, std::memory_order_relaxed);
      barrier_.phase.fetch_add(1, std::memory_order_seq_cst);
      wake_if_sleeping(barrier_.phase, barrier_.sleepers);
    }
  }
  return phase;
}

void ThreadPool::barrier_wait(uint32_t token) {
  if (n_threads_ == 1) return;
  // The phase cannot move on twice before this thread waits: the next flip needs its arrival.
  wait_while_equal(barrier_.phase, token, barrier_.sleepers,
                   spin_ns_.load(std::memory_order_relaxed));
  if (failed_.load(std::memory_order_seq_cst)) throw PoolAbort{};
}

}  // namespace ktune
