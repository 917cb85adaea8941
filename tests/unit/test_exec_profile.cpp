// `ktune profile --exec` without a GPU: the injection's capture writer read back by the
// profiler, the flush-once gate and its signal/duration triggers (in forked children), step
// detection from NVTX ranges, the analysis of a hand-built capture with known answers, and
// `ktune compare` on hand-built profiles.
#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "inject/exec_capture.h"
#include "inject/flush_trigger.h"
#include "ktune/engine/error.h"
#include "profiler/chrome_trace.h"
#include "profiler/compare.h"
#include "profiler/cupti_activity.h"
#include "profiler/exec_profile.h"
#include "profiler/profile_summary.h"
#include "profiler/report.h"
#include "subprocess.h"

namespace {

using namespace ktune;
using ktune::exec_capture::Capture;

constexpr int64_t kT0 = 5'000'000'000;  // ns: an arbitrary clock origin

// S steps "step" on thread 7; in each, K kernels of `kernel_ns`, `gap_ns` apart, each launched by
// a cudaLaunchKernel call 5 µs before it starts; an inner range "moe" around the last kernel.
Capture steps_capture(int S, int K, int64_t kernel_ns, int64_t gap_ns) {
  Capture c;
  c.pid = 4242;
  c.ppid = 1;
  c.command = "python3 \"x\".py";
  c.flush_reason = "exit";
  c.cuda_initialized = true;
  c.cupti_ok = true;
  c.trace_start = kT0;
  c.gpus.push_back({0, "Test GPU"});
  const int32_t launch = c.intern("cudaLaunchKernel");
  const int32_t kname = c.intern("my_kernel");
  const int32_t step = c.intern("step");
  const int32_t moe = c.intern("moe");
  int64_t t = kT0 + 1000;
  uint32_t corr = 1;
  for (int s = 0; s < S; ++s) {
    const int64_t step_start = t;
    for (int k = 0; k < K; ++k) {
      exec_capture::Api a{launch, 7, t, t + 2000, corr};
      c.api.push_back(a);
      exec_capture::Op op;
      op.start = t + 5000;
      op.end = op.start + kernel_ns;
      op.correlation = corr;
      op.name = kname;
      op.stream = 7;
      c.ops.push_back(op);
      if (k == K - 1) c.ranges.push_back({moe, -1, 7, t - 100, t + 2100, 0, false});
      ++corr;
      t = op.end + gap_ns - 5000;  // next launch: its kernel starts gap_ns after this one ends
    }
    c.ranges.push_back({step, -1, 7, step_start - 10, t, s, true});
    t += 0;
  }
  c.trace_end = t + 1000;
  return c;
}

TEST(ExecCapture, WriterOutputReadsBackExactly) {
  Capture c = steps_capture(2, 3, 10'000, 20'000);
  c.strings.push_back("weird \"name\"\n\x01");
  const std::string text = exec_capture::to_json(c);
  const profiler::ExecCapture r = profiler::parse_exec_capture(text, "cap.json");
  EXPECT_EQ(r.pid, 4242);
  EXPECT_EQ(r.command, "python3 \"x\".py");
  EXPECT_TRUE(r.cuda_initialized);
  EXPECT_TRUE(r.timeline.cupti);
  ASSERT_EQ(r.timeline.ops.size(), 6u);
  ASSERT_EQ(r.timeline.api.size(), 6u);
  ASSERT_EQ(r.timeline.markers.size(), 4u);  // 2 steps + 2 inner ranges
  EXPECT_EQ(r.timeline.strings.back(), "weird \"name\"\n\x01");
  for (size_t i = 0; i < c.ops.size(); ++i) {  // ns-exact through the µs text
    EXPECT_EQ(r.timeline.ops[i].start, c.ops[i].start);
    EXPECT_EQ(r.timeline.ops[i].end, c.ops[i].end);
    EXPECT_EQ(r.timeline.ops[i].correlation, c.ops[i].correlation);
  }
  EXPECT_EQ(r.timeline.api[0].thread, 7u);
  EXPECT_EQ(r.trace_start, kT0);
  ASSERT_EQ(r.timeline.gpus.size(), 1u);
  EXPECT_EQ(r.timeline.gpus[0].name, "Test GPU");
  const auto& m = r.timeline.markers;
  bool payload = false;
  for (const auto& x : m) payload = payload || (x.has_payload && x.payload == 1);
  EXPECT_TRUE(payload);
}

TEST(ExecCapture, IncompleteRecordsAreDroppedAndFileNamesArePerPid) {
  Capture c;
  c.ops.push_back({});  // start 0: never completed
  exec_capture::Op late;
  late.start = 100;
  late.end = 50;  // end before start: incomplete at the flush
  c.ops.push_back(late);
  const auto r = profiler::parse_exec_capture(exec_capture::to_json(c), "x");
  EXPECT_TRUE(r.timeline.ops.empty());
  EXPECT_EQ(exec_capture::file_name("/d", 77), "/d/ktune-exec-77.json");
  EXPECT_EQ(exec_capture::file_name("/d/", 77), "/d/ktune-exec-77.json");
  EXPECT_TRUE(exec_capture::is_capture_file_name("ktune-exec-77.json"));
  EXPECT_FALSE(exec_capture::is_capture_file_name("ktune-exec-77.json.tmp"));
  EXPECT_FALSE(exec_capture::is_capture_file_name("ktune-exec-.json"));
  EXPECT_FALSE(exec_capture::is_capture_file_name("ktune-exec-7a.json"));
}

TEST(ExecCapture, ReaderRejectsOtherFilesCleanly) {
  EXPECT_THROW(profiler::parse_exec_capture("{not json", "a.json"), Error);
  EXPECT_THROW(profiler::parse_exec_capture("{\"ktune_profile\": 1}", "a.json"), Error);
  EXPECT_THROW(profiler::parse_exec_capture(
                   "{\"ktune_exec_capture\": 2, \"process\": {}, \"timeline\": {}}", "a.json"),
               Error);
}

TEST(ExecCapture, WriteFileIsAtomicAndReportsFailures) {
  char dir[] = "/tmp/ktune_exec_wf_XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  const std::string p = std::string(dir) + "/f.json";
  EXPECT_EQ(exec_capture::write_file(p, "hello"), "");
  EXPECT_EQ(test::read_all(p), "hello");
  EXPECT_NE(access((p + ".tmp").c_str(), F_OK), 0);
  EXPECT_NE(exec_capture::write_file("/nonexistent-dir/x.json", "x"), "");
  unlink(p.c_str());
  rmdir(dir);
}

// ---- flush triggers (forked children: signal dispositions and the once-gate are per process) --

std::string g_flush_path;
void write_reason(const char* reason) { std::ofstream(g_flush_path) << reason; }
std::string g_program_path;
void program_handler(int) {
  // What a program's own handler might do (async-signal-safe).
  const int fd = open(g_program_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd >= 0) {
    (void)!write(fd, "program", 7);
    close(fd);
  }
}

struct TempDir {
  std::string path;
  TempDir() {
    char d[] = "/tmp/ktune_exec_test_XXXXXX";
    path = mkdtemp(d);
  }
  ~TempDir() {
    std::string cmd = "rm -rf " + test::shell_quote(path);
    (void)!std::system(cmd.c_str());
  }
};

// Runs body in a forked child with a fresh flush gate; the child exits with body's value.
// Returns the child's wait status.
template <typename Body>
int run_in_child(Body body) {
  const pid_t pid = fork();
  if (pid == 0) {
    inject::reset_for_test();
    _exit(body());
  }
  int st = 0;
  EXPECT_EQ(waitpid(pid, &st, 0), pid);
  return st;
}

// In a child: flushes write their reason to <dir>/flush. False if the triggers did not start.
bool start_triggers(const std::string& dir, const inject::TriggerOptions& o = {}) {
  g_flush_path = dir + "/flush";
  return inject::start_flush_triggers(write_reason, o).empty();
}

testing::AssertionResult exited_with(int st, int code) {
  if (!WIFEXITED(st)) {
    return testing::AssertionFailure() << "not exited: wait status " << st;
  }
  if (WEXITSTATUS(st) != code) {
    return testing::AssertionFailure() << "exit status " << WEXITSTATUS(st) << ", not " << code;
  }
  return testing::AssertionSuccess();
}

TEST(ExecFlushTrigger, FlushRunsOnceAcrossTriggers) {
  const int st = run_in_child([] {
    int runs = 0;
    static int* counter = &runs;
    auto fn = [](const char*) { ++*counter; };
    const bool first = inject::flush_once(fn, "exit");
    const bool second = inject::flush_once(fn, "signal SIGINT");
    return first && !second && runs == 1 && inject::flushed() ? 0 : 1;
  });
  EXPECT_TRUE(exited_with(st, 0));
}

TEST(ExecFlushTrigger, SigtermFlushesThenEndsTheProcessByTheSignal) {
  TempDir d;
  const int st = run_in_child([&] {
    signal(SIGTERM, SIG_DFL);
    if (!start_triggers(d.path)) return 90;
    raise(SIGTERM);
    return 91;  // not reached: the default action ends the process
  });
  ASSERT_TRUE(WIFSIGNALED(st)) << "exit status " << WEXITSTATUS(st);
  EXPECT_EQ(WTERMSIG(st), SIGTERM);
  EXPECT_EQ(test::read_all(d.path + "/flush"), "signal SIGTERM");
}

TEST(ExecFlushTrigger, SigintChainsToTheProgramsHandler) {
  TempDir d;
  const int st = run_in_child([&] {
    g_program_path = d.path + "/program";
    signal(SIGINT, program_handler);  // installed before the injection, like Python's
    if (!start_triggers(d.path)) return 90;
    raise(SIGINT);
    return 3;  // the program's handler returned: the program goes on and exits by itself
  });
  ASSERT_TRUE(exited_with(st, 3));
  EXPECT_EQ(test::read_all(d.path + "/flush"), "signal SIGINT");
  EXPECT_EQ(test::read_all(d.path + "/program"), "program");
}

TEST(ExecFlushTrigger, AForkedWorkerNeitherFlushesNorWakesTheParent) {
  TempDir d;
  const int st = run_in_child([&] {
    signal(SIGTERM, SIG_DFL);
    if (!start_triggers(d.path)) return 90;
    const pid_t worker = fork();
    if (worker == 0) {
      raise(SIGTERM);  // the program's default action, no flush
      _exit(92);
    }
    int ws = 0;
    waitpid(worker, &ws, 0);
    usleep(100000);  // a wrongly woken flusher would have written by now
    const bool ok = WIFSIGNALED(ws) && WTERMSIG(ws) == SIGTERM && !inject::flushed() &&
                    access(g_flush_path.c_str(), F_OK) != 0;
    return ok ? 0 : 1;
  });
  EXPECT_TRUE(exited_with(st, 0));
}

TEST(ExecFlushTrigger, DurationFlushesWhileTheProgramRuns) {
  TempDir d;
  const int st = run_in_child([&] {
    inject::TriggerOptions o;
    o.duration_ms = 30;
    o.signals = false;
    if (!start_triggers(d.path, o)) return 90;
    for (int i = 0; i < 500 && !inject::flushed(); ++i) usleep(10000);  // up to 5 s
    return inject::flushed() ? 0 : 1;
  });
  ASSERT_TRUE(exited_with(st, 0));
  EXPECT_EQ(test::read_all(d.path + "/flush"), "duration");
}

// ---- steps and analysis ----

profiler::Timeline timeline_of(const Capture& c) {
  return profiler::parse_exec_capture(exec_capture::to_json(c), "t").timeline;
}

TEST(ExecSteps, AutoDetectsTheMostRepeatedTopLevelRange) {
  const auto t = timeline_of(steps_capture(4, 3, 10'000, 20'000));
  const auto s = profiler::choose_steps(t, "");
  EXPECT_EQ(s.name, "step");  // "moe" repeats too, but nested
  EXPECT_TRUE(s.auto_detected);
  EXPECT_EQ(s.steps.size(), 4u);
  const auto m = profiler::choose_steps(t, "moe");
  EXPECT_EQ(m.steps.size(), 4u);
  EXPECT_FALSE(m.auto_detected);
  try {
    profiler::choose_steps(t, "decode");
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("\"step\" (4x)"), std::string::npos) << e.what();
  }
}

