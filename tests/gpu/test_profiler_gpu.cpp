// The profiler on a real GPU: CUPTI records of a hand-built captured graph are attributed to the
// (layer, phase) the capture tagged, through graph node ids; eager launches through the host
// span around their API call; NVTX ranges reach CUPTI; and `ktune profile` end to end on the
// GPU engine. Skipped without a GPU.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <set>
#include <nlohmann/json.hpp>

#include "gpu_test_util.h"
#include "ktune/engine/cuda/cuda_check.h"
#include "ktune/engine/cuda/kernels.h"
#include "ktune/engine/model.h"
#include "ktune/engine/trace.h"
#include "inject/trace_level.h"
#include "profiler/analysis.h"
#include "profiler/chrome_trace.h"
#include "profiler/cupti_activity.h"
#include "profiler/profile_run.h"
#include "profiler/trace_padding.h"

namespace ktune {
namespace {

using profiler::TagSource;
using trace::Phase;

// NVTX reads NVTX_INJECTION64_PATH on its first call: set it before main (only with a GPU).
const bool kNvtxInjected = [] {
  if (!profiler::cupti_availability().usable) return false;
  return !profiler::setup_nvtx_injection().empty();
}();

struct Bufs {
  cuda::DeviceBuffer a{4096 * 4}, b{4096 * 4}, c{4096 * 4}, ids{64};
  Bufs() {
    KTUNE_CUDA_CHECK(cudaMemset(a.data(), 0, a.size()));
    KTUNE_CUDA_CHECK(cudaMemset(b.data(), 0, b.size()));
    KTUNE_CUDA_CHECK(cudaMemset(c.data(), 0, c.size()));
  }
};

// One (layer, phase) per distinct kernel, so a record's name says which tag it must carry.
void enqueue_tagged(Bufs& m, cudaStream_t s) {
  {
    trace::Scope sc(Phase::Attention, 0);
    KTUNE_CUDA_CHECK(cuda::launch_add_inplace(m.a.as<float>(), m.b.as<float>(), 4096, s));
    KTUNE_CUDA_CHECK(cuda::launch_add_inplace(m.a.as<float>(), m.b.as<float>(), 4096, s));
  }
  {
    trace::Scope sc(Phase::MoeGpu, 0);
    KTUNE_CUDA_CHECK(
        cuda::launch_swiglu(m.a.as<float>(), m.b.as<float>(), 4096, m.c.as<float>(), s));
  }
  {
    trace::Scope sc(Phase::Router, 1);
    KTUNE_CUDA_CHECK(cuda::launch_axpy_accumulate(0.5f, m.a.as<float>(), 4096, m.c.as<float>(), s));
  }
  {
    trace::Scope sc(Phase::Sampling, 1);
    KTUNE_CUDA_CHECK(cuda::launch_argmax(m.c.as<float>(), 1, 4096, m.ids.as<int32_t>(), s));
  }
}

struct Expect {
  int layer;
  Phase phase;
};
bool expected_for(const std::string& name, Expect* e) {
  if (name.find("add_kernel") != std::string::npos) *e = {0, Phase::Attention};
  else if (name.find("swiglu") != std::string::npos) *e = {0, Phase::MoeGpu};
  else if (name.find("axpy") != std::string::npos) *e = {1, Phase::Router};
  else if (name.find("argmax") != std::string::npos) *e = {1, Phase::Sampling};
  else return false;
  return true;
}

TEST(ProfilerGpu, GraphReplayKernelsAreAttributedThroughCaptureTags) {
  KTUNE_REQUIRE_GPU();
  trace::clear_graph_node_tags();
  profiler::CuptiSession cupti;
  ASSERT_TRUE(cupti.ok()) << cupti.error();
  Bufs m;
  cuda::Stream stream;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  KTUNE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  {
    trace::GraphCapture cap(stream.get());
    enqueue_tagged(m, stream);
    KTUNE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    cap.finish(graph);
    EXPECT_EQ(cap.tagged(), 5u);
  }
  const auto tags = trace::graph_node_tags();
  ASSERT_EQ(tags.size(), 5u);
  for (const auto& t : tags) EXPECT_NE(t.node_id, 0u) << "CUPTI's resolver gave no node id";
  KTUNE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  cupti.enable();
  for (int i = 0; i < 3; ++i) KTUNE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  stream.synchronize();
  cupti.disable_and_flush();
  profiler::Timeline t;
  cupti.drain_into(t);
  profiler::add_graph_tags(t, tags);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);

