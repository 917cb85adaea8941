// Clean stops on Ctrl-C (SIGINT) and SIGTERM. The CLI installs the handlers for the length of one
// command (InterruptScope); the handler only records the signal in an atomic flag
// (async-signal-safe), and long loops poll it: between benchmark tokens and repetitions, between
// chunks the GGUF writer writes, between work items of the synthetic model builder. A loop that
// sees the flag throws Interrupted, which unwinds like any error: AtomicFile's destructor removes
// its temporary file, so no partial file is ever left under the output name. The CLI prints one
// line and exits 128 + signal (130 for SIGINT, 143 for SIGTERM).
//
// A second SIGINT/SIGTERM while the first is pending stops the process at once: the handler
// unlinks the temporary files of every open AtomicFile (registered below), restores the default
// action and re-raises the signal, so the process dies of it (shell status 130/143).
#pragma once

#include <string>

#include "ktune/engine/error.h"

namespace ktune {

// A stop requested by a signal. exit_code_for_signal() is 128 + signal.
class Interrupted : public Error {
 public:
  Interrupted(int signal, std::string fix);
  int signal() const { return signal_; }
  int exit_code_for_signal() const { return 128 + signal_; }

 private:
  int signal_;
};

// Installs the SIGINT and SIGTERM handlers on construction and restores the previous ones (and
// clears the flag) on destruction. Scopes do not nest; the CLI holds one per command.
class InterruptScope {
 public:
  InterruptScope();
  ~InterruptScope();
  InterruptScope(const InterruptScope&) = delete;
  InterruptScope& operator=(const InterruptScope&) = delete;
};

// The signal that asked for a stop, or 0. One relaxed atomic load: cheap enough per token.
int interrupt_signal();
inline bool interrupted() { return interrupt_signal() != 0; }

// "SIGINT", "SIGTERM" or "signal N".
std::string signal_name(int signal);

// Throws Interrupted(signal, fix) when a stop was requested.
void throw_if_interrupted(const std::string& fix);

// For tests: sets (0 clears) the flag as if the handler had run.
void set_interrupt_for_testing(int signal);

// Temporary files the handler removes before a second signal kills the process. A slot holds a
// copy of the path (async-signal-safe to read); register returns -1 when all slots are taken or
// the path is too long (then only the normal unwinding removes the file).
int register_temp_file(const std::string& path);
void unregister_temp_file(int slot);

}  // namespace ktune