TEST(ExecSteps, WithoutRangesTheWholeRunIsOneWindow) {
  Capture c = steps_capture(3, 2, 10'000, 20'000);
  c.ranges.clear();
  profiler::ExecRunInfo run;
  const auto doc = profiler::analyze_exec_capture(
      profiler::parse_exec_capture(exec_capture::to_json(c), "t"), "", run);
  ASSERT_EQ(doc.windows.size(), 1u);
  EXPECT_EQ(doc.windows[0].kind, "run");
  ASSERT_EQ(doc.windows[0].gpus.size(), 1u);
  EXPECT_EQ(doc.windows[0].gpus[0].kernels, 6);
  EXPECT_EQ(doc.windows[0].gpus[0].gaps.count, 5);
}

// The injection lists every GPU of the machine; the profile keeps those the program ran work on
// (a one-GPU program on a 3-GPU host is not "two GPUs idle 100 %").
TEST(ExecAnalysis, OnlyTheGpusTheProgramUsedAreReported) {
  Capture c = steps_capture(3, 2, 10'000, 20'000);
  c.gpus = {{0, "GPU A"}, {1, "GPU B"}, {2, "GPU C"}};
  for (auto& op : c.ops) op.device = 1;
  profiler::ExecRunInfo run;
  const auto doc = profiler::analyze_exec_capture(
      profiler::parse_exec_capture(exec_capture::to_json(c), "t"), "", run);
  ASSERT_EQ(doc.windows.size(), 1u);
  ASSERT_EQ(doc.windows[0].gpus.size(), 1u);
  EXPECT_EQ(doc.windows[0].gpus[0].device, 1);
  EXPECT_EQ(doc.windows[0].gpus[0].kernels, 6);
  ASSERT_EQ(doc.summary.gpus.size(), 1u);
  EXPECT_EQ(doc.summary.gpus[0].device, "cuda:1");
  EXPECT_EQ(doc.summary.gpus[0].name, "GPU B");
  // A program that ran no GPU work keeps the machine's list (nothing to choose by).
  c.ops.clear();
  const auto none = profiler::analyze_exec_capture(
      profiler::parse_exec_capture(exec_capture::to_json(c), "t"), "", run);
  EXPECT_EQ(none.summary.gpus.size(), 3u);
}

