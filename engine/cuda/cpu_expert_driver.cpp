// CpuExpertDriver (cpu_expert_driver.h): the host thread behind the CPU-expert hand-off.
#include "cuda/cpu_expert_driver.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <stdexcept>

#include "ktune/engine/cuda/cuda_check.h"
#include "ktune/engine/error.h"
#include "ktune/engine/trace.h"
#include "runtime/cpu_moe_batch.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define KTUNE_PAUSE() _mm_pause()
#else
#define KTUNE_PAUSE() ((void)0)
#endif

namespace ktune {
namespace {

uint64_t load_acquire(const uint64_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
void store_release(uint64_t* p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

using Clock = std::chrono::steady_clock;

}  // namespace

CpuExpertDriver::CpuExpertDriver(CpuMoe& moe, const Shared& shared, std::vector<Layer> layers,
                                 int64_t top_k, int64_t n_experts,
                                 std::chrono::milliseconds timeout, int cpu)
    : moe_(moe),
      shared_(shared),
      layers_(std::move(layers)),
      top_k_(top_k),
      n_experts_(n_experts),
      timeout_(timeout) {
  int64_t n_layers = 0;
  for (const Layer& l : layers_) n_layers = std::max(n_layers, l.index + 1);
  node_ctx_.resize(static_cast<size_t>(n_layers));
  for (size_t l = 0; l < node_ctx_.size(); ++l) {
    node_ctx_[l].self = this;
    node_ctx_[l].layer = static_cast<int64_t>(l);
  }
  sel_ids_.resize(static_cast<size_t>(top_k));
  sel_w_.resize(static_cast<size_t>(top_k));
  if (const char* e = std::getenv("KTUNE_TEST_HANDOFF_STALL_MS")) {
    test_stall_ = std::chrono::milliseconds(std::atoll(e));
  }
  if (const char* e = std::getenv("KTUNE_HANDOFF_STATS")) stats_ = e[0] == '1';
  if (stats_) moe_.set_timing(true);  // where the CPU experts' time goes, in the engine
  thread_ = std::thread([this] { loop(); });
  if (cpu >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(thread_.native_handle(), sizeof(set), &set);  // best effort
  }
}

CpuExpertDriver::~CpuExpertDriver() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
  if (stats_ && stat_layers_ > 0) {
    const double n = static_cast<double>(stat_layers_);
    std::fprintf(stderr,
                 "ktune: cpu expert driver: %lld layers; per layer: wait for GPU %.1f us, "
                 "CPU experts %.1f us, publish %.1f us\n",
                 static_cast<long long>(stat_layers_), stat_wait_ns_ / n / 1e3,
                 stat_compute_ns_ / n / 1e3, stat_publish_ns_ / n / 1e3);
    const CpuMoe::Timing t = moe_.timing();
    if (t.calls > 0) {
      const double c = static_cast<double>(t.calls);
      std::fprintf(stderr,
                   "ktune: cpu experts: %lld calls; per call: %.1f us (wake %.1f, quantize %.1f, "
                   "work %.1f of which gate/up %.1f, wait %.1f, uneven finish %.1f, exit %.1f)\n",
                   static_cast<long long>(t.calls), t.total_us / c, t.wake_us / c, t.quant_us / c,
                   t.work_us / c, t.gate_up_us / c, t.wait_us / c, t.tail_us / c, t.exit_us / c);
    }
  }
}

void CpuExpertDriver::enable_batch(const BatchShared& shared, CpuMoeBatch* moe) {
  std::lock_guard<std::mutex> lk(mu_);
  batch_ = shared;
  batch_moe_ = moe;
  bsel_ids_.assign(static_cast<size_t>(shared.max_tokens * top_k_), 0);
  bsel_w_.assign(static_cast<size_t>(shared.max_tokens * top_k_), 0.0f);
  bsel_n_.assign(static_cast<size_t>(shared.max_tokens), 0);
}

void CpuExpertDriver::arm(uint64_t seq, int64_t tokens) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    armed_.push_back({seq, tokens});
  }
  cv_.notify_one();
}

void CpuExpertDriver::cancel() {
  std::lock_guard<std::mutex> lk(mu_);
  armed_.clear();
}

std::string CpuExpertDriver::finish() {
  std::unique_lock<std::mutex> lk(mu_);
  // The GPU has finished the step(s): the driver is at most publishing the last layer. A driver
  // stuck in CpuMoe (or waiting for a request that will never come) is bounded by its timeout.
  if (!idle_cv_.wait_for(lk, timeout_ + std::chrono::seconds(1), [&] { return armed_.empty(); })) {
    armed_.clear();
    if (error_.empty()) error_ = "the CPU expert thread did not finish its steps";
  }
  std::string e;
  e.swap(error_);
  return e;
}

