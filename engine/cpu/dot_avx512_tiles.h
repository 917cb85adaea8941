// Quantized dot tiles shared by the two AVX-512 kernel files (dot_avx512.cpp and
// dot_avx512vnni.cpp, the only files that include this header and the only ones compiled with
// the AVX-512 flags). The files differ only in how a 64-byte integer dot is done (VPDPBUSD, or
// VPMADDUBSW + VPMADDWD), which they pass in as an `Ops` struct.
//
// Shape of the work: a tile is R weight rows × C activation tokens. The loop walks groups of 4
// blocks (2 zmm "pairs" of 2 blocks each). Per group, everything that depends only on a token
// (its int8 values, its block sums, its scales) is computed once and shared by the R rows, and
// everything that depends only on a row (unpacked nibbles, its scales) is shared by the C
// tokens. Results stay in 16-lane float accumulators (each lane a part of one block) and are
// reduced horizontally once at the end.
//
// Unsigned × signed: VPDPBUSD multiplies unsigned bytes by signed bytes, so weights are used as
// stored (Q4_0: q + 8 in 0..15; Q8_0: q xor 0x80 = q + 128 in 0..255) and the excess
// K · sum(a) per block is subtracted by starting the accumulator at -K · sum(a), which is
// computed per token (shared by all rows). Q4_0's high nibbles are not shifted down: the byte is
// masked with 0xF0 (16 · q) and its lanes are scaled by 1/16 in float (exact, a power of two).
#pragma once

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__)
#error "dot_avx512_tiles.h belongs to the AVX-512 kernel files (compiled with -mavx512*)"
#endif

// GCC 12 flags the uninitialized-on-purpose "__Y = __Y" inside its own AVX-512 intrinsics as
// maybe-uninitialized (GCC bug 105593); the warning is about the system header, not this code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

// Cache level the tiles prefetch the next weight rows into (a build-time knob for tuning on a
// new CPU; T0 measured best for Q4_0 decode).
#ifndef KTUNE_CPU_PREFETCH_HINT
#define KTUNE_CPU_PREFETCH_HINT _MM_HINT_T0
#endif

#include <cstdint>
#include <vector>

namespace ktune::cpu::detail::avx512 {
// Unnamed on purpose: both AVX-512 files compile these inline functions with different flags,
// and the linker must not merge the -mavx512vnni copy into the plain AVX-512 kernels (ODR).
namespace {

constexpr int64_t kQ = 32;         // weights per Q4_0 / Q8_0 block
constexpr int64_t kActBytes = 34;  // one Q8_0 activation block

inline __mmask64 byte_mask(int64_t bytes) {
  if (bytes <= 0) return 0;
  return bytes >= 64 ? ~0ULL : ((1ULL << bytes) - 1ULL);
}

// The fp16 scales of `cnt` (<= 4) consecutive blocks of BlockBytes bytes starting at p, as
// 8 floats [d0 d1 d2 d3 d0 d1 d2 d3]. Blocks at or past cnt read as 0 (and are not touched).
// One wide load + a word permute instead of four scalar loads and inserts.
template <int BlockBytes, bool kFull>
inline __m256 load_scales(const uint8_t* p, int cnt) {
  constexpr int w = BlockBytes / 2;  // words per block
  alignas(64) static const uint16_t kIdx[32] = {0, w, 2 * w, 3 * w, 0, w, 2 * w, 3 * w};
  const __m512i idx = _mm512_load_si512(kIdx);
  __m512i words;
  if constexpr (3 * BlockBytes + 2 <= 64) {
    const __m512i v =
        kFull ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(byte_mask(cnt * BlockBytes), p);
    words = _mm512_permutexvar_epi16(idx, v);
  } else {
    static_assert(3 * BlockBytes + 2 <= 128, "block too large for two loads");
    __m512i lo, hi;
    if (kFull) {
      lo = _mm512_loadu_si512(p);
      hi = _mm512_loadu_si512(p + 64);
    } else {
      lo = _mm512_maskz_loadu_epi8(byte_mask(cnt * BlockBytes), p);
      hi = _mm512_maskz_loadu_epi8(byte_mask(cnt * BlockBytes - 64), p + 64);
    }
    words = _mm512_permutex2var_epi16(lo, idx, hi);
  }
  return _mm256_cvtph_ps(_mm512_castsi512_si128(words));
}

// The int8 values of two activation blocks (the second zeroed when absent): [a0 | a1].
inline __m512i load_act_pair(const uint8_t* qs, bool two) {
  const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs));
  if (!two) return _mm512_zextsi256_si512(a0);
  const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + kActBytes));
  return _mm512_inserti64x4(_mm512_castsi256_si512(a0), a1, 1);
}

