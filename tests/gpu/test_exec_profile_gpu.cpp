// `ktune profile --exec` on the GPU: the known launch pattern of tests/gpu/exec_target must come
// back as the counts and gaps it was built with, at both trace levels. Tolerances: counts are exact; the gap between
// two kernels is the host's sleep plus a synchronize return and a launch (tens of µs) plus the
// sleep's oversleep, so the median gap must lie in [sleep, sleep + 400 µs].
#include <gtest/gtest.h>
#include <unistd.h>

#include <map>
#include <nlohmann/json.hpp>

#include "gpu_test_util.h"
#include "unit/subprocess.h"

namespace {

struct Dir {
  std::string path;
  Dir() {
    char d[] = "/tmp/ktune_exec_gpu_XXXXXX";
    path = mkdtemp(d);
  }
  ~Dir() { (void)!std::system(("rm -rf " + ktune::test::shell_quote(path)).c_str()); }
};

nlohmann::json load(const std::string& p) {
  return nlohmann::json::parse(ktune::test::read_all(p));
}

// The known pattern at one trace level: counts, gaps, phases and launch latency come back the
// same at both levels; what differs is what the timeline holds besides (full: every runtime call
// and the synchronizations; light: only the launching, copying and blocking calls).
void known_launch_pattern_comes_back(const std::string& level) {
  Dir d;
  const int S = 20, K = 6, sleep_us = 2000;
  const std::string out = d.path + "/p.json", trace = d.path + "/t.json";
  const auto r = ktune::test::run_ktune(
      {"profile", "--exec", "--trace-level", level, "-o", out, "--trace", trace, "--",
       KTUNE_EXEC_TARGET, std::to_string(S), std::to_string(K), std::to_string(sleep_us)},
      300);
  ASSERT_FALSE(r.signaled);
  ASSERT_EQ(r.exit_code, 0) << r.err << r.out;
  EXPECT_NE(r.out.find("# tracing: cupti level " + level), std::string::npos) << r.out;
  const auto p = load(out);
  EXPECT_EQ(p["exec"]["trace_level"], level);
  EXPECT_EQ(p["run"]["trace_level"], level);
  EXPECT_EQ(p["exec"]["not_recorded"].empty(), level == "full");
  EXPECT_EQ(p["exec"]["step_range"], "step");
  EXPECT_EQ(p["exec"]["steps"], S);
  EXPECT_EQ(p["exec"]["exit_code"], 0);
  EXPECT_EQ(p["exec"]["partial"], false);
  const auto& w = p["windows"]["steps"];
  ASSERT_EQ(w["gpus"].size(), 1u) << w.dump();
  const auto& g = w["gpus"][0];
  EXPECT_EQ(g["kernels"], S * K);
  EXPECT_DOUBLE_EQ(g["kernels_per_token"].get<double>(), K);
  EXPECT_DOUBLE_EQ(g["launches_per_token"].get<double>(), K);
  EXPECT_EQ(g["gaps"]["count"], S * K - 1);
  const double med = g["gaps"]["median_us"].get<double>();
  EXPECT_GE(med, sleep_us);
  EXPECT_LE(med, sleep_us + 400.0);
  EXPECT_GT(g["idle_fraction"].get<double>(), 0.9);
  // The inner range "moe_experts" tags the last kernel of each step as moe_gpu.
  EXPECT_EQ(g["phases"]["moe_gpu"]["count"], S);
  // Launch latency is measured (the launch call -> kernel start) and small on an idle GPU.
  EXPECT_EQ(g["launch_latency"]["samples"], S * K);
  EXPECT_LT(g["launch_latency"]["median_us"].get<double>(), 200.0);
  // The trace opens as JSON with kernels and the NVTX ranges; synchronization tracks at full only.
  const auto t = load(trace);
  int kernels = 0, steps = 0, syncs = 0;
  for (const auto& e : t["traceEvents"]) {
    if (e.value("cat", "") == "kernel") ++kernels;
    if (e.value("cat", "") == "cuda_sync") ++syncs;
    if (e.value("name", "") == "step") ++steps;
  }
  EXPECT_EQ(kernels, S * K + 1);  // + the warm-up kernel
  EXPECT_EQ(steps, S);
  if (level == "full") {
    EXPECT_GE(syncs, S * K);  // a cudaStreamSynchronize after every launch
  } else {
    EXPECT_EQ(syncs, 0);
  }
  // Runtime calls in the complete timeline: the program calls cudaGetLastError after each
  // launch; level light leaves it out and keeps cudaStreamSynchronize.
  const auto tl = load(d.path + "/p.timeline.json")["timeline"];
  std::map<std::string, int> calls;
  for (const auto& row : tl["api"]["rows"]) calls[tl["strings"][row[0].get<int>()]] += 1;
  EXPECT_GE(calls["cudaStreamSynchronize"], S * K);
  if (level == "full") {
    EXPECT_GE(calls["cudaGetLastError"], S * K);
  } else {
    EXPECT_EQ(calls.count("cudaGetLastError"), 0u);
  }
  std::string names;
  for (const auto& [n, c] : calls) names += n + " x" + std::to_string(c) + ", ";
  std::printf(
      "exec profile (level %s): %d steps, median gap %.1f µs (sleep %d), idle %.1f %%, launch "
      "latency %.1f µs; runtime calls recorded: %s\n",
      level.c_str(), S, med, sleep_us, 100 * g["idle_fraction"].get<double>(),
      g["launch_latency"]["median_us"].get<double>(), names.c_str());
}

TEST(ExecProfileGpu, KnownLaunchPatternComesBackAtLevelLight) {
  KTUNE_REQUIRE_GPU();
  known_launch_pattern_comes_back("light");
}

TEST(ExecProfileGpu, KnownLaunchPatternComesBackAtLevelFull) {
  KTUNE_REQUIRE_GPU();
  known_launch_pattern_comes_back("full");
}

TEST(ExecProfileGpu, NonZeroExitStillGivesAPartialProfile) {
  KTUNE_REQUIRE_GPU();
  Dir d;
  const std::string out = d.path + "/p.json";
  const auto r = ktune::test::run_ktune(
      {"profile", "--exec", "-q", "-o", out, "--", KTUNE_EXEC_TARGET, "4", "3", "100", "3"}, 300);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto p = load(out);
  EXPECT_EQ(p["exec"]["exit_code"], 3);
  EXPECT_EQ(p["exec"]["partial"], true);
  EXPECT_EQ(p["exec"]["steps"], 4);
  EXPECT_EQ(p["windows"]["steps"]["gpus"][0]["kernels"], 12);
}

TEST(ExecProfileGpu, DurationStopsTracingAndTheProgram) {
  KTUNE_REQUIRE_GPU();
  Dir d;
  const std::string out = d.path + "/p.json";
  // 2000 steps x 2 kernels x 2 ms = 8 s of program; traced for 1 s.
  const auto r = ktune::test::run_ktune({"profile", "--exec", "-q", "--duration", "1s", "-o", out,
                                         "--", KTUNE_EXEC_TARGET, "2000", "2", "2000"},
                                        300);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto p = load(out);
  EXPECT_EQ(p["exec"]["flush_reason"], "duration");
  const int steps = p["exec"]["steps"].get<int>();
  EXPECT_GT(steps, 50);    // ~240 in 1 s
  EXPECT_LT(steps, 2000);  // stopped early
  EXPECT_EQ(p["windows"]["steps"]["gpus"][0]["kernels"], 2 * steps);
}

TEST(ExecProfileGpu, ProgramWithoutCudaIsReported) {
  KTUNE_REQUIRE_GPU();
  Dir d;
  const auto r = ktune::test::run_ktune(
      {"profile", "--exec", "-o", d.path + "/p.json", "--", "/bin/sh", "-c", "exit 0"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("never initialized CUDA"), std::string::npos) << r.out;
}

TEST(ExecProfileGpu, CompareTwoRuns) {
  KTUNE_REQUIRE_GPU();
  Dir d;
  const std::string a = d.path + "/a.json", b = d.path + "/b.json";
  ASSERT_EQ(
      ktune::test::run_ktune(
          {"profile", "--exec", "-q", "-o", a, "--", KTUNE_EXEC_TARGET, "10", "4", "2000"}, 300)
          .exit_code,
      0);
  ASSERT_EQ(
      ktune::test::run_ktune(
          {"profile", "--exec", "-q", "-o", b, "--", KTUNE_EXEC_TARGET, "10", "4", "200"}, 300)
          .exit_code,
      0);
  const auto r = ktune::test::run_ktune({"compare", a, b, "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto c = nlohmann::json::parse(r.out);
  bool gap_row = false;
  for (const auto& row : c["rows"]) {
    if (row["metric"] == "median gap") {
      gap_row = true;
      EXPECT_TRUE(row["matters"].get<bool>());
      EXPECT_EQ(row["verdict"], "better");
    }
  }
  EXPECT_TRUE(gap_row);
}

}  // namespace
