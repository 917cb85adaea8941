// Runs the ktune binary (or any command) in a child process and captures stdout, stderr and the
// exit status, so tests see exactly what a user sees: one line on stderr, exit 1 or 2, no signal.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
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

// Counts newline-terminated lines.
inline int count_lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

}  // namespace ktune::test
