// Faults (issue 8, item 3), continued from test_faults.cpp: Ctrl-C / SIGTERM during `ktune
// profile` and `ktune search --verify` stop cleanly and write nothing (docs/usage.md, "Stopping a
// run"), and kill -9 at the worst moment of the write of every kind of output (profile.json, its
// timeline, traces, the HTML report, best.yaml and best-nograph.yaml, both exports, gen-model's,
// convert's and quantize's GGUF) leaves nothing, or the complete old file, under the output name.
//
// The worst moment: AtomicFile's test hook KTUNE_TEST_PAUSE_BEFORE_RENAME=SUFFIX holds the
// commit of the output whose path ends with SUFFIX after the temp file is written and fsynced,
// before the rename (docs/reliability.md). A kill there is the last chance to leave a partial
// file; a kill during the write is earlier in the same path.
#include <gtest/gtest.h>
#include <signal.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "subprocess.h"
#include "test_search_util.h"

namespace fs = std::filesystem;
using ktune::test::ChildProcess;
using ktune::test::count_lines;
using ktune::test::ProcessResult;
using ktune::test::read_all;
using ktune::test::run_ktune;
using ktune::test::wait_until;

namespace {

struct ScratchDir {
  fs::path path;
  ScratchDir() {
    char tmpl[] = "/tmp/ktune_writes_XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

// AtomicFile's temp files for `out`: <out>.tmp.<pid>.<random>.
std::vector<fs::path> temp_files_of(const std::string& out) {
  std::vector<fs::path> r;
  const std::string prefix = fs::path(out).filename().string() + ".tmp.";
  for (const auto& e : fs::directory_iterator(fs::path(out).parent_path())) {
    if (e.path().filename().string().rfind(prefix, 0) == 0) r.push_back(e.path());
  }
  return r;
}

std::vector<fs::path> all_temp_files(const fs::path& dir) {
  std::vector<fs::path> r;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (e.path().filename().string().find(".tmp.") != std::string::npos) r.push_back(e.path());
  }
  return r;
}

// Stderr's last line is the one error ("ktune: loaded ..." may come before it).
std::string last_line(const std::string& err) {
  if (err.empty()) return "";
  const size_t from = err.rfind('\n', err.size() - 2);
  return from == std::string::npos ? err : err.substr(from + 1);
}

// A CPU-only machine profile, so `search --verify` runs the CPU engine here.
std::string write_cpu_profile(const std::string& path) {
  nlohmann::json j;
  j["ktune_profile"] = 1;
  ktune::profile::to_json(j["summary"], ktune::search::test::cpu_only_profile());
  std::ofstream(path) << j.dump();
  return path;
}

// ------------------------------------------------------------------------- Ctrl-C, SIGTERM --

// Ctrl-C during the decode windows of `ktune profile`: exit 130 within seconds, one error line,
// no profile.json, no timeline, no temp file.
TEST(FaultsSignal, SigintDuringProfileWritesNothing) {
  ScratchDir dir;
  const std::string out = dir / "p.json";
  ChildProcess child({"profile", "--model", "synth:tiny", "-p", "0", "-n", "3000",
                      "--baseline-windows", "3", "--threads", "1", "--trace", dir / "t.json",
                      "--report", dir / "r.html", "-q", "-o", out});
  ASSERT_TRUE(wait_until([&] { return child.cpu_seconds() >= 1.5 || !child.running(); }, 30.0));
  ASSERT_TRUE(child.running()) << "finished before the signal: " << child.err();
  child.signal(SIGINT);
  const auto w = child.wait(5.0);
  ASSERT_FALSE(w.timed_out) << "did not stop within 5 s of SIGINT";
  ASSERT_FALSE(w.result.signaled);
  EXPECT_EQ(w.result.exit_code, 130) << w.result.err;
  EXPECT_EQ(last_line(w.result.err),
            "ktune: error: interrupted: stopped by SIGINT; no profile was written\n");
  EXPECT_EQ(w.result.err.find("ktune: error:"), w.result.err.rfind("ktune: error:"));
  EXPECT_TRUE(fs::is_empty(dir.path)) << "left: " << fs::directory_iterator(dir.path)->path();
}

// SIGTERM during `ktune profile --hardware` (the machine probes): the same clean stop, 143.
TEST(FaultsSignal, SigtermDuringHardwareProfileWritesNothing) {
  ScratchDir dir;
  ChildProcess child({"profile", "--hardware", "-t", "1", "-q", "-o", dir / "hw.json"});
  ASSERT_TRUE(wait_until([&] { return child.cpu_seconds() >= 0.5 || !child.running(); }, 30.0));
  ASSERT_TRUE(child.running()) << "finished before the signal: " << child.err();
  child.signal(SIGTERM);
  const auto w = child.wait(30.0);  // a probe in flight finishes first (a few seconds)
  ASSERT_FALSE(w.timed_out) << "did not stop within 30 s of SIGTERM";
  ASSERT_FALSE(w.result.signaled);
  EXPECT_EQ(w.result.exit_code, 143) << w.result.err;
  EXPECT_EQ(last_line(w.result.err),
            "ktune: error: interrupted: stopped by SIGTERM; no profile was written\n");
  EXPECT_TRUE(fs::is_empty(dir.path));
}

// Ctrl-C while `ktune search --verify` runs candidates on the engine: exit 130, no placement
// file, no candidates folder.
TEST(FaultsSignal, SigintDuringSearchVerifyWritesNothing) {
  ScratchDir dir;
  const std::string prof = write_cpu_profile(dir / "cpu.json");
  fs::create_directories(dir.path / "out");
  ChildProcess child({"search", "--profile", prof, "--model", "synth:tiny", "--workload",
                      "prompt=500,gen=2000", "--verify", "3", "-r", "50", "-o",
                      dir / "out/best.yaml"});
  ASSERT_TRUE(wait_until([&] { return child.cpu_seconds() >= 1.5 || !child.running(); }, 30.0));
  ASSERT_TRUE(child.running()) << "finished before the signal: " << child.err();
  child.signal(SIGINT);
  const auto w = child.wait(5.0);
  ASSERT_FALSE(w.timed_out) << "did not stop within 5 s of SIGINT";
  ASSERT_FALSE(w.result.signaled);
  EXPECT_EQ(w.result.exit_code, 130) << w.result.err << w.result.out;
  EXPECT_EQ(last_line(w.result.err).rfind("ktune: error: interrupted: stopped by SIGINT; ", 0), 0u)
      << w.result.err;
  EXPECT_EQ(count_lines(w.result.err), 1) << w.result.err;
  EXPECT_TRUE(fs::is_empty(dir.path / "out")) << fs::directory_iterator(dir.path / "out")->path();
}

// ------------------------------------------------------------------ kill -9 at every output --

struct OutputKind {
  std::string name;
  std::string file;  // the output's name in the scratch folder (also the pause suffix)
  std::function<std::vector<std::string>(const ScratchDir&)> args;
  std::vector<std::string> written_before;  // outputs complete before this one (JSON files)
};

std::string search_profile() {
  return ktune::search::test::profiles_dir() + "/h100-16core-handmade.json";
}

std::vector<std::string> profile_args(const ScratchDir& d) {
  return {"profile", "--model", "synth:tiny", "-p", "4", "-n", "4", "--warmup", "0",
          "--baseline-windows", "1", "--threads", "1", "--trace", d / "t.json", "--report",
          d / "r.html", "-q", "-o", d / "p.json"};
}

std::vector<std::string> search_args(const ScratchDir& d, const std::string& emit,
                                     const std::string& out) {
  return {"search", "--profile", search_profile(), "--model", "synth:qwen3-30b-a3b:q4_0",
          "--gpu-mem", "cuda:0=10GiB", "--emit", emit, "-o", d / out};
}

const std::vector<OutputKind>& output_kinds() {
  static const std::vector<OutputKind> kinds = {
      {"timeline", "p.timeline.json", profile_args, {}},
      {"profile", "p.json", profile_args, {"p.timeline.json"}},
      {"profile_trace", "t.json", profile_args, {"p.timeline.json", "p.json"}},
      {"report", "r.html", profile_args, {"p.timeline.json", "p.json", "t.json"}},
      {"trace",
       "t2.json",
       [](const ScratchDir& d) {
         return std::vector<std::string>{"trace", d / "given.json", "-o", d / "t2.json"};
       },
       {}},
      {"best", "best.yaml", [](const ScratchDir& d) { return search_args(d, "native", "best.yaml"); },
       {}},
      {"best_nograph", "best-nograph.yaml",
       [](const ScratchDir& d) { return search_args(d, "native", "best.yaml"); }, {}},
      {"ktransformers", "rules.yaml",
       [](const ScratchDir& d) { return search_args(d, "ktransformers", "rules.yaml"); }, {}},
      {"llama_cpp", "ot.txt",
       [](const ScratchDir& d) { return search_args(d, "llama-cpp", "ot.txt"); }, {}},
      {"gen_model", "g.gguf",
       [](const ScratchDir& d) {
         return std::vector<std::string>{"gen-model", "--preset", "tiny", "-q", "-o", d / "g.gguf"};
       },
       {}},
      {"convert", "c.gguf",
       [](const ScratchDir& d) {
         return std::vector<std::string>{"convert", std::string(KTUNE_TEST_DATA) + "/qwen3moe-tiny-hf",
                                         "-q", "-o", d / "c.gguf"};
       },
       {}},
      {"quantize", "q.gguf",
       [](const ScratchDir& d) {
         return std::vector<std::string>{"quantize", d / "given.gguf", d / "q.gguf", "--type",
                                         "q4_0", "-q"};
       },
       {}},
  };
  return kinds;
}

class FaultsKillAtRename : public ::testing::TestWithParam<std::tuple<size_t, bool>> {
 protected:
  static void SetUpTestSuite() {
    inputs_ = new ScratchDir;
    const ProcessResult g = run_ktune(
        {"gen-model", "--preset", "tiny", "--quant", "q8_0", "-q", "-o", *inputs_ / "given.gguf"});
    ASSERT_EQ(g.exit_code, 0) << g.err;
    const ProcessResult p = run_ktune({"profile", "--model", "synth:tiny", "-p", "4", "-n", "4",
                                       "--warmup", "0", "--baseline-windows", "1", "--threads",
                                       "1", "-q", "-o", *inputs_ / "given.json"});
    ASSERT_EQ(p.exit_code, 0) << p.err;
  }
  static void TearDownTestSuite() {
    delete inputs_;
    inputs_ = nullptr;
  }
  static ScratchDir* inputs_;
};
ScratchDir* FaultsKillAtRename::inputs_ = nullptr;

TEST_P(FaultsKillAtRename, LeavesNothingOrTheOldFileUnderTheOutputName) {
  const OutputKind& kind = output_kinds()[std::get<0>(GetParam())];
  const bool overwrite = std::get<1>(GetParam());
  ScratchDir dir;
  for (const char* f : {"given.gguf", "given.json", "given.timeline.json"}) {
    fs::copy_file(inputs_->path / f, dir.path / f);
  }
  const std::string out = dir / kind.file;
  const std::string old = "old content of " + kind.file + "\n";
  if (overwrite) std::ofstream(out) << old;

  setenv("KTUNE_TEST_PAUSE_BEFORE_RENAME", ("/" + kind.file).c_str(), 1);
  ChildProcess child(kind.args(dir));
  unsetenv("KTUNE_TEST_PAUSE_BEFORE_RENAME");
  // The output's temp file fills (small outputs are buffered and written at commit); the hook
  // then holds the process before the rename.
  auto temp_has_data = [&] {
    std::error_code ec;
    for (const fs::path& t : temp_files_of(out)) {
      if (fs::file_size(t, ec) > 0 && !ec) return true;
    }
    return false;
  };
  ASSERT_TRUE(wait_until([&] { return temp_has_data() || !child.running(); }, 120.0))
      << "no temp file with data for " << out;
  ASSERT_TRUE(child.running()) << "exited before its write of " << kind.file << ": "
                               << child.err();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  child.signal(SIGKILL);
  const auto w = child.wait(10.0);
  ASSERT_TRUE(w.result.signaled);
  EXPECT_EQ(w.result.signal, SIGKILL);

  if (overwrite) {
    EXPECT_EQ(read_all(out), old) << "the old " << kind.file << " was replaced or damaged";
  } else {
    EXPECT_FALSE(fs::exists(out)) << kind.file << " exists after kill -9 before its rename";
  }
  // The killed writer's temp file stays (kill -9 cannot be caught) and is never the output.
  const auto temps = temp_files_of(out);
  ASSERT_EQ(temps.size(), 1u);
  EXPECT_NE(temps[0].filename().string().find(".tmp." + std::to_string(child.pid()) + "."),
            std::string::npos);
  // It was killed at the rename: the temp file holds the whole output (JSON that parses).
  if (kind.file.size() > 5 && kind.file.compare(kind.file.size() - 5, 5, ".json") == 0) {
    EXPECT_NO_THROW(nlohmann::json::parse(read_all(temps[0].string())));
  }
  // Outputs written before this one are complete.
  for (const std::string& f : kind.written_before) {
    EXPECT_NO_THROW(nlohmann::json::parse(read_all(dir / f))) << f;
  }
  EXPECT_EQ(all_temp_files(dir.path).size(), 1u);
}

std::string kind_name(const ::testing::TestParamInfo<std::tuple<size_t, bool>>& info) {
  return output_kinds()[std::get<0>(info.param)].name +
         (std::get<1>(info.param) ? "_over_old" : "_fresh");
}

INSTANTIATE_TEST_SUITE_P(EveryOutput, FaultsKillAtRename,
                         ::testing::Combine(::testing::Range<size_t>(0, output_kinds().size()),
                                            ::testing::Bool()),
                         kind_name);

// Without the kill the paused write completes (the hook only delays): same command, one output.
TEST(FaultsKillAtRenameHook, OnlyDelaysTheRename) {
  ScratchDir dir;
  setenv("KTUNE_TEST_PAUSE_BEFORE_RENAME", "/nomatch.json", 1);
  const ProcessResult r = run_ktune({"gen-model", "--preset", "tiny", "-q", "-o", dir / "g.gguf"});
  unsetenv("KTUNE_TEST_PAUSE_BEFORE_RENAME");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(fs::exists(dir / "g.gguf"));
  EXPECT_TRUE(all_temp_files(dir.path).empty());
}

}  // namespace
