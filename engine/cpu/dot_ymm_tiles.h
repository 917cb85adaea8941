// Quantized dot tiles on 256-bit vectors, one ymm per 32-weight block, shared by the AVX2 kernels
// (dot_avx2.cpp: VPMADDUBSW + VPMADDWD) and the 256-bit VNNI kernels (dot_avx512vnni.cpp:
// VPDPBUSD on ymm, which avoids the frequency drop of 512-bit multiplies on Xeons and measured
// faster there). Only those ISA files include it. The integer dot is passed in as an `Ops`
// struct; the tile walks groups of 4 blocks as dot_avx512_tiles.h does: per group, token-only
// work (values, block sums, scales) is shared by the R rows, row-only work (unpacked weights,
// scales) by the C tokens, and each row × token keeps float lanes reduced once at the end.
#pragma once

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "dot_ymm_tiles.h belongs to the SIMD kernel files (compiled with -mavx2 -mfma -mf16c)"
#endif

// GCC 12 flags the uninitialized-on-purpose "__Y = __Y" inside its own AVX-512 intrinsics as
// maybe-uninitialized (GCC bug 105593); the warning is about the system header, not this code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstdint>
#include <cstring>

// Cache level the tiles prefetch the next weight rows into (a build-time knob for tuning on a
// new CPU; T0 measured best for Q4_0 decode).
#ifndef KTUNE_CPU_PREFETCH_HINT
#define KTUNE_CPU_PREFETCH_HINT _MM_HINT_T0
#endif

namespace ktune::cpu::detail::ymm {
// Unnamed on purpose: the including files compile these inline functions with different flags,
// and the linker must not merge an -mavx512* copy into the AVX2 kernels (ODR).
namespace {

constexpr int64_t kQ = 32;         // weights per Q4_0 / Q8_0 block
constexpr int64_t kActBytes = 34;  // one Q8_0 activation block

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// fp16 scales of `cnt` (<= 4) consecutive blocks at p as 4 floats; missing blocks read as 0.
template <int64_t BlockBytes>
inline __m128 load_scales(const uint8_t* p, int cnt) {
  uint64_t packed = 0;
  for (int i = 0; i < cnt; ++i) {
    uint16_t d;
    std::memcpy(&d, p + i * BlockBytes, sizeof(d));
    packed |= static_cast<uint64_t>(d) << (16 * i);
  }
  return _mm_cvtph_ps(_mm_cvtsi64_si128(static_cast<long long>(packed)));
}

template <class Ops, int R, int C, bool kFull>
inline void tile_group(const uint8_t* const (&wr)[R], const uint8_t* const (&ar)[C], int cnt,
                       __m256 (&acc)[R][C]) {
  constexpr int64_t kWB = Ops::kWeightBlockBytes;
  if (kFull) cnt = 4;
  __m256 s[R][C];  // the 4 blocks' d_w·d_a in the layout Ops::scale8 gives
  {
    __m128 da[C];
#pragma GCC unroll 8
    for (int t = 0; t < C; ++t) da[t] = load_scales<kActBytes>(ar[t], cnt);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m128 dw = load_scales<kWB>(wr[r], cnt);
#pragma GCC unroll 8
      for (int t = 0; t < C; ++t) s[r][t] = Ops::scale8(_mm_mul_ps(dw, da[t]));
    }
  }
#pragma GCC unroll 4
  for (int b = 0; b < cnt; ++b) {
    __m256i a[C], nc[C];
#pragma GCC unroll 8
    for (int t = 0; t < C; ++t) {
      a[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ar[t] + b * kActBytes + 2));
      nc[t] = Ops::neg_corr(a[t]);
    }
    const __m256i lane = Ops::lane_index(b);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256i w = Ops::load_w(wr[r] + b * kWB + 2);
#pragma GCC unroll 8
      for (int t = 0; t < C; ++t) {
        const __m256 scale = _mm256_permutevar8x32_ps(s[r][t], lane);
        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(Ops::dot(nc[t], w, a[t])), scale, acc[r][t]);
      }
    }
  }
}

template <class Ops, int R, int C>
inline void tile(int64_t nb, const uint8_t* W, int64_t ws, const uint8_t* A, int64_t as, float* Y,
                 int64_t ldy) {
  constexpr int64_t kWB = Ops::kWeightBlockBytes;
  __m256 acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int t = 0; t < C; ++t) acc[r][t] = _mm256_setzero_ps();
  }
  const uint8_t* wr[R];
  const uint8_t* ar[C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) wr[r] = W + r * ws;
#pragma GCC unroll 8
  for (int t = 0; t < C; ++t) ar[t] = A + t * as;
  // The R rows are read side by side, which hides the sequential stream from the hardware
  // prefetchers (single-thread DRAM throughput halved in tests). So the tile prefetches the
  // next tile's rows (the following R * ws bytes) linearly, at the rate it consumes its own.
  const char* pf = reinterpret_cast<const char*>(W) + R * ws;
  constexpr int64_t kPfStep = R * 4 * kWB;
  int64_t g = 0;
  for (; g + 4 <= nb; g += 4) {
    for (int64_t off = 0; off < kPfStep; off += 64) _mm_prefetch(pf + off, KTUNE_CPU_PREFETCH_HINT);
    pf += kPfStep;
    tile_group<Ops, R, C, true>(wr, ar, 4, acc);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wr[r] += 4 * kWB;
#pragma GCC unroll 8
    for (int t = 0; t < C; ++t) ar[t] += 4 * kActBytes;
  }
  if (g < nb) tile_group<Ops, R, C, false>(wr, ar, static_cast<int>(nb - g), acc);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int t = 0; t < C; ++t) Y[t * ldy + r] = hsum(acc[r][t]);
  }
}

// Decode: 4 rows share each activation block; prefill: 2 rows × 2 tokens (16 ymm registers
// do not hold a larger tile without spilling).
template <class Ops>
void matmul(int64_t n, const uint8_t* W, int64_t ws, int64_t nrows, const uint8_t* A, int64_t as,
            int64_t ntok, float* Y, int64_t ldy) {
  const int64_t nb = n / kQ;
  if (ntok == 1) {
    int64_t r = 0;
    for (; r + 4 <= nrows; r += 4) tile<Ops, 4, 1>(nb, W + r * ws, ws, A, as, Y + r, ldy);
    for (; r < nrows; ++r) tile<Ops, 1, 1>(nb, W + r * ws, ws, A, as, Y + r, ldy);
    return;
  }
  int64_t r = 0;
  for (; r + 2 <= nrows; r += 2) {
    int64_t t = 0;
    for (; t + 2 <= ntok; t += 2) {
      tile<Ops, 2, 2>(nb, W + r * ws, ws, A + t * as, as, Y + t * ldy + r, ldy);
    }
    if (t < ntok) tile<Ops, 2, 1>(nb, W + r * ws, ws, A + t * as, as, Y + t * ldy + r, ldy);
  }
  for (; r < nrows; ++r) {
    for (int64_t t = 0; t < ntok; ++t) {
      tile<Ops, 1, 1>(nb, W + r * ws, ws, A + t * as, as, Y + t * ldy + r, ldy);
    }
  }
}

// Float dots: 32 elements per step in 4 accumulators, the last n % 8 elements by the scalar
// reference.
}  // namespace
}  // namespace ktune::cpu::detail::ymm
