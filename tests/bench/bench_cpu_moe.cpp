// CpuMoe in the hybrid decode pattern: per token, one compute() per layer (48) over
// qwen3-30b-a3b-shaped Q4_0 experts (hidden 2048, expert ffn 768, 128 experts per layer) with
// random top-8 routing, and the caller idle between calls for a gap (it spins, as a host thread
// waiting for the GPU's attention of the next layer does). The figure of merit is GB/s of expert
// weights per call: bytes / time of compute(), its fixed per-call costs (waking the pool,
// quantizing h, waiting, the uneven finish) included. From it, tok/s if every expert of every
// layer ran on the CPU: 1 / (48 × call time), and with the gap, 1 / (48 × (call time + gap)).
// The DRAM read probe (ktune probe) runs in the same process for the ratio, and CpuMoe::Timing
// says where a call's time goes.
//
// Only the expert tensors are built (16.3 GB at 48 layers × 128 experts), in one mmap arena with
// MADV_HUGEPAGE as synthetic models are, filled from a few random Q4_0 matrices (speed does not
// depend on the values).
//
// Two ways to run it:
//   Google Benchmark (-DKTUNE_BENCHMARKS=ON): ktune_bench --benchmark_filter='CpuMoe|ReadProbe'
//     (KTUNE_BENCH_MOE_LAYERS / KTUNE_BENCH_MOE_EXPERTS shrink the model on a small machine).
//   Standalone, with a side-by-side table of variants (tuning knobs of cpu_moe.h) measured in
//   interleaved rounds, so drift of the machine hits every variant alike:
//     g++ -O2 -std=c++17 -DKTUNE_BENCH_STANDALONE -Iengine/include -Iengine
//         tests/bench/bench_cpu_moe.cpp BUILD/engine/libktune_engine.a -lfmt -pthread
//     ./a.out --threads 1,8,16 --gap-us 0,30 --tokens 20 --rounds 3
//         --variants 'default;KTUNE_CPU_MOE_SCHED=barrier'
#if !defined(KTUNE_BENCH_STANDALONE)
#include <benchmark/benchmark.h>
#endif

#include <sched.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "ktune/engine/cpu_kernels.h"
#include "ktune/engine/cpu_moe.h"
#include "ktune/engine/host_info.h"
#include "ktune/engine/model.h"
#include "ktune/engine/quant.h"
#include "ktune/engine/thread_pool.h"

namespace {

using ktune::QuantType;
using Clock = std::chrono::steady_clock;

constexpr int kTopK = 8;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// The caller's idle gap: a busy wait (a host thread synchronizing with a spinning CUDA event).
void spin_until(Clock::time_point t) {
  while (Clock::now() < t) {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#endif
  }
}

// Pins the calling thread to the first CPU it may run on (the pool leaves core 0 to its caller).
// Only after every pool exists: a pool pins its workers to the cores its creator may run on,
// and threads it cannot pin inherit the creator's mask.
void pin_caller() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &set)) {
      CPU_ZERO(&set);
      CPU_SET(c, &set);
      sched_setaffinity(0, sizeof(set), &set);
      return;
    }
  }
}

// The expert tensors of a qwen3-30b-a3b-shaped Q4_0 model, nothing else.
struct ExpertBank {
  ktune::ModelWeights w;
  int64_t bytes_per_expert = 0;  // gate + up + down of one expert

