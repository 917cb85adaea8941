#include "ktune/engine/interrupt.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstring>

namespace ktune {
namespace {

std::atomic<int> g_signal{0};
static_assert(std::atomic<int>::is_always_lock_free, "the handler needs a lock-free flag");

struct sigaction g_old_int {};
struct sigaction g_old_term {};
bool g_installed = false;

// Registered temp files: state 0 free, 1 being written, 2 ready (the handler unlinks only 2).
constexpr int kSlots = 16;
constexpr size_t kPathMax = 4096;
std::atomic<int> g_slot_state[kSlots];
char g_slot_path[kSlots][kPathMax];

extern "C" void on_stop_signal(int sig) {
  int expected = 0;
  if (g_signal.compare_exchange_strong(expected, sig)) return;  // first: polled loops stop
  // Second signal: the user insists. Remove our temp files, then die of the signal.
  for (int k = 0; k < kSlots; ++k) {
    if (g_slot_state[k].load() == 2) ::unlink(g_slot_path[k]);
  }
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  ::sigaction(sig, &dfl, nullptr);
  ::raise(sig);  // blocked while in this handler; delivered (default action) on return
}

}  // namespace

Interrupted::Interrupted(int signal, std::string fix)
    : Error("interrupted", "stopped by " + signal_name(signal), std::move(fix)), signal_(signal) {}

InterruptScope::InterruptScope() {
  g_signal.store(0);
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;  // blocking reads/writes resume; the loops poll the flag
  ::sigaction(SIGINT, &sa, &g_old_int);
  ::sigaction(SIGTERM, &sa, &g_old_term);
  g_installed = true;
}

InterruptScope::~InterruptScope() {
  if (g_installed) {
    ::sigaction(SIGINT, &g_old_int, nullptr);
    ::sigaction(SIGTERM, &g_old_term, nullptr);
    g_installed = false;
  }
  g_signal.store(0);
}

int interrupt_signal() { return g_signal.load(std::memory_order_relaxed); }

std::string signal_name(int signal) {
  if (signal == SIGINT) return "SIGINT";
  if (signal == SIGTERM) return "SIGTERM";
  return "signal " + std::to_string(signal);
}

void throw_if_interrupted(const std::string& fix) {
  const int sig = interrupt_signal();
  if (sig != 0) throw Interrupted(sig, fix);
}

void set_interrupt_for_testing(int signal) { g_signal.store(signal); }

int register_temp_file(const std::string& path) {
  if (path.size() >= kPathMax) return -1;
  for (int k = 0; k < kSlots; ++k) {
    int expected = 0;
    if (!g_slot_state[k].compare_exchange_strong(expected, 1)) continue;
    std::memcpy(g_slot_path[k], path.c_str(), path.size() + 1);
    g_slot_state[k].store(2);
    return k;
  }
  return -1;
}

void unregister_temp_file(int slot) {
  if (slot < 0 || slot >= kSlots) return;
  g_slot_state[slot].store(0);
}

}  // namespace ktune
