// AVX-512 VNNI K-quant kernels (Ice Lake-SP, Sapphire Rapids, Zen 4). One zmm holds 64 weights:
// for Q4_K/Q5_K the 32 bytes of a 64-weight group are broadcast to both halves and shifted by 0
// and 4 bits per half, which puts low nibbles (sub-block 2g) then high nibbles (2g + 1) in
// natural order against 64 contiguous activations; for Q6_K the 64 bytes of ql give two such
// vectors per half super-block directly. Per zmm: VPMADDUBSW (codes × activations -> s16
// pairs) then VPDPWSSD with the sub-block scales as s16 lanes, accumulating s32. Float work as in
// the AVX2 kernels: one convert + FMA per super-block, one reduction per row. Prefill runs 4
// tokens per unpacked weight block (kq::matmul_tiles): 53 vs 39 GMAC/s single-threaded for
// Q4_K (256 x 2048 x 64 tokens) on the AMD EPYC build machine, where Q4_0's tiles reach 67.
#include "cpu/dot_kernels.h"
#include "cpu/dot_kquant_x86.h"
#include "ktune/engine/quant.h"

#if !defined(__AVX512VNNI__) || !defined(__AVX512BW__)
#error "dot_kquant_avx512vnni.cpp needs -mavx512bw -mavx512vnni (engine/CMakeLists.txt adds them)"
#endif

namespace ktune::cpu::detail {
namespace {

using namespace kq;

// s16 lane k of the result = lane idx[k] of the 8 (Q4_K/Q5_K) or 16 (Q6_K) scales in `s`.
inline __m512i spread_scales(__m512i s, __m512i idx) { return _mm512_permutexvar_epi16(idx, s); }

// Index vector whose s16 lanes 0-15 read scale `a` and lanes 16-31 scale `b`.
inline __m512i two_scale_index(int a, int b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16(static_cast<short>(a))),
                            _mm256_set1_epi16(static_cast<short>(b)), 1);
}

inline __m256i mins_lanes(uint64_t m8, const BlockQ8_K& a) {
  const __m256i m = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(m8)));
  const __m256i mm = _mm256_or_si256(m, _mm256_slli_epi32(m, 16));
  return _mm256_madd_epi16(mm, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.bsums)));
}

template <bool kFive>
struct K4 {
  using Block = std::conditional_t<kFive, BlockQ5_K, BlockQ4_K>;
  template <int C>
  static void run(int64_t n, const uint8_t* w, const uint8_t* const* act, float* out) {
    const auto* wb = reinterpret_cast<const Block*>(w);
    const BlockQ8_K* ab[C];
    __m512 acc[C];
    __m256 accm[C];
    for (int c = 0; c < C; ++c) {
      ab[c] = reinterpret_cast<const BlockQ8_K*>(act[c]);
      acc[c] = _mm512_setzero_ps();
      accm[c] = _mm256_setzero_ps();
    }
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const __m512i nibble_shift = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
    const __m512i idx[4] = {two_scale_index(0, 1), two_scale_index(2, 3), two_scale_index(4, 5),
                            two_scale_index(6, 7)};
    for (int64_t b = 0; b < n / kQK_K; ++b) {
      const Block& x = wb[b];
      uint64_t sc8, m8;
      unpack_scales_u64(x.scales, &sc8, &m8);
      const __m512i sc16 = _mm512_castsi128_si512(
          _mm_cvtepu8_epi16(_mm_cvtsi64_si128(static_cast<long long>(sc8))));
      __m512i hb = _mm512_setzero_si512();
      if constexpr (kFive) {
        hb = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.qh)));
      }
      __m512i sumi[C];
      for (int c = 0; c < C; ++c) sumi[c] = _mm512_setzero_si512();
      for (int g = 0; g < 4; ++g) {
        const __m512i q2 = _mm512_broadcast_i64x4(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.qs + 32 * g)));
        __m512i q = _mm512_and_si512(_mm512_srlv_epi64(q2, nibble_shift), low4);
        if constexpr (kFive) {
          // Low half: bit 2g of qh[l]; high half: bit 2g + 1.
          const __m512i sh = _mm512_set_epi64(2 * g + 1, 2 * g + 1, 2 * g + 1, 2 * g + 1, 2 * g,
                                              2 * g, 2 * g, 2 * g);
          const __m512i bit = _mm512_and_si512(_mm512_srlv_epi64(hb, sh), _mm512_set1_epi8(1));
          q = _mm512_or_si512(q, _mm512_slli_epi16(bit, 4));
        }
        const __m512i scale = spread_scales(sc16, idx[g]);
        for (int c = 0; c < C; ++c) {
          const __m512i av = _mm512_loadu_si512(ab[c][b].qs + 64 * g);
          sumi[c] = _mm512_dpwssd_epi32(sumi[c], _mm512_maddubs_epi16(q, av), scale);
        }
      }
      const float dw = fp16_scalar(x.d);
      const float dmw = fp16_scalar(x.dmin);
      for (int c = 0; c < C; ++c) {
        const BlockQ8_K& a = ab[c][b];
        const float d = dw * a.d;
        const float dmin = dmw * a.d;
        acc[c] = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(sumi[c]), acc[c]);
        accm[c] =
            _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(mins_lanes(m8, a)), accm[c]);
      }
    }
    for (int c = 0; c < C; ++c) out[c] = _mm512_reduce_add_ps(acc[c]) - hsum8(accm[c]);
  }
};