void* CpuExpertDriver::host_node_ctx(int64_t layer) {
  return &node_ctx_[static_cast<size_t>(layer)];
}

void CpuExpertDriver::host_post(void* ctx) {
  auto* c = static_cast<NodeCtx*>(ctx);
  CpuExpertDriver* self = c->self;
  uint64_t seq = 0;
  {
    std::lock_guard<std::mutex> lk(self->mu_);
    if (self->armed_.empty()) return;  // cancelled or failed: the wait side times out cleanly
    seq = self->armed_.front().seq;
  }
  c->seq = seq;
  store_release(&self->shared_.words[c->layer].request, seq);
}

void CpuExpertDriver::host_wait(void* ctx) {
  auto* c = static_cast<NodeCtx*>(ctx);
  CpuExpertDriver* self = c->self;
  if (__atomic_load_n(self->shared_.error, __ATOMIC_ACQUIRE) != 0) return;
  if (!self->wait_word(&self->shared_.words[c->layer].done, c->seq, false)) {
    __atomic_store_n(self->shared_.error, kErrorHostWait + static_cast<uint32_t>(c->layer),
                     __ATOMIC_RELEASE);
  }
}

bool CpuExpertDriver::wait_word(const uint64_t* word, uint64_t seq, bool until_cancelled) {
  const auto start = Clock::now();
  const auto deadline = start + timeout_;
  // The driver thread waiting for the GPU's request keeps the CpuMoe pool's workers spinning
  // (CpuMoe::keep_warm), so a long GPU stretch (GPU layers before a CPU one) does not end with
  // every worker asleep.
  const auto warm_every = std::chrono::microseconds(until_cancelled ? moe_.keep_warm_interval_us()
                                                                    : 0);
  auto next_warm = start + warm_every;
  for (uint32_t i = 1;; ++i) {
    if (load_acquire(word) == seq) return true;
    KTUNE_PAUSE();
    if ((i & 1023u) == 0) {
      const auto now = Clock::now();
      if (now > deadline) return false;
      if (warm_every.count() > 0 && now > next_warm) {
        moe_.keep_warm();
        next_warm = Clock::now() + warm_every;
      }
      std::lock_guard<std::mutex> lk(mu_);
      if (stop_ || (until_cancelled && armed_.empty())) return false;
    }
  }
}

int CpuExpertDriver::select_and_compute(const Layer& layer) {
  int n_cpu = 0;
  for (int64_t j = 0; j < top_k_; ++j) {
    const int32_t id = shared_.ids[j];
    if (id < 0 || id >= n_experts_) {
      throw std::runtime_error("layer " + std::to_string(layer.index) + ": router chose expert " +
                               std::to_string(id) + " of " + std::to_string(n_experts_));
    }
    if ((*layer.slot)[static_cast<size_t>(id)] < 0) ++n_cpu;
  }
  // The last `assisted` CPU experts in top-k order are the GPU's (launch_pcie_assist_map).
  const int keep = n_cpu - pcie_assist_count(n_cpu, pcie_num_, pcie_den_);
  int n = 0;
  for (int64_t j = 0; j < top_k_ && n < keep; ++j) {
    const int32_t id = shared_.ids[j];
    if ((*layer.slot)[static_cast<size_t>(id)] >= 0) continue;  // a GPU expert
    sel_ids_[static_cast<size_t>(n)] = id;
    sel_w_[static_cast<size_t>(n)] = shared_.wts[j];
    ++n;
  }
  if (n > 0) {
    trace::Scope cpu_experts(trace::Phase::MoeCpu, static_cast<int32_t>(layer.index));
    moe_.compute(layer.index, shared_.h, sel_ids_.data(), sel_w_.data(), n, shared_.y);
  }
  return n;
}

int CpuExpertDriver::select_and_compute_batch(const Layer& layer, int64_t tokens) {
  if (batch_moe_ == nullptr || tokens > batch_.max_tokens) {
    throw std::runtime_error("a batched step of " + std::to_string(tokens) +
                             " tokens without (or beyond) the batch blocks");
  }
  int pairs = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    int n = 0;
    for (int64_t j = 0; j < top_k_; ++j) {
      const int32_t id = batch_.ids[t * top_k_ + j];
      if (id < 0 || id >= n_experts_) {
        throw std::runtime_error("layer " + std::to_string(layer.index) + ", sequence " +
                                 std::to_string(t) + ": router chose expert " + std::to_string(id) +
                                 " of " + std::to_string(n_experts_));
      }
      if ((*layer.slot)[static_cast<size_t>(id)] >= 0) continue;  // a GPU expert
      bsel_ids_[static_cast<size_t>(t * top_k_ + n)] = id;
      bsel_w_[static_cast<size_t>(t * top_k_ + n)] = batch_.wts[t * top_k_ + j];
      ++n;
    }
    bsel_n_[static_cast<size_t>(t)] = n;
    pairs += n;
  }
  if (pairs > 0) {
    trace::Scope cpu_experts(trace::Phase::MoeCpu, static_cast<int32_t>(layer.index));
    batch_moe_->compute(layer.index, tokens, batch_.h, bsel_ids_.data(), bsel_w_.data(),
                        bsel_n_.data(), top_k_, batch_.y);
  }
  return pairs;
}

