// Machine probes of `ktune profile --hardware` (profiler/hardware.h).
#include "profiler/hardware.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <ctime>
#include <memory>
#include <random>
#include <thread>

#include "ktune/engine/build_info.h"
#include "ktune/engine/cpu_kernels.h"
#include "ktune/engine/cpu_moe.h"
#include "ktune/engine/error.h"
#include "ktune/engine/host_info.h"
#include "ktune/engine/synthetic.h"
#include "ktune/engine/thread_pool.h"
#include "profiler/topology.h"

#if KTUNE_WITH_CUDA
#include <cuda_runtime.h>

#include "ktune/engine/cuda/cuda_check.h"
#include "ktune/engine/cuda/hybrid_kernels.h"
#include "ktune/engine/cuda/kernels.h"
#include "profiler/hardware_kernels.h"
#endif

namespace ktune::profiler {

using nlohmann::json;

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::vector<int> thread_list(const HardwareOptions& o) {
  if (!o.threads.empty()) {
    std::vector<int> t = o.threads;
    std::sort(t.begin(), t.end());
    t.erase(std::unique(t.begin(), t.end()), t.end());
    return t;
  }
  const int cores = physical_core_count();
  std::vector<int> t = {1, std::max(1, cores / 4), std::max(1, cores / 2), cores};
  if (o.quick) t = {1, cores};
  std::sort(t.begin(), t.end());
  t.erase(std::unique(t.begin(), t.end()), t.end());
  return t;
}

int count_numa_nodes() { return read_topology(0, {}).numa_nodes; }

// A GPU kernel reading pinned host memory in a loop (what the PCIe assist does), on its own
// thread: start() begins, stop() ends it and returns the GB/s it read meanwhile.
class PcieLoad {
 public:
  virtual ~PcieLoad() = default;
  virtual void start() = 0;
  virtual double stop() = 0;
};
std::unique_ptr<PcieLoad> make_pcie_load(int device);  // nullptr without CUDA or that GPU

}  // namespace

void stamp_summary(profile::ProfileSummary& s, const std::string& kind) {
  s.kind = kind;
  s.ktune_version = build_version();
  s.commit = build_commit();
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  s.created = buf;
}

profile::CpuInfo measure_cpu(const HardwareOptions& o, json* raw) {
  profile::CpuInfo c;
  c.name = cpu_model_name();
  c.physical_cores = std::max(1, physical_core_count());
  c.logical_cpus = std::max(c.physical_cores, static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN)));
  c.numa_nodes = count_numa_nodes();
  c.isa = cpu::isa_name(cpu::detect_isa());
  c.mem_bytes = std::max<int64_t>(host_memory_bytes(), 1);
  c.mem_available_bytes = std::clamp<int64_t>(host_available_bytes(), 0, c.mem_bytes);
  const uint64_t bytes = o.quick ? (uint64_t{256} << 20) : default_probe_bytes();
  json points = json::array();
  for (int t : thread_list(o)) {
    ThreadPool pool(t);
    const BandwidthResult bw = measure_read_bandwidth(pool, bytes, o.quick ? 1 : 3);
    c.read_gb_s.push_back({t, std::max(bw.gb_per_s, 1e-3)});
    points.push_back({{"threads", t}, {"best_gb_s", bw.gb_per_s}, {"mean_gb_s", bw.mean_gb_per_s},
                      {"bytes", bw.bytes}});
  }
  if (raw) (*raw)["cpu_read"] = points;
  return c;
}

