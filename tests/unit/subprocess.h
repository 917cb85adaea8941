// Runs the ktune binary (or any command) in a child process and captures stdout, stderr and the
// exit status, so tests see exactly what a user sees: one line on stderr, exit 1 or 2, no signal.
#pragma once

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace ktune::test {

struct ProcessResult {
  int exit_code = -1;   // valid when !signaled
  bool signaled = false;
  int signal = 0;
  std::string out;
  std::string err;
};

inline std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) {
    if (c == '\'') q += "'\\''";
    else q += c;
  }
  return q + "'";
}

// Runs KTUNE_BINARY with args; a timeout of `seconds` guards against hangs.
inline ProcessResult run_ktune(const std::vector<std::string>& args, int seconds = 120) {
  char out_tmpl[] = "/tmp/ktune_test_out_XXXXXX";
  char err_tmpl[] = "/tmp/ktune_test_err_XXXXXX";
  int out_fd = mkstemp(out_tmpl);
  int err_fd = mkstemp(err_tmpl);
  ProcessResult r;
  pid_t pid = fork();
  if (pid == 0) {
    dup2(out_fd, 1);
    dup2(err_fd, 2);
    std::vector<std::string> argv_s = {"timeout", "-s", "KILL", std::to_string(seconds),
                                       KTUNE_BINARY};
    argv_s.insert(argv_s.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& s : argv_s) argv.push_back(s.data());
    argv.push_back(nullptr);
    execvp("timeout", argv.data());
    _exit(127);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  close(out_fd);
  close(err_fd);
  r.out = read_all(out_tmpl);
  r.err = read_all(err_tmpl);
  unlink(out_tmpl);
  unlink(err_tmpl);
  if (WIFEXITED(status)) {
    r.exit_code = WEXITSTATUS(status);
    // timeout(1) reports a killed child as 128 + signal.
    if (r.exit_code > 128) {
      r.signaled = true;
      r.signal = r.exit_code - 128;
    }
  } else if (WIFSIGNALED(status)) {
    r.signaled = true;
    r.signal = WTERMSIG(status);
  }
  return r;
}

// ---- a child to signal: start it, wait for a condition, send a signal, collect the result ----

inline double monotonic_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Polls cond every poll_s until it is true (returns true) or timeout_s passes (returns false).
inline bool wait_until(const std::function<bool()>& cond, double timeout_s, double poll_s = 0.02) {
  const double end = monotonic_seconds() + timeout_s;
  for (;;) {
    if (cond()) return true;
    if (monotonic_seconds() >= end) return false;
    std::this_thread::sleep_for(std::chrono::duration<double>(poll_s));
  }
}

// KTUNE_BINARY exec'd directly (no timeout(1) in between, so a signal reaches ktune itself),
// stdout and stderr to temporary files. The destructor SIGKILLs a child still running, so a
// failing test never leaves one behind.
class ChildProcess {
 public:
  explicit ChildProcess(const std::vector<std::string>& args) {
    char out_tmpl[] = "/tmp/ktune_test_out_XXXXXX";
    char err_tmpl[] = "/tmp/ktune_test_err_XXXXXX";
    const int out_fd = mkstemp(out_tmpl);
    const int err_fd = mkstemp(err_tmpl);
    out_path_ = out_tmpl;
    err_path_ = err_tmpl;
    pid_ = fork();
    if (pid_ == 0) {
      dup2(out_fd, 1);
      dup2(err_fd, 2);
      std::vector<std::string> argv_s = {KTUNE_BINARY};
      argv_s.insert(argv_s.end(), args.begin(), args.end());
      std::vector<char*> argv;
      for (auto& s : argv_s) argv.push_back(s.data());
      argv.push_back(nullptr);
      execv(KTUNE_BINARY, argv.data());
      _exit(127);
    }
    close(out_fd);
    close(err_fd);
  }
  ~ChildProcess() {
    if (running()) {
      ::kill(pid_, SIGKILL);
      int status = 0;
      waitpid(pid_, &status, 0);
    }
    unlink(out_path_.c_str());
    unlink(err_path_.c_str());
  }
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  pid_t pid() const { return pid_; }
  bool running() const { return pid_ > 0 && !reaped_; }
  std::string out() const { return read_all(out_path_); }
  std::string err() const { return read_all(err_path_); }

  // CPU time (user + system, all threads) the child has used so far: a sign of progress that
  // adapts to a loaded machine better than wall time.
  double cpu_seconds() const {
    const std::string stat = read_all("/proc/" + std::to_string(pid_) + "/stat");
    const size_t rp = stat.rfind(')');
    if (rp == std::string::npos) return 0;
    std::istringstream in(stat.substr(rp + 2));
    std::string field;
    double utime = 0, stime = 0;
    for (int k = 3; k <= 15 && in >> field; ++k) {  // fields 3.. after "pid (comm)"
      if (k == 14) utime = std::stod(field);
      if (k == 15) stime = std::stod(field);
    }
    return (utime + stime) / static_cast<double>(sysconf(_SC_CLK_TCK));
  }

  void signal(int sig) const {
    if (running()) ::kill(pid_, sig);
  }

  // Waits up to timeout_s for the child to end; past it the child is SIGKILLed and the result
  // says timed_out. seconds: how long the wait took.
  struct Waited {
    ProcessResult result;
    bool timed_out = false;
    double seconds = 0;
  };
  Waited wait(double timeout_s) {
    Waited w;
    const double t0 = monotonic_seconds();
    int status = 0;
    const bool done = wait_until(
        [&] {
          const pid_t r = waitpid(pid_, &status, WNOHANG);
          return r == pid_ || r < 0;
        },
        timeout_s, 0.005);
    w.seconds = monotonic_seconds() - t0;
    if (!done) {
      ::kill(pid_, SIGKILL);
      waitpid(pid_, &status, 0);
      w.timed_out = true;
    }
    reaped_ = true;
    if (WIFEXITED(status)) {
      w.result.exit_code = WEXITSTATUS(status);
    } else if (WIFSIGNALED(status)) {
      w.result.signaled = true;
      w.result.signal = WTERMSIG(status);
    }
    w.result.out = out();
    w.result.err = err();
    return w;
  }

 private:
  pid_t pid_ = -1;
  bool reaped_ = false;
  std::string out_path_, err_path_;
};

// Counts newline-terminated lines.
inline int count_lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

// Command lines that must each fail as a usage error: exit code 2, no signal, exactly one line on
// stderr, starting with `starts`.
struct UsageErrorCase {
  std::vector<std::string> args;
  std::string starts;
};
inline void expect_usage_errors(const std::vector<UsageErrorCase>& cases) {
  for (const UsageErrorCase& c : cases) {
    const ProcessResult r = run_ktune(c.args);
    ASSERT_FALSE(r.signaled);
    EXPECT_EQ(r.exit_code, 2) << r.err;
    EXPECT_EQ(r.err.rfind(c.starts, 0), 0u) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
}

}  // namespace ktune::test