TEST(ExecAnalysis, KnownLaunchPatternGivesKnownCountsAndGaps) {
  const int S = 5, K = 4;
  Capture c = steps_capture(S, K, 10'000, 20'000);
  profiler::ExecRunInfo run;
  run.command = {"python3", "x.py"};
  run.exit_description = "exit code 0";
  const auto doc = profiler::analyze_exec_capture(
      profiler::parse_exec_capture(exec_capture::to_json(c), "t"), "", run);
  ASSERT_EQ(doc.windows.size(), 1u);
  const auto& w = doc.windows[0];
  EXPECT_EQ(w.kind, "steps");
  EXPECT_EQ(w.tokens, S);
  ASSERT_EQ(w.gpus.size(), 1u);
  const auto& g = w.gpus[0];
  EXPECT_EQ(g.kernels, S * K);
  EXPECT_DOUBLE_EQ(g.kernels_per_token, K);
  EXPECT_DOUBLE_EQ(g.launches_per_token, K);
  EXPECT_EQ(g.gaps.count, S * K - 1);
  EXPECT_NEAR(g.gaps.median_us, 20.0, 1e-9);
  EXPECT_NEAR(g.launch_latency_median_us, 5.0, 1e-9);
  EXPECT_NEAR(g.launch_call_median_us, 2.0, 1e-9);
  EXPECT_NEAR(g.busy_us, S * K * 10.0, 1e-9);
  // 10 µs busy per 30 µs: idle about 2/3.
  EXPECT_GT(g.idle_fraction, 0.6);
  EXPECT_LT(g.idle_fraction, 0.7);
  // The inner NVTX range "moe" names a phase: its kernel goes to moe_gpu.
  ASSERT_TRUE(g.phases.count(trace::Phase::MoeGpu));
  EXPECT_EQ(g.phases.at(trace::Phase::MoeGpu).count, S);
  // Exec section: steps, ranges, unavailable metrics named.
  EXPECT_EQ(doc.exec["steps"], S);
  EXPECT_EQ(doc.exec["step_range"], "step");
  bool moe_row = false;
  for (const auto& r : doc.exec["nvtx_ranges"]) {
    if (r["name"] == "moe") {
      moe_row = true;
      EXPECT_EQ(r["kernels"], S);
      EXPECT_NEAR(r["gpu_busy_us"].get<double>(), S * 10.0, 1e-9);
    }
  }
  EXPECT_TRUE(moe_row);
  std::string notes;
  for (const auto& n : doc.notes) notes += n + "\n";
  EXPECT_NE(notes.find("unavailable: expert effective bandwidth"), std::string::npos);
  EXPECT_NE(doc.verdict.headline.find("of the steps"), std::string::npos) << doc.verdict.headline;
  EXPECT_NE(doc.verdict.headline.find("CUDA graph"), std::string::npos) << doc.verdict.headline;
}