std::vector<profile::ThreadRate> measure_cpu_moe(const HardwareOptions& o, json* raw,
                                                 double* call_us, profile::CpuCosts* assist) {
  // Experts of qwen3-30b-a3b's shape from the synthetic generator (only the expert tensors of a
  // few layers, so it fits anywhere), cycling layers so the caches do not hold them.
  SynthOptions so;
  so.preset = "qwen3-30b-a3b";
  so.quant = QuantType::Q4_0;
  so.seed = 7;
  SyntheticGenerator gen(so);
  ModelWeights w;
  w.cfg = gen.config();
  // 6 layers (2 GB of experts): a working set far above the last-level cache, as a model's.
  const int64_t n_layers = o.quick ? 1 : 6;
  w.cfg.n_layers = n_layers;
  w.layers.resize(static_cast<size_t>(n_layers));
  w.quant = so.quant;
  w.source = "synth:qwen3-30b-a3b:q4_0 experts";
  const auto& specs = gen.tensors();
  for (int64_t l = 0; l < n_layers; ++l) {
    for (const char* base : {"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}) {
      const std::string name = tensor_name_layer(l, base);
      size_t idx = specs.size();
      for (size_t i = 0; i < specs.size(); ++i) {
        if (specs[i].name == name) idx = i;
      }
      if (idx == specs.size()) throw Error("profile --hardware", name + " not in the preset", "");
      const TensorSpec& sp = specs[idx];
      TensorView v;
      v.name = name;
      v.type = gen.type(idx);
      v.ne = sp.ne;
      const int64_t bytes = gen.tensor_bytes(idx);
      auto buf = std::shared_ptr<uint8_t>(new uint8_t[static_cast<size_t>(bytes)],
                                          std::default_delete<uint8_t[]>());
      {
        // The generator is thread-safe per row range: fill in parallel (hundreds of MB).
        const int64_t rows = v.n_rows(), stride = v.row_stride();
        const int nt = std::max(1, std::min(physical_core_count(), 32));
        std::vector<std::thread> th;
        for (int i = 0; i < nt; ++i) {
          const int64_t r0 = rows * i / nt, r1 = rows * (i + 1) / nt;
          th.emplace_back([&, r0, r1] { gen.fill_rows(idx, r0, r1, buf.get() + r0 * stride); });
        }
        for (auto& t : th) t.join();
      }
      v.data = buf.get();
      w.storage.push_back(buf);
      LayerWeights& L = w.layers[static_cast<size_t>(l)];
      (std::string(base) == "ffn_gate_exps" ? L.gate_exps
       : std::string(base) == "ffn_up_exps" ? L.up_exps
                                            : L.down_exps) = v;
    }
  }
  const int64_t hidden = w.cfg.hidden, k = w.cfg.n_experts_used, n_exp = w.cfg.n_experts;
  const int64_t expert_bytes = w.layers[0].gate_exps.nbytes() / n_exp +
                               w.layers[0].up_exps.nbytes() / n_exp +
                               w.layers[0].down_exps.nbytes() / n_exp;
  std::vector<float> h(static_cast<size_t>(hidden)), y(static_cast<size_t>(hidden));
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (float& x : h) x = nd(rng);
  std::vector<int32_t> ids(static_cast<size_t>(k));
  std::vector<float> wts(static_cast<size_t>(k), 1.0f / static_cast<float>(k));
  std::vector<profile::ThreadRate> curve;
  json points = json::array();
  const int iters = o.quick ? 8 : 64;
  // Seconds of `iters` compute() calls, each over a fresh random top-n as decode tokens route
  // (sorted, as the router hands them over), cycling the layers.
  auto timed_calls = [&](CpuMoe& moe, int n) {
    double secs = 0;
    std::vector<int32_t> all(static_cast<size_t>(n_exp));
    for (int it = 0; it < iters; ++it) {
      for (int64_t e = 0; e < n_exp; ++e) all[static_cast<size_t>(e)] = static_cast<int32_t>(e);
      std::shuffle(all.begin(), all.end(), rng);
      std::copy(all.begin(), all.begin() + n, ids.begin());
      std::sort(ids.begin(), ids.begin() + n);
      const double t0 = now_s();
      moe.compute(it % n_layers, h.data(), ids.data(), wts.data(), n, y.data());
      secs += now_s() - t0;
    }
    return secs;
  };
  auto gb_s = [&](CpuMoe& moe) {
    return static_cast<double>(iters * k * expert_bytes) / timed_calls(moe, static_cast<int>(k)) /
           1e9;
  };
  for (int t : thread_list(o)) {
    ThreadPool pool(t);
    CpuMoe moe(w, pool);
    double best = 0;
    for (int rep = 0; rep < (o.quick ? 1 : 3); ++rep) best = std::max(best, gb_s(moe));
    curve.push_back({t, std::max(best, 1e-3)});
    points.push_back({{"threads", t}, {"gb_s", best}});
    if (t == thread_list(o).back()) {
      // The call's fixed cost at the full thread count: mean call time with 1 and with k
      // experts, t(n) = call + n * per_expert, so call = (k * t(1) - t(k)) / (k - 1).
      auto mean_us = [&](int n) { return timed_calls(moe, n) * 1e6 / iters; };
      double t1 = 1e30, tk = 1e30;
      for (int rep = 0; rep < (o.quick ? 1 : 3); ++rep) {
        t1 = std::min(t1, mean_us(1));
        tk = std::min(tk, mean_us(static_cast<int>(k)));
      }
      const double call = std::max(0.0, (double(k) * t1 - tk) / double(k - 1));
      if (call_us != nullptr) *call_us = call;
      if (raw) (*raw)["cpu_moe_call"] = {{"threads", t}, {"one_expert_us", t1},
                                         {"top_k_us", tk}, {"call_us", call}};
    }
  }
  std::unique_ptr<PcieLoad> load = assist ? make_pcie_load(0) : nullptr;
  if (load) {
    // The hybrid engine's pool (one core left to the host thread), alone and beside the load,
    // alternating so that drift hits both alike; the GPU's rate alone for the record.
    const int t = std::min(hybrid_cpu_threads_default(), std::max(1, thread_list(o).back()));
    ThreadPool pool(t);
    CpuMoe moe(w, pool);
    auto rate = [&]() { return gb_s(moe); };
    load->start();
    std::this_thread::sleep_for(std::chrono::milliseconds(o.quick ? 20 : 200));
    const double gpu_alone = load->stop();
    double cpu_alone = 0, cpu_loaded = 0, gpu_loaded = 0;
    for (int rep = 0; rep < (o.quick ? 1 : 3); ++rep) {
      cpu_alone = std::max(cpu_alone, rate());
      load->start();
      cpu_loaded = std::max(cpu_loaded, rate());
      gpu_loaded = std::max(gpu_loaded, load->stop());
    }
    if (cpu_alone > 0 && cpu_loaded > 0 && gpu_loaded > 0) {
      assist->pcie_assist_gb_s = gpu_loaded;
      assist->moe_pcie_ratio = std::min(2.0, cpu_loaded / cpu_alone);
    }
    if (raw) {
      (*raw)["pcie_assist"] = {{"device", "cuda:0"},        {"threads", t},
                               {"gpu_alone_gb_s", gpu_alone}, {"gpu_loaded_gb_s", gpu_loaded},
                               {"cpu_alone_gb_s", cpu_alone}, {"cpu_loaded_gb_s", cpu_loaded}};
    }
  }
  if (raw) {
    (*raw)["cpu_moe"] = {{"shape", "qwen3-30b-a3b experts, q4_0, top-8 of 128"},
                         {"expert_bytes", expert_bytes},
                         {"points", points}};
  }
  return curve;
}

#if KTUNE_WITH_CUDA

namespace {

struct Timer {
  cuda::Event a, b;
  void start(cudaStream_t s) { a.record(s); }
  double stop_ms(cudaStream_t s) {
    b.record(s);
    b.synchronize();
    return static_cast<double>(b.elapsed_ms_since(a));
  }
};

void noop_host_fn(void*) {}

// The CPU side of the flag round trip: answers every round until told to stop.
void flag_responder(volatile uint32_t* to_host, volatile uint32_t* from_host, int iters,
                    std::atomic<bool>* stop) {
  uint32_t seen = 0;
  while (!stop->load(std::memory_order_relaxed) && seen < static_cast<uint32_t>(iters)) {
    const uint32_t v = *to_host;
    if (v != seen) {
      seen = v;
      std::atomic_thread_fence(std::memory_order_seq_cst);
      *from_host = v;
    }
  }
}


// A captured graph, destroyed with its executable.
struct CapturedGraph {
  cudaGraph_t g = nullptr;
  cudaGraphExec_t ge = nullptr;
  CapturedGraph() = default;
  CapturedGraph(const CapturedGraph&) = delete;
  CapturedGraph& operator=(const CapturedGraph&) = delete;
  ~CapturedGraph() {
    if (ge != nullptr) cudaGraphExecDestroy(ge);
    if (g != nullptr) cudaGraphDestroy(g);
  }
};

// Time per call (µs) of fn(0..n-1) captured into one graph and replayed: the best of `reps`
// timed replays after a warm one. What a kernel costs inside the engine's decode graph.
template <class Fn>
double graph_us_per_call(cudaStream_t s, int n, int reps, Fn&& fn) {
  CapturedGraph cg;
  KTUNE_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < n; ++i) fn(i);
  KTUNE_CUDA_CHECK(cudaStreamEndCapture(s, &cg.g));
  KTUNE_CUDA_CHECK(cudaGraphInstantiate(&cg.ge, cg.g, 0));
  Timer tm;
  KTUNE_CUDA_CHECK(cudaGraphLaunch(cg.ge, s));
  KTUNE_CUDA_CHECK(cudaStreamSynchronize(s));
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    tm.start(s);
    KTUNE_CUDA_CHECK(cudaGraphLaunch(cg.ge, s));
    best = std::min(best, tm.stop_ms(s) * 1e3 / n);
  }
  return best;
}

