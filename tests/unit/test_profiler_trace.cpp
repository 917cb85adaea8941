// The engine's trace hooks (ktune/engine/trace.h): host spans per thread while a collection is
// on, nothing while off, full buffers counted, phase names, and the CPU engine's spans.
#include <gtest/gtest.h>

#include <set>
#include <thread>

#include "ktune/engine/cpu_engine.h"
#include "ktune/engine/synthetic.h"
#include "ktune/engine/trace.h"

namespace ktune::trace {
namespace {

TEST(ProfilerTrace, ScopesRecordSpansOnlyWhileCollecting) {
  { Scope s(Phase::Attention, 3); }  // before start(): not recorded
  start();
  name_thread("main");
  {
    Scope step(Phase::DecodeStep, 1);
    { Scope a(Phase::Attention, 0); }
    { Scope r(Phase::Router, 0); }
  }
  std::thread worker([] {
    name_thread("worker", 2);
    Scope m(Phase::MoeCpu, 7);
  });
  worker.join();
  stop();
  { Scope s(Phase::Attention, 4); }  // after stop(): not recorded
  const Collected c = collect();
  ASSERT_EQ(c.spans.size(), 4u);
  ASSERT_EQ(c.threads.size(), 2u);
  EXPECT_EQ(c.threads[0].name, "main");
  EXPECT_EQ(c.threads[1].name, "worker 2");
  EXPECT_NE(c.threads[0].os_tid, c.threads[1].os_tid);
  // Inner spans end first: attention, router, then the step around them.
  EXPECT_EQ(c.spans[0].phase, Phase::Attention);
  EXPECT_EQ(c.spans[1].phase, Phase::Router);
  EXPECT_EQ(c.spans[2].phase, Phase::DecodeStep);
  EXPECT_LE(c.spans[2].begin_ns, c.spans[0].begin_ns);
  EXPECT_GE(c.spans[2].end_ns, c.spans[1].end_ns);
  EXPECT_EQ(c.spans[3].phase, Phase::MoeCpu);
  EXPECT_EQ(c.spans[3].arg, 7);
  EXPECT_EQ(c.spans[3].thread, 1u);
  EXPECT_EQ(c.dropped, 0u);
}

TEST(ProfilerTrace, AFullBufferDropsAndCounts) {
  Options o;
  o.spans_per_thread = 3;
  start(o);
  for (int i = 0; i < 5; ++i) record_span(Phase::Other, i, i, i + 1);
  stop();
  const Collected c = collect();
  EXPECT_EQ(c.spans.size(), 3u);
  EXPECT_EQ(c.dropped, 2u);
  start();  // a new collection forgets the old one
  stop();
  EXPECT_TRUE(collect().spans.empty());
}

TEST(ProfilerTrace, PhaseNamesRoundTrip) {
  std::set<std::string> names;
  for (int i = 0; i < kPhaseCount; ++i) {
    const auto p = static_cast<Phase>(i);
    Phase back;
    ASSERT_TRUE(phase_from_name(phase_name(p), &back));
    EXPECT_EQ(back, p);
    names.insert(phase_name(p));
  }
  EXPECT_EQ(names.size(), static_cast<size_t>(kPhaseCount));
  Phase x;
  EXPECT_FALSE(phase_from_name("nonsense", &x));
  EXPECT_EQ(std::string(phase_name(Phase::MoeGpu)), "moe_gpu");
}

TEST(ProfilerTrace, GraphCaptureWithoutCudaTagsNothing) {
  // On a machine without a GPU (or a CPU-only build) there is no capture to tag: no crash, no
  // tags, and Scopes inside still work.
  clear_graph_node_tags();
  GraphCapture cap(nullptr);
  { Scope s(Phase::Attention, 0); }
  cap.finish(nullptr);
  EXPECT_EQ(cap.tagged(), 0u);
  EXPECT_TRUE(graph_node_tags().empty());
}

TEST(ProfilerTrace, CpuEngineEmitsSpansPerWorkerLayerAndPhase) {
  SynthOptions so;
  so.preset = "tiny";
  const ModelWeights m = make_synthetic_model(so);
  CpuEngineOptions eo;
  eo.threads = 2;
  eo.max_context = 16;
  eo.pin_threads = false;
  CpuEngine e(m, eo);
  std::vector<float> logits;
  start();
  e.decode(1, &logits);
  stop();
  const Collected c = collect();
  const int64_t L = m.cfg.n_layers;
  // Per worker and layer: attention, router, moe_cpu; plus the output head (sampling) per
  // worker and one decode step span.
  int step = 0, sampling = 0;
  std::map<std::pair<uint32_t, Phase>, std::set<int32_t>> layers;
  for (const HostSpan& s : c.spans) {
    EXPECT_LE(s.begin_ns, s.end_ns);
    if (s.phase == Phase::DecodeStep) ++step;
    if (s.phase == Phase::Sampling) ++sampling;
    if (s.phase == Phase::Attention || s.phase == Phase::Router || s.phase == Phase::MoeCpu) {
      layers[{s.thread, s.phase}].insert(s.arg);
    }
  }
  EXPECT_EQ(step, 1);
  EXPECT_EQ(sampling, 2);
  EXPECT_EQ(layers.size(), 6u);  // 2 workers x 3 phases
  for (const auto& [k, ls] : layers) EXPECT_EQ(static_cast<int64_t>(ls.size()), L);
  EXPECT_EQ(c.spans.size(), static_cast<size_t>(1 + 2 + 2 * 3 * L));
}

}  // namespace
}  // namespace ktune::trace
