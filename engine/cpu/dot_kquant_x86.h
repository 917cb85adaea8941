// Helpers shared by the x86 K-quant kernel files (dot_kquant_avx2.cpp, dot_kquant_avx512vnni.cpp),
// and the Q8_K activation quantizer they both use. Only those files include it.
#pragma once

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "dot_kquant_x86.h belongs to the SIMD kernel files (compiled with -mavx2 -mfma -mf16c)"
#endif

// GCC 12 flags the uninitialized-on-purpose "__Y = __Y" inside its own AVX-512 intrinsics as
// maybe-uninitialized (GCC bug 105593); the warning is about the system header, not this code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "ktune/engine/quant.h"

namespace ktune::cpu::detail::kq {
// Unnamed: the including files are compiled with different flags; the linker must not merge an
// -mavx512* copy of these inline functions into the AVX2 kernels.
namespace {

inline float fp16_scalar(uint16_t h) { return _cvtsh_ss(h); }

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The 8 six-bit scales and mins of a Q4_K/Q5_K block (quant.h's unpack_k4_scales), one byte
// each, four at a time in 32-bit words.
inline void unpack_scales_u64(const uint8_t packed[12], uint64_t* sc, uint64_t* m) {
  uint32_t u[3];
  std::memcpy(u, packed, sizeof(u));
  const uint32_t sc_lo = u[0] & 0x3F3F3F3Fu;
  const uint32_t m_lo = u[1] & 0x3F3F3F3Fu;
  const uint32_t sc_hi = (u[2] & 0x0F0F0F0Fu) | (((u[0] >> 6) & 0x03030303u) << 4);
  const uint32_t m_hi = ((u[2] >> 4) & 0x0F0F0F0Fu) | (((u[1] >> 6) & 0x03030303u) << 4);
  *sc = sc_lo | (static_cast<uint64_t>(sc_hi) << 32);
  *m = m_lo | (static_cast<uint64_t>(m_hi) << 32);
}

// Bit-exact with quantize_row(Q8_K): the same amax and sign of the first largest-magnitude
// value, the same iscale and products in float, ggml's ties-to-even rounding (the hardware's
// default mode), NaN products -> 0 and clamping to [-128, 127] as the scalar code defines them.
inline void quantize_q8_k_avx2(const float* x, void* dst, int64_t n) {
  auto* y = static_cast<BlockQ8_K*>(dst);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t b = 0; b < n / kQK_K; ++b, x += kQK_K) {
    __m256 m = _mm256_setzero_ps();
    // MAXPS returns its second operand when either is NaN: NaN inputs never win.
    for (int k = 0; k < 32; ++k) m = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + 8 * k), abs_mask), m);
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    BlockQ8_K& o = y[b];
    if (amax == 0.0f) {
      std::memset(&o, 0, sizeof(o));
      continue;
    }
    float max = 0.0f;
    const __m256 vamax = _mm256_set1_ps(amax);
    for (int k = 0; k < 32; ++k) {
      const int hit = _mm256_movemask_ps(
          _mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(x + 8 * k), abs_mask), vamax, _CMP_EQ_OQ));
      if (hit != 0) {
        max = x[8 * k + __builtin_ctz(static_cast<unsigned>(hit))];
        break;
      }
    }
    const float iscale = -127.f / max;
    const __m256 vs = _mm256_set1_ps(iscale);
    const __m256 lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
    for (int c = 0; c < 8; ++c) {
      __m256i q[4];
      for (int k = 0; k < 4; ++k) {
        __m256 s = _mm256_mul_ps(_mm256_loadu_ps(x + 32 * c + 8 * k), vs);
        s = _mm256_and_ps(s, _mm256_cmp_ps(s, s, _CMP_ORD_Q));  // NaN -> 0
        q[k] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(s, lo), hi));
      }
      // packs work per 128-bit lane; the dword permute restores element order.
      const __m256i p =
          _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o.qs + 32 * c),
                          _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    }
    for (int j = 0; j < 16; ++j) {
      int sum = 0;
      for (int i = 0; i < 16; ++i) sum += o.qs[16 * j + i];
      o.bsums[j] = static_cast<int16_t>(sum);
    }
    o.d = 1 / iscale;
  }
}

}  // namespace
}  // namespace ktune::cpu::detail::kq

namespace ktune::cpu::detail::kq {
namespace {

// Runs a kernel K (a struct with `template <int C> static void run(n, w_row, acts[C], out[C])`)
// over rows × tokens: rows outer, so a weight row stays in L1 while every token passes, tokens
// in tiles of 4 (weights unpacked once per tile), then one at a time. K::run<C> computes each
// token's result exactly as K::run<1> does, so matmul and matvec equal vec_dot bit for bit.
template <class K>
void matmul_tiles(int64_t n, const uint8_t* W, int64_t ws, int64_t nrows, const uint8_t* A,
                  int64_t as, int64_t ntok, float* Y, int64_t ldy) {
  for (int64_t r = 0; r < nrows; ++r) {
    const uint8_t* w = W + r * ws;
    int64_t t = 0;
    for (; t + 4 <= ntok; t += 4) {
      const uint8_t* a[4] = {A + t * as, A + (t + 1) * as, A + (t + 2) * as, A + (t + 3) * as};
      float o[4];
      K::template run<4>(n, w, a, o);
      for (int k = 0; k < 4; ++k) Y[(t + k) * ldy + r] = o[k];
    }
    for (; t < ntok; ++t) {
      const uint8_t* a[1] = {A + t * as};
      K::template run<1>(n, w, a, Y + t * ldy + r);
    }
  }
}

}  // namespace
}  // namespace ktune::cpu::detail::kq
