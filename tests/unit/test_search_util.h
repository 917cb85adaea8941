// Shared pieces of the search tests: profiles built in code (the same machine as
// profiles/h100-16core-handmade.json), a DeepSeek-V3-shaped model, and a path to the repo's
// profiles folder.
#pragma once

#include <string>

#include "ktune/engine/model.h"
#include "ktune/engine/memory_plan.h"
#include "profiler/profile_summary.h"
#include "search/search.h"

namespace ktune::search::test {

inline profile::ProfileSummary h100_profile() {
  profile::ProfileSummary s;
  s.kind = "hardware";
  s.ktune_version = "test";
  s.commit = "test";
  s.created = "2026-11-27T00:00:00Z";
  s.cpu.name = "test cpu";
  s.cpu.physical_cores = 16;
  s.cpu.logical_cpus = 16;
  s.cpu.isa = "avx512vnni";
  s.cpu.mem_bytes = int64_t{128} << 30;
  s.cpu.mem_available_bytes = int64_t{120} << 30;
  s.cpu.read_gb_s = {{1, 14}, {4, 50}, {8, 85}, {16, 110}};
  s.cpu_costs.moe_decode_gb_s = {{1, 8}, {4, 29}, {8, 50}, {16, 68}};
  s.cpu_costs.prefill_gflop_s = {{1, 40}, {16, 580}};
  s.cpu_costs.handoff_host_thread_us = 20;
  profile::GpuInfo g;
  g.device = "cuda:0";
  g.name = "test gpu";
  g.sm = "9.0";
  g.mem_bytes = 85017755648;
  g.mem_free_bytes = g.mem_bytes;
  g.read_gb_s = 3000;
  g.h2d_gb_s = 52;
  g.d2h_gb_s = 50;
  s.gpus.push_back(g);
  profile::GpuCosts c;
  c.device = "cuda:0";
  c.launch_eager_us = 3.3;
  c.graph_node_us = 1.0;
  c.host_node_us = 27;
  c.flag_handoff_us = 3.4;
  c.sync_us = 8;
  c.matvec_gb_s = 440;
  c.moe_fused_gb_s = 420;
  c.moe_unfused_gb_s = 370;
  c.attention_us = 6;
  c.attention_us_per_1k_ctx = 1.5;
  c.prefill_gflop_s = 50000;
  s.gpu_costs.push_back(c);
  return s;
}

// The same machine with n identical GPUs, every pair linked at gb_s and latency_us (NCCL and peer
// copies alike); gb_s <= 0: no interconnect measured.
inline profile::ProfileSummary multi_gpu_profile(int n, double gb_s = 150, double latency_us = 10) {
  profile::ProfileSummary s = h100_profile();
  const profile::GpuInfo g0 = s.gpus[0];
  const profile::GpuCosts c0 = s.gpu_costs[0];
  s.gpus.clear();
  s.gpu_costs.clear();
  for (int i = 0; i < n; ++i) {
    profile::GpuInfo g = g0;
    g.device = "cuda:" + std::to_string(i);
    s.gpus.push_back(g);
    profile::GpuCosts c = c0;
    c.device = g.device;
    s.gpu_costs.push_back(c);
  }
  for (int i = 0; gb_s > 0 && i < n; ++i) {
    for (int j = 0; j < n; ++j) {
      if (i == j) continue;
      profile::GpuLink l;
      l.src = "cuda:" + std::to_string(i);
      l.dst = "cuda:" + std::to_string(j);
      l.peer_access = true;
      l.peer_gb_s = gb_s;
      l.peer_latency_us = latency_us;
      l.nccl_gb_s = gb_s;
      l.nccl_latency_us = latency_us;
      s.interconnect.push_back(l);
    }
  }
  return s;
}

inline profile::ProfileSummary cpu_only_profile() {
  profile::ProfileSummary s = h100_profile();
  s.gpus.clear();
  s.gpu_costs.clear();
  return s;
}

// 58 MoE layers x 256 experts, top-8, hidden 7168, expert FFN 2048 (DeepSeek-V3's routed
// experts). The engine's architecture is qwen3moe, so attention is GQA here (8 KV heads stand in
// for MLA's compressed cache); the search's cost is dominated by the expert dimensions.
inline ModelConfig deepseek_v3_shape() {
  ModelConfig c;
  c.arch = "qwen3moe";
  c.name = "deepseek-v3-shape";
  c.n_layers = 58;
  c.hidden = 7168;
  c.n_heads = 128;
  c.n_kv_heads = 8;
  c.head_dim = 128;
  c.n_experts = 256;
  c.n_experts_used = 8;
  c.expert_ffn = 2048;
  c.dense_ffn = 18432;
  c.vocab = 129280;
  c.context_length = 163840;
  c.validate("deepseek-v3-shape");
  return c;
}

// The repository's profiles/ folder (tests/data is KTUNE_TEST_DATA).
// SearchOptions as `ktune search` builds them: the profile's budgets (less the headroom), then
// --gpu-mem overrides, and the workload.
inline SearchOptions search_options(const ModelInfo& mi, const profile::ProfileSummary& prof,
                                    const std::string& gpu_mem, const std::string& workload) {
  SearchOptions o;
  o.profile_path = "test-profile.json";
  o.profile = prof;
  o.model = mi;
  for (const auto& g : prof.gpus) o.budgets.bytes[g.device] = g.mem_bytes - kGpuBudgetHeadroom;
  o.budgets.bytes["cpu"] = prof.cpu.mem_available_bytes - kHostBudgetHeadroom;
  if (!gpu_mem.empty()) apply_budget_overrides(o.budgets, gpu_mem, "--gpu-mem", Device::Cuda);
  o.workload = parse_workload(workload);
  return o;
}

inline std::string profiles_dir() { return std::string(KTUNE_TEST_DATA) + "/../../profiles"; }

}  // namespace ktune::search::test