// One group of up to 4 blocks for an R×C tile. wr[r] / ar[t] point at the group's first block.
template <class Ops, int R, int C, bool kFull>
inline void tile_group(const uint8_t* const (&wr)[R], const uint8_t* const (&ar)[C], int cnt,
                       __m512 (&acc)[R][C]) {
  constexpr int64_t kWB = Ops::kWeightBlockBytes;
  const bool pair1 = kFull || cnt > 2;
  __m512i a[C][2], nc[C][2];
  __m256 da[C];
#pragma GCC unroll 8
  for (int t = 0; t < C; ++t) {
    da[t] = Ops::act_scale(load_scales<kActBytes, kFull>(ar[t], cnt));
    a[t][0] = load_act_pair(ar[t] + 2, kFull || cnt > 1);
    nc[t][0] = Ops::neg_corr(a[t][0]);
    if (pair1) {
      a[t][1] = load_act_pair(ar[t] + 2 + 2 * kActBytes, kFull || cnt > 3);
      nc[t][1] = Ops::neg_corr(a[t][1]);
    }
  }
  const __m512i idx0 = Ops::scale_index(0);
  const __m512i idx1 = Ops::scale_index(1);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m256 dw = load_scales<kWB, kFull>(wr[r], cnt);
    __m512 s[C];
#pragma GCC unroll 8
    for (int t = 0; t < C; ++t) s[t] = _mm512_castps256_ps512(_mm256_mul_ps(dw, da[t]));
    const __m512i w0 = Ops::load_w(wr[r] + 2, kFull || cnt > 1);
#pragma GCC unroll 8
    for (int t = 0; t < C; ++t) {
      const __m512i sumi = Ops::dot(nc[t][0], w0, a[t][0]);
      acc[r][t] =
          _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_permutexvar_ps(idx0, s[t]), acc[r][t]);
    }
    if (pair1) {
      const __m512i w1 = Ops::load_w(wr[r] + 2 + 2 * kWB, kFull || cnt > 3);
#pragma GCC unroll 8
      for (int t = 0; t < C; ++t) {
        const __m512i sumi = Ops::dot(nc[t][1], w1, a[t][1]);
        acc[r][t] =
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_permutexvar_ps(idx1, s[t]), acc[r][t]);
      }
    }
  }
}

// Y[t * ldy + r] for an R×C tile over nb blocks.
template <class Ops, int R, int C>
inline void tile(int64_t nb, const uint8_t* W, int64_t ws, const uint8_t* A, int64_t as, float* Y,
                 int64_t ldy) {
  constexpr int64_t kWB = Ops::kWeightBlockBytes;
  __m512 acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int t = 0; t < C; ++t) acc[r][t] = _mm512_setzero_ps();
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
    for (int t = 0; t < C; ++t) Y[t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
  }
}

// The MatmulFn of dot_kernels.h. A single token (decode) takes 4 rows per tile so each
// activation group is loaded and prepared once for 4 rows; several tokens (prefill) take
// 2 rows × 4 tokens so nibbles are unpacked once per 4 tokens while the rows stay in L1.
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
    for (; t + 4 <= ntok; t += 4) {
      tile<Ops, 2, 4>(nb, W + r * ws, ws, A + t * as, as, Y + t * ldy + r, ldy);
    }
    for (; t < ntok; ++t) tile<Ops, 2, 1>(nb, W + r * ws, ws, A + t * as, as, Y + t * ldy + r, ldy);
  }
  for (; r < nrows; ++r) {
    int64_t t = 0;
    for (; t + 4 <= ntok; t += 4) {
      tile<Ops, 1, 4>(nb, W + r * ws, ws, A + t * as, as, Y + t * ldy + r, ldy);
    }
    for (; t < ntok; ++t) tile<Ops, 1, 1>(nb, W + r * ws, ws, A + t * as, as, Y + t * ldy + r, ldy);
  }
}

