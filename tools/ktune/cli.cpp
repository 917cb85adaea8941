#include "cli.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <exception>
#include <iostream>
#include <new>
#include <string>
#include <system_error>

#include "ktune/engine/atomic_file.h"
#include "ktune/engine/build_info.h"
#include "ktune/engine/error.h"
#include "ktune/engine/interrupt.h"

namespace ktune::cli {

double now_seconds() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}

Progress::Progress(std::string label, bool enabled)
    : label_(std::move(label)), enabled_(enabled), tty_(isatty(STDERR_FILENO) != 0),
      start_s_(now_seconds()) {}

void Progress::update(uint64_t done, uint64_t total) {
  if (!enabled_ || total == 0) return;
  const int pct = static_cast<int>(100.0 * static_cast<double>(done) / static_cast<double>(total));
  if (tty_) {
    if (pct == last_shown_) return;
    const int width = 30;
    const int filled = pct * width / 100;
    std::fprintf(stderr, "\r%s [%.*s%*s] %3d%%  %.1f/%.1f MB", label_.c_str(), filled,
                 "##############################", width - filled, "", pct, done / 1e6,
                 total / 1e6);
    std::fflush(stderr);
  } else {
    if (pct / 10 == last_shown_ / 10 && last_shown_ >= 0) return;
    std::fprintf(stderr, "%s: %d%% (%.1f/%.1f MB)\n", label_.c_str(), pct, done / 1e6,
                 total / 1e6);
  }
  last_shown_ = pct;
}

void Progress::finish() {
  if (!enabled_) return;
  if (tty_) std::fprintf(stderr, "\n");
  std::fprintf(stderr, "%s: done in %.1f s\n", label_.c_str(), now_seconds() - start_s_);
}

void remove_stale_temp_files(const std::string& output, bool quiet) {
  for (const std::string& p : remove_stale_temps(output)) {
    if (!quiet) std::cerr << "ktune: removed " << p << " (left by a killed ktune)\n";
  }
}

namespace {

// The error is one line of bounded length whatever a message echoes: control characters (a
// binary file's bytes quoted as a value, a newline in a library's text) become '?', and past
// 2000 bytes the middle gives way to " ... " (the start names the file and problem, the end
// says what to do).
std::string one_line(const std::string& text) {
  std::string s = text;
  for (char& c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) c = '?';
  }
  constexpr size_t kMax = 2000, kHead = 1500, kTail = 400;
  if (s.size() > kMax) s = s.substr(0, kHead) + " ... " + s.substr(s.size() - kTail);
  return s;
}

}  // namespace

int run_cli(int argc, char** argv) {
  CLI::App app{
      "ktune: profile, place and run Mixture-of-Experts models on CPU + GPU.\n"
      "Start with `ktune run --model synth:tiny` (no download needed), then see each\n"
      "subcommand's --help."};
  app.set_version_flag("--version",
                       std::string("ktune ") + build_version() + " (" + build_commit() + ")");
  app.require_subcommand(1);
  app.fallthrough(false);
  add_run_command(app);
  add_logits_command(app);
  add_gen_model_command(app);
  add_convert_command(app);
  add_quantize_command(app);
  add_probe_command(app);
  add_info_command(app);
  add_profile_command(app);
  add_trace_command(app);
  add_search_command(app);
  add_compare_command(app);
  add_tokenize_command(app);

  // Ctrl-C / SIGTERM set a flag that long loops poll (interrupt.h); they throw Interrupted.
  InterruptScope interrupt_scope;
  try {
    // CLI11 reports a mistyped command as "A subcommand is required"; name it and the choices.
    if (argc > 1 && argv[1][0] != '-') {
      std::string names;
      bool known = false;
      for (const CLI::App* s : app.get_subcommands([](const CLI::App*) { return true; })) {
        known = known || s->get_name() == argv[1];
        names += (names.empty() ? "" : ", ") + s->get_name();
      }
      if (!known) {
        throw_usage("command line", "`" + std::string(argv[1]) + "` is not a ktune command",
                    "the commands are " + names + "; run 'ktune --help'");
      }
    }
    app.parse(argc, argv);
    return 0;
  } catch (const Interrupted& e) {
    if (isatty(STDERR_FILENO)) std::cerr << "\n";  // end a progress bar's line
    std::cerr << "ktune: error: " << one_line(e.what()) << "\n";
    return e.exit_code_for_signal();  // 130 for SIGINT, 143 for SIGTERM
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    std::string msg = e.what();
    std::cerr << "ktune: error: command line: " << one_line(msg) << "; run 'ktune --help' or "
              << "'ktune <command> --help' for usage\n";
    return 2;
  } catch (const ktune::Error& e) {
    std::cerr << "ktune: error: " << one_line(e.what()) << "\n";
    return e.exit_code();
  } catch (const std::bad_alloc&) {
    std::cerr << "ktune: error: memory: out of host memory; use a smaller model or context, or "
                 "free memory\n";
    return 1;
  } catch (const std::system_error& e) {
    // A thread or resource the system refused (ulimit, memory pressure) is not a ktune bug.
    const std::error_code c = e.code();
    if (c == std::errc::resource_unavailable_try_again || c == std::errc::not_enough_memory) {
      std::cerr << "ktune: error: system: " << one_line(e.what())
                << "; free memory, use fewer threads, or raise the process limits (ulimit -u, "
                   "ulimit -v)\n";
      return 1;
    }
    std::cerr << "ktune: error: internal: " << one_line(e.what())
              << "; this is a bug in ktune, please report it with the command line\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "ktune: error: internal: " << one_line(e.what())
              << "; this is a bug in ktune, please report it with the command line\n";
    return 1;
  }
}

}  // namespace ktune::cli