  ExpertBank(int64_t layers, int64_t experts, bool hugepages, ktune::ThreadPool& pool) {
    ktune::ModelConfig c = *ktune::find_preset("qwen3-30b-a3b");
    c.n_layers = layers;
    c.n_experts = std::max<int64_t>(experts, kTopK);
    w.cfg = c;
    w.source = "bench:qwen3-30b-a3b experts";
    w.quant = QuantType::Q4_0;
    const QuantType q = QuantType::Q4_0;
    const int64_t H = c.hidden, F = c.expert_ffn, E = c.n_experts;
    const int64_t mat_gu = ktune::row_bytes(q, H) * F;  // one expert's gate (or up) matrix
    const int64_t mat_d = ktune::row_bytes(q, F) * H;
    bytes_per_expert = 2 * mat_gu + mat_d;
    const int64_t tensor_gu = (mat_gu * E + 4095) / 4096 * 4096;
    const int64_t tensor_d = (mat_d * E + 4095) / 4096 * 4096;
    const size_t total = static_cast<size_t>(layers * (2 * tensor_gu + tensor_d));
    void* mem = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
      std::fprintf(stderr, "bench_cpu_moe: cannot map %.1f GB\n", total / 1e9);
      std::exit(1);
    }
    madvise(mem, total, hugepages ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    w.storage.emplace_back(mem, [total](void* p) { munmap(p, total); });
    auto* base = static_cast<uint8_t*>(mem);

    // A few random matrices per kind, std 1/sqrt(fan_in) as synthetic models.
    constexpr int kTemplates = 4;
    auto make = [&](int64_t rows, int64_t n, unsigned seed) {
      std::mt19937 rng(seed);
      std::normal_distribution<float> nd(0.0f, 1.0f / std::sqrt(static_cast<float>(n)));
      std::vector<float> row(static_cast<size_t>(n));
      const int64_t rb = ktune::row_bytes(q, n);
      std::vector<uint8_t> m(static_cast<size_t>(rows * rb));
      for (int64_t r = 0; r < rows; ++r) {
        for (float& v : row) v = nd(rng);
        ktune::quantize_row(q, row.data(), m.data() + r * rb, n);
      }
      return m;
    };
    std::vector<std::vector<uint8_t>> tg, tu, td;
    for (int i = 0; i < kTemplates; ++i) {
      tg.push_back(make(F, H, 100 + i));
      tu.push_back(make(F, H, 200 + i));
      td.push_back(make(H, F, 300 + i));
    }

    w.layers.resize(static_cast<size_t>(layers));
    for (int64_t l = 0; l < layers; ++l) {
      ktune::LayerWeights& L = w.layers[static_cast<size_t>(l)];
      uint8_t* at = base + l * (2 * tensor_gu + tensor_d);
      const std::string blk = "blk." + std::to_string(l) + ".";
      auto view = [&](ktune::TensorView& t, const char* name, int64_t ne0, int64_t ne1,
                      uint8_t* data) {
        t.name = blk + name + ".weight";
        t.type = q;
        t.ne = {ne0, ne1, E};
        t.data = data;
      };
      view(L.gate_exps, "ffn_gate_exps", H, F, at);
      view(L.up_exps, "ffn_up_exps", H, F, at + tensor_gu);
      view(L.down_exps, "ffn_down_exps", F, H, at + 2 * tensor_gu);
    }
    // Fill in parallel (first touch spreads the page faults over the pool).
    const int64_t items = layers * E;
    pool.run([&](int ith, int nth) {
      for (int64_t i = ith; i < items; i += nth) {
        const int64_t l = i / E, e = i % E;
        const ktune::LayerWeights& L = w.layers[static_cast<size_t>(l)];
        const size_t k = static_cast<size_t>(i % kTemplates);
        std::memcpy(const_cast<uint8_t*>(L.gate_exps.matrix(e)), tg[k].data(), tg[k].size());
        std::memcpy(const_cast<uint8_t*>(L.up_exps.matrix(e)), tu[k].data(), tu[k].size());
        std::memcpy(const_cast<uint8_t*>(L.down_exps.matrix(e)), td[k].data(), td[k].size());
      }
    });
  }

  int64_t layers() const { return w.cfg.n_layers; }
  int64_t bytes_per_call() const { return kTopK * bytes_per_expert; }
};

// Random top-8 routing for `tokens` tokens of every layer, and one hidden state per layer.
struct Workload {
  int64_t tokens = 0, layers = 0, hidden = 0;
  std::vector<int32_t> ids;    // [token][layer][k]
  std::vector<float> weights;  // [token][layer][k]
  std::vector<float> h;        // [layer][hidden]