// Prefill path (VNNI Ops only: needs neg_corr). Everything that depends only on a token is
// computed once per matmul call instead of once per row tile: per block pair, the int8 pair
// [a0 | a1], its dpbusd start value -K·sum(a) and its per-lane scale (act_scale(da) permuted by
// scale_index) are packed into 192 contiguous bytes. A tile is then 4 rows × 4 tokens with only
// 4 vector ops per (row, token, pair): dpbusd, convert, scale multiply, fma. The float work of
// each (row, token) is the same as tile<Ops, 1, 1>'s (vec_dot): lane scales dw[b] · da[b]
// (one IEEE multiply, commutative), fma into the same 16 lanes pair by pair in block order, the
// same horizontal reduction; so results are bit-identical to vec_dot.
constexpr int64_t kPackedPair = 192;  // [a 64 B | -K·sum(a) 64 B | lane scales 64 B]

template <class Ops>
inline void pack_acts(int64_t nb, const uint8_t* A, int64_t as, int64_t ntok, uint8_t* P,
                      int64_t ps) {
  for (int64_t t = 0; t < ntok; ++t) {
    const uint8_t* ar = A + t * as;
    uint8_t* q = P + t * ps;
    for (int64_t g = 0; g < nb; g += 4, ar += 4 * kActBytes) {
      const int cnt = static_cast<int>(nb - g < 4 ? nb - g : 4);
      const __m512 da =
          _mm512_castps256_ps512(Ops::act_scale(load_scales<kActBytes, false>(ar, cnt)));
      for (int p = 0; p < 2 && 2 * p < cnt; ++p, q += kPackedPair) {
        const __m512i a = load_act_pair(ar + 2 + 2 * p * kActBytes, cnt > 2 * p + 1);
        _mm512_storeu_si512(q, a);
        _mm512_storeu_si512(q + 64, Ops::neg_corr(a));
        _mm512_storeu_ps(q + 128, _mm512_permutexvar_ps(Ops::scale_index(p), da));
      }
    }
  }
}

// One group of up to 4 weight blocks for an R×C tile over packed activations; pa[t] points at
// the group's first packed pair.
template <class Ops, int R, int C, bool kFull>
inline void ptile_group(const uint8_t* const (&wr)[R], const uint8_t* const (&pa)[C], int cnt,
                        __m512 (&acc)[R][C]) {
  constexpr int64_t kWB = Ops::kWeightBlockBytes;
  __m512 dw[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) dw[r] = _mm512_castps256_ps512(load_scales<kWB, kFull>(wr[r], cnt));
#pragma GCC unroll 2
  for (int p = 0; p < 2; ++p) {
    if (!kFull && 2 * p >= cnt) break;
    const bool two = kFull || cnt > 2 * p + 1;
    const __m512i idx = Ops::scale_index(p);
    __m512i w[R];
    __m512 dwp[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      w[r] = Ops::load_w(wr[r] + 2 + 2 * p * kWB, two);
      dwp[r] = _mm512_permutexvar_ps(idx, dw[r]);
    }
#pragma GCC unroll 8
    for (int t = 0; t < C; ++t) {
      const uint8_t* q = pa[t] + p * kPackedPair;
      const __m512i a = _mm512_loadu_si512(q);
      const __m512i nc = _mm512_loadu_si512(q + 64);
      const __m512 da = _mm512_loadu_ps(q + 128);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512i sumi = Ops::dot(nc, w[r], a);
        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_mul_ps(dwp[r], da), acc[r][t]);
      }
    }
  }
}

template <class Ops, int R, int C>
inline void ptile(int64_t nb, const uint8_t* W, int64_t ws, const uint8_t* P, int64_t ps, float* Y,
                  int64_t ldy) {
  constexpr int64_t kWB = Ops::kWeightBlockBytes;
  __m512 acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int t = 0; t < C; ++t) acc[r][t] = _mm512_setzero_ps();
  }
  const uint8_t* wr[R];
  const uint8_t* pa[C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) wr[r] = W + r * ws;
