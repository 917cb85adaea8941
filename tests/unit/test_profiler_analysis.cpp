// The profiler's analysis on hand-built timelines with known answers: busy/idle, gaps and their
// statistics, launch latency, attribution (graph node tags, clones, host spans, names), phase
// times, expert bandwidth, CPU/GPU overlap, the per-token budget, router statistics.
#include <gtest/gtest.h>

#include <cmath>

#include "profiler/analysis.h"

namespace ktune::profiler {
namespace {

using trace::Phase;

constexpr int64_t us = 1000;  // ns per microsecond

GpuOp kernel(Timeline& t, const char* name, int64_t start_us, int64_t end_us,
             uint32_t corr = 0, uint64_t node = 0) {
  GpuOp o;
  o.kind = GpuOpKind::Kernel;
  o.device = 0;
  o.stream = 7;
  o.start = start_us * us;
  o.end = end_us * us;
  o.correlation = corr;
  o.graph_node_id = node;
  o.graph_id = node ? 1 : 0;
  o.name = t.intern(name);
  t.ops.push_back(o);
  return o;
}

TEST(ProfilerAnalysis, IntervalHelpers) {
  const auto m = merge_intervals({{5, 10}, {0, 3}, {2, 4}, {10, 12}, {20, 20}});
  ASSERT_EQ(m.size(), 2u);
  EXPECT_EQ(m[0].start, 0);
  EXPECT_EQ(m[0].end, 4);
  EXPECT_EQ(m[1].start, 5);
  EXPECT_EQ(m[1].end, 12);
  EXPECT_EQ(total_length(m), 11);
  EXPECT_EQ(intersection_length(m, merge_intervals({{3, 6}, {11, 30}})), 1 + 1 + 1);
  EXPECT_EQ(percentile({}, 50), 0.0);
  EXPECT_EQ(percentile({4, 1, 3, 2}, 50), 2.0);  // nearest rank
  EXPECT_EQ(percentile({4, 1, 3, 2}, 90), 4.0);
  EXPECT_EQ(percentile({7}, 90), 7.0);
  const auto h = gap_histogram({0.5, 1.5, 3, 3, 700, 5000});
  ASSERT_EQ(h.size(), 9u);
  EXPECT_EQ(h[0].count, 1);  // [0,1)
  EXPECT_EQ(h[1].count, 1);  // [1,2)
  EXPECT_EQ(h[2].count, 2);  // [2,5)
  EXPECT_EQ(h[7].count, 1);  // [100,1000)
  EXPECT_EQ(h[8].count, 1);  // [1000,inf)
  EXPECT_TRUE(std::isinf(h[8].hi_us));
}

// One GPU, a 100 µs window of 4 tokens: kernels [0,10] [15,20] [20,30] [50,60], so busy 35 µs,
// idle 65 %, gaps 5 and 20 µs.
Timeline four_kernels() {
  Timeline t;
  t.gpus.push_back({0, "test gpu"});
  kernel(t, "attention_kernel", 0, 10, 1);
  kernel(t, "moe_gate_up", 15, 20, 2);
  kernel(t, "moe_down", 20, 30, 3);
  kernel(t, "matvec", 50, 60, 4);
  kernel(t, "late", 150, 160, 5);  // starts after the window: not counted
  t.windows.push_back({"decode", 4, 0, 100 * us});
  return t;
}

TEST(ProfilerAnalysis, BusyIdleAndGaps) {
  Timeline t = four_kernels();
  const auto m = analyze_window(t, attribute_ops(t), t.windows[0], {});
  EXPECT_DOUBLE_EQ(m.wall_us, 100);
  EXPECT_DOUBLE_EQ(m.tok_s, 4 / 100e-6);
  ASSERT_EQ(m.gpus.size(), 1u);
  const GpuMetrics& g = m.gpus[0];
  EXPECT_EQ(g.kernels, 4);
  EXPECT_DOUBLE_EQ(g.busy_us, 35);
  EXPECT_DOUBLE_EQ(g.idle_fraction, 0.65);
  EXPECT_EQ(g.gaps.count, 2);
  EXPECT_DOUBLE_EQ(g.gaps.sum_us, 25);
  EXPECT_DOUBLE_EQ(g.gaps.median_us, 5);
  EXPECT_DOUBLE_EQ(g.gaps.p90_us, 20);
  EXPECT_DOUBLE_EQ(g.gaps.max_us, 20);
  ASSERT_EQ(g.gaps.biggest.size(), 2u);
  EXPECT_DOUBLE_EQ(g.gaps.biggest[0].length_us, 20);
  EXPECT_EQ(g.gaps.biggest[0].before, "moe_down");
  EXPECT_EQ(g.gaps.biggest[0].after, "matvec");
  EXPECT_DOUBLE_EQ(g.gaps.biggest[0].start_us, 30);
  EXPECT_DOUBLE_EQ(g.kernels_per_token, 1.0);
  EXPECT_DOUBLE_EQ(g.first_kernel_to_last_us, 60);
}

TEST(ProfilerAnalysis, OverlappingKernelsOnTwoStreamsCountOnceInBusy) {
  Timeline t;
  kernel(t, "a", 0, 40);
  kernel(t, "b", 10, 50);
  t.ops.back().stream = 8;
  t.windows.push_back({"decode", 1, 0, 100 * us});
  const auto m = analyze_window(t, attribute_ops(t), t.windows[0], {});
  EXPECT_DOUBLE_EQ(m.gpus[0].busy_us, 50);
  EXPECT_EQ(m.gpus[0].gaps.count, 0);
}

TEST(ProfilerAnalysis, LaunchLatencyAndLaunchesThroughCorrelation) {
  Timeline t = four_kernels();
  const int32_t launch = t.intern("cudaLaunchKernel");
  // API calls start 3 µs before each kernel and last 1 µs; kernel 4's call is missing.
  for (uint32_t c = 1; c <= 3; ++c) {
    const GpuOp& k = t.ops[c - 1];
    t.api.push_back({launch, 42, k.start - 3 * us, k.start - 2 * us, c});
  }
  const auto m = analyze_window(t, attribute_ops(t), t.windows[0], {});
  const GpuMetrics& g = m.gpus[0];
  EXPECT_EQ(g.launches, 3);
  EXPECT_EQ(g.latency_samples, 3);
  EXPECT_DOUBLE_EQ(g.launch_latency_median_us, 3);
  EXPECT_DOUBLE_EQ(g.launch_delay_median_us, 2);  // HTA: from the end of the call
  EXPECT_DOUBLE_EQ(g.launches_per_token, 0.75);
}

TEST(ProfilerAnalysis, GraphLaunchCountsOnceAndLatencyToItsFirstKernel) {
  Timeline t;
  const int32_t gl = t.intern("cudaGraphLaunch");
  t.api.push_back({gl, 42, 0, 2 * us, 9});
  kernel(t, "k1", 5, 10, 9, 101);
  kernel(t, "k2", 12, 20, 9, 102);
  t.windows.push_back({"decode", 1, 0, 50 * us});
  const auto m = analyze_window(t, attribute_ops(t), t.windows[0], {});
  EXPECT_EQ(m.gpus[0].launches, 1);
  EXPECT_EQ(m.gpus[0].graph_launches, 1);
  EXPECT_DOUBLE_EQ(m.gpus[0].launch_latency_median_us, 5);
}

TEST(ProfilerAnalysis, GraphNodeAttributionDirectAndThroughClones) {
  Timeline t;
  kernel(t, "k_direct", 0, 1, 1, 100);  // the captured node's id
  kernel(t, "k_clone", 2, 3, 1, 555);   // a clone of node 200
  kernel(t, "k_clone2", 4, 5, 1, 777);  // a clone of a clone of node 300
  kernel(t, "k_unknown", 6, 7, 1, 999);
  t.graph_nodes.push_back({100, 3, Phase::Attention});
  t.graph_nodes.push_back({200, 3, Phase::MoeGpu});
  t.graph_nodes.push_back({300, 4, Phase::Router});
  t.node_clone_of[555] = 200;
  t.node_clone_of[777] = 666;
  t.node_clone_of[666] = 300;
  const auto tags = attribute_ops(t);
  EXPECT_EQ(tags[0].source, TagSource::GraphNode);
  EXPECT_EQ(tags[0].layer, 3);
  EXPECT_EQ(tags[0].phase, Phase::Attention);
  EXPECT_EQ(tags[1].source, TagSource::GraphNode);
  EXPECT_EQ(tags[1].phase, Phase::MoeGpu);
  EXPECT_EQ(tags[2].source, TagSource::GraphNode);
  EXPECT_EQ(tags[2].layer, 4);
  EXPECT_EQ(tags[2].phase, Phase::Router);
  EXPECT_EQ(tags[3].source, TagSource::None);
  EXPECT_EQ(tags[3].phase, Phase::Other);
}

TEST(ProfilerAnalysis, EagerAttributionThroughTheInnermostHostSpanOfTheLaunchingThread) {
  Timeline t;
  t.threads.push_back({1234, 0xabcdef001234ull, "main"});
  t.threads.push_back({5678, 0x5678ull, "other"});
  t.spans.push_back({0, Phase::DecodeStep, 1, 0, 100 * us});
  t.spans.push_back({0, Phase::Attention, 2, 10 * us, 40 * us});
  t.spans.push_back({0, Phase::MoeGpu, 2, 40 * us, 90 * us});
  t.spans.push_back({1, Phase::MoeCpu, 2, 0, 100 * us});  // another thread: ignored
  const int32_t launch = t.intern("cudaLaunchKernel");
  t.api.push_back({launch, 1234, 20 * us, 21 * us, 1});          // by os tid
  t.api.push_back({launch, 0xef001234ull, 50 * us, 51 * us, 2});  // by 32-bit pthread id
  t.api.push_back({launch, 1234, 95 * us, 96 * us, 3});          // only the step span
  kernel(t, "plain_a", 25, 30, 1);
  kernel(t, "plain_b", 55, 60, 2);
  kernel(t, "moe_kernel", 97, 99, 3);
  const auto tags = attribute_ops(t);
  EXPECT_EQ(tags[0].source, TagSource::HostSpan);
  EXPECT_EQ(tags[0].phase, Phase::Attention);
  EXPECT_EQ(tags[0].layer, 2);
  EXPECT_EQ(tags[1].source, TagSource::HostSpan);
  EXPECT_EQ(tags[1].phase, Phase::MoeGpu);
  // A step span says nothing about the phase: the name decides.
  EXPECT_EQ(tags[2].source, TagSource::Name);
  EXPECT_EQ(tags[2].phase, Phase::MoeGpu);
}

TEST(ProfilerAnalysis, NvtxMarkersOfTheKtuneDomainAttributeWhenNoSpansWereCollected) {
  Timeline t;
  const int32_t launch = t.intern("cudaLaunchKernel");
  t.markers.push_back({t.intern("router"), t.intern("ktune"), 77, 0, 50 * us, 9, true});
  t.markers.push_back({t.intern("router"), t.intern("other_domain"), 77, 60 * us, 90 * us, 1,
                       true});
  t.api.push_back({launch, 77, 10 * us, 11 * us, 1});
  t.api.push_back({launch, 77, 70 * us, 71 * us, 2});
  kernel(t, "plain", 12, 13, 1);
  kernel(t, "plain", 72, 73, 2);
  const auto tags = attribute_ops(t);
  EXPECT_EQ(tags[0].source, TagSource::HostSpan);
  EXPECT_EQ(tags[0].phase, Phase::Router);
  EXPECT_EQ(tags[0].layer, 9);
  EXPECT_EQ(tags[1].source, TagSource::None);
}

TEST(ProfilerAnalysis, KernelNameFallback) {
  Phase p;
  ASSERT_TRUE(phase_from_kernel_name("ktune::cuda::moe_gate_up_swiglu_kernel<4>", &p));
  EXPECT_EQ(p, Phase::MoeGpu);
  ASSERT_TRUE(phase_from_kernel_name("attention_decode_partial", &p));
  EXPECT_EQ(p, Phase::Attention);
  ASSERT_TRUE(phase_from_kernel_name("router_topk_kernel", &p));
  EXPECT_EQ(p, Phase::Router);
  ASSERT_TRUE(phase_from_kernel_name("argmax_kernel", &p));
  EXPECT_EQ(p, Phase::Sampling);
  EXPECT_FALSE(phase_from_kernel_name("matvec_q4_0_kernel", &p));
}

// GPU phases, CPU experts, expert bandwidth, overlap and the budget on one hand-built step:
// window [0, 100] µs, 2 tokens. GPU: attention [0,10], moe_gpu [10,30], router [30,35],
// a copy [40,45]. CPU experts (moe_cpu) [35,80] on two workers ([35,80] and [40,60]).
TEST(ProfilerAnalysis, PhasesBandwidthOverlapAndBudget) {
  Timeline t;
  t.graph_nodes = {{1, 0, Phase::Attention}, {2, 0, Phase::MoeGpu}, {3, 0, Phase::Router}};
  kernel(t, "k_att", 0, 10, 1, 1);
  kernel(t, "k_moe", 10, 30, 1, 2);
  kernel(t, "k_router", 30, 35, 1, 3);
  GpuOp copy;
  copy.kind = GpuOpKind::Memcpy;
  copy.start = 40 * us;
  copy.end = 45 * us;
  copy.bytes = 4096;
  copy.name = t.intern("Memcpy HtoD");
  t.ops.push_back(copy);
  t.threads.push_back({10, 10, "cpu worker 0"});
  t.threads.push_back({11, 11, "cpu worker 1"});
  t.spans.push_back({0, Phase::MoeCpu, 0, 35 * us, 80 * us});
  t.spans.push_back({1, Phase::MoeCpu, 0, 40 * us, 60 * us});
  const Window w{"decode", 2, 0, 100 * us};
  AnalysisInputs in;
  in.expert_bytes["cuda:0"] = 20e6;  // 20 MB in the 20 µs moe_gpu phase: 1000 GB/s
  in.expert_bytes["cpu"] = 4.5e6;    // 4.5 MB in 45 µs: 100 GB/s
  const auto m = analyze_window(t, attribute_ops(t), w, in);
  const GpuMetrics& g = m.gpus[0];
  EXPECT_DOUBLE_EQ(g.phases.at(Phase::Attention).wall_us, 10);
  EXPECT_DOUBLE_EQ(g.phases.at(Phase::MoeGpu).wall_us, 20);
  EXPECT_DOUBLE_EQ(g.phases.at(Phase::Router).wall_us, 5);
  EXPECT_DOUBLE_EQ(g.copy_us, 5);
  EXPECT_EQ(g.tagged_by.at(TagSource::GraphNode), 3);
  EXPECT_EQ(m.cpu.workers, 2);
  EXPECT_DOUBLE_EQ(m.cpu.phases.at(Phase::MoeCpu).wall_us, 45);
  EXPECT_DOUBLE_EQ(m.cpu.phases.at(Phase::MoeCpu).thread_us, 65);
  ASSERT_EQ(m.expert_bandwidth.size(), 2u);
  for (const auto& e : m.expert_bandwidth) {
    if (e.device == "cuda:0") {
      EXPECT_NEAR(e.gb_s, 1000, 1e-9);
    } else {
      EXPECT_NEAR(e.gb_s, 100, 1e-9);
    }
  }
  EXPECT_DOUBLE_EQ(m.overlap_us, 0);  // kernels end at 35, CPU experts start at 35
  // Budget (µs per token): attention 5, gpu experts 10, router 2.5, transfers 2.5 ([40,45]),
  // waits for the CPU experts: [35,40] + [45,80] = 40 µs -> 20, launch gaps [80,100] -> 10.
  std::map<std::string, double> b;
  double sum = 0;
  for (const BudgetItem& i : m.budget) {
    b[i.name] = i.us_per_token;
    sum += i.us_per_token;
  }
  EXPECT_DOUBLE_EQ(b["attention"], 5);
  EXPECT_DOUBLE_EQ(b["gpu_experts"], 10);
  EXPECT_DOUBLE_EQ(b["router"], 2.5);
  EXPECT_DOUBLE_EQ(b["transfers"], 2.5);
  EXPECT_DOUBLE_EQ(b["cpu_experts_wait"], 20);
  EXPECT_DOUBLE_EQ(b["launch_gaps"], 10);
  EXPECT_DOUBLE_EQ(sum, 50);  // = wall / tokens
}

// The flag hand-off's wait kernel spins on the GPU while the CPU experts run: that is GPU idle
// behind the CPU (budget cpu_experts_wait, a gap), not busy time and not a transfer. Found on the
// H100 (bf3f0f1): counted as busy, a CPU-bound hybrid run read "GPU busy 100 %, transfer 93 %".
TEST(ProfilerAnalysis, FlagWaitKernelIsIdleBehindTheCpuExperts) {
  Timeline t;
  t.graph_nodes = {{1, 0, Phase::Attention}, {2, 0, Phase::Transfer}, {3, 0, Phase::Transfer}};
  kernel(t, "attn_decode_cluster", 0, 10, 1, 1);
  kernel(t, "ktune::cuda::handoff_signal_kernel", 10, 12, 1, 2);
  kernel(t, "ktune::cuda::handoff_wait_add_kernel", 12, 90, 1, 3);
  kernel(t, "attn_decode_cluster", 90, 100, 1, 1);
  t.threads.push_back({10, 10, "cpu expert driver"});
  t.spans.push_back({0, Phase::MoeCpu, 0, 13 * us, 88 * us});
  const Window w{"decode", 1, 0, 100 * us};
  EXPECT_TRUE(is_cpu_wait_kernel("ktune::cuda::handoff_wait_add_kernel"));
  EXPECT_FALSE(is_cpu_wait_kernel("ktune::cuda::handoff_signal_kernel"));
  const auto m = analyze_window(t, attribute_ops(t), w, {});
  const GpuMetrics& g = m.gpus[0];
  EXPECT_EQ(g.kernels, 4);
  EXPECT_DOUBLE_EQ(g.busy_us, 22);
  EXPECT_DOUBLE_EQ(g.idle_fraction, 0.78);
  ASSERT_EQ(g.gaps.count, 1);
  EXPECT_DOUBLE_EQ(g.gaps.max_us, 78);
  EXPECT_EQ(g.gaps.biggest[0].before, "ktune::cuda::handoff_signal_kernel");
  EXPECT_DOUBLE_EQ(m.overlap_us, 0);  // the CPU experts overlap no real GPU work
  std::map<std::string, double> b;
  for (const BudgetItem& i : m.budget) b[i.name] = i.us_per_token;
  EXPECT_DOUBLE_EQ(b["cpu_experts_wait"], 78);
  EXPECT_DOUBLE_EQ(b["transfers"], 2);
  EXPECT_DOUBLE_EQ(b["attention"], 20);
}

TEST(ProfilerAnalysis, OverlapOfCpuExpertsWithGpuKernels) {
  Timeline t = four_kernels();
  t.threads.push_back({10, 10, "w"});
  t.spans.push_back({0, Phase::MoeCpu, 0, 25 * us, 55 * us});  // overlaps [25,30] and [50,55]
  const auto m = analyze_window(t, attribute_ops(t), t.windows[0], {});
  EXPECT_DOUBLE_EQ(m.overlap_us, 10);
  EXPECT_DOUBLE_EQ(m.overlap_fraction_of_cpu_experts, 10.0 / 30.0);
}

TEST(ProfilerAnalysis, CpuOnlyBudgetFromHostSpansAddsUpToWall) {
  Timeline t;
  t.threads.push_back({10, 10, "cpu worker 0"});
  t.threads.push_back({11, 11, "cpu worker 1"});
  for (uint32_t th = 0; th < 2; ++th) {
    t.spans.push_back({th, Phase::DecodeStep, 1, 0, 90 * us});
    t.spans.push_back({th, Phase::Attention, 0, 0, 30 * us});
    t.spans.push_back({th, Phase::Router, 0, 30 * us, 35 * us});
    t.spans.push_back({th, Phase::MoeCpu, 0, 35 * us, 80 * us});
    t.spans.push_back({th, Phase::Sampling, -1, 80 * us, 90 * us});
  }
  const Window w{"decode", 1, 0, 100 * us};
  const auto m = analyze_window(t, attribute_ops(t), w, {{{"cpu", 9e6}}});
  std::map<std::string, double> b;
  for (const BudgetItem& i : m.budget) b[i.name] = i.us_per_token;
  EXPECT_DOUBLE_EQ(b["attention"], 30);
  EXPECT_DOUBLE_EQ(b["router"], 5);
  EXPECT_DOUBLE_EQ(b["cpu_experts"], 45);
  EXPECT_DOUBLE_EQ(b["sampling"], 10);
  EXPECT_DOUBLE_EQ(b["host_overhead"], 10);
  EXPECT_EQ(m.cpu.workers, 2);
  EXPECT_DOUBLE_EQ(m.cpu.busy_us, 90);
  ASSERT_EQ(m.expert_bandwidth.size(), 1u);
  EXPECT_NEAR(m.expert_bandwidth[0].gb_s, 200, 1e-9);  // 9 MB in 45 µs
  EXPECT_TRUE(m.gpus.empty());
}

TEST(ProfilerAnalysis, EventsOutsideTheWindowAreClipped) {
  Timeline t;
  kernel(t, "early", -10, 5);  // starts before the window: not counted
  kernel(t, "in", 10, 200);    // runs past the end: clipped to it
  const Window w{"decode", 1, 0, 100 * us};
  const auto m = analyze_window(t, attribute_ops(t), w, {});
  EXPECT_EQ(m.gpus[0].kernels, 1);
  EXPECT_DOUBLE_EQ(m.gpus[0].busy_us, 90);
}

TEST(ProfilerAnalysis, RouterStatistics) {
  // Layer 0: 4 experts, 10 tokens top-2 (20 selections): counts 10, 6, 3, 1 -> 90 % needs 3.
  // Layer 1: uniform 5, 5, 5, 5 -> 90 % needs 4.
  const auto r = analyze_router({{10, 6, 3, 1}, {5, 5, 5, 5}}, 10, 2);
  ASSERT_EQ(r.layers.size(), 2u);
  EXPECT_EQ(r.layers[0].experts_for_90, 3);
  EXPECT_DOUBLE_EQ(r.layers[0].top_share, 0.5);
  EXPECT_EQ(r.layers[1].experts_for_90, 4);
  EXPECT_DOUBLE_EQ(r.mean_share_for_90, (3.0 / 4 + 4.0 / 4) / 2);
  EXPECT_EQ(r.tokens_needed, 40);  // 20 selections per expert at 4 experts top-2
  EXPECT_NE(r.warning.find("only 10 tokens"), std::string::npos);
  const auto enough = analyze_router({{30, 30, 10, 10}}, 40, 2);
  EXPECT_TRUE(enough.warning.empty());
}

}  // namespace
}  // namespace ktune::profiler
