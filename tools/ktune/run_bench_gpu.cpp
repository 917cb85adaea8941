#include "run_bench_gpu.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>

#include "cli.h"
#include "ktune/engine/error.h"
#include "ktune/engine/gpu_engine.h"
#if KTUNE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace ktune::cli {

namespace {

// cuda:0's bandwidth for the memory-bound decode limit: 10 device-to-device copies of 256 MiB
// after one warm-up, (read + written bytes) / time, in GB/s; 0 when it cannot be measured (no
// CUDA build, no device, not enough free memory). Run before the engine takes its memory.
double measure_device_gb_s() {
#if KTUNE_WITH_CUDA
  const size_t bytes = size_t{256} << 20;
  void* a = nullptr;
  void* b = nullptr;
  double gb_s = 0.0;
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  if (cudaSetDevice(0) == cudaSuccess && cudaMalloc(&a, bytes) == cudaSuccess &&
      cudaMalloc(&b, bytes) == cudaSuccess && cudaEventCreate(&e0) == cudaSuccess &&
      cudaEventCreate(&e1) == cudaSuccess && cudaMemset(a, 1, bytes) == cudaSuccess &&
      cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice) == cudaSuccess) {
    const int reps = 10;
    bool ok = cudaEventRecord(e0) == cudaSuccess;
    for (int i = 0; i < reps && ok; ++i) {
      ok = cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice) == cudaSuccess;
    }
    float ms = 0.0f;
    if (ok && cudaEventRecord(e1) == cudaSuccess && cudaEventSynchronize(e1) == cudaSuccess &&
        cudaEventElapsedTime(&ms, e0, e1) == cudaSuccess && ms > 0.0f) {
      gb_s = 2.0 * static_cast<double>(bytes) * reps / (ms * 1e-3) / 1e9;
    }
  }
  if (e0) cudaEventDestroy(e0);
  if (e1) cudaEventDestroy(e1);
  if (a) cudaFree(a);
  if (b) cudaFree(b);
  cudaGetLastError();  // a failure here only means "no limit"
  return gb_s;
#else
  return 0.0;
#endif
}

}  // namespace

GpuBenchResult bench_gpu_engine(const ModelWeights& model, const GpuBenchSettings& s,
                                const std::vector<int32_t>& prompt_tokens) {
  const double device_gb_s = measure_device_gb_s();
  GpuEngineOptions o;
  o.max_context = s.max_context;
  o.cuda_graph = s.cuda_graph;
  o.moe_kernel = s.fused ? MoeKernel::Fused : MoeKernel::Unfused;
  o.expert_on_gpu = s.expert_on_gpu;
  o.cpu_threads = s.cpu_threads;
  o.cpu_handoff = s.handoff_host_node ? CpuHandoff::HostNode : CpuHandoff::Flags;
  o.pcie_assist_permille = s.pcie_assist_permille;
  o.layer_device = s.layer_device;
  o.gpu_transport = parse_gpu_transport(s.gpu_transport, "--gpu-transport");
  const std::vector<int64_t> batches = s.batches.empty() ? std::vector<int64_t>{1} : s.batches;
  o.max_sequences = *std::max_element(batches.begin(), batches.end());
  if (o.max_sequences > 1 && static_cast<int64_t>(s.batch_starts.size()) < o.max_sequences) {
    throw Error("gpu benchmark",
                "batch of " + std::to_string(o.max_sequences) + " sequences with " +
                    std::to_string(s.batch_starts.size()) + " first tokens",
                "give one first token per sequence");
  }
  o.count_experts = s.count_experts;
  GpuEngine engine(model, o);
  std::vector<float> logits;
  std::vector<double> pp;
  std::vector<std::vector<double>> tg(batches.size());  // aggregate tok/s per batch row
  const bool tty = s.progress && isatty(STDERR_FILENO);
  for (int rep = 0; rep <= s.reps; ++rep) {  // rep 0 warms up (and captures the graph)
    if (s.prompt > 0) {
      engine.reset();
      const double t0 = now_seconds();
      engine.prefill(prompt_tokens.data(), s.prompt, &logits);
      const double dt = now_seconds() - t0;
      if (rep > 0) pp.push_back(static_cast<double>(s.prompt) / dt);
    }
    for (size_t i = 0; i < batches.size() && s.gen > 0; ++i) {
      const int64_t B = batches[i];
      engine.reset();
      const double t0 = now_seconds();
      // Both read the tokens back: synchronised.
      if (B == 1) {
        engine.set_sequence(0);
        engine.generate_greedy(prompt_tokens[0], s.gen);
      } else {
        engine.generate_greedy_batch(s.batch_starts.data(), B, s.gen);
      }
      const double dt = now_seconds() - t0;
      if (rep > 0) tg[i].push_back(static_cast<double>(s.gen * B) / dt);
    }
    if (tty && rep > 0) {
      std::fprintf(stderr, "\rktune: %s: repetition %d/%d", s.label.c_str(), rep, s.reps);
    }
  }
  if (tty) std::fprintf(stderr, "\r%60s\r", "");
  GpuBenchResult r;
  r.prefill = Stat::of(pp);
  for (size_t i = 0; i < batches.size(); ++i) {
    GpuBenchResult::BatchRow row;
    row.batch = batches[i];
    row.decode = Stat::of(tg[i]);
    std::vector<double> per = tg[i];
    for (double& x : per) x /= static_cast<double>(batches[i]);
    row.decode_per_seq = Stat::of(per);
    r.batch_rows.push_back(row);
  }
  r.decode = r.batch_rows.front().decode;
  r.describe = engine.describe();
  r.device_bytes = engine.device_bytes();
  r.device_gb_s = device_gb_s;
  r.expert_counts = engine.expert_counts();
  return r;
}

}  // namespace ktune::cli
