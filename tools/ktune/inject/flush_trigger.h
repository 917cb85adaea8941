// When the injection library writes its capture (inject/exec_capture.h): exactly once, at the
// first of (a) normal exit (atexit), (b) SIGINT or SIGTERM, (c) the --duration limit. Plain
// POSIX, no CUDA, so it is tested without a GPU (tests/unit/test_exec_capture.cpp forks a child
// that raises the signals).
//
// Signals: the handler cannot write a file safely (CUPTI's flush and the JSON text allocate), so
// it hands the work to a flusher thread through a pipe and waits on a second pipe (write, poll
// and read are async-signal-safe), at most `signal_wait_ms`; then it chains: a handler the
// program had installed is called, SIG_IGN stays ignored, and SIG_DFL is restored and the signal
// re-raised, so the program ends as it would have without ktune (same exit status).
//
// A child forked without exec (a worker process) is not traced: CUDA cannot be used there, so
// it gets the program's signal dispositions back, never wakes the parent's flusher, and writes
// nothing at exit. A child that execs loads the injection afresh and writes its own capture.
#pragma once

#include <cstdint>
#include <string>

namespace ktune::inject {

using FlushFn = void (*)(const char* reason);

struct TriggerOptions {
  int64_t duration_ms = 0;         // > 0: flush this long after start_flush_triggers
  int64_t signal_wait_ms = 20000;  // how long a signal handler waits for the flush
  bool signals = true;             // install SIGINT/SIGTERM handlers
};

// Starts the flusher thread and installs the handlers (once per process; later calls do
// nothing). A signal the program ignores is left ignored. fn runs on the flusher thread for signals
// and the duration, and on the exiting thread for exit. Returns "" or why it could not start (the
// caller still flushes at exit).
std::string start_flush_triggers(FlushFn fn, const TriggerOptions& opt);

// Runs fn(reason) if no flush ran yet; a caller arriving while another flush runs waits for it
// (so exit does not end the process under a flush in progress). True when this call ran it.
bool flush_once(FlushFn fn, const char* reason);
bool flushed();

// For tests in a forked child: forget that a flush ran (the parent's state is copied by fork).
void reset_for_test();

}  // namespace ktune::inject
