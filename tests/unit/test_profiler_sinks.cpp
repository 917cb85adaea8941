// The profiler's outputs: the timeline's JSON round trip, the Chrome trace's structure (Kineto
// shape: processes per device, stream tracks, flows, metadata), the verdict rules, the topology
// warnings, and end to end on this machine (CPU engine, host spans only): `ktune profile` of the
// tiny model writes a valid profile.json (the summary validates), the timeline beside it, a
// trace and an HTML report; `ktune trace` reads it back; `ktune profile --hardware --quick`.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "ktune/engine/error.h"
#include "profiler/chrome_trace.h"
#include "profiler/profile_run.h"
#include "profiler/report.h"
#include "profiler/topology.h"
#include "unit/subprocess.h"

namespace ktune::profiler {
namespace {

using nlohmann::json;
using trace::Phase;

constexpr int64_t us = 1000;

Timeline sample_timeline() {
  Timeline t;
  t.origin = 1'000'000'000;
  const int64_t o = t.origin;
  t.gpus.push_back({0, "Test GPU \"quoted\""});
  t.threads.push_back({4242, 0x7f00aabbccddull, "main (engine driver)"});
  t.spans.push_back({0, Phase::DecodeStep, 1, o, o + 100 * us});
  t.spans.push_back({0, Phase::Attention, 0, o + 1 * us, o + 40 * us});
  const int32_t launch = t.intern("cudaLaunchKernel");
  t.api.push_back({launch, 4242, o + 2 * us, o + 5 * us, 11});
  t.api.push_back({launch, 4242, o + 6 * us, o + 8 * us, 12});
  GpuOp k;
  k.device = 0;
  k.stream = 7;
  k.start = o + 10 * us;
  k.end = o + 20 * us;
  k.correlation = 11;
  k.name = t.intern("attention_kernel");
  t.ops.push_back(k);
  k.start = o + 25 * us;
  k.end = o + 30 * us;
  k.correlation = 12;
  k.name = t.intern("moe_kernel");
  t.ops.push_back(k);
  GpuOp c;
  c.kind = GpuOpKind::Memcpy;
  c.stream = 7;
  c.start = o + 31 * us;
  c.end = o + 33 * us;
  c.bytes = 4096;
  c.name = t.intern("Memcpy DtoH");
  t.ops.push_back(c);
  t.syncs.push_back({t.intern("stream synchronize"), 7, o + 33 * us, o + 34 * us, 0});
  t.markers.push_back({t.intern("user range"), t.intern("app"), 4242, o, o + 50 * us, 0, false});
  t.graph_nodes.push_back({99, 5, Phase::Router});
  t.node_clone_of[100] = 99;
  t.windows.push_back({"decode", 1, o, o + 100 * us});
  t.cupti = true;
  t.source_note = "cupti";
  t.dropped_records = 3;
  return t;
}

TEST(ProfilerSinks, TimelineJsonRoundTrip) {
  const Timeline t = sample_timeline();
  const json j = timeline_to_json(t);
  const Timeline b = timeline_from_json(json::parse(j.dump()), "x.json");
  ASSERT_EQ(b.ops.size(), t.ops.size());
  for (size_t i = 0; i < t.ops.size(); ++i) {
    EXPECT_EQ(b.ops[i].start, t.ops[i].start);
    EXPECT_EQ(b.ops[i].end, t.ops[i].end);
    EXPECT_EQ(b.ops[i].kind, t.ops[i].kind);
    EXPECT_EQ(b.str(b.ops[i].name), t.str(t.ops[i].name));
    EXPECT_EQ(b.ops[i].correlation, t.ops[i].correlation);
  }
  ASSERT_EQ(b.api.size(), 2u);
  EXPECT_EQ(b.api[1].end, t.api[1].end);
  EXPECT_EQ(b.api[1].thread, 4242u);
  ASSERT_EQ(b.spans.size(), 2u);
  EXPECT_EQ(b.spans[1].phase, Phase::Attention);
  EXPECT_EQ(b.threads[0].pthread_id, t.threads[0].pthread_id);
  ASSERT_EQ(b.windows.size(), 1u);
  EXPECT_EQ(b.windows[0].end, t.windows[0].end);
  EXPECT_EQ(b.graph_nodes.size(), 1u);
  EXPECT_EQ(b.node_clone_of.at(100), 99u);
  EXPECT_EQ(b.markers.size(), 1u);
  EXPECT_EQ(b.syncs.size(), 1u);
  EXPECT_EQ(b.dropped_records, 3u);
  EXPECT_TRUE(b.cupti);
  // The same metrics from the copy.
  const auto m1 = analyze_window(t, attribute_ops(t), t.windows[0], {});
  const auto m2 = analyze_window(b, attribute_ops(b), b.windows[0], {});
  EXPECT_DOUBLE_EQ(m1.gpus[0].busy_us, m2.gpus[0].busy_us);
  EXPECT_DOUBLE_EQ(m1.gpus[0].launch_latency_median_us, m2.gpus[0].launch_latency_median_us);
}

TEST(ProfilerSinks, TimelineJsonKeepsTheEarliestEventsWhenCapped) {
  Timeline t = sample_timeline();
  TimelineLimits lim;
  lim.max_ops = 2;
  const json j = timeline_to_json(t, lim);
  EXPECT_EQ(j["ops"]["rows"].size(), 2u);
  EXPECT_EQ(j["truncated"]["ops"]["of"], 3);
  const Timeline b = timeline_from_json(j, "x.json");
  EXPECT_EQ(b.ops.back().start, t.ops[1].start);
}

TEST(ProfilerSinks, MalformedTimelineIsAnErrorNamingTheField) {
  json j = timeline_to_json(sample_timeline());
  j["ops"]["rows"][0] = json::array({1, 2});
  try {
    timeline_from_json(j, "p.json");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("p.json: timeline.ops.rows[0]"), std::string::npos)
        << e.what();
  }
}

TEST(ProfilerSinks, ChromeTraceHasKinetoShape) {
  const Timeline t = sample_timeline();
  const std::string text = chrome_trace(t, attribute_ops(t), "test trace");
  EXPECT_NE(text.find("\"distributedInfo\": {\"rank\": 0}"), std::string::npos);  // HTA's regex
  const json j = json::parse(text);
  EXPECT_EQ(j["schemaVersion"], 1);
  EXPECT_EQ(j["baseTimeNanoseconds"], t.origin);
  std::set<std::string> process_names;
  std::map<std::pair<int64_t, int64_t>, std::string> thread_names;
  int kernels = 0, flows_s = 0, flows_f = 0, memcpy = 0, runtime = 0, spans = 0, syncs = 0;
  for (const json& e : j["traceEvents"]) {
    ASSERT_TRUE(e.contains("ph"));
    ASSERT_TRUE(e.contains("ts")) << e.dump();  // speedscope's older releases need ts on M
    const std::string ph = e["ph"];
    if (ph == "M" && e["name"] == "process_name") process_names.insert(e["args"]["name"]);
    if (ph == "M" && e["name"] == "thread_name") {
      thread_names[{e["pid"], e["tid"]}] = e["args"]["name"];
    }
    if (ph == "X") {
      ASSERT_TRUE(e.contains("dur"));
      EXPECT_GE(e["dur"].get<double>(), 0);
      const std::string cat = e["cat"];
      kernels += cat == "kernel";
      memcpy += cat == "gpu_memcpy";
      runtime += cat == "cuda_runtime";
      spans += cat == "user_annotation";
      syncs += cat == "cuda_sync";
      if (cat == "kernel") {
        EXPECT_EQ(e["pid"], 0);
        EXPECT_EQ(e["tid"], 7);
        EXPECT_TRUE(e["args"].contains("correlation"));
      }
      if (cat == "cuda_runtime") {
        EXPECT_EQ(e["pid"], kHostPid);
        EXPECT_EQ(e["tid"], 4242);
      }
      if (e["name"] == "attention_kernel") {
        EXPECT_DOUBLE_EQ(e["ts"].get<double>(), 10.0);
      }
    }
    if (ph == "s") {
      ++flows_s;
      EXPECT_EQ(e["cat"], "ac2g");
    }
    if (ph == "f") {
      ++flows_f;
      EXPECT_EQ(e["bp"], "e");
      EXPECT_EQ(e["pid"], 0);
    }
  }
  EXPECT_EQ(kernels, 2);
  EXPECT_EQ(memcpy, 1);
  EXPECT_EQ(runtime, 2);
  EXPECT_EQ(flows_s, 2);
  EXPECT_EQ(flows_f, 2);
  EXPECT_EQ(syncs, 1);
  EXPECT_EQ(spans, 2 + 1 + 1);  // host spans, the window, the NVTX range of the "app" domain
  EXPECT_TRUE(process_names.count("cuda:0 Test GPU /\"quoted/\"") ||
              process_names.count("cuda:0 Test GPU \"quoted\""));
  EXPECT_TRUE(process_names.count("cpu (ktune)"));
  EXPECT_EQ(thread_names[std::make_pair(int64_t{0}, int64_t{7})], "stream 7");
  EXPECT_EQ(thread_names[std::make_pair(int64_t{kHostPid}, int64_t{4242})], "main (engine driver)");
}

ProfileDoc doc_with(double idle, bool graph, const std::string& moe, double gaps_f,
                    double cpu_f) {
  ProfileDoc d;
  d.run.engine = "gpu";
  d.run.cuda_graph = graph;
  d.run.moe_kernel = moe;
  WindowMetrics w;
  w.kind = "decode";
  w.tokens = 10;
  w.wall_us = 1000;
  w.tok_s = 10000;
  GpuMetrics g;
  g.kernels = 100;
  g.busy_us = 1000 * (1 - idle);
  g.idle_fraction = idle;
  g.phases[Phase::MoeGpu] = {g.busy_us * 0.7, 50, 0};
  g.phases[Phase::Attention] = {g.busy_us * 0.3, 50, 0};
  w.gpus.push_back(g);
  w.budget.push_back({"gpu_experts", 70 * (1 - idle), 0.7 * (1 - idle)});
  w.budget.push_back({"launch_gaps", 100 * gaps_f, gaps_f});
  w.budget.push_back({"cpu_experts_wait", 100 * cpu_f, cpu_f});
  d.windows.push_back(w);
  return d;
}

TEST(ProfilerSinks, VerdictRules) {
  auto v = make_verdict(doc_with(0.58, false, "unfused", 0.5, 0.08));
  EXPECT_EQ(v.headline.rfind("GPU idle 58 % of decode, launch-bound: turn CUDA Graph on or use "
                             "the fused MoE kernel", 0), 0u)
      << v.headline;
  v = make_verdict(doc_with(0.7, true, "fused", 0.1, 0.6));
  EXPECT_NE(v.headline.find("waiting for the CPU experts"), std::string::npos) << v.headline;
  EXPECT_NE(v.headline.find("--pcie-assist"), std::string::npos) << v.headline;  // not on yet
  ProfileDoc assisted = doc_with(0.7, true, "fused", 0.1, 0.6);
  assisted.run.pcie_assist = 0.375;
  v = make_verdict(assisted);
  EXPECT_EQ(v.headline.find("--pcie-assist"), std::string::npos) << v.headline;
  v = make_verdict(doc_with(0.7, true, "unfused", 0.1, 0.6));  // the assist needs fused
  EXPECT_EQ(v.headline.find("--pcie-assist"), std::string::npos) << v.headline;
  v = make_verdict(doc_with(0.3, false, "fused", 0.3, 0.0));
  EXPECT_NE(v.headline.find("partly launch-bound: turn CUDA Graph on (--cuda-graph on)"),
            std::string::npos)
      << v.headline;
  v = make_verdict(doc_with(0.05, true, "fused", 0.05, 0.0));
  EXPECT_NE(v.headline.find("GPU busy 95 % of decode: kernel-bound, moe_gpu takes 70 %"),
            std::string::npos)
      << v.headline;
  ProfileDoc none;
  EXPECT_NE(make_verdict(none).headline.find("no decode window"), std::string::npos);
}

TEST(ProfilerSinks, TopologyWarnings) {
  Topology t;
  t.physical_cores = 16;
  t.logical_cpus = 32;
  t.threads_used = 32;
  t.numa_nodes = 2;
  t.expert_pages_per_node = {100, 50};
  GpuLink g;
  g.device = "cuda:0";
  g.cur_gen = 3;
  g.max_gen = 5;
  g.cur_width = 8;
  g.max_width = 16;
  t.gpus.push_back(g);
  const auto w = topology_warnings(t);
  ASSERT_EQ(w.size(), 3u);
  EXPECT_NE(w[0].find("SMT oversubscription"), std::string::npos);
  EXPECT_NE(w[1].find("2 of 2 NUMA nodes"), std::string::npos);
  EXPECT_NE(w[2].find("gen3 x8 (max gen5 x16)"), std::string::npos);
  t.threads_used = 16;
  t.numa_nodes = 1;
  t.gpus.clear();
  EXPECT_TRUE(topology_warnings(t).empty());
  EXPECT_EQ(pcie_gen_from_speed("16.0 GT/s PCIe"), 4);
  EXPECT_EQ(pcie_gen_from_speed("2.5 GT/s"), 1);
  EXPECT_EQ(pcie_gen_from_speed("32.0 GT/s PCIe"), 5);
  EXPECT_EQ(pcie_gen_from_speed("Unknown"), 0);
}

std::string slurp(const std::string& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST(ProfilerSinks, CpuEngineProfileEndToEnd) {
  ProfileOptions o;
  o.run.model = "synth:tiny";
  o.run.model_given = true;
  o.run.threads = {2};
  o.run.prompt = 8;
  o.run.gen = 12;
  o.warmup = 2;
  o.untraced_windows = 2;
  o.quick = true;
  o.quiet = true;
  const std::string dir = ::testing::TempDir();
  o.out = dir + "/cpu_profile.json";
  o.trace = dir + "/cpu_trace.json";
  o.report = dir + "/cpu_report.html";
  const ProfileDoc d = run_profile(o);
  // The summary validates as the search will read it.
  const profile::ProfileSummary s = profile::read_profile_summary(o.out);
  EXPECT_EQ(s.kind, "model");
  EXPECT_TRUE(s.gpus.empty());
  EXPECT_EQ(s.model.name, "tiny");
  EXPECT_EQ(s.router.tokens, 12);
  ASSERT_EQ(static_cast<int64_t>(s.router.counts.size()), s.model.n_layers);
  ASSERT_FALSE(s.cpu_costs.moe_decode_gb_s.empty());
  EXPECT_EQ(s.cpu_costs.moe_decode_gb_s[0].threads, 2);
  // Windows, host spans, budget.
  ASSERT_EQ(d.windows.size(), 2u);
  EXPECT_EQ(d.windows[0].kind, "prefill");
  const WindowMetrics& w = d.windows[1];
  EXPECT_EQ(w.kind, "decode");
  EXPECT_EQ(w.tokens, 12);
  EXPECT_EQ(w.cpu.workers, 2);
  EXPECT_GT(w.cpu.phases.at(Phase::MoeCpu).wall_us, 0);
  double sum = 0;
  for (const BudgetItem& b : w.budget) sum += b.us_per_token;
  EXPECT_NEAR(sum * 12, w.wall_us, 1e-6 * w.wall_us);
  EXPECT_FALSE(d.timeline.cupti);
  EXPECT_NE(d.timeline.source_note.find("host spans only"), std::string::npos);
  EXPECT_EQ(d.overhead.untraced_tok_s.size(), 2u);
  EXPECT_FALSE(d.verdict.headline.empty());
  // profile.json: schema key, sections, the timeline file beside it.
  const json pj = json::parse(slurp(o.out));
  EXPECT_EQ(pj["ktune_profile"], profile::kProfileSchemaVersion);
  for (const char* k : {"summary", "run", "windows", "router", "overhead", "topology", "verdict",
                        "timeline"}) {
    EXPECT_TRUE(pj.contains(k)) << k;
  }
  EXPECT_EQ(pj["timeline_file"], "cpu_profile.timeline.json");
  EXPECT_FALSE(slurp(dir + "/cpu_profile.timeline.json").empty());
  // The trace parses and holds the engine's spans; the report is one self-contained page.
  const json tj = json::parse(slurp(o.trace));
  EXPECT_GT(tj["traceEvents"].size(), 50u);
  const std::string html = slurp(o.report);
  EXPECT_NE(html.find("<svg"), std::string::npos);
  EXPECT_NE(html.find("<canvas"), std::string::npos);
  EXPECT_EQ(html.find("http://"), std::string::npos);
  EXPECT_EQ(html.find("https://"), std::string::npos);
  EXPECT_EQ(html.find("src="), std::string::npos);  // nothing loaded from elsewhere
  // `ktune trace` on the recorded profile.
  const auto r = test::run_ktune({"trace", o.out, "-o", dir + "/t2.json"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(json::parse(slurp(dir + "/t2.json"))["traceEvents"].size(), tj["traceEvents"].size());
}

TEST(ProfilerSinks, HardwareProfileOnACpuOnlyMachineIsValid) {
  const std::string out = ::testing::TempDir() + "/machine.json";
  const auto r = test::run_ktune(
      {"profile", "--hardware", "--quick", "-t", "1,2", "-o", out});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("verdict:"), std::string::npos) << r.out;
  const profile::ProfileSummary s = profile::read_profile_summary(out);
  EXPECT_EQ(s.kind, "hardware");
  EXPECT_EQ(s.cpu.read_gb_s.size(), 2u);
  EXPECT_EQ(s.cpu_costs.moe_decode_gb_s.size(), 2u);
  EXPECT_TRUE(s.model.name.empty());
}

TEST(ProfilerSinks, ProfileUsageErrors) {
  auto r = test::run_ktune({"profile", "--hardware", "--model", "synth:tiny"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.err.find("ktune: error: --hardware"), std::string::npos) << r.err;
  r = test::run_ktune({"profile", "--model", "synth:tiny", "-n", "0"});
  EXPECT_EQ(r.exit_code, 2);
  r = test::run_ktune({"trace", "/nonexistent/p.json"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("cannot open"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace ktune::profiler