  Workload(const ExpertBank& bank, int64_t n_tokens, uint64_t seed)
      : tokens(n_tokens), layers(bank.layers()), hidden(bank.w.cfg.hidden) {
    std::mt19937_64 rng(seed);
    const int64_t E = bank.w.cfg.n_experts;
    std::vector<int32_t> all(static_cast<size_t>(E));
    std::uniform_real_distribution<float> ud(0.05f, 1.0f);
    for (int64_t t = 0; t < tokens * layers; ++t) {
      std::iota(all.begin(), all.end(), 0);
      float sum = 0;
      float wk[kTopK];
      for (int k = 0; k < kTopK; ++k) {  // partial Fisher-Yates: 8 distinct experts
        std::uniform_int_distribution<int64_t> pick(k, E - 1);
        std::swap(all[static_cast<size_t>(k)], all[static_cast<size_t>(pick(rng))]);
        ids.push_back(all[static_cast<size_t>(k)]);
        wk[k] = ud(rng);
        sum += wk[k];
      }
      for (float v : wk) weights.push_back(v / sum);
    }
    std::normal_distribution<float> nd(0.0f, 1.0f);
    h.resize(static_cast<size_t>(layers * hidden));
    for (float& v : h) v = nd(rng);
  }
  const int32_t* ids_of(int64_t t, int64_t l) const {
    return ids.data() + (t * layers + l) * kTopK;
  }
  const float* weights_of(int64_t t, int64_t l) const {
    return weights.data() + (t * layers + l) * kTopK;
  }
};

// Runs tokens [t0, t1) of the workload: per layer one compute(), then the gap. Returns the
// time of every call (µs); with per_call (and timing on), each call's CpuMoe::Timing too.
std::vector<double> run_tokens(ktune::CpuMoe& moe, const Workload& wl, int64_t t0, int64_t t1,
                               double gap_us, std::vector<float>& y,
                               std::vector<ktune::CpuMoe::Timing>* per_call = nullptr) {
  std::vector<double> calls;
  calls.reserve(static_cast<size_t>((t1 - t0) * wl.layers));
  const auto gap = std::chrono::nanoseconds(static_cast<int64_t>(gap_us * 1e3));
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t l = 0; l < wl.layers; ++l) {
      if (per_call != nullptr) moe.reset_timing();
      const auto a = Clock::now();
      moe.compute(l, wl.h.data() + l * wl.hidden, wl.ids_of(t, l), wl.weights_of(t, l), kTopK,
                  y.data());
      const auto b = Clock::now();
      calls.push_back(std::chrono::duration<double, std::micro>(b - a).count());
      if (per_call != nullptr) per_call->push_back(moe.timing());
      if (gap_us > 0) spin_until(b + gap);
    }
  }
  return calls;
}

// AnonHugePages of this process (kB), from /proc/self/smaps_rollup; -1 when unreadable.
long anon_huge_kb() {
  FILE* f = std::fopen("/proc/self/smaps_rollup", "r");
  if (f == nullptr) return -1;
  char line[256];
  long kb = -1;
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    if (std::sscanf(line, "AnonHugePages: %ld kB", &kb) == 1) break;
  }
  std::fclose(f);
  return kb;
}

uint64_t probe_bytes() {
  if (const char* v = std::getenv("KTUNE_BENCH_PROBE_MB")) return std::atoll(v) * (1ull << 20);
  return ktune::default_probe_bytes();
}

}  // namespace

#if defined(KTUNE_BENCH_STANDALONE)
// ---------------------------------------------------------------------------------------------
// Standalone: a table of variants × threads × gaps.
// ---------------------------------------------------------------------------------------------
namespace {

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t p = 0;
  while (p <= s.size()) {
    size_t q = s.find(sep, p);
    if (q == std::string::npos) q = s.size();
    if (q > p) out.push_back(s.substr(p, q - p));
    p = q + 1;
  }
  return out;
}

// "NAME=V,NAME2=V2" (or "default") set while the variant's CpuMoe objects are constructed.
struct Variant {
  std::string label;
  std::vector<std::pair<std::string, std::string>> env;
  int64_t spin_us = -1;  // SPIN_US=... in the list: the pool's spin for this variant
};

Variant parse_variant(const std::string& text) {
  Variant v;
  v.label = text;  // shown without the common prefix of the knobs
  for (size_t p; (p = v.label.find("KTUNE_CPU_MOE_")) != std::string::npos;) {
    v.label.erase(p, std::strlen("KTUNE_CPU_MOE_"));
  }
  if (text == "default") return v;
  for (const std::string& kv : split(text, ',')) {
    const size_t eq = kv.find('=');
    if (eq == std::string::npos) continue;
    const std::string k = kv.substr(0, eq), val = kv.substr(eq + 1);
    if (k == "SPIN_US") {
      v.spin_us = std::atoll(val.c_str());
    } else {
      v.env.emplace_back(k, val);
    }
  }
  return v;
}