// Copies of a call's weights cycled so that consecutive calls miss the 50 MB L2, as a decode
// step's layers do: at least 2, enough for 256 MB, as many as fit `pool` bytes.
int64_t copies_for(int64_t bytes, int64_t pool) {
  const int64_t want = std::max<int64_t>(2, (int64_t{256} << 20) / std::max<int64_t>(bytes, 1) + 1);
  return std::max<int64_t>(1, std::min(want, pool / std::max<int64_t>(bytes, 1)));
}

// Kernel time by weight bytes (profile_summary.h, GpuCosts::*_us): the engine's decode kernels at
// the sizes of qwen3-30b-a3b, qwen3-235b-a22b and DeepSeek-V3 (Q4_0 weights, F32 router), each
// timed in a replayed graph less its graph nodes (the search adds a node or an eager launch per
// kernel itself). Also the GPU-side gap of queued eager launches.
json measure_kernel_curves(const HardwareOptions& o, profile::GpuCosts& c, cudaStream_t s) {
  const QuantType q = QuantType::Q4_0;
  const int64_t pool_bytes = o.quick ? (int64_t{96} << 20) : (int64_t{768} << 20);
  cuda::DeviceBuffer pool(static_cast<size_t>(pool_bytes));
  // 0x11 bytes: small normal Q4_0 scales and tiny F32 values (no NaN); values do not change time.
  KTUNE_CUDA_CHECK(cudaMemsetAsync(pool.data(), 0x11, pool.size(), s));
  const int64_t max_cols = 7168, max_rows = 151936;
  cuda::DeviceBuffer x(max_cols * 4), norm(max_cols * 4), y(max_rows * 4), act(8 * 2048 * 4),
      ids_d(8 * 4), w_d(8 * 4), topk_ids(64 * 4), topk_w(64 * 4), counter(64);
  KTUNE_CUDA_CHECK(cudaMemsetAsync(x.data(), 0, x.size(), s));
  KTUNE_CUDA_CHECK(cudaMemsetAsync(norm.data(), 0, norm.size(), s));
  KTUNE_CUDA_CHECK(cudaMemsetAsync(counter.data(), 0, counter.size(), s));
  const std::vector<int32_t> ids = {0, 1, 2, 3, 4, 5, 6, 7};
  const std::vector<float> wts(8, 0.125f);
  KTUNE_CUDA_CHECK(cudaMemcpyAsync(ids_d.data(), ids.data(), 32, cudaMemcpyHostToDevice, s));
  KTUNE_CUDA_CHECK(cudaMemcpyAsync(w_d.data(), wts.data(), 32, cudaMemcpyHostToDevice, s));
  KTUNE_CUDA_CHECK(cuda::matvec_fused_prepare());
  KTUNE_CUDA_CHECK(cudaStreamSynchronize(s));
  auto* base = pool.as<uint8_t>();
  const int calls = o.quick ? 8 : 48, reps = o.quick ? 2 : 5;
  const double node = c.graph_node_us;
  auto point = [&](std::vector<profile::BytesTime>& curve, json& raw, int64_t bytes,
                   double per_call_us, int kernels, const std::string& what) {
    const double us = std::max(per_call_us - kernels * node, 0.05);
    curve.push_back({static_cast<double>(bytes), us});
    raw.push_back({{"shape", what}, {"bytes", bytes}, {"us", us}, {"graph_us", per_call_us}});
  };
  json raw = json::object();
  // Dense matvec with the RMSNorm prologue (q/k/v, router, head as the engine launches them).
  {
    json r = json::array();
    const std::pair<int64_t, int64_t> shapes[] = {
        {2048, 2048}, {5120, 2048}, {9216, 4096}, {32768, 4096}, {151936, 2048}};
    for (const auto& [rows, cols] : shapes) {
      const int64_t bytes = rows * row_bytes(q, cols);
      if (bytes > pool_bytes) continue;
      const int64_t copies = copies_for(bytes, pool_bytes);
      const double t = graph_us_per_call(s, calls, reps, [&](int i) {
        cuda::MatvecFused m;
        m.type = q;
        m.cols = cols;
        m.x = x.as<float>();
        m.norm_w = norm.as<float>();
        m.eps = 1e-6f;
        m.seg[0] = {base + (i % copies) * bytes, y.as<float>(), rows};
        KTUNE_CUDA_CHECK(cuda::launch_matvec_fused(m, s));
      });
      point(c.matvec_us, r, bytes, t, 1, fmt::format("{} x {} q4_0", rows, cols));
    }
    raw["matvec"] = r;
  }
  // Router: F32 matvec of the normed x, then the softmax top-8 tail.
  {
    json r = json::array();
    const std::pair<int64_t, int64_t> shapes[] = {{128, 2048}, {128, 4096}, {256, 7168}};
    for (const auto& [rows, cols] : shapes) {
      const int64_t bytes = rows * cols * 4;
      const int64_t copies = copies_for(bytes, pool_bytes);
      const double t = graph_us_per_call(s, calls, reps, [&](int i) {
        cuda::MatvecFused m;
        m.type = QuantType::F32;
        m.cols = cols;
        m.x = x.as<float>();
        m.norm_w = norm.as<float>();
        m.eps = 1e-6f;
        // 16-byte aligned rows: copies start at multiples of the matrix size (a multiple of 16).
        m.seg[0] = {base + (i % copies) * bytes, y.as<float>(), rows};
        m.topk_ids = topk_ids.as<int32_t>();
        m.topk_w = topk_w.as<float>();
        m.topk_k = 8;
        m.counter = counter.as<unsigned>();
        KTUNE_CUDA_CHECK(cuda::launch_matvec_fused(m, s));
      });
      point(c.router_us, r, bytes, t, 1, fmt::format("{} experts x {} f32, top-8", rows, cols));
    }
    raw["router"] = r;
  }
  // Fused MoE of one layer (gate/up/SwiGLU + down/sum) over n selected experts.
  double eager_gap = 0;
  {
    json r = json::array();
    struct Shape {
      int64_t hidden, ffn, n;
      const char* name;
    };
    const Shape shapes[] = {{2048, 768, 1, "qwen3-30b-a3b"},   {2048, 768, 2, "qwen3-30b-a3b"},
                            {2048, 768, 4, "qwen3-30b-a3b"},   {2048, 768, 8, "qwen3-30b-a3b"},
                            {4096, 1536, 8, "qwen3-235b-a22b"}, {7168, 2048, 8, "deepseek-v3"}};
    for (const Shape& sh : shapes) {
      const int64_t mat = row_bytes(q, sh.hidden) * sh.ffn;  // gate or up of one expert
      const int64_t down = row_bytes(q, sh.ffn) * sh.hidden;
      const int64_t layer = 8 * (2 * mat + down);  // 8 experts (ids 0..7) per copy
      if (layer > pool_bytes) continue;
      const int64_t copies = copies_for(layer, pool_bytes);
      auto gate = [&](int64_t i) { return base + (i % copies) * layer; };
      auto launch = [&](int i) {
        KTUNE_CUDA_CHECK(cuda::launch_moe_gate_up_swiglu(
            q, gate(i), gate(i) + 8 * mat, mat, ids_d.as<int32_t>(), sh.n, 8, x.as<float>(),
            sh.ffn, sh.hidden, act.as<float>(), s));
        KTUNE_CUDA_CHECK(cuda::launch_moe_down_sum(q, gate(i) + 16 * mat, down,
                                                   ids_d.as<int32_t>(), w_d.as<float>(), sh.n, 8,
                                                   act.as<float>(), sh.hidden, sh.ffn,
                                                   y.as<float>(), s));
      };
      const double t = graph_us_per_call(s, calls, reps, launch);
      const int64_t bytes = sh.n * (2 * mat + down);
      point(c.moe_fused_us, r, bytes, t, 2, fmt::format("{} x {} experts", sh.n, sh.name));
      if (sh.n == 8 && sh.hidden == 2048) {
        // The same pairs launched eagerly back to back (the host runs ahead: each kernel takes
        // longer than a launch): what an eager launch adds over a graph node.
        // Best of `reps` passes, as the graph's time: one pass disturbed by the host (a busy
        // page cache after writing a model) once read an 8 µs gap where others read 2.3.
        for (int i = 0; i < 4; ++i) launch(i);
        double eager = 1e30;
        for (int rep = 0; rep < reps; ++rep) {
          Timer tm;
          tm.start(s);
          for (int i = 0; i < calls; ++i) launch(i);
          eager = std::min(eager, tm.stop_ms(s) * 1e3 / calls);
        }
        eager_gap = std::max((eager - t) / 2 + node, node);
        raw["eager_pair_us"] = eager;
      }
    }
    raw["moe_fused"] = r;
  }
  c.eager_gap_us = eager_gap;
  // One expert matrix of the per-slot unfused path (expert id read from device memory).
  {
    json r = json::array();
    const std::pair<int64_t, int64_t> shapes[] = {{768, 2048}, {1536, 4096}, {2048, 7168}};
    for (const auto& [rows, cols] : shapes) {
      const int64_t mat = rows * row_bytes(q, cols);
      const int64_t copies = copies_for(8 * mat, pool_bytes);
      const double t = graph_us_per_call(s, calls, reps, [&](int i) {
        KTUNE_CUDA_CHECK(cuda::launch_matvec_rowwarp_slot(
            q, base + (i / 8 % copies) * 8 * mat, mat, ids_d.as<int32_t>(), i % 8, nullptr,
            x.as<float>(), rows, cols, y.as<float>(), s));
      });
      point(c.moe_unfused_us, r, mat, t, 1, fmt::format("{} x {} q4_0 slot", rows, cols));
    }
    raw["moe_unfused"] = r;
  }
  raw["eager_gap_us"] = c.eager_gap_us;
  return raw;
}

