// Helpers shared by the libFuzzer targets (docs/fuzzing.md).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "ktune/engine/error.h"

namespace ktune::fuzz {

// Keeps a value alive so the optimiser cannot drop the call that produced it.
template <typename T>
inline void consume(const T& v) {
  asm volatile("" : : "r"(&v) : "memory");
}

// Reads the first and last byte of [p, p + n): AddressSanitizer reports a range that leaves the
// fuzzer's input buffer (libFuzzer hands each input in an exactly sized allocation).
inline void touch(const uint8_t* p, uint64_t n) {
  if (n == 0) return;
  volatile uint8_t a = p[0];
  volatile uint8_t b = p[n - 1];
  (void)a;
  (void)b;
}

// Runs f; a ktune::Error is the contract's answer to bad input, anything else propagates (an
// uncaught exception aborts and libFuzzer records the input).
template <typename F>
inline void expect_error(F&& f) {
  try {
    f();
  } catch (const ktune::Error&) {
  }
}

}  // namespace ktune::fuzz
