// Read loop of the bandwidth probe with 4-word vector loads (compiled with -mavx2 flags by
// engine/CMakeLists.txt); 4 independent accumulators keep many loads in flight.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include "cpu/read_probe.h"

namespace ktune::cpu {

uint64_t read_words_avx2(const uint64_t* p, size_t n_words) {
  // The probe's slices start at 4 KiB boundaries; a ragged start is summed by the scalar loop.
  size_t i = 0;
  while (i < n_words && (reinterpret_cast<uintptr_t>(p + i) % (4 * 8)) != 0) ++i;
  uint64_t head = 0;
  for (size_t k = 0; k < i; ++k) head += p[k];
  __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256(), a2 = _mm256_setzero_si256(), a3 = _mm256_setzero_si256();
  for (; i + 4 * 4 <= n_words; i += 4 * 4) {
    a0 = _mm256_add_epi64(a0, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_add_epi64(a1, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 4)));
    a2 = _mm256_add_epi64(a2, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 2 * 4)));
    a3 = _mm256_add_epi64(a3, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 3 * 4)));
  }
  __m256i s = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
  alignas(32) uint64_t lanes[4]; _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), s);
  uint64_t sum = head;
  for (uint64_t v : lanes) sum += v;
  for (; i < n_words; ++i) sum += p[i];
  return sum;
}

}  // namespace ktune::cpu