  // How replay records name their nodes: the captured node's id, or a clone's (mapped back
  // through CUPTI's GRAPHNODE_CLONED callbacks). Printed: the design needs this fact.
  std::map<uint64_t, int> captured;
  for (const auto& g : tags) captured[g.node_id] = 1;
  int direct = 0, via_clone = 0, kernels = 0;
  for (const auto& o : t.ops) {
    if (o.kind != profiler::GpuOpKind::Kernel) continue;
    ++kernels;
    EXPECT_NE(o.graph_node_id, 0u) << t.str(o.name);
    if (captured.count(o.graph_node_id)) ++direct;
    else if (t.node_clone_of.count(o.graph_node_id)) ++via_clone;
  }
  std::printf("graph replay: %d kernel records, %d carry the captured node's id, %d a clone's "
              "id (%zu clone mappings seen)\n",
              kernels, direct, via_clone, t.node_clone_of.size());
  EXPECT_EQ(kernels, 15);
  EXPECT_EQ(direct + via_clone, kernels);

  const auto op_tags = profiler::attribute_ops(t);
  for (size_t i = 0; i < t.ops.size(); ++i) {
    if (t.ops[i].kind != profiler::GpuOpKind::Kernel) continue;
    Expect e;
    ASSERT_TRUE(expected_for(t.str(t.ops[i].name), &e)) << t.str(t.ops[i].name);
    EXPECT_EQ(op_tags[i].source, TagSource::GraphNode) << t.str(t.ops[i].name);
    EXPECT_EQ(op_tags[i].layer, e.layer) << t.str(t.ops[i].name);
    EXPECT_EQ(op_tags[i].phase, e.phase) << t.str(t.ops[i].name);
  }
}

TEST(ProfilerGpu, EagerKernelsAreAttributedThroughHostSpansAndNvtxReachesCupti) {
  KTUNE_REQUIRE_GPU();
  profiler::CuptiSession cupti;
  ASSERT_TRUE(cupti.ok()) << cupti.error();
  Bufs m;
  cuda::Stream stream;
  enqueue_tagged(m, stream);  // first launches outside the traced window (module loading)
  stream.synchronize();
  trace::start();
  cupti.enable();
  const int64_t offset = profiler::CuptiSession::steady_to_cupti_offset();
  enqueue_tagged(m, stream);
  stream.synchronize();
  cupti.disable_and_flush();
  trace::stop();
  profiler::Timeline t;
  cupti.drain_into(t);
  profiler::add_host_spans(t, trace::collect(), offset);
  int kernels = 0;
  const auto op_tags = profiler::attribute_ops(t);
  for (size_t i = 0; i < t.ops.size(); ++i) {
    if (t.ops[i].kind != profiler::GpuOpKind::Kernel) continue;
    ++kernels;
    Expect e;
    ASSERT_TRUE(expected_for(t.str(t.ops[i].name), &e)) << t.str(t.ops[i].name);
    EXPECT_EQ(op_tags[i].source, TagSource::HostSpan) << t.str(t.ops[i].name);
    EXPECT_EQ(op_tags[i].layer, e.layer);
    EXPECT_EQ(op_tags[i].phase, e.phase);
  }
  EXPECT_EQ(kernels, 5);
  // Launch latency is measured: every kernel has its runtime API call.
  profiler::Window w{"decode", 1, t.first_time(), t.first_time() + 1000000000};
  const auto wm = profiler::analyze_window(t, op_tags, w, {});
  ASSERT_FALSE(wm.gpus.empty());
  EXPECT_EQ(wm.gpus[0].latency_samples, 5);
  EXPECT_GT(wm.gpus[0].launch_latency_median_us, 0.0);
  int ktune_markers = 0;
  for (const auto& mk : t.markers) ktune_markers += t.str(mk.domain) == "ktune" ? 1 : 0;
  std::printf("NVTX injection %s; %d ktune NVTX ranges reached CUPTI\n",
              kNvtxInjected ? "set" : "not set", ktune_markers);
  if (kNvtxInjected) EXPECT_EQ(ktune_markers, 4);
}

// Level light: the same attribution and launch latency from fewer records: the engine's runtime
// calls (trace_level.h: all of them for the engine), no synchronization records, no NVTX markers
// (the host spans carry the phases).
TEST(ProfilerGpu, LevelLightKeepsLaunchLatencyAndDropsTheRest) {
  KTUNE_REQUIRE_GPU();
  profiler::CuptiOptions co;
  co.level = trace_level::Level::Light;
  profiler::CuptiSession cupti(co);
  ASSERT_TRUE(cupti.ok()) << cupti.error();
  Bufs m;
  cuda::Stream stream;
  enqueue_tagged(m, stream);
  stream.synchronize();
  trace::start();
  cupti.enable();
  EXPECT_EQ(cupti.level(), trace_level::Level::Light);
  const int64_t offset = profiler::CuptiSession::steady_to_cupti_offset();
  enqueue_tagged(m, stream);
  stream.synchronize();
  cupti.disable_and_flush();
  trace::stop();
  EXPECT_EQ(cupti.notes(), "");  // per-call selection worked
  profiler::Timeline t;
  cupti.drain_into(t);
  profiler::add_host_spans(t, trace::collect(), offset);
  const auto op_tags = profiler::attribute_ops(t);
  int kernels = 0;
  for (size_t i = 0; i < t.ops.size(); ++i) {
    if (t.ops[i].kind != profiler::GpuOpKind::Kernel) continue;
    ++kernels;
    Expect e;
    ASSERT_TRUE(expected_for(t.str(t.ops[i].name), &e)) << t.str(t.ops[i].name);
    EXPECT_EQ(op_tags[i].source, TagSource::HostSpan) << t.str(t.ops[i].name);
    EXPECT_EQ(op_tags[i].phase, e.phase);
  }
  EXPECT_EQ(kernels, 5);
  profiler::Window w{"decode", 1, t.first_time(), t.first_time() + 1000000000};
  const auto wm = profiler::analyze_window(t, op_tags, w, {});
  ASSERT_FALSE(wm.gpus.empty());
  EXPECT_EQ(wm.gpus[0].latency_samples, 5);
  EXPECT_GT(wm.gpus[0].launch_latency_median_us, 0.0);
  std::string names;
  for (const auto& a : t.api) names += t.str(a.name) + " ";
  EXPECT_GE(t.api.size(), 6u) << names;  // 5 launches + the stream synchronize
  EXPECT_TRUE(t.syncs.empty());
  EXPECT_TRUE(t.markers.empty());
  EXPECT_EQ(t.cupti_overhead_ns, 0);
  std::printf("level light: %zu runtime API records (%s)\n", t.api.size(), names.c_str());

  // The same session at level full next (as `--trace-level both` does): every call again.
  cupti.enable(trace_level::Level::Full);
  enqueue_tagged(m, stream);
  stream.synchronize();
  cupti.disable_and_flush();
  profiler::Timeline f;
  cupti.drain_into(f);
  EXPECT_GT(f.api.size(), 0u);
  EXPECT_FALSE(f.syncs.empty());
  std::printf("level full after light: %zu runtime API records, %zu syncs\n", f.api.size(),
              f.syncs.size());
}

// A quick profile of synth:tiny: the experts of its first `gpu_layers` layers on cuda:0, a
// prompt of `prompt` tokens, 16 decode tokens, one baseline window, no GPU probes.
profiler::ProfileOptions tiny_profile(int64_t gpu_layers, int64_t prompt) {
  profiler::ProfileOptions o;
  o.run.model = "synth:tiny";
  o.run.model_given = true;
  o.run.experts_on_gpu = {gpu_layers};
  o.run.prompt = prompt;
  o.run.gen = 16;
  o.warmup = 2;
  o.untraced_windows = 1;
  o.quick = true;
  o.quiet = true;
  o.gpu_probes = false;
  return o;
}

TEST(ProfilerGpu, ProfileOfTheGpuEngineEndToEnd) {
  KTUNE_REQUIRE_GPU();
  profiler::ProfileOptions o = tiny_profile(4, 4);  // all of tiny's layers on the GPU
  o.trace_levels = {trace_level::Level::Light, trace_level::Level::Full};  // --trace-level both
  const std::string dir = ::testing::TempDir();
  o.out = dir + "/gpu_profile.json";
  o.trace = dir + "/gpu_trace.json";
  const profiler::ProfileDoc d = profiler::run_profile(o);
  ASSERT_TRUE(d.timeline.cupti) << d.timeline.source_note;
  // Both levels' overheads, the analysis of the light window.
  EXPECT_EQ(d.run.trace_level, "light");
  EXPECT_EQ(d.overhead.trace_level, "light");
  ASSERT_EQ(d.overhead.levels.size(), 2u);
  EXPECT_EQ(d.overhead.levels[0].trace_level, "light");
  EXPECT_EQ(d.overhead.levels[1].trace_level, "full");
  for (const auto& l : d.overhead.levels) EXPECT_GT(l.traced_median, 0.0);
  std::printf("engine tracing overhead (tiny, 16 tokens): light %.1f %%, full %.1f %%\n",
              100 * d.overhead.levels[0].overhead_fraction,
              100 * d.overhead.levels[1].overhead_fraction);
  // --trace-padding auto: the untraced steps after the light window are what the pure function
  // gives for its dilation, and none of their GPU work is in the timeline.
  const auto& oh = d.overhead;
  EXPECT_EQ(oh.trace_padding, "auto");
  EXPECT_EQ(oh.untraced_padding_steps,
            profiler::choose_untraced_padding(oh.overhead_fraction, 16, oh.untraced_median,
                                              profiler::kPaddingTargetFraction,
                                              profiler::kPaddingMaxExtraSeconds,
                                              profiler::kPaddingMaxWindowFactor)
                .steps);
  EXPECT_GT(oh.profile_run_tok_s, 0.0);
  std::printf("profiling run (16 traced + %lld untraced steps): %.1f %% overhead\n",
              static_cast<long long>(oh.untraced_padding_steps),
              100 * oh.profile_run_overhead_fraction);
  for (const auto& win : d.timeline.windows) {
    if (win.kind != "decode") continue;
    for (const auto& op : d.timeline.ops) EXPECT_LT(op.start, win.end);
  }
  ASSERT_FALSE(d.windows.empty());
  const auto& w = d.windows.back();
  ASSERT_EQ(w.kind, "decode");
  ASSERT_FALSE(w.gpus.empty());
  EXPECT_GT(w.gpus[0].kernels, 16);
  EXPECT_GE(w.gpus[0].idle_fraction, 0.0);
  EXPECT_LE(w.gpus[0].idle_fraction, 1.0);
  double sum = 0;
  for (const auto& b : w.budget) sum += b.us_per_token;
  EXPECT_NEAR(sum * static_cast<double>(w.tokens), w.wall_us, 1e-6 * w.wall_us + 1e-3);
  std::ifstream in(o.trace);
  const auto tj = nlohmann::json::parse(in);
  int flows = 0;
  for (const auto& e : tj["traceEvents"]) flows += e["ph"] == "f" ? 1 : 0;
  EXPECT_GT(flows, 0);
  // Router statistics from the GPU engine's own counts: every decode token of the analysed
  // window selects top-k experts in every layer, and they ride in the summary for the search.
  const ModelConfig cfg = *find_preset("tiny");
  ASSERT_EQ(d.summary.router.tokens, 16);
  ASSERT_EQ(d.summary.router.counts.size(), static_cast<size_t>(cfg.n_layers));
  for (const auto& row : d.summary.router.counts) {
    int64_t n = 0;
    for (int64_t c : row) n += c;
    EXPECT_EQ(n, 16 * cfg.n_experts_used);
  }
}

// A hybrid placement: the measured counts put each selection's bytes on the device holding the
// expert (tiny: layers 0-1 on cuda:0, 2-3 on cpu), so both devices have an expert bandwidth.
TEST(ProfilerGpu, HybridExpertBytesFollowTheMeasuredRouting) {
  KTUNE_REQUIRE_GPU();
  profiler::ProfileOptions o = tiny_profile(2, 0);
  o.out = ::testing::TempDir() + "/gpu_hybrid_profile.json";
  const profiler::ProfileDoc d = profiler::run_profile(o);
  ASSERT_EQ(d.summary.router.tokens, 16);
  const auto& w = d.windows.back();
  std::set<std::string> devs;
  for (const auto& e : w.expert_bandwidth) {
    if (e.bytes > 0) devs.insert(e.device);
  }
  EXPECT_EQ(devs.count("cuda:0"), 1u);
  EXPECT_EQ(devs.count("cpu"), 1u);
  for (const auto& n : d.notes) EXPECT_EQ(n.find("assume uniform routing"), std::string::npos) << n;
}

}  // namespace
}  // namespace ktune
