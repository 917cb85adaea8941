// The multi-GPU layer split as a plan, computed without CUDA (so CI tests it): which layers each
// GPU runs, where the hidden state moves between GPUs, and which placements the GPU engine
// refuses. The GPU engine (engine/cuda/gpu_pipeline.cpp) runs one pipeline stage per GPU:
//
//   stage 0 (cuda:a): token embedding, its layers    --hidden state-->
//   stage 1 (cuda:b): its layers                      --hidden state--> ...
//   last stage      : its layers, output norm + head + greedy sampling --token--> stage 0
//
// A stage is a maximal run of consecutive layers whose attention runs on one GPU. Rules (each
// broken rule is a ktune::Error naming the layers and the fix):
//   - every layer's attention on a GPU (the CPU engine runs all-CPU placements);
//   - a layer's experts on the GPU that runs its attention or on the CPU (an expert on another
//     GPU would need a round trip of the routing block per layer);
//   - each GPU one contiguous range of layers (one communicator per GPU; a GPU twice in the
//     chain would serialise its two stages anyway).
// The CPU experts of every stage share one CPU pool and one hand-off driver: layers run in
// order, so one stage works at a time.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ktune/engine/model.h"
#include "ktune/engine/placement.h"

namespace ktune {

// GpuTransport (how the hidden state moves between GPUs) is declared in placement.h, beside
// the other runtime switches; gpu_transport_name / parse_gpu_transport are defined in
// runtime/gpu_stages.cpp.

struct GpuStage {
  int device = 0;           // CUDA device index (cuda:N)
  int64_t first_layer = 0;  // layers [first_layer, end_layer)
  int64_t end_layer = 0;
  bool embedding = false;   // the token embedding lives here (stage 0)
  bool head = false;        // output norm + head + sampling live here (the last stage)
  int64_t n_layers() const { return end_layer - first_layer; }
};

struct GpuStagePlan {
  std::vector<GpuStage> stages;
  std::vector<int> stage_of_layer;  // per model layer
  // Per decode step: the hidden state after layer transfer_after[i] goes from stage i to stage
  // i + 1 (hidden floats; a prefill chunk moves chunk x hidden floats the same way), and with
  // more than one stage the sampled token goes from the last stage back to stage 0.
  std::vector<int64_t> transfer_after;
  std::vector<int> devices() const;  // stage order
  bool multi_gpu() const { return stages.size() > 1; }
  // "cuda:0 layers 0-23 -> cuda:1 layers 24-47"
  std::string describe() const;
};

// From one CUDA device per layer (the layer's attention device). Throws ktune::Error naming
// `where` for an empty list, a negative device, or a GPU that appears in two separate runs.
GpuStagePlan plan_gpu_stages(const std::vector<int>& layer_device, const std::string& where);
// From a resolved placement: checks the rules above (attention on a GPU, experts on that GPU or
// a CPU device), then plans. Throws ktune::Error naming `where` and the layers.
GpuStagePlan plan_gpu_stages(const Placement& p, const std::string& where);

// The GPU engine's per-layer inputs from a resolved placement that plan_gpu_stages accepts:
// the attention device of each layer, and expert_on_gpu[layer][expert] (true: on the layer's
// GPU, false: on the CPU).
std::vector<int> layer_devices(const Placement& p);
std::vector<std::vector<bool>> experts_on_gpu_map(const Placement& p);

// `ktune run --gpus N [--experts-on-gpu K]`: layers split evenly over cuda:0..N-1 (the first
// n_layers % N GPUs take one more), attention of each layer on its GPU; the experts of K layers
// on their layer's GPU, spread evenly: each GPU takes the first of its layers, K / N of them
// (the first K % N GPUs one more), so with N = 1 this is make_layer_split(cfg, K, cuda:0).
// The other experts on cpu. Throws a usage error for N < 1, N > n_layers, K out of 0..n_layers.
Placement make_gpu_split(const ModelConfig& cfg, int n_gpus, int64_t gpu_expert_layers);

}  // namespace ktune
