// The read loops of the bandwidth probe, one per ISA: the probe must read at least as fast as
// the best kernel can, or the "memory-bound limit" it yields would flatter the engine.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ktune::cpu {

// Sums 64-bit words of [p, p + n_words); the sum only keeps the loads observable.
uint64_t read_words_scalar(const uint64_t* p, size_t n_words);
uint64_t read_words_avx2(const uint64_t* p, size_t n_words);
uint64_t read_words_avx512(const uint64_t* p, size_t n_words);

}  // namespace ktune::cpu