struct Stats {
  std::vector<double> calls;
  std::vector<ktune::CpuMoe::Timing> timing;  // per call
};

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[static_cast<size_t>(std::min<double>(v.size() - 1, p * (v.size() - 1) + 0.5))];
}

}  // namespace

int main(int argc, char** argv) {
  std::string threads_arg = "1,8,16", gaps_arg = "30", variants_arg = "default";
  int64_t tokens = 20, rounds = 3, layers = 48, experts = 128, warmup = 2;
  bool hugepages = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--threads") {
      threads_arg = next();
    } else if (a == "--gap-us") {
      gaps_arg = next();
    } else if (a == "--variants") {
      variants_arg = next();
    } else if (a == "--tokens") {
      tokens = std::atoll(next().c_str());
    } else if (a == "--rounds") {
      rounds = std::atoll(next().c_str());
    } else if (a == "--layers") {
      layers = std::atoll(next().c_str());
    } else if (a == "--experts") {
      experts = std::atoll(next().c_str());
    } else if (a == "--no-hugepages") {
      hugepages = false;
    } else {
      std::fprintf(stderr,
                   "usage: %s [--threads 1,8,16] [--gap-us 0,30] [--tokens N] [--rounds R] "
                   "[--layers L] [--experts E] [--no-hugepages] [--variants 'default;K=V,K=V']\n",
                   argv[0]);
      return 2;
    }
  }
  std::vector<int> thread_counts;
  for (const std::string& t : split(threads_arg, ',')) thread_counts.push_back(std::stoi(t));
  std::vector<double> gaps;
  for (const std::string& g : split(gaps_arg, ',')) gaps.push_back(std::stod(g));
  std::vector<Variant> variants;
  for (const std::string& v : split(variants_arg, ';')) variants.push_back(parse_variant(v));

  const int max_threads = *std::max_element(thread_counts.begin(), thread_counts.end());
  std::map<int, std::unique_ptr<ktune::ThreadPool>> pools;
  for (int t : thread_counts) pools[t] = std::make_unique<ktune::ThreadPool>(t, true);
  ktune::ThreadPool& big = *pools[max_threads];
  pin_caller();

  const auto tb = Clock::now();
  ExpertBank bank(layers, experts, hugepages, big);
  std::string pinned;
  for (int c : big.pinned_cpus()) pinned += (pinned.empty() ? "" : ",") + std::to_string(c);
  std::printf(
      "cpu: %s, isa %s; pool of %d pinned to cpus %s (-1: not pinned; the caller is on "
      "the first allowed cpu)\n",
      ktune::cpu_model_name().c_str(), ktune::cpu::isa_name(ktune::cpu::detect_isa()), big.size(),
      pinned.c_str());
  std::printf("experts: %ld layers x %ld, %.2f GB, %s\n", static_cast<long>(layers),
              static_cast<long>(bank.w.cfg.n_experts),
              layers * bank.w.cfg.n_experts * bank.bytes_per_expert / 1e9,
              hugepages ? "MADV_HUGEPAGE" : "MADV_NOHUGEPAGE");
  std::printf(
      "built in %.1f s (AnonHugePages %.2f GB); %.2f MB per call (top-%d), %.3f GB per "
      "token of %ld layers\n",
      seconds_since(tb), anon_huge_kb() / 1e6, bank.bytes_per_call() / 1e6, kTopK,
      bank.bytes_per_call() * layers / 1e9, static_cast<long>(layers));
  if (const char* c = std::getenv("KTUNE_COMMIT")) std::printf("commit: %s\n", c);

  const Workload wl(bank, warmup + tokens, 7);
  std::vector<float> y(static_cast<size_t>(bank.w.cfg.hidden));

  // One CpuMoe per (variant, threads), each constructed under its variant's knobs. The pool's
  // spin for a cell: SPIN_US of the variant, else what its CpuMoe set on a fresh pool (the
  // pool's default, 100 µs, or more); applied before each of the cell's runs.
  struct Cell {
    const Variant* v;
    int threads;
    std::unique_ptr<ktune::CpuMoe> moe;
    int64_t spin_us;
    std::vector<Stats> per_gap;
  };
  std::vector<Cell> cells;
  for (const Variant& v : variants) {
    for (const auto& kv : v.env) setenv(kv.first.c_str(), kv.second.c_str(), 1);
    for (int t : thread_counts) {
      ktune::ThreadPool& pool = *pools[t];
      pool.set_spin_us(100);
      Cell c{&v, t, std::make_unique<ktune::CpuMoe>(bank.w, pool), 0, {}};
      c.spin_us = v.spin_us >= 0 ? v.spin_us : pool.spin_us();
      c.per_gap.resize(gaps.size());
      c.moe->set_timing(true);
      cells.push_back(std::move(c));
    }
    for (const auto& kv : v.env) unsetenv(kv.first.c_str());
  }

  auto probe = [&]() {
    const ktune::BandwidthResult r = ktune::measure_read_bandwidth(big, probe_bytes(), 5);
    std::printf("read probe (%d threads, %.2f GB): best %.1f GB/s, mean %.1f GB/s\n", r.threads,
                r.bytes / 1e9, r.gb_per_s, r.mean_gb_per_s);
    return r.gb_per_s;
  };
  const double probe0 = probe();

  for (int64_t r = 0; r < rounds; ++r) {
    for (size_t gi = 0; gi < gaps.size(); ++gi) {
      for (Cell& c : cells) {
        pools[c.threads]->set_spin_us(c.spin_us);
        run_tokens(*c.moe, wl, 0, warmup, gaps[gi], y);  // warm-up (not counted)
        Stats& st = c.per_gap[gi];
        const std::vector<double> calls =
            run_tokens(*c.moe, wl, warmup, warmup + tokens, gaps[gi], y, &st.timing);
        st.calls.insert(st.calls.end(), calls.begin(), calls.end());
      }
    }
  }
  const double probe1 = probe();
  const double probe_ref = (probe0 + probe1) / 2;

  const double bytes = static_cast<double>(bank.bytes_per_call());
  std::printf(
      "\n%ld tokens x %ld layers per cell and round, %ld rounds; GB/s = %.2f MB / mean call "
      "time; %%probe vs %.1f GB/s (mean of the two probes' best)\n",
      static_cast<long>(tokens), static_cast<long>(layers), static_cast<long>(rounds), bytes / 1e6,
      probe_ref);
  std::printf(
      "tok/s: all experts of %ld layers on the CPU, 1/(L x call) and 1/(L x (call + gap))\n",
      static_cast<long>(layers));
  std::printf(
      "per call, median us: wake (last thread starts; also its mean), quant, work (of it "
      "gate/up: gu), wait (for others' results), tail (first to last finish), exit (last finish "
      "to return); slow: calls over 1.5 x the median\n\n");
  std::printf(
      "%-40s %3s %4s %5s | %7s %7s %7s | %6s %6s | %6s %7s | %5s %6s %5s %6s %6s %5s %5s %5s "
      "%5s\n",
      "variant", "thr", "spin", "gap", "mean_us", "p50_us", "p90_us", "GB/s", "%prb", "tok/s",
      "tok/s+g", "wake", "wake_m", "quant", "work", "gu", "wait", "tail", "exit", "slow");
  for (size_t gi = 0; gi < gaps.size(); ++gi) {
    for (const Cell& c : cells) {
      const Stats& s = c.per_gap[gi];
      const double mean = std::accumulate(s.calls.begin(), s.calls.end(), 0.0) / s.calls.size();
      const double gbs = bytes / (mean * 1e-6) / 1e9;
      const double p50 = percentile(s.calls, 0.5);
      auto med = [&](double ktune::CpuMoe::Timing::*f) {
        std::vector<double> v;
        for (const ktune::CpuMoe::Timing& t : s.timing) v.push_back(t.*f);
        return percentile(v, 0.5);
      };
      double wake_mean = 0;
      for (const ktune::CpuMoe::Timing& t : s.timing) wake_mean += t.wake_us;
      wake_mean /= std::max<size_t>(1, s.timing.size());
      const double slow =
          100.0 *
          std::count_if(s.calls.begin(), s.calls.end(), [&](double v) { return v > 1.5 * p50; }) /
          s.calls.size();
      std::printf(
          "%-40s %3d %4ld %5.0f | %7.1f %7.1f %7.1f | %6.1f %5.1f%% | %6.1f %7.1f | %5.1f %6.1f "
          "%5.1f %6.1f %6.1f %5.1f %5.1f %5.1f %4.1f%%\n",
          c.v->label.substr(0, 40).c_str(), c.threads, static_cast<long>(c.spin_us), gaps[gi], mean,
          p50, percentile(s.calls, 0.9), gbs, 100.0 * gbs / probe_ref, 1e6 / (layers * mean),
          1e6 / (layers * (mean + gaps[gi])), med(&ktune::CpuMoe::Timing::wake_us), wake_mean,
          med(&ktune::CpuMoe::Timing::quant_us), med(&ktune::CpuMoe::Timing::work_us),
          med(&ktune::CpuMoe::Timing::gate_up_us), med(&ktune::CpuMoe::Timing::wait_us),
          med(&ktune::CpuMoe::Timing::tail_us), med(&ktune::CpuMoe::Timing::exit_us), slow);
    }
  }
  return 0;
}

