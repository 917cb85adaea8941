// The profiler on hand-built multi-GPU and multi-node timelines with known answers: per-GPU
// compute and idle, NCCL kernels and peer copies counted as transfers (not compute), the pipeline
// order from the layers each GPU computes, bubbles (waiting for upstream GPUs) and downstream
// waits, per-NUMA-node CPU expert bandwidth from node-tagged spans, and the timeline columns that
// carry the new fields.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "ktune/engine/trace.h"
#include "profiler/analysis.h"
#include "profiler/report.h"

namespace ktune::profiler {
namespace {

using trace::Phase;

constexpr int64_t us = 1000;

void op(Timeline& t, GpuOpKind kind, int32_t dev, const char* name, int64_t a, int64_t b,
        uint64_t node = 0, int32_t peer = -1, int64_t bytes = 0) {
  GpuOp o;
  o.kind = kind;
  o.device = dev;
  o.stream = 7;
  o.start = a * us;
  o.end = b * us;
  o.graph_node_id = node;
  o.graph_id = node ? 1 : 0;
  o.name = t.intern(name);
  o.peer_device = peer;
  o.bytes = bytes;
  t.ops.push_back(o);
}

// Two decode steps of 100 µs through a two-GPU pipeline. cuda:1 runs layers 0-1 (so it is the
// first stage), cuda:0 layers 2-3. Per step (offset o):
//   cuda:1: compute [o, o+40), then ncclDevKernel_SendRecv [o+40, o+45);
//   cuda:0: its receive kernel spins [o+20, o+46), compute [o+46, o+90), then the sampled token
//           goes back by a peer copy [o+90, o+92) (4 bytes).
Timeline pipeline() {
  Timeline t;
  t.gpus.push_back({0, "gpu a"});
  t.gpus.push_back({1, "gpu b"});
  t.graph_nodes = {{11, 0, Phase::Attention},
                   {12, 1, Phase::MoeGpu},
                   {21, 2, Phase::Attention},
                   {22, 3, Phase::Sampling}};
  for (int64_t o : {0, 100}) {
    op(t, GpuOpKind::Kernel, 1, "attention_decode", o, o + 30, 11);
    op(t, GpuOpKind::Kernel, 1, "moe_fused_down", o + 30, o + 40, 12);
    op(t, GpuOpKind::Kernel, 1, "ncclDevKernel_SendRecv", o + 40, o + 45);
    op(t, GpuOpKind::Kernel, 0, "ncclKernel_SendRecv_RING_SIMPLE", o + 20, o + 46);
    op(t, GpuOpKind::Kernel, 0, "attention_decode", o + 46, o + 80, 21);
    op(t, GpuOpKind::Kernel, 0, "argmax", o + 80, o + 90, 22);
    op(t, GpuOpKind::Memcpy, 0, "Memcpy PtoP", o + 90, o + 92, 0, 1, 4);
  }
  t.windows.push_back({"decode", 2, 0, 200 * us});
  return t;
}

const GpuMetrics& gpu(const WindowMetrics& m, int32_t d) {
  for (const GpuMetrics& g : m.gpus) {
    if (g.device == d) return g;
  }
  throw std::runtime_error("no such gpu");
}

TEST(ProfilerMultiGpu, TransfersAreNotComputeAndBubblesAreUpstreamWaits) {
  const Timeline t = pipeline();
  const auto tags = attribute_ops(t);
  const WindowMetrics m = analyze_window(t, tags, t.windows[0], {});
  ASSERT_EQ(m.gpus.size(), 2u);
  ASSERT_EQ(m.pipeline_order, (std::vector<int32_t>{1, 0}));  // by the first layer computed
  const GpuMetrics& first = gpu(m, 1);
  const GpuMetrics& second = gpu(m, 0);
  EXPECT_EQ(first.pipeline_stage, 0);
  EXPECT_EQ(second.pipeline_stage, 1);
  // Compute only: NCCL kernels are transfers even though they occupy the GPU.
  EXPECT_DOUBLE_EQ(first.busy_us, 80);
  EXPECT_DOUBLE_EQ(second.busy_us, 88);
  EXPECT_DOUBLE_EQ(first.idle_fraction, 0.6);
  EXPECT_DOUBLE_EQ(second.idle_fraction, 1 - 88.0 / 200);
  EXPECT_DOUBLE_EQ(first.peer_transfer_us, 10);
  EXPECT_DOUBLE_EQ(second.peer_transfer_us, 2 * (26 + 2));
  EXPECT_EQ(second.peer_bytes, 8);
  // cuda:0 waits for cuda:1's 40 µs of compute each step (its spinning receive included);
  // cuda:1 waits for cuda:0 downstream 44 µs each step.
  EXPECT_DOUBLE_EQ(second.bubble_us, 80);
  EXPECT_DOUBLE_EQ(second.downstream_wait_us, 0);
  EXPECT_DOUBLE_EQ(first.bubble_us, 0);
  EXPECT_DOUBLE_EQ(first.downstream_wait_us, 88);
  EXPECT_DOUBLE_EQ(m.peer_transfer_us, 2 * 28);  // union over both GPUs
  // Gaps are between compute kernels: one on cuda:0 between the steps (90 -> 146).
  EXPECT_EQ(second.gaps.count, 1);
  EXPECT_DOUBLE_EQ(second.gaps.max_us, 56);
  EXPECT_EQ(second.phases.at(Phase::Transfer).count, 2);
  // The budget gives NCCL kernels and peer copies to transfers.
  double transfers = -1;
  for (const BudgetItem& b : m.budget) {
    if (b.name == "transfers") transfers = b.us_per_token;
  }
  EXPECT_GT(transfers, 0);
  const nlohmann::json j = to_json(m);
  EXPECT_EQ(j["pipeline"]["order"], (nlohmann::json{"cuda:1", "cuda:0"}));
  EXPECT_DOUBLE_EQ(j["pipeline"]["bubble_us_per_token"].get<double>(), 40);
  EXPECT_DOUBLE_EQ(j["gpus"][0]["bubble_us"].get<double>(), 80);
}

// The verdict and both reports name every GPU with its stage and waits; a third GPU that ran
// nothing is listed too.
TEST(ProfilerMultiGpu, VerdictAndReportsShowEveryGpu) {
  ProfileDoc doc;
  doc.timeline = pipeline();
  doc.timeline.gpus.push_back({2, "idle gpu"});
  doc.run.engine = "gpu";
  doc.run.cuda_graph = true;
  doc.run.moe_kernel = "fused";
  doc.windows.push_back(
      analyze_window(doc.timeline, attribute_ops(doc.timeline), doc.timeline.windows[0], {}));
  doc.verdict = make_verdict(doc);
  EXPECT_NE(doc.verdict.headline.find("pipeline-bound (2 GPUs in turn)"), std::string::npos)
      << doc.verdict.headline;
  bool stage_line = false;
  for (const std::string& r : doc.verdict.reasons) {
    stage_line = stage_line || r.find("cuda:0 (stage 1): busy 44 %, waits 40.0 µs per token") !=
                                   std::string::npos;
  }
  EXPECT_TRUE(stage_line);
  const std::string text = terminal_report(doc);
  EXPECT_NE(text.find("(pipeline cuda:1 -> cuda:0)"), std::string::npos) << text;
  EXPECT_NE(text.find("| cuda:0 |     1 |   44.0 |   56.0 |                  40.0 |"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("| cuda:2 |"), std::string::npos);
  const std::string html = html_report(doc);
  EXPECT_NE(html.find("<td>cuda:2</td>"), std::string::npos);
  EXPECT_NE(html.find("waits upstream"), std::string::npos);
}

TEST(ProfilerMultiGpu, FourGpusEachWaitForAllBeforeIt) {
  // One 100 µs step, 4 GPUs in device order, each computing 20 µs after the previous one
  // (transfers of 5 µs between): GPU k waits for GPUs 0..k-1: 20 k µs.
  Timeline t;
  for (int d = 0; d < 4; ++d) t.gpus.push_back({d, "gpu"});
  for (int d = 0; d < 4; ++d) {
    t.graph_nodes.push_back({uint64_t(100 + d), d * 10, Phase::Attention});
    const int64_t a = d * 25;
    op(t, GpuOpKind::Kernel, d, "attention", a, a + 20, uint64_t(100 + d));
    if (d < 3) op(t, GpuOpKind::Kernel, d, "ncclDevKernel_SendRecv", a + 20, a + 25);
  }
  t.windows.push_back({"decode", 1, 0, 100 * us});
  const WindowMetrics m = analyze_window(t, attribute_ops(t), t.windows[0], {});
  ASSERT_EQ(m.pipeline_order, (std::vector<int32_t>{0, 1, 2, 3}));
  for (int d = 0; d < 4; ++d) {
    EXPECT_DOUBLE_EQ(gpu(m, d).bubble_us, 20.0 * d) << d;
    EXPECT_DOUBLE_EQ(gpu(m, d).downstream_wait_us, 20.0 * (3 - d)) << d;
    EXPECT_DOUBLE_EQ(gpu(m, d).idle_fraction, 0.8) << d;
    EXPECT_DOUBLE_EQ(gpu(m, d).peer_transfer_us, d < 3 ? 5 : 0) << d;
  }
}

TEST(ProfilerMultiGpu, OneGpuHasNoPipeline) {
  Timeline t;
  t.gpus.push_back({0, "gpu"});
  op(t, GpuOpKind::Kernel, 0, "attention", 0, 10);
  t.windows.push_back({"decode", 1, 0, 20 * us});
  const WindowMetrics m = analyze_window(t, attribute_ops(t), t.windows[0], {});
  EXPECT_TRUE(m.pipeline_order.empty());
  EXPECT_EQ(m.gpus[0].pipeline_stage, -1);
  EXPECT_DOUBLE_EQ(m.gpus[0].bubble_us, 0);
}

TEST(ProfilerMultiGpu, TransferNames) {
  Timeline t;
  GpuOp k;
  k.name = t.intern("ncclKernel_SendRecv_RING_SIMPLE_Sum_int8_t");
  EXPECT_TRUE(is_peer_transfer(t, k));
  k.name = t.intern("ncclDevKernel_SendRecv");
  EXPECT_TRUE(is_peer_transfer(t, k));
  k.name = t.intern("moe_fused_down");
  EXPECT_FALSE(is_peer_transfer(t, k));
  GpuOp c;
  c.kind = GpuOpKind::Memcpy;
  c.name = t.intern("Memcpy HtoD");
  EXPECT_FALSE(is_peer_transfer(t, c));
  c.peer_device = 1;
  EXPECT_TRUE(is_peer_transfer(t, c));
  Phase p;
  ASSERT_TRUE(phase_from_kernel_name("ncclDevKernel_SendRecv", &p));
  EXPECT_EQ(p, Phase::Transfer);
}

// NumaCpuMoe tags each node group's spans with its node: node 0's experts ran 50 µs, node 1's
// 30 + 10 µs; the enclosing all-nodes span covers 100 µs.
TEST(ProfilerMultiGpu, ExpertBandwidthPerNumaNode) {
  Timeline t;
  t.threads = {{1, 1, "main"}, {2, 2, "node 1 driver"}};
  auto span = [&](uint32_t th, int64_t a, int64_t b, int32_t node) {
    HostSpan s;
    s.thread = th;
    s.phase = Phase::MoeCpu;
    s.arg = 3;
    s.start = a * us;
    s.end = b * us;
    s.node = node;
    t.spans.push_back(s);
  };
  span(0, 0, 100, -1);
  span(0, 0, 50, 0);
  span(1, 10, 40, 1);
  span(1, 60, 70, 1);
  t.windows.push_back({"decode", 1, 0, 100 * us});
  AnalysisInputs in;
  in.expert_bytes = {{"cpu", 9e6}, {"cpu:0", 5e6}, {"cpu:1", 2e6}, {"cpu:2", 1e6}};
  const WindowMetrics m = analyze_window(t, attribute_ops(t), t.windows[0], in);
  EXPECT_DOUBLE_EQ(m.cpu.moe_cpu_wall_us_by_node.at(0), 50);
  EXPECT_DOUBLE_EQ(m.cpu.moe_cpu_wall_us_by_node.at(1), 40);
  std::map<std::string, double> bw;
  for (const ExpertBandwidth& e : m.expert_bandwidth) bw[e.device] = e.gb_s;
  EXPECT_DOUBLE_EQ(bw["cpu"], 90);
  EXPECT_DOUBLE_EQ(bw["cpu:0"], 100);
  EXPECT_DOUBLE_EQ(bw["cpu:1"], 50);
  EXPECT_DOUBLE_EQ(bw["cpu:2"], 0);  // no span tagged with node 2: a note says so
}

TEST(ProfilerMultiGpu, SpansCarryTheThreadsNode) {
  trace::start();
  trace::set_thread_node(3);
  { trace::Scope s(Phase::MoeCpu, 5); }
  trace::set_thread_node(-1);
  { trace::Scope s(Phase::MoeCpu, 6); }
  trace::stop();
  const trace::Collected c = trace::collect();
  ASSERT_EQ(c.spans.size(), 2u);
  EXPECT_EQ(c.spans[0].node, 3);
  EXPECT_EQ(c.spans[1].node, -1);
  Timeline t;
  add_host_spans(t, c, 0);
  EXPECT_EQ(t.spans[0].node, 3);
}

TEST(ProfilerMultiGpu, TimelineColumnsRoundTripAndOldRowsStillRead) {
  Timeline t = pipeline();
  t.threads = {{1, 1, "main"}};
  HostSpan s;
  s.phase = Phase::MoeCpu;
  s.start = 5 * us;
  s.end = 9 * us;
  s.node = 1;
  t.spans.push_back(s);
  nlohmann::json j = timeline_to_json(t);
  const Timeline back = timeline_from_json(j, "t.json");
  ASSERT_EQ(back.ops.size(), t.ops.size());
  EXPECT_EQ(back.ops.back().peer_device, 1);
  EXPECT_EQ(back.spans[0].node, 1);
  // A version-1 timeline (10 op columns, 5 span columns) still reads, with the defaults.
  for (auto& r : j["ops"]["rows"]) r.erase(r.size() - 1);
  for (auto& r : j["spans"]["rows"]) r.erase(r.size() - 1);
  const Timeline old = timeline_from_json(j, "old.json");
  EXPECT_EQ(old.ops.back().peer_device, -1);
  EXPECT_EQ(old.spans[0].node, -1);
}

}  // namespace
}  // namespace ktune::profiler