#pragma GCC unroll 8
  for (int t = 0; t < C; ++t) pa[t] = P + t * ps;
  const char* pf = reinterpret_cast<const char*>(W) + R * ws;
  constexpr int64_t kPfStep = R * 4 * kWB;
  int64_t g = 0;
  for (; g + 4 <= nb; g += 4) {
    for (int64_t off = 0; off < kPfStep; off += 64) _mm_prefetch(pf + off, KTUNE_CPU_PREFETCH_HINT);
    pf += kPfStep;
    ptile_group<Ops, R, C, true>(wr, pa, 4, acc);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wr[r] += 4 * kWB;
#pragma GCC unroll 8
    for (int t = 0; t < C; ++t) pa[t] += 2 * kPackedPair;
  }
  if (g < nb) ptile_group<Ops, R, C, false>(wr, pa, static_cast<int>(nb - g), acc);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int t = 0; t < C; ++t) Y[t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
  }
}

template <class Ops, int C>
inline void ptile_rows(int64_t nb, const uint8_t* W, int64_t ws, int64_t nrows, const uint8_t* P,
                       int64_t ps, float* Y, int64_t ldy) {
  int64_t r = 0;
  for (; r + 4 <= nrows; r += 4) ptile<Ops, 4, C>(nb, W + r * ws, ws, P, ps, Y + r, ldy);
  for (; r < nrows; ++r) ptile<Ops, 1, C>(nb, W + r * ws, ws, P, ps, Y + r, ldy);
}

// The MatmulFn for VNNI Ops: decode (1 token) as matmul<Ops>; prefill packs the tokens once
// (thread-local scratch) and runs 4 × 4 tiles, tokens outer so a 4-token packed strip stays in
// L1/L2 while the weight rows stream past.
template <class Ops>
void matmul_packed(int64_t n, const uint8_t* W, int64_t ws, int64_t nrows, const uint8_t* A,
                   int64_t as, int64_t ntok, float* Y, int64_t ldy) {
  if (ntok == 1) return matmul<Ops>(n, W, ws, nrows, A, as, ntok, Y, ldy);
  const int64_t nb = n / kQ;
  const int64_t ps = (nb + 1) / 2 * kPackedPair;
  thread_local std::vector<uint8_t> buf;
  const size_t need = static_cast<size_t>(ntok * ps + 64);
  if (buf.size() < need) buf.resize(need);
  uint8_t* P = buf.data() + ((64 - reinterpret_cast<uintptr_t>(buf.data()) % 64) % 64);
  pack_acts<Ops>(nb, A, as, ntok, P, ps);
  int64_t t = 0;
  for (; t + 4 <= ntok; t += 4)
    ptile_rows<Ops, 4>(nb, W, ws, nrows, P + t * ps, ps, Y + t * ldy, ldy);
  for (; t < ntok; ++t) ptile_rows<Ops, 1>(nb, W, ws, nrows, P + t * ps, ps, Y + t * ldy, ldy);
}

// Lane l of a pair accumulator belongs to block l / 8 of the pair; these indexes pick that
// block's scale out of [d0 d1 d2 d3 ...]. (Q4_0 under VNNI uses its own split-lane index.)
inline __m512i pair_scale_index(int pair) {
  return _mm512_add_epi32(
      _mm512_set1_epi32(2 * pair),
      _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 3));
}

// Float dots (F32 activations). Four accumulators hide the FMA latency; a masked load finishes
// the row so any n works.
template <class Load>
inline float float_dot(int64_t n, const void* w, const float* a, Load load) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  __m512 acc2 = _mm512_setzero_ps(), acc3 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    acc0 = _mm512_fmadd_ps(load(w, i, 0xFFFF), _mm512_loadu_ps(a + i), acc0);
    acc1 = _mm512_fmadd_ps(load(w, i + 16, 0xFFFF), _mm512_loadu_ps(a + i + 16), acc1);
    acc2 = _mm512_fmadd_ps(load(w, i + 32, 0xFFFF), _mm512_loadu_ps(a + i + 32), acc2);
    acc3 = _mm512_fmadd_ps(load(w, i + 48, 0xFFFF), _mm512_loadu_ps(a + i + 48), acc3);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1u);
    acc0 = _mm512_fmadd_ps(load(w, i, m), _mm512_maskz_loadu_ps(m, a + i), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
}

}  // namespace
}  // namespace ktune::cpu::detail::avx512