// The sinks take an exec document as they take an engine one: report, profile.json (read back
// by ktune trace's reader and by compare), Chrome trace.
TEST(ExecAnalysis, ReportProfileFileAndTraceWork) {
  profiler::ExecRunInfo run;
  run.command = {"python3", "x.py"};
  run.exit_description = "exit code 0";
  auto doc = profiler::analyze_exec_capture(
      profiler::parse_exec_capture(exec_capture::to_json(steps_capture(6, 3, 10'000, 50'000)), "t"),
      "", run);
  const std::string rep = profiler::terminal_report(doc);
  EXPECT_NE(rep.find("# program: python3 x.py"), std::string::npos) << rep;
  EXPECT_NE(rep.find("steps: 6 x \"step\""), std::string::npos) << rep;
  EXPECT_NE(rep.find("NVTX ranges in the window"), std::string::npos) << rep;
  EXPECT_NE(rep.find("where each step's time went"), std::string::npos) << rep;
  EXPECT_NE(profiler::html_report(doc).find("</html>"), std::string::npos);
  TempDir d;
  const std::string p = d.path + "/p.json";
  profiler::write_profile_json(p, doc);
  const auto j = profile::read_profile_document(p);
  EXPECT_EQ(j["summary"]["kind"], "exec");
  EXPECT_EQ(j["exec"]["steps"], 6);
  EXPECT_EQ(j["windows"]["steps"]["tokens"], 6);
  const auto t = profiler::read_profile_timeline(p);  // the compact timeline, window "steps"
  ASSERT_EQ(t.windows.size(), 1u);
  EXPECT_EQ(t.windows[0].kind, "steps");
  const auto trace =
      nlohmann::json::parse(profiler::chrome_trace(t, profiler::attribute_ops(t), "x"));
  EXPECT_TRUE(trace["traceEvents"].is_array());
  const auto c = profiler::compare_profiles(j, "a", j, "b");
  for (const auto& r : c.rows) EXPECT_FALSE(r.matters) << r.metric;
  EXPECT_THROW(profile::read_profile_summary(p), Error);  // search refuses exec profiles
}