// The engine's flag hand-off of one layer in a replayed graph (cpu_handoff.cu's signal and
// wait + add kernels, qwen3-30b-a3b's routing block), a CPU thread answering every layer at once
// with one expert's sum: the GPU-side cost a layer with CPU experts pays on every token.
json measure_handoff(const HardwareOptions& o, profile::GpuCosts& c, cudaStream_t s) {
  const int layers = o.quick ? 16 : 96;
  const int reps = o.quick ? 2 : 6;
  const int64_t hidden = 2048, k = 8;
  const size_t stage_bytes = static_cast<size_t>((hidden + 2 * k) * 4);
  void* host = nullptr;
  const size_t words_bytes = sizeof(cuda::HandoffWords) * static_cast<size_t>(layers);
  const size_t host_bytes = words_bytes + stage_bytes + static_cast<size_t>(hidden) * 4;
  KTUNE_CUDA_CHECK(cudaHostAlloc(&host, host_bytes, cudaHostAllocMapped));
  std::unique_ptr<void, decltype(&cudaFreeHost)> guard(host, &cudaFreeHost);
  std::memset(host, 0, host_bytes);
  void* dhost = nullptr;
  KTUNE_CUDA_CHECK(cudaHostGetDevicePointer(&dhost, host, 0));
  auto* words = static_cast<cuda::HandoffWords*>(host);
  auto* dwords = static_cast<cuda::HandoffWords*>(dhost);
  auto* dstage_mapped = static_cast<uint8_t*>(dhost) + words_bytes;
  auto* dy_mapped = reinterpret_cast<float*>(static_cast<uint8_t*>(dhost) + words_bytes + stage_bytes);
  cuda::DeviceBuffer stage(stage_bytes), pos(4), epoch(4), error(4), x(hidden * 4);
  for (auto* b : {&stage, &pos, &epoch, &error, &x}) {
    KTUNE_CUDA_CHECK(cudaMemsetAsync(b->data(), 0, b->size(), s));
  }
  const uint64_t timeout_ns = uint64_t{2} * 1000 * 1000 * 1000;
  CapturedGraph cg;
  KTUNE_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int l = 0; l < layers; ++l) {
    KTUNE_CUDA_CHECK(cuda::launch_handoff_signal(stage.data(), stage_bytes, dstage_mapped,
                                                 pos.as<int32_t>(), epoch.as<uint32_t>(),
                                                 dwords + l, s));
    KTUNE_CUDA_CHECK(cuda::launch_handoff_wait_add(dwords + l, dy_mapped, pos.as<int32_t>(),
                                                   epoch.as<uint32_t>(), error.as<uint32_t>(),
                                                   1000u + static_cast<uint32_t>(l), timeout_ns,
                                                   x.as<float>(), hidden, s));
  }
  KTUNE_CUDA_CHECK(cudaStreamEndCapture(s, &cg.g));
  KTUNE_CUDA_CHECK(cudaGraphInstantiate(&cg.ge, cg.g, 0));
  // The CPU side: for each replay (epoch e, position 0 so seq = e << 32), every layer in order.
  std::atomic<bool> stop{false};
  std::atomic<int> answered{0};
  std::thread cpu;
  // Stops and joins the CPU side on every exit, a CUDA error's exception included.
  struct Join {
    std::atomic<bool>& stop;
    std::thread& t;
    ~Join() {
      stop = true;
      if (t.joinable()) t.join();
    }
  } join{stop, cpu};
  cpu = std::thread([&] {
    for (int e = 1; e <= reps + 1 && !stop; ++e) {
      const uint64_t seq = static_cast<uint64_t>(e) << 32;
      for (int l = 0; l < layers && !stop; ++l) {
        while (!stop && __atomic_load_n(&words[l].request, __ATOMIC_ACQUIRE) != seq) {
        }
        words[l].n_cpu = 1;
        __atomic_store_n(&words[l].done, seq, __ATOMIC_RELEASE);
        answered.fetch_add(1);
      }
    }
  });
  Timer tm;
  double best = 1e30;
  bool ok = true;
  for (int e = 1; e <= reps + 1 && ok; ++e) {
    const uint32_t ep = static_cast<uint32_t>(e);
    KTUNE_CUDA_CHECK(cudaMemcpyAsync(epoch.data(), &ep, 4, cudaMemcpyHostToDevice, s));
    KTUNE_CUDA_CHECK(cudaStreamSynchronize(s));
    tm.start(s);
    KTUNE_CUDA_CHECK(cudaGraphLaunch(cg.ge, s));
    const double us = tm.stop_ms(s) * 1e3 / layers;
    uint32_t err = 0;
    KTUNE_CUDA_CHECK(cudaMemcpy(&err, error.data(), 4, cudaMemcpyDeviceToHost));
    ok = err == 0;
    if (e > 1) best = std::min(best, us);  // the first replay warms up
  }
  stop = true;
  cpu.join();
  json raw = {{"layers", layers}, {"stage_bytes", stage_bytes}, {"answered", answered.load()}};
  if (ok && best < 1e30) {
    c.handoff_us = best;
    raw["us_per_layer"] = best;
  } else {
    raw["note"] = "the CPU thread did not answer in 2 s: handoff_us not measured";
  }
  return raw;
}