// Index vector for Q6_K: s16 lanes 8i..8i+7 read scale first + i (four 16-weight sub-blocks).
inline __m512i four_scale_index(int first) {
  alignas(64) int16_t v[32];
  for (int k = 0; k < 32; ++k) v[k] = static_cast<int16_t>(first + k / 8);
  return _mm512_load_si512(v);
}

struct K6 {
  template <int C>
  static void run(int64_t n, const uint8_t* w, const uint8_t* const* act, float* out) {
    const auto* wb = reinterpret_cast<const BlockQ6_K*>(w);
    const BlockQ8_K* ab[C];
    __m512 acc[C];
    for (int c = 0; c < C; ++c) {
      ab[c] = reinterpret_cast<const BlockQ8_K*>(act[c]);
      acc[c] = _mm512_setzero_ps();
    }
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const __m512i three = _mm512_set1_epi8(3);
    const __m512i sh_lo = _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0);
    const __m512i sh_hi = _mm512_set_epi64(6, 6, 6, 6, 4, 4, 4, 4);
    const __m512i idx[4] = {four_scale_index(0), four_scale_index(4), four_scale_index(8),
                            four_scale_index(12)};
    for (int64_t b = 0; b < n / kQK_K; ++b) {
      const BlockQ6_K& x = wb[b];
      const __m256i sc16 =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x.scales)));
      const __m512i sc = _mm512_castsi256_si512(sc16);
      __m512i sumi[C];
      for (int c = 0; c < C; ++c) {
        // -32 · Σ_j sc[j] · bsums[j]: the offset of every code, applied once per super-block.
        const __m256i off = _mm256_slli_epi32(
            _mm256_madd_epi16(sc16,
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ab[c][b].bsums))),
            5);
        sumi[c] = _mm512_zextsi256_si512(_mm256_sub_epi32(_mm256_setzero_si256(), off));
      }
      for (int h = 0; h < 2; ++h) {
        const __m512i ql = _mm512_loadu_si512(x.ql + 64 * h);
        const __m512i qh = _mm512_broadcast_i64x4(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.qh + 32 * h)));
        // Weights 0..63 of the half: low nibbles of ql, qh bits 0-1 (first 32) and 2-3 (next
        // 32); weights 64..127: high nibbles, qh bits 4-5 and 6-7.
        const __m512i q_lo = _mm512_or_si512(
            _mm512_and_si512(ql, low4),
            _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi64(qh, sh_lo), three), 4));
        const __m512i q_hi = _mm512_or_si512(
            _mm512_and_si512(_mm512_srli_epi16(ql, 4), low4),
            _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi64(qh, sh_hi), three), 4));
        const __m512i s_lo = spread_scales(sc, idx[2 * h]);
        const __m512i s_hi = spread_scales(sc, idx[2 * h + 1]);
        for (int c = 0; c < C; ++c) {
          const __m512i a_lo = _mm512_loadu_si512(ab[c][b].qs + 128 * h);
          const __m512i a_hi = _mm512_loadu_si512(ab[c][b].qs + 128 * h + 64);
          sumi[c] = _mm512_dpwssd_epi32(sumi[c], _mm512_maddubs_epi16(q_lo, a_lo), s_lo);
          sumi[c] = _mm512_dpwssd_epi32(sumi[c], _mm512_maddubs_epi16(q_hi, a_hi), s_hi);
        }
      }
      const float dw = fp16_scalar(x.d);
      for (int c = 0; c < C; ++c) {
        const float d = dw * ab[c][b].d;
        acc[c] = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(sumi[c]), acc[c]);
      }
    }
    for (int c = 0; c < C; ++c) out[c] = _mm512_reduce_add_ps(acc[c]);
  }
};

}  // namespace

const KQuantKernelSet& avx512vnni_kquant_kernels() {
  static const KQuantKernelSet set{
      matmul_tiles<K4<false>>,
      matmul_tiles<K4<true>>,
      matmul_tiles<K6>,
      avx2_kquant_kernels().quantize_q8_k,
  };
  return set;
}

}  // namespace ktune::cpu::detail
