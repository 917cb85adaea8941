// Read loop of the bandwidth probe with 8-word vector loads (compiled with -mavx512 flags by
// engine/CMakeLists.txt); 4 independent accumulators keep many loads in flight.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include "cpu/read_probe.h"

namespace ktune::cpu {

uint64_t read_words_avx512(const uint64_t* p, size_t n_words) {
  // The probe's slices start at 4 KiB boundaries; a ragged start is summed by the scalar loop.
  size_t i = 0;
  while (i < n_words && (reinterpret_cast<uintptr_t>(p + i) % (8 * 8)) != 0) ++i;
  uint64_t head = 0;
  for (size_t k = 0; k < i; ++k) head += p[k];
  __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512(), a2 = _mm512_setzero_si512(), a3 = _mm512_setzero_si512();
  for (; i + 4 * 8 <= n_words; i += 4 * 8) {
    a0 = _mm512_add_epi64(a0, _mm512_load_si512(reinterpret_cast<const __m512i*>(p + i)));
    a1 = _mm512_add_epi64(a1, _mm512_load_si512(reinterpret_cast<const __m512i*>(p + i + 8)));
    a2 = _mm512_add_epi64(a2, _mm512_load_si512(reinterpret_cast<const __m512i*>(p + i + 2 * 8)));
    a3 = _mm512_add_epi64(a3, _mm512_load_si512(reinterpret_cast<const __m512i*>(p + i + 3 * 8)));
  }
  __m512i s = _mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3));
  alignas(64) uint64_t lanes[8]; _mm512_store_si512(lanes, s);
  uint64_t sum = head;
  for (uint64_t v : lanes) sum += v;
  for (; i < n_words; ++i) sum += p[i];
  return sum;
}

}  // namespace ktune::cpu
