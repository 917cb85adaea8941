// `ktune search` as library code: from a profile, a model, budgets and a workload to ranked
// placements (graph on and off), the baselines users have today priced by the same model, and
// whole-layer roundings for engines that cannot place single experts. cmd_search.cpp parses
// flags, calls run_search() and prints/writes what it returns.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ktune/engine/memory_plan.h"
#include "ktune/engine/placement.h"
#include "search/cost_model.h"
#include "search/inputs.h"
#include "search/optimizers.h"
#include "search/split.h"

namespace ktune::search {

struct SearchOptions {
  std::string profile_path;  // for searched_on.profile and messages
  // --router-stats: the profile the router statistics came from (searched_on.profile names it
  // then, so `ktune run`'s drift check reads the counts the placement was searched on).
  std::string router_stats_path;
  // Lines for the search's notes: inputs the command line adjusted (--calibrate's scaling, the
  // chat workload fitted to the model's context).
  std::vector<std::string> notes;
  profile::ProfileSummary profile;
  ModelInfo model;
  Budgets budgets;  // "cuda:0", "cpu"; a missing cpu budget is not checked
  Workload workload;
  Assumptions assumptions;
  int top = 5;  // distinct searched candidates kept
  // Solver for the per-layer problem: "auto" (greedy + DP refinement, exhaustive when small),
  // or one of "greedy", "dp", "exhaustive" (tests and comparisons).
  std::string solver = "auto";
};

struct Candidate {
  std::string label;  // "search (dp)", "baseline: llama.cpp --fit (front to back)", ...
  bool baseline = false;
  bool whole_layers = false;  // every layer's experts on one device (exportable as is)
  EngineSettings settings;
  std::vector<int64_t> gpu_counts;        // GPU experts per layer
  std::vector<std::vector<bool>> on_gpu;  // [layer][expert]
  // Several GPUs: per layer the index (MachineCosts::gpus) of its GPU; empty: every layer's
  // attention and GPU experts on the first GPU.
  Stages stages;
  Prediction pred;
  MemoryPlan plan;
  Placement placement;  // resolved, with predicted and searched_on filled
};

struct SearchResult {
  std::vector<Candidate> ranked;  // distinct searched candidates, best (least request time) first
  std::vector<Candidate> baselines;    // at the settings of the best graph-on candidate
  std::vector<Candidate> whole_layer;  // best whole-layer placement, graph on then graph off
  // Several GPUs: the best searched split (graph on and off) against the even layer split of
  // the same settings (also among baselines): (label, request s of the split, of the even one).
  struct SplitComparison {
    std::string settings;
    int gpus = 0;
    double split_request_s = 0;
    double even_request_s = 0;
    std::vector<int64_t> layers_per_gpu, even_layers_per_gpu;
  };
  std::vector<SplitComparison> split_vs_even;
  int best_graph = -1;    // index into ranked: best with the graph on (or the CPU engine)
  int best_nograph = -1;  // best with the graph off (or the CPU engine)
  std::vector<std::string> notes;
  std::vector<int> threads_tried;
  int solves = 0;      // optimizer runs
  double seconds = 0;  // wall time of run_search
  MachineCosts machine;
  RouterModel router;
};

// Throws ktune::Error (exit 1) when no placement fits the budgets, naming what is short.
// The cost model's prediction for given placements (resolved against opt.model's shape), to
// check the model against measured runs (`ktune search --predict a.yaml,b.yaml`) or to ask what a
// hand-written placement would do. Engine settings come from each placement's runtime block
// (cpu_threads 0: the engine's default, one core fewer than physical for a hybrid placement).
// Throws ktune::Error naming the file for a placement of another shape or a GPU the profile
// does not have.
std::vector<Candidate> predict_placements(const SearchOptions& opt,
                                          const std::vector<Placement>& placements);

SearchResult run_search(const SearchOptions& opt);

// ---- pieces shared with the tests ----

// The GPU and host memory of a hybrid placement (attention on `gpu`, experts split) as the memory
// planner computes it, as a function of the GPU experts per layer: derived from two reference
// plans, so it agrees with plan_memory() byte for byte (a test checks it).
struct MemoryModel {
  std::string gpu = "cuda:0";
  int64_t n_experts = 0;
  std::vector<int64_t> expert_bytes;  // per layer
  int64_t gpu_fixed = 0;      // attention weights, embedding, head, KV cache, workspace, graph pool
  int64_t gpu_expert_ws = 0;  // expert activations, when any expert is on the GPU
  int64_t cpu_expert_ws = 0;  // expert activations, when any expert is on the CPU
  // Prefill staging buffers of the largest CPU expert set: 2 (double-buffered), 0 where the
  // planner counts none (deepseek2 prefills token by token on the GPU).
  int64_t staging_buffers = 2;
  int64_t gpu_need(const std::vector<int64_t>& gpu_counts) const;
  int64_t cpu_need(const std::vector<int64_t>& gpu_counts) const;  // 0: nothing on the CPU
};
MemoryModel memory_model(const ModelInfo& model, bool cuda_graph, int64_t context,
                         const std::string& gpu = "cuda:0", int64_t batch = 1);

// The memory of a pipeline placement over several GPUs (contiguous layer ranges; a layer's GPU
// experts on its attention GPU), as the planner computes it: derived from reference plans of
// a two-GPU split, agreeing with plan_memory() byte for byte (tested).
struct PipelineMemoryModel {
  int64_t n_experts = 0;
  std::vector<int64_t> expert_bytes;  // per layer
  std::vector<int64_t> layer_bytes;   // per layer: attention weights + KV cache
  int64_t base = 0;       // a GPU running attention, several GPUs, no expert: reserves, activations
  int64_t expert_ws = 0;  // more when it holds experts
  int64_t first_bytes = 0;        // embedding, on the first GPU
  int64_t last_bytes = 0;         // head + logits, on the last GPU
  int64_t single_gpu_saving = 0;  // one GPU only: no NCCL reserve, tied head counted once
  int64_t cpu_expert_ws = 0;
  int64_t staging_buffers = 2;  // as MemoryModel's
  // Bytes on GPU g (index in stage order) of a placement; 0 when it holds no layer.
  int64_t gpu_need(const Stages& stages, const std::vector<int64_t>& gpu_counts, int g) const;
  int64_t cpu_need(const std::vector<int64_t>& gpu_counts) const;
};
PipelineMemoryModel pipeline_memory_model(const ModelInfo& model, bool cuda_graph, int64_t context);

// A resolved placement: every layer's attention on `gpu` (or, with settings.gpu false, every
// part on cpu), experts as on_gpu says, runtime from settings and the workload's context and
// batch (the KV cache is planned per sequence).
Placement make_placement(const ModelInfo& model, const EngineSettings& settings,
                         const std::vector<std::vector<bool>>& on_gpu, int64_t context,
                         const std::string& gpu = "cuda:0", int64_t batch = 1);
// The same over several GPUs: layer l's attention and GPU experts on gpus[stages[l]].
Placement make_pipeline_placement(const ModelInfo& model, const EngineSettings& settings,
                                  const std::vector<std::vector<bool>>& on_gpu, int64_t context,
                                  const std::vector<std::string>& gpus, const Stages& stages,
                                  int64_t batch = 1);
// Layers per GPU of an even split of n_layers over n GPUs (the first ones get the remainder).
std::vector<int64_t> even_split(int64_t n_layers, int n);
// The m hottest experts of each layer on the GPU.
std::vector<std::vector<bool>> hottest_sets(const RouterModel& router,
                                            const std::vector<int64_t>& gpu_counts);

}  // namespace ktune::search
