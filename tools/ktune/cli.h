// The CLI's shared pieces: each subcommand lives in its own cmd_*.cpp and registers itself with
// an add_*_command function; run_cli() is the one top-level handler that turns exceptions into
// one-line errors and exit codes (0 ok, 1 runtime error, 2 usage error).
#pragma once

#include <CLI/CLI.hpp>
#include <string>
#include <vector>

namespace ktune::cli {

void add_gen_model_command(CLI::App& app);
void add_logits_command(CLI::App& app);
void add_run_command(CLI::App& app);
void add_probe_command(CLI::App& app);
void add_convert_command(CLI::App& app);
void add_info_command(CLI::App& app);
void add_profile_command(CLI::App& app);
void add_trace_command(CLI::App& app);
void add_search_command(CLI::App& app);
void add_tokenize_command(CLI::App& app);
void add_quantize_command(CLI::App& app);
void add_compare_command(CLI::App& app);

// Parses argv and runs the chosen subcommand. Returns the process exit code.
int run_cli(int argc, char** argv);

// Progress on stderr for long work: a bar when stderr is a terminal, a line every 10 % otherwise.
class Progress {
 public:
  Progress(std::string label, bool enabled);
  void update(uint64_t done, uint64_t total);
  void finish();

 private:
  std::string label_;
  bool enabled_;
  bool tty_;
  int last_shown_ = -1;
  double start_s_ = 0;
};

double now_seconds();  // monotonic clock

// Before a long write to `output`: removes temp files a killed ktune left for the same output
// (AtomicFile's remove_stale_temps: dead pid, untouched for a minute) and says so on stderr
// unless quiet.
void remove_stale_temp_files(const std::string& output, bool quiet);

}  // namespace ktune::cli