json probe_one_gpu(int d, const HardwareOptions& o, profile::GpuInfo& info,
                   profile::GpuCosts& c) {
  KTUNE_CUDA_CHECK(cudaSetDevice(d));
  cudaDeviceProp prop{};
  KTUNE_CUDA_CHECK(cudaGetDeviceProperties(&prop, d));
  size_t free_b = 0, total_b = 0;
  KTUNE_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  info.device = fmt::format("cuda:{}", d);
  info.name = prop.name;
  info.sm = fmt::format("{}.{}", prop.major, prop.minor);
  info.mem_bytes = static_cast<int64_t>(total_b);
  info.mem_free_bytes = static_cast<int64_t>(free_b);
  c.device = info.device;
  json raw;
  cuda::Stream stream;
  cudaStream_t s = stream.get();
  Timer tm;

  // Device read bandwidth (streaming loads over a buffer far above L2).
  {
    const size_t bytes = o.quick ? (size_t{256} << 20) : (size_t{2} << 30);
    cuda::DeviceBuffer buf(bytes), sink(64);
    KTUNE_CUDA_CHECK(cudaMemsetAsync(buf.data(), 1, bytes, s));
    double best = 0;
    for (int r = 0; r < 6; ++r) {
      tm.start(s);
      KTUNE_CUDA_CHECK(gpu::launch_read_probe(buf.data(), bytes, sink.as<uint32_t>(), s));
      const double ms = tm.stop_ms(s);
      if (r > 0) best = std::max(best, static_cast<double>(bytes) / (ms * 1e-3) / 1e9);
    }
    info.read_gb_s = std::max(best, 1e-3);
  }
  // Pinned host <-> device copies.
  {
    const size_t bytes = size_t{256} << 20;
    void* host = nullptr;
    KTUNE_CUDA_CHECK(cudaMallocHost(&host, bytes));
    std::unique_ptr<void, decltype(&cudaFreeHost)> guard(host, &cudaFreeHost);
    std::memset(host, 1, bytes);
    cuda::DeviceBuffer dev(bytes);
    double h2d = 0, d2h = 0;
    for (int r = 0; r < 4; ++r) {
      tm.start(s);
      KTUNE_CUDA_CHECK(cudaMemcpyAsync(dev.data(), host, bytes, cudaMemcpyHostToDevice, s));
      const double a = tm.stop_ms(s);
      tm.start(s);
      KTUNE_CUDA_CHECK(cudaMemcpyAsync(host, dev.data(), bytes, cudaMemcpyDeviceToHost, s));
      const double b = tm.stop_ms(s);
      if (r > 0) {
        h2d = std::max(h2d, static_cast<double>(bytes) / (a * 1e-3) / 1e9);
        d2h = std::max(d2h, static_cast<double>(bytes) / (b * 1e-3) / 1e9);
      }
    }
    info.h2d_gb_s = std::max(h2d, 1e-3);
    info.d2h_gb_s = std::max(d2h, 1e-3);
  }
  // Eager launches, back to back (host-bound: the GPU runs an empty kernel faster).
  const int n_launch = o.quick ? 500 : 5000;
  {
    for (int i = 0; i < 100; ++i) KTUNE_CUDA_CHECK(gpu::launch_empty(s));
    stream.synchronize();
    const double t0 = now_s();
    for (int i = 0; i < n_launch; ++i) KTUNE_CUDA_CHECK(gpu::launch_empty(s));
    stream.synchronize();
    c.launch_eager_us = std::max((now_s() - t0) * 1e6 / n_launch, 1e-3);
  }
  // Launch + synchronize round trip.
  {
    const int n = o.quick ? 100 : 1000;
    const double t0 = now_s();
    for (int i = 0; i < n; ++i) {
      KTUNE_CUDA_CHECK(gpu::launch_empty(s));
      stream.synchronize();
    }
    c.sync_us = (now_s() - t0) * 1e6 / n;
  }
  // Graph nodes: one captured graph of n empty kernels, replayed.
  {
    const int n = o.quick ? 200 : 1000;
    cudaGraph_t g = nullptr;
    cudaGraphExec_t ge = nullptr;
    KTUNE_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < n; ++i) gpu::launch_empty(s);
    KTUNE_CUDA_CHECK(cudaStreamEndCapture(s, &g));
    KTUNE_CUDA_CHECK(cudaGraphInstantiate(&ge, g, 0));
    double best = 1e30;
    for (int r = 0; r < 6; ++r) {
      tm.start(s);
      KTUNE_CUDA_CHECK(cudaGraphLaunch(ge, s));
      const double ms = tm.stop_ms(s);
      if (r > 0) best = std::min(best, ms * 1e3 / n);
    }
    cudaGraphExecDestroy(ge);
    cudaGraphDestroy(g);
    c.graph_node_us = std::max(best, 1e-3);
  }
  // Host nodes (cudaLaunchHostFunc) inside a graph, between kernels: per hand-off.
  {
    const int n = o.quick ? 50 : 200;
    cudaGraph_t g = nullptr;
    cudaGraphExec_t ge = nullptr;
    KTUNE_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < n; ++i) {
      gpu::launch_empty(s);
      cudaLaunchHostFunc(s, noop_host_fn, nullptr);
    }
    KTUNE_CUDA_CHECK(cudaStreamEndCapture(s, &g));
    KTUNE_CUDA_CHECK(cudaGraphInstantiate(&ge, g, 0));
    double best = 1e30;
    for (int r = 0; r < 4; ++r) {
      tm.start(s);
      KTUNE_CUDA_CHECK(cudaGraphLaunch(ge, s));
      const double ms = tm.stop_ms(s);
      if (r > 0) best = std::min(best, ms * 1e3 / n);
    }
    cudaGraphExecDestroy(ge);
    cudaGraphDestroy(g);
    c.host_node_us = std::max(best - c.graph_node_us, 0.0);
    raw["host_node_plus_kernel_us"] = best;
  }
  // Mapped-memory flag round trip with a spinning CPU thread (design §3's hand-off).
  {
    const int iters = o.quick ? 200 : 2000;
    uint32_t* flags = nullptr;
    KTUNE_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&flags), 256, cudaHostAllocMapped));
    std::unique_ptr<void, decltype(&cudaFreeHost)> guard(flags, &cudaFreeHost);
    std::memset(flags, 0, 256);
    uint32_t* dflags = nullptr;
    KTUNE_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&dflags), flags, 0));
    int* status = nullptr;
    KTUNE_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&status), 64, cudaHostAllocMapped));
    std::unique_ptr<void, decltype(&cudaFreeHost)> guard2(status, &cudaFreeHost);
    *status = 0;
    int* dstatus = nullptr;
    KTUNE_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&dstatus), status, 0));
    std::atomic<bool> stop{false};
    std::thread responder(flag_responder, flags, flags + 16, iters, &stop);
    const double t0 = now_s();
    const cudaError_t e = gpu::launch_flag_pingpong(dflags, dflags + 16, iters,
                                                    uint64_t{2} * 1000 * 1000 * 1000, dstatus, s);
    const cudaError_t e2 = e == cudaSuccess ? cudaStreamSynchronize(s) : e;
    const double secs = now_s() - t0;
    stop = true;
    responder.join();
    KTUNE_CUDA_CHECK(e2);
    if (*status == iters) {
      c.flag_handoff_us = secs * 1e6 / iters;
    } else {
      raw["flag_handoff_note"] = fmt::format("the CPU thread did not answer round {} in 2 s",
                                             -*status);
    }
  }
  // ktune's kernels: matvec, fused and unfused MoE, attention, on qwen3-30b-a3b shapes (Q4_0).
  {
    const int64_t hidden = 2048, ffn = 768, n_exp = 128, k = 8;
    const int64_t layers = o.quick ? 2 : 6;
    const QuantType q = QuantType::Q4_0;
    const int64_t mat_bytes = row_bytes(q, hidden) * ffn;       // gate or up of one expert
    const int64_t down_bytes = row_bytes(q, ffn) * hidden;      // down of one expert
    const int64_t layer_bytes = n_exp * (2 * mat_bytes + down_bytes);
    cuda::DeviceBuffer experts(static_cast<size_t>(layers * layer_bytes));
    // 0x11 bytes: Q4_0 scales are small normal halves; the values do not matter for timing.
    KTUNE_CUDA_CHECK(cudaMemsetAsync(experts.data(), 0x11, experts.size(), s));
    cuda::DeviceBuffer x(hidden * 4), act(k * ffn * 4), y(hidden * 4 * 4), ids_d(k * 4),
        w_d(k * 4), tmp(ffn * 4 * 2), ybig(n_exp * ffn * 4);
    KTUNE_CUDA_CHECK(cudaMemsetAsync(x.data(), 0, x.size(), s));
    std::vector<int32_t> ids(static_cast<size_t>(k));
    for (int64_t j = 0; j < k; ++j) ids[static_cast<size_t>(j)] = static_cast<int32_t>(j * 13 + 5);
    std::vector<float> wts(static_cast<size_t>(k), 0.125f);
    KTUNE_CUDA_CHECK(cudaMemcpyAsync(ids_d.data(), ids.data(), k * 4, cudaMemcpyHostToDevice, s));
    KTUNE_CUDA_CHECK(cudaMemcpyAsync(w_d.data(), wts.data(), k * 4, cudaMemcpyHostToDevice, s));
    auto* base = experts.as<uint8_t>();
    auto gate = [&](int64_t l) { return base + l * layer_bytes; };
    auto up = [&](int64_t l) { return gate(l) + n_exp * mat_bytes; };
    auto down = [&](int64_t l) { return gate(l) + 2 * n_exp * mat_bytes; };
    const int iters = o.quick ? 12 : 60;
    const double moe_bytes = static_cast<double>(k * (2 * mat_bytes + down_bytes));
    // Fused: two launches per layer.
    for (int64_t l = 0; l < layers; ++l) {
      KTUNE_CUDA_CHECK(cuda::launch_moe_gate_up_swiglu(q, gate(l), up(l), mat_bytes,
                                                       ids_d.as<int32_t>(), k, n_exp,
                                                       x.as<float>(), ffn, hidden,
                                                       act.as<float>(), s));
    }
    tm.start(s);
    for (int i = 0; i < iters; ++i) {
      const int64_t l = i % layers;
      KTUNE_CUDA_CHECK(cuda::launch_moe_gate_up_swiglu(q, gate(l), up(l), mat_bytes,
                                                       ids_d.as<int32_t>(), k, n_exp,
                                                       x.as<float>(), ffn, hidden,
                                                       act.as<float>(), s));
      KTUNE_CUDA_CHECK(cuda::launch_moe_down_sum(q, down(l), down_bytes, ids_d.as<int32_t>(),
                                                 w_d.as<float>(), k, n_exp, act.as<float>(),
                                                 hidden, ffn, y.as<float>(), s));
    }
    double ms = tm.stop_ms(s);
    c.moe_fused_gb_s = std::max(moe_bytes * iters / (ms * 1e-3) / 1e9, 1e-3);
    // Unfused: one matvec launch per expert matrix.
    tm.start(s);
    for (int i = 0; i < iters; ++i) {
      const int64_t l = i % layers;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t e = ids[static_cast<size_t>(j)];
        KTUNE_CUDA_CHECK(cuda::launch_matvec_rowwarp(q, gate(l) + e * mat_bytes, x.as<float>(),
                                                     ffn, hidden, tmp.as<float>(), s));
        KTUNE_CUDA_CHECK(cuda::launch_matvec_rowwarp(q, up(l) + e * mat_bytes, x.as<float>(),
                                                     ffn, hidden, tmp.as<float>() + ffn, s));
        KTUNE_CUDA_CHECK(cuda::launch_matvec_rowwarp(q, down(l) + e * down_bytes,
                                                     tmp.as<float>(), hidden, ffn,
                                                     y.as<float>(), s));
      }
    }
    ms = tm.stop_ms(s);
    c.moe_unfused_gb_s = std::max(moe_bytes * iters / (ms * 1e-3) / 1e9, 1e-3);
    // Matvec over whole layers' gate matrices (rows = n_exp * ffn, like a big projection).
    const int64_t rows = n_exp * ffn;
    tm.start(s);
    for (int i = 0; i < iters; ++i) {
      KTUNE_CUDA_CHECK(cuda::launch_matvec(q, gate(i % layers), x.as<float>(), rows, hidden,
                                           ybig.as<float>(), s));
    }
    ms = tm.stop_ms(s);
    c.matvec_gb_s =
        std::max(static_cast<double>(rows * row_bytes(q, hidden)) * iters / (ms * 1e-3) / 1e9,
                 1e-3);
    raw["kernels"] = {{"shape", "qwen3-30b-a3b, q4_0, top-8 of 128"},
                      {"moe_bytes_per_layer_token", moe_bytes},
                      {"layers_cycled", layers}};
  }
  // Attention at context ~0 and ~4k (qwen3-30b-a3b heads): the engine's kernel (q/k norms and
  // RoPE folded in), in a replayed graph less its node.
  {
    const int64_t nh = 32, nkv = 4, hd = 128, ctx = 4096;
    cuda::DeviceBuffer q(nh * hd * 4), kn(nkv * hd * 4), vn(nkv * hd * 4), out(nh * hd * 4),
        kc(nkv * ctx * hd * 2), vc(nkv * ctx * hd * 2), pos(4), qw(hd * 4), kw(hd * 4),
        inv(hd / 2 * 4), ws(cuda::attention_decode_workspace_bytes(nh, hd, ctx));
    for (auto* b : {&q, &kn, &vn, &kc, &vc, &qw, &kw, &inv}) {
      KTUNE_CUDA_CHECK(cudaMemsetAsync(b->data(), 0, b->size(), s));
    }
    auto time_at = [&](int32_t p) {
      KTUNE_CUDA_CHECK(cudaMemcpyAsync(pos.data(), &p, 4, cudaMemcpyHostToDevice, s));
      stream.synchronize();
      const double t = graph_us_per_call(s, o.quick ? 20 : 200, o.quick ? 2 : 5, [&](int) {
        KTUNE_CUDA_CHECK(cuda::launch_attention_decode_qknorm_rope(
            q.as<float>(), kn.as<float>(), vn.as<float>(), qw.as<float>(), kw.as<float>(), 1e-6f,
            inv.as<float>(), kc.as<uint16_t>(), vc.as<uint16_t>(), pos.as<int32_t>(), nh, nkv, hd,
            ctx, ws.data(), out.as<float>(), s));
      });
      return std::max(t - c.graph_node_us, 0.05);
    };
    const double t0 = time_at(0);
    const double t4k = time_at(static_cast<int32_t>(ctx - 1));
    c.attention_us = t0;
    c.attention_us_per_1k_ctx = std::max(0.0, (t4k - t0) / (static_cast<double>(ctx - 1) / 1000));
  }
  // Kernel times by size, the eager gap, the hand-off with the engine's kernels.
  raw["kernel_us_by_bytes"] = measure_kernel_curves(o, c, s);
  raw["handoff"] = measure_handoff(o, c, s);
  raw["device"] = info.device;
  return raw;
}

}  // namespace

