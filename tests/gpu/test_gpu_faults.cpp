// GPU faults (issue 8, item 3; docs/reliability.md): the GPU out of memory at load (another
// process holds it) is a ktune::Error naming the device, the need and what is free, and the
// device works again once memory is back; the planner refuses a plan beyond the device's real
// budget before loading; CUPTI held by another profiler (a second subscriber) or switched off
// (KTUNE_NO_CUPTI) gives a profile of host spans only that says why. Skipped without a GPU.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "gpu/engine_test_util.h"
#include "gpu/gpu_test_util.h"
#include "ktune/engine/cuda/cuda_check.h"
#include "ktune/engine/error.h"
#include "ktune/engine/gpu_engine.h"
#include "profiler/cupti_activity.h"
#include "profiler/profile_run.h"
#include "profiler/profile_summary.h"
#include "unit/subprocess.h"

#if KTUNE_WITH_CUPTI
#include <cupti.h>
#endif

namespace ktune {
namespace {

namespace fs = std::filesystem;
using test::count_lines;
using test::ProcessResult;
using test::run_ktune;

// Device memory held for the length of a test, as another process would hold it: every block
// cudaMalloc still gives, largest first, until less than `leave_bytes` is free.
class MemoryHog {
 public:
  explicit MemoryHog(size_t leave_bytes) {
    for (size_t chunk : {size_t{1} << 30, size_t{256} << 20, size_t{64} << 20, size_t{16} << 20,
                         size_t{4} << 20, size_t{1} << 20}) {
      for (;;) {
        size_t free_b = 0, total_b = 0;
        if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) return;
        if (free_b < leave_bytes + chunk) break;
        try {
          held_.emplace_back(chunk, "the test's memory hog");
        } catch (const Error&) {
          break;
        }
      }
    }
  }
  size_t held_bytes() const {
    size_t n = 0;
    for (const auto& b : held_) n += b.size();
    return n;
  }
  static size_t free_bytes() {
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    return free_b;
  }