void CpuExpertDriver::fail(const std::string& what) {
  std::lock_guard<std::mutex> lk(mu_);
  if (error_.empty()) error_ = what;
}

void CpuExpertDriver::loop() {
  for (;;) {
    uint64_t seq = 0;
    int64_t tokens = 0;
    trace::name_thread("cpu expert driver");
    {
      // Spin briefly (the next step usually follows at once), then sleep.
      std::unique_lock<std::mutex> lk(mu_);
      if (armed_.empty() && !stop_) {
        lk.unlock();
        const auto spin_until = Clock::now() + std::chrono::microseconds(200);
        for (uint32_t i = 1;; ++i) {
          KTUNE_PAUSE();
          if ((i & 255u) == 0) {
            lk.lock();
            if (!armed_.empty() || stop_) break;
            lk.unlock();
            if (Clock::now() > spin_until) {
              lk.lock();
              break;
            }
          }
        }
        cv_.wait(lk, [&] { return !armed_.empty() || stop_; });
      }
      if (stop_) return;
      seq = armed_.front().seq;
      tokens = armed_.front().tokens;
    }
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& layer = layers_[i];
      cuda::HandoffWords& w = shared_.words[layer.index];
      const bool last = i + 1 == layers_.size();
      const auto t0 = Clock::now();
      if (!wait_word(&w.request, seq, true)) {
        {
          std::lock_guard<std::mutex> lk(mu_);
          if (stop_) return;
          if (armed_.empty()) break;  // cancelled by the host
        }
        fail("layer " + std::to_string(layer.index) + ": the GPU did not hand the CPU experts " +
             "over within " + std::to_string(timeout_.count()) + " ms");
        std::lock_guard<std::mutex> lk(mu_);
        armed_.clear();
        idle_cv_.notify_all();
        break;
      }
      const auto t1 = Clock::now();
      int n = 0;
      try {
        if (test_stall_.count() > 0) std::this_thread::sleep_for(test_stall_);
        n = tokens > 0 ? select_and_compute_batch(layer, tokens) : select_and_compute(layer);
      } catch (const std::exception& e) {
        fail(std::string("CPU experts: ") + e.what());
        n = 0;
      }
      const auto t2 = Clock::now();
      w.n_cpu = static_cast<uint32_t>(n);
      if (last) {
        std::lock_guard<std::mutex> lk(mu_);
        if (!armed_.empty()) armed_.pop_front();
        if (armed_.empty()) idle_cv_.notify_all();
      }
      store_release(&w.done, seq);
      if (stats_) {
        const auto t3 = Clock::now();
        ++stat_layers_;
        stat_wait_ns_ += std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count();
        stat_compute_ns_ += std::chrono::duration_cast<std::chrono::nanoseconds>(t2 - t1).count();
        stat_publish_ns_ += std::chrono::duration_cast<std::chrono::nanoseconds>(t3 - t2).count();
      }
    }
  }
}

void raise_step_errors(int err, uint32_t* error_word, const std::string& cpu_side,
                       int64_t timeout_ms) {
  const uint32_t code = __atomic_load_n(error_word, __ATOMIC_ACQUIRE);
  if (err == cudaSuccess && code == 0 && cpu_side.empty()) return;
  __atomic_store_n(error_word, 0u, __ATOMIC_RELEASE);
  if (err != cudaSuccess) KTUNE_CUDA_CHECK(static_cast<cudaError_t>(err));
  std::string what = cpu_side;
  if (code != 0) {
    const bool host = code >= CpuExpertDriver::kErrorHostWait;
    const uint32_t layer =
        code - (host ? CpuExpertDriver::kErrorHostWait : CpuExpertDriver::kErrorTimeoutBase);
    what = (what.empty() ? "" : what + "; ") + "layer " + std::to_string(layer) +
           ": the CPU experts did not answer within " + std::to_string(timeout_ms) + " ms (" +
           (host ? "host node" : "GPU wait") + "), the step's result is wrong";
  }
  throw Error("cpu experts", what,
              "check that the CPU is not oversubscribed (fewer --threads), or raise the hand-off "
              "timeout; reset() before decoding again");
}

}  // namespace ktune