void measure_gpus(const HardwareOptions& o, profile::ProfileSummary& s, json* raw) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();
    return;
  }
  const Topology topo = read_topology(0, {});
  json all = json::array();
  for (int d = 0; d < n; ++d) {
    profile::GpuInfo info;
    profile::GpuCosts costs;
    all.push_back(probe_one_gpu(d, o, info, costs));
    for (const GpuLink& l : topo.gpus) {
      if (l.device == info.device) {
        info.pcie_gen = l.cur_gen;
        info.pcie_width = l.cur_width;
      }
    }
    s.gpus.push_back(info);
    s.gpu_costs.push_back(costs);
  }
  cudaSetDevice(0);
  if (raw) (*raw)["gpus"] = all;
}

namespace {

class CudaPcieLoad : public PcieLoad {
 public:
  // The sink is allocated on `device` (made current first).
  explicit CudaPcieLoad(int device) : device_(device), sink_(on_device(device, 64)) {
    void* host = nullptr;
    KTUNE_CUDA_CHECK(cudaMallocHost(&host, kBytes));
    host_.reset(host);
    std::memset(host, 1, kBytes);
  }
  ~CudaPcieLoad() override {
    if (thread_.joinable()) stop();
  }
  void start() override {
    stop_ = false;
    bytes_ = 0;
    thread_ = std::thread([this] {
      cudaSetDevice(device_);
      cuda::Stream stream;
      const double t0 = now_s();
      while (!stop_.load(std::memory_order_relaxed)) {
        if (gpu::launch_read_probe(host_.get(), kBytes, sink_.as<uint32_t>(), stream.get()) !=
            cudaSuccess) {
          break;
        }
        stream.synchronize();
        bytes_ += static_cast<double>(kBytes);
      }
      secs_ = now_s() - t0;
    });
  }
  double stop() override {
    stop_ = true;
    thread_.join();
    return secs_ > 0 ? bytes_ / secs_ / 1e9 : 0.0;
  }

 private:
  struct FreeHost {
    void operator()(void* p) const { cudaFreeHost(p); }
  };
  static size_t on_device(int device, size_t bytes) {
    KTUNE_CUDA_CHECK(cudaSetDevice(device));
    return bytes;
  }
  static constexpr size_t kBytes = size_t{64} << 20;  // one pass ~1.3 ms at PCIe 5 speed
  int device_;
  cuda::DeviceBuffer sink_;
  std::unique_ptr<void, FreeHost> host_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
  double bytes_ = 0, secs_ = 0;
};

std::unique_ptr<PcieLoad> make_pcie_load(int device) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n <= device) {
    cudaGetLastError();
    return nullptr;
  }
  return std::make_unique<CudaPcieLoad>(device);
}

}  // namespace

#else

void measure_gpus(const HardwareOptions&, profile::ProfileSummary&, json*) {}

namespace {
std::unique_ptr<PcieLoad> make_pcie_load(int) { return nullptr; }
}  // namespace

#endif

}  // namespace ktune::profiler
