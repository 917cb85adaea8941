// Flush-once gate, signal hand-off and duration timer (inject/flush_trigger.h).
#include "inject/flush_trigger.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

namespace ktune::inject {
namespace {

std::atomic<int> g_state{0};  // 0 not flushed, 1 flushing, 2 done
std::atomic<bool> g_started{false};
FlushFn g_fn = nullptr;
TriggerOptions g_opt;
int g_request[2] = {-1, -1};  // handler -> flusher: the signal number as one byte
int g_done[2] = {-1, -1};     // flusher -> handler: one byte when the flush finished
struct sigaction g_prev_int {};
struct sigaction g_prev_term {};
int64_t g_start_ms = 0;

int64_t now_ms() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

const char* reason_for(int sig) {
  return sig == SIGINT ? "signal SIGINT" : sig == SIGTERM ? "signal SIGTERM" : "signal";
}

void on_signal(int sig, siginfo_t* info, void* uc) {
  const int saved_errno = errno;
  if (g_state.load() != 2 && g_request[1] >= 0) {
    const char b = static_cast<char>(sig);
    if (write(g_request[1], &b, 1) == 1) {
      pollfd p{g_done[0], POLLIN, 0};
      const int64_t deadline = now_ms() + g_opt.signal_wait_ms;
      for (;;) {
        const int64_t left = deadline - now_ms();
        if (left <= 0) break;
        const int r = poll(&p, 1, static_cast<int>(left));
        if (r > 0) {
          char d;
          (void)!read(g_done[0], &d, 1);
          break;
        }
        if (r < 0 && errno != EINTR) break;
      }
    }
  }
  // Chain to what the program had.
  const struct sigaction& prev = sig == SIGINT ? g_prev_int : g_prev_term;
  if ((prev.sa_flags & SA_SIGINFO) != 0) {
    if (prev.sa_sigaction != nullptr) prev.sa_sigaction(sig, info, uc);
  } else if (prev.sa_handler == SIG_IGN) {
    // ignored before ktune: stays ignored
  } else if (prev.sa_handler == SIG_DFL || prev.sa_handler == nullptr) {
    // Default action: restore it and deliver the signal again (it is blocked while this handler
    // runs, so it arrives as the handler returns) -> the process ends with this signal.
    sigaction(sig, &prev, nullptr);
    raise(sig);
  } else {
    prev.sa_handler(sig);
  }
  errno = saved_errno;
}

void* flusher_main(void*) {
  // Signals go to the program's threads, never here (this thread serves the handler).
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, nullptr);
  for (;;) {
    int timeout = -1;
    if (g_opt.duration_ms > 0 && g_state.load() == 0) {
      const int64_t left = g_start_ms + g_opt.duration_ms - now_ms();
      timeout = left > 0 ? static_cast<int>(left > 1000000000 ? 1000000000 : left) : 0;
    }
    pollfd p{g_request[0], POLLIN, 0};
    const int r = poll(&p, 1, timeout);
    if (r == 0) {
      flush_once(g_fn, "duration");
      continue;  // keep serving signal handlers (they find the flush done)
    }
    if (r < 0) {
      if (errno == EINTR) continue;
      return nullptr;
    }
    char sig = 0;
    const ssize_t n = read(g_request[0], &sig, 1);
    if (n <= 0) return nullptr;
    flush_once(g_fn, reason_for(sig));
    const char d = 1;
    (void)!write(g_done[1], &d, 1);
  }
}

// A child forked (without exec) from the traced process shares our pipes but not our threads and
// cannot use CUDA: it must neither flush nor wake the parent's flusher. It gets the program's
// own signal dispositions back and counts as flushed (its exit writes nothing).
void after_fork_in_child() {
  g_state.store(2);
  if (g_opt.signals) {
    if (g_prev_int.sa_handler != SIG_IGN) sigaction(SIGINT, &g_prev_int, nullptr);
    if (g_prev_term.sa_handler != SIG_IGN) sigaction(SIGTERM, &g_prev_term, nullptr);
  }
  for (int* fd : {&g_request[0], &g_request[1], &g_done[0], &g_done[1]}) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
  }
}

}  // namespace

bool flushed() { return g_state.load() == 2; }

bool flush_once(FlushFn fn, const char* reason) {
  int expected = 0;
  if (g_state.compare_exchange_strong(expected, 1)) {
    if (fn != nullptr) fn(reason);
    g_state.store(2);
    return true;
  }
  // Another thread flushes: wait for it (bounded: never hang the program's exit).
  const int64_t deadline = now_ms() + 30000;
  while (g_state.load() != 2 && now_ms() < deadline) {
    timespec ts{0, 2000000};
    nanosleep(&ts, nullptr);
  }
  return false;
}

std::string start_flush_triggers(FlushFn fn, const TriggerOptions& opt) {
  bool expected = false;
  if (!g_started.compare_exchange_strong(expected, true)) return "";
  g_fn = fn;
  g_opt = opt;
  g_start_ms = now_ms();
  if (pipe2(g_request, O_CLOEXEC) != 0 || pipe2(g_done, O_CLOEXEC) != 0) {
    return std::string("pipe: ") + std::strerror(errno);
  }
  pthread_t th;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  // The flusher starts with every signal blocked (inherited mask), so none lands on it.
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, &old);
  const int e = pthread_create(&th, &attr, flusher_main, nullptr);
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  pthread_attr_destroy(&attr);
  if (e != 0) {
    close(g_request[0]);
    close(g_request[1]);
    g_request[0] = g_request[1] = -1;
    return std::string("pthread_create: ") + std::strerror(e);
  }
  pthread_atfork(nullptr, nullptr, after_fork_in_child);
  if (opt.signals) {
    struct sigaction sa {};
    sa.sa_sigaction = on_signal;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    // A signal the program ignores (nohup, a background job) stays ignored.
    sigaction(SIGINT, nullptr, &g_prev_int);
    sigaction(SIGTERM, nullptr, &g_prev_term);
    if (g_prev_int.sa_handler != SIG_IGN) sigaction(SIGINT, &sa, nullptr);
    if (g_prev_term.sa_handler != SIG_IGN) sigaction(SIGTERM, &sa, nullptr);
  }
  return "";
}

void reset_for_test() { g_state.store(0); }

}  // namespace ktune::inject