 private:
  std::vector<cuda::DeviceBuffer> held_;
};

// One stderr line "ktune: error: <where>: <problem>; <fix>" last (a load message may precede it)
// and no other error line.
void expect_one_error_line(const ProcessResult& r, int code, const std::vector<std::string>& needles) {
  ASSERT_FALSE(r.signaled) << "signal " << r.signal << ": " << r.err;
  EXPECT_EQ(r.exit_code, code) << r.err;
  const size_t at = r.err.find("ktune: error: ");
  ASSERT_NE(at, std::string::npos) << r.err;
  EXPECT_EQ(at, r.err.rfind("ktune: error: ")) << "one error line: " << r.err;
  const std::string line = r.err.substr(at);
  EXPECT_EQ(count_lines(line), 1) << r.err;
  EXPECT_NE(line.find("; "), std::string::npos) << line;
  for (const std::string& n : needles) {
    EXPECT_NE(line.find(n), std::string::npos) << "expected '" << n << "' in: " << line;
  }
}

TEST(GpuFaults, OutOfMemoryAtLoadNamesTheDeviceTheNeedAndWhatIsFree) {
  KTUNE_REQUIRE_GPU();
  KTUNE_CUDA_CHECK(cudaSetDevice(0));
  const ModelWeights& m = test::tiny(QuantType::Q8_0);  // 7.7 MiB of weights
  {
    MemoryHog hog(size_t{2} << 20);
    ASSERT_LT(MemoryHog::free_bytes(), size_t{8} << 20) << "could not fill the device";
    try {
      GpuEngine e(m, {64, false, MoeKernel::Fused});
      FAIL() << "the engine loaded with " << MemoryHog::free_bytes() << " bytes free";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_EQ(e.where(), "cuda:0") << msg;
      EXPECT_NE(msg.find("out of"), std::string::npos) << msg;
      EXPECT_NE(msg.find("memory"), std::string::npos) << msg;
      EXPECT_NE(msg.find("is free"), std::string::npos) << msg;
      EXPECT_NE(e.fix().find("nvidia-smi"), std::string::npos) << msg;
      std::printf("[ message  ] %s\n", msg.c_str());
    }
  }
  // The failure left nothing sticky: with the memory back the same engine loads and decodes.
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  GpuEngine e(m, {64, false, MoeKernel::Fused});
  EXPECT_EQ(e.generate_greedy(1, 4).size(), 4u);
}

// The same from the command line, with the memory held by this process (another process, as
// the ktune child sees it): one error line, exit 1, no abort. ktune's own CUDA context needs a
// few hundred MiB, so the failure may come from the context or from the engine's buffers.
TEST(GpuFaults, OutOfMemoryAtLoadFromTheCommandLineIsOneLine) {
  KTUNE_REQUIRE_GPU();
  KTUNE_CUDA_CHECK(cudaSetDevice(0));
  MemoryHog hog(size_t{64} << 20);
  ASSERT_LT(MemoryHog::free_bytes(), size_t{128} << 20) << "could not fill the device";
  const ProcessResult r = run_ktune({"run", "--model", "synth:tiny", "--experts-on-gpu", "4", "-p",
                                     "0", "-n", "2", "-r", "1", "--no-probe"},
                                    120);
  expect_one_error_line(r, 1, {"cuda"});
  std::printf("[ stderr   ] %s", r.err.c_str());
}

// A plan beyond the device's real budget (its memory less 256 MiB, no --gpu-mem) is refused
// before the 235B model is built (which would take minutes), naming device, need and budget.
TEST(GpuFaults, PlannerRefusesAPlanBeyondTheDeviceBeforeLoading) {
  KTUNE_REQUIRE_GPU();
  for (const std::vector<std::string>& args : std::vector<std::vector<std::string>>{
           {"run", "--model", "synth:qwen3-235b-a22b:q8_0", "--experts-on-gpu", "94", "-p", "0",
            "-n", "1"},
           {"profile", "--model", "synth:qwen3-235b-a22b:q8_0", "--experts-on-gpu", "94", "-n",
            "2", "-q", "-o", ::testing::TempDir() + "/never.json"}}) {
    const ProcessResult r = run_ktune(args, 60);
    expect_one_error_line(r, 1, {"cuda:0", "the plan needs", "but the budget is"});
    EXPECT_EQ(count_lines(r.err), 1) << r.err;
  }
  EXPECT_FALSE(fs::exists(::testing::TempDir() + "/never.json"));
}

profiler::ProfileOptions gpu_profile_options(const std::string& out) {
  profiler::ProfileOptions o;
  o.run.model = "synth:tiny";
  o.run.model_given = true;
  o.run.experts_on_gpu = {4};
  o.run.prompt = 4;
  o.run.gen = 8;
  o.warmup = 2;
  o.untraced_windows = 1;
  o.quick = true;
  o.quiet = true;
  o.gpu_probes = false;
  o.out = out;
  return o;
}

bool any_note_has(const profiler::ProfileDoc& d, const std::string& text) {
  for (const std::string& n : d.notes) {
    if (n.find(text) != std::string::npos) return true;
  }
  return false;
}

#if KTUNE_WITH_CUPTI
void CUPTIAPI ignore_callback(void*, CUpti_CallbackDomain, CUpti_CallbackId, const void*) {}

// Another CUPTI client holds the one subscriber slot (Nsight Systems, Nsight Compute,
// compute-sanitizer do): the session says so and the profile falls back to host spans only,
// with a note, instead of failing or taking over the other client's buffers.
TEST(GpuFaults, CuptiHeldByAnotherProfilerGivesHostSpansOnlyWithANote) {
  KTUNE_REQUIRE_GPU();
  KTUNE_CUDA_CHECK(cudaFree(nullptr));  // a context, as an application under a profiler has
  CUpti_SubscriberHandle other = nullptr;
  const CUptiResult sub = cuptiSubscribe(&other, ignore_callback, nullptr);
  // MULTIPLE_SUBSCRIBERS: a tool already holds CUPTI (this test under compute-sanitizer): the
  // same situation, made by someone else.
  ASSERT_TRUE(sub == CUPTI_SUCCESS || sub == CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED) << sub;
  {
    profiler::CuptiSession s;
    EXPECT_FALSE(s.ok());
    EXPECT_NE(s.error().find("cuptiSubscribe"), std::string::npos) << s.error();
    EXPECT_NE(s.error().find("another profiler is attached"), std::string::npos) << s.error();
  }
  const std::string out = ::testing::TempDir() + "/gpu_faults_cupti.json";
  const profiler::ProfileDoc d = profiler::run_profile(gpu_profile_options(out));
  EXPECT_FALSE(d.timeline.cupti);
  EXPECT_NE(d.run.trace_mode.find("host spans only"), std::string::npos) << d.run.trace_mode;
  EXPECT_NE(d.run.trace_mode.find("another profiler is attached"), std::string::npos)
      << d.run.trace_mode;
  EXPECT_TRUE(any_note_has(d, "CUPTI could not start"));
  EXPECT_TRUE(any_note_has(d, "no GPU events were recorded"));
  ASSERT_FALSE(d.windows.empty());
  EXPECT_GT(d.windows.back().tokens, 0);
  EXPECT_NO_THROW(profile::read_profile_summary(out));
  if (sub == CUPTI_SUCCESS) {
    ASSERT_EQ(cuptiUnsubscribe(other), CUPTI_SUCCESS);
    // The slot is free again: the next session traces.
    profiler::CuptiSession s;
    EXPECT_TRUE(s.ok()) << s.error();
  }
}
#endif

// KTUNE_NO_CUPTI=1: CUPTI is not used even with a GPU; the profile says so (in-process and from
// the command line).
TEST(GpuFaults, KtuneNoCuptiGivesHostSpansOnly) {
  KTUNE_REQUIRE_GPU();
  setenv("KTUNE_NO_CUPTI", "1", 1);
  const profiler::CuptiAvailability a = profiler::cupti_availability();
  EXPECT_FALSE(a.usable);
  EXPECT_NE(a.reason.find("KTUNE_NO_CUPTI"), std::string::npos) << a.reason;
  const std::string out = ::testing::TempDir() + "/gpu_faults_no_cupti.json";
  const profiler::ProfileDoc d = profiler::run_profile(gpu_profile_options(out));
  const std::string cli_out = ::testing::TempDir() + "/gpu_faults_no_cupti_cli.json";
  const ProcessResult r = run_ktune({"profile", "--model", "synth:tiny", "--experts-on-gpu", "4",
                                     "-n", "8", "--warmup", "2", "--baseline-windows", "1", "-q",
                                     "-o", cli_out},
                                    300);
  unsetenv("KTUNE_NO_CUPTI");
  EXPECT_FALSE(d.timeline.cupti);
  EXPECT_NE(d.run.trace_mode.find("KTUNE_NO_CUPTI"), std::string::npos) << d.run.trace_mode;
  EXPECT_TRUE(any_note_has(d, "no GPU events were recorded"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto doc = nlohmann::json::parse(test::read_all(cli_out));
  EXPECT_NE(doc["run"]["trace_mode"].get<std::string>().find("KTUNE_NO_CUPTI"), std::string::npos)
      << doc["run"];
  EXPECT_TRUE(profiler::cupti_availability().usable);  // the switch is read each time
}

}  // namespace
}  // namespace ktune