#else
// ---------------------------------------------------------------------------------------------
// Google Benchmark: BM_CpuMoeHybridDecode/threads/gap_us; one iteration = one token (a compute()
// per layer, the gap after each). Manual time = the compute() calls only, so bytes_per_second
// is GB/s per call; tok/s counts the gaps in.
// ---------------------------------------------------------------------------------------------
namespace {

int64_t env_or(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' ? std::atoll(v) : fallback;
}

// The pools of every thread count the benchmarks use, all made before the caller is pinned.
ktune::ThreadPool& pool_of(int threads) {
  static std::map<int, std::unique_ptr<ktune::ThreadPool>> pools = [] {
    std::map<int, std::unique_ptr<ktune::ThreadPool>> m;
    for (int t : {1, 8, 16, ktune::physical_core_count()}) {
      if (!m[t]) m[t] = std::make_unique<ktune::ThreadPool>(t, true);
    }
    pin_caller();
    return m;
  }();
  auto& p = pools[threads];
  if (!p) p = std::make_unique<ktune::ThreadPool>(threads, true);
  return *p;
}

const ExpertBank& bank() {
  static const ExpertBank b(env_or("KTUNE_BENCH_MOE_LAYERS", 48),
                            env_or("KTUNE_BENCH_MOE_EXPERTS", 128), true,
                            pool_of(ktune::physical_core_count()));
  return b;
}

void BM_CpuMoeHybridDecode(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  const double gap_us = static_cast<double>(state.range(1));
  const ExpertBank& b = bank();
  static const Workload wl(b, 64, 7);
  ktune::CpuMoe moe(b.w, pool_of(threads));
  moe.set_timing(true);
  std::vector<float> y(static_cast<size_t>(b.w.cfg.hidden));
  run_tokens(moe, wl, 0, 2, gap_us, y);  // warm-up
  moe.reset_timing();
  int64_t t = 0;
  double compute_s = 0;
  for (auto _ : state) {
    const std::vector<double> calls = run_tokens(moe, wl, t, t + 1, gap_us, y);
    const double s = std::accumulate(calls.begin(), calls.end(), 0.0) * 1e-6;
    compute_s += s;
    state.SetIterationTime(s);
    t = (t + 1) % wl.tokens;
  }
  const double tokens = static_cast<double>(state.iterations());
  const double L = static_cast<double>(b.layers());
  state.SetBytesProcessed(state.iterations() * b.layers() * b.bytes_per_call());
  state.counters["tok/s"] = tokens / compute_s;
  state.counters["tok/s+gap"] = tokens / (compute_s + tokens * L * gap_us * 1e-6);
  const ktune::CpuMoe::Timing tm = moe.timing();
  const double n = std::max<int64_t>(1, tm.calls);
  state.counters["wake_us"] = tm.wake_us / n;
  state.counters["wait_us"] = tm.wait_us / n;
  state.counters["tail_us"] = tm.tail_us / n;
}

void BM_ReadProbe(benchmark::State& state) {
  ktune::ThreadPool& pool = pool_of(static_cast<int>(state.range(0)));
  double gbs = 0;
  for (auto _ : state) gbs = ktune::measure_read_bandwidth(pool, probe_bytes(), 3).gb_per_s;
  state.counters["GB/s"] = gbs;
}

BENCHMARK(BM_ReadProbe)
    ->Arg(16)
    ->ArgNames({"threads"})
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_CpuMoeHybridDecode)
    ->ArgsProduct({{1, 8, 16}, {0, 30}})
    ->ArgNames({"threads", "gap_us"})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_ReadProbe)
    ->Arg(16)
    ->ArgNames({"threads"})
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

}  // namespace
#endif
