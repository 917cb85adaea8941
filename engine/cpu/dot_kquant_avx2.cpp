// AVX2 K-quant kernels (also used for Isa::Avx512 without VNNI) and the Q8_K activation
// quantizer every SIMD set shares. One ymm holds one 32-weight sub-block (Q4_K/Q5_K) or two
// 16-weight ones (Q6_K). Integer work: VPMADDUBSW (unsigned codes × signed activations -> s16
// pairs; Q4_K 2·15·128, Q5_K 2·31·128 and Q6_K 2·63·128 all stay below 32767), then VPMADDWD
// with the sub-block scale as s16 (-> s32), summed over the super-block. Q4_K/Q5_K mins and
// Q6_K's -32 offset are applied once per super-block through Q8_K's bsums. Float work per
// super-block: one convert and one FMA into 8 lanes (and the same for the mins), reduced once at
// the end of the row, so only the float order differs from the scalar reference. Prefill runs 4
// tokens per unpacked weight block (kq::matmul_tiles in dot_kquant_x86.h).
#include <cstring>

#include "cpu/dot_kernels.h"
#include "cpu/dot_kquant_x86.h"
#include "ktune/engine/quant.h"

namespace ktune::cpu::detail {
namespace {

using namespace kq;

inline __m256i scale16(uint64_t bytes, int j) {
  return _mm256_set1_epi16(static_cast<short>((bytes >> (8 * j)) & 0xFF));
}

inline __m256i madd_u8s8(__m256i u, __m256i s) { return _mm256_maddubs_epi16(u, s); }

// Σ_j m[j] · (bsums[2j] + bsums[2j+1]) as 8 int32 lanes: mins duplicated into both halves of
// each 32-bit lane so that VPMADDWD pairs them with the two bsums of their sub-block.
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
    __m256 acc[C], accm[C];
    for (int c = 0; c < C; ++c) {
      ab[c] = reinterpret_cast<const BlockQ8_K*>(act[c]);
      acc[c] = _mm256_setzero_ps();
      accm[c] = _mm256_setzero_ps();
    }
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < n / kQK_K; ++b) {
      const Block& x = wb[b];
      uint64_t sc8, m8;
      unpack_scales_u64(x.scales, &sc8, &m8);
      __m256i hbits = _mm256_setzero_si256();
      if constexpr (kFive) hbits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.qh));
      __m256i sumi[C];
      for (int c = 0; c < C; ++c) sumi[c] = _mm256_setzero_si256();
      for (int g = 0; g < 4; ++g) {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.qs + 32 * g));
        __m256i lo = _mm256_and_si256(q, low4);
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
        if constexpr (kFive) {
          // Bit 2g of qh[l] is bit 4 of weight 64g + l, bit 2g + 1 that of 64g + 32 + l.
          const __m256i one = _mm256_set1_epi8(1);
          const __m256i b0 = _mm256_and_si256(_mm256_srli_epi16(hbits, 2 * g), one);
          const __m256i b1 = _mm256_and_si256(_mm256_srli_epi16(hbits, 2 * g + 1), one);
          lo = _mm256_or_si256(lo, _mm256_slli_epi16(b0, 4));
          hi = _mm256_or_si256(hi, _mm256_slli_epi16(b1, 4));
        }
        const __m256i s0 = scale16(sc8, 2 * g), s1 = scale16(sc8, 2 * g + 1);
        for (int c = 0; c < C; ++c) {
          const int8_t* aq = ab[c][b].qs + 64 * g;
          const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(aq));
          const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(aq + 32));
          const __m256i p0 = _mm256_madd_epi16(madd_u8s8(lo, a0), s0);
          const __m256i p1 = _mm256_madd_epi16(madd_u8s8(hi, a1), s1);
          sumi[c] = _mm256_add_epi32(sumi[c], _mm256_add_epi32(p0, p1));
        }
      }
      const float dw = fp16_scalar(x.d);
      const float dmw = fp16_scalar(x.dmin);
      for (int c = 0; c < C; ++c) {
        const BlockQ8_K& a = ab[c][b];
        const float d = dw * a.d;
        const float dmin = dmw * a.d;
        acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[c]), acc[c]);
        accm[c] =
            _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(mins_lanes(m8, a)), accm[c]);
      }
    }
    for (int c = 0; c < C; ++c) out[c] = hsum8(acc[c]) - hsum8(accm[c]);
  }
};

struct K6 {
  template <int C>
  static void run(int64_t n, const uint8_t* w, const uint8_t* const* act, float* out) {
    const auto* wb = reinterpret_cast<const BlockQ6_K*>(w);
    const BlockQ8_K* ab[C];
    __m256 acc[C];
    for (int c = 0; c < C; ++c) {
      ab[c] = reinterpret_cast<const BlockQ8_K*>(act[c]);
      acc[c] = _mm256_setzero_ps();
    }
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i three = _mm256_set1_epi8(3);
    for (int64_t b = 0; b < n / kQK_K; ++b) {
      const BlockQ6_K& x = wb[b];
      // The 16 scales as s16, and Σ_j sc[j] · bsums[j] (the -32 offset of every code, · 32).
      const __m256i sc16 =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x.scales)));
      __m256i sumi[C];
      for (int c = 0; c < C; ++c) {
        const __m256i off = _mm256_slli_epi32(
            _mm256_madd_epi16(sc16,
                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ab[c][b].bsums))),
            5);
        sumi[c] = _mm256_sub_epi32(_mm256_setzero_si256(), off);
      }
      for (int h = 0; h < 2; ++h) {
        const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.ql + 64 * h));
        const __m256i l1 =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.ql + 64 * h + 32));
        const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.qh + 32 * h));
        // Quarter k of the half: weights 32k..32k+31, sub-blocks 8h + 2k and 8h + 2k + 1.
        const __m256i q[4] = {
            _mm256_or_si256(_mm256_and_si256(l0, low4),
                            _mm256_slli_epi16(_mm256_and_si256(qh, three), 4)),
            _mm256_or_si256(_mm256_and_si256(l1, low4),
                            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), three), 4)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4),
                            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), three), 4)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4),
                            _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), three), 4)),
        };
        for (int k = 0; k < 4; ++k) {
          const int j = 8 * h + 2 * k;
          // s16 lanes 0-7 belong to sub-block j, 8-15 to j + 1.
          const __m256i s =
              _mm256_setr_m128i(_mm_set1_epi16(x.scales[j]), _mm_set1_epi16(x.scales[j + 1]));
          for (int c = 0; c < C; ++c) {
            const __m256i av = _mm256_loadu_si256(
                reinterpret_cast<const __m256i*>(ab[c][b].qs + 128 * h + 32 * k));
            sumi[c] = _mm256_add_epi32(sumi[c], _mm256_madd_epi16(madd_u8s8(q[k], av), s));
          }
        }
      }
      const float dw = fp16_scalar(x.d);
      for (int c = 0; c < C; ++c) {
        const float d = dw * ab[c][b].d;
        acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[c]), acc[c]);
      }
    }
    for (int c = 0; c < C; ++c) out[c] = hsum8(acc[c]);
  }
};

}  // namespace

const KQuantKernelSet& avx2_kquant_kernels() {
  static const KQuantKernelSet set{
      matmul_tiles<K4<false>>,
      matmul_tiles<K4<true>>,
      matmul_tiles<K6>,
      quantize_q8_k_avx2,
  };
  return set;
}

}  // namespace ktune::cpu::detail