TEST(ExecAnalysis, NonZeroExitMarksThePartialProfile) {
  profiler::ExecRunInfo run;
  run.exit_code = 3;
  run.exit_description = "exit code 3";
  run.partial = true;
  run.partial_reason = "the program ended with exit code 3";
  const auto doc = profiler::analyze_exec_capture(
      profiler::parse_exec_capture(exec_capture::to_json(steps_capture(2, 2, 1000, 1000)), "t"), "",
      run);
  EXPECT_EQ(doc.exec["partial"], true);
  EXPECT_EQ(doc.exec["exit_code"], 3);
  EXPECT_NE(doc.notes[1].find("partial profile"), std::string::npos);
}

TEST(ExecAnalysis, PicksTheLaunchedProcessOrTheBusiestOther) {
  std::vector<profiler::ExecCapture> caps(3);
  caps[0].pid = 10;
  caps[1].pid = 11;
  caps[1].timeline.ops.resize(3);
  caps[2].pid = 12;
  caps[2].timeline.ops.resize(5);
  EXPECT_EQ(profiler::pick_main_capture(caps, 10), 2);  // launched one ran no GPU work
  EXPECT_EQ(profiler::pick_main_capture(caps, 11), 1);
  caps[1].timeline.ops.clear();
  caps[2].timeline.ops.clear();
  EXPECT_EQ(profiler::pick_main_capture(caps, 10), -1);
}

// ---- the injection library itself, through NVTX only (no GPU needed) ----

#ifdef KTUNE_NVTX_TARGET
// Runs the NVTX target under the injection; returns the wait status and the capture's path.
int run_under_injection(const std::string& dir, const std::vector<std::string>& args) {
  const pid_t pid = fork();
  if (pid == 0) {
    setenv("NVTX_INJECTION64_PATH", KTUNE_INJECT_LIBRARY_PATH, 1);
    setenv("KTUNE_EXEC_OUT_DIR", dir.c_str(), 1);
    std::vector<char*> argv{const_cast<char*>(KTUNE_NVTX_TARGET)};
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  int st = 0;
  waitpid(pid, &st, 0);
  return st;
}

profiler::ExecCapture only_capture(const std::string& dir) {
  std::vector<std::string> found;
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d)) {
      if (exec_capture::is_capture_file_name(e->d_name)) found.push_back(dir + "/" + e->d_name);
    }
    closedir(d);
  }
  if (found.size() != 1) throw std::runtime_error("expected one capture in " + dir);
  return profiler::read_exec_capture(found[0]);
}

