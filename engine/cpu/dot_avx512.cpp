// AVX-512 (F/BW/VL/DQ, no VNNI: Skylake-SP, Cascade Lake without VNNI use) kernels. Integer
// dots use VPMADDUBSW (u8 × s8 -> s16 pairs) then VPMADDWD with ones (-> s32). VPMADDUBSW
// saturates at 32767, so Q4_0 nibbles are shifted down to 0..15 (15 · 127 · 2 fits) and Q8_0 uses
// the sign trick (|w| × a·sign(w)) rather than the +128 offset VNNI uses.
// Also the float dots and the Q8_0 activation quantizer, which the VNNI set reuses.
#include "cpu/dot_avx512_tiles.h"
#include "cpu/dot_kernels.h"
#include "ktune/engine/quant.h"

namespace ktune::cpu::detail {
namespace {

using avx512::kActBytes;

inline __m512i madd_u8s8(__m512i u, __m512i s) {
  return _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1));
}

struct Q4Ops {
  static constexpr int64_t kWeightBlockBytes = sizeof(BlockQ4_0);
  // [b0 b0 b1 b1] (16 bytes each), then the upper copy of each shifted by 4: low nibbles =
  // weights 0..15, high nibbles = weights 16..31, i.e. natural order, values 0..15.
  static __m512i load_w(const uint8_t* qs, bool two) {
    const __m128i b0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    __m512i v;
    if (two) {
      const __m128i b1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + kWeightBlockBytes));
      v = _mm512_mask_broadcast_i32x4(_mm512_broadcast_i32x4(b0), 0xFF00, b1);
    } else {
      v = _mm512_maskz_broadcast_i32x4(0x00FF, b0);
    }
    v = _mm512_srlv_epi64(v, _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0));
    return _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
  }
  // -8 · (sum of each 4 activations), so sumi = sum((q + 8) · a) - 8 · sum(a) = sum(q · a).
  static __m512i neg_corr(__m512i a) {
    return _mm512_sub_epi32(_mm512_setzero_si512(), madd_u8s8(_mm512_set1_epi8(8), a));
  }
  static __m512i dot(__m512i nc, __m512i w, __m512i a) {
    return _mm512_add_epi32(nc, madd_u8s8(w, a));
  }
  static __m256 act_scale(__m256 d) { return d; }
  static __m512i scale_index(int pair) { return avx512::pair_scale_index(pair); }
};

struct Q8Ops {
  static constexpr int64_t kWeightBlockBytes = sizeof(BlockQ8_0);
  static __m512i load_w(const uint8_t* qs, bool two) { return avx512::load_act_pair(qs, two); }
  static __m512i neg_corr(__m512i) { return _mm512_setzero_si512(); }
  // Sign trick: |w| is unsigned, and a takes w's sign (negated where w < 0).
  static __m512i dot(__m512i, __m512i w, __m512i a) {
    const __m512i sa = _mm512_mask_sub_epi8(a, _mm512_movepi8_mask(w), _mm512_setzero_si512(), a);
    return madd_u8s8(_mm512_abs_epi8(w), sa);
  }
  static __m256 act_scale(__m256 d) { return d; }
  static __m512i scale_index(int pair) { return avx512::pair_scale_index(pair); }
};

float dot_f32(int64_t n, const void* w, const void* a) {
  return avx512::float_dot(n, w, static_cast<const float*>(a),
                           [](const void* p, int64_t i, __mmask16 m) {
                             return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + i);
                           });
}

float dot_f16(int64_t n, const void* w, const void* a) {
  return avx512::float_dot(
      n, w, static_cast<const float*>(a), [](const void* p, int64_t i, __mmask16 m) {
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i));
      });
}

float dot_bf16(int64_t n, const void* w, const void* a) {
  return avx512::float_dot(
      n, w, static_cast<const float*>(a), [](const void* p, int64_t i, __mmask16 m) {
        const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + i);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      });
}

// Bit-exact with quantize_row(Q8_0): same amax, same d and 1/d in float, and roundf's
// half-away-from-zero rounding rebuilt from truncation (the hardware's nearest-even mode would
// differ on ties).
void quantize_q8_0(const float* x, void* dst, int64_t n) {
  auto* y = static_cast<BlockQ8_0*>(dst);
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  const __m512 sign_mask = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0x80000000u)));
  for (int64_t b = 0; b < n / avx512::kQ; ++b, x += avx512::kQ) {
    const __m512 v0 = _mm512_loadu_ps(x);
    const __m512 v1 = _mm512_loadu_ps(x + 16);
    const float amax = _mm512_reduce_max_ps(
        _mm512_max_ps(_mm512_and_ps(v0, abs_mask), _mm512_and_ps(v1, abs_mask)));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = fp32_to_fp16(d);
    const __m512 vid = _mm512_set1_ps(id);
    for (int h = 0; h < 2; ++h) {
      const __m512 v = _mm512_mul_ps(h == 0 ? v0 : v1, vid);
      const __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
      const __mmask16 up = _mm512_cmp_ps_mask(_mm512_and_ps(_mm512_sub_ps(v, t), abs_mask),
                                              _mm512_set1_ps(0.5f), _CMP_GE_OQ);
      const __m512 one = _mm512_or_ps(_mm512_and_ps(v, sign_mask), _mm512_set1_ps(1.0f));
      const __m512 r = _mm512_mask_add_ps(t, up, t, one);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(y[b].qs + 16 * h),
                       _mm512_cvtsepi32_epi8(_mm512_cvttps_epi32(r)));
    }
  }
}

}  // namespace

const KernelSet& avx512_kernels() {
  static const KernelSet set{
      avx512::matmul<Q4Ops>,    avx512::matmul<Q8Ops>,   matmul_by_rows<dot_f16>,
      matmul_by_rows<dot_bf16>, matmul_by_rows<dot_f32>, quantize_q8_0,
  };
  return set;
}

}  // namespace ktune::cpu::detail
