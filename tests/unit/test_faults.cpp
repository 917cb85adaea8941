// Faults (issue 8, item 3, CPU side): Ctrl-C / SIGTERM during `ktune run` and `ktune gen-model`
// stop cleanly (exit 128 + signal, one line on stderr, partial results marked, no temp file),
// and kill -9 during a write never leaves a partial file under the output name.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>

#include "ktune/engine/atomic_file.h"
#include "ktune/engine/gguf.h"
#include "ktune/engine/interrupt.h"
#include "subprocess.h"

namespace fs = std::filesystem;
using ktune::test::ChildProcess;
using ktune::test::count_lines;
using ktune::test::wait_until;

namespace {

// A fresh folder under /tmp, removed with everything in it.
struct TempDir {
  fs::path path;
  TempDir() {
    char tmpl[] = "/tmp/ktune_faults_XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

// Temp files AtomicFile made for `out`: <out>.tmp.<pid>.<random>.
std::vector<fs::path> temps_of(const fs::path& out) {
  std::vector<fs::path> r;
  const std::string prefix = out.filename().string() + ".tmp.";
  for (const auto& e : fs::directory_iterator(out.parent_path())) {
    if (e.path().filename().string().rfind(prefix, 0) == 0) r.push_back(e.path());
  }
  return r;
}

uint64_t temp_bytes(const fs::path& out) {
  uint64_t n = 0;
  std::error_code ec;
  for (const fs::path& p : temps_of(out)) n += fs::file_size(p, ec);
  return n;
}

const std::vector<std::string> kBigGen = {"gen-model", "--preset", "qwen3-30b-a3b", "--quant",
                                          "q4_0"};

std::vector<std::string> big_gen(const fs::path& out) {
  std::vector<std::string> a = kBigGen;
  a.push_back("-o");
  a.push_back(out.string());
  return a;
}

// Starts the 17 GB gen-model and waits until its temp file holds data (the write is under way).
void wait_for_write(ChildProcess& child, const fs::path& out) {
  ASSERT_TRUE(wait_until([&] { return temp_bytes(out) >= (64u << 20) || !child.running(); }, 60.0))
      << "no temp file with data appeared; stderr: " << child.err();
  ASSERT_EQ(temps_of(out).size(), 1u);
}

void expect_interrupt_line(const std::string& err, const std::string& sig) {
  // The last line on stderr is the one error (a progress line may come before it).
  const std::string last = err.substr(err.rfind('\n', err.size() - 2) + 1);
  EXPECT_EQ(last.rfind("ktune: error: interrupted: stopped by " + sig + "; ", 0), 0u) << err;
  EXPECT_EQ(err.find("ktune: error:"), err.rfind("ktune: error:")) << "one error line: " << err;
}

}  // namespace

// Ctrl-C during a long benchmark: the repetitions done are printed, marked partial, exit 130.
TEST(FaultsSignal, SigintDuringRunPrintsPartialTableAndExits130) {
  ChildProcess child(
      {"run", "--model", "synth:tiny", "-p", "64", "-n", "128", "-r", "1000", "--no-probe"});
  // Progress: CPU time adapts to a loaded machine (model build + warm-up + a few repetitions).
  ASSERT_TRUE(wait_until([&] { return child.cpu_seconds() >= 1.5 || !child.running(); }, 60.0));
  child.signal(SIGINT);
  const auto w = child.wait(2.0);
  ASSERT_FALSE(w.timed_out) << "did not stop within 2 s of SIGINT";
  ASSERT_FALSE(w.result.signaled);
  EXPECT_EQ(w.result.exit_code, 130);
  expect_interrupt_line(w.result.err, "SIGINT");
  EXPECT_NE(w.result.err.find("partial results above are marked partial"), std::string::npos);
  std::smatch m;
  const std::regex partial("# partial: interrupted by SIGINT after (\\d+) of 1000 repetitions");
  ASSERT_TRUE(std::regex_search(w.result.out, m, partial)) << w.result.out;
  if (std::stoi(m[1]) > 0) {
    EXPECT_NE(w.result.out.find("pp64"), std::string::npos) << w.result.out;
    EXPECT_NE(w.result.out.find("tg128"), std::string::npos) << w.result.out;
  }
}

// SIGTERM (e.g. a batch scheduler's stop): exit 143; --json says "partial": true.
TEST(FaultsSignal, SigtermDuringJsonRunMarksPartialAndExits143) {
  ChildProcess child({"run", "--model", "synth:tiny", "-p", "64", "-n", "128", "-r", "1000",
                      "--no-probe", "--json"});
  ASSERT_TRUE(wait_until([&] { return child.cpu_seconds() >= 1.5 || !child.running(); }, 60.0));
  child.signal(SIGTERM);
  const auto w = child.wait(2.0);
  ASSERT_FALSE(w.timed_out) << "did not stop within 2 s of SIGTERM";
  ASSERT_FALSE(w.result.signaled);
  EXPECT_EQ(w.result.exit_code, 143);
  expect_interrupt_line(w.result.err, "SIGTERM");
  const auto doc = nlohmann::json::parse(w.result.out);  // one valid document
  EXPECT_EQ(doc.at("partial"), true);
  EXPECT_EQ(doc.at("interrupted_by"), "SIGTERM");
  EXPECT_EQ(doc.at("repetitions_planned"), 1000);
  const int done = doc.at("repetitions_done");
  EXPECT_LT(done, 1000);
  EXPECT_EQ(doc.at("runs").at(0).at("repetitions_done"), done);
  EXPECT_EQ(doc.at("decode_tok_s").at("samples").size(), static_cast<size_t>(done));
}

// Ctrl-C during the 17 GB gen-model: exit 130 at once, no output, no temp file.
TEST(FaultsSignal, SigintDuringGenModelLeavesNoFile) {
  TempDir dir;
  const fs::path out = dir.path / "q30b.gguf";
  ChildProcess child(big_gen(out));
  wait_for_write(child, out);
  child.signal(SIGINT);
  const auto w = child.wait(2.0);
  ASSERT_FALSE(w.timed_out) << "did not stop within 2 s of SIGINT";
  EXPECT_FALSE(w.result.signaled);
  EXPECT_EQ(w.result.exit_code, 130);
  expect_interrupt_line(w.result.err, "SIGINT");
  EXPECT_NE(w.result.err.find("was not written"), std::string::npos) << w.result.err;
  EXPECT_FALSE(fs::exists(out));
  EXPECT_TRUE(temps_of(out).empty());
  EXPECT_TRUE(w.result.out.empty());
}

// Two Ctrl-Cs back to back (the user insists): whichever path stops it — the clean stop or the
// second signal's immediate exit, which removes the temp file in the handler — nothing is left.
TEST(FaultsSignal, DoubleSigintDuringGenModelLeavesNoFile) {
  TempDir dir;
  const fs::path out = dir.path / "q30b.gguf";
  ChildProcess child(big_gen(out));
  wait_for_write(child, out);
  child.signal(SIGINT);
  child.signal(SIGINT);
  const auto w = child.wait(2.0);
  ASSERT_FALSE(w.timed_out);
  if (w.result.signaled) {
    EXPECT_EQ(w.result.signal, SIGINT);
  } else {
    EXPECT_EQ(w.result.exit_code, 130);
  }
  EXPECT_FALSE(fs::exists(out));
  EXPECT_TRUE(temps_of(out).empty());
}

// The second signal's path, made certain: both signals are pending when the stopped process
// resumes, so the second handler runs before any loop polls. It removes the temp file and dies
// of the signal at once.
TEST(FaultsSignal, SecondSignalExitsAtOnceAndRemovesTemp) {
  TempDir dir;
  const fs::path out = dir.path / "q30b.gguf";
  ChildProcess child(big_gen(out));
  wait_for_write(child, out);
  child.signal(SIGSTOP);
  child.signal(SIGINT);
  child.signal(SIGTERM);
  child.signal(SIGCONT);
  const auto w = child.wait(2.0);
  ASSERT_FALSE(w.timed_out);
  ASSERT_TRUE(w.result.signaled) << "exit " << w.result.exit_code << ": " << w.result.err;
  EXPECT_TRUE(w.result.signal == SIGINT || w.result.signal == SIGTERM) << w.result.signal;
  EXPECT_FALSE(fs::exists(out));
  EXPECT_TRUE(temps_of(out).empty());
}

// kill -9 mid-write: no file under the output name; the temp file stays (documented), and the
// stale-temp sweep of the next gen-model would remove it.
TEST(FaultsKill, SigkillDuringGenModelLeavesNoOutput) {
  TempDir dir;
  const fs::path out = dir.path / "q30b.gguf";
  ChildProcess child(big_gen(out));
  wait_for_write(child, out);
  child.signal(SIGKILL);
  const auto w = child.wait(5.0);
  ASSERT_TRUE(w.result.signaled);
  EXPECT_EQ(w.result.signal, SIGKILL);
  EXPECT_FALSE(fs::exists(out));
  const auto left = temps_of(out);
  ASSERT_EQ(left.size(), 1u);  // kill -9 cannot be caught: its temp file remains
  EXPECT_NE(left[0].filename().string().find(".tmp." + std::to_string(child.pid()) + "."),
            std::string::npos);
  // Its writer is dead: the sweep (with no minimum age) removes exactly that file.
  const auto removed = ktune::remove_stale_temps(out.string(), 0);
  ASSERT_EQ(removed.size(), 1u);
  EXPECT_EQ(fs::path(removed[0]), left[0]);
  EXPECT_TRUE(temps_of(out).empty());
}

// kill -9 while overwriting: the old file keeps its old content.
TEST(FaultsKill, SigkillDuringOverwriteKeepsOldFile) {
  TempDir dir;
  const fs::path out = dir.path / "q30b.gguf";
  const std::string old = "old content, not a GGUF\n";
  std::ofstream(out, std::ios::binary) << old;
  ChildProcess child(big_gen(out));
  wait_for_write(child, out);
  child.signal(SIGKILL);
  const auto w = child.wait(5.0);
  ASSERT_TRUE(w.result.signaled);
  EXPECT_EQ(ktune::test::read_all(out.string()), old);
  for (const fs::path& p : temps_of(out)) fs::remove(p);
}

// The sweep leaves alone temp files of live processes, recent ones, and names not of its shape.
TEST(FaultsKill, StaleTempSweepIsConservative) {
  TempDir dir;
  const fs::path out = dir.path / "m.gguf";
  // A pid that surely is dead: a child that has exited and been reaped.
  const pid_t dead = fork();
  if (dead == 0) _exit(0);
  int status = 0;
  waitpid(dead, &status, 0);
  auto touch = [&](const std::string& name, bool old) {
    const fs::path p = dir.path / name;
    std::ofstream(p) << "x";
    if (old) fs::last_write_time(p, fs::file_time_type::clock::now() - std::chrono::hours(1));
    return p;
  };
  const fs::path stale = touch("m.gguf.tmp." + std::to_string(dead) + ".0123abcd", true);
  const fs::path young = touch("m.gguf.tmp." + std::to_string(dead) + ".0123abce", false);
  const fs::path live = touch("m.gguf.tmp." + std::to_string(getppid()) + ".0123abcd", true);
  const fs::path other = touch("m.gguf.tmp." + std::to_string(dead) + ".notahex!", true);
  const fs::path other2 = touch("n.gguf.tmp." + std::to_string(dead) + ".0123abcd", true);
  const auto removed = ktune::remove_stale_temps(out.string());
  ASSERT_EQ(removed.size(), 1u);
  EXPECT_EQ(fs::path(removed[0]), stale);
  EXPECT_FALSE(fs::exists(stale));
  for (const fs::path& p : {young, live, other, other2}) EXPECT_TRUE(fs::exists(p)) << p;
}

// In-process: the GGUF writer polls the flag between chunks and unwinds without a file.
TEST(FaultsInterrupt, WriterStopsOnFlagAndRemovesTemp) {
  TempDir dir;
  const fs::path out = dir.path / "w.gguf";
  ktune::gguf::Writer w;
  w.add_tensor("t", {1024, 1024}, ktune::QuantType::F32);
  int chunks = 0;
  try {
    w.write(out.string(), [&](size_t, const ktune::gguf::TensorInfo&, ktune::gguf::ByteSink& sink) {
      std::vector<float> row(1024, 1.0f);
      for (int r = 0; r < 1024; ++r) {
        if (r == 100) ktune::set_interrupt_for_testing(SIGTERM);
        sink.write(row.data(), row.size() * sizeof(float));
        ++chunks;
      }
    });
    ktune::set_interrupt_for_testing(0);
    FAIL() << "no Interrupted thrown";
  } catch (const ktune::Interrupted& e) {
    ktune::set_interrupt_for_testing(0);
    EXPECT_EQ(e.signal(), SIGTERM);
    EXPECT_EQ(e.exit_code_for_signal(), 143);
    EXPECT_EQ(std::string(e.what()).rfind("interrupted: stopped by SIGTERM; ", 0), 0u) << e.what();
  }
  EXPECT_EQ(chunks, 100);
  EXPECT_FALSE(fs::exists(out));
  EXPECT_TRUE(temps_of(out).empty());
}