TEST(ExecInjection, NvtxRangesOfAProgramWithoutCudaAreCaptured) {
  TempDir d;
  const int st = run_under_injection(d.path, {"4", "exit"});
  ASSERT_TRUE(WIFEXITED(st));
  ASSERT_EQ(WEXITSTATUS(st), 0);
  const auto c = only_capture(d.path);
  EXPECT_EQ(c.flush_reason, "exit");
  EXPECT_FALSE(c.cuda_initialized);
  EXPECT_EQ(c.open_ranges, 1);  // "left_open"
  const auto& t = c.timeline;
  std::map<std::string, int> n;
  std::set<uint64_t> threads;
  for (const auto& m : t.markers) {
    n[t.str(m.name)] += 1;
    threads.insert(m.thread);
    EXPECT_GE(m.end, m.start);
  }
  EXPECT_EQ(n["step"], 4);
  EXPECT_EQ(n["attention"], 4);
  EXPECT_EQ(n["moe"], 4);
  EXPECT_EQ(n["dom_range"], 4);
  EXPECT_EQ(n["worker"], 1);
  EXPECT_EQ(n.count("left_open"), 0u);
  EXPECT_EQ(threads.size(), 2u);  // OS thread ids: main and the worker
  for (const auto& m : t.markers) {
    if (t.str(m.name) == "dom_range") {
      EXPECT_EQ(t.str(m.domain), "mydomain");
      EXPECT_TRUE(m.has_payload);
    }
    if (t.str(m.name) == "attention") {
      EXPECT_GE(m.end - m.start, 300'000);  // usleep(300)
    }
  }
  const auto s = profiler::choose_steps(t, "");
  EXPECT_EQ(s.name, "step");
  EXPECT_EQ(s.steps.size(), 4u);
}

TEST(ExecInjection, SigtermWritesTheCaptureAndTheProgramStillDiesOfIt) {
  TempDir d;
  const int st = run_under_injection(d.path, {"2", "sigterm"});
  ASSERT_TRUE(WIFSIGNALED(st));
  EXPECT_EQ(WTERMSIG(st), SIGTERM);
  const auto c = only_capture(d.path);
  EXPECT_EQ(c.flush_reason, "signal SIGTERM");
  int steps = 0;
  for (const auto& m : c.timeline.markers) steps += c.timeline.str(m.name) == "step";
  EXPECT_EQ(steps, 2);
}

TEST(ExecInjection, SigintGoesOnToTheProgramsHandler) {
  TempDir d;
  const int st = run_under_injection(d.path, {"2", "sigint-handled"});
  ASSERT_TRUE(WIFEXITED(st));
  EXPECT_EQ(WEXITSTATUS(st), 4);  // the program's handler ran and the program went on
  EXPECT_EQ(only_capture(d.path).flush_reason, "signal SIGINT");
}
#endif

// Without a GPU: a clean one-line error and exit 1. With one (the GPU machine): a program that
// never touches CUDA is reported as such, exit 0, nothing written.
TEST(ExecCli, NoGpuOrNoCudaProgramIsReportedCleanly) {
  TempDir d;
  const std::string out = d.path + "/p.json";
  const auto r = test::run_ktune({"profile", "--exec", "-o", out, "--", "/bin/true"});
  ASSERT_FALSE(r.signaled);
  if (profiler::cupti_availability().usable) {
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find("never initialized CUDA"), std::string::npos) << r.out;
  } else {
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_EQ(r.err.rfind("ktune: error: ", 0), 0u) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  EXPECT_NE(access(out.c_str(), F_OK), 0);
}

TEST(ExecCli, UsageErrors) {
  auto r = test::run_ktune({"profile", "--exec"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  r = test::run_ktune({"profile", "--exec", "--duration", "soon", "--", "/bin/true"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  r = test::run_ktune({"profile", "--exec", "--model", "synth:tiny", "--", "/bin/true"});
  EXPECT_EQ(r.exit_code, 2) << r.err;
}

// ---- compare ----

nlohmann::json profile_with(const std::string& kind, double tok_s, double idle, double gaps,
                            double kpt, double moe_us) {
  nlohmann::json w = {
      {"tokens", 10},
      {"wall_us", 10 * 1e6 / tok_s},
      {"tok_s", tok_s},
      {"gpus",
       {{{"device", "cuda:0"},
         {"busy_us", 1000.0},
         {"kernels", 10 * kpt},
         {"idle_fraction", idle},
         {"gaps", {{"count", gaps * 10}, {"sum_us", 500.0}, {"median_us", 3.0}, {"p90_us", 9.0}}},
         {"kernels_per_token", kpt},
         {"launches_per_token", kpt},
         {"graph_launches", 0},
         {"launch_latency", {{"median_us", 7.0}, {"call_median_us", 3.0}}},
         {"phases", {{"moe_gpu", {{"wall_us", moe_us * 10}, {"count", 10}}}}}}}},
      {"budget_us_per_token", nlohmann::json::array()}};
  return {{"ktune_profile", 1},
          {"run", {{"engine", "exec"}, {"command", "python3 x.py"}}},
          {"windows", {{kind, w}}}};
}

TEST(Compare, FlagsOnlyDifferencesAboveTheRule) {
  const auto a = profile_with("steps", 100, 0.60, 50, 200, 400);
  const auto b = profile_with("steps", 104, 0.20, 10, 200, 405);
  const auto c = profiler::compare_profiles(a, "a.json", b, "b.json");
  EXPECT_EQ(c.per, "step");
  auto row = [&](const std::string& m) -> const profiler::CompareRow& {
    for (const auto& r : c.rows) {
      if (r.metric == m) return r;
    }
    throw std::runtime_error("no row " + m);
  };
  EXPECT_FALSE(row("rate").matters);  // +4 %
  EXPECT_TRUE(row("GPU idle").matters);
  EXPECT_EQ(row("GPU idle").verdict, "better");
  EXPECT_NEAR(row("GPU idle").a, 60.0, 1e-9);
  EXPECT_TRUE(row("kernel gaps per step").matters);
  EXPECT_FALSE(row("kernels per step").matters);
  EXPECT_FALSE(row("moe_gpu GPU time per step").matters);  // 1.25 %
  const std::string text = profiler::comparison_text(c);
  EXPECT_NE(text.find("better GPU idle"), std::string::npos) << text;
  const auto j = profiler::to_json(c);
  EXPECT_TRUE(j["rows"].is_array());
  EXPECT_NE(j["rule"].get<std::string>().find("10 %"), std::string::npos);
}

TEST(Compare, SmallAbsoluteChangesDoNotMatter) {
  profiler::CompareRow r;
  r.has_a = r.has_b = true;
  r.unit = "µs";
  r.a = 0.5;
  r.b = 0.9;  // +80 % but 0.4 µs: below the 1 µs floor
  EXPECT_FALSE(profiler::compare_matters(r));
  r.b = 2.0;
  EXPECT_TRUE(profiler::compare_matters(r));
  r.has_b = false;
  EXPECT_FALSE(profiler::compare_matters(r));
}

TEST(Compare, EngineAndExecProfilesCompareWithANote) {
  const auto a = profile_with("decode", 20, 0.5, 5, 100, 300);
  const auto b = profile_with("steps", 25, 0.3, 5, 90, 300);
  const auto c = profiler::compare_profiles(a, "engine.json", b, "exec.json");
  EXPECT_EQ(c.per, "token|step");
  EXPECT_FALSE(c.notes.empty());
}

TEST(Compare, WrongFilesAreCleanErrors) {
  const auto good = profile_with("steps", 1, 0, 0, 1, 1);
  EXPECT_THROW(profiler::compare_profiles(nlohmann::json::object(), "x", good, "y"), Error);
  nlohmann::json hw = {{"ktune_profile", 1}, {"windows", nlohmann::json::object()}};
  EXPECT_THROW(profiler::compare_profiles(good, "x", hw, "hw.json"), Error);
  TempDir d;
  std::ofstream(d.path + "/bad.json") << "[1, 2";
  const auto r = test::run_ktune({"compare", d.path + "/bad.json", d.path + "/bad.json"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(r.err.rfind("ktune: error: ", 0), 0u) << r.err;
  const auto m = test::run_ktune({"compare", d.path + "/missing.json", d.path + "/bad.json"});
  EXPECT_EQ(m.exit_code, 1);
}

}  // namespace
