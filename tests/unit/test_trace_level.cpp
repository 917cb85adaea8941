// Trace levels (`ktune profile [--exec] --trace-level light|full|both`) without a GPU: parsing,
// which CUPTI kinds and runtime calls each level selects (inject/trace_level.h, a pure function),
// the activity buffer pool, the CLI's usage errors and help, and the level in profile.json and in
// the terminal report of engine and --exec profiles.
#include <gtest/gtest.h>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "inject/activity_buffers.h"
#include "inject/exec_capture.h"
#include "inject/trace_level.h"
#include "profiler/exec_profile.h"
#include "profiler/profile_doc.h"
#include "profiler/profile_run.h"
#include "profiler/profile_summary.h"
#include "profiler/report.h"
#include "subprocess.h"

namespace {

using namespace ktune;
using trace_level::Kind;
using trace_level::Level;
using trace_level::Tracer;

bool has(const std::vector<Kind>& v, Kind k) { return std::find(v.begin(), v.end(), k) != v.end(); }

TEST(TraceLevel, ParsesLightAndFullOnly) {
  Level l = Level::Full;
  EXPECT_TRUE(trace_level::parse_level("light", &l));
  EXPECT_EQ(l, Level::Light);
  EXPECT_TRUE(trace_level::parse_level("full", &l));
  EXPECT_EQ(l, Level::Full);
  for (const char* bad : {"", "Light", "both", "fast", "light "}) {
    Level x = Level::Light;
    EXPECT_FALSE(trace_level::parse_level(bad, &x)) << bad;
    EXPECT_EQ(x, Level::Light) << bad;  // untouched
  }
  EXPECT_STREQ(trace_level::level_name(Level::Light), "light");
  EXPECT_STREQ(trace_level::level_name(Level::Full), "full");
}

TEST(TraceLevel, LightSelectsWhatTheAnalysisNeedsOnly) {
  for (Tracer tr : {Tracer::Engine, Tracer::Injection}) {
    const auto s = trace_level::select_kinds(Level::Light, tr);
    EXPECT_EQ(s.level, Level::Light);
    // GPU work: kernels as CONCURRENT_KERNEL (never the serializing KIND_KERNEL), copies, memsets.
    EXPECT_TRUE(has(s.kinds, Kind::ConcurrentKernel));
    EXPECT_TRUE(has(s.kinds, Kind::Memcpy));
    EXPECT_TRUE(has(s.kinds, Kind::Memset));
    // Runtime API records: the injection selects calls (a PyTorch step makes several runtime
    // calls per launch); the engine, whose calls are nearly all launches, records them all.
    const bool injection = tr == Tracer::Injection;
    EXPECT_EQ(has(s.kinds, Kind::Runtime), !injection);
    EXPECT_EQ(s.runtime_api_subset, injection);
    for (Kind k : {Kind::Synchronization, Kind::Overhead, Kind::Marker, Kind::MarkerData}) {
      EXPECT_FALSE(has(s.kinds, k)) << trace_level::kind_name(k);
    }
    EXPECT_GE(s.not_recorded.size(), injection ? 3u : 2u);
  }
  // The engine also traces peer copies; the injection asks CUPTI for device names.
  EXPECT_TRUE(has(trace_level::select_kinds(Level::Light, Tracer::Engine).kinds, Kind::MemcpyPeer));
  EXPECT_TRUE(has(trace_level::select_kinds(Level::Light, Tracer::Injection).kinds, Kind::Device));
}

TEST(TraceLevel, FullSelectsEverything) {
  const auto e = trace_level::select_kinds(Level::Full, Tracer::Engine);
  for (Kind k : {Kind::ConcurrentKernel, Kind::Memcpy, Kind::MemcpyPeer, Kind::Memset,
                 Kind::Runtime, Kind::Synchronization, Kind::Marker, Kind::MarkerData,
                 Kind::Overhead}) {
    EXPECT_TRUE(has(e.kinds, k)) << trace_level::kind_name(k);
  }
  EXPECT_FALSE(e.runtime_api_subset);
  EXPECT_TRUE(e.not_recorded.empty());
  const auto i = trace_level::select_kinds(Level::Full, Tracer::Injection);
  for (Kind k : {Kind::ConcurrentKernel, Kind::Memcpy, Kind::Memset, Kind::Runtime,
                 Kind::Synchronization, Kind::Overhead, Kind::Device}) {
    EXPECT_TRUE(has(i.kinds, k)) << trace_level::kind_name(k);
  }
  // The injection records NVTX itself, not through CUPTI markers.
  EXPECT_FALSE(has(i.kinds, Kind::Marker));
  EXPECT_TRUE(i.not_recorded.empty());
  // No kind twice.
  for (const auto& s : {e, i}) {
    auto k = s.kinds;
    std::sort(k.begin(), k.end());
    EXPECT_EQ(std::adjacent_find(k.begin(), k.end()), k.end());
  }
}

TEST(TraceLevel, RuntimeApiBaseNames) {
  EXPECT_EQ(trace_level::runtime_api_base("cudaLaunchKernel_v7000"), "cudaLaunchKernel");
  EXPECT_EQ(trace_level::runtime_api_base("cudaMemcpyAsync_ptsz_v7000"), "cudaMemcpyAsync");
  EXPECT_EQ(trace_level::runtime_api_base("cudaMemcpy_ptds_v7000"), "cudaMemcpy");
  EXPECT_EQ(trace_level::runtime_api_base("__cudaLaunchKernel_v13000"), "cudaLaunchKernel");
  EXPECT_EQ(trace_level::runtime_api_base("cudaGetDevice"), "cudaGetDevice");
  EXPECT_EQ(trace_level::runtime_api_base("cudaFoo_vx"), "cudaFoo_vx");  // not a version
}

// Names exactly as CUDA 13.0's cupti_runtime_cbid.h spells them.
TEST(TraceLevel, LightKeepsLaunchingCopyingAndBlockingRuntimeCallsOnly) {
  for (const char* keep :
       {"cudaLaunchKernel_v7000", "cudaLaunchKernel_ptsz_v7000", "__cudaLaunchKernel_v13000",
        "__cudaLaunchKernel_ptsz_v13000", "cudaLaunchKernelExC_v11060",
        "cudaLaunchKernelExC_ptsz_v11060", "cudaLaunchCooperativeKernel_v9000",
        "cudaLaunchCooperativeKernelMultiDevice_v9000", "cudaLaunchHostFunc_v10000",
        "cudaLaunchHostFunc_ptsz_v10000", "cudaLaunch_v3020", "cudaGraphLaunch_v10000",
        "cudaGraphLaunch_ptsz_v10000", "cudaMemcpy_v3020", "cudaMemcpyAsync_v3020",
        "cudaMemcpyAsync_ptsz_v7000", "cudaMemcpy2DAsync_v3020", "cudaMemcpyPeerAsync_v4000",
        "cudaMemcpyToSymbolAsync_v3020", "cudaMemcpyBatchAsync_v13000", "cudaMemset_v3020",
        "cudaMemsetAsync_v3020", "cudaMemsetAsync_ptsz_v7000", "cudaMemset3DAsync_v3020",
        "cudaDeviceSynchronize_v3020", "cudaStreamSynchronize_v3020",
        "cudaStreamSynchronize_ptsz_v7000", "cudaEventSynchronize_v3020",
        "cudaThreadSynchronize_v3020"}) {
    EXPECT_TRUE(trace_level::keep_runtime_api(keep)) << keep;
  }
  // What PyTorch calls around every op, and graph building: not recorded at level light.
  for (const char* drop :
       {"cudaGetDevice_v3020", "cudaSetDevice_v3020", "cudaGetLastError_v3020",
        "cudaPeekAtLastError_v3020", "cudaStreamIsCapturing_v10000",
        "cudaStreamGetCaptureInfo_v10010", "cudaEventRecord_v3020", "cudaEventQuery_v3020",
        "cudaStreamWaitEvent_v3020", "cudaMalloc_v3020", "cudaFree_v3020",
        "cudaFuncGetAttributes_v3020", "cudaGraphInstantiate_v10000", "cudaGraphUpload_v10000",
        "cudaGraphAddKernelNode_v10000", "cudaGraphAddMemcpyNode_v10000",
        "cudaMemSetMemPool_v13000", "cudaMemGetInfo_v3020", "cudaStreamQuery_v3020",
        "cudaDeviceGetAttribute_v5000", "cudaStreamBeginCapture_v10000"}) {
    EXPECT_FALSE(trace_level::keep_runtime_api(drop)) << drop;
  }
}

TEST(TraceLevel, BufferPoolHandsOutZeroedBuffersAndReusesThem) {
  exec_capture::ActivityBufferPool pool(4096, 3, 1);
  uint8_t* a = pool.take();
  uint8_t* b = pool.take();
  uint8_t* c = pool.take();
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(pool.take(), nullptr);  // three in flight: CUPTI drops and counts
  EXPECT_EQ(pool.in_flight(), 3u);
  for (size_t i = 0; i < 4096; ++i) ASSERT_EQ(a[i], 0) << i;
  std::fill(a, a + 4096, uint8_t{0xab});  // CUPTI writes records
  std::fill(b, b + 4096, uint8_t{0xcd});
  pool.give_back(a);  // kept (zeroed)
  pool.give_back(b);  // beyond `keep`: freed
  pool.give_back(nullptr);
  EXPECT_EQ(pool.in_flight(), 1u);
  EXPECT_EQ(pool.kept(), 1u);
  uint8_t* again = pool.take();
  EXPECT_EQ(again, a);  // reused
  for (size_t i = 0; i < 4096; ++i) ASSERT_EQ(again[i], 0) << i;
  pool.give_back(again);
  pool.give_back(c);
  EXPECT_EQ(pool.in_flight(), 0u);
}

// ---- the CLI ----

TEST(TraceLevelCli, BadLevelsAreOneLineUsageErrors) {
  test::expect_usage_errors({
      {{"profile", "--model", "synth:tiny", "--trace-level", "fast"},
       "ktune: error: --trace-level fast: is not a trace level; use light (the default), full or "
       "both"},
      {{"profile", "--exec", "--trace-level", "both", "--", "/bin/true"},
       "ktune: error: --trace-level both: applies to the engine's profile only; "},
      {{"profile", "--exec", "--trace-level", "verbose", "--", "/bin/true"},
       "ktune: error: --trace-level verbose: is not a trace level; use light (the default) or "
       "full"},
      {{"profile", "--hardware", "--trace-level", "full"}, "ktune: error: --trace-level: "},
  });
}

TEST(TraceLevelCli, HelpTeachesTheLevels) {
  const auto r = test::run_ktune({"profile", "--help"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("--trace-level"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("light (default)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("both (engine only)"), std::string::npos) << r.out;
}

// ---- profile.json and the report ----

profiler::ProfileDoc doc_with_levels() {
  profiler::ProfileDoc d;
  d.run.engine = "gpu";
  d.run.trace_level = "light";
  d.run.trace_mode = "cupti level light (...) + host spans";
  auto& o = d.overhead;
  o.untraced_tok_s = {100, 100, 100};
  o.untraced_median = 100;
  o.trace_level = "light";
  o.not_recorded = trace_level::select_kinds(Level::Light, Tracer::Engine).not_recorded;
  o.levels = {{"light", {97}, 97, 0.03}, {"full", {80}, 80, 0.2}};
  o.traced_tok_s = {97};
  o.traced_median = 97;
  o.overhead_fraction = 0.03;
  return d;
}

TEST(TraceLevelReport, TerminalReportPrintsTheOverheadOfEachLevel) {
  const std::string rep = profiler::terminal_report(doc_with_levels());
  EXPECT_NE(rep.find("# tracing overhead (level light): 3.0 %"), std::string::npos) << rep;
  EXPECT_NE(rep.find("# tracing overhead (level full): 20.0 %"), std::string::npos) << rep;
  EXPECT_NE(rep.find("# tracing: cupti level light"), std::string::npos) << rep;
}

TEST(TraceLevelReport, ProfileJsonRecordsTheLevelsAndTheRecordedProfilesStillRead) {
  char tmpl[] = "/tmp/ktune_trace_level_XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  const std::string p = dir + "/p.json";
  profiler::write_profile_json(p, doc_with_levels());
  const auto j = profile::read_profile_document(p);
  EXPECT_EQ(j["ktune_profile"], profile::kProfileSchemaVersion);  // schema unchanged
  EXPECT_EQ(j["run"]["trace_level"], "light");
  const auto& o = j["overhead"];
  EXPECT_EQ(o["trace_level"], "light");
  EXPECT_GE(o["not_recorded"].size(), 3u);
  ASSERT_EQ(o["levels"].size(), 2u);
  EXPECT_EQ(o["levels"][0]["trace_level"], "light");
  EXPECT_DOUBLE_EQ(o["levels"][1]["overhead_fraction"].get<double>(), 0.2);
  EXPECT_DOUBLE_EQ(o["overhead_fraction"].get<double>(), 0.03);
  (void)!std::system(("rm -rf " + test::shell_quote(dir)).c_str());
  // Profiles recorded before trace levels (no overhead.trace_level) read as before.
  for (const char* f : {"h100-16core.json", "h100x4-nvlink.json"}) {
    const std::string path = std::string(KTUNE_TEST_DATA) + "/../../profiles/" + f;
    EXPECT_NO_THROW(profile::read_profile_document(path)) << path;
    EXPECT_NO_THROW(profile::read_profile_summary(path)) << path;
  }
}

// Without CUPTI (this machine, the CPU engine) the level changes nothing: one traced window,
// level "none", and `both` says so.
TEST(TraceLevelReport, CpuEngineProfileRecordsNoLevel) {
  profiler::ProfileOptions o;
  o.run.model = "synth:tiny";
  o.run.model_given = true;
  o.run.threads = {1};
  o.run.prompt = 0;
  o.run.gen = 4;
  o.warmup = 1;
  o.untraced_windows = 1;
  o.quick = true;
  o.quiet = true;
  o.trace_levels = {Level::Light, Level::Full};
  char tmpl[] = "/tmp/ktune_trace_level_XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  o.out = dir + "/p.json";
  const profiler::ProfileDoc d = profiler::run_profile(o);
  EXPECT_EQ(d.run.trace_level, "none");
  EXPECT_EQ(d.overhead.trace_level, "none");
  ASSERT_EQ(d.overhead.levels.size(), 1u);
  EXPECT_EQ(d.overhead.levels[0].trace_level, "none");
  EXPECT_TRUE(d.overhead.not_recorded.empty());
  std::string notes;
  for (const auto& n : d.notes) notes += n + "\n";
  EXPECT_NE(notes.find("--trace-level both: without CUPTI"), std::string::npos) << notes;
  EXPECT_NE(profiler::terminal_report(d).find("# tracing overhead (host spans only): "),
            std::string::npos);
  (void)!std::system(("rm -rf " + test::shell_quote(dir)).c_str());
}

// ---- --exec: the level travels in the capture ----

exec_capture::Capture one_kernel_capture(const std::string& level) {
  exec_capture::Capture c;
  c.pid = 7;
  c.cuda_initialized = true;
  c.cupti_ok = true;
  c.trace_start = 1'000'000;
  c.trace_end = 9'000'000;
  c.trace_level = level;
  exec_capture::Op op;
  op.start = 2'000'000;
  op.end = 2'001'000;
  op.name = c.intern("k");
  op.correlation = 1;
  c.ops.push_back(op);
  c.api.push_back({c.intern("cudaLaunchKernel"), 3, 1'990'000, 1'995'000, 1});
  return c;
}

TEST(TraceLevelExec, TheCapturesLevelReachesProfileJsonAndTheReport) {
  profiler::ExecRunInfo run;
  run.command = {"prog"};
  const auto cap = profiler::parse_exec_capture(exec_capture::to_json(one_kernel_capture("light")),
                                                "c.json");
  EXPECT_EQ(cap.trace_level, "light");
  const auto doc = profiler::analyze_exec_capture(cap, "", run);
  EXPECT_EQ(doc.run.trace_level, "light");
  EXPECT_EQ(doc.exec["trace_level"], "light");
  EXPECT_GE(doc.exec["not_recorded"].size(), 3u);
  EXPECT_EQ(doc.overhead.trace_level, "light");
  const std::string rep = profiler::terminal_report(doc);
  EXPECT_NE(rep.find("# tracing: cupti level light"), std::string::npos) << rep;
  EXPECT_NE(rep.find("# note: trace level light: every metric of this report is measured; not "
                     "recorded: "),
            std::string::npos)
      << rep;
  // Launch latency is still there at level light.
  ASSERT_EQ(doc.windows.size(), 1u);
  ASSERT_EQ(doc.windows[0].gpus.size(), 1u);
  EXPECT_EQ(doc.windows[0].gpus[0].latency_samples, 1);

  const auto full = profiler::analyze_exec_capture(
      profiler::parse_exec_capture(exec_capture::to_json(one_kernel_capture("full")), "c.json"),
      "", run);
  EXPECT_EQ(full.exec["trace_level"], "full");
  EXPECT_TRUE(full.exec["not_recorded"].empty());
  for (const auto& n : full.notes) EXPECT_EQ(n.find("trace level"), std::string::npos) << n;
}

TEST(TraceLevelExec, CapturesWithoutALevelWereFull) {
  auto j = nlohmann::json::parse(exec_capture::to_json(one_kernel_capture("light")));
  j["process"].erase("trace_level");
  EXPECT_EQ(profiler::parse_exec_capture(j.dump(), "old.json").trace_level, "full");
}

}  // namespace
