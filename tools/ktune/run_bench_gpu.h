// The GpuEngine side of `ktune run`, in its own translation unit so run_bench.cpp does not need
// gpu_engine.h (kept apart from placement.h's declarations). Plain types only.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "bench_stats.h"
#include "ktune/engine/model.h"

namespace ktune::cli {

struct GpuBenchSettings {
  int64_t max_context = 4096;
  bool cuda_graph = true;
  bool fused = true;
  // Hybrid: expert_on_gpu[layer][expert] (empty = all on cuda:0) and the CPU experts' threads.
  std::vector<std::vector<bool>> expert_on_gpu;
  int cpu_threads = 0;
  bool handoff_host_node = false;  // CPU experts handed over by host nodes (else mapped flags)
  int pcie_assist_permille = 0;    // runtime.pcie_assist
  // Several GPUs: each layer's CUDA device (empty = all on cuda:0) and the transport between
  // them ("auto", "nccl" or "peer").
  std::vector<int> layer_device;
  std::string gpu_transport = "auto";
  int64_t prompt = 0;  // prefill tokens per repetition (0 skips)
  int64_t gen = 0;     // decode tokens per repetition (0 skips)
  // Decode rows, one per entry: 1 = one sequence (generate_greedy), B > 1 = B sequences decoded
  // together (generate_greedy_batch, sequence b from batch_starts[b]); the engine is made for
  // the largest B. Empty = {1}.
  std::vector<int64_t> batches;
  std::vector<int32_t> batch_starts;
  int reps = 1;
  bool progress = false;
  std::string label;  // for progress lines
  bool count_experts = false;  // router statistics of the run (GpuBenchResult::expert_counts)
};

struct GpuBenchResult {
  Stat prefill;  // tok/s
  Stat decode;   // tok/s (the first batch row's)
  struct BatchRow {
    int64_t batch = 1;
    Stat decode;          // tok/s, all sequences of the batch together
    Stat decode_per_seq;  // tok/s of one sequence
  };
  std::vector<BatchRow> batch_rows;  // one per GpuBenchSettings::batches entry
  std::string describe;
  int64_t device_bytes = 0;
  // cuda:0's memory bandwidth measured before the engine was built: device-to-device copies of
  // 256 MiB, bytes read + written per second (0 when it could not be measured).
  double device_gb_s = 0.0;
  // count_experts: each expert's selections per layer over the run's decode steps.
  std::vector<std::vector<uint64_t>> expert_counts;
};

// Builds a GpuEngine (weights copied to cuda:0), runs rep 0 as warm-up and `reps` timed
// repetitions: pp = prefill(prompt) from position 0, tg = generate_greedy from an empty context
// (per batch row B > 1: generate_greedy_batch of B sequences from empty contexts).
// Throws ktune::Error (no GPU, CPU-only build, unsupported tensors).
GpuBenchResult bench_gpu_engine(const ModelWeights& model, const GpuBenchSettings& s,
                                const std::vector<int32_t>& prompt_tokens);

}  // namespace ktune::cli
